//! Guards the first promise: a commit that returned Ok survives a power cut, and a commit that
//! did not is all-or-nothing. A simulated disk drops, reorders and tears every write not yet
//! synced at hundreds of crash points. (File creation, I/O errors and the rest: `tests/reliability.rs`.)

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use common::{Rng, SimDisk};
use mqlite::redb::{ReadableTableMetadata, TableDefinition};
use mqlite::{Database, Error, Message, TopicConfig};

const DOMAIN: TableDefinition<u64, u64> = TableDefinition::new("domain");
const STEPS: u64 = 24;
const CRASH_POINTS: u64 = 600;

/// One step: a domain row, a published message and a group offset, in one commit.
fn step(db: &Database, i: u64) -> Result<(), Error> {
    db.write(|txn| {
        txn.open_table(DOMAIN)?.insert(i, i * 7)?;
        let offset = txn.publish("t", &Message::new(i.to_le_bytes().to_vec()).with_key("k"))?;
        assert_eq!(offset, i);
        txn.commit_offset("t", "g", offset + 1)
    })
}

/// Checks the recovered database against the count of acknowledged steps; returns how many
/// steps it holds.
fn check(db: &Database, acked: u64, seed: u64) -> u64 {
    let ctx = format!("seed {seed}, acked {acked}");
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
        assert!(rows <= acked + 1, "phantom commit: {ctx}, rows {rows}");
        assert_eq!(info.next_offset, rows, "topic and domain disagree: {ctx}");
        let records = r.read_topic("t", 0, 1000)?;
        assert_eq!(records.len() as u64, rows, "{ctx}");
        for (i, rec) in records.iter().enumerate() {
            assert_eq!(rec.offset, i as u64, "gap: {ctx}");
            assert_eq!(rec.message.payload, (i as u64).to_le_bytes(), "{ctx}");
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

#[test]
fn acknowledged_commits_survive_power_cuts_and_failed_ones_are_atomic() {
    // Measure how many backend operations the whole workload takes.
    let (disk, base) = prepare();
    let db = Database::builder().open_backend(disk.clone()).unwrap();
    let open_ops = disk.ops() - base;
    for i in 0..STEPS {
        step(&db, i).unwrap();
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
                if step(&db, i).is_err() {
                    break;
                }
                acked = i + 1;
            }
        }
        let crashed = SimDisk::from_image(disk.crash_image(&mut rng));
        let db = Database::builder()
            .open_backend(crashed)
            .unwrap_or_else(|e| panic!("reopen after power cut failed: seed {seed}: {e}"));
        let rows = check(&db, acked, seed);
        if 0 < acked && acked < STEPS {
            mid_workload += 1;
        }
        // The recovered database takes new work.
        step(&db, rows).unwrap_or_else(|e| panic!("write after recovery: seed {seed}: {e}"));
    }
    // The crash points must land inside the workload, not only before or after it.
    assert!(
        mid_workload > CRASH_POINTS / 2,
        "only {mid_workload} crashes mid-workload"
    );
    println!("power cuts: runs={CRASH_POINTS} mid_workload={mid_workload} lost=0 phantom=0");
}
