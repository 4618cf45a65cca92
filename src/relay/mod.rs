//! The relay: drains the outbox in commit order into a [`Sink`], marking rows delivered only
//! after the sink confirmed them. It uses only the public API.
//!
//! Stepped by the caller ([`Relay::run_once`]) or run on a thread the caller starts
//! ([`Relay::spawn`]); nothing runs behind the user's back. While the sink fails, the relay
//! retries the head row with exponential backoff and jitter and the backlog simply grows; after
//! [`RelayConfig::max_attempts`] failures the row is parked and the rows behind it flow.

use std::collections::hash_map::RandomState;
use std::fmt::Display;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::db::Database;
use crate::dedup::{DEFAULT_DEDUP_TTL_MS, Dedup};
use crate::error::{Error, Result};
use crate::outbox::OutboxMessage;
use crate::worker::WorkerHandle;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "mqtt")]
mod mqtt;
#[cfg(feature = "nats")]
mod nats;

#[cfg(feature = "amqp")]
pub use amqp::AmqpSink;
#[cfg(feature = "kafka")]
pub use kafka::KafkaSink;
#[cfg(feature = "mqtt")]
pub use mqtt::MqttSink;
#[cfg(feature = "nats")]
pub use nats::NatsSink;

/// A sink failed: how many of the leading messages it confirmed before the failure, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sink failed after {confirmed} confirmed: {error}")]
pub struct SinkError {
    /// Messages at the front of the batch that the broker confirmed.
    pub confirmed: usize,
    /// What went wrong.
    pub error: String,
}

impl SinkError {
    /// A failure after `confirmed` confirmed messages.
    pub fn new(confirmed: usize, error: impl Display) -> Self {
        SinkError {
            confirmed,
            error: error.to_string(),
        }
    }
}

/// Where the relay publishes: a broker client, another mqlite file, a closure.
///
/// # Examples
///
/// ```
/// use mqlite::{OutboxMessage, Sink, SinkError};
/// struct Stdout;
/// impl Sink for Stdout {
///     fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
///         for m in messages {
///             println!("{} -> {}", m.message.id, m.destination);
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Sink: Send {
    /// Publishes `messages` in order and returns once the destination confirmed every one
    /// (for a broker: publisher confirms, a JetStream ack, an MQTT PUBACK). Each message's id
    /// must travel with it so the destination can drop duplicates: the relay re-sends whatever
    /// it could not mark delivered, for example after a crash.
    ///
    /// # Errors
    ///
    /// A [`SinkError`] saying how many leading messages were confirmed.
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError>;
}

/// A sink made of a closure called once per message, in order.
///
/// # Examples
///
/// ```
/// use mqlite::{FnSink, Message, Relay};
/// let db = mqlite::Database::in_memory()?;
/// db.write(|txn| txn.outbox_put("orders.created", &Message::new("o-1")))?;
/// let mut sent = Vec::new();
/// let mut relay = Relay::new(db.clone(), FnSink(|m: &mqlite::OutboxMessage| {
///     sent.push(m.destination.clone());
///     Ok::<(), String>(())
/// }));
/// assert_eq!(relay.run_once()?.sent, 1);
/// drop(relay);
/// assert_eq!(sent, ["orders.created"]);
/// # Ok::<(), mqlite::Error>(())
/// ```
pub struct FnSink<F>(pub F);

impl<F, E> Sink for FnSink<F>
where
    F: FnMut(&OutboxMessage) -> Result<(), E> + Send,
    E: Display,
{
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        for (i, m) in messages.iter().enumerate() {
            (self.0)(m).map_err(|e| SinkError::new(i, e))?;
        }
        Ok(())
    }
}

/// A sink that relays into a topic of another mqlite file (the embedded default, and a test
/// double for brokers). Each message is published with its destination as routing key, and
/// recorded in the target's dedup table (scope `relay` by default) in the same commit, so a
/// re-sent message is dropped there: 0 duplicate effects.
#[derive(Debug, Clone)]
pub struct MqliteSink {
    target: Database,
    topic: String,
    scope: String,
}

impl MqliteSink {
    /// Relays into `topic` of `target` (the topic must exist there).
    pub fn new(target: Database, topic: impl Into<String>) -> Self {
        MqliteSink {
            target,
            topic: topic.into(),
            scope: "relay".into(),
        }
    }

    /// Sets the dedup scope used in the target. Default `relay`.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }
}

impl Sink for MqliteSink {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        self.target
            .write(|txn| {
                for m in messages {
                    if txn.dedup(&self.scope, m.message.id, DEFAULT_DEDUP_TTL_MS)? == Dedup::New {
                        let message = m.message.clone().with_routing_key(&m.destination);
                        txn.publish(&self.topic, &message)?;
                    }
                }
                Ok::<_, Error>(())
            })
            .map_err(|e| SinkError::new(0, e))
    }
}

/// Relay settings. Every field states its default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Rows read and published per step. Default 100.
    pub batch_size: usize,
    /// Failures of one row before it is parked. Default 10.
    pub max_attempts: u32,
    /// First retry delay; it doubles per failure. Default 100 ms.
    pub backoff_base_ms: u64,
    /// Longest retry delay. Default 30 000 ms.
    pub backoff_max_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 100,
            max_attempts: 10,
            backoff_base_ms: 100,
            backoff_max_ms: 30_000,
        }
    }
}

/// What one [`Relay::run_once`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStep {
    /// Rows confirmed by the sink and marked delivered.
    pub sent: usize,
    /// The sink's failure, if any (the head row was scheduled for retry or parked).
    pub failure: Option<String>,
    /// Whether the failing row was parked.
    pub parked: bool,
    /// The head row waits for its retry until this clock time.
    pub waiting_until_ms: Option<u64>,
}

/// Counters of a running relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rows delivered since the relay started.
    pub sent: u64,
    /// Failed sink calls since the relay started.
    pub failures: u64,
    /// Rows parked since the relay started.
    pub parked: u64,
    /// The last error (a sink failure or a database error).
    pub last_error: Option<String>,
}

/// Drains a database's outbox into a sink.
pub struct Relay<S: Sink> {
    db: Database,
    sink: S,
    config: RelayConfig,
    stats: Arc<Mutex<RelayStats>>,
    random: RandomState,
}

impl<S: Sink> Relay<S> {
    /// A relay with the default [`RelayConfig`].
    pub fn new(db: Database, sink: S) -> Self {
        Relay::with_config(db, sink, RelayConfig::default())
    }

    /// A relay with `config`.
    pub fn with_config(db: Database, sink: S, config: RelayConfig) -> Self {
        Relay {
            db,
            sink,
            config,
            stats: Arc::default(),
            random: RandomState::new(),
        }
    }

    /// The counters since this relay was made.
    pub fn stats(&self) -> RelayStats {
        self.stats.lock().clone()
    }

    /// Publishes one batch from the head of the outbox, if its head is due.
    ///
    /// Confirmed rows are marked delivered in one commit. If the sink fails, the rows it
    /// confirmed are marked delivered and the first unconfirmed row is scheduled for a retry
    /// (exponential backoff with jitter) or parked after `max_attempts` failures, in the same
    /// commit. A crash between the sink's confirm and that commit re-sends the rows later:
    /// the destination drops them by message id.
    ///
    /// # Errors
    ///
    /// Database errors only; a sink failure is reported in [`RelayStep::failure`].
    pub fn run_once(&mut self) -> Result<RelayStep> {
        let now = self.db.now_ms();
        let rows = self.db.read(|r| r.outbox_pending(self.config.batch_size))?;
        let Some(head) = rows.first() else {
            return Ok(RelayStep::default());
        };
        if head.next_attempt_ms > now {
            return Ok(RelayStep {
                waiting_until_ms: Some(head.next_attempt_ms),
                ..RelayStep::default()
            });
        }
        let outcome = self.sink.publish(&rows);
        let confirmed = match &outcome {
            Ok(()) => rows.len(),
            Err(e) => e.confirmed.min(rows.len()),
        };
        let delivered: Vec<u64> = rows[..confirmed].iter().map(|m| m.sequence).collect();
        let failed = outcome
            .err()
            .and_then(|e| rows.get(confirmed).map(|m| (m, e.error)));
        let mut step = RelayStep {
            sent: confirmed,
            ..RelayStep::default()
        };
        let retry = failed.as_ref().map(|(m, error)| {
            let park = m.attempts + 1 >= self.config.max_attempts;
            let at = now.saturating_add(self.backoff_ms(m.attempts));
            (m.sequence, error.clone(), at, park)
        });
        self.db.write(|txn| {
            txn.outbox_delivered(&delivered)?;
            if let Some((sequence, error, at, park)) = &retry {
                txn.outbox_failed(*sequence, error, *at, *park)?;
            }
            Ok::<_, Error>(())
        })?;
        if confirmed > 0 {
            tracing::debug!(target: "mqlite::relay", sent = confirmed, "relayed outbox rows");
        }
        let mut stats = self.stats.lock();
        stats.sent += confirmed as u64;
        if let Some((sequence, error, at, park)) = retry {
            if park {
                tracing::warn!(target: "mqlite::relay", sequence, %error, "outbox row parked");
            } else {
                tracing::info!(target: "mqlite::relay", sequence, %error, retry_at_ms = at, "sink failed; will retry");
            }
            stats.failures += 1;
            stats.parked += u64::from(park);
            stats.last_error = Some(error.clone());
            step.failure = Some(error);
            step.parked = park;
            step.waiting_until_ms = (!park).then_some(at);
        }
        Ok(step)
    }

    /// base × 2^attempts, capped, with up to 50 % jitter off so that many relays spread out.
    fn backoff_ms(&self, attempts: u32) -> u64 {
        let exp = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << attempts.min(32))
            .min(self.config.backoff_max_ms)
            .max(1);
        let mut h = self.random.build_hasher();
        h.write_u32(attempts);
        h.write_u64(exp);
        exp - h.finish() % (exp / 2 + 1)
    }

    /// Runs the relay on its own thread until the handle is stopped or dropped. The thread
    /// wakes on commits in this process (an outbox write), when a retry comes due, and at
    /// least every 50 ms to check for stop.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the thread cannot be started.
    pub fn spawn(mut self) -> Result<RelayHandle>
    where
        S: 'static,
    {
        let stats = self.stats.clone();
        WorkerHandle::spawn("mqlite-relay", stats, move || {
            let seen = self.db.commit_generation();
            let wait_ms = match self.run_once() {
                Ok(step) if step.sent > 0 && step.failure.is_none() => return,
                Ok(step) => step
                    .waiting_until_ms
                    .map_or(50, |at| at.saturating_sub(self.db.now_ms()).min(50)),
                Err(e) => {
                    self.stats.lock().last_error = Some(e.to_string());
                    50
                }
            };
            self.db
                .wait_for_commit(seen, Duration::from_millis(wait_ms.max(1)));
        })
    }
}

/// A relay running on its own thread; see [`WorkerHandle`].
pub type RelayHandle = WorkerHandle<RelayStats>;
