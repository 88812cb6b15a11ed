//! Taking a listener's connections on a worker's ring: one multishot accept, then a completion
//! (a new socket) per connection, handed to the control plane in batches.
//!
//! The accept runs as a task on a worker; the connections go to the listener's owner (a tokio
//! task, which picks a session for each) through a channel, so many connections accepted in one
//! loop turn cost the control plane one wake-up. The kernel ends a multishot accept on an error
//! (out of descriptors, say) or when its completion queue overflows; the owner then asks for
//! another with its next [`RingAccepts::next`], after whatever back-off it applies.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::{opcode, types};
use tokio::sync::{Notify, mpsc};

use super::op::MultiOp;
use super::ring::Brings;
use super::worker::{JoinHandle, Worker};

/// Connections queued between the worker and the listener's owner.
const QUEUE: usize = 256;

enum Event {
    Conn(OwnedFd),
    /// The multishot accept ended, with this error or (a full completion queue) none.
    Ended(Option<io::Error>),
}

/// A listener's connections, taken on a worker's ring. Dropping it stops listening at once
/// (the socket is shut down) and cancels the accept.
pub struct RingAccepts {
    rx: mpsc::Receiver<Event>,
    rearm: Arc<Notify>,
    ended: bool,
    /// Delivered a connection (so a later EINVAL is not the kernel refusing multishot).
    took_one: bool,
    listener: OwnedFd,
    _task: JoinHandle<()>,
}

/// What [`RingAccepts::next`] gives.
pub enum Accepted {
    Conn(OwnedFd),
    /// The accept ended with this error; the next call arms another.
    Failed(io::Error),
    /// This kernel's io_uring has no multishot accept: accept some other way.
    Unsupported(io::Error),
}

impl RingAccepts {
    /// Arm a multishot accept on `listener` on `worker`.
    pub fn start(worker: Worker, listener: &impl AsFd) -> io::Result<RingAccepts> {
        // The task's own handle on the listening socket, so the accept names a descriptor it
        // keeps open.
        let fd = listener.as_fd().try_clone_to_owned()?;
        let task_fd = Arc::new(fd.try_clone()?);
        let (tx, rx) = mpsc::channel(QUEUE);
        let rearm = Arc::new(Notify::new());
        let task = worker.spawn(accept_loop(task_fd, tx, rearm.clone()));
        Ok(RingAccepts {
            rx,
            rearm,
            ended: false,
            took_one: false,
            listener: fd,
            _task: task,
        })
    }

    pub async fn next(&mut self) -> Accepted {
        loop {
            if self.ended {
                self.ended = false;
                self.rearm.notify_one();
            }
            match self.rx.recv().await {
                Some(Event::Conn(fd)) => {
                    self.took_one = true;
                    return Accepted::Conn(fd);
                }
                Some(Event::Ended(None)) => self.ended = true,
                Some(Event::Ended(Some(e))) => {
                    self.ended = true;
                    if e.raw_os_error() == Some(libc::EINVAL) && !self.took_one {
                        return Accepted::Unsupported(e);
                    }
                    return Accepted::Failed(e);
                }
                None => return Accepted::Failed(io::Error::other("io_uring worker stopped")),
            }
        }
    }
}

impl Drop for RingAccepts {
    fn drop(&mut self) {
        // The worker's accept holds the socket open until its cancel completes: stop
        // listening now, so the port closes when its owner lets go of it.
        // Safety: shutdown(2) on a descriptor we own; on a listening socket it stops listening.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
    }
}

async fn accept_loop(listener: Arc<OwnedFd>, tx: mpsc::Sender<Event>, rearm: Arc<Notify>) {
    loop {
        // Safety: no memory; the operation holds the listener until its last completion,
        // and a dropped one is cancelled with the sockets its completions bring closed.
        let mut op = unsafe {
            MultiOp::start(
                opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
                    .flags(libc::SOCK_CLOEXEC)
                    .build(),
                Brings::Descriptors,
                Box::new(listener.clone()),
            )
        };
        let end = loop {
            let Some((res, _)) = std::future::poll_fn(|cx| op.poll_next(cx)).await else {
                break None;
            };
            if res >= 0 {
                // Safety: a successful accept completion is a new descriptor, ours alone.
                let fd = unsafe { OwnedFd::from_raw_fd(res) };
                if tx.send(Event::Conn(fd)).await.is_err() {
                    return;
                }
            } else if -res != libc::ECANCELED {
                break Some(io::Error::from_raw_os_error(-res));
            }
        };
        drop(op);
        if tx.send(Event::Ended(end)).await.is_err() {
            return;
        }
        tokio::select! {
            () = rearm.notified() => {}
            () = tx.closed() => return,
        }
    }
}
