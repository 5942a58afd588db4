//! `shopctl demo`: the story of one order, told against a running stack.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use contracts::{
    notification::v1::{
        ListNotificationsRequest, notification_service_client::NotificationServiceClient,
    },
    order::v1::{
        CreateOrderRequest, GetOrderHistoryRequest, GetOrderRequest, OrderItem, PayOrderRequest,
        ShipOrderRequest, ShippingAddress, order_service_client::OrderServiceClient,
    },
    user::v1::{AuthenticateRequest, CreateUserRequest, user_service_client::UserServiceClient},
};
use tonic::transport::Channel;

use crate::stack::{StackFile, UpOptions};

/// Runs the demo against the stack in `stack_file`, or starts a stack, runs
/// the demo and stops it again.
pub(crate) async fn run_or_start(stack_file: &Path) -> anyhow::Result<()> {
    if let Ok(text) = std::fs::read_to_string(stack_file)
        && let Ok(stack) = serde_json::from_str::<StackFile>(&text)
        && connect(&stack.user_service).await.is_ok()
    {
        return run(&stack).await;
    }
    out!(
        "No running stack found at {}; starting one for the demo.",
        stack_file.display()
    );
    let _telemetry = platform::telemetry::init("shopctl");
    let options = UpOptions {
        nats_url: std::env::var("SHOP_NATS_URL").ok(),
        postgres_url: std::env::var("SHOP_POSTGRES_URL").ok(),
        data_dir: stack_file
            .parent()
            .map_or_else(|| ".shop".into(), Path::to_path_buf),
        replicas: 1,
        nats_cluster: 1,
    };
    crate::stack::up(options, |stack| async move {
        run(&stack).await?;
        Ok(crate::stack::Then::Stop)
    })
    .await
}

/// A channel to a service: every replica of it, balanced.
async fn connect(url: &str) -> anyhow::Result<Channel> {
    crate::load::channel(url).await
}

/// A request carrying `authorization: Bearer <token>`.
pub(crate) fn authed<T>(token: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn money(minor: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", minor / 100, (minor % 100).abs())
}

/// The demo's order (also what `shopctl load` places): a book and two mugs,
/// 64.99 EUR, to London.
pub(crate) fn sample_order(idempotency_key: String) -> CreateOrderRequest {
    CreateOrderRequest {
        items: vec![
            OrderItem {
                sku: "BOOK-DDIA".to_owned(),
                quantity: 1,
                unit_price_minor: 3999,
            },
            OrderItem {
                sku: "MUG-RUST".to_owned(),
                quantity: 2,
                unit_price_minor: 1250,
            },
        ],
        currency: "EUR".to_owned(),
        idempotency_key,
        shipping_address: Some(ShippingAddress {
            name: "Ada Lovelace".to_owned(),
            line1: "12 St James's Square".to_owned(),
            line2: String::new(),
            city: "London".to_owned(),
            postal_code: "SW1Y 4JH".to_owned(),
            country: "GB".to_owned(),
        }),
    }
}

/// Tells the story: sign up, log in, order, read it back, see the notification.
pub(crate) async fn run(stack: &StackFile) -> anyhow::Result<()> {
    let mut users = UserServiceClient::new(connect(&stack.user_service).await?);
    let mut orders = OrderServiceClient::new(connect(&stack.order_service).await?);
    let mut notifications =
        NotificationServiceClient::new(connect(&stack.notification_service).await?);
    let email = format!(
        "ada-{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let password = "correct horse battery staple".to_owned();
    out!("Demo: one customer, one order, one notification.");

    let started = Instant::now();
    let user = users
        .create_user(CreateUserRequest {
            email: email.clone(),
            password: password.clone(),
        })
        .await
        .context("CreateUser")?
        .into_inner()
        .user
        .context("CreateUser returned no user")?;
    out!(
        "1. Signed up {email} as user {} ({})",
        user.id,
        ms(started.elapsed())
    );

    let started = Instant::now();
    let login = users
        .authenticate(AuthenticateRequest { email, password })
        .await
        .context("Authenticate")?
        .into_inner();
    out!(
        "2. Logged in; got an access token valid for an hour ({})",
        ms(started.elapsed())
    );

    let request = authed(
        &login.access_token,
        sample_order(uuid::Uuid::new_v4().to_string()),
    )?;
    let ordered_at = Instant::now();
    let created = orders
        .create_order(request)
        .await
        .context("CreateOrder")?
        .into_inner();
    let order = created.order.context("CreateOrder returned no order")?;
    let total = order.total.clone().unwrap_or_default();
    out!(
        "3. Placed order {}: 1 x BOOK-DDIA, 2 x MUG-RUST, total {} ({}; event position {})",
        order.id,
        money(total.amount_minor, &total.currency),
        ms(ordered_at.elapsed()),
        created.position
    );

    let started = Instant::now();
    let request = authed(
        &login.access_token,
        GetOrderRequest {
            order_id: order.id.clone(),
            min_position: created.position,
        },
    )?;
    let read = orders
        .get_order(request)
        .await
        .context("GetOrder")?
        .into_inner()
        .order
        .context("no order")?;
    out!(
        "4. Read it back from the read model (read-your-writes): status {:?}, version {}, {} lines ({})",
        read.status(),
        read.version,
        read.items.len(),
        ms(started.elapsed())
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let notification = loop {
        let page = notifications
            .list_notifications(authed(
                &login.access_token,
                ListNotificationsRequest {
                    user_id: user.id.clone(),
                    page_size: 10,
                    page_token: String::new(),
                },
            )?)
            .await
            .context("ListNotifications")?
            .into_inner();
        if let Some(n) = page
            .notifications
            .into_iter()
            .find(|n| n.event_type == "order.created")
        {
            break n;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no notification for order {} within 30 s",
            order.id
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seen_after = ordered_at.elapsed();
    let server_side = match (&order.created_at, &notification.created_at) {
        (Some(a), Some(b)) => {
            let nanos = (b.seconds - a.seconds) * 1_000_000_000 + i64::from(b.nanos - a.nanos);
            format!("{:.1} ms", nanos as f64 / 1e6)
        }
        _ => "unknown".to_owned(),
    };
    out!(
        "5. Notification via {}: \"{}\" — \"{}\"",
        notification.channel,
        notification.subject,
        notification.body
    );
    out!(
        "   Order to notification: {server_side} (event committed -> notification recorded), \
         {} from sending the order until the client could list it.",
        ms(seen_after)
    );

    let started = Instant::now();
    orders
        .pay_order(authed(
            &login.access_token,
            PayOrderRequest {
                order_id: order.id.clone(),
                payment_reference: "demo-payment-1".to_owned(),
                amount_minor: total.amount_minor,
                idempotency_key: String::new(),
                expected_version: 1,
            },
        )?)
        .await
        .context("PayOrder")?;
    let shipped = orders
        .ship_order(authed(
            &login.access_token,
            ShipOrderRequest {
                order_id: order.id.clone(),
                carrier: "DHL".to_owned(),
                tracking_number: "JD0146000033".to_owned(),
                idempotency_key: String::new(),
                expected_version: 2,
            },
        )?)
        .await
        .context("ShipOrder")?
        .into_inner()
        .order
        .context("no order")?;
    out!(
        "6. Paid and shipped: status {:?}, carrier {} tracking {} ({})",
        shipped.status(),
        shipped.carrier,
        shipped.tracking_number,
        ms(started.elapsed())
    );
    let history = orders
        .get_order_history(authed(
            &login.access_token,
            GetOrderHistoryRequest {
                order_id: order.id.clone(),
            },
        )?)
        .await
        .context("GetOrderHistory")?
        .into_inner()
        .events;
    let trail: Vec<_> = history
        .iter()
        .map(|e| format!("v{} {}", e.version, e.event_type))
        .collect();
    out!("7. Audit trail: {}", trail.join(", "));
    out!("   More: shopctl orders history {}", order.id);
    out!("         shopctl orders at {} --version 1", order.id);
    Ok(())
}
