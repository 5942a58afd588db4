//! The Postgres pool every service uses.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgPoolOptions};

/// A lazily connecting pool. No ping on acquire (`test_before_acquire(false)`):
/// a broken connection surfaces as an error on use, which callers map to
/// UNAVAILABLE, instead of costing every command a round trip.
///
/// # Errors
///
/// Fails only when the URL does not parse.
pub fn pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .connect_lazy(url)
}

/// Runs each migrator in turn, waiting (bounded) for Postgres to accept connections so
/// services can start before their database is up.
///
/// # Errors
///
/// Fails when Postgres stays unreachable for `wait` or a migration fails.
pub async fn migrate(
    pool: &PgPool,
    migrators: Vec<sqlx::migrate::Migrator>,
    wait: Duration,
) -> Result<(), crate::StartError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match pool.acquire().await {
            Ok(_) => break,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "postgres not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    // Several migrators share `_sqlx_migrations` (event store + service);
    // each must ignore the others' versions, and versions must be unique
    // across them: services number a day's migrations 000001-000099, the
    // event store 000100 and up.
    for mut migrator in migrators {
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
    }
    Ok(())
}

/// A storage failure, classified once, where it happens: the database was
/// unreachable, going away or the statement lost a race or a timeout
/// (retrying can help: UNAVAILABLE), or the statement itself failed (a bug
/// or bad data: retrying cannot help: INTERNAL).
/// Stores return it; handlers pass it on with `?` (it converts to a
/// `Status`), so no handler looks at a `sqlx::Error`.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Failed(#[source] sqlx::Error),
}

impl StorageError {
    /// Whether the database was unreachable (as opposed to refusing the
    /// statement).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        let unavailable = match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            // Connection exceptions and operator intervention (shutdown,
            // crash recovery), and what passes on a retry: a statement
            // timeout, a serialization failure, a deadlock, a lock not got.
            sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                c.starts_with("08")
                    || c.starts_with("57P")
                    || matches!(&*c, "57014" | "40001" | "40P01" | "55P03")
            }),
            _ => false,
        };
        if unavailable {
            Self::Unavailable(error)
        } else {
            Self::Failed(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_out_of_reach_is_unavailable_and_a_refused_statement_internal() {
        let unreachable = StorageError::from(sqlx::Error::PoolTimedOut);
        assert!(unreachable.is_unavailable());
        let status = tonic::Status::from(unreachable);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let refused = tonic::Status::from(StorageError::from(sqlx::Error::RowNotFound));
        assert_eq!(refused.code(), tonic::Code::Internal);
        // The cause goes to the log, not to the caller.
        assert_eq!(refused.message(), "internal error");
    }
}
