//! The per-order ordering gate (ADR 9): under the order's advisory lock,
//! what handling one event needs in one read, and the finished version
//! written with the event's log record.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use super::{Delivered, Webhook};

/// Takes the order's transaction-scoped advisory lock: one order's events
/// are handled one at a time across replicas.
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn lock_order(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What handling one event needs to know, read in one statement (after the
/// order's lock, so it sees everything the previous holder committed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// The order's last finished version (0: none).
    pub last_version: i64,
    /// Channels this event was already delivered on.
    pub delivered_channels: Vec<String>,
    /// The user's live webhooks (when asked for).
    pub webhooks: Vec<Webhook>,
    /// The user's email address (when asked for).
    pub recipient: Option<String>,
}

/// Reads [`Known`] in one round trip.
///
/// # Errors
///
/// When Postgres fails.
pub async fn prepare(
    conn: &mut PgConnection,
    order_id: Option<Uuid>,
    event_id: Uuid,
    user_id: Option<Uuid>,
    webhooks: bool,
    recipient: bool,
) -> Result<Known, sqlx::Error> {
    let row = sqlx::query(
        "SELECT \
           COALESCE((SELECT last_version FROM order_progress WHERE order_id = $1), 0) AS last_version, \
           ARRAY(SELECT channel FROM notifications WHERE event_id = $2) AS channels, \
           CASE WHEN $4 THEN (SELECT COALESCE(json_agg(json_build_object( \
               'id', w.id, 'user_id', w.user_id, 'url', w.url, 'secret', w.secret, 'created_at', w.created_at) \
               ORDER BY w.id), '[]') \
             FROM webhooks w WHERE w.user_id = $3 AND w.deleted_at IS NULL) END AS webhooks, \
           CASE WHEN $5 THEN (SELECT email FROM recipients WHERE user_id = $3) END AS recipient",
    )
    .bind(order_id)
    .bind(event_id)
    .bind(user_id)
    .bind(webhooks && user_id.is_some())
    .bind(recipient && user_id.is_some())
    .fetch_one(&mut *conn)
    .await?;
    let hooks: Option<serde_json::Value> = row.try_get("webhooks")?;
    let hooks = match hooks {
        Some(value) => serde_json::from_value::<Vec<WebhookRow>>(value)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?
            .into_iter()
            .map(Webhook::from)
            .collect(),
        None => Vec::new(),
    };
    Ok(Known {
        last_version: row.try_get("last_version")?,
        delivered_channels: row.try_get("channels")?,
        webhooks: hooks,
        recipient: row.try_get("recipient")?,
    })
}

#[derive(Debug, serde::Deserialize)]
struct WebhookRow {
    id: Uuid,
    user_id: Uuid,
    url: String,
    secret: String,
    created_at: DateTime<Utc>,
}

impl From<WebhookRow> for Webhook {
    fn from(row: WebhookRow) -> Self {
        Self {
            id: row.id,
            user_id: row.user_id,
            url: row.url,
            secret: row.secret,
            created_at: row.created_at,
        }
    }
}

/// Records the log channel's delivery (if any) and the order's finished
/// version (if any), in one statement.
///
/// # Errors
///
/// When Postgres fails.
pub async fn finish(
    conn: &mut PgConnection,
    log: Option<&Delivered>,
    finished: Option<(Uuid, i64)>,
) -> Result<(), sqlx::Error> {
    if log.is_none() && finished.is_none() {
        return Ok(());
    }
    sqlx::query(
        "WITH rec AS ( \
           INSERT INTO notifications (id, user_id, event_id, event_type, channel, target, subject, body, occurred_at) \
           SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE $5::text IS NOT NULL \
           ON CONFLICT ON CONSTRAINT notifications_event_channel_key DO NOTHING \
         ) \
         INSERT INTO order_progress (order_id, last_version) SELECT $10, $11 WHERE $10::uuid IS NOT NULL \
         ON CONFLICT (order_id) DO UPDATE SET last_version = GREATEST(order_progress.last_version, EXCLUDED.last_version)",
    )
    .bind(Uuid::now_v7())
    .bind(log.map(|d| d.user_id))
    .bind(log.map(|d| d.event_id))
    .bind(log.map(|d| d.event_type.as_str()))
    .bind(log.map(|d| d.channel.as_str()))
    .bind(log.and_then(|d| d.target.as_deref()))
    .bind(log.map(|d| d.subject.as_str()))
    .bind(log.map(|d| d.body.as_str()))
    .bind(log.map(|d| d.occurred_at))
    .bind(finished.map(|(order_id, _)| order_id))
    .bind(finished.map(|(_, version)| version))
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks `version` of the order finished (the dead-letter path).
///
/// # Errors
///
/// When Postgres fails.
pub async fn finish_version(
    conn: &mut PgConnection,
    order_id: Uuid,
    version: i64,
) -> Result<(), sqlx::Error> {
    finish(conn, None, Some((order_id, version))).await
}
