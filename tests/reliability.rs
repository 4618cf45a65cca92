//! The reliability suite: `cargo test --release --test reliability -- --nocapture`.
//!
//! The promise: acknowledged means durable; nothing acknowledged is lost across a power cut,
//! an I/O error, a full disk, a process kill or a clock jump; at least once, never silently
//! wrong, never a panic on bad bytes. Each family prints one line
//! `reliability: <family> runs=<n> lost=0 phantom=0 beyond_bound_duplicates=0 panics=0 wrong=0`
//! and fails on any non-zero count, naming the seed to replay.
//!
//! The oracle: every workload is a fixed sequence of operations, each exactly one commit, run
//! once without faults to record the state after each prefix (the database's export, which
//! decodes and checksums every value, plus the application's own table). After a fault and a
//! recovery the state must equal the prefix of the operations acknowledged, or that plus the
//! one in flight (all or nothing); anything earlier is a loss, anything else is wrong. The
//! recovered database must then run the rest of the sequence to exactly the final state.
//!
//! Soak mode: `MQLITE_RELIABILITY_SCALE=20` multiplies every count, `MQLITE_SOAK_SECONDS=3600`
//! keeps the power cuts going for an hour, `MQLITE_RELIABILITY_SEED` moves the seeds. Debug
//! builds (plain `cargo test`) run a smoke-sized version.
#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use common::{Rng, SimDisk};
use mqlite::redb::{ReadableTable, TableDefinition};
use mqlite::{
    Binding, Database, Dedup, EnqueueOptions, Error, ManualClock, Message, MessageId, Nack,
    OutboxMessage, QueueConfig, Relay, Retention, Sink, SinkError, TopicConfig,
};
use parking_lot::Mutex;

const T0: u64 = 1_800_000_000_000;
const STEP_MS: u64 = 400;
const OPS: u64 = 24;
const DOMAIN: TableDefinition<u64, u64> = TableDefinition::new("domain");
const ENTRY: &str = "child";

/// 1 in release builds (the CI run); a smoke run in debug builds (`cargo test`).
fn scale() -> f64 {
    std::env::var("MQLITE_RELIABILITY_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 0.02 } else { 1.0 })
}

fn scaled(n: u64) -> u64 {
    ((n as f64) * scale()).ceil().max(1.0) as u64
}

/// Soak mode: `MQLITE_SOAK_SECONDS` keeps the power-cut family running (with fresh seeds)
/// until that much time has passed.
fn soak_deadline() -> Option<std::time::Instant> {
    let seconds: u64 = std::env::var("MQLITE_SOAK_SECONDS").ok()?.parse().ok()?;
    Some(std::time::Instant::now() + Duration::from_secs(seconds))
}

fn seed_base() -> u64 {
    std::env::var("MQLITE_RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

/// What one family counted.
#[derive(Default)]
struct Tally {
    runs: u64,
    lost: u64,
    phantom: u64,
    duplicates: u64,
    panics: u64,
    wrong: u64,
    notes: Vec<String>,
}

impl Tally {
    fn note(&mut self, what: String) {
        if self.notes.len() < 8 {
            self.notes.push(what);
        }
    }

    fn add(&mut self, other: Tally) {
        self.runs += other.runs;
        self.lost += other.lost;
        self.phantom += other.phantom;
        self.duplicates += other.duplicates;
        self.panics += other.panics;
        self.wrong += other.wrong;
        for n in other.notes {
            self.note(n);
        }
    }

    fn report(&self, family: &str) {
        println!(
            "reliability: {family} runs={} lost={} phantom={} beyond_bound_duplicates={} panics={} wrong={}",
            self.runs, self.lost, self.phantom, self.duplicates, self.panics, self.wrong
        );
        for n in &self.notes {
            println!("  {family}: {n}");
        }
        assert!(
            self.lost + self.phantom + self.duplicates + self.panics + self.wrong == 0,
            "{family}: failures above (replay with MQLITE_RELIABILITY_SEED and the seed named)"
        );
        assert!(self.runs > 0, "{family}: nothing ran");
    }
}

/// The broker a relay publishes to: it survives the faults of the database.
#[derive(Clone, Default)]
struct Broker(Arc<Mutex<Vec<u128>>>);

impl Sink for Broker {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        self.0
            .lock()
            .extend(messages.iter().map(|m| m.message.id.0));
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Workload {
    /// Publish batches with a domain row, commit group offsets, publish into a bounded topic.
    Topic,
    /// Enqueue (delayed, prioritised), receive, ack, nack with delay, dead-letter; leases
    /// expire, messages expire, delivery limits dead-letter.
    Queue,
    /// Outbox writes with a domain row, relayed to a broker.
    Outbox,
    /// Idempotent consumption: a dedup mark and its effect in one commit; expiry.
    Dedup,
}

const WORKLOADS: [Workload; 4] = [
    Workload::Topic,
    Workload::Queue,
    Workload::Outbox,
    Workload::Dedup,
];

struct Ctx {
    db: Database,
    clock: ManualClock,
    relay: Relay<Broker>,
    broker: Broker,
}

/// A small journal (the file is journaled, as by default), so that the workloads fill it many
/// times: every family then also cuts, fails and fills during checkpoints.
fn open(disk: &SimDisk, clock: &ManualClock) -> Result<Database, Error> {
    Database::builder()
        .clock(clock.clone())
        .journal_size_bytes(64 << 10)
        .open_backend(disk.clone())
}

fn ctx(db: Database, clock: ManualClock, broker: Broker) -> Ctx {
    Ctx {
        relay: Relay::new(db.clone(), broker.clone()),
        db,
        clock,
        broker,
    }
}

fn id(op: u64, k: u64) -> MessageId {
    MessageId(u128::from(op) << 16 | u128::from(k) | 1 << 100)
}

fn setup(db: &Database, w: Workload) -> Result<(), Error> {
    db.write(|txn| {
        match w {
            Workload::Topic => {
                txn.create_topic("t", TopicConfig::default())?;
                txn.create_topic(
                    "short",
                    TopicConfig::default().retention(Retention {
                        max_messages: Some(5),
                        ..Retention::default()
                    }),
                )?;
                txn.open_table(DOMAIN)?;
            }
            Workload::Queue => {
                txn.create_queue("dlq", QueueConfig::default())?;
                txn.create_queue(
                    "jobs",
                    QueueConfig::default()
                        .lease_ms(1000)
                        .max_deliveries(3)
                        .dead_letter("dlq")
                        .message_ttl_ms(6000),
                )?;
                txn.create_topic("in", TopicConfig::default().retention(Retention::none()))?;
                txn.bind("in", "jobs", Binding::Fanout)?;
            }
            Workload::Outbox => {
                txn.open_table(DOMAIN)?;
            }
            Workload::Dedup => {
                txn.create_topic("effects", TopicConfig::default())?;
            }
        }
        Ok(())
    })
}

/// Operation `i` of a workload: exactly one commit (or none when there is nothing to do).
fn op(c: &mut Ctx, w: Workload, i: u64) -> Result<(), Error> {
    c.clock.set_ms(T0 + (i + 1) * STEP_MS);
    let db = &c.db;
    match w {
        Workload::Topic => match i % 4 {
            0 | 1 => db.write(|txn| {
                txn.open_table(DOMAIN)?.insert(i, i * 7)?;
                let batch: Vec<Message> = (0..1 + i % 3)
                    .map(|k| {
                        Message::new(format!("m{i}.{k}"))
                            .with_id(id(i, k))
                            .with_key(vec![0xff, i as u8])
                    })
                    .collect();
                txn.publish_batch("t", &batch).map(|_| ())
            }),
            2 => db.write(|txn| {
                let end = txn.topic_info("t")?.next_offset;
                txn.commit_offset("t", "g", end.saturating_sub(1))
            }),
            _ => db.write(|txn| {
                for k in 0..3 {
                    txn.publish("short", &Message::new(vec![k as u8; 40]).with_id(id(i, k)))?;
                }
                Ok(())
            }),
        },
        Workload::Queue => match i % 6 {
            0 => db.write(|txn| {
                txn.publish("in", &Message::new(format!("q{i}")).with_id(id(i, 0)))?;
                txn.enqueue_with(
                    "jobs",
                    &Message::new(format!("d{i}")).with_id(id(i, 1)),
                    EnqueueOptions {
                        delay_ms: 600,
                        priority: (i % 10) as u8,
                    },
                )
            }),
            1 => db.write(|txn| txn.receive("jobs", 2).map(|_| ())),
            2 => db.write(|txn| {
                if let Some(d) = txn.receive("jobs", 1)?.first() {
                    txn.ack(&d.lease)?;
                }
                Ok(())
            }),
            3 => db.write(|txn| {
                if let Some(d) = txn.receive("jobs", 1)?.first() {
                    txn.nack(&d.lease, Nack::RequeueAfter(300))?;
                }
                Ok(())
            }),
            4 => db.write(|txn| {
                if let Some(d) = txn.receive("jobs", 1)?.first() {
                    txn.nack(&d.lease, Nack::DeadLetter)?;
                }
                Ok(())
            }),
            _ => db.write(|txn| txn.enqueue("jobs", &Message::new("e").with_id(id(i, 2)))),
        },
        Workload::Outbox => match i % 3 {
            0 | 1 => db.write(|txn| {
                txn.open_table(DOMAIN)?.insert(i, i)?;
                txn.outbox_put(
                    "up.orders",
                    &Message::new(format!("o{i}")).with_id(id(i, 0)),
                )
                .map(|_| ())
            }),
            _ => c.relay.run_once().map(|_| ()),
        },
        Workload::Dedup => {
            if i % 8 == 7 {
                return db.expire_dedup().map(|_| ());
            }
            let seen = id(i % 5, 9);
            db.write(|txn| {
                if txn.dedup("consumer", seen, 2000)? == Dedup::New {
                    txn.publish(
                        "effects",
                        &Message::new(format!("effect {i}")).with_id(id(i, 3)),
                    )?;
                }
                Ok(())
            })
        }
    }
}

/// The state the oracle compares: the export (every mqlite value, decoded and checksummed)
/// and the application's own table.
fn fingerprint(db: &Database) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    db.export(&mut out, |_| {})?;
    db.read(|r| {
        if let Ok(table) = r.open_table(DOMAIN) {
            for row in table.iter()? {
                let (k, v) = row?;
                out.extend_from_slice(format!("domain {} {}\n", k.value(), v.value()).as_bytes());
            }
        }
        Ok::<_, Error>(())
    })?;
    Ok(out)
}

/// A workload's fault-free run: the image after setup, the fingerprints after each prefix,
/// and how many backend operations opening and running it takes.
struct Reference {
    image: Vec<u8>,
    states: Vec<Vec<u8>>,
    backend_ops: u64,
    /// Backend operations a clean open of the final image takes (for crashes in recovery).
    open_ops: u64,
}

fn reference(w: Workload) -> Reference {
    let disk = SimDisk::new();
    let clock = ManualClock::new(T0);
    setup(&open(&disk, &clock).unwrap(), w).unwrap();
    let image = disk.live_image();
    let disk = SimDisk::from_image(image.clone());
    let mut c = ctx(open(&disk, &clock).unwrap(), clock, Broker::default());
    let mut states = vec![fingerprint(&c.db).unwrap()];
    for i in 0..OPS {
        op(&mut c, w, i).unwrap();
        states.push(fingerprint(&c.db).unwrap());
    }
    let backend_ops = disk.ops();
    drop(c);
    let last = SimDisk::from_image(disk.live_image());
    drop(open(&last, &ManualClock::new(T0)).unwrap());
    Reference {
        image,
        states,
        backend_ops,
        open_ops: last.ops(),
    }
}

/// After a fault: `db` recovered with `acked` operations acknowledged. Checks the state,
/// runs the rest of the workload and checks the end state.
fn check_recovered(
    reference: &Reference,
    w: Workload,
    mut c: Ctx,
    acked: u64,
    what: &str,
    tally: &mut Tally,
) {
    let state = match fingerprint(&c.db) {
        Ok(s) => s,
        Err(e) => {
            tally.wrong += 1;
            tally.note(format!("{what}: reading after recovery failed: {e}"));
            return;
        }
    };
    // Some operations change nothing (a receive with nothing ready): several prefixes can
    // share a state, so the acknowledged prefix is looked at first.
    let matches = |j: u64| reference.states.get(j as usize) == Some(&state);
    let found = [acked, acked + 1]
        .into_iter()
        .find(|&j| matches(j))
        .or_else(|| (0..=OPS).find(|&j| matches(j)).map(|j| j as usize as u64));
    let Some(j) = found else {
        tally.wrong += 1;
        tally.note(format!(
            "{what}: recovered state matches no prefix (acked {acked})"
        ));
        return;
    };
    if j < acked {
        tally.lost += 1;
        tally.note(format!("{what}: acked {acked} but recovered {j}"));
        return;
    }
    if j > acked + 1 {
        tally.phantom += 1;
        tally.note(format!("{what}: acked {acked} but recovered {j}"));
        return;
    }
    // Counts and indexes agree with the entries, every value decodes.
    match c.db.verify(|_| {}) {
        Ok(report) if report.problems.is_empty() => {}
        Ok(report) => {
            tally.wrong += 1;
            tally.note(format!("{what}: verify found {:?}", report.problems));
            return;
        }
        Err(e) => {
            tally.wrong += 1;
            tally.note(format!("{what}: verify failed: {e}"));
            return;
        }
    }
    if w == Workload::Outbox {
        // Rows no longer pending were confirmed by the broker first.
        let pending: BTreeSet<u128> =
            c.db.read(|r| r.outbox_pending(1000))
                .unwrap()
                .iter()
                .map(|m| m.message.id.0)
                .collect();
        let sent: BTreeSet<u128> = c.broker.0.lock().iter().copied().collect();
        let put: Vec<u128> = (0..j).filter(|i| i % 3 != 2).map(|i| id(i, 0).0).collect();
        if put
            .iter()
            .any(|p| !pending.contains(p) && !sent.contains(p))
        {
            tally.wrong += 1;
            tally.note(format!(
                "{what}: a row left the outbox before the broker had it"
            ));
        }
    }
    for i in j..OPS {
        if let Err(e) = op(&mut c, w, i) {
            tally.wrong += 1;
            tally.note(format!("{what}: op {i} after recovery failed: {e}"));
            return;
        }
    }
    match fingerprint(&c.db) {
        Ok(end) if end == reference.states[OPS as usize] => {}
        _ => {
            tally.wrong += 1;
            tally.note(format!("{what}: the end state differs after recovery"));
        }
    }
    if w == Workload::Outbox {
        let mut counts: BTreeMap<u128, u32> = BTreeMap::new();
        for id in c.broker.0.lock().iter() {
            *counts.entry(*id).or_default() += 1;
        }
        let expected = (0..OPS).filter(|i| i % 3 != 2).count();
        if counts.len() != expected {
            tally.lost += 1;
            tally.note(format!(
                "{what}: broker has {} of {expected} rows",
                counts.len()
            ));
        }
        // One fault can make one batch be sent twice, never more.
        if counts.values().any(|&n| n > 2) {
            tally.duplicates += 1;
            tally.note(format!("{what}: a row reached the broker more than twice"));
        }
    }
}

/// Runs `f`, counting a panic.
fn guarded(tally: &mut Tally, what: &str, f: impl FnOnce(&mut Tally)) {
    tally.runs += 1;
    let mut inner = Tally::default();
    if catch_unwind(AssertUnwindSafe(|| f(&mut inner))).is_err() {
        inner.panics += 1;
        inner.note(format!("{what}: panicked"));
    }
    inner.runs = 0;
    tally.add(inner);
}

/// One power cut at a random backend operation; with `recovery_crash`, a second one inside
/// the recovery that follows.
fn power_cut_run(r: &Reference, w: Workload, seed: u64, recovery_crash: bool, tally: &mut Tally) {
    let what = format!("{w:?} seed {seed}");
    guarded(tally, &what, |tally| {
        let mut rng = Rng::new(seed);
        let clock = ManualClock::new(T0);
        let disk = SimDisk::from_image(r.image.clone());
        disk.crash_at(1 + rng.below(r.backend_ops + 1));
        let broker = Broker::default();
        let mut acked = 0;
        if let Ok(db) = open(&disk, &clock) {
            let mut c = ctx(db, clock.clone(), broker.clone());
            for i in 0..OPS {
                if op(&mut c, w, i).is_err() {
                    break;
                }
                acked = i + 1;
            }
        }
        let mut image = disk.crash_image(&mut rng);
        if recovery_crash {
            let again = SimDisk::from_image(image);
            again.crash_at(1 + rng.below(r.open_ops + 1));
            drop(open(&again, &clock));
            image = again.crash_image(&mut rng);
        }
        let clock = ManualClock::new(T0);
        match open(&SimDisk::from_image(image), &clock) {
            Ok(db) => check_recovered(r, w, ctx(db, clock, broker), acked, &what, tally),
            Err(e) => {
                tally.wrong += 1;
                tally.note(format!("{what}: reopen failed: {e}"));
            }
        }
    });
}

#[test]
fn power_cuts() {
    if common::child_role().is_some() {
        return;
    }
    let runs = scaled(10_000);
    let handles: Vec<_> = WORKLOADS
        .into_iter()
        .map(|w| {
            std::thread::spawn(move || {
                let r = reference(w);
                let mut cuts = Tally::default();
                let mut recovery = Tally::default();
                let deadline = soak_deadline();
                let mut n = 0;
                while n < runs || deadline.is_some_and(|d| std::time::Instant::now() < d) {
                    n += 1;
                    let seed = seed_base() ^ (n << 8) ^ w as u64;
                    // One run in four also crashes inside the recovery.
                    if n % 4 == 3 {
                        power_cut_run(&r, w, seed, true, &mut recovery);
                    } else {
                        power_cut_run(&r, w, seed, false, &mut cuts);
                    }
                }
                (w, cuts, recovery)
            })
        })
        .collect();
    let mut recovery_all = Tally::default();
    for h in handles {
        let (w, cuts, recovery) = h.join().unwrap();
        cuts.report(&format!("power_cut_{}", format!("{w:?}").to_lowercase()));
        recovery_all.add(recovery);
    }
    recovery_all.report("crash_during_recovery");
}

/// Runs a workload on `disk` in one process, keeping the same `Database` handle through the
/// failures `inject` arranges: when an operation fails, `heal` makes the disk good again and
/// the same handle must recover by itself, hold every acknowledged operation, and finish the
/// workload. Returns the first error seen, for the caller to judge.
fn same_process_run(
    r: &Reference,
    w: Workload,
    disk: &SimDisk,
    what: &str,
    heal: impl Fn(),
    tally: &mut Tally,
) -> Option<Error> {
    let clock = ManualClock::new(T0);
    let db = match open(disk, &clock) {
        Ok(db) => db,
        Err(e) => {
            // The failure hit the open itself: nothing was acknowledged; open again.
            heal();
            match open(disk, &clock) {
                Ok(db) => {
                    check_recovered(r, w, ctx(db, clock, Broker::default()), 0, what, tally);
                    return Some(e);
                }
                Err(again) => {
                    tally.wrong += 1;
                    tally.note(format!("{what}: open failed after healing: {again}"));
                    return Some(e);
                }
            }
        }
    };
    let mut c = ctx(db, clock, Broker::default());
    let mut acked = 0;
    let mut first_error = None;
    for i in 0..OPS {
        match op(&mut c, w, i) {
            Ok(()) => acked = i + 1,
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    heal();
    check_recovered(r, w, c, acked, what, tally);
    first_error
}

#[test]
fn io_errors_at_every_operation() {
    if common::child_role().is_some() {
        return;
    }
    for w in [Workload::Topic, Workload::Queue, Workload::Outbox] {
        let r = reference(w);
        let mut tally = Tally::default();
        for forever in [false, true] {
            for k in 1..=r.backend_ops {
                let what = format!("{w:?} fail op {k} {}", if forever { "on" } else { "once" });
                guarded(&mut tally, &what.clone(), |tally| {
                    let disk = SimDisk::from_image(r.image.clone());
                    disk.fail_at(k, forever);
                    let healer = disk.clone();
                    same_process_run(&r, w, &disk, &what, || healer.clear_failures(), tally);
                });
            }
        }
        tally.report(&format!("io_error_{}", format!("{w:?}").to_lowercase()));
    }
}

#[test]
fn disk_full_then_space_freed_without_restart() {
    if common::child_role().is_some() {
        return;
    }
    let mut tally = Tally::default();
    let mut filled = 0;
    for w in [Workload::Topic, Workload::Queue] {
        let r = reference(w);
        let start = r.image.len() as u64;
        // How big the file gets over the whole workload.
        let end = {
            let disk = SimDisk::from_image(r.image.clone());
            let clock = ManualClock::new(T0);
            let mut c = ctx(open(&disk, &clock).unwrap(), clock, Broker::default());
            for i in 0..OPS {
                op(&mut c, w, i).unwrap();
            }
            drop(c); // the close checkpoints: the file's final size
            disk.live_image().len() as u64
        };
        println!("  disk_full: {w:?} file grows from {start} to {end} bytes");
        for n in 0..25u64 {
            // Quotas from half the starting size to the final size: below the current size,
            // writes to the file's far pages fail; above, growing it does.
            let low = start / 2;
            let quota = low + (end - low) * n / 24;
            let what = format!("{w:?} quota {quota}");
            guarded(&mut tally, &what.clone(), |tally| {
                let disk = SimDisk::from_image(r.image.clone());
                disk.set_quota(Some(quota));
                let healer = disk.clone();
                let error = same_process_run(&r, w, &disk, &what, || healer.set_quota(None), tally);
                filled += u64::from(error.is_some());
                if let Some(e) = error
                    && !matches!(e, Error::StorageFull)
                {
                    tally.wrong += 1;
                    tally.note(format!("{what}: a full disk reported as {e:?}"));
                }
            });
        }
    }
    tally.report("disk_full");
    println!(
        "  disk_full: {filled} of {} runs filled the disk and went on without a restart",
        tally.runs
    );
    assert!(
        filled * 2 >= tally.runs,
        "most quota positions must fill the disk"
    );
}

#[test]
fn single_bit_flips_in_a_closed_file() {
    if common::child_role().is_some() {
        return;
    }
    // A closed file holding every kind of value.
    let disk = SimDisk::new();
    let clock = ManualClock::new(T0);
    {
        let db = open(&disk, &clock).unwrap();
        for w in WORKLOADS {
            setup(&db, w).unwrap();
        }
        let mut c = ctx(db, clock.clone(), Broker::default());
        for w in WORKLOADS {
            for i in 0..OPS {
                op(&mut c, w, i).unwrap();
            }
        }
    }
    let image = disk.live_image();
    let expected =
        fingerprint(&open(&SimDisk::from_image(image.clone()), &clock).unwrap()).unwrap();
    let mut tally = Tally::default();
    let (mut detected, mut harmless) = (0, 0);
    // redb panics on some damaged pages (caught and counted below); keep its messages out of
    // the log, and every other panic in it.
    let default_hook = Arc::new(std::panic::take_hook());
    let hook = default_hook.clone();
    std::panic::set_hook(Box::new(move |info| {
        if !info.location().is_some_and(|l| l.file().contains("/redb-")) {
            hook(info);
        }
    }));
    let mut rng = Rng::new(seed_base());
    // Most of a small file is free space; aim four flips in five at bytes in use.
    let used: Vec<usize> = (0..image.len()).filter(|&i| image[i] != 0).collect();
    for n in 0..scaled(2_000) {
        let at = if rng.chance(80) {
            used[rng.below(used.len() as u64) as usize]
        } else {
            rng.below(image.len() as u64) as usize
        };
        let bit = rng.below(8);
        let what = format!("flip byte {at} bit {bit} (run {n})");
        let mut outcome = None;
        guarded(&mut tally, &what.clone(), |tally| {
            let mut damaged = image.clone();
            damaged[at] ^= 1 << bit;
            // The default open, which verifies every page checksum.
            let result = Database::builder()
                .clock(clock.clone())
                .open_backend(SimDisk::from_image(damaged))
                .and_then(|db| fingerprint(&db));
            match result {
                Err(_) => outcome = Some(true),
                Ok(state) if state == expected => outcome = Some(false),
                Ok(state) => {
                    tally.wrong += 1;
                    let a = String::from_utf8_lossy(&expected);
                    let b = String::from_utf8_lossy(&state);
                    let diff: Vec<String> = a
                        .lines()
                        .zip(b.lines())
                        .filter(|(x, y)| x != y)
                        .take(1)
                        .map(|(x, y)| format!("\n    was {x}\n    now {y}"))
                        .collect();
                    tally.note(format!(
                        "{what}: read back different data without an error{}",
                        diff.join("")
                    ));
                }
            }
        });
        match outcome {
            Some(true) => detected += 1,
            Some(false) => harmless += 1,
            None => {}
        }
    }
    drop(std::panic::take_hook());
    std::panic::set_hook(Box::new(move |info| default_hook(info)));
    tally.report("bit_flips");
    println!(
        "  bit_flips (default open, verify_on_open): {detected} detected with an error, {harmless} in bytes nothing reads"
    );
}

/// The child processes' entry point; a no-op in the normal test run.
#[test]
fn child() {
    let Some((role, args)) = common::child_role() else {
        return;
    };
    match role.as_str() {
        // Publishes, enqueues and writes the outbox in one commit per id, printing each id once
        // its commit returned, until killed.
        "writer" => {
            let db = Database::open(&args[0]).unwrap();
            let mut next = db.read(|r| r.topic_info("t")).unwrap().next_offset;
            loop {
                db.write(|txn| {
                    let m = Message::new(next.to_le_bytes().to_vec()).with_id(id(next, 0));
                    txn.publish("t", &m)?;
                    txn.enqueue("jobs", &m)?;
                    txn.outbox_put("up", &m).map(|_| ())
                })
                .unwrap();
                println!("acked {next}");
                next += 1;
            }
        }
        // Opens the file and holds it until stdin closes.
        "holder" => {
            let mode = match args[1].as_str() {
                "multi" => mqlite::redb::ConcurrencyMode::MultiWriter,
                _ => mqlite::redb::ConcurrencyMode::ExclusiveWriter,
            };
            let _db = Database::builder()
                .concurrency(mode)
                .open(&args[0])
                .unwrap();
            println!("ready");
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn kill_9_of_a_writer_process() {
    use std::io::{BufRead, BufReader};
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed.mqlite");
    let file = path.to_str().unwrap();
    Database::open(&path)
        .unwrap()
        .write(|txn| {
            txn.create_topic("t", TopicConfig::default())?;
            txn.create_queue("jobs", QueueConfig::default())
        })
        .unwrap();
    let mut tally = Tally::default();
    let mut rng = Rng::new(seed_base());
    let mut acked_total: u64 = 0;
    for n in 0..scaled(200) {
        let what = format!("kill {n}");
        let mut child = common::spawn_child(ENTRY, "writer", &[file]);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it acknowledge a few commits, then kill it at a random moment.
        let wait_for = 1 + rng.below(8);
        let mut acked = Vec::new();
        for line in lines.by_ref() {
            let Some(id) = line
                .unwrap()
                .strip_prefix("acked ")
                .map(|s| s.parse::<u64>().unwrap())
            else {
                continue;
            };
            acked.push(id);
            if acked.len() as u64 >= wait_for {
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever it printed before dying was acknowledged too.
        for line in lines {
            if let Some(id) = line.unwrap().strip_prefix("acked ") {
                acked.push(id.parse().unwrap());
            }
        }
        tally.runs += 1;
        let db = match Database::open(&path) {
            Ok(db) => db,
            Err(e) => {
                tally.wrong += 1;
                tally.note(format!("{what}: reopen failed: {e}"));
                break;
            }
        };
        let (info, queue, outbox) = db
            .read(|r| Ok::<_, Error>((r.topic_info("t")?, r.queue_info("jobs")?, r.outbox_info()?)))
            .unwrap();
        let last = acked.iter().max().copied().unwrap_or(0);
        if info.next_offset <= last {
            tally.lost += 1;
            tally.note(format!(
                "{what}: acked {last} but the topic ends at {}",
                info.next_offset
            ));
        }
        // At most the one commit in flight at the kill went through unacknowledged.
        if info.next_offset > last + 2 {
            tally.phantom += 1;
            tally.note(format!(
                "{what}: topic ends at {} after ack {last}",
                info.next_offset
            ));
        }
        if queue.ready != info.next_offset || outbox.backlog != info.next_offset {
            tally.wrong += 1;
            tally.note(format!("{what}: topic, queue and outbox disagree"));
        }
        for id in &acked {
            let record = db.read(|r| r.read_topic("t", *id, 1)).unwrap();
            if record.first().map(|r| r.message.payload.to_vec()) != Some(id.to_le_bytes().to_vec())
            {
                tally.lost += 1;
                tally.note(format!("{what}: acked id {id} missing or wrong"));
            }
        }
        acked_total += acked.len() as u64;
    }
    tally.report("kill_9");
    println!("  kill_9: {acked_total} acknowledged commits checked after the kills");
}

#[test]
fn clock_jumps_during_leases_and_retention() {
    if common::child_role().is_some() {
        return;
    }
    const HOUR: u64 = 3_600_000;
    let jumps: [(&str, i64); 3] = [
        ("-1h", -(HOUR as i64)),
        ("+1h", HOUR as i64),
        ("+10y", 10 * 365 * 24 * HOUR as i64),
    ];
    let mut tally = Tally::default();
    for (name, jump) in jumps {
        for v in 0..10u64 {
            let (lease_n, ack_n) = (20 + 2 * v as usize, 2 * v as usize);
            let what = format!("jump {name}, {lease_n} leased, {ack_n} acked");
            guarded(&mut tally, &what.clone(), |tally| {
                let clock = ManualClock::new(T0);
                let db = Database::builder()
                    .clock(clock.clone())
                    .open_in_memory()
                    .unwrap();
                db.write(|txn| {
                    txn.create_queue("jobs", QueueConfig::default().lease_ms(30_000))?;
                    txn.create_topic(
                        "t",
                        TopicConfig::default().retention(Retention {
                            max_age_ms: Some(2 * HOUR),
                            ..Retention::default()
                        }),
                    )?;
                    for i in 0..100u64 {
                        txn.enqueue("jobs", &Message::new(i.to_le_bytes().to_vec()))?;
                        txn.publish("t", &Message::new(i.to_le_bytes().to_vec()))?;
                    }
                    Ok::<_, Error>(())
                })
                .unwrap();
                let leased = db.write(|txn| txn.receive("jobs", lease_n)).unwrap();
                db.write(|txn| {
                    txn.ack_many(
                        &leased[..ack_n]
                            .iter()
                            .map(|d| d.lease.clone())
                            .collect::<Vec<_>>(),
                    )
                })
                .unwrap();
                clock.set_ms(T0.saturating_add_signed(jump));
                db.enforce_retention().unwrap();
                // Everything not acked comes out again: early (a forward jump expires leases), never lost.
                let mut seen = BTreeMap::new();
                let mut leases = Vec::new();
                for round in 0..4 {
                    let got = db.write(|txn| txn.receive("jobs", 1000)).unwrap();
                    for d in &got {
                        *seen.entry(d.message.payload.clone()).or_insert(0u32) += 1;
                        leases.push(d.lease.clone());
                    }
                    if round == 1 {
                        // Time goes on past every lease's end. After a backward jump that is the
                        // end as granted: a lease runs late by the jump, and is never lost.
                        clock.set_ms(T0.max(T0.saturating_add_signed(jump)) + 31_000);
                    }
                }
                for lease in &leases {
                    let _ = db.write(|txn| txn.ack(lease));
                }
                // Every message not acked before the jump comes back; one still leased may come
                // back once early.
                if seen.len() != 100 - ack_n {
                    tally.lost += 1;
                    tally.note(format!(
                        "{what}: {} of {} unacked messages came back",
                        seen.len(),
                        100 - ack_n
                    ));
                }
                if seen.values().any(|&n| n > 2) {
                    tally.duplicates += 1;
                    tally.note(format!("{what}: a message came back more than twice"));
                }
                let left = db.read(|r| r.queue_info("jobs")).unwrap();
                if left.depth() != 0 {
                    tally.wrong += 1;
                    tally.note(format!("{what}: {} left after acking all", left.depth()));
                }
                // Retention by age: a backward jump removes nothing; a forward one past the bound
                // removes everything, and the topic keeps its offsets.
                let t = db.read(|r| r.topic_info("t")).unwrap();
                let expected_len = if jump > 2 * HOUR as i64 { 0 } else { 100 };
                if t.len() != expected_len || t.next_offset != 100 {
                    tally.wrong += 1;
                    tally.note(format!(
                        "{what}: topic holds {} (expected {expected_len})",
                        t.len()
                    ));
                }
                // Time going backwards must not reorder or lose new appends.
                clock.set_ms(T0.saturating_add_signed(jump).saturating_sub(HOUR));
                let offset = db
                    .write(|txn| txn.publish("t", &Message::new("after")))
                    .unwrap();
                if offset != 100 {
                    tally.wrong += 1;
                    tally.note(format!("{what}: next offset {offset}"));
                }
            });
        }
    }
    tally.report("clock_jumps");
}

#[test]
fn a_second_process_opening_the_same_file() {
    use std::io::{BufRead, BufReader, Write};
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    for mode in ["exclusive", "multi"] {
        let path = dir.path().join(format!("{mode}.mqlite"));
        let file = path.to_str().unwrap();
        drop(Database::open(&path).unwrap());
        let mut holder = common::spawn_child(ENTRY, "holder", &[file, mode]);
        let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
        common::read_until(&mut lines, "ready");
        let before = std::fs::read(&path).unwrap();
        tally.runs += 1;
        match mode {
            "exclusive" => match Database::open(&path) {
                Err(Error::AlreadyOpen { .. }) => {
                    if std::fs::read(&path).unwrap() != before {
                        tally.wrong += 1;
                        tally.note("the refused open changed the file".into());
                    }
                }
                Ok(_) => {
                    tally.wrong += 1;
                    tally.note("a second exclusive open succeeded".into());
                }
                Err(e) => {
                    tally.wrong += 1;
                    tally.note(format!("a second exclusive open failed unclearly: {e}"));
                }
            },
            _ => {
                let shared = Database::builder()
                    .concurrency(mqlite::redb::ConcurrencyMode::MultiWriter)
                    .open(&path);
                match shared.and_then(|db| {
                    db.write(|txn| txn.create_topic("from-second", TopicConfig::default()))
                }) {
                    Ok(()) => {}
                    Err(e) => {
                        tally.wrong += 1;
                        tally.note(format!("shared open failed: {e}"));
                    }
                }
            }
        }
        holder.stdin.take().unwrap().write_all(b"").unwrap();
        assert!(holder.wait().unwrap().success());
    }
    tally.report("second_process");
}

#[test]
fn a_crash_at_every_step_of_file_creation() {
    if common::child_role().is_some() {
        return;
    }
    let steps = [
        mqlite::CreateStep::CreateTemp,
        mqlite::CreateStep::WriteSchema,
        mqlite::CreateStep::SyncTemp,
        mqlite::CreateStep::Link,
        mqlite::CreateStep::RemoveTemp,
        mqlite::CreateStep::SyncDirectory,
    ];
    let mut tally = Tally::default();
    for crash in steps {
        let what = format!("crash at {crash:?}");
        guarded(&mut tally, &what.clone(), |tally| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("app.mqlite");
            let result = Database::builder()
                .create_hook(move |step| {
                    if step == crash {
                        Err(std::io::Error::other("simulated crash"))
                    } else {
                        Ok(())
                    }
                })
                .open(&path);
            if result.is_ok() {
                tally.wrong += 1;
                tally.note(format!("{what}: the open succeeded"));
            }
            // No file, or a whole one: a file under the name must be a complete database.
            if path.exists()
                && let Err(e) = Database::builder().open_read_only(&path)
            {
                tally.wrong += 1;
                tally.note(format!("{what}: a partial file was left: {e}"));
            }
            match Database::open(&path)
                .and_then(|db| db.write(|txn| txn.create_topic("t", TopicConfig::default())))
            {
                Ok(()) => {}
                Err(e) => {
                    tally.wrong += 1;
                    tally.note(format!("{what}: the next open failed: {e}"));
                }
            }
        });
    }
    tally.report("file_creation");
}
