//! The end-to-end demo on the embedded default (local files only): an "orders" service writes
//! each order into its own table and publishes the event in the same commit; two consumer
//! groups read the topic at their own pace; a work queue bound to the topic feeds a worker
//! that records its effect and acks in one commit. Prints a summary.
//!
//! Run: `cargo run --example demo` (optionally with a directory: `-- /tmp/demo`).

use std::time::{Duration, Instant};

use mqlite::redb::{ReadableTableMetadata, TableDefinition};
use mqlite::{Binding, Database, Error, Message, QueueConfig, StartAt, TopicConfig};

const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");
const SHIPPED: TableDefinition<u64, u64> = TableDefinition::new("shipped");

fn main() -> Result<(), Error> {
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("mqlite-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("orders.mqlite");
    let _ = std::fs::remove_file(&path);
    let db = Database::open(&path)?;
    db.write(|txn| {
        txn.create_topic("orders", TopicConfig::default())?;
        txn.create_queue("shipping-dlq", QueueConfig::default())?;
        txn.create_queue(
            "shipping",
            QueueConfig::default().dead_letter("shipping-dlq"),
        )?;
        txn.bind("orders", "shipping", Binding::pattern("order.created.#"))
    })?;

    // The service: one commit per order holds the domain row and its event.
    let n: u64 = 2_000;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        db.write(|txn| {
            let mut orders = txn.open_table(ORDERS)?;
            for &id in chunk {
                orders.insert(id, "created")?;
                let event = Message::json(&serde_json::json!({ "order": id, "total": id * 3 }))?
                    .with_key(id.to_string())
                    .with_routing_key(if id % 2 == 0 {
                        "order.created.eu"
                    } else {
                        "order.created.us"
                    });
                txn.publish("orders", &event)?;
            }
            Ok::<_, Error>(())
        })?;
    }
    let produce = started.elapsed();

    // Two groups read the same log independently.
    let mut audit = db.consumer("orders", "audit", StartAt::Earliest)?;
    let mut analytics = db.consumer("orders", "analytics", StartAt::Earliest)?;
    let mut audited = 0;
    loop {
        let records = audit.poll(500, Duration::ZERO)?;
        if records.is_empty() {
            break;
        }
        audited += records.len();
    }
    audit.commit()?;
    let first_half = analytics.poll(1_000, Duration::ZERO)?.len();
    analytics.commit()?;

    // The worker: receive, then (effect + ack) in one commit.
    let started = Instant::now();
    let mut shipped = 0;
    loop {
        let deliveries = db.receive("shipping", 200, Duration::from_millis(10))?;
        if deliveries.is_empty() {
            break;
        }
        db.write(|txn| {
            let mut table = txn.open_table(SHIPPED)?;
            for d in &deliveries {
                let order: serde_json::Value = d.message.json_payload()?;
                table.insert(order["order"].as_u64().unwrap_or(0), txn.now_ms())?;
                txn.ack(&d.lease)?;
            }
            Ok::<_, Error>(())
        })?;
        shipped += deliveries.len();
    }
    let consume = started.elapsed();

    let (orders, shipped_rows, lag, queue) = db.read(|r| {
        Ok::<_, Error>((
            r.open_table(ORDERS)?.len()?,
            r.open_table(SHIPPED)?.len()?,
            r.group_info("orders", "analytics")?.lag,
            r.queue_info("shipping")?,
        ))
    })?;
    println!("mqlite demo: {}", path.display());
    println!("  orders written with their events (one commit each batch): {orders}");
    println!(
        "  published: {n} in {:.0} ms ({:.0} msg/s, durable)",
        produce.as_secs_f64() * 1e3,
        n as f64 / produce.as_secs_f64()
    );
    println!("  group audit read: {audited}; group analytics read {first_half}, lag {lag}");
    println!(
        "  shipping queue: processed {shipped} ({shipped_rows} effects), depth {}, dead-lettered {}",
        queue.depth(),
        queue.dead_lettered
    );
    println!(
        "  consume + effect + ack: {:.0} msg/s",
        shipped as f64 / consume.as_secs_f64()
    );
    assert_eq!(orders, n);
    assert_eq!(shipped_rows, n);
    drop(db);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
