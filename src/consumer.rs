//! Blocking consumption: topic consumers that poll, queue receivers that wait.

use std::time::Duration;

use crate::db::Database;
use crate::dedup::{DEFAULT_DEDUP_TTL_MS, Dedup};
use crate::error::{Error, Result};
use crate::queue::{self, Delivery};
use crate::schema::{QUEUE_TIMERS, QUEUES};
use crate::topic::{Record, StartAt};
use crate::txn::WriteTransaction;

/// A consumer group member reading a topic, Kafka style: it keeps a position in memory, reads
/// from it with [`Consumer::poll`], and stores it with [`Consumer::commit`] (or inside a
/// transaction with [`WriteTransaction::commit_offset`](crate::WriteTransaction::commit_offset),
/// together with the effect of the messages).
///
/// Several consumers of one group share the committed offset, not the messages: each reads
/// from its own position. Use a [queue](crate::QueueConfig) for competing consumers.
///
/// # Examples
///
/// ```
/// use mqlite::{Database, Message, StartAt, TopicConfig};
/// use std::time::Duration;
/// let db = Database::in_memory()?;
/// db.write(|txn| txn.create_topic("t", TopicConfig::default()))?;
/// let mut consumer = db.consumer("t", "g", StartAt::Earliest)?;
/// let db2 = db.clone();
/// let producer = std::thread::spawn(move || db2.write(|txn| txn.publish("t", &Message::new("x"))));
/// let records = consumer.poll(100, Duration::from_secs(5))?; // woken by the commit
/// assert_eq!(records.len(), 1);
/// # producer.join().unwrap()?;
/// # Ok::<(), mqlite::Error>(())
/// ```
#[derive(Debug)]
pub struct Consumer {
    db: Database,
    topic: String,
    group: String,
    position: u64,
    /// The record batch the last poll stopped in.
    cursor: Option<crate::topic::LogCursor>,
}

impl Database {
    /// A consumer for `group` on `topic`. Creates the group at `start` (durably) if it has no
    /// committed offset; otherwise resumes from the committed offset and ignores `start`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], [`Error::InvalidName`], storage errors.
    pub fn consumer(&self, topic: &str, group: &str, start: StartAt) -> Result<Consumer> {
        let position = self.write(|txn| txn.create_group(topic, group, start))?;
        Ok(Consumer {
            db: self.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            position,
            cursor: None,
        })
    }

    /// Leases up to `max` messages from a queue, waiting up to `timeout` for the first one.
    ///
    /// Wakes at once when a commit in this process makes a message ready, when a delayed
    /// message comes due, or when a lease expires; returns an empty vector on timeout.
    /// See [`WriteTransaction::receive`](crate::WriteTransaction::receive).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownQueue`], [`Error::LimitExceeded`], storage errors.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_queue("jobs", Default::default())?;
    ///     txn.enqueue("jobs", &mqlite::Message::new("job 1"))
    /// })?;
    /// let deliveries = db.receive("jobs", 10, Duration::from_secs(1))?;
    /// db.write(|txn| txn.ack(&deliveries[0].lease))?;
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn receive(&self, queue: &str, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.receive_until(queue, max, timeout, &|| false)
    }

    /// [`Database::receive`] that also gives up, with nothing, once `stop` says so (checked at
    /// every wake-up).
    pub(crate) fn receive_until(
        &self,
        queue: &str,
        max: usize,
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Delivery>> {
        let found = self.wait_for(timeout, || {
            if stop() {
                return Ok((Some(Vec::new()), None));
            }
            let deliveries = self.write(|txn| txn.receive(queue, max))?;
            if !deliveries.is_empty() {
                return Ok((Some(deliveries), None));
            }
            let next_due = self.read(|r| {
                let record = queue::load(&r.table(QUEUES)?, queue)?;
                queue::next_due_ms(&r.table(QUEUE_TIMERS)?, record.id)
            })?;
            Ok((None, next_due))
        })?;
        Ok(found.unwrap_or_default())
    }
}

/// What an idempotent `process` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessReport {
    /// Messages whose handler ran and committed.
    pub handled: u64,
    /// Messages skipped because their id was already recorded (a redelivery or a replay).
    pub duplicates: u64,
}

impl Database {
    /// The idempotent consumer for a queue: receives up to `max` messages (waiting up to
    /// `timeout` for the first), and for each one runs `handler` in a transaction that also
    /// records the message id in the dedup table (scope = the queue name) and acks it. So the
    /// handler's effect, the dedup mark and the ack land in one commit: exactly-once effects in
    /// the file. A message whose id is already recorded is acked without running the handler.
    /// The batch commits as one transaction; if a handler fails, it is redone one message per
    /// transaction (so handlers may run twice, and must act only through `txn`).
    ///
    /// # Errors
    ///
    /// The handler's error stops the call; that message's transaction rolls back (no effect, no
    /// mark, no ack) and it is delivered again when its lease runs out. The ones before it stay
    /// committed.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::time::Duration;
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_queue("jobs", Default::default())?;
    ///     txn.enqueue("jobs", &mqlite::Message::new("job"))
    /// })?;
    /// let report = db.process_queue("jobs", 10, Duration::ZERO, |_txn, delivery| {
    ///     assert_eq!(delivery.message.payload, b"job"); // write the effect through _txn
    ///     Ok::<(), mqlite::Error>(())
    /// })?;
    /// assert_eq!(report.handled, 1);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn process_queue<E: From<Error>>(
        &self,
        queue: &str,
        max: usize,
        timeout: Duration,
        mut handler: impl FnMut(&WriteTransaction<'_>, &Delivery) -> Result<(), E>,
    ) -> Result<ProcessReport, E> {
        let deliveries = self.receive(queue, max, timeout)?;
        // Fast path: the whole batch in one commit. If a handler fails, that commit rolls back
        // and the batch is redone one message per commit, so the failure stops at its message.
        let leases: Vec<_> = deliveries.iter().map(|d| d.lease.clone()).collect();
        let whole = self.write(|txn| {
            let mut report = ProcessReport::default();
            for delivery in &deliveries {
                run_handler(txn, queue, delivery, &mut report, &mut handler)?;
            }
            txn.ack_many(&leases)?;
            Ok::<_, E>(report)
        });
        if let Ok(report) = whole {
            return Ok(report);
        }
        let mut report = ProcessReport::default();
        for delivery in &deliveries {
            self.write(|txn| {
                let mut one = ProcessReport::default();
                run_handler(txn, queue, delivery, &mut one, &mut handler)?;
                txn.ack(&delivery.lease)?;
                Ok::<_, E>(one)
            })
            .map(|one| {
                report.handled += one.handled;
                report.duplicates += one.duplicates;
            })?;
        }
        Ok(report)
    }
}

/// Runs the handler for a delivery unless its id was seen, and records the id.
fn run_handler<E: From<Error>>(
    txn: &WriteTransaction<'_>,
    scope: &str,
    delivery: &Delivery,
    report: &mut ProcessReport,
    handler: &mut impl FnMut(&WriteTransaction<'_>, &Delivery) -> Result<(), E>,
) -> Result<(), E> {
    if txn.dedup(scope, delivery.message.id, DEFAULT_DEDUP_TTL_MS)? == Dedup::New {
        handler(txn, delivery)?;
        report.handled += 1;
    } else {
        report.duplicates += 1;
    }
    Ok(())
}

impl Consumer {
    /// The idempotent consumer for a topic: polls up to `max` records and, for each, runs
    /// `handler` in a transaction that also records the message id in the dedup table (scope =
    /// the group name) and commits the group's offset past it. A replayed id is skipped (its
    /// offset still commits).
    ///
    /// # Errors
    ///
    /// The handler's error stops the call, rolls back that record's transaction and moves the
    /// position back to it, so the next call retries it.
    pub fn process<E: From<Error>>(
        &mut self,
        max: usize,
        timeout: Duration,
        mut handler: impl FnMut(&WriteTransaction<'_>, &Record) -> Result<(), E>,
    ) -> Result<ProcessReport, E> {
        let records = self.poll(max, timeout)?;
        let (topic, group) = (self.topic.clone(), self.group.clone());
        let settle = |txn: &WriteTransaction<'_>,
                      record: &Record,
                      report: &mut ProcessReport,
                      handler: &mut dyn FnMut(&WriteTransaction<'_>, &Record) -> Result<(), E>|
         -> Result<(), E> {
            if txn.dedup(&group, record.message.id, DEFAULT_DEDUP_TTL_MS)? == Dedup::New {
                handler(txn, record)?;
                report.handled += 1;
            } else {
                report.duplicates += 1;
            }
            txn.commit_offset(&topic, &group, record.offset + 1)?;
            Ok(())
        };
        // Fast path: the whole batch in one commit; on a failure, one record per commit.
        let whole = self.db.write(|txn| {
            let mut report = ProcessReport::default();
            for record in &records {
                settle(txn, record, &mut report, &mut handler)?;
            }
            Ok::<_, E>(report)
        });
        if let Ok(report) = whole {
            return Ok(report);
        }
        let mut report = ProcessReport::default();
        for record in &records {
            let one = self.db.write(|txn| {
                let mut one = ProcessReport::default();
                settle(txn, record, &mut one, &mut handler)?;
                Ok::<_, E>(one)
            });
            match one {
                Ok(one) => {
                    report.handled += one.handled;
                    report.duplicates += one.duplicates;
                }
                Err(e) => {
                    self.position = record.offset;
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    /// Reads up to `max` messages from the current position, waiting up to `timeout` for the
    /// first one, and advances the position past what it returns. A position below the oldest
    /// stored message (removed by retention) moves up to it.
    ///
    /// Small polls are cheap: the consumer keeps the record batch its last poll stopped in,
    /// and a poll from that position reads on inside it, without looking the batch up again,
    /// checksumming it again or stepping over the messages it returned already.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`] (the topic was deleted), [`Error::Corrupted`], storage errors.
    pub fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>> {
        let (topic, position, cursor) = (&self.topic, self.position, &mut self.cursor);
        let found = self.db.wait_for(timeout, || {
            let records = self
                .db
                .read(|r| r.read_topic_on(topic, position, max, cursor))?;
            Ok(((!records.is_empty()).then_some(records), None))
        })?;
        let records = found.unwrap_or_default();
        if let Some(last) = records.last() {
            self.position = last.offset + 1;
        }
        Ok(records)
    }

    /// Durably stores the current position as the group's committed offset.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], storage errors.
    pub fn commit(&self) -> Result<()> {
        self.db
            .write(|txn| txn.commit_offset(&self.topic, &self.group, self.position))
    }

    /// The next offset [`Consumer::poll`] reads.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Moves the position (not the committed offset) to `offset`.
    pub fn seek(&mut self, offset: u64) {
        self.position = offset;
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Messages stored after the current position.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`].
    pub fn lag(&self) -> Result<u64> {
        let info = self.db.read(|r| r.topic_info(&self.topic))?;
        Ok(info.next_offset - self.position.clamp(info.first_offset, info.next_offset))
    }
}

impl From<std::convert::Infallible> for Error {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}
