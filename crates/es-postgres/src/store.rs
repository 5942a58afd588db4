//! Append and load. One command costs at most two round trips: the load, and
//! one statement (writable CTEs) that inserts the events and the idempotency
//! key together. Concurrency control is `UNIQUE (stream_id, version)`, not a
//! lock.

use chrono::{DateTime, Utc};
use es::{DomainEvent, EventContext, RecordedEvent};
use platform::db::StorageError;
use sqlx::{PgExecutor, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
}

impl NewEvent {
    /// Serializes a domain event with a fresh time-ordered id.
    ///
    /// # Errors
    ///
    /// Fails only if the event cannot be represented as JSON.
    pub fn from_domain<E: DomainEvent>(
        event: &E,
        occurred_at: DateTime<Utc>,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_id: Uuid::now_v7(),
            event_type: event.event_type(),
            schema_version: event.schema_version(),
            payload: serde_json::to_value(event)?,
            occurred_at,
        })
    }
}

/// What an append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Stream version after the append.
    pub version: i64,
    /// Global position of the last event written: the read-your-writes token.
    pub position: i64,
}

/// An idempotency key with the fingerprint of the request it came with: a
/// retry must send the same request; the same key with a different request
/// is refused instead of answered with the first request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Unique per database (callers scope it, e.g. by user).
    pub key: String,
    /// Identifies the request (a hash of the command and its fields).
    pub fingerprint: String,
}

/// What a used idempotency key wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedKey {
    pub stream_id: String,
    pub appended: Appended,
    /// `None` for keys stored before fingerprints were recorded.
    pub fingerprint: Option<String>,
}

impl UsedKey {
    /// Whether `key` came with the request that used it first (keys stored
    /// without a fingerprint match any request).
    #[must_use]
    pub fn same_request(&self, key: &IdempotencyKey) -> bool {
        self.fingerprint
            .as_deref()
            .is_none_or(|f| f == key.fingerprint)
    }
}

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to the stream first. Retryable after a reload.
    #[error("stream {stream_id} is no longer at version {expected_version}")]
    Conflict {
        stream_id: String,
        expected_version: i64,
    },
    /// The idempotency key was used before; nothing was appended.
    #[error("idempotency key already used")]
    DuplicateKey,
    #[error("event payload is not valid JSON: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("event store: {0}")]
    Database(#[source] StorageError),
}

const APPEND_SQL: &str = r"
WITH ins AS (
    INSERT INTO events (event_id, stream_id, version, event_type, schema_version, payload,
                        occurred_at, correlation_id, causation_id, actor, traceparent)
    SELECT e.event_id, $1, $2 + e.ord, e.event_type, e.schema_version, e.payload::jsonb,
           e.occurred_at, $8, $9, $10, $11
    FROM UNNEST($3::uuid[], $4::text[], $5::int4[], $6::text[], $7::timestamptz[])
         WITH ORDINALITY AS e(event_id, event_type, schema_version, payload, occurred_at, ord)
    RETURNING position, version
), total AS (
    SELECT max(version) AS version, max(position) AS position FROM ins
), key AS (
    INSERT INTO idempotency_keys (key, stream_id, version, position, fingerprint)
    SELECT $12, $1, version, position, $17 FROM total WHERE $12::text IS NOT NULL
), snap AS (
    INSERT INTO snapshots (stream_id, version, snapshot_version, state, first_at, last_at)
    SELECT $1, version, $14, $13::jsonb, $15, $16 FROM total WHERE $13::text IS NOT NULL
    ON CONFLICT (stream_id) DO UPDATE
       SET version = EXCLUDED.version, snapshot_version = EXCLUDED.snapshot_version,
           state = EXCLUDED.state, first_at = EXCLUDED.first_at, last_at = EXCLUDED.last_at
     WHERE snapshots.version < EXCLUDED.version
)
SELECT version, position FROM total";

/// State to store beside an append: the aggregate after the new events.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotWrite {
    pub snapshot_version: i32,
    pub state: serde_json::Value,
    /// When the stream's first and last events happened.
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: i64,
    pub state: serde_json::Value,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

/// What a command needs before deciding, read in one round trip.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommandLoad {
    /// Latest snapshot of the expected shape, if any.
    pub snapshot: Option<Snapshot>,
    /// Events after the snapshot (or all), in version order.
    pub events: Vec<RecordedEvent>,
    /// What the idempotency key wrote before, if it was used.
    pub key: Option<UsedKey>,
}

/// Appends `events` to `stream_id`, which must be at `expected_version`
/// (0 for a new stream), recording `idempotency_key` and `snapshot` in the
/// same statement.
///
/// # Errors
///
/// [`AppendError::Conflict`] when another writer got there first,
/// [`AppendError::DuplicateKey`] when the key was already used.
pub async fn append<'e>(
    executor: impl PgExecutor<'e>,
    stream_id: &str,
    expected_version: i64,
    events: &[NewEvent],
    context: &EventContext,
    idempotency_key: Option<&IdempotencyKey>,
    snapshot: Option<&SnapshotWrite>,
) -> Result<Appended, AppendError> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let versions: Vec<i32> = events.iter().map(|e| e.schema_version).collect();
    let payloads = events
        .iter()
        .map(|e| serde_json::to_string(&e.payload))
        .collect::<Result<Vec<_>, _>>()?;
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
    let row = sqlx::query(APPEND_SQL)
        .bind(stream_id)
        .bind(expected_version)
        .bind(&ids)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&times)
        .bind(context.correlation_id)
        .bind(context.causation_id)
        .bind(&context.actor)
        .bind(context.traceparent.as_deref())
        .bind(idempotency_key.map(|k| k.key.as_str()))
        .bind(snapshot.map(|s| s.state.to_string()))
        .bind(snapshot.map(|s| s.snapshot_version))
        .bind(snapshot.map(|s| s.first_at))
        .bind(snapshot.map(|s| s.last_at))
        .bind(idempotency_key.map(|k| k.fingerprint.as_str()))
        .fetch_one(executor)
        .await
        .map_err(|e| classify(e, stream_id, expected_version))?;
    Ok(Appended::from_row(&row)?)
}

impl From<sqlx::Error> for AppendError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
}

impl Appended {
    /// Reads the `version` and `position` an append statement returned.
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            version: row.try_get("version")?,
            position: row.try_get("position")?,
        })
    }
}

fn classify(error: sqlx::Error, stream_id: &str, expected_version: i64) -> AppendError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        match db.constraint() {
            Some("events_stream_version_key") => {
                return AppendError::Conflict {
                    stream_id: stream_id.to_owned(),
                    expected_version,
                };
            }
            Some("idempotency_keys_pkey") => return AppendError::DuplicateKey,
            _ => {}
        }
    }
    error.into()
}

/// The event store of one service database.
#[derive(Debug, Clone)]
pub struct EventStore {
    pool: PgPool,
    /// Set by [`EventStore::with_group_commit`].
    group: Option<crate::group::GroupCommit>,
}

pub(crate) const EVENT_COLUMNS: &str = "position, event_id, stream_id, version, event_type, schema_version, \
     payload, occurred_at, correlation_id, causation_id, actor, traceparent";

impl EventStore {
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool, group: None }
    }

    /// Appends through group commit (see [`crate::group`]): `writers`
    /// concurrent writers, each committing up to `max_batch` queued
    /// commands in one statement. Needs a Tokio runtime.
    #[must_use]
    pub fn with_group_commit(mut self, writers: usize, max_batch: usize) -> Self {
        self.group = Some(crate::group::GroupCommit::start(
            self.pool.clone(),
            writers,
            max_batch,
        ));
        self
    }

    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// See [`append`].
    ///
    /// # Errors
    ///
    /// As [`append`].
    pub async fn append(
        &self,
        stream_id: &str,
        expected_version: i64,
        events: &[NewEvent],
        context: &EventContext,
        idempotency_key: Option<&IdempotencyKey>,
        snapshot: Option<&SnapshotWrite>,
    ) -> Result<Appended, AppendError> {
        if let Some(group) = &self.group {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let request = crate::group::Request {
                stream_id: stream_id.to_owned(),
                expected_version,
                events: events.to_vec(),
                context: context.clone(),
                idempotency_key: idempotency_key.cloned(),
                snapshot: snapshot.cloned(),
                reply,
            };
            return group.append(request, answer).await;
        }
        append(
            &self.pool,
            stream_id,
            expected_version,
            events,
            context,
            idempotency_key,
            snapshot,
        )
        .await
    }

    /// Loads what a command on `stream_id` needs in one round trip: the
    /// latest snapshot of `snapshot_version`, the events after it, and what
    /// `idempotency_key` wrote if it was used before.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn load_for_command(
        &self,
        stream_id: &str,
        idempotency_key: Option<&str>,
        snapshot_version: i32,
    ) -> Result<CommandLoad, StorageError> {
        let sql = format!(
            "SELECT s.version AS snap_version, s.state AS snap_state, s.first_at AS snap_first_at, \
                    s.last_at AS snap_last_at, k.stream_id AS key_stream, k.version AS key_version, \
                    k.position AS key_position, k.fingerprint AS key_fingerprint, e.* \
             FROM (SELECT 1) one \
             LEFT JOIN snapshots s ON s.stream_id = $1 AND s.snapshot_version = $3 \
             LEFT JOIN idempotency_keys k ON k.key = $2 \
             LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM events \
                                WHERE stream_id = $1 AND version > COALESCE(s.version, 0) \
                                ORDER BY version) e ON true"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(stream_id)
            .bind(idempotency_key)
            .bind(snapshot_version)
            .fetch_all(&self.pool)
            .await?;
        let mut load = CommandLoad::default();
        let Some(first) = rows.first() else {
            return Ok(load);
        };
        if let Some(version) = first.try_get::<Option<i64>, _>("snap_version")? {
            load.snapshot = Some(Snapshot {
                version,
                state: first.try_get("snap_state")?,
                first_at: first.try_get("snap_first_at")?,
                last_at: first.try_get("snap_last_at")?,
            });
        }
        if let Some(stream_id) = first.try_get::<Option<String>, _>("key_stream")? {
            load.key = Some(UsedKey {
                stream_id,
                appended: Appended {
                    version: first.try_get("key_version")?,
                    position: first.try_get("key_position")?,
                },
                fingerprint: first.try_get("key_fingerprint")?,
            });
        }
        for row in &rows {
            if row.try_get::<Option<i64>, _>("position")?.is_some() {
                load.events.push(recorded_event(row)?);
            }
        }
        Ok(load)
    }

    /// The first `max_version` events of a stream (all if `None`), or those
    /// that happened at or before `until`.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn load_until(
        &self,
        stream_id: &str,
        max_version: Option<i64>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<RecordedEvent>, StorageError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 \
             AND ($2::bigint IS NULL OR version <= $2) \
             AND ($3::timestamptz IS NULL OR occurred_at <= $3) ORDER BY version"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(stream_id)
            .bind(max_version)
            .bind(until)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(recorded_event).collect::<Result<_, _>>()?)
    }

    /// Every event of a stream, in version order. Empty if it does not exist.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn load(&self, stream_id: &str) -> Result<Vec<RecordedEvent>, StorageError> {
        self.load_until(stream_id, None, None).await
    }

    /// The stream an idempotency key wrote to, and what it wrote.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn find_idempotency_key(&self, key: &str) -> Result<Option<UsedKey>, StorageError> {
        let row = sqlx::query(
            "SELECT stream_id, version, position, fingerprint FROM idempotency_keys WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(UsedKey {
            stream_id: r.try_get("stream_id")?,
            appended: Appended {
                version: r.try_get("version")?,
                position: r.try_get("position")?,
            },
            fingerprint: r.try_get("fingerprint")?,
        }))
    }
}

pub(crate) fn recorded_event(row: &PgRow) -> Result<RecordedEvent, sqlx::Error> {
    Ok(RecordedEvent {
        position: row.try_get("position")?,
        event_id: row.try_get("event_id")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: row.try_get("payload")?,
        occurred_at: row.try_get("occurred_at")?,
        context: EventContext {
            correlation_id: row.try_get("correlation_id")?,
            causation_id: row.try_get("causation_id")?,
            actor: row.try_get("actor")?,
            traceparent: row.try_get("traceparent")?,
        },
    })
}
