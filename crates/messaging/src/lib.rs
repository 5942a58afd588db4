//! JetStream topology and the two ways services touch it: publishing
//! integration events (pipelined, deduplicated by `Nats-Msg-Id`) and declaring
//! durable pull consumers.
//!
//! Streams use limits retention, never WorkQueue: WorkQueue allows one consumer
//! per subject, which would rule out a second subscriber (see
//! `docs/adr/0004-jetstream-topology.md`). Everything here is declared at start,
//! before anything is published, and is idempotent. No business rules.

use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, ErrorCode,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::{CreateStreamError, CreateStreamErrorKind, PublishError},
    message::PublishMessage,
    publish::PublishAck,
    stream::{ConsumerError, ConsumerErrorKind, DiscardPolicy, RetentionPolicy, StorageType},
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
    #[error("reading stream {stream}: {reason}")]
    Lookup {
        stream: &'static str,
        reason: String,
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

fn stream_config(spec: StreamSpec, limits: &StreamLimits) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        num_replicas: limits.replicas,
        max_age: Duration::from_secs(limits.max_age_secs),
        duplicate_window: Duration::from_secs(limits.duplicate_window_secs),
        ..Default::default()
    }
}

/// Creates the stream if it does not exist; an existing one is left as is.
/// For readers of a stream (consumers, operator tools); its owner calls
/// [`declare_stream`], which also applies changed settings.
///
/// # Errors
///
/// Fails when JetStream is unreachable or rejects the configuration.
pub async fn ensure_stream(
    js: &jetstream::Context,
    spec: StreamSpec,
    limits: &StreamLimits,
) -> Result<jetstream::stream::Stream, MessagingError> {
    get_or_create(js, &stream_config(spec, limits))
        .await
        .map_err(|source| MessagingError::Stream {
            stream: spec.name,
            source,
        })
}

/// How long a declaration keeps asking while JetStream is not ready to
/// answer: a cluster that has just started elects its meta leader and
/// places replicated streams over a few seconds, and the replicas of a
/// service race to declare the same stream meanwhile.
const SETTLE: Duration = Duration::from_secs(30);
const SETTLE_STEP: Duration = Duration::from_millis(250);

/// JetStream answers that mean "not yet" rather than "no": no meta leader,
/// no peers placed, or a racing declaration that created the stream first.
fn not_yet(code: ErrorCode) -> bool {
    [
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::CLUSTER_NOT_ACTIVE,
        ErrorCode::CLUSTER_NOT_ASSIGNED,
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::STREAM_NAME_EXIST,
    ]
    .contains(&code)
}

/// Runs `attempt` again while it fails with an error `not_ready` takes for
/// "not yet" (a cluster still forming), for at most [`SETTLE`].
async fn asking_again<T, E, Fut>(
    what: &str,
    mut attempt: impl FnMut() -> Fut,
    not_ready: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + SETTLE;
    loop {
        match attempt().await {
            Err(error) if not_ready(&error) && Instant::now() < deadline => {
                tracing::info!(what, %error, "JetStream not ready for the declaration yet; asking again");
                tokio::time::sleep(SETTLE_STEP).await;
            }
            done => return done,
        }
    }
}

/// `get_or_create_stream`, asked again while JetStream is still forming.
async fn get_or_create(
    js: &jetstream::Context,
    config: &jetstream::stream::Config,
) -> Result<jetstream::stream::Stream, CreateStreamError> {
    asking_again(
        &config.name,
        || js.get_or_create_stream(config.clone()),
        |error: &CreateStreamError| match error.kind() {
            CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
            CreateStreamErrorKind::JetStream(e) => not_yet(e.error_code()),
            _ => false,
        },
    )
    .await
}

/// What [`declare_stream`] did to an existing stream's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Settings changed to the configured value, as `name: old -> new`.
    pub changed: Vec<String>,
    /// Settings JetStream would not change, with its reason.
    pub refused: Vec<String>,
}

/// The owner's declaration of its stream: created if missing; if it exists
/// with other limits (max age, duplicate window, replicas), they are
/// updated to the configured ones, and any JetStream refuses (replicas on
/// a single server, for example) are logged as errors and returned: a
/// setting is never silently ignored.
///
/// # Errors
///
/// Fails when JetStream is unreachable or rejects creating the stream.
pub async fn declare_stream(
    js: &jetstream::Context,
    spec: StreamSpec,
    limits: &StreamLimits,
) -> Result<(jetstream::stream::Stream, Reconciled), MessagingError> {
    let wanted = stream_config(spec, limits);
    let error = |source| MessagingError::Stream {
        stream: spec.name,
        source,
    };
    let mut stream = get_or_create(js, &wanted).await.map_err(error)?;
    let current = stream.cached_info().config.clone();
    let mut reconciled = Reconciled::default();
    let mut differences = Vec::new();
    if current.max_age != wanted.max_age {
        differences.push(format!(
            "max_age: {:?} -> {:?}",
            current.max_age, wanted.max_age
        ));
    }
    if current.duplicate_window != wanted.duplicate_window {
        differences.push(format!(
            "duplicate_window: {:?} -> {:?}",
            current.duplicate_window, wanted.duplicate_window
        ));
    }
    // Copies the stream runs (its leader and the peers it replicates to),
    // which a single server may not match to the copies its config records.
    let running =
        |info: &jetstream::stream::Info| 1 + info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    let mut copies = running(stream.cached_info());
    // A stream just created on a cluster (by this process or by another
    // replica racing it) places its copies over a moment: wait for them
    // rather than "updating" a stream that already has the wanted setting.
    let placing = Instant::now() + SETTLE;
    while current.num_replicas == wanted.num_replicas
        && copies < wanted.num_replicas
        && Instant::now() < placing
    {
        tokio::time::sleep(SETTLE_STEP).await;
        if let Ok(info) = stream.info().await {
            copies = running(info);
        }
    }
    if current.num_replicas != wanted.num_replicas || copies != wanted.num_replicas.max(1) {
        differences.push(format!("replicas: {copies} -> {}", wanted.num_replicas));
    }
    if differences.is_empty() {
        return Ok((stream, reconciled));
    }
    let update = jetstream::stream::Config {
        max_age: wanted.max_age,
        duplicate_window: wanted.duplicate_window,
        num_replicas: wanted.num_replicas,
        ..current.clone()
    };
    match js.update_stream(&update).await {
        Ok(_) => {
            tracing::warn!(stream = spec.name, changes = ?differences, "stream settings updated to the configured ones");
            reconciled.changed = differences;
        }
        Err(refusal) => {
            // Apply what can be applied, one setting at a time, and say
            // which cannot.
            let mut applied = current.clone();
            for field in ["max_age", "duplicate_window", "replicas"] {
                let Some(difference) = differences.iter().find(|d| d.starts_with(field)) else {
                    continue;
                };
                let mut next = applied.clone();
                match field {
                    "max_age" => next.max_age = wanted.max_age,
                    "duplicate_window" => next.duplicate_window = wanted.duplicate_window,
                    _ => next.num_replicas = wanted.num_replicas,
                }
                match js.update_stream(&next).await {
                    Ok(_) => {
                        reconciled.changed.push(difference.clone());
                        applied = next;
                    }
                    Err(e) => {
                        tracing::error!(stream = spec.name, setting = field, wanted = %difference, error = %e, "JetStream refuses to change a stream setting; the stream keeps its old value");
                        reconciled.refused.push(format!("{difference} ({e})"));
                    }
                }
            }
            if reconciled.refused.is_empty() {
                tracing::warn!(stream = spec.name, %refusal, "stream settings updated one by one");
            }
        }
    }
    stream = js
        .get_stream(spec.name)
        .await
        .map_err(|e| MessagingError::Lookup {
            stream: spec.name,
            reason: e.to_string(),
        })?;
    // An accepted update is not always an applied one: a single server
    // records `replicas: 3` and keeps one copy. Believe only what the stream
    // runs now (its leader plus the peers it replicates to).
    let info = stream.cached_info();
    let now = info.config.clone();
    let running = 1 + info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    let kept = [
        ("max_age", now.max_age == wanted.max_age),
        (
            "duplicate_window",
            now.duplicate_window == wanted.duplicate_window,
        ),
        ("replicas", running == wanted.num_replicas.max(1)),
    ];
    for (field, applied) in kept {
        if applied {
            continue;
        }
        if let Some(position) = reconciled.changed.iter().position(|c| c.starts_with(field)) {
            let difference = reconciled.changed.remove(position);
            tracing::error!(stream = spec.name, setting = field, wanted = %difference, "JetStream accepted a stream setting but kept its old value");
            reconciled
                .refused
                .push(format!("{difference} (accepted, not applied)"));
        }
    }
    Ok((stream, reconciled))
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
    asking_again(
        &spec.durable_name,
        || stream.get_or_create_consumer(&spec.durable_name, config.clone()),
        |error: &ConsumerError| match error.kind() {
            ConsumerErrorKind::TimedOut => true,
            ConsumerErrorKind::JetStream(e) => {
                not_yet(e.error_code()) || e.error_code() == ErrorCode::CONSUMER_NAME_EXIST
            }
            _ => false,
        },
    )
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

/// Publishes every message without waiting in between, then awaits every
/// ack (pipelined: one round trip's latency for the whole batch). One
/// result per message, in order: a caller can tell exactly which landed
/// and republish only the others.
pub async fn publish_each(
    js: &jetstream::Context,
    messages: &[OutboundMessage],
) -> Vec<Result<PublishAck, MessagingError>> {
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
        let error = |source| MessagingError::Publish {
            subject: message.subject.clone(),
            source,
        };
        pending.push(
            js.send_publish(message.subject.clone(), publish)
                .await
                .map_err(error),
        );
    }
    // All acks are awaited together: each ack's timeout starts when it is
    // first polled, so awaiting them one by one would make a lost
    // connection cost one timeout per message in flight (a 500-message
    // batch stalled the relay for its whole 30 s step deadline when a NATS
    // node died); together they cost one timeout for the batch.
    let acks = messages
        .iter()
        .zip(pending)
        .map(|(message, sent)| async move {
            match sent {
                Ok(ack) => ack.await.map_err(|source| MessagingError::Publish {
                    subject: message.subject.clone(),
                    source,
                }),
                Err(error) => Err(error),
            }
        });
    futures::future::join_all(acks).await
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
    publish_each(js, messages).await.into_iter().collect()
}
