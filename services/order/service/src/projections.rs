//! The read models of orders, fed from the event store (see
//! `es_postgres::projection`): `order_summary` (one row per order, for
//! `GetOrder`) and `orders_by_user` (for `ListOrders`). Every write is keyed by
//! generation; applying is idempotent (a row only moves forward in version).
//!
//! A batch is applied in at most two statements per read model, whatever its
//! size: the batch's events are first merged per order ([`patches`]), then
//! orders created in the batch are upserted and the others updated, each
//! with one `UNNEST` statement.

use chrono::{DateTime, Utc};
use es::RecordedEvent;
use es_postgres::{projection::Projection, tail::TailError};
use order_domain::{OrderEvent, OrderStatus};
use sqlx::PgConnection;
use uuid::Uuid;

pub const ORDER_SUMMARY: &str = "order_summary";
pub const ORDERS_BY_USER: &str = "orders_by_user";
pub const ALL: [&str; 2] = [ORDER_SUMMARY, ORDERS_BY_USER];

fn decode(event: &RecordedEvent) -> Result<Option<OrderEvent>, TailError> {
    if !event.event_type.starts_with("order.") {
        return Ok(None);
    }
    order_domain::decode(&event.event_type, event.schema_version, &event.payload)
        .map(Some)
        .map_err(TailError::new)
}

fn status_after(event: &OrderEvent) -> (Uuid, OrderStatus) {
    match event {
        OrderEvent::Created { order_id, .. } => (*order_id, OrderStatus::Created),
        OrderEvent::Paid { order_id, .. } => (*order_id, OrderStatus::Paid),
        OrderEvent::Shipped { order_id, .. } => (*order_id, OrderStatus::Shipped),
        OrderEvent::Delivered { order_id, .. } => (*order_id, OrderStatus::Delivered),
        OrderEvent::Cancelled { order_id, .. } => (*order_id, OrderStatus::Cancelled),
    }
}

fn json_text(value: &impl serde::Serialize) -> Result<String, TailError> {
    serde_json::to_string(value).map_err(TailError::new)
}

/// The columns an `order.created` sets once.
#[derive(Debug, Clone, PartialEq)]
struct Created {
    user_id: Uuid,
    currency: String,
    total_minor: i64,
    /// JSON text of the lines.
    items: String,
    item_count: i64,
    /// JSON text of the address, if any.
    shipping_address: Option<String>,
    created_at: DateTime<Utc>,
}

/// What one batch does to one order, merged in version order.
#[derive(Debug, Clone, PartialEq)]
struct Patch {
    order_id: Uuid,
    /// Set when the batch holds the order's creation.
    created: Option<Created>,
    status: &'static str,
    version: i64,
    updated_at: DateTime<Utc>,
    payment_reference: Option<String>,
    carrier: Option<String>,
    tracking_number: Option<String>,
    cancel_reason: Option<String>,
}

/// Merges a batch (per-stream version order, as followers deliver it) into
/// one patch per order, in order of first appearance.
fn patches(events: &[&RecordedEvent]) -> Result<Vec<Patch>, TailError> {
    let mut patches: Vec<Patch> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for event in events {
        let Some(decoded) = decode(event)? else {
            continue;
        };
        let (order_id, status) = status_after(&decoded);
        let slot = *index.entry(order_id).or_insert_with(|| {
            patches.push(Patch {
                order_id,
                created: None,
                status: status.as_str(),
                version: 0,
                updated_at: event.occurred_at,
                payment_reference: None,
                carrier: None,
                tracking_number: None,
                cancel_reason: None,
            });
            patches.len() - 1
        });
        let patch = &mut patches[slot];
        if event.version <= patch.version {
            continue;
        }
        patch.status = status.as_str();
        patch.version = event.version;
        patch.updated_at = event.occurred_at;
        match decoded {
            OrderEvent::Created {
                user_id,
                currency,
                lines,
                total_minor,
                shipping_address,
                ..
            } => {
                patch.created = Some(Created {
                    user_id,
                    currency: currency.as_str().to_owned(),
                    total_minor,
                    items: json_text(&lines)?,
                    item_count: lines.iter().map(|l| i64::from(l.quantity.get())).sum(),
                    shipping_address: shipping_address.as_ref().map(json_text).transpose()?,
                    created_at: event.occurred_at,
                });
            }
            OrderEvent::Paid {
                payment_reference, ..
            } => patch.payment_reference = Some(payment_reference.as_str().to_owned()),
            OrderEvent::Shipped {
                carrier,
                tracking_number,
                ..
            } => {
                patch.carrier = Some(carrier.as_str().to_owned());
                patch.tracking_number = Some(tracking_number.as_str().to_owned());
            }
            OrderEvent::Cancelled { reason, .. } => {
                patch.cancel_reason = Some(reason.as_str().to_owned());
            }
            OrderEvent::Delivered { .. } => {}
        }
    }
    Ok(patches)
}

/// Column vectors of the patches, for `UNNEST`.
#[derive(Debug, Default)]
struct Columns {
    order_id: Vec<Uuid>,
    status: Vec<&'static str>,
    version: Vec<i64>,
    updated_at: Vec<DateTime<Utc>>,
    payment_reference: Vec<Option<String>>,
    carrier: Vec<Option<String>>,
    tracking_number: Vec<Option<String>>,
    cancel_reason: Vec<Option<String>>,
    user_id: Vec<Uuid>,
    currency: Vec<String>,
    total_minor: Vec<i64>,
    items: Vec<String>,
    item_count: Vec<i64>,
    shipping_address: Vec<Option<String>>,
    created_at: Vec<DateTime<Utc>>,
}

impl Columns {
    fn push(&mut self, patch: &Patch) {
        self.order_id.push(patch.order_id);
        self.status.push(patch.status);
        self.version.push(patch.version);
        self.updated_at.push(patch.updated_at);
        self.payment_reference.push(patch.payment_reference.clone());
        self.carrier.push(patch.carrier.clone());
        self.tracking_number.push(patch.tracking_number.clone());
        self.cancel_reason.push(patch.cancel_reason.clone());
        if let Some(c) = &patch.created {
            self.user_id.push(c.user_id);
            self.currency.push(c.currency.clone());
            self.total_minor.push(c.total_minor);
            self.items.push(c.items.clone());
            self.item_count.push(c.item_count);
            self.shipping_address.push(c.shipping_address.clone());
            self.created_at.push(c.created_at);
        }
    }

    /// (orders created in the batch, orders only changed by it).
    fn split(patches: &[Patch]) -> (Self, Self) {
        let (mut created, mut changed) = (Self::default(), Self::default());
        for patch in patches {
            if patch.created.is_some() {
                created.push(patch);
            } else {
                changed.push(patch);
            }
        }
        (created, changed)
    }
}

const SUMMARY_UPSERT: &str = "
INSERT INTO order_summary (generation, order_id, status, version, updated_at, payment_reference, carrier,
                           tracking_number, cancel_reason, user_id, currency, total_minor, items,
                           shipping_address, created_at)
SELECT $1, u.order_id, u.status, u.version, u.updated_at, u.payment_reference, u.carrier, u.tracking_number,
       u.cancel_reason, u.user_id, u.currency, u.total_minor, u.items::jsonb, u.shipping_address::jsonb,
       u.created_at
FROM UNNEST($2::uuid[], $3::text[], $4::int8[], $5::timestamptz[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::uuid[], $11::text[], $12::int8[], $13::text[], $14::text[], $15::timestamptz[])
     AS u(order_id, status, version, updated_at, payment_reference, carrier, tracking_number, cancel_reason,
          user_id, currency, total_minor, items, shipping_address, created_at)
ON CONFLICT (generation, order_id) DO UPDATE SET
    status = EXCLUDED.status, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
    payment_reference = COALESCE(EXCLUDED.payment_reference, order_summary.payment_reference),
    carrier = COALESCE(EXCLUDED.carrier, order_summary.carrier),
    tracking_number = COALESCE(EXCLUDED.tracking_number, order_summary.tracking_number),
    cancel_reason = COALESCE(EXCLUDED.cancel_reason, order_summary.cancel_reason)
WHERE order_summary.version < EXCLUDED.version";

const SUMMARY_UPDATE: &str = "
UPDATE order_summary s SET
    status = u.status, version = u.version, updated_at = u.updated_at,
    payment_reference = COALESCE(u.payment_reference, s.payment_reference),
    carrier = COALESCE(u.carrier, s.carrier),
    tracking_number = COALESCE(u.tracking_number, s.tracking_number),
    cancel_reason = COALESCE(u.cancel_reason, s.cancel_reason)
FROM UNNEST($2::uuid[], $3::text[], $4::int8[], $5::timestamptz[], $6::text[], $7::text[], $8::text[],
            $9::text[])
     AS u(order_id, status, version, updated_at, payment_reference, carrier, tracking_number, cancel_reason)
WHERE s.generation = $1 AND s.order_id = u.order_id AND s.version < u.version";

#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSummary;

impl Projection for OrderSummary {
    fn name(&self) -> &'static str {
        ORDER_SUMMARY
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ORDER_SUMMARY]
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        generation: i32,
        events: &[&RecordedEvent],
    ) -> Result<(), TailError> {
        let (created, changed) = Columns::split(&patches(events)?);
        if !created.order_id.is_empty() {
            sqlx::query(SUMMARY_UPSERT)
                .bind(generation)
                .bind(&created.order_id)
                .bind(&created.status)
                .bind(&created.version)
                .bind(&created.updated_at)
                .bind(&created.payment_reference)
                .bind(&created.carrier)
                .bind(&created.tracking_number)
                .bind(&created.cancel_reason)
                .bind(&created.user_id)
                .bind(&created.currency)
                .bind(&created.total_minor)
                .bind(&created.items)
                .bind(&created.shipping_address)
                .bind(&created.created_at)
                .execute(&mut *conn)
                .await?;
        }
        if !changed.order_id.is_empty() {
            sqlx::query(SUMMARY_UPDATE)
                .bind(generation)
                .bind(&changed.order_id)
                .bind(&changed.status)
                .bind(&changed.version)
                .bind(&changed.updated_at)
                .bind(&changed.payment_reference)
                .bind(&changed.carrier)
                .bind(&changed.tracking_number)
                .bind(&changed.cancel_reason)
                .execute(&mut *conn)
                .await?;
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

const BY_USER_UPSERT: &str = "
INSERT INTO orders_by_user (generation, order_id, status, version, updated_at, user_id, currency,
                            total_minor, item_count, created_at)
SELECT $1, u.order_id, u.status, u.version, u.updated_at, u.user_id, u.currency, u.total_minor,
       u.item_count, u.created_at
FROM UNNEST($2::uuid[], $3::text[], $4::int8[], $5::timestamptz[], $6::uuid[], $7::text[], $8::int8[],
            $9::int8[], $10::timestamptz[])
     AS u(order_id, status, version, updated_at, user_id, currency, total_minor, item_count, created_at)
ON CONFLICT (generation, order_id) DO UPDATE SET
    status = EXCLUDED.status, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
WHERE orders_by_user.version < EXCLUDED.version";

const BY_USER_UPDATE: &str = "
UPDATE orders_by_user s SET status = u.status, version = u.version, updated_at = u.updated_at
FROM UNNEST($2::uuid[], $3::text[], $4::int8[], $5::timestamptz[])
     AS u(order_id, status, version, updated_at)
WHERE s.generation = $1 AND s.order_id = u.order_id AND s.version < u.version";

#[derive(Debug, Clone, Copy, Default)]
pub struct OrdersByUser;

impl Projection for OrdersByUser {
    fn name(&self) -> &'static str {
        ORDERS_BY_USER
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ORDERS_BY_USER]
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        generation: i32,
        events: &[&RecordedEvent],
    ) -> Result<(), TailError> {
        let (created, changed) = Columns::split(&patches(events)?);
        if !created.order_id.is_empty() {
            sqlx::query(BY_USER_UPSERT)
                .bind(generation)
                .bind(&created.order_id)
                .bind(&created.status)
                .bind(&created.version)
                .bind(&created.updated_at)
                .bind(&created.user_id)
                .bind(&created.currency)
                .bind(&created.total_minor)
                .bind(&created.item_count)
                .bind(&created.created_at)
                .execute(&mut *conn)
                .await?;
        }
        if !changed.order_id.is_empty() {
            sqlx::query(BY_USER_UPDATE)
                .bind(generation)
                .bind(&changed.order_id)
                .bind(&changed.status)
                .bind(&changed.version)
                .bind(&changed.updated_at)
                .execute(&mut *conn)
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
