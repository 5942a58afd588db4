//! What operators see: the metrics a real flow must produce on each
//! service's admin port, and readiness that follows the dependencies.

use std::time::Duration;

use contracts::order::v1::PayOrderRequest;
use testkit::{TestStack, bearer, eventually, http_get, metric};

use crate::helpers::{item, order};

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let (status, body) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "metrics answered {status}");
    Ok(body)
}

#[tokio::test]
async fn a_flow_shows_up_in_every_services_metrics() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let placed = orders
        .create_order(bearer(&token, order(vec![item("A", 2, 500)])))
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
                amount_minor: 1000,
                ..Default::default()
            },
        ))
        .await?;
    let refused = orders.create_order(bearer(&token, order(vec![]))).await;
    assert!(refused.is_err());

    let order_metrics = eventually(
        "order events published",
        Duration::from_secs(10),
        || async {
            let body = scrape(stack.order_admin).await.ok()?;
            (metric(&body, "shop_events_published_total", "type=\"order.paid\"") == Some(1.0))
                .then_some(body)
        },
    )
    .await?;
    let create = "/shop.order.v1.OrderService/CreateOrder";
    assert_eq!(
        metric(
            &order_metrics,
            "shop_grpc_server_requests_total",
            &format!("method=\"{create}\",code=\"Ok\"")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &order_metrics,
            "shop_grpc_server_requests_total",
            &format!("method=\"{create}\",code=\"InvalidArgument\"")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &order_metrics,
            "shop_grpc_server_request_duration_seconds_count",
            &format!("method=\"{create}\"")
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &order_metrics,
            "shop_events_appended_total",
            "type=\"order.created\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &order_metrics,
            "shop_events_appended_total",
            "type=\"order.paid\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &order_metrics,
            "shop_events_published_total",
            "type=\"order.created\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &order_metrics,
            "shop_circuit_breaker_state",
            "downstream=\"user-service\""
        ),
        Some(0.0)
    );
    let order_metrics = eventually(
        "the relay backlog to drain",
        Duration::from_secs(10),
        || async {
            let body = scrape(stack.order_admin).await.ok()?;
            (metric(&body, "shop_relay_lag_events", "name=\"order-events\"") == Some(0.0))
                .then_some(body)
        },
    )
    .await?;
    assert_eq!(
        metric(
            &order_metrics,
            "shop_relay_lag_seconds",
            "name=\"order-events\""
        ),
        Some(0.0)
    );
    assert!(metric(&order_metrics, "shop_db_pool_connections", "state=\"idle\"").is_some());

    let user_metrics = scrape(stack.user_admin).await?;
    assert_eq!(
        metric(
            &user_metrics,
            "shop_events_appended_total",
            "type=\"user.created\""
        ),
        Some(1.0)
    );
    let validations = metric(
        &user_metrics,
        "shop_grpc_server_requests_total",
        "method=\"/shop.user.v1.UserService/ValidateToken\",code=\"Ok\"",
    )
    .unwrap_or(0.0);
    assert!(
        validations >= 1.0,
        "order-service asked user-service ({validations})"
    );

    // The user and order streams are consumed independently: wait for the
    // last of each, not for one stream to imply the other.
    let notification_metrics = eventually(
        "the user event and both order events consumed",
        Duration::from_secs(10),
        || async {
            let body = scrape(stack.notification_admin).await.ok()?;
            let consumed = |labels: &str| metric(&body, "shop_events_consumed_total", labels);
            (consumed("type=\"order.paid\",outcome=\"delivered\"") == Some(1.0)
                && consumed("type=\"user.created\",outcome=\"delivered\"").is_some())
            .then_some(body)
        },
    )
    .await?;
    assert_eq!(
        metric(
            &notification_metrics,
            "shop_events_consumed_total",
            "type=\"order.created\",outcome=\"delivered\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &notification_metrics,
            "shop_events_consumed_total",
            "type=\"user.created\",outcome=\"delivered\""
        ),
        Some(1.0)
    );
    let drained = eventually(
        "consumer backlog sampled at zero",
        Duration::from_secs(10),
        || async {
            let body = scrape(stack.notification_admin).await.ok()?;
            (metric(
                &body,
                "shop_consumer_pending_messages",
                "name=\"notification-service-orders\"",
            ) == Some(0.0))
            .then_some(body)
        },
    )
    .await?;
    assert_eq!(metric(&drained, "shop_dlq_messages", ""), Some(0.0));

    // Every documented metric is exported by some service.
    let exported: std::collections::BTreeSet<String> = [&order_metrics, &user_metrics, &drained]
        .iter()
        .flat_map(|body| body.lines())
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(ToOwned::to_owned)
        .collect();
    for name in crate::deploy::documented()? {
        let family = name.strip_suffix("_total").unwrap_or(&name);
        assert!(
            exported.contains(family),
            "{name} is documented but not exported: {exported:?}"
        );
    }
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_nats_outage_degrades_readiness_without_dropping_the_replica() -> anyhow::Result<()> {
    // ADR 13: every replica shares NATS, and the outbox keeps the write
    // path open, so a NATS outage is "degraded", not "unready".
    let mut stack = TestStack::start().await?;
    for addr in [
        stack.user_admin,
        stack.order_admin,
        stack.notification_admin,
    ] {
        assert_eq!(
            http_get(addr, "/readyz").await?,
            (200, "ready\n".to_owned())
        );
        assert_eq!(http_get(addr, "/livez").await?.0, 200);
    }
    let (_, token) = stack.signed_up_user().await?;
    stack.nats.kill();
    let admin = stack.order_admin;
    let body = eventually(
        "order-service to report NATS as degraded",
        Duration::from_secs(15),
        || async move {
            let (status, body) = http_get(admin, "/readyz").await.ok()?;
            body.contains("degraded").then_some((status, body))
        },
    )
    .await?;
    assert_eq!(body.0, 200, "still ready: {}", body.1);
    assert!(body.1.contains("nats disconnected"), "{}", body.1);
    let metrics = eventually(
        "shop_dependency_up to say nats 0",
        Duration::from_secs(5),
        || async move {
            let (_, text) = http_get(admin, "/metrics").await.ok()?;
            text.contains("shop_dependency_up{dependency=\"nats\"} 0")
                .then_some(text)
        },
    )
    .await?;
    assert!(
        metrics.contains("shop_dependency_up{dependency=\"postgres\"} 1"),
        "{metrics}"
    );
    let health = tonic_health::pb::health_client::HealthClient::new(
        stack.channel_to(stack.order_addr).await?,
    );
    let status = health
        .clone()
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        "gRPC health follows readiness: still serving"
    );
    // The write path stays open: the event waits in the outbox.
    let placed = stack
        .orders()
        .await?
        .create_order(testkit::bearer(
            &token,
            crate::helpers::order(vec![crate::helpers::item("SKU-1", 1, 100)]),
        ))
        .await;
    assert!(
        placed.is_ok(),
        "commands work while NATS is away: {placed:?}"
    );
    stack.nats.start_again().await?;
    eventually(
        "order-service to be plainly ready again",
        Duration::from_secs(30),
        || async move {
            let (status, body) = http_get(admin, "/readyz").await.ok()?;
            (status == 200 && body == "ready\n").then_some(())
        },
    )
    .await?;
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn readiness_follows_postgres_while_liveness_stays_up() -> anyhow::Result<()> {
    testkit::init_logging();
    let postgres = testkit::PgServer::start().await?;
    let mut admin_conn = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres.url()).await?;
    sqlx::query("CREATE DATABASE orders")
        .execute(&mut admin_conn)
        .await?;
    drop(admin_conn);
    let nats = testkit::NatsServer::start().await?;
    let app = order_service::Application::build(order_service::Settings {
        grpc_addr: "127.0.0.1:0".to_owned(),
        admin_addr: "127.0.0.1:0".to_owned(),
        database_url: platform::config::DatabaseUrl::new(postgres.database_url("orders")),
        nats_url: nats.url(),
        startup_wait_secs: 10,
        ..Default::default()
    })
    .await?;
    let admin = app.admin_addr();
    let grpc = app.grpc_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    assert_eq!(http_get(admin, "/readyz").await?.0, 200);

    postgres.crash().await?;
    let body = eventually(
        "unready without Postgres",
        Duration::from_secs(15),
        || async move {
            let (status, body) = http_get(admin, "/readyz").await.ok()?;
            (status == 503).then_some(body)
        },
    )
    .await?;
    assert!(body.contains("postgres"), "{body}");
    assert_eq!(
        http_get(admin, "/livez").await?.0,
        200,
        "liveness is process-local"
    );
    // ADR 13: answered from state kept in the background, not by waiting on
    // a dead server (it took ~2 s); calls that need the database fail fast
    // (they waited 3 s for a pool connection).
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(http_get(admin, "/readyz").await?.0, 503);
        took.push(started.elapsed());
    }
    took.sort();
    assert!(
        took[2] < Duration::from_millis(100),
        "median /readyz {:?}",
        took[2]
    );
    let mut orders = contracts::order::v1::order_service_client::OrderServiceClient::new(
        tonic::transport::Channel::from_shared(format!("http://{grpc}"))?
            .connect()
            .await?,
    );
    let started = std::time::Instant::now();
    let refused = orders
        .get_order(testkit::bearer(
            "any-token",
            contracts::order::v1::GetOrderRequest {
                order_id: uuid::Uuid::new_v4().to_string(),
                min_position: 0,
            },
        ))
        .await
        .expect_err("no database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("database unreachable"),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed fast: {:?}",
        started.elapsed()
    );

    postgres.start_again().await?;
    eventually(
        "ready again with Postgres back",
        Duration::from_secs(30),
        || async move {
            let (status, _) = http_get(admin, "/readyz").await.ok()?;
            (status == 200).then_some(())
        },
    )
    .await?;
    stop.cancel();
    running.await??;
    Ok(())
}
