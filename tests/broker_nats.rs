//! Guards the NATS JetStream sink and source against the real server on 127.0.0.1:4222:
//! 10,000 outbox messages accumulate while the server is unreachable and arrive in order once
//! it is back; a relay killed after the confirm re-sends and JetStream drops the duplicate
//! (`Nats-Msg-Id`); the bridge, killed between its local commit and its ack and restarted,
//! lands every message exactly once. Needs `--features nats`; fails loudly without a server.
#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::time::Duration;

use common::{
    DiesAfterConfirm, DiesBeforeAck, Gate, offline_backlog_then_drain, require_service,
    resend_after_confirm, unique,
};
use mqlite::{Bridge, BridgeTarget, Database, NatsSink, NatsSource, TopicConfig};

const N: u32 = 10_000;

#[test]
fn nats_backlog_drains_in_order_duplicates_are_dropped_and_the_bridge_lands_each_once() {
    require_service("NATS", 4222);
    let stream = unique("MQLITE");
    let subject = format!("mqlite.{stream}.orders");
    let mut admin = NatsSink::new("nats://127.0.0.1:4222").unwrap();
    admin
        .ensure_stream(&stream, &[&format!("mqlite.{stream}.>")])
        .unwrap();

    let gate = Gate::new(4222);
    let sink =
        DiesAfterConfirm::new(NatsSink::new(format!("nats://127.0.0.1:{}", gate.port)).unwrap());
    let armed = sink.armed.clone();
    let (source, clock, mut relay) =
        offline_backlog_then_drain(sink, |up| gate.set(up), N, &subject);

    // Killed between the broker's confirm and the mark-delivered commit: re-sent, deduplicated.
    let total = resend_after_confirm(&source, &clock, &mut relay, &armed, &subject, N);

    // Read the stream back through the bridge, killing it once between commit and ack.
    let local = Database::in_memory().unwrap();
    local
        .write(|txn| txn.create_topic("inbox", TopicConfig::default()))
        .unwrap();
    let durable = unique("bridge");
    let new_source = || {
        NatsSource::new("nats://127.0.0.1:4222", &stream, &durable, "")
            .unwrap()
            .ack_wait(Duration::from_secs(1))
    };
    let mut bridge = Bridge::new(
        local.clone(),
        DiesBeforeAck {
            inner: new_source(),
            armed: false,
        },
        BridgeTarget::Topic("inbox".into()),
        "nats",
    )
    .batch_size(500);
    let mut killed = false;
    let mut duplicates = 0;
    for round in 0..2_000 {
        if local.read(|r| r.topic_info("inbox")).unwrap().next_offset == u64::from(total) && killed
        {
            break;
        }
        if round == 3 && !killed {
            // Arm the kill: the next batch commits locally and is never acked.
            bridge = Bridge::new(
                local.clone(),
                DiesBeforeAck {
                    inner: new_source(),
                    armed: true,
                },
                BridgeTarget::Topic("inbox".into()),
                "nats",
            )
            .batch_size(500);
        }
        match bridge.run_once(Duration::from_millis(500)) {
            Ok(step) => duplicates += step.duplicates,
            Err(_) => {
                killed = true;
                // Restart: a fresh connection; the server redelivers what was not acked.
                bridge = Bridge::new(
                    local.clone(),
                    DiesBeforeAck {
                        inner: new_source(),
                        armed: false,
                    },
                    BridgeTarget::Topic("inbox".into()),
                    "nats",
                )
                .batch_size(500);
            }
        }
    }
    assert!(killed, "the bridge was killed once");
    assert!(
        duplicates > 0,
        "the redelivered batch was dropped as duplicates"
    );
    let records = local.read(|r| r.read_topic("inbox", 0, 20_000)).unwrap();
    assert_eq!(
        records.len() as u32,
        total,
        "every message once: 0 lost, 0 duplicated"
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.message.payload, (i as u32).to_le_bytes(), "in order");
        assert_eq!(r.message.routing_key, subject);
    }
    println!(
        "nats: sent {total}, bridged {} once, {duplicates} duplicates dropped",
        records.len()
    );
}
