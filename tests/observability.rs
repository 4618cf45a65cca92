//! Metrics snapshots and tracing events, seen through the public API.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;

use mqlite::{Database, Error, FnSink, Message, QueueConfig, Relay, Retention, TopicConfig};
use parking_lot::Mutex;
use tracing::Subscriber;
use tracing::span::{Attributes, Id, Record};

/// Records the target and message of every event.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

struct MessageField(String);

impl tracing::field::Visit for MessageField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = MessageField(String::new());
        event.record(&mut message);
        self.0
            .lock()
            .push((event.metadata().target().to_owned(), message.0));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn events_at_commit_relay_and_retention() {
    // The process-wide default, not a thread-scoped one: with a scoped subscriber, another
    // test's thread hitting the same event first (with no subscriber) could leave tracing's
    // per-callsite cache saying "nobody listens", and the event went missing under load.
    static RECORDER: std::sync::OnceLock<Recorder> = std::sync::OnceLock::new();
    let recorder = RECORDER.get_or_init(|| {
        let recorder = Recorder::default();
        tracing::subscriber::set_global_default(recorder.clone()).unwrap();
        recorder
    });
    let events = recorder.0.clone();
    {
        let db = Database::in_memory().unwrap();
        db.write(|txn| {
            txn.create_topic(
                "events",
                TopicConfig::default().retention(Retention {
                    max_age_ms: Some(1),
                    ..Retention::default()
                }),
            )?;
            txn.publish("events", &Message::new("old"))?;
            txn.outbox_put("up", &Message::new("a"))?;
            txn.outbox_put("up", &Message::new("b"))
        })
        .unwrap();
        let mut calls = 0;
        let mut relay = Relay::new(
            db.clone(),
            FnSink(move |_: &mqlite::OutboxMessage| {
                calls += 1;
                if calls == 1 {
                    Ok(())
                } else {
                    Err("broker down")
                }
            }),
        );
        relay.run_once().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        db.enforce_retention().unwrap();
    }
    let events = events.lock();
    let has =
        |target: &str, text: &str| events.iter().any(|(t, m)| t == target && m.contains(text));
    assert!(has("mqlite::commit", "group commit"), "{events:?}");
    assert!(has("mqlite::relay", "relayed outbox rows"), "{events:?}");
    assert!(has("mqlite::relay", "will retry"), "{events:?}");
    assert!(has("mqlite::retention", "retention removed"), "{events:?}");
}

#[test]
fn metrics_snapshot() {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("events", TopicConfig::default())?;
        txn.create_queue("jobs", QueueConfig::default())?;
        for i in 0..5u64 {
            txn.publish("events", &Message::new("e").with_timestamp_ms(1000 + i))?;
            txn.enqueue("jobs", &Message::new("j"))?;
        }
        txn.commit_offset("events", "audit", 2)?;
        txn.outbox_put("up", &Message::new("o"))?;
        txn.dedup("scope", mqlite::MessageId(1), 60_000)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    db.receive("jobs", 2, std::time::Duration::ZERO).unwrap();
    // Ten concurrent durable writers: every write counted, never more commits than writes.
    std::thread::scope(|s| {
        for _ in 0..10 {
            let db = db.clone();
            s.spawn(move || {
                db.write(|txn| txn.publish("events", &Message::new("x")))
                    .unwrap();
            });
        }
    });
    let m = db.metrics().unwrap();
    let t = &m.topics[0];
    assert_eq!((t.info.first_offset, t.info.next_offset), (0, 15));
    assert_eq!(t.oldest_ms, Some(1000));
    assert!(t.newest_ms.unwrap() > 1004);
    assert_eq!((t.groups[0].group.as_str(), t.groups[0].lag), ("audit", 13));
    let q = &m.queues[0];
    assert_eq!((q.ready, q.in_flight), (3, 2));
    assert_eq!(m.outbox.backlog, 1);
    assert_eq!(m.dedup_entries, 1);
    assert_eq!(m.commits.writes, 12, "1 setup + 1 receive + 10 publishes");
    assert!(m.commits.commits <= m.commits.writes);
    assert_eq!(
        m.commits.syncs, m.commits.commits,
        "durable mode: every commit synced"
    );
    assert!(m.commits.commits_per_second > 0.0);
}
