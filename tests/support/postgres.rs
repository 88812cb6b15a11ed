//! A real PostgreSQL 15 (Debian's `postgresql-15`) for integration tests: a fresh cluster in a
//! temp dir, its server running as the `postgres` user inside a pod sandbox's network namespace,
//! where the runtime's stream server dials it like any other target. PostgreSQL's own clients
//! (`pg_dump`, `psql`, `pgbench`, from the same package) reach it directly through its Unix
//! socket, a file the host sees, or through a forward on 127.0.0.1 ([`client`]).
//!
//! Owns: the postmaster (a child of the test process) and its temp dir (data directory, socket
//! directory). Must not touch the host's own clusters (`/var/lib/postgresql`, port 5432) or the
//! sandbox it runs in, which belongs to the containerd fixture.
//!
//! The server trades durability for speed (`fsync` off, minimal WAL, no autovacuum): a crash
//! loses a database the next run makes again anyway.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::containerd::{in_netns, wait_for_exit};

/// Where Debian's `postgresql-15` puts the server and its clients. Named in full, not through
/// `/usr/bin`'s version-picking wrapper, so that client and server are always the same release.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The programs the fixture and its tests run.
const PROGRAMS: [&str; 5] = ["initdb", "postgres", "pg_dump", "psql", "pgbench"];
/// The OS user the server runs as (it refuses to run as root); the package creates it.
const OS_USER: &str = "postgres";
/// The database superuser `initdb` creates, and the role every client connects as.
pub const SUPERUSER: &str = "postgres";
/// The line the postmaster logs once it takes connections.
const READY_LINE: &str = "database system is ready to accept connections";
/// Longest wait for that line. It comes in well under a second here.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an immediate shutdown (SIGQUIT) may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries at starting the server on a free port: a port found free can be taken by someone else
/// before the server binds it.
const PORT_ATTEMPTS: usize = 3;

/// A running PostgreSQL server. Dropping it shuts the server down (immediately: open sessions
/// are ended, nothing is written back) and removes its files.
pub struct Postgres {
    child: Child,
    port: u16,
    log: Arc<Log>,
    /// Removed when the fixture drops, after the server has exited.
    dir: tempfile::TempDir,
}

/// The server's stderr (its log, and that of every backend), for waiting and failure messages.
#[derive(Default)]
struct Log {
    text: Mutex<(String, bool)>,
    changed: Condvar,
}

impl Log {
    fn text(&self) -> String {
        self.text.lock().unwrap().0.clone()
    }

    /// Waits for the server's ready line; false if it exited (its stderr closed) first. Kills
    /// it and panics if neither happens in time.
    fn wait_ready(&self, child: &mut Child) -> bool {
        let text = self.text.lock().unwrap();
        let (text, waited) = self
            .changed
            .wait_timeout_while(text, READY_TIMEOUT, |(t, closed)| {
                !t.contains(READY_LINE) && !*closed
            })
            .unwrap();
        if waited.timed_out() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "postgres fixture: no {READY_LINE:?} within {READY_TIMEOUT:?}; log:\n{}",
                text.0
            );
        }
        text.0.contains(READY_LINE)
    }
}

impl Postgres {
    /// Whether this machine can run the fixture: root (to enter a network namespace and switch
    /// to the `postgres` user), that user, and Debian's binaries. `Err(reason)` to skip on.
    pub fn check_prerequisites() -> Result<(), String> {
        // Safety: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (the server runs in a pod's network namespace)".into());
        }
        let missing: Vec<String> = PROGRAMS
            .iter()
            .map(|p| Path::new(BIN_DIR).join(p))
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "PostgreSQL 15 is not installed: missing {} (.ci/install-test-deps installs it)",
                missing.join(", ")
            ));
        }
        os_user(OS_USER).map(|_| ())
    }

    /// Makes a cluster and starts its server inside the network namespace at `netns`, listening
    /// on every address there on a free port. Panics, with the server's log, when PostgreSQL
    /// misbehaves.
    ///
    /// The server is killed if the calling thread ends first (`PR_SET_PDEATHSIG` follows the
    /// thread, not the process): start it from a thread that outlives it, such as a custom
    /// harness's main thread.
    pub fn start(netns: &Path) -> Postgres {
        let t0 = Instant::now();
        let (uid, gid) = os_user(OS_USER).unwrap_or_else(|e| panic!("postgres fixture: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("ringfwd-postgres-")
            .tempdir()
            .expect("temp dir");
        // The server runs as `postgres`: it must be able to reach its directories.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        for (sub, mode) in [("data", 0o700), ("sock", 0o755)] {
            let p = dir.path().join(sub);
            fs::create_dir(&p).unwrap();
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut initdb = Command::new(program("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["--no-sync", "--auth=trust", "--encoding=UTF8", "--locale=C"])
            .args(["--username", SUPERUSER])
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid);
        run_ok(initdb, "initdb", String::new);
        let initdb = t0.elapsed();
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port_in(netns);
            let (mut child, log) = spawn_server(dir.path(), netns, port, uid, gid);
            if log.wait_ready(&mut child) {
                eprintln!(
                    "postgres fixture: cluster made in {} ms, server ready on port {port} after \
                     {} ms (dir {})",
                    initdb.as_millis(),
                    t0.elapsed().as_millis(),
                    dir.path().display()
                );
                return Postgres {
                    child,
                    port,
                    log,
                    dir,
                };
            }
            let status = child.wait();
            let text = log.text();
            if attempt < PORT_ATTEMPTS && text.contains("Address already in use") {
                eprintln!("postgres fixture: port {port} was taken meanwhile, trying another");
                continue;
            }
            panic!("postgres fixture: the server did not start ({status:?}); its log:\n{text}");
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The server's TCP port inside the pod's network namespace.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client program connecting straight to the server through its Unix socket.
    pub fn direct(&self, program: &str) -> Command {
        client(
            program,
            &self.dir.path().join("sock").display().to_string(),
            self.port,
        )
    }

    /// Runs `sql` in `db` straight on the server (`psql -At`, stopping at the first error) and
    /// returns what it printed. Panics on failure, with psql's and the server's messages.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let mut psql = self.direct("psql");
        psql.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql]);
        run_ok(psql, &format!("{sql:?} in {db}"), || self.log_tail())
    }

    /// A new database `db` filled by `pgbench -i -s scale` (100,000 accounts per unit of scale,
    /// about 15 MB).
    pub fn pgbench_init(&self, db: &str, scale: u32) {
        self.sql("postgres", &format!("CREATE DATABASE {db}"));
        let mut pgbench = self.direct("pgbench");
        pgbench.args(["-i", "-q", "-s", &scale.to_string(), db]);
        run_ok(pgbench, "pgbench -i", || self.log_tail());
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The server's last log lines (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("--- server log (tail) ---\n{tail}")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if matches!(self.child.try_wait(), Ok(None)) {
            // Immediate shutdown: sessions end and the server exits without the checkpoint a
            // fast shutdown writes (seconds after a restore), as its data is deleted next.
            // Safety: kill(2) on our own child, which has not been reaped (try_wait said so).
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            wait_for_exit(pid, Instant::now() + STOP_TIMEOUT);
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!("postgres fixture: no exit {STOP_TIMEOUT:?} after SIGQUIT, killing it");
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// A PostgreSQL client program (`psql`, `pg_dump`, `pgbench`, ...) that connects to
/// `host:port` (a host name, an address, or a Unix socket directory) as the superuser, with
/// nothing taken from the caller's `PG*` environment, no TLS or GSSAPI negotiation, and no
/// input.
pub fn client(program: &str, host: &str, port: u16) -> Command {
    let mut cmd = Command::new(self::program(program));
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("PG") {
            cmd.env_remove(var);
        }
    }
    cmd.env("PGHOST", host)
        .env("PGPORT", port.to_string())
        .env("PGUSER", SUPERUSER)
        .env("PGSSLMODE", "disable")
        .env("PGGSSENCMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "30")
        .stdin(Stdio::null());
    cmd
}

/// Runs a program of the fixture to completion and returns its stdout; panics with its output,
/// and `context` (the server's log), when it fails.
fn run_ok(cmd: Command, what: &str, context: impl FnOnce() -> String) -> String {
    let (ok, stdout, stderr) = super::procs::run(cmd);
    assert!(
        ok,
        "postgres fixture: {what} failed: {stdout}{stderr}\n{}",
        context()
    );
    stdout
}

fn program(name: &str) -> PathBuf {
    Path::new(BIN_DIR).join(name)
}

/// A TCP port nothing listens on inside `netns` right now (bound on the wildcard address, then
/// released for the server to take).
fn free_port_in(netns: &Path) -> u16 {
    let l = in_netns(netns, || TcpListener::bind("0.0.0.0:0"))
        .unwrap_or_else(|e| panic!("bind 0.0.0.0:0 in {}: {e}", netns.display()));
    l.local_addr().unwrap().port()
}

/// Starts the postmaster in `netns` as `uid`/`gid`, with its stderr read into a [`Log`].
fn spawn_server(dir: &Path, netns: &Path, port: u16, uid: u32, gid: u32) -> (Child, Arc<Log>) {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open netns {}: {e}", netns.display()));
    let ns_fd = ns.as_raw_fd();
    let mut cmd = Command::new(program("postgres"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()])
        .arg("-k")
        .arg(dir.join("sock"));
    for setting in [
        "listen_addresses=*",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "wal_level=minimal",
        "max_wal_senders=0",
        // Quiet between tests: nothing runs on the two cores but what a test asks for.
        "autovacuum=off",
    ] {
        cmd.args(["-c", setting]);
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Safety: getpid before fork has no preconditions.
    let parent = unsafe { libc::getpid() };
    // Safety: between fork and exec only raw syscalls run (setns, setgroups, setgid, setuid,
    // prctl, getppid, _exit), all async-signal-safe; `ns_fd` stays open until spawn returns.
    // The network namespace is entered while still root; the parent-death signal is set after
    // the credential change, which would clear it.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return fail();
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return fail();
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return fail();
            }
            // The parent may have died before the prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn postgres");
    drop(ns);
    let log = Arc::new(Log::default());
    let sink = log.clone();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            let mut t = sink.text.lock().unwrap();
            t.0.push_str(&line);
            t.0.push('\n');
            sink.changed.notify_all();
        }
        sink.text.lock().unwrap().1 = true;
        sink.changed.notify_all();
    });
    (child, log)
}

/// The uid and gid of the OS user `name`.
fn os_user(name: &str) -> Result<(u32, u32), String> {
    let cname = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0 as libc::c_char; 4096];
    // Safety: passwd is plain old data; all-zero is a valid value that getpwnam_r overwrites.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // Safety: every pointer is valid for the call, `buf` is as long as we say, and the strings
    // `pw` points into live in `buf`, which outlives their (non-)use here.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!(
            "no OS user {name:?} (the postgresql-15 package creates it)"
        ));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}
