//! The `mqlite` command-line tool (feature `cli`). It uses only the public API.
//!
//! `mqlite info FILE [--json]` shows the format, topics with their groups, and queues.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mqlite::{Database, Error};
use serde_json::json;

/// Inspect an mqlite file.
#[derive(Parser)]
#[command(
    version,
    about = "Inspect an mqlite file",
    after_help = "Example: mqlite info app.mqlite --json"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show topics (extent, retention, groups and lag) and queues (counts).
    ///
    /// Example: mqlite info app.mqlite
    Info {
        /// The database file; it must exist.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn info(file: &PathBuf, as_json: bool) -> Result<(), Error> {
    if !file.exists() {
        return Err(Error::NotMqliteFile {
            path: file.clone(),
            reason: "no such file".into(),
        });
    }
    let db = Database::open(file)?;
    let snapshot = db.begin_read()?;
    let topics = snapshot.topics()?;
    let queues = snapshot.queues()?;
    let mut topic_rows = Vec::new();
    for t in &topics {
        let groups: Vec<_> = snapshot
            .groups(&t.name)?
            .into_iter()
            .map(|g| json!({"group": g.group, "committed": g.committed, "lag": g.lag}))
            .collect();
        topic_rows.push(json!({
            "name": t.name, "first_offset": t.first_offset, "next_offset": t.next_offset,
            "messages": t.len(), "stored_bytes": t.stored_bytes,
            "retention": format!("{:?}", t.config.retention), "groups": groups,
        }));
    }
    let queue_rows: Vec<_> = queues
        .iter()
        .map(|q| {
            json!({
                "name": q.name, "ready": q.ready, "in_flight": q.in_flight, "delayed": q.delayed,
                "dead_lettered": q.dead_lettered, "oldest_enqueued_ms": q.oldest_enqueued_ms,
                "dead_letter_queue": q.config.dead_letter,
            })
        })
        .collect();
    let size = std::fs::metadata(file)?.len();
    if as_json {
        let out =
            json!({"file": file, "size_bytes": size, "topics": topic_rows, "queues": queue_rows});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} ({size} bytes)", file.display());
    println!("\ntopics: {}", topics.len());
    for t in &topics {
        println!(
            "  {:<24} offsets {}..{} ({} messages, {} bytes)",
            t.name,
            t.first_offset,
            t.next_offset,
            t.len(),
            t.stored_bytes
        );
        for g in snapshot.groups(&t.name)? {
            println!(
                "    group {:<20} committed {:<10} lag {}",
                g.group, g.committed, g.lag
            );
        }
    }
    println!("\nqueues: {}", queues.len());
    for q in &queues {
        println!(
            "  {:<24} ready {:<8} in flight {:<8} delayed {:<8} dead-lettered {}",
            q.name, q.ready, q.in_flight, q.delayed, q.dead_lettered
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info { file, json } => info(file, *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mqlite: {e}");
            match e {
                Error::NotMqliteFile { .. } | Error::FormatTooNew { .. } => ExitCode::from(3),
                Error::AlreadyOpen { .. } => ExitCode::from(4),
                _ => ExitCode::from(1),
            }
        }
    }
}
