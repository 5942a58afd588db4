//! Event-sourced orders through the public API and the event store:
//! lifecycle, rules, concurrency, idempotency, snapshots, read models and
//! their rebuild, time travel, upcasting of stored history, republishing.

use std::{collections::BTreeSet, time::Duration};

use contracts::order::v1::{
    CancelOrderRequest, DeliverOrderRequest, GetOrderAtRequest, GetOrderHistoryRequest,
    GetOrderRequest, ListOrdersRequest, Order, OrderStatus, PayOrderRequest, ShipOrderRequest,
    get_order_at_request::Point, order_service_client::OrderServiceClient,
};
use es::EventContext;
use es_postgres::EventStore;
use order_service::{
    commands::OrderCommands,
    history::{self, At},
    projections,
};
use testkit::{TestDb, TestStack, bearer, eventually};
use tonic::{Code, transport::Channel};

use crate::{
    order_api::{item, order},
    support::assert_rejected,
};

type Client = OrderServiceClient<Channel>;

async fn place(orders: &mut Client, token: &str) -> anyhow::Result<(Order, i64)> {
    let created = orders
        .create_order(bearer(
            token,
            order(vec![item("BOOK-1", 2, 1250), item("PEN-7", 1, 500)]),
        ))
        .await?
        .into_inner();
    Ok((created.order.expect("order"), created.position))
}

fn pay(order_id: &str, amount_minor: i64, key: &str) -> PayOrderRequest {
    PayOrderRequest {
        order_id: order_id.to_owned(),
        payment_reference: "pay_123".to_owned(),
        amount_minor,
        idempotency_key: key.to_owned(),
        expected_version: 0,
    }
}

fn ship(order_id: &str) -> ShipOrderRequest {
    ShipOrderRequest {
        order_id: order_id.to_owned(),
        carrier: "DHL".to_owned(),
        tracking_number: "JD0146000033".to_owned(),
        idempotency_key: String::new(),
        expected_version: 0,
    }
}

fn deliver(order_id: &str) -> DeliverOrderRequest {
    DeliverOrderRequest {
        order_id: order_id.to_owned(),
        idempotency_key: String::new(),
        expected_version: 0,
    }
}

fn cancel(order_id: &str) -> CancelOrderRequest {
    CancelOrderRequest {
        order_id: order_id.to_owned(),
        reason: "changed my mind".to_owned(),
        idempotency_key: String::new(),
        expected_version: 0,
    }
}

async fn read(
    orders: &mut Client,
    token: &str,
    order_id: &str,
    min_position: i64,
) -> anyhow::Result<Order> {
    Ok(orders
        .get_order(bearer(
            token,
            GetOrderRequest {
                order_id: order_id.to_owned(),
                min_position,
            },
        ))
        .await?
        .into_inner()
        .order
        .expect("order"))
}

fn list(
    status: OrderStatus,
    page_size: i32,
    page_token: &str,
    min_position: i64,
) -> ListOrdersRequest {
    ListOrdersRequest {
        status: status.into(),
        page_size,
        page_token: page_token.to_owned(),
        min_position,
    }
}

#[tokio::test]
async fn an_order_goes_through_its_whole_lifecycle_and_every_query_sees_it() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let (placed, position) = place(&mut orders, &token).await?;
    let id = placed.id.clone();
    assert_eq!(
        read(&mut orders, &token, &id, position).await?.status(),
        OrderStatus::Created
    );

    let paid = orders
        .pay_order(bearer(&token, pay(&id, 3000, "")))
        .await?
        .into_inner();
    let order = read(&mut orders, &token, &id, paid.position).await?;
    assert_eq!(
        (
            order.status(),
            order.payment_reference.as_str(),
            order.version
        ),
        (OrderStatus::Paid, "pay_123", 2)
    );
    assert_eq!(Some(order), paid.order);

    let shipped = orders
        .ship_order(bearer(&token, ship(&id)))
        .await?
        .into_inner();
    let order = read(&mut orders, &token, &id, shipped.position).await?;
    assert_eq!(
        (order.status(), order.carrier.as_str()),
        (OrderStatus::Shipped, "DHL")
    );

    let delivered = orders
        .deliver_order(bearer(&token, deliver(&id)))
        .await?
        .into_inner();
    let order = read(&mut orders, &token, &id, delivered.position).await?;
    assert_eq!((order.status(), order.version), (OrderStatus::Delivered, 4));
    assert_eq!(
        Some(order.clone()),
        delivered.order,
        "command result equals the read model"
    );

    let history = orders
        .get_order_history(bearer(
            &token,
            GetOrderHistoryRequest {
                order_id: id.clone(),
            },
        ))
        .await?
        .into_inner()
        .events;
    let types: Vec<_> = history.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "order.created",
            "order.paid",
            "order.shipped",
            "order.delivered"
        ]
    );
    assert!(
        history.iter().all(|e| e.actor == user_id
            && !e.correlation_id.is_empty()
            && !e.causation_id.is_empty())
    );
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );

    let delivered_list = orders
        .list_orders(bearer(
            &token,
            list(OrderStatus::Delivered, 10, "", delivered.position),
        ))
        .await?
        .into_inner();
    assert_eq!(
        delivered_list
            .orders
            .iter()
            .map(|o| o.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert_eq!(delivered_list.orders[0].item_count, 3);
    let created_list = orders
        .list_orders(bearer(&token, list(OrderStatus::Created, 10, "", 0)))
        .await?
        .into_inner();
    assert!(created_list.orders.is_empty());

    // Every event reached JetStream once, under its own subject.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    eventually(
        "four order events in JetStream",
        Duration::from_secs(10),
        || async {
            let info = js.get_stream("ORDERS").await.ok()?.get_info().await.ok()?;
            (info.state.messages == 4).then_some(())
        },
    )
    .await?;
    let stream = js.get_stream("ORDERS").await?;
    for subject in [
        "order.created",
        "order.paid",
        "order.shipped",
        "order.delivered",
    ] {
        stream.get_last_raw_message_by_subject(subject).await?;
    }
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn lifecycle_rules_are_enforced_with_the_current_status_named() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let (placed, _) = place(&mut orders, &token).await?;
    let id = placed.id.clone();

    let early_ship = orders
        .ship_order(bearer(&token, ship(&id)))
        .await
        .expect_err("refused");
    assert_eq!(early_ship.code(), Code::FailedPrecondition);
    assert!(
        early_ship.message().contains("created"),
        "{}",
        early_ship.message()
    );
    assert_rejected(
        orders.pay_order(bearer(&token, pay(&id, 2999, ""))).await,
        Code::InvalidArgument,
        Some("amount_minor"),
    );
    assert_rejected(
        orders.deliver_order(bearer(&token, deliver(&id))).await,
        Code::FailedPrecondition,
        None,
    );
    let stale = PayOrderRequest {
        expected_version: 7,
        ..pay(&id, 3000, "")
    };
    assert_rejected(
        orders.pay_order(bearer(&token, stale)).await,
        Code::Aborted,
        None,
    );

    orders.pay_order(bearer(&token, pay(&id, 3000, ""))).await?;
    orders.ship_order(bearer(&token, ship(&id))).await?;
    let late_cancel = orders
        .cancel_order(bearer(&token, cancel(&id)))
        .await
        .expect_err("refused");
    assert_eq!(late_cancel.code(), Code::FailedPrecondition);
    assert!(
        late_cancel.message().contains("shipped"),
        "{}",
        late_cancel.message()
    );

    let missing = uuid::Uuid::new_v4().to_string();
    assert_rejected(
        orders.pay_order(bearer(&token, pay(&missing, 1, ""))).await,
        Code::NotFound,
        None,
    );
    assert_rejected(
        orders.pay_order(bearer(&token, pay("nope", 1, ""))).await,
        Code::InvalidArgument,
        Some("order_id"),
    );
    let blank = ShipOrderRequest {
        carrier: " ".to_owned(),
        tracking_number: String::new(),
        ..ship(&id)
    };
    let status = orders
        .ship_order(bearer(&token, blank))
        .await
        .expect_err("refused");
    assert_eq!(
        crate::support::violated_fields(&status),
        ["carrier", "tracking_number"]
    );
    let no_reason = CancelOrderRequest {
        reason: String::new(),
        ..cancel(&id)
    };
    assert_rejected(
        orders.cancel_order(bearer(&token, no_reason)).await,
        Code::InvalidArgument,
        Some("reason"),
    );

    // Someone else's order does not exist for them.
    let (_, stranger) = stack.signed_up_user().await?;
    assert_rejected(
        orders.deliver_order(bearer(&stranger, deliver(&id))).await,
        Code::NotFound,
        None,
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_commands_on_one_order_let_exactly_one_win() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let (placed, _) = place(&mut orders, &token).await?;
    let attempts = (0..16).map(|i| {
        let mut client = orders.clone();
        let request = bearer(&token, pay(&placed.id, 3000, &format!("attempt-{i}")));
        tokio::spawn(async move {
            client
                .pay_order(request)
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        })
    });
    let mut won = 0;
    for attempt in attempts {
        match attempt.await? {
            Ok(()) => won += 1,
            Err(Code::Aborted | Code::FailedPrecondition) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one payment wins");
    let pool = stack.order_db.pool()?;
    let events: Vec<(i64, String)> = sqlx::query_as(
        "SELECT version, event_type FROM events WHERE stream_id = $1 ORDER BY version",
    )
    .bind(format!("order-{}", placed.id))
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        events,
        [
            (1, "order.created".to_owned()),
            (2, "order.paid".to_owned())
        ]
    );

    // The race itself, made deterministic: two writers at the same expected version.
    let store = EventStore::new(pool);
    let context = EventContext::new("test");
    let event = || es_postgres::NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "test.raced",
        schema_version: 1,
        payload: serde_json::json!({}),
        occurred_at: es_postgres::now(),
    };
    let (first, second) = ([event()], [event()]);
    let (a, b) = tokio::join!(
        store.append("race-1", 0, &first, &context, None, None),
        store.append("race-1", 0, &second, &context, None, None),
    );
    let conflicts = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(es_postgres::AppendError::Conflict { .. })))
        .count();
    assert_eq!((a.is_ok() as u8 + b.is_ok() as u8, conflicts), (1, 1));
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_retried_command_returns_the_original_result() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let (placed, _) = place(&mut orders, &token).await?;
    let first = orders
        .pay_order(bearer(&token, pay(&placed.id, 3000, "pay-once")))
        .await?
        .into_inner();
    orders.ship_order(bearer(&token, ship(&placed.id))).await?;
    let retry = orders
        .pay_order(bearer(&token, pay(&placed.id, 3000, "pay-once")))
        .await?
        .into_inner();
    assert_eq!(retry.position, first.position);
    assert_eq!(
        retry.order.as_ref().map(|o| (o.status(), o.version)),
        Some((OrderStatus::Paid, 2))
    );

    let (other, _) = place(&mut orders, &token).await?;
    assert_rejected(
        orders
            .pay_order(bearer(&token, pay(&other.id, 3000, "pay-once")))
            .await,
        Code::InvalidArgument,
        Some("idempotency_key"),
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(format!("order-{}", placed.id))
        .fetch_one(&stack.order_db.pool()?)
        .await?;
    assert_eq!(
        count, 3,
        "created, paid, shipped: the retry appended nothing"
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn snapshots_give_the_same_state_as_a_full_replay() -> anyhow::Result<()> {
    testkit::init_logging();
    let db = TestDb::create("snapshots").await?;
    let pool = db.pool()?;
    platform::db::migrate(&pool, vec![es_postgres::migrator()], Duration::from_secs(5)).await?;
    let store = EventStore::new(pool.clone());
    let with_snapshots = OrderCommands::new(store.clone(), 1);
    let user = uuid::Uuid::now_v7();
    let context = EventContext::new(user.to_string());
    let created = with_snapshots
        .create(
            order_domain::OrderCommand::Create {
                order_id: uuid::Uuid::now_v7(),
                user_id: user,
                currency: order_domain::Currency::parse("EUR")?,
                lines: vec![order_domain::OrderLine {
                    sku: order_domain::Sku::parse("A")?,
                    quantity: order_domain::Quantity::new(2)?,
                    unit_price: order_domain::UnitPrice::new(700)?,
                }],
                shipping_address: order_domain::ShippingAddress {
                    name: order_domain::AddressLine::parse("Ada")?,
                    line1: order_domain::AddressLine::parse("1 Main St")?,
                    line2: None,
                    city: order_domain::AddressLine::parse("Berlin")?,
                    postal_code: order_domain::AddressLine::parse("10115")?,
                    country: order_domain::CountryCode::parse("DE")?,
                },
            },
            &context,
            None,
        )
        .await?;
    let order_id = created.order.id.expect("id");
    let mut last = created;
    for command in [
        order_domain::OrderCommand::Pay {
            payment_reference: order_domain::PaymentReference::parse("p-1")?,
            amount_minor: 1400,
        },
        order_domain::OrderCommand::Ship {
            carrier: order_domain::Carrier::parse("UPS")?,
            tracking_number: order_domain::TrackingNumber::parse("1Z999")?,
        },
    ] {
        last = with_snapshots
            .execute(order_id, user, command, None, &context, None)
            .await?;
    }
    let snapshot_version: i64 =
        sqlx::query_scalar("SELECT version FROM snapshots WHERE stream_id = $1")
            .bind(format!("order-{order_id}"))
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        snapshot_version, 3,
        "a snapshot was written with every command"
    );
    let (replayed, _) = history::state_at(&store, order_id, At::Version(3))
        .await?
        .expect("exists");
    assert_eq!(last.order, replayed, "snapshot path and full replay agree");

    // Loading through the snapshot decides exactly as a replay would.
    let delivered = with_snapshots
        .execute(
            order_id,
            user,
            order_domain::OrderCommand::Deliver,
            None,
            &context,
            None,
        )
        .await?;
    let (replayed, _) = history::state_at(&store, order_id, At::Version(4))
        .await?
        .expect("exists");
    assert_eq!(delivered.order, replayed);

    // A snapshot that no longer fits the aggregate is ignored, not trusted.
    sqlx::query("UPDATE snapshots SET state = '{\"nonsense\": true}'")
        .execute(&pool)
        .await?;
    let refused = OrderCommands::new(store.clone(), 1000)
        .execute(
            order_id,
            user,
            order_domain::OrderCommand::Deliver,
            None,
            &context,
            None,
        )
        .await
        .expect_err("a delivered order cannot be delivered again");
    assert!(refused.to_string().contains("delivered"), "{refused}");
    Ok(())
}

#[tokio::test]
async fn list_orders_pages_by_cursor_and_filters_by_status() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let mut ids = Vec::new();
    let mut position = 0;
    for i in 0..5 {
        let (placed, p) = place(&mut orders, &token).await?;
        position = p;
        if i % 2 == 0 {
            position = orders
                .pay_order(bearer(&token, pay(&placed.id, 3000, "")))
                .await?
                .into_inner()
                .position;
        }
        ids.push(placed.id);
    }
    let mut seen = Vec::new();
    let mut token_page = String::new();
    loop {
        let page = orders
            .list_orders(bearer(
                &token,
                list(OrderStatus::Unspecified, 2, &token_page, position),
            ))
            .await?
            .into_inner();
        assert!(page.orders.len() <= 2);
        seen.extend(page.orders.into_iter().map(|o| o.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token_page = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");
    let paid = orders
        .list_orders(bearer(&token, list(OrderStatus::Paid, 10, "", position)))
        .await?
        .into_inner();
    assert_eq!(paid.orders.len(), 3);
    assert_rejected(
        orders
            .list_orders(bearer(&token, list(OrderStatus::Paid, 500, "", 0)))
            .await,
        Code::InvalidArgument,
        Some("page_size"),
    );
    assert_rejected(
        orders
            .list_orders(bearer(&token, list(OrderStatus::Paid, 10, "garbage", 0)))
            .await,
        Code::InvalidArgument,
        Some("page_token"),
    );
    assert_rejected(
        orders
            .list_orders(bearer(&token, list(OrderStatus::Paid, 10, "", i64::MAX)))
            .await,
        Code::InvalidArgument,
        Some("min_position"),
    );
    let (_, stranger) = stack.signed_up_user().await?;
    let theirs = orders
        .list_orders(bearer(&stranger, list(OrderStatus::Unspecified, 10, "", 0)))
        .await?
        .into_inner();
    assert!(
        theirs.orders.is_empty(),
        "a user sees only their own orders"
    );
    stack.stop().await;
    Ok(())
}

/// Rows of the live generation of both read models, without the generation.
async fn read_models(pool: &sqlx::PgPool) -> anyhow::Result<BTreeSet<String>> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT 'summary ' || (to_jsonb(s) - 'generation')::text FROM order_summary s \
           WHERE generation = (SELECT live_generation FROM projections WHERE name = 'order_summary') \
         UNION ALL \
         SELECT 'by_user ' || (to_jsonb(u) - 'generation')::text FROM orders_by_user u \
           WHERE generation = (SELECT live_generation FROM projections WHERE name = 'orders_by_user')",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

#[tokio::test]
async fn a_rebuilt_read_model_equals_the_live_one_and_queries_answer_during_the_rebuild()
-> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let mut last = (String::new(), 0);
    for i in 0..40 {
        let (placed, mut position) = place(&mut orders, &token).await?;
        if i % 3 != 0 {
            position = orders
                .pay_order(bearer(&token, pay(&placed.id, 3000, "")))
                .await?
                .into_inner()
                .position;
        }
        if i % 5 == 0 {
            position = orders
                .cancel_order(bearer(&token, cancel(&placed.id)))
                .await?
                .into_inner()
                .position;
        }
        last = (placed.id, position);
    }
    read(&mut orders, &token, &last.0, last.1).await?;
    orders
        .list_orders(bearer(
            &token,
            list(OrderStatus::Unspecified, 1, "", last.1),
        ))
        .await?;
    let pool = stack.order_db.pool()?;
    let before = read_models(&pool).await?;
    assert_eq!(before.len(), 80);

    // Keep querying while the rebuild runs; every answer must succeed.
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (mut orders, token, id, stop) =
            (orders.clone(), token.clone(), last.0.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answered = 0;
            while !stop.is_cancelled() {
                read(&mut orders, &token, &id, 0)
                    .await
                    .expect("GetOrder answers during the rebuild");
                let page = orders
                    .list_orders(bearer(&token, list(OrderStatus::Unspecified, 100, "", 0)))
                    .await
                    .expect("ListOrders answers during the rebuild");
                assert_eq!(page.into_inner().orders.len(), 40);
                answered += 1;
            }
            answered
        })
    };
    for name in projections::ALL {
        assert_eq!(
            es_postgres::projection::start_rebuild(&pool, name).await?,
            2
        );
    }
    eventually(
        "both rebuilt generations to go live",
        Duration::from_secs(30),
        || async {
            let mut done = true;
            for name in projections::ALL {
                let status = es_postgres::projection::status(&pool, name).await.ok()??;
                done &= status.live_generation == 2 && status.building_generation.is_none();
            }
            done.then_some(())
        },
    )
    .await?;
    stop.cancel();
    assert!(reader.await? > 0);
    assert_eq!(
        read_models(&pool).await?,
        before,
        "rebuilt rows equal the live ones, row for row"
    );
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM order_summary WHERE generation = 1) + \
                (SELECT count(*) FROM orders_by_user WHERE generation = 1)",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(leftovers, 0, "the retired generation is deleted");

    // The new generation keeps following new events.
    let (placed, position) = place(&mut orders, &token).await?;
    assert_eq!(
        read(&mut orders, &token, &placed.id, position).await?.id,
        placed.id
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn time_travel_matches_a_replay_of_the_first_n_events() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let (placed, _) = place(&mut orders, &token).await?;
    let id = placed.id.clone();
    orders.pay_order(bearer(&token, pay(&id, 3000, ""))).await?;
    orders.cancel_order(bearer(&token, cancel(&id))).await?;

    let at = |point: Point| GetOrderAtRequest {
        order_id: id.clone(),
        point: Some(point),
    };
    let store = EventStore::new(stack.order_db.pool()?);
    let order_id = uuid::Uuid::parse_str(&id)?;
    let history = history::trail(&store, order_id, None).await?;
    for version in 1..=3_i64 {
        let then = orders
            .get_order_at(bearer(&token, at(Point::Version(version))))
            .await?
            .into_inner()
            .order
            .expect("order");
        let prefix = &history[..usize::try_from(version)?];
        let replayed =
            <order_domain::Order as es::Aggregate>::replay(prefix.iter().map(|e| &e.event));
        let times = (
            prefix[0].recorded.occurred_at,
            prefix[prefix.len() - 1].recorded.occurred_at,
        );
        assert_eq!(
            then,
            order_service::proto::order_to_proto(&replayed, times),
            "version {version}"
        );
    }
    let paid_at = history[1].recorded.occurred_at;
    let then = orders
        .get_order_at(bearer(&token, at(Point::At(contracts::timestamp(paid_at)))))
        .await?
        .into_inner()
        .order
        .expect("order");
    assert_eq!((then.status(), then.version), (OrderStatus::Paid, 2));
    let before = history[0].recorded.occurred_at - chrono::Duration::seconds(1);
    assert_rejected(
        orders
            .get_order_at(bearer(&token, at(Point::At(contracts::timestamp(before)))))
            .await,
        Code::NotFound,
        None,
    );
    assert_rejected(
        orders
            .get_order_at(bearer(
                &token,
                GetOrderAtRequest {
                    order_id: id.clone(),
                    point: None,
                },
            ))
            .await,
        Code::InvalidArgument,
        Some("point"),
    );
    assert_rejected(
        orders
            .get_order_at(bearer(&token, at(Point::Version(0))))
            .await,
        Code::InvalidArgument,
        Some("version"),
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_stored_v1_event_is_upcast_for_every_reader() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let order_id = uuid::Uuid::now_v7();
    // Exactly what the first release stored: schema v1, no shipping address.
    let payload = serde_json::json!({
        "type": "created", "order_id": order_id, "user_id": user_id, "currency": "EUR",
        "lines": [{"sku": "BOOK-DDIA", "quantity": 1, "unit_price": 3999}], "total_minor": 3999
    });
    let pool = stack.order_db.pool()?;
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_id, stream_id, version, event_type, schema_version, payload, occurred_at, \
         correlation_id, causation_id, actor) VALUES ($1, $2, 1, 'order.created', 1, $3, now(), $1, $1, $4) \
         RETURNING position",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(format!("order-{order_id}"))
    .bind(&payload)
    .bind(&user_id)
    .fetch_one(&pool)
    .await?;
    let mut orders = stack.orders().await?;
    let order = read(&mut orders, &token, &order_id.to_string(), position).await?;
    assert_eq!(
        (order.status(), order.shipping_address),
        (OrderStatus::Created, None)
    );
    let history = orders
        .get_order_history(bearer(
            &token,
            GetOrderHistoryRequest {
                order_id: order_id.to_string(),
            },
        ))
        .await?
        .into_inner()
        .events;
    assert_eq!(history[0].schema_version, 1);
    assert!(
        history[0]
            .payload_json
            .contains("\"shipping_address\":null"),
        "{}",
        history[0].payload_json
    );
    orders
        .pay_order(bearer(&token, pay(&order_id.to_string(), 3999, "")))
        .await?;
    let status = orders
        .ship_order(bearer(&token, ship(&order_id.to_string())))
        .await
        .expect_err("no address");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("shipping address"),
        "{}",
        status.message()
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn republishing_restores_a_stream_that_jetstream_lost() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    for _ in 0..3 {
        let (placed, _) = place(&mut orders, &token).await?;
        orders
            .pay_order(bearer(&token, pay(&placed.id, 3000, "")))
            .await?;
    }
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    let count = || async {
        match js.get_stream("ORDERS").await {
            Ok(stream) => stream
                .get_info()
                .await
                .map(|i| i.state.messages)
                .unwrap_or(0),
            Err(_) => 0,
        }
    };
    eventually("six events published", Duration::from_secs(10), || async {
        (count().await == 6).then_some(())
    })
    .await?;
    js.delete_stream("ORDERS").await?;
    messaging::ensure_stream(
        &js,
        messaging::ORDERS_STREAM,
        &messaging::StreamLimits::default(),
    )
    .await?;
    assert_eq!(count().await, 0, "JetStream lost everything");

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&stack.order_db.url).await?;
    let from: i64 = sqlx::query_scalar("SELECT min(position) FROM events")
        .fetch_one(&mut conn)
        .await?;
    let mapper = order_service::integration::OrderEvents;
    assert_eq!(
        es_postgres::relay::republish(&mut conn, &js, &mapper, from).await?,
        6
    );
    assert_eq!(count().await, 6);
    // Again: JetStream's dedup window absorbs every repeat.
    es_postgres::relay::republish(&mut conn, &js, &mapper, from).await?;
    assert_eq!(count().await, 6);
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_callers_trace_context_is_stored_with_the_event_and_sent_with_the_message()
-> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = bearer(&token, order(vec![item("A", 1, 100)]));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse()?);
    let placed = orders
        .create_order(request)
        .await?
        .into_inner()
        .order
        .expect("order");
    let history = orders
        .get_order_history(bearer(
            &token,
            GetOrderHistoryRequest {
                order_id: placed.id.clone(),
            },
        ))
        .await?
        .into_inner()
        .events;
    assert_eq!(history[0].traceparent, traceparent);

    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    let message = eventually(
        "the published order.created",
        Duration::from_secs(10),
        || async {
            js.get_stream("ORDERS")
                .await
                .ok()?
                .get_last_raw_message_by_subject("order.created")
                .await
                .ok()
        },
    )
    .await?;
    assert_eq!(
        message
            .headers
            .get("traceparent")
            .map(ToString::to_string)
            .as_deref(),
        Some(traceparent)
    );

    // A malformed header is ignored, not stored.
    let mut request = bearer(&token, order(vec![item("A", 1, 100)]));
    request
        .metadata_mut()
        .insert("traceparent", "00-nonsense".parse()?);
    let placed = orders
        .create_order(request)
        .await?
        .into_inner()
        .order
        .expect("order");
    let history = orders
        .get_order_history(bearer(
            &token,
            GetOrderHistoryRequest {
                order_id: placed.id,
            },
        ))
        .await?
        .into_inner()
        .events;
    assert_eq!(history[0].traceparent, "");
    stack.stop().await;
    Ok(())
}
