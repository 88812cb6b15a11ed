//! The live view: one status line per forward on stderr (active connections, bytes and current
//! rate each way), redrawn in place once a second, and the stderr writer logs go through so a
//! log line never lands in the middle of the status block.
//!
//! On only when stderr is a terminal and `--quiet` is not given; the numbers come from the
//! metrics sampler ([`crate::metrics::spawn_sampler`]).

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::ForwardSnapshot;

/// How many status lines are on screen now (the cursor is at the end of the last one).
static DRAWN: Mutex<usize> = Mutex::new(0);

/// Drawing has started: the forward printed its `Forwarding from` lines on stdout, which
/// shares the terminal and does not know about the status block.
static SHOWN: AtomicBool = AtomicBool::new(false);

/// Whether the live view should run.
pub fn enabled(quiet: bool) -> bool {
    !quiet && io::stderr().is_terminal()
}

/// Erase the status block (if any) and leave the cursor at the start of its first line.
fn erase(w: &mut impl Write, drawn: usize) -> io::Result<()> {
    if drawn == 0 {
        return Ok(());
    }
    w.write_all(b"\r")?;
    for _ in 1..drawn {
        w.write_all(b"\x1b[1A")?;
    }
    w.write_all(b"\x1b[J")
}

/// Start drawing: call once stdout has printed what it prints at startup.
pub fn show() {
    SHOWN.store(true, Ordering::Release);
}

/// Columns of the terminal on stderr, if it says.
fn columns() -> Option<usize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // Safety: TIOCGWINSZ on fd 2 only writes a `winsize` into the struct we pass.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// Redraw the status block for `forwards` (once [`show`] was called).
pub fn draw(forwards: &[ForwardSnapshot]) {
    if !SHOWN.load(Ordering::Acquire) {
        return;
    }
    let mut drawn = DRAWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = io::stderr().lock();
    let _ = erase(&mut err, *drawn);
    // A line that wraps would take two rows and break the erase: cut it to the width.
    let width = columns().map_or(usize::MAX, |c| c.saturating_sub(1));
    let text: Vec<String> = forwards
        .iter()
        .map(|f| line(f).chars().take(width).collect())
        .collect();
    let _ = err.write_all(text.join("\n").as_bytes());
    let _ = err.flush();
    *drawn = text.len();
}

/// Leave the last status block on screen and move below it (at exit).
pub fn finish() {
    let mut drawn = DRAWN.lock().unwrap_or_else(|e| e.into_inner());
    if *drawn > 0 {
        let _ = io::stderr().write_all(b"\n");
        *drawn = 0;
    }
}

/// `svc/web  2 connections  up 1.2 MiB (300.0 KiB/s)  down 1.1 GiB (95.3 MiB/s)`; a `--spread`
/// forward says how many each pod has: `svc/web  3 connections (web-a 2, web-b 1, web-c 0)  ...`.
pub fn line(f: &ForwardSnapshot) -> String {
    let pods = if f.pods.is_empty() {
        String::new()
    } else {
        let each: Vec<String> = f.pods.iter().map(|(p, n)| format!("{p} {n}")).collect();
        format!(" ({})", each.join(", "))
    };
    format!(
        "{}  {} connection{}{pods}  up {} ({}/s)  down {} ({}/s)",
        f.name,
        f.active,
        if f.active == 1 { "" } else { "s" },
        human(f.bytes[0]),
        human(f.rate[0]),
        human(f.bytes[1]),
        human(f.rate[1]),
    )
}

/// Bytes in binary units, one decimal.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Logs' stderr: erases the status block before a log line is written; the next tick redraws
/// it below.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut drawn = DRAWN.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = io::stderr().lock();
        erase(&mut err, *drawn)?;
        *drawn = 0;
        err.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;
    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_names_forward_connections_and_rates() {
        let f = ForwardSnapshot {
            name: "svc/web".into(),
            active: 2,
            bytes: [1536, 3 << 30],
            rate: [0, 95 << 20],
            pods: Vec::new(),
        };
        assert_eq!(
            line(&f),
            "svc/web  2 connections  up 1.5 KiB (0 B/s)  down 3.0 GiB (95.0 MiB/s)"
        );
    }

    #[test]
    fn a_spread_forward_shows_each_pods_connections() {
        let f = ForwardSnapshot {
            name: "svc/web".into(),
            active: 3,
            bytes: [0, 0],
            rate: [0, 0],
            pods: vec![
                ("web-a".into(), 2),
                ("web-b".into(), 1),
                ("web-c".into(), 0),
            ],
        };
        assert_eq!(
            line(&f),
            "svc/web  3 connections (web-a 2, web-b 1, web-c 0)  up 0 B (0 B/s)  down 0 B (0 B/s)"
        );
    }

    #[test]
    fn erasing_moves_up_over_every_line() {
        let mut out = Vec::new();
        erase(&mut out, 3).unwrap();
        assert_eq!(out, b"\r\x1b[1A\x1b[1A\x1b[J");
        out.clear();
        erase(&mut out, 0).unwrap();
        assert!(out.is_empty());
    }
}
