//! `--data-plane`: the probe, the fallback and the refusal, with splice(2) or io_uring really
//! forbidden.
//!
//! The binary runs under a seccomp filter that makes `splice` (or `io_uring_setup`) fail with
//! EPERM, the way a container runtime's default profile can, installed in the child just
//! before `exec`.
//! `ringfwd bench` then moves real bytes through its embedded `serve`, so a data plane that
//! claimed splice and could not use it would fail the transfer, not just print a name.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use support::procs::{IO_TIMEOUT, PortForward, echo_server, serve_in_process};

/// Classic BPF, as seccomp reads it (linux/filter.h, linux/seccomp.h): BPF_LD|BPF_W|BPF_ABS,
/// BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// In the child, before exec: every call of syscall `nr` fails with EPERM from now on.
fn forbid(nr: u32) -> std::io::Result<()> {
    let mut prog = [
        stmt(BPF_LD_W_ABS, ARCH_OFFSET),
        jeq(AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW), // another ABI: not ours to judge
        stmt(BPF_LD_W_ABS, NR_OFFSET),
        jeq(nr, 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // Safety: prctl with the documented arguments; `fprog` points at `prog`, alive for the
    // call (the kernel copies the filter). Only async-signal-safe calls, as pre_exec requires.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

const SPLICE: Option<u32> = Some(libc::SYS_splice as u32);
const IO_URING: Option<u32> = Some(libc::SYS_io_uring_setup as u32);

/// `ringfwd bench` on `data_plane`, with syscall `forbidden` refused.
fn bench(data_plane: &str, forbidden: Option<u32>) -> Output {
    bench_forbidding(data_plane, forbidden.as_slice())
}

/// `ringfwd bench` on `data_plane`, with every syscall in `forbidden` refused.
fn bench_forbidding(data_plane: &str, forbidden: &[u32]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfwd"));
    cmd.args([
        "bench",
        "--data-plane",
        data_plane,
        "--bytes",
        "32MiB",
        "--connects",
        "5",
        "--echoes",
        "10",
    ])
    .env("RUST_LOG", "ringfwd=warn");
    let forbidden = forbidden.to_vec();
    if !forbidden.is_empty() {
        // Safety: the closure only calls prctl (async-signal-safe) between fork and exec; the
        // filters stack, each refusing one call.
        unsafe { cmd.pre_exec(move || forbidden.iter().try_for_each(|&nr| forbid(nr))) };
    }
    cmd.output().expect("run ringfwd bench")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The run failed with exactly one line: an error that names each of `words`.
fn refused(out: Output, words: &[&str]) {
    let se = text(&out.stderr);
    assert!(!out.status.success(), "{se}");
    let lines: Vec<&str> = se.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{se}");
    assert!(
        lines[0].starts_with("error: ") && words.iter().all(|w| lines[0].contains(w)),
        "{se}"
    );
}

#[test]
fn auto_uses_uring_where_available() {
    let out = bench("auto", None);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}{se}");
    // Where this machine has io_uring (`--data-plane uring` runs), auto picks it.
    let uring = bench("uring", None).status.success();
    let want = if uring {
        "data plane uring"
    } else {
        "data plane epoll"
    };
    assert!(so.contains(want), "want {want:?}: {so}");
    assert!(!se.contains("not available"), "{se}");
}

#[test]
fn auto_uses_uring_without_splice_when_splice_is_forbidden() {
    // The ring copies what it would have spliced: the bench's bytes still arrive.
    if !bench("uring", None).status.success() {
        return eprintln!("io_uring not available here");
    }
    let out = bench("auto", SPLICE);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("data plane uring"), "{so}");
    assert!(se.trim().is_empty(), "{se}");
}

#[test]
fn auto_falls_back_to_copy_when_splice_and_io_uring_are_forbidden() {
    let out = bench_forbidding(
        "auto",
        &[libc::SYS_splice as u32, libc::SYS_io_uring_setup as u32],
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "the fallback did not carry the bench: {so}{se}"
    );
    assert!(so.contains("data plane copy"), "{so}");
    let warned: Vec<_> = se
        .lines()
        .filter(|l| l.contains("splice(2) is not available"))
        .collect();
    assert_eq!(warned.len(), 1, "want one line saying why: {se}");
}

#[test]
fn epoll_is_refused_when_splice_is_forbidden() {
    refused(
        bench("epoll", SPLICE),
        &["needs splice(2)", "--data-plane copy"],
    );
}

#[test]
fn copy_never_splices() {
    // Under the filter a single splice would fail the transfer.
    let out = bench("copy", SPLICE);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("data plane copy"), "{so}");
}

#[test]
fn uring_moves_the_bytes() {
    let out = bench("uring", None);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("data plane uring"), "{so}");
}

#[test]
fn uring_is_refused_when_io_uring_is_forbidden() {
    refused(
        bench("uring", IO_URING),
        &["io_uring_setup", "--data-plane epoll"],
    );
}

#[test]
fn auto_does_not_need_io_uring() {
    // Where io_uring is refused (a container's default seccomp profile) auto picks epoll
    // (splice) and warns about nothing: that is a normal place to run.
    let out = bench("auto", IO_URING);
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}{se}");
    assert!(so.contains("data plane epoll"), "{so}");
    assert!(se.trim().is_empty(), "{se}");
}

/// `n` connections held open at once through `ringfwd forward --data-plane DATA_PLANE` (to a
/// `serve` in this process, then an echo server), the forward started with an open-files
/// limit of `soft` (hard `hard`): each connection sends a byte once all are open, and must
/// get it back.
fn hold_connections(data_plane: &str, soft: u64, hard: u64, n: usize) -> Result<(), String> {
    let (_rt, url) = serve_in_process();
    let fwd = forward_limited(&url, data_plane, soft, hard)?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(connect(&fwd).map_err(|e| format!("connection {i}: connect: {e}"))?);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        echo_byte(c, i as u8)
            .map_err(|e| format!("connection {i} of {n}: {e}; forward said: {}", fwd.stderr()))?;
    }
    Ok(())
}

/// `ringfwd forward --data-plane DATA_PLANE` to `url`, then an echo server, with an
/// open-files limit of `soft` (hard `hard`).
fn forward_limited(
    url: &str,
    data_plane: &str,
    soft: u64,
    hard: u64,
) -> Result<PortForward, String> {
    let port = echo_server();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfwd"));
    cmd.args(["forward", "--url", url, "--data-plane", data_plane])
        .arg(format!(":{port}"))
        .env("RUST_LOG", "ringfwd=warn");
    // Safety: the closure only calls setrlimit (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &r) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        })
    };
    PortForward::start(cmd)
}

fn connect(fwd: &PortForward) -> std::io::Result<TcpStream> {
    let c = TcpStream::connect((Ipv4Addr::LOCALHOST, fwd.local))?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

/// Send `byte` and read it back.
fn echo_byte(c: &mut TcpStream, byte: u8) -> Result<(), String> {
    let mut back = [0u8];
    c.write_all(&[byte])
        .and_then(|_| c.read_exact(&mut back))
        .map_err(|e| e.to_string())?;
    match back[0] == byte {
        true => Ok(()),
        false => Err(format!("sent {byte}, got {}", back[0])),
    }
}

/// The io_uring plane names sockets by number: 300 idle connections fit under a limit of 450
/// descriptors, where a duplicate each would need 600.
#[test]
fn uring_holds_a_connection_per_descriptor() {
    if let Err(e) = ringfwd::relay::uring::available() {
        return eprintln!("io_uring not available here: {e}");
    }
    hold_connections("uring", 450, 450, 300).unwrap();
}

/// Descriptors registered with any epoll instance of process `pid` (the `tfd:` lines of
/// `/proc/PID/fdinfo`).
fn in_epoll(pid: u32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        if let Ok(info) = std::fs::read_to_string(e.path()) {
            n += info.lines().filter(|l| l.starts_with("tfd:")).count();
        }
    }
    n
}

/// On the io_uring plane the sockets of relayed connections (the local ones and the upstream
/// sessions) are owned by the workers' rings and never registered with epoll: whatever the
/// number of connections, tokio's epoll holds only its own few descriptors (listeners, the
/// control plane). On the epoll plane every connection's socket is in it (the check can fail).
#[test]
fn uring_sockets_stay_out_of_epoll() {
    if let Err(e) = ringfwd::relay::uring::available() {
        return eprintln!("io_uring not available here: {e}");
    }
    const N: usize = 200;
    for plane in ["uring", "epoll"] {
        let (_rt, url) = serve_in_process();
        let fwd = forward_limited(&url, plane, 4096, 4096).unwrap();
        let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(&fwd).unwrap()).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            echo_byte(c, i as u8).unwrap();
        }
        let registered = in_epoll(fwd.child.id());
        match plane {
            "uring" => assert!(
                registered < 32,
                "{registered} descriptors in the uring forward's epoll with {N} connections open"
            ),
            _ => assert!(
                registered >= N,
                "only {registered} descriptors in the epoll forward's epoll with {N} connections"
            ),
        }
    }
}

/// A soft limit below what the connections need is raised to the hard limit at start-up.
#[test]
fn soft_open_files_limit_is_raised() {
    hold_connections("auto", 64, 450, 300).unwrap();
}

/// Out of descriptors, the forward stays up without spinning (a connection it accepted but
/// could not open a session for is reset): connections past the limit wait in the backlog, the failed accepts are retried with a backoff and logged at most once
/// a second, and once connections close, new ones are served again.
#[test]
fn running_out_of_descriptors_is_survived() {
    let (_rt, url) = serve_in_process();
    let fwd = forward_limited(&url, "auto", 100, 100).unwrap();
    let mut conns: Vec<TcpStream> = (0..150).map(|_| connect(&fwd).unwrap()).collect();
    let started = std::time::Instant::now();
    // The last connection waits in the backlog while the forward fails to accept it.
    let mut last = conns.pop().unwrap();
    last.write_all(&[2]).unwrap();
    assert!(
        fwd.wait_stderr("Too many open files", IO_TIMEOUT),
        "no accept failure logged: {}",
        fwd.stderr()
    );
    drop(conns);
    // The connection that waited in the backlog is served once descriptors are free.
    let mut back = [0u8];
    last.read_exact(&mut back).unwrap();
    assert_eq!(back, [2]);
    let mut fresh = connect(&fwd).unwrap();
    echo_byte(&mut fresh, 3).unwrap();
    let secs = started.elapsed().as_secs() + 2;
    let lines = fwd.stderr().matches("accept on").count() as u64;
    assert!(
        lines <= secs,
        "{lines} accept warnings in under {secs} s: {}",
        fwd.stderr()
    );
}
