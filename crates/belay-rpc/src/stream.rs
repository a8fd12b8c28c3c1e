//! Bounded channels between a producer (the executor's synchronous event sink, a
//! deployment's event sink, a store reader) and a consumer (a gRPC response stream read
//! by a client, a recorder writing to the store). A slow consumer slows the producer
//! down; nothing is dropped: a full channel makes the producer wait for room.
//!
//! Sinks are synchronous callbacks (`Fn(&Event)`), called from async code. Waiting there
//! uses [`tokio::task::block_in_place`], which hands the worker's other tasks to other
//! threads while this one waits, so the consumer keeps running. That needs the
//! multi-threaded runtime, which both daemons and the CLI run; on a current-thread runtime
//! the consumer could only run on the very thread that would wait, so a send to a full
//! channel there is refused with an error log instead of deadlocking (see
//! [`BoundedSender::send_blocking`]).

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Room for this many messages between a producer and its consumer: enough to absorb
/// bursts (a run's events arrive in bursts of a few), small enough that a stalled reader
/// holds a bounded amount of memory.
pub const CAPACITY: usize = 256;

/// The sending half of a [`channel`].
#[derive(Debug)]
pub struct BoundedSender<T> {
    tx: mpsc::Sender<T>,
}

impl<T> Clone for BoundedSender<T> {
    fn clone(&self) -> Self {
        BoundedSender {
            tx: self.tx.clone(),
        }
    }
}

/// A bounded channel of `capacity` (at least 1) messages, its receiver as a stream.
pub fn channel<T>(
    capacity: usize,
) -> (BoundedSender<T>, tokio_stream::wrappers::ReceiverStream<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        BoundedSender { tx },
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )
}

/// Why a message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// The consumer went away (a client disconnected); the producer carries on.
    Closed,
    /// The channel was full on a current-thread runtime, where waiting would deadlock.
    CannotWait,
}

impl<T: Send> BoundedSender<T> {
    /// From async code: waits for room.
    pub async fn send(&self, item: T) -> Result<(), NotSent> {
        self.tx.send(item).await.map_err(|_| NotSent::Closed)
    }

    /// Resolves once the consumer went away (a client disconnected).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Sends at once when there is room, else not at all: for a last word (a cancellation)
    /// that must not keep a stopping daemon waiting on a reader.
    pub fn send_now(&self, item: T) -> Result<(), NotSent> {
        self.tx.try_send(item).map_err(|_| NotSent::Closed)
    }

    /// From a synchronous callback: sends at once when there is room, else waits for the
    /// consumer to make some (the producer is slowed down, nothing is dropped).
    pub fn send_blocking(&self, item: T) -> Result<(), NotSent> {
        let item = match self.tx.try_send(item) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(NotSent::Closed),
            Err(TrySendError::Full(item)) => item,
        };
        match tokio::runtime::Handle::try_current() {
            Err(_) => self.tx.blocking_send(item).map_err(|_| NotSent::Closed),
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
                tracing::error!(
                    capacity = self.tx.max_capacity(),
                    "a stream's consumer is too slow and this runtime cannot wait for it: a message was not delivered"
                );
                Err(NotSent::CannotWait)
            }
            Ok(_) => tokio::task::block_in_place(|| {
                self.tx.blocking_send(item).map_err(|_| NotSent::Closed)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_stream::StreamExt as _;

    /// A consumer that reads only when told to: the producer may never be more than the
    /// channel's capacity (plus the one message it is blocked on) ahead of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_slows_the_producer_and_gets_every_message_in_order() {
        const N: usize = 200;
        const CAP: usize = 4;
        let (tx, mut rx) = channel::<usize>(CAP);
        let sent = Arc::new(AtomicUsize::new(0));
        let producer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    // The executor's sink is synchronous: so is this send.
                    tx.send_blocking(i).expect("the reader is there");
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let mut got = Vec::new();
        while let Some(i) = rx.next().await {
            // Everything the producer has finished sending is either read or buffered.
            let ahead = sent.load(Ordering::SeqCst) - got.len();
            assert!(ahead <= CAP + 1, "the producer ran {ahead} messages ahead");
            got.push(i);
            // Be slow: let the producer run as far as it can before the next read.
            tokio::task::yield_now().await;
        }
        producer.await.expect("producer finished");
        assert_eq!(got, (0..N).collect::<Vec<_>>(), "every message, in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gone_reader_does_not_block_the_producer() {
        let (tx, rx) = channel::<u8>(1);
        drop(rx);
        assert_eq!(tx.send_blocking(1), Err(NotSent::Closed));
        assert_eq!(tx.send(2).await, Err(NotSent::Closed));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_current_thread_runtime_refuses_instead_of_deadlocking() {
        let (tx, _rx) = channel::<u8>(1);
        assert_eq!(tx.send_blocking(1), Ok(()));
        assert_eq!(tx.send_blocking(2), Err(NotSent::CannotWait));
    }
}
