//! Notifications, recipients, webhooks and per-order progress in Postgres.
//! `UNIQUE (event_id, channel)` on notifications is the record that an event
//! was handled on a channel: a redelivered event delivers nothing twice.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

/// A recorded notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationRecord {
    pub seq: i64,
    pub id: Uuid,
    pub user_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub channel: String,
    pub subject: String,
    pub body: String,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// A registered webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: Uuid,
    pub user_id: Uuid,
    pub url: String,
    pub secret: String,
    pub created_at: DateTime<Utc>,
}

/// One delivered notification, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub event_id: Uuid,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub user_id: Uuid,
    pub channel: String,
    pub target: Option<String>,
    pub subject: String,
    pub body: String,
}

const COLUMNS: &str =
    "seq, id, user_id, event_id, event_type, channel, subject, body, occurred_at, created_at";

fn notification(row: &PgRow) -> Result<NotificationRecord, sqlx::Error> {
    Ok(NotificationRecord {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        channel: row.try_get("channel")?,
        subject: row.try_get("subject")?,
        body: row.try_get("body")?,
        occurred_at: row.try_get("occurred_at")?,
        created_at: row.try_get("created_at")?,
    })
}

fn webhook(row: &PgRow) -> Result<Webhook, sqlx::Error> {
    Ok(Webhook {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        url: row.try_get("url")?,
        secret: row.try_get("secret")?,
        created_at: row.try_get("created_at")?,
    })
}

#[derive(Debug, Clone)]
pub struct NotificationStore {
    pool: PgPool,
}

impl NotificationStore {
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Channels on which `event_id` was already delivered.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn delivered_channels(&self, event_id: Uuid) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT channel FROM notifications WHERE event_id = $1")
            .bind(event_id)
            .fetch_all(&self.pool)
            .await
    }

    /// Records a delivery unless this (event, channel) was recorded before.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn record(&self, delivered: &Delivered) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT INTO notifications (id, user_id, event_id, event_type, channel, target, subject, body, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT ON CONSTRAINT notifications_event_channel_key DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(delivered.user_id)
        .bind(delivered.event_id)
        .bind(&delivered.event_type)
        .bind(&delivered.channel)
        .bind(delivered.target.as_deref())
        .bind(&delivered.subject)
        .bind(&delivered.body)
        .bind(delivered.occurred_at)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// A page of a user's notifications, newest first, starting below `before`.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn list(
        &self,
        user_id: Uuid,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<NotificationRecord>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM notifications WHERE user_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(notification).collect()
    }

    /// One notification by id.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn get(&self, id: Uuid) -> Result<Option<NotificationRecord>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM notifications WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(notification).transpose()
    }

    /// Remembers a user's email address (from `user.created`).
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn remember_recipient(&self, user_id: Uuid, email: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO recipients (user_id, email) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, updated_at = now()",
        )
        .bind(user_id)
        .bind(email)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A user's email address, if `user.created` was seen.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn recipient(&self, user_id: Uuid) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT email FROM recipients WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Registers a webhook.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn add_webhook(
        &self,
        user_id: Uuid,
        url: &str,
        secret: &str,
    ) -> Result<Webhook, sqlx::Error> {
        let row = sqlx::query(
            "INSERT INTO webhooks (id, user_id, url, secret) VALUES ($1, $2, $3, $4) \
             RETURNING id, user_id, url, secret, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(url)
        .bind(secret)
        .fetch_one(&self.pool)
        .await?;
        webhook(&row)
    }

    /// A user's active webhooks, oldest first.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn webhooks(&self, user_id: Uuid) -> Result<Vec<Webhook>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, user_id, url, secret, created_at FROM webhooks \
             WHERE user_id = $1 AND deleted_at IS NULL ORDER BY id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(webhook).collect()
    }

    /// Deactivates one of `user_id`'s webhooks; `false` if it has none by that id.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn delete_webhook(&self, user_id: Uuid, id: Uuid) -> Result<bool, sqlx::Error> {
        let affected = sqlx::query(
            "UPDATE webhooks SET deleted_at = now() WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(user_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(affected == 1)
    }
}

/// The last finished event version of an order, read under the order's
/// transaction-scoped advisory lock (so replicas take turns per order).
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn lock_order(conn: &mut PgConnection, order_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    let last: Option<i64> =
        sqlx::query_scalar("SELECT last_version FROM order_progress WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(last.unwrap_or(0))
}

/// Marks `version` of the order finished (never moves backwards).
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn finish_version(
    conn: &mut PgConnection,
    order_id: Uuid,
    version: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO order_progress (order_id, last_version) VALUES ($1, $2) \
         ON CONFLICT (order_id) DO UPDATE SET last_version = GREATEST(order_progress.last_version, EXCLUDED.last_version)",
    )
    .bind(order_id)
    .bind(version)
    .execute(conn)
    .await?;
    Ok(())
}
