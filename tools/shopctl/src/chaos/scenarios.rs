//! The scenarios: which fault, injected how, healed how, and what each
//! checks besides the oracle.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use testkit::Link;
use uuid::Uuid;

use super::stack::{ChaosStack, Database, Peer, Service, Topology, Tuning};

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
    /// kill -9 of the order-service replica leading the relay and the
    /// projections; restarted after `down`.
    KillLeader { down: Duration },
    /// The order-service replica leading the relay and the projections cut
    /// from Postgres (its socket kept open) for `down`.
    PartitionLeader { down: Duration },
    /// kill -9 of one replica of `service` while the others go on;
    /// restarted after `down`.
    KillReplica { service: Service, down: Duration },
    /// kill -9 of `nodes` nats-server nodes of the cluster, the ORDERS
    /// stream's leader first; restarted after `down`.
    KillNatsNodes { nodes: usize, down: Duration },
}

/// A standby replica takes over a dead leader's followers within this
/// (docs/scaling.md): it asks for the lock every second, and Postgres frees
/// a killed process's locks as soon as its connection closes.
pub(crate) const TAKEOVER_BOUND: Duration = Duration::from_secs(5);
/// Takeover from a leader cut off with its socket open: the server ends
/// its silent session after 6 s (`TailConfig::silence_timeout`), then a
/// standby's next ask (every second) gets the lock.
pub(crate) const PARTITION_TAKEOVER_BOUND: Duration = Duration::from_secs(10);
/// Publishing and consuming resume within this after one NATS node dies:
/// the stream and its consumers elect new leaders on the other nodes (4-5 s
/// measured with nats-server 2.9), and the relay sends again after one
/// publish timeout (2 s) and its retry.
pub(crate) const NATS_RESUME_BOUND: Duration = Duration::from_secs(15);

/// A scenario of `shopctl chaos`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) about: &'static str,
    pub(crate) fault: Fault,
    /// Every fourth flow races five payments for one version.
    pub(crate) race: bool,
    tuning: fn() -> Tuning,
    pub(crate) topology: Topology,
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
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "kill-notification",
        about: "kill -9 notification-service between the external effect and the ack",
        fault: signal(Service::Notification, "KILL"),
        race: false,
        tuning: pause_before_ack,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "kill-user",
        about: "kill -9 user-service (its relay and the token checks)",
        fault: signal(Service::User, "KILL"),
        race: false,
        tuning: uncached_tokens,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "term-order",
        about: "SIGTERM order-service: drain, stop, start again",
        fault: signal(Service::Order, "TERM"),
        race: false,
        tuning: none,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "term-notification",
        about: "SIGTERM notification-service",
        fault: signal(Service::Notification, "TERM"),
        race: false,
        tuning: pause_before_ack,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "term-user",
        about: "SIGTERM user-service",
        fault: signal(Service::User, "TERM"),
        race: false,
        tuning: uncached_tokens,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "kill-nats",
        about: "kill -9 nats-server under load, restart after 3 s",
        fault: Fault::KillNats { down: secs(3) },
        race: false,
        tuning: none,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "nats-outage",
        about: "NATS down 8 s, longer than the 3 s duplicate window: the outbox grows, then drains",
        fault: Fault::KillNats { down: secs(8) },
        race: false,
        tuning: short_duplicate_window,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "postgres-crash",
        about: "pg_ctl stop -m immediate under load, restart after 3 s",
        fault: Fault::CrashPostgres { down: secs(3) },
        race: false,
        tuning: none,
        topology: Topology::SINGLE,
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
        topology: Topology::SINGLE,
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
        topology: Topology::SINGLE,
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
        topology: Topology::SINGLE,
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
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "slow-consumer",
        about: "notification handling slower than the 1 s ack wait for 8 s: redeliveries are absorbed",
        fault: Fault::SlowConsumer { down: secs(8) },
        race: false,
        tuning: short_ack_wait,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "poison",
        about: "an undecodable message among the real ones: dead-lettered, the rest flows",
        fault: Fault::Poison,
        race: false,
        tuning: none,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "race",
        about: "duplicate and concurrent payments of one order: one wins, one event",
        fault: Fault::None,
        race: true,
        tuning: none,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "relay-gap",
        about: "an append held open 5 s while others commit: the relay skips nothing",
        fault: Fault::RelayGap { hold: secs(5) },
        race: false,
        tuning: none,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "projection-rebuild",
        about: "kill -9 order-service (projections between or within batches), then rebuild both read models under load",
        fault: Fault::Rebuild,
        race: false,
        tuning: none,
        topology: Topology::SINGLE,
    },
    Scenario {
        name: "kill-relay-leader",
        about: "2 replicas of each service, 3 NATS nodes: kill -9 the order-service replica leading the relay and projections; the other takes over",
        fault: Fault::KillLeader { down: secs(3) },
        race: false,
        tuning: none,
        topology: Topology::SCALED,
    },
    Scenario {
        name: "partition-relay-leader",
        about: "2 replicas, 3 NATS nodes: cut the order-service replica leading the relay and projections from Postgres for 12 s, socket open; the other takes over",
        fault: Fault::PartitionLeader { down: secs(12) },
        race: false,
        tuning: none,
        topology: Topology::SCALED,
    },
    Scenario {
        name: "kill-notification-replica",
        about: "2 replicas, 3 NATS nodes: kill -9 one notification-service replica between effect and ack; the other goes on, per-order order holds",
        fault: Fault::KillReplica {
            service: Service::Notification,
            down: secs(3),
        },
        race: false,
        tuning: pause_before_ack,
        topology: Topology::SCALED,
    },
    Scenario {
        name: "kill-nats-node",
        about: "2 replicas, 3 NATS nodes, R3 streams: kill -9 the ORDERS stream's leader node, restart after 3 s",
        fault: Fault::KillNatsNodes {
            nodes: 1,
            down: secs(3),
        },
        race: false,
        tuning: none,
        topology: Topology::SCALED,
    },
    Scenario {
        name: "nats-quorum-loss",
        about: "2 replicas, 3 NATS nodes: kill -9 two nodes for 6 s; publishing stops, the outbox keeps the backlog, recovery publishes it",
        fault: Fault::KillNatsNodes {
            nodes: 2,
            down: secs(6),
        },
        race: false,
        tuning: none,
        topology: Topology::SCALED,
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
    /// Timings the fault measured, in seconds (takeover, reconnect).
    pub(crate) figures: BTreeMap<&'static str, f64>,
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
            stack.link(peer, Link::Blackhole)?;
            let seen = watch_breaker(stack, down).await;
            stack.link(peer, Link::Up)?;
            injected.healed_at = Some(Instant::now());
            if peer == Peer::UserService {
                breaker_checks(stack, &seen, &mut injected).await;
            }
        }
        Fault::Latency { peer, delay, down } => {
            stack.link(peer, Link::Latency(delay))?;
            let seen = watch_breaker(stack, down).await;
            stack.link(peer, Link::Up)?;
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
        Fault::KillLeader { down } => {
            depose_leader(stack, Deposed::Killed, down, &mut injected).await?;
        }
        Fault::PartitionLeader { down } => {
            depose_leader(stack, Deposed::Partitioned, down, &mut injected).await?;
        }
        Fault::KillReplica { service, down } => {
            if service == Service::Notification {
                // Each replica has been handling its share of the work.
                let mut handled = Vec::new();
                for replica in 0..stack.replicas() {
                    handled.push(
                        stack
                            .replica_metric(service, replica, CONSUMED, DELIVERED)
                            .await
                            .unwrap_or(0.0),
                    );
                }
                injected.checks.push((
                    format!("every replica delivered notifications before the kill ({handled:?})"),
                    handled.iter().all(|n| *n > 0.0),
                ));
            }
            stack.signal_replica(service, 0, "KILL").await;
            tokio::time::sleep(down).await;
            let healed = Instant::now();
            injected.healed_at = Some(healed);
            stack.start_replica_with(service, 0, &[]).await?;
            injected.ready_after = Some(healed.elapsed());
        }
        Fault::KillNatsNodes { nodes, down } => {
            kill_nats_nodes(stack, nodes, down, &mut injected).await?;
        }
    }
    Ok(injected)
}

const CONSUMED: &str = "shop_events_consumed_total";
/// The order-service relay's follower name.
const ORDER_RELAY: &str = "outbox:order-events";
const DELIVERED: (&str, &str) = ("outcome", "delivered");
const PUBLISHED: &str = "shop_events_published_total";
const ANY: (&str, &str) = ("", "");

/// Committed order events the relay has not checkpointed as published.
async fn unpublished(stack: &ChaosStack) -> anyhow::Result<i64> {
    let pool = crate::admin::connect_postgres(&stack.orders_db).await?;
    let count = sqlx::query_scalar(
        "SELECT count(*) FROM events e, outbox_checkpoints c
         WHERE c.name = $1 AND (e.tx_id, e.position) > (c.tx_id, c.position)",
    )
    .bind(ORDER_RELAY.trim_start_matches("outbox:"))
    .fetch_one(&pool)
    .await?;
    Ok(count)
}

async fn published(stack: &ChaosStack) -> Option<f64> {
    stack.metric(Service::Order, PUBLISHED, ANY).await
}

async fn consumed(stack: &ChaosStack) -> Option<f64> {
    stack
        .metric(Service::Notification, CONSUMED, DELIVERED)
        .await
}

fn within(what: String, took: Duration, bound: Duration) -> (String, bool) {
    (
        format!(
            "{what} in {:.2} s (bound {} s)",
            took.as_secs_f64(),
            bound.as_secs()
        ),
        took <= bound,
    )
}

/// How a scenario takes the leader away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deposed {
    /// kill -9, restarted after the outage.
    Killed,
    /// Its Postgres link blackholed, healed after the outage.
    Partitioned,
}

/// Takes the leading order-service replica away and times each follower's
/// takeover by another replica; after the heal, each follower has one
/// leader again.
async fn depose_leader(
    stack: &mut ChaosStack,
    how: Deposed,
    down: Duration,
    injected: &mut Injected,
) -> anyhow::Result<()> {
    // The replica leading the relay (and whatever else it leads).
    let mut leader = None;
    for replica in 0..stack.replicas() {
        let led = stack.leads(Service::Order, replica).await;
        if led.iter().any(|f| f == ORDER_RELAY) {
            leader = Some((replica, led));
            break;
        }
    }
    let (leader, led) = leader.context("no order-service replica leads the relay")?;
    let killed = Instant::now();
    let (bound, what) = match how {
        Deposed::Killed => {
            stack.signal_replica(Service::Order, leader, "KILL").await;
            (TAKEOVER_BOUND, "killed")
        }
        Deposed::Partitioned => {
            stack.postgres_link(Service::Order, leader, Link::Blackhole);
            (PARTITION_TAKEOVER_BOUND, "cut from Postgres")
        }
    };
    let mut taken: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    while taken.len() < led.len() && killed.elapsed() < Duration::from_secs(30) {
        for replica in (0..stack.replicas()).filter(|r| *r != leader) {
            for follower in stack.leads(Service::Order, replica).await {
                if led.contains(&follower) {
                    taken.entry(follower).or_insert((replica, killed.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let from = stack.name(Service::Order, leader).to_owned();
    let mut slowest = Duration::ZERO;
    for follower in &led {
        match taken.get(follower) {
            Some((replica, took)) => {
                slowest = slowest.max(*took);
                injected.checks.push(within(
                    format!(
                        "{follower}: {} took over from {from} ({what})",
                        stack.name(Service::Order, *replica)
                    ),
                    *took,
                    bound,
                ));
            }
            None => injected.checks.push((
                format!("{follower}: no replica took over from {from} within 30 s"),
                false,
            )),
        }
    }
    injected
        .figures
        .insert("leader_takeover_s", slowest.as_secs_f64());
    tokio::time::sleep(down.saturating_sub(killed.elapsed())).await;
    let healed = Instant::now();
    injected.healed_at = Some(healed);
    match how {
        Deposed::Killed => {
            stack
                .start_replica_with(Service::Order, leader, &[])
                .await?;
            injected.ready_after = Some(healed.elapsed());
        }
        Deposed::Partitioned => stack.postgres_link(Service::Order, leader, Link::Up),
    }
    // The deposed leader learns it lost the lock when its connection fails
    // (at the latest its step deadline, 30 s); then one leader per follower.
    let mut leaders = BTreeMap::new();
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(40) {
        leaders.clear();
        for replica in 0..stack.replicas() {
            for follower in stack.leads(Service::Order, replica).await {
                *leaders.entry(follower).or_insert(0) += 1;
            }
        }
        if led.iter().all(|f| leaders.get(f) == Some(&1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    injected.checks.push((
        format!(
            "one leader per follower after the heal ({leaders:?}, {:.1} s after it)",
            settled.elapsed().as_secs_f64()
        ),
        led.iter().all(|f| leaders.get(f) == Some(&1)),
    ));
    Ok(())
}

/// Polls `read` until it exceeds `from`; how long that took, or `None`
/// within `limit`.
async fn until_above<F, Fut>(from: f64, limit: Duration, read: F) -> Option<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<f64>>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if read().await.is_some_and(|v| v > from) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Kills `nodes` nats-server nodes, the ORDERS stream's leader first. One
/// node: publishing and consuming must resume (timed) while it is down.
/// More (no quorum): publishing must stop and the outbox hold the
/// backlog; after the restart, publishing resumes (timed).
async fn kill_nats_nodes(
    stack: &mut ChaosStack,
    nodes: usize,
    down: Duration,
    injected: &mut Injected,
) -> anyhow::Result<()> {
    let total = stack.nats_nodes();
    anyhow::ensure!(
        nodes < total,
        "{nodes} of {total} NATS nodes cannot all be killed here"
    );
    let leader = stack.stream_leader("ORDERS").await;
    let first = leader.unwrap_or(0);
    let victims: Vec<usize> = (0..nodes).map(|i| (first + i) % total).collect();
    let names: Vec<String> = victims.iter().map(|v| stack.nats_name(*v)).collect();
    let killed = Instant::now();
    for victim in &victims {
        stack.kill_nats_node(*victim).await;
    }
    // Counted once the nodes are gone: what moves the counters from here
    // on went through the surviving nodes.
    let p0 = published(stack)
        .await
        .context("order-service's metrics do not answer")?;
    let c0 = consumed(stack)
        .await
        .context("notification-service's metrics do not answer")?;
    let killed_what = format!(
        "{} killed ({})",
        names.join(" and "),
        if leader.is_some() {
            "the ORDERS leader first"
        } else {
            "the ORDERS leader unknown"
        }
    );
    let limit = down + Duration::from_secs(30);
    if nodes == 1 {
        let stack = &*stack;
        // Both timed from the same moment, concurrently.
        let (publishing, consuming) = tokio::join!(
            until_above(p0, limit, || published(stack)),
            until_above(c0, limit, || consumed(stack)),
        );
        for (figure, what, took) in [
            (
                "nats_publishing_resumed_s",
                "publishing resumed",
                publishing,
            ),
            ("nats_consuming_resumed_s", "consuming resumed", consuming),
        ] {
            match took {
                Some(took) => {
                    injected.figures.insert(figure, took.as_secs_f64());
                    injected.checks.push(within(
                        format!("{what} with {killed_what}"),
                        took,
                        NATS_RESUME_BOUND,
                    ));
                }
                None => injected.checks.push((
                    format!("{what} with {killed_what}: not within {limit:?}"),
                    false,
                )),
            }
        }
    } else {
        // Publishes in flight at the kill settle first.
        let grace = Duration::from_secs(2).min(down / 2);
        tokio::time::sleep(grace).await;
        let p1 = published(stack).await;
        tokio::time::sleep(down.saturating_sub(killed.elapsed())).await;
        let p2 = published(stack).await;
        // The backlog from the orders database itself: committed events past
        // the relay's checkpoint (the lag gauge is only as fresh as the
        // relay's last leadership, which moves while NATS fails it).
        let backlog = unpublished(stack).await;
        injected.checks.push((
            format!(
                "publishing stopped with {killed_what} (published {p1:?} -> {p2:?} in the last {:.1} s of the outage)",
                (down - grace).as_secs_f64()
            ),
            p1.is_some() && p1 == p2,
        ));
        injected.checks.push((
            format!(
                "the outbox held the backlog ({} events past the relay's checkpoint)",
                backlog
                    .as_ref()
                    .map_or_else(|e| format!("unreadable: {e:#}"), i64::to_string)
            ),
            backlog.as_ref().is_ok_and(|b| *b > 0),
        ));
    }
    tokio::time::sleep(down.saturating_sub(killed.elapsed())).await;
    let healed = Instant::now();
    injected.healed_at = Some(healed);
    let before = published(stack).await.unwrap_or(0.0);
    stack.restart_nats().await?;
    injected.ready_after = Some(healed.elapsed());
    if nodes > 1 {
        let stack = &*stack;
        match until_above(before, Duration::from_secs(60), || published(stack)).await {
            Some(_) => {
                injected.figures.insert(
                    "nats_publishing_resumed_after_restart_s",
                    healed.elapsed().as_secs_f64(),
                );
            }
            None => injected.checks.push((
                "publishing resumed after the restart: not within 60 s".to_owned(),
                false,
            )),
        }
    }
    Ok(())
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
