//! The read models of orders, fed from the event store (see
//! `es_postgres::projection`): `order_summary` (one row per order, for
//! `GetOrder`) and `orders_by_user` (for `ListOrders`). Every write is keyed by
//! generation; applying is idempotent (inserts ignore repeats, updates only
//! move forward in version).

use es::RecordedEvent;
use es_postgres::{projection::Projection, tail::TailError};
use order_domain::{OrderEvent, OrderStatus};
use sqlx::PgConnection;

/// Name of the `order_summary` projection.
pub const ORDER_SUMMARY: &str = "order_summary";
/// Name of the `orders_by_user` projection.
pub const ORDERS_BY_USER: &str = "orders_by_user";
/// Every projection this service runs, for the CLI.
pub const ALL: [&str; 2] = [ORDER_SUMMARY, ORDERS_BY_USER];

/// Decodes a stored order event (any schema version); `None` for other types.
fn decode(event: &RecordedEvent) -> Result<Option<OrderEvent>, TailError> {
    if !event.event_type.starts_with("order.") {
        return Ok(None);
    }
    order_domain::decode(&event.event_type, event.schema_version, &event.payload)
        .map(Some)
        .map_err(TailError::new)
}

/// The status an event leaves an order in, and the order it is about.
fn status_after(event: &OrderEvent) -> (uuid::Uuid, OrderStatus) {
    match event {
        OrderEvent::Created { order_id, .. } => (*order_id, OrderStatus::Created),
        OrderEvent::Paid { order_id, .. } => (*order_id, OrderStatus::Paid),
        OrderEvent::Shipped { order_id, .. } => (*order_id, OrderStatus::Shipped),
        OrderEvent::Delivered { order_id, .. } => (*order_id, OrderStatus::Delivered),
        OrderEvent::Cancelled { order_id, .. } => (*order_id, OrderStatus::Cancelled),
    }
}

fn json(value: &impl serde::Serialize) -> Result<serde_json::Value, TailError> {
    serde_json::to_value(value).map_err(TailError::new)
}

/// `order_summary`: one row per order with everything `GetOrder` answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSummary;

impl Projection for OrderSummary {
    fn name(&self) -> &'static str {
        ORDER_SUMMARY
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        generation: i32,
        event: &RecordedEvent,
    ) -> Result<(), TailError> {
        let Some(decoded) = decode(event)? else {
            return Ok(());
        };
        let (order_id, status) = status_after(&decoded);
        match &decoded {
            OrderEvent::Created {
                user_id,
                currency,
                lines,
                total_minor,
                shipping_address,
                ..
            } => {
                sqlx::query(
                    "INSERT INTO order_summary (generation, order_id, user_id, status, currency, total_minor, items, \
                     shipping_address, version, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) ON CONFLICT DO NOTHING",
                )
                .bind(generation)
                .bind(order_id)
                .bind(user_id)
                .bind(status.as_str())
                .bind(currency.as_str())
                .bind(total_minor)
                .bind(json(lines)?)
                .bind(shipping_address.as_ref().map(json).transpose()?)
                .bind(event.version)
                .bind(event.occurred_at)
                .execute(conn)
                .await?;
            }
            other => {
                let (payment_reference, carrier, tracking_number, cancel_reason) = match other {
                    OrderEvent::Paid {
                        payment_reference, ..
                    } => (Some(payment_reference.as_str()), None, None, None),
                    OrderEvent::Shipped {
                        carrier,
                        tracking_number,
                        ..
                    } => (
                        None,
                        Some(carrier.as_str()),
                        Some(tracking_number.as_str()),
                        None,
                    ),
                    OrderEvent::Cancelled { reason, .. } => {
                        (None, None, None, Some(reason.as_str()))
                    }
                    _ => (None, None, None, None),
                };
                sqlx::query(
                    "UPDATE order_summary SET status = $3, version = $4, updated_at = $5, \
                     payment_reference = COALESCE($6, payment_reference), carrier = COALESCE($7, carrier), \
                     tracking_number = COALESCE($8, tracking_number), cancel_reason = COALESCE($9, cancel_reason) \
                     WHERE generation = $1 AND order_id = $2 AND version < $4",
                )
                .bind(generation)
                .bind(order_id)
                .bind(status.as_str())
                .bind(event.version)
                .bind(event.occurred_at)
                .bind(payment_reference)
                .bind(carrier)
                .bind(tracking_number)
                .bind(cancel_reason)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }

    async fn clear(&self, conn: &mut PgConnection, generation: i32) -> Result<(), TailError> {
        sqlx::query("DELETE FROM order_summary WHERE generation = $1")
            .bind(generation)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// `orders_by_user`: a user's orders with their status, for listing.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrdersByUser;

impl Projection for OrdersByUser {
    fn name(&self) -> &'static str {
        ORDERS_BY_USER
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        generation: i32,
        event: &RecordedEvent,
    ) -> Result<(), TailError> {
        let Some(decoded) = decode(event)? else {
            return Ok(());
        };
        let (order_id, status) = status_after(&decoded);
        if let OrderEvent::Created {
            user_id,
            currency,
            lines,
            total_minor,
            ..
        } = &decoded
        {
            let item_count: i64 = lines.iter().map(|l| i64::from(l.quantity.get())).sum();
            sqlx::query(
                "INSERT INTO orders_by_user (generation, user_id, order_id, status, currency, total_minor, item_count, \
                 version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT DO NOTHING",
            )
            .bind(generation)
            .bind(user_id)
            .bind(order_id)
            .bind(status.as_str())
            .bind(currency.as_str())
            .bind(total_minor)
            .bind(item_count)
            .bind(event.version)
            .bind(event.occurred_at)
            .execute(conn)
            .await?;
        } else {
            sqlx::query(
                "UPDATE orders_by_user SET status = $3, version = $4, updated_at = $5 \
                 WHERE generation = $1 AND order_id = $2 AND version < $4",
            )
            .bind(generation)
            .bind(order_id)
            .bind(status.as_str())
            .bind(event.version)
            .bind(event.occurred_at)
            .execute(conn)
            .await?;
        }
        Ok(())
    }

    async fn clear(&self, conn: &mut PgConnection, generation: i32) -> Result<(), TailError> {
        sqlx::query("DELETE FROM orders_by_user WHERE generation = $1")
            .bind(generation)
            .execute(conn)
            .await?;
        Ok(())
    }
}
