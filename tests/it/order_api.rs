//! Black-box tests of order-service's gRPC API (authenticated through a real
//! user-service).

use contracts::order::v1::{CreateOrderRequest, GetOrderRequest, OrderStatus};
use testkit::{TestStack, bearer};
use tonic::Code;

use crate::helpers::{assert_rejected, item, order};

#[tokio::test]
async fn order_calls_without_a_valid_token_are_unauthenticated() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let mut orders = stack.orders().await?;
    let request = order(vec![item("A", 1, 100)]);
    assert_rejected(
        orders.create_order(request.clone()).await,
        Code::Unauthenticated,
        None,
    );
    assert_rejected(
        orders
            .create_order(bearer("garbage", request.clone()))
            .await,
        Code::Unauthenticated,
        None,
    );
    assert_rejected(
        orders
            .get_order(bearer(
                "a.b.c",
                GetOrderRequest {
                    order_id: uuid::Uuid::new_v4().to_string(),
                    min_position: 0,
                },
            ))
            .await,
        Code::Unauthenticated,
        None,
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn invalid_orders_are_rejected_with_every_bad_field_named() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    assert_rejected(
        orders.create_order(bearer(&token, order(vec![]))).await,
        Code::InvalidArgument,
        Some("items"),
    );
    assert_rejected(
        orders
            .create_order(bearer(&token, order(vec![item("A", -1, 100)])))
            .await,
        Code::InvalidArgument,
        Some("items[0].quantity"),
    );
    let several = orders
        .create_order(bearer(
            &token,
            CreateOrderRequest {
                currency: "euro".to_owned(),
                ..order(vec![item("ok", 1, 1), item("", 0, -5)])
            },
        ))
        .await
        .expect_err("rejected");
    assert_eq!(
        crate::helpers::violated_fields(&several),
        [
            "currency",
            "items[1].sku",
            "items[1].quantity",
            "items[1].unit_price_minor"
        ]
    );
    assert_rejected(
        orders
            .get_order(bearer(
                &token,
                GetOrderRequest {
                    order_id: "nope".to_owned(),
                    min_position: 0,
                },
            ))
            .await,
        Code::InvalidArgument,
        Some("order_id"),
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_order_is_created_read_back_and_private_to_its_owner() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (user_id, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let created = orders
        .create_order(bearer(
            &token,
            order(vec![item("BOOK-1", 2, 1250), item("PEN-7", 3, 199)]),
        ))
        .await?
        .into_inner();
    let placed = created.order.expect("order");
    assert_eq!(placed.user_id, user_id);
    assert_eq!(placed.status(), OrderStatus::Created);
    assert_eq!(
        placed
            .total
            .as_ref()
            .map(|m| (m.currency.as_str(), m.amount_minor)),
        Some(("EUR", 3097))
    );
    assert_eq!(placed.version, 1);
    assert!(created.position > 0);

    let read = orders
        .get_order(bearer(
            &token,
            GetOrderRequest {
                order_id: placed.id.clone(),
                min_position: created.position,
            },
        ))
        .await?
        .into_inner()
        .order
        .expect("order");
    assert_eq!(read, placed);

    let (_, stranger) = stack.signed_up_user().await?;
    assert_rejected(
        orders
            .get_order(bearer(
                &stranger,
                GetOrderRequest {
                    order_id: placed.id.clone(),
                    min_position: created.position,
                },
            ))
            .await,
        Code::NotFound,
        None,
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_retried_create_with_the_same_idempotency_key_returns_the_original_order()
-> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let request = CreateOrderRequest {
        idempotency_key: "checkout-42".to_owned(),
        ..order(vec![item("A", 1, 500)])
    };
    let first = orders
        .create_order(bearer(&token, request.clone()))
        .await?
        .into_inner();
    let retry = orders
        .create_order(bearer(&token, request.clone()))
        .await?
        .into_inner();
    assert_eq!(retry.order, first.order);
    assert_eq!(retry.position, first.position);

    // The same key from another user is a different key.
    let (_, other) = stack.signed_up_user().await?;
    let theirs = orders
        .create_order(bearer(&other, request))
        .await?
        .into_inner();
    assert_ne!(theirs.order.map(|o| o.id), first.order.map(|o| o.id));

    let pool = stack.order_db.pool()?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    assert_eq!(events, 2, "the retry must not append");
    stack.stop().await;
    Ok(())
}
