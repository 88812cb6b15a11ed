//! A private, real containerd for integration tests: its own root, state, socket, CNI config
//! and bridge, a locally built pause image, and pod sandboxes whose network namespaces tests
//! can listen in. Forwarding through it exercises containerd's real CRI stream server, the
//! same last hop `kubectl port-forward` reaches through the API server and kubelet.
//!
//! Owns: the containerd child process, its temp dir, the CNI bridge it names, the sandboxes it
//! made, and `net.ipv4.ip_forward` (which the bridge plugin switches on). Must not touch the
//! host's own containerd (`/run/containerd/containerd.sock`) or anything it did not create.
//!
//! Synchronous by design, so tests with their own tokio runtime can use it freely: every CRI
//! call runs on a short-lived thread with its own current-thread runtime (no nested-runtime
//! panics), and containerd is spawned from a keeper thread that lives exactly as long as the
//! fixture (`PR_SET_PDEATHSIG` fires when the spawning *thread* exits, not the process).
//!
//! Use one fixture per test, not a `static`: a static is never dropped, so its sandboxes (shim
//! and pause processes, netns mounts) would outlive the test process.

use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfwd::control::cri::{CriClient, CriError, PodSandboxConfig, SandboxState};
use sha2::{Digest, Sha256};

/// The pause program, compiled at fixture start.
const PAUSE_C: &str = include_str!("pause.c");
/// Tag of the locally built sandbox image; nothing is ever pulled.
const PAUSE_IMAGE: &str = "ringfwd.test/pause:1";
/// containerd's namespace for CRI objects.
const CRI_NAMESPACE: &str = "k8s.io";
/// Kubernetes namespace in the sandboxes' metadata.
const POD_NAMESPACE: &str = "ringfwd-test";
/// The CNI plugins Debian's containernetworking-plugins installs.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// How long containerd gets to answer CRI Version. It takes well under a second here.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long containerd gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of containerd's log quoted in failure messages.
const LOG_TAIL_LINES: usize = 30;

/// A running private containerd. Dropping it removes every sandbox it made, stops containerd,
/// deletes its bridge, restores `net.ipv4.ip_forward` and removes its files.
pub struct Containerd {
    /// Removed when the fixture drops, after `Drop::drop` has unmounted everything below it.
    dir: tempfile::TempDir,
    socket: PathBuf,
    pid: u32,
    keeper: Option<Keeper>,
    network: NetworkLease,
    sandboxes: Mutex<Vec<Sandbox>>,
    next_uid: AtomicU32,
}

/// Pauses the fixture's containerd; see [`Containerd::pauser`].
#[derive(Clone, Debug)]
pub struct Pauser {
    pid: u32,
}

impl Pauser {
    /// containerd's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Pause containerd until the returned guard drops (also when a test fails mid-way).
    pub fn pause(&self) -> Paused {
        self.signal(libc::SIGSTOP);
        Paused(self.clone())
    }

    fn signal(&self, sig: libc::c_int) {
        // Safety: kill(2) on the fixture's containerd, our child, which is not reaped while
        // the fixture (and so any test holding a Pauser) is alive.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) };
    }
}

/// containerd stays stopped while this lives.
pub struct Paused(Pauser);

impl Drop for Paused {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// A pod sandbox made by [`Containerd::run_sandbox`].
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    /// The sandbox's network namespace (a bind mount under `/var/run/netns`).
    pub netns: PathBuf,
    /// Pod IP on the fixture's bridge.
    pub ip: Option<String>,
    /// PID of the pause process.
    pub pid: Option<u32>,
}

impl Containerd {
    /// Starts a private containerd and imports the pause image. `Err(reason)` when this machine
    /// cannot run it (not root, binaries missing) so the caller can skip loudly; panics, with
    /// containerd's log tail, when containerd itself misbehaves.
    pub fn start() -> Result<Containerd, String> {
        check_prerequisites()?;
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("ringfwd-containerd-")
            .tempdir()
            .map_err(|e| format!("cannot create temp dir: {e}"))?;
        let network = NetworkLease::acquire();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        write(&config, &containerd_config(dir.path(), &socket, &network));
        let log = dir.path().join("containerd.log");

        let keeper = Keeper::spawn(&config, &log);
        let fixture = Containerd {
            pid: keeper.pid,
            keeper: Some(keeper),
            dir,
            socket,
            network,
            sandboxes: Mutex::new(Vec::new()),
            next_uid: AtomicU32::new(0),
        };
        let version = fixture.wait_ready();
        let ready = t0.elapsed();
        fixture.import_pause_image();
        eprintln!(
            "containerd fixture: {version} ready in {} ms, pause image imported after {} ms \
             (dir {}, bridge {})",
            ready.as_millis(),
            t0.elapsed().as_millis(),
            fixture.dir.path().display(),
            fixture.network.bridge,
        );
        Ok(fixture)
    }

    /// Stops and continues the containerd process (SIGSTOP/SIGCONT): a wedged runtime.
    pub fn pauser(&self) -> Pauser {
        Pauser { pid: self.pid }
    }

    /// The CRI endpoint, `unix:///.../containerd.sock`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// containerd's process id (to read its CPU time and memory).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// containerd's log so far (for failure messages in tests).
    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("containerd.log"), LOG_TAIL_LINES)
    }

    /// Runs a pod sandbox named `name` and waits until it is ready. Panics on failure.
    pub fn run_sandbox(&self, name: &str) -> Sandbox {
        let t0 = Instant::now();
        let n = self.next_uid.fetch_add(1, Ordering::Relaxed);
        let uid = format!("{name}-{}-{n}", std::process::id());
        let log_dir = self.dir.path().join("pods").join(&uid);
        let mut cfg = PodSandboxConfig::minimal(name, POD_NAMESPACE, &uid, path_str(&log_dir));
        cfg.labels.insert("ringfwd.test/fixture".into(), "1".into());
        let status = self
            .cri(|mut c| async move {
                let id = c.run_pod_sandbox(cfg).await?;
                c.pod_sandbox_status(&id).await
            })
            .unwrap_or_else(|e| self.fail(&format!("RunPodSandbox {name}: {e}")));
        let netns = match (status.netns, status.pid) {
            (Some(path), _) => path,
            (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            (None, None) => self.fail(&format!("sandbox {} has no netns path", status.id)),
        };
        let sandbox = Sandbox {
            id: status.id,
            name: name.to_owned(),
            netns,
            ip: status.ip,
            pid: status.pid,
        };
        self.sandboxes.lock().unwrap().push(sandbox.clone());
        assert_eq!(
            status.state,
            SandboxState::Ready,
            "sandbox {name} not ready"
        );
        eprintln!(
            "containerd fixture: sandbox {name} ({}) ready in {} ms, ip {:?}, netns {}",
            short(&sandbox.id),
            t0.elapsed().as_millis(),
            sandbox.ip,
            sandbox.netns.display()
        );
        sandbox
    }

    /// Stops and removes a sandbox (e.g. to test forwarding to a pod that went away).
    pub fn remove_sandbox(&self, sb: &Sandbox) {
        let id = sb.id.clone();
        self.cri(|mut c| async move {
            c.stop_pod_sandbox(&id).await?;
            c.remove_pod_sandbox(&id).await
        })
        .unwrap_or_else(|e| self.fail(&format!("removing sandbox {}: {e}", sb.name)));
        self.sandboxes.lock().unwrap().retain(|s| s.id != sb.id);
    }

    /// Runs one CRI conversation on a fresh connection, on its own thread and runtime, so it
    /// works whether or not the caller is inside a tokio runtime.
    pub fn cri<T, F, Fut>(&self, f: F) -> Result<T, CriError>
    where
        T: Send,
        F: FnOnce(CriClient) -> Fut + Send,
        Fut: Future<Output = Result<T, CriError>>,
    {
        let endpoint = self.endpoint();
        block_on_thread(move || async move { f(CriClient::connect(&endpoint).await?).await })
    }

    /// Polls CRI Version until containerd answers: the socket appears and the CRI plugin is
    /// loaded. Bounded; panics with the log tail.
    fn wait_ready(&self) -> String {
        let endpoint = self.endpoint();
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = self.pid;
        let result = block_on_thread(move || async move {
            loop {
                let last = match CriClient::connect(&endpoint).await {
                    Ok(mut c) => match c.version().await {
                        Ok(v) => return Ok(v),
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                };
                if !process_alive(pid) {
                    return Err(format!("containerd exited during startup (last: {last})"));
                }
                if Instant::now() >= deadline {
                    return Err(format!("no answer within {READY_TIMEOUT:?} (last: {last})"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        result.unwrap_or_else(|e| self.fail(&format!("containerd did not become ready: {e}")))
    }

    /// Builds the pause image as a docker-archive tarball and imports it with `ctr`.
    fn import_pause_image(&self) {
        let dir = self.dir.path().join("image");
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("pause.c");
        let bin = dir.join("pause");
        write(&src, PAUSE_C);
        run(Command::new("cc")
            .args(["-static", "-Os", "-s", "-o"])
            .arg(&bin)
            .arg(&src));
        let archive = dir.join("pause.tar");
        fs::write(&archive, pause_image_archive(&fs::read(&bin).unwrap())).unwrap();
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", CRI_NAMESPACE, "images", "import"])
            .arg(&archive)
            .output()
            .expect("spawn ctr");
        if !out.status.success() {
            self.fail(&format!(
                "ctr images import failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "containerd fixture: {what}\n--- containerd log tail ({}) ---\n{}",
            self.dir.path().join("containerd.log").display(),
            self.log_tail()
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let sandboxes =
            std::mem::take(&mut *self.sandboxes.lock().unwrap_or_else(|e| e.into_inner()));
        // Through CRI first: it stops the pause process and shim, tears down CNI, unmounts.
        let ids: Vec<String> = sandboxes.iter().map(|s| s.id.clone()).collect();
        let failed: Vec<String> = if ids.is_empty() {
            Vec::new()
        } else {
            self.cri(|mut c| async move {
                let mut failed = Vec::new();
                for id in ids {
                    let res = match c.stop_pod_sandbox(&id).await {
                        Ok(()) => c.remove_pod_sandbox(&id).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = res {
                        eprintln!("containerd fixture: removing sandbox {}: {e}", short(&id));
                        failed.push(id);
                    }
                }
                Ok(failed)
            })
            .unwrap_or_else(|e| {
                eprintln!("containerd fixture: cannot remove sandboxes via CRI: {e}");
                sandboxes.iter().map(|s| s.id.clone()).collect()
            })
        };
        if let Some(keeper) = self.keeper.take() {
            keeper.stop();
        }
        // Whatever CRI could not clean (containerd crashed, a test panicked mid-call).
        kill_leftover_shims(&self.socket);
        for sb in sandboxes.iter().filter(|s| failed.contains(&s.id)) {
            clean_leftover_sandbox(&self.socket, sb);
        }
        unmount_everything_under(self.dir.path());
        self.network.release();
    }
}

/// Enters `netns` on a scratch thread and runs `f` there. Sockets created by `f` keep that
/// namespace after the thread is gone.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    let ns = File::open(netns).unwrap_or_else(|e| panic!("open netns {}: {e}", netns.display()));
    std::thread::scope(|s| {
        s.spawn(|| {
            // Safety: `ns` is an open namespace file; setns only changes this thread's network
            // namespace, and this thread ends right after `f`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns({}): {}",
                netns.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// A TCP listener on `127.0.0.1:0` inside the network namespace `netns` (a pod's loopback,
/// which is where containerd's stream server dials). Its port is in `local_addr()`.
pub fn listen_in_netns(netns: &Path) -> TcpListener {
    in_netns(netns, || TcpListener::bind("127.0.0.1:0")).unwrap_or_else(|e| {
        panic!("bind 127.0.0.1:0 in {}: {e}", netns.display());
    })
}

/// A TCP listener on `127.0.0.1:PORT` inside `netns`: the same target port in a pod's new
/// sandbox (a pod that restarted listens where it listened before).
pub fn listen_in_netns_on(netns: &Path, port: u16) -> TcpListener {
    in_netns(netns, || TcpListener::bind(("127.0.0.1", port))).unwrap_or_else(|e| {
        panic!("bind 127.0.0.1:{port} in {}: {e}", netns.display());
    })
}

/// Owns the containerd child. The child gets SIGKILL if this thread ends (PDEATHSIG), so the
/// thread lives exactly as long as the fixture and ends by stopping containerd.
struct Keeper {
    pid: u32,
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Keeper {
    fn spawn(config: &Path, log: &Path) -> Keeper {
        let log_file = File::create(log).expect("create containerd log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        // Safety: getpid before fork; prctl, getppid and _exit are async-signal-safe.
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let (pid_tx, pid_rx) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("containerd-keeper".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = pid_tx.send(Err(e));
                        return;
                    }
                };
                let _ = pid_tx.send(Ok(child.id()));
                // Block until the fixture drops (message or disconnected sender).
                let _ = stop_rx.recv();
                // Safety: plain kill(2) on our own child, which has not been reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                // Wait for the exit itself (a waiter thread reports it), not by polling.
                let pid = child.id() as libc::pid_t;
                let (exit_tx, exit_rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = child.wait();
                    let _ = exit_tx.send(());
                });
                if exit_rx.recv_timeout(STOP_TIMEOUT).is_ok() {
                    return;
                }
                eprintln!("containerd fixture: containerd ignored SIGTERM, killing it");
                // Safety: kill(2) on our child, not yet reaped (the waiter has not returned).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = exit_rx.recv();
            })
            .expect("spawn keeper thread");
        let pid = pid_rx
            .recv()
            .expect("keeper thread died")
            .unwrap_or_else(|e| panic!("spawn containerd: {e}"));
        Keeper { pid, stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// A CNI network (bridge name and /24) no other live fixture uses, held by an flock on a file
/// in the temp dir root; the kernel drops the lock if the test process dies, so a crashed run
/// never blocks the slot, and its leftover bridge is deleted by the next user of the slot.
struct NetworkLease {
    bridge: String,
    subnet: String,
    lock_path: PathBuf,
    _lock: File,
}

/// Bridge names `rfwd1`..`rfwd254` with subnets `10.213.N.0/24`. Not 10.88/16, which podman
/// and the default containerd CNI config use.
const SUBNET_PREFIX: &str = "10.213";

/// ip_forward as it was before the first live fixture in this process; restored by the last.
static IP_FORWARD: Mutex<(usize, Option<String>)> = Mutex::new((0, None));
const IP_FORWARD_PATH: &str = "/proc/sys/net/ipv4/ip_forward";

impl NetworkLease {
    fn acquire() -> NetworkLease {
        {
            let mut g = IP_FORWARD.lock().unwrap_or_else(|e| e.into_inner());
            if g.0 == 0 {
                g.1 = fs::read_to_string(IP_FORWARD_PATH).ok();
            }
            g.0 += 1;
        }
        let start = std::process::id() as usize;
        for i in 0..254 {
            let n = (start + i) % 254 + 1;
            let path = std::env::temp_dir().join(format!("ringfwd-test-net-{n}.lock"));
            let lock = File::create(&path).expect("create network lock file");
            // Safety: flock on an fd we own.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            // The previous holder unlinks the file on release; if it did so between our
            // create and flock, we hold a lock on a dead inode: not ours, try the next slot.
            if !same_file(&lock, &path) {
                continue;
            }
            let bridge = format!("rfwd{n}");
            delete_link(&bridge);
            return NetworkLease {
                bridge,
                subnet: format!("{SUBNET_PREFIX}.{n}.0/24"),
                lock_path: path,
                _lock: lock,
            };
        }
        panic!("containerd fixture: all 254 test networks are in use");
    }

    fn release(&self) {
        delete_link(&self.bridge);
        // Still locked by us, so nobody else holds this slot (see `acquire`).
        let _ = fs::remove_file(&self.lock_path);
        let mut g = IP_FORWARD.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if g.0 > 0 {
            return;
        }
        let Some(before) = g.1.take() else { return };
        let now = fs::read_to_string(IP_FORWARD_PATH).unwrap_or_default();
        if now.trim() != before.trim()
            && let Err(e) = fs::write(IP_FORWARD_PATH, before.trim())
        {
            eprintln!("containerd fixture: cannot restore ip_forward: {e}");
        }
    }
}

fn check_prerequisites() -> Result<(), String> {
    // Safety: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (containerd needs root to run pod sandboxes)".into());
    }
    let missing = missing_prerequisites();
    if missing.is_empty() {
        Ok(())
    } else {
        // The test command installs nothing itself: on a fresh machine the containerd tests
        // skip, and .ci/install-test-deps sets up what the whole suite needs.
        Err(format!(
            "missing {} (.ci/install-test-deps installs them)",
            missing.join(", ")
        ))
    }
}

fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    for bin in ["containerd", "containerd-shim-runc-v2", "ctr", "runc", "cc"] {
        if find_in_path(bin).is_none() {
            missing.push(bin.to_owned());
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let p = Path::new(CNI_BIN_DIR).join(plugin);
        if !p.exists() {
            missing.push(p.display().to_string());
        }
    }
    missing
}

fn containerd_config(dir: &Path, socket: &Path, net: &NetworkLease) -> String {
    let d = path_str(dir);
    let cni_dir = dir.join("cni");
    fs::create_dir_all(&cni_dir).unwrap();
    // No ipMasq and no default route: pods are reachable from the host and from containerd's
    // stream server (which dials inside the netns), and nothing else changes on the host.
    // Loopback: containerd's CRI always adds the `loopback` plugin itself (go-cni WithLoNetwork),
    // so the conflist only has the bridge.
    write(
        &cni_dir.join("10-ringfwd.conflist"),
        &format!(
            r#"{{
  "cniVersion": "0.4.0",
  "name": "ringfwd-{bridge}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{d}/cni-ipam",
        "ranges": [[{{ "subnet": "{subnet}" }}]]
      }}
    }}
  ]
}}
"#,
            bridge = net.bridge,
            subnet = net.subnet,
        ),
    );
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  # Root here lacks CAP_SYS_RESOURCE; without this every sandbox start fails in runc
  # ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni}"
  max_conf_num = 1
"#,
        socket = path_str(socket),
        cni = path_str(&cni_dir),
    )
}

/// A docker-archive (`docker save` format) tarball holding one image, `PAUSE_IMAGE`, whose
/// single layer is `/pause`.
fn pause_image_archive(pause: &[u8]) -> Vec<u8> {
    let mut layer = Vec::new();
    tar_file(&mut layer, "pause", 0o755, pause);
    tar_finish(&mut layer);
    let diff_id = sha256_hex(&layer);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"Entrypoint":["/pause"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}}}}"#
    );
    let config_name = format!("{}.json", sha256_hex(config.as_bytes()));
    let layer_name = format!("{diff_id}/layer.tar");
    let manifest = format!(
        r#"[{{"Config":"{config_name}","RepoTags":["{PAUSE_IMAGE}"],"Layers":["{layer_name}"]}}]"#
    );
    let mut out = Vec::new();
    tar_file(&mut out, &config_name, 0o644, config.as_bytes());
    tar_file(&mut out, &layer_name, 0o644, &layer);
    tar_file(&mut out, "manifest.json", 0o644, manifest.as_bytes());
    tar_finish(&mut out);
    out
}

/// Appends one regular file to a ustar archive. Names up to 100 bytes only.
fn tar_file(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0); // uid
    octal(&mut h, 116, 8, 0); // gid
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, 0); // mtime: reproducible layer digests
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as eight spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// The end-of-archive marker: two zero blocks.
fn tar_finish(out: &mut Vec<u8>) {
    out.resize(out.len() + 1024, 0);
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `fut` to completion on a new thread with its own current-thread runtime.
fn block_on_thread<T, F, Fut>(make: F) -> T
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            let fut = make();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(fut)
        })
        .join()
        .expect("CRI thread panicked")
    })
}

/// SIGKILLs shims (and their children, the pause processes) still serving our socket: CRI
/// removal failed or never ran. Shims re-parent themselves, so nothing else would reap them.
fn kill_leftover_shims(socket: &Path) {
    let needle = path_str(socket).as_bytes().to_vec();
    let procs = list_processes();
    let shims: Vec<u32> = procs
        .iter()
        .filter(|p| {
            p.cmdline
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        })
        .filter(|p| p.cmdline.windows(15).any(|w| w == b"containerd-shim"))
        .map(|p| p.pid)
        .collect();
    for shim in &shims {
        for child in procs.iter().filter(|p| p.ppid == *shim) {
            eprintln!(
                "containerd fixture: killing leftover sandbox process {}",
                child.pid
            );
            // Safety: kill(2) on a pid we just found as a child of our shim.
            unsafe { libc::kill(child.pid as libc::pid_t, libc::SIGKILL) };
        }
        eprintln!("containerd fixture: killing leftover shim {shim}");
        // Safety: as above.
        unsafe { libc::kill(*shim as libc::pid_t, libc::SIGKILL) };
    }
}

/// Host-side traces of a sandbox whose CRI removal failed, after its processes were killed:
/// netns bind mount, CNI result cache, shim socket, cgroups.
fn clean_leftover_sandbox(socket: &Path, sb: &Sandbox) {
    eprintln!(
        "containerd fixture: cleaning up after sandbox {}",
        short(&sb.id)
    );
    if sb.netns.starts_with("/var/run/netns") || sb.netns.starts_with("/run/netns") {
        unmount(&sb.netns);
        let _ = fs::remove_file(&sb.netns);
    }
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        let needle = format!("-{}-", sb.id);
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(&needle) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // containerd 1.6 puts shim sockets at /run/containerd/s/sha256(<address>/<ns>/<id>).
    let key = format!("{}/{CRI_NAMESPACE}/{}", path_str(socket), sb.id);
    let _ = fs::remove_file(Path::new("/run/containerd/s").join(sha256_hex(key.as_bytes())));
    // cgroupfs driver, empty cgroup_parent: /sys/fs/cgroup/<controller>/k8s.io/<id> (v1) or
    // /sys/fs/cgroup/k8s.io/<id> (v2). rmdir fails while the killed tasks are still exiting.
    let mut dirs: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join(CRI_NAMESPACE).join(&sb.id))
                .collect()
        })
        .unwrap_or_default();
    dirs.push(Path::new("/sys/fs/cgroup").join(CRI_NAMESPACE).join(&sb.id));
    dirs.retain(|d| d.is_dir());
    // A task leaves its cgroup when it exits: wait for every one still listed to exit (its
    // pidfd becomes readable), then remove the directories.
    let deadline = Instant::now() + Duration::from_secs(2);
    for d in &dirs {
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            wait_for_exit(pid, deadline);
        }
    }
    dirs.retain(|d| fs::remove_dir(d).is_err());
    for d in dirs {
        eprintln!("containerd fixture: cannot remove cgroup {}", d.display());
    }
}

/// Wait until process `pid` has exited (or `deadline` passes), on its pidfd.
pub fn wait_for_exit(pid: libc::pid_t, deadline: Instant) {
    // Safety: pidfd_open(2) with no flags returns a new fd we own, or -1 (gone already).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    if fd < 0 {
        return;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Safety: one valid pollfd; the fd is closed right after.
    unsafe {
        libc::poll(
            &mut pfd,
            1,
            left.as_millis().min(i32::MAX as u128) as libc::c_int,
        );
        libc::close(fd);
    }
}

struct Proc {
    pid: u32,
    ppid: u32,
    cmdline: Vec<u8>,
}

fn list_processes() -> Vec<Proc> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised command: state, ppid, ...
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split(' ').nth(1)?.parse().ok()?;
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(Proc { pid, ppid, cmdline })
        })
        .collect()
}

fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rfind(')')
            .is_some_and(|i| stat[i + 2..].starts_with('Z')),
        Err(_) => false,
    }
}

/// Detaches every mount at or below `dir`, deepest first, so removing the temp dir cannot
/// fail with EBUSY or reach into a still-mounted rootfs.
fn unmount_everything_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        eprintln!("containerd fixture: leftover mount {}", p.display());
        unmount(&p);
    }
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

fn unmount(p: &Path) {
    let c = std::ffi::CString::new(path_str(p)).unwrap();
    // Safety: umount2 with a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip")
            .args(["link", "delete", name])
            .stderr(Stdio::null())
            .status();
    }
}

fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("fixture paths are UTF-8")
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The last `n` lines of a file, read from its end (logs can be large).
fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let s = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
