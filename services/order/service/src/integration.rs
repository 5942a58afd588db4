//! `order.*` integration events: stored order events -> `shop.events.v1`.

use contracts::events::v1 as pb;
use es::RecordedEvent;
use es_postgres::{IntegrationMapper, integration, relay::MapError};
use messaging::OutboundMessage;
use order_domain::OrderEvent;

/// Maps order-service's stored events for the outbox relay.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderEvents;

impl IntegrationMapper for OrderEvents {
    fn map(&self, event: &RecordedEvent) -> Result<Option<OutboundMessage>, MapError> {
        let decoded: OrderEvent = event.decode().map_err(|e| MapError {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            reason: e.to_string(),
        })?;
        let message = match decoded {
            OrderEvent::Created {
                order_id,
                user_id,
                currency,
                lines,
                total_minor,
            } => integration::outbound(
                event,
                &pb::OrderCreated {
                    metadata: Some(integration::event_metadata(event)),
                    order_id: order_id.to_string(),
                    user_id: user_id.to_string(),
                    items: lines
                        .iter()
                        .map(|line| pb::OrderLine {
                            sku: line.sku.as_str().to_owned(),
                            quantity: i32::try_from(line.quantity.get()).unwrap_or(i32::MAX),
                            unit_price_minor: line.unit_price.minor(),
                        })
                        .collect(),
                    currency: currency.to_string(),
                    total_minor,
                },
            ),
        };
        Ok(Some(message))
    }
}
