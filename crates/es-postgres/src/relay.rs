//! The outbox relay: publishes committed events to JetStream in the
//! gap-safe order of [`crate::tail`] and records how far it got.
//!
//! Publishes are pipelined and every ack is awaited before the checkpoint
//! moves, so a crash republishes at most one batch, which JetStream drops as
//! duplicates (`Nats-Msg-Id` = event id). When only some publishes of a
//! batch fail, the checkpoint moves past those that landed in order and
//! the retry publishes only what did not land (a retry long after the
//! duplicate window would otherwise land the rest twice). Acks JetStream
//! marks as duplicates are counted (`shop_relay_duplicates_total`).
//! [`republish`] replays a range from Postgres when JetStream lost messages.

use async_nats::jetstream;
use es::RecordedEvent;
use messaging::OutboundMessage;
use sqlx::{PgConnection, Row as _};
use tokio_util::sync::CancellationToken;

use crate::tail::{self, Cursor, Subscriber, TailConfig, TailError};

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
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Checkpoint name; one per (database, destination).
    pub name: String,
    pub tail: TailConfig,
    /// How long a batch waits for JetStream's acks before it is sent again
    /// (all of a batch's acks wait together). Healthy acks take
    /// milliseconds; a stream electing a new leader after a node died takes
    /// a second or two. Below the tail's silence timeout, so that waiting
    /// for acks never costs the relay its leadership.
    pub publish_timeout: std::time::Duration,
}

impl RelayConfig {
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            tail: TailConfig::default(),
            publish_timeout: std::time::Duration::from_secs(2),
        }
    }
}

/// The outbox relay of one service database.
pub struct Relay<M> {
    database_url: String,
    js: jetstream::Context,
    mapper: M,
    config: RelayConfig,
    metrics: Option<platform::metrics::Metrics>,
    /// When the backlog was last measured (at most once per
    /// [`LAG_EVERY`], not on every wake-up).
    lag_measured: Option<std::time::Instant>,
    /// Messages JetStream acknowledged in a batch that failed part-way and
    /// whose checkpoint could not move past them yet: the retry skips them,
    /// so only what did not land is published again (issue 13: a whole
    /// batch republished past the duplicate window landed twice).
    acked: std::collections::HashSet<String>,
}

/// How often the relay measures its backlog for the lag metrics.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl<M> std::fmt::Debug for Relay<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<M: IntegrationMapper> Relay<M> {
    #[must_use]
    pub fn new(
        database_url: impl Into<String>,
        js: jetstream::Context,
        mapper: M,
        config: RelayConfig,
    ) -> Self {
        // The relay's own handle on the context: its ack deadline is its own.
        let mut js = js;
        js.set_timeout(config.publish_timeout);
        Self {
            database_url: database_url.into(),
            js,
            mapper,
            config,
            metrics: None,
            lag_measured: None,
            acked: std::collections::HashSet::new(),
        }
    }

    /// Reports published events and the backlog to `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: platform::metrics::Metrics) -> Self {
        metrics.init_relay(&self.config.name);
        self.config.tail.metrics = Some(metrics.clone());
        self.metrics = Some(metrics);
        self
    }

    /// Runs until `shutdown` fires, surviving Postgres and NATS outages.
    pub async fn run(self, shutdown: CancellationToken) {
        let tail_config = self.config.tail.clone();
        let url = self.database_url.clone();
        tail::run(url, self, tail_config, shutdown).await;
    }
}

impl<M: IntegrationMapper> Relay<M> {
    async fn checkpoint(&self, conn: &mut PgConnection, cursor: &Cursor) -> Result<(), TailError> {
        sqlx::query(
            "INSERT INTO outbox_checkpoints (name, tx_id, position) VALUES ($1, $2::text::xid8, $3) \
             ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()",
        )
        .bind(&self.config.name)
        .bind(&cursor.tx_id)
        .bind(cursor.position)
        .execute(conn)
        .await?;
        Ok(())
    }
}

impl<M: IntegrationMapper> Subscriber for Relay<M> {
    fn name(&self) -> String {
        format!("outbox:{}", self.config.name)
    }

    /// Measures the backlog between batches (bounded scan), at most once
    /// per [`LAG_EVERY`].
    async fn keep_running(
        &mut self,
        conn: &mut PgConnection,
        cursor: &Cursor,
    ) -> Result<bool, TailError> {
        if self.lag_measured.is_some_and(|at| at.elapsed() < LAG_EVERY) {
            return Ok(true);
        }
        if let Some(metrics) = &self.metrics {
            self.lag_measured = Some(std::time::Instant::now());
            let row = sqlx::query(
                "SELECT count(*) AS events, \
                        COALESCE(EXTRACT(EPOCH FROM now() - min(occurred_at))::float8, 0) AS seconds \
                 FROM (SELECT occurred_at FROM events WHERE (tx_id, position) > ($1::text::xid8, $2) \
                       ORDER BY tx_id, position LIMIT 100000) backlog",
            )
            .bind(&cursor.tx_id)
            .bind(cursor.position)
            .fetch_one(conn)
            .await?;
            metrics.set_relay_lag(
                &self.config.name,
                row.try_get("events")?,
                row.try_get("seconds")?,
            );
        }
        Ok(true)
    }

    async fn load_cursor(&mut self, conn: &mut PgConnection) -> Result<Cursor, TailError> {
        let row = sqlx::query(
            "SELECT tx_id::text AS tx_text, position FROM outbox_checkpoints WHERE name = $1",
        )
        .bind(&self.config.name)
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

    async fn handle(
        &mut self,
        conn: &mut PgConnection,
        batch: &[(Cursor, RecordedEvent)],
    ) -> Result<(), TailError> {
        let Some((last, _)) = batch.last() else {
            return Ok(());
        };
        // One producer span per event, child of the span that wrote it; its
        // context replaces the stored traceparent in the NATS headers, so the
        // consumer's span hangs below it. The spans end once JetStream acked.
        let mut spans = Vec::with_capacity(batch.len());
        // The message of each event of the batch (None: private, or acked
        // by JetStream in an earlier, partly failed attempt).
        let mut messages: Vec<Option<OutboundMessage>> = Vec::with_capacity(batch.len());
        let mut unmappable = None;
        for (_, event) in batch {
            let span = tracing::info_span!(
                "relay.publish",
                otel.name = "outbox publish",
                otel.kind = "producer",
                relay = %self.config.name,
                event.r#type = %event.event_type,
                event.id = %event.event_id,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            platform::trace::set_parent(
                &span,
                platform::trace::from_traceparent(event.context.traceparent.as_deref()),
            );
            let mapped = span.in_scope(|| {
                self.mapper.map(event).map(|message| {
                    message.map(|mut message| {
                        if let Some(traceparent) = platform::trace::current_traceparent() {
                            message
                                .headers
                                .retain(|(name, _)| *name != messaging::headers::TRACEPARENT);
                            message
                                .headers
                                .push((messaging::headers::TRACEPARENT, traceparent));
                        }
                        message
                    })
                })
            });
            match mapped {
                Ok(message) => {
                    messages.push(message.filter(|m| !self.acked.contains(&m.message_id)));
                    spans.push(span);
                }
                // The relay stops at an event it cannot map; what comes
                // before it in the batch is still published and checkpointed.
                Err(error) => {
                    unmappable = Some(error);
                    break;
                }
            }
        }
        let to_send: Vec<OutboundMessage> = messages.iter().flatten().cloned().collect();
        let mut results = messaging::publish_each(&self.js, &to_send)
            .await
            .into_iter();
        // Whether each event of the batch is in JetStream now.
        let mut landed = Vec::with_capacity(batch.len());
        let mut first_error = None;
        for message in &messages {
            let Some(message) = message else {
                landed.push(true);
                continue;
            };
            match results.next() {
                Some(Ok(ack)) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.event_published(&message.subject);
                        if ack.duplicate {
                            metrics.relay_duplicate(&self.config.name);
                        }
                    }
                    landed.push(true);
                }
                Some(Err(error)) => {
                    first_error.get_or_insert(error);
                    landed.push(false);
                }
                None => landed.push(false),
            }
        }
        // The checkpoint moves past the events that landed in order; those
        // that landed after a failure are remembered, not republished.
        let prefix = landed.iter().take_while(|ok| **ok).count();
        let through = prefix.checked_sub(1).map(|i| &batch[i].0);
        let failure = first_error
            .map(TailError::new)
            .or_else(|| unmappable.map(TailError::new));
        if let Some(failure) = failure {
            for (message, ok) in messages.iter().zip(&landed).skip(prefix) {
                if let (Some(message), true) = (message, ok) {
                    self.acked.insert(message.message_id.clone());
                }
            }
            if let Some(cursor) = through {
                self.checkpoint(conn, cursor).await?;
            }
            return Err(failure);
        }
        self.acked.clear();
        self.checkpoint(conn, last).await?;
        tracing::debug!(relay = %self.config.name, count = batch.len(), "published");
        Ok(())
    }
}

/// Publishes again every event at or after `from_position` (in commit-safe
/// order, up to now), for when JetStream lost messages. JetStream drops what
/// it still has within its duplicate window; consumers are idempotent beyond
/// it. Does not move the relay's checkpoint. Returns how many were published.
///
/// # Errors
///
/// Fails when Postgres or JetStream fail, or an event cannot be mapped.
pub async fn republish<M: IntegrationMapper>(
    conn: &mut PgConnection,
    js: &jetstream::Context,
    mapper: &M,
    from_position: i64,
) -> Result<usize, TailError> {
    // Start just before the oldest transaction that wrote at or after
    // `from_position`; everything earlier in cursor order is filtered anyway.
    let start: Option<String> = sqlx::query_scalar(
        "SELECT (min(tx_id)::text::numeric - 1)::text FROM events WHERE position >= $1",
    )
    .bind(from_position)
    .fetch_one(&mut *conn)
    .await?;
    let Some(tx_id) = start else {
        return Ok(0);
    };
    let mut cursor = Cursor {
        tx_id,
        position: i64::MAX,
    };
    let mut published = 0;
    loop {
        let batch = tail::read_batch(conn, &cursor, 500).await?;
        let Some((last, _)) = batch.last() else {
            return Ok(published);
        };
        cursor = last.clone();
        let messages = batch
            .into_iter()
            .filter(|(_, e)| e.position >= from_position)
            .map(|(_, e)| mapper.map(&e))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TailError::new)?;
        messaging::publish_all(js, &messages)
            .await
            .map_err(TailError::new)?;
        published += messages.len();
    }
}
