//! Black-box tests of notification-service: input validation and idempotent
//! consumption of redelivered and republished events.

use std::time::Duration;

use contracts::{events::v1 as events, notification::v1::ListNotificationsRequest};
use prost::Message as _;
use testkit::{TestStack, bearer, eventually};
use tonic::Code;

use crate::helpers::assert_rejected;

#[tokio::test]
async fn bad_list_requests_name_the_field_and_others_lists_are_refused() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (user, token) = stack.signed_up_user().await?;
    let mut notifications = stack.notifications().await?;
    let request = |user_id: &str, page_size: i32, page_token: &str| ListNotificationsRequest {
        user_id: user_id.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
    };
    assert_rejected(
        notifications
            .list_notifications(request(&user, 0, ""))
            .await,
        Code::Unauthenticated,
        None,
    );
    for (bad, field) in [
        (request("nope", 0, ""), "user_id"),
        (request(&user, -1, ""), "page_size"),
        (request(&user, 101, ""), "page_size"),
        (request(&user, 0, "x"), "page_token"),
    ] {
        assert_rejected(
            notifications.list_notifications(bearer(&token, bad)).await,
            Code::InvalidArgument,
            Some(field),
        );
    }
    let stranger = uuid::Uuid::new_v4().to_string();
    assert_rejected(
        notifications
            .list_notifications(bearer(&token, request(&stranger, 0, "")))
            .await,
        Code::PermissionDenied,
        None,
    );
    // An empty user_id means the caller.
    notifications
        .list_notifications(bearer(&token, request("", 0, "")))
        .await?;
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_event_published_twice_past_dedup_makes_one_notification() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let client = async_nats::connect(stack.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let (user, token) = stack.signed_up_user().await?;
    let user_id = uuid::Uuid::parse_str(&user)?;
    let injected = uuid::Uuid::new_v4().to_string();
    let event = events::UserCreated {
        metadata: Some(events::EventMetadata {
            event_id: injected.clone(),
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
    let mut poison_headers = async_nats::HeaderMap::new();
    poison_headers.insert(messaging::headers::EVENT_ID, "poison-1");
    js.publish_with_headers(
        "user.created",
        poison_headers,
        b"not protobuf".to_vec().into(),
    )
    .await?
    .await?;

    let mut notifications = stack.notifications().await?;
    let list = ListNotificationsRequest {
        user_id: user_id.to_string(),
        page_size: 10,
        page_token: String::new(),
    };
    eventually(
        "both welcome notifications",
        Duration::from_secs(10),
        || {
            let mut client = notifications.clone();
            let request = bearer(&token, list.clone());
            async move {
                let page = client.list_notifications(request).await.ok()?.into_inner();
                (page.notifications.len() >= 2).then_some(())
            }
        },
    )
    .await?;
    // Give the duplicate time to be processed, then count.
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("USERS")
        .await?
        .get_consumer("notification-service-users")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    eventually("all four messages acked", Duration::from_secs(10), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.ok()?;
            (info.num_ack_pending == 0
                && info.num_pending == 0
                && info.delivered.stream_sequence >= 4)
                .then_some(())
        }
    })
    .await?;
    let page = notifications
        .list_notifications(bearer(&token, list))
        .await?
        .into_inner();
    let letters = messaging::dlq::list(&js).await?;
    assert_eq!(letters.len(), 1, "the poison message is dead-lettered");
    assert_eq!(
        (letters[0].reason.as_str(), letters[0].subject.as_str()),
        ("undecodable", "user.created")
    );
    assert_eq!(&letters[0].payload[..], b"not protobuf");
    assert_eq!(letters[0].event_id.as_deref(), Some("poison-1"));
    // Redriven, it is still poison: back in the DLQ under its own event id
    // (not the redrive's fresh message id), marked as redriven.
    messaging::dlq::redrive(&js, letters[0].sequence).await?;
    let again = eventually(
        "the redriven poison back in the DLQ",
        Duration::from_secs(10),
        || {
            let js = js.clone();
            async move {
                let letters = messaging::dlq::list(&js).await.ok()?;
                (letters.len() == 1 && letters[0].attempts > 0).then(|| letters[0].clone())
            }
        },
    )
    .await?;
    assert_eq!(again.event_id.as_deref(), Some("poison-1"));
    assert!(
        again
            .headers
            .get(messaging::dlq::headers::REDRIVEN_FROM)
            .is_some()
    );
    let copies = page
        .notifications
        .iter()
        .filter(|n| n.event_id == injected)
        .count();
    assert_eq!(
        (page.notifications.len(), copies),
        (2, 1),
        "the repeat changed nothing"
    );
    stack.stop().await;
    Ok(())
}
