//! Black-box tests of notification-service: input validation and idempotent
//! consumption of redelivered and republished events.

use std::time::Duration;

use contracts::{events::v1 as events, notification::v1::ListNotificationsRequest};
use prost::Message as _;
use testkit::{TestStack, eventually};
use tonic::Code;

use crate::support::assert_rejected;

#[tokio::test]
async fn bad_list_requests_name_the_field() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let mut notifications = stack.notifications().await?;
    let request = |user_id: &str, page_size: i32, page_token: &str| ListNotificationsRequest {
        user_id: user_id.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
    };
    let user = uuid::Uuid::new_v4().to_string();
    assert_rejected(
        notifications.list_notifications(request("", 0, "")).await,
        Code::InvalidArgument,
        Some("user_id"),
    );
    assert_rejected(
        notifications
            .list_notifications(request(&user, -1, ""))
            .await,
        Code::InvalidArgument,
        Some("page_size"),
    );
    assert_rejected(
        notifications
            .list_notifications(request(&user, 101, ""))
            .await,
        Code::InvalidArgument,
        Some("page_size"),
    );
    assert_rejected(
        notifications
            .list_notifications(request(&user, 0, "x"))
            .await,
        Code::InvalidArgument,
        Some("page_token"),
    );
    let empty = notifications
        .list_notifications(request(&user, 0, ""))
        .await?
        .into_inner();
    assert!(empty.notifications.is_empty());
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_event_published_twice_past_dedup_makes_one_notification() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let client = async_nats::connect(stack.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let user_id = uuid::Uuid::new_v4();
    let event = events::UserCreated {
        metadata: Some(events::EventMetadata {
            event_id: uuid::Uuid::new_v4().to_string(),
            stream_id: format!("user-{user_id}"),
            stream_version: 1,
            occurred_at: Some(contracts::timestamp(chrono::Utc::now())),
            correlation_id: uuid::Uuid::new_v4().to_string(),
            causation_id: uuid::Uuid::new_v4().to_string(),
            actor: "test".to_owned(),
        }),
        user_id: user_id.to_string(),
        email: "twice@example.com".to_owned(),
    };
    // Without Nats-Msg-Id JetStream stores both copies: the consumer must absorb the repeat.
    for _ in 0..2 {
        js.publish("user.created", event.encode_to_vec().into())
            .await?
            .await?;
    }
    // A poison message on the same subject must not block what follows it.
    js.publish("user.created", b"not protobuf".to_vec().into())
        .await?
        .await?;

    let mut notifications = stack.notifications().await?;
    let list = ListNotificationsRequest {
        user_id: user_id.to_string(),
        page_size: 10,
        page_token: String::new(),
    };
    eventually("the welcome notification", Duration::from_secs(10), || {
        let mut client = notifications.clone();
        let list = list.clone();
        async move {
            let page = client.list_notifications(list).await.ok()?.into_inner();
            (!page.notifications.is_empty()).then_some(())
        }
    })
    .await?;
    // Give the duplicate time to be processed, then count.
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("USERS")
        .await?
        .get_consumer("notification-service-users")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    eventually("all three messages acked", Duration::from_secs(10), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.ok()?;
            (info.num_ack_pending == 0
                && info.num_pending == 0
                && info.delivered.stream_sequence >= 3)
                .then_some(())
        }
    })
    .await?;
    let page = notifications.list_notifications(list).await?.into_inner();
    assert_eq!(page.notifications.len(), 1);
    stack.stop().await;
    Ok(())
}
