//! Group commit: concurrent durable writers share one redb transaction and one fsync.
//!
//! Callers queue up while a commit is in flight. The first to arrive with nobody leading
//! becomes the leader: it opens a transaction and hands it to each waiting caller in turn
//! (including itself); every caller runs its own closure on its own thread, so closures need
//! not be `Send`. A caller that brought a `Send + 'static` closure
//! ([`Database::write_send`](crate::Database::write_send)) leaves it in its slot instead, and
//! the leader runs it on its own thread: two thread switches fewer per such caller. If a
//! closure fails, the transaction is dropped and rebuilt with the others (which is why a write
//! closure may run more than once); the caller that failed gets its own error. A closure that
//! returns `Ok` from a transaction an operation left broken (it failed part-way, see
//! `WriteTransaction::break_with`) failed all the same, with that operation's error. Then the
//! leader commits once, hands leadership to the first caller that queued meanwhile (or to the
//! next to come), and tells every member the outcome. Waking them is the longest part of a
//! batch on a small machine (a few µs a thread), and most come straight back to write again:
//! so until the last batch is all awake, the new leader keeps taking those who queue into its
//! own batch instead of committing without them. Against handing over after the wake-ups, 64
//! threads publishing got 95-113 k durable messages/s against 84-93 k in four alternating
//! pairs, and 70-87 k against 71-80 k (faster in five of six) half an hour later on a slower
//! disk (2026-12-07). Handing over first without taking the woken callers in was slower:
//! commits then alternate between the whole batch and one writer.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{Condvar, Mutex};

use crate::db::{Durability, Shared};
use crate::error::{Error, Result};
use crate::txn::WriteTransaction;

/// Most callers in one batch; later ones wait for the next commit.
const MAX_BATCH: usize = 512;

/// Where one caller stands.
enum Turn {
    /// Queued.
    Wait,
    /// Lead the next batch.
    Lead,
    /// Run your closure on this transaction, then report.
    Run(Arc<WriteTransaction<'static>>),
    /// Your closure ran; whether it succeeded.
    Ran(bool),
    /// Finished: the batch committed (Ok), failed to commit (Err), or dropped you after your
    /// closure failed (Ok; your own error is yours).
    Done(Result<()>),
}

/// A caller's closure that any thread may run; returns whether it succeeded. Its outcome goes
/// where the caller reads it.
type Job = Box<dyn FnMut(&WriteTransaction<'_>) -> bool + Send>;

struct Slot {
    turn: Mutex<Turn>,
    changed: Condvar,
    /// The closure, when the leader may run it itself.
    job: Mutex<Option<Job>>,
}

impl Slot {
    fn new(job: Option<Job>) -> Arc<Slot> {
        Arc::new(Slot {
            turn: Mutex::new(Turn::Wait),
            changed: Condvar::new(),
            job: Mutex::new(job),
        })
    }

    /// Runs the slot's job on this thread, if it has one; returns whether it succeeded.
    fn run_job(&self, txn: &WriteTransaction<'_>) -> Option<bool> {
        self.job.lock().as_mut().map(|job| job(txn))
    }

    fn set(&self, turn: Turn) {
        *self.turn.lock() = turn;
        self.changed.notify_all();
    }

    /// Waits until the turn is no longer `Wait` (or, for the leader, `Run`) and takes it.
    fn take(&self, still: impl Fn(&Turn) -> bool) -> Turn {
        let mut turn = self.turn.lock();
        while still(&turn) {
            self.changed.wait(&mut turn);
        }
        std::mem::replace(&mut *turn, Turn::Wait)
    }
}

#[derive(Default)]
pub(crate) struct GroupCommit {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Arc<Slot>>,
    leading: bool,
    /// The last leader is still telling its batch the outcome: the callers it wakes come
    /// back to write again, and the leader now (who may be one of them) takes them into its
    /// batch as they come, rather than committing without them.
    waking: bool,
}

/// A caller's closure with what its last run produced.
struct Member<'f, T, E, F> {
    f: &'f mut F,
    outcome: Option<std::thread::Result<Result<T, E>>>,
}

impl<T, E, F> Member<'_, T, E, F>
where
    F: FnMut(&WriteTransaction<'_>) -> Result<T, E>,
    E: From<Error>,
{
    /// Runs the closure; returns whether it succeeded. A closure that returned `Ok` from a
    /// transaction it left broken (an operation failed part-way and the closure went on)
    /// failed: it gets the operation's error.
    fn run(&mut self, txn: &WriteTransaction<'_>) -> bool {
        let outcome = unless_broken(txn, catch_unwind(AssertUnwindSafe(|| (self.f)(txn))));
        let ok = matches!(outcome, Ok(Ok(_)));
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self, committed: Result<()>) -> Result<T, E> {
        match self.outcome {
            Some(Err(panic)) => resume_unwind(panic),
            Some(Ok(Err(e))) => Err(e),
            Some(Ok(Ok(value))) => committed.map(|()| value).map_err(E::from),
            None => Err(E::from(committed.err().unwrap_or_else(|| {
                Error::Storage("group commit finished without running the closure".into())
            }))),
        }
    }
}

impl GroupCommit {
    /// Runs `f` in a shared durable transaction and returns once that transaction committed.
    pub(crate) fn write<T, E, F>(&self, shared: &Arc<Shared>, f: &mut F) -> Result<T, E>
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let mut member = Member { f, outcome: None };
        let committed = self.write_in(shared, Slot::new(None), &mut member);
        member.finish(committed)
    }

    /// [`GroupCommit::write`] for a closure the leader may run on its own thread.
    pub(crate) fn write_send<T, E, F>(&self, shared: &Arc<Shared>, mut f: F) -> Result<T, E>
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        type Outcome<T, E> = Option<std::thread::Result<Result<T, E>>>;
        let outcome: Arc<Mutex<Outcome<T, E>>> = Arc::new(Mutex::new(None));
        let job: Job = {
            let outcome = outcome.clone();
            Box::new(move |txn| {
                let result = unless_broken(txn, catch_unwind(AssertUnwindSafe(|| f(txn))));
                let ok = matches!(result, Ok(Ok(_)));
                *outcome.lock() = Some(result);
                ok
            })
        };
        let slot = Slot::new(Some(job));
        // When this caller leads, it runs its own job through the same slot.
        let mine = slot.clone();
        let mut run_mine = move |txn: &WriteTransaction<'_>| match mine.run_job(txn) {
            Some(true) => Ok(()),
            _ => Err(Error::Storage("the closure failed".into())),
        };
        // The job's own outcome is in `outcome`, whichever thread ran it.
        let mut member = Member {
            f: &mut run_mine,
            outcome: None,
        };
        let committed = self.write_in(shared, slot, &mut member);
        let result = outcome.lock().take();
        match result {
            Some(Err(panic)) => resume_unwind(panic),
            Some(Ok(Err(e))) => Err(e),
            Some(Ok(Ok(value))) => committed.map(|()| value).map_err(E::from),
            None => Err(E::from(committed.err().unwrap_or_else(|| {
                Error::Storage("group commit finished without running the closure".into())
            }))),
        }
    }

    /// Queues `member` in `slot`, runs it when its turn comes (or leads), and returns whether
    /// its batch committed.
    fn write_in<T, E, F>(
        &self,
        shared: &Arc<Shared>,
        slot: Arc<Slot>,
        member: &mut Member<'_, T, E, F>,
    ) -> Result<()>
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let lead_now = {
            let mut queue = self.queue.lock();
            if queue.leading {
                queue.waiting.push_back(slot.clone());
                false
            } else {
                queue.leading = true;
                true
            }
        };
        if !lead_now {
            loop {
                match slot.take(|t| matches!(t, Turn::Wait | Turn::Ran(_))) {
                    Turn::Lead => break,
                    Turn::Run(txn) => {
                        let ok = member.run(&txn);
                        drop(txn);
                        slot.set(Turn::Ran(ok));
                    }
                    Turn::Done(committed) => return committed,
                    Turn::Wait | Turn::Ran(_) => {}
                }
            }
        }
        let (committed, followers) = self.lead(shared, member);
        // Leadership passes before the batch hears its outcome, so that the next batch forms
        // and runs while this thread wakes the callers of this one.
        {
            let mut queue = self.queue.lock();
            queue.waking = !followers.is_empty();
            match queue.waiting.pop_front() {
                Some(next) => next.set(Turn::Lead),
                None => queue.leading = false,
            }
        }
        for f in &followers {
            f.set(Turn::Done(match &committed {
                Ok(()) => Ok(()),
                Err(e) => Err(copy_error(e)),
            }));
        }
        if !followers.is_empty() {
            self.queue.lock().waking = false;
        }
        committed
    }

    /// Runs one batch: the leader's closure and those of everyone queued, then one commit.
    /// Returns the leader's own outcome and the followers still in the batch, who are to be
    /// told it; those whose closures failed were told already.
    fn lead<T, E, F>(
        &self,
        shared: &Arc<Shared>,
        me: &mut Member<'_, T, E, F>,
    ) -> (Result<()>, Vec<Arc<Slot>>)
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let mut followers: Vec<Arc<Slot>> = Vec::new();
        let mut me_alive = true;
        loop {
            let txn = match shared.store.begin_write() {
                Ok(t) => Arc::new(WriteTransaction::new(t, shared.clone())),
                // Those still queued stay for the next leader, whose transaction may open
                // (the store reopens after a storage failure).
                Err(e) => return (Err(e), followers),
            };
            let mut failed = false;
            if me_alive && !me.run(&txn) {
                me_alive = false;
                failed = true;
            }
            // Everyone in the batch so far runs again on a rebuilt transaction; then whoever
            // queued meanwhile joins, for as long as the last batch is still being woken (its
            // callers come back one by one).
            let mut next = 0;
            loop {
                if next == followers.len() {
                    let room = (MAX_BATCH - 1).saturating_sub(followers.len());
                    if failed || room == 0 {
                        break;
                    }
                    let mut queue = self.queue.lock();
                    if queue.waiting.is_empty() {
                        if !queue.waking {
                            break;
                        }
                        drop(queue);
                        std::thread::yield_now();
                        continue;
                    }
                    let n = queue.waiting.len().min(room);
                    followers.extend(queue.waiting.drain(..n));
                }
                let follower = &followers[next];
                next += 1;
                // A broken transaction is rebuilt before anyone else runs on it.
                if failed || txn.broken().is_some() {
                    continue;
                }
                let ok = match follower.run_job(&txn) {
                    Some(ok) => ok,
                    None => {
                        follower.set(Turn::Run(txn.clone()));
                        matches!(
                            follower.take(|t| !matches!(t, Turn::Ran(_))),
                            Turn::Ran(true)
                        )
                    }
                };
                if !ok {
                    failed = true;
                    follower.set(Turn::Done(Ok(())));
                    followers.remove(next - 1);
                    next -= 1;
                }
            }
            if failed || txn.broken().is_some() {
                // Roll back everything this batch did and run the survivors again.
                drop(txn);
                if !me_alive && followers.is_empty() {
                    return (Ok(()), followers);
                }
                continue;
            }
            let committed = match Arc::try_unwrap(txn) {
                Ok(txn) => shared.commit(txn, Durability::Immediate),
                Err(_) => Err(Error::Storage(
                    "group commit: transaction still shared".into(),
                )),
            };
            let writers = followers.len() as u64 + u64::from(me_alive);
            match &committed {
                Ok(()) => {
                    shared.counters.writes.fetch_add(writers, Ordering::Relaxed);
                    tracing::trace!(target: "mqlite::commit", writers, "group commit");
                }
                Err(e) => {
                    tracing::warn!(target: "mqlite::commit", writers, error = %e, "group commit failed")
                }
            }
            return (committed, followers);
        }
    }
}

/// A closure's outcome, but the error that broke `txn` when the closure returned `Ok` from a
/// transaction an operation left half done.
fn unless_broken<T, E: From<Error>>(
    txn: &WriteTransaction<'_>,
    outcome: std::thread::Result<Result<T, E>>,
) -> std::thread::Result<Result<T, E>> {
    match outcome {
        Ok(Ok(value)) => Ok(txn.broken().map_or(Ok(value), |e| Err(E::from(e)))),
        other => other,
    }
}

/// The same error for another member of the batch, or for the commit of a broken transaction
/// (errors are not `Clone`: I/O errors keep their kind and text).
pub(crate) fn copy_error(e: &Error) -> Error {
    match e {
        Error::StorageFull => Error::StorageFull,
        Error::Io(io) => Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        Error::Corrupted { location } => Error::Corrupted {
            location: location.clone(),
        },
        // What breaks a transaction (see `WriteTransaction::break_with`) keeps its kind.
        Error::QueueFull { queue, max_length } => Error::QueueFull {
            queue: queue.clone(),
            max_length: *max_length,
        },
        other => Error::Storage(other.to_string()),
    }
}
