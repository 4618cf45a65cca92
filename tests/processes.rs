//! Several processes on one file, in the `MultiWriter` concurrency mode: a publisher process,
//! a consumer-group process reading the topic, and two worker processes sharing a queue the
//! topic routes to. Every message arrives once in the group and once across the workers, and
//! the group consumer's wake-up latency after the publisher's commit is measured and printed.
#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

use mqlite::redb::ConcurrencyMode;
use mqlite::{Binding, Database, Error, Message, QueueConfig, StartAt, TopicConfig};

const N: u64 = 1000;
const ENTRY: &str = "child";

fn open_shared(path: &str) -> Database {
    Database::builder()
        .concurrency(ConcurrencyMode::MultiWriter)
        .open(path)
        .unwrap()
}

/// The child processes' entry point; a no-op in the normal test run.
#[test]
fn child() {
    let Some((role, args)) = common::child_role() else {
        return;
    };
    if role == "exclusive-publisher" {
        // The default mode: the file is journaled, and the commits stay in the journal until
        // a checkpoint, which the kill below never lets happen.
        let db = Database::open(&args[0]).unwrap();
        db.write(|txn| txn.create_topic("crashed", TopicConfig::default()))
            .unwrap();
        for i in 0..20 {
            db.write(|txn| txn.publish("crashed", &Message::new(format!("m{i}"))))
                .unwrap();
        }
        println!("acked");
        let mut rest = String::new();
        std::io::stdin().read_line(&mut rest).unwrap();
        return;
    }
    let db = open_shared(&args[0]);
    match role.as_str() {
        "publisher" => {
            for i in 0..N {
                db.write(|txn| txn.publish("events", &Message::new(i.to_string())))
                    .unwrap();
                println!("sent {i} {}", common::epoch_us());
                // Leave the consumers idle between messages, so each one measures a wake-up.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        "group" => {
            let mut consumer = db.consumer("events", "audit", StartAt::Earliest).unwrap();
            println!("ready");
            let mut got = 0;
            while got < N {
                for r in consumer.poll(100, Duration::from_secs(20)).unwrap() {
                    println!("got {} {}", r.offset, common::epoch_us());
                    got += 1;
                }
                consumer.commit().unwrap();
            }
        }
        "worker" => {
            println!("ready");
            let mut idle = 0;
            // The workers stop after a second without work once the topic is complete.
            while idle < 10 {
                let deliveries = db.receive("jobs", 16, Duration::from_millis(100)).unwrap();
                if deliveries.is_empty() {
                    let done = db
                        .read(|r| r.topic_info("events"))
                        .is_ok_and(|t| t.next_offset == N);
                    idle = if done { idle + 1 } else { 0 };
                    continue;
                }
                db.write(|txn| {
                    for d in &deliveries {
                        txn.ack(&d.lease)?;
                    }
                    Ok::<_, Error>(())
                })
                .unwrap();
                for d in &deliveries {
                    println!("took {}", String::from_utf8_lossy(&d.message.payload));
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
    println!("done");
}

fn collect(child: std::process::Child) -> std::thread::JoinHandle<Vec<String>> {
    let mut child = child;
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let lines: Vec<String> = BufReader::new(stdout).lines().map(|l| l.unwrap()).collect();
        assert!(child.wait().unwrap().success(), "a child process failed");
        lines
    })
}

fn wait_ready(child: &mut std::process::Child) -> std::thread::JoinHandle<Vec<String>> {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    common::read_until(&mut lines, "ready");
    std::thread::spawn(move || lines.map(|l| l.unwrap()).collect())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn publisher_and_consumers_in_separate_processes() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.mqlite");
    let path_str = path.to_str().unwrap();
    {
        let db = open_shared(path_str);
        db.write(|txn| {
            txn.create_topic("events", TopicConfig::default())?;
            txn.create_queue("jobs", QueueConfig::default())?;
            txn.bind("events", "jobs", Binding::Fanout)
        })
        .unwrap();
    }
    let mut group = common::spawn_child(ENTRY, "group", &[path_str]);
    let mut w1 = common::spawn_child(ENTRY, "worker", &[path_str]);
    let mut w2 = common::spawn_child(ENTRY, "worker", &[path_str]);
    let group_lines = wait_ready(&mut group);
    let w1_lines = wait_ready(&mut w1);
    let w2_lines = wait_ready(&mut w2);
    let publisher = collect(common::spawn_child(ENTRY, "publisher", &[path_str]));

    let sent = publisher.join().unwrap();
    let got = group_lines.join().unwrap();
    let took: Vec<String> = [w1_lines.join().unwrap(), w2_lines.join().unwrap()].concat();
    for child in [&mut group, &mut w1, &mut w2] {
        assert!(child.wait().unwrap().success(), "a child process failed");
    }

    let times = |lines: &[String], tag: &str| -> Vec<(u64, u64)> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(tag))
            .map(|l| {
                let (i, t) = l.split_once(' ').unwrap();
                (i.parse().unwrap(), t.parse().unwrap())
            })
            .collect()
    };
    let sent = times(&sent, "sent ");
    let got = times(&got, "got ");
    assert_eq!(sent.len() as u64, N);
    let offsets: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        offsets,
        (0..N).collect::<Vec<_>>(),
        "the group saw each offset once, in order"
    );

    let taken: Vec<u64> = took
        .iter()
        .filter_map(|l| l.strip_prefix("took "))
        .map(|p| p.parse().unwrap())
        .collect();
    let distinct: BTreeSet<u64> = taken.iter().copied().collect();
    assert_eq!(
        taken.len() as u64,
        N,
        "the workers took {} messages",
        taken.len()
    );
    assert_eq!(
        distinct,
        (0..N).collect(),
        "every queued message taken exactly once"
    );

    let mut latency: Vec<u64> = sent
        .iter()
        .zip(&got)
        .map(|((_, s), (_, g))| g.saturating_sub(*s))
        .collect();
    latency.sort_unstable();
    println!(
        "cross-process wake-up (commit returned in the publisher -> record in the consumer): \
         p50 {} us, p99 {} us, max {} us over {N} messages",
        percentile(&latency, 0.5),
        percentile(&latency, 0.99),
        latency[latency.len() - 1]
    );
    let reopened = open_shared(path_str);
    let info = reopened.read(|r| r.queue_info("jobs")).unwrap();
    assert_eq!(info.depth(), 0, "nothing left in the queue");
    assert!(Path::new(path_str).exists());
}

/// A journaled file whose writer was killed with commits still in the journal: a shared-mode
/// reader refuses it with an error until a writer recovers it; a shared-mode writer recovers
/// it (every acknowledged commit is there) and from then on writes in place, so processes can
/// share it; the default mode then journals again.
#[test]
fn a_journaled_file_left_by_a_killed_writer_is_recovered_by_a_shared_mode_writer() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.mqlite");
    let f = path.to_str().unwrap();
    let mut child = common::spawn_child(ENTRY, "exclusive-publisher", &[f]);
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    common::read_until(&mut lines, "acked");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(std::fs::read(&path).unwrap().starts_with(b"mqlite-journal"));

    let reader = Database::builder()
        .concurrency(ConcurrencyMode::SingleWriter)
        .open_read_only(&path);
    match reader {
        Ok(_) => panic!("a shared reader must not read around the journal"),
        Err(e) => assert!(matches!(e, mqlite::Error::NeedsRecovery { .. }), "{e}"),
    }

    let count = |db: &Database| db.read(|r| r.topic_info("crashed")).unwrap().next_offset;
    let shared = open_shared(f);
    assert_eq!(count(&shared), 20);
    shared
        .write(|txn| txn.publish("crashed", &Message::new("after")))
        .unwrap();
    let second = open_shared(f);
    assert_eq!(
        count(&second),
        21,
        "a second process sees the first one's commit"
    );
    let viewer = Database::builder()
        .concurrency(ConcurrencyMode::SingleWriter)
        .open_read_only(&path);
    assert!(viewer.is_ok(), "recovered, the file reads in any mode");
    drop((shared, second, viewer));

    let exclusive = Database::open(&path).unwrap();
    exclusive
        .write(|txn| txn.publish("crashed", &Message::new("journaled again")))
        .unwrap();
    let last = exclusive.read(|r| r.read_topic("crashed", 21, 1)).unwrap();
    assert_eq!(last[0].message.payload, b"journaled again");
}
