//! The async face under tokio: deliveries as a Stream, async writes, wake-ups, delays, and
//! what happens to leased messages when a stream drops.
#![cfg(feature = "async")]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::time::Duration;

use mqlite::{Database, EnqueueOptions, Error, Message, QueueConfig};

fn queue_db() -> Database {
    let db = Database::in_memory().unwrap();
    db.write(|txn| txn.create_queue("jobs", QueueConfig::default()))
        .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_once_through_the_stream() {
    let db = queue_db();
    let mut producers = Vec::new();
    for p in 0..4u32 {
        let db = db.clone();
        producers.push(tokio::spawn(async move {
            for i in 0..100u32 {
                db.write_async(move |txn| txn.enqueue("jobs", &Message::new(format!("{p}-{i}"))))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut stream = db.deliveries("jobs", 32).unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < 400 {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream stalled")
            .unwrap()
            .unwrap();
        assert!(
            seen.insert(String::from_utf8(d.message.payload.to_vec()).unwrap()),
            "delivered twice"
        );
        let lease = d.lease.clone();
        db.write_async(move |txn| txn.ack(&lease)).await.unwrap();
    }
    for p in producers {
        p.await.unwrap();
    }
    assert_eq!(db.read(|r| r.queue_info("jobs")).unwrap().depth(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn wakes_on_commit_and_on_delay_without_a_busy_executor() {
    let db = queue_db();
    let mut stream = db.deliveries("jobs", 8).unwrap();
    // Nothing yet: the stream is pending, and the single executor thread stays free for the
    // timer below.
    let idle = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
    assert!(idle.is_err());
    // The delay runs on the database clock, which counts whole milliseconds: measured with
    // `Instant`, a 200 ms delay may end up to 1 ms short of 200 ms.
    let start = db.now_ms();
    db.write_async(|txn| {
        txn.enqueue_with(
            "jobs",
            &Message::new("later"),
            EnqueueOptions {
                delay_ms: 200,
                priority: 0,
            },
        )
    })
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.message.payload, b"later");
    assert!(db.now_ms() >= start + 200, "not before its delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_requeues_what_it_had_leased() {
    let db = queue_db();
    db.write(|txn| {
        for i in 0..10 {
            txn.enqueue("jobs", &Message::new(format!("{i}")))?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let mut stream = db.deliveries("jobs", 10).unwrap();
    let first = stream.next().await.unwrap().unwrap();
    drop(stream);
    let info = db.read(|r| r.queue_info("jobs")).unwrap();
    assert_eq!(info.in_flight, 1, "only the yielded delivery stays leased");
    assert_eq!(info.ready, 9);
    db.write(|txn| txn.ack(&first.lease)).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn errors() {
    let db = queue_db();
    assert!(matches!(
        db.deliveries("nope", 8),
        Err(Error::UnknownQueue { .. })
    ));
    assert!(matches!(
        db.deliveries("jobs", 0),
        Err(Error::LimitExceeded { .. })
    ));
    // An async write's own error comes back typed, and nothing is committed.
    let err = db
        .write_async(|txn| {
            txn.enqueue("jobs", &Message::new("x"))?;
            txn.enqueue("nope", &Message::new("y"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownQueue { .. }));
    assert_eq!(db.read(|r| r.queue_info("jobs")).unwrap().depth(), 0);
}
