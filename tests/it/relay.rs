//! The outbox relay against real Postgres and nats-server: the gap test from
//! the architecture brief, and restarts that lose and duplicate nothing.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::helpers::new_event;
use async_nats::jetstream;
use es::{EventContext, RecordedEvent};
use es_postgres::{IntegrationMapper, NewEvent, Relay, RelayConfig, relay::MapError};
use futures::StreamExt as _;
use messaging::{OutboundMessage, StreamSpec};
use testkit::{NatsServer, TestDb, eventually};
use tokio_util::sync::CancellationToken;

const GAP_STREAM: StreamSpec = StreamSpec {
    name: "GAPTEST",
    subjects: &["gap.>"],
};

/// Publishes every stored event as `gap.event` with its id as payload; while
/// `refuse` names a stream, events of that stream cannot be mapped (which
/// stops the relay there).
#[derive(Clone, Default)]
struct Everything {
    refuse: Arc<Mutex<Option<String>>>,
    /// Slows mapping so a test can interrupt the relay part-way.
    delay: Duration,
    /// While it names a stream, its events go to a subject no stream
    /// takes: JetStream refuses that one publish, the rest of the batch lands.
    misroute: Arc<Mutex<Option<String>>>,
    /// How many times an event was refused (the relay retried it).
    refusals: Arc<std::sync::atomic::AtomicUsize>,
}

impl IntegrationMapper for Everything {
    fn map(&self, event: &RecordedEvent) -> Result<Option<OutboundMessage>, MapError> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if self.refuse.lock().expect("lock").as_deref() == Some(event.stream_id.as_str()) {
            self.refusals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(MapError {
                event_id: event.event_id,
                event_type: event.event_type.clone(),
                reason: "refused by the test".to_owned(),
            });
        }
        let misrouted =
            self.misroute.lock().expect("lock").as_deref() == Some(event.stream_id.as_str());
        Ok(Some(OutboundMessage {
            subject: if misrouted {
                "nowhere.event"
            } else {
                "gap.event"
            }
            .to_owned(),
            message_id: event.event_id.to_string(),
            headers: vec![],
            payload: event.event_id.to_string().into(),
        }))
    }
}

struct Setup {
    db: TestDb,
    pool: sqlx::PgPool,
    _nats: NatsServer,
    js: jetstream::Context,
}

async fn setup() -> anyhow::Result<Setup> {
    testkit::init_logging();
    let db = TestDb::create("relay").await?;
    let pool = db.pool()?;
    platform::db::migrate(&pool, vec![es_postgres::migrator()], Duration::from_secs(5)).await?;
    let nats = NatsServer::start().await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    messaging::ensure_stream(&js, GAP_STREAM, &messaging::StreamLimits::default()).await?;
    Ok(Setup {
        db,
        pool,
        _nats: nats,
        js,
    })
}

fn start_relay(
    setup: &Setup,
    mapper: Everything,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let config = RelayConfig {
        tail: es_postgres::tail::TailConfig {
            poll_interval: Duration::from_millis(100),
            retry_delay: Duration::from_millis(100),
            // Not a multiple of the 25-event streams the tests write: an event
            // the relay cannot map lands mid-batch, and what precedes it in
            // its batch must still be published.
            batch_size: 64,
            ..es_postgres::tail::TailConfig::default()
        },
        ..RelayConfig::new("gap-test")
    };
    let relay = Relay::new(setup.db.url.clone(), setup.js.clone(), mapper, config);
    (shutdown.clone(), tokio::spawn(relay.run(shutdown)))
}

/// Every payload in the stream, in stream order.
async fn published(js: &jetstream::Context) -> anyhow::Result<Vec<String>> {
    let stream = js.get_stream(GAP_STREAM.name).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let count = stream.get_info().await?.state.messages;
    let mut out = Vec::new();
    if count == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .fetch()
        .max_messages(usize::try_from(count)?)
        .messages()
        .await?;
    while let Some(message) = messages.next().await {
        out.push(String::from_utf8(
            message.map_err(|e| anyhow::anyhow!(e))?.payload.to_vec(),
        )?);
    }
    Ok(out)
}

async fn stream_count(js: &jetstream::Context) -> u64 {
    match js.get_stream(GAP_STREAM.name).await {
        Ok(stream) => stream
            .get_info()
            .await
            .map(|i| i.state.messages)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until the relay's checkpoint is past every event: from then on it
/// has nothing left to publish, so counting the stream is final (a positive
/// signal instead of a settle-sleep before an absence check).
async fn caught_up(setup: &Setup) -> anyhow::Result<()> {
    eventually(
        "the relay's checkpoint past every event",
        Duration::from_secs(30),
        || async {
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events e, outbox_checkpoints c \
                 WHERE c.name = 'gap-test' AND (e.tx_id, e.position) > (c.tx_id, c.position)",
            )
            .fetch_one(&setup.pool)
            .await
            .ok()?;
            let checkpointed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox_checkpoints WHERE name = 'gap-test'",
            )
            .fetch_one(&setup.pool)
            .await
            .ok()?;
            (checkpointed == 1 && behind == 0).then_some(())
        },
    )
    .await
}

async fn all_event_ids(pool: &sqlx::PgPool) -> anyhow::Result<HashSet<String>> {
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM events")
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().map(|id| id.to_string()).collect())
}

/// 16 concurrent appenders commit while one transaction, which inserted
/// first, stays open for 2 s. A naive `position > last` cursor read during
/// the hold moves past the slow event's position and never sees it; the
/// relay's `(tx_id, position)` cursor below the snapshot horizon publishes
/// every event exactly once, the late one included.
#[tokio::test]
async fn a_transaction_that_commits_late_is_never_skipped() -> anyhow::Result<()> {
    let setup = setup().await?;
    let (shutdown, relay) = start_relay(&setup, Everything::default());
    let context = EventContext::new("test");

    let mut slow = setup.pool.begin().await?;
    let late_event = new_event();
    let late = es_postgres::store::append(
        &mut *slow,
        "slow-1",
        0,
        std::slice::from_ref(&late_event),
        &context,
        None,
        None,
    )
    .await?;

    let appenders = (0..16).map(|i| {
        let store = es_postgres::EventStore::new(setup.pool.clone());
        let context = context.clone();
        tokio::spawn(async move {
            for version in 0..5 {
                store
                    .append(
                        &format!("fast-{i}"),
                        version,
                        &[new_event()],
                        &context,
                        None,
                        None,
                    )
                    .await
                    .expect("append");
            }
        })
    });
    for appender in appenders {
        appender.await?;
    }

    // A naive reader (`position > last`, as most outbox pollers do), run for
    // real: it polls during the hold and after the commit.
    let mut naive_seen = HashSet::new();
    let mut naive_last = 0_i64;
    let naive_poll = async |last: &mut i64, seen: &mut HashSet<String>| -> anyhow::Result<()> {
        let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT event_id, position FROM events WHERE position > $1 ORDER BY position",
        )
        .bind(*last)
        .fetch_all(&setup.pool)
        .await?;
        for (id, position) in rows {
            seen.insert(id.to_string());
            *last = (*last).max(position);
        }
        Ok(())
    };
    naive_poll(&mut naive_last, &mut naive_seen).await?;
    assert!(
        naive_last > late.position,
        "the late event's position is below the naive cursor"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    slow.commit().await?;
    for _ in 0..5 {
        naive_poll(&mut naive_last, &mut naive_seen).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(naive_seen.len(), 80, "the naive reader saw the fast events");
    assert!(
        !naive_seen.contains(&late_event.event_id.to_string()),
        "and skipped the late one for good (position {})",
        late.position
    );

    eventually("81 published events", Duration::from_secs(20), || async {
        (stream_count(&setup.js).await >= 81).then_some(())
    })
    .await?;
    caught_up(&setup).await?;
    let published = published(&setup.js).await?;
    assert_eq!(published.len(), 81, "each event exactly once");
    assert_eq!(
        published.iter().cloned().collect::<HashSet<_>>(),
        all_event_ids(&setup.pool).await?
    );
    assert!(published.contains(&late_event.event_id.to_string()));

    shutdown.cancel();
    relay.await?;
    Ok(())
}

/// The relay is stopped while it cannot get past event 501 (a mapping
/// failure holds it there, as a crash would), then a new relay resumes from
/// the checkpoint: every event lands exactly once.
#[tokio::test]
async fn a_relay_stopped_mid_stream_resumes_without_loss_or_duplicates() -> anyhow::Result<()> {
    let setup = setup().await?;
    let store = es_postgres::EventStore::new(setup.pool.clone());
    let context = EventContext::new("test");
    for stream in 0..40 {
        let events: Vec<_> = (0..25).map(|_| new_event()).collect();
        store
            .append(&format!("s-{stream}"), 0, &events, &context, None, None)
            .await?;
    }
    let stuck = Everything::default();
    *stuck.refuse.lock().expect("lock") = Some("s-20".to_owned());
    let (shutdown, relay) = start_relay(&setup, stuck.clone());
    eventually(
        "the relay to stop at the refused event",
        Duration::from_secs(20),
        || async { (stream_count(&setup.js).await == 500).then_some(()) },
    )
    .await?;
    // It met the refused event and retried it: it is stuck there now.
    let refusals = stuck.refusals.clone();
    eventually("the refused event retried", Duration::from_secs(20), || {
        let refusals = refusals.clone();
        async move { (refusals.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(()) }
    })
    .await?;
    assert_eq!(
        stream_count(&setup.js).await,
        500,
        "nothing past the refused event"
    );
    shutdown.cancel();
    relay.await?;

    let (shutdown, relay) = start_relay(&setup, Everything::default());
    eventually("all 1000 events", Duration::from_secs(30), || async {
        (stream_count(&setup.js).await >= 1000).then_some(())
    })
    .await?;
    caught_up(&setup).await?;
    let published = published(&setup.js).await?;
    assert_eq!(published.len(), 1000);
    assert_eq!(
        published.into_iter().collect::<HashSet<_>>(),
        all_event_ids(&setup.pool).await?
    );
    shutdown.cancel();
    relay.await?;
    Ok(())
}

/// The relay task is aborted at an arbitrary point mid-stream (no graceful
/// stop: whatever batch was in flight is cut off between publish and
/// checkpoint), then restarted: every event lands exactly once.
#[tokio::test]
async fn a_relay_killed_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let setup = setup().await?;
    let store = es_postgres::EventStore::new(setup.pool.clone());
    let context = EventContext::new("test");
    for stream in 0..60 {
        let events: Vec<_> = (0..50).map(|_| new_event()).collect();
        store
            .append(&format!("k-{stream}"), 0, &events, &context, None, None)
            .await?;
    }
    let slow = Everything {
        delay: Duration::from_millis(1),
        ..Everything::default()
    };
    let (_shutdown, relay) = start_relay(&setup, slow);
    eventually(
        "the relay to be mid-stream",
        Duration::from_secs(30),
        || async { (stream_count(&setup.js).await >= 300).then_some(()) },
    )
    .await?;
    relay.abort();
    let _ = relay.await;
    let at_kill = stream_count(&setup.js).await;
    assert!(at_kill < 3000, "killed part-way ({at_kill} published)");

    let (shutdown, relay) = start_relay(&setup, Everything::default());
    eventually("all 3000 events", Duration::from_secs(60), || async {
        (stream_count(&setup.js).await >= 3000).then_some(())
    })
    .await?;
    caught_up(&setup).await?;
    let published = published(&setup.js).await?;
    assert_eq!(published.len(), 3000);
    assert_eq!(
        published.into_iter().collect::<HashSet<_>>(),
        all_event_ids(&setup.pool).await?
    );
    shutdown.cancel();
    relay.await?;
    Ok(())
}

/// Issue 13, defect 5: one publish of a batch failing made the relay
/// publish the whole batch again; past the duplicate window the events that
/// had landed landed twice. Now the checkpoint moves past what landed in
/// order, what landed after the failure is remembered, and only the failed
/// publish is retried: every event exactly once, even with a 1 s window.
#[tokio::test]
async fn a_partly_failed_batch_republishes_only_what_did_not_land() -> anyhow::Result<()> {
    let setup = setup().await?;
    messaging::declare_stream(
        &setup.js,
        GAP_STREAM,
        &messaging::StreamLimits {
            duplicate_window_secs: 1,
            ..messaging::StreamLimits::default()
        },
    )
    .await?;
    let store = es_postgres::EventStore::new(setup.pool.clone());
    let context = EventContext::new("test");
    for (stream, count) in [("a-1", 3), ("b-1", 1), ("a-2", 2)] {
        let events: Vec<NewEvent> = (0..count).map(|_| new_event()).collect();
        store
            .append(stream, 0, &events, &context, None, None)
            .await?;
    }
    let mapper = Everything::default();
    *mapper.misroute.lock().expect("lock") = Some("b-1".to_owned());
    let (shutdown, relay) = start_relay(&setup, mapper.clone());
    // Retries every 100 ms for 2.5 s: well past the 1 s duplicate window.
    eventually(
        "the five others to land",
        Duration::from_secs(10),
        || async { (stream_count(&setup.js).await >= 5).then_some(()) },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    *mapper.misroute.lock().expect("lock") = None;
    eventually(
        "the misrouted one to land",
        Duration::from_secs(10),
        || async { (stream_count(&setup.js).await >= 6).then_some(()) },
    )
    .await?;
    caught_up(&setup).await?;
    let published = published(&setup.js).await?;
    let unique: HashSet<&String> = published.iter().collect();
    assert_eq!(
        (published.len(), unique.len()),
        (6, 6),
        "each event once: {published:?}"
    );
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        all_event_ids(&setup.pool).await?
    );
    shutdown.cancel();
    relay.await?;
    Ok(())
}
