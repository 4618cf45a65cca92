//! NATS JetStream source (feature `nats`): a durable pull consumer with explicit acks.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, message::Acker};
use futures::StreamExt;

use super::{Source, SourceError, message_id};
use crate::message::Message;

/// Reads a JetStream stream through a durable pull consumer; a message not acked within the
/// consumer's ack wait (default 5 s) is redelivered by the server.
pub struct NatsSource {
    url: String,
    stream: String,
    durable: String,
    filter: String,
    ack_wait: Duration,
    runtime: tokio::runtime::Runtime,
    consumer: Option<PullConsumer>,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    /// Reads `stream` on the server at `url` through the durable consumer `durable`, limited to
    /// subjects matching `filter` (empty: all). The consumer is created if missing.
    ///
    /// # Errors
    ///
    /// When the private runtime cannot start.
    pub fn new(url: &str, stream: &str, durable: &str, filter: &str) -> Result<Self, SourceError> {
        let runtime = crate::runtime::private().map_err(SourceError::new)?;
        Ok(NatsSource {
            url: url.to_owned(),
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            filter: filter.to_owned(),
            ack_wait: Duration::from_secs(5),
            runtime,
            consumer: None,
        })
    }

    /// How long the server waits for an ack before redelivering. Default 5 s.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    fn consumer(&mut self) -> Result<PullConsumer, SourceError> {
        if let Some(c) = &self.consumer {
            return Ok(c.clone());
        }
        let (url, stream, durable, filter, ack_wait) = (
            self.url.clone(),
            self.stream.clone(),
            self.durable.clone(),
            self.filter.clone(),
            self.ack_wait,
        );
        let consumer = self.runtime.block_on(async move {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(SourceError::new)?;
            let context = jetstream::new(client);
            let stream = context.get_stream(stream).await.map_err(SourceError::new)?;
            let config = jetstream::consumer::pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                filter_subject: filter,
                ..Default::default()
            };
            stream
                .get_or_create_consumer(&durable, config)
                .await
                .map_err(SourceError::new)
        })?;
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }
}

impl Source for NatsSource {
    type Token = Acker;

    fn fetch(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<(Message, Acker)>, SourceError> {
        let consumer = self.consumer()?;
        let result = self.runtime.block_on(async {
            let mut batch = consumer
                .fetch()
                .max_messages(max)
                .expires(timeout.max(Duration::from_millis(10)))
                .messages()
                .await
                .map_err(SourceError::new)?;
            let mut out = Vec::new();
            while let Some(next) = batch.next().await {
                let jm = next.map_err(SourceError::new)?;
                let sequence = jm.info().map(|i| i.stream_sequence).unwrap_or(0);
                let (m, acker) = jm.split();
                let sent_id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_owned());
                let mut message = Message::new(m.payload.to_vec())
                    .with_id(message_id(sent_id.as_deref(), u128::from(sequence)))
                    .with_routing_key(m.subject.as_str());
                if let Some(headers) = &m.headers {
                    for (name, values) in headers.iter() {
                        let name: &str = name.as_ref();
                        if name == "Nats-Msg-Id" {
                            continue;
                        }
                        for value in values {
                            message = message.with_header(name, value.as_str().as_bytes());
                        }
                    }
                }
                out.push((message, acker));
            }
            Ok::<_, SourceError>(out)
        });
        if result.is_err() {
            self.consumer = None;
        }
        result
    }

    fn ack(&mut self, tokens: Vec<Acker>) -> Result<(), SourceError> {
        let result = self.runtime.block_on(async {
            for acker in tokens {
                acker.ack().await.map_err(SourceError::new)?;
            }
            Ok(())
        });
        if result.is_err() {
            self.consumer = None;
        }
        result
    }
}
