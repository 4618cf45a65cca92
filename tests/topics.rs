//! Guards topics, consumer groups and the one-commit transaction through the public API:
//! atomicity with domain tables, reopen, retention, group positions, blocking polls, checksums
//! on read, bad input refused without touching the file, and a model-based test against a
//! plain `BTreeMap`.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Rng;
use mqlite::redb::{ReadableTable, TableDefinition};
use mqlite::{Database, Error, ManualClock, Message, MessageId, Retention, StartAt, TopicConfig};

const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");

fn topic(db: &Database, name: &str, retention: Retention) {
    db.write(|txn| txn.create_topic(name, TopicConfig::default().retention(retention)))
        .unwrap();
}

#[test]
fn a_failed_closure_leaves_no_domain_row_no_message_and_no_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.mqlite");
    let db = Database::open(&path).unwrap();
    topic(&db, "orders", Retention::default());
    db.write(|txn| txn.create_group("orders", "billing", StartAt::Earliest))
        .unwrap();

    let failed: Result<(), Error> = db.write(|txn| {
        txn.open_table(ORDERS)?.insert(1, "pending")?;
        txn.publish("orders", &Message::new("order 1"))?;
        txn.commit_offset("orders", "billing", 1)?;
        Err(Error::InvalidConfig(
            "the application changed its mind".into(),
        ))
    });
    assert!(failed.is_err());
    db.read(|r| {
        assert!(
            r.open_table(ORDERS).is_err(),
            "the table was never committed"
        );
        assert_eq!(r.topic_info("orders")?.next_offset, 0);
        assert_eq!(r.group_info("orders", "billing")?.committed, 0);
        Ok::<_, Error>(())
    })
    .unwrap();

    db.write(|txn| {
        txn.open_table(ORDERS)?.insert(1, "pending")?;
        txn.publish("orders", &Message::new("order 1"))?;
        txn.commit_offset("orders", "billing", 1)
    })
    .unwrap();
    drop(db);

    let db = Database::open(&path).unwrap();
    db.read(|r| {
        assert_eq!(r.open_table(ORDERS)?.get(1)?.unwrap().value(), "pending");
        assert_eq!(
            r.read_topic("orders", 0, 10)?[0].message.payload,
            b"order 1"
        );
        assert_eq!(r.group_info("orders", "billing")?.committed, 1);
        Ok::<_, Error>(())
    })
    .unwrap();
}

#[test]
fn groups_read_the_same_messages_independently() {
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let batch: Vec<Message> = (0..10).map(|i| Message::new(vec![i])).collect();
    let range = db.write(|txn| txn.publish_batch("t", &batch)).unwrap();
    assert_eq!(range, 0..10);

    let mut a = db.consumer("t", "a", StartAt::Earliest).unwrap();
    let mut b = db.consumer("t", "b", StartAt::Offset(7)).unwrap();
    let mut late = db.consumer("t", "late", StartAt::Latest).unwrap();
    assert_eq!(a.poll(4, Duration::ZERO).unwrap().len(), 4);
    a.commit().unwrap();
    let from_b = b.poll(100, Duration::ZERO).unwrap();
    assert_eq!(
        from_b.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    assert!(late.poll(100, Duration::ZERO).unwrap().is_empty());

    db.read(|r| {
        assert_eq!(r.group_info("t", "a")?.lag, 6);
        assert_eq!(
            r.group_info("t", "b")?.lag,
            3,
            "b never committed: still at its start"
        );
        assert_eq!(r.groups("t")?.len(), 3);
        Ok::<_, Error>(())
    })
    .unwrap();
    // A consumer resumes from the committed offset, not from its start option.
    let mut again = db.consumer("t", "a", StartAt::Latest).unwrap();
    assert_eq!(again.poll(1, Duration::ZERO).unwrap()[0].offset, 4);
    // Committing past the end is refused.
    let err = db.write(|txn| txn.commit_offset("t", "a", 11)).unwrap_err();
    assert!(
        matches!(err, Error::OffsetOutOfRange { end: 10, .. }),
        "{err}"
    );
}

#[test]
fn start_at_timestamp_uses_append_time() {
    let clock = ManualClock::new(1_000_000);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    topic(&db, "t", Retention::default());
    for i in 0..5u64 {
        db.write(|txn| txn.publish("t", &Message::new(vec![i as u8])))
            .unwrap();
        clock.advance_ms(1000);
    }
    let offset = db
        .read(|r| r.resolve_start("t", StartAt::Timestamp(1_002_000)))
        .unwrap();
    assert_eq!(offset, 2);
    let offset = db
        .read(|r| r.resolve_start("t", StartAt::Timestamp(1_002_001)))
        .unwrap();
    assert_eq!(offset, 3);
    let offset = db
        .read(|r| r.resolve_start("t", StartAt::Timestamp(9_000_000)))
        .unwrap();
    assert_eq!(offset, 5, "after the newest message: the end");
    // Message timestamps default to the database clock.
    let first = db.read(|r| r.read_topic("t", 0, 1)).unwrap();
    assert_eq!(first[0].message.timestamp_ms, 1_000_000);
}

#[test]
fn retention_by_count_bytes_age_and_interest() {
    let clock = ManualClock::new(10_000);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    topic(
        &db,
        "count",
        Retention {
            max_messages: Some(3),
            ..Default::default()
        },
    );
    topic(
        &db,
        "bytes",
        Retention {
            max_bytes: Some(1000),
            ..Default::default()
        },
    );
    topic(
        &db,
        "age",
        Retention {
            max_age_ms: Some(5_000),
            ..Default::default()
        },
    );
    topic(
        &db,
        "interest",
        Retention {
            until_consumed: true,
            ..Default::default()
        },
    );
    for i in 0..10u8 {
        db.write(|txn| {
            for t in ["count", "bytes", "age", "interest"] {
                txn.publish(t, &Message::new(vec![i; 200]))?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        clock.advance_ms(1_000);
    }
    db.read(|r| {
        let count = r.topic_info("count")?;
        assert_eq!((count.first_offset, count.next_offset), (7, 10));
        let bytes = r.topic_info("bytes")?;
        assert!(bytes.stored_bytes <= 1000 && bytes.len() >= 3, "{bytes:?}");
        assert_eq!(r.read_topic("bytes", 0, 100)?[0].offset, bytes.first_offset);
        // At the last publish (19 000 ms) the age bound kept what was appended since 14 000.
        assert_eq!(r.topic_info("age")?.len(), 6);
        assert_eq!(
            r.topic_info("interest")?.len(),
            10,
            "no group: keep everything"
        );
        Ok::<_, Error>(())
    })
    .unwrap();

    // Now 20 000 ms, with no publish since: enforce_retention applies the age bound and keeps
    // what was appended at or after 15 000 ms, offsets 5..10.
    let report = db.enforce_retention().unwrap();
    assert_eq!(report.removed, 1);
    let age = db.read(|r| r.topic_info("age")).unwrap();
    assert_eq!(age.first_offset, 5);

    db.write(|txn| txn.commit_offset("interest", "a", 6))
        .unwrap();
    db.write(|txn| txn.commit_offset("interest", "b", 4))
        .unwrap();
    db.enforce_retention().unwrap();
    assert_eq!(
        db.read(|r| r.topic_info("interest")).unwrap().first_offset,
        4
    );
    // A group whose offset fell below the first stored offset reads from the first.
    let mut c = db.consumer("count", "slow", StartAt::Offset(0)).unwrap();
    assert_eq!(c.poll(10, Duration::ZERO).unwrap()[0].offset, 7);
}

#[test]
fn retention_of_a_large_backlog_runs_in_bounded_transactions() {
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let batch: Vec<Message> = (0..5000).map(|_| Message::new("x")).collect();
    db.write(|txn| txn.publish_batch("t", &batch)).unwrap();
    db.write(|txn| {
        txn.configure_topic(
            "t",
            TopicConfig::default().retention(Retention {
                max_messages: Some(10),
                ..Default::default()
            }),
        )
    })
    .unwrap();
    let report = db.enforce_retention().unwrap();
    assert_eq!(report.removed, 4990);
    assert!(report.transactions >= 5, "{report:?}");
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().len(), 10);
}

#[test]
fn a_topic_without_a_log_keeps_nothing() {
    let db = Database::in_memory().unwrap();
    topic(&db, "x", Retention::none());
    let offset = db
        .write(|txn| txn.publish("x", &Message::new("gone")))
        .unwrap();
    assert_eq!(offset, 0);
    let info = db.read(|r| r.topic_info("x")).unwrap();
    assert_eq!(
        (info.first_offset, info.next_offset, info.stored_bytes),
        (1, 1, 0)
    );
    assert!(db.read(|r| r.read_topic("x", 0, 10)).unwrap().is_empty());
}

#[test]
fn a_blocked_poll_is_woken_by_a_commit_from_another_thread() {
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let mut consumers: Vec<_> = (0..4)
        .map(|i| db.consumer("t", &format!("g{i}"), StartAt::Latest).unwrap())
        .collect();
    let waiters: Vec<_> = consumers
        .drain(..)
        .map(|mut c| std::thread::spawn(move || c.poll(10, Duration::from_secs(30)).unwrap()))
        .collect();
    std::thread::sleep(Duration::from_millis(20)); // let them block; correctness does not depend on it
    db.write(|txn| txn.publish("t", &Message::new("wake")))
        .unwrap();
    for w in waiters {
        let got = w.join().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.payload, b"wake");
    }
}

/// On a file, a durable publish wakes the waiting consumers as soon as its journal record is
/// on the disk, before the commit returns, and again after: every message arrives, none twice.
#[test]
fn durable_publishes_on_a_file_wake_a_blocked_poll_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("wake.mqlite")).unwrap();
    topic(&db, "t", Retention::default());
    let mut consumer = db.consumer("t", "g", StartAt::Latest).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < 50 {
            for r in consumer.poll(10, Duration::from_secs(30)).unwrap() {
                got.push(r.message.payload.to_vec());
            }
        }
        got
    });
    for i in 0..50u32 {
        std::thread::sleep(Duration::from_millis(1)); // mostly, the reader is blocked
        db.write(|txn| txn.publish("t", &Message::new(i.to_le_bytes().to_vec())))
            .unwrap();
    }
    let got = reader.join().unwrap();
    let want: Vec<Vec<u8>> = (0..50u32).map(|i| i.to_le_bytes().to_vec()).collect();
    assert_eq!(got, want);
}

#[test]
fn json_payloads_round_trip() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Order {
        id: u32,
        item: String,
    }
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let order = Order {
        id: 7,
        item: "tea".into(),
    };
    db.write(|txn| txn.publish("t", &Message::json(&order)?))
        .unwrap();
    let rec = &db.read(|r| r.read_topic("t", 0, 1)).unwrap()[0];
    assert_eq!(rec.message.json_payload::<Order>().unwrap(), order);
    assert_eq!(
        rec.message.header("content-type"),
        Some(&b"application/json"[..])
    );
}

#[test]
fn a_flipped_bit_in_a_stored_message_reads_as_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.mqlite");
    let marker = b"PAYLOAD-MARKER-0123456789-abcdefghijklmnopqrstuvwxyz".to_vec();
    {
        let db = Database::open(&path).unwrap();
        topic(&db, "t", Retention::default());
        db.write(|txn| txn.publish("t", &Message::new(marker.clone())))
            .unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    // The last copy is the page in place; earlier ones are in the journal's old records,
    // which nothing reads once they are checkpointed.
    let at = bytes
        .windows(marker.len())
        .rposition(|w| w == marker)
        .expect("payload stored verbatim");
    bytes[at + 10] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    // The default open verifies every page checksum and refuses the file.
    let err = Database::open(&path).unwrap_err();
    assert!(matches!(err, Error::Corrupted { .. }), "{err}");
    // Without that check, the record's own checksum catches it at read time.
    let db = Database::builder()
        .verify_on_open(false)
        .open(&path)
        .unwrap();
    let err = db.read(|r| r.read_topic("t", 0, 10)).unwrap_err();
    assert!(matches!(err, Error::Corrupted { .. }), "{err}");
}

fn assert_refused_untouched(path: &std::path::Path, expect: impl Fn(&Error) -> bool) {
    let before = std::fs::read(path).unwrap();
    let err = Database::open(path).unwrap_err();
    assert!(expect(&err), "unexpected error: {err}");
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "the file was modified"
    );
}

#[test]
fn bad_files_are_refused_and_left_byte_identical() {
    let dir = tempfile::tempdir().unwrap();

    let foreign = dir.path().join("notes.txt");
    std::fs::write(&foreign, b"not a database at all, just some text").unwrap();
    assert_refused_untouched(&foreign, |e| matches!(e, Error::NotMqliteFile { .. }));

    let plain_redb = dir.path().join("plain.redb");
    {
        let db = mqlite::redb::Database::create(&plain_redb).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(ORDERS).unwrap().insert(1, "x").unwrap();
        txn.commit().unwrap();
    }
    assert_refused_untouched(&plain_redb, |e| matches!(e, Error::NotMqliteFile { .. }));

    let newer = dir.path().join("newer.mqlite");
    // A plain file (no journal), so that redb itself can edit it.
    drop(Database::builder().journal(false).open(&newer).unwrap());
    {
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("mqlite_meta");
        let db = mqlite::redb::Database::open(&newer).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("format_version", 99u32.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    assert_refused_untouched(&newer, |e| {
        matches!(
            e,
            Error::FormatTooNew {
                found: 99,
                supported: 3
            }
        )
    });

    let busy = dir.path().join("busy.mqlite");
    let first = Database::open(&busy).unwrap();
    topic(&first, "t", Retention::default());
    assert_refused_untouched(&busy, |e| matches!(e, Error::AlreadyOpen { .. }));
    drop(first);
    assert!(Database::open(&busy).is_ok());
}

#[test]
fn bad_input_gets_a_typed_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.mqlite");
    let db = Database::builder()
        .max_message_bytes(1024)
        .open(&path)
        .unwrap();
    topic(&db, "t", Retention::default());
    db.write(|txn| txn.publish("t", &Message::new("ok")))
        .unwrap();
    let snapshot = |db: &Database| {
        db.read(|r| Ok::<_, Error>((r.topics()?, r.read_topic("t", 0, 100)?)))
            .unwrap()
    };
    let before = snapshot(&db);

    let cases: Vec<(&str, Error)> = vec![
        (
            "bad topic name",
            db.write(|txn| txn.create_topic("no spaces", TopicConfig::default()))
                .unwrap_err(),
        ),
        (
            "empty name",
            db.write(|txn| txn.create_topic("", TopicConfig::default()))
                .unwrap_err(),
        ),
        (
            "bad group name",
            db.write(|txn| txn.commit_offset("t", "a/b", 0))
                .unwrap_err(),
        ),
        (
            "unknown topic",
            db.write(|txn| txn.publish("nope", &Message::new("x")))
                .unwrap_err(),
        ),
        (
            "too large",
            db.write(|txn| txn.publish("t", &Message::new(vec![0; 1025])))
                .unwrap_err(),
        ),
        (
            "routing key",
            db.write(|txn| txn.publish("t", &Message::new("x").with_routing_key("a".repeat(256))))
                .unwrap_err(),
        ),
        (
            "headers",
            db.write(|txn| {
                let mut m = Message::new("x");
                for i in 0..65 {
                    m = m.with_header(format!("h{i}"), "v");
                }
                txn.publish("t", &m)
            })
            .unwrap_err(),
        ),
        (
            "exists",
            db.write(|txn| txn.create_topic("t", TopicConfig::default()))
                .unwrap_err(),
        ),
        (
            "reserved table",
            db.write(|txn| {
                txn.open_table(TableDefinition::<u64, u64>::new("mqlite_topics"))?;
                Ok::<_, Error>(())
            })
            .unwrap_err(),
        ),
    ];
    for (what, err) in &cases {
        let ok = match *what {
            "bad topic name" | "empty name" | "bad group name" => {
                matches!(err, Error::InvalidName { .. })
            }
            "unknown topic" => matches!(err, Error::UnknownTopic { .. }),
            "too large" => matches!(
                err,
                Error::MessageTooLarge {
                    size_bytes: 1025,
                    limit_bytes: 1024
                }
            ),
            "routing key" => matches!(err, Error::InvalidRoutingKey { .. }),
            "headers" => matches!(
                err,
                Error::LimitExceeded {
                    limit: "header count",
                    ..
                }
            ),
            "exists" => matches!(err, Error::TopicExists { .. }),
            "reserved table" => matches!(err, Error::ReservedTableName { .. }),
            _ => false,
        };
        assert!(ok, "{what}: {err}");
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(snapshot(&db), before);
    drop(db);
    let before_bytes = std::fs::read(&path).unwrap();
    let db = Database::builder()
        .max_message_bytes(1024)
        .open(&path)
        .unwrap();
    let err = db
        .write(|txn| txn.publish("t", &Message::new(vec![0; 5000])))
        .unwrap_err();
    assert!(matches!(err, Error::MessageTooLarge { .. }));
    drop(db);
    // Reopening and a refused publish change no data (redb may rewrite its header on open).
    let db = Database::open(&path).unwrap();
    assert_eq!(snapshot(&db), before);
    assert!(!before_bytes.is_empty());
}

/// Operations of the model test.
#[derive(Debug)]
enum Op {
    Publish(u8),
    Batch(u8, u8),
    Read(u64, usize),
    Commit(u64),
    Reopen,
}

#[test]
fn random_operations_match_a_btreemap_model_across_reopens() {
    for seed in 0..20u64 {
        let mut rng = Rng::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.mqlite");
        let mut db = Database::open(&path).unwrap();
        topic(&db, "t", Retention::default());
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut committed: Option<u64> = None;
        for step in 0..150 {
            let op = match rng.below(10) {
                0..=3 => Op::Publish(rng.below(256) as u8),
                4 => Op::Batch(rng.below(256) as u8, rng.below(20) as u8),
                5..=6 => Op::Read(rng.below(model.len() as u64 + 3), rng.below(10) as usize),
                7..=8 => Op::Commit(rng.below(model.len() as u64 + 2)),
                _ => Op::Reopen,
            };
            let ctx = format!("seed {seed} step {step} {op:?}");
            match op {
                Op::Publish(b) => {
                    let off = db
                        .write(|txn| txn.publish("t", &Message::new(vec![b])))
                        .unwrap();
                    assert_eq!(off, model.len() as u64, "{ctx}");
                    model.insert(off, vec![b]);
                }
                Op::Batch(b, n) => {
                    let msgs: Vec<_> = (0..n).map(|i| Message::new(vec![b, i])).collect();
                    let range = db.write(|txn| txn.publish_batch("t", &msgs)).unwrap();
                    assert_eq!(range.start, model.len() as u64, "{ctx}");
                    for (off, m) in range.zip(msgs) {
                        model.insert(off, m.payload.into_vec());
                    }
                }
                Op::Read(from, max) => {
                    let got = db.read(|r| r.read_topic("t", from, max)).unwrap();
                    let want: Vec<_> = model.range(from..).take(max).collect();
                    assert_eq!(got.len(), want.len(), "{ctx}");
                    for (g, (off, payload)) in got.iter().zip(want) {
                        assert_eq!(
                            (g.offset, &g.message.payload[..]),
                            (*off, &payload[..]),
                            "{ctx}"
                        );
                    }
                }
                Op::Commit(offset) => {
                    let res = db.write(|txn| txn.commit_offset("t", "g", offset));
                    if offset <= model.len() as u64 {
                        res.unwrap();
                        committed = Some(offset);
                    } else {
                        assert!(matches!(res, Err(Error::OffsetOutOfRange { .. })), "{ctx}");
                    }
                }
                Op::Reopen => {
                    drop(db);
                    db = Database::open(&path).unwrap();
                }
            }
            let info = db.read(|r| r.topic_info("t")).unwrap();
            assert_eq!(info.next_offset, model.len() as u64, "{ctx}");
            let group = db.read(|r| r.group_info("t", "g"));
            match committed {
                Some(c) => assert_eq!(group.unwrap().committed, c, "{ctx}"),
                None => assert!(matches!(group, Err(Error::UnknownGroup { .. })), "{ctx}"),
            }
        }
    }
}

#[test]
fn message_ids_are_unique_and_ordered_and_caller_ids_are_kept() {
    let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::generate()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let id = MessageId(42);
    db.write(|txn| txn.publish("t", &Message::new("x").with_id(id).with_key("k")))
        .unwrap();
    let rec = &db.read(|r| r.read_topic("t", 0, 1)).unwrap()[0];
    assert_eq!(rec.message.id, id);
    assert_eq!(rec.message.key.as_deref(), Some(&b"k"[..]));
}

#[test]
fn topics_are_listed_reconfigured_and_deleted_with_their_groups_and_bindings() {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("a", TopicConfig::default())?;
        txn.create_topic("b", TopicConfig::default())?;
        txn.create_queue("q", mqlite::QueueConfig::default())?;
        txn.bind("a", "q", mqlite::Binding::Fanout)?;
        txn.publish("a", &Message::new("x"))?;
        txn.commit_offset("a", "g", 1)
    })
    .unwrap();
    let names = |db: &Database| -> Vec<String> {
        db.read(|r| r.topics())
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    assert_eq!(names(&db), ["a", "b"]);
    let keep_ten = TopicConfig::default().retention(Retention {
        max_messages: Some(10),
        ..Default::default()
    });
    db.write(|txn| txn.configure_topic("b", keep_ten)).unwrap();
    assert_eq!(db.read(|r| r.topic_info("b")).unwrap().config, keep_ten);
    db.write(|txn| txn.delete_topic("a")).unwrap();
    assert_eq!(names(&db), ["b"]);
    assert!(matches!(
        db.read(|r| r.topic_info("a")),
        Err(Error::UnknownTopic { .. })
    ));
    // Re-created, it starts empty: no old log, group or binding comes back.
    db.write(|txn| txn.create_topic("a", TopicConfig::default()))
        .unwrap();
    db.read(|r| {
        assert_eq!(r.topic_info("a")?.next_offset, 0);
        assert!(r.read_topic("a", 0, 10)?.is_empty());
        assert!(r.groups("a")?.is_empty());
        assert!(r.bindings("a")?.is_empty());
        Ok::<_, Error>(())
    })
    .unwrap();
    assert!(matches!(
        db.write(|txn| txn.delete_topic("zz")),
        Err(Error::UnknownTopic { .. })
    ));
}

#[test]
fn a_snapshot_does_not_block_writers_and_does_not_see_later_commits() {
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let snapshot = db.begin_read().unwrap();
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            for i in 0..10u8 {
                db.write(|txn| txn.publish("t", &Message::new(vec![i])))
                    .unwrap();
            }
        })
    };
    writer.join().unwrap(); // finishes while the snapshot is open
    assert_eq!(snapshot.topic_info("t").unwrap().next_offset, 0);
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 10);
}

#[test]
fn retention_and_reads_work_inside_record_batches() {
    let db = Database::in_memory().unwrap();
    topic(
        &db,
        "t",
        Retention {
            max_messages: Some(1250),
            ..Default::default()
        },
    );
    // Small messages: a batch holds up to 1 024 of them, so these make two.
    let batch: Vec<Message> = (0..1300u32)
        .map(|i| Message::new(i.to_le_bytes().to_vec()))
        .collect();
    db.write(|txn| txn.publish_batch("t", &batch)).unwrap();
    let info = db.read(|r| r.topic_info("t")).unwrap();
    assert_eq!(
        (info.first_offset, info.next_offset),
        (50, 1300),
        "stops inside a batch"
    );
    for from in [0, 49, 50, 1023, 1024, 1025, 1299] {
        let got = db.read(|r| r.read_topic("t", from, 3)).unwrap();
        let want: Vec<u64> = (from.max(50)..1300).take(3).collect();
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            want,
            "from {from}"
        );
        for r in &got {
            assert_eq!(r.message.payload, (r.offset as u32).to_le_bytes());
        }
    }
    // A byte bound drops whole batches, oldest first: one byte under what is stored drops
    // the oldest batch.
    let stored_bytes = info.stored_bytes;
    db.write(|txn| {
        txn.configure_topic(
            "t",
            TopicConfig::default().retention(Retention {
                max_bytes: Some(stored_bytes - 1),
                ..Default::default()
            }),
        )
    })
    .unwrap();
    db.enforce_retention().unwrap();
    let info = db.read(|r| r.topic_info("t")).unwrap();
    assert!(info.stored_bytes < stored_bytes, "{info:?}");
    assert!(
        info.first_offset > 50 && info.first_offset < 1300,
        "{info:?}"
    );
    assert_eq!(
        db.read(|r| r.read_topic("t", 0, 1)).unwrap()[0].offset,
        info.first_offset
    );
}

/// A consumer reads on inside the record batch its last poll stopped in, without looking it
/// up again; that must never return a message twice, skip one, or serve one of a batch that
/// is gone. Polls of every size against a model, while batches of every size are published,
/// the consumer seeks, retention removes batches under it, and the topic is deleted and
/// created again under the same name (payloads carry the topic's incarnation and offset).
#[test]
fn polls_of_any_size_follow_publishes_seeks_retention_and_a_recreated_topic() {
    for seed in 0..6u64 {
        let mut rng = Rng::new(seed);
        let db = Database::in_memory().unwrap();
        topic(&db, "t", Retention::default());
        let mut consumer = db.consumer("t", "g", StartAt::Earliest).unwrap();
        let payload =
            |life: u32, offset: u64| [life.to_le_bytes(), (offset as u32).to_le_bytes()].concat();
        let mut life = 0u32;
        let (mut polls, mut read) = (0, 0);
        for step in 0..1500 {
            let info = db.read(|r| r.topic_info("t")).unwrap();
            let ctx = format!(
                "seed {seed} step {step} {info:?} position {}",
                consumer.position()
            );
            match rng.below(40) {
                0..=5 => {
                    // Up to three batches' worth of small messages, or one.
                    let n = if rng.chance(30) {
                        1 + rng.below(3000)
                    } else {
                        1 + rng.below(5)
                    };
                    let from = info.next_offset;
                    let batch: Vec<Message> = (from..from + n)
                        .map(|o| Message::new(payload(life, o)))
                        .collect();
                    db.write(|txn| txn.publish_batch("t", &batch)).unwrap();
                }
                6 => consumer.seek(rng.below(info.next_offset + 3)),
                7 => {
                    let keep = rng.below(info.next_offset - info.first_offset + 2);
                    db.write(|txn| {
                        txn.configure_topic(
                            "t",
                            TopicConfig::default().retention(Retention {
                                max_messages: Some(keep),
                                ..Default::default()
                            }),
                        )
                    })
                    .unwrap();
                    db.enforce_retention().unwrap();
                    db.write(|txn| txn.configure_topic("t", TopicConfig::default()))
                        .unwrap();
                }
                8 if rng.chance(20) => {
                    db.write(|txn| txn.delete_topic("t")).unwrap();
                    topic(&db, "t", Retention::default());
                    life += 1;
                }
                _ => {
                    let max = match rng.below(4) {
                        0 => 1,
                        1 => 1 + rng.below(10) as usize,
                        2 => 1 + rng.below(400) as usize,
                        _ => 1 + rng.below(3000) as usize,
                    };
                    let start = consumer.position().max(info.first_offset);
                    let end = info.next_offset.min(start.saturating_add(max as u64));
                    let got = consumer.poll(max, Duration::ZERO).unwrap();
                    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
                    assert_eq!(offsets, (start..end).collect::<Vec<_>>(), "{ctx} max {max}");
                    for r in &got {
                        assert_eq!(r.message.payload, payload(life, r.offset), "{ctx}");
                    }
                    if !got.is_empty() {
                        assert_eq!(consumer.position(), end, "{ctx}");
                    }
                    polls += 1;
                    read += got.len();
                }
            }
        }
        assert!(
            polls > 500 && read > 10_000,
            "seed {seed}: {polls} polls read {read}"
        );
    }
}

/// A message larger than a record batch makes a batch alone, whether published alone, in a
/// batch among small ones, or by several publishes of one transaction; up to the message
/// size limit (1 MiB). Builds before 2026-12-07 panicked on any message over about 16 KiB.
#[test]
fn messages_larger_than_a_record_batch_publish_and_read_back() {
    let db = Database::in_memory().unwrap();
    topic(&db, "t", Retention::default());
    let sizes = [40_000, 0, 100, 20_000, 32_700, (1 << 20) - 200, 100, 33_000];
    let payload = |i: usize| vec![i as u8 + 1; sizes[i % sizes.len()]];
    for i in 0..sizes.len() {
        db.write(|txn| txn.publish("t", &Message::new(payload(i))))
            .unwrap();
    }
    let batch: Vec<Message> = (8..24).map(|i| Message::new(payload(i))).collect();
    assert_eq!(
        db.write(|txn| txn.publish_batch("t", &batch)).unwrap(),
        8..24
    );
    db.write(|txn| {
        for i in 24..32 {
            txn.publish("t", &Message::new(payload(i)))?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let mut consumer = db.consumer("t", "g", StartAt::Earliest).unwrap();
    let mut got = Vec::new();
    for max in [1, 3, 100] {
        got.extend(consumer.poll(max, Duration::ZERO).unwrap());
    }
    assert_eq!(got.len(), 32);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.message.payload, payload(i), "offset {i}");
    }
}

#[test]
fn publishes_in_one_transaction_share_record_batches_and_read_back_in_it() {
    let db = Database::in_memory().unwrap();
    for name in ["a", "b", "singles", "batched", "commits"] {
        topic(&db, name, Retention::default());
    }
    let payload = |i: u32| i.to_le_bytes().to_vec();
    let read_all = |r: &dyn Fn(&str) -> Vec<mqlite::Record>, name: &str, n: u32| {
        let got = r(name);
        assert_eq!(got.len(), n as usize, "{name}");
        for (i, rec) in got.iter().enumerate() {
            assert_eq!(rec.offset, i as u64, "{name}");
            assert_eq!(rec.message.payload, payload(i as u32), "{name} offset {i}");
        }
    };
    // Two topics interleaved, a batch among the single publishes, and a read of the log in
    // the middle of the transaction: it sees what the transaction published so far.
    db.write(|txn| {
        for i in 0..300u32 {
            if i == 100 {
                let batch: Vec<Message> = (100..120).map(|j| Message::new(payload(j))).collect();
                assert_eq!(txn.publish_batch("a", &batch)?, 100..120);
            }
            if (100..120).contains(&i) {
                txn.publish("b", &Message::new(payload(i)))?;
                continue;
            }
            assert_eq!(txn.publish("a", &Message::new(payload(i)))?, u64::from(i));
            txn.publish("b", &Message::new(payload(i)))?;
            if i == 150 {
                read_all(&|t| txn.read_topic(t, 0, 1000).unwrap(), "a", 151);
                read_all(&|t| txn.read_topic(t, 0, 1000).unwrap(), "b", 151);
            }
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    for name in ["a", "b"] {
        read_all(
            &|t| db.read(|r| r.read_topic(t, 0, 1000)).unwrap(),
            name,
            300,
        );
    }
    // 300 single publishes in one transaction take the bytes of one batched publish of the
    // same messages, and less than 300 commits of one each; a read inside the transaction
    // sees the same figure as one after it.
    let messages: Vec<Message> = (0..300).map(|i| Message::new(payload(i))).collect();
    let inside = db
        .write(|txn| {
            for m in &messages {
                txn.publish("singles", m)?;
            }
            txn.topic_info("singles")
        })
        .unwrap();
    db.write(|txn| txn.publish_batch("batched", &messages))
        .unwrap();
    for m in &messages {
        db.write(|txn| txn.publish("commits", m)).unwrap();
    }
    let info = |name: &str| db.read(|r| r.topic_info(name)).unwrap();
    assert_eq!(inside, info("singles"));
    assert_eq!(info("singles").stored_bytes, info("batched").stored_bytes);
    assert!(
        info("singles").stored_bytes < info("commits").stored_bytes,
        "{:?} {:?}",
        info("singles"),
        info("commits")
    );
    for name in ["singles", "batched", "commits"] {
        read_all(
            &|t| db.read(|r| r.read_topic(t, 0, 1000)).unwrap(),
            name,
            300,
        );
    }
    // Retention applies to what the transaction holds back, and a topic deleted after
    // publishes in the same transaction leaves none of them behind.
    topic(
        &db,
        "kept",
        Retention {
            max_messages: Some(100),
            ..Default::default()
        },
    );
    db.write(|txn| {
        for m in &messages {
            txn.publish("kept", m)?;
            txn.publish("a", m)?;
        }
        txn.delete_topic("a")?;
        txn.create_topic("a", TopicConfig::default())?;
        txn.publish("a", &messages[0])?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let kept = info("kept");
    assert_eq!((kept.first_offset, kept.next_offset), (200, 300));
    let got = db.read(|r| r.read_topic("kept", 0, 1000)).unwrap();
    assert_eq!(got.len(), 100);
    assert_eq!(got[0].message.payload, payload(200));
    read_all(&|t| db.read(|r| r.read_topic(t, 0, 1000)).unwrap(), "a", 1);
    // A transaction that fails after publishing leaves the log as it was.
    let before = info("b");
    let failed: Result<(), Error> = db.write(|txn| {
        for m in &messages {
            txn.publish("b", m)?;
        }
        Err(Error::Storage("abandoned".into()))
    });
    assert!(failed.is_err());
    assert_eq!(info("b"), before);
    read_all(
        &|t| db.read(|r| r.read_topic(t, 0, 1000)).unwrap(),
        "b",
        300,
    );
    // The topic's record is held back too: a group created at the end in the middle of the
    // transaction starts after what it published, and sees the publishes after it as lag.
    topic(&db, "grouped", Retention::default());
    let (start, lag) = db
        .write(|txn| {
            for m in &messages[..5] {
                txn.publish("grouped", m)?;
            }
            let start = txn.create_group("grouped", "late", StartAt::Latest)?;
            txn.publish("grouped", &messages[5])?;
            Ok::<_, Error>((start, txn.group_info("grouped", "late")?.lag))
        })
        .unwrap();
    assert_eq!((start, lag), (5, 1));
    assert_eq!(info("grouped").next_offset, 6);
    read_all(
        &|t| db.read(|r| r.read_topic(t, 0, 1000)).unwrap(),
        "grouped",
        6,
    );
}

#[test]
fn a_publish_that_meets_a_damaged_batch_while_trimming_cannot_commit() {
    // The log table, reached through the escape hatch only to damage a batch.
    const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("mqlite_log");
    let db = Database::in_memory().unwrap();
    let retention = Retention {
        max_messages: Some(2),
        ..Retention::default()
    };
    topic(&db, "t", retention);
    db.write(|txn| txn.publish("t", &Message::new("a")))
        .unwrap();
    db.write(|txn| {
        let mut log = txn.redb().open_table(LOG)?;
        let key = log.first()?.map(|(k, _)| k.value()).unwrap();
        log.insert(key, b"not a batch".as_slice())?;
        Ok::<_, Error>(())
    })
    .unwrap();
    // The third message makes retention drop the first batch, which is damaged: the
    // publish fails after its append, and the handled error does not commit half of it.
    let result = db.write(|txn| {
        txn.publish("t", &Message::new("b"))?;
        let refused = txn.publish("t", &Message::new("c"));
        assert!(
            matches!(refused, Err(Error::Corrupted { .. })),
            "{refused:?}"
        );
        Ok::<_, Error>(())
    });
    assert!(matches!(result, Err(Error::Corrupted { .. })), "{result:?}");
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 1);
}

#[test]
fn payloads_read_together_share_their_batch_and_outlive_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path().join("db.mqlite")).unwrap();
    topic(&db, "t", Retention::default());
    db.write(|txn| txn.create_queue("q", mqlite::QueueConfig::default()))
        .unwrap();
    // Payloads of varied sizes (empty, small, over a kilobyte) with keys and headers between
    // them, so that each payload's place in the batch differs from its neighbours'.
    let messages: Vec<Message> = (0..400u32)
        .map(|i| {
            let mut m = Message::new(vec![(i % 251) as u8; (i as usize * 37) % 1500])
                .with_timestamp_ms(1_000 + u64::from(i));
            if i.is_multiple_of(3) {
                m = m
                    .with_key(format!("k{i}"))
                    .with_header("n", i.to_le_bytes());
            }
            m
        })
        .collect();
    db.write(|txn| {
        txn.publish_batch("t", &messages)?;
        for m in &messages {
            txn.enqueue("q", m)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();

    let all = db.read(|r| r.read_topic("t", 0, usize::MAX)).unwrap();
    let some = db.read(|r| r.read_topic("t", 131, 50)).unwrap();
    let one = db.read(|r| r.read_topic("t", 7, 1)).unwrap();
    let received = db.write(|txn| txn.receive("q", 400)).unwrap();
    drop(db);
    assert_eq!(all.len(), 400);
    for r in all.iter().chain(&some).chain(&one) {
        assert_eq!(
            r.message, messages[r.offset as usize],
            "offset {}",
            r.offset
        );
    }
    assert_eq!(some.first().map(|r| r.offset), Some(131));
    // A batch that gives a read only one message copies just that payload; every other
    // payload shares its batch's copy.
    let shared = |n: usize| n * 10 >= 9 * 400;
    assert!(shared(
        all.iter().filter(|r| r.message.payload.is_shared()).count()
    ));
    assert!(
        some.iter()
            .filter(|r| r.message.payload.is_shared())
            .count()
            >= 45
    );
    assert!(
        !one[0].message.payload.is_shared(),
        "a single message owns its copy"
    );
    assert_eq!(received.len(), 400);
    for (d, m) in received.iter().zip(&messages) {
        assert_eq!(d.message, *m);
    }
    assert!(shared(
        received
            .iter()
            .filter(|d| d.message.payload.is_shared())
            .count()
    ));
    // A payload detached from its batch is the same bytes, owned.
    let detached = mqlite::Payload::from(all[399].message.payload.clone().into_vec());
    assert!(!detached.is_shared());
    assert_eq!(detached, messages[399].payload);
}

/// A message of `tests/data/format2.mqlite`, as the format-2 build that wrote the file made
/// it: offsets 0..150 one batched publish, 150..153 single publishes in commits of their own;
/// 200..205 enqueued to queue `q`; group `g` committed at 42.
fn format2_message(i: u64) -> Message {
    let mut m = Message::new(format!("message {i}"))
        .with_id(MessageId(0x0123_4567_89ab_cdef_0000 + u128::from(i)))
        .with_timestamp_ms(1_764_000_000_000 + i / 10);
    if i.is_multiple_of(7) {
        m = m.with_key(format!("key {i}"));
    }
    if i.is_multiple_of(11) {
        m = m.with_header("n", i.to_le_bytes());
    }
    if i.is_multiple_of(13) {
        m = m.with_routing_key("orders.eu");
    }
    m
}

/// A copy of the fixture `tests/data/{name}` in a new directory, to open writable.
fn fixture_copy(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    std::fs::copy(fixture.join(name), &path).unwrap();
    (dir, path)
}

#[test]
fn a_format_2_file_is_read_and_upgraded_and_its_batches_read_beside_dense_ones() {
    let (_dir, path) = fixture_copy("format2.mqlite");
    let stored: Vec<Message> = (0..153).map(format2_message).collect();
    let read_log = |r: &mqlite::ReadTransaction| -> mqlite::Result<Vec<Message>> {
        let records = r.read_topic("log", 0, usize::MAX)?;
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.offset, i as u64);
        }
        Ok(records.into_iter().map(|r| r.message).collect())
    };

    let old = Database::builder().open_read_only(&path).unwrap();
    let snapshot = old.begin_read().unwrap();
    assert_eq!(snapshot.format_version().unwrap(), 2);
    assert_eq!(read_log(&snapshot).unwrap(), stored);
    assert_eq!(snapshot.group_info("log", "g").unwrap().committed, 42);
    drop(snapshot);
    drop(old);

    let db = Database::open(&path).unwrap();
    assert_eq!(db.read(|r| r.format_version()).unwrap(), 3);
    let report = db.verify(|_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // New publishes go into dense batches after the old ones; one read crosses both.
    let added: Vec<Message> = (1_000..1_300).map(format2_message).collect();
    db.write(|txn| txn.publish_batch("log", &added)).unwrap();
    db.write(|txn| txn.publish("log", &format2_message(2_000)))
        .unwrap();
    let mut all = stored.clone();
    all.extend(added);
    all.push(format2_message(2_000));
    assert_eq!(db.read(read_log).unwrap(), all);
    let across = db.read(|r| r.read_topic("log", 140, 30)).unwrap();
    assert_eq!(across.len(), 30);
    for r in &across {
        assert_eq!(r.message, all[r.offset as usize]);
    }
    let jobs = db.write(|txn| txn.receive("q", 10)).unwrap();
    let want: Vec<Message> = (200..205).map(format2_message).collect();
    assert_eq!(
        jobs.iter().map(|d| d.message.clone()).collect::<Vec<_>>(),
        want
    );
    let report = db.verify(|_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(db);
    let again = Database::builder().open_read_only(&path).unwrap();
    assert_eq!(again.begin_read().unwrap().format_version().unwrap(), 3);
}

/// What the crashed-journal fixtures hold: topic `t` with `messages` of `size` bytes
/// `[i; size]`, each with key `k`, and queue `q` with three messages ready.
fn check_crashed_fixture(r: mqlite::ReadTransaction, messages: u8, size: usize) {
    let records = r.read_topic("t", 0, 100).unwrap();
    let payloads: Vec<Vec<u8>> = records.iter().map(|r| r.message.payload.to_vec()).collect();
    let expected: Vec<Vec<u8>> = (0..messages).map(|i| vec![i; size]).collect();
    assert_eq!(payloads, expected);
    assert!(
        records
            .iter()
            .all(|r| r.message.key.as_deref() == Some(&b"k"[..]))
    );
    assert_eq!(r.queue_info("q").unwrap().ready, 3);
}

/// `tests/data/journal2-crashed.mqlite` was left by a process that stopped without closing,
/// its commits still in the journal as version 2 records (the first whole, the later ones
/// patching its pages): topic `t` holds three publishes of 20 bytes `[i; 20]` with key `k`,
/// queue `q` three messages of `[i; 10]`.
#[test]
fn a_journal_a_crash_left_is_recovered_by_a_writable_open_and_refused_read_only() {
    let (_dir, path) = fixture_copy("journal2-crashed.mqlite");
    let untouched = std::fs::read(&path).unwrap();
    let check = |r| check_crashed_fixture(r, 3, 20);
    // Read-only, a file its writer did not close is refused, and left as it is.
    let refused = Database::builder().open_read_only(&path).unwrap_err();
    assert!(
        matches!(&refused, Error::NeedsRecovery { path: p } if *p == path),
        "{refused}"
    );
    // So it is in a shared mode, where the reader may not replay the journal.
    let refused = Database::builder()
        .concurrency(mqlite::redb::ConcurrencyMode::SingleWriter)
        .open_read_only(&path)
        .unwrap_err();
    assert!(matches!(&refused, Error::NeedsRecovery { .. }), "{refused}");
    assert_eq!(std::fs::read(&path).unwrap(), untouched);
    // Writable, the records are replayed and put in place.
    let db = Database::open(&path).unwrap();
    check(db.begin_read().unwrap());
    let report = db.verify(|_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(db);
    check(Database::open(&path).unwrap().begin_read().unwrap());
    let read_only = Database::builder().open_read_only(&path).unwrap();
    check(read_only.begin_read().unwrap());
}

/// `tests/data/journal3-crashed.mqlite` was left by a process that stopped without closing,
/// its commits still in the journal as version 3 records, three of which placed pages (a
/// record batch of 32 KiB each, written in place ahead of the record): topic `t` holds three
/// batches of ten messages of 4 000 bytes `[10 i + j; 4000]` with key `k`, queue `q` three
/// messages of `[i; 10]`, one of each a commit.
#[test]
fn a_journal_whose_records_placed_pages_is_recovered_after_a_crash() {
    let (_dir, path) = fixture_copy("journal3-crashed.mqlite");
    let check = |r| check_crashed_fixture(r, 30, 4000);
    let refused = Database::builder().open_read_only(&path).unwrap_err();
    assert!(matches!(&refused, Error::NeedsRecovery { .. }), "{refused}");
    let db = Database::open(&path).unwrap();
    check(db.begin_read().unwrap());
    let report = db.verify(|_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(db);
    check(
        Database::builder()
            .open_read_only(&path)
            .unwrap()
            .begin_read()
            .unwrap(),
    );
}

#[test]
fn new_files_are_journaled_by_default_plain_on_request_and_keep_their_layout() {
    let dir = tempfile::tempdir().unwrap();
    let starts = |p: &std::path::Path, magic: &[u8]| std::fs::read(p).unwrap().starts_with(magic);
    let journaled = dir.path().join("j.mqlite");
    let plain = dir.path().join("p.mqlite");
    let shared = dir.path().join("s.mqlite");
    for (path, builder) in [
        (&journaled, Database::builder()),
        (&plain, Database::builder().journal(false).clone()),
        (
            &shared,
            Database::builder()
                .concurrency(mqlite::redb::ConcurrencyMode::MultiWriter)
                .clone(),
        ),
    ] {
        let db = builder.open(path).unwrap();
        topic(&db, "t", Retention::default());
        db.write(|txn| txn.publish("t", &Message::new("x")))
            .unwrap();
    }
    assert!(starts(&journaled, b"mqlite-journal"));
    assert!(starts(&plain, b"redb"));
    assert!(starts(&shared, b"redb"));
    // A setting at open does not change an existing file's layout.
    for path in [&journaled, &plain] {
        let db = Database::builder().journal(true).open(path).unwrap();
        db.write(|txn| txn.publish("t", &Message::new("y")))
            .unwrap();
        assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 2);
    }
    assert!(starts(&plain, b"redb"));
    // The journal's size is checked before anything is created.
    let err = Database::builder()
        .journal_size_bytes(1024)
        .open(dir.path().join("tiny.mqlite"))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert!(!dir.path().join("tiny.mqlite").exists());
}
