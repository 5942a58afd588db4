//! Group commit: when appends queue up, many commands' events go to Postgres
//! in one statement (one transaction, one WAL flush), and each caller still
//! gets its own result, conflict or idempotency answer.
//!
//! A few writer tasks take requests from one queue. An idle writer takes the
//! next request at once, so a lone command pays no wait; while every writer
//! is busy requests accumulate, and the next free writer takes all that are
//! waiting (up to `max_batch`) as one batch. A batch is one `INSERT` of every
//! event (writable CTEs add the idempotency keys and snapshots); commands on
//! a stream or with a key already in the batch go in a next part, committed
//! after it. If a part fails for any reason (a version conflict, a reused
//! key, a lost connection), its requests are appended one by one instead, so
//! each caller gets the answer its own command deserves; conflicts are rare
//! (one order is rarely written by two clients at the same moment), so this
//! costs little.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use es::EventContext;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::store::{AppendError, Appended, IdempotencyKey, NewEvent, SnapshotWrite, append};

/// One command's append, waiting for a writer.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) stream_id: String,
    pub(crate) expected_version: i64,
    pub(crate) events: Vec<NewEvent>,
    pub(crate) context: EventContext,
    pub(crate) idempotency_key: Option<IdempotencyKey>,
    pub(crate) snapshot: Option<SnapshotWrite>,
    pub(crate) reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// The queue in front of the writers.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    sender: mpsc::Sender<Request>,
}

impl GroupCommit {
    /// Starts `writers` writer tasks on `pool`, each committing at most
    /// `max_batch` commands at once. They stop when every handle is dropped.
    pub(crate) fn start(pool: PgPool, writers: usize, max_batch: usize) -> Self {
        let (sender, receiver) = mpsc::channel(4096);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(
                pool.clone(),
                Arc::clone(&receiver),
                max_batch.max(1),
            ));
        }
        Self { sender }
    }

    /// Queues `request` and waits for its own answer.
    pub(crate) async fn append(
        &self,
        request: Request,
        answer: oneshot::Receiver<Result<Appended, AppendError>>,
    ) -> Result<Appended, AppendError> {
        self.sender
            .send(request)
            .await
            .map_err(|_| AppendError::from(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| AppendError::from(sqlx::Error::PoolClosed))?
    }
}

async fn writer(pool: PgPool, receiver: Arc<Mutex<mpsc::Receiver<Request>>>, max_batch: usize) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        commit(&pool, batch).await;
    }
}

/// Whether the batch can go as one statement: several commands, each with
/// events, no stream or key twice.
fn groupable(batch: &[Request]) -> bool {
    let mut streams = HashSet::new();
    let mut keys = HashSet::new();
    batch.len() > 1
        && batch.iter().all(|r| {
            !r.events.is_empty()
                && streams.insert(r.stream_id.as_str())
                && r.idempotency_key
                    .as_ref()
                    .is_none_or(|k| keys.insert(k.key.as_str()))
        })
}

/// Splits a batch into parts with no stream or key twice, committed in
/// order: each request goes to the part after the last one holding its
/// stream or its key (the first part if none does). So every request
/// commits after each earlier request on its stream or with its key, and
/// answers exactly as it would have in queue order.
fn parts(batch: Vec<Request>) -> Vec<Vec<Request>> {
    let mut parts: Vec<Vec<Request>> = Vec::new();
    // The last part each stream and each key went to.
    let mut stream_part: HashMap<String, usize> = HashMap::new();
    let mut key_part: HashMap<String, usize> = HashMap::new();
    for request in batch {
        let key = request.idempotency_key.as_ref().map(|k| k.key.clone());
        let after = [
            stream_part.get(&request.stream_id),
            key.as_ref().and_then(|k| key_part.get(k)),
        ]
        .into_iter()
        .flatten()
        .max()
        .map_or(0, |last| last + 1);
        if after == parts.len() {
            parts.push(Vec::new());
        }
        stream_part.insert(request.stream_id.clone(), after);
        if let Some(key) = key {
            key_part.insert(key, after);
        }
        parts[after].push(request);
    }
    parts
}

/// Commits a batch: each part ([`parts`]) as one statement, one after the
/// other, so two commands on one stream (a retry racing its original, two
/// clients on one order) cost the batch one more statement, not one per
/// command.
async fn commit(pool: &PgPool, batch: Vec<Request>) {
    for part in parts(batch) {
        commit_part(pool, part).await;
    }
}

async fn commit_part(pool: &PgPool, batch: Vec<Request>) {
    if groupable(&batch) {
        match append_group(pool, &batch).await {
            Ok(results) if results.len() == batch.len() => {
                for (request, result) in batch.into_iter().zip(results) {
                    let _ = request.reply.send(Ok(result));
                }
                return;
            }
            Ok(results) => {
                // Cannot happen (every command has events); the statement
                // committed, so appending again would be wrong: report it.
                tracing::error!(
                    commands = batch.len(),
                    answers = results.len(),
                    "group append answered for fewer commands"
                );
                for request in batch {
                    let _ = request.reply.send(Err(AppendError::Database(
                        sqlx::Error::Protocol(
                            "group append answered for fewer commands".to_owned(),
                        )
                        .into(),
                    )));
                }
                return;
            }
            Err(error) => {
                tracing::debug!(%error, size = batch.len(), "group append failed; appending one by one");
            }
        }
    }
    let singles = batch.into_iter().map(|request| async move {
        let result = append(
            pool,
            &request.stream_id,
            request.expected_version,
            &request.events,
            &request.context,
            request.idempotency_key.as_ref(),
            request.snapshot.as_ref(),
        )
        .await;
        let _ = request.reply.send(result);
    });
    futures::future::join_all(singles).await;
}

const GROUP_SQL: &str = r"
WITH input AS (
    SELECT * FROM UNNEST($1::int4[], $2::text[], $3::int8[], $4::uuid[], $5::text[], $6::int4[], $7::text[],
                         $8::timestamptz[], $9::uuid[], $10::uuid[], $11::text[], $12::text[])
         AS e(cmd, stream_id, version, event_id, event_type, schema_version, payload, occurred_at,
              correlation_id, causation_id, actor, traceparent)
), ins AS (
    INSERT INTO events (event_id, stream_id, version, event_type, schema_version, payload,
                        occurred_at, correlation_id, causation_id, actor, traceparent)
    SELECT event_id, stream_id, version, event_type, schema_version, payload::jsonb,
           occurred_at, correlation_id, causation_id, actor, traceparent
    FROM input ORDER BY cmd, version
    RETURNING stream_id, version, position
), per_cmd AS (
    SELECT i.cmd, max(ins.version) AS version, max(ins.position) AS position
    FROM ins JOIN input i ON i.stream_id = ins.stream_id AND i.version = ins.version
    GROUP BY i.cmd
), keys AS (
    INSERT INTO idempotency_keys (key, stream_id, version, position, fingerprint)
    SELECT k.key, k.stream_id, p.version, p.position, k.fingerprint
    FROM UNNEST($13::int4[], $14::text[], $15::text[], $22::text[]) AS k(cmd, key, stream_id, fingerprint)
    JOIN per_cmd p ON p.cmd = k.cmd
), snaps AS (
    INSERT INTO snapshots (stream_id, version, snapshot_version, state, first_at, last_at)
    SELECT s.stream_id, p.version, s.snapshot_version, s.state::jsonb, s.first_at, s.last_at
    FROM UNNEST($16::int4[], $17::text[], $18::int4[], $19::text[], $20::timestamptz[], $21::timestamptz[])
         AS s(cmd, stream_id, snapshot_version, state, first_at, last_at)
    JOIN per_cmd p ON p.cmd = s.cmd
    ON CONFLICT (stream_id) DO UPDATE
       SET version = EXCLUDED.version, snapshot_version = EXCLUDED.snapshot_version,
           state = EXCLUDED.state, first_at = EXCLUDED.first_at, last_at = EXCLUDED.last_at
     WHERE snapshots.version < EXCLUDED.version
)
SELECT cmd, version, position FROM per_cmd ORDER BY cmd";

/// Column vectors of a batch for [`GROUP_SQL`].
#[derive(Debug, Default)]
struct Columns<'a> {
    cmd: Vec<i32>,
    stream: Vec<&'a str>,
    version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i32>,
    payload: Vec<String>,
    occurred_at: Vec<DateTime<Utc>>,
    correlation_id: Vec<Uuid>,
    causation_id: Vec<Uuid>,
    actor: Vec<&'a str>,
    traceparent: Vec<Option<&'a str>>,
    key_cmd: Vec<i32>,
    key: Vec<&'a str>,
    key_stream: Vec<&'a str>,
    key_fingerprint: Vec<&'a str>,
    snap_cmd: Vec<i32>,
    snap_stream: Vec<&'a str>,
    snap_version: Vec<i32>,
    snap_state: Vec<String>,
    snap_first: Vec<DateTime<Utc>>,
    snap_last: Vec<DateTime<Utc>>,
}

async fn append_group(pool: &PgPool, batch: &[Request]) -> Result<Vec<Appended>, AppendError> {
    let mut c = Columns::default();
    for (i, request) in batch.iter().enumerate() {
        let cmd = i32::try_from(i).unwrap_or(i32::MAX);
        for (n, event) in request.events.iter().enumerate() {
            c.cmd.push(cmd);
            c.stream.push(&request.stream_id);
            c.version
                .push(request.expected_version + i64::try_from(n).unwrap_or(i64::MAX) + 1);
            c.event_id.push(event.event_id);
            c.event_type.push(event.event_type);
            c.schema_version.push(event.schema_version);
            c.payload.push(serde_json::to_string(&event.payload)?);
            c.occurred_at.push(event.occurred_at);
            c.correlation_id.push(request.context.correlation_id);
            c.causation_id.push(request.context.causation_id);
            c.actor.push(&request.context.actor);
            c.traceparent.push(request.context.traceparent.as_deref());
        }
        if let Some(key) = &request.idempotency_key {
            c.key_cmd.push(cmd);
            c.key.push(&key.key);
            c.key_stream.push(&request.stream_id);
            c.key_fingerprint.push(&key.fingerprint);
        }
        if let Some(snapshot) = &request.snapshot {
            c.snap_cmd.push(cmd);
            c.snap_stream.push(&request.stream_id);
            c.snap_version.push(snapshot.snapshot_version);
            c.snap_state.push(snapshot.state.to_string());
            c.snap_first.push(snapshot.first_at);
            c.snap_last.push(snapshot.last_at);
        }
    }
    let rows = sqlx::query(GROUP_SQL)
        .bind(&c.cmd)
        .bind(&c.stream)
        .bind(&c.version)
        .bind(&c.event_id)
        .bind(&c.event_type)
        .bind(&c.schema_version)
        .bind(&c.payload)
        .bind(&c.occurred_at)
        .bind(&c.correlation_id)
        .bind(&c.causation_id)
        .bind(&c.actor)
        .bind(&c.traceparent)
        .bind(&c.key_cmd)
        .bind(&c.key)
        .bind(&c.key_stream)
        .bind(&c.snap_cmd)
        .bind(&c.snap_stream)
        .bind(&c.snap_version)
        .bind(&c.snap_state)
        .bind(&c.snap_first)
        .bind(&c.snap_last)
        .bind(&c.key_fingerprint)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| Ok(Appended::from_row(row)?))
        .collect()
}
