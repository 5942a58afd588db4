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
