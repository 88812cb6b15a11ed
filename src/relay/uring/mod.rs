//! The io_uring data plane: worker threads (one per core) that each run one ring as their only
//! event loop, and the sockets, buffers and operations they move bytes with.
//!
//! - [`worker`]: the threads, their tasks and timers, and how the tokio control plane hands
//!   them work (once per batch, through an eventfd the ring reads);
//! - [`ring`]: one worker's ring and the state of every operation in it (the soundness rule
//!   lives there: what the kernel uses stays alive until its completion);
//! - [`op`]: operations as futures that own their buffers, and the socket operations;
//! - [`buf`]: the buffer traits operations take, and the provided-buffer pool;
//! - [`accept`]: a listener's connections through one multishot accept;
//! - [`socket`]: a socket owned by a worker, the backend's [`crate::relay::backend::Socket`].
//!
//! A session to a plain TCP upstream (a CRI stream server, `ringfwd serve`) is handed to a
//! worker at its start, with every local connection relayed on it: its reader, its writer and
//! its connections' relays are tasks of that worker, so a message crosses no thread, and one
//! `io_uring_enter` per loop turn carries every send and receive the turn queued. TLS and
//! WebSocket upstreams (through an API server) stay on tokio with the copy backend.

pub mod accept;
pub mod buf;
pub mod op;
pub mod ring;
pub mod socket;
pub mod worker;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use io_uring::{IoUring, opcode};

pub use accept::{Accepted, RingAccepts};
pub use buf::PoolBuf;
pub use socket::RingSocket;
pub use worker::{JoinHandle, Worker};

/// Whether io_uring works here and has every operation this backend uses (a kernel may be too
/// old, `kernel.io_uring_disabled` set, or a seccomp profile may refuse io_uring_setup).
pub fn available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let uring: IoUring = IoUring::builder()
                .build(8)
                .map_err(|e| format!("io_uring_setup: {e}"))?;
            if !uring.params().is_feature_ext_arg() {
                return Err("this kernel's io_uring has no timed wait (EXT_ARG, 5.11)".into());
            }
            let mut probe = io_uring::Probe::new();
            uring
                .submitter()
                .register_probe(&mut probe)
                .map_err(|e| format!("io_uring probe: {e}"))?;
            for (code, name) in [
                (opcode::PollAdd::CODE, "POLL_ADD"),
                (opcode::Read::CODE, "READ"),
                (opcode::Recv::CODE, "RECV"),
                (opcode::SendMsg::CODE, "SENDMSG"),
                (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
                (opcode::AcceptMulti::CODE, "ACCEPT"),
            ] {
                if !probe.is_supported(code) {
                    return Err(format!("this kernel's io_uring has no {name}"));
                }
            }
            worker::workers().map(|_| ()).map_err(|e| e.to_string())
        })
        .clone()
}
