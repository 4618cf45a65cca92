//! An async worker under tokio: producers enqueue jobs with `write_async`, and a worker
//! consumes the queue as a `Stream` of deliveries, acknowledging each in an async write.
//!
//! ```text
//! cargo run --example async_consumer --features async
//! ```

use std::time::{Duration, Instant};

use mqlite::{Database, Error, Message, QueueConfig};

const JOBS: u64 = 2_000;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("mqlite-async-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = Database::open(dir.join("jobs.mqlite"))?;
    db.write(|txn| txn.ensure_queue("jobs", QueueConfig::default()))?;

    // Producers: four tasks, each enqueuing its share in async writes of 50 jobs.
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..4 {
        let db = db.clone();
        producers.push(tokio::spawn(async move {
            for chunk in 0..(JOBS / 4 / 50) {
                db.write_async(move |txn| {
                    for i in 0..50 {
                        txn.enqueue("jobs", &Message::new(format!("job {p}-{chunk}-{i}")))?;
                    }
                    Ok::<_, Error>(())
                })
                .await?;
            }
            Ok::<_, Error>(())
        }));
    }

    // The worker: take deliveries from the stream, ack them in batches.
    let mut deliveries = db.deliveries("jobs", 100)?;
    let mut done = 0;
    let mut leases = Vec::new();
    while done < JOBS {
        let next = tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await;
        let Ok(Some(delivery)) = next else {
            return Err(Error::InvalidConfig("the stream stalled".into()));
        };
        leases.push(delivery?.lease);
        done += 1;
        if leases.len() == 100 || done == JOBS {
            let batch = std::mem::take(&mut leases);
            db.write_async(move |txn| txn.ack_many(&batch)).await?;
        }
    }
    for p in producers {
        p.await.map_err(|e| Error::InvalidConfig(e.to_string()))??;
    }
    let left = db.read(|r| r.queue_info("jobs"))?.depth();
    println!(
        "processed {done} jobs in {:.0} ms under tokio; {left} left in the queue",
        start.elapsed().as_secs_f64() * 1000.0
    );
    drop(deliveries);
    drop(db);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
