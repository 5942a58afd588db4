//! Stored history: time travel and upcasting of old event versions.

use super::*;

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
