//! The audit trail and time travel: every event of an order with its
//! metadata, and the order as it was at a version or a moment, with the
//! change each event made. Used by the gRPC API and by `shopctl orders`.

use chrono::{DateTime, Utc};
use es::{Aggregate as _, RecordedEvent};
use es_postgres::{EventStore, StorageError};
use order_domain::{DecodeError, Order, OrderEvent};
use uuid::Uuid;

/// Why history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error("stored event cannot be read: {0}")]
    Decode(#[from] DecodeError),
}

/// One event of the audit trail: as stored, and upcast to the current schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub recorded: RecordedEvent,
    pub event: OrderEvent,
}

/// A point in an order's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// After this many events.
    Version(i64),
    /// As of this moment.
    Time(DateTime<Utc>),
}

/// Every event of the order, oldest first (empty if it does not exist).
///
/// # Errors
///
/// See [`HistoryError`].
pub async fn trail(
    store: &EventStore,
    order_id: Uuid,
    at: Option<At>,
) -> Result<Vec<Entry>, HistoryError> {
    let stream = es::stream_id::<Order>(order_id);
    let (version, time) = match at {
        Some(At::Version(v)) => (Some(v), None),
        Some(At::Time(t)) => (None, Some(t)),
        None => (None, None),
    };
    let recorded = store.load_until(&stream, version, time).await?;
    recorded
        .into_iter()
        .map(|recorded| {
            let event = order_domain::decode(
                &recorded.event_type,
                recorded.schema_version,
                &recorded.payload,
            )?;
            Ok(Entry { recorded, event })
        })
        .collect()
}

/// The order as of `at`, or `None` if it did not exist yet.
///
/// # Errors
///
/// See [`HistoryError`].
pub async fn state_at(
    store: &EventStore,
    order_id: Uuid,
    at: At,
) -> Result<Option<(Order, Vec<Entry>)>, HistoryError> {
    let entries = trail(store, order_id, Some(at)).await?;
    if entries.is_empty() {
        return Ok(None);
    }
    let order = Order::replay(entries.iter().map(|e| &e.event));
    Ok(Some((order, entries)))
}

/// A field an event changed: name, value before, value after (JSON).
pub type Change = (String, serde_json::Value, serde_json::Value);

/// What changed between two states, field by field.
#[must_use]
pub fn diff(before: &Order, after: &Order) -> Vec<Change> {
    let (Ok(serde_json::Value::Object(before)), Ok(serde_json::Value::Object(after))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return Vec::new();
    };
    after
        .into_iter()
        .filter_map(|(field, new)| {
            let old = before
                .get(&field)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            (old != new).then_some((field, old, new))
        })
        .collect()
}

/// Each event with the changes it made, replaying from the start.
#[must_use]
pub fn changes(entries: &[Entry]) -> Vec<(&Entry, Vec<Change>)> {
    let mut state = Order::default();
    entries
        .iter()
        .map(|entry| {
            let before = state.clone();
            state.apply(&entry.event);
            (entry, diff(&before, &state))
        })
        .collect()
}
