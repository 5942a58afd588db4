//! Arbitrary field values for every RPC: never a panic, never INTERNAL or
//! UNKNOWN; invalid input is INVALID_ARGUMENT with field violations.

use contracts::{
    notification::v1::ListNotificationsRequest,
    order::v1::{
        CancelOrderRequest, CreateOrderRequest, DeliverOrderRequest, GetOrderAtRequest,
        GetOrderHistoryRequest, GetOrderRequest, ListOrdersRequest, OrderItem, PayOrderRequest,
        ShipOrderRequest, ShippingAddress, get_order_at_request::Point,
    },
    user::v1::{AuthenticateRequest, CreateUserRequest, GetUserRequest, ValidateTokenRequest},
};
use proptest::{
    prelude::*,
    strategy::ValueTree as _,
    test_runner::{Config, TestRunner},
};
use testkit::{TestStack, bearer};
use tonic::{Code, Status};

const CASES: usize = 40;

/// Strings a client might send: empty, plausible, hostile, huge, any Unicode.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9@._ -]{0,40}",
        "\\PC{0,80}",
        any::<String>(),
        Just("a@b.co".to_owned()),
        Just(uuid::Uuid::new_v4().to_string()),
        "[x]{300,600}",
        // Postgres cannot store NUL: every field must refuse it up front.
        "[a-z]{0,8}\u{0}[a-z]{0,8}",
        Just("line\nforged\u{1b}[31m".to_owned()),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(0_i64),
        Just(-1),
        Just(i64::MAX),
        Just(i64::MIN),
        -1000_i64..100_000,
        any::<i64>()
    ]
    .boxed()
}

fn small() -> BoxedStrategy<i32> {
    prop_oneof![
        Just(0_i32),
        Just(-1),
        Just(i32::MAX),
        Just(i32::MIN),
        -10_i32..200,
        any::<i32>()
    ]
    .boxed()
}

fn samples<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>) -> Vec<T> {
    let mut runner = TestRunner::new(Config::default());
    (0..CASES)
        .map(|_| strategy.new_tree(&mut runner).expect("sample").current())
        .collect()
}

/// The answer to arbitrary input must be a deliberate one: success only
/// where `may_succeed` says the input is acceptable, and every refusal a
/// deliberate code (never INTERNAL or UNKNOWN), INVALID_ARGUMENT naming
/// its fields.
#[track_caller]
fn check<T: std::fmt::Debug>(
    rpc: &str,
    input: &impl std::fmt::Debug,
    may_succeed: bool,
    result: Result<T, Status>,
) {
    let status = match result {
        Ok(answer) => {
            assert!(may_succeed, "{rpc}({input:?}) accepted: {answer:?}");
            return;
        }
        Err(status) => status,
    };
    assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown),
        "{rpc}({input:?}) -> {status:?}"
    );
    if status.code() == Code::InvalidArgument {
        assert!(
            !crate::helpers::violated_fields(&status).is_empty(),
            "{rpc}({input:?}) -> INVALID_ARGUMENT without field violations: {status:?}"
        );
    }
}

fn address() -> impl Strategy<Value = Option<ShippingAddress>> {
    proptest::option::of((text(), text(), text(), text(), text(), text()).prop_map(
        |(name, line1, line2, city, postal_code, country)| ShippingAddress {
            name,
            line1,
            line2,
            city,
            postal_code,
            country,
        },
    ))
}

fn items() -> impl Strategy<Value = Vec<OrderItem>> {
    prop::collection::vec(
        (text(), small(), number()).prop_map(|(sku, quantity, unit_price_minor)| OrderItem {
            sku,
            quantity,
            unit_price_minor,
        }),
        0..4,
    )
}

#[tokio::test]
async fn arbitrary_requests_to_every_rpc_get_deliberate_answers() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut users = stack.users().await?;
    let mut orders = stack.orders().await?;
    let mut notifications = stack.notifications().await?;

    // Samples repeat: an address signed up in an earlier round may sign in
    // in a later one, with the password it was registered with.
    let mut registered = std::collections::HashMap::new();
    for (email, password) in samples((text(), text())) {
        let request = CreateUserRequest { email, password };
        let created = users.create_user(request.clone()).await;
        let normalized = user_domain::Email::parse(&request.email)
            .ok()
            .map(|e| e.as_str().to_owned());
        if created.is_ok()
            && let Some(email) = &normalized
        {
            registered.insert(email.clone(), request.password.clone());
        }
        let signed_up = normalized
            .as_ref()
            .is_some_and(|e| registered.get(e) == Some(&request.password));
        check(
            "CreateUser",
            &request,
            user_domain::Email::parse(&request.email).is_ok()
                && user_domain::Password::parse(&request.password).is_ok(),
            created,
        );
        let request = AuthenticateRequest {
            email: request.email,
            password: request.password,
        };
        check(
            "Authenticate",
            &request,
            signed_up,
            users.authenticate(request.clone()).await,
        );
    }
    for raw in samples(text()) {
        let request = ValidateTokenRequest {
            access_token: raw.clone(),
        };
        check(
            "ValidateToken",
            &request,
            false,
            users.validate_token(request.clone()).await,
        );
        let request = GetUserRequest { user_id: raw };
        check(
            "GetUser",
            &request,
            false,
            users.get_user(bearer(&token, request.clone())).await,
        );
    }
    for (items, currency, key, shipping_address) in samples((items(), text(), text(), address())) {
        let request = CreateOrderRequest {
            items,
            currency,
            idempotency_key: key,
            shipping_address,
        };
        check(
            "CreateOrder",
            &request,
            !request.items.is_empty()
                && request.shipping_address.is_some()
                && order_domain::Currency::parse(&request.currency).is_ok(),
            orders.create_order(bearer(&token, request.clone())).await,
        );
    }
    for (id, a, b, n, v) in samples((text(), text(), text(), number(), number())) {
        let pay = PayOrderRequest {
            order_id: id.clone(),
            payment_reference: a.clone(),
            amount_minor: n,
            idempotency_key: b.clone(),
            expected_version: v,
        };
        check(
            "PayOrder",
            &pay,
            false, // no such order of the caller's
            orders.pay_order(bearer(&token, pay.clone())).await,
        );
        let ship = ShipOrderRequest {
            order_id: id.clone(),
            carrier: a.clone(),
            tracking_number: b.clone(),
            idempotency_key: String::new(),
            expected_version: v,
        };
        check(
            "ShipOrder",
            &ship,
            false, // no such order of the caller's
            orders.ship_order(bearer(&token, ship.clone())).await,
        );
        let deliver = DeliverOrderRequest {
            order_id: id.clone(),
            idempotency_key: b.clone(),
            expected_version: v,
        };
        check(
            "DeliverOrder",
            &deliver,
            false, // no such order of the caller's
            orders.deliver_order(bearer(&token, deliver.clone())).await,
        );
        let cancel = CancelOrderRequest {
            order_id: id.clone(),
            reason: a.clone(),
            idempotency_key: b.clone(),
            expected_version: v,
        };
        check(
            "CancelOrder",
            &cancel,
            false, // no such order of the caller's
            orders.cancel_order(bearer(&token, cancel.clone())).await,
        );
        let get = GetOrderRequest {
            order_id: id.clone(),
            min_position: n.min(0),
        };
        check(
            "GetOrder",
            &get,
            false, // no such order of the caller's
            orders.get_order(bearer(&token, get.clone())).await,
        );
        let history = GetOrderHistoryRequest {
            order_id: id.clone(),
        };
        check(
            "GetOrderHistory",
            &history,
            false, // no such order of the caller's
            orders
                .get_order_history(bearer(&token, history.clone()))
                .await,
        );
        let at = GetOrderAtRequest {
            order_id: id,
            point: match v % 3 {
                0 => None,
                1 => Some(Point::Version(n)),
                _ => Some(Point::At(prost_types::Timestamp {
                    seconds: n,
                    nanos: i32::try_from(v % 2_000_000_000).unwrap_or(-1),
                })),
            },
        };
        check(
            "GetOrderAt",
            &at,
            false, // no such order of the caller's
            orders.get_order_at(bearer(&token, at.clone())).await,
        );
    }
    for (status, size, page, user) in samples((small(), small(), text(), text())) {
        let list = ListOrdersRequest {
            status,
            page_size: size,
            page_token: page.clone(),
            min_position: 0,
        };
        check(
            "ListOrders",
            &list,
            (0..=100).contains(&list.page_size),
            orders.list_orders(bearer(&token, list.clone())).await,
        );
        let list = ListNotificationsRequest {
            user_id: user,
            page_size: size,
            page_token: page,
        };
        check(
            "ListNotifications",
            &list,
            (0..=100).contains(&list.page_size),
            notifications
                .list_notifications(bearer(&token, list.clone()))
                .await,
        );
    }
    stack.stop().await;
    Ok(())
}
