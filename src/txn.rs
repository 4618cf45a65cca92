//! The transactions users see: [`WriteTransaction`] and [`ReadTransaction`].

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Key, ReadableTable, TableDefinition, TableHandle, Value};

use crate::codec;
use crate::commit::copy_error;
use crate::db::Shared;
use crate::error::{Error, Result};
use crate::queue::{self, QueueInfo};
use crate::routing::{self, BindingInfo};
use crate::schema::{
    BINDINGS, GROUPS, LOG, LOG_TIME, META_NEXT_ID, QUEUE_ENTRIES, QUEUE_FIFO, QUEUES,
    RESERVED_PREFIX, TOPICS,
};
use crate::topic::{self, GroupInfo, Record, StartAt, TopicInfo};

/// One write transaction: everything done through it commits together, or not at all.
///
/// Given to the closure of [`Database::write`](crate::Database::write). Besides topics, queues,
/// the outbox and dedup, it opens the application's own redb tables
/// ([`WriteTransaction::open_table`]), so a domain write and the messages about it land in one
/// commit. Every method takes `&self`, so a user table may stay open while publishing.
pub struct WriteTransaction<'db> {
    pub(crate) txn: redb::WriteTransaction,
    pub(crate) shared: Arc<Shared>,
    now_ms: u64,
    published: AtomicBool,
    /// Queue state held back until commit (see [`queue::Unwritten`]).
    pub(crate) unwritten: parking_lot::Mutex<queue::Unwritten>,
    /// Topic appends held back until commit or a read of the log (see [`topic::Unwritten`]).
    pub(crate) appends: parking_lot::Mutex<topic::Unwritten>,
    /// The error of an operation that failed part-way, having changed the transaction: it
    /// can no longer commit (see [`WriteTransaction::broken`]).
    broken: parking_lot::Mutex<Option<Error>>,
    /// The bindings of the topics published to, by topic id, loaded once per transaction
    /// (see [`routing::Router::of`]); emptied whenever the bindings table is opened.
    pub(crate) routers: parking_lot::Mutex<Vec<(u64, Arc<routing::Router>)>>,
    /// Ties the transaction to a borrow of its database in the public signature; group commit
    /// shares one transaction between threads, so it owns its handle.
    _database: PhantomData<&'db Shared>,
}

impl<'db> WriteTransaction<'db> {
    pub(crate) fn new(txn: redb::WriteTransaction, shared: Arc<Shared>) -> Self {
        WriteTransaction {
            txn,
            now_ms: shared.clock.now_ms(),
            shared,
            published: AtomicBool::new(false),
            unwritten: parking_lot::Mutex::default(),
            appends: parking_lot::Mutex::default(),
            broken: parking_lot::Mutex::default(),
            routers: parking_lot::Mutex::default(),
            _database: PhantomData,
        }
    }

    /// Records that an operation failed after it had changed the transaction: committing
    /// would store half of it, so the commit fails with this error instead.
    pub(crate) fn break_with(&self, e: &Error) {
        self.broken.lock().get_or_insert_with(|| copy_error(e));
    }

    /// The error that broke the transaction, if an operation did.
    pub(crate) fn broken(&self) -> Option<Error> {
        self.broken.lock().as_ref().map(copy_error)
    }

    /// Opens (creating if needed) one of the application's own tables in this transaction.
    ///
    /// # Errors
    ///
    /// [`Error::ReservedTableName`] for a name starting with `mqlite_`; storage errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::redb::TableDefinition;
    /// const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.open_table(ORDERS)?.insert(1, "pending")?;
    ///     Ok::<_, mqlite::Error>(())
    /// })?;
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn open_table<K: Key + 'static, V: Value + 'static>(
        &self,
        definition: TableDefinition<'_, K, V>,
    ) -> Result<redb::Table<'_, K, V>> {
        check_user_table(definition.name())?;
        self.table(definition)
    }

    /// The database clock's time when this transaction began, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The underlying redb transaction, for what [`WriteTransaction::open_table`] does not
    /// cover (multimap tables, deleting a table). Tables whose names start with `mqlite_`
    /// belong to mqlite: changing them voids every guarantee.
    pub fn redb(&self) -> &redb::WriteTransaction {
        &self.txn
    }

    pub(crate) fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        definition: TableDefinition<'_, K, V>,
    ) -> Result<redb::Table<'_, K, V>> {
        if definition.name() == LOG.name() || definition.name() == TOPICS.name() {
            self.write_appends()?;
        } else if definition.name() == QUEUES.name() {
            queue::write_held_records(self)?;
        } else if definition.name() == BINDINGS.name() {
            // Whoever opens it may change the bindings.
            self.routers.lock().clear();
        }
        Ok(self.txn.open_table(definition)?)
    }

    /// Writes the topic appends and records this transaction held back, for commit or for
    /// code that opens the log or the topics table.
    pub(crate) fn write_appends(&self) -> Result<()> {
        self.appends.lock().write(&self.txn)
    }

    /// Records that waiting consumers should look again after this commit.
    pub(crate) fn mark_published(&self) {
        self.published.store(true, Ordering::Relaxed);
    }

    pub(crate) fn published(&self) -> bool {
        self.published.load(Ordering::Relaxed)
    }

    /// Allocates an id for a topic or queue; ids are never reused.
    pub(crate) fn next_id(&self) -> Result<u64> {
        self.next_counter(META_NEXT_ID)
    }

    /// The queues' FIFO lanes (a writable open has upgraded any older file to have them).
    pub(crate) fn fifo_table(&self) -> Result<Option<queue::Lanes<'_>>> {
        Ok(Some(self.table(QUEUE_FIFO)?))
    }

    /// Writes what this transaction held back from the queue tables, for a read of them.
    fn complete_queues(&self) -> Result<()> {
        queue::write_unwritten(self)
    }

    pub(crate) fn into_inner(self) -> (redb::WriteTransaction, Arc<Shared>) {
        (self.txn, self.shared)
    }
}

fn check_user_table(name: &str) -> Result<()> {
    if name.starts_with(RESERVED_PREFIX) {
        return Err(Error::ReservedTableName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// A consistent snapshot of the database: it sees every commit made before it began and none
/// after. Readers never block writers, and writers never block readers.
pub struct ReadTransaction {
    txn: redb::ReadTransaction,
}

impl ReadTransaction {
    pub(crate) fn new(txn: redb::ReadTransaction) -> Self {
        ReadTransaction { txn }
    }

    /// Opens one of the application's own tables in this snapshot.
    ///
    /// # Errors
    ///
    /// [`Error::ReservedTableName`]; [`Error::Storage`] when the table does not exist.
    pub fn open_table<K: Key + 'static, V: Value + 'static>(
        &self,
        definition: TableDefinition<'_, K, V>,
    ) -> Result<redb::ReadOnlyTable<K, V>> {
        check_user_table(definition.name())?;
        self.table(definition)
    }

    /// The underlying redb snapshot.
    pub fn redb(&self) -> &redb::ReadTransaction {
        &self.txn
    }

    pub(crate) fn table<K: Key + 'static, V: Value + 'static>(
        &self,
        definition: TableDefinition<'_, K, V>,
    ) -> Result<redb::ReadOnlyTable<K, V>> {
        Ok(self.txn.open_table(definition)?)
    }

    /// The queues' FIFO lanes; `None` in a format-1 file opened read-only (it has none).
    pub(crate) fn fifo_table(&self) -> Result<Option<queue::LanesSnapshot>> {
        match self.txn.open_table(QUEUE_FIFO) {
            Ok(table) => Ok(Some(table)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A snapshot's queue tables are always complete (see [`queue::Unwritten`]).
    fn complete_queues(&self) -> Result<()> {
        Ok(())
    }

    /// [`ReadTransaction::read_topic`] for a reader that reads on from where it stopped, and
    /// keeps `cursor` between its reads.
    pub(crate) fn read_topic_on(
        &self,
        topic: &str,
        from: u64,
        max: usize,
        cursor: &mut Option<topic::LogCursor>,
    ) -> Result<Vec<Record>> {
        let record = topic::load(&self.table(TOPICS)?, topic)?;
        topic::read_records(&self.table(LOG)?, &record, from, max, Some(cursor))
    }
}

/// The read methods both transactions share, written once.
macro_rules! reads {
    ($ty:ty) => {
        impl $ty {
            /// A topic's configuration and extent.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownTopic`].
            pub fn topic_info(&self, topic: &str) -> Result<TopicInfo> {
                Ok(topic::info(
                    topic,
                    &topic::load(&self.table(TOPICS)?, topic)?,
                ))
            }

            /// Every topic, by name.
            ///
            /// # Errors
            ///
            /// Storage errors, [`Error::Corrupted`].
            pub fn topics(&self) -> Result<Vec<TopicInfo>> {
                let mut out = Vec::new();
                for entry in self.table(TOPICS)?.iter()? {
                    let (name, value) = entry?;
                    out.push(topic::info(
                        name.value(),
                        &codec::decode_topic(value.value())?,
                    ));
                }
                Ok(out)
            }

            /// Reads up to `max` messages of a topic from offset `from` on. An offset below
            /// the oldest stored one reads from the oldest; past the end reads nothing.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownTopic`], [`Error::Corrupted`] for a record that fails its
            /// checksum (the bytes are not returned).
            pub fn read_topic(&self, topic: &str, from: u64, max: usize) -> Result<Vec<Record>> {
                let record = topic::load(&self.table(TOPICS)?, topic)?;
                topic::read_records(&self.table(LOG)?, &record, from, max, None)
            }

            /// The offset a group created now at `start` would begin at.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownTopic`].
            pub fn resolve_start(&self, topic: &str, start: StartAt) -> Result<u64> {
                let record = topic::load(&self.table(TOPICS)?, topic)?;
                topic::resolve_start(&self.table(LOG_TIME)?, &record, start)
            }

            /// A consumer group's committed offset and lag.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownTopic`], [`Error::UnknownGroup`].
            pub fn group_info(&self, topic: &str, group: &str) -> Result<GroupInfo> {
                let record = topic::load(&self.table(TOPICS)?, topic)?;
                match self.table(GROUPS)?.get((record.id, group))? {
                    Some(v) => Ok(topic::group_info(&record, group, v.value())),
                    None => Err(Error::UnknownGroup {
                        topic: topic.to_owned(),
                        group: group.to_owned(),
                    }),
                }
            }

            /// Every consumer group of a topic, by name.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownTopic`].
            pub fn groups(&self, topic: &str) -> Result<Vec<GroupInfo>> {
                let record = topic::load(&self.table(TOPICS)?, topic)?;
                let mut out = Vec::new();
                let id = record.id;
                for entry in self.table(GROUPS)?.range((id, "")..(id + 1, ""))? {
                    let (key, value) = entry?;
                    out.push(topic::group_info(&record, key.value().1, value.value()));
                }
                Ok(out)
            }

            /// A queue's configuration and counts.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownQueue`].
            pub fn queue_info(&self, queue: &str) -> Result<QueueInfo> {
                self.complete_queues()?;
                let record = queue::load(&self.table(QUEUES)?, queue)?;
                let fifo = self.fifo_table()?;
                queue::info(&self.table(QUEUE_ENTRIES)?, fifo.as_ref(), queue, &record)
            }

            /// Every queue, by name.
            ///
            /// # Errors
            ///
            /// Storage errors, [`Error::Corrupted`].
            pub fn queues(&self) -> Result<Vec<QueueInfo>> {
                self.complete_queues()?;
                let entries = self.table(QUEUE_ENTRIES)?;
                let fifo = self.fifo_table()?;
                let mut out = Vec::new();
                for entry in self.table(QUEUES)?.iter()? {
                    let (name, value) = entry?;
                    let record = codec::decode_queue(value.value())?;
                    out.push(queue::info(&entries, fifo.as_ref(), name.value(), &record)?);
                }
                Ok(out)
            }

            /// The bindings of a topic, in the order they were made.
            ///
            /// # Errors
            ///
            /// [`Error::UnknownTopic`].
            pub fn bindings(&self, topic: &str) -> Result<Vec<BindingInfo>> {
                let record = topic::load(&self.table(TOPICS)?, topic)?;
                routing::list(&self.table(BINDINGS)?, topic, record.id)
            }
        }
    };
}

reads!(ReadTransaction);
reads!(WriteTransaction<'_>);
