//! Notifications in Postgres. `UNIQUE (event_id, channel)` makes recording
//! idempotent: a redelivered event inserts nothing.

use chrono::{DateTime, Utc};
use notification_domain::{Channel, Message};
use sqlx::{PgPool, Row as _};
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

/// The source event of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub occurred_at: DateTime<Utc>,
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

    /// Records the notification unless this (event, channel) was recorded
    /// before. Returns whether it is new.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn record(
        &self,
        source: Source<'_>,
        channel: Channel,
        message: &Message,
    ) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT INTO notifications (id, user_id, event_id, event_type, channel, subject, body, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT ON CONSTRAINT notifications_event_channel_key DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(message.user_id)
        .bind(source.event_id)
        .bind(source.event_type)
        .bind(channel.as_str())
        .bind(&message.subject)
        .bind(&message.body)
        .bind(source.occurred_at)
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
        let rows = sqlx::query(
            "SELECT seq, id, user_id, event_id, event_type, channel, subject, body, occurred_at, created_at \
             FROM notifications WHERE user_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        )
        .bind(user_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
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
            })
            .collect()
    }
}
