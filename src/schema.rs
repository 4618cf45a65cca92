//! The only place that names redb tables and lays out their keys.
//!
//! Every table name starts with `mqlite_`; user tables may not (see
//! [`Error::ReservedTableName`](crate::Error::ReservedTableName)). Keys are redb native integers
//! and tuples, so the B-tree order is the order mqlite reads in. Values that are not plain
//! integers are envelopes from [`crate::codec`]. docs/format.md describes every table.

use redb::TableDefinition;

/// The on-disk format this build writes and the newest it reads. Format 1 had no FIFO lane
/// (`mqlite_queue_fifo`); format 2 wrote topic record batches only in layout 1. Format 3
/// writes them in the dense layout 2 and reads both, so a writable open upgrades an older file
/// by creating the lane's table if it is missing and setting the version: a build of an older
/// format then refuses the file rather than meet batches it cannot read.
pub(crate) const FORMAT_VERSION: u32 = 3;

/// The prefix of every table mqlite owns.
pub(crate) const RESERVED_PREFIX: &str = "mqlite_";

/// `meta`: name -> little-endian value. Keys: [`META_FORMAT`], [`META_NEXT_ID`].
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("mqlite_meta");
/// The format version, u32 LE. Its presence is what makes a redb file an mqlite file.
pub(crate) const META_FORMAT: &str = "format_version";
/// The next id for a topic or queue, u64 LE. Ids are never reused.
pub(crate) const META_NEXT_ID: &str = "next_id";
/// The next outbox sequence, u64 LE. Sequences are never reused.
pub(crate) const META_OUTBOX_NEXT: &str = "outbox_next";

/// topic name -> topic envelope (id, config, offsets, stored bytes).
pub(crate) const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("mqlite_topics");
/// (topic id, offset) -> message envelope.
pub(crate) const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("mqlite_log");
/// (topic id, append time ms) -> the first offset appended at that millisecond.
pub(crate) const LOG_TIME: TableDefinition<(u64, u64), u64> =
    TableDefinition::new("mqlite_log_time");
/// (topic id, group name) -> the group's committed offset: the next offset it will read.
pub(crate) const GROUPS: TableDefinition<(u64, &str), u64> = TableDefinition::new("mqlite_groups");

/// queue name -> queue envelope (id, config, counters, next sequence).
pub(crate) const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("mqlite_queues");
/// (queue id, sequence) -> queue entry envelope (message, state, delivery count, deaths).
pub(crate) const QUEUE_ENTRIES: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("mqlite_queue_entries");
/// (queue id, sequence of its last entry) -> queue batch envelope: the FIFO lane, a queue's
/// ready messages of the default priority that were never delivered, in record batches. Those
/// from the queue record's `fifo_head` on are ready; the batches wholly below it are deleted.
pub(crate) const QUEUE_FIFO: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("mqlite_queue_fifo");
/// (queue id, 255 - priority, sequence) -> (): the entries ready to be received, in order.
pub(crate) const QUEUE_READY: TableDefinition<(u64, u8, u64), ()> =
    TableDefinition::new("mqlite_queue_ready");
/// (queue id, due ms, sequence) -> (): delayed entries and leases, by when they come due.
pub(crate) const QUEUE_TIMERS: TableDefinition<(u64, u64, u64), ()> =
    TableDefinition::new("mqlite_queue_timers");
/// (topic id, binding sequence) -> binding envelope (queue id, rule).
pub(crate) const BINDINGS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("mqlite_bindings");

/// sequence -> outbox envelope (destination, message, attempts, last error): rows to relay.
pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("mqlite_outbox");
/// sequence -> outbox envelope: rows parked after too many failed attempts.
pub(crate) const OUTBOX_PARKED: TableDefinition<u64, &[u8]> =
    TableDefinition::new("mqlite_outbox_parked");
/// (scope, message id) -> expiry ms.
pub(crate) const DEDUP: TableDefinition<(&str, u128), u64> = TableDefinition::new("mqlite_dedup");
/// (expiry ms, scope, message id) -> (): the dedup entries in expiry order.
pub(crate) const DEDUP_EXPIRY: TableDefinition<(u64, &str, u128), ()> =
    TableDefinition::new("mqlite_dedup_expiry");

/// Ready-table rank of a priority: higher priorities sort first.
pub(crate) fn priority_rank(priority: u8) -> u8 {
    u8::MAX - priority
}
