//! The properties the fuzz targets check, shared by `fuzz/` (cargo-fuzz) and by
//! `tests/fuzz_regressions.rs`, which replays every input saved under `fuzz/regressions/`.
//! Only the public API and std: the fuzz crate builds this file as a module of its own.
#![allow(dead_code, reason = "each user calls a different check")]
#![allow(
    clippy::unwrap_used,
    reason = "a broken property must crash the fuzzer"
)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use mqlite::redb::StorageBackend;
use mqlite::{Database, EntryState, Lease, ManualClock, Message, Nack, QueueConfig, TopicConfig};

/// Decoding arbitrary bytes as a message envelope or a record batch never panics; what
/// decodes re-encodes to itself (a batch of the older layout 1 re-encodes in the current
/// layout, to the same messages).
pub fn envelope(data: &[u8]) {
    if let Ok(message) = mqlite::fuzz_decode_message(data) {
        assert_eq!(mqlite::fuzz_encode_message(&message), data);
    }
    batch(data);
    // The same bytes as the body of a batch with a correct checksum, so that the decoder's
    // checks past the checksum meet them too.
    for layout in [1, 2] {
        batch(&mqlite::fuzz_seal_batch(layout, data));
    }
}

fn batch(bytes: &[u8]) {
    if let Ok(messages) = mqlite::fuzz_decode_batch(bytes) {
        let encoded = mqlite::fuzz_encode_batch(&messages);
        if bytes[1] == 1 {
            assert_eq!(mqlite::fuzz_decode_batch(&encoded).ok(), Some(messages));
        } else {
            assert_eq!(encoded, bytes);
        }
    }
}

/// The wildcard matcher never panics, `#` matches every key, and a pattern without wildcards
/// matches exactly itself.
pub fn pattern(pattern: &str, key: &str) {
    let matched = mqlite::pattern_matches(pattern, key);
    assert!(mqlite::pattern_matches("#", key));
    if !pattern.split('.').any(|w| w == "*" || w == "#") {
        assert_eq!(matched, pattern == key);
    }
}

/// A disk in memory: writes reach `live`; `sync_data` copies them to `durable`; after
/// `fail_after` more operations every operation fails (the power went).
#[derive(Debug, Default)]
struct Disk {
    live: Vec<u8>,
    durable: Vec<u8>,
    ops_left: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct MemDisk(Arc<Mutex<Disk>>);

impl MemDisk {
    pub fn with_image(image: Vec<u8>) -> Self {
        MemDisk(Arc::new(Mutex::new(Disk {
            live: image.clone(),
            durable: image,
            ops_left: None,
        })))
    }

    fn fail_after(&self, ops: u64) {
        self.0.lock().unwrap().ops_left = Some(ops);
    }

    fn durable(&self) -> Vec<u8> {
        self.0.lock().unwrap().durable.clone()
    }

    fn step(&self) -> std::io::Result<std::sync::MutexGuard<'_, Disk>> {
        let mut d = self.0.lock().unwrap();
        match &mut d.ops_left {
            Some(0) => return Err(std::io::Error::other("power cut")),
            Some(n) => *n -= 1,
            None => {}
        }
        Ok(d)
    }
}

impl StorageBackend for MemDisk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.step()?.live.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let d = self.step()?;
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let bytes = d
            .live
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        if len > 1 << 30 {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        self.step()?.live.resize(len, 0);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let mut d = self.step()?;
        d.durable = d.live.clone();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.step()?;
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        if start + data.len() > 1 << 30 {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        if d.live.len() < start + data.len() {
            d.live.resize(start + data.len(), 0);
        }
        d.live[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Opening arbitrary bytes as a database, with the integrity check on, never panics and never
/// returns an error-free read of values that fail their checksums: it opens and reads, or it
/// refuses with an error.
pub fn open_file(data: &[u8]) {
    let disk = MemDisk::with_image(data.to_vec());
    let opened = Database::builder()
        .verify_on_open(true)
        .clock(ManualClock::new(1))
        .open_backend(disk);
    if let Ok(db) = opened {
        let mut out = Vec::new();
        let _ = db.export(&mut out, |_| {});
        let _ = db.verify(|_| {});
        let _ = db.metrics();
    }
}

/// The model of the operations below: the topic's payloads, the group's offset, and the
/// queue's messages by sequence with (payload, leased, deliveries).
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    topic: Vec<Vec<u8>>,
    committed: u64,
    queue: BTreeMap<u64, (Vec<u8>, bool, u32)>,
    next_seq: u64,
}

enum Op {
    /// Publishes of this payload and up to three variants of it in one transaction, read back
    /// inside it before commit (they share a record batch held until then).
    Publish(Vec<u8>, u8),
    Commit(u64),
    Enqueue(Vec<u8>),
    Receive(usize),
    Ack(usize),
    Nack(usize),
    /// Several enqueues in one transaction (they reach the FIFO lane as one batch).
    EnqueueMany(u8, u8),
    /// Receive up to n and ack the first k of them in one transaction.
    Consume(usize, usize),
    PowerCut(u64),
}

fn parse(data: &[u8]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut it = data.iter().copied();
    while let Some(code) = it.next() {
        let arg = it.next().unwrap_or(0);
        ops.push(match code % 9 {
            0 => Op::Publish(vec![arg; usize::from(arg % 64)], 1 + arg / 64),
            1 => Op::Commit(u64::from(arg)),
            2 => Op::Enqueue(vec![arg; usize::from(arg % 32)]),
            3 => Op::Receive(usize::from(arg % 4) + 1),
            4 => Op::Ack(usize::from(arg)),
            5 => Op::Nack(usize::from(arg)),
            6 => Op::EnqueueMany(arg % 9 + 1, arg),
            7 => Op::Consume(usize::from(arg % 6) + 1, usize::from(arg / 6 % 7)),
            _ => Op::PowerCut(u64::from(arg) * 3),
        });
    }
    ops
}

impl Model {
    /// Leases the first `n` ready messages (sequence order: the queue has one priority);
    /// returns their sequences.
    fn lease_ready(&mut self, n: usize) -> Vec<u64> {
        let ready: Vec<u64> = self
            .queue
            .iter()
            .filter(|(_, (_, l, _))| !*l)
            .map(|(s, _)| *s)
            .take(n)
            .collect();
        for s in &ready {
            let entry = self.queue.get_mut(s).unwrap();
            entry.1 = true;
            entry.2 += 1;
        }
        ready
    }

    fn leased(&self, pick: usize) -> Option<(u64, u32)> {
        let leased: Vec<(u64, u32)> = self
            .queue
            .iter()
            .filter(|(_, (_, l, _))| *l)
            .map(|(s, (_, _, d))| (*s, *d))
            .collect();
        (!leased.is_empty()).then(|| leased[pick % leased.len()])
    }

    /// Applies `op` to the model and to `db` (one commit); returns the model after it and
    /// whether the database acknowledged it.
    fn apply(&self, db: &Database, op: &Op) -> (Model, bool) {
        let mut next = self.clone();
        let lease = |seq, deliveries| Lease {
            queue: "q".into(),
            sequence: seq,
            delivery_count: deliveries,
        };
        let ok = match op {
            Op::Publish(p, count) => {
                let payloads: Vec<Vec<u8>> = (0..*count)
                    .map(|i| p.iter().map(|b| b.wrapping_add(i)).collect())
                    .collect();
                next.topic.extend(payloads.iter().cloned());
                db.write(|txn| {
                    let mut first = None;
                    for q in &payloads {
                        let offset = txn.publish("t", &Message::new(q.clone()))?;
                        first.get_or_insert(offset);
                    }
                    let from = first.unwrap_or(0);
                    let seen = txn.read_topic("t", from, usize::MAX)?;
                    let seen: Vec<&[u8]> = seen.iter().map(|r| &r.message.payload[..]).collect();
                    assert_eq!(
                        seen,
                        payloads.iter().collect::<Vec<_>>(),
                        "read back at {from}"
                    );
                    Ok::<_, mqlite::Error>(())
                })
                .is_ok()
            }
            Op::Commit(at) => {
                let at = (*at).min(next.topic.len() as u64);
                next.committed = at;
                db.write(|txn| txn.commit_offset("t", "g", at)).is_ok()
            }
            Op::Enqueue(p) => {
                next.queue.insert(next.next_seq, (p.clone(), false, 0));
                next.next_seq += 1;
                db.write(|txn| txn.enqueue("q", &Message::new(p.clone())))
                    .is_ok()
            }
            Op::Receive(n) => {
                next.lease_ready(*n);
                db.write(|txn| txn.receive("q", *n)).is_ok()
            }
            Op::EnqueueMany(count, byte) => {
                let payloads: Vec<Vec<u8>> = (0..*count)
                    .map(|i| vec![byte.wrapping_add(i); usize::from(i % 5)])
                    .collect();
                for p in &payloads {
                    next.queue.insert(next.next_seq, (p.clone(), false, 0));
                    next.next_seq += 1;
                }
                db.write(|txn| {
                    for p in &payloads {
                        txn.enqueue("q", &Message::new(p.clone()))?;
                    }
                    Ok::<_, mqlite::Error>(())
                })
                .is_ok()
            }
            Op::Consume(n, acks) => {
                for seq in next.lease_ready(*n).into_iter().take(*acks) {
                    next.queue.remove(&seq);
                }
                db.write(|txn| {
                    let got = txn.receive("q", *n)?;
                    for d in got.iter().take(*acks) {
                        txn.ack(&d.lease)?;
                    }
                    Ok::<_, mqlite::Error>(())
                })
                .is_ok()
            }
            Op::Ack(pick) => match self.leased(*pick) {
                Some((seq, d)) => {
                    next.queue.remove(&seq);
                    db.write(|txn| txn.ack(&lease(seq, d))).is_ok()
                }
                None => return (next, true),
            },
            Op::Nack(pick) => match self.leased(*pick) {
                Some((seq, d)) => {
                    next.queue.get_mut(&seq).unwrap().1 = false;
                    db.write(|txn| txn.nack(&lease(seq, d), Nack::Requeue))
                        .is_ok()
                }
                None => return (next, true),
            },
            Op::PowerCut(_) => return (next, true),
        };
        (next, ok)
    }

    fn matches(&self, db: &Database) -> bool {
        let read = db.read(|r| {
            let records = r.read_topic("t", 0, usize::MAX)?;
            let committed = r.group_info("t", "g").map_or(0, |g| g.committed);
            let held = r.browse_queue("q", 0, usize::MAX)?;
            Ok::<_, mqlite::Error>((records, committed, held))
        });
        let Ok((records, committed, held)) = read else {
            return false;
        };
        let topic: Vec<Vec<u8>> = records
            .into_iter()
            .map(|r| r.message.payload.into_vec())
            .collect();
        let queue: BTreeMap<u64, (Vec<u8>, bool, u32)> = held
            .into_iter()
            .map(|m| {
                (
                    m.sequence,
                    (
                        m.message.payload.into_vec(),
                        m.state == EntryState::InFlight,
                        m.delivery_count,
                    ),
                )
            })
            .collect();
        topic == self.topic && committed == self.committed && queue == self.queue
    }
}

fn open(disk: &MemDisk) -> mqlite::Result<Database> {
    // A fixed clock: leases never expire by themselves, so the model needs no time. The
    // smallest journal: the operations fill it often, so cuts land in checkpoints too.
    Database::builder()
        .clock(ManualClock::new(1_000))
        .journal_size_bytes(64 << 10)
        .open_backend(disk.clone())
}

/// A sequence of operations against the model, with power cuts in the middle of operations:
/// after each cut the reopened database holds exactly the acknowledged operations, or those
/// and the one in flight, and goes on.
pub fn operations(data: &[u8]) {
    let mut disk = MemDisk::default();
    let mut db = open(&disk).unwrap();
    db.write(|txn| {
        txn.create_topic("t", TopicConfig::default())?;
        txn.create_queue("q", QueueConfig::default())
    })
    .unwrap();
    let mut model = Model::default();
    let mut pending_cut = None;
    for op in parse(data) {
        if let Op::PowerCut(after) = op {
            pending_cut = Some(after);
            disk.fail_after(after);
            continue;
        }
        let (next, acked) = model.apply(&db, &op);
        if acked {
            model = next;
            continue;
        }
        // The power went during `op`: recover from what was synced.
        assert!(pending_cut.is_some(), "an operation failed without a fault");
        drop(db);
        disk = MemDisk::with_image(disk.durable());
        db = open(&disk).unwrap();
        if next.matches(&db) {
            model = next;
        } else {
            assert!(
                model.matches(&db),
                "recovered state is neither before nor after the op"
            );
        }
        pending_cut = None;
    }
    assert!(model.matches(&db), "final state differs from the model");
}
