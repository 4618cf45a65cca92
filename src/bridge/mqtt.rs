//! MQTT source (feature `mqtt`): an MQTT 5 persistent session at QoS 1 with manual acks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

use super::{Source, SourceError, message_id};
use crate::message::Message;

/// Subscribes to a topic filter in a persistent session (clean start off, session kept one
/// hour), so messages not acked before a crash are delivered again to the same client id.
pub struct MqttSource {
    options: MqttOptions,
    filter: String,
    runtime: tokio::runtime::Runtime,
    connection: Option<(AsyncClient, EventLoop)>,
    /// Publishes that arrived while acks were being written; handed out by the next fetch.
    arrived: VecDeque<Publish>,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// Subscribes to `filter` (MQTT syntax, `/`-separated) on the broker at `host:port` as
    /// `client_id`. Received topics become routing keys with `/` turned into `.`.
    ///
    /// # Errors
    ///
    /// When the private runtime cannot start.
    pub fn new(host: &str, port: u16, client_id: &str, filter: &str) -> Result<Self, SourceError> {
        let runtime = crate::runtime::private().map_err(SourceError::new)?;
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(3600));
        options.set_manual_acks(true);
        options.set_keep_alive(Duration::from_secs(30));
        Ok(MqttSource {
            options,
            filter: filter.to_owned(),
            runtime,
            connection: None,
            arrived: VecDeque::new(),
        })
    }

    fn connection(&mut self) -> Result<(AsyncClient, EventLoop), SourceError> {
        if let Some(c) = self.connection.take() {
            return Ok(c);
        }
        let (client, eventloop) = AsyncClient::new(self.options.clone(), 1024);
        let filter = self.filter.clone();
        self.runtime
            .block_on(client.subscribe(filter, QoS::AtLeastOnce))
            .map_err(SourceError::new)?;
        Ok((client, eventloop))
    }
}

fn to_message(p: &Publish) -> Message {
    let props = p.properties.as_ref();
    let user = props
        .map(|p| p.user_properties.as_slice())
        .unwrap_or_default();
    let sent_id = user
        .iter()
        .find(|(k, _)| k == "mqlite-id")
        .map(|(_, v)| v.as_str());
    let topic = String::from_utf8_lossy(&p.topic).replace('/', ".");
    let fallback = u128::from(crate::codec::crc32c(&[&p.payload])) << 64 | u128::from(p.pkid);
    let mut message = Message::new(p.payload.to_vec())
        .with_id(message_id(sent_id, fallback))
        .with_routing_key(topic);
    for (k, v) in user {
        if k != "mqlite-id" && k != "mqlite-key" {
            message = message.with_header(k.as_str(), v.as_bytes());
        }
    }
    message
}

impl Source for MqttSource {
    type Token = Publish;

    fn fetch(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<(Message, Publish)>, SourceError> {
        let (client, mut eventloop) = self.connection()?;
        let deadline = Instant::now() + timeout;
        let mut out: Vec<(Message, Publish)> = Vec::new();
        while out.len() < max {
            let Some(p) = self.arrived.pop_front() else {
                break;
            };
            out.push((to_message(&p), p));
        }
        let result = self.runtime.block_on(async {
            while out.len() < max {
                let wait = if out.is_empty() {
                    deadline.saturating_duration_since(Instant::now())
                } else {
                    Duration::from_millis(1)
                };
                match tokio::time::timeout(wait, eventloop.poll()).await {
                    Err(_) => break,
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        out.push((to_message(&p), p));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(SourceError::new(e)),
                }
            }
            Ok(())
        });
        let result = result.map(|()| out);
        if result.is_ok() {
            self.connection = Some((client, eventloop));
        }
        result
    }

    fn ack(&mut self, tokens: Vec<Publish>) -> Result<(), SourceError> {
        let (client, mut eventloop) = self.connection()?;
        let arrived = &mut self.arrived;
        let result = self.runtime.block_on(async {
            for p in &tokens {
                client.ack(p).await.map_err(SourceError::new)?;
            }
            // Drive the event loop until the PUBACKs are written.
            let mut written = 0;
            while written < tokens.len() {
                match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(rumqttc::Outgoing::PubAck(_)))) => written += 1,
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => arrived.push_back(p),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(SourceError::new(e)),
                    Err(_) => return Err(SourceError::new("acks not written in time")),
                }
            }
            Ok(())
        });
        if result.is_ok() {
            self.connection = Some((client, eventloop));
        }
        result
    }
}
