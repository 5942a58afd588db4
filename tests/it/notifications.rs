//! The notification channels against real peers: an SMTP server, an HTTP
//! webhook receiver; retries, dead letters and redrive; ordering per order
//! across replicas; live watching.

use std::time::Duration;

use contracts::{
    notification::v1::{
        ListNotificationsRequest, RegisterWebhookRequest, WatchNotificationsRequest,
        notification_service_client::NotificationServiceClient,
    },
    order::v1::{CancelOrderRequest, PayOrderRequest, ShipOrderRequest},
};
use futures::StreamExt as _;
use hmac::{KeyInit as _, Mac as _};
use testkit::{SmtpSink, TestStack, WebhookReceiver, bearer, eventually};
use tonic::transport::Channel;

use crate::helpers::{item, order};

async fn register(
    client: &mut NotificationServiceClient<Channel>,
    token: &str,
    url: &str,
) -> anyhow::Result<String> {
    let registered = client
        .register_webhook(bearer(
            token,
            RegisterWebhookRequest {
                url: url.to_owned(),
            },
        ))
        .await?
        .into_inner();
    Ok(registered.secret)
}

/// Checks `Shop-Webhook-Signature` independently of the sender's code.
fn signature_ok(secret: &str, hit: &testkit::Hit) -> bool {
    let (Some(timestamp), Some(signature)) = (
        hit.headers.get("shop-webhook-timestamp"),
        hit.headers.get("shop-webhook-signature"),
    ) else {
        return false;
    };
    let Some(hex) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(format!("{timestamp}.{}", hit.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == hex
}

fn event_type(hit: &testkit::Hit) -> String {
    serde_json::from_str::<serde_json::Value>(&hit.body)
        .ok()
        .and_then(|v| v["type"].as_str().map(ToOwned::to_owned))
        .unwrap_or_default()
}

#[tokio::test]
async fn an_email_reaches_a_real_smtp_server_with_recipient_and_content() -> anyhow::Result<()> {
    let smtp = SmtpSink::start().await?;
    let port = smtp.addr().port();
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.channels = "log,email".to_owned();
            n.smtp.port = port;
            n.smtp.from = "shop@example.com".to_owned();
        },
    )
    .await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let email = stack
        .users()
        .await?
        .get_user(testkit::bearer(
            &token,
            contracts::user::v1::GetUserRequest {
                user_id: user_id.clone(),
            },
        ))
        .await?
        .into_inner()
        .user
        .expect("user")
        .email;
    let placed = stack
        .orders()
        .await?
        .create_order(bearer(&token, order(vec![item("BOOK-1", 2, 1250)])))
        .await?
        .into_inner()
        .order
        .expect("order");
    let mails = eventually("two mails", Duration::from_secs(15), || async {
        let mails = smtp.mails();
        (mails.len() >= 2).then_some(mails)
    })
    .await?;
    assert!(
        mails
            .iter()
            .all(|m| m.to == [email.clone()] && m.from == "shop@example.com"),
        "{mails:?}"
    );
    let confirmation = mails
        .iter()
        .find(|m| {
            m.data
                .contains(&format!("Subject: Order {} confirmed", placed.id))
        })
        .expect("the order confirmation");
    assert!(
        confirmation
            .data
            .contains("We received your order of 2 items totalling 25.00 EUR."),
        "{}",
        confirmation.data
    );
    assert!(
        mails
            .iter()
            .any(|m| m.data.contains("Subject: Welcome to the shop"))
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(smtp.mails().len(), 2, "each mail once");
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn webhooks_are_signed_and_each_event_arrives_once_in_order() -> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut notifications = stack.notifications().await?;
    let secret = register(&mut notifications, &token, &receiver.url()).await?;
    let mut orders = stack.orders().await?;
    let placed = orders
        .create_order(bearer(&token, order(vec![item("A", 1, 3000)])))
        .await?
        .into_inner()
        .order
        .expect("order");
    orders
        .pay_order(bearer(
            &token,
            PayOrderRequest {
                order_id: placed.id.clone(),
                payment_reference: "p1".to_owned(),
                amount_minor: 3000,
                ..Default::default()
            },
        ))
        .await?;
    orders
        .ship_order(bearer(
            &token,
            ShipOrderRequest {
                order_id: placed.id.clone(),
                carrier: "DHL".to_owned(),
                tracking_number: "JD1".to_owned(),
                ..Default::default()
            },
        ))
        .await?;
    let hits = eventually(
        "three webhook deliveries",
        Duration::from_secs(15),
        || async {
            let hits = order_hits(&receiver.accepted());
            (hits.len() >= 3).then_some(hits)
        },
    )
    .await?;
    let types: Vec<_> = hits.iter().map(event_type).collect();
    assert_eq!(types, ["order.created", "order.paid", "order.shipped"]);
    assert!(
        hits.iter().all(|h| signature_ok(&secret, h)),
        "every signature verifies"
    );
    assert!(
        !signature_ok("whsec_wrong", &hits[0]),
        "a wrong secret does not"
    );
    assert!(
        hits[2].body.contains("tracking number JD1"),
        "{}",
        hits[2].body
    );
    let ids: std::collections::HashSet<_> = hits
        .iter()
        .map(|h| h.headers["shop-webhook-id"].clone())
        .collect();
    assert_eq!(ids.len(), 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(order_hits(&receiver.hits()).len(), 3, "nothing twice");
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_with_growing_gaps_then_dead_lettered_and_redriven_once()
-> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    receiver.set_failing(true);
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.retry_base_ms = 100;
            n.retry_max_ms = 5000;
            n.max_deliver = 5;
        },
    )
    .await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let mut notifications = stack.notifications().await?;
    register(&mut notifications, &token, &receiver.url()).await?;
    let mut orders = stack.orders().await?;
    let placed = orders
        .create_order(bearer(&token, order(vec![item("A", 1, 3000)])))
        .await?
        .into_inner()
        .order
        .expect("order");

    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    let letters = eventually("the dead letter", Duration::from_secs(30), || async {
        let letters = messaging::dlq::list(&js).await.ok()?;
        (!letters.is_empty()).then_some(letters)
    })
    .await?;
    // The receiver records a hit as it answers: the last one may land just
    // after the letter does.
    let _ = eventually("five attempts", Duration::from_secs(2), || async {
        (order_hits(&receiver.hits()).len() >= 5).then_some(())
    })
    .await;
    let attempts = order_hits(&receiver.hits());
    assert_eq!(attempts.len(), 5, "max deliveries");
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (n, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_millis(100 << n);
        assert!(
            *gap >= ceiling / 2,
            "gap {n} {gap:?} is at least half its ceiling {ceiling:?}"
        );
        assert!(
            *gap <= ceiling + Duration::from_millis(1000),
            "gap {n} {gap:?} is capped near {ceiling:?}"
        );
    }
    assert!(
        gaps.windows(2)
            .all(|w| w[1] + Duration::from_millis(250) >= w[0]),
        "gaps grow: {gaps:?}"
    );
    let letter = &letters[0];
    assert_eq!(
        (
            letter.subject.as_str(),
            letter.reason.as_str(),
            letter.attempts
        ),
        ("order.created", "max deliveries reached", 5)
    );
    assert!(letter.last_error.contains("503"), "{}", letter.last_error);
    assert_eq!(letter.consumer, "notification-service-orders");
    assert!(!letter.payload.is_empty(), "the original payload is kept");
    let event_id = letter.event_id.clone().expect("event id");

    // The order moves on: a later event is delivered once the endpoint works.
    receiver.set_failing(false);
    orders
        .cancel_order(bearer(
            &token,
            CancelOrderRequest {
                order_id: placed.id.clone(),
                reason: "test".to_owned(),
                ..Default::default()
            },
        ))
        .await?;
    eventually("the cancellation", Duration::from_secs(15), || async {
        receiver
            .accepted()
            .iter()
            .any(|h| event_type(h) == "order.cancelled")
            .then_some(())
    })
    .await?;

    messaging::dlq::redrive(&js, letter.sequence).await?;
    eventually("the redriven delivery", Duration::from_secs(15), || async {
        receiver
            .accepted()
            .iter()
            .any(|h| h.headers["shop-webhook-id"] == event_id)
            .then_some(())
    })
    .await?;
    assert!(
        messaging::dlq::list(&js).await?.is_empty(),
        "redriven letters leave the DLQ"
    );
    assert!(matches!(
        messaging::dlq::redrive(&js, letter.sequence).await,
        Err(messaging::dlq::DlqError::NotFound(_))
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = receiver
        .accepted()
        .iter()
        .filter(|h| h.headers["shop-webhook-id"] == event_id)
        .count();
    assert_eq!(delivered, 1, "delivered exactly once after the redrive");
    let listed = notifications
        .list_notifications(bearer(
            &token,
            ListNotificationsRequest {
                user_id,
                page_size: 50,
                page_token: String::new(),
            },
        ))
        .await?
        .into_inner()
        .notifications;
    let log_copies = listed
        .iter()
        .filter(|n| n.event_id == event_id && n.channel == "log")
        .count();
    assert_eq!(
        log_copies, 1,
        "the log channel was not repeated by the retries"
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn notifications_of_one_order_keep_event_order_across_replicas_and_redeliveries()
-> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.retry_base_ms = 50;
            n.retry_max_ms = 400;
        },
    )
    .await?;
    // A second replica: same database, same durable consumers.
    let replica = notification_service::Application::build(notification_service::Settings {
        grpc_addr: "127.0.0.1:0".to_owned(),
        admin_addr: "127.0.0.1:0".to_owned(),
        database_url: platform::config::DatabaseUrl::new(stack.notification_db.url.clone()),
        nats_url: stack.nats.url(),
        user_service: platform::client::ClientSettings::new(format!("http://{}", stack.user_addr)),
        retry_base_ms: 50,
        retry_max_ms: 400,
        webhook_allowed_networks: "127.0.0.0/8".to_owned(),
        ..Default::default()
    })
    .await?;
    let stop_replica = tokio_util::sync::CancellationToken::new();
    let replica = tokio::spawn(replica.run_until_stopped(stop_replica.clone()));

    let (_, token) = stack.signed_up_user().await?;
    register(&mut stack.notifications().await?, &token, &receiver.url()).await?;
    receiver.fail_next(6);
    let mut orders = stack.orders().await?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let placed = orders
            .create_order(bearer(&token, order(vec![item("A", 1, 100)])))
            .await?
            .into_inner()
            .order
            .expect("order");
        orders
            .pay_order(bearer(
                &token,
                PayOrderRequest {
                    order_id: placed.id.clone(),
                    payment_reference: "p".to_owned(),
                    amount_minor: 100,
                    ..Default::default()
                },
            ))
            .await?;
        orders
            .cancel_order(bearer(
                &token,
                CancelOrderRequest {
                    order_id: placed.id.clone(),
                    reason: "r".to_owned(),
                    ..Default::default()
                },
            ))
            .await?;
        ids.push(placed.id);
    }
    let accepted = eventually("twelve deliveries", Duration::from_secs(30), || async {
        let hits = order_hits(&receiver.accepted());
        (hits.len() >= 12).then_some(hits)
    })
    .await?;
    assert!(
        order_hits(&receiver.hits()).len() > 12,
        "some deliveries were retried"
    );
    for id in &ids {
        let sequence: Vec<_> = accepted
            .iter()
            .filter(|h| h.body.contains(id.as_str()))
            .map(event_type)
            .collect();
        assert_eq!(
            sequence,
            ["order.created", "order.paid", "order.cancelled"],
            "order {id}"
        );
    }
    stop_replica.cancel();
    replica.await??;
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_watcher_receives_the_notification_of_an_order_placed_after_it_opened()
-> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut watch = stack
        .notifications()
        .await?
        .watch_notifications(bearer(&token, WatchNotificationsRequest {}))
        .await?
        .into_inner();
    let placed = stack
        .orders()
        .await?
        .create_order(bearer(&token, order(vec![item("A", 1, 100)])))
        .await?
        .into_inner()
        .order
        .expect("order");
    let seen = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(item) = watch.next().await {
            let notification = item?.notification.expect("notification");
            if notification.event_type == "order.created" {
                return anyhow::Ok(notification);
            }
        }
        anyhow::bail!("the stream ended")
    })
    .await??;
    assert!(seen.subject.contains(&placed.id));
    assert_rejected_watch(&stack).await?;
    stack.stop().await;
    Ok(())
}

async fn assert_rejected_watch(stack: &TestStack) -> anyhow::Result<()> {
    let status = stack
        .notifications()
        .await?
        .watch_notifications(WatchNotificationsRequest {})
        .await
        .expect_err("needs a token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    Ok(())
}

/// Deliveries of order events only: whether a sign-up's welcome reaches a
/// webhook registered right after it depends on timing.
fn order_hits(hits: &[testkit::Hit]) -> Vec<testkit::Hit> {
    hits.iter()
        .filter(|h| event_type(h).starts_with("order."))
        .cloned()
        .collect()
}

/// The event types of `user_id`'s order notifications, oldest first; `None`
/// when the service cannot answer yet.
async fn order_notification_types(
    stack: &TestStack,
    token: &str,
    user_id: &str,
) -> Option<Vec<String>> {
    let listed = stack
        .notifications()
        .await
        .ok()?
        .list_notifications(bearer(
            token,
            ListNotificationsRequest {
                user_id: user_id.to_owned(),
                ..Default::default()
            },
        ))
        .await
        .ok()?
        .into_inner()
        .notifications;
    Some(
        listed
            .iter()
            .filter(|n| n.event_type.starts_with("order."))
            .map(|n| n.event_type.clone())
            .collect(),
    )
}

/// An order event as order-service's relay would publish it, built from a
/// stored-event fixture for `order_id` of `user_id`.
fn crafted(
    user_id: &str,
    order_id: uuid::Uuid,
    file: &str,
    version: i64,
) -> anyhow::Result<messaging::OutboundMessage> {
    use es_postgres::IntegrationMapper as _;
    let path = format!(
        "{}/../services/order/domain/fixtures/events/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut payload: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    payload["order_id"] = serde_json::json!(order_id);
    payload["user_id"] = serde_json::json!(user_id);
    let (stem, schema) = file
        .trim_end_matches(".json")
        .rsplit_once(".v")
        .ok_or_else(|| anyhow::anyhow!("{file}"))?;
    let recorded = es::RecordedEvent {
        position: version,
        event_id: uuid::Uuid::now_v7(),
        stream_id: format!("order-{order_id}"),
        version,
        event_type: stem.to_owned(),
        schema_version: schema.parse()?,
        payload,
        occurred_at: chrono::Utc::now(),
        context: es::EventContext {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: user_id.to_owned(),
            traceparent: None,
        },
    };
    order_service::integration::OrderEvents
        .map(&recorded)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .ok_or_else(|| anyhow::anyhow!("not published"))
}

/// Issue 13, defect 6: a redelivered event (a crash before the ack, a
/// republish past the duplicate window) counted as `delivered` again. It
/// now counts as `duplicate`, and nothing goes out twice.
#[tokio::test]
async fn a_redelivered_event_counts_as_a_duplicate_not_a_delivery() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let first = crafted(&user_id, uuid::Uuid::now_v7(), "order.created.v2.json", 1)?;
    let mut again = first.clone();
    again.message_id = uuid::Uuid::now_v7().to_string(); // past JetStream's dedup
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    messaging::publish_all(&js, &[first]).await?;
    let admin = stack.notification_admin;
    let count = |outcome: &'static str| async move {
        let (_, text) = testkit::http_get(admin, "/metrics").await.ok()?;
        testkit::metric(
            &text,
            "shop_events_consumed_total",
            &format!("type=\"order.created\",outcome=\"{outcome}\""),
        )
    };
    eventually("the delivery", Duration::from_secs(15), || async move {
        (count("delivered").await? >= 1.0).then_some(())
    })
    .await?;
    messaging::publish_all(&js, &[again]).await?;
    eventually("the duplicate", Duration::from_secs(15), || async move {
        (count("duplicate").await? >= 1.0).then_some(())
    })
    .await?;
    assert_eq!(count("delivered").await, Some(1.0), "delivered once");
    let listed = stack
        .notifications()
        .await?
        .list_notifications(bearer(
            &token,
            ListNotificationsRequest {
                user_id,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .notifications;
    assert_eq!(
        listed
            .iter()
            .filter(|n| n.event_type == "order.created")
            .count(),
        1,
        "{listed:?}"
    );
    stack.stop().await;
    Ok(())
}

/// Issue 13, defect 4: while an order's earlier event is still in flight,
/// its later events are NAKed to wait, and each wait used to count as a
/// delivery: with `APP_MAX_DELIVER` deliveries they were dead-lettered as
/// "waited too long" although nothing was wrong with them. Waiting now
/// spends nothing; only failures (and a long `APP_MAX_WAIT_SECS`) count.
#[tokio::test]
async fn waiting_for_the_previous_event_spends_no_delivery_attempts() -> anyhow::Result<()> {
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.max_deliver = 2;
            n.retry_base_ms = 20;
            n.retry_max_ms = 40;
        },
    )
    .await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let order_id = uuid::Uuid::now_v7();
    let event = |file: &str, version: i64| crafted(&user_id, order_id, file, version);
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    // The second event arrives first, as after a consumer crash left the
    // first in flight until its ack wait ran out.
    messaging::publish_all(&js, &[event("order.paid.v1.json", 2)?]).await?;
    let admin = stack.notification_admin;
    eventually(
        "the early event to wait through more deliveries than APP_MAX_DELIVER",
        Duration::from_secs(20),
        || async move {
            let (_, text) = testkit::http_get(admin, "/metrics").await.ok()?;
            let redelivered = testkit::metric(
                &text,
                "shop_consumer_redeliveries_total",
                "name=\"notification-service-orders\"",
            )?;
            (redelivered >= 4.0).then_some(())
        },
    )
    .await?;
    messaging::publish_all(&js, &[event("order.created.v2.json", 1)?]).await?;
    let types = eventually("both notifications", Duration::from_secs(20), || async {
        let types = order_notification_types(&stack, &token, &user_id).await?;
        (types.len() == 2).then_some(types)
    })
    .await?;
    assert!(types.contains(&"order.paid".to_owned()), "{types:?}");
    let letters = messaging::dlq::list(&js).await?;
    assert!(
        letters.is_empty(),
        "nothing was wrong, nothing is dead: {letters:?}"
    );
    stack.stop().await;
    Ok(())
}

/// A message that waited past `APP_MAX_WAIT_SECS` is dead-lettered, but its
/// order is not moved past the predecessor it waited for: when that one
/// comes, it is delivered (it used to be taken for a duplicate and dropped).
#[tokio::test]
async fn a_message_that_waited_too_long_does_not_swallow_its_predecessor() -> anyhow::Result<()> {
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.max_wait_secs = 1;
            n.retry_base_ms = 50;
            n.retry_max_ms = 100;
        },
    )
    .await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let order_id = uuid::Uuid::now_v7();
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    messaging::publish_all(
        &js,
        &[crafted(&user_id, order_id, "order.paid.v1.json", 2)?],
    )
    .await?;
    let letters = eventually(
        "the impatient one dead-lettered",
        Duration::from_secs(20),
        || async {
            let letters = messaging::dlq::list(&js).await.ok()?;
            (!letters.is_empty()).then_some(letters)
        },
    )
    .await?;
    assert_eq!(letters[0].reason, "waited too long");
    messaging::publish_all(
        &js,
        &[crafted(&user_id, order_id, "order.created.v2.json", 1)?],
    )
    .await?;
    eventually(
        "the predecessor delivered",
        Duration::from_secs(15),
        || async {
            let types = order_notification_types(&stack, &token, &user_id).await?;
            types.iter().any(|t| t == "order.created").then_some(())
        },
    )
    .await?;
    stack.stop().await;
    Ok(())
}

/// Issue 11: a lane takes what queued up while it was busy as one batch,
/// in one transaction. Inside a batch each order still goes in event order
/// (an order's second event published before its first waits for it), and
/// each event is delivered once (a copy republished past JetStream's
/// duplicate window is a duplicate, also when both copies share a batch).
#[tokio::test]
async fn a_backlog_is_handled_in_batches_once_per_event_and_in_order_per_order()
-> anyhow::Result<()> {
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.consumer_lanes = 1;
            // The lane holds its first batch this long: the rest queues up.
            n.faults.pause_before_ack_ms = 400;
            n.retry_base_ms = 20;
            n.retry_max_ms = 40;
        },
    )
    .await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let orders: Vec<uuid::Uuid> = (0..8).map(|_| uuid::Uuid::now_v7()).collect();
    let mut messages = Vec::new();
    for (n, order_id) in orders.iter().enumerate() {
        let created = crafted(&user_id, *order_id, "order.created.v2.json", 1)?;
        let paid = crafted(&user_id, *order_id, "order.paid.v1.json", 2)?;
        let cancelled = crafted(&user_id, *order_id, "order.cancelled.v1.json", 3)?;
        if n == 0 {
            // Out of order: paid, created, cancelled.
            messages.extend([paid, created, cancelled]);
        } else {
            let mut copy = created.clone();
            copy.message_id = uuid::Uuid::now_v7().to_string(); // past dedup
            messages.extend([created, paid]);
            if n % 3 == 1 {
                messages.push(copy);
            }
            messages.push(cancelled);
        }
    }
    let published = messages.len();
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    messaging::publish_all(&js, &messages).await?;

    let listed = eventually("every notification", Duration::from_secs(30), || async {
        let listed = stack
            .notifications()
            .await
            .ok()?
            .list_notifications(bearer(
                &token,
                ListNotificationsRequest {
                    user_id: user_id.clone(),
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
            .ok()?
            .into_inner()
            .notifications;
        let of_orders: Vec<_> = listed
            .into_iter()
            .filter(|n| n.event_type.starts_with("order."))
            .collect();
        (of_orders.len() >= orders.len() * 3).then_some(of_orders)
    })
    .await?;
    assert_eq!(
        listed.len(),
        orders.len() * 3,
        "each event once: {listed:?}"
    );
    for order_id in &orders {
        // Listed newest first.
        let sequence: Vec<&str> = listed
            .iter()
            .rev()
            .filter(|n| {
                n.body.contains(&order_id.to_string()) || n.subject.contains(&order_id.to_string())
            })
            .map(|n| n.event_type.as_str())
            .collect();
        assert_eq!(
            sequence,
            ["order.created", "order.paid", "order.cancelled"],
            "order {order_id}"
        );
    }
    let (_, text) = testkit::http_get(stack.notification_admin, "/metrics").await?;
    let series = "name=\"notification-service-orders\"";
    let batches = testkit::metric(&text, "shop_consumer_batch_size_count", series)
        .ok_or_else(|| anyhow::anyhow!("no batch count in {text}"))?;
    let handled = testkit::metric(&text, "shop_consumer_batch_size_sum", series)
        .ok_or_else(|| anyhow::anyhow!("no batch sum"))?;
    assert!(
        handled >= published as f64,
        "every message was handled in some batch: {handled} of {published}"
    );
    assert!(
        batches * 3.0 <= handled,
        "the backlog went in batches ({batches} batches for {handled} messages)"
    );
    let letters = messaging::dlq::list(&js).await?;
    assert!(letters.is_empty(), "nothing is dead: {letters:?}");
    stack.stop().await;
    Ok(())
}

/// Announcements carry the whole record (watchers read nothing back); one
/// too large for a NOTIFY payload is announced by id and read back, so it
/// still reaches its watcher whole.
#[tokio::test]
async fn a_notification_too_large_to_announce_still_reaches_its_watcher_whole() -> anyhow::Result<()>
{
    let stack = TestStack::start().await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let mut watch = stack
        .notifications()
        .await?
        .watch_notifications(bearer(&token, WatchNotificationsRequest {}))
        .await?
        .into_inner();
    let db = sqlx::PgPool::connect(&stack.notification_db.url).await?;
    let insert = |event_type: &'static str, body: String| {
        sqlx::query(
            "INSERT INTO notifications (id, user_id, event_id, event_type, channel, subject, body, occurred_at) \
             VALUES ($1, $2::uuid, $3, $4, 'log', 'subject', $5, now())",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(user_id.clone())
        .bind(uuid::Uuid::now_v7())
        .bind(event_type)
        .bind(body)
        .execute(&db)
    };
    let large = "x".repeat(20_000);
    insert("test.small", "small".to_owned()).await?;
    insert("test.large", large.clone()).await?;
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(item) = watch.next().await {
            let notification = item?.notification.expect("notification");
            if notification.event_type.starts_with("test.") {
                seen.push(notification);
            }
            if seen.len() == 2 {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the stream ended")
    })
    .await??;
    assert_eq!(seen[0].event_type, "test.small");
    assert_eq!(seen[0].body, "small");
    assert_eq!(seen[1].event_type, "test.large");
    assert_eq!(seen[1].body, large, "read back whole");
    stack.stop().await;
    Ok(())
}

/// With fewer lanes than orders, a batch delivers different orders' webhooks
/// concurrently: a slow endpoint does not make them queue one behind the
/// other (each order's own events still go one at a time, in order).
#[tokio::test]
async fn a_batch_calls_slow_endpoints_for_different_orders_concurrently() -> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    receiver.set_delay(Duration::from_millis(300));
    let stack = TestStack::start_configured(
        |_| {},
        |n| {
            n.consumer_lanes = 1;
        },
    )
    .await?;
    let (user_id, token) = stack.signed_up_user().await?;
    register(&mut stack.notifications().await?, &token, &receiver.url()).await?;
    let orders: Vec<uuid::Uuid> = (0..8).map(|_| uuid::Uuid::now_v7()).collect();
    let mut messages = Vec::new();
    for order_id in &orders {
        messages.push(crafted(&user_id, *order_id, "order.created.v2.json", 1)?);
        messages.push(crafted(&user_id, *order_id, "order.paid.v1.json", 2)?);
    }
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    messaging::publish_all(&js, &messages).await?;
    let accepted = eventually("every webhook", Duration::from_secs(30), || async {
        let hits = order_hits(&receiver.accepted());
        (hits.len() >= messages.len()).then_some(hits)
    })
    .await?;
    assert_eq!(accepted.len(), messages.len(), "each event once");
    for order_id in &orders {
        let sequence: Vec<_> = accepted
            .iter()
            .filter(|h| h.body.contains(&order_id.to_string()))
            .map(event_type)
            .collect();
        assert_eq!(
            sequence,
            ["order.created", "order.paid"],
            "order {order_id}"
        );
    }
    assert!(
        receiver.max_in_flight() >= 4,
        "different orders' webhooks went out together (at most {} at once)",
        receiver.max_in_flight()
    );
    stack.stop().await;
    Ok(())
}
