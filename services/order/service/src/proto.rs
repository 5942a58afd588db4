//! Domain values and stored events as the API shows them: one mapping,
//! used by the handlers (command answers, history) and the read models.

use contracts::order::v1 as pb;
use order_domain::{Order, OrderLine, OrderStatus, ShippingAddress};

use crate::{
    commands::{Outcome, Times},
    history,
};

/// The API view of an aggregate state.
#[must_use]
pub fn order_to_proto(order: &Order, (created_at, updated_at): Times) -> pb::Order {
    let text = |value: Option<String>| value.unwrap_or_default();
    pb::Order {
        id: order.id.map(|id| id.to_string()).unwrap_or_default(),
        user_id: order.user_id.map(|id| id.to_string()).unwrap_or_default(),
        status: status_to_proto(order.status).into(),
        items: lines_to_proto(&order.lines),
        total: order.currency.as_ref().map(|currency| pb::Money {
            currency: currency.to_string(),
            amount_minor: order.total_minor,
        }),
        version: order.version,
        created_at: Some(contracts::timestamp(created_at)),
        updated_at: Some(contracts::timestamp(updated_at)),
        shipping_address: order.shipping_address.as_ref().map(address_to_proto),
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

pub(crate) fn lines_to_proto(lines: &[OrderLine]) -> Vec<pb::OrderItem> {
    lines
        .iter()
        .map(|line| pb::OrderItem {
            sku: line.sku.as_str().to_owned(),
            quantity: i32::try_from(line.quantity.get()).unwrap_or(i32::MAX),
            unit_price_minor: line.unit_price.minor(),
        })
        .collect()
}

pub(crate) fn address_to_proto(address: &ShippingAddress) -> pb::ShippingAddress {
    pb::ShippingAddress {
        name: address.name.to_string(),
        line1: address.line1.to_string(),
        line2: address
            .line2
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        city: address.city.to_string(),
        postal_code: address.postal_code.to_string(),
        country: address.country.as_str().to_owned(),
    }
}
