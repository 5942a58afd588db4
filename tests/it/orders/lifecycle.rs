//! The lifecycle through the public API, and its rules with the current status named.

use super::*;

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
        crate::helpers::violated_fields(&status),
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
