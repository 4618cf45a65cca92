//! The async face (feature `async`): a queue's deliveries as a [`Stream`], and writes as
//! futures, for tokio or any other executor.
//!
//! The core stays synchronous and owns no runtime. What would block an executor thread (a
//! durable commit waits for an fsync; a receive waits for a message) runs on threads this
//! module starts because the caller asked for it: one per [`Deliveries`] stream, joined when
//! the stream drops, and one short-lived thread per [`Database::write_async`] call.
//! Concurrent async writes still share fsyncs through group commit.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use futures_core::Stream;
use parking_lot::{Condvar, Mutex};

use crate::db::Database;
use crate::error::{Error, Result};
use crate::queue::{Delivery, Nack};
use crate::txn::WriteTransaction;

/// A queue's deliveries as a [`Stream`]: each item is a message under lease, to be settled
/// with `ack` or `nack` (for example through [`Database::write_async`]).
///
/// A background thread leases up to `batch` messages at a time, and only once the previous
/// batch has been taken from the stream, so messages are not leased long before they are
/// processed. It wakes on commits in this process, when a delayed message comes due and when
/// a lease expires (in a shared concurrency mode, also every 2 ms). An error ends the stream
/// after it is yielded. Dropping the stream stops and joins the thread and requeues the
/// messages it had leased but not yet yielded.
///
/// Made by [`Database::deliveries`].
pub struct Deliveries {
    db: Database,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

struct State {
    inner: Mutex<Inner>,
    /// Signalled when the buffer empties or the stream drops.
    drained: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct Inner {
    buffer: VecDeque<Result<Delivery>>,
    waker: Option<Waker>,
    finished: bool,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

impl Database {
    /// Streams a queue's deliveries, leasing up to `batch` messages at a time. Needs the
    /// `async` feature.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`]; [`Error::LimitExceeded`] for a `batch` of 0 or above
    /// [`Builder::max_batch`](crate::Builder::max_batch); [`Error::Io`] when the thread cannot
    /// start.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mqlite::Error> {
    /// use mqlite::{Message, QueueConfig};
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_queue("jobs", QueueConfig::default())?;
    ///     txn.enqueue("jobs", &Message::new("job 1"))
    /// })?;
    /// let mut deliveries = db.deliveries("jobs", 16)?;
    /// let delivery = deliveries.next().await.expect("a delivery")?;
    /// let lease = delivery.lease.clone();
    /// db.write_async(move |txn| txn.ack(&lease)).await?;
    /// assert_eq!(delivery.message.payload, b"job 1");
    /// # Ok(())
    /// # }
    /// ```
    pub fn deliveries(&self, queue: &str, batch: usize) -> Result<Deliveries> {
        if batch == 0 || batch > self.limits().max_batch {
            return Err(Error::LimitExceeded {
                limit: "batch size",
                value: batch as u64,
                max: self.limits().max_batch as u64,
            });
        }
        self.read(|r| r.queue_info(queue))?;
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            drained: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let (db, state, queue) = (self.clone(), state.clone(), queue.to_owned());
            std::thread::Builder::new()
                .name("mqlite-deliveries".into())
                .spawn(move || feed(&db, &state, &queue, batch))?
        };
        Ok(Deliveries {
            db: self.clone(),
            state,
            thread: Some(thread),
        })
    }

    /// Runs [`Database::write`] on a thread of its own and resolves with its result, so an
    /// executor never blocks on the commit's fsync. Needs the `async` feature.
    ///
    /// # Errors
    ///
    /// As [`Database::write`]; [`Error::Io`] (converted into `E`) when the thread cannot start.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), mqlite::Error> {
    /// use mqlite::{Message, TopicConfig};
    /// let db = mqlite::Database::in_memory()?;
    /// let offset = db
    ///     .write_async(|txn| {
    ///         txn.ensure_topic("events", TopicConfig::default())?;
    ///         txn.publish("events", &Message::new("hello"))
    ///     })
    ///     .await?;
    /// assert_eq!(offset, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn write_async<T, E, F>(&self, f: F) -> WriteFuture<T, E>
    where
        F: FnMut(&WriteTransaction<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let slot: Arc<Mutex<Slot<T, E>>> = Arc::new(Mutex::new(Slot {
            result: None,
            waker: None,
        }));
        let db = self.clone();
        let done = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("mqlite-write".into())
            .spawn(move || {
                let result = db.write(f);
                let mut slot = done.lock();
                slot.result = Some(result);
                if let Some(waker) = slot.waker.take() {
                    waker.wake();
                }
            });
        if let Err(e) = spawned {
            slot.lock().result = Some(Err(E::from(Error::Io(e))));
        }
        WriteFuture { slot }
    }
}

/// The background loop of a [`Deliveries`] stream.
fn feed(db: &Database, state: &State, queue: &str, batch: usize) {
    let stopped = || state.stop.load(Ordering::Acquire);
    loop {
        {
            let mut inner = state.inner.lock();
            while !inner.buffer.is_empty() && !stopped() {
                state.drained.wait(&mut inner);
            }
        }
        if stopped() {
            return;
        }
        let received = db.receive_until(queue, batch, Duration::from_secs(1), &stopped);
        let mut inner = state.inner.lock();
        match received {
            Ok(deliveries) => inner.buffer.extend(deliveries.into_iter().map(Ok)),
            Err(e) => {
                inner.buffer.push_back(Err(e));
                inner.finished = true;
            }
        }
        let finished = inner.finished;
        if !inner.buffer.is_empty()
            && let Some(waker) = inner.waker.take()
        {
            waker.wake();
        }
        if finished {
            return;
        }
    }
}

impl Deliveries {
    /// The next delivery; `None` once an error has ended the stream. The same as
    /// `StreamExt::next`, without needing an extension crate.
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Deliveries {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut inner = self.state.inner.lock();
        if let Some(item) = inner.buffer.pop_front() {
            if inner.buffer.is_empty() {
                self.state.drained.notify_all();
            }
            return Poll::Ready(Some(item));
        }
        if inner.finished {
            return Poll::Ready(None);
        }
        inner.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.drained.notify_all();
        // Wakes the thread's wait for a commit, so that it sees the stop at once.
        self.db.shared.notifier.notify();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let leased: Vec<Delivery> = self
            .state
            .inner
            .lock()
            .buffer
            .drain(..)
            .filter_map(Result::ok)
            .collect();
        if !leased.is_empty() {
            // Best effort: if this fails, the leases expire and the messages come back then.
            let _ = self.db.write(|txn| {
                for d in &leased {
                    match txn.nack(&d.lease, Nack::Requeue) {
                        Ok(()) | Err(Error::StaleLease { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            });
        }
    }
}

struct Slot<T, E> {
    result: Option<std::result::Result<T, E>>,
    waker: Option<Waker>,
}

/// The future of a [`Database::write_async`] call. Dropping it does not cancel the write:
/// the transaction still commits (or fails) on its thread.
pub struct WriteFuture<T, E> {
    slot: Arc<Mutex<Slot<T, E>>>,
}

impl<T, E> std::fmt::Debug for WriteFuture<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteFuture").finish_non_exhaustive()
    }
}

impl<T, E> Future for WriteFuture<T, E> {
    type Output = std::result::Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.slot.lock();
        match slot.result.take() {
            Some(result) => Poll::Ready(result),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
