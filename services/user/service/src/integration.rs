//! `user.*` integration events: stored user events -> `shop.events.v1`.

use contracts::events::v1 as pb;
use es::RecordedEvent;
use es_postgres::{IntegrationMapper, integration, relay::MapError};
use messaging::OutboundMessage;
use user_domain::UserEvent;

/// Maps user-service's stored events for the outbox relay.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserEvents;

impl IntegrationMapper for UserEvents {
    fn map(&self, event: &RecordedEvent) -> Result<Option<OutboundMessage>, MapError> {
        let decoded: UserEvent = event.decode().map_err(|e| MapError {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            reason: e.to_string(),
        })?;
        let message = match decoded {
            UserEvent::Created { user_id, email } => integration::outbound(
                event,
                &pb::UserCreated {
                    metadata: Some(integration::event_metadata(event)),
                    user_id: user_id.to_string(),
                    email: email.to_string(),
                },
            ),
        };
        Ok(Some(message))
    }
}
