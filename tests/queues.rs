//! Guards the work-queue half through the public API: leases, ack / nack / extend, stale
//! leases, delivery limits and dead-lettering with death history, TTL, max length, delays and
//! priorities, routing from topics by every binding rule, blocking receive woken by commits, by
//! delays coming due and by leases expiring, many workers, and a model-based test with reopens.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::Rng;
use mqlite::{
    Binding, Database, DeathReason, EnqueueOptions, Error, HeaderMatch, ManualClock, Message, Nack,
    Overflow, QueueConfig, Retention, TopicConfig,
};

fn db_with_clock() -> (Database, ManualClock) {
    let clock = ManualClock::new(1_000_000);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    (db, clock)
}

fn queue(db: &Database, name: &str, config: QueueConfig) {
    db.write(|txn| txn.create_queue(name, config.clone()))
        .unwrap();
}

fn enqueue(db: &Database, q: &str, payload: &str) {
    db.write(|txn| txn.enqueue(q, &Message::new(payload)))
        .unwrap();
}

/// Messages larger than a lane's record batch (16 KiB) are enqueued in the lane alone and
/// received whole, in order, among small ones; up to the message size limit (1 MiB).
#[test]
fn messages_larger_than_a_lane_batch_are_received_whole_in_order() {
    let db = Database::in_memory().unwrap();
    queue(&db, "q", QueueConfig::default());
    let sizes = [40_000, 0, 100, 20_000, 16_300, (1 << 20) - 200, 100];
    let payload = |i: usize| vec![i as u8 + 1; sizes[i % sizes.len()]];
    db.write(|txn| {
        for i in 0..21 {
            txn.enqueue("q", &Message::new(payload(i)))?;
        }
        Ok::<_, mqlite::Error>(())
    })
    .unwrap();
    let mut got = Vec::new();
    for max in [1, 2, 100] {
        got.extend(db.write(|txn| txn.receive("q", max)).unwrap());
    }
    assert_eq!(got.len(), 21);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.message.payload, payload(i), "message {i}");
    }
}

fn payloads(d: &[mqlite::Delivery]) -> Vec<String> {
    d.iter()
        .map(|d| String::from_utf8(d.message.payload.to_vec()).unwrap())
        .collect()
}

#[test]
fn ack_deletes_and_a_message_is_held_by_one_consumer_at_a_time() {
    let (db, _) = db_with_clock();
    queue(&db, "q", QueueConfig::default());
    enqueue(&db, "q", "a");
    enqueue(&db, "q", "b");
    let first = db.write(|txn| txn.receive("q", 1)).unwrap();
    let second = db.write(|txn| txn.receive("q", 10)).unwrap();
    assert_eq!(payloads(&first), ["a"]);
    assert_eq!(payloads(&second), ["b"], "a is leased: nobody else gets it");
    assert!(db.write(|txn| txn.receive("q", 10)).unwrap().is_empty());
    let info = db.read(|r| r.queue_info("q")).unwrap();
    assert_eq!((info.ready, info.in_flight), (0, 2));
    db.write(|txn| txn.ack(&first[0].lease)).unwrap();
    let again = db.write(|txn| txn.ack(&first[0].lease)).unwrap_err();
    assert!(matches!(again, Error::StaleLease { .. }), "{again}");
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().depth(), 1);
}

#[test]
fn an_expired_lease_redelivers_and_the_old_lease_goes_stale() {
    let (db, clock) = db_with_clock();
    queue(&db, "q", QueueConfig::default().lease_ms(1_000));
    enqueue(&db, "q", "job");
    let first = db.write(|txn| txn.receive("q", 1)).unwrap().remove(0);
    assert!(!first.redelivered);
    clock.advance_ms(999);
    assert!(db.write(|txn| txn.receive("q", 1)).unwrap().is_empty());
    let until = db.write(|txn| txn.extend(&first.lease, 1_000)).unwrap();
    assert_eq!(until, 1_000_999 + 1_000);
    clock.advance_ms(1_000);
    let second = db.write(|txn| txn.receive("q", 1)).unwrap().remove(0);
    assert_eq!((second.delivery_count, second.redelivered), (2, true));
    for stale in [
        db.write(|txn| txn.ack(&first.lease)).unwrap_err(),
        db.write(|txn| txn.nack(&first.lease, Nack::Requeue))
            .unwrap_err(),
        db.write(|txn| txn.extend(&first.lease, 10)).unwrap_err(),
    ] {
        assert!(matches!(stale, Error::StaleLease { .. }), "{stale}");
    }
    db.write(|txn| txn.ack(&second.lease)).unwrap();
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().depth(), 0);
}

#[test]
fn a_poison_message_is_dead_lettered_after_exactly_max_deliveries_and_the_rest_flow() {
    let (db, clock) = db_with_clock();
    queue(&db, "dlq", QueueConfig::default());
    queue(
        &db,
        "q",
        QueueConfig::default()
            .max_deliveries(3)
            .lease_ms(100)
            .dead_letter("dlq"),
    );
    enqueue(&db, "q", "poison");
    for i in 0..5 {
        enqueue(&db, "q", &format!("ok{i}"));
    }
    let mut poison_deliveries = 0;
    let mut done = Vec::new();
    for _ in 0..10 {
        for d in db.write(|txn| txn.receive("q", 10)).unwrap() {
            if d.message.payload == b"poison" {
                poison_deliveries += 1; // the worker "crashes": no ack, the lease runs out
            } else {
                db.write(|txn| txn.ack(&d.lease)).unwrap();
                done.push(d.message.payload);
            }
        }
        clock.advance_ms(100);
    }
    assert_eq!(poison_deliveries, 3);
    assert_eq!(done.len(), 5);
    let dead = db.write(|txn| txn.receive("dlq", 10)).unwrap();
    assert_eq!(payloads(&dead), ["poison"]);
    let death = &dead[0].deaths[0];
    assert_eq!(
        (death.queue.as_str(), death.reason, death.count),
        ("q", DeathReason::DeliveryLimit, 1)
    );
    assert_eq!(death.reason.as_str(), "delivery_limit");
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().dead_lettered, 1);
    // Re-drive: back to its source with a fresh delivery count and its history kept.
    db.write(|txn| txn.nack(&dead[0].lease, Nack::Requeue))
        .unwrap();
    assert_eq!(db.write(|txn| txn.redrive("dlq", 10)).unwrap(), 1);
    let back = db.write(|txn| txn.receive("q", 10)).unwrap();
    assert_eq!(
        (payloads(&back), back[0].delivery_count),
        (vec!["poison".to_owned()], 1)
    );
    assert_eq!(back[0].deaths.len(), 1);
}

#[test]
fn nack_requeues_now_later_or_dead_letters_with_reason_rejected() {
    let (db, clock) = db_with_clock();
    queue(&db, "dlq", QueueConfig::default());
    queue(&db, "q", QueueConfig::default().dead_letter("dlq"));
    for p in ["a", "b", "c"] {
        enqueue(&db, "q", p);
    }
    let d = db.write(|txn| txn.receive("q", 3)).unwrap();
    db.write(|txn| {
        txn.nack(&d[0].lease, Nack::Requeue)?;
        txn.nack(&d[1].lease, Nack::RequeueAfter(5_000))?;
        txn.nack(&d[2].lease, Nack::DeadLetter)
    })
    .unwrap();
    let info = db.read(|r| r.queue_info("q")).unwrap();
    assert_eq!(
        (info.ready, info.delayed, info.in_flight, info.dead_lettered),
        (1, 1, 0, 1)
    );
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("q", 10)).unwrap()),
        ["a"]
    );
    clock.advance_ms(5_000);
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("q", 10)).unwrap()),
        ["b"]
    );
    let dead = db.write(|txn| txn.receive("dlq", 10)).unwrap();
    assert_eq!(dead[0].deaths[0].reason, DeathReason::Rejected);
}

#[test]
fn priorities_go_first_fifo_within_one_and_delays_wait() {
    let (db, clock) = db_with_clock();
    queue(&db, "q", QueueConfig::default());
    db.write(|txn| {
        let with = |p: u8, d: u64| EnqueueOptions {
            priority: p,
            delay_ms: d,
        };
        txn.enqueue_with("q", &Message::new("low1"), with(0, 0))?;
        txn.enqueue_with("q", &Message::new("high1"), with(9, 0))?;
        txn.enqueue_with("q", &Message::new("later"), with(9, 1_000))?;
        txn.enqueue_with("q", &Message::new("low2"), with(0, 0))?;
        txn.enqueue_with("q", &Message::new("high2"), with(9, 0))?;
        txn.enqueue_with("q", &Message::new("mid"), with(5, 0))
    })
    .unwrap();
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().delayed, 1);
    let got = db.write(|txn| txn.receive("q", 10)).unwrap();
    assert_eq!(payloads(&got), ["high1", "high2", "mid", "low1", "low2"]);
    clock.advance_ms(1_000);
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("q", 10)).unwrap()),
        ["later"]
    );
    let err = db
        .write(|txn| {
            txn.enqueue_with(
                "q",
                &Message::new("x"),
                EnqueueOptions {
                    priority: 10,
                    delay_ms: 0,
                },
            )
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: "priority",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn max_length_policies() {
    let (db, _) = db_with_clock();
    queue(&db, "dlq", QueueConfig::default());
    queue(
        &db,
        "drop",
        QueueConfig::default()
            .max_length(2, Overflow::DropOldest)
            .dead_letter("dlq"),
    );
    queue(
        &db,
        "reject",
        QueueConfig::default().max_length(2, Overflow::RejectPublish),
    );
    for p in ["1", "2", "3"] {
        enqueue(&db, "drop", p);
    }
    enqueue(&db, "reject", "1");
    enqueue(&db, "reject", "2");
    let err = db
        .write(|txn| txn.enqueue("reject", &Message::new("3")))
        .unwrap_err();
    assert!(
        matches!(err, Error::QueueFull { max_length: 2, .. }),
        "{err}"
    );
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("drop", 10)).unwrap()),
        ["2", "3"]
    );
    let dead = db.write(|txn| txn.receive("dlq", 10)).unwrap();
    assert_eq!(payloads(&dead), ["1"]);
    assert_eq!(dead[0].deaths[0].reason, DeathReason::MaxLength);
    assert_eq!(db.read(|r| r.queue_info("reject")).unwrap().ready, 2);
}

#[test]
fn expired_messages_are_dead_lettered_with_reason_expired() {
    let (db, clock) = db_with_clock();
    queue(&db, "dlq", QueueConfig::default());
    queue(
        &db,
        "q",
        QueueConfig::default()
            .message_ttl_ms(500)
            .dead_letter("dlq"),
    );
    enqueue(&db, "q", "old");
    clock.advance_ms(500);
    assert!(db.write(|txn| txn.receive("q", 10)).unwrap().is_empty());
    let dead = db.write(|txn| txn.receive("dlq", 10)).unwrap();
    assert_eq!(
        (payloads(&dead), dead[0].deaths[0].reason),
        (vec!["old".to_owned()], DeathReason::Expired)
    );
}

/// Publishes one message per routing key and returns what each queue received.
fn route(bindings: &[(&str, Binding)], messages: Vec<Message>) -> BTreeMap<String, Vec<String>> {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("x", TopicConfig::default().retention(Retention::none()))?;
        for (q, rule) in bindings {
            txn.ensure_queue(q, QueueConfig::default())?;
            txn.bind("x", q, rule.clone())?;
        }
        for m in &messages {
            txn.publish("x", m)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let mut out = BTreeMap::new();
    for (q, _) in bindings {
        let got = db.write(|txn| txn.receive(q, 100)).unwrap();
        out.insert((*q).to_owned(), payloads(&got));
    }
    out
}

fn keyed(keys: &[&str]) -> Vec<Message> {
    keys.iter()
        .map(|k| Message::new(*k).with_routing_key(*k))
        .collect()
}

#[test]
fn routing_by_exact_key_fanout_and_wildcards() {
    let got = route(
        &[
            ("direct", Binding::key("a.b")),
            ("fan", Binding::Fanout),
            ("hash", Binding::pattern("a.#")),
            ("star", Binding::pattern("a.*")),
            ("mid", Binding::pattern("a.*.c")),
            ("empty", Binding::pattern("a..b")),
        ],
        keyed(&["a", "a.b", "a.b.c", "a..b", "a.x.y.c", "b"]),
    );
    assert_eq!(got["direct"], ["a.b"]);
    assert_eq!(got["fan"], ["a", "a.b", "a.b.c", "a..b", "a.x.y.c", "b"]);
    assert_eq!(
        got["hash"],
        ["a", "a.b", "a.b.c", "a..b", "a.x.y.c"],
        "a.# matches a"
    );
    assert_eq!(got["star"], ["a.b"], "* never matches zero words");
    assert_eq!(got["mid"], ["a.b.c"], "wrong word count matches nothing");
    assert_eq!(got["empty"], ["a..b"], "empty words are words");
}

#[test]
fn bindings_changed_in_a_transaction_route_its_next_publishes() {
    let (db, _) = db_with_clock();
    db.write(|txn| {
        txn.create_topic("t", TopicConfig::default())?;
        for q in ["a", "b"] {
            txn.create_queue(q, QueueConfig::default())?;
        }
        txn.bind("t", "a", Binding::Fanout)
    })
    .unwrap();
    db.write(|txn| {
        txn.publish("t", &Message::new("1"))?;
        txn.bind("t", "b", Binding::Fanout)?;
        txn.publish("t", &Message::new("2"))?;
        txn.unbind("t", "a", &Binding::Fanout)?;
        txn.publish("t", &Message::new("3"))?;
        txn.delete_queue("b")?;
        txn.publish("t", &Message::new("4"))?;
        txn.bind("t", "a", Binding::key("x"))?;
        txn.publish("t", &Message::new("5").with_routing_key("x"))?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("a", 10)).unwrap()),
        ["1", "2", "5"]
    );
    assert!(matches!(
        db.write(|txn| txn.receive("b", 10)),
        Err(Error::UnknownQueue { .. })
    ));
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 5);
}

#[test]
fn a_queue_matched_by_several_bindings_gets_the_message_once() {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("x", TopicConfig::default())?;
        txn.create_queue("q", QueueConfig::default())?;
        txn.bind("x", "q", Binding::pattern("a.*"))?;
        txn.bind("x", "q", Binding::pattern("#"))?;
        txn.bind("x", "q", Binding::key("a.b"))?;
        txn.bind("x", "q", Binding::key("a.b"))?; // the same rule twice is one binding
        txn.publish("x", &Message::new("m").with_routing_key("a.b"))
    })
    .unwrap();
    assert_eq!(db.read(|r| r.bindings("x")).unwrap().len(), 3);
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().ready, 1);
    assert!(
        db.write(|txn| txn.unbind("x", "q", &Binding::Fanout))
            .map(|b| !b)
            .unwrap()
    );
}

#[test]
fn routing_by_headers_all_and_any() {
    let want = |mode| Binding::Headers {
        mode,
        headers: vec![
            ("region".into(), Some(b"eu".to_vec())),
            ("vip".into(), None),
        ],
    };
    let msgs = vec![
        Message::new("both")
            .with_header("region", "eu")
            .with_header("vip", ""),
        Message::new("region").with_header("region", "eu"),
        Message::new("vip").with_header("vip", "yes"),
        Message::new("wrong").with_header("region", "us"),
    ];
    let got = route(
        &[
            ("all", want(HeaderMatch::All)),
            ("any", want(HeaderMatch::Any)),
        ],
        msgs,
    );
    assert_eq!(got["all"], ["both"]);
    assert_eq!(got["any"], ["both", "region", "vip"]);
}

#[test]
fn routed_messages_take_priority_and_delay_from_headers_and_the_topic_keeps_its_log() {
    let (db, clock) = db_with_clock();
    db.write(|txn| {
        txn.create_topic("x", TopicConfig::default())?;
        txn.create_queue("q", QueueConfig::default())?;
        txn.bind("x", "q", Binding::Fanout)?;
        txn.publish("x", &Message::new("plain"))?;
        txn.publish("x", &Message::new("urgent").with_header("x-priority", "7"))?;
        txn.publish("x", &Message::new("delayed").with_header("x-delay", "250"))
    })
    .unwrap();
    assert_eq!(db.read(|r| r.topic_info("x")).unwrap().len(), 3);
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("q", 10)).unwrap()),
        ["urgent", "plain"]
    );
    clock.advance_ms(250);
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("q", 10)).unwrap()),
        ["delayed"]
    );
}

#[test]
fn a_refused_publish_leaves_its_transaction_as_it_was_and_the_rest_commits() {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("x", TopicConfig::default())?;
        txn.create_queue(
            "one",
            QueueConfig::default().max_length(1, Overflow::RejectPublish),
        )?;
        txn.create_queue("all", QueueConfig::default())?;
        txn.bind("x", "one", Binding::key("full"))?;
        txn.bind("x", "all", Binding::Fanout)
    })
    .unwrap();
    let to_full = |payload: &str| Message::new(payload).with_routing_key("full");
    db.write(|txn| {
        txn.publish("x", &to_full("a"))?;
        // The second message would overflow `one`: the whole batch is refused, and its first
        // message reaches neither the log nor `all`.
        let refused = txn.publish_batch("x", &[Message::new("b1"), to_full("b2")]);
        assert!(
            matches!(refused, Err(Error::QueueFull { .. })),
            "{refused:?}"
        );
        let bad = txn.publish("x", &Message::new("c").with_header("x-priority", "high"));
        assert!(matches!(bad, Err(Error::InvalidConfig(_))), "{bad:?}");
        // The caller handled both errors and goes on in the same transaction.
        txn.publish("x", &Message::new("d"))
    })
    .unwrap();
    let log: Vec<_> = db
        .read(|r| r.read_topic("x", 0, 10))
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.offset,
                String::from_utf8(r.message.payload.into_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(log, [(0, "a".to_owned()), (1, "d".to_owned())]);
    assert_eq!(db.read(|r| r.topic_info("x")).unwrap().next_offset, 2);
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("one", 10)).unwrap()),
        ["a"]
    );
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("all", 10)).unwrap()),
        ["a", "d"]
    );
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

/// Queue `a` holds "first" and makes room by dead-lettering into `dlq`, which rejects when
/// full and holds "dead" out of `dlq_max`; topic `t` routes to `a`, and to `dlq` too when
/// `bind_dlq`.
fn overflowing_into_bounded_dlq(dlq_max: u64, bind_dlq: bool) -> Database {
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_queue(
            "dlq",
            QueueConfig::default().max_length(dlq_max, Overflow::RejectPublish),
        )?;
        txn.create_queue(
            "a",
            QueueConfig::default()
                .max_length(1, Overflow::DropOldest)
                .dead_letter("dlq"),
        )?;
        txn.create_topic("t", TopicConfig::default())?;
        txn.bind("t", "a", Binding::Fanout)?;
        if bind_dlq {
            txn.bind("t", "dlq", Binding::Fanout)?;
        }
        txn.enqueue("dlq", &Message::new("dead"))?;
        txn.enqueue("a", &Message::new("first"))
    })
    .unwrap();
    db
}

#[test]
fn an_overflow_the_dead_letter_queue_refuses_changes_nothing() {
    let db = overflowing_into_bounded_dlq(1, false);
    db.write(|txn| {
        // Making room in `a` would dead-letter "first" into `dlq`, which is full and rejects:
        // both the enqueue and the publish are refused before they change anything.
        let refused = txn.enqueue("a", &Message::new("second"));
        assert!(matches!(refused, Err(Error::QueueFull { ref queue, .. }) if queue == "dlq"));
        let refused = txn.publish("t", &Message::new("third"));
        assert!(matches!(refused, Err(Error::QueueFull { ref queue, .. }) if queue == "dlq"));
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("a", 10)).unwrap()),
        ["first"]
    );
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("dlq", 10)).unwrap()),
        ["dead"]
    );
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 0);
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

#[test]
fn a_redrive_leaves_what_a_full_source_queue_refuses_in_the_dead_letter_queue() {
    let (db, _) = db_with_clock();
    queue(&db, "dlq", QueueConfig::default());
    queue(
        &db,
        "q",
        QueueConfig::default()
            .max_length(2, Overflow::RejectPublish)
            .dead_letter("dlq"),
    );
    queue(&db, "p", QueueConfig::default().dead_letter("dlq"));
    for (q, payload) in [("q", "q1"), ("q", "q2"), ("p", "p1")] {
        enqueue(&db, q, payload);
    }
    // All three die into `dlq`, in the order q1, q2, p1.
    db.write(|txn| {
        for q in ["q", "p"] {
            for d in txn.receive(q, 10)? {
                txn.nack(&d.lease, Nack::DeadLetter)?;
            }
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    enqueue(&db, "q", "new");
    // `q` has room for one: q1 goes back, q2 stays, p1 goes back to `p`.
    assert_eq!(db.write(|txn| txn.redrive("dlq", 10)).unwrap(), 2);
    let back = |q: &str| payloads(&db.write(|txn| txn.receive(q, 10)).unwrap());
    assert_eq!(back("q"), ["new", "q1"]);
    assert_eq!(back("p"), ["p1"]);
    assert_eq!(back("dlq"), ["q2"]);
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

#[test]
fn an_ack_of_several_queues_with_one_stale_lease_changes_nothing() {
    let (db, _) = db_with_clock();
    queue(&db, "a", QueueConfig::default());
    queue(&db, "b", QueueConfig::default());
    enqueue(&db, "a", "a1");
    enqueue(&db, "b", "b1");
    let a = db.write(|txn| txn.receive("a", 1)).unwrap();
    let b = db.write(|txn| txn.receive("b", 1)).unwrap();
    db.write(|txn| txn.ack(&b[0].lease)).unwrap();
    // The lease of `a` is good, the one of `b` is stale: the handled refusal acks nothing.
    db.write(|txn| {
        let refused = txn.ack_many(&[a[0].lease.clone(), b[0].lease.clone()]);
        assert!(matches!(refused, Err(Error::StaleLease { ref queue }) if queue == "b"));
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(db.read(|r| r.queue_info("a")).unwrap().in_flight, 1);
    // A lease listed twice, in runs of different queues, is refused the same way.
    enqueue(&db, "b", "b2");
    let b = db.write(|txn| txn.receive("b", 1)).unwrap();
    let twice = [a[0].lease.clone(), b[0].lease.clone(), a[0].lease.clone()];
    let refused = db.write(|txn| txn.ack_many(&twice)).unwrap_err();
    assert!(matches!(refused, Error::StaleLease { ref queue } if queue == "a"));
    db.write(|txn| txn.ack_many(&twice[..2])).unwrap();
    let (a, b) = (
        db.read(|r| r.queue_info("a")).unwrap(),
        db.read(|r| r.queue_info("b")).unwrap(),
    );
    assert_eq!((a.depth(), b.depth()), (0, 0));
}

#[test]
fn what_a_transaction_enqueued_is_seen_by_everything_after_it_in_the_transaction() {
    let (db, _) = db_with_clock();
    let bounded = |max| {
        QueueConfig::default()
            .max_length(max, Overflow::RejectPublish)
            .dead_letter("dlq")
    };
    queue(&db, "dlq", QueueConfig::default());
    queue(&db, "q", bounded(3));
    db.write(|txn| {
        txn.create_topic("t", TopicConfig::default())?;
        txn.bind("t", "q", Binding::Fanout)
    })
    .unwrap();
    db.write(|txn| {
        txn.enqueue("q", &Message::new("a"))?;
        txn.publish("t", &Message::new("b"))?;
        assert_eq!(txn.queue_info("q")?.ready, 2);
        txn.enqueue("q", &Message::new("c"))?;
        // Full now: an enqueue and a routed publish are refused, and the transaction goes on.
        let full = |r: Result<_, Error>| matches!(r, Err(Error::QueueFull { .. }));
        assert!(full(txn.enqueue("q", &Message::new("d")).map(|_| 0)));
        assert!(full(txn.publish("t", &Message::new("e"))));
        let got = txn.receive("q", 1)?;
        assert_eq!(payloads(&got), ["a"]);
        txn.nack(&got[0].lease, Nack::DeadLetter)?;
        txn.enqueue("q", &Message::new("f"))?;
        txn.configure_queue("q", bounded(4))?;
        txn.enqueue("q", &Message::new("g"))?;
        let info = txn.queue_info("q")?;
        assert_eq!((info.ready, info.dead_lettered), (4, 1));
        // A refused delete (`q` dead-letters into `dlq`) leaves what was enqueued.
        txn.enqueue("dlq", &Message::new("gone"))?;
        txn.delete_queue("dlq").unwrap_err();
        Ok::<_, Error>(())
    })
    .unwrap();
    let taken = |q: &str| payloads(&db.write(|txn| txn.receive(q, 10)).unwrap());
    assert_eq!(taken("q"), ["b", "c", "f", "g"]);
    assert_eq!(taken("dlq"), ["a", "gone"]);
    // A transaction that fails takes what it held with it.
    db.write(|txn| {
        txn.enqueue("dlq", &Message::new("rolled back"))?;
        Err::<(), _>(Error::InvalidConfig("the closure failed".into()))
    })
    .unwrap_err();
    let info = db.read(|r| r.queue_info("dlq")).unwrap();
    assert_eq!((info.ready, info.in_flight), (0, 2));
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

#[test]
fn a_publish_whose_overflow_fills_a_queue_it_also_goes_to_cannot_commit() {
    let db = overflowing_into_bounded_dlq(2, true);
    // Each queue alone has room, but routing to `a` dead-letters "first" into `dlq`, which is
    // then full when the message itself comes to it.
    let result = db.write(|txn| {
        let refused = txn.publish("t", &Message::new("new"));
        assert!(matches!(refused, Err(Error::QueueFull { ref queue, .. }) if queue == "dlq"));
        Ok::<_, Error>(())
    });
    assert!(matches!(result, Err(Error::QueueFull { .. })), "{result:?}");
    assert_eq!(db.read(|r| r.topic_info("t")).unwrap().next_offset, 0);
    let taken = |q: &str| payloads(&db.write(|txn| txn.receive(q, 10)).unwrap());
    assert_eq!(taken("a"), ["first"]);
    assert_eq!(taken("dlq"), ["dead"]);
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

#[test]
fn a_receive_that_cannot_dead_letter_fails_and_its_transaction_cannot_commit() {
    let (db, clock) = db_with_clock();
    queue(
        &db,
        "dlq",
        QueueConfig::default().max_length(1, Overflow::RejectPublish),
    );
    queue(
        &db,
        "a",
        QueueConfig::default()
            .lease_ms(100)
            .max_deliveries(1)
            .dead_letter("dlq"),
    );
    enqueue(&db, "dlq", "dead");
    enqueue(&db, "a", "m");
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("a", 10)).unwrap()),
        ["m"]
    );
    clock.advance_ms(200);
    // The lease ran out and "m" used its one delivery: this receive dead-letters it, and the
    // full dead-letter queue refuses. A closure that handles the error and returns Ok gets it
    // back from the commit, through either path, and nothing of the transaction is stored.
    let handled = |txn: &mqlite::WriteTransaction<'_>| {
        let refused = txn.receive("a", 10);
        assert!(matches!(refused, Err(Error::QueueFull { ref queue, .. }) if queue == "dlq"));
        Ok::<_, Error>(())
    };
    let committed = db.write(handled);
    assert!(
        matches!(committed, Err(Error::QueueFull { .. })),
        "{committed:?}"
    );
    let committed = db.write_send(handled);
    assert!(
        matches!(committed, Err(Error::QueueFull { .. })),
        "{committed:?}"
    );
    // Room in the dead-letter queue: the next receive moves "m" there.
    db.write(|txn| {
        let d = txn.receive("dlq", 10)?;
        txn.ack(&d[0].lease)
    })
    .unwrap();
    assert!(db.write(|txn| txn.receive("a", 10)).unwrap().is_empty());
    assert_eq!(
        payloads(&db.write(|txn| txn.receive("dlq", 10)).unwrap()),
        ["m"]
    );
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

#[test]
fn consume_from_a_topic_and_enqueue_and_ack_with_a_domain_write_in_one_commit() {
    use mqlite::redb::TableDefinition;
    const DONE: TableDefinition<&str, u64> = TableDefinition::new("done");
    let db = Database::in_memory().unwrap();
    db.write(|txn| {
        txn.create_topic("in", TopicConfig::default())?;
        txn.create_queue("work", QueueConfig::default())?;
        txn.publish("in", &Message::new("e1"))
    })
    .unwrap();
    // Consume from the topic and enqueue, one commit.
    db.write(|txn| {
        for rec in txn.read_topic("in", 0, 10)? {
            txn.enqueue("work", &rec.message)?;
            txn.commit_offset("in", "mover", rec.offset + 1)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    // Receive, then (domain write + ack) in one commit; a failure rolls both back.
    let d = db.write(|txn| txn.receive("work", 1)).unwrap().remove(0);
    let failed: Result<(), Error> = db.write(|txn| {
        txn.open_table(DONE)?.insert("e1", 1)?;
        txn.ack(&d.lease)?;
        Err(Error::InvalidConfig("boom".into()))
    });
    assert!(failed.is_err());
    assert_eq!(db.read(|r| r.queue_info("work")).unwrap().in_flight, 1);
    db.write(|txn| {
        txn.open_table(DONE)?.insert("e1", 1)?;
        txn.ack(&d.lease)
    })
    .unwrap();
    db.read(|r| {
        assert_eq!(r.open_table(DONE)?.get("e1")?.unwrap().value(), 1);
        assert_eq!(r.queue_info("work")?.depth(), 0);
        assert_eq!(r.group_info("in", "mover")?.committed, 1);
        Ok::<_, Error>(())
    })
    .unwrap();
}

#[test]
fn blocking_receive_wakes_on_commit_on_a_delay_coming_due_and_on_lease_expiry() {
    let (db, clock) = db_with_clock();
    queue(&db, "q", QueueConfig::default().lease_ms(5_000));
    let wait = |db: &Database| {
        let db = db.clone();
        std::thread::spawn(move || db.receive("q", 1, Duration::from_secs(60)).unwrap())
    };
    // Woken by a commit.
    let w = wait(&db);
    enqueue(&db, "q", "now");
    let got = w.join().unwrap();
    assert_eq!(payloads(&got), ["now"]);
    // Woken by the lease of "now" expiring (the clock moves; nothing is committed).
    let w = wait(&db);
    clock.advance_ms(5_000);
    let again = w.join().unwrap();
    assert_eq!(
        (payloads(&again), again[0].redelivered),
        (vec!["now".to_owned()], true)
    );
    db.write(|txn| txn.ack(&again[0].lease)).unwrap();
    // Woken by a delayed message coming due.
    db.write(|txn| {
        txn.enqueue_with(
            "q",
            &Message::new("later"),
            EnqueueOptions {
                delay_ms: 1_000,
                priority: 0,
            },
        )
    })
    .unwrap();
    let w = wait(&db);
    clock.advance_ms(1_000);
    assert_eq!(payloads(&w.join().unwrap()), ["later"]);
    // A timeout returns empty.
    assert!(
        db.receive("q", 1, Duration::from_millis(10))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn eight_workers_drain_100_000_messages_each_processed_once() {
    const N: u32 = 100_000;
    let db = Database::in_memory().unwrap();
    queue(&db, "jobs", QueueConfig::default().lease_ms(600_000));
    for chunk in (0..N).collect::<Vec<_>>().chunks(5_000) {
        db.write(|txn| {
            for i in chunk {
                txn.enqueue("jobs", &Message::new(i.to_le_bytes().to_vec()))?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let seen = Arc::new(parking_lot::Mutex::new(Vec::with_capacity(N as usize)));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (db, seen) = (db.clone(), seen.clone());
            std::thread::spawn(move || {
                loop {
                    let batch = db.receive("jobs", 200, Duration::from_millis(50)).unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    db.write(|txn| {
                        for d in &batch {
                            txn.ack(&d.lease)?;
                        }
                        Ok::<_, Error>(())
                    })
                    .unwrap();
                    let mut seen = seen.lock();
                    for d in batch {
                        assert_eq!(d.delivery_count, 1, "no lease expired, so no redelivery");
                        seen.push(u32::from_le_bytes(
                            d.message.payload[..].try_into().unwrap(),
                        ));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut seen = seen.lock().clone();
    seen.sort_unstable();
    assert_eq!(
        seen.len(),
        N as usize,
        "every message processed exactly once"
    );
    assert!(seen.iter().enumerate().all(|(i, v)| i as u32 == *v));
    assert_eq!(db.read(|r| r.queue_info("jobs")).unwrap().depth(), 0);
}

#[test]
fn random_operations_never_lose_a_message_nor_lease_it_twice() {
    for seed in 0..30u64 {
        let mut rng = Rng::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.mqlite");
        let clock = ManualClock::new(1_000_000);
        let open = || {
            Database::builder()
                .clock(clock.clone())
                .open(&path)
                .unwrap()
        };
        let mut db = open();
        db.write(|txn| {
            txn.create_queue("dlq", QueueConfig::default())?;
            txn.create_queue(
                "q",
                QueueConfig::default()
                    .lease_ms(1_000)
                    .max_deliveries(4)
                    .dead_letter("dlq"),
            )
        })
        .unwrap();
        let mut next = 0u32;
        let mut pending: BTreeSet<u32> = BTreeSet::new(); // enqueued, neither acked nor dead
        let mut acked: HashSet<u32> = HashSet::new();
        let mut leases: BTreeMap<u32, mqlite::Lease> = BTreeMap::new(); // what we believe we hold
        for step in 0..300 {
            let ctx = format!("seed {seed} step {step}");
            match rng.below(14) {
                12..=13 => {
                    // Receive and settle in one transaction. The closure may run twice
                    // (group commit), so its choices are drawn before.
                    let max = 1 + rng.below(4) as usize;
                    let choices: Vec<u64> = (0..max).map(|_| rng.below(4)).collect();
                    let got = db
                        .write(|txn| {
                            let got = txn.receive("q", max)?;
                            for (d, choice) in got.iter().zip(&choices) {
                                match choice {
                                    0 => txn.ack(&d.lease)?,
                                    1 => txn.nack(&d.lease, Nack::Requeue)?,
                                    2 => {
                                        txn.extend(&d.lease, 2_000)?;
                                    }
                                    _ => {}
                                }
                            }
                            Ok::<_, Error>(got)
                        })
                        .unwrap();
                    for (d, choice) in got.into_iter().zip(&choices) {
                        let id = u32::from_le_bytes(d.message.payload[..].try_into().unwrap());
                        assert!(pending.contains(&id), "{ctx}: delivered {id}, settled");
                        if let Some(old) = leases.remove(&id) {
                            assert!(old.delivery_count < d.lease.delivery_count, "{ctx}");
                        }
                        match choice {
                            0 => {
                                assert!(pending.remove(&id), "{ctx}: acked {id} twice");
                                assert!(acked.insert(id));
                            }
                            1 => {}
                            _ => {
                                leases.insert(id, d.lease);
                            }
                        }
                    }
                }
                0..=2 => {
                    db.write(|txn| txn.enqueue("q", &Message::new(next.to_le_bytes().to_vec())))
                        .unwrap();
                    pending.insert(next);
                    next += 1;
                }
                3..=4 => {
                    let got = db
                        .write(|txn| txn.receive("q", 1 + rng.below(3) as usize))
                        .unwrap();
                    for d in got {
                        let id = u32::from_le_bytes(d.message.payload[..].try_into().unwrap());
                        assert!(
                            pending.contains(&id),
                            "{ctx}: delivered {id} which is settled"
                        );
                        // Held by one consumer at a time: a lease we still hold on this
                        // message must have gone stale before it could be handed out again.
                        if let Some(old) = leases.get(&id) {
                            assert!(old.delivery_count < d.lease.delivery_count, "{ctx}");
                            let stale = db.write(|txn| txn.ack(old)).unwrap_err();
                            assert!(matches!(stale, Error::StaleLease { .. }), "{ctx}: {stale}");
                        }
                        leases.insert(id, d.lease);
                    }
                }
                5..=6 => {
                    if let Some((&id, lease)) = leases
                        .iter()
                        .nth(rng.below(leases.len() as u64 + 1) as usize)
                    {
                        match db.write(|txn| txn.ack(lease)) {
                            Ok(()) => {
                                assert!(pending.remove(&id), "{ctx}: acked {id} twice");
                                assert!(acked.insert(id));
                            }
                            Err(Error::StaleLease { .. }) => {}
                            Err(e) => panic!("{ctx}: {e}"),
                        }
                        leases.remove(&id);
                    }
                }
                7 => {
                    if let Some((&id, lease)) = leases.iter().next() {
                        let action = [Nack::Requeue, Nack::RequeueAfter(500), Nack::DeadLetter]
                            [rng.below(3) as usize];
                        match db.write(|txn| txn.nack(lease, action)) {
                            Ok(()) | Err(Error::StaleLease { .. }) => {}
                            Err(e) => panic!("{ctx}: {e}"),
                        }
                        leases.remove(&id);
                    }
                }
                8 => {
                    if let Some((_, lease)) = leases.iter().next() {
                        match db.write(|txn| txn.extend(lease, 1_000)) {
                            Ok(_) | Err(Error::StaleLease { .. }) => {}
                            Err(e) => panic!("{ctx}: {e}"),
                        }
                    }
                }
                9..=10 => clock.advance_ms(rng.below(1_500)),
                _ => {
                    drop(db);
                    db = open();
                }
            }
            // Drain the dead-letter queue into the model: dead messages leave `pending`.
            for d in db.write(|txn| txn.receive("dlq", 100)).unwrap() {
                let id = u32::from_le_bytes(d.message.payload[..].try_into().unwrap());
                assert!(
                    pending.remove(&id),
                    "{ctx}: dead-lettered {id} which was settled"
                );
                db.write(|txn| txn.ack(&d.lease)).unwrap();
                leases.remove(&id);
            }
            let info = db.read(|r| r.queue_info("q")).unwrap();
            assert_eq!(info.depth(), pending.len() as u64, "{ctx}: depth");
        }
        // Drain: with time moving, everything is eventually acked or dead.
        for _ in 0..50 {
            clock.advance_ms(2_000);
            for d in db.write(|txn| txn.receive("q", 100)).unwrap() {
                let id = u32::from_le_bytes(d.message.payload[..].try_into().unwrap());
                db.write(|txn| txn.ack(&d.lease)).unwrap();
                assert!(pending.remove(&id));
                acked.insert(id);
            }
            for d in db.write(|txn| txn.receive("dlq", 100)).unwrap() {
                let id = u32::from_le_bytes(d.message.payload[..].try_into().unwrap());
                db.write(|txn| txn.ack(&d.lease)).unwrap();
                assert!(pending.remove(&id));
            }
        }
        assert!(pending.is_empty(), "seed {seed}: lost {pending:?}");
    }
}

#[test]
fn bad_queue_input_is_refused() {
    let db = Database::in_memory().unwrap();
    let errs = [
        db.write(|txn| txn.create_queue("bad name", QueueConfig::default()))
            .unwrap_err(),
        db.write(|txn| txn.create_queue("q", QueueConfig::default().lease_ms(0)))
            .unwrap_err(),
        db.write(|txn| txn.create_queue("q", QueueConfig::default().max_deliveries(0)))
            .unwrap_err(),
        db.write(|txn| txn.create_queue("q", QueueConfig::default().dead_letter("missing")))
            .unwrap_err(),
        db.write(|txn| txn.enqueue("missing", &Message::new("x")))
            .unwrap_err(),
    ];
    assert!(matches!(errs[0], Error::InvalidName { kind: "queue", .. }));
    assert!(matches!(
        errs[1],
        Error::LimitExceeded {
            limit: "lease length ms",
            ..
        }
    ));
    assert!(matches!(
        errs[2],
        Error::LimitExceeded {
            limit: "max deliveries",
            ..
        }
    ));
    assert!(matches!(errs[3], Error::UnknownQueue { .. }));
    assert!(matches!(errs[4], Error::UnknownQueue { .. }));
    assert!(db.read(|r| r.queues()).unwrap().is_empty());
    db.write(|txn| {
        txn.create_queue("dlq", QueueConfig::default())?;
        txn.create_queue("q", QueueConfig::default().dead_letter("dlq"))
    })
    .unwrap();
    let in_use = db.write(|txn| txn.delete_queue("dlq")).unwrap_err();
    assert!(matches!(in_use, Error::QueueInUse { .. }), "{in_use}");
    db.write(|txn| txn.delete_queue("q")).unwrap();
    db.write(|txn| txn.delete_queue("dlq")).unwrap();
}

#[test]
fn leases_granted_and_settled_in_one_transaction_behave_as_across_commits() {
    let (db, clock) = db_with_clock();
    queue(&db, "q", QueueConfig::default().lease_ms(30_000));
    for p in ["a", "b", "c", "d", "e", "f"] {
        enqueue(&db, "q", p);
    }
    let now = mqlite::Clock::now_ms(&clock);
    let kept = db
        .write(|txn| {
            let d = txn.receive("q", 5)?;
            assert_eq!(payloads(&d), ["a", "b", "c", "d", "e"]);
            assert_eq!(
                payloads(&txn.receive("q", 5)?),
                ["f"],
                "a second receive skips them"
            );
            let info = txn.queue_info("q")?;
            assert_eq!((info.ready, info.in_flight), (0, 6));
            txn.ack(&d[0].lease)?;
            txn.nack(&d[1].lease, Nack::Requeue)?;
            assert_eq!(txn.extend(&d[2].lease, 5_000)?, now + 5_000);
            let mut forged = d[4].lease.clone();
            forged.delivery_count += 1;
            let stale = txn.ack(&forged).unwrap_err();
            assert!(matches!(stale, Error::StaleLease { .. }), "{stale}");
            assert!(matches!(
                txn.ack_many(&[d[4].lease.clone(), d[4].lease.clone()]),
                Err(Error::StaleLease { .. })
            ));
            txn.ack(&d[4].lease)?;
            let again = txn.ack(&d[4].lease).unwrap_err();
            assert!(matches!(again, Error::StaleLease { .. }), "{again}");
            Ok::<_, Error>(d[3].lease.clone())
        })
        .unwrap();
    // a and e are gone; b is ready again; c, d (and f) are in flight with written leases.
    let info = db.read(|r| r.queue_info("q")).unwrap();
    assert_eq!((info.ready, info.in_flight, info.delayed), (1, 3, 0));
    let held = db.read(|r| r.browse_queue("q", 0, 10)).unwrap();
    let view: Vec<_> = held
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.message.payload.to_vec()).unwrap(),
                m.state,
                m.delivery_count,
                m.due_ms,
            )
        })
        .collect();
    assert_eq!(
        view,
        [
            ("b".to_owned(), mqlite::EntryState::Ready, 1, now),
            ("c".to_owned(), mqlite::EntryState::InFlight, 1, now + 5_000),
            (
                "d".to_owned(),
                mqlite::EntryState::InFlight,
                1,
                now + 30_000
            ),
            (
                "f".to_owned(),
                mqlite::EntryState::InFlight,
                1,
                now + 30_000
            ),
        ]
    );
    // The written leases expire on time and go stale on redelivery.
    clock.advance_ms(5_000);
    let c = db.write(|txn| txn.receive("q", 5)).unwrap();
    assert_eq!(payloads(&c), ["b", "c"]);
    assert_eq!(c[1].delivery_count, 2);
    db.write(|txn| txn.ack(&kept)).unwrap();
    clock.advance_ms(25_000);
    let f = db.write(|txn| txn.receive("q", 5)).unwrap();
    assert_eq!(payloads(&f), ["f"], "d was acked, f's lease ran out");

    // A transaction that fails leaves its leases unwritten and the messages ready.
    let before = db.read(|r| r.queue_info("q")).unwrap();
    let failed = db.write(|txn| {
        txn.receive("q", 10)?;
        Err::<(), _>(Error::Storage("changed my mind".into()))
    });
    assert!(failed.is_err());
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap(), before);

    // Deleting or purging a queue in the transaction that leased from it.
    enqueue(&db, "q", "g");
    db.write(|txn| {
        assert_eq!(txn.receive("q", 1)?.len(), 1);
        assert_eq!(txn.purge_queue("q")?, 0, "in-flight messages stay");
        txn.receive("q", 10)?;
        txn.delete_queue("q")
    })
    .unwrap();
    assert!(matches!(
        db.read(|r| r.queue_info("q")),
        Err(Error::UnknownQueue { .. })
    ));
}

#[test]
fn purge_takes_ready_and_delayed_messages_and_leaves_in_flight_ones() {
    let (db, clock) = db_with_clock();
    queue(&db, "q", QueueConfig::default());
    // Lane batches across several commits, a receive that moved the head inside one, a
    // priority, a delay, and leases both written and granted in the purging transaction.
    for round in 0..3 {
        db.write(|txn| {
            for i in 0..300 {
                txn.enqueue("q", &Message::new(format!("{round}-{i}")))?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
    }
    let leased = db.write(|txn| txn.receive("q", 150)).unwrap();
    db.write(|txn| {
        let urgent = EnqueueOptions {
            priority: 5,
            ..EnqueueOptions::default()
        };
        let later = EnqueueOptions {
            delay_ms: 60_000,
            ..EnqueueOptions::default()
        };
        txn.enqueue_with("q", &Message::new("urgent"), urgent)?;
        txn.enqueue_with("q", &Message::new("later"), later)
    })
    .unwrap();
    let purged = db
        .write(|txn| {
            let held = txn.receive("q", 10)?;
            assert_eq!(payloads(&held[..1]), ["urgent"]);
            txn.purge_queue("q")
        })
        .unwrap();
    // 900 + 2 enqueued, 150 + 10 in flight.
    assert_eq!(purged, 742);
    let info = db.read(|r| r.queue_info("q")).unwrap();
    assert_eq!((info.ready, info.delayed, info.in_flight), (0, 0, 160));
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
    // The queue goes on: new messages flow, and expired leases come back.
    enqueue(&db, "q", "after");
    db.write(|txn| txn.ack(&leased[0].lease)).unwrap();
    clock.advance_ms(60_000);
    let again = db.write(|txn| txn.receive("q", 1_000)).unwrap();
    assert_eq!(again.len(), 160);
    assert_eq!(again.iter().filter(|d| d.redelivered).count(), 159);
    assert!(payloads(&again).contains(&"after".to_owned()));
    assert!(db.verify(|_| {}).unwrap().problems.is_empty());
}

fn browse(db: &Database, q: &str) -> Vec<(String, mqlite::EntryState)> {
    db.read(|r| r.browse_queue(q, 0, 100))
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                String::from_utf8(m.message.payload.into_vec()).unwrap(),
                m.state,
            )
        })
        .collect()
}

fn verify_clean(db: &Database) {
    let report = db.verify(|_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Messages of the default priority without a delay live in the queue's FIFO lane (record
/// batches); the others in the ready index. Receive order, max length and counts must not
/// tell the two apart.
#[test]
fn the_fifo_lane_and_the_ready_index_keep_one_order() {
    use mqlite::EntryState::{InFlight, Ready};
    let (db, _) = db_with_clock();
    queue(&db, "dlq", QueueConfig::default());
    queue(
        &db,
        "q",
        QueueConfig::default()
            .max_length(4, Overflow::DropOldest)
            .dead_letter("dlq"),
    );
    // Six appends in one transaction: the two oldest make room while still unwritten.
    db.write(|txn| {
        for p in ["a", "b", "c", "d", "e", "f"] {
            txn.enqueue("q", &Message::new(p))?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    let ready = |names: &[&str]| -> Vec<(String, mqlite::EntryState)> {
        names.iter().map(|n| (n.to_string(), Ready)).collect()
    };
    assert_eq!(browse(&db, "q"), ready(&["c", "d", "e", "f"]));
    assert_eq!(browse(&db, "dlq"), ready(&["a", "b"]));
    // One more in its own transaction: the oldest written one makes room.
    enqueue(&db, "q", "g");
    assert_eq!(browse(&db, "q"), ready(&["d", "e", "f", "g"]));
    // A priority message goes first; making room for it drops the oldest in receive order.
    db.write(|txn| {
        txn.enqueue_with(
            "q",
            &Message::new("p"),
            EnqueueOptions {
                priority: 5,
                ..Default::default()
            },
        )
    })
    .unwrap();
    verify_clean(&db);
    let got = db.write(|txn| txn.receive("q", 2)).unwrap();
    assert_eq!(payloads(&got), ["p", "e"]);
    // A requeued message keeps its place: before the later ones still in the lane.
    db.write(|txn| txn.nack(&got[1].lease, Nack::Requeue))
        .unwrap();
    db.write(|txn| txn.ack(&got[0].lease)).unwrap();
    verify_clean(&db);
    let got = db.write(|txn| txn.receive("q", 10)).unwrap();
    assert_eq!(payloads(&got), ["e", "f", "g"]);
    assert_eq!(got[0].delivery_count, 2);
    assert_eq!(
        browse(&db, "q"),
        [
            ("e".to_owned(), InFlight),
            ("f".to_owned(), InFlight),
            ("g".to_owned(), InFlight)
        ]
    );
    verify_clean(&db);

    // Enqueue and receive in one transaction: the receive sees the unwritten appends.
    let got = db
        .write(|txn| {
            txn.enqueue("dlq", &Message::new("x"))?;
            txn.enqueue("dlq", &Message::new("y"))?;
            let got = txn.receive("dlq", 3)?;
            txn.ack(&got[0].lease)?;
            assert_eq!(txn.queue_info("dlq")?.in_flight, 2);
            Ok::<_, Error>(got)
        })
        .unwrap();
    // c and d made room for g and p.
    assert_eq!(payloads(&got), ["a", "b", "c"]);
    assert_eq!(
        browse(&db, "dlq"),
        [
            ("b".to_owned(), InFlight),
            ("c".to_owned(), InFlight),
            ("d".to_owned(), Ready),
            ("x".to_owned(), Ready),
            ("y".to_owned(), Ready)
        ]
    );
    verify_clean(&db);

    // Purge takes the lane and the delayed, not what is in flight.
    db.write(|txn| {
        txn.enqueue("dlq", &Message::new("z"))?;
        txn.enqueue_with(
            "dlq",
            &Message::new("later"),
            EnqueueOptions {
                delay_ms: 10,
                ..Default::default()
            },
        )
    })
    .unwrap();
    assert_eq!(db.write(|txn| txn.purge_queue("dlq")).unwrap(), 5);
    let info = db.read(|r| r.queue_info("dlq")).unwrap();
    assert_eq!((info.ready, info.delayed, info.in_flight), (0, 0, 2));
    verify_clean(&db);
}

/// Leases taken from the FIFO lane and kept past their transaction get entries of their own
/// at commit, whether they lie close together in the lane or far apart.
#[test]
fn lane_leases_kept_past_their_transaction_are_written_dense_or_sparse() {
    let (db, _) = db_with_clock();
    queue(&db, "q", QueueConfig::default());
    db.write(|txn| {
        txn.enqueue("q", &Message::new("a"))?;
        for _ in 0..300 {
            let later = EnqueueOptions {
                delay_ms: 60_000,
                ..Default::default()
            };
            txn.enqueue_with("q", &Message::new("later"), later)?;
        }
        txn.enqueue("q", &Message::new("b"))?;
        for i in 0..500 {
            txn.enqueue("q", &Message::new(format!("m{i}")))?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    // a and b lie 300 sequences apart; the 500 after b lie together.
    let sparse = db.write(|txn| txn.receive("q", 2)).unwrap();
    assert_eq!(payloads(&sparse), ["a", "b"]);
    let dense = db.write(|txn| txn.receive("q", 500)).unwrap();
    assert_eq!(dense.len(), 500);
    let held = db.read(|r| r.browse_queue("q", 0, 1_000)).unwrap();
    let in_flight = held
        .iter()
        .filter(|m| m.state == mqlite::EntryState::InFlight && m.delivery_count == 1)
        .count();
    assert_eq!(in_flight, 502);
    verify_clean(&db);
    let leases: Vec<_> = sparse
        .iter()
        .chain(&dense)
        .map(|d| d.lease.clone())
        .collect();
    db.write(|txn| txn.ack_many(&leases)).unwrap();
    let info = db.read(|r| r.queue_info("q")).unwrap();
    assert_eq!((info.ready, info.delayed, info.in_flight), (0, 300, 0));
    verify_clean(&db);
}

/// A file written by a build of format 1 (no FIFO lane) is read as it is, and upgraded by the
/// first writable open; its messages keep their order ahead of new ones.
#[test]
fn a_format_1_file_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.mqlite");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/format1.mqlite"),
        &path,
    )
    .unwrap();
    let old = Database::builder().open_read_only(&path).unwrap();
    let snapshot = old.begin_read().unwrap();
    assert_eq!(snapshot.format_version().unwrap(), 1);
    let held = snapshot.browse_queue("q", 0, 10).unwrap();
    drop(snapshot);
    assert_eq!(held.len(), 3);
    drop(old);
    let db = Database::open(&path).unwrap();
    assert_eq!(db.read(|r| r.format_version()).unwrap(), 3);
    verify_clean(&db);
    enqueue(&db, "q", "new");
    let got = db.write(|txn| txn.receive("q", 10)).unwrap();
    let sequences: Vec<u64> = got.iter().map(|d| d.lease.sequence).collect();
    assert_eq!(sequences, [0, 1, 2, 3]);
    assert_eq!(got[3].message.payload, b"new");
    let payloads_before: Vec<_> = held.iter().map(|m| m.message.payload.clone()).collect();
    let payloads_now: Vec<_> = got[..3].iter().map(|d| d.message.payload.clone()).collect();
    assert_eq!(payloads_now, payloads_before);
    drop(db);
    assert!(Database::open(&path).is_ok(), "the upgraded file reopens");
}

#[test]
fn ack_many_settles_a_batch_or_nothing_when_a_lease_is_stale() {
    let (db, _) = db_with_clock();
    queue(&db, "q", QueueConfig::default());
    for p in ["a", "b", "c"] {
        enqueue(&db, "q", p);
    }
    let d = db.write(|txn| txn.receive("q", 3)).unwrap();
    let mut leases: Vec<_> = d.iter().map(|d| d.lease.clone()).collect();
    leases.push(leases[0].clone());
    let err = db.write(|txn| txn.ack_many(&leases)).unwrap_err();
    assert!(
        matches!(err, Error::StaleLease { .. }),
        "a lease listed twice: {err}"
    );
    assert_eq!(
        db.read(|r| r.queue_info("q")).unwrap().in_flight,
        3,
        "nothing applied"
    );
    leases.pop();
    db.write(|txn| txn.ack_many(&leases)).unwrap();
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().depth(), 0);
}

#[test]
fn routing_follows_bind_unbind_and_queue_deletion() {
    use mqlite::{Binding, Message, QueueConfig, TopicConfig};
    let db = mqlite::Database::in_memory().unwrap();
    let ready = |q: &str| db.read(|r| r.queue_info(q)).map(|i| i.ready);
    db.write(|txn| {
        txn.create_topic("t", TopicConfig::default())?;
        txn.create_queue("a", QueueConfig::default())?;
        txn.create_queue("b", QueueConfig::default())?;
        txn.publish("t", &Message::new("before any binding"))
    })
    .unwrap();
    db.write(|txn| {
        txn.bind("t", "a", Binding::Fanout)?;
        txn.bind("t", "b", Binding::Fanout)?;
        txn.publish("t", &Message::new("to both"))
    })
    .unwrap();
    assert_eq!((ready("a").unwrap(), ready("b").unwrap()), (1, 1));
    db.write(|txn| txn.delete_queue("b")).unwrap();
    db.write(|txn| txn.publish("t", &Message::new("to a")))
        .unwrap();
    assert_eq!(ready("a").unwrap(), 2);
    db.write(|txn| txn.unbind("t", "a", &Binding::Fanout))
        .unwrap();
    db.write(|txn| txn.publish("t", &Message::new("to nobody")))
        .unwrap();
    assert_eq!(ready("a").unwrap(), 2);
    // A binding made and undone in a failed transaction leaves routing as it was.
    let failed = db.write(|txn| {
        txn.bind("t", "a", Binding::Fanout)?;
        txn.publish("nope", &Message::new("x"))
    });
    assert!(failed.is_err());
    db.write(|txn| txn.publish("t", &Message::new("still nobody")))
        .unwrap();
    assert_eq!(ready("a").unwrap(), 2);
    db.write(|txn| txn.bind("t", "a", Binding::key("k")))
        .unwrap();
    db.write(|txn| txn.publish("t", &Message::new("k").with_routing_key("k")))
        .unwrap();
    assert_eq!(ready("a").unwrap(), 3);
}

/// One-message durable commits that enqueue and consume in turn keep the file's size flat:
/// the pages each commit replaces are reused (a commit keeps the pages of the one before it
/// until the next one, so freeing lags by a commit, never more).
#[test]
fn a_long_durable_churn_reuses_the_pages_it_frees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("churn.mqlite");
    let db = Database::open(&path).unwrap();
    queue(&db, "q", QueueConfig::default());
    let size = || std::fs::metadata(&path).unwrap().len();
    let churn = |rounds: u32| {
        for i in 0..rounds {
            enqueue(&db, "q", &format!("m{i}"));
            db.write(|txn| {
                let d = txn.receive("q", 1)?;
                assert_eq!(d.len(), 1);
                txn.ack(&d[0].lease)
            })
            .unwrap();
        }
    };
    churn(500);
    let warm = size();
    churn(2_500);
    let after = size();
    assert!(
        after <= warm + (256 << 10),
        "the file grew from {warm} to {after} bytes over 5 000 commits of nothing kept"
    );
    assert_eq!(db.read(|r| r.queue_info("q")).unwrap().depth(), 0);
}
