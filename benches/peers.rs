//! mqlite against its peers, in one run, on one disk, with 100-byte payloads: an fsync probe
//! (append + fdatasync), raw redb, SQLite (WAL, synchronous=FULL, through rusqlite `bundled`)
//! and mqlite. Prints a table and writes `target/bench/results.json`.
//!
//! `cargo bench --bench peers` (about 4 minutes) or `cargo bench --bench peers -- --quick`.
//! Run by `cargo test --all-targets` it makes a smoke run with tiny sizes (figures without
//! meaning, written to `target/bench/smoke-results.json`).
//!
//! Workloads W1 to W9 as issue #5 names them. The machines are shared and noisy: compare rows
//! of the same run, never absolute numbers across runs. The systems of each write ratio (W1
//! and W2 with the fsync probe and SQLite, W3 with the raw disk and SQLite) run in interleaved
//! slices, so that they see the same disk; W6 compares with an fsync timed in the same rounds.
//! W1's one-thread rows also report their time on a CPU per operation (user and system, from
//! Linux's schedstat): what a commit costs beyond waiting for the disk.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mqlite::redb::TableDefinition;
use mqlite::{Database, Message, QueueConfig, TopicConfig};

const PAYLOAD: [u8; 100] = [7; 100];
const RAW: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");

struct Row {
    workload: &'static str,
    system: &'static str,
    value: f64,
    unit: &'static str,
    note: String,
}

struct Bench {
    dir: PathBuf,
    secs: f64,
    rows: Vec<Row>,
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let _ = std::fs::remove_file(&p);
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", p.display()));
        }
        p
    }

    fn push(
        &mut self,
        workload: &'static str,
        system: &'static str,
        value: f64,
        unit: &'static str,
        note: &str,
    ) {
        println!("{workload:<4} {system:<7} {value:>14.1} {unit:<6} {note}");
        self.rows.push(Row {
            workload,
            system,
            value,
            unit,
            note: note.to_owned(),
        });
    }

    /// Runs the workloads in turn, a short slice each, until each has had the time budget;
    /// returns each one's messages per second. The disk's speed drifts from one minute to the
    /// next, so systems measured one after the other would see different disks: interleaved,
    /// the rows of one ratio share the disk's moods. A workload is called with its slice's
    /// length and returns the messages it handled in it.
    fn interleaved(&self, work: &mut [&mut dyn FnMut(Duration) -> f64]) -> Vec<f64> {
        const ROUNDS: u32 = 6;
        let slice = Duration::from_secs_f64(self.secs / f64::from(ROUNDS));
        let mut totals = vec![(0.0, 0.0); work.len()];
        for _ in 0..ROUNDS {
            for (w, total) in work.iter_mut().zip(&mut totals) {
                let start = Instant::now();
                total.0 += w(slice);
                total.1 += start.elapsed().as_secs_f64();
            }
        }
        totals.iter().map(|(n, secs)| n / secs).collect()
    }
}

/// The time this thread has spent on a CPU (user and system), in nanoseconds, from Linux's
/// schedstat; `None` where there is none.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The CPU time of one workload's slices on the bench's thread, and the operations they did:
/// what a commit costs beyond waiting for the disk.
#[derive(Default)]
struct OnCpu {
    ns: Cell<u64>,
    ops: Cell<f64>,
}

impl OnCpu {
    /// Runs `slice`, which returns the operations it did, and adds its CPU time.
    fn time(&self, slice: impl FnOnce() -> f64) -> f64 {
        let before = thread_cpu_ns();
        let ops = slice();
        if let (Some(a), Some(b)) = (before, thread_cpu_ns()) {
            self.ns.set(self.ns.get() + (b - a));
        }
        self.ops.set(self.ops.get() + ops);
        ops
    }

    /// Microseconds on a CPU per operation, when the system tells.
    fn per_op_us(&self) -> Option<f64> {
        thread_cpu_ns()?;
        Some(self.ns.get() as f64 / 1000.0 / self.ops.get())
    }
}

/// Calls `f` until `slice` has passed; returns the messages it reported.
fn repeat(slice: Duration, mut f: impl FnMut() -> f64) -> f64 {
    let start = Instant::now();
    let mut n = 0.0;
    while start.elapsed() < slice {
        n += f();
    }
    n
}

fn sqlite(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("sqlite open");
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=60000;
         CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);",
    )
    .expect("sqlite schema");
    c
}

/// The fsync probe: appends to a file and fdatasyncs after each append.
fn probe(b: &Bench, name: &str) -> std::fs::File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(b.path(name))
        .expect("probe")
}

fn append_sync(f: &mut std::fs::File, bytes: &[u8]) {
    f.write_all(bytes).expect("write");
    f.sync_data().expect("fdatasync");
}

/// `THREADS` threads calling `work` until `slice` has passed; returns the calls made.
fn threads(slice: Duration, work: &Arc<dyn Fn() + Send + Sync>) -> f64 {
    const THREADS: usize = 64;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (stop, count, work) = (stop.clone(), count.clone(), work.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    work();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(slice);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("worker");
    }
    count.load(Ordering::Relaxed) as f64
}

/// W1 (one durable message per commit, one thread) for the fsync probe, redb, SQLite and
/// mqlite, and W2 (the same from 64 threads) for mqlite and SQLite, all interleaved. Returns
/// the fsync probe's, mqlite's W1 and W2, and SQLite's best W2 rates.
fn w1_w2(b: &mut Bench) -> [f64; 4] {
    let mut fsync = probe(b, "w1.probe");
    let db = Arc::new(Database::open(b.path("w1.mqlite")).expect("open"));
    db.write(|t| t.create_topic("t", TopicConfig::default()))
        .expect("topic");
    let redb = mqlite::redb::Database::create(b.path("w1.redb")).expect("redb");
    let mut k = 0u64;
    let c = sqlite(&b.path("w1.sqlite"));
    let publisher = db.clone();
    let many: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        publisher
            .write_send(|t| t.publish("t", &Message::new(PAYLOAD.to_vec())))
            .expect("publish");
    });
    // SQLite from the same 64 threads, two ways. Each thread with its own connection (as a
    // pool gives them): the writers serialise on the file lock, and those that find it taken
    // sleep in SQLite's busy handler, milliseconds at a time. All of them through one
    // connection behind a mutex: commits follow each other as in W1. The ratio target is
    // taken against the faster of the two.
    let path = b.path("w2.sqlite");
    drop(sqlite(&path));
    let conns: Arc<Vec<parking_lot::Mutex<rusqlite::Connection>>> = Arc::new(
        (0..64)
            .map(|_| parking_lot::Mutex::new(sqlite(&path)))
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let own: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let i = next.fetch_add(1, Ordering::Relaxed) as usize % conns.len();
        insert(&conns[i].lock());
    });
    let one = Arc::new(parking_lot::Mutex::new(sqlite(&b.path("w2-shared.sqlite"))));
    let shared: Arc<dyn Fn() + Send + Sync> = Arc::new(move || insert(&one.lock()));
    // The single-thread rows also count their CPU time: a commit's cost beyond the disk.
    let cpu: [OnCpu; 4] = Default::default();
    let rates = b.interleaved(&mut [
        &mut |slice| {
            cpu[0].time(|| {
                repeat(slice, || {
                    append_sync(&mut fsync, &PAYLOAD);
                    1.0
                })
            })
        },
        &mut |slice| {
            cpu[1].time(|| {
                repeat(slice, || {
                    db.write(|t| t.publish("t", &Message::new(PAYLOAD.to_vec())))
                        .expect("publish");
                    1.0
                })
            })
        },
        &mut |slice| {
            cpu[2].time(|| {
                repeat(slice, || {
                    let t = redb.begin_write().expect("begin");
                    t.open_table(RAW)
                        .expect("table")
                        .insert(k, PAYLOAD.as_slice())
                        .expect("insert");
                    t.commit().expect("commit");
                    k += 1;
                    1.0
                })
            })
        },
        &mut |slice| {
            cpu[3].time(|| {
                repeat(slice, || {
                    insert(&c);
                    1.0
                })
            })
        },
        &mut |slice| threads(slice, &many),
        &mut |slice| threads(slice, &own),
        &mut |slice| threads(slice, &shared),
    ]);
    let [f1, m1, r1, s1, m2, s2_own, s2_shared] = rates[..] else {
        unreachable!("seven workloads")
    };
    drop((db, redb, c, many, own, shared));
    b.push("W1", "fsync", f1, "msg/s", "100 B append + fdatasync");
    b.push("W1", "mqlite", m1, "msg/s", "durable publish per commit");
    b.push("W1", "redb", r1, "msg/s", "durable insert per commit");
    b.push(
        "W1",
        "sqlite",
        s1,
        "msg/s",
        "WAL, synchronous=FULL, insert per txn",
    );
    let systems = ["fsync", "mqlite", "redb", "sqlite"];
    for (system, cpu) in systems.into_iter().zip(&cpu) {
        if let Some(us) = cpu.per_op_us() {
            b.push(
                "W1",
                system,
                us,
                "us",
                "on a CPU per operation (user + system), same slices",
            );
        }
    }
    b.push(
        "W2",
        "mqlite",
        m2,
        "msg/s",
        "64 threads, durable publish per call",
    );
    b.push(
        "W2",
        "sqlite",
        s2_own,
        "msg/s",
        "64 threads, own connections",
    );
    b.push(
        "W2",
        "sqlite",
        s2_shared,
        "msg/s",
        "64 threads, one shared connection",
    );
    [f1, m1, m2, s2_own.max(s2_shared)]
}

/// One SQLite insert of [`PAYLOAD`] in its own transaction.
fn insert(c: &rusqlite::Connection) {
    c.execute(
        "INSERT INTO log (payload) VALUES (?1)",
        [PAYLOAD.as_slice()],
    )
    .expect("insert");
}

/// W3: 1000 messages per durable commit, for the raw disk (1000 x 100 B per fdatasync),
/// redb, SQLite and mqlite, interleaved. Returns the disk's, mqlite's and SQLite's rates.
fn w3(b: &mut Bench) -> [f64; 3] {
    let mut disk = probe(b, "w3.probe");
    let bytes = vec![7u8; 100 * 1000];
    let batch: Vec<Message> = (0..1000).map(|_| Message::new(PAYLOAD.to_vec())).collect();
    let db = Database::open(b.path("w3.mqlite")).expect("open");
    db.write(|t| t.create_topic("t", TopicConfig::default()))
        .expect("topic");
    let redb = mqlite::redb::Database::create(b.path("w3.redb")).expect("redb");
    let mut k = 0u64;
    let mut c = sqlite(&b.path("w3.sqlite"));
    let rates = b.interleaved(&mut [
        &mut |slice| {
            repeat(slice, || {
                append_sync(&mut disk, &bytes);
                1000.0
            })
        },
        &mut |slice| {
            repeat(slice, || {
                db.write(|t| t.publish_batch("t", &batch)).expect("publish");
                1000.0
            })
        },
        &mut |slice| {
            repeat(slice, || {
                let t = redb.begin_write().expect("begin");
                {
                    let mut table = t.open_table(RAW).expect("table");
                    for _ in 0..1000 {
                        table.insert(k, PAYLOAD.as_slice()).expect("insert");
                        k += 1;
                    }
                }
                t.commit().expect("commit");
                1000.0
            })
        },
        &mut |slice| {
            repeat(slice, || {
                let t = c.transaction().expect("txn");
                {
                    let mut st = t
                        .prepare_cached("INSERT INTO log (payload) VALUES (?1)")
                        .expect("prep");
                    for _ in 0..1000 {
                        st.execute([PAYLOAD.as_slice()]).expect("insert");
                    }
                }
                t.commit().expect("commit");
                1000.0
            })
        },
    ]);
    let [d3, m3, r3, s3] = rates[..] else {
        unreachable!("four workloads")
    };
    b.push(
        "W3",
        "fsync",
        d3,
        "msg/s",
        "1000 x 100 B append + fdatasync",
    );
    b.push("W3", "mqlite", m3, "msg/s", "1000 per durable commit");
    b.push("W3", "redb", r3, "msg/s", "1000 per durable commit");
    b.push(
        "W3",
        "sqlite",
        s3,
        "msg/s",
        "1000 per txn, synchronous=FULL",
    );
    [d3, m3, s3]
}

/// Passes over the log per system in W4, alternating.
const W4_ROUNDS: usize = 3;

fn w4_w5(b: &mut Bench, n: u64) -> [f64; 4] {
    let db = Database::builder()
        .durability(mqlite::Durability::Relaxed)
        .open(b.path("w4.mqlite"))
        .expect("open");
    let batch: Vec<Message> = (0..1000).map(|_| Message::new(PAYLOAD.to_vec())).collect();
    db.write(|t| {
        t.create_topic("t", TopicConfig::default())?;
        t.create_queue("q", QueueConfig::default())
    })
    .expect("setup");
    for _ in 0..n / 1000 {
        db.write(|t| {
            t.publish_batch("t", &batch)?;
            for m in &batch {
                t.enqueue("q", m)?;
            }
            Ok::<_, mqlite::Error>(())
        })
        .expect("fill");
    }
    db.flush().expect("flush");
    let mut c = sqlite(&b.path("w4.sqlite"));
    {
        let t = c.transaction().expect("txn");
        {
            let mut st = t
                .prepare_cached("INSERT INTO log (payload) VALUES (?1)")
                .expect("prep");
            for _ in 0..n {
                st.execute([PAYLOAD.as_slice()]).expect("insert");
            }
        }
        t.commit().expect("commit");
    }
    // Each round reads the whole log once with each system, a new group each time, one
    // after the other: a single pass of each, minutes apart, saw the machine's moods (SQLite's
    // scan alone swung from 6 to 14 M msg/s between runs).
    let (mut m4, mut s4) = ((0.0, 0.0), (0.0, 0.0));
    for round in 0..W4_ROUNDS {
        let start = Instant::now();
        let mut consumer = db
            .consumer("t", &format!("g{round}"), mqlite::StartAt::Earliest)
            .expect("consumer");
        let mut read = 0;
        loop {
            let r = consumer.poll(1000, Duration::ZERO).expect("poll");
            if r.is_empty() {
                break;
            }
            read += r.len();
        }
        consumer.commit().expect("commit");
        m4.0 += read as f64;
        m4.1 += start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut st = c
            .prepare("SELECT id, payload FROM log ORDER BY id")
            .expect("prep");
        let mut rows = st.query([]).expect("query");
        let mut scanned = 0u64;
        while let Some(row) = rows.next().expect("row") {
            let p: Vec<u8> = row.get(1).expect("payload");
            scanned += p.len() as u64 / 100;
        }
        s4.0 += scanned as f64;
        s4.1 += start.elapsed().as_secs_f64();
    }
    let (m4, s4) = (m4.0 / m4.1, s4.0 / s4.1);
    // Each consumer held a handle too; they are gone, so the file closes with `db`.
    drop(db);
    let db = Database::open(b.dir.join("w4.mqlite")).expect("reopen durable");
    let start = Instant::now();
    let mut done = 0;
    loop {
        let got = db
            .write(|t| {
                let d = t.receive("q", 1000)?;
                let leases: Vec<_> = d.iter().map(|x| x.lease.clone()).collect();
                t.ack_many(&leases)?;
                Ok::<_, mqlite::Error>(d.len())
            })
            .expect("receive");
        if got == 0 {
            break;
        }
        done += got;
    }
    let m5 = done as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut deleted = 0;
    loop {
        let t = c.transaction().expect("txn");
        let ids: Vec<(i64, Vec<u8>)> = {
            let mut st = t
                .prepare_cached("SELECT id, payload FROM log ORDER BY id LIMIT 1000")
                .expect("prep");
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("q")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        if ids.is_empty() {
            break;
        }
        {
            let mut del = t
                .prepare_cached("DELETE FROM log WHERE id = ?1")
                .expect("prep");
            for (id, _) in &ids {
                del.execute([id]).expect("delete");
            }
        }
        t.commit().expect("commit");
        deleted += ids.len();
    }
    let s5 = deleted as f64 / start.elapsed().as_secs_f64();
    b.push(
        "W4",
        "mqlite",
        m4,
        "msg/s",
        &format!("group poll over {n} messages, {W4_ROUNDS} passes"),
    );
    b.push(
        "W4",
        "sqlite",
        s4,
        "msg/s",
        &format!("full scan ORDER BY id, {W4_ROUNDS} passes"),
    );
    b.push(
        "W5",
        "mqlite",
        m5,
        "msg/s",
        "receive + ack 1000 per durable commit",
    );
    b.push("W5", "sqlite", s5, "msg/s", "select + delete 1000 per txn");
    [m4, s4, m5, s5]
}

/// W6: publish → blocked consumer wake-up latency in microseconds (p50, p99), and the fsync
/// probe's p50 latency measured in the same rounds (an append + fdatasync after each publish).
fn w6(b: &mut Bench, durability: mqlite::Durability, rounds: usize) -> (f64, f64, f64) {
    let name = format!("w6-{durability:?}.mqlite");
    let db = Database::builder()
        .durability(durability)
        .open(b.path(&name))
        .expect("open");
    db.write(|t| t.create_topic("t", TopicConfig::default()))
        .expect("topic");
    let mut consumer = db
        .consumer("t", "g", mqlite::StartAt::Latest)
        .expect("consumer");
    let base = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut latencies = Vec::with_capacity(rounds);
        while latencies.len() < rounds {
            for r in consumer.poll(1, Duration::from_secs(10)).expect("poll") {
                let sent = u64::from_le_bytes(r.message.payload[..8].try_into().expect("8 bytes"));
                latencies.push(base.elapsed().as_nanos() as u64 - sent);
            }
        }
        latencies
    });
    let mut fsync = probe(b, &format!("{name}.probe"));
    let mut syncs = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        // Wait a little so the consumer is blocked when the publish comes.
        std::thread::sleep(Duration::from_micros(500));
        let sent = base.elapsed().as_nanos() as u64;
        let mut payload = sent.to_le_bytes().to_vec();
        payload.resize(100, 0);
        db.write(|t| t.publish("t", &Message::new(payload.clone())))
            .expect("publish");
        // The probe's fsync would hold up the relaxed flusher: only durable rounds take it.
        if durability == mqlite::Durability::Immediate {
            std::thread::sleep(Duration::from_micros(500));
            let start = Instant::now();
            append_sync(&mut fsync, &PAYLOAD);
            syncs.push(start.elapsed().as_nanos() as u64);
        }
    }
    let latencies = reader.join().expect("reader");
    let pct = |mut v: Vec<u64>, p: f64| {
        v.sort_unstable();
        v.get(((v.len().max(1) - 1) as f64 * p) as usize)
            .map_or(f64::NAN, |&ns| ns as f64 / 1000.0)
    };
    (
        pct(latencies.clone(), 0.5),
        pct(latencies, 0.99),
        pct(syncs, 0.5),
    )
}

/// W7: batched publish rate into a topic holding `stored` messages, and into an empty one.
fn w7(b: &mut Bench, stored: u64) -> (f64, f64) {
    let batch: Vec<Message> = (0..1000).map(|_| Message::new(PAYLOAD.to_vec())).collect();
    let empty_db = Database::open(b.path("w7-empty.mqlite")).expect("open");
    empty_db
        .write(|t| t.create_topic("full", TopicConfig::default()))
        .expect("topic");
    let db = Database::open(b.path("w7.mqlite")).expect("open");
    db.write(|t| t.create_topic("full", TopicConfig::default()))
        .expect("topic");
    let big: Vec<Message> = (0..10_000)
        .map(|_| Message::new(PAYLOAD.to_vec()))
        .collect();
    for _ in 0..stored / 10_000 {
        db.write_with(mqlite::Durability::Relaxed, |t| {
            t.publish_batch("full", &big)
        })
        .expect("fill");
    }
    db.flush().expect("flush");
    let publish = |db: &Database, slice| {
        repeat(slice, || {
            db.write(|t| t.publish_batch("full", &batch))
                .expect("publish");
            1000.0
        })
    };
    let rates = b.interleaved(&mut [&mut |slice| publish(&empty_db, slice), &mut |slice| {
        publish(&db, slice)
    }]);
    (rates[0], rates[1])
}

/// W8 runs in a child process so that its peak RSS is its own: publishes `n` messages with
/// default settings, 1000 per durable commit, and prints VmHWM in KiB.
fn w8_child(dir: &Path, n: u64) {
    let db = Database::open(dir.join("w8.mqlite")).expect("open");
    db.write(|t| t.create_topic("t", TopicConfig::default()))
        .expect("topic");
    let batch: Vec<Message> = (0..1000).map(|_| Message::new(PAYLOAD.to_vec())).collect();
    for _ in 0..n / 1000 {
        db.write(|t| t.publish_batch("t", &batch)).expect("publish");
    }
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM");
    println!("W8-KIB {hwm}");
}

fn w8(b: &mut Bench, n: u64) -> f64 {
    let _ = std::fs::remove_file(b.dir.join("w8.mqlite"));
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--w8-child", &n.to_string(), &b.dir.display().to_string()])
        .output()
        .expect("child");
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("W8-KIB "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// W9: file size after a steady produce/consume churn on a queue holding about 10 000
/// messages, against the live data; measured at half time and at the end.
fn w9(b: &mut Bench, cycles: u32) -> (f64, f64, f64) {
    let path = b.path("w9.mqlite");
    let db = Database::open(&path).expect("open");
    db.write(|t| t.create_queue("q", QueueConfig::default()))
        .expect("queue");
    let fill = |db: &Database| {
        db.write(|t| {
            for _ in 0..1000 {
                t.enqueue("q", &Message::new(PAYLOAD.to_vec()))?;
            }
            Ok::<_, mqlite::Error>(())
        })
        .expect("enqueue");
    };
    for _ in 0..10 {
        fill(&db);
    }
    let size = || std::fs::metadata(&path).expect("size").len() as f64 / (1 << 20) as f64;
    let mut half = 0.0;
    for c in 0..cycles {
        fill(&db);
        db.write(|t| {
            let d = t.receive("q", 1000)?;
            let leases: Vec<_> = d.iter().map(|x| x.lease.clone()).collect();
            t.ack_many(&leases)
        })
        .expect("consume");
        if c == cycles / 2 {
            half = size();
        }
    }
    let live =
        db.read(|r| r.queue_info("q")).expect("info").depth() as f64 * 100.0 / (1 << 20) as f64;
    (live, half, size())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--w8-child") {
        let n = args[i + 1].parse().expect("count");
        w8_child(Path::new(&args[i + 2]), n);
        return;
    }
    // `cargo bench` passes `--bench`; without it the binary was started by `cargo test
    // --all-targets`, and a smoke run with tiny sizes checks that every workload still runs
    // (its figures mean nothing and go to a file of their own).
    let smoke = !std::env::args().any(|a| a == "--bench");
    let quick = smoke || std::env::args().any(|a| a == "--quick");
    let scale = |quick_n: u64, full_n: u64| match (smoke, quick) {
        (true, _) => quick_n / 50,
        (false, true) => quick_n,
        (false, false) => full_n,
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(if smoke {
        "target/bench/smoke-tmp"
    } else {
        "target/bench/tmp"
    });
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut b = Bench {
        dir,
        secs: if smoke {
            0.06
        } else if quick {
            1.0
        } else {
            3.0
        },
        rows: Vec::new(),
    };
    println!(
        "{:<4} {:<7} {:>14} {:<6} note",
        "wl", "system", "value", "unit"
    );
    let [fsync1, m1, m2, s2] = w1_w2(&mut b);
    let [fsync1000, m3, s3] = w3(&mut b);
    let [m4, s4, m5, s5] = w4_w5(&mut b, scale(50_000, 200_000));
    let rounds = scale(100, 300).max(10) as usize;
    let (d50, d99, sync50) = w6(&mut b, mqlite::Durability::Immediate, rounds);
    let (r50, r99, _) = w6(&mut b, mqlite::Durability::Relaxed, rounds);
    b.push("W6", "mqlite", d50, "us", "wake-up p50, durable publish");
    b.push("W6", "mqlite", d99, "us", "wake-up p99, durable publish");
    b.push("W6", "mqlite", r50, "us", "wake-up p50, relaxed publish");
    b.push("W6", "mqlite", r99, "us", "wake-up p99, relaxed publish");
    b.push(
        "W6",
        "fsync",
        sync50,
        "us",
        "p50 of one append + fdatasync, same rounds",
    );
    let stored = scale(1_000_000, 10_000_000);
    let (empty, full) = w7(&mut b, stored);
    b.push(
        "W7",
        "mqlite",
        empty,
        "msg/s",
        "1000 per commit, empty topic",
    );
    b.push(
        "W7",
        "mqlite",
        full,
        "msg/s",
        &format!("1000 per commit, {stored} stored"),
    );
    let rss = w8(&mut b, stored);
    b.push(
        "W8",
        "mqlite",
        rss,
        "MiB",
        &format!("peak RSS publishing {stored}, default settings"),
    );
    let (live, half, end) = w9(&mut b, scale(300, 2_000).max(10) as u32);
    b.push(
        "W9",
        "mqlite",
        live,
        "MiB",
        "live payload bytes in the queue",
    );
    b.push("W9", "mqlite", half, "MiB", "file size at half time");
    b.push("W9", "mqlite", end, "MiB", "file size at the end");
    let ratios = [
        ("W1", "mqlite / fsync", m1 / fsync1, 0.8),
        ("W2", "mqlite W2 / W1", m2 / m1, 20.0),
        ("W2", "mqlite / best sqlite", m2 / s2, 20.0),
        ("W3", "mqlite / sqlite", m3 / s3, 2.0),
        ("W3", "mqlite / raw disk", m3 / fsync1000, 0.5),
        ("W4", "mqlite / sqlite", m4 / s4, 1.5),
        ("W5", "mqlite / sqlite", m5 / s5, 1.0),
        (
            "W6",
            "1.5 x fsync p50 / durable p50",
            sync50 * 1.5 / d50,
            1.0,
        ),
        ("W6", "1000 us / relaxed p99 us", 1000.0 / r99, 1.0),
        ("W7", "full / empty", full / empty, 0.85),
        ("W8", "64 MiB / peak RSS", 64.0 / rss, 1.0),
        (
            "W9",
            "(2 x live + 4 MiB) / file",
            (2.0 * live + 4.0) / end,
            1.0,
        ),
    ];
    println!("\nratios (target in brackets):");
    for (w, what, r, target) in ratios {
        println!(
            "{w:<4} {what:<20} {r:>8.2}  [>= {target}] {}",
            if r >= target { "met" } else { "MISSED" }
        );
        b.rows.push(Row {
            workload: w,
            system: "mqlite",
            value: r,
            unit: "ratio",
            note: what.to_owned(),
        });
    }
    let json: Vec<String> = b
        .rows
        .iter()
        .map(|r| {
            format!(
                "{{\"workload\": \"{}\", \"system\": \"{}\", \"value\": {:.3}, \"unit\": \"{}\", \"note\": {:?}}}",
                r.workload, r.system, r.value, r.unit, r.note
            )
        })
        .collect();
    let name = if smoke {
        "smoke-results.json"
    } else {
        "results.json"
    };
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench")
        .join(name);
    std::fs::write(&out, format!("[\n  {}\n]\n", json.join(",\n  "))).expect("results");
    println!("\nwrote {}", out.display());
    let _ = std::fs::remove_dir_all(&b.dir);
}
