//! Regression tests of attacks by a hostile client with no account, sent to
//! the real services (issue 12). Each failed on the code before its fix.

use std::time::Duration;

use contracts::order::v1::GetOrderRequest;
use testkit::{TestStack, bearer};
use tonic::Code;

use crate::order_api::{item, order};

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
        crate::support::assert_rejected(refused, Code::InvalidArgument, Some("url"));
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
        crate::support::assert_rejected(refused, Code::InvalidArgument, Some("email"));
    }
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let mut request = order(vec![item("SKU-1", 1, 100)]);
    request.idempotency_key = "key\u{0}nul".to_owned();
    let refused = orders.create_order(bearer(&token, request)).await;
    crate::support::assert_rejected(refused, Code::InvalidArgument, Some("idempotency_key"));
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
    crate::support::assert_rejected(refused, Code::InvalidArgument, Some("idempotency_key"));
    Ok(())
}
