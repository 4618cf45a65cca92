//! Guards the first promise: a commit that returned Ok survives a power cut, and a commit that
//! did not is all-or-nothing. A simulated disk drops, reorders and tears every write not yet
//! synced at hundreds of crash points. (File creation, I/O errors and the rest: `tests/reliability.rs`.)

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use common::{Rng, SimDisk};
use mqlite::redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use mqlite::{Database, Error, Message, TopicConfig};

const DOMAIN: TableDefinition<u64, u64> = TableDefinition::new("domain");
const STEPS: u64 = 24;
const CRASH_POINTS: u64 = 600;

/// Step `i`'s payload: its number, and `size - 8` more bytes (large messages fill record
/// batches of their own, whose pages a durable commit places ahead of its journal record).
fn payload(i: u64, size: usize) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.resize(size.max(8), (i % 251) as u8);
    p
}

/// One step: a domain row, a published message of `size` bytes and a group offset, in one
/// commit.
fn step(db: &Database, i: u64, size: usize) -> Result<(), Error> {
    db.write(|txn| {
        txn.open_table(DOMAIN)?.insert(i, i * 7)?;
        let offset = txn.publish("t", &Message::new(payload(i, size)).with_key("k"))?;
        assert_eq!(offset, i);
        txn.commit_offset("t", "g", offset + 1)
    })
}

/// Checks the recovered database: it holds a whole prefix of the steps, at least the `acked`
/// ones (durable when they returned) and at most `tried`; returns how many.
fn check(db: &Database, acked: u64, tried: u64, seed: u64, size: usize) -> u64 {
    let ctx = format!("seed {seed}, acked {acked}, tried {tried}");
    db.read(|r| {
        let domain = r.open_table(DOMAIN);
        let rows = match domain {
            Ok(t) => t.len()?,
            Err(_) => 0,
        };
        let info = r.topic_info("t")?;
        assert!(
            rows >= acked,
            "lost an acknowledged commit: {ctx}, rows {rows}"
        );
        assert!(rows <= tried, "phantom commit: {ctx}, rows {rows}");
        assert_eq!(info.next_offset, rows, "topic and domain disagree: {ctx}");
        let records = r.read_topic("t", 0, 1000)?;
        assert_eq!(records.len() as u64, rows, "{ctx}");
        for (i, rec) in records.iter().enumerate() {
            assert_eq!(rec.offset, i as u64, "gap: {ctx}");
            assert_eq!(rec.message.payload, payload(i as u64, size), "{ctx}");
        }
        if rows > 0 {
            assert_eq!(r.group_info("t", "g")?.committed, rows, "offset: {ctx}");
            let t = r.open_table(DOMAIN)?;
            for i in 0..rows {
                assert_eq!(t.get(i)?.map(|v| v.value()), Some(i * 7), "{ctx}");
            }
        }
        Ok::<_, Error>(rows)
    })
    .unwrap_or_else(|e| panic!("reading after recovery failed: {ctx}: {e}"))
}

fn prepare() -> (SimDisk, u64) {
    let disk = SimDisk::new();
    let db = Database::builder().open_backend(disk.clone()).unwrap();
    db.write(|txn| txn.create_topic("t", TopicConfig::default()))
        .unwrap();
    drop(db);
    let ops = disk.ops();
    (disk, ops)
}

/// Runs [`STEPS`] steps of `size`-byte messages, with a power cut at [`CRASH_POINTS`] points
/// of it; returns how many cuts fell inside the workload.
fn power_cuts(size: usize) -> u64 {
    // Measure how many backend operations the whole workload takes.
    let (disk, base) = prepare();
    let db = Database::builder().open_backend(disk.clone()).unwrap();
    let open_ops = disk.ops() - base;
    for i in 0..STEPS {
        step(&db, i, size).unwrap();
    }
    drop(db);
    let total_ops = disk.ops() - base;

    let mut mid_workload = 0;
    for run in 0..CRASH_POINTS {
        let seed = 0xC0FFEE + run;
        let mut rng = Rng::new(seed);
        let (disk, _) = prepare();
        let image = disk.live_image();
        let disk = SimDisk::from_image(image);
        // Anywhere, open and close included; three in four after the open (a journaled
        // commit takes few operations next to the open's reads).
        disk.crash_at(if rng.chance(75) {
            open_ops + 1 + rng.below(total_ops - open_ops)
        } else {
            1 + rng.below(total_ops)
        });
        let mut acked = 0;
        if let Ok(db) = Database::builder().open_backend(disk.clone()) {
            for i in 0..STEPS {
                if step(&db, i, size).is_err() {
                    break;
                }
                acked = i + 1;
            }
        }
        let crashed = SimDisk::from_image(disk.crash_image(&mut rng));
        let db = Database::builder()
            .open_backend(crashed)
            .unwrap_or_else(|e| panic!("reopen after power cut failed: seed {seed}: {e}"));
        let rows = check(&db, acked, acked + 1, seed, size);
        if 0 < acked && acked < STEPS {
            mid_workload += 1;
        }
        // The recovered database takes new work.
        step(&db, rows, size).unwrap_or_else(|e| panic!("write after recovery: seed {seed}: {e}"));
    }
    mid_workload
}

#[test]
fn acknowledged_commits_survive_power_cuts_and_failed_ones_are_atomic() {
    let mid_workload = power_cuts(8);
    // The crash points must land inside the workload, not only before or after it.
    assert!(
        mid_workload > CRASH_POINTS / 2,
        "only {mid_workload} crashes mid-workload"
    );
    println!("power cuts: runs={CRASH_POINTS} mid_workload={mid_workload} lost=0 phantom=0");
}

/// The same with messages of 40 KB: each fills a record batch of its own, whose pages the
/// journal places ahead of the commit's record.
#[test]
fn acknowledged_commits_of_large_messages_survive_power_cuts() {
    let mid_workload = power_cuts(40_000);
    assert!(
        mid_workload > CRASH_POINTS / 2,
        "only {mid_workload} crashes mid-workload"
    );
}

/// The relaxed workload: steps committed without an fsync, a flush after every third.
/// Returns how many steps a returned flush covered and how many were tried.
fn relaxed_run(disk: &SimDisk) -> (u64, u64) {
    let (mut flushed, mut tried) = (0, 0);
    let opened = Database::builder()
        .durability(mqlite::Durability::Relaxed)
        // Flushes come from the workload only, so that each run is one sequence of operations.
        .flush_interval_ms(3_600_000)
        // Small: records fill it often, so checkpoints (and oversized syncs) fall mid-workload.
        .journal_size_bytes(64 << 10)
        .open_backend(disk.clone());
    if let Ok(db) = opened {
        for i in 0..STEPS {
            tried = i + 1;
            if step(&db, i, 8).is_err() {
                break;
            }
            if i % 3 == 2 {
                if db.flush().is_err() {
                    break;
                }
                flushed = i + 1;
            }
        }
    }
    (flushed, tried)
}

/// Relaxed durability's promise: a power cut keeps a whole prefix of the commits, and at least
/// every commit before the last `flush` that returned (whose fsync runs after redb's write
/// lock is released).
#[test]
fn relaxed_commits_survive_power_cuts_up_to_the_last_flush() {
    let (disk, base) = prepare();
    let _ = relaxed_run(&disk);
    let total_ops = disk.ops() - base;
    let (disk, base) = prepare();
    let db = Database::builder().open_backend(disk.clone()).unwrap();
    let open_ops = disk.ops() - base;
    drop(db);
    let mut mid_workload = 0;
    for run in 0..CRASH_POINTS {
        let seed = 0x5EED + run;
        let mut rng = Rng::new(seed);
        let (disk, _) = prepare();
        let disk = SimDisk::from_image(disk.live_image());
        // Three in four after the open, as above.
        disk.crash_at(if rng.chance(75) {
            open_ops + 1 + rng.below(total_ops - open_ops)
        } else {
            1 + rng.below(total_ops)
        });
        let (flushed, tried) = relaxed_run(&disk);
        let crashed = SimDisk::from_image(disk.crash_image(&mut rng));
        let db = Database::builder()
            .open_backend(crashed)
            .unwrap_or_else(|e| panic!("reopen after power cut failed: seed {seed}: {e}"));
        check(&db, flushed, tried, seed, 8);
        if 0 < flushed && flushed < STEPS {
            mid_workload += 1;
        }
    }
    // Relaxed steps take few operations next to the close's checkpoint, where a third of the
    // crash points fall.
    assert!(
        mid_workload > CRASH_POINTS / 4,
        "only {mid_workload} crashes mid-workload"
    );
    println!(
        "relaxed power cuts: runs={CRASH_POINTS} mid_workload={mid_workload} lost=0 phantom=0"
    );
}

/// A new journaled database on a backend writes only one header slot until its first
/// checkpoint: a power cut before that must still find the journal, and the commits in it.
#[test]
fn a_new_journaled_backend_cut_before_its_first_checkpoint_keeps_its_commits() {
    let disk = SimDisk::new();
    let db = Database::builder().open_backend(disk.clone()).unwrap();
    db.write(|txn| txn.create_topic("t", TopicConfig::default()))
        .unwrap();
    for i in 0..3 {
        step(&db, i, 8).unwrap();
    }
    let image = disk.crash_image(&mut Rng::new(1));
    let db = Database::builder()
        .open_backend(SimDisk::from_image(image))
        .unwrap();
    check(&db, 3, 3, 1, 8);
}

const BLOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("blobs");
/// Rows of the blob table: 3 000 rows of 3 KiB fill about 3 000 pages, more than two records
/// of unsynced pages.
const BLOB_ROWS: u64 = 3_000;

fn blob(row: u64, round: u8) -> Vec<u8> {
    let mut v = vec![round; 3 << 10];
    v[..8].copy_from_slice(&row.to_le_bytes());
    v
}

/// A relaxed flush fsyncs after redb's write lock is released, and redb counts the commit
/// durable as soon as its write returns: a commit during that fsync may reuse the pages the
/// flushed state freed, pages the last synced state still holds. If that commit checkpoints
/// (its unsynced pages fill the journal), no page may go in place before the flushed record is
/// synced; otherwise a power cut there leaves neither the old state nor the new one.
#[test]
fn a_checkpoint_during_a_flush_fsync_keeps_the_last_synced_state() {
    let open = |disk: &SimDisk| {
        Database::builder()
            .durability(mqlite::Durability::Relaxed)
            .flush_interval_ms(3_600_000)
            // Holds one record of 1 025 pages (the most kept unsynced in memory), not two.
            .journal_size_bytes(6 << 20)
            .open_backend(disk.clone())
            .unwrap()
    };
    let fill = |db: &Database, rows: std::ops::Range<u64>, round: u8| {
        db.write(|txn| {
            let mut t = txn.open_table(BLOBS)?;
            for row in rows.clone() {
                t.insert(row, blob(row, round).as_slice())?;
            }
            Ok::<_, Error>(())
        })
    };
    // The last synced state: round 1 of every row, closed, so all of it is in place.
    let base = SimDisk::new();
    let db = open(&base);
    for chunk in 0..10 {
        let rows = chunk * BLOB_ROWS / 10..(chunk + 1) * BLOB_ROWS / 10;
        fill(&db, rows, 1).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    let image = base.live_image();

    for seed in 0..8 {
        let disk = SimDisk::from_image(image.clone());
        let db = open(&disk);
        // Relaxed: the rows go, their pages are freed once a durable commit follows.
        db.write(|txn| {
            let mut t = txn.open_table(BLOBS)?;
            for row in 0..BLOB_ROWS {
                t.remove(row)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        // The flush's record is written; its fsync is in flight when the next commit runs.
        disk.pause_next_sync();
        let flush = std::thread::scope(|scope| {
            let flusher = scope.spawn(|| db.flush());
            disk.wait_for_paused_sync();
            disk.crash_at_next_sync();
            // New rows on the freed pages, enough unsynced pages to fill the journal.
            let refill = fill(&db, 0..BLOB_ROWS, 2);
            assert!(refill.is_err(), "the refill met the power cut");
            disk.resume_sync();
            flusher.join().unwrap()
        });
        assert!(flush.is_err(), "the flush's fsync never completed");
        drop(db);

        let crashed = SimDisk::from_image(disk.crash_image(&mut Rng::new(seed)));
        let db = Database::builder()
            .open_backend(crashed)
            .unwrap_or_else(|e| panic!("reopen after power cut failed: seed {seed}: {e}"));
        // Round 1 whole, or the removal whole (the flush may have landed); the refill failed.
        let rows = db
            .read(|r| {
                let t = r.open_table(BLOBS)?;
                let mut rows = 0;
                for entry in t.iter()? {
                    let (k, v) = entry?;
                    assert_eq!(
                        v.value(),
                        blob(k.value(), 1),
                        "seed {seed}, row {}",
                        k.value()
                    );
                    rows += 1;
                }
                Ok::<_, Error>(rows)
            })
            .unwrap_or_else(|e| panic!("reading after recovery failed: seed {seed}: {e}"));
        assert!(
            rows == 0 || rows == BLOB_ROWS,
            "seed {seed}: {rows} rows, neither the synced state nor the flushed one"
        );
    }
}
