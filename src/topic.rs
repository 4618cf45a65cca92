//! Topics (append-only logs with dense offsets), retention, and consumer groups.

use std::ops::Range;

use redb::{ReadableTable, Table};

use crate::codec::{self, TopicRecord};
use crate::error::{Error, Result};
use crate::message::{Message, MessageId, check_message};
use crate::payload::Payload;
use crate::schema::{GROUPS, LOG, LOG_TIME, TOPICS};
use crate::txn::WriteTransaction;
use crate::{names, routing};

/// How long a topic keeps its messages. Every bound that is set applies; the oldest messages go
/// first. The default keeps everything.
///
/// Every bound is applied at each publish to the topic, in a bounded step (at most twice the
/// messages published plus 64 removed), and by
/// [`Database::enforce_retention`](crate::Database::enforce_retention), which also covers topics
/// nobody publishes to (age) and backlogs left by a lowered bound. A topic with
/// `max_messages: Some(0)` keeps no log at all: it only routes to its bound queues (a pure
/// exchange).
///
/// # Examples
///
/// ```
/// use mqlite::Retention;
/// let week = Retention { max_age_ms: Some(7 * 24 * 3_600_000), ..Retention::default() };
/// let exchange = Retention::none();
/// assert_eq!(exchange.max_messages, Some(0));
/// # let _ = week;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Drop messages appended longer ago than this. `None`: no age bound.
    pub max_age_ms: Option<u64>,
    /// Keep at most this many messages. `Some(0)`: keep no log. `None`: no count bound.
    pub max_messages: Option<u64>,
    /// Keep at most this many stored bytes (encoded records). `None`: no size bound.
    pub max_bytes: Option<u64>,
    /// Drop messages once every consumer group of the topic has committed past them (interest
    /// retention, as JetStream's). A topic with no group keeps its messages.
    pub until_consumed: bool,
}

impl Retention {
    /// Keep no log: the topic only routes to the queues bound to it.
    pub fn none() -> Self {
        Retention {
            max_messages: Some(0),
            ..Retention::default()
        }
    }

    pub(crate) fn keeps_log(&self) -> bool {
        self.max_messages != Some(0)
    }
}

/// A topic's configuration.
///
/// # Examples
///
/// ```
/// use mqlite::{Retention, TopicConfig};
/// let config = TopicConfig::default().retention(Retention { max_messages: Some(1000), ..Default::default() });
/// # let _ = config;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicConfig {
    /// Retention bounds; by default the topic keeps everything.
    pub retention: Retention,
}

impl TopicConfig {
    /// Sets the retention bounds.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }
}

/// A topic's configuration and extent, as of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic name.
    pub name: String,
    /// Its configuration.
    pub config: TopicConfig,
    /// The oldest offset still stored (equals `next_offset` when the log is empty).
    pub first_offset: u64,
    /// The offset the next published message will get.
    pub next_offset: u64,
    /// Bytes of encoded records stored.
    pub stored_bytes: u64,
}

impl TopicInfo {
    /// Messages stored.
    pub fn len(&self) -> u64 {
        self.next_offset - self.first_offset
    }

    /// Whether the log holds no message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A message read from a topic, with its offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The message's offset in the topic.
    pub offset: u64,
    /// The message.
    pub message: Message,
}

/// Where a new consumer group starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// At the oldest message still stored.
    Earliest,
    /// After the newest message: only messages published from now on.
    Latest,
    /// At this offset (clamped to the stored range).
    Offset(u64),
    /// At the first message appended at or after this time (milliseconds since the epoch).
    Timestamp(u64),
}

/// A consumer group's position on a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group name.
    pub group: String,
    /// The committed offset: the next offset the group will read.
    pub committed: u64,
    /// Messages stored after the committed offset.
    pub lag: u64,
}

/// The outcome of one [`Database::enforce_retention`](crate::Database::enforce_retention) call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Messages removed.
    pub removed: u64,
    /// Transactions used (each removes at most one bounded batch).
    pub transactions: u64,
}

/// How many log records one retention step removes at most.
pub(crate) const RETENTION_BATCH: u64 = 1024;

pub(crate) fn load(
    topics: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<TopicRecord> {
    match topics.get(name)? {
        Some(value) => codec::decode_topic(value.value()),
        None => Err(Error::UnknownTopic {
            topic: name.to_owned(),
        }),
    }
}

pub(crate) fn info(name: &str, t: &TopicRecord) -> TopicInfo {
    TopicInfo {
        name: name.to_owned(),
        config: t.config,
        first_offset: t.first_offset,
        next_offset: t.next_offset,
        stored_bytes: t.stored_bytes,
    }
}

/// Where a reader of a topic stopped inside a record batch, for its next read (a
/// [`Consumer`](crate::Consumer) keeps one between polls).
pub(crate) struct LogCursor {
    topic: u64,
    /// The offset of the batch's next message.
    next: u64,
    batch: codec::BatchCursor,
}

impl std::fmt::Debug for LogCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCursor")
            .field("topic", &self.topic)
            .field("next", &self.next)
            .field("left", &self.batch.left())
            .finish()
    }
}

/// A read's result, to which a batch reader appends the messages of the batch at `base`.
///
/// Each record is built where it is kept: the slots for a batch's messages are made first,
/// then the reader fills in a plain message's id, time and payload. Built on the stack and
/// pushed, a 144-byte record went in by a call to `memcpy` whose wide loads stalled on the
/// narrow stores just made (store forwarding fails): that copy was a sixth of a topic read.
struct Records<'a> {
    out: &'a mut Vec<Record>,
    base: u64,
    /// The first slot not filled; the slots after it are dropped with the sink.
    next: usize,
}

impl<'a> Records<'a> {
    fn new(out: &'a mut Vec<Record>, base: u64) -> Self {
        let next = out.len();
        Records { out, base, next }
    }

    /// The next slot, made here if [`codec::Sink::expect`] did not make it.
    fn slot(&mut self) -> &mut Record {
        if self.next == self.out.len() {
            self.out.push(placeholder());
        }
        self.next += 1;
        &mut self.out[self.next - 1]
    }
}

/// A slot's content until the reader fills it in.
fn placeholder() -> Record {
    Record {
        offset: 0,
        message: Message {
            id: MessageId(0),
            key: None,
            routing_key: String::new(),
            headers: Vec::new(),
            payload: Payload::new(),
            timestamp_ms: 0,
        },
    }
}

impl codec::Sink for Records<'_> {
    #[inline]
    fn expect(&mut self, n: usize) {
        self.out.resize_with(self.next + n, placeholder);
    }

    #[inline]
    fn message(&mut self, i: usize, message: Message) {
        let offset = self.base + i as u64;
        *self.slot() = Record { offset, message };
    }

    #[inline]
    fn plain(&mut self, i: usize, plain: codec::Plain<'_>) {
        let offset = self.base + i as u64;
        let r = self.slot();
        r.offset = offset;
        r.message.id = plain.id;
        r.message.timestamp_ms = plain.timestamp_ms;
        r.message
            .payload
            .set_shared(plain.buf, plain.start, plain.end);
    }
}

impl Drop for Records<'_> {
    fn drop(&mut self) {
        // Slots a read that failed part way did not fill.
        self.out.truncate(self.next);
    }
}

/// Reads up to `max` records from `from` (clamped to the first stored offset). `cursor`, when
/// given, is where the reader's last read stopped, and is left where this one stops.
pub(crate) fn read_records(
    log: &impl ReadableTable<(u64, u64), &'static [u8]>,
    topic: &TopicRecord,
    from: u64,
    max: usize,
    mut cursor: Option<&mut Option<LogCursor>>,
) -> Result<Vec<Record>> {
    let mut start = from.max(topic.first_offset);
    let mut out = Vec::with_capacity(max.min(1024));
    if max == 0 || start >= topic.next_offset {
        return Ok(out);
    }
    // The batch the last read stopped in, when this one starts where it stopped (batches are
    // never rewritten: a retention run that removed it moved the first offset past it).
    let kept = cursor
        .as_deref_mut()
        .and_then(Option::take)
        .filter(|c| c.topic == topic.id && c.next == start);
    if let Some(mut kept) = kept {
        let base = kept.next;
        let n = kept.batch.read(max, Records::new(&mut out, base))?;
        kept.next += n as u64;
        start = kept.next;
        if kept.batch.left() > 0 {
            if let Some(cursor) = cursor {
                *cursor = Some(kept);
            }
            return Ok(out);
        }
        if out.len() == max || start >= topic.next_offset {
            return Ok(out);
        }
    }
    // The batch holding `start` begins at the last key at or before it.
    let first_key = match log.range((topic.id, 0)..=(topic.id, start))?.next_back() {
        Some(entry) => entry?.0.value().1,
        None => start,
    };
    // Batches follow each other without gap or overlap; a key that says otherwise is damage,
    // reported rather than read as wrong offsets.
    let corrupted = |what: String| Error::corrupted(format!("topic log: {what}"));
    let mut expected = None;
    for entry in log.range((topic.id, first_key)..(topic.id, topic.next_offset))? {
        let (key, value) = entry?;
        let base = key.value().1;
        match expected {
            Some(e) if base != e => {
                return Err(corrupted(format!("batch at {base} where {e} was expected")));
            }
            None if base > start => {
                return Err(corrupted(format!("no batch holds offset {start}")));
            }
            _ => {}
        }
        let skip = start.saturating_sub(base);
        let room = (max - out.len())
            .min(usize::try_from(topic.next_offset - base.max(start)).unwrap_or(usize::MAX));
        let (count, rest) = codec::decode_batch_keeping(
            value.value(),
            "topic log",
            usize::try_from(skip).unwrap_or(usize::MAX),
            room,
            cursor.is_some(),
            Records::new(&mut out, base),
        )?;
        if let (Some(batch), Some(cursor)) = (rest, cursor.as_deref_mut()) {
            *cursor = Some(LogCursor {
                topic: topic.id,
                next: base + (count - batch.left()) as u64,
                batch,
            });
        }
        if skip >= count as u64 {
            return Err(corrupted(format!(
                "the batch at {base} ends before {start}"
            )));
        }
        expected = Some(base + count as u64);
        if out.len() == max {
            return Ok(out);
        }
    }
    if expected.is_none_or(|e| e < topic.next_offset) {
        return Err(corrupted(format!(
            "records end before the topic's end {}",
            topic.next_offset
        )));
    }
    Ok(out)
}

/// The offset a new group starts at.
pub(crate) fn resolve_start(
    time: &impl ReadableTable<(u64, u64), u64>,
    topic: &TopicRecord,
    start: StartAt,
) -> Result<u64> {
    Ok(match start {
        StartAt::Earliest => topic.first_offset,
        StartAt::Latest => topic.next_offset,
        StartAt::Offset(offset) => offset.clamp(topic.first_offset, topic.next_offset),
        StartAt::Timestamp(ms) => match time.range((topic.id, ms)..=(topic.id, u64::MAX))?.next() {
            Some(entry) => entry?.1.value().max(topic.first_offset),
            None => topic.next_offset,
        },
    })
}

pub(crate) fn group_info(topic: &TopicRecord, group: &str, committed: u64) -> GroupInfo {
    GroupInfo {
        group: group.to_owned(),
        committed,
        lag: topic.next_offset - committed.clamp(topic.first_offset, topic.next_offset),
    }
}

impl WriteTransaction<'_> {
    /// Creates a topic.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad name, [`Error::TopicExists`] when it exists.
    ///
    /// # Examples
    ///
    /// ```
    /// # let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| txn.create_topic("orders", mqlite::TopicConfig::default()))?;
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        names::check("topic", name)?;
        let mut topics = self.table(TOPICS)?;
        if topics.get(name)?.is_some() {
            return Err(Error::TopicExists {
                topic: name.to_owned(),
            });
        }
        let record = TopicRecord {
            id: self.next_id()?,
            config,
            first_offset: 0,
            next_offset: 0,
            stored_bytes: 0,
            last_append_ms: 0,
            bindings: Some(0),
        };
        topics.insert(name, codec::encode_topic(&record).as_slice())?;
        Ok(())
    }

    /// Creates a topic unless one of that name exists; returns whether it created one. An
    /// existing topic keeps its configuration.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad name.
    pub fn ensure_topic(&self, name: &str, config: TopicConfig) -> Result<bool> {
        match self.create_topic(name, config) {
            Ok(()) => Ok(true),
            Err(Error::TopicExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Replaces a topic's configuration. Tightened retention applies from the next publish or
    /// [`Database::enforce_retention`](crate::Database::enforce_retention).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`].
    pub fn configure_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        let mut topics = self.table(TOPICS)?;
        let mut record = load(&topics, name)?;
        record.config = config;
        topics.insert(name, codec::encode_topic(&record).as_slice())?;
        Ok(())
    }

    /// Deletes a topic with its log, its consumer groups and its bindings. The work is
    /// proportional to the messages stored, all in this transaction.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`].
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let mut topics = self.table(TOPICS)?;
        let record = load(&topics, name)?;
        topics.remove(name)?;
        let id = record.id;
        self.table(LOG)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.table(LOG_TIME)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.table(GROUPS)?
            .retain_in((id, "")..(id + 1, ""), |_, _| false)?;
        routing::remove_topic_bindings(self, id)
    }

    /// Appends one message to a topic and routes it to the bound queues; returns its offset.
    ///
    /// A message with timestamp 0 gets the database clock's time. Publishes to a topic in one
    /// transaction share record batches, written at commit: a loop of `publish` stores the
    /// messages as one [`WriteTransaction::publish_batch`] would, and reads in the same
    /// transaction see them.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], [`Error::MessageTooLarge`], [`Error::LimitExceeded`] (headers),
    /// [`Error::InvalidRoutingKey`], [`Error::QueueFull`] from a bound queue that rejects,
    /// [`Error::InvalidConfig`] for an `x-priority` or `x-delay` header that is not a number
    /// on a message a binding routes. These are found before anything is written: the
    /// transaction is as it was, and the closure may handle the error and go on. One case
    /// is found only while routing: a message whose overflow from one bound queue fills
    /// another it also goes to (a dead-letter queue bound to the same topic). That error,
    /// and [`Error::Corrupted`] from a damaged batch that retention meets after the append,
    /// leave the transaction unable to commit; its commit returns the same error.
    ///
    /// # Examples
    ///
    /// ```
    /// # let db = mqlite::Database::in_memory()?;
    /// # db.write(|txn| txn.create_topic("orders", Default::default()))?;
    /// let offset = db.write(|txn| txn.publish("orders", &mqlite::Message::new("o-1")))?;
    /// assert_eq!(offset, 0);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn publish(&self, topic: &str, message: &Message) -> Result<u64> {
        Ok(self
            .publish_batch(topic, std::slice::from_ref(message))?
            .start)
    }

    /// Appends messages to a topic in order, routing each; returns their offsets. All or none
    /// are appended (with the rest of the transaction).
    ///
    /// # Errors
    ///
    /// As [`WriteTransaction::publish`], plus [`Error::LimitExceeded`] when the batch holds more
    /// than [`Builder::max_batch`](crate::Builder::max_batch) messages.
    pub fn publish_batch(&self, topic: &str, messages: &[Message]) -> Result<Range<u64>> {
        let limits = &self.shared.limits;
        if messages.len() > limits.max_batch {
            return Err(Error::LimitExceeded {
                limit: "batch size",
                value: messages.len() as u64,
                max: limits.max_batch as u64,
            });
        }
        for message in messages {
            check_message(message, limits)?;
        }
        let mut record = self.topic_record(topic)?;
        let start = record.next_offset;
        let now = self.now_ms();
        // Append time never goes backwards, so the time index stays sorted by offset even when
        // the clock steps back.
        let append_ms = now.max(record.last_append_ms);
        // Most topics have no bindings: then the bindings table is not even opened.
        let router = match record.bindings {
            Some(0) => None,
            _ => Some(routing::Router::of(self, record.id)?).filter(|r| !r.is_empty()),
        };
        if let Some(router) = &router {
            router.check(self, messages)?;
        }
        // From here on the transaction changes. What `Router::check` cannot foresee (an
        // overflow dead-lettered into a queue the message also goes to, filling it) and what
        // only a damaged log shows (in `trim`) fail part-way: the transaction cannot commit.
        let appended = (|| {
            if record.config.retention.keeps_log() {
                record.stored_bytes += self.appends.lock().push(record.id, start, messages, now);
                // The time index maps each append millisecond to its first offset; a publish
                // in the same millisecond as the last one has nothing to add.
                if !messages.is_empty() && append_ms != record.last_append_ms {
                    let mut time = self.table(LOG_TIME)?;
                    if time.get((record.id, append_ms))?.is_none() {
                        time.insert((record.id, append_ms), start)?;
                    }
                }
            } else {
                record.first_offset = start + messages.len() as u64;
            }
            record.next_offset = start + messages.len() as u64;
            record.last_append_ms = append_ms;
            if let Some(router) = &router {
                for message in messages {
                    router.route(self, &stamped(message, now))?;
                }
            }
            let budget = 2 * messages.len() as u64 + 64;
            trim(self, &mut record, budget, now)
        })();
        if let Err(e) = appended {
            self.break_with(&e);
            return Err(e);
        }
        let end = record.next_offset;
        self.appends.lock().keep_record(topic, record);
        self.mark_published();
        Ok(start..end)
    }

    /// A topic's record as this transaction last left it: from the records it holds back, or
    /// stored.
    fn topic_record(&self, topic: &str) -> Result<TopicRecord> {
        if let Some(record) = self.appends.lock().record(topic) {
            return Ok(record);
        }
        // Not through `table`: that would write the records held back, which is no help here.
        load(&self.txn.open_table(TOPICS)?, topic)
    }

    /// Commits a consumer group's offset: the next offset the group will read. Creates the
    /// group when it has none. Moving an offset backwards is allowed (a replay).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], [`Error::InvalidName`], [`Error::OffsetOutOfRange`] when
    /// `offset` is past the topic's next offset.
    pub fn commit_offset(&self, topic: &str, group: &str, offset: u64) -> Result<()> {
        names::check("group", group)?;
        let record = load(&self.table(TOPICS)?, topic)?;
        if offset > record.next_offset {
            return Err(Error::OffsetOutOfRange {
                topic: topic.to_owned(),
                offset,
                end: record.next_offset,
            });
        }
        self.table(GROUPS)?.insert((record.id, group), offset)?;
        Ok(())
    }

    /// Creates a consumer group at `start` unless it exists; returns its committed offset.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], [`Error::InvalidName`].
    pub fn create_group(&self, topic: &str, group: &str, start: StartAt) -> Result<u64> {
        names::check("group", group)?;
        let record = load(&self.table(TOPICS)?, topic)?;
        let mut groups = self.table(GROUPS)?;
        if let Some(offset) = groups.get((record.id, group))? {
            return Ok(offset.value());
        }
        let offset = resolve_start(&self.table(LOG_TIME)?, &record, start)?;
        groups.insert((record.id, group), offset)?;
        Ok(offset)
    }

    /// Deletes a consumer group; returns whether it existed.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`].
    pub fn delete_group(&self, topic: &str, group: &str) -> Result<bool> {
        let record = load(&self.table(TOPICS)?, topic)?;
        Ok(self.table(GROUPS)?.remove((record.id, group))?.is_some())
    }
}

fn stamped(message: &Message, now_ms: u64) -> std::borrow::Cow<'_, Message> {
    if message.timestamp_ms == 0 {
        std::borrow::Cow::Owned(message.clone().with_timestamp_ms(now_ms))
    } else {
        std::borrow::Cow::Borrowed(message)
    }
}

/// Removes up to `budget` of the oldest records that retention no longer allows; returns how
/// many it removed. The caller stores `record`.
pub(crate) fn trim(
    txn: &WriteTransaction<'_>,
    record: &mut TopicRecord,
    budget: u64,
    now_ms: u64,
) -> Result<u64> {
    let retention = record.config.retention;
    let mut keep_from = record.first_offset;
    if let Some(max) = retention.max_messages {
        keep_from = keep_from.max(record.next_offset.saturating_sub(max));
    }
    if retention.until_consumed {
        let groups = txn.table(GROUPS)?;
        let mut min: Option<u64> = None;
        for entry in groups.range((record.id, "")..(record.id + 1, ""))? {
            let (_, value) = entry?;
            min = Some(min.map_or(value.value(), |m| m.min(value.value())));
        }
        if let Some(min) = min {
            keep_from = keep_from.max(min.min(record.next_offset));
        }
    }
    if let Some(max_age) = retention.max_age_ms {
        let cutoff = now_ms.saturating_sub(max_age);
        // The first time-index entry at or after the cutoff starts what the age bound keeps.
        let keep = match txn
            .table(LOG_TIME)?
            .range((record.id, cutoff)..=(record.id, u64::MAX))?
            .next()
        {
            Some(entry) => entry?.1.value(),
            None => record.next_offset,
        };
        keep_from = keep_from.max(keep);
    }
    let over_bytes = retention
        .max_bytes
        .is_some_and(|max| record.stored_bytes > max);
    // Most publishes end here, without opening the log or its time index again.
    if keep_from <= record.first_offset && !over_bytes {
        return Ok(0);
    }
    let mut time = txn.table(LOG_TIME)?;
    let mut log = txn.table(LOG)?;
    let mut removed = 0;
    while removed < budget && record.first_offset < record.next_offset {
        let over_bytes = retention
            .max_bytes
            .is_some_and(|max| record.stored_bytes > max);
        if record.first_offset >= keep_from && !over_bytes {
            break;
        }
        // The batch holding the first offset; whole batches go, and the first offset may
        // stop inside one (its older messages are then skipped by reads).
        let (base, size, count) = match log
            .range((record.id, 0)..=(record.id, record.first_offset))?
            .next_back()
        {
            Some(entry) => {
                let (key, value) = entry?;
                let bytes = value.value();
                (
                    key.value().1,
                    bytes.len() as u64,
                    codec::batch_len(bytes, "topic log")?,
                )
            }
            None => return Err(Error::corrupted("topic log: no batch at the first offset")),
        };
        let end = base + count;
        let target = if over_bytes { end } else { end.min(keep_from) };
        if target >= end {
            log.remove((record.id, base))?;
            record.stored_bytes = record.stored_bytes.saturating_sub(size);
        }
        removed += target - record.first_offset;
        record.first_offset = target.min(record.next_offset);
    }
    drop_time_entries_before(&mut time, record)?;
    Ok(removed)
}

/// Removes time-index entries that only point below the first stored offset, keeping the last
/// such entry when it still covers stored offsets.
fn drop_time_entries_before(
    time: &mut Table<'_, (u64, u64), u64>,
    record: &TopicRecord,
) -> Result<()> {
    let mut stale = Vec::new();
    let mut iter = time
        .range((record.id, 0)..=(record.id, u64::MAX))?
        .peekable();
    while let Some(entry) = iter.next() {
        let (key, _) = entry?;
        let next_start = match iter.peek() {
            Some(Ok((_, v))) => v.value(),
            Some(Err(_)) => break,
            None => record.next_offset,
        };
        // This entry covers offsets [its start, next_start); nothing stored is there any more.
        if next_start <= record.first_offset {
            stale.push(key.value().1);
        } else {
            break;
        }
        if stale.len() as u64 >= RETENTION_BATCH {
            break;
        }
    }
    drop(iter);
    for ms in stale {
        time.remove((record.id, ms))?;
    }
    Ok(())
}

/// Topic appends a write transaction holds back until commit, or until something in it opens
/// the log or the topics table: consecutive publishes to a topic fill one record batch where
/// each would otherwise write a batch of their own (64 writers' single publishes coalesced by
/// group commit write one batch, not 64), and update one topic record in memory where each
/// would otherwise decode and store it. The batches are cut as a single publish of all those
/// messages would cut them, so the bytes each publish adds to the log, which retention counts,
/// are known at once.
#[derive(Default)]
pub(crate) struct Unwritten {
    /// (topic id, first offset, batch), in the order they were opened.
    batches: Vec<(u64, u64, codec::OpenBatch)>,
    /// The topic records publishes changed, by name (a transaction touches few topics).
    records: Vec<(String, TopicRecord)>,
}

impl Unwritten {
    /// Adds `messages`, published at `offset` onwards to topic `id`; returns the bytes they
    /// add to the log.
    fn push(&mut self, id: u64, offset: u64, messages: &[Message], now_ms: u64) -> u64 {
        let mut added = 0;
        for (i, message) in messages.iter().enumerate() {
            let at = offset + i as u64;
            // The topic's last batch, if this message continues it.
            let open = self.batches.iter_mut().rev().find(|b| b.0 == id);
            if let Some((_, _, batch)) = open.filter(|(_, base, b)| *base + b.count() == at) {
                let len = batch.len();
                if batch.push(message, now_ms) {
                    added += batch.len() - len;
                    continue;
                }
            }
            // Room for the messages that follow, up to a batch's worth.
            let mut expected = 0;
            for message in messages[i..].iter().take(codec::LOG_BATCH.items) {
                if expected >= codec::LOG_BATCH.bytes {
                    break;
                }
                expected += codec::encoded_len(message);
            }
            let batch = codec::OpenBatch::new(message, now_ms, expected);
            added += batch.len();
            self.batches.push((id, at, batch));
        }
        added as u64
    }

    /// The record held back for `topic`, if a publish changed it.
    fn record(&self, topic: &str) -> Option<TopicRecord> {
        self.records
            .iter()
            .find(|(name, _)| name == topic)
            .map(|(_, record)| record.clone())
    }

    /// Holds back `record` as `topic`'s latest.
    fn keep_record(&mut self, topic: &str, record: TopicRecord) {
        match self.records.iter_mut().find(|(name, _)| name == topic) {
            Some((_, kept)) => *kept = record,
            None => self.records.push((topic.to_owned(), record)),
        }
    }

    /// Writes the batches to the log and the records to the topics table, and forgets them.
    pub(crate) fn write(&mut self, txn: &redb::WriteTransaction) -> Result<()> {
        if !self.batches.is_empty() {
            let mut log = txn.open_table(LOG)?;
            for (id, base, batch) in self.batches.drain(..) {
                log.insert((id, base), batch.finish().as_slice())?;
            }
        }
        if !self.records.is_empty() {
            let mut topics = txn.open_table(TOPICS)?;
            for (name, record) in self.records.drain(..) {
                topics.insert(name.as_str(), codec::encode_topic(&record).as_slice())?;
            }
        }
        Ok(())
    }
}

/// Sets a freshly created topic's extent, for an import. No record is stored yet:
/// [`restore_records`] appends them from `first_offset` on.
pub(crate) fn restore_extent(
    txn: &WriteTransaction<'_>,
    name: &str,
    first_offset: u64,
    next_offset: u64,
    last_append_ms: u64,
) -> Result<()> {
    let mut topics = txn.table(TOPICS)?;
    let mut record = load(&topics, name)?;
    if first_offset > next_offset {
        return Err(Error::InvalidConfig(format!(
            "topic {name:?}: first offset {first_offset} after next offset {next_offset}"
        )));
    }
    record.first_offset = first_offset;
    record.next_offset = next_offset;
    record.last_append_ms = last_append_ms;
    topics.insert(name, codec::encode_topic(&record).as_slice())?;
    Ok(())
}

/// Stores records of an imported topic in record batches, exactly at `first` and the offsets
/// after it; the topic's extent is already set. Routing and retention do not run: the import
/// restores what was stored, not what a publish would do.
pub(crate) fn restore_records(
    txn: &WriteTransaction<'_>,
    name: &str,
    first: u64,
    messages: &[Message],
) -> Result<()> {
    let mut topics = txn.table(TOPICS)?;
    let mut record = load(&topics, name)?;
    let end = first + messages.len() as u64;
    if first < record.first_offset || end > record.next_offset {
        return Err(Error::InvalidConfig(format!(
            "topic {name:?}: records {first}..{end} outside the stored range {}..{}",
            record.first_offset, record.next_offset
        )));
    }
    let limits = txn.shared.limits;
    let mut log = txn.table(LOG)?;
    let mut time = txn.table(LOG_TIME)?;
    let mut base = first;
    let mut last_ms = 0;
    for chunk in codec::split_batches(messages, codec::LOG_BATCH, codec::batch_item_len) {
        for (i, message) in chunk.iter().enumerate() {
            check_message(message, &limits)?;
            // The time index maps each append time to its first offset; it must stay sorted
            // by offset, so an imported timestamp that steps back does not add an entry.
            if message.timestamp_ms > last_ms {
                last_ms = message.timestamp_ms;
                if time.get((record.id, last_ms))?.is_none() {
                    time.insert((record.id, last_ms), base + i as u64)?;
                }
            }
        }
        let bytes = codec::encode_batch(chunk.iter());
        record.stored_bytes += bytes.len() as u64;
        log.insert((record.id, base), bytes.as_slice())?;
        base += chunk.len() as u64;
    }
    topics.insert(name, codec::encode_topic(&record).as_slice())?;
    Ok(())
}

/// Sets a group's committed offset for an import, checked against the topic's extent.
pub(crate) fn restore_group(
    txn: &WriteTransaction<'_>,
    topic: &str,
    group: &str,
    committed: u64,
) -> Result<()> {
    names::check("group", group)?;
    let record = load(&txn.table(TOPICS)?, topic)?;
    if committed > record.next_offset {
        return Err(Error::OffsetOutOfRange {
            topic: topic.to_owned(),
            offset: committed,
            end: record.next_offset,
        });
    }
    txn.table(GROUPS)?.insert((record.id, group), committed)?;
    Ok(())
}
