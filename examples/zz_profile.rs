use mqlite::{Database, Message, QueueConfig, TopicConfig};
use std::time::{Duration, Instant};
fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    let dir = std::env::temp_dir().join("mqlite-prof");
    if what == "w5" || what == "w4" {
        let db = Database::open(dir.join("p.mqlite")).unwrap();
        return run(&db, &what);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let n = 200_000u64;
    let db = Database::builder()
        .durability(mqlite::Durability::Relaxed)
        .open(dir.join("p.mqlite"))
        .unwrap();
    let batch: Vec<Message> = (0..1000).map(|_| Message::new(vec![7u8; 100])).collect();
    db.write(|t| {
        t.create_topic("t", TopicConfig::default())?;
        t.create_queue("q", QueueConfig::default())
    })
    .unwrap();
    if what == "w2" {
        return w2(&dir);
    }
    if what == "w3" {
        let db2 = Database::open(dir.join("w3.mqlite")).unwrap();
        db2.write(|t| t.create_topic("t", TopicConfig::default()))
            .unwrap();
        let s = Instant::now();
        for _ in 0..2000 {
            db2.write(|t| t.publish_batch("t", &batch)).unwrap();
        }
        println!("w3 {:.0}/s", 2_000_000.0 / s.elapsed().as_secs_f64());
        return;
    }
    for _ in 0..n / 1000 {
        db.write(|t| {
            t.publish_batch("t", &batch)?;
            for m in &batch {
                t.enqueue("q", m)?;
            }
            Ok::<_, mqlite::Error>(())
        })
        .unwrap();
    }
    db.flush().unwrap();
}

fn run(db: &Database, what: &str) {
    if what == "w4" {
        for _ in 0..10 {
            let s = Instant::now();
            let mut c = db.consumer("t", "g", mqlite::StartAt::Earliest).unwrap();
            let mut read = 0;
            loop {
                let r = c.poll(1000, Duration::ZERO).unwrap();
                if r.is_empty() {
                    break;
                }
                read += r.len();
            }
            println!("w4 {:.0}/s", read as f64 / s.elapsed().as_secs_f64());
        }
        return;
    }
    let s = Instant::now();
    let mut done = 0;
    loop {
        let got = db
            .write_with(mqlite::Durability::Immediate, |t| {
                let d = t.receive("q", 1000)?;
                let l: Vec<_> = d.iter().map(|x| x.lease.clone()).collect();
                t.ack_many(&l)?;
                Ok::<_, mqlite::Error>(d.len())
            })
            .unwrap();
        if got == 0 {
            break;
        }
        done += got;
    }
    println!("w5 {:.0}/s", done as f64 / s.elapsed().as_secs_f64());
}

#[allow(dead_code)]
pub fn w2(dir: &std::path::Path) {
    let db = Database::open(dir.join("w2.mqlite")).unwrap();
    db.write(|t| t.create_topic("t", TopicConfig::default()))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = Instant::now();
    let hs: Vec<_> = (0..64)
        .map(|_| {
            let db = db.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    db.write(|t| t.publish("t", &Message::new(vec![7u8; 100])))
                        .unwrap();
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let m = db.metrics().unwrap();
    println!(
        "w2 {:.0}/s writes {} commits {} per commit {:.1}",
        m.commits.writes as f64 / s.elapsed().as_secs_f64(),
        m.commits.writes,
        m.commits.commits,
        m.commits.writes as f64 / m.commits.commits as f64
    );
}
