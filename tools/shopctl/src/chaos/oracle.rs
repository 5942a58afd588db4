//! The history oracle: what every client was told, compared with the event
//! store, JetStream, the read models and the notifications, once the system
//! has settled.
//!
//! - lost: acknowledged but not in the store (or stored at another
//!   version), or stored but missing downstream: not published, not in a
//!   read model, not notified on a channel it should have been;
//! - duplicated: two events for one command, two distinct commands winning
//!   one race, or one (event, channel) notified twice;
//! - unexpected: downstream (JetStream, a read model, a notification, a
//!   webhook) but not in the store;
//! - diverged: a read model row that differs from folding the store.
//!
//! Repeats that the design allows (a JetStream message republished past
//! the duplicate window, a webhook re-sent after a crash between the send
//! and its record; receivers drop both by id) are counted apart.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use anyhow::Context as _;
use es::Aggregate as _;
use order_domain::{Order, OrderEvent};
use sqlx::Row as _;
use uuid::Uuid;

use super::load::Ack;

/// An event as the order store has it.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) event_id: Uuid,
    pub(crate) order_id: Uuid,
    pub(crate) version: i64,
    pub(crate) event_type: String,
    pub(crate) event: OrderEvent,
}

/// A read model row, in the fields both read models and the fold share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) order_id: Uuid,
    pub(crate) user_id: Uuid,
    pub(crate) status: String,
    pub(crate) total_minor: i64,
    pub(crate) version: i64,
    /// Only `order_summary` has these.
    pub(crate) details: Option<Details>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Details {
    pub(crate) payment_reference: Option<String>,
    pub(crate) carrier: Option<String>,
    pub(crate) tracking_number: Option<String>,
}

/// Everything the oracle compares.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    pub(crate) acks: Vec<Ack>,
    pub(crate) double_wins: u64,
    pub(crate) store: Vec<Stored>,
    /// `idempotency_keys`: key -> (stream id, version).
    pub(crate) keys: HashMap<String, (String, i64)>,
    /// Event ids in the user store (their notifications are expected too).
    pub(crate) user_events: HashSet<Uuid>,
    /// `Nats-Msg-Id` of every message in ORDERS, with its count.
    pub(crate) published: HashMap<String, u32>,
    /// Message ids a scenario put on the stream itself (a poison message).
    pub(crate) injected: HashSet<String>,
    pub(crate) summary: Vec<Row>,
    pub(crate) by_user: Vec<Row>,
    /// (event id, channel) of every notification row.
    pub(crate) notifications: Vec<(Uuid, String)>,
    /// Live webhooks by user.
    pub(crate) webhooks: HashMap<Uuid, Vec<Uuid>>,
    /// `Shop-Webhook-Id` of every delivery the receiver accepted.
    pub(crate) received: Vec<String>,
}

/// The oracle's answer.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Verdict {
    pub(crate) acknowledged: usize,
    pub(crate) stored: usize,
    pub(crate) lost: usize,
    pub(crate) duplicated: usize,
    pub(crate) unexpected: usize,
    pub(crate) diverged: usize,
    /// Allowed repeats: JetStream messages past the duplicate window,
    /// webhooks re-sent after a crash.
    pub(crate) repeats: usize,
    /// The first few findings, in words.
    pub(crate) examples: Vec<String>,
}

impl Verdict {
    pub(crate) fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0 && self.diverged == 0
    }

    fn note(&mut self, text: String) {
        if self.examples.len() < 8 {
            self.examples.push(text);
        }
    }
}

/// Which notifications an event causes (besides a webhook per live hook).
fn notifies(event_type: &str) -> bool {
    matches!(
        event_type,
        "order.created" | "order.paid" | "order.shipped" | "order.cancelled"
    )
}

/// Compares the facts; a pure function, so its own tests can feed it any
/// history.
pub(crate) fn judge(facts: &Facts) -> Verdict {
    let mut verdict = Verdict {
        acknowledged: facts.acks.len(),
        stored: facts.store.len(),
        ..Verdict::default()
    };
    let by_position: HashMap<(Uuid, i64), &Stored> = facts
        .store
        .iter()
        .map(|e| ((e.order_id, e.version), e))
        .collect();
    let stored_ids: HashSet<Uuid> = facts.store.iter().map(|e| e.event_id).collect();

    // Every acknowledged command is in the store, where its answer said.
    let mut versions_by_key: HashMap<&str, HashSet<i64>> = HashMap::new();
    for ack in &facts.acks {
        versions_by_key
            .entry(ack.key.as_str())
            .or_default()
            .insert(ack.version);
        let stream = es::stream_id::<Order>(ack.order_id);
        let in_store = by_position
            .get(&(ack.order_id, ack.version))
            .is_some_and(|e| e.event_type == ack.command.event_type());
        let keyed = facts.keys.get(&ack.key) == Some(&(stream, ack.version));
        if !(in_store && keyed) {
            verdict.lost += 1;
            verdict.note(format!(
                "acknowledged {} of order {} at version {} is not in the store as told",
                ack.command.event_type(),
                ack.order_id,
                ack.version
            ));
        }
    }
    for (key, versions) in versions_by_key {
        if versions.len() > 1 {
            verdict.duplicated += versions.len() - 1;
            verdict.note(format!("key {key} was answered with versions {versions:?}"));
        }
    }
    verdict.duplicated += usize::try_from(facts.double_wins).unwrap_or(usize::MAX);
    if facts.double_wins > 0 {
        verdict.note(format!(
            "{} races had more than one winner",
            facts.double_wins
        ));
    }

    // One event per command: each type at most once per order.
    let mut types: HashMap<(Uuid, &str), usize> = HashMap::new();
    for e in &facts.store {
        *types
            .entry((e.order_id, e.event_type.as_str()))
            .or_default() += 1;
    }
    for ((order, event_type), n) in types {
        if n > 1 {
            verdict.duplicated += n - 1;
            verdict.note(format!("order {order} has {n} {event_type} events"));
        }
    }

    // Published: every stored event, once (repeats allowed), nothing else.
    for e in &facts.store {
        if !facts.published.contains_key(&e.event_id.to_string()) {
            verdict.lost += 1;
            verdict.note(format!(
                "{} {} of order {} was never published",
                e.event_type, e.event_id, e.order_id
            ));
        }
    }
    for (id, n) in &facts.published {
        verdict.repeats += usize::try_from(n.saturating_sub(1)).unwrap_or(0);
        let known = Uuid::parse_str(id).is_ok_and(|id| stored_ids.contains(&id));
        if !known && !facts.injected.contains(id) {
            verdict.unexpected += 1;
            verdict.note(format!(
                "JetStream has message {id}, the store has no such event"
            ));
        }
    }

    // Read models equal the fold of the store.
    let mut streams: BTreeMap<Uuid, Vec<&Stored>> = BTreeMap::new();
    for e in &facts.store {
        streams.entry(e.order_id).or_default().push(e);
    }
    let folded: HashMap<Uuid, Order> = streams
        .iter_mut()
        .map(|(id, events)| {
            events.sort_by_key(|e| e.version);
            (*id, Order::replay(events.iter().map(|e| &e.event)))
        })
        .collect();
    for (name, rows) in [
        ("order_summary", &facts.summary),
        ("orders_by_user", &facts.by_user),
    ] {
        let mut seen = HashSet::new();
        for row in rows {
            seen.insert(row.order_id);
            let Some(order) = folded.get(&row.order_id) else {
                verdict.unexpected += 1;
                verdict.note(format!(
                    "{name} has order {}, the store has not",
                    row.order_id
                ));
                continue;
            };
            let expected = expected_row(row.order_id, order, row.details.is_some());
            if *row != expected {
                verdict.diverged += 1;
                verdict.note(format!(
                    "{name} row {row:?} differs from the fold {expected:?}"
                ));
            }
        }
        for id in folded.keys().filter(|id| !seen.contains(id)) {
            verdict.lost += 1;
            verdict.note(format!("order {id} is missing from {name}"));
        }
    }

    // Notifications: once per (event, channel), on every channel due.
    let mut recorded: HashMap<(Uuid, &str), usize> = HashMap::new();
    for (event, channel) in &facts.notifications {
        *recorded.entry((*event, channel.as_str())).or_default() += 1;
        if !stored_ids.contains(event) && !facts.user_events.contains(event) {
            verdict.unexpected += 1;
            verdict.note(format!(
                "notification for event {event}, which is in no store"
            ));
        }
    }
    for ((event, channel), n) in &recorded {
        if *n > 1 {
            verdict.duplicated += n - 1;
            verdict.note(format!("event {event} was notified {n} times on {channel}"));
        }
    }
    let mut received: HashMap<&str, usize> = HashMap::new();
    for id in &facts.received {
        *received.entry(id.as_str()).or_default() += 1;
    }
    for (id, n) in &received {
        verdict.repeats += n - 1;
        let known = Uuid::parse_str(id)
            .is_ok_and(|id| stored_ids.contains(&id) || facts.user_events.contains(&id));
        if !known {
            verdict.unexpected += 1;
            verdict.note(format!(
                "a webhook arrived for event {id}, which is in no store"
            ));
        }
    }
    for e in facts.store.iter().filter(|e| notifies(&e.event_type)) {
        let user = folded.get(&e.order_id).and_then(|o| o.user_id);
        let mut due = vec!["log".to_owned()];
        for hook in user
            .and_then(|u| facts.webhooks.get(&u))
            .into_iter()
            .flatten()
        {
            due.push(format!("webhook:{hook}"));
        }
        for channel in due {
            if !recorded.contains_key(&(e.event_id, channel.as_str())) {
                verdict.lost += 1;
                verdict.note(format!(
                    "{} {} was never notified on {channel}",
                    e.event_type, e.event_id
                ));
            } else if channel.starts_with("webhook:")
                && !received.contains_key(e.event_id.to_string().as_str())
            {
                verdict.lost += 1;
                verdict.note(format!(
                    "{} {} is recorded as sent by webhook, the receiver never got it",
                    e.event_type, e.event_id
                ));
            }
        }
    }
    verdict
}

fn expected_row(order_id: Uuid, order: &Order, details: bool) -> Row {
    Row {
        order_id,
        user_id: order.user_id.unwrap_or_default(),
        status: order
            .status
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        total_minor: order.total_minor,
        version: order.version,
        details: details.then(|| Details {
            payment_reference: order
                .payment_reference
                .as_ref()
                .map(|p| p.as_str().to_owned()),
            carrier: order.carrier.as_ref().map(|c| c.as_str().to_owned()),
            tracking_number: order
                .tracking_number
                .as_ref()
                .map(|t| t.as_str().to_owned()),
        }),
    }
}

/// Where the system is still busy; empty when settled.
pub(crate) async fn busy(
    orders: &sqlx::PgPool,
    users: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<Vec<String>> {
    let mut busy = Vec::new();
    for (pool, relay) in [(orders, "order-events"), (users, "user-events")] {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events e
             WHERE NOT EXISTS (SELECT 1 FROM outbox_checkpoints c
                               WHERE c.name = $1 AND (e.tx_id, e.position) <= (c.tx_id, c.position))",
        )
        .bind(relay)
        .fetch_one(pool)
        .await?;
        if behind > 0 {
            busy.push(format!("relay {relay}: {behind} events"));
        }
    }
    for name in order_service::projections::ALL {
        match es_postgres::projection::progress(orders, name).await? {
            Some((live, None)) if live.lag_events == 0 => {}
            Some((live, building)) => busy.push(format!(
                "projection {name}: {} behind{}",
                live.lag_events,
                if building.is_some() {
                    ", rebuilding"
                } else {
                    ""
                }
            )),
            None => busy.push(format!("projection {name}: not started")),
        }
    }
    for (stream, consumer) in [
        ("USERS", "notification-service-users"),
        ("ORDERS", "notification-service-orders"),
    ] {
        let stream = js.get_stream(stream).await?;
        let info = stream
            .consumer_info(consumer)
            .await
            .with_context(|| format!("consumer {consumer}"))?;
        let pending = info.num_pending + info.num_ack_pending as u64;
        if pending > 0 {
            busy.push(format!("consumer {consumer}: {pending} messages"));
        }
    }
    Ok(busy)
}

/// Waits until [`busy`] is empty, at most `limit`; how long it took, or
/// what was still busy.
pub(crate) async fn settle(
    orders: &sqlx::PgPool,
    users: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    limit: Duration,
) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    loop {
        let state = busy(orders, users, js).await;
        match state {
            Ok(busy) if busy.is_empty() => return Ok(started.elapsed()),
            _ if started.elapsed() > limit => {
                return Err(match state {
                    Ok(busy) => busy.join("; "),
                    Err(error) => format!("{error:#}"),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Reads the facts from the stores, the stream and the receiver.
pub(crate) async fn collect(
    orders: &sqlx::PgPool,
    users: &sqlx::PgPool,
    notifications: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<Facts> {
    let mut facts = Facts::default();
    let rows = sqlx::query(
        "SELECT event_id, stream_id, version, event_type, schema_version, payload
         FROM events ORDER BY position",
    )
    .fetch_all(orders)
    .await?;
    for row in rows {
        let stream: String = row.try_get("stream_id")?;
        let Some(order_id) = es::id_of_stream::<Order>(&stream) else {
            continue;
        };
        let event_type: String = row.try_get("event_type")?;
        let event = order_domain::decode(
            &event_type,
            row.try_get("schema_version")?,
            &row.try_get::<serde_json::Value, _>("payload")?,
        )
        .with_context(|| format!("decoding {event_type} of {stream}"))?;
        facts.store.push(Stored {
            event_id: row.try_get("event_id")?,
            order_id,
            version: row.try_get("version")?,
            event_type,
            event,
        });
    }
    facts.keys = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT key, stream_id, version FROM idempotency_keys",
    )
    .fetch_all(orders)
    .await?
    .into_iter()
    .map(|(key, stream, version)| {
        // Stored as `<caller's user id>:<key>`; the clients know the key.
        let key = key
            .split_once(':')
            .map_or(key.as_str(), |(_, k)| k)
            .to_owned();
        (key, (stream, version))
    })
    .collect();
    facts.user_events = sqlx::query_scalar("SELECT event_id FROM events")
        .fetch_all(users)
        .await?
        .into_iter()
        .collect();
    let stream = js.get_stream(messaging::ORDERS_STREAM.name).await?;
    let mut stream = stream;
    let state = stream.info().await?.state.clone();
    for sequence in state.first_sequence..=state.last_sequence {
        // Deleted sequences (none, unless someone deleted them) are gaps.
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.to_string())
            .unwrap_or_default();
        *facts.published.entry(id).or_default() += 1;
    }
    for (table, details) in [("order_summary", true), ("orders_by_user", false)] {
        let live = es_postgres::projection::status(orders, table)
            .await?
            .map_or(1, |s| s.live_generation);
        let columns = if details {
            ", payment_reference, carrier, tracking_number"
        } else {
            ""
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT order_id, user_id, status, total_minor, version{columns}
             FROM {table} WHERE generation = $1"
        )))
        .bind(live)
        .fetch_all(orders)
        .await?;
        let target = if details {
            &mut facts.summary
        } else {
            &mut facts.by_user
        };
        for row in rows {
            target.push(Row {
                order_id: row.try_get("order_id")?,
                user_id: row.try_get("user_id")?,
                status: row.try_get("status")?,
                total_minor: row.try_get("total_minor")?,
                version: row.try_get("version")?,
                details: if details {
                    Some(Details {
                        payment_reference: row.try_get("payment_reference")?,
                        carrier: row.try_get("carrier")?,
                        tracking_number: row.try_get("tracking_number")?,
                    })
                } else {
                    None
                },
            });
        }
    }
    facts.notifications = sqlx::query_as("SELECT event_id, channel FROM notifications")
        .fetch_all(notifications)
        .await?;
    for (user, hook) in sqlx::query_as::<_, (Uuid, Uuid)>(
        "SELECT user_id, id FROM webhooks WHERE deleted_at IS NULL",
    )
    .fetch_all(notifications)
    .await?
    {
        facts.webhooks.entry(user).or_default().push(hook);
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::load::Command;

    /// A clean history: one order created, paid and shipped, acknowledged,
    /// published, projected and notified on log and its webhook.
    fn clean() -> Facts {
        let order_id = Uuid::new_v4();
        let user_id = Uuid::new_v4();
        let hook = Uuid::new_v4();
        let stream = es::stream_id::<Order>(order_id);
        let created: OrderEvent = serde_json::from_value(serde_json::json!({
            "type": "created", "order_id": order_id, "user_id": user_id, "currency": "EUR",
            "lines": [{"sku": "BOOK", "quantity": 1, "unit_price": 1000}],
            "total_minor": 1000, "shipping_address": null
        }))
        .expect("a valid created event");
        let paid: OrderEvent = serde_json::from_value(serde_json::json!({
            "type": "paid", "order_id": order_id, "user_id": user_id,
            "payment_reference": "p-1", "amount_minor": 1000, "currency": "EUR"
        }))
        .expect("a valid paid event");
        let mut facts = Facts::default();
        for (version, (event_type, event, command)) in [
            ("order.created", created, Command::Create),
            ("order.paid", paid, Command::Pay),
        ]
        .into_iter()
        .enumerate()
        {
            let version = version as i64 + 1;
            let event_id = Uuid::new_v4();
            let key = format!("key-{version}");
            facts.acks.push(Ack {
                order_id,
                command,
                version,
                key: key.clone(),
            });
            facts.keys.insert(key, (stream.clone(), version));
            facts.published.insert(event_id.to_string(), 1);
            facts.notifications.push((event_id, "log".to_owned()));
            facts
                .notifications
                .push((event_id, format!("webhook:{hook}")));
            facts.received.push(event_id.to_string());
            facts.store.push(Stored {
                event_id,
                order_id,
                version,
                event_type: event_type.to_owned(),
                event,
            });
        }
        facts.webhooks.insert(user_id, vec![hook]);
        let row = |details| Row {
            order_id,
            user_id,
            status: "paid".to_owned(),
            total_minor: 1000,
            version: 2,
            details,
        };
        facts.summary.push(row(Some(Details {
            payment_reference: Some("p-1".to_owned()),
            carrier: None,
            tracking_number: None,
        })));
        facts.by_user.push(row(None));
        facts
    }

    #[test]
    fn a_clean_history_has_nothing_to_report() {
        let verdict = judge(&clean());
        assert!(verdict.clean(), "{verdict:?}");
        assert_eq!((verdict.acknowledged, verdict.repeats), (2, 0));
    }

    #[test]
    fn an_event_missing_from_the_stream_is_lost() {
        let mut facts = clean();
        let id = facts.store[1].event_id.to_string();
        facts.published.remove(&id);
        let verdict = judge(&facts);
        assert_eq!((verdict.lost, verdict.duplicated), (1, 0), "{verdict:?}");
    }

    #[test]
    fn an_acknowledged_command_missing_from_the_store_is_lost() {
        let mut facts = clean();
        facts.acks[1].version = 3;
        assert_eq!(judge(&facts).lost, 1);
    }

    #[test]
    fn a_notification_recorded_twice_is_duplicated() {
        let mut facts = clean();
        let twice = facts.notifications[0].clone();
        facts.notifications.push(twice);
        let verdict = judge(&facts);
        assert_eq!((verdict.duplicated, verdict.lost), (1, 0), "{verdict:?}");
    }

    #[test]
    fn a_second_event_for_one_command_is_duplicated() {
        let mut facts = clean();
        let mut again = facts.store[1].clone();
        again.event_id = Uuid::new_v4();
        again.version = 3;
        facts.published.insert(again.event_id.to_string(), 1);
        facts.notifications.push((again.event_id, "log".to_owned()));
        facts.store.push(again);
        let verdict = judge(&facts);
        assert!(verdict.duplicated >= 1, "{verdict:?}");
    }

    #[test]
    fn one_key_answered_with_two_versions_is_duplicated() {
        let mut facts = clean();
        let mut retry = facts.acks[1].clone();
        retry.version = 3;
        facts.acks.push(retry);
        assert!(judge(&facts).duplicated >= 1);
    }

    #[test]
    fn messages_and_rows_the_store_never_had_are_unexpected() {
        let mut facts = clean();
        facts.published.insert(Uuid::new_v4().to_string(), 1);
        facts.notifications.push((Uuid::new_v4(), "log".to_owned()));
        facts.received.push(Uuid::new_v4().to_string());
        let mut ghost = facts.by_user[0].clone();
        ghost.order_id = Uuid::new_v4();
        facts.by_user.push(ghost);
        let verdict = judge(&facts);
        assert_eq!(verdict.unexpected, 4, "{verdict:?}");
        assert_eq!(verdict.lost, 0);
    }

    #[test]
    fn an_injected_message_is_not_unexpected() {
        let mut facts = clean();
        facts.published.insert("poison-1".to_owned(), 1);
        facts.injected.insert("poison-1".to_owned());
        assert!(judge(&facts).clean());
    }

    #[test]
    fn a_read_model_that_differs_from_the_fold_is_diverged() {
        let mut facts = clean();
        facts.summary[0].status = "shipped".to_owned();
        facts.by_user[0].version = 1;
        assert_eq!(judge(&facts).diverged, 2);
    }

    #[test]
    fn an_order_missing_from_a_read_model_is_lost() {
        let mut facts = clean();
        facts.by_user.clear();
        assert_eq!(judge(&facts).lost, 1);
    }

    #[test]
    fn a_webhook_recorded_but_never_received_is_lost_and_a_resend_is_a_repeat() {
        let mut facts = clean();
        let first = facts.received.remove(0);
        let second = facts.received[0].clone();
        facts.received.push(second);
        let verdict = judge(&facts);
        assert_eq!(
            (verdict.lost, verdict.repeats),
            (1, 1),
            "{verdict:?}; dropped {first}"
        );
    }

    #[test]
    fn a_missing_webhook_channel_is_lost() {
        let mut facts = clean();
        facts.notifications.retain(|(_, c)| c == "log");
        assert_eq!(judge(&facts).lost, 2);
    }
}
