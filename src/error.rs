//! Error types. This is the only module that maps redb's errors.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A `Result` whose error is [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mqlite.
///
/// Every variant carries what the caller needs to act on it. An error returned from
/// [`Database::write`](crate::Database::write) means that nothing the closure did was committed;
/// an error from a read changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic, queue, group or scope name breaks the naming rule.
    #[error("invalid {kind} name {name:?}: {rule}")]
    InvalidName {
        /// What was being named: "topic", "queue", "group", "scope".
        kind: &'static str,
        /// The name as given.
        name: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A routing key or binding pattern breaks its rule.
    #[error("invalid routing key {key:?}: {rule}")]
    InvalidRoutingKey {
        /// The key or pattern as given.
        key: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A user table name starts with the prefix mqlite keeps for itself.
    #[error("table name {name:?} is reserved: names starting with \"mqlite_\" belong to mqlite")]
    ReservedTableName {
        /// The table name as given.
        name: String,
    },
    /// The named topic does not exist.
    #[error("unknown topic {topic:?}")]
    UnknownTopic {
        /// The topic name.
        topic: String,
    },
    /// A topic of that name already exists.
    #[error("topic {topic:?} already exists")]
    TopicExists {
        /// The topic name.
        topic: String,
    },
    /// The named queue does not exist.
    #[error("unknown queue {queue:?}")]
    UnknownQueue {
        /// The queue name.
        queue: String,
    },
    /// A queue of that name already exists.
    #[error("queue {queue:?} already exists")]
    QueueExists {
        /// The queue name.
        queue: String,
    },
    /// The queue still has something depending on it (a binding, or another queue dead-lettering
    /// into it).
    #[error("queue {queue:?} is in use: {reason}")]
    QueueInUse {
        /// The queue name.
        queue: String,
        /// What still refers to it.
        reason: String,
    },
    /// The named consumer group has no committed offset on the topic.
    #[error("unknown consumer group {group:?} on topic {topic:?}")]
    UnknownGroup {
        /// The topic name.
        topic: String,
        /// The group name.
        group: String,
    },
    /// A message is larger than the configured limit.
    #[error("message of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    MessageTooLarge {
        /// The message's size: payload, key, routing key and headers.
        size_bytes: u64,
        /// The limit set by [`Builder::max_message_bytes`](crate::Builder::max_message_bytes).
        limit_bytes: u64,
    },
    /// A documented limit other than the message size was exceeded.
    #[error("{limit} is {value}, above the limit of {max}")]
    LimitExceeded {
        /// Which limit, for example "header count" or "batch size".
        limit: &'static str,
        /// The value given.
        value: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A configuration value is out of its range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An offset lies beyond the end of the topic.
    #[error("offset {offset} is beyond the end {end} of topic {topic:?}")]
    OffsetOutOfRange {
        /// The topic name.
        topic: String,
        /// The offset given.
        offset: u64,
        /// The next offset the topic will assign.
        end: u64,
    },
    /// An ack, nack or extend names a lease that is no longer held: it expired and the message
    /// was delivered again, or it was already settled. Nothing was changed.
    #[error("stale lease on queue {queue:?}: the message was redelivered or already settled")]
    StaleLease {
        /// The queue name.
        queue: String,
    },
    /// A queue with the reject-publish overflow policy is full.
    #[error("queue {queue:?} is full ({max_length} messages)")]
    QueueFull {
        /// The queue name.
        queue: String,
        /// The configured maximum length.
        max_length: u64,
    },
    /// The file was written by a newer mqlite whose format this version cannot read.
    #[error("file format version {found} is newer than the supported version {supported}")]
    FormatTooNew {
        /// The format version in the file.
        found: u32,
        /// The newest format version this build reads.
        supported: u32,
    },
    /// The file exists but is not an mqlite database. It was not modified.
    #[error("{path} is not an mqlite file: {reason}")]
    NotMqliteFile {
        /// The path opened.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// Another handle (in this or another process) holds the file open in a conflicting mode.
    #[error("{path} is already open by another handle")]
    AlreadyOpen {
        /// The path opened.
        path: PathBuf,
    },
    /// A read-only open found a file that its last writer did not close (the process crashed
    /// or was killed). Its commits are there, but putting the file in order after a crash
    /// takes a write: open it writable once ([`Database::open`](crate::Database::open)), then
    /// read-only opens work again. Nothing was changed.
    #[error("{path} was not closed by its last writer: open it writable once to recover it")]
    NeedsRecovery {
        /// The path opened.
        path: PathBuf,
    },
    /// Stored bytes failed their checksum or do not decode. The bytes were not returned.
    #[error("corrupted data in {location}")]
    Corrupted {
        /// Where: the table and key, or the redb structure that failed.
        location: String,
    },
    /// The disk (or the storage quota) is full. The commit failed and nothing was lost; writes
    /// succeed again once space is freed.
    #[error("storage is full")]
    StorageFull,
    /// A JSON payload failed to encode or decode.
    #[error("json payload: {0}")]
    Json(#[from] serde_json::Error),
    /// An I/O error from the file system.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// An [import](crate::Database::import) refused its input; nothing was imported.
    #[error("import line {line}: {reason}")]
    Import {
        /// The line (from 1; 0 for the database itself).
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other error from the storage engine.
    #[error("storage error: {0}")]
    Storage(String),
}

impl Error {
    pub(crate) fn corrupted(location: impl Into<String>) -> Self {
        Error::Corrupted {
            location: location.into(),
        }
    }

    /// Whether the error comes from the storage below (I/O, full disk), so that the same
    /// operation may succeed later once the cause is gone.
    pub fn is_storage(&self) -> bool {
        matches!(self, Error::StorageFull | Error::Io(_) | Error::Storage(_))
    }
}

fn is_disk_full(err: &io::Error) -> bool {
    // ENOSPC (28) and EDQUOT (122) on Linux; StorageFull is the portable kind.
    err.kind() == io::ErrorKind::StorageFull || matches!(err.raw_os_error(), Some(28 | 122))
}

/// Storage failures converted so far, in any database of this process; a store that sees it
/// move checks whether its redb handle latched one (see `store.rs`).
pub(crate) static STORAGE_FAILURES: AtomicU64 = AtomicU64::new(0);

fn counted(err: Error) -> Error {
    if is_storage_failure(&err) {
        STORAGE_FAILURES.fetch_add(1, Ordering::Release);
    }
    err
}

impl From<redb::StorageError> for Error {
    fn from(err: redb::StorageError) -> Self {
        counted(match err {
            redb::StorageError::Corrupted(what) => Error::corrupted(what),
            redb::StorageError::Io(io) if is_disk_full(&io) => Error::StorageFull,
            redb::StorageError::Io(io) => Error::Io(io),
            redb::StorageError::PreviousIo => Error::Storage(PREVIOUS_IO.into()),
            redb::StorageError::Backend(inner) => match inner.downcast::<io::Error>() {
                Ok(io) if is_disk_full(&io) => Error::StorageFull,
                Ok(io) => Error::Io(*io),
                Err(other) => Error::Storage(other.to_string()),
            },
            other => Error::Storage(other.to_string()),
        })
    }
}

impl From<redb::Error> for Error {
    fn from(err: redb::Error) -> Self {
        counted(match err {
            redb::Error::Corrupted(what) => Error::corrupted(what),
            redb::Error::Io(io) if is_disk_full(&io) => Error::StorageFull,
            redb::Error::Io(io) => Error::Io(io),
            redb::Error::PreviousIo => Error::Storage(PREVIOUS_IO.into()),
            other => Error::Storage(other.to_string()),
        })
    }
}

/// What an operation gets when an earlier I/O error stopped the storage engine and reopening
/// it failed too (the next transaction tries again).
pub(crate) const PREVIOUS_IO: &str =
    "an earlier I/O error stopped the storage engine; it is reopened at the next transaction";

/// Whether `err` means the storage engine has latched an I/O failure and must be reopened.
pub(crate) fn is_storage_failure(err: &Error) -> bool {
    match err {
        Error::Io(_) | Error::StorageFull => true,
        Error::Storage(what) => what == PREVIOUS_IO,
        _ => false,
    }
}

macro_rules! via_redb_error {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Error {
            fn from(err: $ty) -> Self {
                Error::from(redb::Error::from(err))
            }
        }
    )*};
}

via_redb_error!(
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError,
    redb::CompactionError
);

/// Maps an error from opening a file, naming the path in the errors that need it.
pub(crate) fn open_error(err: redb::DatabaseError, path: &std::path::Path) -> Error {
    match err {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::AlreadyOpen {
            path: path.to_path_buf(),
        },
        // Only a read-only open aborts a repair (a writable one repairs), and only a shared
        // read-only one finds a journal it may not replay.
        redb::DatabaseError::RepairAborted => Error::NeedsRecovery {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.get_ref()
                .is_some_and(|inner| inner.is::<crate::journal::Unrecovered>()) =>
        {
            Error::NeedsRecovery {
                path: path.to_path_buf(),
            }
        }
        other => Error::from(other),
    }
}

/// Runs `f`, turning a panic inside the storage engine into [`Error::Corrupted`].
///
/// redb trusts the pages it reads: some damaged pages (a flipped page-type byte, say) make
/// it panic instead of returning an error. The calls that read a file's structure for the
/// first time (open, check, compact) go through here so that a damaged file gets a typed
/// error. Nothing is shared across the boundary: the handle being built unwinds with it.
pub(crate) fn guard_damage<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Corrupted {
                location: format!("{what}: the storage engine failed on damaged pages ({message})"),
            })
        }
    }
}
