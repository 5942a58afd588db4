//! Resilience between real service processes (`shopctl serve ...`): the
//! circuit breaker in front of user-service opens when it dies and closes
//! when it returns, and deadlines shrink hop by hop.

use std::{
    io::Read as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use contracts::{
    order::v1::{
        CreateOrderRequest, OrderItem, ShippingAddress, order_service_client::OrderServiceClient,
    },
    user::v1::{AuthenticateRequest, CreateUserRequest, user_service_client::UserServiceClient},
};
use testkit::{NatsServer, TcpProxy, TestDb, bearer, eventually, free_port};
use tonic::{Code, transport::Channel};

/// A service process that is killed on drop.
struct Process {
    child: Child,
}

impl Process {
    fn spawn(service: &str, env: &[(&str, String)], log: &PathBuf) -> anyhow::Result<Self> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shopctl"));
        command
            .args(["serve", service])
            .env("APP_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,shop::deadline=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?);
        for (key, value) in env {
            command.env(key, value);
        }
        Ok(Self {
            child: command.spawn()?,
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    dir: PathBuf,
    users_env: Vec<(&'static str, String)>,
    orders_env: Vec<(&'static str, String)>,
    user_addr: SocketAddr,
    order_addr: SocketAddr,
    order_admin: SocketAddr,
}

async fn env(order_settings: &[(&'static str, &str)]) -> anyhow::Result<(Env, TcpProxy)> {
    let nats = NatsServer::start().await?;
    let (users, orders) =
        tokio::try_join!(TestDb::create("rz_users"), TestDb::create("rz_orders"))?;
    let dir = tempfile::tempdir()?;
    let user_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let order_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let order_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let proxy = TcpProxy::start(user_addr).await?;
    let users_env = vec![
        ("APP_GRPC_ADDR", user_addr.to_string()),
        ("APP_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("APP_DATABASE_URL", users.url.clone()),
        ("APP_NATS_URL", nats.url()),
        (
            "APP_AUTH__SIGNING_KEY",
            testkit::TEST_SIGNING_KEY.to_owned(),
        ),
    ];
    let mut orders_env = vec![
        ("APP_GRPC_ADDR", order_addr.to_string()),
        ("APP_ADMIN_ADDR", order_admin.to_string()),
        ("APP_DATABASE_URL", orders.url.clone()),
        ("APP_NATS_URL", nats.url()),
        ("APP_USER_SERVICE__URL", format!("http://{}", proxy.addr())),
        ("APP_TOKEN_CACHE_SECS", "0".to_owned()),
    ];
    orders_env.extend(order_settings.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let path = dir.path().to_path_buf();
    Ok((
        Env {
            _nats: nats,
            _dir: dir,
            dir: path,
            users_env,
            orders_env,
            user_addr,
            order_addr,
            order_admin,
        },
        proxy,
    ))
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    eventually(
        &format!("{addr} to accept"),
        Duration::from_secs(60),
        || async move {
            Channel::from_shared(format!("http://{addr}"))
                .ok()?
                .connect()
                .await
                .ok()
        },
    )
    .await
}

async fn sign_up(users: &mut UserServiceClient<Channel>) -> anyhow::Result<String> {
    let email = format!("rz-{}@example.com", uuid::Uuid::new_v4().simple());
    users
        .create_user(CreateUserRequest {
            email: email.clone(),
            password: "long enough pw".to_owned(),
        })
        .await?;
    Ok(users
        .authenticate(AuthenticateRequest {
            email,
            password: "long enough pw".to_owned(),
        })
        .await?
        .into_inner()
        .access_token)
}

fn order() -> CreateOrderRequest {
    CreateOrderRequest {
        items: vec![OrderItem {
            sku: "A".to_owned(),
            quantity: 1,
            unit_price_minor: 100,
        }],
        currency: "EUR".to_owned(),
        idempotency_key: String::new(),
        shipping_address: Some(ShippingAddress {
            name: "Ada".to_owned(),
            line1: "1 Main St".to_owned(),
            line2: String::new(),
            city: "Berlin".to_owned(),
            postal_code: "10115".to_owned(),
            country: "DE".to_owned(),
        }),
    }
}

/// A plain HTTP GET against an admin port: (status, body).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok((status, response))
}

async fn breaker_state(admin: SocketAddr) -> anyhow::Result<Option<u8>> {
    let (_, body) = get(admin, "/metrics").await?;
    Ok(body
        .lines()
        .find(|l| l.starts_with("shop_circuit_breaker_state{downstream=\"user-service\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok()))
}

#[tokio::test]
async fn the_breaker_opens_when_user_service_dies_and_closes_when_it_returns() -> anyhow::Result<()>
{
    let (env, proxy) = env(&[
        ("APP_USER_SERVICE__TIMEOUT_MS", "1000"),
        ("APP_USER_SERVICE__PER_TRY_TIMEOUT_MS", "400"),
        ("APP_USER_SERVICE__BREAKER_FAILURE_THRESHOLD", "3"),
        ("APP_USER_SERVICE__BREAKER_OPEN_MS", "1500"),
        ("APP_USER_SERVICE__BREAKER_TRIAL_TIMEOUT_MS", "1000"),
    ])
    .await?;
    let user_log = env.dir.join("user.log");
    let mut user_service = Process::spawn("user-service", &env.users_env, &user_log)?;
    let _order_service =
        Process::spawn("order-service", &env.orders_env, &env.dir.join("order.log"))?;
    let mut users = UserServiceClient::new(channel(env.user_addr).await?);
    let mut orders = OrderServiceClient::new(channel(env.order_addr).await?);
    let token = sign_up(&mut users).await?;
    orders.create_order(bearer(&token, order())).await?;
    assert_eq!(breaker_state(env.order_admin).await?, Some(0));

    user_service.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let status = orders
            .create_order(bearer(&token, order()))
            .await
            .expect_err("user-service is down");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "within the 1 s deadline: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(breaker_state(env.order_admin).await?, Some(1), "open");
    // Degraded, not unready (ADR 13): every replica shares user-service.
    let (status, body) = get(env.order_admin, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("degraded: circuit breaker to user-service is open"),
        "{body}"
    );
    let (_, metrics) = get(env.order_admin, "/metrics").await?;
    assert!(
        metrics.contains("shop_dependency_up{dependency=\"user-service\"} 0"),
        "{metrics}"
    );
    assert_eq!(
        get(env.order_admin, "/livez").await?.0,
        200,
        "liveness is process-local"
    );

    let reached = proxy.connections();
    for _ in 0..5 {
        let started = Instant::now();
        let status = orders
            .create_order(bearer(&token, order()))
            .await
            .expect_err("breaker open");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("circuit open"),
            "{}",
            status.message()
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "fails fast: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        proxy.connections(),
        reached,
        "no call reached the dead address while open"
    );

    let _user_service = Process::spawn("user-service", &env.users_env, &env.dir.join("user2.log"))?;
    channel(env.user_addr).await?;
    let healthy = Instant::now();
    let placed = eventually("an order to succeed again", Duration::from_secs(20), || {
        let mut orders = orders.clone();
        let request = bearer(&token, order());
        async move { orders.create_order(request).await.ok() }
    })
    .await?;
    assert!(placed.into_inner().order.is_some());
    // Recovery bound (issue 12): the open timeout (1.5 s) + 1 s after the
    // downstream is healthy.
    assert!(
        healthy.elapsed() < Duration::from_millis(2500),
        "recovered {:?} after user-service was healthy",
        healthy.elapsed()
    );
    assert_eq!(
        breaker_state(env.order_admin).await?,
        Some(0),
        "closed again"
    );
    assert_eq!(get(env.order_admin, "/readyz").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn the_callers_deadline_reaches_user_service_reduced() -> anyhow::Result<()> {
    let (env, _proxy) = env(&[
        ("APP_USER_SERVICE__TIMEOUT_MS", "10000"),
        ("APP_USER_SERVICE__PER_TRY_TIMEOUT_MS", "10000"),
    ])
    .await?;
    let user_log = env.dir.join("user.log");
    let _user_service = Process::spawn("user-service", &env.users_env, &user_log)?;
    let _order_service =
        Process::spawn("order-service", &env.orders_env, &env.dir.join("order.log"))?;
    let mut users = UserServiceClient::new(channel(env.user_addr).await?);
    let mut orders = OrderServiceClient::new(channel(env.order_addr).await?);
    let token = sign_up(&mut users).await?;
    let mut request = bearer(&token, order());
    request.set_timeout(Duration::from_millis(1500));
    orders.create_order(request).await?;

    let seen = eventually(
        "user-service to log the deadline it got",
        Duration::from_secs(5),
        || {
            let log = user_log.clone();
            async move {
                let mut text = String::new();
                std::fs::File::open(log)
                    .ok()?
                    .read_to_string(&mut text)
                    .ok()?;
                text.lines()
                    .filter(|l| l.contains("incoming deadline") && l.contains("ValidateToken"))
                    .find_map(|l| {
                        let rest = l.split("\"remaining_ms\":").nth(1)?;
                        rest.split(|c: char| !c.is_ascii_digit())
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
            }
        },
    )
    .await?;
    assert!(seen < 1500, "the deadline shrank on the way: {seen} ms");
    assert!(seen > 500, "but most of it is left: {seen} ms");
    Ok(())
}

/// notification-service is SIGKILLed after it delivered a webhook and
/// recorded it, before it acked the message; restarted, it neither loses
/// nor repeats the delivery (counted at the receiver).
#[tokio::test]
async fn a_notification_service_killed_between_delivery_and_ack_delivers_once() -> anyhow::Result<()>
{
    let stack = testkit::TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let db = TestDb::create("crashy").await?;
    let receiver = testkit::WebhookReceiver::start().await?;
    let dir = tempfile::tempdir()?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let env = |pause_ms: &str| {
        vec![
            ("APP_GRPC_ADDR", addr.to_string()),
            ("APP_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("APP_DATABASE_URL", db.url.clone()),
            ("APP_NATS_URL", stack.nats.url()),
            (
                "APP_USER_SERVICE__URL",
                format!("http://{}", stack.user_addr),
            ),
            ("APP_CONSUMER_PREFIX", "crashy".to_owned()),
            ("APP_CHANNELS", "webhook".to_owned()),
            ("APP_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1".to_owned()),
            ("APP_ACK_WAIT_SECS", "2".to_owned()),
            ("APP_FAULTS__PAUSE_BEFORE_ACK_MS", pause_ms.to_owned()),
        ]
    };
    let mut crashy = Process::spawn(
        "notification-service",
        &env("10000"),
        &dir.path().join("n1.log"),
    )?;
    let mut client =
        contracts::notification::v1::notification_service_client::NotificationServiceClient::new(
            channel(addr).await?,
        );
    client
        .register_webhook(bearer(
            &token,
            contracts::notification::v1::RegisterWebhookRequest {
                url: receiver.url(),
            },
        ))
        .await?;
    let mut orders = stack.orders().await?;
    orders.create_order(bearer(&token, order())).await?;
    eventually("the first delivery", Duration::from_secs(20), || async {
        (order_deliveries(&receiver) == 1).then_some(())
    })
    .await?;
    crashy.kill(); // inside the 10 s pause: delivered and recorded, never acked

    let _restarted = Process::spawn(
        "notification-service",
        &env("0"),
        &dir.path().join("n2.log"),
    )?;
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("ORDERS")
        .await?
        .get_consumer("crashy-orders")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    eventually(
        "the redelivered message to be acked",
        Duration::from_secs(30),
        || {
            let mut consumer = consumer.clone();
            async move {
                let info = consumer.info().await.ok()?;
                (info.delivered.stream_sequence >= 1
                    && info.num_ack_pending == 0
                    && info.num_pending == 0
                    && info.ack_floor.stream_sequence >= 1)
                    .then_some(())
            }
        },
    )
    .await?;
    assert_eq!(order_deliveries(&receiver), 1, "not delivered twice");

    // And it keeps working: the next order's notification arrives once.
    orders.create_order(bearer(&token, order())).await?;
    eventually("the second delivery", Duration::from_secs(20), || async {
        (order_deliveries(&receiver) == 2).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(order_deliveries(&receiver), 2);
    stack.stop().await;
    Ok(())
}

/// Deliveries of order confirmations (the welcome mail of the sign-up may
/// arrive too, depending on timing).
fn order_deliveries(receiver: &testkit::WebhookReceiver) -> usize {
    receiver
        .accepted()
        .iter()
        .filter(|hit| hit.body.contains("\"type\":\"order.created\""))
        .count()
}

/// One order, one trace: CreateOrder in order-service, ValidateToken in
/// user-service, the outbox relay, both projections and the notification
/// consumer all report spans of the same trace to an OTLP receiver, each
/// hanging below the span that caused it.
#[tokio::test]
async fn one_order_is_one_trace_across_services_and_the_event_bus() -> anyhow::Result<()> {
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .map_err(|e| anyhow::anyhow!("collector: {e}"))?;
    let (env, _proxy) = env(&[]).await?;
    let otel = |mut vars: Vec<(&'static str, String)>| {
        vars.push(("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()));
        vars.push(("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()));
        vars
    };
    let notifications_db = TestDb::create("trace_notifications").await?;
    let mut notification_env: Vec<(&'static str, String)> = vec![
        ("APP_GRPC_ADDR", format!("127.0.0.1:{}", free_port())),
        ("APP_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("APP_DATABASE_URL", notifications_db.url.clone()),
        ("APP_USER_SERVICE__URL", format!("http://{}", env.user_addr)),
    ];
    notification_env.extend(
        env.users_env
            .iter()
            .filter(|(k, _)| *k == "APP_NATS_URL")
            .cloned(),
    );
    let _users = Process::spawn(
        "user-service",
        &otel(env.users_env.clone()),
        &env.dir.join("u.log"),
    )?;
    // order-service talks to user-service directly here (no proxy).
    let mut orders_env = otel(env.orders_env.clone());
    for (key, value) in &mut orders_env {
        if *key == "APP_USER_SERVICE__URL" {
            *value = format!("http://{}", env.user_addr);
        }
    }
    let _orders = Process::spawn("order-service", &orders_env, &env.dir.join("o.log"))?;
    let _notifications = Process::spawn(
        "notification-service",
        &otel(notification_env),
        &env.dir.join("n.log"),
    )?;
    let mut users = UserServiceClient::new(channel(env.user_addr).await?);
    let mut orders = OrderServiceClient::new(channel(env.order_addr).await?);
    let token = sign_up(&mut users).await?;
    let placed = orders
        .create_order(bearer(&token, order()))
        .await?
        .into_inner()
        .order
        .expect("order");
    let history = orders
        .get_order_history(bearer(
            &token,
            contracts::order::v1::GetOrderHistoryRequest {
                order_id: placed.id.clone(),
            },
        ))
        .await?
        .into_inner()
        .events;
    let stored = history[0].traceparent.clone();
    let parts: Vec<&str> = stored.split('-').collect();
    assert_eq!(
        parts.len(),
        4,
        "the event row carries a traceparent: {stored:?}"
    );
    let (trace_id, writer_span) = (parts[1].to_owned(), parts[2].to_owned());

    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = [
        "outbox publish",
        "projection apply",
        "notification handle",
        "/shop.user.v1.UserService/ValidateToken",
    ];
    loop {
        spans.extend(
            collector
                .exported_spans(1, Duration::from_millis(500))
                .await,
        );
        let names: Vec<&str> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.name.as_str())
            .collect();
        if wanted.iter().all(|w| names.contains(w))
            && names.iter().filter(|n| **n == "projection apply").count() >= 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace_id} so far: {names:?}"
        );
    }
    let in_trace: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let by_name = |name: &str| {
        in_trace
            .iter()
            .filter(move |s| s.name == name)
            .copied()
            .collect::<Vec<_>>()
    };
    let ids: std::collections::HashSet<&str> =
        in_trace.iter().map(|s| s.span_id.as_str()).collect();

    let create = by_name("/shop.order.v1.OrderService/CreateOrder");
    assert_eq!(create.len(), 1, "the order-service server span");
    let validate = by_name("/shop.user.v1.UserService/ValidateToken");
    assert!(
        ids.contains(validate[0].parent_span_id.as_str()),
        "user-service's span has its parent in order-service"
    );
    let publish = by_name("outbox publish");
    assert_eq!(
        publish[0].parent_span_id, writer_span,
        "the relay continues the span that wrote the event"
    );
    assert!(
        by_name("projection apply")
            .iter()
            .all(|s| s.parent_span_id == writer_span),
        "projections too"
    );
    let handle = by_name("notification handle");
    assert_eq!(
        handle[0].parent_span_id, publish[0].span_id,
        "the consumer continues the relay's span via NATS headers"
    );
    assert!(
        ids.contains(writer_span.as_str()),
        "the writing span itself was exported"
    );
    // JSON log lines carry the trace id, so logs and traces meet.
    let log = std::fs::read_to_string(env.dir.join("o.log"))?;
    let needle = format!("\"trace_id\":\"{trace_id}\"");
    assert!(
        log.lines()
            .any(|l| l.contains("order created") && l.contains(&needle)),
        "order-service logged the order with its trace id"
    );
    Ok(())
}

/// A TLS channel to `addr` as `localhost`, trusting `ca`, presenting
/// `identity` if given.
async fn tls_channel(
    addr: SocketAddr,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    }
    Ok(
        Channel::from_shared(format!("https://localhost:{}", addr.port()))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

/// Issue 12, finding 8: user-service serves gRPC over mutual TLS (files from
/// `APP_TLS__*`), order-service calls it over mutual TLS
/// (`APP_USER_SERVICE__TLS__*`), and both export traces to an `https` OTLP
/// endpoint (`OTEL_EXPORTER_OTLP_CERTIFICATE`). Plaintext, a client without
/// a certificate and a client trusting another CA are all refused.
#[tokio::test]
async fn services_speak_mutual_tls_and_export_traces_over_https() -> anyhow::Result<()> {
    let certs = testkit::Certs::generate()?;
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .map_err(|e| anyhow::anyhow!("collector: {e}"))?;
    let collector_addr: SocketAddr = collector.endpoint().trim_start_matches("http://").parse()?;
    let terminator = testkit::TlsTerminator::start(&certs, collector_addr).await?;
    let (env, _proxy) = env(&[]).await?;
    let path = |p: &std::path::Path| p.display().to_string();
    let otel = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("https://localhost:{}", terminator.addr().port()),
        ),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(&certs.ca)),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let mut users_env = env.users_env.clone();
    users_env.extend([
        ("APP_TLS__CERT_FILE", path(&certs.server_cert)),
        ("APP_TLS__KEY_FILE", path(&certs.server_key)),
        ("APP_TLS__CLIENT_CA_FILE", path(&certs.ca)),
    ]);
    users_env.extend(otel.iter().cloned());
    let mut orders_env: Vec<(&'static str, String)> = env
        .orders_env
        .iter()
        .filter(|(k, _)| *k != "APP_USER_SERVICE__URL")
        .cloned()
        .collect();
    orders_env.extend([
        (
            "APP_USER_SERVICE__URL",
            format!("https://localhost:{}", env.user_addr.port()),
        ),
        ("APP_USER_SERVICE__TLS__CA_FILE", path(&certs.ca)),
        ("APP_USER_SERVICE__TLS__CERT_FILE", path(&certs.client_cert)),
        ("APP_USER_SERVICE__TLS__KEY_FILE", path(&certs.client_key)),
    ]);
    orders_env.extend(otel.iter().cloned());
    let _users = Process::spawn("user-service", &users_env, &env.dir.join("u.log"))?;
    let _orders = Process::spawn("order-service", &orders_env, &env.dir.join("o.log"))?;

    let identity = Some((certs.client_cert.as_path(), certs.client_key.as_path()));
    let secure = eventually(
        "user-service to accept TLS",
        Duration::from_secs(60),
        || {
            let (addr, ca) = (env.user_addr, certs.ca.clone());
            async move { tls_channel(addr, &ca, identity).await.ok() }
        },
    )
    .await?;
    let token = sign_up(&mut UserServiceClient::new(secure)).await?;
    let mut orders = OrderServiceClient::new(channel(env.order_addr).await?);
    orders
        .create_order(bearer(&token, order()))
        .await
        .map_err(|e| anyhow::anyhow!("order-service -> user-service over mTLS: {e:?}"))?;

    // Refused: plaintext, no client certificate, a server nobody vouched for.
    let plain = Channel::from_shared(format!("http://{}", env.user_addr))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(plain) = plain {
        let answer = UserServiceClient::new(plain)
            .authenticate(AuthenticateRequest {
                email: "a@b.co".to_owned(),
                password: "x".to_owned(),
            })
            .await;
        assert!(answer.is_err(), "plaintext got an answer: {answer:?}");
    }
    let no_identity = match tls_channel(env.user_addr, &certs.ca, None).await {
        Err(_) => None,
        Ok(channel) => Some(
            UserServiceClient::new(channel)
                .authenticate(AuthenticateRequest {
                    email: "a@b.co".to_owned(),
                    password: "x".to_owned(),
                })
                .await,
        ),
    };
    assert!(
        no_identity.as_ref().is_none_or(Result::is_err),
        "a client without a certificate got an answer: {no_identity:?}"
    );
    assert!(
        tls_channel(env.user_addr, &certs.other_ca, identity)
            .await
            .is_err(),
        "a client must not trust a server its CA did not sign"
    );

    // Spans reached the collector through TLS, from both services.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut names = std::collections::HashSet::new();
    while !(names.contains("/shop.user.v1.UserService/ValidateToken")
        && names.contains("/shop.order.v1.OrderService/CreateOrder"))
    {
        assert!(
            Instant::now() < deadline,
            "spans over https: {names:?} (logs in {})",
            env.dir.display()
        );
        for span in collector
            .exported_spans(1, Duration::from_millis(500))
            .await
        {
            names.insert(span.name.clone());
        }
    }
    Ok(())
}

/// Issue 12, finding 5: ids with a newline forged whole log lines, ESC bytes
/// reached the log raw, a 1 MB id wrote a 1 MB line, all without a token.
/// Sent to a real order-service; its JSON log must stay one well-formed,
/// short record per line, with nothing of the hostile input in it.
#[tokio::test]
async fn hostile_ids_cannot_forge_or_flood_the_log() -> anyhow::Result<()> {
    use contracts::order::v1::{GetOrderRequest, PayOrderRequest};
    let (env, _proxy) = env(&[]).await?;
    let log = env.dir.join("orders.log");
    let _users = Process::spawn("user-service", &env.users_env, &env.dir.join("u.log"))?;
    let _orders = Process::spawn("order-service", &env.orders_env, &log)?;
    let mut orders = OrderServiceClient::new(channel(env.order_addr).await?);
    let forged = "x\n{\"level\":\"ERROR\",\"fields\":{\"message\":\"FORGED-LINE\"}}\n\u{1b}[31m";
    let huge = "y".repeat(1 << 20);
    for id in [forged.to_owned(), huge.clone()] {
        let _ = orders
            .get_order(GetOrderRequest {
                order_id: id.clone(),
                min_position: 0,
            })
            .await;
        let _ = orders
            .pay_order(PayOrderRequest {
                order_id: id,
                payment_reference: forged.to_owned(),
                amount_minor: 1,
                idempotency_key: forged.to_owned(),
                expected_version: 0,
            })
            .await;
    }
    // The calls are logged (as rejected) before the process is stopped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&log)?;
    anyhow::ensure!(
        text.contains(&format!("<invalid, {} bytes>", huge.len())),
        "the rejected calls are logged, by the id's length only: {text}"
    );
    for line in text.lines() {
        anyhow::ensure!(line.len() < 4096, "a {}-byte log line", line.len());
        anyhow::ensure!(!line.contains('\u{1b}'), "a raw ESC byte: {line}");
        anyhow::ensure!(
            !line.contains("FORGED-LINE"),
            "hostile input in the log: {line}"
        );
        anyhow::ensure!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not one JSON record: {line}"
        );
    }
    Ok(())
}
