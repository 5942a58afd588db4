//! `order.*` integration events: stored order events (any schema version)
//! -> `shop.events.v1`.

use contracts::events::v1 as pb;
use es::RecordedEvent;
use es_postgres::{IntegrationMapper, integration, relay::MapError};
use messaging::OutboundMessage;
use order_domain::OrderEvent;

use crate::wire;

/// Maps order-service's stored events for the outbox relay.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderEvents;

impl IntegrationMapper for OrderEvents {
    fn map(&self, event: &RecordedEvent) -> Result<Option<OutboundMessage>, MapError> {
        let decoded = order_domain::decode(&event.event_type, event.schema_version, &event.payload)
            .map_err(|e| MapError {
                event_id: event.event_id,
                event_type: event.event_type.clone(),
                reason: e.to_string(),
            })?;
        let metadata = Some(integration::event_metadata(event));
        let message = match decoded {
            OrderEvent::Created {
                order_id,
                user_id,
                currency,
                lines: items,
                total_minor,
                ..
            } => integration::outbound(
                event,
                &pb::OrderCreated {
                    metadata,
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                    items: wire::events::lines(&items),
                    currency: currency.to_string(),
                    total_minor,
                },
            ),
            OrderEvent::Paid {
                order_id,
                user_id,
                payment_reference,
                amount_minor,
                currency,
            } => integration::outbound(
                event,
                &pb::OrderPaid {
                    metadata,
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                    payment_reference: payment_reference.to_string(),
                    currency: currency.to_string(),
                    amount_minor,
                },
            ),
            OrderEvent::Shipped {
                order_id,
                user_id,
                carrier,
                tracking_number,
                currency,
                lines: items,
                total_minor,
                shipping_address,
            } => integration::outbound(
                event,
                &pb::OrderShipped {
                    metadata,
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                    carrier: carrier.to_string(),
                    tracking_number: tracking_number.to_string(),
                    items: wire::events::lines(&items),
                    currency: currency.to_string(),
                    total_minor,
                    shipping_address: Some(wire::events::address(&shipping_address)),
                },
            ),
            OrderEvent::Delivered { order_id, user_id } => integration::outbound(
                event,
                &pb::OrderDelivered {
                    metadata,
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                },
            ),
            OrderEvent::Cancelled {
                order_id,
                user_id,
                reason,
                refund_minor,
                currency,
            } => integration::outbound(
                event,
                &pb::OrderCancelled {
                    metadata,
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                    reason: reason.to_string(),
                    currency: currency.to_string(),
                    refund_minor,
                },
            ),
        };
        Ok(Some(message))
    }
}
