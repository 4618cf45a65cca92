//! MQTT sink (feature `mqtt`), MQTT 5 at QoS 1.
//!
//! The destination becomes the MQTT topic with every `.` turned into `/` (`orders.created` →
//! `orders/created`). The message id travels as user property `mqlite-id`, the key (hex) as
//! `mqlite-key`, headers as user properties (values as lossy UTF-8). A message is confirmed
//! by its PUBACK. MQTT brokers do not drop duplicates: the consumer's dedup table must.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

use super::{Sink, SinkError};
use crate::outbox::OutboxMessage;

/// The largest batch one publish call takes (the client's request queue).
const QUEUE: usize = 10_000;

/// Publishes to an MQTT 5 broker with a private single-thread tokio runtime. Connects lazily
/// and reconnects after a failure.
pub struct MqttSink {
    options: MqttOptions,
    runtime: tokio::runtime::Runtime,
    connection: Option<(AsyncClient, EventLoop)>,
    timeout: Duration,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink").finish_non_exhaustive()
    }
}

/// The MQTT topic for a destination: dots become slashes.
pub(crate) fn mqtt_topic(destination: &str) -> String {
    destination.replace('.', "/")
}

impl MqttSink {
    /// A sink for the broker at `host:port`, with client id `client_id`.
    ///
    /// # Errors
    ///
    /// When the private runtime cannot start.
    pub fn new(host: &str, port: u16, client_id: &str) -> Result<Self, SinkError> {
        let runtime = crate::runtime::private().map_err(|e| SinkError::new(0, e))?;
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        Ok(MqttSink {
            options,
            runtime,
            connection: None,
            timeout: Duration::from_secs(5),
        })
    }

    fn fail(&mut self, confirmed: usize, error: impl std::fmt::Display) -> SinkError {
        self.connection = None;
        SinkError::new(confirmed, error)
    }
}

fn properties(m: &OutboxMessage) -> PublishProperties {
    let mut user = vec![("mqlite-id".to_owned(), m.message.id.to_string())];
    if let Some(key) = &m.message.key {
        user.push((
            "mqlite-key".to_owned(),
            key.iter().map(|b| format!("{b:02x}")).collect(),
        ));
    }
    for (name, value) in &m.message.headers {
        user.push((name.clone(), String::from_utf8_lossy(value).into_owned()));
    }
    PublishProperties {
        user_properties: user,
        ..PublishProperties::default()
    }
}

impl Sink for MqttSink {
    fn publish(&mut self, messages: &[OutboxMessage]) -> Result<(), SinkError> {
        if messages.len() > QUEUE {
            return Err(SinkError::new(0, format!("batch over {QUEUE} messages")));
        }
        let (client, mut eventloop) = match self.connection.take() {
            Some(c) => c,
            None => AsyncClient::new(self.options.clone(), QUEUE),
        };
        let timeout = self.timeout;
        let outcome = self.runtime.block_on(async {
            for m in messages {
                let topic = mqtt_topic(&m.destination);
                let sent = client
                    .publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        m.message.payload.to_vec(),
                        properties(m),
                    )
                    .await;
                if let Err(e) = sent {
                    return (0, Some(e.to_string()));
                }
            }
            // Publishes go out in order, each with a packet id; PUBACKs may come in any order.
            let mut sent: VecDeque<u16> = VecDeque::new();
            let mut acked: HashSet<u16> = HashSet::new();
            let mut confirmed = 0;
            while confirmed < messages.len() {
                match tokio::time::timeout(timeout, eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => sent.push_back(pkid),
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        acked.insert(ack.pkid);
                        while sent.front().is_some_and(|p| acked.remove(p)) {
                            sent.pop_front();
                            confirmed += 1;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return (confirmed, Some(e.to_string())),
                    Err(_) => return (confirmed, Some("no PUBACK in time".to_owned())),
                }
            }
            (confirmed, None)
        });
        match outcome {
            (_, None) => {
                self.connection = Some((client, eventloop));
                Ok(())
            }
            (confirmed, Some(error)) => Err(self.fail(confirmed, error)),
        }
    }
}
