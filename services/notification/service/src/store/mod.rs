//! Notifications, recipients, webhooks and per-order progress in Postgres.
//! `UNIQUE (event_id, channel)` on notifications is the record that an event
//! was handled on a channel: a redelivered event delivers nothing twice.
//! The per-order ordering gate is in `gate`.

mod gate;

pub use gate::{Known, Wanted, finish, lock_orders, prepare};

use chrono::{DateTime, Utc};
use platform::db::StorageError;
use sqlx::{PgPool, Row as _, postgres::PgRow};
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
    ) -> Result<Vec<NotificationRecord>, StorageError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM notifications WHERE user_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(notification).collect::<Result<_, _>>()?)
    }

    /// One notification by id.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn get(&self, id: Uuid) -> Result<Option<NotificationRecord>, StorageError> {
        let sql = format!("SELECT {COLUMNS} FROM notifications WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(notification).transpose()?)
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

    /// Counts one failed attempt of `event_id` on `consumer`; returns how
    /// many there have been.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn count_failure(
        &self,
        consumer: &str,
        event_id: Uuid,
        error: &str,
    ) -> Result<i64, sqlx::Error> {
        let failures: i32 = sqlx::query_scalar(
            "WITH pruned AS (DELETE FROM delivery_failures WHERE updated_at < now() - interval '7 days') \
             INSERT INTO delivery_failures (consumer, event_id, failures, last_error) \
             VALUES ($1, $2, 1, $3) \
             ON CONFLICT (consumer, event_id) DO UPDATE \
               SET failures = delivery_failures.failures + 1, last_error = EXCLUDED.last_error, \
                   updated_at = now() \
             RETURNING failures",
        )
        .bind(consumer)
        .bind(event_id)
        .bind(error)
        .fetch_one(&self.pool)
        .await?;
        Ok(i64::from(failures))
    }

    /// Notes that `event_id` waits for its order's previous event; returns
    /// how long it has been waiting since it first had to.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn note_wait(
        &self,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<std::time::Duration, sqlx::Error> {
        let waited: f64 = sqlx::query_scalar(
            "INSERT INTO delivery_failures (consumer, event_id, failures, last_error, first_waited_at) \
             VALUES ($1, $2, 0, 'waiting for the previous event', now()) \
             ON CONFLICT (consumer, event_id) DO UPDATE \
               SET first_waited_at = COALESCE(delivery_failures.first_waited_at, now()), \
                   updated_at = now() \
             RETURNING EXTRACT(EPOCH FROM now() - first_waited_at)::float8",
        )
        .bind(consumer)
        .bind(event_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(std::time::Duration::from_secs_f64(waited.clamp(0.0, 1e9)))
    }

    /// Forgets the failures of a message that is done (delivered or dead).
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn forget_failures(&self, consumer: &str, event_id: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM delivery_failures WHERE consumer = $1 AND event_id = $2")
            .bind(consumer)
            .bind(event_id)
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

    /// Registers a webhook unless the user has `max_per_user` already
    /// (`None`).
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn add_webhook(
        &self,
        user_id: Uuid,
        url: &str,
        secret: &str,
        max_per_user: u32,
    ) -> Result<Option<Webhook>, StorageError> {
        let mut tx = self.pool.begin().await?;
        // Serializes one user's registrations so the cap holds under races.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 42))")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(
            "INSERT INTO webhooks (id, user_id, url, secret) \
             SELECT $1, $2, $3, $4 \
             WHERE (SELECT count(*) FROM webhooks WHERE user_id = $2 AND deleted_at IS NULL) < $5 \
             RETURNING id, user_id, url, secret, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(url)
        .bind(secret)
        .bind(i64::from(max_per_user))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.as_ref().map(webhook).transpose()?)
    }

    /// A user's active webhooks, oldest first.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn webhooks(&self, user_id: Uuid) -> Result<Vec<Webhook>, StorageError> {
        let rows = sqlx::query(
            "SELECT id, user_id, url, secret, created_at FROM webhooks \
             WHERE user_id = $1 AND deleted_at IS NULL ORDER BY id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(webhook).collect::<Result<_, _>>()?)
    }

    /// Deactivates one of `user_id`'s webhooks; `false` if it has none by that id.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn delete_webhook(&self, user_id: Uuid, id: Uuid) -> Result<bool, StorageError> {
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
