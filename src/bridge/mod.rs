//! The bridge (inbox): reads a broker subscription and writes each message into a local topic
//! or queue, recording its id in the dedup table in the same commit, and acknowledges the
//! broker only after that commit. It uses only the public API.
//!
//! A bridge killed at any point loses nothing (the broker redelivers what was not acked) and
//! duplicates nothing (a redelivered message finds its id recorded and is dropped), as long as
//! messages carry stable ids: the relay's sinks send them (`Nats-Msg-Id`, AMQP `message_id`,
//! MQTT user property `mqlite-id`).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::db::Database;
use crate::dedup::{DEFAULT_DEDUP_TTL_MS, Dedup};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::worker::WorkerHandle;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "mqtt")]
mod mqtt;
#[cfg(feature = "nats")]
mod nats;

#[cfg(feature = "amqp")]
pub use amqp::AmqpSource;
#[cfg(feature = "mqtt")]
pub use mqtt::MqttSource;
#[cfg(feature = "nats")]
pub use nats::NatsSource;

/// A broker subscription failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("source failed: {0}")]
pub struct SourceError(pub String);

impl SourceError {
    /// An error with this text.
    pub fn new(error: impl std::fmt::Display) -> Self {
        SourceError(error.to_string())
    }
}

/// A broker subscription the bridge reads from.
pub trait Source: Send {
    /// What acknowledges one message to the broker.
    type Token: Send;

    /// Up to `max` messages, waiting up to `timeout` for the first. A message without a stable
    /// id should get one derived from something the broker keeps across redeliveries.
    ///
    /// # Errors
    ///
    /// When the broker is unreachable; the bridge retries.
    fn fetch(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<(Message, Self::Token)>, SourceError>;

    /// Acknowledges messages the bridge has committed locally.
    ///
    /// # Errors
    ///
    /// When the broker is unreachable: the messages will be redelivered and dropped as
    /// duplicates.
    fn ack(&mut self, tokens: Vec<Self::Token>) -> Result<(), SourceError>;
}

/// Where the bridge writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BridgeTarget {
    /// Publish into this topic (which routes to its bound queues).
    Topic(String),
    /// Enqueue into this queue.
    Queue(String),
}

/// What one [`Bridge::run_once`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeStep {
    /// Messages written locally.
    pub written: usize,
    /// Messages dropped as duplicates (already written before).
    pub duplicates: usize,
}

/// Counters of a bridge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Messages written locally since the bridge started.
    pub written: u64,
    /// Duplicates dropped since the bridge started.
    pub duplicates: u64,
    /// The last error.
    pub last_error: Option<String>,
}

/// Moves messages from a broker subscription into a local topic or queue, exactly once.
pub struct Bridge<S: Source> {
    db: Database,
    source: S,
    target: BridgeTarget,
    scope: String,
    batch_size: usize,
    stats: Arc<Mutex<BridgeStats>>,
}

impl<S: Source> Bridge<S> {
    /// A bridge from `source` into `target`, recording ids in dedup scope `scope`.
    pub fn new(db: Database, source: S, target: BridgeTarget, scope: impl Into<String>) -> Self {
        Bridge {
            db,
            source,
            target,
            scope: scope.into(),
            batch_size: 100,
            stats: Arc::default(),
        }
    }

    /// Messages fetched per step. Default 100.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The counters since this bridge was made.
    pub fn stats(&self) -> BridgeStats {
        self.stats.lock().clone()
    }

    /// Fetches one batch (waiting up to `timeout`), writes it locally in one commit with dedup,
    /// then acknowledges it to the broker.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] carrying the source's error text when the broker fails, or the local
    /// commit's error (then nothing is acked and the broker redelivers).
    pub fn run_once(&mut self, timeout: Duration) -> Result<BridgeStep> {
        let batch = self
            .source
            .fetch(self.batch_size, timeout)
            .map_err(|e| Error::Storage(e.to_string()))?;
        if batch.is_empty() {
            return Ok(BridgeStep::default());
        }
        let (messages, tokens): (Vec<Message>, Vec<S::Token>) = batch.into_iter().unzip();
        let step = self.db.write(|txn| {
            let mut step = BridgeStep::default();
            for message in &messages {
                if txn.dedup(&self.scope, message.id, DEFAULT_DEDUP_TTL_MS)? == Dedup::Seen {
                    step.duplicates += 1;
                    continue;
                }
                match &self.target {
                    BridgeTarget::Topic(topic) => {
                        txn.publish(topic, message)?;
                    }
                    BridgeTarget::Queue(queue) => txn.enqueue(queue, message)?,
                }
                step.written += 1;
            }
            Ok::<_, Error>(step)
        })?;
        tracing::debug!(
            target: "mqlite::bridge",
            written = step.written,
            duplicates = step.duplicates,
            "bridged a batch"
        );
        {
            let mut stats = self.stats.lock();
            stats.written += step.written as u64;
            stats.duplicates += step.duplicates as u64;
        }
        self.source
            .ack(tokens)
            .map_err(|e| Error::Storage(e.to_string()))?;
        Ok(step)
    }

    /// Runs the bridge on its own thread until the handle is stopped or dropped; after an
    /// error it waits 100 ms and tries again.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the thread cannot be started.
    pub fn spawn(mut self) -> Result<BridgeHandle>
    where
        S: 'static,
    {
        let stats = self.stats.clone();
        WorkerHandle::spawn("mqlite-bridge", stats, move || {
            if let Err(e) = self.run_once(Duration::from_millis(100)) {
                tracing::warn!(target: "mqlite::bridge", error = %e, "bridge step failed; retrying in 100 ms");
                self.stats.lock().last_error = Some(e.to_string());
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    }
}

/// A bridge running on its own thread; see [`WorkerHandle`].
pub type BridgeHandle = WorkerHandle<BridgeStats>;

/// Parses an id sent by mqlite's sinks (32 hex digits), or derives a stable one from `fallback`
/// (something the broker keeps across redeliveries, like a stream sequence).
#[cfg_attr(
    not(any(feature = "nats", feature = "amqp", feature = "mqtt")),
    allow(dead_code)
)]
pub(crate) fn message_id(sent: Option<&str>, fallback: u128) -> crate::MessageId {
    sent.and_then(|s| s.parse().ok())
        .unwrap_or(crate::MessageId(fallback))
}
