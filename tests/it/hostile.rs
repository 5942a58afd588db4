//! Regression tests of attacks by a hostile client with no account, sent to
//! the real services (issue 12). Each failed on the code before its fix.

use std::time::Duration;

use contracts::order::v1::GetOrderRequest;
use testkit::{TestStack, bearer};
use tonic::Code;

use crate::helpers::{item, order};

/// Finding 1: garbage tokens with a 500 µs deadline used to open the breaker
/// to user-service (the caller's own deadline counted as user-service's
/// failure) and leak its half-open trial slot, so every uncached token got
/// UNAVAILABLE until restart.
#[tokio::test]
async fn garbage_tokens_with_tiny_deadlines_never_open_the_breaker() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let orders = stack.orders().await?;
    let attacks = (0..60).map(|_| {
        let mut orders = orders.clone();
        async move {
            let mut request = bearer(
                &format!("garbage-{}", uuid::Uuid::new_v4()),
                GetOrderRequest {
                    order_id: uuid::Uuid::new_v4().to_string(),
                    min_position: 0,
                },
            );
            request.set_timeout(Duration::from_micros(500));
            orders.get_order(request).await.map(|_| ())
        }
    });
    for result in futures::future::join_all(attacks).await {
        let code = result.expect_err("garbage is never accepted").code();
        assert!(
            matches!(
                code,
                Code::Unauthenticated | Code::DeadlineExceeded | Code::Cancelled
            ),
            "{code:?}"
        );
    }
    // A real customer right after: a token order-service has never seen
    // (not cached) must still be validated and accepted.
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let created = orders
        .create_order(bearer(&token, order(vec![item("SKU-1", 1, 100)])))
        .await;
    assert!(created.is_ok(), "the breaker opened: {created:?}");
    Ok(())
}

/// Finding 2: a `grpc-timeout` with more digits than the spec allows
/// overflowed `Instant::now() + timeout` and panicked the handler.
#[tokio::test]
async fn an_out_of_range_grpc_timeout_is_answered_not_panicked() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    for header in ["18446744073709551615S", "99999999H", "1é", "-1S"] {
        let mut request = bearer(&token, order(vec![item("SKU-1", 1, 100)]));
        if let Ok(value) = header.parse() {
            request.metadata_mut().insert("grpc-timeout", value);
        }
        let created = orders.create_order(request).await;
        assert!(
            created.is_ok(),
            "grpc-timeout {header:?}: {:?}",
            created.err()
        );
    }
    Ok(())
}

/// Finding 6: the `method` label was the raw request path, so made-up paths
/// added series without bound. Now they all count as `unknown`.
#[tokio::test]
async fn made_up_methods_add_no_metric_series() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let channel = stack.channel_to(stack.order_addr).await?;
    for n in 0..5 {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await?;
        let path: http::uri::PathAndQuery =
            format!("/shop.order.v1.OrderService/Probe{n}").parse()?;
        let answer: Result<tonic::Response<()>, tonic::Status> = grpc
            .unary(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await;
        assert_eq!(
            answer.expect_err("no such method").code(),
            Code::Unimplemented
        );
    }
    let (status, metrics) = testkit::http_get(stack.order_admin, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(!metrics.contains("Probe"), "made-up paths became labels");
    assert!(
        metrics.contains(
            "shop_grpc_server_requests_total{method=\"unknown\",code=\"Unimplemented\"} 5"
        ),
        "{metrics}"
    );
    Ok(())
}

/// Finding 3: RegisterWebhook accepted the cloud metadata endpoint, private
/// networks, every IPv4 spelling of them and the services' own admin ports,
/// followed redirects, and ListNotifications told whether delivery worked (a
/// port scanner). Now only public addresses (and explicitly allowed
/// networks: the test stack allows loopback, nothing else) are accepted.
#[tokio::test]
async fn webhooks_to_private_addresses_are_refused() -> anyhow::Result<()> {
    use contracts::notification::v1::RegisterWebhookRequest;
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut notifications = stack.notifications().await?;
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://2852039166/",
        "http://0xa9fea9fe/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://localhost:9092/metrics",
    ] {
        let refused = notifications
            .register_webhook(bearer(
                &token,
                RegisterWebhookRequest {
                    url: url.to_owned(),
                },
            ))
            .await;
        crate::helpers::assert_rejected(refused, Code::InvalidArgument, Some("url"));
    }
    // An allowed loopback receiver still works (the test stack allows it).
    let allowed = notifications
        .register_webhook(bearer(
            &token,
            RegisterWebhookRequest {
                url: "http://127.0.0.1:9/hook".to_owned(),
            },
        ))
        .await;
    assert!(allowed.is_ok(), "{allowed:?}");
    Ok(())
}

/// Finding 7 (part): NUL bytes and huge values reached Postgres and came
/// back as INTERNAL (or UNAVAILABLE "retry later", inviting endless
/// retries). Now they are INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn nul_bytes_and_huge_values_are_invalid_arguments_naming_the_field() -> anyhow::Result<()> {
    use contracts::{order::v1::PayOrderRequest, user::v1::AuthenticateRequest};
    let stack = TestStack::start().await?;
    let mut users = stack.users().await?;
    for email in [
        "a\u{0}b@example.com".to_owned(),
        format!("{}@example.com", "a".repeat(1 << 20)),
    ] {
        let refused = users
            .authenticate(AuthenticateRequest {
                email,
                password: "whatever password".to_owned(),
            })
            .await;
        crate::helpers::assert_rejected(refused, Code::InvalidArgument, Some("email"));
    }
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let mut request = order(vec![item("SKU-1", 1, 100)]);
    request.idempotency_key = "key\u{0}nul".to_owned();
    let refused = orders.create_order(bearer(&token, request)).await;
    crate::helpers::assert_rejected(refused, Code::InvalidArgument, Some("idempotency_key"));
    let created = orders
        .create_order(bearer(&token, order(vec![item("SKU-1", 1, 100)])))
        .await?
        .into_inner()
        .order
        .expect("an order");
    let refused = orders
        .pay_order(bearer(
            &token,
            PayOrderRequest {
                order_id: created.id,
                payment_reference: "ref-1".to_owned(),
                amount_minor: 100,
                idempotency_key: "key\u{0}nul".to_owned(),
                expected_version: 1,
            },
        ))
        .await;
    crate::helpers::assert_rejected(refused, Code::InvalidArgument, Some("idempotency_key"));
    Ok(())
}

/// Finding 7: an idempotency key reused for a different command or body
/// silently returned the first result (PayOrder with the order's CreateOrder
/// key answered with the unpaid order). The key is now bound to the RPC and
/// the request; a mismatch is INVALID_ARGUMENT naming the key, and a true
/// retry still gets the original answer.
#[tokio::test]
async fn an_idempotency_key_reused_for_another_command_or_body_is_refused() -> anyhow::Result<()> {
    use contracts::order::v1::{CancelOrderRequest, PayOrderRequest};
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let mut create = order(vec![item("SKU-1", 2, 100)]);
    create.idempotency_key = "checkout-1".to_owned();
    let created = orders
        .create_order(bearer(&token, create.clone()))
        .await?
        .into_inner()
        .order
        .expect("an order");
    let retried = orders
        .create_order(bearer(&token, create.clone()))
        .await?
        .into_inner()
        .order
        .expect("an order");
    assert_eq!(retried.id, created.id, "a true retry gets the original");
    let mut other_body = create.clone();
    other_body.items[0].quantity = 3;
    crate::helpers::assert_rejected(
        orders.create_order(bearer(&token, other_body)).await,
        Code::InvalidArgument,
        Some("idempotency_key"),
    );
    let pay = |key: &str| PayOrderRequest {
        order_id: created.id.clone(),
        payment_reference: "ref-1".to_owned(),
        amount_minor: 200,
        idempotency_key: key.to_owned(),
        expected_version: 0,
    };
    crate::helpers::assert_rejected(
        orders.pay_order(bearer(&token, pay("checkout-1"))).await,
        Code::InvalidArgument,
        Some("idempotency_key"),
    );
    let paid = orders
        .pay_order(bearer(&token, pay("pay-1")))
        .await?
        .into_inner()
        .order
        .expect("an order");
    let again = orders
        .pay_order(bearer(&token, pay("pay-1")))
        .await?
        .into_inner()
        .order
        .expect("an order");
    assert_eq!((again.version, again.status), (paid.version, paid.status));
    crate::helpers::assert_rejected(
        orders
            .cancel_order(bearer(
                &token,
                CancelOrderRequest {
                    order_id: created.id.clone(),
                    reason: "changed my mind".to_owned(),
                    idempotency_key: "pay-1".to_owned(),
                    expected_version: 0,
                },
            ))
            .await,
        Code::InvalidArgument,
        Some("idempotency_key"),
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(format!("order-{}", created.id))
        .fetch_one(&sqlx::PgPool::connect(&stack.order_db.url).await?)
        .await?;
    assert_eq!(events, 2, "created and paid, nothing else");
    stack.stop().await;
    Ok(())
}

/// Finding 7: GetUser answered anyone's email without a token.
#[tokio::test]
async fn get_user_needs_a_token_and_shows_only_the_callers_own_record() -> anyhow::Result<()> {
    use contracts::user::v1::GetUserRequest;
    let stack = TestStack::start().await?;
    let (me, token) = stack.signed_up_user().await?;
    let (someone, _) = stack.signed_up_user().await?;
    let mut users = stack.users().await?;
    let get = |id: &str| GetUserRequest {
        user_id: id.to_owned(),
    };
    crate::helpers::assert_rejected(
        users.get_user(get(&someone)).await,
        Code::Unauthenticated,
        None,
    );
    crate::helpers::assert_rejected(
        users.get_user(bearer("forged.token.here", get(&me))).await,
        Code::Unauthenticated,
        None,
    );
    crate::helpers::assert_rejected(
        users.get_user(bearer(&token, get(&someone))).await,
        Code::NotFound,
        None,
    );
    let mine = users
        .get_user(bearer(&token, get(&me)))
        .await?
        .into_inner()
        .user
        .expect("a user");
    assert_eq!(mine.id, me);
    stack.stop().await;
    Ok(())
}

/// Finding 7: a WatchNotifications stream kept delivering after its token
/// expired. It now ends with UNAUTHENTICATED at expiry.
#[tokio::test]
async fn a_watch_stream_ends_with_unauthenticated_when_its_token_expires() -> anyhow::Result<()> {
    use contracts::notification::v1::WatchNotificationsRequest;
    use futures::StreamExt as _;
    let stack = TestStack::start_with(|auth| auth.token_ttl_secs = 2).await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut stream = stack
        .notifications()
        .await?
        .watch_notifications(bearer(&token, WatchNotificationsRequest {}))
        .await?
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .map_err(|_| anyhow::anyhow!("the stream outlived its token by 8 s"))?;
    match ended {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        other => anyhow::bail!("expected UNAUTHENTICATED, got {other:?}"),
    }
    stack.stop().await;
    Ok(())
}

/// Finding 7: currency codes were only checked for shape.
#[tokio::test]
async fn a_currency_that_is_not_iso_4217_is_refused_naming_the_field() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    for code in ["XYZ", "ABC", "XAU"] {
        let mut request = order(vec![item("SKU-1", 1, 100)]);
        request.currency = code.to_owned();
        crate::helpers::assert_rejected(
            orders.create_order(bearer(&token, request)).await,
            Code::InvalidArgument,
            Some("currency"),
        );
    }
    let mut request = order(vec![item("SKU-1", 1, 100)]);
    request.currency = "jpy".to_owned();
    orders.create_order(bearer(&token, request)).await?;
    stack.stop().await;
    Ok(())
}

/// Finding 7: no per-user cap on webhooks or open watch streams.
#[tokio::test]
async fn webhooks_and_watch_streams_are_capped_per_user() -> anyhow::Result<()> {
    use contracts::notification::v1::{
        DeleteWebhookRequest, RegisterWebhookRequest, WatchNotificationsRequest,
    };
    let stack = TestStack::start_configured(
        |_| {},
        |settings| {
            settings.limits.webhooks_per_user = 3;
            settings.limits.watches_per_user = 2;
        },
    )
    .await?;
    let (_, token) = stack.signed_up_user().await?;
    let (_, other) = stack.signed_up_user().await?;
    let mut notifications = stack.notifications().await?;
    let register = |n: usize| RegisterWebhookRequest {
        url: format!("http://127.0.0.1:9/hook-{n}"),
    };
    // Concurrent registrations cannot slip past the cap.
    let attempts = (0..6).map(|n| {
        let mut client = notifications.clone();
        let token = token.clone();
        async move { client.register_webhook(bearer(&token, register(n))).await }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let registered: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .map(|r| r.get_ref().webhook.clone().expect("webhook").id)
        .collect();
    assert_eq!(registered.len(), 3, "{outcomes:?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    notifications
        .register_webhook(bearer(&other, register(9)))
        .await
        .map_err(|e| anyhow::anyhow!("another user has their own cap: {e:?}"))?;
    notifications
        .delete_webhook(bearer(
            &token,
            DeleteWebhookRequest {
                webhook_id: registered[0].clone(),
            },
        ))
        .await?;
    notifications
        .register_webhook(bearer(&token, register(7)))
        .await
        .map_err(|e| anyhow::anyhow!("a deleted webhook frees its place: {e:?}"))?;

    let watch = |client: &mut contracts::notification::v1::notification_service_client::NotificationServiceClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        let token = token.clone();
        async move {
            client
                .watch_notifications(bearer(&token, WatchNotificationsRequest {}))
                .await
        }
    };
    let first = watch(&mut notifications).await?;
    let _second = watch(&mut notifications).await?;
    crate::helpers::assert_rejected(
        watch(&mut notifications).await.map(|_| ()),
        Code::ResourceExhausted,
        None,
    );
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match watch(&mut notifications).await {
            Ok(_) => break,
            Err(status) if status.code() == Code::ResourceExhausted => {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "a closed stream never freed its place"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => anyhow::bail!("{status:?}"),
        }
    }
    stack.stop().await;
    Ok(())
}
