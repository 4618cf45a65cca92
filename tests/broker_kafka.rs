//! Guards the Kafka sink against librdkafka's in-process mock cluster (no Kafka broker runs on
//! these machines): 10,000 outbox messages accumulate while the broker is down and arrive in
//! order once it is up; a relay killed after the delivery report re-sends, and an idempotent
//! consumer (dedup by the `mqlite-id` header) has exactly one effect per message. Needs
//! `--features kafka`.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

mod common;

use std::time::Duration;

use common::{DiesAfterConfirm, offline_backlog_then_drain, resend_after_confirm, unique};
use mqlite::{Database, Dedup, KafkaSink, Message, MessageId, TopicConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::mocking::MockCluster;

const N: u32 = 10_000;

#[test]
fn kafka_backlog_drains_in_order_and_the_consumer_has_one_effect_per_message() {
    let mock = MockCluster::new(1).unwrap();
    let topic = "mqlite.orders";
    mock.create_topic(topic, 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let options = [("message.timeout.ms", "300"), ("linger.ms", "1")];
    let sink = DiesAfterConfirm::new(KafkaSink::with_options(&bootstrap, &options).unwrap());
    let armed = sink.armed.clone();
    let reachable = |up: bool| {
        if up {
            mock.broker_up(1).unwrap()
        } else {
            mock.broker_down(1).unwrap()
        }
    };
    let (source, clock, mut relay) = offline_backlog_then_drain(sink, reachable, N, topic);
    let total = resend_after_confirm(&source, &clock, &mut relay, &armed, topic, N);

    // Read the topic back and apply each record idempotently.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("g"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let local = Database::in_memory().unwrap();
    local
        .write(|txn| txn.create_topic("effects", TopicConfig::default()))
        .unwrap();
    let (mut raw, mut idle) = (0u32, 0);
    while idle < 50 {
        let Some(record) = consumer.poll(Duration::from_millis(200)) else {
            idle += 1;
            continue;
        };
        let record = record.unwrap();
        idle = if raw + 1 >= total + 100 { 45 } else { 0 };
        raw += 1;
        let headers = record.headers().unwrap();
        let id = headers
            .iter()
            .find(|h| h.key == "mqlite-id")
            .and_then(|h| h.value)
            .unwrap();
        let id: MessageId = std::str::from_utf8(id).unwrap().parse().unwrap();
        let payload = record.payload().unwrap().to_vec();
        local
            .write(|txn| {
                if txn.dedup("kafka", id, 60_000)? == Dedup::New {
                    txn.publish("effects", &Message::new(payload.clone()).with_id(id))?;
                }
                Ok::<_, mqlite::Error>(())
            })
            .unwrap();
    }
    assert!(
        raw >= total + 100,
        "the re-sent batch reached Kafka as duplicates: {raw}"
    );
    let effects = local.read(|r| r.read_topic("effects", 0, 20_000)).unwrap();
    assert_eq!(effects.len() as u32, total, "one effect per message");
    for (i, r) in effects.iter().enumerate() {
        assert_eq!(r.message.payload, (i as u32).to_le_bytes(), "in order");
    }
    println!(
        "kafka (mock): sent {total}, {raw} records in Kafka, {} effects",
        effects.len()
    );
}
