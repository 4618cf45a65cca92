//! RabbitMQ source (feature `amqp`): a consumer with manual acks and a bounded prefetch.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use super::{Source, SourceError, message_id};
use crate::message::Message;

/// Consumes one RabbitMQ queue with manual acks; unacked messages go back to the queue when the
/// connection closes (for example when the process dies).
pub struct AmqpSource {
    uri: String,
    queue: String,
    prefetch: u16,
    runtime: tokio::runtime::Runtime,
    consumer: Option<(Connection, Channel, Consumer)>,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Consumes `queue` (which must exist) on the server at `uri`, with a prefetch of 500.
    ///
    /// # Errors
    ///
    /// When the private runtime cannot start.
    pub fn new(uri: &str, queue: &str) -> Result<Self, SourceError> {
        let runtime = crate::runtime::private().map_err(SourceError::new)?;
        Ok(AmqpSource {
            uri: uri.to_owned(),
            queue: queue.to_owned(),
            prefetch: 500,
            runtime,
            consumer: None,
        })
    }

    /// Declares the durable queue `queue` and binds it to `exchange` with `binding_key` (a
    /// convenience for first runs and demos; an empty exchange skips the binding).
    ///
    /// # Errors
    ///
    /// When the server is unreachable or refuses.
    pub fn declare(&mut self, exchange: &str, binding_key: &str) -> Result<(), SourceError> {
        let (uri, queue) = (self.uri.clone(), self.queue.clone());
        let (exchange, binding_key) = (exchange.to_owned(), binding_key.to_owned());
        self.runtime
            .block_on(async move {
                let connection = Connection::connect(&uri, ConnectionProperties::default()).await?;
                let channel = connection.create_channel().await?;
                let options = lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(
                        ShortString::from(queue.as_str()),
                        options,
                        FieldTable::default(),
                    )
                    .await?;
                if !exchange.is_empty() {
                    channel
                        .queue_bind(
                            ShortString::from(queue.as_str()),
                            ShortString::from(exchange.as_str()),
                            ShortString::from(binding_key.as_str()),
                            lapin::options::QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                }
                connection.close(0, ShortString::from("declared")).await
            })
            .map_err(SourceError::new)
    }

    fn connect(&mut self) -> Result<(), SourceError> {
        if self.consumer.is_some() {
            return Ok(());
        }
        let (uri, queue, prefetch) = (self.uri.clone(), self.queue.clone(), self.prefetch);
        let parts = self.runtime.block_on(async move {
            let connection = Connection::connect(&uri, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    ShortString::from(queue.as_str()),
                    ShortString::from("mqlite-bridge"),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((connection, channel, consumer))
        });
        self.consumer = Some(parts.map_err(SourceError::new)?);
        Ok(())
    }
}

impl Source for AmqpSource {
    type Token = Acker;

    fn fetch(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<(Message, Acker)>, SourceError> {
        self.connect()?;
        let Some((_, _, consumer)) = self.consumer.as_mut() else {
            return Ok(Vec::new());
        };
        let deadline = Instant::now() + timeout;
        let result = self.runtime.block_on(async {
            let mut out = Vec::new();
            while out.len() < max {
                // After the first message, take only what is already there.
                let wait = if out.is_empty() {
                    deadline.saturating_duration_since(Instant::now())
                } else {
                    Duration::from_millis(1)
                };
                let delivery = match tokio::time::timeout(wait, consumer.next()).await {
                    Err(_) => break,
                    Ok(None) => return Err(SourceError::new("consumer closed")),
                    Ok(Some(d)) => d.map_err(SourceError::new)?,
                };
                let props = &delivery.properties;
                let sent_id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
                let mut message = Message::new(delivery.data.clone())
                    .with_id(message_id(
                        sent_id.as_deref(),
                        u128::from(delivery.delivery_tag),
                    ))
                    .with_routing_key(delivery.routing_key.as_str());
                if let Some(headers) = props.headers() {
                    for (name, value) in headers.inner() {
                        let bytes = match value {
                            AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
                            AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                            other => format!("{other:?}").into_bytes(),
                        };
                        if name.as_str() == "mqlite-key" {
                            message.key = Some(bytes);
                        } else {
                            message = message.with_header(name.as_str(), bytes);
                        }
                    }
                }
                out.push((message, delivery.acker.clone()));
            }
            Ok(out)
        });
        if result.is_err() {
            self.consumer = None;
        }
        result
    }

    fn ack(&mut self, tokens: Vec<Acker>) -> Result<(), SourceError> {
        let result = self.runtime.block_on(async {
            for acker in tokens {
                acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(SourceError::new)?;
            }
            Ok(())
        });
        if result.is_err() {
            self.consumer = None;
        }
        result
    }
}
