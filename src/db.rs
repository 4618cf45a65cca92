//! [`Database`], its [`Builder`], crash-safe file creation, commits and waiting.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use redb::{ReadableDatabase, StorageBackend};

use crate::clock::{Clock, SystemClock};
use crate::codec;
use crate::commit::GroupCommit;
use crate::error::{Error, Result, open_error};
use crate::inspect::Counters;
use crate::journal::{self, Journal};
use crate::schema::{self, FORMAT_VERSION, META, META_FORMAT, META_NEXT_ID};
use crate::store::{Opened, Reopen, Storage, Store};
use crate::topic::{RETENTION_BATCH, RetentionReport, trim};
use crate::txn::{ReadTransaction, WriteTransaction};

/// When a commit reaches the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// A commit is on disk (fsynced) when it returns: it survives a process crash and a power
    /// cut. The default.
    #[default]
    Immediate,
    /// A commit returns before it is fsynced. It survives a process crash at once, and a power
    /// cut once the next durable point passes: [`Database::flush`], a later `Immediate`
    /// commit, or the flusher, which runs every
    /// [`Builder::flush_interval_ms`] (default 10 ms). A power cut may lose the commits of the
    /// last interval, always a whole number of commits in commit order. On a journaled file
    /// the flush's fsync runs after the write lock is released, so writers do not wait for it
    /// (and readers may see a flushed commit a moment before it is on disk, as they see every
    /// relaxed commit before it is).
    Relaxed,
}

/// Limits checked at the API boundary. See [`Builder`] for each default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (payload, key, routing key and headers), in bytes.
    pub max_message_bytes: u64,
    /// Most headers in one message.
    pub max_headers: u32,
    /// Most messages in one publish batch or receive.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_headers: 64,
            max_batch: 10_000,
        }
    }
}

/// A step of creating a new database file, named for fault injection
/// ([`Builder::create_hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateStep {
    /// Creating the temporary file beside the target.
    CreateTemp,
    /// Writing the schema and format version into it.
    WriteSchema,
    /// Fsyncing the temporary file.
    SyncTemp,
    /// Linking it under the target name (atomic; never replaces an existing file).
    Link,
    /// Removing the temporary name.
    RemoveTemp,
    /// Fsyncing the directory so the new name is durable.
    SyncDirectory,
}

type CreateHook = Arc<dyn Fn(CreateStep) -> io::Result<()> + Send + Sync>;

/// Options for opening a [`Database`]. Every setter states its default.
///
/// # Examples
///
/// ```
/// use mqlite::{Database, Durability};
/// let dir = std::env::temp_dir().join(format!("mqlite-doc-builder-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let db = Database::builder()
///     .cache_size_bytes(4 << 20)
///     .max_message_bytes(64 << 10)
///     .durability(Durability::Relaxed)
///     .open(dir.join("app.mqlite"))?;
/// # drop(db); std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), mqlite::Error>(())
/// ```
#[derive(Clone)]
pub struct Builder {
    cache_size_bytes: usize,
    limits: Limits,
    clock: Arc<dyn Clock>,
    durability: Durability,
    flush_interval_ms: u64,
    concurrency: redb::ConcurrencyMode,
    create_hook: Option<CreateHook>,
    /// `None`: on in the `ExclusiveWriter` mode.
    verify_on_open: Option<bool>,
    /// `None`: on in the `ExclusiveWriter` mode.
    journal: Option<bool>,
    journal_bytes: u64,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            cache_size_bytes: 16 << 20,
            limits: Limits::default(),
            clock: Arc::new(SystemClock),
            durability: Durability::Immediate,
            flush_interval_ms: 10,
            concurrency: redb::ConcurrencyMode::ExclusiveWriter,
            create_hook: None,
            verify_on_open: None,
            journal: None,
            journal_bytes: journal::DEFAULT_JOURNAL_BYTES,
        }
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("cache_size_bytes", &self.cache_size_bytes)
            .field("limits", &self.limits)
            .field("durability", &self.durability)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Memory for redb's page cache. Default 16 MiB (redb's own default of 1 GiB is far too
    /// much for a device).
    pub fn cache_size_bytes(&mut self, bytes: usize) -> &mut Self {
        self.cache_size_bytes = bytes;
        self
    }

    /// Largest message in bytes (payload, key, routing key and headers). Default 1 MiB.
    pub fn max_message_bytes(&mut self, bytes: u64) -> &mut Self {
        self.limits.max_message_bytes = bytes;
        self
    }

    /// Most headers in one message. Default 64.
    pub fn max_headers(&mut self, count: u32) -> &mut Self {
        self.limits.max_headers = count;
        self
    }

    /// Most messages in one publish batch or one receive. Default 10 000.
    pub fn max_batch(&mut self, count: usize) -> &mut Self {
        self.limits.max_batch = count;
        self
    }

    /// The clock for timestamps, retention, leases, delays and dedup expiry. Default: the
    /// system clock. Tests pass a [`ManualClock`](crate::ManualClock).
    pub fn clock(&mut self, clock: impl Clock) -> &mut Self {
        self.clock = Arc::new(clock);
        self
    }

    /// When commits reach the disk. Default [`Durability::Immediate`].
    pub fn durability(&mut self, durability: Durability) -> &mut Self {
        self.durability = durability;
        self
    }

    /// In [`Durability::Relaxed`], the bound on how long a commit stays not yet durable: a
    /// flusher thread makes pending commits durable this often. Default 10 ms. The thread
    /// exists only in relaxed mode, and stops when the last handle of the database drops.
    pub fn flush_interval_ms(&mut self, interval_ms: u64) -> &mut Self {
        self.flush_interval_ms = interval_ms.max(1);
        self
    }

    /// Verifies every page checksum of the file when it opens (redb's integrity check), so
    /// that damage to the medium (a flipped bit, a bad sector) in any table, the
    /// application's included, is found before anything is read.
    ///
    /// Default **on** in the default `ExclusiveWriter` mode, off in the shared modes (the
    /// check may repair, which needs the file to itself). It reads the whole file at every
    /// open: measured 190 ms for a 544 MiB file in the OS page cache, more from a cold disk;
    /// turn it off where open time matters more. Without it, every mqlite value still carries
    /// its own checksum, but keys and plain integers (offsets in keys, group offsets, dedup
    /// expiry times, the application's tables) are not checked until [`Builder::check`]
    /// (`mqlite check`), and some damaged pages make redb itself panic, or abort the process
    /// when a second panic follows in a destructor (seen in the bit-flip tests).
    ///
    /// A file that fails the check is refused with [`Error::Corrupted`]. The check has then
    /// already let redb repair the file to its last intact commit: opening it again opens that
    /// state, which may lack the commits the damage destroyed.
    pub fn verify_on_open(&mut self, verify: bool) -> &mut Self {
        self.verify_on_open = Some(verify);
        self
    }

    /// How processes share the file (redb's concurrency mode). Default
    /// [`ExclusiveWriter`](redb::ConcurrencyMode::ExclusiveWriter): one process opens the
    /// file, and a second opener gets [`Error::AlreadyOpen`]. `SingleWriter` and `MultiWriter`
    /// let other processes open it too (read-only, or read-write); waiting consumers then also
    /// look for other processes' commits every few milliseconds. `Relaxed` durability needs
    /// `ExclusiveWriter`.
    pub fn concurrency(&mut self, mode: redb::ConcurrencyMode) -> &mut Self {
        self.concurrency = mode;
        self
    }

    /// Whether a file this builder creates gets a write-ahead journal: a 2 MiB region at the
    /// front of the file where each durable commit is appended as one sequential write and one
    /// fsync, instead of redb writing its pages in their places (about eight scattered pages
    /// for a one-message commit) before its fsync. The pages are copied to their places later,
    /// many commits at a time (a *checkpoint*: when the region is full, at close, and when the
    /// file is next opened after a crash). Measured on this project's machines: a one-message
    /// durable commit takes about half the time. The file grows by the 2 MiB region.
    ///
    /// Default **on** in the default `ExclusiveWriter` mode, off in `SingleWriter` and
    /// `MultiWriter`. The journal serves one process: a journaled file opened in a shared mode
    /// is first recovered (what an exclusive writer left in the journal is put in place) and
    /// then written in place like a plain file, so it works but without the gain. A read-only
    /// open in a shared mode of a file whose journal still holds commits (its writer crashed)
    /// fails with a storage error until a writable open recovers it. Existing files keep the
    /// layout they were created with; this setting matters only when a file is created.
    /// Memory: the pages of the commits not yet checkpointed, at most about the region's size.
    /// The old records stay in the region until overwritten, like SQLite's WAL: deleted data
    /// can linger in the file's bytes there, as it can in free pages.
    ///
    /// # Examples
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// // A plain redb file, as the shared modes make.
    /// let db = mqlite::Database::builder().journal(false).open(dir.path().join("plain.mqlite"))?;
    /// db.write(|txn| txn.create_topic("t", mqlite::TopicConfig::default()))?;
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn journal(&mut self, on: bool) -> &mut Self {
        self.journal = Some(on);
        self
    }

    /// The size of the journal region of a file this builder creates. Default 2 MiB; at
    /// least 16 KiB and at most 1 GiB, rounded up to 4 KiB (else [`Error::InvalidConfig`] at
    /// open). A larger region checkpoints less often and costs as much file space and, at
    /// most, as much memory; a durable commit larger than the region is written in place,
    /// as on a plain file. Existing files keep the size they were created with. Measured on
    /// this project's machines: 1, 2 and 4 MiB regions gave the same durable commit rates
    /// (one message, or 1 000, a commit) within the run's noise, on a fresh file and on a
    /// 276 MiB one, so the default takes the smaller file.
    ///
    /// # Examples
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("small.mqlite");
    /// let db = mqlite::Database::builder().journal_size_bytes(256 << 10).open(&path)?;
    /// db.write(|txn| txn.create_topic("t", mqlite::TopicConfig::default()))?;
    /// assert!(std::fs::metadata(&path)?.len() < 1 << 20);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn journal_size_bytes(&mut self, bytes: u64) -> &mut Self {
        self.journal_bytes = bytes;
        self
    }

    fn journal_on(&self) -> bool {
        self.journal
            .unwrap_or(self.concurrency == redb::ConcurrencyMode::ExclusiveWriter)
    }

    /// The backend under redb for the existing file at `path`: the journal when the file has
    /// one.
    pub(crate) fn file_storage(&self, path: &Path, writable: bool) -> Result<Storage> {
        let layout = check_magic(path)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        let through = if layout == Layout::Journaled && writable && !self.shares_file() {
            journal::open_write_through(path, &file)
        } else {
            None
        };
        let plain = redb::backends::FileBackend::new(file).map_err(|e| open_error(e, path))?;
        match layout {
            Layout::Plain => Ok(Storage::owned(plain)),
            Layout::Journaled => Ok(Storage::journaled(
                Journal::open(plain, writable, self.shares_file()).with_write_through(through),
            )),
        }
    }

    fn shares_file(&self) -> bool {
        self.concurrency != redb::ConcurrencyMode::ExclusiveWriter
    }

    /// redb's writable handle on the existing file at `path`.
    pub(crate) fn redb_open(&self, path: &Path) -> Result<Opened> {
        let storage = self.file_storage(path, true)?;
        Opened::on(storage, |storage| {
            self.redb_builder().create_with_backend(storage)
        })
        .map_err(|e| open_error(e, path))
    }

    /// redb's read-only handle on the existing file at `path`.
    pub(crate) fn redb_open_read_only(&self, path: &Path) -> Result<redb::ReadOnlyDatabase> {
        let storage = self.file_storage(path, false)?;
        self.redb_builder()
            .open_read_only_with_backend(storage)
            .map_err(|e| open_error(e, path))
    }

    /// A seam for fault injection: called before each step of creating a new file; an error
    /// stops the creation there, as a crash would. Default: none.
    pub fn create_hook(
        &mut self,
        hook: impl Fn(CreateStep) -> io::Result<()> + Send + Sync + 'static,
    ) -> &mut Self {
        self.create_hook = Some(Arc::new(hook));
        self
    }

    pub(crate) fn redb_builder(&self) -> redb::Builder {
        redb_builder(self.cache_size_bytes, self.concurrency)
    }

    fn check_config(&self) -> Result<()> {
        if self.durability == Durability::Relaxed
            && self.concurrency != redb::ConcurrencyMode::ExclusiveWriter
        {
            return Err(Error::InvalidConfig(
                "relaxed durability needs the ExclusiveWriter concurrency mode".into(),
            ));
        }
        if !(16 << 10..=journal::MAX_JOURNAL_BYTES).contains(&self.journal_bytes) {
            return Err(Error::InvalidConfig(format!(
                "journal size {} bytes is outside 16 KiB ..= 1 GiB",
                self.journal_bytes
            )));
        }
        if self.limits.max_batch == 0 || self.limits.max_message_bytes == 0 {
            return Err(Error::InvalidConfig("limits must be at least 1".into()));
        }
        Ok(())
    }

    fn hook(&self, step: CreateStep) -> Result<()> {
        match &self.create_hook {
            Some(hook) => Ok(hook(step)?),
            None => Ok(()),
        }
    }

    /// Opens the database file at `path`, creating it when it does not exist (or is empty).
    ///
    /// Creation is crash-safe: the file is built under a temporary name in the same directory,
    /// fsynced, linked into place (never replacing a file that appeared meanwhile), and the
    /// directory is fsynced. A crash leaves either no file or a complete one; it may leave a
    /// temporary file named `.NAME.mqlite-create-*` behind, which is safe to delete.
    ///
    /// # Errors
    ///
    /// [`Error::NotMqliteFile`] for a file that is not an mqlite database,
    /// [`Error::FormatTooNew`] for a file from a newer mqlite, [`Error::AlreadyOpen`] when
    /// another handle holds it in a conflicting mode; none of them modifies the file.
    /// [`Error::Io`] and storage errors.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Database> {
        let path = path.as_ref();
        crate::error::guard_damage("open", || self.open_file(path))
    }

    fn open_file(&self, path: &Path) -> Result<Database> {
        self.check_config()?;
        let needs_create = match fs::metadata(path) {
            Ok(meta) => meta.len() == 0,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e.into()),
        };
        if needs_create {
            self.create_file(path)?;
        }
        self.check_existing(path)?;
        let db = self.redb_open(path)?;
        let (builder, file) = (self.clone(), path.to_path_buf());
        let reopen: Reopen = Box::new(move || builder.redb_open(&file));
        self.finish_open(db, reopen, Some(path.to_path_buf()), false)
    }

    /// Opens a database that lives in memory only; for tests and examples.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    pub fn open_in_memory(&self) -> Result<Database> {
        self.open_backend(redb::backends::InMemoryBackend::new())
    }

    /// Opens a database on any redb storage backend (for example a fault-injecting one),
    /// initialising it when the backend is empty.
    ///
    /// # Errors
    ///
    /// As [`Builder::open`].
    pub fn open_backend(&self, backend: impl StorageBackend) -> Result<Database> {
        crate::error::guard_damage("open", || self.open_on(backend))
    }

    fn open_on(&self, backend: impl StorageBackend) -> Result<Database> {
        self.check_config()?;
        let backend: Arc<dyn StorageBackend> = Arc::new(backend);
        let db = self.redb_on(&backend)?;
        let builder = self.clone();
        let reopen: Reopen = Box::new(move || builder.redb_on(&backend));
        self.finish_open(db, reopen, None, true)
    }

    /// redb's handle on a caller's backend: journaled when it is (or, empty, when new files
    /// are), plain otherwise.
    fn redb_on(&self, backend: &Arc<dyn StorageBackend>) -> Result<Opened> {
        let lower = || Storage::shared(backend.clone());
        let len = backend.len()?;
        let mut head = vec![0u8; (journal::DETECT_LEN as u64).min(len) as usize];
        backend.read(0, &mut head)?;
        let journaled = !starts_as_redb(&head) && journal::is_journaled(&head);
        let storage = if journaled {
            Storage::journaled(Journal::open(lower(), true, self.shares_file()))
        } else if len == 0 && self.journal_on() {
            Storage::journaled(Journal::create(lower(), self.journal_bytes)?)
        } else {
            lower()
        };
        Ok(Opened::on(storage, |storage| {
            self.redb_builder().create_with_backend(storage)
        })?)
    }

    /// Builds a new file under a temporary name and links it into place.
    fn create_file(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::InvalidConfig(format!("{} has no file name", path.display())))?;
        let temp = dir.join(format!(
            ".{}.mqlite-create-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            crate::clock::system_now_ms()
        ));
        self.hook(CreateStep::CreateTemp)?;
        {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&temp)?;
            let plain = redb::backends::FileBackend::new(file).map_err(|e| open_error(e, &temp))?;
            let storage = if self.journal_on() {
                Storage::journaled(Journal::create(plain, self.journal_bytes)?)
            } else {
                Storage::owned(plain)
            };
            let db = self
                .redb_builder()
                .create_with_backend(storage)
                .map_err(|e| open_error(e, &temp))?;
            self.hook(CreateStep::WriteSchema)?;
            init_schema(&db)?;
        }
        self.hook(CreateStep::SyncTemp)?;
        File::open(&temp)?.sync_all()?;
        self.hook(CreateStep::Link)?;
        let replace_empty = fs::metadata(path).is_ok_and(|m| m.len() == 0);
        let linked = if replace_empty {
            fs::rename(&temp, path).map(|()| true)
        } else {
            match fs::hard_link(&temp, path) {
                Ok(()) => Ok(true),
                // Another opener created it meanwhile: use theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        };
        let linked = linked?;
        self.hook(CreateStep::RemoveTemp)?;
        if !replace_empty {
            fs::remove_file(&temp)?;
        }
        if linked {
            self.hook(CreateStep::SyncDirectory)?;
            File::open(&dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Checks an existing file without modifying it: redb's magic, then the meta table
    /// through a read-only handle.
    fn check_existing(&self, path: &Path) -> Result<()> {
        let read_only = match self.redb_open_read_only(path) {
            Ok(db) => db,
            Err(e @ (Error::AlreadyOpen { .. } | Error::NotMqliteFile { .. })) => return Err(e),
            // A file that needs recovery cannot be opened read-only; the writable open
            // repairs it and checks the format again.
            Err(_) => return Ok(()),
        };
        let txn = read_only.begin_read()?;
        check_format(&txn, Some(path))
    }

    fn finish_open(
        &self,
        mut opened: Opened,
        reopen: Reopen,
        path: Option<PathBuf>,
        init_if_empty: bool,
    ) -> Result<Database> {
        let verify = self
            .verify_on_open
            .unwrap_or(self.concurrency == redb::ConcurrencyMode::ExclusiveWriter);
        let db = &mut opened.db;
        if verify && !db.check_integrity().map_err(Error::from)? {
            return Err(Error::corrupted(
                "the integrity check found damaged pages; redb repaired the file to its last intact commit, which the next open will use",
            ));
        }
        {
            let txn = db.begin_read()?;
            let empty = txn.list_tables()?.next().is_none();
            drop(txn);
            if init_if_empty && empty {
                init_schema(db)?;
            }
            check_format(&db.begin_read()?, path.as_deref())?;
            upgrade_format(db)?;
        }
        let notifier = Arc::new(Notifier::default());
        let wake_early: crate::journal::Hook = {
            let notifier = notifier.clone();
            Arc::new(move || notifier.notify())
        };
        let shared = Arc::new(Shared {
            store: Store::new(opened, reopen, !self.shares_file()),
            limits: self.limits,
            clock: self.clock.clone(),
            durability: self.durability,
            notifier,
            wake_early,
            shares_file: self.shares_file(),
            dirty: AtomicBool::new(false),
            group: GroupCommit::default(),
            counters: Counters::default(),
            opened: Instant::now(),
        });
        shared.clock.subscribe(Waker::from(shared.notifier.clone()));
        let handles = Arc::new(Handles::default());
        if self.durability == Durability::Relaxed {
            let handle = spawn_flusher(&shared, self.flush_interval_ms)?;
            *handles.flusher.lock() = Some(handle);
        }
        Ok(Database {
            _handles: handles,
            shared,
        })
    }
}

fn redb_builder(cache_size_bytes: usize, mode: redb::ConcurrencyMode) -> redb::Builder {
    let mut b = redb::Database::builder();
    b.set_cache_size(cache_size_bytes);
    b.set_concurrency_mode(mode);
    b
}

fn init_schema(db: &redb::Database) -> Result<()> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
        meta.insert(META_NEXT_ID, 1u64.to_le_bytes().as_slice())?;
        txn.open_table(schema::TOPICS)?;
        txn.open_table(schema::LOG)?;
        txn.open_table(schema::LOG_TIME)?;
        txn.open_table(schema::GROUPS)?;
        txn.open_table(schema::QUEUES)?;
        txn.open_table(schema::QUEUE_ENTRIES)?;
        txn.open_table(schema::QUEUE_READY)?;
        txn.open_table(schema::QUEUE_TIMERS)?;
        txn.open_table(schema::QUEUE_FIFO)?;
        txn.open_table(schema::BINDINGS)?;
        txn.open_table(schema::OUTBOX)?;
        txn.open_table(schema::OUTBOX_PARKED)?;
        txn.open_table(schema::DEDUP)?;
        txn.open_table(schema::DEDUP_EXPIRY)?;
    }
    txn.commit()?;
    Ok(())
}

/// Brings a file of an older format (checked by [`check_format`]) to [`FORMAT_VERSION`]: format
/// 1 lacks the FIFO lane's table; formats 1 and 2 hold record batches of layout 1 only, which
/// stay as they are (both layouts are read). Older builds then refuse the file rather than
/// miss the lane or meet a dense batch.
fn upgrade_format(db: &redb::Database) -> Result<()> {
    let found = {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        match meta.get(META_FORMAT)? {
            Some(v) => codec::decode_u32(v.value(), "meta format_version")?,
            None => FORMAT_VERSION,
        }
    };
    if found >= FORMAT_VERSION {
        return Ok(());
    }
    let txn = db.begin_write()?;
    txn.open_table(schema::QUEUE_FIFO)?;
    txn.open_table(META)?
        .insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
    txn.commit()?;
    tracing::info!(target: "mqlite::store", from = found, to = FORMAT_VERSION, "upgraded the file format");
    Ok(())
}

/// How a file's bytes reach redb.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Layout {
    /// redb's file as it is.
    Plain,
    /// redb's file behind the write-ahead journal (see `journal`).
    Journaled,
}

/// Whether `head` starts with redb's magic: a plain file.
fn starts_as_redb(head: &[u8]) -> bool {
    const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
    head.starts_with(&REDB_MAGIC)
}

/// Tells a plain redb file from a journaled one by its first bytes, before redb reads it;
/// refuses any other file.
pub(crate) fn check_magic(path: &Path) -> Result<Layout> {
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::NotMqliteFile {
            path: path.to_path_buf(),
            reason: "no such file".into(),
        },
        _ => Error::Io(e),
    })?;
    let mut head = Vec::with_capacity(journal::DETECT_LEN);
    file.take(journal::DETECT_LEN as u64)
        .read_to_end(&mut head)?;
    if starts_as_redb(&head) {
        Ok(Layout::Plain)
    } else if journal::is_journaled(&head) {
        Ok(Layout::Journaled)
    } else {
        Err(Error::NotMqliteFile {
            path: path.to_path_buf(),
            reason: "no redb header".into(),
        })
    }
}

pub(crate) fn check_format(txn: &redb::ReadTransaction, path: Option<&Path>) -> Result<()> {
    let not_ours = |reason: &str| Error::NotMqliteFile {
        path: path.map_or_else(|| PathBuf::from("<backend>"), Path::to_path_buf),
        reason: reason.to_owned(),
    };
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(not_ours("a redb file without mqlite's meta table"));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(version) = meta.get(META_FORMAT)? else {
        return Err(not_ours("the meta table has no format version"));
    };
    let found = codec::decode_u32(version.value(), "meta format_version")?;
    if found > FORMAT_VERSION {
        return Err(Error::FormatTooNew {
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}

/// Wakes waiting consumers after a commit, or when a manual clock moves.
#[derive(Default)]
pub(crate) struct Notifier {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Notifier {
    pub(crate) fn notify(&self) {
        *self.generation.lock() += 1;
        self.changed.notify_all();
    }

    pub(crate) fn generation(&self) -> u64 {
        *self.generation.lock()
    }

    /// Waits until the generation moves past `seen` or `until` passes.
    pub(crate) fn wait(&self, seen: u64, until: Instant) {
        let mut generation = self.generation.lock();
        while *generation == seen {
            if self.changed.wait_until(&mut generation, until).timed_out() {
                break;
            }
        }
    }
}

impl Wake for Notifier {
    fn wake(self: Arc<Self>) {
        self.notify();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

/// State shared by every clone of a [`Database`].
pub(crate) struct Shared {
    /// The redb handle, reopened after a storage failure.
    pub(crate) store: Store,
    pub(crate) limits: Limits,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) durability: Durability,
    pub(crate) notifier: Arc<Notifier>,
    /// `notifier.notify()`, for the journal to run once a publishing commit is durable.
    wake_early: crate::journal::Hook,
    /// Other processes may commit to the file: waits also poll.
    pub(crate) shares_file: bool,
    /// Relaxed commits not yet made durable.
    dirty: AtomicBool,
    /// Coalesces concurrent durable writes into one transaction and one fsync.
    pub(crate) group: GroupCommit,
    /// Commit counters for [`Database::metrics`].
    pub(crate) counters: Counters,
    pub(crate) opened: Instant,
}

impl Shared {
    pub(crate) fn commit(&self, txn: WriteTransaction<'_>, durability: Durability) -> Result<()> {
        if let Some(e) = txn.broken() {
            return Err(e);
        }
        txn.write_appends()?;
        crate::queue::write_unwritten(&txn)?;
        let published = txn.published();
        let (mut txn, _) = txn.into_inner();
        let relaxed = durability == Durability::Relaxed;
        txn.set_durability(if relaxed {
            redb::Durability::None
        } else {
            redb::Durability::Immediate
        })?;
        if published && !relaxed {
            // Waiting consumers start waking while redb finishes the commit.
            self.store.commit_telling(txn, self.wake_early.clone())?;
        } else if relaxed {
            self.store.commit(txn)?;
        } else {
            self.store.commit_durable(txn)?;
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        if relaxed {
            self.dirty.store(true, Ordering::Release);
        } else {
            self.counters.syncs.fetch_add(1, Ordering::Relaxed);
            self.dirty.store(false, Ordering::Release);
        }
        if published {
            self.notifier.notify();
        }
        Ok(())
    }

    /// An empty durable commit: redb's header then names the newest relaxed commit. Its fsync
    /// runs after redb's write lock is released, so relaxed writers never wait for it.
    fn flush(&self) -> Result<()> {
        let txn = self.store.begin_write()?;
        self.dirty.store(false, Ordering::Release);
        self.store.commit_then_sync(txn)?;
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(target: "mqlite::commit", "flushed relaxed commits");
        Ok(())
    }
}

/// Lives as long as the user's handles: the last one to drop stops and joins the flusher
/// before the shared state goes, so that the file is closed (and a reopen can follow) on the
/// thread that dropped it, never later on the flusher's.
#[derive(Default)]
pub(crate) struct Handles {
    flusher: Mutex<Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>>,
}

impl Drop for Handles {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.flusher.lock().take() {
            drop(stop);
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Acquire) {
            // Best effort on a clean close; an error here has no one to report to, and the
            // commits it would have made durable are still durable against a process crash.
            let _ = self.flush();
        }
    }
}

fn spawn_flusher(
    shared: &Arc<Shared>,
    interval_ms: u64,
) -> Result<(crossbeam_channel::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let interval = Duration::from_millis(interval_ms);
    let handle = std::thread::Builder::new()
        .name("mqlite-flusher".into())
        .spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(interval)
            {
                let Some(shared) = weak.upgrade() else { break };
                if shared.dirty.load(Ordering::Acquire) {
                    // A failed flush leaves `dirty` set; the next tick tries again.
                    if shared.flush().is_err() {
                        shared.dirty.store(true, Ordering::Release);
                    }
                }
            }
        })?;
    Ok((stop, handle))
}

/// An open mqlite database: one file holding topics, queues, the outbox, dedup entries and the
/// application's own tables.
///
/// Cloning is cheap and shares the same open file; the file closes when the last clone drops.
/// All methods are safe to call from many threads.
///
/// # Examples
///
/// ```
/// use mqlite::{Database, Message, StartAt, TopicConfig};
/// let db = Database::in_memory()?;
/// db.write(|txn| {
///     txn.create_topic("events", TopicConfig::default())?;
///     txn.publish("events", &Message::new("hello"))
/// })?;
/// let mut consumer = db.consumer("events", "audit", StartAt::Earliest)?;
/// let records = consumer.poll(10, std::time::Duration::ZERO)?;
/// assert_eq!(records[0].message.payload, b"hello");
/// consumer.commit()?;
/// # Ok::<(), mqlite::Error>(())
/// ```
#[derive(Clone)]
pub struct Database {
    // Dropped first: see `Handles`.
    _handles: Arc<Handles>,
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("durability", &self.shared.durability)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Opens (creating if missing) the database file at `path` with default options.
    ///
    /// # Errors
    ///
    /// As [`Builder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Database> {
        Builder::default().open(path)
    }

    /// A [`Builder`] with every option at its default.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A database in memory, with default options; for tests and examples.
    ///
    /// # Errors
    ///
    /// Storage errors only.
    pub fn in_memory() -> Result<Database> {
        Builder::default().open_in_memory()
    }

    /// Runs `f` in a write transaction and commits it with the database's default
    /// durability. Everything `f` does through the transaction (domain tables, publishes,
    /// enqueues, acks, offsets, outbox, dedup) commits together; if `f` returns an error,
    /// none of it does and the error is returned.
    ///
    /// Concurrent durable writes are coalesced (group commit): the callers that arrive while a
    /// commit is in flight share the next transaction and its single fsync, each running its
    /// own closure on its own thread (or, with [`Database::write_send`], on the thread that
    /// leads the commit), in arrival order. If one closure fails, the shared
    /// transaction is rebuilt without it, so `f` may be run more than once: it must not have
    /// effects outside the transaction, and slow work belongs outside it. The caller whose
    /// closure failed gets its own error; the others commit.
    ///
    /// `f` must not call `write`, `receive`, `consumer` or a consumer's `commit` on the same
    /// database: those need the write transaction that `f` is holding, and would wait forever.
    /// Use the transaction's own methods (`txn.receive`, `txn.commit_offset`) instead.
    ///
    /// # Errors
    ///
    /// `f`'s own error, or an [`Error`] from beginning or committing: [`Error::StorageFull`],
    /// [`Error::Io`] and the like mean the commit did not happen and nothing already committed
    /// was lost.
    pub fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        self.write_with(self.shared.durability, f)
    }

    /// [`Database::write`] for a closure that is `Send` and owns what it captures: under
    /// contention, the thread leading the group commit runs it itself instead of waking this
    /// thread to run it, which saves two thread switches per writer. With many threads each
    /// making small durable writes, that is most of the cost of a commit besides its fsync.
    /// Everything else, the re-runs included, is as [`Database::write`].
    ///
    /// # Errors
    ///
    /// As [`Database::write`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// let db = Arc::new(mqlite::Database::in_memory()?);
    /// db.write(|txn| txn.create_topic("events", Default::default()))?;
    /// let workers: Vec<_> = (0..4)
    ///     .map(|i| {
    ///         let db = db.clone();
    ///         std::thread::spawn(move || {
    ///             let message = mqlite::Message::new(format!("from {i}"));
    ///             db.write_send(move |txn| txn.publish("events", &message))
    ///         })
    ///     })
    ///     .collect();
    /// for worker in workers {
    ///     worker.join().expect("worker")?;
    /// }
    /// assert_eq!(db.read(|r| r.topic_info("events"))?.len(), 4);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn write_send<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        if self.shared.durability == Durability::Immediate {
            return self.shared.group.write_send(&self.shared, f);
        }
        self.write_with(self.shared.durability, &mut f)
    }

    /// [`Database::write`] with an explicit durability for this commit.
    ///
    /// # Errors
    ///
    /// As [`Database::write`].
    pub fn write_with<T, E, F>(&self, durability: Durability, mut f: F) -> Result<T, E>
    where
        F: FnMut(&WriteTransaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        if durability == Durability::Immediate {
            return self.shared.group.write(&self.shared, &mut f);
        }
        let redb_txn = self.shared.store.begin_write()?;
        let txn = WriteTransaction::new(redb_txn, self.shared.clone());
        let value = f(&txn)?;
        self.shared.commit(txn, durability)?;
        self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }

    /// Runs `f` once in a transaction of its own, outside group commit (which may run a
    /// closure twice), and commits it durably. For work that consumes its input as it goes.
    pub(crate) fn write_alone<T>(
        &self,
        f: impl FnOnce(&WriteTransaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let txn = WriteTransaction::new(self.shared.store.begin_write()?, self.shared.clone());
        let value = f(&txn)?;
        self.shared.commit(txn, Durability::Immediate)?;
        self.shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }

    /// Runs `f` on a consistent snapshot.
    ///
    /// # Errors
    ///
    /// `f`'s own error, or an error beginning the snapshot.
    pub fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&ReadTransaction) -> Result<T, E>,
        E: From<Error>,
    {
        f(&self.begin_read()?)
    }

    /// Begins a snapshot that lives until dropped. A long-lived snapshot keeps the pages it
    /// sees from being reused, so the file grows while it is open.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(ReadTransaction::new(self.shared.store.begin_read()?))
    }

    /// Makes every commit so far durable (fsync). Needed only with [`Durability::Relaxed`].
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }

    /// Applies every topic's retention, in transactions of at most 1024 removed messages each
    /// (never one giant transaction). Publishing applies the bounds too, but only to the topic
    /// published to and in a small step; call this periodically for age bounds on quiet topics
    /// and for backlogs after a bound was lowered.
    ///
    /// # Errors
    ///
    /// Storage errors; the batches committed before the error stay committed.
    pub fn enforce_retention(&self) -> Result<RetentionReport> {
        let names: Vec<String> = self
            .read(|r| r.topics())?
            .into_iter()
            .map(|t| t.name)
            .collect();
        let mut report = RetentionReport::default();
        for name in names {
            loop {
                let removed = self.write(|txn| {
                    let mut topics = txn.table(schema::TOPICS)?;
                    let mut record = match crate::topic::load(&topics, &name) {
                        Ok(r) => r,
                        Err(Error::UnknownTopic { .. }) => return Ok(0),
                        Err(e) => return Err(e),
                    };
                    let removed = trim(txn, &mut record, RETENTION_BATCH, txn.now_ms())?;
                    if removed > 0 {
                        topics.insert(name.as_str(), codec::encode_topic(&record).as_slice())?;
                    }
                    Ok::<_, Error>(removed)
                })?;
                report.transactions += 1;
                report.removed += removed;
                if removed > 0 {
                    tracing::debug!(target: "mqlite::retention", topic = %name, removed, "retention removed messages");
                }
                if removed < RETENTION_BATCH {
                    break;
                }
            }
        }
        Ok(report)
    }

    /// A counter that moves every time a commit in this process makes something new to
    /// consume (a publish, an enqueue, a requeue, an outbox row). Pair it with
    /// [`Database::wait_for_commit`] to wait without missing a commit.
    pub fn commit_generation(&self) -> u64 {
        self.shared.notifier.generation()
    }

    /// Blocks until [`Database::commit_generation`] moves past `seen` or `timeout` passes;
    /// returns whether it moved. Commits of other processes do not move it.
    ///
    /// # Examples
    ///
    /// ```
    /// let db = mqlite::Database::in_memory()?;
    /// let seen = db.commit_generation();
    /// db.write(|txn| txn.outbox_put("x", &mqlite::Message::new("m")))?;
    /// assert!(db.wait_for_commit(seen, std::time::Duration::ZERO));
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn wait_for_commit(&self, seen: u64, timeout: Duration) -> bool {
        self.shared.notifier.wait(seen, Instant::now() + timeout);
        self.shared.notifier.generation() != seen
    }

    /// The database clock's current time in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// Calls `attempt` until it yields a value or `timeout` passes, sleeping between attempts
    /// until a commit in this process (or a manual clock move) wakes it, or until the clock
    /// time `attempt` reports as the next moment something comes due.
    pub(crate) fn wait_for<T>(
        &self,
        timeout: Duration,
        mut attempt: impl FnMut() -> Result<(Option<T>, Option<u64>)>,
    ) -> Result<Option<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.shared.notifier.generation();
            let (value, next_due_ms) = attempt()?;
            if value.is_some() {
                return Ok(value);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut until = deadline;
            if let Some(due) = next_due_ms {
                let wait_ms = due.saturating_sub(self.shared.clock.now_ms()).max(1);
                until = until.min(now + Duration::from_millis(wait_ms));
            }
            if self.shared.shares_file {
                // Another process's commit does not reach this notifier: look again soon.
                until = until.min(now + Duration::from_millis(2));
            }
            self.shared.notifier.wait(seen, until);
        }
    }
}
