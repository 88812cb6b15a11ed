//! A connection's inbound queue: what the session reader hands one connection (data, piped
//! payload, its end), bounded so that a slow local client stops the reader (see
//! [`super::session`]), and allocating nothing while empty.
//!
//! A tokio `mpsc` channel would do the same job, but it costs about 1.8 KiB per connection
//! (its shared state and a first block of 32 slots) even when nothing is ever sent, and a
//! forward may hold 10,000 idle connections. Here the shared state is a mutex around a
//! `VecDeque` that is released whenever it runs empty, and two `Notify`s.
//!
//! Semantics, as the session and the relay use them: the queue closes for the receiver once
//! every sender is gone (after what was queued is received), and for senders once the receiver
//! is gone (what was queued is dropped at once, so that pipes go back to the session).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A bounded queue of `cap` items with one receiver and cloneable senders.
pub fn channel<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            cap: cap.max(1),
            senders: 1,
            receiver: true,
        }),
        to_receiver: Notify::new(),
        to_senders: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Something was queued, or the last sender left.
    to_receiver: Notify,
    /// Room was made, or the receiver left.
    to_senders: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    cap: usize,
    senders: usize,
    receiver: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why [`Sender::try_send`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    Closed(T),
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queue `item` if there is room and a receiver.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut s = self.shared.lock();
        if !s.receiver {
            return Err(TrySendError::Closed(item));
        }
        if s.items.len() >= s.cap {
            return Err(TrySendError::Full(item));
        }
        s.items.push_back(item);
        drop(s);
        self.shared.to_receiver.notify_one();
        Ok(())
    }

    /// Queue `item`, waiting for room; gives it back if the receiver is gone.
    pub async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.shared.to_senders.notified();
            tokio::pin!(room);
            // Registered before the check, so a wake-up between the two is not lost.
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(i)) => return Err(i),
                Err(TrySendError::Full(i)) => item = i,
            }
            room.await;
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.senders -= 1;
        let last = s.senders == 0;
        drop(s);
        if last {
            self.shared.to_receiver.notify_one();
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and everything queued was received.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            // notify_one keeps a permit when nobody waits: a send between the check and the
            // wait below wakes it at once.
            let queued = self.shared.to_receiver.notified();
            {
                let mut s = self.shared.lock();
                if let Some(item) = s.items.pop_front() {
                    if s.items.is_empty() {
                        // An idle connection's queue holds no memory.
                        s.items = VecDeque::new();
                    }
                    drop(s);
                    self.shared.to_senders.notify_one();
                    return Some(item);
                }
                if s.senders == 0 {
                    return None;
                }
            }
            queued.await;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.shared.lock().items.is_empty()
    }

    /// The next item if one is queued and `take` accepts it (it stays first otherwise).
    pub fn try_recv_if(&mut self, take: impl FnOnce(&T) -> bool) -> Option<T> {
        let item = {
            let mut s = self.shared.lock();
            if !s.items.front().is_some_and(take) {
                return None;
            }
            let item = s.items.pop_front();
            if s.items.is_empty() {
                s.items = VecDeque::new();
            }
            item
        };
        self.shared.to_senders.notify_one();
        item
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let dropped = {
            let mut s = self.shared.lock();
            s.receiver = false;
            std::mem::take(&mut s.items)
        };
        drop(dropped);
        self.shared.to_senders.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn try_recv_if_takes_only_what_it_accepts() {
        let (tx, mut rx) = channel(4);
        assert_eq!(rx.try_recv_if(|_| true), None);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(rx.try_recv_if(|v| *v == 2), None);
        assert_eq!(rx.try_recv_if(|v| *v == 1), Some(1));
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn in_order_then_none_once_senders_are_gone() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        tx2.try_send(2).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(1));
        drop(tx2);
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn bounded_and_send_waits_for_room() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        let sender = tokio::spawn(async move { tx.send(3).await.map(|_| tx) });
        // The send cannot finish before a receive makes room.
        tokio::task::yield_now().await;
        assert!(!sender.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        let tx = sender.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert!(rx.is_empty());
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_an_item_and_for_the_last_sender() {
        let (tx, mut rx) = channel::<u8>(1);
        let got = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.try_send(7).unwrap();
        drop(tx);
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .expect("receiver woken")
            .unwrap();
        assert_eq!((first, end), (Some(7), None));
    }

    #[tokio::test]
    async fn senders_see_the_receiver_leave_and_queued_items_drop_with_it() {
        let item = Arc::new(());
        let (tx, rx) = channel(1);
        tx.try_send(item.clone()).unwrap();
        let waiting = {
            let tx = tx.clone();
            let item = item.clone();
            tokio::spawn(async move { tx.send(item).await.is_err() })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("sender woken")
                .unwrap(),
            "send after the receiver left must fail"
        );
        assert_eq!(Arc::strong_count(&item), 1, "queued item not dropped");
        assert!(matches!(tx.try_send(item), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(64);
        for i in 0..64 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.shared.lock().items.capacity() >= 64);
        for _ in 0..64 {
            rx.recv().await;
        }
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }
}
