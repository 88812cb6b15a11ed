//! Database dumps, restores and a connection-per-transaction load through ringfwd, with a real
//! PostgreSQL 15 and its own client tools: the jobs the tool is for, done the way users do them.
//!
//! The server runs inside a containerd pod sandbox's network namespace (`support::postgres`),
//! with a database made by `pgbench -i`. Every scenario goes through the `ringfwd` binary along
//! one of three paths: SPDY straight to containerd's stream server (`ringfwd forward
//! --runtime-endpoint`), WebSocket v4 to the same (`--protocol websocket`), and the KEP-4006
//! tunnel of the test API server (`ringfwd --kubeconfig KC pod/pg :postgres`), which relays to
//! containerd as kube-apiserver and kubelet do. Per path:
//! - `pg_dump` through the forward prints the same dump as `pg_dump` on the server's Unix socket
//!   (compared line by line without the `\restrict` / `\unrestrict` lines, whose key is random);
//! - `psql -f` of that dump through the forward into a new database gives the same row counts and
//!   the same checksum of every row as the source;
//! - the forward's upstream connections killed (`ss -K`) once half the dump has come out:
//!   `pg_dump` fails (non-zero exit, within a bound), its output lacks the dump's last line, the
//!   forward ended its connection with a reset (seen by a relay in between, as libpq words a
//!   reset and an end of file alike), and a new connection through the same forward works.
//!
//! And once, through SPDY to containerd (where the data plane moves the bytes, so the CI run per
//! data plane covers each): `pgbench -S -C` (a new connection per transaction) for 10 s, with no
//! failed transaction.
//!
//! A custom harness (libtest-mimic) makes containerd, the sandbox, the server, the database and
//! the direct dump once and shares them; the scenarios only read the source database. Without
//! root, containerd or PostgreSQL every scenario is reported as ignored after a loud SKIPPED
//! line; with `CI` set that is a failure.

mod support;

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use support::apiserver::{ApiServer, Auth, Backend, PfKind, PodDef};
use support::postgres::{Postgres, client};
use support::procs::PortForward;

const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");
/// `pgbench -i` scale: 1,400,000 accounts, a database of 227 MB and a plain dump of 135 MB.
/// Measured on the 2-core VM: the setup (cluster, `pgbench -i`, the direct dump) takes 7-8 s,
/// each dump through a forward 1.2-3.2 s, each restore 2.1-4.1 s, the whole file 47 s.
const SCALE: u32 = 14;
/// The database the scenarios dump and load-test; nothing writes to it after `pgbench -i`.
const SOURCE_DB: &str = "source";
/// The tables `pgbench -i` makes.
const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];
/// The last line of a complete plain-format dump (then `--` and the `\unrestrict` line).
const DUMP_COMPLETE: &str = "-- PostgreSQL database dump complete";
/// How long the connection-per-transaction load runs.
const PGBENCH_SECONDS: u32 = 10;
const LOCALHOST: &str = "127.0.0.1";
/// Longest a client program may run: a dump or a restore takes seconds here; one still running
/// after this hangs (a forward that never ends a broken connection would make it hang forever:
/// libpq has no read timeout), and is killed so that the scenario fails instead of the suite.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// What every scenario shares: the server, its source database, and a dump made directly.
struct World {
    pg: Postgres,
    endpoint: String,
    sandbox: String,
    /// Port of containerd's stream server: the upstream of `ringfwd forward --runtime-endpoint`.
    stream_port: u16,
    /// `pg_dump SOURCE_DB` on the server's Unix socket.
    dump: PathBuf,
    dump_len: u64,
    /// [`checksum_sql`] on the source database.
    checksums: String,
    _files: tempfile::TempDir,
}

/// How a forward reaches the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `ringfwd forward --runtime-endpoint EP SANDBOX`: SPDY/3.1 to containerd's stream server.
    Spdy,
    /// The same with `--protocol websocket`: v4.channel.k8s.io, one upgrade per connection.
    Websocket,
    /// `ringfwd --kubeconfig KC pod/pg`: the API server's WebSocket tunnel (its default).
    Tunnel,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Spdy => "spdy",
            Via::Websocket => "websocket",
            Via::Tunnel => "tunnel",
        }
    }
}

/// A running `ringfwd` to the server, and the API server it goes through (tunnel).
struct Forward {
    pf: PortForward,
    api: Option<ApiServer>,
    /// The TCP port ringfwd's upstream connections go to.
    upstream_port: u16,
    via: Via,
}

impl Forward {
    fn start(w: &World, via: Via) -> Result<Forward, Failed> {
        let remote = format!(":{}", w.pg.port());
        let (cmd, api, upstream_port) = match via {
            Via::Spdy | Via::Websocket => {
                let mut cmd = Command::new(BIN);
                cmd.args(["forward", "--runtime-endpoint", &w.endpoint]);
                if via == Via::Websocket {
                    cmd.args(["--protocol", "websocket"]);
                }
                cmd.args([&w.sandbox, &remote]);
                (cmd, None, w.stream_port)
            }
            Via::Tunnel => {
                let api = ApiServer::start();
                let backend = Backend::Cri {
                    endpoint: w.endpoint.clone(),
                    sandbox: w.sandbox.clone(),
                };
                api.add_pod(PodDef::new("pg", backend).port(Some("postgres"), w.pg.port()));
                let mut cmd = Command::new(BIN);
                cmd.arg("--kubeconfig")
                    .arg(api.kubeconfig(Auth::Token))
                    .env_remove("KUBECONFIG")
                    .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
                    .args(["pod/pg", ":postgres"]);
                let port = api.addr().port();
                (cmd, Some(api), port)
            }
        };
        let pf = PortForward::start(cmd)
            .map_err(|e| format!("ringfwd ({}) did not start: {e}", via.name()))?;
        Ok(Forward {
            pf,
            api,
            upstream_port,
            via,
        })
    }

    /// A PostgreSQL client connecting through this forward.
    fn client(&self, program: &str) -> Command {
        client(program, LOCALHOST, self.pf.local)
    }

    /// Through the API server, every port-forward request was a tunnel.
    fn check_tunnel(&self) -> Result<(), Failed> {
        let Some(api) = &self.api else { return Ok(()) };
        let kinds: Vec<PfKind> = api.portforward_log().into_iter().map(|r| r.kind).collect();
        check(
            !kinds.is_empty() && kinds.iter().all(|k| *k == PfKind::Tunnel),
            || format!("port-forward requests {kinds:?}, want tunnels only"),
        )
    }

    /// ringfwd's stderr, for failure messages.
    fn log(&self) -> String {
        format!(
            "--- ringfwd ({}) stderr ---\n{}",
            self.via.name(),
            self.pf.stderr()
        )
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(what().into()) }
}

/// Count and sum of a 64-bit hash of every row, per table, sorted: equal results mean the
/// same rows, in any order (but for a hash collision).
fn checksum_sql() -> String {
    let per_table: Vec<String> = TABLES
        .iter()
        .map(|t| format!("SELECT '{t}', count(*), sum(hashtextextended(r::text, 0)) FROM {t} r"))
        .collect();
    format!("{} ORDER BY 1", per_table.join(" UNION ALL "))
}

/// Spawns `cmd` with stdout piped to the caller and stderr collected by a thread.
fn spawn_piped(mut cmd: Command) -> (Child, ChildStdout, JoinHandle<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    (child, stdout, errors)
}

/// Kills a child still running when its time is up. Disarm it before reaping the child (the
/// pid must still be the child's when it fires); dropping it disarms it too.
struct Deadline {
    disarm: mpsc::Sender<()>,
    fired: JoinHandle<bool>,
}

impl Deadline {
    fn arm(child: &Child, limit: Duration) -> Deadline {
        let pid = child.id() as libc::pid_t;
        let (disarm, disarmed) = mpsc::channel::<()>();
        let fired = std::thread::spawn(move || {
            if disarmed.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
                return false;
            }
            // Safety: kill(2) on our child; it is reaped only after `disarm` joined this
            // thread, so the pid is still its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        });
        Deadline { disarm, fired }
    }

    /// Whether it fired (and killed the child).
    fn disarm(self) -> bool {
        let _ = self.disarm.send(());
        self.fired.join().unwrap()
    }
}

/// Runs `cmd` to completion within [`CLIENT_LIMIT`], collecting its output.
fn output_within(mut cmd: Command) -> Result<Output, Failed> {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Deadline::arm(&child, CLIENT_LIMIT);
    // Reads both pipes to their end, which comes when the child exits or is killed.
    let out = child.wait_with_output();
    if deadline.disarm() {
        return Err(format!("{cmd:?} still running after {CLIENT_LIMIT:?}: killed it").into());
    }
    Ok(out?)
}

/// How the forward ended a connection towards its local client.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Eof,
    Reset,
    Other(String),
}

/// A one-connection TCP relay in front of the forward's local port that reports how the
/// forward ended the connection, and passes that ending on as it came (a reset as a reset).
/// libpq words a reset and a clean end of file alike ("server closed the connection
/// unexpectedly"), so pg_dump's message cannot tell them apart.
fn tap(forward: u16) -> (u16, mpsc::Receiver<Ending>) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind tap");
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((client, _)) = l.accept() else { return };
        let upstream = match TcpStream::connect((Ipv4Addr::LOCALHOST, forward)) {
            Ok(s) => s,
            Err(e) => return drop(tx.send(Ending::Other(format!("connect: {e}")))),
        };
        let (mut from_client, mut to_upstream) = (client.try_clone().unwrap(), upstream);
        let mut from_upstream = to_upstream.try_clone().unwrap();
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_upstream);
            let _ = to_upstream.shutdown(Shutdown::Write);
        });
        let mut to_client = client;
        let mut buf = vec![0u8; 64 * 1024];
        let ending = loop {
            match from_upstream.read(&mut buf) {
                Ok(0) => break Ending::Eof,
                Ok(n) => {
                    if let Err(e) = to_client.write_all(&buf[..n]) {
                        break Ending::Other(format!("writing to the client: {e}"));
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break Ending::Reset,
                Err(e) => break Ending::Other(e.to_string()),
            }
        };
        if ending == Ending::Eof {
            let _ = to_client.shutdown(Shutdown::Write);
        } else {
            // The last close sends a reset; waking the other thread's read lets it close too.
            let _ = socket2::SockRef::from(&to_client).set_linger(Some(Duration::ZERO));
            let _ = to_client.shutdown(Shutdown::Read);
        }
        let _ = up.join();
        let _ = tx.send(ending);
    });
    (port, rx)
}

/// The next line of a dump that is not a `\restrict KEY` / `\unrestrict KEY` line; empty at
/// the end.
fn next_dump_line(r: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        line.clear();
        r.read_until(b'\n', line)?;
        if !(line.starts_with(b"\\restrict ") || line.starts_with(b"\\unrestrict ")) {
            return Ok(());
        }
    }
}

/// Compares the dump read from `got` with the file `want` line by line, leaving out the
/// `\restrict` pair. Returns the lines compared, or where they first differ.
fn compare_dump(got: impl Read, want: &Path) -> Result<u64, String> {
    let mut got = BufReader::with_capacity(1 << 20, got);
    let file = File::open(want).map_err(|e| format!("{}: {e}", want.display()))?;
    let mut want = BufReader::with_capacity(1 << 20, file);
    let (mut g, mut w, mut n) = (Vec::new(), Vec::new(), 0u64);
    loop {
        next_dump_line(&mut got, &mut g).map_err(|e| format!("reading pg_dump: {e}"))?;
        next_dump_line(&mut want, &mut w).map_err(|e| format!("reading the dump: {e}"))?;
        if g != w {
            let show = |l: &[u8]| {
                let s = String::from_utf8_lossy(l);
                s.chars().take(120).collect::<String>()
            };
            return Err(format!(
                "line {} differs from the direct dump: {:?}, want {:?}",
                n + 1,
                show(&g),
                show(&w)
            ));
        }
        if g.is_empty() {
            return Ok(n);
        }
        n += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// `pg_dump` through the forward prints what it prints on the server's own socket.
fn dump_identical(w: &World, via: Via) -> Result<(), Failed> {
    let fwd = Forward::start(w, via)?;
    let t0 = Instant::now();
    let mut cmd = fwd.client("pg_dump");
    cmd.arg(SOURCE_DB);
    let (mut child, stdout, errors) = spawn_piped(cmd);
    let deadline = Deadline::arm(&child, CLIENT_LIMIT);
    let compared = compare_dump(stdout, &w.dump);
    if compared.is_err() {
        let _ = child.kill();
    }
    let hung = deadline.disarm();
    let status = child.wait()?;
    let errors = errors.join().unwrap();
    check(!hung, || {
        format!(
            "pg_dump via {} still running after {CLIENT_LIMIT:?}: killed it",
            via.name()
        )
    })?;
    let lines = compared.map_err(|e| format!("pg_dump via {}: {e}\n{}", via.name(), fwd.log()))?;
    check(status.success(), || {
        format!(
            "pg_dump via {}: {status}: {errors}\n{}",
            via.name(),
            fwd.log()
        )
    })?;
    eprintln!(
        "pg_dump via {}: {lines} lines ({} bytes) as the direct dump, in {} ms",
        via.name(),
        w.dump_len,
        t0.elapsed().as_millis()
    );
    fwd.check_tunnel()
}

/// `psql -f DUMP` through the forward into a new database: the same rows as the source.
fn restore_exact(w: &World, via: Via) -> Result<(), Failed> {
    let db = format!("restore_{}", via.name());
    w.pg.sql("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
    w.pg.sql("postgres", &format!("CREATE DATABASE {db}"));
    let restored = (|| {
        let fwd = Forward::start(w, via)?;
        let t0 = Instant::now();
        let mut cmd = fwd.client("psql");
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db, "-f"])
            .arg(&w.dump);
        let out = output_within(cmd)?;
        check(out.status.success(), || {
            format!(
                "psql -f via {}: {}: {}\n{}",
                via.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                fwd.log()
            )
        })?;
        eprintln!(
            "psql -f via {}: {} bytes restored in {} ms",
            via.name(),
            w.dump_len,
            t0.elapsed().as_millis()
        );
        fwd.check_tunnel()
    })();
    // Checked on the server's own socket: what the restore wrote, not what a forward shows.
    let sums = restored
        .as_ref()
        .ok()
        .map(|_| w.pg.sql(&db, &checksum_sql()));
    w.pg.sql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
    restored?;
    let sums = sums.unwrap_or_default();
    check(sums == w.checksums, || {
        format!(
            "restored via {}: rows differ from the source:\n{sums}\nwant\n{}",
            via.name(),
            w.checksums
        )
    })
}

/// The forward's upstream connections are killed once half the dump has come through:
/// `pg_dump` must fail, never hang, never leave what looks like a complete dump, and its
/// connection must end in a reset.
fn dump_upstream_killed(w: &World, via: Via) -> Result<(), Failed> {
    let fwd = Forward::start(w, via)?;
    let (tap_port, ending) = tap(fwd.pf.local);
    let mut cmd = client("pg_dump", LOCALHOST, tap_port);
    cmd.arg(SOURCE_DB);
    let (mut child, mut stdout, errors) = spawn_piped(cmd);
    let deadline = Deadline::arm(&child, CLIENT_LIMIT);
    let (mut got, mut killed) = (0u64, None);
    // The last bytes that came out: a complete dump ends with DUMP_COMPLETE and two short lines.
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        got += n as u64;
        tail.extend_from_slice(&buf[..n]);
        tail.drain(..tail.len().saturating_sub(4096));
        if killed.is_none() && got >= w.dump_len / 2 {
            killed = Some(support::kill_connections_to(fwd.upstream_port));
        }
    };
    let hung = deadline.disarm();
    let status = child.wait()?;
    let errors = errors.join().unwrap();
    read?;
    let what = || format!("pg_dump via {}", via.name());
    let killed = killed.transpose()?;
    check(killed.is_some_and(|k| k >= 1), || {
        format!(
            "{}: {got} of {} bytes came, then the end, with {killed:?} upstream connections \
             killed",
            what(),
            w.dump_len
        )
    })?;
    check(!hung, || {
        format!(
            "{}: still running {CLIENT_LIMIT:?} after its upstream was killed: killed it\n{}",
            what(),
            fwd.log()
        )
    })?;
    check(!status.success(), || {
        format!("{}: exit 0 after its upstream was killed: {errors}", what())
    })?;
    let tail = String::from_utf8_lossy(&tail);
    check(!tail.contains(DUMP_COMPLETE), || {
        format!(
            "{}: a killed dump ends like a complete one: {tail:?}",
            what()
        )
    })?;
    let ending = ending
        .recv_timeout(CLIENT_LIMIT)
        .map_err(|e| format!("{}: the tap reported no ending: {e}", what()))?;
    check(ending == Ending::Reset, || {
        format!(
            "{}: the forward ended the connection with {ending:?}, want a reset\n{}",
            what(),
            fwd.log()
        )
    })?;
    eprintln!(
        "pg_dump via {}: {got} of {} bytes, then a reset and {status}: {}",
        via.name(),
        w.dump_len,
        errors.trim().replace('\n', " | ")
    );
    // The forward outlives its upstream: a new connection works.
    let mut cmd = fwd.client("psql");
    cmd.args(["-X", "-At", "-d", SOURCE_DB, "-c"])
        .arg("SELECT count(*) FROM pgbench_branches");
    let out = output_within(cmd)?;
    let answer = String::from_utf8_lossy(&out.stdout);
    check(
        out.status.success() && answer.trim() == SCALE.to_string(),
        || {
            format!(
                "a new connection after the kill: {}: {answer:?} {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                fwd.log()
            )
        },
    )
}

/// `pgbench -S -C`: a new connection per transaction for 10 s; none may fail.
fn pgbench_connect_per_transaction(w: &World, via: Via) -> Result<(), Failed> {
    let fwd = Forward::start(w, via)?;
    let mut cmd = fwd.client("pgbench");
    cmd.args(["-n", "-S", "-C", "-c", "4", "-j", "2", "-T"])
        .arg(PGBENCH_SECONDS.to_string())
        .arg(SOURCE_DB);
    let out = output_within(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(name))?;
        rest.split_whitespace().next()?.parse().ok()
    };
    let (done, failed) = (
        field("number of transactions actually processed: "),
        field("number of failed transactions: "),
    );
    check(
        out.status.success() && failed == Some(0) && done.is_some_and(|n| n > 0),
        || {
            format!(
                "pgbench -S -C via {}: {}, {done:?} transactions, {failed:?} failed:\n{text}{}\n{}",
                via.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                fwd.log()
            )
        },
    )?;
    let tps = text.lines().find(|l| l.starts_with("tps = ")).unwrap_or("");
    eprintln!(
        "pgbench -S -C via {}: {} transactions, each on a new connection, none failed; {tps}",
        via.name(),
        done.unwrap_or(0)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

type Scenario = fn(&World, Via) -> Result<(), Failed>;

fn trials(world: Option<Arc<World>>) -> Vec<Trial> {
    let per_path: [(&str, Scenario); 3] = [
        ("pg_dump_same_as_direct", dump_identical),
        ("psql_restore_same_rows", restore_exact),
        ("pg_dump_fails_when_upstream_killed", dump_upstream_killed),
    ];
    let mut runs: Vec<(Via, &str, Scenario)> = Vec::new();
    for via in [Via::Spdy, Via::Websocket, Via::Tunnel] {
        runs.extend(per_path.iter().map(|&(name, f)| (via, name, f)));
    }
    runs.push((
        Via::Spdy,
        "pgbench_select_new_connection_per_transaction_10s",
        pgbench_connect_per_transaction,
    ));
    runs.into_iter()
        .map(|(via, name, f)| {
            let w = world.clone();
            let ignored = w.is_none();
            Trial::test(format!("{}::{name}", via.name()), move || match w {
                Some(w) => f(&w, via),
                None => Ok(()),
            })
            .with_ignored_flag(ignored)
        })
        .collect()
}

/// The stream server's port, from a URL containerd hands out for the sandbox.
fn stream_server_port(c: &support::Containerd, sandbox: &str, port: u16) -> u16 {
    let sandbox = sandbox.to_owned();
    let url = c
        .cri(|mut cri| async move { cri.port_forward(&sandbox, &[port]).await })
        .expect("CRI PortForward");
    let url = url.expose();
    let hostport = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("unexpected stream URL {}", ringfwd::secret::redact_url(url)));
    hostport
        .parse::<SocketAddr>()
        .expect("stream server address")
        .port()
}

/// The server, its database and the direct dump, on the sandbox `sb`.
fn make_world(c: &support::Containerd, sb: &support::Sandbox) -> World {
    let t0 = Instant::now();
    let pg = Postgres::start(&sb.netns);
    pg.pgbench_init(SOURCE_DB, SCALE);
    let filled = t0.elapsed();
    let files = tempfile::Builder::new()
        .prefix("ringfwd-pg-test-")
        .tempdir()
        .expect("temp dir");
    let dump = files.path().join("direct.sql");
    let status = pg
        .direct("pg_dump")
        .arg(SOURCE_DB)
        .stdout(File::create(&dump).expect("create dump file"))
        .status()
        .expect("spawn pg_dump");
    assert!(status.success(), "direct pg_dump: {status}");
    let dump_len = std::fs::metadata(&dump).unwrap().len();
    let checksums = pg.sql(SOURCE_DB, &checksum_sql());
    let accounts = format!("pgbench_accounts|{}|", SCALE * 100_000);
    assert!(
        checksums.contains(&accounts),
        "pgbench -i -s {SCALE} made {checksums:?}"
    );
    let size = pg.sql(
        "postgres",
        &format!("SELECT pg_database_size('{SOURCE_DB}')"),
    );
    eprintln!(
        "pg fixture: a database of {} bytes filled (pgbench -i -s {SCALE}) {} ms after start, \
         direct dump of {dump_len} bytes after {} ms",
        size.trim(),
        filled.as_millis(),
        t0.elapsed().as_millis()
    );
    World {
        endpoint: c.endpoint(),
        sandbox: sb.id.clone(),
        stream_port: stream_server_port(c, &sb.id, pg.port()),
        pg,
        dump,
        dump_len,
        checksums,
        _files: files,
    }
}

fn main() {
    let mut args = Arguments::from_args();
    // Two cores: one scenario at a time.
    args.test_threads.get_or_insert(1);
    let ready = if args.list {
        None
    } else if let Err(reason) = Postgres::check_prerequisites() {
        support::skip("pg scenarios", &reason);
        None
    } else {
        support::containerd_or_skip("pg scenarios").map(|c| {
            let sb = c.run_sandbox("ringfwd-pg-test");
            let world = Arc::new(make_world(&c, &sb));
            (c, sb, world)
        })
    };
    let conclusion = libtest_mimic::run(&args, trials(ready.as_ref().map(|r| r.2.clone())));
    if let Some((c, sb, world)) = ready {
        let t0 = Instant::now();
        // The trials are gone: this is the last reference. The server stops before its sandbox.
        drop(Arc::into_inner(world).expect("no trial holds the world any more"));
        eprintln!(
            "pg fixture: server stopped in {} ms",
            t0.elapsed().as_millis()
        );
        c.remove_sandbox(&sb);
        drop(c);
        eprintln!("pg fixture: torn down in {} ms", t0.elapsed().as_millis());
    }
    conclusion.exit();
}
