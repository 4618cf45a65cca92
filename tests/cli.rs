//! The `mqlite` binary driven as a subprocess on real files: management, publish, tail,
//! receive / ack / nack, dead letters, the outbox, export / import, check, compact, exit codes,
//! help texts, and files held open by a running application in each concurrency mode.
#![cfg(feature = "cli")]
#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use mqlite::redb::ConcurrencyMode;
use mqlite::{
    Database, DeathReason, Message, MessageId, Nack, QueueConfig, Retention, TopicConfig,
};
use serde_json::Value;

const ENTRY: &str = "child";

fn mqlite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqlite"))
        .args(args)
        .output()
        .unwrap()
}

fn mqlite_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqlite"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The tool may refuse the input before reading it all: a broken pipe is its answer.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Runs a command that must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = mqlite(args);
    assert!(
        out.status.success(),
        "mqlite {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ok(&all)).unwrap()
}

fn json_lines(args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn code(args: &[&str]) -> i32 {
    mqlite(args).status.code().unwrap()
}

/// A file with a bit of everything: records, a group, queues with delayed, in-flight,
/// prioritised and dead-lettered messages, bindings, pending and parked outbox rows, dedup
/// entries, and bytes that are not UTF-8.
fn populate(db: &Database) {
    db.write(|txn| {
        txn.create_topic("events", TopicConfig::default())?;
        txn.create_topic(
            "short",
            TopicConfig::default().retention(Retention {
                max_messages: Some(3),
                ..Retention::default()
            }),
        )?;
        txn.create_queue("dead", QueueConfig::default())?;
        txn.create_queue(
            "jobs",
            QueueConfig::default()
                .dead_letter("dead")
                .message_ttl_ms(3_600_000),
        )?;
        txn.bind("events", "jobs", mqlite::Binding::pattern("orders.#"))?;
        txn.bind(
            "events",
            "dead",
            mqlite::Binding::Headers {
                mode: mqlite::HeaderMatch::Any,
                headers: vec![("x".into(), Some(vec![0xff])), ("y".into(), None)],
            },
        )?;
        for i in 0..300u32 {
            let m = Message::new(format!("order {i}"))
                .with_routing_key(if i % 2 == 0 { "orders.new" } else { "misc" })
                .with_key(vec![0xfe, i as u8])
                .with_header("h", vec![0x80, 1]);
            txn.publish("events", &m)?;
        }
        for i in 0..10u32 {
            txn.publish("short", &Message::new(vec![i as u8, 0xff]))?;
        }
        txn.commit_offset("events", "audit", 120)?;
        txn.enqueue_with(
            "jobs",
            &Message::new("later"),
            mqlite::EnqueueOptions {
                delay_ms: 60_000,
                priority: 3,
            },
        )?;
        txn.outbox_put("up.a", &Message::new("pending"))?;
        txn.outbox_put("up.b", &Message::new("parked"))?;
        txn.dedup("billing", MessageId(42), 3_600_000)?;
        Ok::<_, mqlite::Error>(())
    })
    .unwrap();
    db.write(|txn| {
        let d = txn.receive("jobs", 3)?;
        txn.nack(&d[0].lease, Nack::DeadLetter)?;
        txn.ack(&d[1].lease)?;
        // The second outbox row (sequence 1) failed for good.
        txn.outbox_failed(1, "broker down", 0, true)
    })
    .unwrap();
}

/// The child processes' entry point: an application holding the file open.
#[test]
fn child() {
    let Some((role, args)) = common::child_role() else {
        return;
    };
    let mode = match role.as_str() {
        "exclusive" => ConcurrencyMode::ExclusiveWriter,
        "single" => ConcurrencyMode::SingleWriter,
        "multi" => ConcurrencyMode::MultiWriter,
        other => panic!("unknown role {other}"),
    };
    let db = Database::builder()
        .concurrency(mode)
        .open(&args[0])
        .unwrap();
    db.write(|txn| {
        txn.create_topic("live", TopicConfig::default())?;
        txn.publish("live", &Message::new("before"))
    })
    .unwrap();
    println!("ready");
    // Publish once more when the parent asks, then hold the file until stdin closes.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    db.write(|txn| txn.publish("live", &Message::new("after")))
        .unwrap();
    println!("published");
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest).unwrap();
}

#[test]
fn manage_publish_tail_receive_and_settle() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("app.mqlite");
    let f = f.to_str().unwrap();
    json(&["topic", "create", f, "events", "--max-age-ms", "86400000"]);
    json(&["queue", "create", f, "jobs.dlq"]);
    json(&[
        "queue",
        "create",
        f,
        "jobs",
        "--dead-letter",
        "jobs.dlq",
        "--max-deliveries",
        "2",
        "--lease-ms",
        "60000",
    ]);
    json(&["bind", f, "events", "jobs", "orders.*.eu"]);
    let topics = json(&["topic", "list", f]);
    assert_eq!(topics[0]["name"], "events");
    assert_eq!(topics[0]["retention"]["max_age_ms"], 86_400_000);

    let p = json(&[
        "publish",
        f,
        "events",
        "first",
        "--routing-key",
        "orders.new.eu",
        "--header",
        "a=b",
        "--key",
        "k1",
    ]);
    assert_eq!(p["offset"], 0);
    let out = mqlite_stdin(
        &[
            "publish",
            f,
            "events",
            "--routing-key",
            "orders.new.us",
            "--json",
        ],
        b"from stdin",
    );
    assert!(out.status.success());
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, "from a file").unwrap();
    json(&[
        "publish",
        f,
        "events",
        "--file-payload",
        payload.to_str().unwrap(),
        "--routing-key",
        "orders.old.eu",
    ]);

    let records = json_lines(&["tail", f, "events"]);
    let payloads: Vec<&str> = records
        .iter()
        .map(|r| r["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["first", "from stdin", "from a file"]);
    assert_eq!(records[0]["headers"][0], serde_json::json!(["a", "b"]));
    assert_eq!(records[0]["key"], "k1");
    assert_eq!(json_lines(&["tail", f, "events", "--from", "2"]).len(), 1);
    assert_eq!(
        json_lines(&["tail", f, "events", "--from", "latest"]).len(),
        0
    );
    // As a group: reads, commits, and the next run starts after.
    assert_eq!(
        json_lines(&["tail", f, "events", "--group", "g", "--max", "2"]).len(),
        2
    );
    let rest = json_lines(&["tail", f, "events", "--group", "g"]);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["offset"], 2);

    let info = json(&["info", f]);
    assert_eq!(info["format_version"], 3);
    assert_eq!(info["topics"][0]["groups"][0]["lag"], 0);
    let jobs = info["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "jobs")
        .unwrap();
    assert_eq!(jobs["ready"], 2, "the .eu messages were routed");

    let got = json_lines(&["receive", f, "jobs", "--max", "2"]);
    assert_eq!(got.len(), 2);
    let first = got[0]["lease"].as_str().unwrap();
    let second = got[1]["lease"].as_str().unwrap();
    json(&["ack", f, first]);
    assert_eq!(code(&["ack", f, first]), 7, "a settled lease is stale");
    json(&["nack", f, second, "--dead-letter"]);
    let dead = json_lines(&["dlq", "list", f, "jobs.dlq"]);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["deaths"][0]["reason"], "rejected");
    assert_eq!(json(&["dlq", "redrive", f, "jobs.dlq"])["redriven"], 1);
    let again = json_lines(&["receive", f, "jobs"]);
    assert_eq!(again[0]["payload"], "from a file");
    json(&[
        "nack",
        f,
        again[0]["lease"].as_str().unwrap(),
        "--delay-ms",
        "60000",
    ]);
    let q = json(&["queue", "list", f]);
    let jobs = q
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "jobs")
        .unwrap();
    assert_eq!(jobs["delayed"], 1);

    // A headers binding: any of region=eu or a "vip" header at all.
    json(&["queue", "create", f, "vip"]);
    let any = ["--header", "region=eu", "--header", "vip", "--match", "any"];
    json(&[&["bind", f, "events", "vip"][..], &any[..]].concat());
    json(&["publish", f, "events", "x", "--header", "vip=1"]);
    json(&["publish", f, "events", "y", "--header", "region=us"]);
    let queues = json(&["queue", "list", f]);
    let vip = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "vip")
        .unwrap();
    assert_eq!(vip["ready"], 1);
    assert_eq!(
        json(&[&["unbind", f, "events", "vip"][..], &any[..]].concat())["changed"],
        true
    );
    json(&["unbind", f, "events", "jobs", "orders.*.eu"]);
    json(&["queue", "delete", f, "jobs"]);
    json(&["topic", "delete", f, "events"]);
    assert!(json(&["info", f])["topics"].as_array().unwrap().is_empty());
}

#[test]
fn outbox_list_and_redrive() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.mqlite");
    populate(&Database::open(&path).unwrap());
    let f = path.to_str().unwrap();
    let pending = json_lines(&["outbox", "list", f]);
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["destination"], "up.a");
    let parked = json_lines(&["outbox", "list", f, "--parked"]);
    assert_eq!(parked[0]["last_error"], "broker down");
    let info = json(&["info", f]);
    assert_eq!(info["outbox"]["backlog"], 1);
    assert_eq!(info["outbox"]["parked"], 1);
    assert_eq!(info["dedup_entries"], 1);
    assert_eq!(json(&["outbox", "redrive", f])["redriven"], 1);
    assert_eq!(json_lines(&["outbox", "list", f]).len(), 2);
}

#[test]
fn export_import_export_is_byte_identical() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.mqlite");
    populate(&Database::open(&a).unwrap());
    let dump1 = dir.path().join("1.jsonl");
    let report = json(&[
        "export",
        a.to_str().unwrap(),
        "--output",
        dump1.to_str().unwrap(),
    ]);
    assert_eq!(
        report["records"], 303,
        "300 records and the 3 the short topic keeps"
    );

    let b = dir.path().join("b.mqlite");
    let imported = json(&["import", b.to_str().unwrap(), dump1.to_str().unwrap()]);
    assert_eq!(imported["lines"], report["lines"]);
    let dump2 = ok(&["export", b.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&dump1).unwrap(), dump2);

    // The imported file behaves like the original: same state, same next steps.
    let copy = Database::open(&b).unwrap();
    let original = Database::open(&a).unwrap();
    for db in [&original, &copy] {
        let m = db.metrics().unwrap();
        assert_eq!(m.topics[0].groups[0].committed, 120);
        let jobs = m.queues.iter().find(|q| q.name == "jobs").unwrap();
        assert_eq!((jobs.ready, jobs.in_flight, jobs.delayed), (147, 1, 1));
        let dead = db.read(|r| r.browse_queue("dead", 0, 10)).unwrap();
        assert_eq!(dead[0].deaths[0].reason, DeathReason::Rejected);
        let next = db
            .write(|txn| txn.publish("events", &Message::new("next").with_routing_key("orders.x")))
            .unwrap();
        assert_eq!(next, 300);
        let seq = db
            .write(|txn| txn.outbox_put("up.c", &Message::new("c")))
            .unwrap();
        assert_eq!(seq, 2, "outbox sequences continue");
        let seen = db
            .write(|txn| txn.dedup("billing", MessageId(42), 1000))
            .unwrap();
        assert_eq!(seen, mqlite::Dedup::Seen);
        assert!(db.verify(|_| {}).unwrap().problems.is_empty());
    }

    // Into a file that is not empty: refused, nothing changes.
    drop((copy, original));
    let before = ok(&["export", b.to_str().unwrap()]);
    assert_eq!(
        code(&["import", b.to_str().unwrap(), dump1.to_str().unwrap()]),
        7
    );
    assert_eq!(ok(&["export", b.to_str().unwrap()]), before);

    // A truncated or damaged export: refused with the line, nothing imported.
    let text = std::fs::read_to_string(&dump1).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let c = dir.path().join("c.mqlite");
    let truncated = lines[..lines.len() - 1].join("\n");
    let out = mqlite_stdin(&["import", c.to_str().unwrap()], truncated.as_bytes());
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    let mut damaged: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    damaged[5] = damaged[5].replace("\"offset\":3", "\"offset\":9");
    let out = mqlite_stdin(
        &["import", c.to_str().unwrap()],
        damaged.join("\n").as_bytes(),
    );
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 6"));
    assert!(
        json(&["info", c.to_str().unwrap()])["topics"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn check_and_compact() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.mqlite");
    // A region of the test's own size, so that it knows where redb's pages start.
    let region = 1 << 20;
    {
        let db = Database::builder()
            .journal_size_bytes(region)
            .open(&path)
            .unwrap();
        populate(&db);
        db.write(|txn| {
            txn.create_topic("bulk", TopicConfig::default())?;
            for _ in 0..2000 {
                txn.publish("bulk", &Message::new(vec![7u8; 1000]))?;
            }
            Ok::<_, mqlite::Error>(())
        })
        .unwrap();
        db.write(|txn| txn.delete_topic("bulk")).unwrap();
    }
    let f = path.to_str().unwrap();
    let report = json(&["check", f]);
    assert_eq!(report["ok"], true);
    assert!(report["messages"].as_u64().unwrap() >= 300);
    let compacted = json(&["compact", f]);
    assert!(
        compacted["bytes_after"].as_u64().unwrap() < compacted["bytes_before"].as_u64().unwrap()
    );
    assert_eq!(json(&["check", f])["ok"], true);
    assert_eq!(json(&["info", f])["topics"][0]["next_offset"], 300);

    // Flip bytes in the middle of the file until the check notices: a clear failure, never a
    // silent pass with wrong data, never a crash.
    let bytes = std::fs::read(&path).unwrap();
    // redb's pages start after the journal's header slots and region (docs/format.md).
    assert!(bytes.starts_with(b"mqlite-journal"));
    let home = 8192 + region as usize;
    let mut caught = false;
    for at in (home + 4096..bytes.len()).step_by(997).take(40) {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x5a;
        std::fs::write(&path, &damaged).unwrap();
        let out = mqlite(&["check", f, "--json"]);
        let code = out.status.code().unwrap();
        assert!(matches!(code, 0 | 1 | 3 | 6), "check exited {code}");
        caught |= code != 0;
    }
    assert!(caught, "no damage was noticed");
}

#[test]
fn exit_codes_and_help() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("app.mqlite");
    let f = f.to_str().unwrap();
    assert_eq!(code(&["info", f]), 3, "no such file");
    std::fs::write(dir.path().join("junk"), b"not a database at all").unwrap();
    assert_eq!(
        code(&["info", dir.path().join("junk").to_str().unwrap()]),
        3
    );
    json(&["topic", "create", f, "events"]);
    assert_eq!(code(&["topic", "create", f, "events"]), 7, "exists");
    assert_eq!(code(&["topic", "create", f, "bad name!"]), 7);
    assert_eq!(code(&["publish", f, "nope", "x"]), 5);
    assert_eq!(code(&["receive", f, "nope"]), 5);
    assert_eq!(code(&["ack", f, "not-a-lease"]), 7);
    assert_eq!(code(&["frobnicate"]), 2);
    let out = mqlite(&["info", f, "--json"]);
    assert!(out.status.success());

    let top = ok(&["--help"]);
    assert!(top.contains("Example:") && top.contains("Exit codes"));
    let subcommands = [
        vec!["info"],
        vec!["topic"],
        vec!["topic", "create"],
        vec!["topic", "list"],
        vec!["topic", "delete"],
        vec!["queue"],
        vec!["queue", "create"],
        vec!["queue", "list"],
        vec!["queue", "delete"],
        vec!["bind"],
        vec!["unbind"],
        vec!["publish"],
        vec!["tail"],
        vec!["receive"],
        vec!["ack"],
        vec!["nack"],
        vec!["dlq"],
        vec!["dlq", "list"],
        vec!["dlq", "redrive"],
        vec!["outbox"],
        vec!["outbox", "list"],
        vec!["outbox", "redrive"],
        vec!["export"],
        vec!["import"],
        vec!["check"],
        vec!["compact"],
        vec!["bench"],
        vec!["demo"],
    ];
    for sub in subcommands {
        let mut args = sub.clone();
        args.push("--help");
        let help = ok(&args);
        assert!(
            help.contains("Example: mqlite"),
            "{sub:?} --help has no example"
        );
        assert!(
            help.lines().next().is_some_and(|l| !l.is_empty()),
            "{sub:?}: no summary"
        );
    }
}

#[test]
fn bench_and_demo_run() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let rows = json(&["bench", "--dir", d, "--messages", "5000"]);
    assert_eq!(rows.as_array().unwrap().len(), 4);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["value"].as_f64().unwrap() > 0.0)
    );
    let demo = json(&["demo", "--dir", d]);
    assert_eq!(demo["relayed"], 300);
    assert_eq!(
        demo["shipped"].as_u64().unwrap() + demo["dead_lettered"].as_u64().unwrap(),
        300
    );
}

/// Starts an application process holding `file` in `mode`; returns it once it is ready.
fn hold(
    file: &Path,
    mode: &str,
) -> (
    std::process::Child,
    impl Iterator<Item = std::io::Result<String>>,
) {
    let mut child = common::spawn_child(ENTRY, mode, &[file.to_str().unwrap()]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    common::read_until(&mut lines, "ready");
    (child, lines)
}

#[test]
fn live_file_held_by_an_application() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mode in ["single", "multi"] {
        let path = dir.path().join(format!("{mode}.mqlite"));
        let f = path.to_str().unwrap();
        let (mut app, mut lines) = hold(&path, mode);
        // info and tail read the live file and see the application's commits.
        assert_eq!(json(&["info", f])["topics"][0]["messages"], 1);
        assert_eq!(json_lines(&["tail", f, "live"]).len(), 1);
        app.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        common::read_until(&mut lines, "published");
        let records = json_lines(&["tail", f, "live"]);
        assert_eq!(records.len(), 2, "{mode}: the new commit is visible");
        assert_eq!(records[1]["payload"], "after");
        // Writing alongside the application needs MultiWriter.
        let publish = code(&["publish", f, "live", "from the cli"]);
        if mode == "multi" {
            assert_eq!(publish, 0);
            assert_eq!(json_lines(&["tail", f, "live"]).len(), 3);
        } else {
            assert_eq!(
                publish, 4,
                "a second writer is refused next to a SingleWriter app"
            );
        }
        drop(app.stdin.take());
        assert!(app.wait().unwrap().success());
    }

    // The default ExclusiveWriter mode keeps everyone out, with a clear error.
    let path = dir.path().join("exclusive.mqlite");
    let f = path.to_str().unwrap();
    let (mut app, _lines) = hold(&path, "exclusive");
    let out = mqlite(&["info", f]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SingleWriter"));
    drop(app.stdin.take());
    assert!(app.wait().unwrap().success());
}

#[test]
fn tail_follow_sees_new_messages() {
    if common::child_role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.mqlite");
    let f = path.to_str().unwrap();
    json(&["topic", "create", f, "events"]);
    json(&["publish", f, "events", "old"]);
    // Follow from the end, as a reader next to a MultiWriter application that publishes.
    let (mut app, mut lines) = hold(&path, "multi");
    let follower = Command::new(env!("CARGO_BIN_EXE_mqlite"))
        .args([
            "tail", f, "live", "--from", "latest", "--follow", "--max", "1", "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    app.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    common::read_until(&mut lines, "published");
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success());
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["payload"], "after");
    drop(app.stdin.take());
    assert!(app.wait().unwrap().success());
}
