//! One generation of a projection as a [`Subscriber`] of the events table:
//! a batch and its checkpoint in one transaction, written only while the
//! generation is live or building; a building generation goes live once it
//! has caught up.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use es::RecordedEvent;
use sqlx::{Acquire as _, PgConnection, Row as _};

use super::{Projection, registry};
use crate::tail::{Cursor, Subscriber, TailError};

/// One generation of one projection, following the events table.
pub(super) struct Generation<P> {
    projection: Arc<P>,
    generation: i32,
    building: bool,
    /// When [`Subscriber::keep_running`] last asked the registry.
    checked: Option<Instant>,
    /// Events applied by this follower, and when the tables were last
    /// analysed (see [`Projection::tables`]).
    applied: u64,
    analysed_at: u64,
}

/// Events applied before the first analysis of a growing generation. Low:
/// a fresh read model is planned as empty until analysed, and its batch
/// updates scan it whole (13 ms per batch at 2.4k rows, measured on a new
/// stack); an analysis of a small table costs about a millisecond.
const FIRST_ANALYSIS: u64 = 256;

/// Events applied beyond which a live generation stops analysing inline
/// and leaves it to autovacuum's autoanalyze: the planner scales the
/// statistics it has to the table's current size, and an inline ANALYZE
/// of a grown table stalls the follower (150-180 ms measured on
/// order_summary at 77k rows, a read-model tail of up to 450 ms in a
/// benchmark run). A building generation (a rebuild) keeps doubling: it
/// has no readers waiting, and stale statistics slowed it down
/// quadratically.
const LIVE_ANALYSIS_LIMIT: u64 = 32_768;

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
    /// `building`: started for a rebuild (it stops once its generation is
    /// live, and `projection::run` starts it again as the live one).
    pub(super) fn new(projection: Arc<P>, generation: i32, building: bool) -> Self {
        Self {
            projection,
            generation,
            building,
            checked: None,
            applied: 0,
            analysed_at: 0,
        }
    }

    /// Refreshes the planner's statistics of the projection's tables each
    /// time the events this follower applied have doubled: O(log n)
    /// analyses for n events, none on a quiet live generation, and none
    /// inline once a live one has passed [`LIVE_ANALYSIS_LIMIT`]. Best effort:
    /// a failed analysis is logged and not retried before the next doubling.
    async fn analyse_if_grown(&mut self, conn: &mut PgConnection) {
        if self.applied < (2 * self.analysed_at).max(FIRST_ANALYSIS)
            || (!self.building && self.analysed_at >= LIVE_ANALYSIS_LIMIT)
        {
            return;
        }
        self.analysed_at = self.applied;
        for table in self.projection.tables() {
            if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}")))
                .execute(&mut *conn)
                .await
            {
                tracing::warn!(%error, table, "cannot refresh the planner's statistics");
            }
        }
    }

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
        self.applied += batch.len() as u64;
        self.analyse_if_grown(conn).await;
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
            // Started to build it: stop, to be started again as the live
            // follower (shared reads, live batch size).
            return Ok(!self.building);
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
            return Ok(false);
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
        // Started again as the live follower by `projection::run`.
        Ok(false)
    }
}
