//! JetStream topology and the two ways services touch it: publishing
//! integration events (pipelined, deduplicated by `Nats-Msg-Id`) and declaring
//! durable pull consumers.
//!
//! Streams use limits retention, never WorkQueue: WorkQueue allows one consumer
//! per subject, which would rule out a second subscriber (see
//! `docs/adr/0004-jetstream-topology.md`). Everything here is declared at start,
//! before anything is published, and is idempotent. No business rules.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::{CreateStreamError, PublishError},
    message::PublishMessage,
    publish::PublishAck,
    stream::{ConsumerError, DiscardPolicy, RetentionPolicy, StorageType},
};
use async_nats::{HeaderMap, header::NATS_MESSAGE_ID};
use bytes::Bytes;

pub mod dlq;

/// Header names set on every integration event besides `Nats-Msg-Id`.
pub mod headers {
    /// The event id (also `Nats-Msg-Id`), kept on dead letters.
    pub const EVENT_ID: &str = "Shop-Event-Id";
    /// Integration event type, equal to the subject, e.g. `order.created`.
    pub const EVENT_TYPE: &str = "Shop-Event-Type";
    /// Aggregate stream the event belongs to.
    pub const STREAM_ID: &str = "Shop-Stream-Id";
    /// 1-based version of the event within its aggregate stream.
    pub const STREAM_VERSION: &str = "Shop-Stream-Version";
    /// Correlation id of the business flow.
    pub const CORRELATION_ID: &str = "Shop-Correlation-Id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
}

/// A JetStream stream this system owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: &'static [&'static str],
}

/// `user.*` integration events, published by user-service.
pub const USERS_STREAM: StreamSpec = StreamSpec {
    name: "USERS",
    subjects: &["user.>"],
};

/// `order.*` integration events, published by order-service.
pub const ORDERS_STREAM: StreamSpec = StreamSpec {
    name: "ORDERS",
    subjects: &["order.>"],
};

/// Limits shared by every stream; replicas is 3 on a JetStream cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct StreamLimits {
    pub replicas: usize,
    /// Messages older than this are dropped; Postgres keeps the full history.
    pub max_age_secs: u64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window_secs: u64,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_age_secs: 7 * 24 * 3600,
            duplicate_window_secs: 120,
        }
    }
}

/// Why the topology could not be declared or a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("declaring stream {stream}: {source}")]
    Stream {
        stream: &'static str,
        #[source]
        source: CreateStreamError,
    },
    #[error("declaring consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: ConsumerError,
    },
    #[error("publishing {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: PublishError,
    },
}

/// Creates the stream if it does not exist (an existing one is left as is).
///
/// # Errors
///
/// Fails when JetStream is unreachable or rejects the configuration.
pub async fn ensure_stream(
    js: &jetstream::Context,
    spec: StreamSpec,
    limits: &StreamLimits,
) -> Result<jetstream::stream::Stream, MessagingError> {
    let config = jetstream::stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        num_replicas: limits.replicas,
        max_age: Duration::from_secs(limits.max_age_secs),
        duplicate_window: Duration::from_secs(limits.duplicate_window_secs),
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|source| MessagingError::Stream {
            stream: spec.name,
            source,
        })
}

/// A durable pull consumer a subscriber owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub stream: StreamSpec,
    pub durable_name: String,
    pub filter_subject: String,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message.
    pub max_deliver: i64,
    pub max_ack_pending: i64,
}

/// Declares the consumer's stream and the durable consumer itself, starting
/// from the first message so nothing published before it existed is missed.
///
/// # Errors
///
/// Fails when JetStream is unreachable or rejects the configuration.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    limits: &StreamLimits,
) -> Result<PullConsumer, MessagingError> {
    let stream = ensure_stream(js, spec.stream, limits).await?;
    let config = pull::Config {
        durable_name: Some(spec.durable_name.clone()),
        filter_subject: spec.filter_subject.clone(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver,
        max_ack_pending: spec.max_ack_pending,
        num_replicas: limits.replicas,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&spec.durable_name, config)
        .await
        .map_err(|source| MessagingError::Consumer {
            consumer: spec.durable_name.clone(),
            source,
        })
}

/// One integration event ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    pub subject: String,
    /// Becomes `Nats-Msg-Id`: JetStream drops a repeat within the duplicate window.
    pub message_id: String,
    pub headers: Vec<(&'static str, String)>,
    pub payload: Bytes,
}

/// Publishes every message without waiting in between, then awaits all acks
/// (pipelined: one round trip's latency for the whole batch).
///
/// # Errors
///
/// Fails on the first message JetStream did not acknowledge; the caller
/// republishes the batch, and dedup absorbs what had already landed.
pub async fn publish_all(
    js: &jetstream::Context,
    messages: &[OutboundMessage],
) -> Result<Vec<PublishAck>, MessagingError> {
    let mut pending = Vec::with_capacity(messages.len());
    for message in messages {
        // One header map with everything: `PublishMessage::headers` replaces
        // the map, so setting the id through the builder too would lose it.
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, message.message_id.as_str());
        for (name, value) in &message.headers {
            headers.insert(*name, value.as_str());
        }
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(headers);
        let ack = js
            .send_publish(message.subject.clone(), publish)
            .await
            .map_err(|source| MessagingError::Publish {
                subject: message.subject.clone(),
                source,
            })?;
        pending.push((message.subject.as_str(), ack));
    }
    let mut acks = Vec::with_capacity(pending.len());
    for (subject, ack) in pending {
        acks.push(ack.await.map_err(|source| MessagingError::Publish {
            subject: subject.to_owned(),
            source,
        })?);
    }
    Ok(acks)
}
