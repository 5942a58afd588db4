//! `--sabotage`: the oracle's own test on a real run. After the system has
//! settled and before the oracle looks, one of each defect it must find is
//! made by hand; the verdict must then count exactly one of each.

use anyhow::Context as _;
use uuid::Uuid;

/// Breaks the settled system four ways:
/// - lost: the first ORDERS message is deleted (its event is stored but no
///   longer published);
/// - duplicated: one notification row is doubled (its uniqueness
///   constraint dropped first, as a broken dedup would);
/// - unexpected: a message for an event no store has is published;
/// - diverged: one live `order_summary` row gets another status.
pub(crate) async fn apply(
    orders: &sqlx::PgPool,
    notifications: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<()> {
    let stream = js.get_stream(messaging::ORDERS_STREAM.name).await?;
    let mut info = stream.clone();
    let first = info.info().await?.state.first_sequence;
    stream
        .delete_message(first)
        .await
        .context("deleting an ORDERS message")?;

    sqlx::query(
        "ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_event_channel_key",
    )
    .execute(notifications)
    .await?;
    let doubled = sqlx::query(
        "INSERT INTO notifications
             (id, user_id, event_id, event_type, channel, subject, body, occurred_at, target)
         SELECT $1, user_id, event_id, event_type, channel, subject, body, occurred_at, target
         FROM notifications ORDER BY seq LIMIT 1",
    )
    .bind(Uuid::new_v4())
    .execute(notifications)
    .await?;
    anyhow::ensure!(doubled.rows_affected() == 1, "no notification to double");

    let id = Uuid::new_v4().to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    js.publish_with_headers("order.created", headers, "sabotage".into())
        .await?
        .await
        .context("publishing the unexpected message")?;

    let generation = es_postgres::projection::status(orders, "order_summary")
        .await?
        .map_or(1, |s| s.live_generation);
    let changed = sqlx::query(
        "UPDATE order_summary SET status = 'sabotaged'
         WHERE generation = $1
           AND order_id = (SELECT order_id FROM order_summary WHERE generation = $1 LIMIT 1)",
    )
    .bind(generation)
    .execute(orders)
    .await?;
    anyhow::ensure!(changed.rows_affected() == 1, "no order summary to change");
    Ok(())
}
