#![doc = include_str!("../README.md")]
//!
//! # Where things are
//!
//! - [`Database`] and [`Builder`]: open a file, [`Database::write`] and [`Database::read`].
//! - [`WriteTransaction`]: topics, queues, bindings, the outbox and dedup, and your own tables,
//!   in one commit. [`ReadTransaction`]: the same things, read from a snapshot.
//! - [`Message`], [`MessageId`], [`Payload`]: what is published.
//! - [`Consumer`] (topics) and [`Database::receive`] (queues): blocking consumption.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bridge;
mod clock;
mod codec;
mod commit;
mod consumer;
mod db;
mod dedup;
mod dump;
mod error;
mod id_hash;
mod inspect;
mod journal;
mod message;
mod names;
mod outbox;
mod payload;
mod queue;
mod relay;
mod routing;
#[cfg(any(
    feature = "amqp",
    feature = "kafka",
    feature = "mqtt",
    feature = "nats"
))]
mod runtime;
mod schema;
mod store;
#[cfg(feature = "async")]
mod stream;
mod topic;
mod txn;
mod worker;

/// The redb version mqlite is built on, for the application's own tables.
pub use redb;

#[cfg(feature = "amqp")]
pub use bridge::AmqpSource;
#[cfg(feature = "mqtt")]
pub use bridge::MqttSource;
#[cfg(feature = "nats")]
pub use bridge::NatsSource;
pub use bridge::{
    Bridge, BridgeHandle, BridgeStats, BridgeStep, BridgeTarget, Source, SourceError,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::EntryState;
pub use consumer::{Consumer, ProcessReport};
pub use db::{Builder, CreateStep, Database, Durability, Limits};
pub use dedup::{DEFAULT_DEDUP_TTL_MS, Dedup};
pub use dump::DumpReport;
pub use error::{Error, Result};
pub use inspect::{
    CheckReport, CommitMetrics, CompactReport, Metrics, ReadOnlyDatabase, TopicMetrics,
};
pub use message::{Message, MessageId};
pub use names::MAX_NAME_BYTES;
pub use outbox::{OutboxInfo, OutboxMessage};
pub use payload::Payload;
pub use queue::{
    Death, DeathReason, Delivery, EnqueueOptions, Lease, MAX_DELIVERIES_LIMIT, MAX_LEASE_MS,
    MAX_PRIORITY, Nack, Overflow, QueueConfig, QueueInfo, QueuedMessage,
};
#[cfg(feature = "amqp")]
pub use relay::AmqpSink;
#[cfg(feature = "kafka")]
pub use relay::KafkaSink;
#[cfg(feature = "mqtt")]
pub use relay::MqttSink;
#[cfg(feature = "nats")]
pub use relay::NatsSink;
pub use relay::{
    FnSink, MqliteSink, Relay, RelayConfig, RelayHandle, RelayStats, RelayStep, Sink, SinkError,
};
pub use routing::{Binding, BindingInfo, HeaderMatch, MAX_ROUTING_KEY_BYTES, pattern_matches};
#[cfg(feature = "async")]
pub use stream::{Deliveries, WriteFuture};
pub use topic::{GroupInfo, Record, Retention, RetentionReport, StartAt, TopicConfig, TopicInfo};
pub use txn::{ReadTransaction, WriteTransaction};
pub use worker::WorkerHandle;

#[doc(hidden)]
pub use codec::{
    fuzz_decode_batch, fuzz_decode_message, fuzz_encode_batch, fuzz_encode_message, fuzz_seal_batch,
};

/// Helpers the unit tests of several modules share.
#[cfg(test)]
mod testing {
    /// A seeded source of numbers below `n`, for the model tests.
    pub(crate) fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }
}
