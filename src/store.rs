//! The redb handle behind a [`Database`](crate::Database), reopened after a storage failure.
//!
//! redb latches the first I/O error: every later operation fails with "previous I/O error"
//! until the database is closed and opened again. A full disk is the common case, and waiting
//! for an operator to restart the process would turn a transient condition into an outage. So
//! the handle lives here behind a lock: the first transaction begun after a failure drops it,
//! opens the file (or backend) again, which runs redb's recovery, and goes on. Nothing
//! acknowledged is lost: a commit either returned Ok before the failure, or failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::error::{Error, PREVIOUS_IO, Result, STORAGE_FAILURES, is_storage_failure};
use crate::journal::{Deferred, Hook};

/// Opens the same file or backend again.
pub(crate) type Reopen = Box<dyn Fn() -> Result<Opened> + Send + Sync>;

/// A redb handle and the journal under it, when the file has one.
pub(crate) struct Opened {
    pub(crate) db: redb::Database,
    pub(crate) journal: Option<Arc<dyn Deferred>>,
}

impl Opened {
    /// redb's handle on `storage`, made by `create`, with the journal of `storage`.
    pub(crate) fn on<E>(
        storage: Storage,
        create: impl FnOnce(Storage) -> std::result::Result<redb::Database, E>,
    ) -> std::result::Result<Opened, E> {
        let journal = storage.journal.clone();
        Ok(Opened {
            db: create(storage)?,
            journal,
        })
    }
}

/// The largest last durable commit, in 4 KiB pages, after which a durable commit holds the
/// state before it (see [`Store::commit_durable`]). A one-message commit writes 6-10 pages, 64
/// writers' publishes in one commit 9-11, and 1 000 queued messages about 50.
const PIN_MAX_PAGES: usize = 24;

pub(crate) struct Store {
    /// `None` only between dropping a failed handle and a successful reopen.
    db: RwLock<Option<Opened>>,
    reopen: Reopen,
    /// A storage operation failed: reopen before the next transaction.
    failed: AtomicBool,
    /// `STORAGE_FAILURES` when this store last looked.
    failures_seen: AtomicU64,
    /// Durable commits may hold a snapshot of the state before them (see
    /// [`Store::commit_durable`]).
    pin_durable: bool,
}

impl Store {
    /// `pin_durable`: whether durable commits may hold a snapshot of the state before them,
    /// for a file no other process shares (see [`Store::commit_durable`]).
    pub(crate) fn new(opened: Opened, reopen: Reopen, pin_durable: bool) -> Self {
        Store {
            db: RwLock::new(Some(opened)),
            reopen,
            failed: AtomicBool::new(false),
            failures_seen: AtomicU64::new(STORAGE_FAILURES.load(Ordering::Acquire)),
            pin_durable,
        }
    }

    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction> {
        self.with(|db| Ok(db.begin_write()?))
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction> {
        self.with(|db| {
            use redb::ReadableDatabase;
            Ok(db.begin_read()?)
        })
    }

    /// Commits `txn`; after a storage failure the next transaction reopens the handle.
    pub(crate) fn commit(&self, txn: redb::WriteTransaction) -> Result<()> {
        txn.commit().map_err(|e| {
            let e = Error::from(e);
            if is_storage_failure(&e) {
                self.failed.store(true, Ordering::Release);
            }
            e
        })
    }

    /// Commits `txn`, durable; after a small durable commit, with a snapshot of the state
    /// before it held open across the commit. After a durable commit redb frees the pages it
    /// replaced in a second commit of its own (a non-durable "epilogue": its system tables
    /// flushed, their checksums, a header), about a fifth of redb's CPU for a one-row commit
    /// (12 % of a one-publish commit's samples, the kernel's I/O included).
    /// With the older snapshot alive those pages are still in use, so the epilogue finds
    /// nothing to free and returns, and the next durable commit frees them inside its own: a
    /// commit's replaced pages are reused one commit later. That lag is what bounds it to
    /// small commits: a large one's replaced pages would be missing when the next large one
    /// allocates, and the file would grow. The size of the last commit stands for this one's
    /// (the journal knows it; without a journal, no snapshot). Where other processes share
    /// the file redb has no epilogue, and the snapshot would only cost.
    pub(crate) fn commit_durable(&self, txn: redb::WriteTransaction) -> Result<()> {
        let pin = self.pin();
        let committed = self.commit(txn);
        drop(pin);
        committed
    }

    /// The snapshot [`Store::commit_durable`] holds across its commit, when it takes one.
    fn pin(&self) -> Option<redb::ReadTransaction> {
        use redb::ReadableDatabase;
        if !self.pin_durable {
            return None;
        }
        let slot = self.db.read();
        let opened = slot.as_ref()?;
        if opened.journal.as_ref()?.last_sync_pages() > PIN_MAX_PAGES {
            return None;
        }
        // Failing, it only leaves the commit its epilogue.
        opened.db.begin_read().ok()
    }

    /// The journal under the current handle, when the file has one.
    fn journal(&self) -> Option<Arc<dyn Deferred>> {
        self.db.read().as_ref().and_then(|o| o.journal.clone())
    }

    /// Commits `txn` (durable) and runs `durable` once its journal record is on the disk,
    /// before redb's work after the fsync (its epilogue commit, which frees the pages the
    /// commit replaced: 35-95 µs of a one-message commit here); without a journal, never. redb
    /// makes the commit visible to readers right after the fsync, so a consumer woken from
    /// there mostly finds it; one that does not is woken again after the commit.
    pub(crate) fn commit_telling(&self, txn: redb::WriteTransaction, durable: Hook) -> Result<()> {
        let Some(journal) = self.journal() else {
            return self.commit_durable(txn);
        };
        journal.on_durable(Some(durable));
        let committed = self.commit_durable(txn);
        // A commit that synced nothing (or failed first) leaves it: not for a later one.
        journal.on_durable(None);
        committed
    }

    /// Commits `txn` durably, with the fsync after redb has released its write lock when the
    /// file has a journal: other writers go on during the fsync instead of waiting for it.
    /// Readers may see the commit before it is durable, as they see relaxed commits. On a plain
    /// file, an ordinary durable commit.
    pub(crate) fn commit_then_sync(&self, mut txn: redb::WriteTransaction) -> Result<()> {
        txn.set_durability(redb::Durability::Immediate)?;
        let Some(journal) = self.journal() else {
            return self.commit_durable(txn);
        };
        {
            // Off again however the commit ends, a panic included: a deferral left on would
            // make every later durable commit return before its fsync.
            let _deferred = DeferGuard::on(&*journal);
            self.commit_durable(txn)?;
        }
        journal.fsync().map_err(|e| {
            self.failed.store(true, Ordering::Release);
            Error::from(e)
        })
    }

    fn with<T>(&self, begin: impl Fn(&redb::Database) -> Result<T>) -> Result<T> {
        self.probe();
        if !self.failed.load(Ordering::Acquire)
            && let Some(opened) = self.db.read().as_ref()
        {
            match begin(&opened.db) {
                // A failed commit can also leave redb asking to be reopened for repair.
                Err(e) if is_storage_failure(&e) || matches!(e, Error::Corrupted { .. }) => {
                    self.failed.store(true, Ordering::Release);
                }
                other => return other,
            }
        }
        self.recover()?;
        match self.db.read().as_ref() {
            Some(opened) => begin(&opened.db),
            None => Err(Error::Storage(PREVIOUS_IO.into())),
        }
    }

    /// After a storage failure anywhere in the process, asks this handle whether it latched
    /// one. Reads alone would not notice: redb checks for a latched failure when a write
    /// begins, not when a snapshot does.
    fn probe(&self) {
        // A plain load on the common path: no write to a shared cache line per transaction.
        let failures = STORAGE_FAILURES.load(Ordering::Acquire);
        if self.failures_seen.load(Ordering::Acquire) == failures
            || self.failures_seen.swap(failures, Ordering::AcqRel) == failures
        {
            return;
        }
        if let Some(opened) = self.db.read().as_ref() {
            match opened.db.try_begin_write() {
                // Busy: the writer will meet the failure itself.
                Ok(_) | Err(redb::TransactionError::WouldBlock) => {}
                Err(_) => self.failed.store(true, Ordering::Release),
            }
        }
    }

    fn recover(&self) -> Result<()> {
        let mut slot = self.db.write();
        if !self.failed.load(Ordering::Acquire) && slot.is_some() {
            return Ok(()); // another thread reopened it meanwhile
        }
        // The old handle must be gone first: it holds the file's lock. A snapshot still alive
        // keeps it open, and the reopen fails until that snapshot is dropped.
        drop(slot.take());
        *slot = Some((self.reopen)()?);
        self.failed.store(false, Ordering::Release);
        tracing::info!(target: "mqlite::store", "reopened the database after a storage failure");
        Ok(())
    }
}

/// Defers the journal's fsync while alive.
struct DeferGuard<'a>(&'a dyn Deferred);

impl<'a> DeferGuard<'a> {
    fn on(journal: &'a dyn Deferred) -> Self {
        journal.defer_fsync(true);
        DeferGuard(journal)
    }
}

impl Drop for DeferGuard<'_> {
    fn drop(&mut self) {
        self.0.defer_fsync(false);
    }
}

/// The backend redb is given: a plain file, a journaled one, or the caller's backend.
///
/// A backend given to [`Builder::open_backend`](crate::Builder::open_backend) is shared by the
/// successive redb handles of one database (one after each reopen), so closing a handle must
/// not close it; a backend made for one handle is closed with it.
#[derive(Debug)]
pub(crate) struct Storage {
    inner: Arc<dyn redb::StorageBackend>,
    owned: bool,
    /// `inner`, when it is a journal.
    journal: Option<Arc<dyn Deferred>>,
}

impl Storage {
    /// A backend that lives as long as this handle.
    pub(crate) fn owned(backend: impl redb::StorageBackend) -> Self {
        Storage {
            inner: Arc::new(backend),
            owned: true,
            journal: None,
        }
    }

    /// A journal that lives as long as this handle.
    pub(crate) fn journaled<B: redb::StorageBackend>(journal: crate::journal::Journal<B>) -> Self {
        let journal = Arc::new(journal);
        Storage {
            inner: journal.clone(),
            owned: true,
            journal: Some(journal),
        }
    }

    /// A backend that outlives this handle.
    pub(crate) fn shared(backend: Arc<dyn redb::StorageBackend>) -> Self {
        Storage {
            inner: backend,
            owned: false,
            journal: None,
        }
    }
}

type IoResult<T> = std::result::Result<T, std::io::Error>;
type LockResult<T> = std::result::Result<T, redb::BackendError>;
type Bound = std::ops::Bound<u64>;

impl redb::StorageBackend for Storage {
    fn len(&self) -> IoResult<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> IoResult<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> IoResult<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> IoResult<()> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.inner.write(offset, data)
    }
    fn close(&self) -> IoResult<()> {
        if self.owned {
            self.inner.close()
        } else {
            Ok(())
        }
    }
    fn try_lock_range(&self, start: Bound, end: Bound) -> LockResult<bool> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound, end: Bound) -> LockResult<bool> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound, end: Bound) -> LockResult<()> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound, end: Bound) -> LockResult<()> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound, end: Bound) -> LockResult<()> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound, end: Bound) -> LockResult<bool> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_io_is_a_storage_failure() {
        let err = Error::from(redb::StorageError::PreviousIo);
        assert!(is_storage_failure(&err));
        assert!(!is_storage_failure(&Error::corrupted("x")));
    }
}
