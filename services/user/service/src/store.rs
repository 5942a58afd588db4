//! Users in Postgres. Creating a user inserts the row and its `user.created`
//! event in one transaction: the events table is the outbox, so there is no
//! dual write to NATS.

use chrono::{DateTime, Utc};
use es::EventContext;
use es_postgres::{AppendError, NewEvent, StorageError};
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
    Database(#[from] StorageError),
    #[error(transparent)]
    Append(#[from] AppendError),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
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
            _ => e.into(),
        })?;
        let stream = es::stream_name(user_domain::STREAM_PREFIX, id);
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
    pub async fn find_by_email(&self, email: &Email) -> Result<Option<UserRecord>, StorageError> {
        let row =
            sqlx::query("SELECT id, email, password_hash, created_at FROM users WHERE email = $1")
                .bind(email.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(record).transpose()?)
    }

    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn get(&self, id: Uuid) -> Result<Option<UserRecord>, StorageError> {
        let row =
            sqlx::query("SELECT id, email, password_hash, created_at FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(record).transpose()?)
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
