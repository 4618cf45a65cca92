//! Guards the RabbitMQ sink and source against the real server on 127.0.0.1:5672: 10,000
//! outbox messages accumulate while the server is unreachable and arrive in order once it is
//! back; an unroutable message is an error (mandatory publish); a relay killed after the
//! confirm re-sends, and the receiving dedup table (RabbitMQ has none) drops the duplicate;
//! the bridge, killed between its local commit and its ack and restarted, lands every message
//! exactly once. Needs `--features amqp`; fails loudly without a server.
#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::time::Duration;

use common::{
    DiesAfterConfirm, DiesBeforeAck, Gate, offline_backlog_then_drain, require_service,
    resend_after_confirm, unique,
};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use mqlite::{AmqpSink, AmqpSource, Bridge, BridgeTarget, Database, Message, Relay, TopicConfig};

const N: u32 = 10_000;
const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn declare(queue: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = lapin::Connection::connect(URI, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        conn.close(0, "done".into()).await.unwrap();
    });
}

#[test]
fn rabbitmq_backlog_drains_in_order_duplicates_are_dropped_and_the_bridge_lands_each_once() {
    require_service("RabbitMQ", 5672);
    let queue = unique("mqlite-");
    declare(&queue);
    let gate = Gate::new(5672);
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", gate.port);
    // The default exchange routes by queue name: the destination is the queue.
    let sink = DiesAfterConfirm::new(AmqpSink::new(uri, "").unwrap());
    let armed = sink.armed.clone();
    let (source, clock, mut relay) = offline_backlog_then_drain(sink, |up| gate.set(up), N, &queue);

    let total = resend_after_confirm(&source, &clock, &mut relay, &armed, &queue, N);

    let local = Database::in_memory().unwrap();
    local
        .write(|txn| txn.create_topic("inbox", TopicConfig::default()))
        .unwrap();
    let bridge_with = |armed| {
        Bridge::new(
            local.clone(),
            DiesBeforeAck {
                inner: AmqpSource::new(URI, &queue).unwrap(),
                armed,
            },
            BridgeTarget::Topic("inbox".into()),
            "rabbit",
        )
        .batch_size(400)
    };
    let mut bridge = bridge_with(false);
    let (mut killed, mut duplicates, mut rounds) = (false, 0, 0);
    while rounds < 2_000 {
        rounds += 1;
        let have = local.read(|r| r.topic_info("inbox")).unwrap().next_offset;
        if have == u64::from(total) && killed {
            break;
        }
        if rounds == 4 && !killed {
            bridge = bridge_with(true);
        }
        match bridge.run_once(Duration::from_millis(500)) {
            Ok(step) => duplicates += step.duplicates,
            Err(_) => {
                killed = true;
                drop(bridge); // the connection closes: RabbitMQ requeues the unacked batch
                bridge = bridge_with(false);
            }
        }
    }
    assert!(killed);
    assert!(
        duplicates >= 100,
        "the relay's re-send and the requeued batch were dropped: {duplicates}"
    );
    let records = local.read(|r| r.read_topic("inbox", 0, 20_000)).unwrap();
    assert_eq!(
        records.len() as u32,
        total,
        "every message once: 0 lost, 0 duplicate effects"
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.message.payload, (i as u32).to_le_bytes(), "in order");
    }
    println!(
        "amqp: sent {total}, bridged {} once, {duplicates} duplicates dropped",
        records.len()
    );
}

#[test]
fn an_unroutable_message_is_an_error_not_a_silent_loss() {
    require_service("RabbitMQ", 5672);
    let db = Database::in_memory().unwrap();
    db.write(|txn| txn.outbox_put(&unique("no-such-queue-"), &Message::new("x")))
        .unwrap();
    let mut relay = Relay::new(db.clone(), AmqpSink::new(URI, "").unwrap());
    let step = relay.run_once().unwrap();
    assert_eq!(step.sent, 0);
    assert!(step.failure.unwrap().contains("unroutable"));
    assert_eq!(db.read(|r| r.outbox_info()).unwrap().backlog, 1);
}
