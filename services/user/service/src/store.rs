//! Users in Postgres. Creating a user inserts the row and its `user.created`
//! event in one transaction: the events table is the outbox, so there is no
//! dual write to NATS.

use chrono::{DateTime, Utc};
use es::EventContext;
use es_postgres::{AppendError, NewEvent};
use sqlx::{PgPool, Row as _};
use user_domain::{Email, UserEvent};
use uuid::Uuid;

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: Uuid,
    pub email: String,
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("email is already registered")]
    EmailTaken,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Append(#[from] AppendError),
}

#[derive(Debug, Clone)]
pub struct UserStore {
    pool: PgPool,
}

impl UserStore {
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Inserts the user and appends `user.created` atomically.
    ///
    /// # Errors
    ///
    /// [`StoreError::EmailTaken`] when the email is registered already.
    pub async fn create(
        &self,
        id: Uuid,
        email: &Email,
        password_hash: &str,
        context: &EventContext,
    ) -> Result<UserRecord, StoreError> {
        let now = es_postgres::now();
        let event = UserEvent::Created {
            user_id: id,
            email: email.clone(),
        };
        let new_event = NewEvent::from_domain(&event, now).map_err(AppendError::from)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(email.as_str())
        .bind(password_hash)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some("users_email_key") => {
                StoreError::EmailTaken
            }
            _ => StoreError::Database(e),
        })?;
        let stream = format!("{}-{id}", user_domain::STREAM_PREFIX);
        es_postgres::store::append(&mut *tx, &stream, 0, &[new_event], context, None, None).await?;
        tx.commit().await?;
        Ok(UserRecord {
            id,
            email: email.as_str().to_owned(),
            password_hash: password_hash.to_owned(),
            created_at: now,
        })
    }

    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn find_by_email(&self, email: &Email) -> Result<Option<UserRecord>, sqlx::Error> {
        let row =
            sqlx::query("SELECT id, email, password_hash, created_at FROM users WHERE email = $1")
                .bind(email.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(record).transpose()
    }

    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn get(&self, id: Uuid) -> Result<Option<UserRecord>, sqlx::Error> {
        let row =
            sqlx::query("SELECT id, email, password_hash, created_at FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(record).transpose()
    }
}

fn record(row: &sqlx::postgres::PgRow) -> Result<UserRecord, sqlx::Error> {
    Ok(UserRecord {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Throttling of failed sign-ins per email.
#[derive(Debug, Clone)]
pub struct LoginThrottle {
    pool: PgPool,
    max_failures: i32,
    window: chrono::Duration,
    lockout: chrono::Duration,
}

impl LoginThrottle {
    #[must_use]
    pub fn new(pool: PgPool, max_failures: u32, window_secs: u64, lockout_secs: u64) -> Self {
        let secs = |s: u64| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
        Self {
            pool,
            max_failures: i32::try_from(max_failures.max(1)).unwrap_or(i32::MAX),
            window: secs(window_secs),
            lockout: secs(lockout_secs),
        }
    }

    /// When the lock on `email` ends, if it is locked now.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn locked_until(&self, email: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let until: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
            "SELECT locked_until FROM login_throttle WHERE email = $1 AND locked_until > now()",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        Ok(until.flatten())
    }

    /// Counts a failure (a new window if the last one is over) and locks the
    /// email when the count reaches the limit.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn record_failure(&self, email: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO login_throttle AS t (email, failures, window_started, locked_until) \
             VALUES ($1, 1, now(), CASE WHEN $3 <= 1 THEN now() + $4 END) \
             ON CONFLICT (email) DO UPDATE SET \
               failures = CASE WHEN t.window_started < now() - $2 THEN 1 ELSE t.failures + 1 END, \
               window_started = CASE WHEN t.window_started < now() - $2 THEN now() ELSE t.window_started END, \
               locked_until = CASE WHEN t.window_started >= now() - $2 AND t.failures + 1 >= $3 \
                                   THEN now() + $4 ELSE t.locked_until END",
        )
        .bind(email)
        .bind(self.window)
        .bind(self.max_failures)
        .bind(self.lockout)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets failures after a successful sign-in.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn reset(&self, email: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM login_throttle WHERE email = $1")
            .bind(email)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
