//! Guards the MQTT sink and source against the real Mosquitto on 127.0.0.1:1883 (MQTT 5, QoS
//! 1): 10,000 outbox messages accumulate while the broker is unreachable and arrive in order
//! once it is back; a relay killed after the PUBACK re-sends, and the receiving dedup table
//! (MQTT brokers have none) drops the duplicate; the bridge, killed between its local commit
//! and its ack and restarted on the same persistent session, lands every message exactly once.
//! Needs `--features mqtt`; fails loudly without a broker.
#![cfg(feature = "mqtt")]
#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::time::Duration;

use common::{
    DiesAfterConfirm, DiesBeforeAck, Gate, drain, offline_backlog_then_drain_paced,
    require_service, resend_after_confirm, unique,
};
use mqlite::{Bridge, BridgeTarget, Database, MqttSink, MqttSource, TopicConfig};

const N: u32 = 10_000;

#[test]
fn mqtt_backlog_drains_in_order_duplicates_are_dropped_and_the_bridge_lands_each_once() {
    require_service("Mosquitto", 1883);
    let name = unique("t");
    let destination = format!("mqlite.{name}.orders");
    let local = Database::in_memory().unwrap();
    local
        .write(|txn| txn.create_topic("inbox", TopicConfig::default()))
        .unwrap();
    let client_id = unique("bridge");
    let source = |armed| DiesBeforeAck {
        inner: MqttSource::new("127.0.0.1", 1883, &client_id, &format!("mqlite/{name}/#")).unwrap(),
        armed,
    };
    let bridge_with = |armed| {
        Bridge::new(
            local.clone(),
            source(armed),
            BridgeTarget::Topic("inbox".into()),
            "mqtt",
        )
        .batch_size(1_000)
    };
    // Subscribe first (a persistent session), so the broker keeps what arrives meanwhile; the
    // bridge runs beside the relay, as in production, so the broker's queue stays short.
    let mut first = bridge_with(false);
    first.run_once(Duration::from_millis(200)).unwrap();
    let running = first.spawn().unwrap();

    let gate = Gate::new(1883);
    let sink =
        DiesAfterConfirm::new(MqttSink::new("127.0.0.1", gate.port, &unique("relay")).unwrap());
    let armed = sink.armed.clone();
    // Mosquitto queues at most 1000 messages per subscriber beyond its 20 in flight and drops
    // the rest (its max_queued_messages default): keep the relay within 500 of the bridge.
    let inbox_len = || local.read(|r| r.topic_info("inbox")).unwrap().next_offset;
    let (db, clock, mut relay) = offline_backlog_then_drain_paced(
        sink,
        |up| gate.set(up),
        N,
        &destination,
        |sent| {
            for _ in 0..600 {
                if inbox_len() + 500 >= sent {
                    return;
                }
                local.wait_for_commit(local.commit_generation(), Duration::from_millis(100));
            }
            panic!("the bridge fell behind: {} of {sent}", inbox_len());
        },
    );
    let total = u64::from(resend_after_confirm(
        &db,
        &clock,
        &mut relay,
        &armed,
        &destination,
        N,
    ));

    // Let the running bridge take part of the stream, then kill one between commit and ack.
    let wait_for = |count: u64| {
        for _ in 0..600 {
            if local.read(|r| r.topic_info("inbox")).unwrap().next_offset >= count {
                return true;
            }
            local.wait_for_commit(local.commit_generation(), Duration::from_millis(100));
        }
        false
    };
    // Wait for the first copies and for the relay's re-sent 100, which the bridge drops.
    for _ in 0..600 {
        if running.stats().duplicates >= 100 {
            break;
        }
        local.wait_for_commit(local.commit_generation(), Duration::from_millis(100));
    }
    assert!(
        wait_for(total),
        "the bridge received {} of {total}; bridge {:?}",
        local.read(|r| r.topic_info("inbox")).unwrap().next_offset,
        running.stats()
    );
    let stats = running.stats();
    running.stop();
    // Re-publish the last 300 (as a relay re-send would) and kill the bridge before its ack:
    // the broker redelivers them to the restarted session, and dedup drops every one.
    let (db2, clock2) = (Database::in_memory().unwrap(), mqlite::ManualClock::new(0));
    let records = local
        .read(|r| r.read_topic("inbox", total - 300, 300))
        .unwrap();
    db2.write(|txn| {
        for r in &records {
            txn.outbox_put(&destination, &r.message)?;
        }
        Ok::<_, mqlite::Error>(())
    })
    .unwrap();
    let mut resend = mqlite::Relay::new(
        db2.clone(),
        MqttSink::new("127.0.0.1", 1883, &unique("resend")).unwrap(),
    );
    drain(&db2, &clock2, &mut resend);
    let mut killed = bridge_with(true);
    assert!(
        killed.run_once(Duration::from_secs(5)).is_err(),
        "killed before the ack"
    );
    drop(killed);
    let mut restarted = bridge_with(false);
    let mut duplicates = 0;
    for _ in 0..50 {
        let step = restarted.run_once(Duration::from_millis(300)).unwrap();
        duplicates += step.duplicates;
        if step.written + step.duplicates == 0 && duplicates > 0 {
            break;
        }
    }
    assert!(
        duplicates > 0,
        "the unacked batch came back and was dropped"
    );
    let records = local.read(|r| r.read_topic("inbox", 0, 20_000)).unwrap();
    assert_eq!(
        records.len() as u64,
        total,
        "every message once: 0 lost, 0 duplicate effects"
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.message.payload, (i as u32).to_le_bytes(), "in order");
        assert_eq!(r.message.routing_key, destination, "slashes back to dots");
    }
    println!(
        "mqtt: sent {total}, bridged {} once; dropped {} duplicates of the relay re-send, {duplicates} after the bridge kill",
        records.len(),
        stats.duplicates
    );
}
