//! What leaves through JetStream: republishing and the trace context.

use super::*;

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
