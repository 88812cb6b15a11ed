//! The `ringfwd up` file: many forwards described in one TOML file.
//!
//! Owns the file's schema and its two passes, both pure (text in, a [`Config`] or every problem
//! out, so the fuzzer can drive them): parsing with the `toml` crate, where every table rejects
//! unknown fields, then validation, which fills defaults and collects every problem it finds
//! (names, targets, ports, addresses, knobs, a local port bound twice) instead of stopping at
//! the first. It opens no file and no socket: reading the file and running the forwards is
//! `ringfwd up`'s job (`crate::cli`).
//!
//! ```toml
//! [defaults]                  # optional; any knob below, plus address and cluster access
//! ping_interval = "5s"
//!
//! [[forward]]
//! name = "db"                 # unique; the `forward` label of its metrics
//! target = "svc/postgres"     # a cluster target, as `ringfwd TYPE/NAME`
//! namespace = "data"
//! ports = ["5432", "9187:metrics"]
//!
//! [[forward]]
//! name = "web"
//! target = "svc/web"          # or selector = "app=web" (with spread)
//! spread = true               # every ready pod, as `--spread`
//! ports = ["8080:http"]
//!
//! [[forward]]
//! name = "local"
//! url = "http://127.0.0.1:10350/portforward"   # or runtime_endpoint + sandbox
//! ports = [":8080"]
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::cluster::ClusterOptions;
use super::pool::PoolOptions;
use super::target::{Kind, LocalPort, PortRequest, PortSpec, RemotePort, Target};
use super::upgrade::Protocol;
use crate::relay::{self, SessionOptions};

/// `--pod-running-timeout`'s default.
pub const DEFAULT_POD_RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// What the file says (serde's view): every field optional, so that validation, not serde,
// reports what is missing, and reports all of it.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    forward: Vec<RawForward>,
}

/// Knobs shared by `[defaults]` and `[[forward]]`; a forward's own value wins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    address: Option<Vec<String>>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    namespace: Option<String>,
    pod_running_timeout: Option<String>,
    ping_interval: Option<String>,
    ping_timeout: Option<String>,
    half_close_quiet: Option<String>,
    half_close_hold: Option<String>,
    max_connections: Option<i64>,
    max_sessions: Option<i64>,
    warm_sessions: Option<i64>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    name: Option<String>,
    // A cluster target: `target`, or `selector` (with `spread`).
    target: Option<String>,
    selector: Option<String>,
    spread: Option<bool>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    namespace: Option<String>,
    pod_running_timeout: Option<String>,
    // A runtime target.
    runtime_endpoint: Option<String>,
    sandbox: Option<String>,
    // A stream-server URL.
    url: Option<String>,
    ports: Option<Vec<RawPort>>,
    address: Option<Vec<String>>,
    protocol: Option<String>,
    ping_interval: Option<String>,
    ping_timeout: Option<String>,
    half_close_quiet: Option<String>,
    half_close_hold: Option<String>,
    max_connections: Option<i64>,
    max_sessions: Option<i64>,
    warm_sessions: Option<i64>,
    connect_timeout: Option<String>,
}

/// `ports = [5432, ":80", "8080:http"]`: a bare integer is the same as its string.
#[derive(Debug)]
enum RawPort {
    Number(i64),
    Spec(String),
}

// By hand rather than `#[serde(untagged)]`, whose error ("data did not match any variant")
// does not say what a port looks like.
impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port: 5432, or a string \"[LOCAL:]REMOTE\"")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawPort, E> {
                Ok(RawPort::Spec(s.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl RawPort {
    fn text(&self) -> String {
        match self {
            RawPort::Number(n) => n.to_string(),
            RawPort::Spec(s) => s.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What runs: validated, defaults filled.
// ---------------------------------------------------------------------------------------------

/// A validated file: at least one forward, names unique, no local address bound twice.
#[derive(Debug, Clone)]
pub struct Config {
    pub forwards: Vec<Forward>,
}

/// One forward of the file.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Unique in the file; the metrics label and the prefix of its output lines.
    pub name: String,
    pub target: ForwardTarget,
    /// `localhost` or IP addresses, as `--address` takes them (checked, not yet bound).
    pub addresses: Vec<String>,
    pub session: SessionKnobs,
    pub pool: PoolOptions,
}

/// Where a forward goes: exactly one kind per forward.
#[derive(Debug, Clone)]
pub enum ForwardTarget {
    /// `target = "svc/web"` (or `selector = "app=web"`), through the API server.
    Cluster {
        target: Target,
        /// `spread = true`: every ready pod of the target, as `--spread`.
        spread: bool,
        ports: Vec<PortRequest>,
        options: ClusterOptions,
        /// `None`: `auto` (the tunnel, falling back to SPDY/3.1, as the CLI's default).
        protocol: Option<Protocol>,
    },
    /// `runtime_endpoint` + `sandbox`, through a CRI runtime.
    Runtime {
        endpoint: String,
        sandbox: String,
        ports: Vec<PortSpec>,
        protocol: Protocol,
    },
    /// `url`, a stream-server URL used as it is.
    Url {
        url: String,
        ports: Vec<PortSpec>,
        protocol: Protocol,
    },
}

/// The session flags of the CLI (`--ping-interval` ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionKnobs {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub half_close_quiet: Duration,
    pub half_close_hold: Duration,
}

impl SessionKnobs {
    pub fn options(&self) -> SessionOptions {
        SessionOptions {
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            half_close_quiet: self.half_close_quiet,
            half_close_hold: self.half_close_hold,
            ..SessionOptions::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem in the file. `forward` is `forward "NAME"`, or `forward[INDEX]` (counted from 0)
/// for one without a usable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, or not this schema (an unknown field, a wrong type): the toml crate's message,
    /// which names the line and column. Parsing stops at the first of these.
    #[error("{0}")]
    Syntax(String),
    #[error("no [[forward]] table: nothing to run")]
    NoForwards,
    #[error("{forward}: {field}: {problem}")]
    Field {
        forward: String,
        field: String,
        problem: String,
    },
    #[error("{forward}: {problem}")]
    Forward { forward: String, problem: String },
}

/// Every problem found in a file (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// One problem per line, each starting with `file: `.
    pub fn in_file(&self, file: &str) -> String {
        self.0
            .iter()
            .map(|e| format!("{file}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------------
// Parse, then validate
// ---------------------------------------------------------------------------------------------

/// Parse and validate a whole file. `Err` holds every problem found (a syntax or schema error
/// stops parsing, so it comes alone).
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError::Syntax(
            e.to_string().trim_end().to_string(),
        )])
    })?;
    validate(raw)
}

/// Collects problems for one forward, each naming it.
struct Problems<'a> {
    label: String,
    out: &'a mut Vec<ConfigError>,
}

impl Problems<'_> {
    fn field(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.out.push(ConfigError::Field {
            forward: self.label.clone(),
            field: field.into(),
            problem: problem.into(),
        });
    }

    fn forward(&mut self, problem: impl Into<String>) {
        self.out.push(ConfigError::Forward {
            forward: self.label.clone(),
            problem: problem.into(),
        });
    }
}

/// A name the output and metrics can carry: not blank, no control characters.
fn usable_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        Err("must not be empty")
    } else if name.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else if name.chars().count() > 100 {
        Err("must be at most 100 characters")
    } else {
        Ok(())
    }
}

fn validate(raw: RawFile) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    if raw.forward.is_empty() {
        errors.push(ConfigError::NoForwards);
    }
    let mut p = Problems {
        label: "[defaults]".into(),
        out: &mut errors,
    };
    check_defaults(&raw.defaults, &mut p);
    // `[defaults]` problems are reported once, not again by every forward that inherits them
    // (no forward is built then anyway).
    let defaults_ok = errors.is_empty();
    let no_defaults = RawDefaults::default();
    let defaults = if defaults_ok {
        &raw.defaults
    } else {
        &no_defaults
    };

    let mut forwards = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    // Per forward: its label and which local ports it binds where, as far as the file tells.
    let mut binds: Vec<LocalBinds> = Vec::new();
    for (i, f) in raw.forward.iter().enumerate() {
        let named = f.name.as_deref().filter(|n| usable_name(n).is_ok());
        let label = match named {
            Some(n) => format!("forward {n:?}"),
            None => format!("forward[{i}]"),
        };
        let mut p = Problems {
            label: label.clone(),
            out: &mut errors,
        };
        match &f.name {
            None => p.field("name", "missing: every forward needs a unique name"),
            Some(n) => match usable_name(n) {
                Err(why) => p.field("name", why),
                Ok(()) => {
                    if let Some(first) = names.get(n) {
                        p.forward(format!(
                            "name {n:?} is already used by forward[{first}]; names must be unique"
                        ));
                    } else {
                        names.insert(n.clone(), i);
                    }
                }
            },
        }
        if let Some((fwd, local)) = check_forward(f, defaults, defaults_ok, &mut p) {
            forwards.push(fwd);
            binds.push(LocalBinds { label, ..local });
        }
    }
    check_local_binds(&binds, &mut errors);
    if errors.is_empty() {
        Ok(Config { forwards })
    } else {
        Err(ConfigErrors(errors))
    }
}

fn check_defaults(d: &RawDefaults, p: &mut Problems) {
    if let Some(a) = &d.address {
        addresses(a, p);
    }
    duration(
        d.pod_running_timeout.as_deref(),
        "pod_running_timeout",
        Duration::ZERO,
        p,
    );
    knobs(
        &Knobs {
            ping_interval: d.ping_interval.as_deref(),
            ping_timeout: d.ping_timeout.as_deref(),
            half_close_quiet: d.half_close_quiet.as_deref(),
            half_close_hold: d.half_close_hold.as_deref(),
            max_connections: d.max_connections,
            max_sessions: d.max_sessions,
            warm_sessions: d.warm_sessions,
            connect_timeout: d.connect_timeout.as_deref(),
        },
        p,
    );
}

/// The session and pool knobs of one forward, its own value or the default's.
struct Knobs<'a> {
    ping_interval: Option<&'a str>,
    ping_timeout: Option<&'a str>,
    half_close_quiet: Option<&'a str>,
    half_close_hold: Option<&'a str>,
    max_connections: Option<i64>,
    max_sessions: Option<i64>,
    warm_sessions: Option<i64>,
    connect_timeout: Option<&'a str>,
}

fn knobs(k: &Knobs, p: &mut Problems) -> Option<(SessionKnobs, PoolOptions)> {
    let before = p.out.len();
    let session = SessionKnobs {
        ping_interval: duration(
            k.ping_interval,
            "ping_interval",
            relay::DEFAULT_PING_INTERVAL,
            p,
        ),
        ping_timeout: duration(
            k.ping_timeout,
            "ping_timeout",
            relay::DEFAULT_PING_TIMEOUT,
            p,
        ),
        half_close_quiet: duration(
            k.half_close_quiet,
            "half_close_quiet",
            relay::DEFAULT_HALF_CLOSE_QUIET,
            p,
        ),
        half_close_hold: duration(
            k.half_close_hold,
            "half_close_hold",
            relay::DEFAULT_HALF_CLOSE_HOLD,
            p,
        ),
    };
    let defaults = PoolOptions::default();
    let count = |v: Option<i64>, field: &str, min: i64, default: usize, p: &mut Problems| match v {
        None => default,
        Some(n) if n < min => {
            p.field(field, format!("{n} is less than {min}"));
            default
        }
        // More than any machine could set up; keeps the number meaningful.
        Some(n) if n > 100_000 => {
            p.field(field, format!("{n} is more than 100000"));
            default
        }
        Some(n) => n as usize,
    };
    let pool = PoolOptions {
        max_connections: count(
            k.max_connections,
            "max_connections",
            1,
            defaults.max_connections,
            p,
        ),
        max_sessions: count(k.max_sessions, "max_sessions", 1, defaults.max_sessions, p),
        warm_sessions: count(
            k.warm_sessions,
            "warm_sessions",
            0,
            defaults.warm_sessions,
            p,
        ),
        connect_timeout: duration(
            k.connect_timeout,
            "connect_timeout",
            defaults.connect_timeout,
            p,
        ),
    };
    (p.out.len() == before).then_some((session, pool))
}

fn duration(v: Option<&str>, field: &str, default: Duration, p: &mut Problems) -> Duration {
    match v.map(crate::parse_duration) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            p.field(field, e);
            default
        }
    }
}

/// `localhost` or IP addresses; none may overlap another (each would be bound twice).
fn addresses(list: &[String], p: &mut Problems) -> Vec<IpAddr> {
    if list.is_empty() {
        p.field(
            "address",
            "empty: give at least one address (default: localhost)",
        );
    }
    let mut ips: Vec<(usize, IpAddr)> = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let these = match a.as_str() {
            "localhost" => vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
            s => match s.parse() {
                Ok(ip) => vec![ip],
                Err(_) => {
                    p.field(
                        format!("address[{i}] {a:?}"),
                        "not an IP address or localhost",
                    );
                    continue;
                }
            },
        };
        for ip in these {
            if let Some((j, other)) = ips.iter().find(|(_, o)| overlap(*o, ip)) {
                p.field(
                    format!("address[{i}] {a:?}"),
                    format!(
                        "{ip} overlaps {other} of address[{j}] {:?}: it would be bound twice",
                        list[*j]
                    ),
                );
            } else {
                ips.push((i, ip));
            }
        }
    }
    ips.into_iter().map(|(_, ip)| ip).collect()
}

/// Two listeners on these addresses with the same port cannot both bind (Linux): the same
/// address, or one is the wildcard of the other's family. `[::]` also takes IPv4 (dual-stack,
/// Linux's default `bindv6only=0`).
fn overlap(a: IpAddr, b: IpAddr) -> bool {
    let wildcard_for = |w: IpAddr, other: IpAddr| match w {
        IpAddr::V6(w) => w.is_unspecified(),
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
    };
    a == b || wildcard_for(a, b) || wildcard_for(b, a)
}

/// The local ports a forward binds that the file fixes (not `:REMOTE`, not a named remote
/// whose number only the cluster knows), and on which addresses.
#[derive(Default)]
struct LocalBinds {
    label: String,
    ips: Vec<IpAddr>,
    /// (field, port).
    ports: Vec<(String, u16)>,
}

fn check_local_binds(binds: &[LocalBinds], errors: &mut Vec<ConfigError>) {
    let mut by_port: HashMap<u16, Vec<(usize, &str)>> = HashMap::new();
    for (f, b) in binds.iter().enumerate() {
        for (field, port) in &b.ports {
            let earlier = by_port.entry(*port).or_default();
            let clash = earlier.iter().find_map(|(g, other_field)| {
                let ip = binds[*g]
                    .ips
                    .iter()
                    .find(|a| b.ips.iter().any(|ip| overlap(**a, *ip)))?;
                Some((*g, *other_field, *ip))
            });
            if let Some((g, other_field, ip)) = clash {
                let by = if g == f {
                    other_field.to_string()
                } else {
                    format!("{} {other_field}", binds[g].label)
                };
                errors.push(ConfigError::Field {
                    forward: b.label.clone(),
                    field: field.clone(),
                    problem: format!("local port {port} on {ip} is also bound by {by}"),
                });
            }
            earlier.push((f, field));
        }
    }
}

/// Validate one forward; `None` if it has problems (already recorded).
fn check_forward(
    f: &RawForward,
    d: &RawDefaults,
    defaults_ok: bool,
    p: &mut Problems,
) -> Option<(Forward, LocalBinds)> {
    let before = p.out.len();
    let cluster = f.target.is_some() || f.selector.is_some();
    let runtime = f.runtime_endpoint.is_some() || f.sandbox.is_some();
    let url = f.url.is_some();
    let kinds: Vec<&str> = [
        (cluster, "target"),
        (runtime, "runtime_endpoint/sandbox"),
        (url, "url"),
    ]
    .into_iter()
    .filter_map(|(set, what)| set.then_some(what))
    .collect();
    match kinds.len() {
        0 => p.forward(
            "no target: give one of target (a cluster target), runtime_endpoint + sandbox, or url",
        ),
        1 => {}
        _ => p.forward(format!(
            "more than one kind of target ({}): give exactly one",
            kinds.join(", ")
        )),
    }
    if !cluster {
        for (set, field) in [
            (f.kubeconfig.is_some(), "kubeconfig"),
            (f.context.is_some(), "context"),
            (f.namespace.is_some(), "namespace"),
            (f.pod_running_timeout.is_some(), "pod_running_timeout"),
            (f.spread.is_some(), "spread"),
        ] {
            if set {
                p.field(
                    field,
                    "only applies to a cluster target (target = \"TYPE/NAME\")",
                );
            }
        }
    }

    let ips = addresses(
        f.address
            .as_deref()
            .or(d.address.as_deref())
            .unwrap_or(&["localhost".to_string()]),
        p,
    );
    let addresses = f
        .address
        .clone()
        .or_else(|| d.address.clone())
        .unwrap_or_else(|| vec!["localhost".into()]);
    let knobs = knobs(
        &Knobs {
            ping_interval: f.ping_interval.as_deref().or(d.ping_interval.as_deref()),
            ping_timeout: f.ping_timeout.as_deref().or(d.ping_timeout.as_deref()),
            half_close_quiet: f
                .half_close_quiet
                .as_deref()
                .or(d.half_close_quiet.as_deref()),
            half_close_hold: f
                .half_close_hold
                .as_deref()
                .or(d.half_close_hold.as_deref()),
            max_connections: f.max_connections.or(d.max_connections),
            max_sessions: f.max_sessions.or(d.max_sessions),
            warm_sessions: f.warm_sessions.or(d.warm_sessions),
            connect_timeout: f
                .connect_timeout
                .as_deref()
                .or(d.connect_timeout.as_deref()),
        },
        p,
    );

    let raw_ports = f.ports.as_deref().unwrap_or_default();
    if raw_ports.is_empty() {
        p.field(
            "ports",
            "no ports to forward: give at least one \"[LOCAL:]REMOTE\"",
        );
    }
    let mut local = LocalBinds {
        ips,
        ..LocalBinds::default()
    };
    let target = if kinds.len() != 1 {
        // No target to build, but the ports can still be checked (as loosely as possible).
        for (i, raw) in raw_ports.iter().enumerate() {
            let text = raw.text();
            if let Err(e) = text.parse::<PortRequest>() {
                p.field(format!("ports[{i}] {text:?}"), e.to_string());
            }
        }
        None
    } else if cluster {
        cluster_target(f, d, raw_ports, &mut local, p)
    } else {
        let protocol = match f.protocol.as_deref() {
            None | Some("spdy") => Some(Protocol::Spdy),
            Some("websocket") => Some(Protocol::Websocket),
            Some(other) => {
                p.field(
                    "protocol",
                    format!(
                        "{other:?}: a runtime or url target speaks spdy or websocket (the tunnel and auto are the API server's)"
                    ),
                );
                None
            }
        };
        let mut ports = Vec::new();
        for (i, raw) in raw_ports.iter().enumerate() {
            let text = raw.text();
            let field = format!("ports[{i}] {text:?}");
            match text.parse::<PortSpec>() {
                Ok(spec) => {
                    if spec.local != 0 {
                        local.ports.push((field, spec.local));
                    }
                    ports.push(spec);
                }
                // Named ports need a pod to look them up in.
                Err(_) if text.parse::<PortRequest>().is_ok() => p.field(
                    field,
                    "a named port needs a cluster target (target = \"TYPE/NAME\")",
                ),
                Err(e) => p.field(field, e.to_string()),
            }
        }
        if runtime {
            let endpoint = non_empty(f.runtime_endpoint.as_deref(), "runtime_endpoint", p);
            let sandbox = non_empty(f.sandbox.as_deref(), "sandbox", p);
            match (endpoint, sandbox, protocol) {
                (Some(endpoint), Some(sandbox), Some(protocol)) => Some(ForwardTarget::Runtime {
                    endpoint,
                    sandbox,
                    ports,
                    protocol,
                }),
                _ => None,
            }
        } else {
            let url = f.url.clone().unwrap_or_default();
            if let Err(why) = check_url(&url) {
                p.field("url", format!("{url:?}: {why}"));
            }
            protocol.map(|protocol| ForwardTarget::Url {
                url,
                ports,
                protocol,
            })
        }
    };

    if p.out.len() != before || !defaults_ok {
        return None;
    }
    let (session, pool) = knobs?;
    Some((
        Forward {
            name: f.name.clone()?,
            target: target?,
            addresses,
            session,
            pool,
        },
        local,
    ))
}

fn cluster_target(
    f: &RawForward,
    d: &RawDefaults,
    raw_ports: &[RawPort],
    local: &mut LocalBinds,
    p: &mut Problems,
) -> Option<ForwardTarget> {
    let spread = f.spread.unwrap_or(false);
    let target = match (f.target.as_deref(), f.selector.as_deref()) {
        (Some(_), Some(_)) => {
            p.forward("target and selector: give one of them");
            None
        }
        (None, Some(sel)) if !spread => {
            p.field(
                "selector",
                "needs spread = true (one pod is target = \"pod/NAME\")",
            );
            let _ = sel;
            None
        }
        (None, Some(sel)) => Target::selector(sel)
            .map_err(|e| p.field("selector", e.to_string()))
            .ok(),
        (text, None) => text
            .unwrap_or_default()
            .parse::<Target>()
            .map_err(|e| p.field("target", e.to_string()))
            .ok(),
    };
    if spread && target.as_ref().is_some_and(|t| t.kind == Kind::Pod) {
        p.field(
            "spread",
            "needs a target with several pods: svc/, deploy/, rs/, sts/, or selector",
        );
    }
    let protocol = match f.protocol.as_deref() {
        None | Some("auto") => Some(None),
        Some("tunnel") => Some(Some(Protocol::Tunnel)),
        Some("spdy") => Some(Some(Protocol::Spdy)),
        Some("websocket") => Some(Some(Protocol::Websocket)),
        Some(other) => {
            p.field(
                "protocol",
                format!("{other:?}: use auto, tunnel, spdy or websocket"),
            );
            None
        }
    };
    let mut ports = Vec::new();
    for (i, raw) in raw_ports.iter().enumerate() {
        let text = raw.text();
        let field = format!("ports[{i}] {text:?}");
        match text.parse::<PortRequest>() {
            Ok(req) => {
                // `8080` binds 8080 locally whatever it maps to (the service port or the
                // container port is 8080); a bare name is known only once resolved.
                let fixed = match (&req.local, &req.remote) {
                    (LocalPort::Port(l), _) => Some(*l),
                    (LocalPort::Same, RemotePort::Number(n)) => Some(*n),
                    _ => None,
                };
                if let Some(l) = fixed {
                    local.ports.push((field, l));
                }
                ports.push(req);
            }
            Err(e) => p.field(field, e.to_string()),
        }
    }
    let pod_running_timeout = duration(
        f.pod_running_timeout
            .as_deref()
            .or(d.pod_running_timeout.as_deref()),
        "pod_running_timeout",
        DEFAULT_POD_RUNNING_TIMEOUT,
        p,
    );
    let options = ClusterOptions {
        kubeconfig: f.kubeconfig.clone().or_else(|| d.kubeconfig.clone()),
        context: f.context.clone().or_else(|| d.context.clone()),
        namespace: f.namespace.clone().or_else(|| d.namespace.clone()),
        pod_running_timeout,
        ..ClusterOptions::default()
    };
    for (field, v) in [
        ("context", &options.context),
        ("namespace", &options.namespace),
    ] {
        if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
            p.field(
                field,
                "must not be empty (leave it out for the kubeconfig's)",
            );
        }
    }
    Some(ForwardTarget::Cluster {
        target: target?,
        spread,
        ports,
        options,
        protocol: protocol?,
    })
}

fn non_empty(v: Option<&str>, field: &str, p: &mut Problems) -> Option<String> {
    match v {
        None => {
            p.field(
                field,
                "missing: a runtime target needs runtime_endpoint and sandbox",
            );
            None
        }
        Some(s) if s.trim().is_empty() => {
            p.field(field, "must not be empty");
            None
        }
        Some(s) => Some(s.to_string()),
    }
}

/// What the upgrade will need of a stream-server URL, checked before anything starts.
fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// stream-server URLs are supported".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    Ok(())
}

/// The fuzz target's body (`tests/fuzz/fuzz_targets/config.rs`), here so the unit tests run
/// it too: any bytes, as text, must parse to a config or to errors, never panic; and what
/// comes out must keep the promises above.
#[doc(hidden)]
pub mod fuzz {
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        match super::parse(text) {
            Ok(c) => {
                assert!(!c.forwards.is_empty());
                let mut names = std::collections::HashSet::new();
                for f in &c.forwards {
                    assert!(names.insert(f.name.as_str()), "name {:?} twice", f.name);
                    assert!(!f.addresses.is_empty());
                    let ports = match &f.target {
                        super::ForwardTarget::Cluster { ports, .. } => ports.len(),
                        super::ForwardTarget::Runtime { ports, .. }
                        | super::ForwardTarget::Url { ports, .. } => ports.len(),
                    };
                    assert!(ports > 0);
                    assert!(f.pool.max_sessions >= 1);
                }
            }
            Err(e) => {
                assert!(!e.0.is_empty());
                assert!(!e.in_file("f").is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(c) => panic!("parsed: {c:?}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// Asserts one of `errs` contains every fragment of `want`.
    fn has(errs: &[String], want: &[&str]) {
        assert!(
            errs.iter().any(|e| want.iter().all(|w| e.contains(w))),
            "no error with {want:?} in {errs:#?}"
        );
    }

    #[test]
    fn every_kind_of_target_with_defaults() {
        let c = parse(
            r#"
            [defaults]
            ping_interval = "5s"
            namespace = "data"

            [[forward]]
            name = "db"
            target = "svc/postgres"
            ports = [5432, "9187:metrics", ":http"]
            protocol = "spdy"

            [[forward]]
            name = "pod"
            runtime_endpoint = "unix:///run/containerd/containerd.sock"
            sandbox = "abc123"
            ports = ["8080:80"]
            address = ["127.0.0.1"]
            max_sessions = 4
            warm_sessions = 0
            max_connections = 50

            [[forward]]
            name = "serve"
            url = "http://127.0.0.1:10350/portforward"
            ports = [":80"]
            ping_interval = "1s"
            protocol = "websocket"
            "#,
        )
        .unwrap();
        let [db, pod, serve] = &c.forwards[..] else {
            panic!("{c:?}")
        };
        assert_eq!(db.name, "db");
        let ForwardTarget::Cluster {
            target,
            spread,
            ports,
            options,
            protocol,
        } = &db.target
        else {
            panic!("{db:?}")
        };
        assert_eq!(target.to_string(), "svc/postgres");
        assert!(!spread);
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[1].remote, RemotePort::Name("metrics".into()));
        assert_eq!(options.namespace.as_deref(), Some("data"));
        assert_eq!(options.pod_running_timeout, DEFAULT_POD_RUNNING_TIMEOUT);
        assert_eq!(*protocol, Some(Protocol::Spdy));
        assert_eq!(db.session.ping_interval, Duration::from_secs(5));
        assert_eq!(db.session.ping_timeout, relay::DEFAULT_PING_TIMEOUT);
        assert_eq!(db.addresses, ["localhost"]);

        let ForwardTarget::Runtime { sandbox, ports, .. } = &pod.target else {
            panic!("{pod:?}")
        };
        assert_eq!(sandbox, "abc123");
        assert_eq!(
            ports,
            &[PortSpec {
                local: 8080,
                remote: 80
            }]
        );
        assert_eq!(pod.pool.max_sessions, 4);
        assert_eq!(pod.pool.max_connections, 50);
        assert_eq!(pod.pool.warm_sessions, 0);
        assert_eq!(pod.addresses, ["127.0.0.1"]);

        let ForwardTarget::Url {
            ports, protocol, ..
        } = &serve.target
        else {
            panic!("{serve:?}")
        };
        assert_eq!(
            ports,
            &[PortSpec {
                local: 0,
                remote: 80
            }]
        );
        assert_eq!(*protocol, Protocol::Websocket);
        assert_eq!(serve.session.ping_interval, Duration::from_secs(1));
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = errors("[[forward]]\nname = \"a\"\nurl = \"http://h/\"\nports = [1]\nport = 2\n");
        has(&e, &["unknown field `port`", "line 5"]);
        has(
            &errors("[defaults]\npingInterval = \"1s\"\n"),
            &["pingInterval"],
        );
        has(&errors("[[forwards]]\nname = \"a\"\n"), &["forwards"]);
    }

    #[test]
    fn syntax_errors_keep_line_and_column() {
        has(
            &errors("[[forward]]\nname = \"a\nurl = 1\n"),
            &["line 2", "column"],
        );
        has(&errors("[[forward]]\nports = 80\n"), &["line 2", "ports"]);
        has(
            &errors("[[forward]]\nports = [1.5]\n"),
            &["line 2", r#"a port: 5432, or a string "[LOCAL:]REMOTE""#],
        );
    }

    #[test]
    fn empty_file() {
        assert_eq!(errors(""), ["no [[forward]] table: nothing to run"]);
    }

    #[test]
    fn bad_ports_are_named_with_their_index() {
        let e = errors(
            r#"
            [[forward]]
            name = "db"
            url = "http://127.0.0.1:1/"
            ports = [80, "80:abc", "0", "80:Web", 70000]
            "#,
        );
        has(
            &e,
            &[r#"forward "db": ports[1] "80:abc": a named port needs a cluster target"#],
        );
        has(
            &e,
            &[
                r#"forward "db": ports[2] "0": invalid port spec"#,
                "between 1 and 65535",
            ],
        );
        has(
            &e,
            &[r#"forward "db": ports[3] "80:Web": invalid port spec"#],
        );
        has(
            &e,
            &[r#"forward "db": ports[4] "70000": invalid port spec"#],
        );
        assert_eq!(e.len(), 4, "{e:#?}");
        let e = errors("[[forward]]\nname = \"c\"\ntarget = \"pod/x\"\nports = [\"8080:Http\"]\n");
        has(
            &e,
            &[r#"forward "c": ports[0] "8080:Http""#, "neither a number"],
        );
    }

    #[test]
    fn names_missing_duplicate_or_blank() {
        let e = errors(
            r#"
            [[forward]]
            name = "a"
            url = "http://127.0.0.1:1/"
            ports = [":1"]
            [[forward]]
            url = "http://127.0.0.1:1/"
            ports = [":1"]
            [[forward]]
            name = "a"
            url = "http://127.0.0.1:1/"
            ports = [":1"]
            [[forward]]
            name = " "
            url = "http://127.0.0.1:1/"
            ports = [":1"]
            "#,
        );
        has(&e, &["forward[1]: name: missing"]);
        has(
            &e,
            &[r#"forward "a": name "a" is already used by forward[0]"#],
        );
        has(&e, &["forward[3]: name: must not be empty"]);
        assert_eq!(e.len(), 3, "{e:#?}");
    }

    #[test]
    fn exactly_one_target() {
        let e = errors(
            r#"
            [[forward]]
            name = "none"
            ports = [1]
            [[forward]]
            name = "two"
            target = "svc/x"
            url = "http://127.0.0.1:1/"
            ports = [1]
            [[forward]]
            name = "half"
            sandbox = "abc"
            ports = [1]
            [[forward]]
            name = "stray"
            url = "http://127.0.0.1:1/"
            namespace = "x"
            ports = [1]
            "#,
        );
        has(&e, &[r#"forward "none": no target"#]);
        has(
            &e,
            &[r#"forward "two": more than one kind of target (target, url)"#],
        );
        has(&e, &[r#"forward "half": runtime_endpoint: missing"#]);
        has(
            &e,
            &[r#"forward "stray": namespace: only applies to a cluster target"#],
        );
    }

    /// `spread` and `selector` mirror `--spread` and `-l`.
    #[test]
    fn spread_over_a_service_or_a_selector() {
        let c = parse(
            r#"
            [[forward]]
            name = "web"
            target = "svc/web"
            spread = true
            ports = ["8080:http"]
            [[forward]]
            name = "shop"
            selector = "app=shop,tier!=db"
            namespace = "shop"
            spread = true
            ports = [":80"]
            "#,
        )
        .unwrap();
        let spreads: Vec<(String, bool)> = c
            .forwards
            .iter()
            .map(|f| match &f.target {
                ForwardTarget::Cluster { target, spread, .. } => (target.to_string(), *spread),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            spreads,
            [
                ("svc/web".to_string(), true),
                ("-l app=shop,tier!=db".to_string(), true)
            ]
        );
        let e = errors(
            r#"
            [[forward]]
            name = "one"
            target = "pod/web-0"
            spread = true
            ports = [80]
            [[forward]]
            name = "unspread"
            selector = "app=web"
            ports = [81]
            [[forward]]
            name = "both"
            target = "svc/web"
            selector = "app=web"
            spread = true
            ports = [82]
            [[forward]]
            name = "url"
            url = "http://127.0.0.1:1/"
            spread = true
            ports = [83]
            "#,
        );
        has(
            &e,
            &[r#"forward "one": spread: needs a target with several pods"#],
        );
        has(
            &e,
            &[r#"forward "unspread": selector: needs spread = true"#],
        );
        has(&e, &[r#"forward "both": target and selector: give one"#]);
        has(
            &e,
            &[r#"forward "url": spread: only applies to a cluster target"#],
        );
        assert_eq!(e.len(), 4, "{e:#?}");
    }

    #[test]
    fn bad_fields() {
        let e = errors(
            r#"
            [[forward]]
            name = "f"
            target = "job/x"
            ports = []
            address = ["127.0.0.1", "nowhere"]
            ping_interval = "soon"
            max_sessions = 0
            warm_sessions = -1
            protocol = "quic"
            [[forward]]
            name = "g"
            url = "https://127.0.0.1:1/"
            ports = [1]
            protocol = "auto"
            address = []
            "#,
        );
        has(&e, &[r#"forward "f": target: invalid target "job/x""#]);
        has(&e, &[r#"forward "f": ports: no ports to forward"#]);
        has(
            &e,
            &[r#"forward "f": address[1] "nowhere": not an IP address"#],
        );
        has(
            &e,
            &[r#"forward "f": ping_interval: invalid duration "soon""#],
        );
        has(&e, &[r#"forward "f": max_sessions: 0 is less than 1"#]);
        has(&e, &[r#"forward "f": warm_sessions: -1 is less than 0"#]);
        has(&e, &[r#"forward "f": protocol: "quic""#]);
        has(
            &e,
            &[r#"forward "g": url: "https://127.0.0.1:1/": only http://"#],
        );
        has(&e, &[r#"forward "g": protocol: "auto""#]);
        has(&e, &[r#"forward "g": address: empty"#]);
        assert_eq!(e.len(), 10, "{e:#?}");
    }

    #[test]
    fn defaults_problems_are_reported_once() {
        let e = errors(
            r#"
            [defaults]
            connect_timeout = "0s"
            [[forward]]
            name = "a"
            url = "http://127.0.0.1:1/"
            ports = [1]
            [[forward]]
            name = "b"
            url = "http://127.0.0.1:1/"
            ports = [2]
            "#,
        );
        assert_eq!(
            e,
            [r#"[defaults]: connect_timeout: duration "0s" must be positive"#]
        );
    }

    #[test]
    fn a_local_address_bound_twice() {
        let e = errors(
            r#"
            [[forward]]
            name = "a"
            url = "http://127.0.0.1:1/"
            ports = ["8080:80", 9000]
            [[forward]]
            name = "b"
            target = "svc/web"
            ports = ["8080:http", 9000, "web"]
            address = ["0.0.0.0"]
            [[forward]]
            name = "c"
            url = "http://127.0.0.1:1/"
            ports = ["7000:1", "7000:2", ":9000"]
            address = ["::1"]
            [[forward]]
            name = "d"
            url = "http://127.0.0.1:1/"
            ports = [1]
            address = ["localhost", "127.0.0.1"]
            "#,
        );
        has(
            &e,
            &[
                r#"forward "b": ports[0] "8080:http": local port 8080 on 127.0.0.1 is also bound by forward "a" ports[0] "8080:80""#,
            ],
        );
        has(&e, &[r#"forward "b": ports[1] "9000": local port 9000"#]);
        has(
            &e,
            &[
                r#"forward "c": ports[1] "7000:2": local port 7000 on ::1 is also bound by ports[0] "7000:1""#,
            ],
        );
        has(
            &e,
            &[r#"forward "d": address[1] "127.0.0.1": 127.0.0.1 overlaps"#],
        );
        assert_eq!(e.len(), 4, "{e:#?}");
        // Different addresses, the same port: fine.
        parse(
            r#"
            [[forward]]
            name = "a"
            url = "http://127.0.0.1:1/"
            ports = [8080]
            address = ["127.0.0.1"]
            [[forward]]
            name = "b"
            url = "http://127.0.0.1:1/"
            ports = [8080]
            address = ["127.0.0.2", "::1"]
            "#,
        )
        .unwrap();
    }

    #[test]
    fn fuzz_body_on_the_examples_and_their_prefixes() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/forwards");
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read(entry.unwrap().path()).unwrap();
            // Every prefix: truncated files in all the places a parser can be caught out.
            for end in 0..=text.len() {
                fuzz::config(&text[..end]);
            }
        }
    }

    #[test]
    fn every_problem_names_the_file() {
        let e = parse("[[forward]]\nname = \"x\"\n").unwrap_err();
        let text = e.in_file("forwards.toml");
        assert!(text.lines().count() >= 2, "{text}");
        assert!(
            text.lines().all(|l| l.starts_with("forwards.toml: ")),
            "{text}"
        );
    }
}
