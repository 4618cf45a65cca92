//! RabbitMQ (AMQP 0-9-1) sink (feature `amqp`).
//!
//! Publishes to one exchange with the destination as routing key (AMQP routing keys are
//! dotted words too). Publisher confirms are on and every publish is `mandatory`, so an
//! unroutable message comes back as an error instead of vanishing. The message id travels as
//! the AMQP `message_id` property, the timestamp as `timestamp` (seconds), the key as header
//! `mqlite-key`, headers as AMQP headers (byte arrays). RabbitMQ has no broker-side dedup:
//! a re-sent message must be dropped by the consumer (the bridge's dedup table does that).

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, ByteArray, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::{Sink, SinkError};
use crate::outbox::OutboxMessage;

/// Publishes to RabbitMQ with a private single-thread tokio runtime. Connects lazily and
/// reconnects after a failure.
pub struct AmqpSink {
    uri: String,
    exchange: String,
    runtime: tokio::runtime::Runtime,
    channel: Option<(Connection, Channel)>,
    timeout: Duration,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// A sink publishing to `exchange` (`""` is the default exchange, which routes by queue
    /// name) on the server at `uri` (for example `amqp://guest:guest@127.0.0.1:5672/%2f`).
    ///
    /// # Errors
    ///
    /// When the private runtime cannot start.
    pub fn new(uri: impl Into<String>, exchange: impl Into<String>) -> Result<Self, SinkError> {
        let runtime = crate::runtime::private().map_err(|e| SinkError::new(0, e))?;
        Ok(AmqpSink {
            uri: uri.into(),
            exchange: exchange.into(),
            runtime,
            channel: None,
            timeout: Duration::from_secs(5),
        })
    }

    fn channel(&mut self) -> Result<Channel, SinkError> {
        if let Some((_, c)) = &self.channel {
            return Ok(c.clone());
        }
        let uri = self.uri.clone();
        let timeout = self.timeout;
        let (connection, channel) = self
            .runtime
            .block_on(async move {
                tokio::time::timeout(timeout, async {
                    let connection =
                        Connection::connect(&uri, ConnectionProperties::default()).await?;
                    let channel = connection.create_channel().await?;
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await?;
                    Ok::<_, lapin::Error>((connection, channel))
                })
                .await
            })
            .map_err(|_| SinkError::new(0, "connect timed out"))?
            .map_err(|e| SinkError::new(0, format!("connect: {e}")))?;
        self.channel = Some((connection, channel.clone()));
        Ok(channel)
    }

    fn fail(&mut self, confirmed: usize, error: impl std::fmt::Display) -> SinkError {
        self.channel = None;
        SinkError::new(confirmed, error)
    }
}

fn properties(m: &OutboxMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &m.message.headers {
        headers.insert(
            ShortString::from(name.as_str()),
            AMQPValue::ByteArray(ByteArray::from(value.clone())),
        );
    }
    if let Some(key) = &m.message.key {
        headers.insert(
            ShortString::from("mqlite-key"),
            AMQPValue::ByteArray(ByteArray::from(key.clone())),
        );
    }
    BasicProperties::default()
        .with_message_id(ShortString::from(m.message.id.to_string()))
        .with_timestamp(m.message.timestamp_ms / 1000)
        .with_delivery_mode(2)
        .with_headers(headers)
}

impl Sink for AmqpSink {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        let channel = self.channel()?;
        let exchange = self.exchange.clone();
        let timeout = self.timeout;
        let outcome = self.runtime.block_on(async {
            let mut confirms = Vec::with_capacity(messages.len());
            for m in messages {
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                };
                let sent = channel
                    .basic_publish(
                        ShortString::from(exchange.as_str()),
                        ShortString::from(m.destination.as_str()),
                        options,
                        &m.message.payload,
                        properties(m),
                    )
                    .await;
                match sent {
                    Ok(confirm) => confirms.push(confirm),
                    Err(e) => return (confirms, Some(e.to_string())),
                }
            }
            (confirms, None)
        });
        let (confirms, send_error) = outcome;
        let mut confirmed = 0;
        for confirm in confirms {
            match self
                .runtime
                .block_on(async { tokio::time::timeout(timeout, confirm).await })
            {
                Ok(Ok(c)) => {
                    let acked = c.is_ack();
                    let returned = c.take_message().is_some();
                    if !acked {
                        return Err(self.fail(confirmed, "nacked by the broker"));
                    }
                    if returned {
                        return Err(self.fail(confirmed, "unroutable: returned by the broker"));
                    }
                    confirmed += 1;
                }
                Ok(Err(e)) => return Err(self.fail(confirmed, e)),
                Err(_) => return Err(self.fail(confirmed, "confirm timed out")),
            }
        }
        match send_error {
            Some(e) => Err(self.fail(confirmed, e)),
            None => Ok(()),
        }
    }
}
