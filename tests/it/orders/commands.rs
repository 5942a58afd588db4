//! The command path: concurrency, idempotent retries, snapshots.

use super::*;

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
    let order_id = uuid::Uuid::now_v7();
    let envelope = Envelope {
        order_id,
        owner: user,
        expected_version: None,
        context: &context,
        key: None,
    };
    let created = with_snapshots
        .create(&envelope, create_command(order_id, user)?)
        .await?;
    assert_eq!(created.order.id, Some(order_id));
    let mut last = created;
    for command in [
        order_domain::OrderCommand::Pay {
            payment_reference: order_domain::PaymentReference::parse("p-1")?,
            amount: order_domain::Amount::new(1400)?,
        },
        order_domain::OrderCommand::Ship {
            carrier: order_domain::Carrier::parse("UPS")?,
            tracking_number: order_domain::TrackingNumber::parse("1Z999")?,
        },
    ] {
        last = with_snapshots.execute(&envelope, command).await?;
    }
    let snapshot_version: i64 =
        sqlx::query_scalar("SELECT version FROM snapshots WHERE stream_id = $1")
            .bind(es::stream_id::<order_domain::Order>(order_id))
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
        .execute(&envelope, order_domain::OrderCommand::Deliver)
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
        .execute(&envelope, order_domain::OrderCommand::Deliver)
        .await
        .expect_err("a delivered order cannot be delivered again");
    assert!(refused.to_string().contains("delivered"), "{refused}");
    Ok(())
}

/// A valid `Create` of `order_id` for `user`.
fn create_command(
    order_id: uuid::Uuid,
    user: uuid::Uuid,
) -> anyhow::Result<order_domain::OrderCommand> {
    Ok(order_domain::OrderCommand::Create {
        order_id,
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
    })
}

/// Two replicas, each with its aggregate cache, over one store: a replica
/// whose cached order another replica has changed since decides on the
/// stored order, not on its cache; a retried key still gets the original
/// answer; the stream holds exactly the events that were accepted.
#[tokio::test]
async fn a_replica_with_a_stale_cache_decides_on_the_stored_order() -> anyhow::Result<()> {
    testkit::init_logging();
    let db = TestDb::create("stale_cache").await?;
    let pool = db.pool()?;
    platform::db::migrate(&pool, vec![es_postgres::migrator()], Duration::from_secs(5)).await?;
    let store = EventStore::new(pool.clone());
    let (a, b) = (
        OrderCommands::new(store.clone(), 50).with_cache(100),
        OrderCommands::new(store.clone(), 50).with_cache(100),
    );
    let user = uuid::Uuid::now_v7();
    let context = EventContext::new(user.to_string());
    let order_id = uuid::Uuid::now_v7();
    let envelope = |expected_version, key| Envelope {
        order_id,
        owner: user,
        expected_version,
        context: &context,
        key,
    };
    let pay = |reference: &str| -> anyhow::Result<order_domain::OrderCommand> {
        Ok(order_domain::OrderCommand::Pay {
            payment_reference: order_domain::PaymentReference::parse(reference)?,
            amount: order_domain::Amount::new(1400)?,
        })
    };
    let ship = order_domain::OrderCommand::Ship {
        carrier: order_domain::Carrier::parse("UPS")?,
        tracking_number: order_domain::TrackingNumber::parse("1Z999")?,
    };
    let key = es_postgres::IdempotencyKey {
        key: format!("{user}:pay-1"),
        fingerprint: "pay p-b 1400".to_owned(),
    };

    a.create(&envelope(None, None), create_command(order_id, user)?)
        .await?; // a caches version 1
    let paid = b.execute(&envelope(None, Some(&key)), pay("p-b")?).await?;
    assert_eq!(paid.order.version, 2);

    // A second order: a's cache allows the command, but the append at the
    // cached version conflicts; decided again on the stored (paid) order.
    let other = uuid::Uuid::now_v7();
    let on_other = |key| Envelope {
        order_id: other,
        owner: user,
        expected_version: None,
        context: &context,
        key,
    };
    a.create(&on_other(None), create_command(other, user)?)
        .await?;
    b.execute(&on_other(None), pay("p-other")?).await?;
    let cancel = order_domain::OrderCommand::Cancel {
        reason: order_domain::CancelReason::parse("changed my mind")?,
    };
    let cancelled = a.execute(&on_other(None), cancel).await?;
    assert_eq!(cancelled.order.version, 3, "after b's payment, not over it");
    assert_eq!(
        cancelled
            .order
            .payment_reference
            .as_ref()
            .map(|r| r.as_str()),
        Some("p-other")
    );

    // a's cache says "created": shipping would be refused there; the stored
    // order is paid, so it ships.
    let shipped = a.execute(&envelope(None, None), ship.clone()).await?;
    assert_eq!(shipped.order.version, 3);
    assert_eq!(
        shipped.order.payment_reference.as_ref().map(|r| r.as_str()),
        Some("p-b"),
        "decided on b's payment"
    );
    // An expected version checked against the store, not a stale cache.
    let refused = b
        .execute(
            &envelope(Some(2), None),
            order_domain::OrderCommand::Deliver,
        )
        .await
        .expect_err("the order is at version 3");
    assert!(
        matches!(
            refused,
            CommandError::WrongVersion {
                expected: 2,
                actual: 3
            }
        ),
        "{refused}"
    );
    // b's retry of its payment (same key) answers as the first time did.
    let retried = b.execute(&envelope(None, Some(&key)), pay("p-b")?).await?;
    assert_eq!(retried.order.version, 2, "the original answer");
    assert_eq!(retried.position, paid.position);
    // A second payment is refused by the stored state, from either replica.
    for replica in [&a, &b] {
        let again = replica
            .execute(&envelope(None, None), pay("p-x")?)
            .await
            .expect_err("paid already");
        assert!(matches!(again, CommandError::Rejected(_)), "{again}");
    }
    let delivered = b
        .execute(
            &envelope(Some(3), None),
            order_domain::OrderCommand::Deliver,
        )
        .await?;
    assert_eq!(delivered.order.version, 4);
    let types: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM events WHERE stream_id = $1 ORDER BY version")
            .bind(es::stream_id::<order_domain::Order>(order_id))
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        types,
        [
            "order.created",
            "order.paid",
            "order.shipped",
            "order.delivered"
        ]
    );
    Ok(())
}
