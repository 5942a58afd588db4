//! Group commit (`es_postgres::group`) with one writer, as order-service
//! runs it: commands that queue up go in one transaction, and each caller
//! still gets the answer its own command would have had alone.

use std::time::Duration;

use crate::helpers::new_event;
use es::EventContext;
use es_postgres::{AppendError, EventStore, IdempotencyKey};
use testkit::TestDb;

fn key(name: &str) -> IdempotencyKey {
    IdempotencyKey {
        key: name.to_owned(),
        fingerprint: "same".to_owned(),
    }
}

/// 64 appends at once through one writer: 32 to streams of their own, 8
/// pairs racing for the first version of one stream, 8 pairs using one
/// idempotency key on different streams. Every lone append lands, each race
/// has exactly one winner and one conflict, each key one append and one
/// duplicate; the lone appends shared transactions (they were grouped).
#[tokio::test]
async fn queued_appends_commit_together_and_each_gets_its_own_answer() -> anyhow::Result<()> {
    testkit::init_logging();
    let db = TestDb::create("group_commit").await?;
    let pool = db.pool()?;
    platform::db::migrate(&pool, vec![es_postgres::migrator()], Duration::from_secs(5)).await?;
    let store = EventStore::new(pool.clone()).with_group_commit(1, 128);
    let context = EventContext::new("test");

    let append = |stream: String, key: Option<IdempotencyKey>| {
        let (store, context) = (store.clone(), context.clone());
        tokio::spawn(async move {
            store
                .append(&stream, 0, &[new_event()], &context, key.as_ref(), None)
                .await
        })
    };
    let lone: Vec<_> = (0..32).map(|i| append(format!("lone-{i}"), None)).collect();
    let races: Vec<_> = (0..8)
        .map(|j| {
            [
                append(format!("race-{j}"), None),
                append(format!("race-{j}"), None),
            ]
        })
        .collect();
    let keyed: Vec<_> = (0..8)
        .map(|j| {
            [
                append(format!("keyed-{j}-a"), Some(key(&format!("key-{j}")))),
                append(format!("keyed-{j}-b"), Some(key(&format!("key-{j}")))),
            ]
        })
        .collect();

    let mut positions = std::collections::HashSet::new();
    for task in lone {
        let appended = task.await??;
        assert_eq!(appended.version, 1);
        assert!(
            positions.insert(appended.position),
            "a position answered twice"
        );
    }
    for [a, b] in races {
        let (a, b) = (a.await?, b.await?);
        let conflicts = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Err(AppendError::Conflict { .. })))
            .count();
        assert_eq!(conflicts, 1, "one winner, one conflict: {a:?} {b:?}");
        assert!(a.is_ok() || b.is_ok());
    }
    for [a, b] in keyed {
        let (a, b) = (a.await?, b.await?);
        let duplicates = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Err(AppendError::DuplicateKey)))
            .count();
        assert_eq!(duplicates, 1, "one append, one duplicate key: {a:?} {b:?}");
        assert!(a.is_ok() || b.is_ok());
    }

    let (events, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT tx_id) FROM events")
            .fetch_one(&pool)
            .await?;
    assert_eq!(events, 32 + 8 + 8, "exactly the winners' events are stored");
    let (lone_events, lone_transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT tx_id) FROM events WHERE stream_id LIKE 'lone-%'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(lone_events, 32);
    assert!(
        lone_transactions < lone_events,
        "queued appends were committed together ({lone_transactions} transactions for {lone_events}; {transactions} in all)"
    );
    Ok(())
}

/// Three appends queued behind a busy writer, in this order: r1 on stream A
/// with key K (it conflicts: A is already at version 1), r2 on stream B with
/// key K, r3 on stream B with key K2. In queue order r1 fails, so r2 gets K
/// and B's first version, and r3 conflicts. Committed out of order (r3
/// with r1, before r2), r3 would win B and r2 conflict.
#[tokio::test]
async fn a_batch_split_by_a_stream_or_key_answers_in_queue_order() -> anyhow::Result<()> {
    testkit::init_logging();
    let db = TestDb::create("group_order").await?;
    let pool = db.pool()?;
    platform::db::migrate(&pool, vec![es_postgres::migrator()], Duration::from_secs(5)).await?;
    let store = EventStore::new(pool.clone()).with_group_commit(1, 128);
    let context = EventContext::new("test");
    store
        .append("stream-a", 0, &[new_event()], &context, None, None)
        .await?;

    // The writer is held on r0 until `blocker` ends: r0 waits for the
    // uncommitted first version of its stream.
    let mut blocker = pool.begin().await?;
    es_postgres::store::append(
        &mut *blocker,
        "blocked",
        0,
        &[new_event()],
        &context,
        None,
        None,
    )
    .await?;
    let append = |stream: &'static str, key: Option<IdempotencyKey>| {
        let (store, context) = (store.clone(), context.clone());
        tokio::spawn(async move {
            store
                .append(stream, 0, &[new_event()], &context, key.as_ref(), None)
                .await
        })
    };
    let r0 = append("blocked", None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r1 = append("stream-a", Some(key("k")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r2 = append("stream-b", Some(key("k")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r3 = append("stream-b", Some(key("k2")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    blocker.commit().await?;

    assert!(matches!(r0.await?, Err(AppendError::Conflict { .. })));
    let (r1, r2, r3) = (r1.await?, r2.await?, r3.await?);
    assert!(
        matches!(r1, Err(AppendError::Conflict { .. })),
        "r1: {r1:?}"
    );
    assert!(r2.is_ok(), "r2 is next on stream B and key k: {r2:?}");
    assert!(
        matches!(r3, Err(AppendError::Conflict { .. })),
        "r3 comes after r2 on B: {r3:?}"
    );
    Ok(())
}
