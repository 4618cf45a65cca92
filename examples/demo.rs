//! The end-to-end demo. An "orders" service writes each order and its event into the outbox
//! in one commit; a relay ships the events to an "upstream" mqlite file (the embedded default:
//! local files only); there, a topic routes them to a work queue, and two idempotent consumers
//! process them (a shipping worker on the queue, an analytics group on the topic). To show the
//! dedup at work, the first 100 events are then delivered a second time, as a relay that
//! crashed after the confirm would. Prints a summary.
//!
//! ```text
//! cargo run --example demo                                    # local files only
//! cargo run --example demo --features nats -- --broker nats://127.0.0.1:4222
//! cargo run --example demo --features amqp -- --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//! With `--broker`, the relay publishes to the real broker and a bridge brings the events from
//! it into the upstream file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mqlite::redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use mqlite::{
    Binding, Database, Error, Message, MqliteSink, QueueConfig, Relay, StartAt, TopicConfig,
};

const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");
const SHIPPED: TableDefinition<u64, u64> = TableDefinition::new("shipped");
const REVENUE: TableDefinition<&str, u64> = TableDefinition::new("revenue");
const N: u64 = 5_000;

struct Args {
    dir: PathBuf,
    broker: Option<String>,
}

fn args() -> Args {
    let mut dir = std::env::temp_dir().join(format!("mqlite-demo-{}", std::process::id()));
    let mut broker = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--broker" => broker = it.next(),
            "--dir" => dir = it.next().map(PathBuf::from).unwrap_or(dir),
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    Args { dir, broker }
}

fn main() -> Result<(), Error> {
    let args = args();
    std::fs::create_dir_all(&args.dir)?;
    let (orders_path, upstream_path) = (
        args.dir.join("orders.mqlite"),
        args.dir.join("upstream.mqlite"),
    );
    for p in [&orders_path, &upstream_path] {
        let _ = std::fs::remove_file(p);
    }
    let orders = Database::open(&orders_path)?;
    let upstream = Database::open(&upstream_path)?;
    upstream.write(|txn| {
        txn.create_topic("orders", TopicConfig::default())?;
        txn.create_queue("shipping-dlq", QueueConfig::default())?;
        txn.create_queue(
            "shipping",
            QueueConfig::default().dead_letter("shipping-dlq"),
        )?;
        txn.bind("orders", "shipping", Binding::pattern("orders.created.#"))
    })?;

    // The orders service: the domain row and its event, one commit per batch of 100 orders.
    let started = Instant::now();
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        orders.write(|txn| {
            let mut table = txn.open_table(ORDERS)?;
            for &id in chunk {
                table.insert(id, "created")?;
                let region = if id % 2 == 0 { "eu" } else { "us" };
                let event = Message::json(
                    &serde_json::json!({ "order": id, "total": id % 90 + 10, "region": region }),
                )?
                .with_key(id.to_string());
                txn.outbox_put(&format!("orders.created.{region}"), &event)?;
            }
            Ok::<_, Error>(())
        })?;
    }
    let produced = started.elapsed();

    // The relay, on its own thread, to the embedded upstream or to a real broker.
    let bridge = match args.broker.as_deref() {
        None => {
            let relay =
                Relay::new(orders.clone(), MqliteSink::new(upstream.clone(), "orders")).spawn()?;
            wait_until(|| Ok(orders.read(|r| r.outbox_info())?.backlog == 0))?;
            let sent = relay.stats().sent;
            relay.stop();
            println!("relay: {sent} events to {}", upstream_path.display());
            None
        }
        Some(url) => Some(via_broker(url, &orders, &upstream)?),
    };
    drop(bridge);
    let relayed = started.elapsed();

    // Show the dedup at work: deliver the first 100 events a second time.
    let replay: Vec<Message> = upstream
        .read(|r| r.read_topic("orders", 0, 100))?
        .into_iter()
        .map(|r| r.message)
        .collect();
    let mut sink = MqliteSink::new(upstream.clone(), "orders");
    let replayed: Vec<_> = replay
        .into_iter()
        .enumerate()
        .map(|(i, message)| mqlite::OutboxMessage {
            sequence: i as u64,
            destination: message.routing_key.clone(),
            message,
            attempts: 0,
            last_error: String::new(),
            next_attempt_ms: 0,
        })
        .collect();
    let before = upstream.read(|r| r.topic_info("orders"))?.len();
    mqlite::Sink::publish(&mut sink, &replayed).map_err(|e| Error::Storage(e.to_string()))?;
    let dropped_upstream =
        replayed.len() as u64 - (upstream.read(|r| r.topic_info("orders"))?.len() - before);

    // Idempotent consumers upstream: effect + dedup mark + ack (or offset) in one commit.
    let mut shipping = mqlite::ProcessReport::default();
    loop {
        let r = upstream.process_queue("shipping", 500, Duration::from_millis(20), |txn, d| {
            let order: serde_json::Value = d.message.json_payload()?;
            txn.open_table(SHIPPED)?
                .insert(order["order"].as_u64().unwrap_or(0), txn.now_ms())?;
            Ok::<_, Error>(())
        })?;
        if r.handled + r.duplicates == 0 {
            break;
        }
        shipping.handled += r.handled;
        shipping.duplicates += r.duplicates;
    }
    let mut analytics = upstream.consumer("orders", "analytics", StartAt::Earliest)?;
    let mut stats = mqlite::ProcessReport::default();
    // Read half now, to show a group's lag.
    for _ in 0..(N / 2 / 500) {
        let r = analytics.process(500, Duration::ZERO, |txn, rec| {
            let order: serde_json::Value = rec.message.json_payload()?;
            let region = order["region"].as_str().unwrap_or("?").to_owned();
            let mut t = txn.open_table(REVENUE)?;
            let now = t.get(region.as_str())?.map_or(0, |v| v.value());
            t.insert(region.as_str(), now + order["total"].as_u64().unwrap_or(0))?;
            Ok::<_, Error>(())
        })?;
        stats.handled += r.handled;
        stats.duplicates += r.duplicates;
    }
    let total = started.elapsed();

    let (orders_rows, outbox) =
        orders.read(|r| Ok::<_, Error>((r.open_table(ORDERS)?.len()?, r.outbox_info()?)))?;
    let (received, shipped, lag, dedup) = upstream.read(|r| {
        Ok::<_, Error>((
            r.topic_info("orders")?.len(),
            r.open_table(SHIPPED)?.len()?,
            r.group_info("orders", "analytics")?.lag,
            r.queue_info("shipping")?,
        ))
    })?;
    println!(
        "mqlite demo ({})",
        args.broker
            .as_deref()
            .unwrap_or("embedded: local files only")
    );
    println!(
        "  orders written with their outbox events:   {orders_rows} ({:.0} orders/s, durable)",
        N as f64 / produced.as_secs_f64()
    );
    println!(
        "  sent by the relay, outbox backlog now:     {N}, {}",
        outbox.backlog
    );
    println!(
        "  received upstream (each id once):          {received} ({:.0} events/s end to end)",
        N as f64 / relayed.as_secs_f64()
    );
    println!(
        "  replayed to show dedup: 100, dropped by the upstream dedup table: {dropped_upstream}"
    );
    println!(
        "  shipping worker: handled {}, duplicates dropped {}, shipped rows {shipped}, queue depth {}",
        shipping.handled,
        shipping.duplicates,
        dedup.depth()
    );
    println!("  analytics group: handled {}, lag {lag}", stats.handled);
    println!("  total time: {:.2} s", total.as_secs_f64());
    assert_eq!(received, N, "every event once (received {received})");
    assert_eq!(shipped, N, "one effect per order");
    assert_eq!(
        shipping.duplicates, 0,
        "the replay was dropped at the upstream dedup before routing"
    );
    drop((orders, upstream));
    std::fs::remove_dir_all(&args.dir).ok();
    Ok(())
}

fn wait_until(mut done: impl FnMut() -> Result<bool, Error>) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done()? {
        if Instant::now() > deadline {
            return Err(Error::Storage("timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Relays to a real broker and bridges the events from it into the upstream file. The bridge
/// records ids in the dedup scope `relay`, the one the embedded sink uses, so a replay is
/// dropped at the upstream topic either way.
#[allow(
    unused_variables,
    reason = "without broker features every branch is an error"
)]
fn via_broker(
    url: &str,
    orders: &Database,
    upstream: &Database,
) -> Result<mqlite::BridgeHandle, Error> {
    let unsupported = || {
        Error::InvalidConfig(format!(
            "{url}: build the demo with --features nats or amqp"
        ))
    };
    let target = mqlite::BridgeTarget::Topic("orders".into());
    if url.starts_with("nats://") {
        #[cfg(feature = "nats")]
        {
            // A fresh stream each run: the demo owns it.
            let stream = "MQLITE_DEMO";
            let mut sink = mqlite::NatsSink::new(url).map_err(|e| Error::Storage(e.to_string()))?;
            sink.delete_stream(stream)
                .map_err(|e| Error::Storage(e.to_string()))?;
            sink.ensure_stream(stream, &["orders.>"])
                .map_err(|e| Error::Storage(e.to_string()))?;
            let source = mqlite::NatsSource::new(url, stream, "demo", "")
                .map_err(|e| Error::Storage(e.to_string()))?;
            let bridge = mqlite::Bridge::new(upstream.clone(), source, target, "relay").spawn()?;
            let relay = Relay::new(orders.clone(), sink).spawn()?;
            wait_until(|| Ok(upstream.read(|r| r.topic_info("orders"))?.len() >= N))?;
            println!(
                "relay: {} events through NATS JetStream stream {stream}",
                relay.stats().sent
            );
            return Ok(bridge);
        }
    }
    if url.starts_with("amqp://") {
        #[cfg(feature = "amqp")]
        {
            let queue = format!("mqlite-demo-{}", std::process::id());
            let mut source =
                mqlite::AmqpSource::new(url, &queue).map_err(|e| Error::Storage(e.to_string()))?;
            source
                .declare("amq.topic", "orders.#")
                .map_err(|e| Error::Storage(e.to_string()))?;
            let sink = mqlite::AmqpSink::new(url, "amq.topic")
                .map_err(|e| Error::Storage(e.to_string()))?;
            let bridge = mqlite::Bridge::new(upstream.clone(), source, target, "relay").spawn()?;
            let relay = Relay::new(orders.clone(), sink).spawn()?;
            wait_until(|| Ok(upstream.read(|r| r.topic_info("orders"))?.len() >= N))?;
            println!(
                "relay: {} events through RabbitMQ exchange amq.topic",
                relay.stats().sent
            );
            return Ok(bridge);
        }
    }
    Err(unsupported())
}
