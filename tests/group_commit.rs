//! Guards group commit: concurrent durable writers share transactions and fsyncs, every
//! caller's effects land exactly once and in its own order, a failing or panicking closure
//! is dropped from its batch while the others commit, and each caller gets its own outcome;
//! with closures run by their own threads (`write`) and by the leader (`write_send`), mixed.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::SimDisk;
use mqlite::{Database, Error, Message, Overflow, QueueConfig, TopicConfig};

fn db_on_slow_disk() -> (Database, SimDisk) {
    let disk = SimDisk::new();
    let db = Database::builder().open_backend(disk.clone()).unwrap();
    db.write(|txn| txn.create_topic("t", TopicConfig::default()))
        .unwrap();
    disk.set_sync_latency_us(500);
    (db, disk)
}

#[test]
fn concurrent_durable_writers_share_fsyncs_and_each_write_lands_once_in_order() {
    const THREADS: u32 = 16;
    const EACH: u32 = 100;
    let (db, disk) = db_on_slow_disk();
    let syncs_before = disk.syncs();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let m = Message::new([t.to_le_bytes(), i.to_le_bytes()].concat());
                    if t % 2 == 0 {
                        db.write(|txn| txn.publish("t", &m)).unwrap();
                    } else {
                        db.write_send(move |txn| txn.publish("t", &m)).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let syncs = disk.syncs() - syncs_before;
    let records = db.read(|r| r.read_topic("t", 0, 100_000)).unwrap();
    assert_eq!(records.len() as u32, THREADS * EACH);
    let mut next: HashMap<u32, u32> = HashMap::new();
    for r in &records {
        let t = u32::from_le_bytes(r.message.payload[..4].try_into().unwrap());
        let i = u32::from_le_bytes(r.message.payload[4..].try_into().unwrap());
        let expected = next.entry(t).or_insert(0);
        assert_eq!(i, *expected, "thread {t}'s writes keep their order");
        *expected += 1;
    }
    assert!(
        syncs * 2 <= u64::from(THREADS * EACH),
        "{syncs} fsyncs for {} durable writes: not coalesced",
        THREADS * EACH
    );
    println!(
        "group commit: {} durable writes, {syncs} fsyncs",
        THREADS * EACH
    );
}

#[test]
fn a_failing_closure_leaves_its_batch_and_the_others_commit() {
    let (db, _disk) = db_on_slow_disk();
    // A queue whose one message can only be dead-lettered, into a queue that refuses it: a
    // receive there fails part-way and breaks its transaction, even when the closure
    // handles the error and returns Ok.
    db.write(|txn| {
        txn.create_queue(
            "dlq",
            QueueConfig::default().max_length(0, Overflow::RejectPublish),
        )?;
        txn.create_queue(
            "stuck",
            QueueConfig::default()
                .lease_ms(1)
                .max_deliveries(1)
                .dead_letter("dlq"),
        )?;
        txn.enqueue("stuck", &Message::new("m"))
    })
    .unwrap();
    assert_eq!(db.write(|txn| txn.receive("stuck", 1)).unwrap().len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let runs = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..12u32)
        .map(|t| {
            let (db, runs) = (db.clone(), runs.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                for i in 0..50u32 {
                    let fail = (t + i) % 3 == 0;
                    let breaks = (t + i) % 5 == 1;
                    let attempt = move |txn: &mqlite::WriteTransaction<'_>, runs: &AtomicU64| {
                        runs.fetch_add(1, Ordering::Relaxed);
                        let offset = txn.publish("t", &Message::new(vec![t as u8, i as u8]))?;
                        if fail {
                            return Err(Error::InvalidConfig(format!("t{t} i{i}")));
                        }
                        if breaks {
                            let refused = txn.receive("stuck", 1);
                            assert!(matches!(refused, Err(Error::QueueFull { .. })));
                        }
                        Ok(offset)
                    };
                    let result = if t % 2 == 0 {
                        db.write(|txn| attempt(txn, &runs))
                    } else {
                        let runs = runs.clone();
                        db.write_send(move |txn| attempt(txn, &runs))
                    };
                    match (fail, breaks, result) {
                        (true, _, Err(Error::InvalidConfig(m))) => {
                            assert_eq!(m, format!("t{t} i{i}"));
                        }
                        (false, true, Err(Error::QueueFull { queue, .. })) => {
                            assert_eq!(queue, "dlq");
                        }
                        (false, false, Ok(_)) => outcomes.push((t as u8, i as u8)),
                        (fail, breaks, other) => panic!("fail={fail} breaks={breaks}: {other:?}"),
                    }
                }
                outcomes
            })
        })
        .collect();
    let mut committed: Vec<(u8, u8)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    committed.sort_unstable();
    let mut stored: Vec<(u8, u8)> = db
        .read(|r| r.read_topic("t", 0, 10_000))
        .unwrap()
        .iter()
        .map(|r| (r.message.payload[0], r.message.payload[1]))
        .collect();
    stored.sort_unstable();
    assert_eq!(
        stored, committed,
        "exactly the successful writes, each once"
    );
    let info = db.read(|r| r.topic_info("t")).unwrap();
    assert_eq!(
        info.next_offset as usize,
        committed.len(),
        "offsets stay dense"
    );
    // No broken transaction committed: the stuck message is still where it was.
    let stuck = db.write(|txn| txn.receive("stuck", 1));
    assert!(matches!(stuck, Err(Error::QueueFull { .. })), "{stuck:?}");
    println!(
        "closure runs {} for {} calls",
        runs.load(Ordering::Relaxed),
        12 * 50
    );
}

#[test]
fn a_panicking_closure_panics_its_own_caller_only() {
    let (db, _disk) = db_on_slow_disk();
    let panicker = {
        let db = db.clone();
        std::thread::spawn(move || {
            db.write(|txn| {
                txn.publish("t", &Message::new("doomed"))?;
                panic!("handler bug");
                #[allow(unreachable_code)]
                Ok::<_, Error>(())
            })
        })
    };
    let send_panicker = {
        let db = db.clone();
        std::thread::spawn(move || {
            db.write_send(|txn| {
                txn.publish("t", &Message::new("doomed"))?;
                panic!("handler bug, run by whichever thread leads");
                #[allow(unreachable_code)]
                Ok::<_, Error>(())
            })
        })
    };
    let writers: Vec<_> = (0..8u8)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    if t % 2 == 0 {
                        db.write(|txn| txn.publish("t", &Message::new(vec![t])))
                            .unwrap();
                    } else {
                        db.write_send(move |txn| txn.publish("t", &Message::new(vec![t])))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    assert!(panicker.join().is_err(), "the panic reaches its caller");
    let panic = send_panicker.join().unwrap_err();
    assert_eq!(
        panic.downcast_ref::<&str>(),
        Some(&"handler bug, run by whichever thread leads"),
        "the panic reaches its own caller, whichever thread ran it"
    );
    for w in writers {
        w.join().unwrap();
    }
    let records = db.read(|r| r.read_topic("t", 0, 1000)).unwrap();
    assert_eq!(records.len(), 160);
    assert!(records.iter().all(|r| r.message.payload != b"doomed"));
    // The database still takes writes.
    db.write(|txn| txn.publish("t", &Message::new("after")))
        .unwrap();
}

/// With relaxed durability a flusher thread runs; dropping the last handle must close the file
/// before returning, so that it can be opened again at once.
#[test]
fn relaxed_file_reopens_right_after_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relaxed.mqlite");
    for i in 0..100u64 {
        let db = mqlite::Database::builder()
            .durability(mqlite::Durability::Relaxed)
            .flush_interval_ms(1)
            .open(&path)
            .unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        db.write(|txn| {
            txn.ensure_topic("t", mqlite::TopicConfig::default())?;
            txn.publish("t", &mqlite::Message::new(i.to_le_bytes().to_vec()))
        })
        .unwrap();
        // Let the flusher be mid-flush now and then when the handle drops.
        std::thread::sleep(std::time::Duration::from_micros(i % 7 * 300));
    }
    let db = mqlite::Database::open(&path).unwrap();
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 100);
}

/// A disk whose syncs wait while the test holds them: shows who waits for an fsync.
#[derive(Debug, Clone)]
struct HeldSyncs {
    disk: SimDisk,
    held: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    entered: Arc<parking_lot::Mutex<Option<std::sync::mpsc::Sender<()>>>>,
}

impl HeldSyncs {
    fn hold(&self, on: bool) {
        *self.held.0.lock() = on;
        self.held.1.notify_all();
    }
}

impl mqlite::redb::StorageBackend for HeldSyncs {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.disk.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.disk.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let mut held = self.held.0.lock();
        if *held && let Some(tx) = self.entered.lock().as_ref() {
            let _ = tx.send(());
        }
        while *held {
            self.held.1.wait(&mut held);
        }
        drop(held);
        self.disk.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.disk.write(offset, data)
    }
}

/// The flush of relaxed commits fsyncs after redb's write lock is released: a relaxed writer
/// commits while that fsync is still on the disk, and the flush covers the commits before it.
#[test]
fn relaxed_writers_do_not_wait_for_the_flushers_fsync() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let disk = HeldSyncs {
        disk: SimDisk::new(),
        held: Arc::default(),
        entered: Arc::new(parking_lot::Mutex::new(Some(entered_tx))),
    };
    let db = mqlite::Database::builder()
        .durability(mqlite::Durability::Relaxed)
        .flush_interval_ms(3_600_000)
        .open_backend(disk.clone())
        .unwrap();
    db.write(|txn| {
        txn.create_topic("t", TopicConfig::default())?;
        txn.publish("t", &Message::new("before the flush"))
    })
    .unwrap();
    disk.hold(true);
    let flusher = {
        let db = db.clone();
        std::thread::spawn(move || db.flush())
    };
    // Generous bounds: they tell a deadlock from a slow machine, they time nothing.
    let wait = std::time::Duration::from_secs(30);
    entered
        .recv_timeout(wait)
        .expect("the flush reached its fsync");
    let (done_tx, done) = std::sync::mpsc::channel();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            let r = db.write(|txn| txn.publish("t", &Message::new("during the fsync")));
            let _ = done_tx.send(());
            r
        })
    };
    let committed = done.recv_timeout(wait);
    disk.hold(false);
    assert!(
        committed.is_ok(),
        "a relaxed writer waited for the flusher's fsync"
    );
    assert_eq!(writer.join().unwrap().unwrap(), 1);
    flusher.join().unwrap().unwrap();
    // What the flush covered survives a power cut now; the later commit may or may not.
    let image = disk.disk.crash_image(&mut common::Rng::new(7));
    drop(db);
    let db = mqlite::Database::builder()
        .open_backend(SimDisk::from_image(image))
        .unwrap();
    let records = db.read(|r| r.read_topic("t", 0, 10)).unwrap();
    assert!(!records.is_empty(), "the flushed commit was lost");
    assert_eq!(records[0].message.payload, b"before the flush");
}
