//! Integration events (`shop.events.v1`, protobuf) into what this service
//! acts on. Subjects are named here once.

use chrono::{DateTime, Utc};
use contracts::events::v1 as pb;
use notification_domain::Trigger;
use uuid::Uuid;

/// The subjects this service acts on; anything else is acked and ignored.
pub(super) const USER_CREATED: &str = "user.created";
pub(super) const ORDER_CREATED: &str = "order.created";
pub(super) const ORDER_PAID: &str = "order.paid";
pub(super) const ORDER_SHIPPED: &str = "order.shipped";
pub(super) const ORDER_DELIVERED: &str = "order.delivered";
pub(super) const ORDER_CANCELLED: &str = "order.cancelled";

/// Every subject above.
pub const SUBJECTS: [&str; 6] = [
    USER_CREATED,
    ORDER_CREATED,
    ORDER_PAID,
    ORDER_SHIPPED,
    ORDER_DELIVERED,
    ORDER_CANCELLED,
];

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
    /// The notification it causes, if any (`order.delivered` causes none).
    pub trigger: Option<Trigger>,
    /// For order events: the order and the event's version in it.
    pub order: Option<(Uuid, i64)>,
}

fn uuid(field: &'static str, raw: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(raw).map_err(|_| DecodeError::Field(field))
}

struct Meta {
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    version: i64,
}

fn metadata(meta: Option<&pb::EventMetadata>) -> Result<Meta, DecodeError> {
    let meta = meta.ok_or(DecodeError::Field("metadata"))?;
    let event_id = uuid("metadata.event_id", &meta.event_id)?;
    let occurred_at = meta
        .occurred_at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .ok_or(DecodeError::Field("metadata.occurred_at"))?;
    Ok(Meta {
        event_id,
        occurred_at,
        version: meta.stream_version,
    })
}

fn units(items: &[pb::OrderLine]) -> u64 {
    items
        .iter()
        .map(|i| u64::try_from(i.quantity).unwrap_or(0))
        .sum()
}

fn decode_as<M: prost::Message + Default>(
    name: &'static str,
    payload: &[u8],
) -> Result<M, DecodeError> {
    M::decode(payload).map_err(|e| DecodeError::Protobuf(name, e))
}

/// An order event's common parts: its metadata, order and user.
fn order_event(
    meta: Option<&pb::EventMetadata>,
    order_id: &str,
    user_id: &str,
) -> Result<(Meta, Uuid, Uuid), DecodeError> {
    Ok((
        metadata(meta)?,
        uuid("order_id", order_id)?,
        uuid("user_id", user_id)?,
    ))
}

/// Decodes an integration event; `Ok(None)` for subjects this service
/// ignores.
///
/// # Errors
///
/// A payload that does not match its subject's schema.
pub fn decode(subject: &str, payload: &[u8]) -> Result<Option<Decoded>, DecodeError> {
    let (meta, order, trigger) = match subject {
        USER_CREATED => {
            let e: pb::UserCreated = decode_as("UserCreated", payload)?;
            let trigger = Trigger::UserCreated {
                user_id: uuid("user_id", &e.user_id)?,
                email: e.email,
            };
            (metadata(e.metadata.as_ref())?, None, Some(trigger))
        }
        ORDER_CREATED => {
            let e: pb::OrderCreated = decode_as("OrderCreated", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let trigger = Trigger::OrderCreated {
                order_id,
                user_id,
                item_count: units(&e.items),
                currency: e.currency,
                total_minor: e.total_minor,
            };
            (meta, Some(order_id), Some(trigger))
        }
        ORDER_PAID => {
            let e: pb::OrderPaid = decode_as("OrderPaid", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let trigger = Trigger::OrderPaid {
                order_id,
                user_id,
                currency: e.currency,
                amount_minor: e.amount_minor,
                payment_reference: e.payment_reference,
            };
            (meta, Some(order_id), Some(trigger))
        }
        ORDER_SHIPPED => {
            let e: pb::OrderShipped = decode_as("OrderShipped", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let destination = e
                .shipping_address
                .map(|a| format!("{}, {}", a.city, a.country))
                .unwrap_or_else(|| "you".to_owned());
            let trigger = Trigger::OrderShipped {
                order_id,
                user_id,
                carrier: e.carrier,
                tracking_number: e.tracking_number,
                item_count: units(&e.items),
                destination,
            };
            (meta, Some(order_id), Some(trigger))
        }
        ORDER_DELIVERED => {
            let e: pb::OrderDelivered = decode_as("OrderDelivered", payload)?;
            let (meta, order_id, _) = order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            (meta, Some(order_id), None)
        }
        ORDER_CANCELLED => {
            let e: pb::OrderCancelled = decode_as("OrderCancelled", payload)?;
            let (meta, order_id, user_id) =
                order_event(e.metadata.as_ref(), &e.order_id, &e.user_id)?;
            let trigger = Trigger::OrderCancelled {
                order_id,
                user_id,
                reason: e.reason,
                currency: e.currency,
                refund_minor: e.refund_minor,
            };
            (meta, Some(order_id), Some(trigger))
        }
        _ => return Ok(None),
    };
    Ok(Some(Decoded {
        event_id: meta.event_id,
        occurred_at: meta.occurred_at,
        trigger,
        order: order.map(|id| (id, meta.version)),
    }))
}
