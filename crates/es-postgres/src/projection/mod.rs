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
//! deleted. Queries answer throughout. A generation's follower is in
//! `generation`; the registry and the runner are here.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use es::RecordedEvent;
use sqlx::{PgConnection, PgPool, Row as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod generation;

use generation::Generation;

use crate::tail::{self, Cursor, TailConfig, TailError};

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

    /// The tables the projection writes. A generation being built fills
    /// them faster than autovacuum re-analyses them; the planner, believing
    /// the new generation empty, would then scan it whole for every batch
    /// (a rebuild slowing down quadratically). The follower analyses these
    /// tables each time the events it applied have doubled.
    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

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
                        let building = generation != status.live_generation;
                        let follower = Generation::new(projection.clone(), generation, building);
                        // A rebuild reads in large batches: each batch is
                        // one transaction and two statements per read model.
                        let mut config = config.clone();
                        if building {
                            config.batch_size = config.batch_size.max(REBUILD_BATCH);
                            // Far behind the others: its reads are its own.
                            config.shared_reads = None;
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
