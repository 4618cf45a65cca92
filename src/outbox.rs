//! The transactional outbox: messages bound for an external broker, written in the caller's
//! transaction and relayed in commit order by a [`Relay`](crate::Relay).
//!
//! Pending rows live in `mqlite_outbox` under a sequence number assigned inside the single
//! writer, so sequence order is commit order. A row that failed too often is parked in
//! `mqlite_outbox_parked`, where it stays visible until re-driven. A delivered row is deleted in
//! the same small transaction that records the delivery.

use redb::{ReadableTable, ReadableTableMetadata};

use crate::codec::{self, OutboxRecord};
use crate::error::Result;
use crate::message::{Message, check_message};
use crate::routing::check_routing_key;
use crate::schema::{META, META_OUTBOX_NEXT, OUTBOX, OUTBOX_PARKED};
use crate::txn::{ReadTransaction, WriteTransaction};

/// One outbox row, as the relay hands it to a sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Position in the outbox: commit order.
    pub sequence: u64,
    /// Where the broker should put it: a subject, routing key or topic, translated per sink.
    pub destination: String,
    /// The message; its id travels to the broker for duplicate detection.
    pub message: Message,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last failure, empty if none.
    pub last_error: String,
    /// Not to be tried before this clock time (0 for a row never tried).
    pub next_attempt_ms: u64,
}

/// The outbox's state, as of one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxInfo {
    /// Rows waiting to be relayed.
    pub backlog: u64,
    /// Creation time of the oldest waiting row (clock milliseconds).
    pub oldest_pending_ms: Option<u64>,
    /// Rows parked after too many failures.
    pub parked: u64,
    /// The head row's last failure, if it failed.
    pub last_error: Option<String>,
}

fn to_message(sequence: u64, r: OutboxRecord) -> OutboxMessage {
    OutboxMessage {
        sequence,
        destination: r.destination,
        message: r.message,
        attempts: r.attempts,
        last_error: r.last_error,
        next_attempt_ms: r.next_attempt_ms,
    }
}

fn read_rows(
    table: &impl ReadableTable<u64, &'static [u8]>,
    max: usize,
) -> Result<Vec<(u64, OutboxRecord)>> {
    let mut out = Vec::new();
    for entry in table.iter()?.take(max) {
        let (key, value) = entry?;
        out.push((key.value(), codec::decode_outbox(value.value())?));
    }
    Ok(out)
}

impl WriteTransaction<'_> {
    /// Puts a message in the outbox for `destination`, to be relayed after this transaction
    /// commits, in commit order. If the transaction fails, the message is never relayed.
    ///
    /// # Errors
    ///
    /// The message limits ([`Error::MessageTooLarge`](crate::Error::MessageTooLarge) and the like),
    /// [`Error::InvalidRoutingKey`](crate::Error::InvalidRoutingKey) for a destination over 255 bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::redb::TableDefinition;
    /// const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.open_table(ORDERS)?.insert(7, "created")?;
    ///     txn.outbox_put("orders.created", &mqlite::Message::new("order 7"))
    /// })?;
    /// assert_eq!(db.read(|r| r.outbox_info())?.backlog, 1);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn outbox_put(&self, destination: &str, message: &Message) -> Result<u64> {
        check_message(message, &self.shared.limits)?;
        check_routing_key(destination)?;
        let mut message = message.clone();
        if message.timestamp_ms == 0 {
            message.timestamp_ms = self.now_ms();
        }
        let record = OutboxRecord {
            destination: destination.to_owned(),
            message,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: String::new(),
        };
        let sequence = self.next_counter(META_OUTBOX_NEXT)?;
        self.table(OUTBOX)?
            .insert(sequence, codec::encode_outbox(&record).as_slice())?;
        self.mark_published();
        Ok(sequence)
    }

    /// Marks relayed rows delivered: they are deleted. Unknown sequences are ignored (a
    /// relay that re-sent after a crash marks them again).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn outbox_delivered(&self, sequences: &[u64]) -> Result<()> {
        let mut table = self.table(OUTBOX)?;
        for &sequence in sequences {
            table.remove(sequence)?;
        }
        Ok(())
    }

    /// Records a failed attempt on a pending row: the relay retries it at `retry_at_ms`, or, with
    /// `park`, moves it to the parked rows so those behind it can flow.
    ///
    /// # Errors
    ///
    /// Storage errors; [`Error::Corrupted`](crate::Error::Corrupted).
    pub fn outbox_failed(
        &self,
        sequence: u64,
        error: &str,
        retry_at_ms: u64,
        park: bool,
    ) -> Result<()> {
        let mut table = self.table(OUTBOX)?;
        // Decoded before it is removed: a damaged row is reported and stays.
        let mut record = match table.get(sequence)? {
            Some(value) => codec::decode_outbox(value.value())?,
            None => return Ok(()),
        };
        if park {
            table.remove(sequence)?;
        }
        record.attempts = record.attempts.saturating_add(1);
        record.last_error = error.chars().take(1024).collect();
        record.next_attempt_ms = retry_at_ms;
        let bytes = codec::encode_outbox(&record);
        if park {
            self.table(OUTBOX_PARKED)?
                .insert(sequence, bytes.as_slice())?;
        } else {
            table.insert(sequence, bytes.as_slice())?;
        }
        Ok(())
    }

    /// Moves up to `max` parked rows back to the end of the outbox (in their original order)
    /// with their attempts reset; returns how many.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn outbox_redrive(&self, max: usize) -> Result<u64> {
        let rows = read_rows(&self.table(OUTBOX_PARKED)?, max)?;
        let mut parked = self.table(OUTBOX_PARKED)?;
        let mut moved = 0;
        for (sequence, mut record) in rows {
            parked.remove(sequence)?;
            record.attempts = 0;
            record.next_attempt_ms = 0;
            let next = self.next_counter(META_OUTBOX_NEXT)?;
            self.table(OUTBOX)?
                .insert(next, codec::encode_outbox(&record).as_slice())?;
            moved += 1;
        }
        if moved > 0 {
            self.mark_published();
        }
        Ok(moved)
    }

    /// Increments a u64 counter in the meta table; returns the value before.
    pub(crate) fn next_counter(&self, key: &str) -> Result<u64> {
        let mut meta = self.table(META)?;
        let value = match meta.get(key)? {
            Some(v) => codec::decode_u64(v.value(), "meta counter")?,
            None => 0,
        };
        meta.insert(key, value.saturating_add(1).to_le_bytes().as_slice())?;
        Ok(value)
    }
}

impl ReadTransaction {
    /// Up to `max` pending outbox rows, in commit order.
    ///
    /// # Errors
    ///
    /// Storage errors, [`Error::Corrupted`](crate::Error::Corrupted).
    pub fn outbox_pending(&self, max: usize) -> Result<Vec<OutboxMessage>> {
        let rows = read_rows(&self.table(OUTBOX)?, max)?;
        Ok(rows.into_iter().map(|(s, r)| to_message(s, r)).collect())
    }

    /// Up to `max` parked outbox rows, oldest first.
    ///
    /// # Errors
    ///
    /// Storage errors, [`Error::Corrupted`](crate::Error::Corrupted).
    pub fn outbox_parked(&self, max: usize) -> Result<Vec<OutboxMessage>> {
        let rows = read_rows(&self.table(OUTBOX_PARKED)?, max)?;
        Ok(rows.into_iter().map(|(s, r)| to_message(s, r)).collect())
    }

    /// The outbox backlog, its oldest row's age, the parked count and the last error.
    ///
    /// # Errors
    ///
    /// Storage errors, [`Error::Corrupted`](crate::Error::Corrupted).
    pub fn outbox_info(&self) -> Result<OutboxInfo> {
        let table = self.table(OUTBOX)?;
        let head = read_rows(&table, 1)?.pop();
        Ok(OutboxInfo {
            backlog: table.len()?,
            oldest_pending_ms: head.as_ref().map(|(_, r)| r.message.timestamp_ms),
            parked: self.table(OUTBOX_PARKED)?.len()?,
            last_error: head.map(|(_, r)| r.last_error).filter(|e| !e.is_empty()),
        })
    }
}
