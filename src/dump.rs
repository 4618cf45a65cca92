//! Export and import: a database's whole mqlite content as JSON lines.
//!
//! One JSON object a line, each with a `type`: a `header`, then every topic followed by its
//! `record`s and `group`s, every queue followed by the messages it holds (`entry`), the
//! `binding`s, the `outbox` rows (pending and parked), the `dedup` entries, and an `end` line
//! that counts the lines, so a truncated export is refused. Bytes (payloads, keys, header
//! values) are a JSON string when they are UTF-8 and `{"hex": "..."}` otherwise. Objects have
//! their keys sorted, so an export of an import of an export is byte-identical to it.
//!
//! The application's own tables are not exported: they are the application's to dump.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};

use redb::{ReadableTable, ReadableTableMetadata};
use serde_json::{Map, Value, json};

use crate::codec::{self, EntryState, OutboxRecord};
use crate::db::Database;
use crate::error::{Error, Result};
use crate::inspect::ReadOnlyDatabase;
use crate::message::{Message, MessageId};
use crate::queue::{self, Death, DeathReason, Overflow, QueueConfig, QueuedMessage};
use crate::routing::{Binding, HeaderMatch};
use crate::schema::{
    DEDUP, DEDUP_EXPIRY, FORMAT_VERSION, META, META_OUTBOX_NEXT, OUTBOX, OUTBOX_PARKED, QUEUES,
    TOPICS,
};
use crate::topic::{self, Retention, TopicConfig};
use crate::txn::{ReadTransaction, WriteTransaction};

/// The version of the export layout; an import refuses a newer one.
const EXPORT_VERSION: u64 = 1;
/// Records or queue entries read or written at a time.
const CHUNK: usize = 1024;

/// What an export or an import covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpReport {
    /// JSON lines written or read, the header and the end line included.
    pub lines: u64,
    /// Topics.
    pub topics: u64,
    /// Topic records.
    pub records: u64,
    /// Queues.
    pub queues: u64,
    /// Messages held by queues.
    pub entries: u64,
    /// Outbox rows, pending and parked.
    pub outbox: u64,
    /// Dedup entries.
    pub dedup: u64,
}

impl Database {
    /// Writes the database's mqlite content (topics with their records and groups, queues
    /// with the messages they hold in their states, bindings, the outbox and the dedup
    /// entries) to `out` as JSON lines, from one consistent snapshot. `progress` is called
    /// with the number of lines written so far, every 1024 lines.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] from `out`; storage errors; [`Error::Corrupted`] for a stored value that
    /// fails its checksum (the export stops there).
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::{Database, Message, TopicConfig};
    /// let db = Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_topic("events", TopicConfig::default())?;
    ///     txn.publish("events", &Message::new("hello"))
    /// })?;
    /// let mut dump = Vec::new();
    /// db.export(&mut dump, |_| {})?;
    ///
    /// let copy = Database::in_memory()?;
    /// copy.import(dump.as_slice(), |_| {})?;
    /// let mut again = Vec::new();
    /// copy.export(&mut again, |_| {})?;
    /// assert_eq!(dump, again);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn export(&self, out: impl Write, progress: impl FnMut(u64)) -> Result<DumpReport> {
        export_snapshot(&self.begin_read()?, out, progress)
    }

    /// Restores an [export](Database::export) into this database, which must hold no topic,
    /// queue, outbox row or dedup entry yet. Everything is restored exactly: offsets, message
    /// ids and timestamps, group offsets, queue messages in their states with their delivery
    /// counts and dead-letter histories, bindings, outbox rows with their attempts, dedup
    /// entries. It is one transaction: on any error nothing is imported. `progress` is called
    /// with the number of lines read so far, every 1024 lines.
    ///
    /// # Errors
    ///
    /// [`Error::Import`] naming the line for a malformed, out-of-order or invalid line, a
    /// missing or wrong `end` line (a truncated export), a newer export version, or a
    /// database that is not empty; [`Error::Io`] from `input`; storage errors.
    ///
    /// # Examples
    ///
    /// ```
    /// let db = mqlite::Database::in_memory()?;
    /// let err = db.import("not json\n".as_bytes(), |_| {}).unwrap_err();
    /// assert!(matches!(err, mqlite::Error::Import { line: 1, .. }));
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn import(&self, input: impl BufRead, mut progress: impl FnMut(u64)) -> Result<DumpReport> {
        self.write_alone(|txn| {
            check_empty(txn)?;
            let mut importer = Importer {
                txn,
                report: DumpReport::default(),
                topic: None,
                queue: None,
                outbox_next: 0,
                outbox_max: None,
                dead_letter_configs: Vec::new(),
                ended: false,
            };
            for (n, line) in input.lines().enumerate() {
                let line_no = n as u64 + 1;
                let line = line?;
                if importer.ended {
                    return Err(import_error(line_no, "a line after the end line"));
                }
                importer.line(line_no, &line).map_err(|e| match e {
                    Error::Import { .. } | Error::Io(_) => e,
                    other => import_error(line_no, other.to_string()),
                })?;
                importer.report.lines = line_no;
                if line_no.is_multiple_of(CHUNK as u64) {
                    progress(line_no);
                }
            }
            if !importer.ended {
                return Err(import_error(
                    importer.report.lines + 1,
                    "no end line: the export is truncated",
                ));
            }
            Ok(importer.report)
        })
    }
}

impl ReadOnlyDatabase {
    /// [`Database::export`] from a read-only handle, for a file another process writes.
    ///
    /// # Errors
    ///
    /// As [`Database::export`].
    pub fn export(&self, out: impl Write, progress: impl FnMut(u64)) -> Result<DumpReport> {
        export_snapshot(&self.begin_read()?, out, progress)
    }
}

fn export_snapshot(
    snapshot: &ReadTransaction,
    out: impl Write,
    progress: impl FnMut(u64),
) -> Result<DumpReport> {
    let mut w = LineWriter {
        out,
        report: DumpReport::default(),
        progress,
    };
    let outbox_next = match snapshot.table(META)?.get(META_OUTBOX_NEXT)? {
        Some(v) => codec::decode_u64(v.value(), "meta outbox_next")?,
        None => 0,
    };
    w.line(json!({
        "type": "header", "mqlite_export": EXPORT_VERSION,
        "format_version": FORMAT_VERSION, "outbox_next": outbox_next,
    }))?;
    let topics = snapshot.topics()?;
    for t in &topics {
        let r = t.config.retention;
        let last_append_ms = topic::load(&snapshot.table(TOPICS)?, &t.name)?.last_append_ms;
        w.line(json!({
            "type": "topic", "name": t.name, "first_offset": t.first_offset,
            "next_offset": t.next_offset, "last_append_ms": last_append_ms,
            "retention": {
                "max_age_ms": r.max_age_ms, "max_messages": r.max_messages,
                "max_bytes": r.max_bytes, "until_consumed": r.until_consumed,
            },
        }))?;
        w.report.topics += 1;
        let mut from = t.first_offset;
        loop {
            let records = snapshot.read_topic(&t.name, from, CHUNK)?;
            // A damaged key could put the last offset at u64::MAX: stop there, never wrap.
            let Some(next) = records.last().and_then(|r| r.offset.checked_add(1)) else {
                break;
            };
            from = next;
            for record in records {
                w.line(json!({
                    "type": "record", "topic": t.name, "offset": record.offset,
                    "message": message_json(&record.message),
                }))?;
                w.report.records += 1;
            }
        }
        for g in snapshot.groups(&t.name)? {
            w.line(json!({
                "type": "group", "topic": t.name, "group": g.group, "committed": g.committed,
            }))?;
        }
    }
    for q in snapshot.queues()? {
        let next_sequence = queue::load(&snapshot.table(QUEUES)?, &q.name)?.next_seq;
        let c = &q.config;
        w.line(json!({
            "type": "queue", "name": q.name, "next_sequence": next_sequence,
            "dead_lettered": q.dead_lettered,
            "config": {
                "lease_ms": c.lease_ms, "max_deliveries": c.max_deliveries,
                "dead_letter": c.dead_letter, "max_length": c.max_length,
                "overflow": overflow_name(c.overflow), "message_ttl_ms": c.message_ttl_ms,
            },
        }))?;
        w.report.queues += 1;
        let mut from = 0;
        loop {
            let held = snapshot.browse_queue(&q.name, from, CHUNK)?;
            let Some(next) = held.last().and_then(|m| m.sequence.checked_add(1)) else {
                break;
            };
            from = next;
            for m in held {
                w.line(entry_json(&q.name, &m))?;
                w.report.entries += 1;
            }
        }
    }
    for t in &topics {
        for b in snapshot.bindings(&t.name)? {
            w.line(json!({
                "type": "binding", "topic": t.name, "queue": b.queue,
                "rule": binding_json(&b.rule),
            }))?;
        }
    }
    for (table, parked) in [(OUTBOX, false), (OUTBOX_PARKED, true)] {
        for row in snapshot.table(table)?.iter()? {
            let (key, value) = row?;
            let o = codec::decode_outbox(value.value())?;
            w.line(json!({
                "type": "outbox", "sequence": key.value(), "parked": parked,
                "destination": o.destination, "attempts": o.attempts,
                "next_attempt_ms": o.next_attempt_ms, "last_error": o.last_error,
                "message": message_json(&o.message),
            }))?;
            w.report.outbox += 1;
        }
    }
    for row in snapshot.table(DEDUP)?.iter()? {
        let (key, expires) = row?;
        let (scope, id) = key.value();
        w.line(json!({
            "type": "dedup", "scope": scope, "id": MessageId(id).to_string(),
            "expires_ms": expires.value(),
        }))?;
        w.report.dedup += 1;
    }
    let lines = w.report.lines + 1;
    w.line(json!({"type": "end", "lines": lines}))?;
    w.out.flush()?;
    Ok(w.report)
}

fn import_error(line: u64, reason: impl Into<String>) -> Error {
    Error::Import {
        line,
        reason: reason.into(),
    }
}

fn check_empty(txn: &WriteTransaction<'_>) -> Result<()> {
    let empty = txn.table(TOPICS)?.is_empty()?
        && txn.table(QUEUES)?.is_empty()?
        && txn.table(OUTBOX)?.is_empty()?
        && txn.table(OUTBOX_PARKED)?.is_empty()?
        && txn.table(DEDUP)?.is_empty()?;
    if empty {
        Ok(())
    } else {
        Err(import_error(
            0,
            "the database already holds topics, queues, outbox rows or dedup entries; import into a new file",
        ))
    }
}

struct LineWriter<W, P> {
    out: W,
    report: DumpReport,
    progress: P,
}

impl<W: Write, P: FnMut(u64)> LineWriter<W, P> {
    fn line(&mut self, value: Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, &value)?;
        self.out.write_all(b"\n")?;
        self.report.lines += 1;
        if self.report.lines.is_multiple_of(CHUNK as u64) {
            (self.progress)(self.report.lines);
        }
        Ok(())
    }
}

/// The topic whose records are being imported: they must follow it, gap-free.
struct OpenTopic {
    name: String,
    next_offset: u64,
    expected: u64,
    buffered_from: u64,
    buffer: Vec<Message>,
    records_closed: bool,
}

struct OpenQueue {
    name: String,
    buffer: Vec<QueuedMessage>,
}

struct Importer<'a, 'db> {
    txn: &'a WriteTransaction<'db>,
    report: DumpReport,
    topic: Option<OpenTopic>,
    queue: Option<OpenQueue>,
    outbox_next: u64,
    outbox_max: Option<u64>,
    /// Queues whose dead-letter target is set once every queue exists.
    dead_letter_configs: Vec<(String, QueueConfig)>,
    ended: bool,
}

impl Importer<'_, '_> {
    fn line(&mut self, line_no: u64, line: &str) -> Result<()> {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| import_error(line_no, format!("not JSON: {e}")))?;
        let obj = Obj(value
            .as_object()
            .ok_or_else(|| import_error(line_no, "not a JSON object"))?);
        let kind = obj.str("type")?;
        if line_no == 1 {
            return self.header(&obj, kind);
        }
        if kind != "record" {
            self.close_records()?;
            if kind != "group" {
                self.topic = None;
            }
        }
        if kind != "entry" {
            self.flush_queue()?;
            self.queue = None;
        }
        match kind {
            "topic" => self.topic_line(&obj),
            "record" => self.record(&obj),
            "group" => {
                let topic = obj.str("topic")?;
                match &self.topic {
                    Some(open) if open.name == topic => {}
                    _ => return Err(Error::InvalidConfig("a group must follow its topic".into())),
                }
                topic::restore_group(self.txn, topic, obj.str("group")?, obj.u64("committed")?)
            }
            "queue" => self.queue_line(&obj),
            "entry" => self.entry(&obj),
            "binding" => {
                let rule = binding_from(obj.get("rule")?)?;
                self.txn.bind(obj.str("topic")?, obj.str("queue")?, rule)
            }
            "outbox" => self.outbox(&obj),
            "dedup" => {
                let scope = obj.str("scope")?;
                crate::names::check("scope", scope)?;
                let id = parse_id(obj.str("id")?)?;
                let expires = obj.u64("expires_ms")?;
                self.txn.table(DEDUP)?.insert((scope, id.0), expires)?;
                self.txn
                    .table(DEDUP_EXPIRY)?
                    .insert((expires, scope, id.0), ())?;
                self.report.dedup += 1;
                Ok(())
            }
            "end" => {
                if obj.u64("lines")? != line_no {
                    return Err(import_error(
                        line_no,
                        "the end line counts a different number of lines",
                    ));
                }
                if let Some(max) = self.outbox_max
                    && self.outbox_next <= max
                {
                    return Err(import_error(
                        line_no,
                        "the header's outbox_next is not past every outbox row",
                    ));
                }
                for (queue, config) in std::mem::take(&mut self.dead_letter_configs) {
                    self.txn.configure_queue(&queue, config)?;
                }
                self.txn
                    .table(META)?
                    .insert(META_OUTBOX_NEXT, self.outbox_next.to_le_bytes().as_slice())?;
                self.ended = true;
                self.report.lines = line_no;
                Ok(())
            }
            "header" => Err(import_error(line_no, "a second header")),
            other => Err(import_error(
                line_no,
                format!("unknown line type {other:?}"),
            )),
        }
    }

    fn header(&mut self, obj: &Obj<'_>, kind: &str) -> Result<()> {
        if kind != "header" {
            return Err(import_error(
                1,
                "the first line is not an mqlite export header",
            ));
        }
        let version = obj.u64("mqlite_export")?;
        if version > EXPORT_VERSION {
            return Err(import_error(
                1,
                format!("export version {version} is newer than the supported {EXPORT_VERSION}"),
            ));
        }
        self.outbox_next = obj.u64("outbox_next")?;
        Ok(())
    }

    fn topic_line(&mut self, obj: &Obj<'_>) -> Result<()> {
        let name = obj.str("name")?;
        let r = Obj::of(obj.get("retention")?)?;
        let retention = Retention {
            max_age_ms: r.opt_u64("max_age_ms")?,
            max_messages: r.opt_u64("max_messages")?,
            max_bytes: r.opt_u64("max_bytes")?,
            until_consumed: r.bool("until_consumed")?,
        };
        self.txn
            .create_topic(name, TopicConfig::default().retention(retention))?;
        let first = obj.u64("first_offset")?;
        let next = obj.u64("next_offset")?;
        topic::restore_extent(self.txn, name, first, next, obj.u64("last_append_ms")?)?;
        self.report.topics += 1;
        self.topic = Some(OpenTopic {
            name: name.to_owned(),
            next_offset: next,
            expected: first,
            buffered_from: first,
            buffer: Vec::new(),
            records_closed: false,
        });
        Ok(())
    }

    fn record(&mut self, obj: &Obj<'_>) -> Result<()> {
        let topic = obj.str("topic")?;
        let offset = obj.u64("offset")?;
        let message = message_from(obj.get("message")?)?;
        let open = match &mut self.topic {
            Some(open) if open.name == topic && !open.records_closed => open,
            _ => {
                return Err(Error::InvalidConfig(
                    "a record must follow its topic's line, before its groups".into(),
                ));
            }
        };
        if offset != open.expected {
            return Err(Error::InvalidConfig(format!(
                "record offset {offset} where {} was expected (records are gap-free)",
                open.expected
            )));
        }
        open.expected += 1;
        open.buffer.push(message);
        self.report.records += 1;
        if open.buffer.len() >= CHUNK {
            self.flush_topic()?;
        }
        Ok(())
    }

    fn flush_topic(&mut self) -> Result<()> {
        if let Some(open) = &mut self.topic
            && !open.buffer.is_empty()
        {
            topic::restore_records(self.txn, &open.name, open.buffered_from, &open.buffer)?;
            open.buffered_from = open.expected;
            open.buffer.clear();
        }
        Ok(())
    }

    /// At the first line after a topic's records: stores the buffered ones and checks that
    /// every record up to the topic's end came.
    fn close_records(&mut self) -> Result<()> {
        self.flush_topic()?;
        if let Some(open) = &mut self.topic
            && !open.records_closed
        {
            open.records_closed = true;
            if open.expected != open.next_offset {
                return Err(Error::InvalidConfig(format!(
                    "topic {:?}: records end at {} but the topic ends at {}",
                    open.name, open.expected, open.next_offset
                )));
            }
        }
        Ok(())
    }

    fn queue_line(&mut self, obj: &Obj<'_>) -> Result<()> {
        let name = obj.str("name")?;
        let c = Obj::of(obj.get("config")?)?;
        let config = QueueConfig {
            lease_ms: c.u64("lease_ms")?,
            max_deliveries: u32::try_from(c.u64("max_deliveries")?)
                .map_err(|_| Error::InvalidConfig("max_deliveries too large".into()))?,
            dead_letter: c.opt_str("dead_letter")?,
            max_length: c.opt_u64("max_length")?,
            overflow: overflow_from(c.str("overflow")?)?,
            message_ttl_ms: c.opt_u64("message_ttl_ms")?,
        };
        // The dead-letter queue may come later in the export: it is set at the end line.
        let mut without_target = config.clone();
        without_target.dead_letter = None;
        self.txn.create_queue(name, without_target)?;
        if config.dead_letter.is_some() {
            self.dead_letter_configs.push((name.to_owned(), config));
        }
        queue::restore_counters(
            self.txn,
            name,
            obj.u64("next_sequence")?,
            obj.u64("dead_lettered")?,
        )?;
        self.report.queues += 1;
        self.queue = Some(OpenQueue {
            name: name.to_owned(),
            buffer: Vec::new(),
        });
        Ok(())
    }

    fn entry(&mut self, obj: &Obj<'_>) -> Result<()> {
        let queue = obj.str("queue")?;
        let open = match &mut self.queue {
            Some(open) if open.name == queue => open,
            _ => {
                return Err(Error::InvalidConfig(
                    "a queue entry must follow its queue's line".into(),
                ));
            }
        };
        let state = obj.str("state")?;
        let mut deaths = Vec::new();
        for d in obj.array("deaths")? {
            let d = Obj::of(d)?;
            let reason = d.str("reason")?;
            deaths.push(Death {
                queue: d.str("queue")?.to_owned(),
                reason: DeathReason::from_name(reason).ok_or_else(|| {
                    Error::InvalidConfig(format!("unknown death reason {reason:?}"))
                })?,
                count: u32::try_from(d.u64("count")?)
                    .map_err(|_| Error::InvalidConfig("death count too large".into()))?,
                first_ms: d.u64("first_ms")?,
                last_ms: d.u64("last_ms")?,
            });
        }
        open.buffer.push(QueuedMessage {
            sequence: obj.u64("sequence")?,
            state: EntryState::from_name(state)
                .ok_or_else(|| Error::InvalidConfig(format!("unknown state {state:?}")))?,
            priority: u8::try_from(obj.u64("priority")?)
                .map_err(|_| Error::InvalidConfig("priority too large".into()))?,
            delivery_count: u32::try_from(obj.u64("delivery_count")?)
                .map_err(|_| Error::InvalidConfig("delivery count too large".into()))?,
            due_ms: obj.u64("due_ms")?,
            enqueued_ms: obj.u64("enqueued_ms")?,
            expires_ms: obj.opt_u64("expires_ms")?,
            deaths,
            message: message_from(obj.get("message")?)?,
        });
        self.report.entries += 1;
        if open.buffer.len() >= CHUNK {
            self.flush_queue()?;
        }
        Ok(())
    }

    fn flush_queue(&mut self) -> Result<()> {
        if let Some(open) = &mut self.queue
            && !open.buffer.is_empty()
        {
            queue::restore_entries(self.txn, &open.name, std::mem::take(&mut open.buffer))?;
        }
        Ok(())
    }

    fn outbox(&mut self, obj: &Obj<'_>) -> Result<()> {
        let sequence = obj.u64("sequence")?;
        let destination = obj.str("destination")?;
        crate::routing::check_routing_key(destination)?;
        let record = OutboxRecord {
            destination: destination.to_owned(),
            message: message_from(obj.get("message")?)?,
            attempts: u32::try_from(obj.u64("attempts")?)
                .map_err(|_| Error::InvalidConfig("attempts too large".into()))?,
            next_attempt_ms: obj.u64("next_attempt_ms")?,
            last_error: obj.str("last_error")?.to_owned(),
        };
        crate::message::check_message(&record.message, &self.txn.shared.limits)?;
        let table = if obj.bool("parked")? {
            OUTBOX_PARKED
        } else {
            OUTBOX
        };
        let mut rows = self.txn.table(table)?;
        if rows.get(sequence)?.is_some() {
            return Err(Error::InvalidConfig(format!(
                "outbox sequence {sequence} twice"
            )));
        }
        rows.insert(sequence, codec::encode_outbox(&record).as_slice())?;
        self.outbox_max = Some(self.outbox_max.unwrap_or(0).max(sequence));
        self.report.outbox += 1;
        Ok(())
    }
}

/// Typed access to one JSON object's fields, with errors that name the field.
struct Obj<'a>(&'a Map<String, Value>);

impl<'a> Obj<'a> {
    fn of(value: &'a Value) -> Result<Self> {
        value
            .as_object()
            .map(Obj)
            .ok_or_else(|| Error::InvalidConfig("expected a JSON object".into()))
    }

    fn get(&self, field: &str) -> Result<&'a Value> {
        self.0
            .get(field)
            .ok_or_else(|| Error::InvalidConfig(format!("missing field {field:?}")))
    }

    fn wrong(field: &str, what: &str) -> Error {
        Error::InvalidConfig(format!("field {field:?} is not {what}"))
    }

    fn str(&self, field: &str) -> Result<&'a str> {
        self.get(field)?
            .as_str()
            .ok_or_else(|| Self::wrong(field, "a string"))
    }

    fn u64(&self, field: &str) -> Result<u64> {
        self.get(field)?
            .as_u64()
            .ok_or_else(|| Self::wrong(field, "an unsigned integer"))
    }

    fn bool(&self, field: &str) -> Result<bool> {
        self.get(field)?
            .as_bool()
            .ok_or_else(|| Self::wrong(field, "true or false"))
    }

    fn array(&self, field: &str) -> Result<&'a Vec<Value>> {
        self.get(field)?
            .as_array()
            .ok_or_else(|| Self::wrong(field, "an array"))
    }

    fn opt_u64(&self, field: &str) -> Result<Option<u64>> {
        match self.get(field)? {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::wrong(field, "an unsigned integer or null")),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.get(field)? {
            Value::Null => Ok(None),
            v => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| Self::wrong(field, "a string or null")),
        }
    }
}

/// Bytes as JSON: a string when they are UTF-8, `{"hex": "..."}` otherwise.
pub(crate) fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "hex": hex })
        }
    }
}

fn bytes_from(value: &Value) -> Result<Vec<u8>> {
    if let Some(s) = value.as_str() {
        return Ok(s.as_bytes().to_vec());
    }
    let hex = Obj::of(value)?.str("hex")?;
    if hex.len() % 2 != 0 {
        return Err(Error::InvalidConfig("odd-length hex".into()));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| Error::InvalidConfig(format!("bad hex {hex:?}")))
        })
        .collect()
}

/// A message as JSON, the way export, `mqlite tail` and `mqlite receive` print it.
pub(crate) fn message_json(m: &Message) -> Value {
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|(name, value)| json!([name, bytes_json(value)]))
        .collect();
    json!({
        "id": m.id.to_string(),
        "timestamp_ms": m.timestamp_ms,
        "key": m.key.as_deref().map(bytes_json),
        "routing_key": m.routing_key,
        "headers": headers,
        "payload": bytes_json(&m.payload),
    })
}

/// A header as exported: `[name, value]`.
fn header_pair(h: &Value) -> Result<(String, &Value)> {
    match h.as_array().map(Vec::as_slice) {
        Some([name, value]) => Ok((
            name.as_str()
                .ok_or_else(|| Error::InvalidConfig("header name is not a string".into()))?
                .to_owned(),
            value,
        )),
        _ => Err(Error::InvalidConfig("a header is not [name, value]".into())),
    }
}

fn parse_id(s: &str) -> Result<MessageId> {
    s.parse()
        .map_err(|_| Error::InvalidConfig(format!("bad message id {s:?}")))
}

fn message_from(value: &Value) -> Result<Message> {
    let obj = Obj::of(value)?;
    let mut headers = Vec::new();
    for h in obj.array("headers")? {
        let (name, value) = header_pair(h)?;
        headers.push((name, bytes_from(value)?));
    }
    Ok(Message {
        id: parse_id(obj.str("id")?)?,
        key: match obj.get("key")? {
            Value::Null => None,
            v => Some(bytes_from(v)?),
        },
        routing_key: obj.str("routing_key")?.to_owned(),
        headers,
        payload: bytes_from(obj.get("payload")?)?.into(),
        timestamp_ms: obj.u64("timestamp_ms")?,
    })
}

/// A queued message as a JSON `entry` line; `mqlite dlq list` prints the same.
pub(crate) fn entry_json(queue: &str, m: &QueuedMessage) -> Value {
    let deaths: Vec<Value> = m
        .deaths
        .iter()
        .map(|d| {
            json!({
                "queue": d.queue, "reason": d.reason.as_str(), "count": d.count,
                "first_ms": d.first_ms, "last_ms": d.last_ms,
            })
        })
        .collect();
    json!({
        "type": "entry", "queue": queue, "sequence": m.sequence, "state": m.state.as_str(),
        "priority": m.priority, "delivery_count": m.delivery_count, "due_ms": m.due_ms,
        "enqueued_ms": m.enqueued_ms, "expires_ms": m.expires_ms, "deaths": deaths,
        "message": message_json(&m.message),
    })
}

fn overflow_name(o: Overflow) -> &'static str {
    match o {
        Overflow::DropOldest => "drop_oldest",
        Overflow::RejectPublish => "reject_publish",
    }
}

fn overflow_from(name: &str) -> Result<Overflow> {
    match name {
        "drop_oldest" => Ok(Overflow::DropOldest),
        "reject_publish" => Ok(Overflow::RejectPublish),
        other => Err(Error::InvalidConfig(format!("unknown overflow {other:?}"))),
    }
}

fn binding_json(rule: &Binding) -> Value {
    match rule {
        Binding::Key(key) => json!({"key": key}),
        Binding::Fanout => json!({"fanout": true}),
        Binding::Pattern(pattern) => json!({"pattern": pattern}),
        Binding::Headers { mode, headers } => {
            let headers: Vec<Value> = headers
                .iter()
                .map(|(name, value)| json!([name, value.as_deref().map(bytes_json)]))
                .collect();
            let mode = match mode {
                HeaderMatch::All => "all",
                HeaderMatch::Any => "any",
            };
            json!({"headers": headers, "match": mode})
        }
    }
}

fn binding_from(value: &Value) -> Result<Binding> {
    let obj = Obj::of(value)?;
    let keys: BTreeSet<&str> = obj.0.keys().map(String::as_str).collect();
    if keys.contains("key") {
        return Ok(Binding::Key(obj.str("key")?.to_owned()));
    }
    if keys.contains("fanout") {
        return Ok(Binding::Fanout);
    }
    if keys.contains("pattern") {
        return Ok(Binding::Pattern(obj.str("pattern")?.to_owned()));
    }
    let mode = match obj.str("match")? {
        "all" => HeaderMatch::All,
        "any" => HeaderMatch::Any,
        other => return Err(Error::InvalidConfig(format!("unknown match {other:?}"))),
    };
    let mut headers = Vec::new();
    for h in obj.array("headers")? {
        let (name, value) = header_pair(h)?;
        headers.push((
            name,
            match value {
                Value::Null => None,
                v => Some(bytes_from(v)?),
            },
        ));
    }
    Ok(Binding::Headers { mode, headers })
}
