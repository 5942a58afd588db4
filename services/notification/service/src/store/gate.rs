//! The per-order ordering gate (ADR 9): under the orders' advisory locks,
//! what handling a batch of events needs in one read, and the finished
//! versions written with the events' log records in one statement.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use super::{Delivered, Webhook};

/// Takes the transaction-scoped advisory lock of every order in `orders`:
/// one order's events are handled one at a time across replicas. The locks
/// are taken in one global order (by key), so two batches never deadlock.
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn lock_orders(conn: &mut PgConnection, orders: &[Uuid]) -> Result<(), sqlx::Error> {
    if orders.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock(k) FROM ( \
           SELECT DISTINCT hashtextextended(o::text, 0) AS k FROM unnest($1::uuid[]) AS o ORDER BY k \
         ) AS keys",
    )
    .bind(orders)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One event to prepare: its order (when gated), its id, its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub order_id: Option<Uuid>,
    pub event_id: Uuid,
    pub user_id: Option<Uuid>,
}

/// What handling one event needs to know (read after its order's lock, so
/// it sees everything the previous holder committed).
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

/// Reads [`Known`] for every event of `wanted`, in its order, in one round
/// trip; webhooks and recipients only when asked for.
///
/// # Errors
///
/// When Postgres fails.
pub async fn prepare(
    conn: &mut PgConnection,
    wanted: &[Wanted],
    webhooks: bool,
    recipient: bool,
) -> Result<Vec<Known>, sqlx::Error> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let orders: Vec<Option<Uuid>> = wanted.iter().map(|w| w.order_id).collect();
    let events: Vec<Uuid> = wanted.iter().map(|w| w.event_id).collect();
    let users: Vec<Option<Uuid>> = wanted.iter().map(|w| w.user_id).collect();
    let rows = sqlx::query(
        "SELECT \
           COALESCE((SELECT last_version FROM order_progress p WHERE p.order_id = i.order_id), 0) AS last_version, \
           ARRAY(SELECT channel FROM notifications n WHERE n.event_id = i.event_id) AS channels, \
           CASE WHEN $4 AND i.user_id IS NOT NULL THEN (SELECT COALESCE(json_agg(json_build_object( \
               'id', w.id, 'user_id', w.user_id, 'url', w.url, 'secret', w.secret, 'created_at', w.created_at) \
               ORDER BY w.id), '[]') \
             FROM webhooks w WHERE w.user_id = i.user_id AND w.deleted_at IS NULL) END AS webhooks, \
           CASE WHEN $5 AND i.user_id IS NOT NULL THEN (SELECT email FROM recipients r WHERE r.user_id = i.user_id) END AS recipient \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) WITH ORDINALITY AS i(order_id, event_id, user_id, position) \
         ORDER BY i.position",
    )
    .bind(&orders)
    .bind(&events)
    .bind(&users)
    .bind(webhooks)
    .bind(recipient)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
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
        })
        .collect()
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

/// Records the log channel's deliveries and the orders' finished versions
/// (the highest per order wins), in one statement.
///
/// # Errors
///
/// When Postgres fails.
pub async fn finish(
    conn: &mut PgConnection,
    logs: &[Delivered],
    finished: &[(Uuid, i64)],
) -> Result<(), sqlx::Error> {
    if logs.is_empty() && finished.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = logs.iter().map(|_| Uuid::now_v7()).collect();
    let users: Vec<Uuid> = logs.iter().map(|d| d.user_id).collect();
    let events: Vec<Uuid> = logs.iter().map(|d| d.event_id).collect();
    let types: Vec<&str> = logs.iter().map(|d| d.event_type.as_str()).collect();
    let channels: Vec<&str> = logs.iter().map(|d| d.channel.as_str()).collect();
    let targets: Vec<Option<&str>> = logs.iter().map(|d| d.target.as_deref()).collect();
    let subjects: Vec<&str> = logs.iter().map(|d| d.subject.as_str()).collect();
    let bodies: Vec<&str> = logs.iter().map(|d| d.body.as_str()).collect();
    let occurred: Vec<DateTime<Utc>> = logs.iter().map(|d| d.occurred_at).collect();
    let orders: Vec<Uuid> = finished.iter().map(|(order, _)| *order).collect();
    let versions: Vec<i64> = finished.iter().map(|(_, version)| *version).collect();
    sqlx::query(
        "WITH rec AS ( \
           INSERT INTO notifications (id, user_id, event_id, event_type, channel, target, subject, body, occurred_at) \
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], \
                                $7::text[], $8::text[], $9::timestamptz[]) \
           ON CONFLICT ON CONSTRAINT notifications_event_channel_key DO NOTHING \
         ) \
         INSERT INTO order_progress (order_id, last_version) \
         SELECT o, max(v) FROM unnest($10::uuid[], $11::int8[]) AS f(o, v) GROUP BY o \
         ON CONFLICT (order_id) DO UPDATE SET last_version = GREATEST(order_progress.last_version, EXCLUDED.last_version)",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&events)
    .bind(&types)
    .bind(&channels)
    .bind(&targets)
    .bind(&subjects)
    .bind(&bodies)
    .bind(&occurred)
    .bind(&orders)
    .bind(&versions)
    .execute(conn)
    .await?;
    Ok(())
}
