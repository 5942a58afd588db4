//! The query side: reads only the live generation of the read models, and
//! waits (bounded) for a position when the caller asks for read-your-writes.

use std::time::Duration;

use contracts::order::v1 as pb;
use order_domain::{OrderLine, OrderStatus, ShippingAddress};
use sqlx::{PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

use crate::{
    projections::{ORDER_SUMMARY, ORDERS_BY_USER},
    proto::status_to_proto,
    wire,
};

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the read model has not reached position {0} yet; retry")]
    NotCaughtUp(i64),
    #[error("position {0} was never written")]
    UnknownPosition(i64),
    #[error(transparent)]
    Database(#[from] platform::db::StorageError),
    #[error("read model row is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

impl From<sqlx::Error> for QueryError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
}

/// The order read models.
#[derive(Debug, Clone)]
pub struct ReadModels {
    pool: PgPool,
    max_wait: Duration,
}

fn status_of(row: &PgRow) -> Result<pb::OrderStatus, QueryError> {
    let status: String = row.try_get("status")?;
    Ok(status_to_proto(OrderStatus::parse(&status)))
}

fn money(row: &PgRow) -> Result<pb::Money, QueryError> {
    Ok(pb::Money {
        currency: row.try_get("currency")?,
        amount_minor: row.try_get("total_minor")?,
    })
}

fn order_from_row(row: &PgRow) -> Result<pb::Order, QueryError> {
    let lines: Vec<OrderLine> = serde_json::from_value(row.try_get("items")?)?;
    let address: Option<ShippingAddress> = row
        .try_get::<Option<serde_json::Value>, _>("shipping_address")?
        .map(serde_json::from_value)
        .transpose()?;
    let text = |column: &str| -> Result<String, QueryError> {
        Ok(row
            .try_get::<Option<String>, _>(column)?
            .unwrap_or_default())
    };
    Ok(pb::Order {
        id: row.try_get::<Uuid, _>("order_id")?.to_string(),
        user_id: row.try_get::<Uuid, _>("user_id")?.to_string(),
        status: status_of(row)?.into(),
        items: wire::order::lines(&lines),
        total: Some(money(row)?),
        version: row.try_get("version")?,
        created_at: Some(contracts::timestamp(row.try_get("created_at")?)),
        updated_at: Some(contracts::timestamp(row.try_get("updated_at")?)),
        shipping_address: address.as_ref().map(wire::order::address),
        payment_reference: text("payment_reference")?,
        carrier: text("carrier")?,
        tracking_number: text("tracking_number")?,
        cancel_reason: text("cancel_reason")?,
    })
}

impl ReadModels {
    #[must_use]
    pub fn new(pool: PgPool, max_wait: Duration) -> Self {
        Self { pool, max_wait }
    }

    /// Waits until `projection` has applied the event at `position`.
    ///
    /// # Errors
    ///
    /// [`QueryError::NotCaughtUp`] after the configured bound.
    pub async fn wait_for(&self, projection: &str, position: i64) -> Result<(), QueryError> {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        loop {
            match es_postgres::projection::has_reached(&self.pool, projection, position).await? {
                None => return Err(QueryError::UnknownPosition(position)),
                Some(true) => return Ok(()),
                Some(false) if tokio::time::Instant::now() >= deadline => {
                    return Err(QueryError::NotCaughtUp(position));
                }
                Some(false) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// One order from `order_summary`.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn order(&self, order_id: Uuid) -> Result<Option<pb::Order>, QueryError> {
        let row = sqlx::query(
            "SELECT * FROM order_summary WHERE order_id = $1 \
             AND generation = (SELECT live_generation FROM projections WHERE name = $2)",
        )
        .bind(order_id)
        .bind(ORDER_SUMMARY)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(order_from_row).transpose()
    }

    /// A page of `user_id`'s orders from `orders_by_user`, newest first,
    /// strictly older than `before`.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn list(
        &self,
        user_id: Uuid,
        status: Option<OrderStatus>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<pb::OrderSummary>, QueryError> {
        let rows = sqlx::query(
            "SELECT * FROM orders_by_user \
             WHERE generation = (SELECT live_generation FROM projections WHERE name = $1) \
               AND user_id = $2 AND ($3::text IS NULL OR status = $3) \
               AND ($4::uuid IS NULL OR order_id < $4) \
             ORDER BY order_id DESC LIMIT $5",
        )
        .bind(ORDERS_BY_USER)
        .bind(user_id)
        .bind(status.map(OrderStatus::as_str))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(pb::OrderSummary {
                    id: row.try_get::<Uuid, _>("order_id")?.to_string(),
                    status: status_of(row)?.into(),
                    total: Some(money(row)?),
                    item_count: row.try_get("item_count")?,
                    created_at: Some(contracts::timestamp(row.try_get("created_at")?)),
                    updated_at: Some(contracts::timestamp(row.try_get("updated_at")?)),
                })
            })
            .collect()
    }
}
