//! Kafka sink (feature `kafka`), through rdkafka with its bundled librdkafka.
//!
//! The destination is the Kafka topic (Kafka allows `.` in names), the message key is the
//! record key, the message id travels as header `mqlite-id` and the routing key as
//! `mqlite-routing-key`; headers are record headers. The producer is idempotent
//! (`enable.idempotence=true`), so librdkafka's own retries add no duplicates; a re-send after
//! a relay crash must be dropped by the consumer's dedup table. A record is confirmed by its
//! delivery report.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{Sink, SinkError};
use crate::outbox::OutboxMessage;

/// Publishes to Kafka with a private single-thread tokio runtime driving the delivery futures.
pub struct KafkaSink {
    producer: FutureProducer,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// A sink for the cluster at `bootstrap_servers`. Deliveries time out after 5 seconds
    /// (`message.timeout.ms`); the relay retries them.
    ///
    /// # Errors
    ///
    /// When the producer or the runtime cannot be created.
    pub fn new(bootstrap_servers: &str) -> Result<Self, SinkError> {
        KafkaSink::with_options(bootstrap_servers, &[])
    }

    /// A sink with extra librdkafka producer settings, applied after the defaults (for example
    /// `("message.timeout.ms", "500")`).
    ///
    /// # Errors
    ///
    /// When the producer or the runtime cannot be created.
    pub fn with_options(
        bootstrap_servers: &str,
        options: &[(&str, &str)],
    ) -> Result<Self, SinkError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "5000");
        for (key, value) in options {
            config.set(*key, *value);
        }
        let producer = config.create().map_err(|e| SinkError::new(0, e))?;
        let runtime = crate::runtime::private().map_err(|e| SinkError::new(0, e))?;
        Ok(KafkaSink {
            producer,
            runtime,
            timeout: Duration::from_secs(10),
        })
    }
}

impl Sink for KafkaSink {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut send_error = None;
        for m in messages {
            let id = m.message.id.to_string();
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "mqlite-id",
                    value: Some(id.as_bytes()),
                })
                .insert(Header {
                    key: "mqlite-routing-key",
                    value: Some(m.message.routing_key.as_bytes()),
                });
            for (name, value) in &m.message.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_slice()),
                });
            }
            let mut record = FutureRecord::to(&m.destination)
                .payload(m.message.payload.as_slice())
                .headers(headers)
                .timestamp(i64::try_from(m.message.timestamp_ms).unwrap_or(i64::MAX));
            if let Some(key) = &m.message.key {
                record = record.key(key);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    send_error = Some(e.to_string());
                    break;
                }
            }
        }
        let mut confirmed = 0;
        for delivery in deliveries {
            match self
                .runtime
                .block_on(async { tokio::time::timeout(self.timeout, delivery).await })
            {
                Ok(Ok(Ok(_))) => confirmed += 1,
                Ok(Ok(Err((e, _)))) => return Err(SinkError::new(confirmed, e)),
                Ok(Err(_)) => {
                    return Err(SinkError::new(confirmed, "producer dropped the delivery"));
                }
                Err(_) => return Err(SinkError::new(confirmed, "delivery report timed out")),
            }
        }
        match send_error {
            Some(e) => Err(SinkError::new(confirmed, e)),
            None => Ok(()),
        }
    }
}
