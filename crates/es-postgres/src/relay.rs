//! The outbox relay: publishes committed events to JetStream in a gap-safe
//! order and records how far it got.
//!
//! # Why not `WHERE position > last`
//!
//! `position` is taken at insert but becomes visible at commit, so a slow
//! transaction can commit position 7 after position 8 was read and the cursor
//! moved past it: the event is skipped forever. The relay instead reads only
//! rows whose writing transaction is older than the oldest transaction still
//! running (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`), in
//! `(tx_id, position)` order. Below that horizon nothing can appear any more,
//! so the cursor `(tx_id, position)` never passes an event that commits later.
//! A long-running writer delays publication; it never loses an event.
//!
//! # Delivery
//!
//! Publishes are pipelined and every ack is awaited before the checkpoint
//! moves, so a crash republishes at most one batch, which JetStream drops as
//! duplicates (`Nats-Msg-Id` = event id). Only one relay per database runs at a
//! time: it holds a session advisory lock on its own connection.

use std::time::Duration;

use async_nats::jetstream;
use es::RecordedEvent;
use messaging::OutboundMessage;
use sqlx::{Connection as _, PgConnection, Row as _, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use crate::store::{EVENT_COLUMNS, recorded_event};

/// Turns a stored event into the integration message to publish, or `None`
/// for events that stay private to the service.
pub trait IntegrationMapper: Send + Sync + 'static {
    /// # Errors
    ///
    /// A stored event that cannot be mapped stops the relay at that event
    /// (it is never skipped silently); the error is logged and retried.
    fn map(&self, event: &RecordedEvent) -> Result<Option<OutboundMessage>, MapError>;
}

/// Why a stored event could not become an integration message.
#[derive(Debug, thiserror::Error)]
#[error("cannot map event {event_id} ({event_type}): {reason}")]
pub struct MapError {
    pub event_id: uuid::Uuid,
    pub event_type: String,
    pub reason: String,
}

/// Tuning of one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Checkpoint name; one per (database, destination).
    pub name: String,
    pub batch_size: i64,
    /// Poll even without a NOTIFY, so a lost notification costs latency only.
    pub poll_interval: Duration,
    /// Pause after a failure (Postgres or NATS unreachable) before retrying.
    pub retry_delay: Duration,
}

impl RelayConfig {
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            retry_delay: Duration::from_millis(500),
        }
    }
}

/// Position of a relay in commit-safe order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `xid8` as text (sqlx has no native type for it).
    pub tx_id: String,
    pub position: i64,
}

impl Cursor {
    fn start() -> Self {
        Self {
            tx_id: "0".to_owned(),
            position: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Publish(#[from] messaging::MessagingError),
}

/// The outbox relay of one service database.
pub struct Relay {
    database_url: String,
    js: jetstream::Context,
    mapper: Box<dyn IntegrationMapper>,
    config: RelayConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

const LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('shop.outbox.' || $1))";
const CHANNEL: &str = "events_appended";

impl Relay {
    #[must_use]
    pub fn new(
        database_url: impl Into<String>,
        js: jetstream::Context,
        mapper: impl IntegrationMapper,
        config: RelayConfig,
    ) -> Self {
        Self {
            database_url: database_url.into(),
            js,
            mapper: Box::new(mapper),
            config,
        }
    }

    /// Runs until `shutdown` fires, surviving Postgres and NATS outages.
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.lead(&shutdown).await {
                tracing::warn!(relay = %self.config.name, %error, "outbox relay interrupted; retrying");
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.config.retry_delay) => {}
            }
        }
        tracing::info!(relay = %self.config.name, "outbox relay stopped");
    }

    /// Takes the relay lock, then publishes until shutdown or an error.
    async fn lead(&self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let mut conn = PgConnection::connect(&self.database_url).await?;
        loop {
            let locked: bool = sqlx::query_scalar(LOCK_SQL)
                .bind(&self.config.name)
                .fetch_one(&mut conn)
                .await?;
            if locked {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.config.poll_interval * 4) => {}
            }
        }
        let mut listener = PgListener::connect(&self.database_url).await?;
        listener.listen(CHANNEL).await?;
        let mut cursor = load_cursor(&mut conn, &self.config.name).await?;
        tracing::info!(relay = %self.config.name, ?cursor, "outbox relay leading");
        loop {
            let published = self.publish_batch(&mut conn, &mut cursor).await?;
            if published as i64 >= self.config.batch_size {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                notification = listener.recv() => { notification?; }
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// Publishes the next batch past `cursor` and moves the checkpoint.
    async fn publish_batch(
        &self,
        conn: &mut PgConnection,
        cursor: &mut Cursor,
    ) -> Result<usize, RelayError> {
        let events = read_batch(conn, cursor, self.config.batch_size).await?;
        let Some((last, _)) = events.last() else {
            return Ok(0);
        };
        let next = last.clone();
        let messages = events
            .iter()
            .map(|(_, event)| self.mapper.map(event))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()?;
        messaging::publish_all(&self.js, &messages).await?;
        save_cursor(conn, &self.config.name, &next).await?;
        tracing::debug!(relay = %self.config.name, count = events.len(), "published");
        *cursor = next;
        Ok(events.len())
    }
}

/// The next events past `cursor` whose transactions can no longer be joined
/// by an earlier, still running one (see the module docs).
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn read_batch(
    conn: &mut PgConnection,
    cursor: &Cursor,
    limit: i64,
) -> Result<Vec<(Cursor, RecordedEvent)>, sqlx::Error> {
    let sql = format!(
        "SELECT tx_id::text AS tx_text, {EVENT_COLUMNS} FROM events \
         WHERE (tx_id, position) > ($1::text::xid8, $2) \
           AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY tx_id, position LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&cursor.tx_id)
        .bind(cursor.position)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| {
            let event = recorded_event(row)?;
            let cursor = Cursor {
                tx_id: row.try_get("tx_text")?,
                position: event.position,
            };
            Ok((cursor, event))
        })
        .collect()
}

async fn load_cursor(conn: &mut PgConnection, name: &str) -> Result<Cursor, sqlx::Error> {
    let row = sqlx::query(
        "SELECT tx_id::text AS tx_text, position FROM outbox_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?;
    match row {
        Some(row) => Ok(Cursor {
            tx_id: row.try_get("tx_text")?,
            position: row.try_get("position")?,
        }),
        None => Ok(Cursor::start()),
    }
}

async fn save_cursor(
    conn: &mut PgConnection,
    name: &str,
    cursor: &Cursor,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox_checkpoints (name, tx_id, position) VALUES ($1, $2::text::xid8, $3) \
         ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()",
    )
    .bind(name)
    .bind(&cursor.tx_id)
    .bind(cursor.position)
    .execute(conn)
    .await?;
    Ok(())
}
