//! Guards the outbox and the relay on the embedded sinks: a rolled-back transaction never
//! reaches a sink; rows go out in commit order; an unreachable sink only grows the backlog,
//! which drains in order when it returns; a row that keeps failing is parked and re-driven;
//! a relay that dies between the confirm and the mark-delivered commit re-sends, and the
//! receiving dedup table drops the duplicate; idempotent consumers have one effect per id.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mqlite::redb::{ReadableTable, TableDefinition};
use mqlite::{
    Database, Error, FnSink, ManualClock, Message, MqliteSink, OutboxMessage, QueueConfig, Relay,
    RelayConfig, Sink, SinkError, StartAt, TopicConfig,
};
use parking_lot::Mutex;

const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");

type Got = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A sink that records what it got, and fails while `down` is set.
#[derive(Clone, Default)]
struct Recorder {
    got: Got,
    down: Arc<AtomicBool>,
}

impl Sink for Recorder {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(SinkError::new(0, "connection refused"));
        }
        let mut got = self.got.lock();
        for m in messages {
            got.push((m.destination.clone(), m.message.payload.to_vec()));
        }
        Ok(())
    }
}

#[test]
fn a_rolled_back_transaction_never_reaches_the_sink_and_order_is_commit_order() {
    let db = Database::in_memory().unwrap();
    let failed: Result<(), Error> = db.write(|txn| {
        txn.open_table(ORDERS)?.insert(1, "x")?;
        txn.outbox_put("orders", &Message::new("rolled back"))?;
        Err(Error::InvalidConfig("abort".into()))
    });
    assert!(failed.is_err());
    for i in 0..250u32 {
        db.write(|txn| {
            txn.open_table(ORDERS)?.insert(u64::from(i), "created")?;
            txn.outbox_put("orders.created", &Message::new(i.to_le_bytes().to_vec()))
        })
        .unwrap();
    }
    let sink = Recorder::default();
    let mut relay = Relay::new(db.clone(), sink.clone());
    let mut steps = 0;
    while relay.run_once().unwrap().sent > 0 {
        steps += 1;
    }
    assert_eq!(steps, 3, "batches of 100");
    let got = sink.got.lock();
    assert_eq!(got.len(), 250);
    for (i, (dest, payload)) in got.iter().enumerate() {
        assert_eq!(dest, "orders.created");
        assert_eq!(payload, &(i as u32).to_le_bytes());
    }
    assert!(got.iter().all(|(_, p)| p != b"rolled back"));
    assert_eq!(db.read(|r| r.outbox_info()).unwrap().backlog, 0);
}

#[test]
fn offline_the_backlog_grows_with_backoff_and_drains_in_order_when_the_sink_returns() {
    let clock = ManualClock::new(1_000_000);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    let sink = Recorder::default();
    sink.down.store(true, Ordering::SeqCst);
    let config = RelayConfig {
        max_attempts: 1000,
        ..RelayConfig::default()
    };
    let mut relay = Relay::with_config(db.clone(), sink.clone(), config);
    let mut last_wait = 0;
    for i in 0..1000u32 {
        db.write(|txn| txn.outbox_put("e", &Message::new(i.to_le_bytes().to_vec())))
            .unwrap();
        if i % 100 == 0 {
            let step = relay.run_once().unwrap();
            if let Some(until) = step.waiting_until_ms {
                assert!(until >= clock.now_ms(), "retry is in the future");
                last_wait = until - clock.now_ms();
            }
            clock.advance_ms(60_000);
        }
    }
    assert!(last_wait > 100, "backoff grew: {last_wait} ms");
    let info = db.read(|r| r.outbox_info()).unwrap();
    assert_eq!(info.backlog, 1000);
    assert_eq!(info.last_error.as_deref(), Some("connection refused"));
    assert!(relay.stats().failures >= 10);
    // Not due yet: nothing is attempted.
    let step = relay.run_once().unwrap();
    assert_eq!(step.sent, 0);
    sink.down.store(false, Ordering::SeqCst);
    clock.advance_ms(3_600_000);
    while relay.run_once().unwrap().sent > 0 {}
    let got = sink.got.lock();
    assert_eq!(got.len(), 1000);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, (_, p))| p == &(i as u32).to_le_bytes())
    );
    assert_eq!(db.read(|r| r.outbox_info()).unwrap().backlog, 0);
}

use mqlite::Clock as _;

#[test]
fn a_message_that_keeps_failing_is_parked_and_can_be_redriven() {
    let clock = ManualClock::new(0);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    db.write(|txn| {
        txn.outbox_put("bad", &Message::new("poison"))?;
        txn.outbox_put("good", &Message::new("fine"))
    })
    .unwrap();
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let d = delivered.clone();
    let sink = FnSink(move |m: &OutboxMessage| {
        if m.destination == "bad" {
            return Err("rejected by broker".to_owned());
        }
        d.lock().push(m.destination.clone());
        Ok(())
    });
    let config = RelayConfig {
        max_attempts: 3,
        ..RelayConfig::default()
    };
    let mut relay = Relay::with_config(db.clone(), sink, config);
    let mut parked = false;
    for _ in 0..10 {
        let step = relay.run_once().unwrap();
        parked |= step.parked;
        clock.advance_ms(60_000);
    }
    assert!(parked);
    assert_eq!(
        *delivered.lock(),
        ["good"],
        "the row behind the parked one flowed"
    );
    let info = db.read(|r| r.outbox_info()).unwrap();
    assert_eq!((info.backlog, info.parked), (0, 1));
    let parked_rows = db.read(|r| r.outbox_parked(10)).unwrap();
    assert_eq!(
        (parked_rows[0].attempts, parked_rows[0].last_error.as_str()),
        (3, "rejected by broker")
    );
    assert_eq!(db.write(|txn| txn.outbox_redrive(10)).unwrap(), 1);
    assert_eq!(db.read(|r| r.outbox_info()).unwrap().backlog, 1);
}

#[test]
fn a_failed_attempt_on_a_damaged_row_is_refused_and_the_row_stays() {
    // The outbox table, reached through the escape hatch only to damage a row.
    const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("mqlite_outbox");
    let db = Database::in_memory().unwrap();
    let seq = db
        .write(|txn| txn.outbox_put("dest", &Message::new("m")))
        .unwrap();
    db.write(|txn| {
        txn.redb()
            .open_table(OUTBOX)?
            .insert(seq, b"not an outbox row".as_slice())?;
        Ok::<_, Error>(())
    })
    .unwrap();
    for park in [false, true] {
        db.write(|txn| {
            let refused = txn.outbox_failed(seq, "down", 0, park);
            assert!(
                matches!(refused, Err(Error::Corrupted { .. })),
                "{refused:?}"
            );
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let stored = db
        .read(|r| {
            Ok::<_, Error>(
                r.redb()
                    .open_table(OUTBOX)?
                    .get(seq)?
                    .map(|v| v.value().to_vec()),
            )
        })
        .unwrap();
    assert_eq!(stored.as_deref(), Some(b"not an outbox row".as_slice()));
}

/// A sink that publishes, then "dies" before the relay can mark the rows delivered, once.
struct DiesAfterConfirm<S> {
    inner: S,
    die: bool,
}

impl<S: Sink> Sink for DiesAfterConfirm<S> {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        self.inner.publish(messages)?;
        if std::mem::take(&mut self.die) {
            return Err(SinkError::new(0, "relay killed after the broker confirmed"));
        }
        Ok(())
    }
}

#[test]
fn a_relay_killed_after_the_confirm_resends_and_the_receiving_dedup_drops_the_duplicate() {
    let clock = ManualClock::new(0);
    let source = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    let upstream = Database::in_memory().unwrap();
    upstream
        .write(|txn| txn.create_topic("inbox", TopicConfig::default()))
        .unwrap();
    for i in 0..50u8 {
        source
            .write(|txn| txn.outbox_put("orders.created", &Message::new(vec![i])))
            .unwrap();
    }
    let sink = DiesAfterConfirm {
        inner: MqliteSink::new(upstream.clone(), "inbox"),
        die: true,
    };
    let config = RelayConfig {
        backoff_base_ms: 1,
        backoff_max_ms: 1,
        ..RelayConfig::default()
    };
    let mut relay = Relay::with_config(source.clone(), sink, config);
    let first = relay.run_once().unwrap();
    assert_eq!(first.sent, 0);
    assert!(first.failure.is_some());
    clock.advance_ms(1); // the retry comes due
    while relay.run_once().unwrap().sent > 0 {}
    let records = upstream.read(|r| r.read_topic("inbox", 0, 1000)).unwrap();
    assert_eq!(records.len(), 50, "sent twice, stored once");
    assert!(
        records
            .iter()
            .enumerate()
            .all(|(i, r)| r.message.payload == [i as u8])
    );
    assert_eq!(records[0].message.routing_key, "orders.created");
    assert_eq!(source.read(|r| r.outbox_info()).unwrap().backlog, 0);
}

#[test]
fn a_spawned_relay_is_woken_by_outbox_commits_and_stops_on_request() {
    let db = Database::in_memory().unwrap();
    let sink = Recorder::default();
    let handle = Relay::new(db.clone(), sink.clone()).spawn().unwrap();
    for i in 0..20u8 {
        db.write(|txn| txn.outbox_put("e", &Message::new(vec![i])))
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // The stats count a row once its delivery is committed, just after the sink saw it.
    while handle.stats().sent < 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(sink.got.lock().len(), 20);
    assert_eq!(handle.stats().sent, 20);
    handle.stop();
    db.write(|txn| txn.outbox_put("e", &Message::new("after stop")))
        .unwrap();
    assert_eq!(db.read(|r| r.outbox_info()).unwrap().backlog, 1);
}

#[test]
fn idempotent_consumers_have_one_effect_per_message_id() {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("t", TopicConfig::default())?;
        txn.create_queue("q", QueueConfig::default())
    })
    .unwrap();
    let twice = Message::new("same id");
    db.write(|txn| {
        for _ in 0..2 {
            txn.publish("t", &twice)?;
            txn.enqueue("q", &twice)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let count = |db: &Database| {
        db.read(|r| {
            Ok::<_, Error>(
                r.open_table(ORDERS)
                    .map_or(Ok(0), |t| {
                        t.get(1).map(|v| v.map_or(0, |v| v.value().len()))
                    })
                    .unwrap(),
            )
        })
        .unwrap()
    };
    let report = db
        .process_queue("q", 10, Duration::ZERO, |txn, _| {
            let mut t = txn.open_table(ORDERS)?;
            let next = t.get(1)?.map_or(String::new(), |v| v.value().to_owned()) + "q";
            t.insert(1, next.as_str())?;
            Ok::<_, Error>(())
        })
        .unwrap();
    assert_eq!((report.handled, report.duplicates), (1, 1));
    assert_eq!(count(&db), 1);
    assert_eq!(
        db.read(|r| r.queue_info("q")).unwrap().depth(),
        0,
        "both acked"
    );

    let mut consumer = db.consumer("t", "g", StartAt::Earliest).unwrap();
    // A failing handler rolls back and the record is retried.
    let err = consumer.process(10, Duration::ZERO, |_, _| {
        Err::<(), _>(Error::InvalidConfig("x".into()))
    });
    assert!(err.is_err());
    assert_eq!(consumer.position(), 0);
    let report = consumer
        .process(10, Duration::ZERO, |txn, _| {
            let mut t = txn.open_table(ORDERS)?;
            let next = t.get(1)?.map_or(String::new(), |v| v.value().to_owned()) + "t";
            t.insert(1, next.as_str())?;
            Ok::<_, Error>(())
        })
        .unwrap();
    assert_eq!((report.handled, report.duplicates), (1, 1));
    assert_eq!(count(&db), 2);
    assert_eq!(db.read(|r| r.group_info("t", "g")).unwrap().committed, 2);
}
