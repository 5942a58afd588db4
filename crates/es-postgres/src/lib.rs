//! Postgres adapter of the event store: append with optimistic concurrency and
//! idempotency keys in one statement, load a stream, and the outbox relay that
//! publishes committed events to JetStream in a gap-safe order.
//!
//! Knows nothing of any domain: payloads are JSON, and turning a stored event
//! into an integration message is the caller's [`relay::IntegrationMapper`].

mod group;
pub mod integration;
pub mod projection;
pub mod relay;
pub mod store;
pub mod tail;

/// What reading the store fails with (classified: unreachable or refused).
pub use platform::db::StorageError;
pub use relay::{IntegrationMapper, Relay, RelayConfig};
pub use store::{
    AppendError, Appended, CommandLoad, EventStore, IdempotencyKey, NewEvent, Snapshot,
    SnapshotWrite, UsedKey,
};

/// The current time at the precision Postgres stores (microseconds), so a
/// value returned before a write equals the value read back after it.
#[must_use]
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound as _;
    chrono::Utc::now().trunc_subsecs(6)
}

/// Migrations of the event store tables (`events`, `idempotency_keys`,
/// `outbox_checkpoints`). Services run them beside their own migrations
/// (`platform::db::migrate`); their versions never overlap.
#[must_use]
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("./migrations")
}
