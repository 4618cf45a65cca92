//! The record envelope: a hand-written, versioned, little-endian layout with a CRC32C.
//!
//! Every value mqlite stores (except plain integers) is one envelope:
//!
//! ```text
//! offset size field
//! 0      1    kind      (what the body is: message, topic, queue state, ...)
//! 1      1    version   (layout version of that kind; 1 for all kinds today)
//! 2      4    crc32c    (over the kind, version and body bytes, little-endian)
//! 6      ..   body      (the kind's fields, little-endian, lengths before bytes)
//! ```
//!
//! Decoding checks the checksum first, then every length against the bytes left, and rejects
//! trailing bytes: any input yields either the value that was encoded or `Error::Corrupted`,
//! never a panic and never wrong bytes.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::message::{Message, MessageId};
use crate::payload::Payload;
use crate::queue::{Death, DeathReason, Overflow, QueueConfig};
use crate::routing::{Binding, HeaderMatch};
use crate::topic::{Retention, TopicConfig};

/// The header size of every envelope.
pub(crate) const HEADER_BYTES: usize = 6;

/// The CRC-32C (Castagnoli) of `parts`, one after the other: the checksum of every envelope,
/// journal record and header slot. crc-fast folds with carry-less multiplication (VPCLMULQDQ
/// where the CPU has it): on 16 KiB, 2.4 times the rate of the SSE4.2 `crc32` instruction
/// that the crc32c crate uses, whose checksum took a fifth of a topic read here.
pub(crate) fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for part in parts {
        digest.update(part);
    }
    // A 32-bit CRC in a u64: the upper half is zero.
    digest.finalize() as u32
}

/// What an envelope's body holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Kind {
    Message = 1,
    Topic = 2,
    Queue = 3,
    QueueEntry = 4,
    Binding = 5,
    Outbox = 6,
    Batch = 7,
    QueueBatch = 8,
}

const LAYOUT_VERSION: u8 = 1;

/// Builds one envelope.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(kind: Kind, capacity: usize) -> Self {
        Writer::with_layout(kind, LAYOUT_VERSION, capacity)
    }

    /// An envelope of a kind whose layout has versions besides the first.
    fn with_layout(kind: Kind, layout: u8, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_BYTES + capacity);
        buf.extend_from_slice(&[kind as u8, layout, 0, 0, 0, 0]);
        Writer { buf }
    }

    /// A LEB128 varint: seven bits a byte, low bits first, the high bit set on all but the
    /// last byte.
    fn varint(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
        self
    }

    /// Bytes with a varint length before them.
    fn var_bytes(&mut self, v: &[u8]) -> &mut Self {
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u128(&mut self, v: u128) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Bytes with a u32 length before them. Callers check sizes against the limits first, so
    /// the length always fits.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(v);
        self
    }

    pub(crate) fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u64(v),
            None => self.u8(0),
        }
    }

    pub(crate) fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).bytes(v.as_bytes()),
            None => self.u8(0),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let crc = crc32c(&[&self.buf[..2], &self.buf[HEADER_BYTES..]]);
        self.buf[2..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Reads one envelope's body; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    body: &'a [u8],
    what: &'static str,
    /// Where `body` starts in the envelope.
    offset: usize,
    /// A copy of the envelope from the offset given on, which payloads read after
    /// [`Reader::share_rest`] point into instead of copying their bytes.
    shared: Option<(Arc<[u8]>, usize)>,
}

impl<'a> Reader<'a> {
    /// Checks the header and checksum and returns a reader over the body.
    pub(crate) fn open(bytes: &'a [u8], kind: Kind, what: &'static str) -> Result<Self> {
        Ok(Reader::open_layout(bytes, kind, what, LAYOUT_VERSION)?.0)
    }

    /// As [`Reader::open`], for a kind whose layouts go from 1 to `newest`; returns the
    /// envelope's layout with the reader.
    fn open_layout(
        bytes: &'a [u8],
        kind: Kind,
        what: &'static str,
        newest: u8,
    ) -> Result<(Self, u8)> {
        if bytes.len() < HEADER_BYTES {
            return Err(Error::corrupted(format!(
                "{what}: record shorter than its header"
            )));
        }
        if bytes[0] != kind as u8 {
            return Err(Error::corrupted(format!(
                "{what}: record kind {}",
                bytes[0]
            )));
        }
        if bytes[1] == 0 || bytes[1] > newest {
            return Err(Error::corrupted(format!(
                "{what}: record version {}",
                bytes[1]
            )));
        }
        let stored = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        let actual = crc32c(&[&bytes[..2], &bytes[HEADER_BYTES..]]);
        if stored != actual {
            return Err(Error::corrupted(format!("{what}: checksum mismatch")));
        }
        let reader = Reader {
            body: &bytes[HEADER_BYTES..],
            what,
            offset: HEADER_BYTES,
            shared: None,
        };
        Ok((reader, bytes[1]))
    }

    /// Copies the rest of the body once, so that the payloads read from here on share that
    /// copy (one allocation for many messages) instead of each copying its own bytes.
    pub(crate) fn share_rest(&mut self) {
        self.shared = Some((Arc::from(self.body), self.offset));
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.body.len() < n {
            return Err(Error::corrupted(format!("{}: truncated record", self.what)));
        }
        let (head, tail) = self.body.split_at(n);
        self.body = tail;
        self.offset += n;
        Ok(head)
    }

    /// A payload (bytes with a u32 length before them): a slice of the shared copy after
    /// [`Reader::share_rest`], a copy of its own before.
    fn payload(&mut self) -> Result<Payload> {
        let len = self.u32()? as usize;
        self.payload_of(len)
    }

    /// A payload with a varint length before it, as [`Reader::payload`].
    fn var_payload(&mut self) -> Result<Payload> {
        let len = self.var_len()?;
        self.payload_of(len)
    }

    fn payload_of(&mut self, len: usize) -> Result<Payload> {
        let start = self.offset;
        let bytes = self.take(len)?;
        let shared = self.shared.as_ref().and_then(|(buf, base)| {
            let at = start.checked_sub(*base)?;
            Payload::shared(buf, at, at + len)
        });
        Ok(shared.unwrap_or_else(|| Payload::from(bytes.to_vec())))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn u128(&mut self) -> Result<u128> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    /// A LEB128 varint of at most ten bytes, in its shortest form (so that what decodes
    /// re-encodes to the same bytes).
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                break;
            }
            v |= bits << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    break;
                }
                return Ok(v);
            }
        }
        Err(Error::corrupted(format!("{}: bad varint", self.what)))
    }

    /// A varint length, checked against the bytes left.
    fn var_len(&mut self) -> Result<usize> {
        let len = self.varint()?;
        match usize::try_from(len) {
            Ok(len) if len <= self.body.len() => Ok(len),
            _ => Err(Error::corrupted(format!("{}: truncated record", self.what))),
        }
    }

    /// Bytes with a varint length before them.
    fn var_bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.var_len()?;
        self.take(len)
    }

    /// UTF-8 text with a varint length before it.
    fn var_str(&mut self) -> Result<&'a str> {
        let what = self.what;
        std::str::from_utf8(self.var_bytes()?)
            .map_err(|_| Error::corrupted(format!("{what}: string is not UTF-8")))
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        let what = self.what;
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::corrupted(format!("{what}: string is not UTF-8")))
    }

    pub(crate) fn opt_u64(&mut self) -> Result<Option<u64>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            tag => Err(Error::corrupted(format!("{}: option tag {tag}", self.what))),
        }
    }

    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(Error::corrupted(format!("{}: bool {tag}", self.what))),
        }
    }

    pub(crate) fn opt_str(&mut self) -> Result<Option<String>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            tag => Err(Error::corrupted(format!("{}: option tag {tag}", self.what))),
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.body.len()
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(self) -> Result<()> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(Error::corrupted(format!("{}: trailing bytes", self.what)))
        }
    }
}

const FLAG_HAS_KEY: u8 = 1;

/// Encodes a message into an envelope of kind `Message`.
pub(crate) fn encode_message(message: &Message) -> Vec<u8> {
    let mut w = Writer::new(Kind::Message, message.size_bytes() as usize + 64);
    write_message(&mut w, message);
    w.finish()
}

/// Writes a message's fields into an envelope of any kind that embeds one.
pub(crate) fn write_message(w: &mut Writer, message: &Message) {
    let flags = if message.key.is_some() {
        FLAG_HAS_KEY
    } else {
        0
    };
    w.u8(flags)
        .u128(message.id.0)
        .u64(message.timestamp_ms)
        .bytes(message.key.as_deref().unwrap_or_default())
        .bytes(message.routing_key.as_bytes())
        .u32(message.headers.len() as u32);
    for (name, value) in &message.headers {
        w.bytes(name.as_bytes()).bytes(value);
    }
    w.bytes(&message.payload);
}

/// Reads the fields [`write_message`] wrote.
pub(crate) fn read_message(r: &mut Reader<'_>) -> Result<Message> {
    let flags = r.u8()?;
    if flags & !FLAG_HAS_KEY != 0 {
        return Err(Error::corrupted(format!(
            "{}: unknown message flags {flags}",
            r.what
        )));
    }
    let id = MessageId(r.u128()?);
    let timestamp_ms = r.u64()?;
    let key = r.bytes()?;
    let key = (flags & FLAG_HAS_KEY != 0).then(|| key.to_vec());
    let routing_key = r.string()?;
    let count = r.u32()?;
    // Each header takes at least 8 bytes, so a count larger than that is corrupt; checking it
    // first keeps a damaged count from reserving a huge vector.
    if count as usize > r.body.len() / 8 {
        return Err(Error::corrupted(format!(
            "{}: header count {count}",
            r.what
        )));
    }
    let mut headers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = r.string()?;
        headers.push((name, r.bytes()?.to_vec()));
    }
    let payload = r.payload()?;
    Ok(Message {
        id,
        key,
        routing_key,
        headers,
        payload,
        timestamp_ms,
    })
}

/// The bytes a record batch takes besides its items: the envelope header and the count.
const BATCH_OVERHEAD: usize = HEADER_BYTES + 4;
/// How large a record batch may grow: `items`, and `bytes` encoded (unless one item alone is
/// larger). redb keeps a value this large alone in a leaf page rounded up to a power of two,
/// so the bytes are sized to fill a page with room for the leaf's header and key: a batch
/// just over it would take a page twice the size, half of it empty, and every read would copy
/// the empty half.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchLimit {
    pub(crate) items: usize,
    pub(crate) bytes: usize,
}

/// Topic logs: 32 KiB pages. Against 16 KiB, a consumer group's pass over 200 000 messages of
/// 100 B took 15-22 % less time (half the pages to look up in redb's cache and to read), and
/// 1 000 messages a commit took no longer; a read that starts inside a batch checksums and
/// steps over more, which a consumer pays once per batch (it keeps a [`BatchCursor`]).
pub(crate) const LOG_BATCH: BatchLimit = BatchLimit {
    items: 1024,
    bytes: (32 << 10) - 128,
};

/// Queue FIFO lanes: 16 KiB pages. A receive of one message reads its lane's batch afresh;
/// with 32 KiB batches a receive and ack of one message took about 10 % longer.
pub(crate) const LANE_BATCH: BatchLimit = BatchLimit {
    items: 256,
    bytes: (16 << 10) - 128,
};

impl BatchLimit {
    /// Whether an item of `next` encoded bytes joins a record batch that holds `count` items
    /// in `bytes` (its overhead included): the first item always.
    fn joins(self, count: usize, bytes: usize, next: usize) -> bool {
        count == 0 || (count < self.items && bytes + next <= self.bytes)
    }
}

/// Splits items into record batches within `limit`, by `encoded_len`, which is given the item
/// before in the same batch (`None` for a batch's first item, whose encoding may be longer).
pub(crate) fn split_batches<T>(
    items: &[T],
    limit: BatchLimit,
    encoded_len: impl Fn(Option<&T>, &T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = BATCH_OVERHEAD;
        let mut n = 0;
        while n < rest.len() {
            let next = encoded_len(n.checked_sub(1).map(|p| &rest[p]), &rest[n]);
            if !limit.joins(n, bytes, next) {
                break;
            }
            bytes += next;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// The layout of the record batches this build writes. Layout 1 (files of format 2 and older)
/// spells out each message as [`write_message`] does; layout 2 writes it densely
/// ([`write_dense`]). Both are read.
const BATCH_LAYOUT: u8 = 2;

/// Flags of a message in a dense record batch; any other bit set is damage.
const DENSE_KEY: u8 = 1;
/// The id is the previous message's plus one (the ids one producer generates in a millisecond).
const DENSE_NEXT_ID: u8 = 2;
/// The timestamp is the previous message's.
const DENSE_SAME_TIME: u8 = 4;
const DENSE_ROUTING_KEY: u8 = 8;
const DENSE_HEADERS: u8 = 16;
const DENSE_FLAGS: u8 =
    DENSE_KEY | DENSE_NEXT_ID | DENSE_SAME_TIME | DENSE_ROUTING_KEY | DENSE_HEADERS;

/// What a message in a dense record batch may refer to: the id and stored timestamp of the
/// message before it in the batch.
#[derive(Clone, Copy)]
struct Previous {
    id: u128,
    timestamp_ms: u64,
}

impl Previous {
    fn of(message: &Message, timestamp_ms: u64) -> Self {
        Previous {
            id: message.id.0,
            timestamp_ms,
        }
    }
}

/// The flags [`write_dense`] writes for `message`, stored with `timestamp_ms`, after `prev`.
fn dense_flags(prev: Option<Previous>, message: &Message, timestamp_ms: u64) -> u8 {
    let mut flags = 0;
    if message.key.is_some() {
        flags |= DENSE_KEY;
    }
    if let Some(p) = prev {
        if p.id.checked_add(1) == Some(message.id.0) {
            flags |= DENSE_NEXT_ID;
        }
        if p.timestamp_ms == timestamp_ms {
            flags |= DENSE_SAME_TIME;
        }
    }
    if !message.routing_key.is_empty() {
        flags |= DENSE_ROUTING_KEY;
    }
    if !message.headers.is_empty() {
        flags |= DENSE_HEADERS;
    }
    flags
}

/// Writes one message of a dense record batch: a flags byte, the id (16 bytes) unless it
/// follows the previous one, the timestamp (8 bytes) unless it repeats the previous one, then
/// the key, routing key and headers when present and the payload, each length a LEB128
/// varint. A 100-byte message in a run of one producer's messages takes 102 bytes. Returns
/// what the next message may refer to.
fn write_dense(
    w: &mut Writer,
    prev: Option<Previous>,
    message: &Message,
    timestamp_ms: u64,
) -> Previous {
    let flags = dense_flags(prev, message, timestamp_ms);
    w.u8(flags);
    if flags & DENSE_NEXT_ID == 0 {
        w.u128(message.id.0);
    }
    if flags & DENSE_SAME_TIME == 0 {
        w.u64(timestamp_ms);
    }
    if let Some(key) = &message.key {
        w.var_bytes(key);
    }
    if flags & DENSE_ROUTING_KEY != 0 {
        w.var_bytes(message.routing_key.as_bytes());
    }
    if flags & DENSE_HEADERS != 0 {
        w.varint(message.headers.len() as u64);
        for (name, value) in &message.headers {
            w.var_bytes(name.as_bytes()).var_bytes(value);
        }
    }
    w.var_bytes(&message.payload);
    Previous::of(message, timestamp_ms)
}

/// The bytes [`write_dense`] writes.
fn dense_len(prev: Option<Previous>, message: &Message, timestamp_ms: u64) -> usize {
    let flags = dense_flags(prev, message, timestamp_ms);
    let bytes = |b: &[u8]| varint_len(b.len() as u64) + b.len();
    let mut len = 1 + bytes(&message.payload);
    if flags & DENSE_NEXT_ID == 0 {
        len += 16;
    }
    if flags & DENSE_SAME_TIME == 0 {
        len += 8;
    }
    len += message.key.as_deref().map_or(0, bytes);
    if flags & DENSE_ROUTING_KEY != 0 {
        len += bytes(message.routing_key.as_bytes());
    }
    if flags & DENSE_HEADERS != 0 {
        len += varint_len(message.headers.len() as u64);
        for (name, value) in &message.headers {
            len += bytes(name.as_bytes()) + bytes(value);
        }
    }
    len
}

/// Reads one message of a dense record batch after `prev`, which it then becomes. With `keep`
/// false the message is checked as a read would check it, nothing is copied, and `None` comes
/// back. Only what [`write_dense`] writes decodes: a field spelled out where a flag would
/// have said it, an empty routing key or header list behind its flag, or a varint longer than
/// needed is damage, so what decodes re-encodes to the same bytes.
fn read_dense(
    r: &mut Reader<'_>,
    prev: &mut Option<Previous>,
    keep: bool,
) -> Result<Option<Message>> {
    let what = r.what;
    let damaged = |detail: &str| Error::corrupted(format!("{what}: {detail}"));
    let flags = r.u8()?;
    if flags & !DENSE_FLAGS != 0 {
        return Err(damaged(&format!("unknown message flags {flags}")));
    }
    let id = if flags & DENSE_NEXT_ID != 0 {
        prev.and_then(|p| p.id.checked_add(1))
            .ok_or_else(|| damaged("an id follows no message"))?
    } else {
        let id = r.u128()?;
        if prev.is_some_and(|p| p.id.checked_add(1) == Some(id)) {
            return Err(damaged("an id spelled out that follows the one before"));
        }
        id
    };
    let timestamp_ms = if flags & DENSE_SAME_TIME != 0 {
        prev.map(|p| p.timestamp_ms)
            .ok_or_else(|| damaged("a timestamp repeats no message"))?
    } else {
        let ts = r.u64()?;
        if prev.is_some_and(|p| p.timestamp_ms == ts) {
            return Err(damaged(
                "a timestamp spelled out that repeats the one before",
            ));
        }
        ts
    };
    *prev = Some(Previous { id, timestamp_ms });
    let key = if flags & DENSE_KEY != 0 {
        Some(r.var_bytes()?)
    } else {
        None
    };
    let routing_key = if flags & DENSE_ROUTING_KEY != 0 {
        let text = r.var_str()?;
        if text.is_empty() {
            return Err(damaged("an empty routing key behind its flag"));
        }
        text
    } else {
        ""
    };
    let mut headers = Vec::new();
    if flags & DENSE_HEADERS != 0 {
        let count = r.varint()?;
        // Each header takes at least two bytes, so a larger count is damage; checking first
        // keeps a damaged count from reserving a huge vector.
        if count == 0 || count > (r.remaining() / 2) as u64 {
            return Err(damaged(&format!("header count {count}")));
        }
        if keep {
            headers.reserve(count as usize);
        }
        for _ in 0..count {
            let name = r.var_str()?;
            let value = r.var_bytes()?;
            if keep {
                headers.push((name.to_owned(), value.to_vec()));
            }
        }
    }
    if !keep {
        r.var_bytes()?;
        return Ok(None);
    }
    Ok(Some(Message {
        id: MessageId(id),
        key: key.map(<[u8]>::to_vec),
        routing_key: routing_key.to_owned(),
        headers,
        payload: r.var_payload()?,
        timestamp_ms,
    }))
}

/// The bytes of `v` as a LEB128 varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// A plain message's parts (see [`BatchReader::take_plain`]): its payload is
/// `buf[start..end]`, a range checked against `buf`.
pub(crate) struct Plain<'b> {
    pub(crate) id: MessageId,
    pub(crate) timestamp_ms: u64,
    pub(crate) buf: &'b Arc<[u8]>,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// A record batch's messages, read in order by the batch's layout; each message is either
/// taken (decoded, its payload sharing the batch's copy once [`Reader::share_rest`] ran) or
/// skipped (checked, not copied).
struct BatchReader<'a> {
    r: Reader<'a>,
    layout: u8,
    count: usize,
    prev: Option<Previous>,
}

impl<'a> BatchReader<'a> {
    fn open(bytes: &'a [u8], what: &'static str) -> Result<Self> {
        let (mut r, layout) = Reader::open_layout(bytes, Kind::Batch, what, BATCH_LAYOUT)?;
        let count = r.u32()? as usize;
        // A message takes at least 45 bytes in layout 1, at least 2 in layout 2.
        let least = if layout == 1 { 45 } else { 2 };
        if count == 0 || count > r.remaining() / least + 1 {
            return Err(Error::corrupted(format!("{what}: batch count {count}")));
        }
        Ok(BatchReader {
            r,
            layout,
            count,
            prev: None,
        })
    }

    fn take(&mut self) -> Result<Message> {
        if self.layout == 1 {
            return read_message(&mut self.r);
        }
        read_dense(&mut self.r, &mut self.prev, true)?
            .ok_or_else(|| Error::corrupted(format!("{}: message not kept", self.r.what)))
    }

    /// The next message when it is the common one of a producer's run, as its flags byte
    /// and a one-byte length tell: its id follows the one before, its time repeats, it has
    /// nothing but a payload of under 128 bytes, which points into the batch's shared copy.
    /// Decoded here without [`read_dense`]'s general path (which took a third of a topic
    /// read), and its parts come back, so that the caller builds the message where it keeps
    /// it. `None`, with nothing read, for any other message; the general path then reads it
    /// (and reports any damage).
    #[inline]
    fn take_plain(&mut self) -> Option<Plain<'_>> {
        // Only a dense message sets `prev`, so a layout-1 batch never gets past this line.
        let prev = self.prev.as_mut()?;
        let id = prev.id.checked_add(1)?;
        let (&[flags, len], rest) = self.r.body.split_first_chunk::<2>()?;
        let len = usize::from(len);
        if flags != DENSE_NEXT_ID | DENSE_SAME_TIME || len >= 0x80 || len > rest.len() {
            return None;
        }
        let (buf, base) = self.r.shared.as_ref()?;
        let start = (self.r.offset + 2).checked_sub(*base)?;
        let end = start + len;
        if end > buf.len() {
            return None;
        }
        self.r.body = &rest[len..];
        self.r.offset += 2 + len;
        prev.id = id;
        Some(Plain {
            id: MessageId(id),
            timestamp_ms: prev.timestamp_ms,
            buf,
            start,
            end,
        })
    }

    fn skip(&mut self) -> Result<()> {
        if self.layout == 1 {
            return skip_message(&mut self.r);
        }
        read_dense(&mut self.r, &mut self.prev, false).map(|_| ())
    }

    /// Hands the next `n` messages to `take`, numbered from `first`.
    #[inline]
    fn read_into(&mut self, first: usize, n: usize, take: &mut impl Sink) -> Result<()> {
        take.expect(n);
        for i in 0..n {
            match self.take_plain() {
                Some(plain) => take.plain(first + i, plain),
                None => take.message(first + i, self.take()?),
            }
        }
        Ok(())
    }

    /// A cursor on the `left` messages after this reader's position; `None` unless the rest
    /// of the batch was shared.
    fn into_cursor(self, left: usize) -> Option<BatchCursor> {
        let (shared, base) = self.r.shared?;
        Some(BatchCursor {
            shared,
            base,
            at: self.r.offset,
            layout: self.layout,
            left,
            prev: self.prev,
            what: self.r.what,
        })
    }
}

/// A topic record batch filled one message at a time, for appends a transaction holds back
/// until commit. Messages join it by the rule of [`split_batches`], so the bytes each one adds
/// to the log are known as it is added.
pub(crate) struct OpenBatch {
    w: Writer,
    count: u32,
    last: Previous,
}

impl OpenBatch {
    /// A batch of one message, stamped `now_ms` when it has no timestamp, with room for
    /// `expected` encoded bytes of messages (more grow it; it never holds more than a batch).
    pub(crate) fn new(message: &Message, now_ms: u64, expected: usize) -> Self {
        let timestamp_ms = stamp(message, now_ms);
        let first = dense_len(None, message, timestamp_ms);
        // A message larger than a batch makes a batch alone.
        let room = expected.min(LOG_BATCH.bytes - BATCH_OVERHEAD).max(first);
        let mut w = Writer::with_layout(Kind::Batch, BATCH_LAYOUT, 4 + room);
        w.u32(1);
        let last = write_dense(&mut w, None, message, timestamp_ms);
        OpenBatch { w, count: 1, last }
    }

    /// Adds `message` if it joins the batch; returns whether it did. The message is written
    /// first and taken back when it does not fit: that happens once a batch, where measuring
    /// each message before writing it took 4 % of the time of 1 000 published a commit.
    pub(crate) fn push(&mut self, message: &Message, now_ms: u64) -> bool {
        let timestamp_ms = stamp(message, now_ms);
        let before = self.len();
        // A payload that cannot fit is not copied in only to be taken out.
        if before + message.payload.len() >= LOG_BATCH.bytes {
            return false;
        }
        let last = write_dense(&mut self.w, Some(self.last), message, timestamp_ms);
        if !LOG_BATCH.joins(self.count as usize, before, self.len() - before) {
            self.w.buf.truncate(before);
            return false;
        }
        self.last = last;
        self.count += 1;
        true
    }

    /// The batch's messages.
    pub(crate) fn count(&self) -> u64 {
        u64::from(self.count)
    }

    /// The bytes the batch takes in the log.
    pub(crate) fn len(&self) -> usize {
        self.w.buf.len()
    }

    /// The envelope, as [`encode_batch`] writes it.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.w.buf[HEADER_BYTES..BATCH_OVERHEAD].copy_from_slice(&self.count.to_le_bytes());
        self.w.finish()
    }
}

/// The timestamp a published message is stored with: its own, or the publish time for 0.
fn stamp(message: &Message, now_ms: u64) -> u64 {
    if message.timestamp_ms == 0 {
        now_ms
    } else {
        message.timestamp_ms
    }
}

/// The bytes [`write_message`] writes for `message`.
pub(crate) fn encoded_len(message: &Message) -> usize {
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, value)| 8 + name.len() + value.len())
        .sum();
    1 + 16
        + 8
        + 4
        + message.key.as_ref().map_or(0, Vec::len)
        + 4
        + message.routing_key.len()
        + 4
        + headers
        + 4
        + message.payload.len()
}

/// The bytes `message` takes in a record batch after `prev` (`None`: it starts the batch),
/// with the timestamp it has: the sizes [`split_batches`] cuts stored messages by.
pub(crate) fn batch_item_len(prev: Option<&Message>, message: &Message) -> usize {
    let prev = prev.map(|p| Previous::of(p, p.timestamp_ms));
    dense_len(prev, message, message.timestamp_ms)
}

/// Encodes consecutive topic messages, with the timestamps they have, into one envelope of
/// kind `Batch` (a record batch): a u32 count, then each message densely.
pub(crate) fn encode_batch<'m>(
    messages: impl ExactSizeIterator<Item = &'m Message> + Clone,
) -> Vec<u8> {
    let size: u64 = messages.clone().map(|m| m.size_bytes() + 32).sum();
    let mut w = Writer::with_layout(
        Kind::Batch,
        BATCH_LAYOUT,
        usize::try_from(size).unwrap_or(0) + 4,
    );
    w.u32(messages.len() as u32);
    let mut prev = None;
    for m in messages {
        prev = Some(write_dense(&mut w, prev, m, m.timestamp_ms));
    }
    w.finish()
}

/// Where a batch reader hands the messages it decodes, each with its index in the batch. A
/// closure taking `(index, message)` is one.
pub(crate) trait Sink {
    /// Told before the reader hands over the next `n` messages.
    #[inline]
    fn expect(&mut self, n: usize) {
        let _ = n;
    }

    fn message(&mut self, i: usize, message: Message);

    /// A plain message in parts, so that a sink can build it where it keeps it.
    #[inline]
    fn plain(&mut self, i: usize, plain: Plain<'_>) {
        let mut payload = Payload::new();
        payload.set_shared(plain.buf, plain.start, plain.end);
        self.message(
            i,
            Message {
                id: plain.id,
                key: None,
                routing_key: String::new(),
                headers: Vec::new(),
                payload,
                timestamp_ms: plain.timestamp_ms,
            },
        );
    }
}

impl<F: FnMut(usize, Message)> Sink for F {
    #[inline]
    fn message(&mut self, i: usize, message: Message) {
        self(i, message);
    }
}

/// Decodes a record batch of either layout.
pub(crate) fn decode_batch(bytes: &[u8], what: &'static str) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    decode_batch_part(bytes, what, 0, usize::MAX, |_, m| out.push(m))?;
    Ok(out)
}

/// Decodes up to `max` messages of a record batch after skipping its first `skip` (which are
/// checked but not copied), handing each to `take` with its index in the batch: a read that
/// starts inside a batch, or stops inside one, decodes only what it returns, and each message
/// moves once, into the caller's result. Returns the batch's message count.
pub(crate) fn decode_batch_part(
    bytes: &[u8],
    what: &'static str,
    skip: usize,
    max: usize,
    take: impl FnMut(usize, Message),
) -> Result<usize> {
    Ok(decode_batch_keeping(bytes, what, skip, max, false, take)?.0)
}

/// [`decode_batch_part`], which also returns, when `keep` and the read stops inside the batch,
/// a [`BatchCursor`] to go on from there.
pub(crate) fn decode_batch_keeping(
    bytes: &[u8],
    what: &'static str,
    skip: usize,
    max: usize,
    keep: bool,
    mut take: impl Sink,
) -> Result<(usize, Option<BatchCursor>)> {
    let mut b = BatchReader::open(bytes, what)?;
    let count = b.count;
    for _ in 0..skip.min(count) {
        b.skip()?;
    }
    let wanted = count.saturating_sub(skip).min(max);
    let stops_inside = skip + wanted < count;
    if wanted > 1 || (keep && stops_inside) {
        b.r.share_rest();
    }
    b.read_into(skip, wanted, &mut take)?;
    if skip + wanted == count {
        b.r.finish()?;
        return Ok((count, None));
    }
    let cursor = if keep && stops_inside {
        b.into_cursor(count - skip - wanted)
    } else {
        None
    };
    Ok((count, cursor))
}

/// A record batch read part way, kept by a reader that goes on with it: the batch's checksum
/// was verified when it was read, and the messages before the cursor are not decoded again.
/// Consumers polling a few messages at a time read a batch in many polls; each poll
/// otherwise looked the batch up, checksummed all of it and stepped over the messages it had
/// returned already.
pub(crate) struct BatchCursor {
    /// The batch's body from some message on (payloads share it), and the envelope offset it
    /// starts at.
    shared: Arc<[u8]>,
    base: usize,
    /// The envelope offset of the next message.
    at: usize,
    layout: u8,
    /// The messages not read yet.
    left: usize,
    prev: Option<Previous>,
    what: &'static str,
}

impl BatchCursor {
    /// Decodes up to `max` of the messages left, handing each to `take` with its index from
    /// the cursor; returns how many.
    pub(crate) fn read(&mut self, max: usize, mut take: impl Sink) -> Result<usize> {
        let shared = Arc::clone(&self.shared);
        let body = shared
            .get(self.at - self.base..)
            .ok_or_else(|| Error::corrupted(format!("{}: batch cursor", self.what)))?;
        let mut b = BatchReader {
            r: Reader {
                body,
                what: self.what,
                offset: self.at,
                shared: Some((Arc::clone(&shared), self.base)),
            },
            layout: self.layout,
            count: self.left,
            prev: self.prev.take(),
        };
        let n = self.left.min(max);
        b.read_into(0, n, &mut take)?;
        self.left -= n;
        self.at = b.r.offset;
        self.prev = b.prev;
        if self.left == 0 {
            b.r.finish()?;
        }
        Ok(n)
    }

    /// The messages not read yet.
    pub(crate) fn left(&self) -> usize {
        self.left
    }
}

/// Steps over one message body, checking it as [`read_message`] does, without copying it.
fn skip_message(r: &mut Reader<'_>) -> Result<()> {
    let flags = r.u8()?;
    if flags & !FLAG_HAS_KEY != 0 {
        return Err(Error::corrupted(format!(
            "{}: unknown message flags {flags}",
            r.what
        )));
    }
    r.u128()?;
    r.u64()?;
    r.bytes()?;
    let utf8 = |r: &mut Reader<'_>| -> Result<()> {
        let what = r.what;
        std::str::from_utf8(r.bytes()?)
            .map(|_| ())
            .map_err(|_| Error::corrupted(format!("{what}: string is not UTF-8")))
    };
    utf8(r)?;
    let count = r.u32()?;
    if count as usize > r.body.len() / 8 {
        return Err(Error::corrupted(format!(
            "{}: header count {count}",
            r.what
        )));
    }
    for _ in 0..count {
        utf8(r)?;
        r.bytes()?;
    }
    r.bytes()?;
    Ok(())
}

/// The number of messages in a record batch, checksum verified.
pub(crate) fn batch_len(bytes: &[u8], what: &'static str) -> Result<u64> {
    Ok(BatchReader::open(bytes, what)?.count as u64)
}

/// Decodes arbitrary bytes as a record batch; for fuzzing the batch decoder from outside the
/// crate. Never panics.
#[doc(hidden)]
pub fn fuzz_decode_batch(bytes: &[u8]) -> Result<Vec<Message>> {
    decode_batch(bytes, "fuzz")
}

/// `body` as a record batch of `layout` (1 or 2) with a correct checksum, so that fuzzing
/// reaches the batch decoder past the checksum.
#[doc(hidden)]
pub fn fuzz_seal_batch(layout: u8, body: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_layout(Kind::Batch, layout, body.len());
    w.buf.extend_from_slice(body);
    w.finish()
}

/// Encodes messages as one record batch, with their timestamps as they are; the inverse of
/// [`fuzz_decode_batch`] for batches of the current layout.
#[doc(hidden)]
pub fn fuzz_encode_batch(messages: &[Message]) -> Vec<u8> {
    encode_batch(messages.iter())
}

/// Decodes an envelope of kind `Message`.
pub(crate) fn decode_message(bytes: &[u8], what: &'static str) -> Result<Message> {
    let mut r = Reader::open(bytes, Kind::Message, what)?;
    let message = read_message(&mut r)?;
    r.finish()?;
    Ok(message)
}

/// Decodes arbitrary bytes as a message envelope; for fuzzing the decoder from outside the
/// crate. Never panics.
#[doc(hidden)]
pub fn fuzz_decode_message(bytes: &[u8]) -> Result<Message> {
    decode_message(bytes, "fuzz")
}

/// Encodes a message envelope; the inverse of [`fuzz_decode_message`].
#[doc(hidden)]
pub fn fuzz_encode_message(message: &Message) -> Vec<u8> {
    encode_message(message)
}

/// Decodes a plain little-endian u64 (a meta value).
pub(crate) fn decode_u64(bytes: &[u8], what: &str) -> Result<u64> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_le_bytes)
        .map_err(|_| Error::corrupted(format!("{what}: {} bytes, expected 8", bytes.len())))
}

/// Decodes a plain little-endian u32 (a meta value).
pub(crate) fn decode_u32(bytes: &[u8], what: &str) -> Result<u32> {
    <[u8; 4]>::try_from(bytes)
        .map(u32::from_le_bytes)
        .map_err(|_| Error::corrupted(format!("{what}: {} bytes, expected 4", bytes.len())))
}

/// A topic's stored record: its id, configuration and extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TopicRecord {
    pub(crate) id: u64,
    pub(crate) config: TopicConfig,
    pub(crate) first_offset: u64,
    pub(crate) next_offset: u64,
    pub(crate) stored_bytes: u64,
    pub(crate) last_append_ms: u64,
    /// How many bindings route this topic's messages; `None` in records written before the
    /// count was kept (publish then looks the bindings up).
    pub(crate) bindings: Option<u32>,
}

pub(crate) fn encode_topic(t: &TopicRecord) -> Vec<u8> {
    let r = &t.config.retention;
    let mut w = Writer::new(Kind::Topic, 80);
    w.u64(t.id)
        .u64(t.first_offset)
        .u64(t.next_offset)
        .u64(t.stored_bytes)
        .u64(t.last_append_ms)
        .opt_u64(r.max_age_ms)
        .opt_u64(r.max_messages)
        .opt_u64(r.max_bytes)
        .u8(u8::from(r.until_consumed));
    // A trailing field: records without it still decode (as `None`).
    if let Some(count) = t.bindings {
        w.u32(count);
    }
    w.finish()
}

pub(crate) fn decode_topic(bytes: &[u8]) -> Result<TopicRecord> {
    let mut r = Reader::open(bytes, Kind::Topic, "topic record")?;
    let record = TopicRecord {
        id: r.u64()?,
        first_offset: r.u64()?,
        next_offset: r.u64()?,
        stored_bytes: r.u64()?,
        last_append_ms: r.u64()?,
        config: TopicConfig {
            retention: Retention {
                max_age_ms: r.opt_u64()?,
                max_messages: r.opt_u64()?,
                max_bytes: r.opt_u64()?,
                until_consumed: r.bool()?,
            },
        },
        bindings: None,
    };
    let record = TopicRecord {
        bindings: if r.remaining() == 0 {
            None
        } else {
            Some(r.u32()?)
        },
        ..record
    };
    r.finish()?;
    if record.first_offset > record.next_offset {
        return Err(Error::corrupted(
            "topic record: first offset after next offset",
        ));
    }
    Ok(record)
}

/// A queue's stored record: id, configuration, counts and next sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueueRecord {
    pub(crate) id: u64,
    pub(crate) config: QueueConfig,
    pub(crate) next_seq: u64,
    pub(crate) ready: u64,
    pub(crate) in_flight: u64,
    pub(crate) delayed: u64,
    pub(crate) dead_lettered: u64,
    /// The first sequence the FIFO lane may still hold: everything below it was received.
    pub(crate) fifo_head: u64,
}

pub(crate) fn encode_queue(q: &QueueRecord) -> Vec<u8> {
    let c = &q.config;
    let mut w = Writer::new(Kind::Queue, 128);
    w.u64(q.id)
        .u64(q.next_seq)
        .u64(q.ready)
        .u64(q.in_flight)
        .u64(q.delayed)
        .u64(q.dead_lettered)
        .u64(c.lease_ms)
        .u32(c.max_deliveries)
        .opt_str(c.dead_letter.as_deref())
        .opt_u64(c.max_length)
        .u8(match c.overflow {
            Overflow::DropOldest => 0,
            Overflow::RejectPublish => 1,
        })
        .opt_u64(c.message_ttl_ms)
        .u64(q.fifo_head);
    w.finish()
}

pub(crate) fn decode_queue(bytes: &[u8]) -> Result<QueueRecord> {
    let mut r = Reader::open(bytes, Kind::Queue, "queue record")?;
    let mut record = QueueRecord {
        id: r.u64()?,
        next_seq: r.u64()?,
        ready: r.u64()?,
        in_flight: r.u64()?,
        delayed: r.u64()?,
        dead_lettered: r.u64()?,
        config: QueueConfig {
            lease_ms: r.u64()?,
            max_deliveries: r.u32()?,
            dead_letter: r.opt_str()?,
            max_length: r.opt_u64()?,
            overflow: match r.u8()? {
                0 => Overflow::DropOldest,
                1 => Overflow::RejectPublish,
                tag => return Err(Error::corrupted(format!("queue record: overflow {tag}"))),
            },
            message_ttl_ms: r.opt_u64()?,
        },
        fifo_head: 0,
    };
    // Format 1 records end here (no FIFO lane): the head is 0.
    if r.remaining() > 0 {
        record.fifo_head = r.u64()?;
    }
    r.finish()?;
    Ok(record)
}

/// Where a message held by a queue stands: in exactly one of these states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryState {
    /// Ready to be received.
    Ready,
    /// Waiting for its delay to run out (at `due_ms`).
    Delayed,
    /// Leased to a consumer until `due_ms`, then ready again.
    InFlight,
}

impl EntryState {
    /// The state's name: `ready`, `delayed` or `in_flight`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Ready => "ready",
            EntryState::Delayed => "delayed",
            EntryState::InFlight => "in_flight",
        }
    }

    /// The state named by [`EntryState::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        [EntryState::Ready, EntryState::Delayed, EntryState::InFlight]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

/// One message in a queue with its delivery state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueueEntry {
    pub(crate) message: Message,
    pub(crate) state: EntryState,
    pub(crate) priority: u8,
    pub(crate) delivery_count: u32,
    pub(crate) due_ms: u64,
    pub(crate) enqueued_ms: u64,
    pub(crate) expires_ms: Option<u64>,
    pub(crate) deaths: Vec<Death>,
}

/// The fields of a queue entry that say where it stands, without its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryHead {
    pub(crate) state: EntryState,
    pub(crate) priority: u8,
    pub(crate) delivery_count: u32,
    pub(crate) due_ms: u64,
}

impl QueueEntry {
    pub(crate) fn head(&self) -> EntryHead {
        EntryHead {
            state: self.state,
            priority: self.priority,
            delivery_count: self.delivery_count,
            due_ms: self.due_ms,
        }
    }
}

/// Decodes only an entry's [`EntryHead`] (the checksum still covers the whole value), for
/// settling a lease without copying the message.
pub(crate) fn decode_entry_head(bytes: &[u8]) -> Result<EntryHead> {
    let mut r = Reader::open(bytes, Kind::QueueEntry, "queue entry")?;
    Ok(EntryHead {
        state: entry_state(r.u8()?)?,
        priority: r.u8()?,
        delivery_count: r.u32()?,
        due_ms: r.u64()?,
    })
}

/// Rewrites an encoded entry with a new [`EntryHead`] (the checksum is checked, then
/// recomputed): a state change copies the stored bytes instead of decoding and re-encoding the
/// message. The head fields sit at fixed places at the front of the body.
pub(crate) fn restate_entry(bytes: &[u8], head: EntryHead) -> Result<Vec<u8>> {
    // Checks the checksum and that the head fields are there.
    decode_entry_head(bytes)?;
    let mut out = bytes.to_vec();
    let body = &mut out[HEADER_BYTES..];
    body[0] = state_tag(head.state);
    body[1] = head.priority;
    body[2..6].copy_from_slice(&head.delivery_count.to_le_bytes());
    body[6..14].copy_from_slice(&head.due_ms.to_le_bytes());
    let crc = crc32c(&[&out[..2], &out[HEADER_BYTES..]]);
    out[2..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn state_tag(state: EntryState) -> u8 {
    match state {
        EntryState::Ready => 0,
        EntryState::Delayed => 1,
        EntryState::InFlight => 2,
    }
}

fn entry_state(tag: u8) -> Result<EntryState> {
    match tag {
        0 => Ok(EntryState::Ready),
        1 => Ok(EntryState::Delayed),
        2 => Ok(EntryState::InFlight),
        tag => Err(Error::corrupted(format!("queue entry: state {tag}"))),
    }
}

fn reason_tag(reason: DeathReason) -> u8 {
    match reason {
        DeathReason::Rejected => 0,
        DeathReason::Expired => 1,
        DeathReason::MaxLength => 2,
        DeathReason::DeliveryLimit => 3,
    }
}

pub(crate) fn encode_entry(e: &QueueEntry) -> Vec<u8> {
    let mut w = Writer::new(Kind::QueueEntry, e.message.size_bytes() as usize + 96);
    write_entry(&mut w, e);
    w.finish()
}

fn write_entry(w: &mut Writer, e: &QueueEntry) {
    w.u8(state_tag(e.state))
        .u8(e.priority)
        .u32(e.delivery_count)
        .u64(e.due_ms)
        .u64(e.enqueued_ms)
        .opt_u64(e.expires_ms)
        .u32(e.deaths.len() as u32);
    for d in &e.deaths {
        w.bytes(d.queue.as_bytes())
            .u8(reason_tag(d.reason))
            .u32(d.count)
            .u64(d.first_ms)
            .u64(d.last_ms);
    }
    write_message(w, &e.message);
}

/// The bytes [`write_entry`] writes for `e`.
pub(crate) fn entry_encoded_len(e: &QueueEntry) -> usize {
    let deaths: usize = e.deaths.iter().map(|d| 4 + d.queue.len() + 21).sum();
    1 + 1
        + 4
        + 8
        + 8
        + 1
        + if e.expires_ms.is_some() { 8 } else { 0 }
        + 4
        + deaths
        + encoded_len(&e.message)
}

/// Encodes entries of the FIFO lane, in sequence order, into one envelope of kind
/// `QueueBatch`: a u32 count, then for each a u64 sequence and the entry.
pub(crate) fn encode_queue_batch(items: &[(u64, QueueEntry)]) -> Vec<u8> {
    let size: usize = items.iter().map(|(_, e)| 8 + entry_encoded_len(e)).sum();
    let mut w = Writer::new(Kind::QueueBatch, size + 4);
    w.u32(items.len() as u32);
    for (seq, e) in items {
        w.u64(*seq);
        write_entry(&mut w, e);
    }
    w.finish()
}

/// Decodes the entries of a FIFO-lane batch from sequence `from` on, up to `max` of them,
/// onto `out` (the others are checked but not copied). Returns how many entries the batch
/// holds from `from` on, copied or not.
pub(crate) fn decode_queue_batch(
    bytes: &[u8],
    from: u64,
    max: usize,
    out: &mut Vec<(u64, QueueEntry)>,
) -> Result<usize> {
    const WHAT: &str = "queue batch";
    let mut r = Reader::open(bytes, Kind::QueueBatch, WHAT)?;
    let count = r.u32()? as usize;
    if count == 0 || count > r.remaining() / 60 + 1 {
        return Err(Error::corrupted(format!("{WHAT}: count {count}")));
    }
    let limit = out.len() + max;
    let mut last = None;
    let mut from_on = 0;
    for _ in 0..count {
        let seq = r.u64()?;
        if last.is_some_and(|l| seq <= l) {
            return Err(Error::corrupted(format!("{WHAT}: sequences out of order")));
        }
        last = Some(seq);
        from_on += usize::from(seq >= from);
        if seq < from || out.len() >= limit {
            skip_entry(&mut r)?;
        } else {
            // The entries from here on are consecutive in the batch: one shared copy serves
            // their payloads when more than one is taken.
            if r.shared.is_none() && limit - out.len() > 1 && r.remaining() > 0 {
                r.share_rest();
            }
            out.push((seq, read_entry(&mut r)?));
        }
    }
    r.finish()?;
    Ok(from_on)
}

fn skip_entry(r: &mut Reader<'_>) -> Result<()> {
    entry_state(r.u8()?)?;
    r.u8()?;
    r.u32()?;
    r.u64()?;
    r.u64()?;
    r.opt_u64()?;
    let count = r.u32()?;
    if count as usize > r.remaining() / 25 {
        return Err(Error::corrupted(format!(
            "queue entry: death count {count}"
        )));
    }
    for _ in 0..count {
        r.bytes()?;
        r.u8()?;
        r.u32()?;
        r.u64()?;
        r.u64()?;
    }
    skip_message(r)
}

pub(crate) fn decode_entry(bytes: &[u8]) -> Result<QueueEntry> {
    let mut r = Reader::open(bytes, Kind::QueueEntry, "queue entry")?;
    let entry = read_entry(&mut r)?;
    r.finish()?;
    Ok(entry)
}

fn read_entry(r: &mut Reader<'_>) -> Result<QueueEntry> {
    let state = entry_state(r.u8()?)?;
    let priority = r.u8()?;
    let delivery_count = r.u32()?;
    let due_ms = r.u64()?;
    let enqueued_ms = r.u64()?;
    let expires_ms = r.opt_u64()?;
    let count = r.u32()?;
    if count as usize > r.remaining() / 25 {
        return Err(Error::corrupted(format!(
            "queue entry: death count {count}"
        )));
    }
    let mut deaths = Vec::with_capacity(count as usize);
    for _ in 0..count {
        deaths.push(Death {
            queue: r.string()?,
            reason: match r.u8()? {
                0 => DeathReason::Rejected,
                1 => DeathReason::Expired,
                2 => DeathReason::MaxLength,
                3 => DeathReason::DeliveryLimit,
                tag => return Err(Error::corrupted(format!("queue entry: death reason {tag}"))),
            },
            count: r.u32()?,
            first_ms: r.u64()?,
            last_ms: r.u64()?,
        });
    }
    let message = read_message(r)?;
    Ok(QueueEntry {
        message,
        state,
        priority,
        delivery_count,
        due_ms,
        enqueued_ms,
        expires_ms,
        deaths,
    })
}

/// An outbox row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OutboxRecord {
    pub(crate) destination: String,
    pub(crate) message: Message,
    pub(crate) attempts: u32,
    pub(crate) next_attempt_ms: u64,
    pub(crate) last_error: String,
}

pub(crate) fn encode_outbox(o: &OutboxRecord) -> Vec<u8> {
    let mut w = Writer::new(Kind::Outbox, o.message.size_bytes() as usize + 64);
    w.bytes(o.destination.as_bytes())
        .u32(o.attempts)
        .u64(o.next_attempt_ms)
        .bytes(o.last_error.as_bytes());
    write_message(&mut w, &o.message);
    w.finish()
}

pub(crate) fn decode_outbox(bytes: &[u8]) -> Result<OutboxRecord> {
    let mut r = Reader::open(bytes, Kind::Outbox, "outbox row")?;
    let record = OutboxRecord {
        destination: r.string()?,
        attempts: r.u32()?,
        next_attempt_ms: r.u64()?,
        last_error: r.string()?,
        message: read_message(&mut r)?,
    };
    r.finish()?;
    Ok(record)
}

/// A binding's stored record: the target queue and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BindingRecord {
    pub(crate) queue: String,
    pub(crate) rule: Binding,
}

pub(crate) fn encode_binding(b: &BindingRecord) -> Vec<u8> {
    let mut w = Writer::new(Kind::Binding, 64);
    w.bytes(b.queue.as_bytes());
    match &b.rule {
        Binding::Key(k) => {
            w.u8(0).bytes(k.as_bytes());
        }
        Binding::Fanout => {
            w.u8(1);
        }
        Binding::Pattern(p) => {
            w.u8(2).bytes(p.as_bytes());
        }
        Binding::Headers { mode, headers } => {
            w.u8(3)
                .u8(match mode {
                    HeaderMatch::All => 0,
                    HeaderMatch::Any => 1,
                })
                .u32(headers.len() as u32);
            for (name, value) in headers {
                w.bytes(name.as_bytes());
                match value {
                    Some(v) => w.u8(1).bytes(v),
                    None => w.u8(0),
                };
            }
        }
    }
    w.finish()
}

pub(crate) fn decode_binding(bytes: &[u8]) -> Result<BindingRecord> {
    let mut r = Reader::open(bytes, Kind::Binding, "binding")?;
    let queue = r.string()?;
    let rule = match r.u8()? {
        0 => Binding::Key(r.string()?),
        1 => Binding::Fanout,
        2 => Binding::Pattern(r.string()?),
        3 => {
            let mode = match r.u8()? {
                0 => HeaderMatch::All,
                1 => HeaderMatch::Any,
                tag => return Err(Error::corrupted(format!("binding: header mode {tag}"))),
            };
            let count = r.u32()?;
            if count as usize > r.remaining() / 5 {
                return Err(Error::corrupted(format!("binding: header count {count}")));
            }
            let mut headers = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let name = r.string()?;
                let value = match r.u8()? {
                    0 => None,
                    1 => Some(r.bytes()?.to_vec()),
                    tag => return Err(Error::corrupted(format!("binding: option {tag}"))),
                };
                headers.push((name, value));
            }
            Binding::Headers { mode, headers }
        }
        tag => return Err(Error::corrupted(format!("binding: rule {tag}"))),
    };
    r.finish()?;
    Ok(BindingRecord { queue, rule })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc32c_over_its_parts_in_order() {
        // The CRC-32C (Castagnoli) check value: every file ever written depends on it.
        assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
        assert_eq!(crc32c(&[b"1234", b"", b"56789"]), 0xE306_9283);
        assert_eq!(crc32c(&[]), 0);
        // An envelope's checksum covers its kind and version, then its body.
        let bytes = encode_message(&sample());
        let stored = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        let mut joined = bytes[..2].to_vec();
        joined.extend_from_slice(&bytes[HEADER_BYTES..]);
        assert_eq!(stored, crc32c(&[&joined]));
    }

    fn sample() -> Message {
        Message {
            id: MessageId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10),
            key: Some(b"k".to_vec()),
            routing_key: "a.b".into(),
            headers: vec![("h".into(), b"v".to_vec())],
            payload: b"hi".into(),
            timestamp_ms: 0x1122_3344,
        }
    }

    #[test]
    fn golden_bytes_of_a_message_envelope() {
        let bytes = encode_message(&sample());
        let expected: Vec<u8> = [
            &[1u8, 1][..], // kind message, version 1
            &bytes[2..6],  // crc, checked below
            &[1],          // flags: has key
            &0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10u128.to_le_bytes(),
            &0x1122_3344u64.to_le_bytes(),
            &[1, 0, 0, 0, b'k'],                   // key
            &[3, 0, 0, 0, b'a', b'.', b'b'],       // routing key
            &[1, 0, 0, 0],                         // one header
            &[1, 0, 0, 0, b'h', 1, 0, 0, 0, b'v'], // h = v
            &[2, 0, 0, 0, b'h', b'i'],             // payload
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(
            &bytes[2..6],
            &0x62B4_3396u32.to_le_bytes()[..],
            "crc32c of this layout"
        );
        assert_eq!(decode_message(&bytes, "test").unwrap(), sample());
    }

    /// Every truncation of `bytes` fails to decode, and every single bit flip is `Corrupted`.
    fn assert_every_damage_refused<T>(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<T>) {
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.to_vec();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(decode(&flipped), Err(Error::Corrupted { .. })),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_rejected() {
        assert_every_damage_refused(&encode_message(&sample()), |b| decode_message(b, "t"));
    }

    #[test]
    fn encoded_len_is_what_encoding_writes() {
        let plain = Message::new(vec![1; 100]);
        for m in [sample(), plain] {
            assert_eq!(encode_message(&m).len(), HEADER_BYTES + encoded_len(&m));
        }
    }

    #[test]
    fn absent_key_differs_from_empty_key() {
        let mut m = sample();
        m.key = None;
        assert_eq!(decode_message(&encode_message(&m), "t").unwrap().key, None);
        m.key = Some(Vec::new());
        assert_eq!(
            decode_message(&encode_message(&m), "t").unwrap().key,
            Some(Vec::new())
        );
    }

    /// Messages that use every flag of the dense layout and every way of not using it.
    fn dense_run() -> Vec<Message> {
        let base = MessageId(0x00ff_ffff_ffff_ffff_ffff_ffff_ffff_fff0);
        (0..40u32)
            .map(|i| {
                let mut m = Message::new(vec![i as u8; (i as usize * 29) % 300])
                    .with_id(MessageId(base.0 + u128::from(i / 3 * 4 + i % 3)))
                    .with_timestamp_ms(1_000 + u64::from(i / 4));
                if i.is_multiple_of(5) {
                    m = m.with_key(if i.is_multiple_of(10) {
                        Vec::new()
                    } else {
                        vec![b'k'; 200]
                    });
                }
                if i.is_multiple_of(6) {
                    m = m.with_routing_key("a.b");
                }
                if i.is_multiple_of(7) {
                    m = m.with_header("h", vec![b'v'; 150]).with_header("e", "");
                }
                m
            })
            .collect()
    }

    #[test]
    fn a_dense_batch_round_trips_and_its_sizes_are_what_encoding_writes() {
        let run = dense_run();
        let bytes = encode_batch(run.iter());
        assert_eq!(bytes[1], BATCH_LAYOUT);
        assert_eq!(decode_batch(&bytes, "t").unwrap(), run);
        let sizes: usize = (0..run.len())
            .map(|i| batch_item_len(i.checked_sub(1).map(|p| &run[p]), &run[i]))
            .sum();
        assert_eq!(bytes.len(), BATCH_OVERHEAD + sizes);
        // Built a message at a time, the batch is the same bytes.
        let mut open = OpenBatch::new(&run[0], 0, 0);
        for m in &run[1..] {
            assert!(open.push(m, 0));
        }
        assert_eq!(open.finish(), bytes);
        // Every start and end inside the batch decodes just that part.
        for skip in [0, 1, 2, 17, 39] {
            let mut got = Vec::new();
            let count = decode_batch_part(&bytes, "t", skip, 5, |i, m| got.push((i, m))).unwrap();
            assert_eq!(count, run.len());
            let want: Vec<_> = run.iter().cloned().enumerate().skip(skip).take(5).collect();
            assert_eq!(got, want, "skip {skip}");
        }
    }

    /// Messages pushed one at a time close their batches where `split_batches` cuts the same
    /// messages, and make the same bytes: at the item bound, at the byte bound, and for
    /// messages that come within a few bytes of it or cannot fit at all.
    #[test]
    fn open_batches_cut_where_split_batches_cuts() {
        let sizes = [0, 1, 100, 1_000, 16_000, 32_500, 32_600, 32_700, 40_000];
        let mut rng = crate::testing::xorshift(0x2545_F491);
        let mut next = |n: usize| rng(n as u64) as usize;
        for round in 0..40 {
            let n = 1 + next(3_000);
            let run: Vec<Message> = (0..n)
                .map(|i| {
                    let len = if round % 2 == 0 {
                        100
                    } else {
                        sizes[next(sizes.len())]
                    };
                    Message::new(vec![i as u8; len])
                        .with_id(MessageId(i as u128))
                        .with_timestamp_ms(5)
                })
                .collect();
            let mut built: Vec<OpenBatch> = Vec::new();
            for m in &run {
                if !built.last_mut().is_some_and(|b| b.push(m, 0)) {
                    built.push(OpenBatch::new(m, 0, 0));
                }
            }
            let cut: Vec<&[Message]> = split_batches(&run, LOG_BATCH, batch_item_len).collect();
            assert_eq!(built.len(), cut.len(), "round {round}");
            for (open, chunk) in built.into_iter().zip(cut) {
                assert_eq!(open.count(), chunk.len() as u64, "round {round}");
                assert_eq!(open.finish(), encode_batch(chunk.iter()), "round {round}");
            }
        }
    }

    #[test]
    fn golden_bytes_of_a_dense_batch() {
        let a = Message::new("p").with_id(MessageId(7)).with_timestamp_ms(9);
        let b = Message::new("q")
            .with_id(MessageId(8))
            .with_timestamp_ms(9)
            .with_key("k");
        let bytes = encode_batch([a.clone(), b.clone()].iter());
        let expected: Vec<u8> = [
            &[7u8, 2][..], // kind batch, layout 2
            &bytes[2..6],  // crc
            &[2, 0, 0, 0], // two messages
            &[0],          // flags: none
            &7u128.to_le_bytes(),
            &9u64.to_le_bytes(),
            &[1, b'p'], // payload
            &[7],       // flags: key, next id, same time
            &[1, b'k'], // key
            &[1, b'q'], // payload
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(decode_batch(&bytes, "t").unwrap(), [a, b]);
    }

    #[test]
    fn a_run_of_one_producers_messages_takes_two_bytes_each_besides_the_payload() {
        let first = Message::new(vec![7; 100]).with_timestamp_ms(5);
        let run: Vec<Message> = (0..100u128)
            .map(|i| first.clone().with_id(MessageId(first.id.0 + i)))
            .collect();
        let bytes = encode_batch(run.iter());
        assert_eq!(
            bytes.len(),
            BATCH_OVERHEAD + (1 + 16 + 8 + 1 + 100) + 99 * 102
        );
    }

    #[test]
    fn a_layout_1_batch_still_decodes() {
        let run = dense_run();
        let mut w = Writer::new(Kind::Batch, 0);
        w.u32(run.len() as u32);
        for m in &run {
            write_message(&mut w, m);
        }
        let bytes = w.finish();
        assert_eq!(bytes[1], 1);
        assert_eq!(decode_batch(&bytes, "t").unwrap(), run);
        assert_eq!(batch_len(&bytes, "t").unwrap(), run.len() as u64);
        let mut got = Vec::new();
        decode_batch_part(&bytes, "t", 38, 9, |i, m| got.push((i, m))).unwrap();
        assert_eq!(got, vec![(38, run[38].clone()), (39, run[39].clone())]);
    }

    #[test]
    fn only_the_canonical_dense_bytes_decode() {
        let enc = |flags: u8, tail: &[u8]| {
            let mut w = Writer::with_layout(Kind::Batch, BATCH_LAYOUT, 0);
            w.u32(2);
            w.u8(0).u128(7).u64(9).var_bytes(b"p");
            w.u8(flags);
            w.buf.extend_from_slice(tail);
            w.finish()
        };
        let ok = enc(DENSE_NEXT_ID | DENSE_SAME_TIME, &[1, b'q']);
        let got = decode_batch(&ok, "t").unwrap();
        assert_eq!((got[1].id, got[1].timestamp_ms), (MessageId(8), 9));
        assert_eq!(encode_batch(got.iter()), ok, "re-encodes to itself");
        let refused = [
            (
                "id spelled out",
                enc(
                    DENSE_SAME_TIME,
                    &[8u128.to_le_bytes().as_slice(), &[1, b'q']].concat(),
                ),
            ),
            (
                "time spelled out",
                enc(
                    DENSE_NEXT_ID,
                    &[9u64.to_le_bytes().as_slice(), &[1, b'q']].concat(),
                ),
            ),
            (
                "long varint",
                enc(DENSE_NEXT_ID | DENSE_SAME_TIME, &[0x81, 0, b'q']),
            ),
            (
                "empty routing key",
                enc(
                    DENSE_NEXT_ID | DENSE_SAME_TIME | DENSE_ROUTING_KEY,
                    &[0, 1, b'q'],
                ),
            ),
            (
                "no headers",
                enc(
                    DENSE_NEXT_ID | DENSE_SAME_TIME | DENSE_HEADERS,
                    &[0, 1, b'q'],
                ),
            ),
            (
                "unknown flag",
                enc(0x20 | DENSE_NEXT_ID | DENSE_SAME_TIME, &[1, b'q']),
            ),
            (
                "trailing byte",
                enc(DENSE_NEXT_ID | DENSE_SAME_TIME, &[1, b'q', 0]),
            ),
            (
                "past the end",
                enc(DENSE_NEXT_ID | DENSE_SAME_TIME, &[5, b'q']),
            ),
            (
                "eleven-byte varint",
                enc(DENSE_NEXT_ID | DENSE_SAME_TIME, &[0xff; 11]),
            ),
        ];
        for (what, bytes) in refused {
            assert!(
                matches!(decode_batch(&bytes, "t"), Err(Error::Corrupted { .. })),
                "{what}"
            );
        }
        let mut first = Writer::with_layout(Kind::Batch, BATCH_LAYOUT, 0);
        first.u32(1).u8(DENSE_NEXT_ID).u64(9).var_bytes(b"p");
        assert!(
            decode_batch(&first.finish(), "t").is_err(),
            "the first id follows nothing"
        );
    }

    #[test]
    fn every_truncation_and_every_bit_flip_of_a_dense_batch_is_rejected() {
        let bytes = encode_batch(dense_run()[..6].iter());
        assert_every_damage_refused(&bytes, |b| decode_batch(b, "t"));
    }

    /// A read that shares its batch takes a run's plain messages on a path of their own
    /// (`BatchReader::take_plain`); a read of one message shares nothing and takes the general
    /// path. Both must agree on every body, sound or damaged (sealed with a correct checksum,
    /// so that the decoder's own checks are what answers).
    #[test]
    fn plain_messages_decode_alike_on_both_paths() {
        let first = MessageId(u128::MAX - 9);
        let run: Vec<Message> = [0usize, 1, 127, 128, 5, 3, 0, 9]
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                Message::new(vec![i as u8; len])
                    .with_id(MessageId(first.0 + i as u128))
                    .with_timestamp_ms(5)
            })
            .collect();
        let sound = encode_batch(run.iter());
        assert_eq!(decode_batch(&sound, "t").unwrap(), run);
        let body = &sound[HEADER_BYTES..];
        let one_by_one = |bytes: &[u8]| -> Result<Vec<Message>> {
            let count = batch_len(bytes, "t")? as usize;
            let mut out = Vec::new();
            for skip in 0..count {
                decode_batch_part(bytes, "t", skip, 1, |_, m| out.push(m))?;
            }
            Ok(out)
        };
        let mut bodies = vec![body.to_vec()];
        for at in 0..body.len() {
            for value in [0, 1, 2, 6, 0x7f, 0x80, 0xff, body[at] ^ 1] {
                let mut b = body.to_vec();
                b[at] = value;
                bodies.push(b);
            }
            bodies.push(body[..at].to_vec());
        }
        for b in bodies {
            let bytes = fuzz_seal_batch(BATCH_LAYOUT, &b);
            let whole = decode_batch(&bytes, "t");
            let single = one_by_one(&bytes);
            match (&whole, &single) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{bytes:?}"),
                (Err(Error::Corrupted { .. }), Err(Error::Corrupted { .. })) => {}
                _ => panic!("paths disagree on {bytes:?}: {whole:?} / {single:?}"),
            }
        }
    }

    #[test]
    fn varints_take_their_shortest_form() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut w = Writer::new(Kind::Message, 0);
            w.varint(v);
            let bytes = w.finish();
            assert_eq!(bytes.len() - HEADER_BYTES, varint_len(v), "{v}");
            let mut r = Reader::open(&bytes, Kind::Message, "t").unwrap();
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
    }
}
