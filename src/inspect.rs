//! Looking at a database from outside the application: metrics snapshots, read-only handles
//! on a file another process writes, the deep check, and compaction.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::codec::{self, EntryState};
use crate::db::{Builder, Database};
use crate::error::{Error, Result, guard_damage};
use crate::outbox::OutboxInfo;
use crate::queue::QueueInfo;
use crate::schema::{
    BINDINGS, DEDUP, LOG, META, META_FORMAT, OUTBOX, OUTBOX_PARKED, QUEUE_ENTRIES, QUEUES, TOPICS,
};
use crate::topic::{GroupInfo, TopicInfo};
use crate::txn::ReadTransaction;

/// Counters of one open [`Database`], kept since it opened.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) commits: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) syncs: AtomicU64,
}

/// How this process has been committing, since the database opened.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommitMetrics {
    /// redb transactions committed.
    pub commits: u64,
    /// `write` calls committed; above `commits` when group commit coalesced them.
    pub writes: u64,
    /// Commits made durable with an fsync (durable commits and flushes).
    pub syncs: u64,
    /// Milliseconds since the database opened.
    pub uptime_ms: u64,
    /// `commits` per second over the uptime. Diff two snapshots for a recent rate.
    pub commits_per_second: f64,
}

/// A topic's extent and its consumer groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicMetrics {
    /// Configuration and extent.
    pub info: TopicInfo,
    /// Timestamp of the oldest stored message, if any (milliseconds).
    pub oldest_ms: Option<u64>,
    /// Timestamp of the newest stored message, if any (milliseconds).
    pub newest_ms: Option<u64>,
    /// Every group with its committed offset and lag.
    pub groups: Vec<GroupInfo>,
}

/// A snapshot of what a database holds and how it is moving: depths, lag, outbox backlog and
/// commit rate. [`Database::metrics`] takes one; `mqlite info` prints one.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// The clock time of the snapshot (milliseconds).
    pub at_ms: u64,
    /// Every topic, by name.
    pub topics: Vec<TopicMetrics>,
    /// Every queue, by name, with its depths.
    pub queues: Vec<QueueInfo>,
    /// The outbox backlog, parked rows and last error.
    pub outbox: OutboxInfo,
    /// Dedup entries stored (expired ones included until removed).
    pub dedup_entries: u64,
    /// This process's commits; zero for a read-only handle.
    pub commits: CommitMetrics,
}

impl ReadTransaction {
    /// Depths, lag, outbox backlog and dedup entries as of this snapshot (commit counters
    /// are zero: they belong to a [`Database`] handle, see [`Database::metrics`]).
    ///
    /// # Errors
    ///
    /// Storage errors, [`Error::Corrupted`].
    pub fn metrics(&self, at_ms: u64) -> Result<Metrics> {
        let mut topics = Vec::new();
        for info in self.topics()? {
            let groups = self.groups(&info.name)?;
            let stamp = |offset: u64| -> Result<Option<u64>> {
                Ok(self
                    .read_topic(&info.name, offset, 1)?
                    .first()
                    .map(|r| r.message.timestamp_ms))
            };
            let (oldest_ms, newest_ms) = if info.is_empty() {
                (None, None)
            } else {
                (stamp(info.first_offset)?, stamp(info.next_offset - 1)?)
            };
            topics.push(TopicMetrics {
                info,
                oldest_ms,
                newest_ms,
                groups,
            });
        }
        Ok(Metrics {
            at_ms,
            topics,
            queues: self.queues()?,
            outbox: self.outbox_info()?,
            dedup_entries: self.table(DEDUP)?.len()?,
            commits: CommitMetrics::default(),
        })
    }

    /// The file's format version (see `docs/format.md`).
    ///
    /// # Errors
    ///
    /// Storage errors, [`Error::Corrupted`].
    pub fn format_version(&self) -> Result<u32> {
        match self.table(META)?.get(META_FORMAT)? {
            Some(v) => codec::decode_u32(v.value(), "meta format_version"),
            None => Err(Error::corrupted("the meta table has no format version")),
        }
    }

    /// Decodes every mqlite value (checksums included) and checks that the counts agree with
    /// what is stored. Returns what it found wrong, empty when all is well; `progress` is
    /// called with the values checked so far, every 4096 values.
    fn verify(&self, progress: &mut dyn FnMut(u64)) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let mut tick = |report: &mut CheckReport| {
            report.values += 1;
            if report.values.is_multiple_of(4096) {
                progress(report.values);
            }
        };
        let problem = |report: &mut CheckReport, what: String| report.problems.push(what);
        for entry in self.table(TOPICS)?.iter()? {
            let (name, value) = entry?;
            let name = name.value().to_owned();
            tick(&mut report);
            let topic = match codec::decode_topic(value.value()) {
                Ok(t) => t,
                Err(e) => {
                    problem(&mut report, format!("topic {name:?}: {e}"));
                    continue;
                }
            };
            let mut expected = None;
            let mut bytes = 0;
            for batch in self
                .table(LOG)?
                .range((topic.id, 0)..=(topic.id, u64::MAX))?
            {
                let (key, value) = batch?;
                let base = key.value().1;
                tick(&mut report);
                bytes += value.value().len() as u64;
                match codec::decode_batch(value.value(), "topic log") {
                    Ok(messages) => {
                        report.messages += messages.len() as u64;
                        if expected.is_some_and(|e| e != base) {
                            problem(&mut report, format!("topic {name:?}: gap before {base}"));
                        }
                        expected = Some(base + messages.len() as u64);
                    }
                    Err(e) => problem(&mut report, format!("topic {name:?} batch {base}: {e}")),
                }
            }
            if let Some(end) = expected
                && end != topic.next_offset
            {
                problem(
                    &mut report,
                    format!(
                        "topic {name:?}: log ends at {end}, record says {}",
                        topic.next_offset
                    ),
                );
            }
            if bytes != topic.stored_bytes {
                problem(
                    &mut report,
                    format!(
                        "topic {name:?}: {bytes} bytes stored, record says {}",
                        topic.stored_bytes
                    ),
                );
            }
        }
        let entries = self.table(QUEUE_ENTRIES)?;
        let fifo = self.fifo_table()?;
        for entry in self.table(QUEUES)?.iter()? {
            let (name, value) = entry?;
            let name = name.value().to_owned();
            tick(&mut report);
            let queue = match codec::decode_queue(value.value()) {
                Ok(q) => q,
                Err(e) => {
                    problem(&mut report, format!("queue {name:?}: {e}"));
                    continue;
                }
            };
            let mut counts = [0u64; 3];
            for e in entries.range((queue.id, 0)..=(queue.id, u64::MAX))? {
                let (key, value) = e?;
                tick(&mut report);
                match codec::decode_entry(value.value()) {
                    Ok(e) => {
                        report.messages += 1;
                        counts[match e.state {
                            EntryState::Ready => 0,
                            EntryState::Delayed => 1,
                            EntryState::InFlight => 2,
                        }] += 1;
                    }
                    Err(e) => problem(
                        &mut report,
                        format!("queue {name:?} entry {}: {e}", key.value().1),
                    ),
                }
            }
            if let Some(fifo) = &fifo {
                match crate::queue::read_lane(fifo, queue.id, queue.fifo_head, usize::MAX) {
                    Ok(lane) => {
                        report.messages += lane.len() as u64;
                        counts[0] += lane.len() as u64;
                    }
                    Err(e) => problem(&mut report, format!("queue {name:?} FIFO lane: {e}")),
                }
            }
            if counts != [queue.ready, queue.delayed, queue.in_flight] {
                problem(
                    &mut report,
                    format!(
                        "queue {name:?}: entries ready/delayed/in flight {counts:?}, record says [{}, {}, {}]",
                        queue.ready, queue.delayed, queue.in_flight
                    ),
                );
            }
        }
        for entry in self.table(BINDINGS)?.iter()? {
            let (key, value) = entry?;
            tick(&mut report);
            if let Err(e) = codec::decode_binding(value.value()) {
                problem(&mut report, format!("binding {:?}: {e}", key.value()));
            }
        }
        for table in [OUTBOX, OUTBOX_PARKED] {
            for entry in self.table(table)?.iter()? {
                let (key, value) = entry?;
                tick(&mut report);
                match codec::decode_outbox(value.value()) {
                    Ok(_) => report.messages += 1,
                    Err(e) => problem(&mut report, format!("outbox row {}: {e}", key.value())),
                }
            }
        }
        Ok(report)
    }
}

impl Database {
    /// Depths, lag, outbox backlog, dedup entries, and this handle's commit counters.
    ///
    /// # Errors
    ///
    /// Storage errors, [`Error::Corrupted`].
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::{Message, QueueConfig};
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_queue("jobs", QueueConfig::default())?;
    ///     txn.enqueue("jobs", &Message::new("a"))
    /// })?;
    /// let m = db.metrics()?;
    /// assert_eq!(m.queues[0].ready, 1);
    /// assert!(m.commits.commits >= 1);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn metrics(&self) -> Result<Metrics> {
        let mut metrics = self.begin_read()?.metrics(self.now_ms())?;
        let c = &self.shared.counters;
        let uptime = self.shared.opened.elapsed();
        let commits = c.commits.load(Ordering::Relaxed);
        metrics.commits = CommitMetrics {
            commits,
            writes: c.writes.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            uptime_ms: u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX),
            commits_per_second: commits as f64 / uptime.as_secs_f64().max(1e-3),
        };
        Ok(metrics)
    }

    /// Decodes every stored mqlite value, checksums included, and checks that topic extents
    /// and queue counts agree with what is stored (the application's own tables are not
    /// looked at). `progress` is called with the values checked so far.
    ///
    /// # Errors
    ///
    /// Storage errors. Problems found are in the report, not errors.
    ///
    /// # Examples
    ///
    /// ```
    /// let db = mqlite::Database::in_memory()?;
    /// assert!(db.verify(|_| {})?.problems.is_empty());
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<CheckReport> {
        self.begin_read()?.verify(&mut progress)
    }
}

/// What [`Builder::check`] or [`Database::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Whether redb's own integrity check found damage it repaired (only [`Builder::check`]).
    pub repaired: bool,
    /// Values decoded.
    pub values: u64,
    /// Messages found in topics, queues and the outbox.
    pub messages: u64,
    /// Everything found wrong; empty for a sound file.
    pub problems: Vec<String>,
}

/// What [`Builder::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// File size before, in bytes.
    pub bytes_before: u64,
    /// File size after, in bytes.
    pub bytes_after: u64,
}

/// A read-only handle on a database file, possibly open for writing in another process (see
/// [`Builder::open_read_only`]). Each snapshot sees the commits made before it began.
pub struct ReadOnlyDatabase {
    db: redb::ReadOnlyDatabase,
    path: PathBuf,
}

impl std::fmt::Debug for ReadOnlyDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlyDatabase")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ReadOnlyDatabase {
    /// Begins a snapshot of the latest commit.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(ReadTransaction::new(self.db.begin_read()?))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Builder {
    /// Opens an existing file read-only, in this builder's concurrency mode. With
    /// `SingleWriter` (or `MultiWriter`) it works while a writer in another process has the
    /// file open in the same mode and sees its commits; with the default `ExclusiveWriter`
    /// it works only while no writer has it open.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyOpen`] when a writer holds the file in a conflicting mode,
    /// [`Error::NeedsRecovery`] when its last writer did not close it (crashed),
    /// [`Error::NotMqliteFile`], [`Error::FormatTooNew`], [`Error::Io`].
    ///
    /// # Examples
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("app.mqlite");
    /// let mut builder = mqlite::Database::builder();
    /// builder.concurrency(mqlite::redb::ConcurrencyMode::SingleWriter);
    /// let app = builder.open(&path)?;
    /// let viewer = builder.open_read_only(&path)?;
    /// assert!(viewer.begin_read()?.topics()?.is_empty());
    /// # drop(app);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_read_only(&self, path: impl AsRef<Path>) -> Result<ReadOnlyDatabase> {
        let path = path.as_ref();
        guard_damage("open read-only", || self.open_read_only_file(path))
    }

    fn open_read_only_file(&self, path: &Path) -> Result<ReadOnlyDatabase> {
        let db = self.redb_open_read_only(path)?;
        crate::db::check_format(&db.begin_read()?, Some(path))?;
        Ok(ReadOnlyDatabase {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Checks a closed file: redb's integrity check (which repairs what it can, like a
    /// recovery after a crash), then [`Database::verify`]. Needs exclusive access.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyOpen`], [`Error::NotMqliteFile`], [`Error::Corrupted`] when redb finds
    /// damage it cannot repair; storage errors.
    ///
    /// # Examples
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("app.mqlite");
    /// drop(mqlite::Database::open(&path)?);
    /// let report = mqlite::Database::builder().check(&path, |_| {})?;
    /// assert!(report.problems.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check(&self, path: impl AsRef<Path>, progress: impl FnMut(u64)) -> Result<CheckReport> {
        let path = path.as_ref();
        guard_damage("check", || {
            let repaired = {
                let mut db = self.raw_open(path)?;
                !db.check_integrity().map_err(Error::from)?
            };
            let db = self.open(path)?;
            let mut report = db.verify(progress)?;
            report.repaired = repaired;
            Ok(report)
        })
    }

    /// Compacts a closed file: moves pages down and gives free space back to the file
    /// system. Needs exclusive access; readers of the file must wait until it is done.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyOpen`], [`Error::NotMqliteFile`]; storage errors (the file stays
    /// valid: compaction is transactional).
    ///
    /// # Examples
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("app.mqlite");
    /// drop(mqlite::Database::open(&path)?);
    /// let report = mqlite::Database::builder().compact(&path)?;
    /// assert!(report.bytes_after <= report.bytes_before);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn compact(&self, path: impl AsRef<Path>) -> Result<CompactReport> {
        let path = path.as_ref();
        let bytes_before = std::fs::metadata(path)?.len();
        guard_damage("compact", || {
            let mut db = self.raw_open(path)?;
            while db.compact().map_err(Error::from)? {}
            Ok(())
        })?;
        Ok(CompactReport {
            bytes_before,
            bytes_after: std::fs::metadata(path)?.len(),
        })
    }

    /// Opens an existing mqlite file as a plain redb database, after checking its format.
    fn raw_open(&self, path: &Path) -> Result<redb::Database> {
        if !path.exists() {
            return Err(Error::NotMqliteFile {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        drop(self.open(path)?);
        self.redb_open(path).map(|opened| opened.db)
    }
}
