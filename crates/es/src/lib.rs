//! Event-sourcing building blocks with no I/O: the [`Aggregate`] contract that
//! domain crates implement, the [`DomainEvent`] they emit, and the metadata
//! every stored event carries.
//!
//! This crate must stay free of tokio, sqlx and NATS so that domain crates can
//! depend on it and stay pure. Storage lives in `es-postgres`.

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// An event a domain emits: a past-tense fact with a stable type name and a
/// schema version, serialized as JSON into the event store.
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync
{
    /// Stable name, also the integration subject, e.g. `order.created`.
    fn event_type(&self) -> &'static str;

    /// Version of this event's payload schema; bump it when the payload's
    /// shape changes and add an upcaster for the old one.
    fn schema_version(&self) -> i32 {
        1
    }
}

/// An event-sourced aggregate: all rules in [`Aggregate::handle`], state
/// changes only in [`Aggregate::apply`].
pub trait Aggregate: Default + Clone + std::fmt::Debug + Send + Sync {
    /// What callers ask for (imperative).
    type Command;
    /// What happened (past tense).
    type Event: DomainEvent;
    /// Why a command was refused.
    type Error: std::error::Error;

    /// Prefix of the stream ids of this aggregate, e.g. `order`.
    const STREAM_PREFIX: &'static str;

    /// Decides which events a command produces, without changing state.
    ///
    /// # Errors
    ///
    /// Returns the domain error when the command breaks a rule in the current
    /// state.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event. Infallible: events are facts.
    fn apply(&mut self, event: &Self::Event);

    /// Folds a sequence of events into a fresh aggregate.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}

/// Identifies one aggregate instance's stream: `<prefix>-<uuid>`.
#[must_use]
pub fn stream_id<A: Aggregate>(id: Uuid) -> String {
    stream_name(A::STREAM_PREFIX, id)
}

/// The instance id in a stream named by [`stream_id`]; `None` for another
/// aggregate's stream or a malformed name.
#[must_use]
pub fn id_of_stream<A: Aggregate>(stream_id: &str) -> Option<Uuid> {
    stream_id
        .strip_prefix(A::STREAM_PREFIX)?
        .strip_prefix('-')
        .and_then(|id| Uuid::parse_str(id).ok())
}

/// How every stream is named, `<prefix>-<uuid>`, also for writers that
/// have no [`Aggregate`] type (user-service appends one event per user).
#[must_use]
pub fn stream_name(prefix: &str, id: Uuid) -> String {
    format!("{prefix}-{id}")
}

/// Who and what caused an event; stored on every event row and forwarded in
/// integration events and NATS headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventContext {
    /// Ties together everything one business flow caused.
    pub correlation_id: Uuid,
    /// The command or event that directly caused this one.
    pub causation_id: Uuid,
    /// User id, or `system`.
    pub actor: String,
    /// W3C `traceparent` of the span that wrote the event, if any.
    pub traceparent: Option<String>,
}

impl EventContext {
    /// A context for a new flow started by `actor`.
    #[must_use]
    pub fn new(actor: impl Into<String>) -> Self {
        let id = Uuid::now_v7();
        Self {
            correlation_id: id,
            causation_id: id,
            actor: actor.into(),
            traceparent: None,
        }
    }
}

/// An event as read back from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Global position (identity column); unique, but not commit-ordered.
    pub position: i64,
    pub event_id: Uuid,
    pub stream_id: String,
    /// 1-based version within the stream.
    pub version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
    pub context: EventContext,
}

impl RecordedEvent {
    /// Deserializes the payload into the domain event type.
    ///
    /// # Errors
    ///
    /// Fails when the payload does not match the current schema of `E`.
    pub fn decode<E: DomainEvent>(&self) -> Result<E, serde_json::Error> {
        E::deserialize(&self.payload)
    }
}
