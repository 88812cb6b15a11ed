//! What a user names on the command line or in an `up` file: kubectl-style targets
//! (`svc/web`, `deploy/api`, a pod name) and port requests (`8080`, `:http`, `5432:postgres`),
//! and the resolved `[LOCAL:]REMOTE` pair a forward listens with ([`PortSpec`]).
//!
//! Pure parsing and printing: no cluster, no socket. Turning a target into pods and a named
//! port into a container port is [`super::cluster`]'s job.

use std::fmt;
use std::str::FromStr;

use super::ControlError;

/// `[LOCAL:]REMOTE`, as kubectl: `8080`, `8080:80`, `:80` (any free local port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub local: u16,
    pub remote: u16,
}

impl FromStr for PortSpec {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str, what: &str| port_number(s, p, what);
        match s.split_once(':') {
            None => {
                let p = port(s, "remote")?;
                Ok(PortSpec {
                    local: p,
                    remote: p,
                })
            }
            Some(("", r)) => Ok(PortSpec {
                local: 0,
                remote: port(r, "remote")?,
            }),
            Some((l, r)) => Ok(PortSpec {
                local: port(l, "local")?,
                remote: port(r, "remote")?,
            }),
        }
    }
}

/// The resource kinds a target can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Service,
    Deployment,
    ReplicaSet,
    StatefulSet,
    /// `-l SELECTOR`: the pods a label selector matches (the target's name is the selector).
    Selector,
}

/// `TYPE/NAME` or `NAME` (a pod), as kubectl takes it; or `-l SELECTOR` ([`Target::selector`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub name: String,
}

impl Target {
    /// The pods `selector` (label selector query syntax, `app=web,tier!=db`) matches.
    pub fn selector(selector: &str) -> Result<Target, ControlError> {
        if selector.trim().is_empty() {
            return Err(ControlError::Target("-l: an empty label selector".into()));
        }
        Ok(Target {
            kind: Kind::Selector,
            name: selector.trim().to_string(),
        })
    }
}

impl FromStr for Target {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| ControlError::Target(format!("invalid target {s:?}: {reason}"));
        let (ty, name) = match s.split_once('/') {
            Some((ty, name)) => (ty, name),
            None => ("pod", s),
        };
        if name.is_empty() || name.contains('/') {
            return Err(bad("expected TYPE/NAME or a pod name".into()));
        }
        let ty = ty.to_ascii_lowercase();
        let kind = match ty.strip_suffix(".apps").unwrap_or(&ty) {
            "po" | "pod" | "pods" => Kind::Pod,
            "svc" | "service" | "services" => Kind::Service,
            "deploy" | "deployment" | "deployments" => Kind::Deployment,
            "rs" | "replicaset" | "replicasets" => Kind::ReplicaSet,
            "sts" | "statefulset" | "statefulsets" => Kind::StatefulSet,
            other => {
                return Err(bad(format!(
                    "unsupported type {other:?}; use pod/, svc/, deploy/, rs/ or sts/"
                )));
            }
        };
        Ok(Target {
            kind,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ty = match self.kind {
            Kind::Pod => "pod",
            Kind::Service => "svc",
            Kind::Deployment => "deploy",
            Kind::ReplicaSet => "rs",
            Kind::StatefulSet => "sts",
            Kind::Selector => return write!(f, "-l {}", self.name),
        };
        write!(f, "{ty}/{}", self.name)
    }
}

/// The local side of a port request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPort {
    /// `8080`: the same number as the (translated) remote port.
    Same,
    /// `:8080`: any free port.
    Any,
    Port(u16),
}

/// The remote side: a number, or a port name (`http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePort {
    Number(u16),
    Name(String),
}

impl fmt::Display for RemotePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemotePort::Number(n) => write!(f, "{n}"),
            RemotePort::Name(s) => write!(f, "{s:?}"),
        }
    }
}

/// `[LOCAL:]REMOTE` where REMOTE may be a port name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRequest {
    pub local: LocalPort,
    pub remote: RemotePort,
}

impl FromStr for PortRequest {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |p: &str, what: &str| port_number(s, p, what);
        let (local, remote) = match s.split_once(':') {
            None => (LocalPort::Same, s),
            Some(("", r)) => (LocalPort::Any, r),
            Some((l, r)) => (LocalPort::Port(number(l, "local")?), r),
        };
        let remote = if remote.bytes().all(|b| b.is_ascii_digit()) && !remote.is_empty() {
            RemotePort::Number(number(remote, "remote")?)
        } else if is_port_name(remote) {
            RemotePort::Name(remote.to_string())
        } else {
            return Err(ControlError::BadPortSpec {
                spec: s.to_string(),
                reason: format!(
                    "remote port {remote:?} is neither a number between 1 and 65535 nor a port name"
                ),
            });
        };
        Ok(PortRequest { local, remote })
    }
}

/// `p`, the `what` (`local`, `remote`) port of the port spec `spec`, as a number from 1 to
/// 65535.
fn port_number(spec: &str, p: &str, what: &str) -> Result<u16, ControlError> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(ControlError::BadPortSpec {
            spec: spec.to_string(),
            reason: format!("{what} port {p:?} is not a number between 1 and 65535"),
        }),
        Ok(n) => Ok(n),
    }
}

/// An IANA_SVC_NAME: 1-15 lower-case letters, digits and inner dashes, at least one letter.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_like_kubectl() {
        let p = |s: &str| s.parse::<Target>().map(|t| (t.kind, t.name));
        assert_eq!(p("web").unwrap(), (Kind::Pod, "web".into()));
        assert_eq!(p("pod/web").unwrap(), (Kind::Pod, "web".into()));
        assert_eq!(p("svc/db").unwrap(), (Kind::Service, "db".into()));
        assert_eq!(p("services/db").unwrap(), (Kind::Service, "db".into()));
        assert_eq!(p("deploy/api").unwrap(), (Kind::Deployment, "api".into()));
        assert_eq!(
            p("deployment.apps/api").unwrap(),
            (Kind::Deployment, "api".into())
        );
        assert_eq!(p("rs/api-1").unwrap(), (Kind::ReplicaSet, "api-1".into()));
        assert_eq!(p("sts/pg").unwrap(), (Kind::StatefulSet, "pg".into()));
        assert!(
            p("job/x")
                .unwrap_err()
                .to_string()
                .contains("unsupported type")
        );
        assert!(p("svc/").is_err());
        let l = Target::selector(" app=web,tier!=db ").unwrap();
        assert_eq!(
            (l.kind, l.to_string()),
            (Kind::Selector, "-l app=web,tier!=db".into())
        );
        assert!(Target::selector("").is_err());
        assert_eq!(
            "deploy/api".parse::<Target>().unwrap().to_string(),
            "deploy/api"
        );
    }

    #[test]
    fn port_requests_parse() {
        let p = |s: &str| s.parse::<PortRequest>();
        assert_eq!(
            p("8080").unwrap(),
            PortRequest {
                local: LocalPort::Same,
                remote: RemotePort::Number(8080)
            }
        );
        assert_eq!(
            p(":http").unwrap(),
            PortRequest {
                local: LocalPort::Any,
                remote: RemotePort::Name("http".into())
            }
        );
        assert_eq!(
            p("5432:postgres").unwrap(),
            PortRequest {
                local: LocalPort::Port(5432),
                remote: RemotePort::Name("postgres".into())
            }
        );
        for bad in ["0", "70000", "x:80", "8080:", "8080:HTTP", "a:b:c", "-http"] {
            assert!(p(bad).is_err(), "{bad} should not parse");
        }
    }
}
