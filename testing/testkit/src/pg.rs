//! A fresh database per test.

use sqlx::{Connection as _, PgConnection};

/// A database created for one test. Databases are left behind for
/// inspection; `scripts/test` drops old `shop_test_*` databases first.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

fn admin_url() -> String {
    std::env::var("SHOP_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl TestDb {
    /// Creates `shop_test_<label>_<random>` on the test server.
    ///
    /// # Errors
    ///
    /// When the test Postgres is unreachable; the message says how to start one.
    pub async fn create(label: &str) -> anyhow::Result<Self> {
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.map_err(|e| {
            anyhow::anyhow!(
                "test Postgres at {admin} is unreachable ({e}); run the tests with scripts/test, \
                 or set SHOP_TEST_DATABASE_URL"
            )
        })?;
        let name = format!("shop_test_{label}_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => anyhow::bail!("SHOP_TEST_DATABASE_URL must end in /<database>"),
        };
        Ok(Self { name, url })
    }

    /// A pool on this database.
    ///
    /// # Errors
    ///
    /// When the URL does not parse.
    pub fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(platform::db::pool(&self.url, 5)?)
    }
}
