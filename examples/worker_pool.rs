//! A worker pool with retries, exponential backoff and a dead-letter queue: four threads
//! receive from one queue; a job that fails is nacked with a growing delay; after five
//! deliveries it is dead-lettered with its history, then re-driven.
//!
//! Run: `cargo run --example worker_pool`

use std::time::Duration;

use mqlite::{Database, Error, Message, Nack, QueueConfig};

fn main() -> Result<(), Error> {
    let db = Database::in_memory()?;
    db.write(|txn| {
        txn.create_queue("jobs-dlq", QueueConfig::default())?;
        txn.create_queue(
            "jobs",
            QueueConfig::default()
                .lease_ms(5_000)
                .max_deliveries(5)
                .dead_letter("jobs-dlq"),
        )?;
        for i in 0..200u32 {
            txn.enqueue("jobs", &Message::new(i.to_le_bytes().to_vec()))?;
        }
        Ok::<_, Error>(())
    })?;

    let workers: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || -> Result<(u32, u32), Error> {
                let (mut done, mut retried) = (0, 0);
                loop {
                    let batch = db.receive("jobs", 10, Duration::from_millis(200))?;
                    if batch.is_empty() {
                        return Ok((done, retried));
                    }
                    for d in batch {
                        let job =
                            u32::from_le_bytes(d.message.payload[..4].try_into().unwrap_or([0; 4]));
                        // Every 50th job always fails: a poison message.
                        if job % 50 == 7 {
                            let backoff_ms = 1 << d.delivery_count.min(6); // 2, 4, 8 ... ms
                            db.write(|txn| txn.nack(&d.lease, Nack::RequeueAfter(backoff_ms)))?;
                            retried += 1;
                        } else {
                            db.write(|txn| txn.ack(&d.lease))?;
                            done += 1;
                        }
                    }
                }
            })
        })
        .collect();
    let (mut done, mut retried) = (0, 0);
    for w in workers {
        let (d, r) = w.join().expect("worker panicked")?;
        done += d;
        retried += r;
    }
    let dead = db.read(|r| r.queue_info("jobs-dlq"))?;
    println!(
        "processed {done}, retries {retried}, dead-lettered {}",
        dead.ready
    );
    let sample = db.write(|txn| txn.receive("jobs-dlq", 1))?;
    if let Some(d) = sample.first() {
        let death = &d.deaths[0];
        println!(
            "death: queue {} reason {} count {}",
            death.queue,
            death.reason.as_str(),
            death.count
        );
        db.write(|txn| txn.nack(&d.lease, Nack::Requeue))?;
    }
    let moved = db.write(|txn| txn.redrive("jobs-dlq", 100))?;
    println!("re-driven to jobs: {moved}");
    Ok(())
}
