//! `ringfwd`: see [`ringfwd::cli`].

fn main() -> std::process::ExitCode {
    ringfwd::cli::main()
}
