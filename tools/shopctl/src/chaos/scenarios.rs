//! The scenarios: which fault, injected how, healed how, and what each
//! checks besides the oracle.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use testkit::Link;
use uuid::Uuid;

use super::stack::{ChaosStack, Database, Peer, Service, Tuning};

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A signal (`KILL`, `TERM`) to a service; restarted after `down`.
    Signal {
        service: Service,
        signal: &'static str,
        down: Duration,
    },
    /// kill -9 of nats-server; restarted after `down`.
    KillNats { down: Duration },
    /// `pg_ctl stop -m immediate`; restarted after `down`.
    CrashPostgres { down: Duration },
    /// Nothing crosses the link for `down`.
    Partition { peer: Peer, down: Duration },
    /// Every chunk on the link waits `delay`, for `down`.
    Latency {
        peer: Peer,
        delay: Duration,
        down: Duration,
    },
    /// notification-service restarted with handling slower than its ack
    /// wait, for `down`, then restarted as it was.
    SlowConsumer { down: Duration },
    /// A message no consumer can decode, published among the real ones.
    Poison,
    /// No fault besides the scenario's tuning (slow consumer, races).
    None,
    /// An event appended in a transaction held open for `hold` while the
    /// load commits around it.
    RelayGap { hold: Duration },
    /// kill -9 of order-service under load (its projections between or
    /// within batches), then a full rebuild of both read models under load.
    Rebuild,
}

/// A scenario of `shopctl chaos`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) about: &'static str,
    pub(crate) fault: Fault,
    /// Every fourth flow races five payments for one version.
    pub(crate) race: bool,
    tuning: fn() -> Tuning,
}

impl Scenario {
    pub(crate) fn tuning(&self) -> Tuning {
        (self.tuning)()
    }
}

fn none() -> Tuning {
    Vec::new()
}

/// notification-service pauses between recording a delivery and acking:
/// the window in which a crash leaves an effect without its ack.
fn pause_before_ack() -> Tuning {
    vec![(
        Service::Notification,
        "APP_FAULTS__PAUSE_BEFORE_ACK_MS",
        "50".to_owned(),
    )]
}

/// A duplicate window shorter than the outage.
fn short_duplicate_window() -> Tuning {
    Service::ALL
        .into_iter()
        .map(|s| (s, "APP_STREAMS__DUPLICATE_WINDOW_SECS", "3".to_owned()))
        .collect()
}

/// A 1 s ack wait from the start (the durable consumer keeps the value
/// it was created with); the fault makes handling take longer than that.
fn short_ack_wait() -> Tuning {
    vec![(Service::Notification, "APP_ACK_WAIT_SECS", "1".to_owned())]
}

/// Every command asks user-service (no token cache), so latency bites.
fn uncached_tokens() -> Tuning {
    vec![(Service::Order, "APP_TOKEN_CACHE_SECS", "0".to_owned())]
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const fn signal(service: Service, signal: &'static str) -> Fault {
    Fault::Signal {
        service,
        signal,
        down: secs(1),
    }
}

/// Every scenario, in the order `all` runs them.
pub(crate) const ALL: &[Scenario] = &[
    Scenario {
        name: "kill-order",
        about: "kill -9 order-service with commands in flight; retries with the same key get the original answer",
        fault: signal(Service::Order, "KILL"),
        race: false,
        tuning: none,
    },
    Scenario {
        name: "kill-notification",
        about: "kill -9 notification-service between the external effect and the ack",
        fault: signal(Service::Notification, "KILL"),
        race: false,
        tuning: pause_before_ack,
    },
    Scenario {
        name: "kill-user",
        about: "kill -9 user-service (its relay and the token checks)",
        fault: signal(Service::User, "KILL"),
        race: false,
        tuning: uncached_tokens,
    },
    Scenario {
        name: "term-order",
        about: "SIGTERM order-service: drain, stop, start again",
        fault: signal(Service::Order, "TERM"),
        race: false,
        tuning: none,
    },
    Scenario {
        name: "term-notification",
        about: "SIGTERM notification-service",
        fault: signal(Service::Notification, "TERM"),
        race: false,
        tuning: pause_before_ack,
    },
    Scenario {
        name: "term-user",
        about: "SIGTERM user-service",
        fault: signal(Service::User, "TERM"),
        race: false,
        tuning: uncached_tokens,
    },
    Scenario {
        name: "kill-nats",
        about: "kill -9 nats-server under load, restart after 3 s",
        fault: Fault::KillNats { down: secs(3) },
        race: false,
        tuning: none,
    },
    Scenario {
        name: "nats-outage",
        about: "NATS down 8 s, longer than the 3 s duplicate window: the outbox grows, then drains",
        fault: Fault::KillNats { down: secs(8) },
        race: false,
        tuning: short_duplicate_window,
    },
    Scenario {
        name: "postgres-crash",
        about: "pg_ctl stop -m immediate under load, restart after 3 s",
        fault: Fault::CrashPostgres { down: secs(3) },
        race: false,
        tuning: none,
    },
    Scenario {
        name: "partition-nats",
        about: "order- and notification-service cut from NATS for 8 s",
        fault: Fault::Partition {
            peer: Peer::Nats,
            down: secs(8),
        },
        race: false,
        tuning: none,
    },
    Scenario {
        name: "partition-postgres",
        about: "order- and notification-service cut from Postgres for 5 s",
        fault: Fault::Partition {
            peer: Peer::Postgres,
            down: secs(5),
        },
        race: false,
        tuning: none,
    },
    Scenario {
        name: "partition-user",
        about: "order-service cut from user-service for 5 s: the breaker opens, then closes",
        fault: Fault::Partition {
            peer: Peer::UserService,
            down: secs(5),
        },
        race: false,
        tuning: uncached_tokens,
    },
    Scenario {
        name: "latency-user",
        about: "500 ms each way on the user-service link for 8 s, past the 800 ms per-try deadline: the breaker opens, then closes",
        fault: Fault::Latency {
            peer: Peer::UserService,
            delay: Duration::from_millis(500),
            down: secs(8),
        },
        race: false,
        tuning: uncached_tokens,
    },
    Scenario {
        name: "slow-consumer",
        about: "notification handling slower than the 1 s ack wait for 8 s: redeliveries are absorbed",
        fault: Fault::SlowConsumer { down: secs(8) },
        race: false,
        tuning: short_ack_wait,
    },
    Scenario {
        name: "poison",
        about: "an undecodable message among the real ones: dead-lettered, the rest flows",
        fault: Fault::Poison,
        race: false,
        tuning: none,
    },
    Scenario {
        name: "race",
        about: "duplicate and concurrent payments of one order: one wins, one event",
        fault: Fault::None,
        race: true,
        tuning: none,
    },
    Scenario {
        name: "relay-gap",
        about: "an append held open 5 s while others commit: the relay skips nothing",
        fault: Fault::RelayGap { hold: secs(5) },
        race: false,
        tuning: none,
    },
    Scenario {
        name: "projection-rebuild",
        about: "kill -9 order-service (projections between or within batches), then rebuild both read models under load",
        fault: Fault::Rebuild,
        race: false,
        tuning: none,
    },
];

/// What injecting and healing a fault showed.
#[derive(Debug, Default)]
pub(crate) struct Injected {
    /// When the fault was healed (the restart began, the link came back).
    pub(crate) healed_at: Option<Instant>,
    /// From the heal until the restarted process answered health checks.
    pub(crate) ready_after: Option<Duration>,
    /// Message ids put on the stream by the scenario itself.
    pub(crate) injected: Vec<String>,
    /// Event ids the scenario appended itself.
    pub(crate) appended: Vec<Uuid>,
    /// New read-model generations to wait for.
    pub(crate) rebuilt: Vec<(&'static str, i32)>,
    /// Redeliveries the slow consumer absorbed before it was restarted.
    pub(crate) slow_duplicates: Option<f64>,
    /// What the fault was seen doing while it lasted.
    pub(crate) checks: Vec<(String, bool)>,
}

const BREAKER: &str = "shop_circuit_breaker_state";
const BREAKER_OPEN: f64 = 1.0;

/// Samples order-service's breaker towards user-service for `down`; the
/// highest state seen (0 closed, 1 open, 2 half-open).
async fn watch_breaker(stack: &ChaosStack, down: Duration) -> Vec<f64> {
    let until = Instant::now() + down;
    let mut seen = Vec::new();
    while Instant::now() < until {
        if let Some(state) = stack
            .metric(Service::Order, BREAKER, ("downstream", "user-service"))
            .await
            && seen.last() != Some(&state)
        {
            seen.push(state);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// After a user-service fault: the breaker opened while it lasted and is
/// closed again (within 30 s of the heal).
async fn breaker_checks(stack: &ChaosStack, seen: &[f64], injected: &mut Injected) {
    injected.checks.push((
        format!("the breaker to user-service opened during the fault (states seen: {seen:?})"),
        seen.contains(&BREAKER_OPEN),
    ));
    let until = Instant::now() + Duration::from_secs(30);
    let mut closed = false;
    while !closed && Instant::now() < until {
        closed = stack
            .metric(Service::Order, BREAKER, ("downstream", "user-service"))
            .await
            == Some(0.0);
        if !closed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    injected
        .checks
        .push(("the breaker closed after the heal".to_owned(), closed));
}

/// Injects `fault`, waits, heals it.
pub(crate) async fn inject(
    fault: Fault,
    stack: &mut ChaosStack,
    db: &mut Database,
) -> anyhow::Result<Injected> {
    let mut injected = Injected::default();
    match fault {
        Fault::Signal {
            service,
            signal,
            down,
        } => {
            stack.signal_service(service, signal).await;
            tokio::time::sleep(down).await;
            let healed = Instant::now();
            injected.healed_at = Some(healed);
            stack.start_service(service).await?;
            injected.ready_after = Some(healed.elapsed());
        }
        Fault::KillNats { down } => {
            stack.kill_nats().await;
            tokio::time::sleep(down).await;
            let healed = Instant::now();
            injected.healed_at = Some(healed);
            stack.restart_nats().await?;
            injected.ready_after = Some(healed.elapsed());
        }
        Fault::CrashPostgres { down } => {
            db.crash().await;
            tokio::time::sleep(down).await;
            let healed = Instant::now();
            injected.healed_at = Some(healed);
            db.restart().await?;
            injected.ready_after = Some(healed.elapsed());
        }
        Fault::Partition { peer, down } => {
            stack.link(peer, Link::Blackhole);
            let seen = watch_breaker(stack, down).await;
            stack.link(peer, Link::Up);
            injected.healed_at = Some(Instant::now());
            if peer == Peer::UserService {
                breaker_checks(stack, &seen, &mut injected).await;
            }
        }
        Fault::Latency { peer, delay, down } => {
            stack.link(peer, Link::Latency(delay));
            let seen = watch_breaker(stack, down).await;
            stack.link(peer, Link::Up);
            injected.healed_at = Some(Instant::now());
            if peer == Peer::UserService {
                breaker_checks(stack, &seen, &mut injected).await;
            }
        }
        Fault::SlowConsumer { down } => {
            let slow = [("APP_FAULTS__PAUSE_BEFORE_ACK_MS", "1500".to_owned())];
            stack.signal_service(Service::Notification, "TERM").await;
            stack
                .start_service_with(Service::Notification, &slow)
                .await?;
            tokio::time::sleep(down).await;
            injected.slow_duplicates = Some(stack.duplicates_absorbed().await);
            stack.signal_service(Service::Notification, "TERM").await;
            let healed = Instant::now();
            injected.healed_at = Some(healed);
            stack.start_service(Service::Notification).await?;
            injected.ready_after = Some(healed.elapsed());
        }
        Fault::Poison => {
            let id = format!("chaos-poison-{}", Uuid::new_v4());
            let js = async_nats::jetstream::new(crate::admin::connect_nats(&stack.nats_url).await?);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            headers.insert(messaging::headers::EVENT_ID, id.as_str());
            js.publish_with_headers("order.created", headers, "\u{0}not an event".into())
                .await?
                .await
                .context("publishing the poison message")?;
            injected.injected.push(id);
        }
        Fault::None => {}
        Fault::RelayGap { hold } => {
            injected.appended.push(held_append(stack, hold).await?);
            injected.healed_at = Some(Instant::now());
        }
        Fault::Rebuild => {
            stack.signal_service(Service::Order, "KILL").await;
            let healed = Instant::now();
            injected.healed_at = Some(healed);
            stack.start_service(Service::Order).await?;
            injected.ready_after = Some(healed.elapsed());
            let pool = crate::admin::connect_postgres(&stack.orders_db).await?;
            for name in order_service::projections::ALL {
                let generation = es_postgres::projection::start_rebuild(&pool, name).await?;
                injected.rebuilt.push((name, generation));
            }
        }
    }
    Ok(injected)
}

/// Appends an `order.created` for a new order of an existing user (a copy
/// of the first one, renamed) in a transaction kept open for `hold`, while
/// the load commits later positions around it.
async fn held_append(stack: &ChaosStack, hold: Duration) -> anyhow::Result<Uuid> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&stack.orders_db).await?;
    let mut tx = conn.begin().await?;
    let event_id = Uuid::new_v4();
    let order_id = Uuid::new_v4();
    let inserted = sqlx::query(
        "INSERT INTO events (event_id, stream_id, version, event_type, schema_version, payload,
                             occurred_at, correlation_id, causation_id, actor)
         SELECT $1, $2, 1, event_type, schema_version,
                jsonb_set(payload, '{order_id}', to_jsonb($3::text)),
                now(), $1, $1, actor
         FROM events WHERE event_type = 'order.created' ORDER BY position LIMIT 1",
    )
    .bind(event_id)
    .bind(es::stream_id::<order_domain::Order>(order_id))
    .bind(order_id.to_string())
    .execute(&mut *tx)
    .await?;
    anyhow::ensure!(
        inserted.rows_affected() == 1,
        "no order.created to copy yet"
    );
    tokio::time::sleep(hold).await;
    tx.commit().await?;
    Ok(event_id)
}
