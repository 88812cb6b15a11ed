//! Credentials, and how they are kept out of logs, errors and `Debug` output.
//!
//! Owns: [`Secret`], a token that prints as `[redacted]` and is compared in constant time;
//! [`SecretUrl`], a stream-server URL that may carry a token in its path (a CRI runtime's
//! single-use `/portforward/TOKEN`, a `ringfwd serve` URL with its token) and prints with that
//! part replaced; reading a token from a file and making a random one. Anything that holds a
//! credential holds it in one of these two types, or formats it through [`redact_url`], so that
//! tracing (at any level), error messages and derived `Debug` impls cannot show it.
//! Must not touch: where tokens are checked or sent (`crate::serve`, `crate::control::upgrade`).

use std::fmt;
use std::path::{Path, PathBuf};

/// What stands in for a secret wherever it would be shown.
pub const REDACTED: &str = "[redacted]";

/// Shortest token accepted from a file. A generated one has [`GENERATED_BYTES`] * 2 characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// Random bytes in a generated token (256 bits), written as hex.
pub const GENERATED_BYTES: usize = 32;

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {} {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// A bearer token. `Debug` and `Display` print [`REDACTED`]; the value is reached only through
/// [`Secret::expose`], at the one place it goes on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A token of [`GENERATED_BYTES`] random bytes from the OS, as lowercase hex (safe in a URL
    /// path and in a header).
    pub fn generate() -> Secret {
        let mut bytes = [0u8; GENERATED_BYTES];
        getrandom::fill(&mut bytes).expect("OS randomness");
        let mut hex = String::with_capacity(2 * GENERATED_BYTES);
        for b in bytes {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Secret(hex)
    }

    /// The token in the file at `path`, without surrounding whitespace (a trailing newline).
    /// It must be at least [`MIN_TOKEN_LEN`] characters of `A-Z a-z 0-9 - . _ ~`, the characters
    /// a URL path carries as they are, so that the same token works in a header and in a URL.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| SecretError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let token = text.trim();
        // The reasons name lengths and positions, never the characters themselves.
        if let Some(at) = token.find(|c: char| !is_unreserved(c)) {
            return Err(invalid(format!(
                "has a character other than A-Z a-z 0-9 - . _ ~ at byte {at} \
                 (`openssl rand -hex 32` makes a good token)"
            )));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(invalid(format!(
                "holds {} characters, fewer than {MIN_TOKEN_LEN} \
                 (`openssl rand -hex 32` makes a good token)",
                token.len()
            )));
        }
        Ok(Secret(token.to_string()))
    }

    /// The token itself, for the header or URL it is sent in. Never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on how many of its
    /// bytes are right: every byte of the token is compared and the differences are folded
    /// together without an early exit (`black_box` keeps the compiler from adding one). Only
    /// the token's length can show, which is not secret (a generated one is always 64).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        let mut diff = u8::from(want.len() != presented.len());
        for (i, w) in want.iter().enumerate() {
            let p = presented.get(i).copied().unwrap_or(0);
            diff = std::hint::black_box(diff | (w ^ p));
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// A stream-server URL, which may be a credential: runtimes hand out
/// `http://HOST:PORT/portforward/TOKEN`, where holding the URL is holding the right to connect.
/// `Debug` and `Display` show it through [`redact_url`].
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL itself, to connect to. Never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `url` fit to show: a password in it (`user:pass@`) and every path segment after the first
/// become [`REDACTED`]; scheme, host, port, the first segment and the query stay, so
/// `http://127.0.0.1:10350/portforward/Xy9z?port=80` shows as
/// `http://127.0.0.1:10350/portforward/[redacted]?port=80`. Stream-server tokens sit after the
/// first segment (CRI runtimes, kubelet, `ringfwd serve`); a URL without one is unchanged.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let (authority, rest) = if scheme.is_empty() {
        ("", rest)
    } else {
        rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()))
    };
    let (path, tail) = rest.split_at(rest.find(['?', '#']).unwrap_or(rest.len()));
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            if let Some((user, _password)) = userinfo.split_once(':') {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
            } else {
                out.push_str(userinfo);
            }
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    // `/first/anything...`: keep `/first/`, hide the rest.
    let body = path.strip_prefix('/').unwrap_or(path);
    match body.split_once('/') {
        Some((first, more)) if !more.is_empty() => {
            if path.starts_with('/') {
                out.push('/');
            }
            out.push_str(first);
            out.push('/');
            out.push_str(REDACTED);
        }
        _ => out.push_str(path),
    }
    out.push_str(tail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret("s3cr3t-token-value-1234".into());
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "s3cr3t-token-value-1234");
    }

    #[test]
    fn matches_only_the_exact_token() {
        let s = Secret("abcdefghijklmnop".into());
        assert!(s.matches(b"abcdefghijklmnop"));
        for wrong in [
            &b""[..],
            b"abcdefghijklmno",
            b"abcdefghijklmnopq",
            b"abcdefghijklmnoP",
            b"Abcdefghijklmnop",
            b"abcdefghijklmnop\0",
        ] {
            assert!(
                !s.matches(wrong),
                "{:?} matched",
                String::from_utf8_lossy(wrong)
            );
        }
    }

    #[test]
    fn generated_tokens_are_long_hex_and_differ() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_eq!(a.expose().len(), 2 * GENERATED_BYTES);
        assert!(a.expose().bytes().all(|c| HEX.contains(&c)));
        assert_ne!(a, b);
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write("good", "  0123456789abcdef-_.~XYZ\n");
        assert_eq!(
            Secret::from_file(&good).unwrap().expose(),
            "0123456789abcdef-_.~XYZ"
        );
        let short = Secret::from_file(&write("short", "abc\n")).unwrap_err();
        assert!(short.to_string().contains("fewer than 16"), "{short}");
        let bad = Secret::from_file(&write("bad", "0123456789abcdef/x")).unwrap_err();
        assert!(bad.to_string().contains("byte 16"), "{bad}");
        assert!(!bad.to_string().contains("0123456789"), "{bad}");
        let missing = Secret::from_file(&dir.path().join("absent")).unwrap_err();
        assert!(missing.to_string().contains("absent"), "{missing}");
    }

    #[test]
    fn urls_lose_their_tokens() {
        for (url, shown) in [
            (
                "http://127.0.0.1:10350/portforward/Xy9z_-AB",
                "http://127.0.0.1:10350/portforward/[redacted]",
            ),
            (
                "http://127.0.0.1:1/portforward/Xy9z?port=80&port=81",
                "http://127.0.0.1:1/portforward/[redacted]?port=80&port=81",
            ),
            (
                "http://[::1]:1/portforward/a/b#frag",
                "http://[::1]:1/portforward/[redacted]#frag",
            ),
            (
                "http://user:pw@host/portforward",
                "http://user:[redacted]@host/portforward",
            ),
            (
                "http://127.0.0.1:1/portforward",
                "http://127.0.0.1:1/portforward",
            ),
            (
                "http://127.0.0.1:1/portforward/",
                "http://127.0.0.1:1/portforward/",
            ),
            ("http://127.0.0.1:1", "http://127.0.0.1:1"),
            ("http://h/?port=1", "http://h/?port=1"),
            ("/portforward/tok", "/portforward/[redacted]"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let u = SecretUrl::new("http://h:1/portforward/tok");
        assert_eq!(u.to_string(), "http://h:1/portforward/[redacted]");
        assert_eq!(format!("{u:?}"), "\"http://h:1/portforward/[redacted]\"");
        assert_eq!(u.expose(), "http://h:1/portforward/tok");
    }
}
