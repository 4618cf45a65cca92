//! The `mqlite` command-line tool (feature `cli`): inspect, manage, feed and drain an mqlite
//! file. It uses only the public API. Every command takes `--json`; read-only commands work
//! on a file that a running application has open in a shared concurrency mode.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mqlite::redb::ConcurrencyMode;
use mqlite::{
    Binding, Database, Error, Lease, Message, Metrics, Nack, Overflow, QueueConfig,
    ReadOnlyDatabase, Retention, StartAt, TopicConfig,
};
use serde_json::{Value, json};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other error (I/O, storage)
  2  bad command line
  3  not an mqlite file, or from a newer mqlite
  4  the file is locked by another process in a conflicting mode
  5  no such topic, queue or group
  6  check found problems, or stored data is corrupted
  7  input refused (bad name, message too large, stale lease, bad import line)
  8  storage full
  70 internal error (a bug: please report it)";

/// Inspect, manage, feed and drain mqlite files.
#[derive(Parser)]
#[command(
    version,
    about = "Inspect, manage, feed and drain mqlite files",
    after_help = format!("Example: mqlite info app.mqlite --json\n\n{EXIT_CODES}")
)]
struct Cli {
    /// Print JSON (one document, or JSON lines for streams) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the format, topics, groups, queues, outbox and dedup table.
    #[command(after_help = "Example: mqlite info app.mqlite --json")]
    Info {
        /// The database file.
        file: PathBuf,
    },
    /// Create, list or delete topics.
    #[command(
        subcommand,
        after_help = "Example: mqlite topic create app.mqlite events --max-age-ms 86400000"
    )]
    Topic(TopicCommand),
    /// Create, list or delete queues.
    #[command(
        subcommand,
        after_help = "Example: mqlite queue create app.mqlite jobs --dead-letter jobs.dlq"
    )]
    Queue(QueueCommand),
    /// Route a topic's messages to a queue (a routing-key pattern by default).
    #[command(after_help = "Example: mqlite bind app.mqlite events eu-orders 'orders.*.eu'")]
    Bind(BindArgs),
    /// Remove a binding made by `bind`.
    #[command(after_help = "Example: mqlite unbind app.mqlite events eu-orders 'orders.*.eu'")]
    Unbind(BindArgs),
    /// Publish one message to a topic (payload from an argument, a file or stdin).
    #[command(
        after_help = "Example: mqlite publish app.mqlite events '{\"id\":7}' --routing-key orders.new.eu"
    )]
    Publish(PublishArgs),
    /// Print a topic's messages, from a position or as a consumer group; --follow waits for more.
    #[command(after_help = "Example: mqlite tail app.mqlite events --from earliest --follow")]
    Tail(TailArgs),
    /// Lease messages from a queue and print them with their lease tokens.
    #[command(after_help = "Example: mqlite receive app.mqlite jobs --max 10 --wait-ms 1000")]
    Receive {
        /// The database file.
        file: PathBuf,
        /// The queue.
        queue: String,
        /// Most messages to lease.
        #[arg(long, default_value_t = 1)]
        max: usize,
        /// How long to wait for a first message.
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
    },
    /// Acknowledge leased messages: they are done and removed.
    #[command(after_help = "Example: mqlite ack app.mqlite jobs:12:1 jobs:13:1")]
    Ack {
        /// The database file.
        file: PathBuf,
        /// Lease tokens printed by `receive` (QUEUE:SEQUENCE:DELIVERY).
        #[arg(required = true)]
        leases: Vec<String>,
    },
    /// Give leased messages back: requeue (the default), requeue after a delay, or dead-letter.
    #[command(after_help = "Example: mqlite nack app.mqlite jobs:12:1 --delay-ms 5000")]
    Nack {
        /// The database file.
        file: PathBuf,
        /// Lease tokens printed by `receive`.
        #[arg(required = true)]
        leases: Vec<String>,
        /// Requeue after this many milliseconds.
        #[arg(long, conflicts_with = "dead_letter")]
        delay_ms: Option<u64>,
        /// Dead-letter them (reason `rejected`).
        #[arg(long)]
        dead_letter: bool,
    },
    /// List a dead-letter queue, or re-drive its messages to the queues they died in.
    #[command(
        subcommand,
        after_help = "Example: mqlite dlq redrive app.mqlite jobs.dlq"
    )]
    Dlq(DlqCommand),
    /// List the outbox (pending or parked rows), or re-drive parked rows.
    #[command(
        subcommand,
        after_help = "Example: mqlite outbox list app.mqlite --parked"
    )]
    Outbox(OutboxCommand),
    /// Write every topic, queue, binding, outbox row and dedup entry as JSON lines.
    #[command(after_help = "Example: mqlite export app.mqlite --output app.jsonl")]
    Export {
        /// The database file.
        file: PathBuf,
        /// Where to write (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Restore an export into a new (or empty) file, all or nothing.
    #[command(after_help = "Example: mqlite import copy.mqlite app.jsonl")]
    Import {
        /// The database file (created when missing).
        file: PathBuf,
        /// The export to read (default: standard input).
        input: Option<PathBuf>,
    },
    /// Check a closed file: redb's integrity, then every record's checksum and every count.
    #[command(after_help = "Example: mqlite check app.mqlite")]
    Check {
        /// The database file.
        file: PathBuf,
    },
    /// Give a closed file's free space back to the file system.
    #[command(after_help = "Example: mqlite compact app.mqlite")]
    Compact {
        /// The database file.
        file: PathBuf,
    },
    /// A quick local benchmark on a scratch file: publish, read and queue rates.
    #[command(after_help = "Example: mqlite bench --messages 200000")]
    Bench {
        /// Directory for the scratch file (default: the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Messages for the batched workloads.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// The concurrency mode to measure: exclusive (the default), single or multi.
        #[arg(long, default_value = "exclusive")]
        concurrency: String,
    },
    /// Run a small end-to-end demo on scratch files: outbox, relay, routing, work queue.
    #[command(after_help = "Example: mqlite demo")]
    Demo {
        /// Directory for the demo files (default: a fresh temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    /// Create a topic.
    #[command(after_help = "Example: mqlite topic create app.mqlite events --max-messages 1000000")]
    Create {
        /// The database file (created when missing).
        file: PathBuf,
        /// The topic name.
        name: String,
        /// Drop messages older than this.
        #[arg(long)]
        max_age_ms: Option<u64>,
        /// Keep at most this many messages (0: keep none, only route).
        #[arg(long)]
        max_messages: Option<u64>,
        /// Keep at most this many bytes.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Drop messages once every consumer group has read them.
        #[arg(long)]
        until_consumed: bool,
    },
    /// List topics with their extent and groups.
    #[command(after_help = "Example: mqlite topic list app.mqlite")]
    List {
        /// The database file.
        file: PathBuf,
    },
    /// Delete a topic with its messages, groups and bindings.
    #[command(after_help = "Example: mqlite topic delete app.mqlite events")]
    Delete {
        /// The database file.
        file: PathBuf,
        /// The topic name.
        name: String,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Create a queue.
    #[command(
        after_help = "Example: mqlite queue create app.mqlite jobs --lease-ms 30000 --max-deliveries 5 --dead-letter jobs.dlq"
    )]
    Create {
        /// The database file (created when missing).
        file: PathBuf,
        /// The queue name.
        name: String,
        /// How long a receive leases a message.
        #[arg(long)]
        lease_ms: Option<u64>,
        /// Deliveries before a message is dead-lettered.
        #[arg(long)]
        max_deliveries: Option<u32>,
        /// The queue dead letters go to.
        #[arg(long)]
        dead_letter: Option<String>,
        /// Hold at most this many messages.
        #[arg(long)]
        max_length: Option<u64>,
        /// When full, refuse new messages instead of dead-lettering the oldest.
        #[arg(long, requires = "max_length")]
        reject_publish: bool,
        /// A message's time to live.
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    /// List queues with their depths.
    #[command(after_help = "Example: mqlite queue list app.mqlite --json")]
    List {
        /// The database file.
        file: PathBuf,
    },
    /// Delete a queue with its messages and bindings.
    #[command(after_help = "Example: mqlite queue delete app.mqlite jobs")]
    Delete {
        /// The database file.
        file: PathBuf,
        /// The queue name.
        name: String,
    },
}

#[derive(Args)]
struct BindArgs {
    /// The database file.
    file: PathBuf,
    /// The topic.
    topic: String,
    /// The queue.
    queue: String,
    /// A routing-key pattern of words, `*` and `#` (with --key: an exact routing key).
    pattern: Option<String>,
    /// Match the routing key exactly (a direct exchange).
    #[arg(long, conflicts_with = "fanout")]
    key: bool,
    /// Route every message (a fanout exchange); no pattern.
    #[arg(long)]
    fanout: bool,
    /// Match headers instead (a headers exchange): NAME=VALUE, or NAME for any value; repeat
    /// for more. No pattern.
    #[arg(long = "header", value_name = "NAME[=VALUE]", conflicts_with_all = ["key", "fanout"])]
    headers: Vec<String>,
    /// With --header: whether all the headers must match, or any one.
    #[arg(long = "match", value_name = "all|any", default_value = "all")]
    match_mode: String,
}

#[derive(Args)]
struct PublishArgs {
    /// The database file.
    file: PathBuf,
    /// The topic.
    topic: String,
    /// The payload; without it, --file or standard input.
    payload: Option<String>,
    /// Read the payload from this file.
    #[arg(long, conflicts_with = "payload")]
    file_payload: Option<PathBuf>,
    /// The message key.
    #[arg(long)]
    key: Option<String>,
    /// The routing key.
    #[arg(long)]
    routing_key: Option<String>,
    /// A header NAME=VALUE; repeat for more.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
}

#[derive(Args)]
struct TailArgs {
    /// The database file.
    file: PathBuf,
    /// The topic.
    topic: String,
    /// Where to start: earliest, latest, or an offset.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Read as this consumer group: start at its committed offset and commit what was printed.
    #[arg(long, conflicts_with = "from")]
    group: Option<String>,
    /// Keep waiting for new messages (until interrupted or --max).
    #[arg(long)]
    follow: bool,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<u64>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the messages a dead-letter queue holds, with their death history.
    #[command(after_help = "Example: mqlite dlq list app.mqlite jobs.dlq")]
    List {
        /// The database file.
        file: PathBuf,
        /// The dead-letter queue.
        queue: String,
        /// Most messages to list.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Move messages back to the queues they died in.
    #[command(after_help = "Example: mqlite dlq redrive app.mqlite jobs.dlq --max 1000")]
    Redrive {
        /// The database file.
        file: PathBuf,
        /// The dead-letter queue.
        queue: String,
        /// Most messages to move.
        #[arg(long, default_value_t = usize::MAX)]
        max: usize,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// List pending (or parked) outbox rows.
    #[command(after_help = "Example: mqlite outbox list app.mqlite --parked")]
    List {
        /// The database file.
        file: PathBuf,
        /// List parked rows instead of pending ones.
        #[arg(long)]
        parked: bool,
        /// Most rows to list.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Move parked rows back to the end of the outbox, to be relayed again.
    #[command(after_help = "Example: mqlite outbox redrive app.mqlite")]
    Redrive {
        /// The database file.
        file: PathBuf,
        /// Most rows to move.
        #[arg(long, default_value_t = usize::MAX)]
        max: usize,
    },
}

/// Where output goes: a table for people, or JSON.
struct Out {
    json: bool,
}

impl Out {
    /// Prints `value` as JSON, or `human` for people.
    fn emit(&self, value: &Value, human: impl FnOnce()) -> Result<(), Error> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human();
        }
        Ok(())
    }

    /// One line of a stream: a JSON line, or `human`.
    fn line(&self, value: &Value, human: impl FnOnce()) -> Result<(), Error> {
        if self.json {
            println!("{}", serde_json::to_string(value)?);
        } else {
            human();
        }
        Ok(())
    }
}

/// Where the last panic happened, for telling damaged data from a bug.
static PANIC_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out { json: cli.json };
    // redb panics on some damaged pages: report them as a damaged file (exit 6), anything else
    // as an internal error, in one line without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| l.file().to_owned())
            .unwrap_or_default();
        if let Ok(mut slot) = PANIC_AT.lock() {
            *slot = Some(at);
        }
    }));
    let result = std::panic::catch_unwind(|| run(cli.command, &out)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = PANIC_AT
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_default();
        if at.contains("redb") {
            Err(Error::Corrupted {
                location: format!("the storage engine failed on damaged pages ({message})"),
            })
        } else {
            eprintln!("mqlite: internal error at {at}: {message}");
            Ok(ExitCode::from(70))
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            if out.json {
                let err = json!({"error": e.to_string()});
                eprintln!("{err}");
            } else {
                eprintln!("mqlite: {e}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::NotMqliteFile { .. } | Error::FormatTooNew { .. } => 3,
        Error::AlreadyOpen { .. } => 4,
        Error::UnknownTopic { .. } | Error::UnknownQueue { .. } | Error::UnknownGroup { .. } => 5,
        Error::Corrupted { .. } => 6,
        Error::InvalidName { .. }
        | Error::InvalidRoutingKey { .. }
        | Error::MessageTooLarge { .. }
        | Error::LimitExceeded { .. }
        | Error::InvalidConfig(_)
        | Error::StaleLease { .. }
        | Error::QueueFull { .. }
        | Error::TopicExists { .. }
        | Error::QueueExists { .. }
        | Error::QueueInUse { .. }
        | Error::OffsetOutOfRange { .. }
        | Error::Import { .. }
        | Error::Json(_) => 7,
        Error::StorageFull => 8,
        _ => 1,
    }
}

fn run(command: Command, out: &Out) -> Result<ExitCode, Error> {
    match command {
        Command::Info { file } => info(&file, out)?,
        Command::Topic(c) => topic(c, out)?,
        Command::Queue(c) => queue(c, out)?,
        Command::Bind(a) => bind(a, true, out)?,
        Command::Unbind(a) => bind(a, false, out)?,
        Command::Publish(a) => publish(a, out)?,
        Command::Tail(a) => tail(a, out)?,
        Command::Receive {
            file,
            queue,
            max,
            wait_ms,
        } => receive(&file, &queue, max, wait_ms, out)?,
        Command::Ack { file, leases } => settle(&file, &leases, None, out)?,
        Command::Nack {
            file,
            leases,
            delay_ms,
            dead_letter,
        } => {
            let action = match (delay_ms, dead_letter) {
                (_, true) => Nack::DeadLetter,
                (Some(ms), false) => Nack::RequeueAfter(ms),
                (None, false) => Nack::Requeue,
            };
            settle(&file, &leases, Some(action), out)?;
        }
        Command::Dlq(c) => dlq(c, out)?,
        Command::Outbox(c) => outbox(c, out)?,
        Command::Export { file, output } => export(&file, output.as_deref(), out)?,
        Command::Import { file, input } => import(&file, input.as_deref(), out)?,
        Command::Check { file } => return check(&file, out),
        Command::Compact { file } => compact(&file, out)?,
        Command::Bench {
            dir,
            messages,
            concurrency,
        } => bench(dir, messages, &concurrency, out)?,
        Command::Demo { dir } => demo(dir, out)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a path that does not exist, so that a typo does not create a new file.
fn existing(file: &Path) -> Result<(), Error> {
    if file.exists() {
        Ok(())
    } else {
        Err(Error::NotMqliteFile {
            path: file.to_path_buf(),
            reason: "no such file".into(),
        })
    }
}

/// Opens for writing: alone when the file is free, else alongside applications that opened it
/// in the `MultiWriter` mode.
fn open_rw(file: &Path, create: bool) -> Result<Database, Error> {
    if !create {
        existing(file)?;
    }
    match Database::open(file) {
        Err(Error::AlreadyOpen { .. }) => Database::builder()
            .concurrency(ConcurrencyMode::MultiWriter)
            .open(file)
            .map_err(|e| match e {
                Error::AlreadyOpen { path } => {
                    eprintln!(
                        "mqlite: {} is open in another process; writing needs that process to use ConcurrencyMode::MultiWriter (read-only commands work with SingleWriter too)",
                        path.display()
                    );
                    Error::AlreadyOpen { path }
                }
                other => other,
            }),
        other => other,
    }
}

/// Opens read-only: works while an application writes the file in a shared mode.
fn open_ro(file: &Path) -> Result<ReadOnlyDatabase, Error> {
    existing(file)?;
    let mut last = None;
    for mode in [
        ConcurrencyMode::SingleWriter,
        ConcurrencyMode::MultiWriter,
        ConcurrencyMode::ExclusiveWriter,
    ] {
        match Database::builder().concurrency(mode).open_read_only(file) {
            Err(e @ Error::AlreadyOpen { .. }) => last = Some(e),
            Err(Error::Storage(_)) if mode != ConcurrencyMode::ExclusiveWriter => {}
            other => return other,
        }
    }
    let err = last.unwrap_or_else(|| Error::AlreadyOpen {
        path: file.to_path_buf(),
    });
    eprintln!(
        "mqlite: {} is held exclusively by another process; open it there with ConcurrencyMode::SingleWriter or MultiWriter to inspect it live",
        file.display()
    );
    Err(err)
}

fn age(now_ms: u64, then_ms: Option<u64>) -> String {
    match then_ms {
        Some(t) => format!("{:.1}s", now_ms.saturating_sub(t) as f64 / 1000.0),
        None => "-".into(),
    }
}

fn metrics_json(m: &Metrics) -> Value {
    let topics: Vec<Value> = m
        .topics
        .iter()
        .map(|t| {
            let r = t.info.config.retention;
            let groups: Vec<Value> = t
                .groups
                .iter()
                .map(|g| json!({"group": g.group, "committed": g.committed, "lag": g.lag}))
                .collect();
            json!({
                "name": t.info.name, "first_offset": t.info.first_offset,
                "next_offset": t.info.next_offset, "messages": t.info.len(),
                "stored_bytes": t.info.stored_bytes,
                "oldest_ms": t.oldest_ms, "newest_ms": t.newest_ms,
                "retention": {"max_age_ms": r.max_age_ms, "max_messages": r.max_messages,
                              "max_bytes": r.max_bytes, "until_consumed": r.until_consumed},
                "groups": groups,
            })
        })
        .collect();
    let queues: Vec<Value> = m
        .queues
        .iter()
        .map(|q| {
            json!({
                "name": q.name, "ready": q.ready, "in_flight": q.in_flight, "delayed": q.delayed,
                "dead_lettered": q.dead_lettered, "oldest_enqueued_ms": q.oldest_enqueued_ms,
                "oldest_age_ms": q.oldest_enqueued_ms.map(|t| m.at_ms.saturating_sub(t)),
                "lease_ms": q.config.lease_ms, "max_deliveries": q.config.max_deliveries,
                "dead_letter_queue": q.config.dead_letter,
            })
        })
        .collect();
    json!({
        "at_ms": m.at_ms,
        "topics": topics,
        "queues": queues,
        "outbox": {"backlog": m.outbox.backlog, "parked": m.outbox.parked,
                   "oldest_pending_ms": m.outbox.oldest_pending_ms,
                   "last_error": m.outbox.last_error},
        "dedup_entries": m.dedup_entries,
        "commits": {"commits": m.commits.commits, "writes": m.commits.writes,
                    "syncs": m.commits.syncs, "per_second": m.commits.commits_per_second},
    })
}

fn print_topics(m: &Metrics) {
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}  retention",
        "topic", "first", "next", "messages", "bytes", "oldest", "newest"
    );
    for t in &m.topics {
        let r = t.info.config.retention;
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}  {}",
            t.info.name,
            t.info.first_offset,
            t.info.next_offset,
            t.info.len(),
            t.info.stored_bytes,
            age(m.at_ms, t.oldest_ms),
            age(m.at_ms, t.newest_ms),
            retention_text(&r)
        );
        for g in &t.groups {
            println!(
                "  group {:<18} committed {:<10} lag {}",
                g.group, g.committed, g.lag
            );
        }
    }
}

fn retention_text(r: &Retention) -> String {
    let mut parts = Vec::new();
    if let Some(v) = r.max_age_ms {
        parts.push(format!("age {v} ms"));
    }
    if let Some(v) = r.max_messages {
        parts.push(format!("{v} messages"));
    }
    if let Some(v) = r.max_bytes {
        parts.push(format!("{v} bytes"));
    }
    if r.until_consumed {
        parts.push("until consumed".into());
    }
    if parts.is_empty() {
        "keep all".into()
    } else {
        parts.join(", ")
    }
}

fn print_queues(m: &Metrics) {
    println!(
        "{:<24} {:>8} {:>9} {:>8} {:>13} {:>10}  dead letters to",
        "queue", "ready", "in flight", "delayed", "dead-lettered", "oldest"
    );
    for q in &m.queues {
        println!(
            "{:<24} {:>8} {:>9} {:>8} {:>13} {:>10}  {}",
            q.name,
            q.ready,
            q.in_flight,
            q.delayed,
            q.dead_lettered,
            age(m.at_ms, q.oldest_enqueued_ms),
            q.config.dead_letter.as_deref().unwrap_or("-")
        );
    }
}

fn info(file: &Path, out: &Out) -> Result<(), Error> {
    let db = open_ro(file)?;
    let snapshot = db.begin_read()?;
    let m = snapshot.metrics(now_ms())?;
    let version = snapshot.format_version()?;
    let size = std::fs::metadata(file)?.len();
    let mut value = metrics_json(&m);
    value["file"] = json!(file);
    value["size_bytes"] = json!(size);
    value["format_version"] = json!(version);
    out.emit(&value, || {
        println!(
            "{} ({size} bytes, format version {version})\n",
            file.display()
        );
        print_topics(&m);
        println!();
        print_queues(&m);
        println!(
            "\noutbox: {} pending (oldest {}), {} parked{}",
            m.outbox.backlog,
            age(m.at_ms, m.outbox.oldest_pending_ms),
            m.outbox.parked,
            m.outbox
                .last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
        println!("dedup entries: {}", m.dedup_entries);
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn topic(command: TopicCommand, out: &Out) -> Result<(), Error> {
    match command {
        TopicCommand::Create {
            file,
            name,
            max_age_ms,
            max_messages,
            max_bytes,
            until_consumed,
        } => {
            let retention = Retention {
                max_age_ms,
                max_messages,
                max_bytes,
                until_consumed,
            };
            let db = open_rw(&file, true)?;
            db.write(|txn| txn.create_topic(&name, TopicConfig::default().retention(retention)))?;
            out.emit(&json!({"created": name}), || {
                println!("created topic {name}")
            })
        }
        TopicCommand::List { file } => {
            let m = open_ro(&file)?.begin_read()?.metrics(now_ms())?;
            out.emit(&metrics_json(&m)["topics"], || print_topics(&m))
        }
        TopicCommand::Delete { file, name } => {
            open_rw(&file, false)?.write(|txn| txn.delete_topic(&name))?;
            out.emit(&json!({"deleted": name}), || {
                println!("deleted topic {name}")
            })
        }
    }
}

fn queue(command: QueueCommand, out: &Out) -> Result<(), Error> {
    match command {
        QueueCommand::Create {
            file,
            name,
            lease_ms,
            max_deliveries,
            dead_letter,
            max_length,
            reject_publish,
            ttl_ms,
        } => {
            let mut config = QueueConfig::default();
            if let Some(ms) = lease_ms {
                config = config.lease_ms(ms);
            }
            if let Some(n) = max_deliveries {
                config = config.max_deliveries(n);
            }
            if let Some(q) = dead_letter {
                config = config.dead_letter(q);
            }
            if let Some(n) = max_length {
                let overflow = if reject_publish {
                    Overflow::RejectPublish
                } else {
                    Overflow::DropOldest
                };
                config = config.max_length(n, overflow);
            }
            if let Some(ms) = ttl_ms {
                config = config.message_ttl_ms(ms);
            }
            let db = open_rw(&file, true)?;
            db.write(|txn| txn.create_queue(&name, config.clone()))?;
            out.emit(&json!({"created": name}), || {
                println!("created queue {name}")
            })
        }
        QueueCommand::List { file } => {
            let m = open_ro(&file)?.begin_read()?.metrics(now_ms())?;
            out.emit(&metrics_json(&m)["queues"], || print_queues(&m))
        }
        QueueCommand::Delete { file, name } => {
            open_rw(&file, false)?.write(|txn| txn.delete_queue(&name))?;
            out.emit(&json!({"deleted": name}), || {
                println!("deleted queue {name}")
            })
        }
    }
}

fn bind(a: BindArgs, add: bool, out: &Out) -> Result<(), Error> {
    let rule = if a.headers.is_empty() {
        match (a.fanout, a.key, a.pattern) {
            (true, _, None) => Binding::Fanout,
            (true, _, Some(_)) => {
                return Err(Error::InvalidConfig("--fanout takes no pattern".into()));
            }
            (false, true, Some(k)) => Binding::Key(k),
            (false, false, Some(p)) => Binding::Pattern(p),
            (false, _, None) => {
                return Err(Error::InvalidConfig(
                    "give a pattern, --fanout or --header".into(),
                ));
            }
        }
    } else {
        if a.pattern.is_some() {
            return Err(Error::InvalidConfig("--header takes no pattern".into()));
        }
        let mode = match a.match_mode.as_str() {
            "all" => mqlite::HeaderMatch::All,
            "any" => mqlite::HeaderMatch::Any,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "--match {other:?}: not all or any"
                )));
            }
        };
        let headers = a
            .headers
            .iter()
            .map(|h| match h.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.as_bytes().to_vec())),
                None => (h.clone(), None),
            })
            .collect();
        Binding::Headers { mode, headers }
    };
    let db = open_rw(&a.file, false)?;
    let changed = db.write(|txn| {
        if add {
            txn.bind(&a.topic, &a.queue, rule.clone()).map(|()| true)
        } else {
            txn.unbind(&a.topic, &a.queue, &rule)
        }
    })?;
    let verb = if add { "bound" } else { "unbound" };
    out.emit(
        &json!({verb: {"topic": a.topic, "queue": a.queue, "rule": format!("{rule:?}")}, "changed": changed}),
        || {
            if changed {
                println!("{verb} {} -> {} ({rule:?})", a.topic, a.queue);
            } else {
                println!("no such binding");
            }
        },
    )
}

fn publish(a: PublishArgs, out: &Out) -> Result<(), Error> {
    let payload = match (a.payload, a.file_payload) {
        (Some(p), _) => p.into_bytes(),
        (None, Some(path)) => std::fs::read(path)?,
        (None, None) => {
            let mut buf = Vec::new();
            io::stdin().read_to_end(&mut buf)?;
            buf
        }
    };
    let mut message = Message::new(payload);
    if let Some(k) = a.key {
        message = message.with_key(k);
    }
    if let Some(r) = a.routing_key {
        message = message.with_routing_key(r);
    }
    for h in &a.headers {
        let (name, value) = h
            .split_once('=')
            .ok_or_else(|| Error::InvalidConfig(format!("header {h:?} is not NAME=VALUE")))?;
        message = message.with_header(name, value);
    }
    let db = open_rw(&a.file, false)?;
    let offset = db.write(|txn| txn.publish(&a.topic, &message))?;
    out.emit(
        &json!({"topic": a.topic, "offset": offset, "id": message.id.to_string()}),
        || println!("published to {} at offset {offset}", a.topic),
    )
}

fn record_line(out: &Out, topic: &str, offset: u64, message: &Message) -> Result<(), Error> {
    let value = json!({
        "topic": topic, "offset": offset, "id": message.id.to_string(),
        "timestamp_ms": message.timestamp_ms, "routing_key": message.routing_key,
        "key": message.key.as_deref().map(String::from_utf8_lossy),
        "headers": message.headers.iter()
            .map(|(n, v)| json!([n, String::from_utf8_lossy(v)])).collect::<Vec<_>>(),
        "payload": String::from_utf8_lossy(&message.payload),
    });
    out.line(&value, || {
        println!(
            "{offset}\t{}\t{}",
            message.routing_key,
            String::from_utf8_lossy(&message.payload).trim_end()
        );
    })
}

fn tail(a: TailArgs, out: &Out) -> Result<(), Error> {
    let max = a.max.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    if let Some(group) = &a.group {
        let db = open_rw(&a.file, false)?;
        let mut consumer = db.consumer(&a.topic, group, StartAt::Earliest)?;
        while printed < max {
            let wait = if a.follow {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
            let want = usize::try_from((max - printed).min(1024)).unwrap_or(1024);
            let records = consumer.poll(want, wait)?;
            if records.is_empty() && !a.follow {
                break;
            }
            for r in &records {
                record_line(out, &a.topic, r.offset, &r.message)?;
                printed += 1;
            }
            consumer.commit()?;
        }
        return Ok(());
    }
    let db = open_ro(&a.file)?;
    let snapshot = db.begin_read()?;
    let mut next = match a.from.as_str() {
        "earliest" => snapshot.resolve_start(&a.topic, StartAt::Earliest)?,
        "latest" => snapshot.resolve_start(&a.topic, StartAt::Latest)?,
        n => n.parse().map_err(|_| {
            Error::InvalidConfig(format!("--from {n:?}: not earliest, latest or an offset"))
        })?,
    };
    drop(snapshot);
    while printed < max {
        let want = usize::try_from((max - printed).min(1024)).unwrap_or(1024);
        let records = db.begin_read()?.read_topic(&a.topic, next, want)?;
        if records.is_empty() {
            if !a.follow {
                break;
            }
            // A read-only handle gets no wake-up from another process: look again soon.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        for r in &records {
            record_line(out, &a.topic, r.offset, &r.message)?;
            printed += 1;
            next = r.offset + 1;
        }
        io::stdout().flush()?;
    }
    Ok(())
}

fn lease_token(lease: &Lease) -> String {
    format!(
        "{}:{}:{}",
        lease.queue, lease.sequence, lease.delivery_count
    )
}

fn parse_lease(token: &str) -> Result<Lease, Error> {
    let bad = || Error::InvalidConfig(format!("lease {token:?} is not QUEUE:SEQUENCE:DELIVERY"));
    let mut parts = token.rsplitn(3, ':');
    let delivery = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let sequence = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let queue = parts.next().filter(|q| !q.is_empty()).ok_or_else(bad)?;
    Ok(Lease {
        queue: queue.to_owned(),
        sequence,
        delivery_count: delivery,
    })
}

fn receive(file: &Path, queue: &str, max: usize, wait_ms: u64, out: &Out) -> Result<(), Error> {
    let db = open_rw(file, false)?;
    let deliveries = db.receive(queue, max, Duration::from_millis(wait_ms))?;
    for d in &deliveries {
        let value = json!({
            "lease": lease_token(&d.lease), "queue": queue, "id": d.message.id.to_string(),
            "delivery_count": d.delivery_count, "redelivered": d.redelivered,
            "lease_until_ms": d.lease_until_ms, "priority": d.priority,
            "routing_key": d.message.routing_key,
            "payload": String::from_utf8_lossy(&d.message.payload),
        });
        out.line(&value, || {
            println!(
                "{}\t{}",
                lease_token(&d.lease),
                String::from_utf8_lossy(&d.message.payload).trim_end()
            );
        })?;
    }
    if deliveries.is_empty() && !out.json {
        eprintln!("no message ready in {queue}");
    }
    Ok(())
}

fn settle(file: &Path, tokens: &[String], nack: Option<Nack>, out: &Out) -> Result<(), Error> {
    let leases = tokens
        .iter()
        .map(|t| parse_lease(t))
        .collect::<Result<Vec<_>, _>>()?;
    let db = open_rw(file, false)?;
    db.write(|txn| {
        for lease in &leases {
            match nack {
                None => txn.ack(lease)?,
                Some(action) => txn.nack(lease, action)?,
            }
        }
        Ok::<_, Error>(())
    })?;
    let verb = if nack.is_some() { "nacked" } else { "acked" };
    out.emit(&json!({verb: tokens}), || {
        println!("{verb} {}", leases.len())
    })
}

fn dlq(command: DlqCommand, out: &Out) -> Result<(), Error> {
    match command {
        DlqCommand::List { file, queue, max } => {
            let db = open_ro(&file)?;
            let held = db.begin_read()?.browse_queue(&queue, 0, max)?;
            for m in &held {
                let deaths: Vec<Value> = m
                    .deaths
                    .iter()
                    .map(|d| json!({"queue": d.queue, "reason": d.reason.as_str(), "count": d.count, "last_ms": d.last_ms}))
                    .collect();
                let value = json!({
                    "sequence": m.sequence, "state": m.state.as_str(), "id": m.message.id.to_string(),
                    "deaths": deaths, "payload": String::from_utf8_lossy(&m.message.payload),
                });
                out.line(&value, || {
                    let last = m.deaths.last().map_or_else(
                        || "-".to_owned(),
                        |d| format!("{} in {} x{}", d.reason.as_str(), d.queue, d.count),
                    );
                    println!(
                        "{}\t{}\t{}\t{}",
                        m.sequence,
                        m.state.as_str(),
                        last,
                        String::from_utf8_lossy(&m.message.payload).trim_end()
                    );
                })?;
            }
            Ok(())
        }
        DlqCommand::Redrive { file, queue, max } => {
            let moved = open_rw(&file, false)?.write(|txn| txn.redrive(&queue, max))?;
            out.emit(&json!({"redriven": moved}), || {
                println!("re-drove {moved} messages")
            })
        }
    }
}

fn outbox(command: OutboxCommand, out: &Out) -> Result<(), Error> {
    match command {
        OutboxCommand::List { file, parked, max } => {
            let db = open_ro(&file)?;
            let snapshot = db.begin_read()?;
            let rows = if parked {
                snapshot.outbox_parked(max)?
            } else {
                snapshot.outbox_pending(max)?
            };
            for r in &rows {
                let value = json!({
                    "sequence": r.sequence, "destination": r.destination,
                    "id": r.message.id.to_string(), "attempts": r.attempts,
                    "last_error": r.last_error, "next_attempt_ms": r.next_attempt_ms,
                    "payload": String::from_utf8_lossy(&r.message.payload),
                });
                out.line(&value, || {
                    println!(
                        "{}\t{}\tattempts {}\t{}",
                        r.sequence, r.destination, r.attempts, r.last_error
                    );
                })?;
            }
            Ok(())
        }
        OutboxCommand::Redrive { file, max } => {
            let moved = open_rw(&file, false)?.write(|txn| txn.outbox_redrive(max))?;
            out.emit(&json!({"redriven": moved}), || {
                println!("re-drove {moved} rows")
            })
        }
    }
}

/// A progress bar on standard error for people at a terminal; hidden otherwise.
fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} {bar:40} {pos}/{len} ({eta})"
    } else {
        "{msg} {spinner} {pos}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}

fn export(file: &Path, output: Option<&Path>, out: &Out) -> Result<(), Error> {
    let db = open_ro(file)?;
    let m = db.begin_read()?.metrics(now_ms())?;
    let total = 2
        + m.topics
            .iter()
            .map(|t| 1 + t.info.len() + t.groups.len() as u64)
            .sum::<u64>()
        + m.queues.iter().map(|q| 1 + q.depth()).sum::<u64>()
        + m.outbox.backlog
        + m.outbox.parked
        + m.dedup_entries;
    let bar = progress(Some(total), "export");
    let report = match output {
        Some(path) => db.export(BufWriter::new(File::create(path)?), |n| bar.set_position(n))?,
        None => db.export(BufWriter::new(io::stdout().lock()), |n| bar.set_position(n))?,
    };
    bar.finish_and_clear();
    if output.is_some() {
        let value = json!({"lines": report.lines, "topics": report.topics, "records": report.records,
            "queues": report.queues, "entries": report.entries, "outbox": report.outbox, "dedup": report.dedup});
        out.emit(&value, || {
            println!(
                "exported {} lines: {} topics, {} records, {} queues, {} queued messages, {} outbox rows, {} dedup entries",
                report.lines, report.topics, report.records, report.queues, report.entries, report.outbox, report.dedup
            );
        })?;
    }
    Ok(())
}

fn import(file: &Path, input: Option<&Path>, out: &Out) -> Result<(), Error> {
    let db = open_rw(file, true)?;
    let (reader, total): (Box<dyn BufRead>, Option<u64>) = match input {
        Some(path) => {
            let f = File::open(path)?;
            // Lines are not known before reading; bytes would need a counting reader, so the
            // bar shows lines with a spinner.
            (Box::new(BufReader::new(f)), None)
        }
        None => (Box::new(BufReader::new(io::stdin().lock())), None),
    };
    let bar = progress(total, "import");
    let report = db.import(reader, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let value = json!({"lines": report.lines, "topics": report.topics, "records": report.records,
        "queues": report.queues, "entries": report.entries, "outbox": report.outbox, "dedup": report.dedup});
    out.emit(&value, || {
        println!(
            "imported {} lines: {} topics, {} records, {} queues, {} queued messages, {} outbox rows, {} dedup entries",
            report.lines, report.topics, report.records, report.queues, report.entries, report.outbox, report.dedup
        );
    })
}

fn check(file: &Path, out: &Out) -> Result<ExitCode, Error> {
    existing(file)?;
    let bar = progress(None, "check");
    let report = Database::builder().check(file, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    let ok = report.problems.is_empty();
    let value = json!({"ok": ok, "repaired": report.repaired, "values": report.values,
        "messages": report.messages, "problems": report.problems});
    out.emit(&value, || {
        if report.repaired {
            println!("redb repaired damage it found (as after a crash)");
        }
        for p in &report.problems {
            println!("problem: {p}");
        }
        println!(
            "{}: {} values checked, {} messages, {} problems",
            if ok { "ok" } else { "FAILED" },
            report.values,
            report.messages,
            report.problems.len()
        );
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(6)
    })
}

fn compact(file: &Path, out: &Out) -> Result<(), Error> {
    existing(file)?;
    let bar = progress(None, "compact");
    bar.enable_steady_tick(Duration::from_millis(100));
    let report = Database::builder().compact(file)?;
    bar.finish_and_clear();
    let value = json!({"bytes_before": report.bytes_before, "bytes_after": report.bytes_after});
    out.emit(&value, || {
        println!(
            "compacted {}: {} -> {} bytes",
            file.display(),
            report.bytes_before,
            report.bytes_after
        );
    })
}

fn scratch_dir(dir: Option<PathBuf>, what: &str) -> Result<PathBuf, Error> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("mqlite-{what}-{}-{}", std::process::id(), now_ms()))
    });
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn rate(n: u64, since: Instant) -> f64 {
    n as f64 / since.elapsed().as_secs_f64().max(1e-9)
}

fn bench(dir: Option<PathBuf>, messages: u64, concurrency: &str, out: &Out) -> Result<(), Error> {
    let mode = match concurrency {
        "exclusive" => ConcurrencyMode::ExclusiveWriter,
        "single" => ConcurrencyMode::SingleWriter,
        "multi" => ConcurrencyMode::MultiWriter,
        other => {
            return Err(Error::InvalidConfig(format!(
                "--concurrency {other:?}: not exclusive, single or multi"
            )));
        }
    };
    let dir = scratch_dir(dir, "bench")?;
    let path = dir.join("bench.mqlite");
    let _ = std::fs::remove_file(&path);
    let db = Database::builder().concurrency(mode).open(&path)?;
    db.write(|txn| {
        txn.create_topic("bench", TopicConfig::default())?;
        txn.create_queue("jobs", QueueConfig::default())
    })?;
    let payload = vec![b'x'; 100];
    let mut rows = Vec::new();

    // One durable publish per commit, for one second.
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(1) {
        db.write(|txn| txn.publish("bench", &Message::new(payload.clone())))?;
        n += 1;
    }
    rows.push(("durable publish, 1 per commit", rate(n, start), "msg/s"));

    let batch: Vec<Message> = (0..1000).map(|_| Message::new(payload.clone())).collect();
    let start = Instant::now();
    let mut published = 0;
    while published < messages {
        db.write(|txn| txn.publish_batch("bench", &batch))?;
        published += 1000;
    }
    rows.push(("publish, 1000 per commit", rate(published, start), "msg/s"));

    let start = Instant::now();
    let mut consumer = db.consumer("bench", "reader", StartAt::Earliest)?;
    let mut read = 0;
    loop {
        let got = consumer.poll(1000, Duration::ZERO)?.len() as u64;
        if got == 0 {
            break;
        }
        read += got;
    }
    consumer.commit()?;
    rows.push(("topic read by a group", rate(read, start), "msg/s"));

    let mut enqueued = 0;
    while enqueued < messages {
        db.write(|txn| {
            for m in &batch {
                txn.enqueue("jobs", m)?;
            }
            Ok::<_, Error>(())
        })?;
        enqueued += 1000;
    }
    let start = Instant::now();
    let mut done = 0;
    loop {
        let n = db.write(|txn| {
            let deliveries = txn.receive("jobs", 1000)?;
            let leases: Vec<Lease> = deliveries.into_iter().map(|d| d.lease).collect();
            txn.ack_many(&leases)?;
            Ok::<_, Error>(leases.len() as u64)
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    rows.push((
        "queue receive + ack, 1000 per commit",
        rate(done, start),
        "msg/s",
    ));
    drop(consumer);
    drop(db);
    let _ = std::fs::remove_file(&path);

    let value: Vec<Value> = rows
        .iter()
        .map(|(w, v, u)| json!({"workload": w, "value": v, "unit": u}))
        .collect();
    out.emit(&Value::Array(value), || {
        println!(
            "mqlite bench on {} (100-byte payloads, durable commits, {concurrency} mode)",
            dir.display()
        );
        for (w, v, u) in &rows {
            println!("  {w:<38} {v:>12.0} {u}");
        }
        println!("for the comparison with SQLite and raw redb: cargo bench --bench peers");
    })
}

fn demo(dir: Option<PathBuf>, out: &Out) -> Result<(), Error> {
    let dir = scratch_dir(dir, "demo")?;
    let app_path = dir.join("app.mqlite");
    let hub_path = dir.join("hub.mqlite");
    for p in [&app_path, &hub_path] {
        let _ = std::fs::remove_file(p);
    }
    let app = Database::open(&app_path)?;
    let hub = Database::open(&hub_path)?;
    hub.write(|txn| {
        txn.create_topic("orders", TopicConfig::default())?;
        txn.create_queue("shipping.dlq", QueueConfig::default())?;
        txn.create_queue(
            "shipping",
            QueueConfig::default().dead_letter("shipping.dlq"),
        )?;
        txn.bind("orders", "shipping", Binding::pattern("order.created.*"))
    })?;
    // The app writes each order event to its outbox, in its own commit.
    let regions = ["eu", "us", "apac"];
    for i in 0..300u32 {
        let region = regions[i as usize % regions.len()];
        let event = Message::new(format!("{{\"order\":{i},\"region\":\"{region}\"}}"));
        // The outbox destination becomes the routing key at the hub.
        app.write(|txn| txn.outbox_put(&format!("order.created.{region}"), &event))?;
    }
    // The relay ships the outbox to the hub in commit order.
    let mut relay = mqlite::Relay::new(app.clone(), mqlite::MqliteSink::new(hub.clone(), "orders"));
    let mut relayed = 0;
    loop {
        let step = relay.run_once()?;
        if step.sent == 0 {
            break;
        }
        relayed += step.sent;
    }
    // A worker drains the shipping queue; every tenth order fails once and is dead-lettered.
    let mut shipped = 0;
    let mut rejected = 0;
    loop {
        let deliveries = hub.receive("shipping", 64, Duration::ZERO)?;
        if deliveries.is_empty() {
            break;
        }
        hub.write(|txn| {
            for d in &deliveries {
                if d.message.payload.ends_with(b"0,\"region\":\"eu\"}") {
                    txn.nack(&d.lease, Nack::DeadLetter)?;
                } else {
                    txn.ack(&d.lease)?;
                }
            }
            Ok::<_, Error>(())
        })?;
        for d in &deliveries {
            if d.message.payload.ends_with(b"0,\"region\":\"eu\"}") {
                rejected += 1;
            } else {
                shipped += 1;
            }
        }
    }
    let m = hub.metrics()?;
    let value = json!({"dir": dir, "relayed": relayed, "shipped": shipped, "dead_lettered": rejected,
        "hub": metrics_json(&m)});
    out.emit(&value, || {
        println!("demo files in {}", dir.display());
        println!("  app outbox relayed {relayed} order events to the hub's topic");
        println!("  the binding order.created.* routed them to the shipping queue");
        println!("  shipped {shipped}, dead-lettered {rejected} to shipping.dlq");
        println!("  try: mqlite info {}", hub_path.display());
        println!("       mqlite dlq list {} shipping.dlq", hub_path.display());
    })
}
