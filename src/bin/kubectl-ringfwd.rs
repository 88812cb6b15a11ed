//! `kubectl-ringfwd`: the same program as `ringfwd`, under the name kubectl looks for on PATH,
//! so that `kubectl ringfwd svc/web 8080:http` works. See [`ringfwd::cli`].

fn main() -> std::process::ExitCode {
    ringfwd::cli::main()
}
