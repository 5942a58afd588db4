//! Helpers for [`crate::IntegrationMapper`]s: the metadata block and the
//! headers every integration event carries, so each service's mapper only
//! builds its own payload.

use contracts::events::v1::EventMetadata;
use es::RecordedEvent;
use messaging::{OutboundMessage, headers};

/// The `metadata` field of a `shop.events.v1` message.
#[must_use]
pub fn event_metadata(event: &RecordedEvent) -> EventMetadata {
    EventMetadata {
        event_id: event.event_id.to_string(),
        stream_id: event.stream_id.clone(),
        stream_version: event.version,
        occurred_at: Some(contracts::timestamp(event.occurred_at)),
        correlation_id: event.context.correlation_id.to_string(),
        causation_id: event.context.causation_id.to_string(),
        actor: event.context.actor.clone(),
    }
}

/// An integration message for `event`: subject = event type, `Nats-Msg-Id` =
/// event id, and the correlation and trace headers.
#[must_use]
pub fn outbound(event: &RecordedEvent, payload: &impl prost::Message) -> OutboundMessage {
    let mut message_headers = vec![
        (headers::EVENT_TYPE, event.event_type.clone()),
        (headers::STREAM_ID, event.stream_id.clone()),
        (headers::STREAM_VERSION, event.version.to_string()),
        (
            headers::CORRELATION_ID,
            event.context.correlation_id.to_string(),
        ),
    ];
    if let Some(traceparent) = &event.context.traceparent {
        message_headers.push((headers::TRACEPARENT, traceparent.clone()));
    }
    OutboundMessage {
        subject: event.event_type.clone(),
        message_id: event.event_id.to_string(),
        headers: message_headers,
        payload: payload.encode_to_vec().into(),
    }
}
