//! End to end: one order travels through all three services on real
//! Postgres and a real nats-server.

use std::time::Duration;

use contracts::notification::v1::ListNotificationsRequest;
use testkit::{TestStack, bearer, eventually};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{item, order};

#[tokio::test]
async fn every_service_reports_serving() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    for (addr, service) in [
        (stack.user_addr, "shop.user.v1.UserService"),
        (stack.order_addr, "shop.order.v1.OrderService"),
        (
            stack.notification_addr,
            "shop.notification.v1.NotificationService",
        ),
    ] {
        let mut health = HealthClient::new(stack.channel_to(addr).await?);
        for name in ["", service] {
            let status = health
                .check(HealthCheckRequest {
                    service: name.to_owned(),
                })
                .await?
                .into_inner()
                .status();
            assert_eq!(status, ServingStatus::Serving, "{service} ({name:?})");
        }
    }
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_order_flows_from_sign_up_to_notification() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let placed = stack
        .orders()
        .await?
        .create_order(bearer(&token, order(vec![item("BOOK-1", 1, 4200)])))
        .await?
        .into_inner()
        .order
        .expect("order");

    let mut notifications = stack.notifications().await?;
    let list = ListNotificationsRequest {
        user_id: user_id.clone(),
        page_size: 10,
        page_token: String::new(),
    };
    let received = eventually(
        "welcome and order notifications",
        Duration::from_secs(15),
        || {
            let mut client = notifications.clone();
            let request = bearer(&token, list.clone());
            async move {
                let page = client.list_notifications(request).await.ok()?.into_inner();
                (page.notifications.len() >= 2).then_some(page.notifications)
            }
        },
    )
    .await?;
    // The two come from different streams and consumers: either may be recorded first.
    let mut types: Vec<_> = received.iter().map(|n| n.event_type.as_str()).collect();
    types.sort_unstable();
    assert_eq!(types, ["order.created", "user.created"]);
    let created = |n: &contracts::notification::v1::Notification| {
        n.created_at.as_ref().map(|t| (t.seconds, t.nanos))
    };
    assert!(
        created(&received[0]) >= created(&received[1]),
        "newest first"
    );
    let confirmation = received
        .iter()
        .find(|n| n.event_type == "order.created")
        .expect("the confirmation");
    assert_eq!(confirmation.user_id, user_id);
    assert_eq!(confirmation.channel, "log");
    assert!(
        confirmation.subject.contains(&placed.id),
        "{}",
        confirmation.subject
    );
    assert!(
        confirmation.body.contains("42.00 EUR"),
        "{}",
        confirmation.body
    );

    // The events are in JetStream exactly once each, with the event id as Nats-Msg-Id.
    let client = async_nats::connect(stack.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let mut orders_stream = js.get_stream("ORDERS").await?;
    assert_eq!(orders_stream.info().await?.state.messages, 1);
    let message = orders_stream
        .get_last_raw_message_by_subject("order.created")
        .await?;
    let msg_id = message
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.to_string());
    assert_eq!(msg_id.as_deref(), Some(confirmation.event_id.as_str()));

    // Page tokens walk the rest.
    let first = notifications
        .list_notifications(bearer(
            &token,
            ListNotificationsRequest {
                page_size: 1,
                ..list.clone()
            },
        ))
        .await?
        .into_inner();
    assert_eq!(first.notifications.len(), 1);
    let second = notifications
        .list_notifications(bearer(
            &token,
            ListNotificationsRequest {
                page_size: 1,
                page_token: first.next_page_token.clone(),
                ..list
            },
        ))
        .await?
        .into_inner();
    let mut walked = [
        first.notifications[0].event_type.as_str(),
        second.notifications[0].event_type.as_str(),
    ];
    walked.sort_unstable();
    assert_eq!(
        walked,
        ["order.created", "user.created"],
        "two pages, each notification once"
    );
    assert!(second.next_page_token.is_empty());
    stack.stop().await;
    Ok(())
}
