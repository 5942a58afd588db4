//! The read models: paging and filters, and a rebuild beside the live generation.

use super::*;

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
