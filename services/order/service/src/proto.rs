//! Domain values and stored events as the API shows them: one mapping,
//! used by the handlers (command answers, history) and the read models.

use contracts::order::v1 as pb;
use order_domain::{Order, OrderStatus};

use crate::{
    commands::{Outcome, Times},
    history, wire,
};

/// The API view of an aggregate state.
#[must_use]
pub fn order_to_proto(order: &Order, (created_at, updated_at): Times) -> pb::Order {
    let text = |value: Option<String>| value.unwrap_or_default();
    pb::Order {
        id: order.id.map(|id| id.to_string()).unwrap_or_default(),
        user_id: order.user_id.map(|id| id.to_string()).unwrap_or_default(),
        status: status_to_proto(order.status).into(),
        items: wire::order::lines(&order.lines),
        total: order.currency.as_ref().map(|currency| pb::Money {
            currency: currency.to_string(),
            amount_minor: order.total_minor,
        }),
        version: order.version,
        created_at: Some(contracts::timestamp(created_at)),
        updated_at: Some(contracts::timestamp(updated_at)),
        shipping_address: order.shipping_address.as_ref().map(wire::order::address),
        payment_reference: text(order.payment_reference.as_ref().map(ToString::to_string)),
        carrier: text(order.carrier.as_ref().map(ToString::to_string)),
        tracking_number: text(order.tracking_number.as_ref().map(ToString::to_string)),
        cancel_reason: text(order.cancel_reason.as_ref().map(ToString::to_string)),
    }
}

pub(crate) fn answer(outcome: &Outcome) -> (pb::Order, i64) {
    (
        order_to_proto(&outcome.order, outcome.times),
        outcome.position,
    )
}

pub(crate) fn entry_to_proto(entry: &history::Entry) -> pb::OrderEventRecord {
    let recorded = &entry.recorded;
    pb::OrderEventRecord {
        event_id: recorded.event_id.to_string(),
        version: recorded.version,
        position: recorded.position,
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        occurred_at: Some(contracts::timestamp(recorded.occurred_at)),
        correlation_id: recorded.context.correlation_id.to_string(),
        causation_id: recorded.context.causation_id.to_string(),
        actor: recorded.context.actor.clone(),
        traceparent: recorded.context.traceparent.clone().unwrap_or_default(),
        payload_json: serde_json::to_string(&entry.event).unwrap_or_default(),
    }
}

/// The API's status of a (possibly not yet created) order.
pub(crate) fn status_to_proto(status: Option<OrderStatus>) -> pb::OrderStatus {
    match status {
        None => pb::OrderStatus::Unspecified,
        Some(OrderStatus::Created) => pb::OrderStatus::Created,
        Some(OrderStatus::Paid) => pb::OrderStatus::Paid,
        Some(OrderStatus::Shipped) => pb::OrderStatus::Shipped,
        Some(OrderStatus::Delivered) => pb::OrderStatus::Delivered,
        Some(OrderStatus::Cancelled) => pb::OrderStatus::Cancelled,
    }
}
