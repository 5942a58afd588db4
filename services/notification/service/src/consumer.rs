//! JetStream -> notifications. Each subscribed stream has a durable pull
//! consumer; a message is acked only after its notification is committed, so
//! a crash redelivers it and the unique (event, channel) key absorbs the
//! repeat. A message that cannot be decoded is terminated (never redelivered)
//! and logged; a database failure is NAKed with a delay.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use chrono::{DateTime, Utc};
use contracts::events::v1 as pb;
use futures::StreamExt as _;
use notification_domain::{Channel, Trigger};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{NotificationStore, Source};

/// Why a message could not be turned into a trigger. Not retryable.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a valid {0}: {1}")]
    Protobuf(&'static str, prost::DecodeError),
    #[error("{0} is missing or malformed")]
    Field(&'static str),
}

/// What a message means for notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub trigger: Trigger,
}

fn uuid(field: &'static str, raw: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(raw).map_err(|_| DecodeError::Field(field))
}

fn metadata(meta: Option<&pb::EventMetadata>) -> Result<(Uuid, DateTime<Utc>), DecodeError> {
    let meta = meta.ok_or(DecodeError::Field("metadata"))?;
    let event_id = uuid("metadata.event_id", &meta.event_id)?;
    let occurred_at = meta
        .occurred_at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .ok_or(DecodeError::Field("metadata.occurred_at"))?;
    Ok((event_id, occurred_at))
}

/// Decodes an integration event; `Ok(None)` for subjects that cause no
/// notification.
///
/// # Errors
///
/// A payload that does not match its subject's schema.
pub fn decode(subject: &str, payload: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    let decoded = match subject {
        "user.created" => {
            let event = pb::UserCreated::decode(payload)
                .map_err(|e| DecodeError::Protobuf("UserCreated", e))?;
            let (event_id, occurred_at) = metadata(event.metadata.as_ref())?;
            Decoded {
                event_id,
                occurred_at,
                trigger: Trigger::UserCreated {
                    user_id: uuid("user_id", &event.user_id)?,
                    email: event.email,
                },
            }
        }
        "order.created" => {
            let event = pb::OrderCreated::decode(payload)
                .map_err(|e| DecodeError::Protobuf("OrderCreated", e))?;
            let (event_id, occurred_at) = metadata(event.metadata.as_ref())?;
            Decoded {
                event_id,
                occurred_at,
                trigger: Trigger::OrderCreated {
                    order_id: uuid("order_id", &event.order_id)?,
                    user_id: uuid("user_id", &event.user_id)?,
                    item_count: event
                        .items
                        .iter()
                        .map(|i| usize::try_from(i.quantity).unwrap_or(0))
                        .sum(),
                    currency: event.currency,
                    total_minor: event.total_minor,
                },
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(decoded))
}

/// Consumes one durable consumer until `shutdown`, resubscribing after
/// connection trouble.
pub async fn run(consumer: PullConsumer, store: NotificationStore, shutdown: CancellationToken) {
    let name = consumer.cached_info().name.clone();
    while !shutdown.is_cancelled() {
        match consumer.messages().await {
            Ok(mut messages) => loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => handle(&store, message).await,
                    Some(Err(error)) => {
                        tracing::warn!(consumer = %name, %error, "consumer stream error");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => tracing::warn!(consumer = %name, %error, "cannot pull messages"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    tracing::info!(consumer = %name, "consumer stopped");
}

async fn handle(store: &NotificationStore, message: jetstream::Message) {
    let subject = message.subject.as_str().to_owned();
    let outcome = match decode(&subject, &message.payload) {
        Ok(None) => AckKind::Ack,
        Ok(Some(decoded)) => {
            let rendered = decoded.trigger.render();
            let source = Source {
                event_id: decoded.event_id,
                event_type: &subject,
                occurred_at: decoded.occurred_at,
            };
            match store.record(source, Channel::Log, &rendered).await {
                Ok(true) => {
                    tracing::info!(
                        channel = "log",
                        user_id = %rendered.user_id,
                        event_id = %decoded.event_id,
                        subject = %rendered.subject,
                        body = %rendered.body,
                        "notification delivered"
                    );
                    AckKind::Ack
                }
                Ok(false) => {
                    tracing::debug!(event_id = %decoded.event_id, "duplicate delivery absorbed");
                    AckKind::Ack
                }
                Err(error) => {
                    tracing::warn!(%error, %subject, "cannot record notification; will retry");
                    AckKind::Nak(Some(Duration::from_secs(1)))
                }
            }
        }
        Err(error) => {
            tracing::error!(%error, %subject, "undecodable event terminated");
            AckKind::Term
        }
    };
    if let Err(error) = message.ack_with(outcome).await {
        tracing::warn!(%error, %subject, "ack failed; the message will be redelivered");
    }
}
