//! Work queues: leases, ack / nack / extend, delays, priorities, dead-lettering.
//!
//! A message a queue holds is in one of two places. Messages enqueued at the default priority
//! without a delay go to the queue's FIFO lane (`QUEUE_FIFO`): record batches, received from
//! a head sequence, the common case and the cheap one. Every other message is an entry in
//! exactly one state: ready (listed in `QUEUE_READY`), delayed or in flight (listed in
//! `QUEUE_TIMERS` under the time it comes due). Receive first moves due timers back to ready
//! (a delay ran out, or a lease expired), then leases the first ready messages of both places
//! in one order: higher priority first, then the lower sequence. The delivery count is written
//! in the same commit that hands the message out; a lease settled in the transaction that
//! granted it is never written at all (see [`Unwritten`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;
use redb::ReadableTable;

use crate::codec::{self, EntryHead, EntryState, QueueEntry, QueueRecord};
use crate::error::{Error, Result};
use crate::id_hash::IdMap;
use crate::message::{Message, check_message};
use crate::schema::{QUEUE_ENTRIES, QUEUE_FIFO, QUEUE_READY, QUEUE_TIMERS, QUEUES, priority_rank};
use crate::txn::{ReadTransaction, WriteTransaction};
use crate::{names, routing};

/// The highest priority; priorities run from 0 (the default) to this, higher first.
pub const MAX_PRIORITY: u8 = 9;
/// The longest lease: 12 hours.
pub const MAX_LEASE_MS: u64 = 12 * 3_600_000;
/// The most deliveries a queue may allow before dead-lettering.
pub const MAX_DELIVERIES_LIMIT: u32 = 10_000;
/// How many due timers one receive moves back to ready at most.
const PROMOTE_BATCH: usize = 1024;

/// What a full queue does with one more message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Dead-letter the oldest ready message (reason `maxlen`) to make room. The default.
    #[default]
    DropOldest,
    /// Refuse the new message with [`Error::QueueFull`], failing its transaction.
    RejectPublish,
}

/// A queue's configuration.
///
/// # Examples
///
/// ```
/// use mqlite::QueueConfig;
/// let config = QueueConfig::default()
///     .lease_ms(10_000)
///     .max_deliveries(5)
///     .dead_letter("jobs-dlq");
/// assert_eq!(config.lease_ms, 10_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// How long a receive holds a message before it is delivered again. Default 30 000 ms;
    /// 1 ms to [`MAX_LEASE_MS`].
    pub lease_ms: u64,
    /// Deliveries allowed before the message is dead-lettered with reason `delivery_limit`.
    /// Default 20 (as RabbitMQ 4 quorum queues); 1 to [`MAX_DELIVERIES_LIMIT`].
    pub max_deliveries: u32,
    /// The queue that receives dead-lettered messages. `None` (the default): they are dropped,
    /// as RabbitMQ does without a dead-letter exchange. If that queue is full and rejects
    /// publishes ([`Overflow::RejectPublish`]), the operation that dead-letters fails with
    /// [`Error::QueueFull`]. An enqueue or publish that would overflow into it is refused
    /// before it changes anything, so the closure may handle the error and go on. A receive or
    /// a nack has already moved the message when it fails: its transaction can no longer
    /// commit, and [`Database::write`](crate::Database::write) returns that error even if the
    /// closure handled it (nothing of the transaction is stored; under group commit, the other
    /// closures commit without it).
    pub dead_letter: Option<String>,
    /// Most messages ready or delayed at once. `None` (the default): unbounded.
    pub max_length: Option<u64>,
    /// What a full queue does.
    pub overflow: Overflow,
    /// Messages not received within this time after enqueue are dead-lettered with reason
    /// `expired`. `None` (the default): no expiry.
    pub message_ttl_ms: Option<u64>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease_ms: 30_000,
            max_deliveries: 20,
            dead_letter: None,
            max_length: None,
            overflow: Overflow::DropOldest,
            message_ttl_ms: None,
        }
    }
}

impl QueueConfig {
    /// Sets the lease length (visibility timeout).
    pub fn lease_ms(mut self, lease_ms: u64) -> Self {
        self.lease_ms = lease_ms;
        self
    }

    /// Sets the delivery limit.
    pub fn max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = max_deliveries;
        self
    }

    /// Sets the dead-letter queue.
    pub fn dead_letter(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter = Some(queue.into());
        self
    }

    /// Sets the maximum length and the overflow policy.
    pub fn max_length(mut self, max_length: u64, overflow: Overflow) -> Self {
        self.max_length = Some(max_length);
        self.overflow = overflow;
        self
    }

    /// Sets the message time-to-live.
    pub fn message_ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.message_ttl_ms = Some(ttl_ms);
        self
    }

    fn check(&self) -> Result<()> {
        if !(1..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(Error::LimitExceeded {
                limit: "lease length ms",
                value: self.lease_ms,
                max: MAX_LEASE_MS,
            });
        }
        if !(1..=MAX_DELIVERIES_LIMIT).contains(&self.max_deliveries) {
            return Err(Error::LimitExceeded {
                limit: "max deliveries",
                value: u64::from(self.max_deliveries),
                max: u64::from(MAX_DELIVERIES_LIMIT),
            });
        }
        if let Some(dlq) = &self.dead_letter {
            names::check("queue", dlq)?;
        }
        Ok(())
    }
}

/// Options for one enqueue.
///
/// A message routed from a topic takes them from its headers: `x-priority` and `x-delay`
/// (milliseconds), both ASCII decimal, as RabbitMQ's priority queues and delayed-message
/// exchange read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnqueueOptions {
    /// Not visible before this many milliseconds from now.
    pub delay_ms: u64,
    /// 0 to [`MAX_PRIORITY`], higher first. FIFO within one priority.
    pub priority: u8,
}

impl EnqueueOptions {
    /// Reads `x-priority` and `x-delay` from the message headers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when either header is not a decimal number, or the priority is
    /// above [`MAX_PRIORITY`].
    pub fn from_headers(message: &Message) -> Result<Self> {
        let number = |name: &str| -> Result<Option<u64>> {
            match message.header(name) {
                None => Ok(None),
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .map(Some)
                    .ok_or_else(|| Error::InvalidConfig(format!("header {name} is not a number"))),
            }
        };
        let priority = number("x-priority")?.unwrap_or(0);
        let options = EnqueueOptions {
            delay_ms: number("x-delay")?.unwrap_or(0),
            priority: u8::try_from(priority).unwrap_or(u8::MAX),
        };
        options.check()?;
        Ok(options)
    }

    fn check(&self) -> Result<()> {
        if self.priority > MAX_PRIORITY {
            return Err(Error::LimitExceeded {
                limit: "priority",
                value: u64::from(self.priority),
                max: u64::from(MAX_PRIORITY),
            });
        }
        Ok(())
    }
}

/// Why a message was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeathReason {
    /// Nacked with [`Nack::DeadLetter`].
    Rejected,
    /// Its time-to-live ran out.
    Expired,
    /// Dropped from the head of a full queue.
    MaxLength,
    /// Delivered `max_deliveries` times without an ack.
    DeliveryLimit,
}

impl DeathReason {
    /// The name RabbitMQ uses in `x-death`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLength => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }

    /// The reason named by [`DeathReason::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        [
            DeathReason::Rejected,
            DeathReason::Expired,
            DeathReason::MaxLength,
            DeathReason::DeliveryLimit,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// One line of a message's dead-letter history (RabbitMQ's `x-death`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Death {
    /// The queue the message died in.
    pub queue: String,
    /// Why.
    pub reason: DeathReason,
    /// How many times it died there for this reason.
    pub count: u32,
    /// The first time (clock milliseconds).
    pub first_ms: u64,
    /// The last time (clock milliseconds).
    pub last_ms: u64,
}

/// What to do with a message that was not processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nack {
    /// Make it ready again at once (it keeps its place by sequence, so it goes first).
    Requeue,
    /// Make it ready again after this many milliseconds (a retry with backoff).
    RequeueAfter(u64),
    /// Dead-letter it with reason `rejected`.
    DeadLetter,
}

/// The handle that settles one delivery: pass it to ack, nack or extend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The queue.
    pub queue: String,
    /// The entry's sequence number in the queue.
    pub sequence: u64,
    /// The delivery this lease belongs to; a later delivery makes this lease stale.
    pub delivery_count: u32,
}

/// A message received from a queue under a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// How many times it has been handed out, this time included.
    pub delivery_count: u32,
    /// Whether it was handed out before.
    pub redelivered: bool,
    /// When the lease runs out (clock milliseconds).
    pub lease_until_ms: u64,
    /// Its dead-letter history, oldest first (empty unless it was dead-lettered before).
    pub deaths: Vec<Death>,
    /// Its priority.
    pub priority: u8,
    /// The lease to settle it with.
    pub lease: Lease,
}

/// A queue's configuration and counts, as of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue name.
    pub name: String,
    /// Its configuration.
    pub config: QueueConfig,
    /// Messages ready to be received.
    pub ready: u64,
    /// Messages leased to a consumer (including expired leases not yet reclaimed by a
    /// receive).
    pub in_flight: u64,
    /// Messages waiting for their delay.
    pub delayed: u64,
    /// Messages this queue has dead-lettered since it was created.
    pub dead_lettered: u64,
    /// Enqueue time of the oldest message still held, if any (clock milliseconds).
    pub oldest_enqueued_ms: Option<u64>,
}

impl QueueInfo {
    /// Messages held: ready, in flight and delayed.
    pub fn depth(&self) -> u64 {
        self.ready + self.in_flight + self.delayed
    }
}

pub(crate) fn load(
    queues: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<QueueRecord> {
    match queues.get(name)? {
        Some(value) => codec::decode_queue(value.value()),
        None => Err(Error::UnknownQueue {
            queue: name.to_owned(),
        }),
    }
}

pub(crate) fn info<F: ReadableTable<(u64, u64), &'static [u8]>>(
    entries: &impl ReadableTable<(u64, u64), &'static [u8]>,
    fifo: Option<&F>,
    name: &str,
    q: &QueueRecord,
) -> Result<QueueInfo> {
    let indexed = match entries.range((q.id, 0)..=(q.id, u64::MAX))?.next() {
        Some(entry) => Some(codec::decode_entry(entry?.1.value())?.enqueued_ms),
        None => None,
    };
    let lane = match fifo {
        Some(fifo) => read_lane(fifo, q.id, q.fifo_head, 1)?
            .pop()
            .map(|(_, e)| e.enqueued_ms),
        None => None,
    };
    let oldest = [indexed, lane].into_iter().flatten().min();
    Ok(QueueInfo {
        name: name.to_owned(),
        config: q.config.clone(),
        ready: q.ready,
        in_flight: q.in_flight,
        delayed: q.delayed,
        dead_lettered: q.dead_lettered,
        oldest_enqueued_ms: oldest,
    })
}

/// The open tables of one queue operation, with the queue's record held until `store`.
struct QueueOp<'t> {
    name: String,
    record: QueueRecord,
    entries: redb::Table<'t, (u64, u64), &'static [u8]>,
    ready: redb::Table<'t, (u64, u8, u64), ()>,
    timers: redb::Table<'t, (u64, u64, u64), ()>,
    /// Opened on first use: enqueue and ack seldom need it.
    fifo: Option<Lanes<'t>>,
    txn: &'t redb::WriteTransaction,
    now_ms: u64,
    /// Entries bound for another queue, inserted by `store` once these tables are closed.
    dead_letters: Vec<(String, QueueEntry)>,
    /// What the transaction holds back from the tables until it commits.
    unwritten: &'t Mutex<Unwritten>,
    /// Leases granted by this operation, added to `unwritten` by `store`.
    granted: Vec<((u64, u64), UnwrittenLease)>,
    /// The lane head when the operation began: `store` notes a moved head for trimming.
    initial_head: u64,
}

/// What a transaction holds back from its queue tables until it commits, or until an
/// operation needs the tables complete ([`write_unwritten`]).
///
/// - Leases. A receive takes its entries out of the ready index (or the FIFO lane) and counts
///   them in flight at once, but writes their new state (in flight, delivery count, lease
///   expiry, timer) only at commit. A receive and an ack in the same transaction (the consume
///   pattern) then never write the lease at all.
/// - Appends to FIFO lanes. Messages enqueued at the default priority without a delay are
///   written at commit as record batches (like a topic's), so that a transaction enqueuing
///   many writes a few batches instead of an entry and an index key each.
/// - FIFO heads. Receiving moves a lane's head; the batches wholly below it are deleted at
///   commit.
/// - Queue records. An enqueue into the lane of a queue with room (the common case) changes
///   only the queue's record and the appends: the record is kept here, so that a loop of
///   enqueues (or of publishes routed to queues) opens no table per message. It is written
///   when anything opens the queues table through [`WriteTransaction::table`], so every
///   other operation reads it current.
///
/// Nothing outside the transaction can see the difference, since nothing outside sees it
/// before it commits.
#[derive(Default)]
pub(crate) struct Unwritten {
    leases: IdMap<(u64, u64), UnwrittenLease>,
    appends: BTreeMap<u64, Vec<(u64, QueueEntry)>>,
    heads: BTreeMap<u64, u64>,
    /// By name; a transaction touches few queues.
    records: Vec<(String, QueueRecord)>,
}

#[derive(Clone, Copy)]
struct UnwrittenLease {
    head: EntryHead,
    /// Whether the entry is in its queue's FIFO lane (else in `mqlite_queue_entries`).
    in_lane: bool,
}

/// Writes what the transaction held back (see [`Unwritten`]): lane appends as batches, leases
/// as entries and timers, and the trimming of lanes below their heads. Called before commit
/// and before any queue operation other than enqueue and ack, so those see complete tables.
pub(crate) fn write_unwritten(txn: &WriteTransaction<'_>) -> Result<()> {
    let pending = std::mem::take(&mut *txn.unwritten.lock());
    write_records(txn, pending.records)?;
    if pending.leases.is_empty() && pending.appends.is_empty() && pending.heads.is_empty() {
        return Ok(());
    }
    let mut fifo = txn.table(QUEUE_FIFO)?;
    for (id, items) in &pending.appends {
        for chunk in codec::split_batches(items, codec::LANE_BATCH, |_, (_, e)| {
            8 + codec::entry_encoded_len(e)
        }) {
            let last = chunk.last().map_or(0, |(seq, _)| *seq);
            fifo.insert((*id, last), codec::encode_queue_batch(chunk).as_slice())?;
        }
    }
    let mut entries = txn.table(QUEUE_ENTRIES)?;
    let mut timers = txn.table(QUEUE_TIMERS)?;
    // In key order, so that neighbouring inserts land in the same pages; each run of one
    // queue's lane leases is read from the lane together.
    let mut leases: Vec<_> = pending.leases.into_iter().collect();
    leases.sort_unstable_by_key(|(key, _)| *key);
    for run in leases.chunk_by(|((a, _), x), ((b, _), y)| a == b && x.in_lane == y.in_lane) {
        let id = run[0].0.0;
        let mut from_lane = if run[0].1.in_lane {
            let seqs: Vec<u64> = run.iter().map(|((_, seq), _)| *seq).collect();
            Some(lane_entries(&fifo, id, &seqs)?.into_iter())
        } else {
            None
        };
        for ((_, seq), lease) in run {
            let (seq, head) = (*seq, lease.head);
            let bytes = match &mut from_lane {
                Some(found) => {
                    let Some(mut entry) = found.next() else {
                        return Err(Error::corrupted("a leased queue entry left its FIFO lane"));
                    };
                    entry.state = head.state;
                    entry.delivery_count = head.delivery_count;
                    entry.due_ms = head.due_ms;
                    codec::encode_entry(&entry)
                }
                None => match entries.get((id, seq))? {
                    Some(v) => codec::restate_entry(v.value(), head)?,
                    None => {
                        return Err(Error::corrupted(
                            "a leased queue entry vanished before commit",
                        ));
                    }
                },
            };
            entries.insert((id, seq), bytes.as_slice())?;
            timers.insert((id, head.due_ms, seq), ())?;
        }
    }
    for (id, head) in pending.heads {
        fifo.retain_in((id, 0)..(id, head), |_, _| false)?;
    }
    Ok(())
}

/// How many entries the FIFO lane of queue `id` holds from sequence `from` on; every batch is
/// checked, none copied.
fn lane_len(
    fifo: &impl ReadableTable<(u64, u64), &'static [u8]>,
    id: u64,
    from: u64,
) -> Result<u64> {
    let mut count = 0;
    for item in fifo.range((id, from)..=(id, u64::MAX))? {
        count += codec::decode_queue_batch(item?.1.value(), from, 0, &mut Vec::new())? as u64;
    }
    Ok(count)
}

/// Writes the queue records the transaction holds (see [`Unwritten`]), for commit or for code
/// that opens the queues table.
pub(crate) fn write_held_records(txn: &WriteTransaction<'_>) -> Result<()> {
    let records = std::mem::take(&mut txn.unwritten.lock().records);
    write_records(txn, records)
}

fn write_records(txn: &WriteTransaction<'_>, records: Vec<(String, QueueRecord)>) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    // Not through `table`, which would come back here.
    let mut queues = txn.txn.open_table(QUEUES)?;
    for (name, record) in records {
        queues.insert(name.as_str(), codec::encode_queue(&record).as_slice())?;
    }
    Ok(())
}

/// A queue's record as the transaction last left it: held (see [`Unwritten`]) or stored.
fn current_record(txn: &WriteTransaction<'_>, queue: &str) -> Result<QueueRecord> {
    if let Some((_, record)) = txn
        .unwritten
        .lock()
        .records
        .iter()
        .find(|(n, _)| n == queue)
    {
        return Ok(record.clone());
    }
    load(&txn.txn.open_table(QUEUES)?, queue)
}

/// The FIFO lanes table, open for writing.
pub(crate) type Lanes<'t> = redb::Table<'t, (u64, u64), &'static [u8]>;
/// The FIFO lanes table in a snapshot.
pub(crate) type LanesSnapshot = redb::ReadOnlyTable<(u64, u64), &'static [u8]>;

/// The lane entries `seqs` (ascending), in that order: read with one pass when they lie close
/// together, as [`QueueOp::get_many`] reads entries, else one lookup each.
fn lane_entries(
    fifo: &impl ReadableTable<(u64, u64), &'static [u8]>,
    id: u64,
    seqs: &[u64],
) -> Result<Vec<QueueEntry>> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Ok(Vec::new());
    };
    let found = if dense(seqs.len(), first, last) {
        read_lane(
            fifo,
            id,
            first,
            usize::try_from(last - first + 1).unwrap_or(usize::MAX),
        )?
    } else {
        let mut found = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            found.extend(read_lane(fifo, id, seq, 1)?);
        }
        found
    };
    let mut found = found.into_iter().peekable();
    seqs.iter()
        .map(|&seq| {
            while found.next_if(|(s, _)| *s < seq).is_some() {}
            match found.next() {
                Some((s, entry)) if s == seq => Ok(entry),
                _ => Err(Error::corrupted("a leased queue entry left its FIFO lane")),
            }
        })
        .collect()
}

/// Up to `max` entries of a queue's FIFO lane from sequence `from` on, in sequence order.
pub(crate) fn read_lane(
    fifo: &impl ReadableTable<(u64, u64), &'static [u8]>,
    id: u64,
    from: u64,
    max: usize,
) -> Result<Vec<(u64, QueueEntry)>> {
    let mut out: Vec<(u64, QueueEntry)> = Vec::new();
    if max == 0 {
        return Ok(out);
    }
    for item in fifo.range((id, from)..=(id, u64::MAX))? {
        let (key, value) = item?;
        let (queue_id, last) = key.value();
        let after = out.last().map(|(seq, _)| *seq);
        let start = out.len();
        codec::decode_queue_batch(value.value(), from, max - start, &mut out)?;
        // A damaged key can break the tree's order; report it rather than return it.
        if queue_id != id
            || out.last().is_some_and(|(seq, _)| *seq > last)
            || out
                .get(start)
                .is_some_and(|(seq, _)| after.is_some_and(|a| *seq <= a))
        {
            return Err(Error::corrupted(format!(
                "queue FIFO lane of queue {id}: batch keys out of order at {last}"
            )));
        }
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

impl<'t> QueueOp<'t> {
    fn open(txn: &'t WriteTransaction<'_>, name: &str) -> Result<Self> {
        let record = load(&txn.table(QUEUES)?, name)?;
        let record_head = record.fifo_head;
        Ok(QueueOp {
            name: name.to_owned(),
            record,
            entries: txn.table(QUEUE_ENTRIES)?,
            ready: txn.table(QUEUE_READY)?,
            timers: txn.table(QUEUE_TIMERS)?,
            fifo: None,
            txn: &txn.txn,
            now_ms: txn.now_ms(),
            dead_letters: Vec::new(),
            unwritten: &txn.unwritten,
            granted: Vec::new(),
            initial_head: record_head,
        })
    }

    /// Closes the tables, stores the queue record, then delivers the dead letters.
    fn store(self, txn: &WriteTransaction<'_>) -> Result<()> {
        let QueueOp {
            name,
            record,
            dead_letters,
            entries,
            ready,
            timers,
            fifo,
            txn: _,
            now_ms: _,
            unwritten,
            granted,
            initial_head,
        } = self;
        // Another queue's operation opens the same tables: close them first.
        drop((entries, ready, timers, fifo));
        if !granted.is_empty() || record.fifo_head != initial_head {
            let mut unwritten = unwritten.lock();
            unwritten.leases.extend(granted);
            if record.fifo_head != initial_head {
                unwritten.heads.insert(record.id, record.fifo_head);
            }
        }
        txn.table(QUEUES)?
            .insert(name.as_str(), codec::encode_queue(&record).as_slice())?;
        for (dlq, entry) in dead_letters {
            // The message already left this queue: a refusal now (a full dead-letter queue
            // that rejects) must not commit.
            insert_entry(
                txn,
                &dlq,
                entry.message,
                EnqueueOptions::default(),
                entry.deaths,
            )
            .inspect_err(|e| txn.break_with(e))?;
        }
        Ok(())
    }

    fn id(&self) -> u64 {
        self.record.id
    }

    /// The FIFO lanes table, opened on first use.
    fn lanes(&mut self) -> Result<&mut Lanes<'t>> {
        let fifo = match self.fifo.take() {
            Some(fifo) => fifo,
            None => self.txn.open_table(QUEUE_FIFO)?,
        };
        Ok(self.fifo.insert(fifo))
    }

    fn get(&self, seq: u64) -> Result<Option<QueueEntry>> {
        match self.entries.get((self.id(), seq))? {
            Some(v) => Ok(Some(codec::decode_entry(v.value())?)),
            None => Ok(None),
        }
    }

    /// The entries `seqs`, in that order. Sequences that run up in a dense span (the usual
    /// receive) are read with one range scan instead of a B-tree descent each.
    fn get_many(&self, seqs: &[u64]) -> Result<Vec<Option<QueueEntry>>> {
        let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
            return Ok(Vec::new());
        };
        let ascending = seqs.windows(2).all(|w| w[0] < w[1]);
        if !ascending || !dense(seqs.len(), first, last) {
            return seqs.iter().map(|&seq| self.get(seq)).collect();
        }
        let id = self.id();
        let mut out = Vec::with_capacity(seqs.len());
        let mut wanted = seqs.iter().peekable();
        for item in self.entries.range((id, first)..=(id, last))? {
            let (key, value) = item?;
            let seq = key.value().1;
            while wanted.next_if(|&&w| w < seq).is_some() {
                out.push(None);
            }
            if wanted.next_if(|&&w| w == seq).is_some() {
                out.push(Some(codec::decode_entry(value.value())?));
            }
        }
        out.resize_with(seqs.len(), || None);
        Ok(out)
    }

    /// Deletes the entries `seqs` (already unlisted), with one pass over a dense span.
    fn remove_many(&mut self, seqs: &mut [u64]) -> Result<()> {
        seqs.sort_unstable();
        let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
            return Ok(());
        };
        let id = self.id();
        if dense(seqs.len(), first, last) {
            let seqs = &*seqs;
            self.entries.retain_in((id, first)..=(id, last), |key, _| {
                seqs.binary_search(&key.1).is_err()
            })?;
        } else {
            for &seq in seqs.iter() {
                self.entries.remove((id, seq))?;
            }
        }
        Ok(())
    }

    fn put(&mut self, seq: u64, entry: &QueueEntry) -> Result<()> {
        let id = self.id();
        self.entries
            .insert((id, seq), codec::encode_entry(entry).as_slice())?;
        Ok(())
    }

    /// Takes an entry out of whatever index lists it, and out of the counts.
    fn unlist(&mut self, seq: u64, entry: &EntryHead) -> Result<()> {
        let id = self.id();
        match entry.state {
            EntryState::Ready => {
                self.ready
                    .remove((id, priority_rank(entry.priority), seq))?;
                self.record.ready -= 1;
            }
            EntryState::Delayed => {
                self.timers.remove((id, entry.due_ms, seq))?;
                self.record.delayed -= 1;
            }
            EntryState::InFlight => {
                self.timers.remove((id, entry.due_ms, seq))?;
                self.record.in_flight -= 1;
            }
        }
        Ok(())
    }

    /// Lists an entry under its state, counts it, and stores it.
    fn list(&mut self, seq: u64, entry: &QueueEntry) -> Result<()> {
        let id = self.id();
        match entry.state {
            EntryState::Ready => {
                self.ready
                    .insert((id, priority_rank(entry.priority), seq), ())?;
                self.record.ready += 1;
            }
            EntryState::Delayed => {
                self.timers.insert((id, entry.due_ms, seq), ())?;
                self.record.delayed += 1;
            }
            EntryState::InFlight => {
                self.timers.insert((id, entry.due_ms, seq), ())?;
                self.record.in_flight += 1;
            }
        }
        self.put(seq, entry)
    }

    /// Moves due timers back to ready: delays that ran out and leases that expired.
    fn promote_due(&mut self) -> Result<()> {
        let id = self.id();
        let due: Vec<(u64, u64)> = self
            .timers
            .range((id, 0, 0)..=(id, self.now_ms, u64::MAX))?
            .take(PROMOTE_BATCH)
            .map(|e| e.map(|(k, _)| (k.value().1, k.value().2)))
            .collect::<Result<_, _>>()?;
        for (_, seq) in due {
            let Some(mut entry) = self.get(seq)? else {
                continue;
            };
            self.unlist(seq, &entry.head())?;
            entry.state = EntryState::Ready;
            if entry.delivery_count >= self.record.config.max_deliveries {
                self.dead_letter(seq, entry, DeathReason::DeliveryLimit)?;
            } else {
                self.list(seq, &entry)?;
            }
        }
        Ok(())
    }

    /// Removes an (already unlisted) entry and sends it to the dead-letter queue, if any.
    fn dead_letter(&mut self, seq: u64, mut entry: QueueEntry, reason: DeathReason) -> Result<()> {
        let id = self.id();
        self.entries.remove((id, seq))?;
        self.record.dead_lettered += 1;
        let Some(dlq) = self.record.config.dead_letter.clone() else {
            return Ok(());
        };
        let now = self.now_ms;
        match entry
            .deaths
            .iter_mut()
            .find(|d| d.queue == self.name && d.reason == reason)
        {
            Some(death) => {
                death.count += 1;
                death.last_ms = now;
            }
            None => entry.deaths.push(Death {
                queue: self.name.clone(),
                reason,
                count: 1,
                first_ms: now,
                last_ms: now,
            }),
        }
        if dlq == self.name {
            // Dead-lettering into itself re-enqueues at the back, as a fresh entry.
            let seq = self.record.next_seq;
            self.record.next_seq += 1;
            let fresh = fresh_entry(entry.message, 0, entry.deaths, now, &self.record.config);
            return self.list(seq, &fresh);
        }
        self.dead_letters.push((dlq, entry));
        Ok(())
    }

    /// Makes room under `max_length`; returns false when the new message must be refused.
    fn make_room(&mut self) -> Result<bool> {
        let Some(max) = self.record.config.max_length else {
            return Ok(true);
        };
        while self.record.ready + self.record.delayed >= max {
            if self.record.config.overflow == Overflow::RejectPublish || max == 0 {
                return Ok(false);
            }
            let id = self.id();
            match self.first_ready()? {
                Some(Oldest::Indexed(seq)) => {
                    let Some(entry) = self.get(seq)? else {
                        return Err(Error::corrupted("queue ready index points at no entry"));
                    };
                    self.unlist(seq, &entry.head())?;
                    self.dead_letter(seq, entry, DeathReason::MaxLength)?;
                }
                Some(Oldest::Lane(seq, entry)) => {
                    self.take_from_lane(seq);
                    self.dead_letter(seq, entry, DeathReason::MaxLength)?;
                }
                Some(Oldest::Appended) => {
                    let taken = self
                        .unwritten
                        .lock()
                        .appends
                        .get_mut(&id)
                        .map(|appended| appended.remove(0));
                    if let Some((seq, entry)) = taken {
                        self.record.ready -= 1;
                        self.dead_letter(seq, entry, DeathReason::MaxLength)?;
                    }
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The first ready message in receive order: higher priorities first, then the lower
    /// sequence among the ready index, the FIFO lane and this transaction's appends to it.
    fn first_ready(&mut self) -> Result<Option<Oldest>> {
        let id = self.id();
        let indexed = match self
            .ready
            .range((id, 0, 0)..=(id, u8::MAX, u64::MAX))?
            .next()
        {
            Some(e) => {
                let (_, rank, seq) = e?.0.value();
                if rank < priority_rank(0) {
                    return Ok(Some(Oldest::Indexed(seq)));
                }
                Some(seq)
            }
            None => None,
        };
        let head = self.record.fifo_head;
        let lane = read_lane(self.lanes()?, id, head, 1)?.pop();
        let appended = self
            .unwritten
            .lock()
            .appends
            .get(&id)
            .and_then(|a| a.first())
            .map(|(seq, _)| *seq);
        let lane_seq = lane.as_ref().map(|(seq, _)| *seq);
        let first = [indexed, lane_seq, appended].into_iter().flatten().min();
        Ok(match first {
            None => None,
            Some(seq) if Some(seq) == indexed => Some(Oldest::Indexed(seq)),
            Some(seq) if Some(seq) == appended => Some(Oldest::Appended),
            Some(_) => lane.map(|(seq, entry)| Oldest::Lane(seq, entry)),
        })
    }

    /// Takes the ready entry `seq` from the head of the FIFO lane (the caller has it decoded).
    fn take_from_lane(&mut self, seq: u64) {
        self.record.fifo_head = seq + 1;
        self.record.ready -= 1;
    }

    /// Moves every entry of the FIFO lane into the ready index, for operations that take
    /// ready messages out of order (purge, redrive). The caller wrote the transaction's
    /// unwritten state first, so no lease points into the lane.
    fn unlane(&mut self) -> Result<()> {
        let (id, head) = (self.id(), self.record.fifo_head);
        let items = read_lane(self.lanes()?, id, head, usize::MAX)?;
        self.clear_lane(items.len() as u64)?;
        for (seq, entry) in items {
            self.list(seq, &entry)?;
        }
        Ok(())
    }

    /// Deletes the FIFO lane's ready messages (those from its head on) with their batches,
    /// without listing them first; returns how many.
    fn drop_lane(&mut self) -> Result<u64> {
        let (id, head) = (self.id(), self.record.fifo_head);
        let count = lane_len(self.lanes()?, id, head)?;
        self.clear_lane(count)?;
        Ok(count)
    }

    /// Deletes every batch of the FIFO lane, which holds `count` ready messages from its head
    /// on. Below the head nothing is needed: a message received from the lane has an entry of
    /// its own once written, and the caller has written the transaction's (see
    /// [`write_unwritten`]).
    fn clear_lane(&mut self, count: u64) -> Result<()> {
        let id = self.id();
        self.lanes()?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.record.fifo_head = self.record.next_seq;
        self.record.ready = self
            .record
            .ready
            .checked_sub(count)
            .ok_or_else(|| Error::corrupted("queue ready count below its FIFO lane"))?;
        Ok(())
    }

    /// Leases the ready entry `seq`, which the caller took out of the ready index and the
    /// ready count, or dead-letters it when it expired or used up its deliveries (then returns
    /// `None`). The lease itself is written at commit (see [`Unwritten`]).
    fn lease(
        &mut self,
        seq: u64,
        entry: Option<QueueEntry>,
        in_lane: bool,
        queue: &str,
    ) -> Result<Option<Delivery>> {
        let mut entry = match entry {
            Some(entry) if entry.state == EntryState::Ready => entry,
            Some(_) => {
                return Err(Error::corrupted(
                    "queue ready index lists an entry not ready",
                ));
            }
            None => return Err(Error::corrupted("queue ready index points at no entry")),
        };
        if entry.expires_ms.is_some_and(|at| at <= self.now_ms) {
            self.dead_letter(seq, entry, DeathReason::Expired)?;
            return Ok(None);
        }
        if entry.delivery_count >= self.record.config.max_deliveries {
            self.dead_letter(seq, entry, DeathReason::DeliveryLimit)?;
            return Ok(None);
        }
        entry.delivery_count += 1;
        entry.state = EntryState::InFlight;
        entry.due_ms = self.now_ms.saturating_add(self.record.config.lease_ms);
        self.record.in_flight += 1;
        self.granted.push((
            (self.id(), seq),
            UnwrittenLease {
                head: entry.head(),
                in_lane,
            },
        ));
        Ok(Some(Delivery {
            lease: Lease {
                queue: queue.to_owned(),
                sequence: seq,
                delivery_count: entry.delivery_count,
            },
            redelivered: entry.delivery_count > 1,
            delivery_count: entry.delivery_count,
            lease_until_ms: entry.due_ms,
            priority: entry.priority,
            deaths: entry.deaths,
            message: entry.message,
        }))
    }

    /// Checks that `lease` is the current lease of its entry.
    fn leased(&self, lease: &Lease) -> Result<QueueEntry> {
        match self.get(lease.sequence)? {
            Some(entry)
                if entry.state == EntryState::InFlight
                    && entry.delivery_count == lease.delivery_count =>
            {
                Ok(entry)
            }
            _ => Err(Error::StaleLease {
                queue: lease.queue.clone(),
            }),
        }
    }

    /// [`QueueOp::leased`] without decoding the message: all an ack needs.
    fn leased_head(&self, lease: &Lease) -> Result<EntryHead> {
        let head = match self.entries.get((self.id(), lease.sequence))? {
            Some(v) => Some(codec::decode_entry_head(v.value())?),
            None => None,
        };
        match head {
            Some(head)
                if head.state == EntryState::InFlight
                    && head.delivery_count == lease.delivery_count =>
            {
                Ok(head)
            }
            _ => Err(Error::StaleLease {
                queue: lease.queue.clone(),
            }),
        }
    }
}

/// The leases of one queue an ack settles, checked.
struct Acks {
    /// Leases from earlier commits, by sequence, with their stored heads.
    written: Vec<(u64, EntryHead)>,
    /// Leases granted by this transaction (never written), by sequence, with whether each
    /// came from the FIFO lane.
    granted: Vec<(u64, bool)>,
}

/// Checks the leases of one queue for an ack: [`Error::StaleLease`] for one that is stale or
/// listed twice.
fn check_acks(op: &QueueOp<'_>, leases: &[&Lease]) -> Result<Acks> {
    let stale = |lease: &Lease| Error::StaleLease {
        queue: lease.queue.clone(),
    };
    let mut sequences: Vec<u64> = leases.iter().map(|l| l.sequence).collect();
    sequences.sort_unstable();
    if sequences.windows(2).any(|w| w[0] == w[1]) {
        return Err(stale(leases[0]));
    }
    let id = op.id();
    let mut written = Vec::with_capacity(leases.len());
    let mut granted = Vec::new();
    let unwritten = op.unwritten.lock();
    for lease in leases {
        match unwritten.leases.get(&(id, lease.sequence)) {
            Some(held) if held.head.delivery_count == lease.delivery_count => {
                granted.push((lease.sequence, held.in_lane));
            }
            Some(_) => return Err(stale(lease)),
            None => written.push((lease.sequence, op.leased_head(lease)?)),
        }
    }
    Ok(Acks { written, granted })
}

/// Where the first ready message of a queue is.
enum Oldest {
    Indexed(u64),
    Lane(u64, QueueEntry),
    Appended,
}

/// Whether `count` sequences between `first` and `last` are close enough together that one
/// pass over the span costs less than a B-tree descent for each.
fn dense(count: usize, first: u64, last: u64) -> bool {
    last - first < 2 * count as u64 + 64
}

fn fresh_entry(
    message: Message,
    delay_ms: u64,
    deaths: Vec<Death>,
    now_ms: u64,
    config: &QueueConfig,
) -> QueueEntry {
    QueueEntry {
        message,
        state: if delay_ms > 0 {
            EntryState::Delayed
        } else {
            EntryState::Ready
        },
        priority: 0,
        delivery_count: 0,
        due_ms: now_ms.saturating_add(delay_ms),
        enqueued_ms: now_ms,
        expires_ms: config
            .message_ttl_ms
            .map(|ttl| now_ms.saturating_add(delay_ms).saturating_add(ttl)),
        deaths,
    }
}

fn insert_entry(
    txn: &WriteTransaction<'_>,
    queue: &str,
    message: Message,
    options: EnqueueOptions,
    deaths: Vec<Death>,
) -> Result<()> {
    if options.priority == 0 && options.delay_ms == 0 {
        // Into the lane of a queue with room: only the record and the appends change, both
        // held by the transaction (see `Unwritten`).
        let mut unwritten = txn.unwritten.lock();
        let held = match unwritten.records.iter().position(|(n, _)| n == queue) {
            Some(i) => i,
            None => {
                drop(unwritten);
                let record = load(&txn.txn.open_table(QUEUES)?, queue)?;
                unwritten = txn.unwritten.lock();
                unwritten.records.push((queue.to_owned(), record));
                unwritten.records.len() - 1
            }
        };
        let Unwritten {
            records, appends, ..
        } = &mut *unwritten;
        let record = &mut records[held].1;
        if record
            .config
            .max_length
            .is_none_or(|max| record.ready + record.delayed < max)
        {
            append_to_lane(appends, record, message, deaths, txn.now_ms());
            return Ok(());
        }
    }
    let mut op = QueueOp::open(txn, queue)?;
    // Refused before anything changes, also when making room would dead-letter the oldest
    // into a queue that refuses it.
    check_room_of(txn, queue, &op.record, 1)?;
    if !op.make_room()? {
        return Err(Error::QueueFull {
            queue: queue.to_owned(),
            max_length: op.record.config.max_length.unwrap_or(0),
        });
    }
    if options.priority == 0 && options.delay_ms == 0 {
        append_to_lane(
            &mut op.unwritten.lock().appends,
            &mut op.record,
            message,
            deaths,
            op.now_ms,
        );
    } else {
        let seq = op.record.next_seq;
        op.record.next_seq += 1;
        let mut entry = fresh_entry(
            message,
            options.delay_ms,
            deaths,
            op.now_ms,
            &op.record.config,
        );
        entry.priority = options.priority;
        op.list(seq, &entry)?;
    }
    op.store(txn)
}

/// Puts a new ready message at the end of a queue's FIFO lane, held with the transaction's
/// appends until commit; the caller stores (or holds) `record`.
fn append_to_lane(
    appends: &mut BTreeMap<u64, Vec<(u64, QueueEntry)>>,
    record: &mut QueueRecord,
    message: Message,
    deaths: Vec<Death>,
    now_ms: u64,
) {
    let seq = record.next_seq;
    record.next_seq += 1;
    record.ready += 1;
    let entry = fresh_entry(message, 0, deaths, now_ms, &record.config);
    appends.entry(record.id).or_default().push((seq, entry));
}

/// Refuses `count` new messages for `queue` as enqueueing them would, before anything is
/// written: with [`Error::QueueFull`] when its length bound rejects publishes (or is 0) and
/// they do not fit, or when making room would dead-letter into a queue that refuses them.
pub(crate) fn check_room(txn: &WriteTransaction<'_>, queue: &str, count: u64) -> Result<()> {
    check_room_of(txn, queue, &current_record(txn, queue)?, count)
}

/// [`check_room`] for a queue whose record the caller holds; reads the records of the
/// dead-letter queues only when the queue is full.
fn check_room_of(
    txn: &WriteTransaction<'_>,
    queue: &str,
    record: &QueueRecord,
    count: u64,
) -> Result<()> {
    // A chain of dead-letter queues longer than this is not followed further.
    const DEPTH: usize = 8;
    let (mut queue, mut record, mut count) = (Cow::Borrowed(queue), Cow::Borrowed(record), count);
    for _ in 0..DEPTH {
        let Some(max) = record.config.max_length else {
            return Ok(());
        };
        let after = record.ready + record.delayed + count;
        if after <= max {
            return Ok(());
        }
        if max == 0 || record.config.overflow == Overflow::RejectPublish {
            return Err(Error::QueueFull {
                queue: queue.into_owned(),
                max_length: max,
            });
        }
        // The oldest make room: they go to the dead-letter queue, which must take them.
        let dlq = match &record.config.dead_letter {
            Some(dlq) if *dlq != queue => dlq.clone(),
            _ => return Ok(()),
        };
        count = (after - max).min(record.ready);
        if count == 0 {
            return Ok(());
        }
        record = Cow::Owned(current_record(txn, &dlq)?);
        queue = Cow::Owned(dlq);
    }
    Ok(())
}

pub(crate) fn enqueue_with(
    txn: &WriteTransaction<'_>,
    queue: &str,
    message: &Message,
    options: EnqueueOptions,
) -> Result<()> {
    options.check()?;
    let mut message = message.clone();
    if message.timestamp_ms == 0 {
        message.timestamp_ms = txn.now_ms();
    }
    insert_entry(txn, queue, message, options, Vec::new())?;
    txn.mark_published();
    Ok(())
}

impl WriteTransaction<'_> {
    /// Creates a queue.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::QueueExists`], [`Error::LimitExceeded`] for a lease or
    /// delivery limit out of range, [`Error::UnknownQueue`] when the dead-letter queue does not
    /// exist (create it first; a queue may name itself).
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::QueueConfig;
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_queue("jobs-dlq", QueueConfig::default())?;
    ///     txn.create_queue("jobs", QueueConfig::default().dead_letter("jobs-dlq"))
    /// })?;
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn create_queue(&self, name: &str, config: QueueConfig) -> Result<()> {
        names::check("queue", name)?;
        config.check()?;
        let mut queues = self.table(QUEUES)?;
        if queues.get(name)?.is_some() {
            return Err(Error::QueueExists {
                queue: name.to_owned(),
            });
        }
        check_dead_letter_target(&queues, name, &config)?;
        let record = QueueRecord {
            id: self.next_id()?,
            config,
            next_seq: 0,
            ready: 0,
            in_flight: 0,
            delayed: 0,
            dead_lettered: 0,
            fifo_head: 0,
        };
        queues.insert(name, codec::encode_queue(&record).as_slice())?;
        Ok(())
    }

    /// Creates a queue unless one of that name exists; returns whether it created one.
    ///
    /// # Errors
    ///
    /// As [`WriteTransaction::create_queue`], except [`Error::QueueExists`].
    pub fn ensure_queue(&self, name: &str, config: QueueConfig) -> Result<bool> {
        match self.create_queue(name, config) {
            Ok(()) => Ok(true),
            Err(Error::QueueExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Replaces a queue's configuration. A new lease length applies to later receives.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`], and the configuration errors of
    /// [`WriteTransaction::create_queue`].
    pub fn configure_queue(&self, name: &str, config: QueueConfig) -> Result<()> {
        config.check()?;
        let mut queues = self.table(QUEUES)?;
        let mut record = load(&queues, name)?;
        check_dead_letter_target(&queues, name, &config)?;
        record.config = config;
        queues.insert(name, codec::encode_queue(&record).as_slice())?;
        Ok(())
    }

    /// Deletes a queue with its messages and the bindings into it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`]; [`Error::QueueInUse`] while another queue dead-letters into it.
    pub fn delete_queue(&self, name: &str) -> Result<()> {
        write_unwritten(self)?;
        let mut queues = self.table(QUEUES)?;
        let record = load(&queues, name)?;
        for entry in queues.iter()? {
            let (key, value) = entry?;
            let other = codec::decode_queue(value.value())?;
            if key.value() != name && other.config.dead_letter.as_deref() == Some(name) {
                return Err(Error::QueueInUse {
                    queue: name.to_owned(),
                    reason: format!("queue {:?} dead-letters into it", key.value()),
                });
            }
        }
        queues.remove(name)?;
        let id = record.id;
        self.table(QUEUE_ENTRIES)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        self.table(QUEUE_READY)?
            .retain_in((id, 0, 0)..=(id, u8::MAX, u64::MAX), |_, _| false)?;
        self.table(QUEUE_TIMERS)?
            .retain_in((id, 0, 0)..=(id, u64::MAX, u64::MAX), |_, _| false)?;
        self.table(QUEUE_FIFO)?
            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)?;
        routing::remove_queue_bindings(self, name)?;
        Ok(())
    }

    /// Puts a message into a queue directly (not through a topic).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`], [`Error::MessageTooLarge`] and the other message limits,
    /// [`Error::QueueFull`] for a full queue that rejects.
    ///
    /// # Examples
    ///
    /// ```
    /// # let db = mqlite::Database::in_memory()?;
    /// # db.write(|txn| txn.create_queue("jobs", Default::default()))?;
    /// db.write(|txn| txn.enqueue("jobs", &mqlite::Message::new("resize 42.png")))?;
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn enqueue(&self, queue: &str, message: &Message) -> Result<()> {
        self.enqueue_with(queue, message, EnqueueOptions::default())
    }

    /// Puts a message into a queue with a delay and a priority.
    ///
    /// # Errors
    ///
    /// As [`WriteTransaction::enqueue`], plus [`Error::LimitExceeded`] for a priority above
    /// [`MAX_PRIORITY`].
    pub fn enqueue_with(
        &self,
        queue: &str,
        message: &Message,
        options: EnqueueOptions,
    ) -> Result<()> {
        check_message(message, &self.shared.limits)?;
        enqueue_with(self, queue, message, options)
    }

    /// Leases up to `max` ready messages, highest priority first, FIFO within a priority.
    ///
    /// First moves due timers back to ready: delays that ran out, and leases that expired
    /// (those come back with `redelivered` set). A message already delivered `max_deliveries`
    /// times is dead-lettered instead; an expired one (TTL) likewise. Each delivery count is
    /// written in this transaction, so it counts even if the process dies before the ack.
    /// Acking in the same transaction (receive, do the work through `txn`, ack) is the cheapest
    /// way to consume: the lease is then never written at all.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`], [`Error::LimitExceeded`] when `max` is above the batch limit.
    pub fn receive(&self, queue: &str, max: usize) -> Result<Vec<Delivery>> {
        if max > self.shared.limits.max_batch {
            return Err(Error::LimitExceeded {
                limit: "receive batch size",
                value: max as u64,
                max: self.shared.limits.max_batch as u64,
            });
        }
        write_unwritten(self)?;
        let mut op = QueueOp::open(self, queue)?;
        op.promote_due()?;
        let id = op.id();
        let mut out = Vec::with_capacity(max.min(1024));
        while out.len() < max {
            // One read of each source per round: the ready index (priorities, redeliveries)
            // and the FIFO lane. Higher priorities go first, then the lower sequence.
            // Expired or exhausted heads do not count toward `max`, so another round may
            // follow.
            let want = max - out.len();
            let indexed: Vec<(u8, u64)> = op
                .ready
                .range((id, 0, 0)..=(id, u8::MAX, u64::MAX))?
                .take(want)
                .map(|e| e.map(|(k, _)| (k.value().1, k.value().2)))
                .collect::<Result<_, _>>()?;
            let head = op.record.fifo_head;
            let lane = read_lane(op.lanes()?, id, head, want)?;
            if indexed.is_empty() && lane.is_empty() {
                break;
            }
            // Decide the order on sequences alone (true: from the index), then lease, so
            // that each decoded entry moves once, into its delivery.
            let mut from_index = Vec::with_capacity(want);
            let (mut i, mut l) = (0, 0);
            while from_index.len() < want {
                let index_first = match (indexed.get(i), lane.get(l)) {
                    (Some(&(rank, seq)), Some((lane_seq, _))) => {
                        rank < priority_rank(0) || seq < *lane_seq
                    }
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                if index_first {
                    i += 1;
                } else {
                    l += 1;
                }
                from_index.push(index_first);
            }
            // The index keys taken are the first `i` in index order.
            let seqs: Vec<u64> = op
                .ready
                .extract_from_if((id, 0, 0)..=(id, u8::MAX, u64::MAX), |_, _| true)?
                .take(i)
                .map(|e| e.map(|(k, _)| k.value().2))
                .collect::<Result<_, _>>()?;
            op.record.ready -= seqs.len() as u64;
            let mut entries = op.get_many(&seqs)?.into_iter().zip(seqs);
            let mut lane = lane.into_iter();
            for index_first in from_index {
                let delivery = if index_first {
                    match entries.next() {
                        Some((entry, seq)) => op.lease(seq, entry, false, queue)?,
                        None => return Err(Error::corrupted("queue ready index changed")),
                    }
                } else {
                    match lane.next() {
                        Some((seq, entry)) => {
                            op.take_from_lane(seq);
                            op.lease(seq, Some(entry), true, queue)?
                        }
                        None => return Err(Error::corrupted("queue FIFO lane changed")),
                    }
                };
                out.extend(delivery);
            }
        }
        op.store(self)?;
        Ok(out)
    }

    /// Acknowledges a delivery: the message is deleted.
    ///
    /// A lease that ran out is still accepted as long as the message was not delivered again.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] when the message was delivered again or already settled; nothing
    /// changes. [`Error::UnknownQueue`].
    pub fn ack(&self, lease: &Lease) -> Result<()> {
        self.ack_many(std::slice::from_ref(lease))
    }

    /// Acknowledges several deliveries, opening each queue once: cheaper than one
    /// [`WriteTransaction::ack`] per lease. Every lease is checked before any is applied, so
    /// a refused call changes nothing.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] for the first lease that is stale (or listed twice),
    /// [`Error::UnknownQueue`].
    pub fn ack_many(&self, leases: &[Lease]) -> Result<()> {
        // One run per queue, so that a lease listed twice is found within its run.
        let mut leases: Vec<&Lease> = leases.iter().collect();
        leases.sort_by(|a, b| a.queue.cmp(&b.queue));
        let runs: Vec<&[&Lease]> = leases.chunk_by(|a, b| a.queue == b.queue).collect();
        if runs.len() > 1 {
            // Applying a run closes its queue's tables; check all runs first.
            for run in &runs {
                check_acks(&QueueOp::open(self, &run[0].queue)?, run)?;
            }
        }
        for run in runs {
            let mut op = QueueOp::open(self, &run[0].queue)?;
            let id = op.id();
            let Acks { written, granted } = check_acks(&op, run)?;
            for (seq, head) in &written {
                op.unlist(*seq, head)?;
            }
            {
                let mut unwritten = op.unwritten.lock();
                for (seq, _) in &granted {
                    unwritten.leases.remove(&(id, *seq));
                }
            }
            op.record.in_flight -= granted.len() as u64;
            // An entry leased from the FIFO lane has no entry of its own: the lane's batch
            // goes once the head has passed it.
            let mut gone: Vec<u64> = granted
                .iter()
                .filter(|(_, in_lane)| !in_lane)
                .map(|(seq, _)| *seq)
                .chain(written.iter().map(|(seq, _)| *seq))
                .collect();
            op.remove_many(&mut gone)?;
            op.store(self)?;
        }
        Ok(())
    }

    /// Gives a delivery back: requeue now, requeue after a delay, or dead-letter. A requeue of
    /// a message that has used up its deliveries dead-letters it (reason `delivery_limit`).
    ///
    /// # Errors
    ///
    /// As [`WriteTransaction::ack`].
    pub fn nack(&self, lease: &Lease, action: Nack) -> Result<()> {
        write_unwritten(self)?;
        let mut op = QueueOp::open(self, &lease.queue)?;
        let mut entry = op.leased(lease)?;
        op.unlist(lease.sequence, &entry.head())?;
        let exhausted = entry.delivery_count >= op.record.config.max_deliveries;
        match action {
            Nack::DeadLetter => {
                op.dead_letter(lease.sequence, entry, DeathReason::Rejected)?;
            }
            _ if exhausted => {
                op.dead_letter(lease.sequence, entry, DeathReason::DeliveryLimit)?;
            }
            Nack::Requeue => {
                entry.state = EntryState::Ready;
                entry.due_ms = op.now_ms;
                op.list(lease.sequence, &entry)?;
            }
            Nack::RequeueAfter(delay_ms) => {
                entry.state = EntryState::Delayed;
                entry.due_ms = op.now_ms.saturating_add(delay_ms);
                op.list(lease.sequence, &entry)?;
            }
        }
        op.store(self)?;
        self.mark_published();
        Ok(())
    }

    /// Extends a lease to `lease_ms` from now; returns the new expiry.
    ///
    /// # Errors
    ///
    /// As [`WriteTransaction::ack`], plus [`Error::LimitExceeded`] above [`MAX_LEASE_MS`].
    pub fn extend(&self, lease: &Lease, lease_ms: u64) -> Result<u64> {
        if lease_ms > MAX_LEASE_MS {
            return Err(Error::LimitExceeded {
                limit: "lease length ms",
                value: lease_ms,
                max: MAX_LEASE_MS,
            });
        }
        write_unwritten(self)?;
        let mut op = QueueOp::open(self, &lease.queue)?;
        let mut entry = op.leased(lease)?;
        op.unlist(lease.sequence, &entry.head())?;
        entry.due_ms = op.now_ms.saturating_add(lease_ms);
        op.list(lease.sequence, &entry)?;
        op.store(self)?;
        Ok(entry.due_ms)
    }

    /// Moves up to `max` messages from a dead-letter queue back to the queue each came from
    /// (its last death), with a fresh delivery count; they keep their death history. Returns
    /// how many moved. Messages whose source queue no longer exists stay, and so do those a
    /// full source queue would refuse (see [`WriteTransaction::enqueue`]).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`].
    pub fn redrive(&self, dead_letter_queue: &str, max: usize) -> Result<u64> {
        write_unwritten(self)?;
        let mut op = QueueOp::open(self, dead_letter_queue)?;
        op.unlane()?;
        let id = op.id();
        let mut moved = 0;
        let candidates: Vec<u64> = op
            .ready
            .range((id, 0, 0)..=(id, u8::MAX, u64::MAX))?
            .map(|e| e.map(|(k, _)| k.value().2))
            .collect::<Result<_, _>>()?;
        let mut targets = Vec::new();
        // Each source queue's record (read once) and how many it takes so far: a message goes
        // only if its queue has room for it after those, so that every insert below succeeds.
        let mut taken: HashMap<String, Option<(QueueRecord, u64)>> = HashMap::new();
        for seq in candidates {
            if targets.len() >= max {
                break;
            }
            let Some(entry) = op.get(seq)? else { continue };
            let Some(source) = entry.deaths.last().map(|d| d.queue.clone()) else {
                continue;
            };
            if source == dead_letter_queue {
                continue;
            }
            if !taken.contains_key(&source) {
                let record = match current_record(self, &source) {
                    Ok(record) => Some((record, 0)),
                    Err(Error::UnknownQueue { .. }) => None,
                    Err(e) => return Err(e),
                };
                taken.insert(source.clone(), record);
            }
            let Some(Some((record, count))) = taken.get_mut(&source) else {
                continue;
            };
            match check_room_of(self, &source, record, *count + 1) {
                Ok(()) => *count += 1,
                Err(Error::QueueFull { .. }) => continue,
                Err(e) => return Err(e),
            }
            op.unlist(seq, &entry.head())?;
            op.entries.remove((id, seq))?;
            targets.push((source, entry));
        }
        op.store(self)?;
        for (source, entry) in targets {
            let inserted = insert_entry(
                self,
                &source,
                entry.message,
                EnqueueOptions::default(),
                entry.deaths,
            );
            if let Err(e) = inserted {
                // The message already left the dead-letter queue.
                self.break_with(&e);
                return Err(e);
            }
            moved += 1;
        }
        self.mark_published();
        Ok(moved)
    }

    /// Deletes every ready and delayed message of a queue (in-flight ones stay until settled);
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`].
    pub fn purge_queue(&self, queue: &str) -> Result<u64> {
        write_unwritten(self)?;
        let mut op = QueueOp::open(self, queue)?;
        let mut purged = op.drop_lane()?;
        let id = op.id();
        let mut seqs: Vec<u64> = op
            .ready
            .range((id, 0, 0)..=(id, u8::MAX, u64::MAX))?
            .map(|e| e.map(|(k, _)| k.value().2))
            .collect::<Result<_, _>>()?;
        for entry in op.timers.range((id, 0, 0)..=(id, u64::MAX, u64::MAX))? {
            seqs.push(entry?.0.value().2);
        }
        for seq in seqs {
            let Some(entry) = op.get(seq)? else { continue };
            if entry.state == EntryState::InFlight {
                continue;
            }
            op.unlist(seq, &entry.head())?;
            op.entries.remove((id, seq))?;
            purged += 1;
        }
        op.store(self)?;
        Ok(purged)
    }
}

fn check_dead_letter_target(
    queues: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
    config: &QueueConfig,
) -> Result<()> {
    match &config.dead_letter {
        Some(dlq) if dlq != name && queues.get(dlq.as_str())?.is_none() => {
            Err(Error::UnknownQueue { queue: dlq.clone() })
        }
        _ => Ok(()),
    }
}

/// The earliest due timer of a queue, for a blocking receive to wait on.
pub(crate) fn next_due_ms(
    timers: &impl ReadableTable<(u64, u64, u64), ()>,
    queue_id: u64,
) -> Result<Option<u64>> {
    Ok(
        match timers
            .range((queue_id, 0, 0)..=(queue_id, u64::MAX, u64::MAX))?
            .next()
        {
            Some(entry) => Some(entry?.0.value().1),
            None => None,
        },
    )
}

/// A message held by a queue, with its delivery state, as
/// [`ReadTransaction::browse_queue`] shows it without leasing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Its sequence number in the queue (enqueue order).
    pub sequence: u64,
    /// Ready, delayed or in flight.
    pub state: EntryState,
    /// Its priority.
    pub priority: u8,
    /// How many times it has been handed out.
    pub delivery_count: u32,
    /// When a delay or a lease runs out (clock milliseconds); for a ready message, when it
    /// became ready.
    pub due_ms: u64,
    /// When it was enqueued (clock milliseconds).
    pub enqueued_ms: u64,
    /// When its time-to-live runs out, if the queue sets one.
    pub expires_ms: Option<u64>,
    /// Its dead-letter history, oldest first.
    pub deaths: Vec<Death>,
    /// The message.
    pub message: Message,
}

impl QueuedMessage {
    fn from_entry(sequence: u64, e: QueueEntry) -> Self {
        QueuedMessage {
            sequence,
            state: e.state,
            priority: e.priority,
            delivery_count: e.delivery_count,
            due_ms: e.due_ms,
            enqueued_ms: e.enqueued_ms,
            expires_ms: e.expires_ms,
            deaths: e.deaths,
            message: e.message,
        }
    }

    fn into_entry(self) -> QueueEntry {
        QueueEntry {
            message: self.message,
            state: self.state,
            priority: self.priority,
            delivery_count: self.delivery_count,
            due_ms: self.due_ms,
            enqueued_ms: self.enqueued_ms,
            expires_ms: self.expires_ms,
            deaths: self.deaths,
        }
    }
}

impl ReadTransaction {
    /// Up to `max` messages a queue holds, in sequence order from `from_sequence` on, in any
    /// state, without leasing them (RabbitMQ's "get messages" in the management UI, without
    /// the requeue). Use it to inspect a dead-letter queue.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`], [`Error::Corrupted`].
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::{EntryState, Message, QueueConfig};
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_queue("jobs", QueueConfig::default())?;
    ///     txn.enqueue("jobs", &Message::new("a"))
    /// })?;
    /// let held = db.read(|r| r.browse_queue("jobs", 0, 10))?;
    /// assert_eq!(held[0].state, EntryState::Ready);
    /// assert_eq!(held[0].message.payload, b"a");
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn browse_queue(
        &self,
        queue: &str,
        from_sequence: u64,
        max: usize,
    ) -> Result<Vec<QueuedMessage>> {
        let record = load(&self.table(QUEUES)?, queue)?;
        let entries = self.table(QUEUE_ENTRIES)?;
        let mut lane = match self.fifo_table()? {
            Some(fifo) => read_lane(&fifo, record.id, from_sequence.max(record.fifo_head), max)?,
            None => Vec::new(),
        }
        .into_iter()
        .peekable();
        let mut out: Vec<QueuedMessage> = Vec::new();
        for entry in entries
            .range((record.id, from_sequence)..=(record.id, u64::MAX))?
            .take(max)
        {
            let (key, value) = entry?;
            let (queue_id, sequence) = key.value();
            // A damaged key can break the tree's order; report it rather than loop on it.
            if queue_id != record.id
                || sequence < from_sequence
                || out.last().is_some_and(|m| m.sequence >= sequence)
            {
                return Err(Error::corrupted(format!(
                    "queue {queue:?}: entry keys out of order at {sequence}"
                )));
            }
            while let Some((seq, e)) = lane.next_if(|(seq, _)| *seq < sequence) {
                out.push(QueuedMessage::from_entry(seq, e));
            }
            out.push(QueuedMessage::from_entry(
                sequence,
                codec::decode_entry(value.value())?,
            ));
        }
        out.extend(lane.map(|(seq, e)| QueuedMessage::from_entry(seq, e)));
        out.truncate(max);
        Ok(out)
    }
}

/// Sets a freshly created queue's counters for an import.
pub(crate) fn restore_counters(
    txn: &WriteTransaction<'_>,
    queue: &str,
    next_sequence: u64,
    dead_lettered: u64,
) -> Result<()> {
    let mut queues = txn.table(QUEUES)?;
    let mut record = load(&queues, queue)?;
    record.next_seq = next_sequence;
    record.dead_lettered = dead_lettered;
    queues.insert(queue, codec::encode_queue(&record).as_slice())?;
    Ok(())
}

/// Stores imported messages in their states, below the queue's next sequence and each
/// after the last one stored.
pub(crate) fn restore_entries(
    txn: &WriteTransaction<'_>,
    queue: &str,
    messages: Vec<QueuedMessage>,
) -> Result<()> {
    let limits = txn.shared.limits;
    let mut op = QueueOp::open(txn, queue)?;
    let mut floor = match op
        .entries
        .range((op.id(), 0)..=(op.id(), u64::MAX))?
        .next_back()
    {
        Some(entry) => entry?.0.value().1 + 1,
        None => 0,
    };
    for m in messages {
        check_message(&m.message, &limits)?;
        if m.sequence < floor || m.sequence >= op.record.next_seq {
            return Err(Error::InvalidConfig(format!(
                "queue {queue:?}: sequence {} out of order or past the next sequence {}",
                m.sequence, op.record.next_seq
            )));
        }
        if m.priority > MAX_PRIORITY {
            return Err(Error::LimitExceeded {
                limit: "priority",
                value: u64::from(m.priority),
                max: u64::from(MAX_PRIORITY),
            });
        }
        floor = m.sequence + 1;
        let seq = m.sequence;
        op.list(seq, &m.into_entry())?;
    }
    op.store(txn)
}
