//! Read models (projections) fed from the events table, with zero-downtime
//! rebuilds.
//!
//! A projection's rows carry a `generation`. Queries read the live generation
//! (`projections.live_generation`). Each generation is a [`Subscriber`] that
//! applies a batch and stores its checkpoint in **one transaction**, so a
//! crash never applies an event twice or skips one. A rebuild
//! ([`start_rebuild`]) registers the next generation; [`run`] starts a
//! follower for it beside the live one, and when it has caught up with the
//! live generation it becomes live in one transaction and the old rows are
//! deleted. Queries answer throughout.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use es::RecordedEvent;
use sqlx::{Acquire as _, PgConnection, PgPool, Row as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::tail::{self, Cursor, Subscriber, TailConfig, TailError};

/// A read model: how a batch of events changes its rows of one generation.
pub trait Projection: Send + Sync + 'static {
    /// Registry name, e.g. `order_summary`.
    fn name(&self) -> &'static str;

    /// Applies a batch of events to `generation`, inside the caller's
    /// transaction. Events arrive in per-stream version order, each exactly
    /// once; applying is idempotent all the same (a replay after a crash
    /// between apply and commit never happens, but a rebuild may overlap).
    fn apply_batch(
        &self,
        conn: &mut PgConnection,
        generation: i32,
        events: &[&RecordedEvent],
    ) -> impl Future<Output = Result<(), TailError>> + Send;

    /// Deletes every row of `generation` (a retired or restarted generation).
    fn clear(
        &self,
        conn: &mut PgConnection,
        generation: i32,
    ) -> impl Future<Output = Result<(), TailError>> + Send;
}

/// Where a projection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub live_generation: i32,
    pub building_generation: Option<i32>,
}

/// Registers the projection (generation 1 live) if it is new.
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn register(pool: &PgPool, name: &str) -> Result<Status, sqlx::Error> {
    sqlx::query("INSERT INTO projections (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(pool)
        .await?;
    status(pool, name).await?.ok_or(sqlx::Error::RowNotFound)
}

/// The projection's generations, or `None` if it was never registered.
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn status(pool: &PgPool, name: &str) -> Result<Option<Status>, sqlx::Error> {
    let row =
        sqlx::query("SELECT live_generation, building_generation FROM projections WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    row.map(|r| {
        Ok(Status {
            live_generation: r.try_get("live_generation")?,
            building_generation: r.try_get("building_generation")?,
        })
    })
    .transpose()
}

/// How far one generation of a projection has got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub generation: i32,
    /// Global position of the last event it applied (0: none yet).
    pub position: i64,
    /// Committed events it has not applied yet.
    pub lag_events: i64,
}

/// Progress of the live and (if any) building generation of `name`.
///
/// # Errors
///
/// Fails when Postgres is unreachable; `Ok(None)` if never registered.
pub async fn progress(
    pool: &PgPool,
    name: &str,
) -> Result<Option<(Progress, Option<Progress>)>, sqlx::Error> {
    let Some(status) = status(pool, name).await? else {
        return Ok(None);
    };
    let of = |generation: i32| async move {
        let row = sqlx::query(
            "SELECT COALESCE(c.position, 0) AS position, \
             (SELECT count(*) FROM events e \
              WHERE (e.tx_id, e.position) > (COALESCE(c.tx_id, '0'::xid8), COALESCE(c.position, 0))) AS lag \
             FROM (SELECT 1) one \
             LEFT JOIN projection_checkpoints c ON c.name = $1 AND c.generation = $2",
        )
        .bind(name)
        .bind(generation)
        .fetch_one(pool)
        .await?;
        Ok::<_, sqlx::Error>(Progress {
            generation,
            position: row.try_get("position")?,
            lag_events: row.try_get("lag")?,
        })
    };
    let live = of(status.live_generation).await?;
    let building = match status.building_generation {
        Some(generation) => Some(of(generation).await?),
        None => None,
    };
    Ok(Some((live, building)))
}

/// Asks for a rebuild: registers the next generation (or returns the one
/// already building). The running service builds it and switches over.
///
/// # Errors
///
/// Fails when Postgres is unreachable or the projection is unknown.
pub async fn start_rebuild(pool: &PgPool, name: &str) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE projections SET building_generation = COALESCE(building_generation, live_generation + 1), \
         updated_at = now() WHERE name = $1 RETURNING building_generation",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?
    .flatten()
    .ok_or(sqlx::Error::RowNotFound)
}

/// Whether the live generation of `name` has applied the event at `position`.
///
/// # Errors
///
/// Fails when Postgres is unreachable; `Ok(None)` if no such event exists.
pub async fn has_reached(
    pool: &PgPool,
    name: &str,
    position: i64,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (e.tx_id, e.position) <= (c.tx_id, c.position) \
         FROM events e \
         LEFT JOIN projections p ON p.name = $1 \
         LEFT JOIN projection_checkpoints c ON c.name = $1 AND c.generation = p.live_generation \
         WHERE e.position = $2",
    )
    .bind(name)
    .bind(position)
    .fetch_optional(pool)
    .await
    .map(|reached: Option<Option<bool>>| reached.map(|r| r.unwrap_or(false)))
}

/// One generation of one projection, following the events table.
struct Generation<P> {
    projection: Arc<P>,
    generation: i32,
    /// When [`Subscriber::keep_running`] last asked the registry.
    checked: Option<Instant>,
}

/// How often a follower asks the registry whether its generation is still
/// wanted (and, building, whether it has caught up). Correctness does not
/// hang on it: every batch's checkpoint is written only while the
/// generation is live or building (see [`Generation::handle`]).
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Why a follower stopped: its generation was retired by a rebuild.
#[derive(Debug, thiserror::Error)]
#[error("projection {name} generation {generation} was retired")]
struct Retired {
    name: &'static str,
    generation: i32,
}

impl<P: Projection> Generation<P> {
    /// Moves the checkpoint, only while the generation is live or building.
    /// The registry row is locked `FOR SHARE`, so a switch-over (which locks
    /// it `FOR UPDATE`, then clears the retired rows) either waits for this
    /// batch to commit and then clears it, or has committed and makes this
    /// statement write nothing: a retired generation never gets rows back.
    async fn save_guarded(
        &self,
        conn: &mut PgConnection,
        cursor: &Cursor,
    ) -> Result<bool, sqlx::Error> {
        let saved = sqlx::query(
            "WITH p AS (SELECT 1 FROM projections WHERE name = $1 \
                        AND (live_generation = $2 OR building_generation = $2) FOR SHARE) \
             INSERT INTO projection_checkpoints (name, generation, tx_id, position) \
             SELECT $1, $2, $3::text::xid8, $4 FROM p \
             ON CONFLICT (name, generation) DO UPDATE SET tx_id = EXCLUDED.tx_id, \
                position = EXCLUDED.position, updated_at = now()",
        )
        .bind(self.projection.name())
        .bind(self.generation)
        .bind(&cursor.tx_id)
        .bind(cursor.position)
        .execute(conn)
        .await?;
        Ok(saved.rows_affected() == 1)
    }

    async fn save_cursor(
        &self,
        conn: &mut PgConnection,
        cursor: &Cursor,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO projection_checkpoints (name, generation, tx_id, position) VALUES ($1, $2, $3::text::xid8, $4) \
             ON CONFLICT (name, generation) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()",
        )
        .bind(self.projection.name())
        .bind(self.generation)
        .bind(&cursor.tx_id)
        .bind(cursor.position)
        .execute(conn)
        .await?;
        Ok(())
    }
}

impl<P: Projection> Subscriber for Generation<P> {
    fn name(&self) -> String {
        format!("projection:{}@{}", self.projection.name(), self.generation)
    }

    async fn load_cursor(&mut self, conn: &mut PgConnection) -> Result<Cursor, TailError> {
        // Batches are applied with `UPDATE … FROM UNNEST(…)`. On a read
        // model that grows faster than autovacuum re-analyses it, the
        // planner believes the table tiny and hashes the whole generation
        // for every batch (3.7 ms per batch at 10k rows, growing); index
        // lookups per row are what a batch of at most a few thousand rows
        // wants. This session only runs this follower.
        sqlx::raw_sql("SET enable_hashjoin = off; SET enable_mergejoin = off")
            .execute(&mut *conn)
            .await?;
        let row = sqlx::query(
            "SELECT tx_id::text AS tx_text, position FROM projection_checkpoints WHERE name = $1 AND generation = $2",
        )
        .bind(self.projection.name())
        .bind(self.generation)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            return Ok(Cursor {
                tx_id: row.try_get("tx_text")?,
                position: row.try_get("position")?,
            });
        }
        // A fresh generation: clear what an interrupted earlier attempt left.
        let mut tx = conn.begin().await?;
        self.projection.clear(&mut tx, self.generation).await?;
        self.save_cursor(&mut tx, &Cursor::start()).await?;
        tx.commit().await?;
        Ok(Cursor::start())
    }

    async fn handle(
        &mut self,
        conn: &mut PgConnection,
        batch: &[(Cursor, RecordedEvent)],
    ) -> Result<(), TailError> {
        let Some((last, _)) = batch.last() else {
            return Ok(());
        };
        let mut tx = conn.begin().await?;
        // Each event continues the trace of the command that wrote it: a
        // span per event, parented to the stored traceparent, around the
        // batch it was applied in.
        let spans: Vec<_> = batch
            .iter()
            .map(|(_, event)| {
                let span = tracing::info_span!(
                    "projection.apply",
                    otel.name = "projection apply",
                    projection = self.projection.name(),
                    generation = self.generation,
                    event.r#type = %event.event_type,
                    event.id = %event.event_id,
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty,
                );
                platform::trace::set_parent(
                    &span,
                    platform::trace::from_traceparent(event.context.traceparent.as_deref()),
                );
                span
            })
            .collect();
        let events: Vec<&RecordedEvent> = batch.iter().map(|(_, event)| event).collect();
        self.projection
            .apply_batch(&mut tx, self.generation, &events)
            .await?;
        if !self.save_guarded(&mut tx, last).await? {
            drop(tx);
            self.checked = None;
            return Err(TailError::new(Retired {
                name: self.projection.name(),
                generation: self.generation,
            }));
        }
        tx.commit().await?;
        drop(spans);
        Ok(())
    }

    /// Live: keep going while still live. Building: once caught up with the
    /// live generation, switch over and retire the old one.
    async fn keep_running(
        &mut self,
        conn: &mut PgConnection,
        cursor: &Cursor,
    ) -> Result<bool, TailError> {
        if self.checked.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
            return Ok(true);
        }
        self.checked = Some(Instant::now());
        let name = self.projection.name();
        // A plain read first: no transaction, no lock, on the common path.
        let (live, building, live_cursor) = registry(&mut *conn, name, false).await?;
        if live == self.generation {
            return Ok(true);
        }
        if building != Some(self.generation) {
            return Ok(false);
        }
        if cursor.key() < live_cursor.key() {
            return Ok(true);
        }
        // Caught up: switch over under the registry row's lock, re-checked.
        let mut tx = conn.begin().await?;
        let (live, building, live_cursor) = registry(&mut tx, name, true).await?;
        if building != Some(self.generation) {
            return Ok(live == self.generation);
        }
        if cursor.key() < live_cursor.key() {
            return Ok(true);
        }
        sqlx::query(
            "UPDATE projections SET live_generation = $2, building_generation = NULL, updated_at = now() WHERE name = $1",
        )
        .bind(name)
        .bind(self.generation)
        .execute(&mut *tx)
        .await?;
        self.projection.clear(&mut tx, live).await?;
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1 AND generation = $2")
            .bind(name)
            .bind(live)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            projection = name,
            from = live,
            to = self.generation,
            "rebuilt projection is now live"
        );
        Ok(true)
    }
}

const REGISTRY_SQL: &str = "SELECT p.live_generation, p.building_generation, c.tx_id::text AS tx_text, c.position \
     FROM projections p LEFT JOIN projection_checkpoints c \
       ON c.name = p.name AND c.generation = p.live_generation \
     WHERE p.name = $1";

type Registry = (i32, Option<i32>, Cursor);

fn registry_row(row: &sqlx::postgres::PgRow) -> Result<Registry, sqlx::Error> {
    let live_cursor = match (
        row.try_get::<Option<String>, _>("tx_text")?,
        row.try_get::<Option<i64>, _>("position")?,
    ) {
        (Some(tx_id), Some(position)) => Cursor { tx_id, position },
        _ => Cursor::start(),
    };
    Ok((
        row.try_get("live_generation")?,
        row.try_get("building_generation")?,
        live_cursor,
    ))
}

/// The registry of `name`: live generation, building generation, and where
/// the live one has got to; `lock` takes the registry row for a switch-over.
async fn registry(
    conn: &mut PgConnection,
    name: &str,
    lock: bool,
) -> Result<Registry, sqlx::Error> {
    let sql = if lock {
        format!("{REGISTRY_SQL} FOR UPDATE OF p")
    } else {
        REGISTRY_SQL.to_owned()
    };
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .fetch_one(conn)
        .await?;
    registry_row(&row)
}

/// Events per batch while a generation is being rebuilt.
const REBUILD_BATCH: i64 = 5000;

/// Keeps a follower running for every generation of `projection` that
/// should run (the live one, and a building one during a rebuild), until
/// `shutdown`.
pub async fn run<P: Projection>(
    pool: PgPool,
    database_url: String,
    projection: Arc<P>,
    config: TailConfig,
    shutdown: CancellationToken,
) {
    let name = projection.name();
    let mut running: HashMap<i32, JoinHandle<()>> = HashMap::new();
    while !shutdown.is_cancelled() {
        running.retain(|_, task| !task.is_finished());
        match register(&pool, name).await {
            Ok(status) => {
                for generation in
                    std::iter::once(status.live_generation).chain(status.building_generation)
                {
                    running.entry(generation).or_insert_with(|| {
                        let follower = Generation {
                            projection: projection.clone(),
                            generation,
                            checked: None,
                        };
                        // A rebuild reads in large batches: each batch is
                        // one transaction and two statements per read model.
                        let mut config = config.clone();
                        if generation != status.live_generation {
                            config.batch_size = config.batch_size.max(REBUILD_BATCH);
                        }
                        tokio::spawn(tail::run(
                            database_url.clone(),
                            follower,
                            config,
                            shutdown.clone(),
                        ))
                    });
                }
            }
            Err(error) => {
                tracing::warn!(projection = name, %error, "cannot read the projection registry");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    for (_, task) in running {
        let _ = task.await;
    }
}
