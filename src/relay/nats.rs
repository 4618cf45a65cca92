//! NATS JetStream sink (feature `nats`).
//!
//! The destination is the subject, verbatim (NATS subjects are dotted words, like routing
//! keys; a subject NATS refuses fails the row, which is retried and eventually parked). The
//! message id travels as `Nats-Msg-Id`, so JetStream drops a re-sent message inside the
//! stream's duplicate window; the key travels as `Mqlite-Key` (hex) and every header as a NATS
//! header (values as lossy UTF-8). A message counts as confirmed when JetStream acked it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};

use super::{Sink, SinkError};
use crate::outbox::OutboxMessage;

/// Publishes to NATS JetStream with a private single-thread tokio runtime. Connects lazily and
/// reconnects after a failure, so it can be built while the server is down.
pub struct NatsSink {
    url: String,
    runtime: tokio::runtime::Runtime,
    context: Option<jetstream::Context>,
    timeout: Duration,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// A sink for the server at `url` (for example `nats://127.0.0.1:4222`). Each publish or
    /// ack waits at most 5 seconds.
    ///
    /// # Errors
    ///
    /// When the private runtime cannot start.
    pub fn new(url: impl Into<String>) -> Result<Self, SinkError> {
        let runtime = crate::runtime::private().map_err(|e| SinkError::new(0, e))?;
        Ok(NatsSink {
            url: url.into(),
            runtime,
            context: None,
            timeout: Duration::from_secs(5),
        })
    }

    fn context(&mut self) -> Result<jetstream::Context, SinkError> {
        if let Some(c) = &self.context {
            return Ok(c.clone());
        }
        let url = self.url.clone();
        let timeout = self.timeout;
        let client = self
            .runtime
            .block_on(async move {
                async_nats::ConnectOptions::new()
                    .connection_timeout(timeout)
                    .max_reconnects(Some(1))
                    .connect(url)
                    .await
            })
            .map_err(|e| SinkError::new(0, format!("connect: {e}")))?;
        // The context spawns its ack task on the runtime it is made in.
        let context = {
            let _runtime = self.runtime.enter();
            jetstream::new(client)
        };
        self.context = Some(context.clone());
        Ok(context)
    }

    /// Creates the stream `name` over `subjects` unless it exists (a convenience for tests and
    /// first runs; production streams are usually managed elsewhere).
    ///
    /// # Errors
    ///
    /// When the server is unreachable or refuses.
    pub fn ensure_stream(&mut self, name: &str, subjects: &[&str]) -> Result<(), SinkError> {
        let context = self.context()?;
        let config = jetstream::stream::Config {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.runtime
            .block_on(context.get_or_create_stream(config))
            .map(|_| ())
            .map_err(|e| SinkError::new(0, e))
    }
}

impl NatsSink {
    /// Deletes the stream `name` with its messages; returns whether it existed.
    ///
    /// # Errors
    ///
    /// When the server is unreachable or refuses.
    pub fn delete_stream(&mut self, name: &str) -> Result<bool, SinkError> {
        let context = self.context()?;
        match self.runtime.block_on(context.delete_stream(name)) {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("not found") => Ok(false),
            Err(e) => Err(SinkError::new(0, e)),
        }
    }
}

fn headers(m: &OutboxMessage) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &m.message.headers {
        headers.append(name.as_str(), String::from_utf8_lossy(value).as_ref());
    }
    if let Some(key) = &m.message.key {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        headers.insert("Mqlite-Key", hex.as_str());
    }
    headers
}

impl Sink for NatsSink {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        let context = self.context()?;
        let timeout = self.timeout;
        let result = self.runtime.block_on(async {
            // Pipeline: send every publish, then collect the acks in order.
            let mut acks = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let publish = PublishMessage::build()
                    .payload(m.message.payload.to_vec().into())
                    .headers(headers(m))
                    .message_id(m.message.id.to_string());
                match tokio::time::timeout(
                    timeout,
                    context.send_publish(m.destination.clone(), publish),
                )
                .await
                {
                    Ok(Ok(ack)) => acks.push(ack),
                    Ok(Err(e)) => return (acks, Some((i, e.to_string()))),
                    Err(_) => return (acks, Some((i, "publish timed out".to_owned()))),
                }
            }
            (acks, None)
        });
        let (acks, send_failure) = result;
        let mut confirmed = 0;
        for ack in acks {
            match self
                .runtime
                .block_on(async { tokio::time::timeout(timeout, ack).await })
            {
                Ok(Ok(_)) => confirmed += 1,
                Ok(Err(e)) => return Err(self.fail(confirmed, e)),
                Err(_) => return Err(self.fail(confirmed, "ack timed out")),
            }
        }
        match send_failure {
            Some((_, error)) => Err(self.fail(confirmed, error)),
            None => Ok(()),
        }
    }
}

impl NatsSink {
    /// Drops the connection so the next call reconnects.
    fn fail(&mut self, confirmed: usize, error: impl std::fmt::Display) -> SinkError {
        self.context = None;
        SinkError::new(confirmed, error)
    }
}
