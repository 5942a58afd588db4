//! The service's Prometheus registry (no global state: one per service,
//! passed by value) and every metric the services export. Labels are
//! bounded: method names, status codes, event types, relay, consumer and
//! downstream names; never ids. Every metric is listed in the README.

mod process;

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use resilience::State;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Dependency {
    dependency: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Downstream {
    downstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventType {
    r#type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Consumed {
    r#type: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Name {
    name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolState {
    state: String,
}

/// A service's metrics. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    build_info: Family<BuildInfo, Gauge>,
    breaker_state: Family<Downstream, Gauge>,
    dependency_up: Family<Dependency, Gauge>,
    grpc_requests: Family<MethodCode, Counter>,
    grpc_duration: Family<Method, Histogram>,
    events_appended: Family<EventType, Counter>,
    events_published: Family<EventType, Counter>,
    events_consumed: Family<Consumed, Counter>,
    relay_lag_events: Family<Name, Gauge>,
    follower_leader: Family<Name, Gauge>,
    relay_duplicates: Family<Name, Counter>,
    relay_lag_seconds: Family<Name, Gauge<f64, std::sync::atomic::AtomicU64>>,
    consumer_pending: Family<Name, Gauge>,
    consumer_redeliveries: Family<Name, Counter>,
    consumer_batch_size: Family<Name, Histogram>,
    dlq_messages: Gauge,
    db_pool: Family<PoolState, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// A registry with every metric, names prefixed `shop_`.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shop");
        let metrics = Self {
            build_info: Family::default(),
            breaker_state: Family::default(),
            dependency_up: Family::default(),
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(latency_histogram),
            events_appended: Family::default(),
            events_published: Family::default(),
            events_consumed: Family::default(),
            relay_lag_events: Family::default(),
            follower_leader: Family::default(),
            relay_duplicates: Family::default(),
            relay_lag_seconds: Family::default(),
            consumer_pending: Family::default(),
            consumer_redeliveries: Family::default(),
            consumer_batch_size: Family::new_with_constructor(|| {
                // 1 .. 512 messages
                Histogram::new(exponential_buckets(1.0, 2.0, 10))
            }),
            dlq_messages: Gauge::default(),
            db_pool: Family::default(),
            registry: Arc::new(Mutex::new(Registry::default())),
        };
        registry.register(
            "build_info",
            "1, labelled with the service and its version",
            metrics.build_info.clone(),
        );
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state per downstream: 0 closed, 1 open, 2 half-open",
            metrics.breaker_state.clone(),
        );
        registry.register(
            "dependency_up",
            "Whether a dependency is usable (1) or away (0): postgres, nats, downstream services",
            metrics.dependency_up.clone(),
        );
        registry.register(
            "grpc_server_requests",
            "gRPC requests served, by method and status code",
            metrics.grpc_requests.clone(),
        );
        registry.register(
            "grpc_server_request_duration_seconds",
            "gRPC request latency by method",
            metrics.grpc_duration.clone(),
        );
        registry.register(
            "events_appended",
            "Events appended to the event store, by type",
            metrics.events_appended.clone(),
        );
        registry.register(
            "events_published",
            "Events the outbox relay published to JetStream (acked), by type",
            metrics.events_published.clone(),
        );
        registry.register(
            "events_consumed",
            "Integration events consumed, by type and outcome (delivered, duplicate, retried, dead_lettered, ignored)",
            metrics.events_consumed.clone(),
        );
        registry.register(
            "relay_duplicates",
            "Publishes JetStream dropped as duplicates of a message it already had",
            metrics.relay_duplicates.clone(),
        );
        registry.register(
            "relay_lag_events",
            "Committed events the outbox relay has not published yet",
            metrics.relay_lag_events.clone(),
        );
        registry.register(
            "follower_leader",
            "1 while this process runs the follower (relay, projection) of that name, holding its lock; 0 while it stands by",
            metrics.follower_leader.clone(),
        );
        registry.register(
            "relay_lag_seconds",
            "Age of the oldest committed event the outbox relay has not published yet",
            metrics.relay_lag_seconds.clone(),
        );
        registry.register(
            "consumer_pending_messages",
            "Messages of a durable consumer not yet acknowledged (undelivered plus in flight)",
            metrics.consumer_pending.clone(),
        );
        registry.register(
            "consumer_redeliveries",
            "Messages delivered again to a consumer (after a NAK, timeout or crash)",
            metrics.consumer_redeliveries.clone(),
        );
        registry.register(
            "consumer_batch_size",
            "Messages a consumer lane handled in one transaction",
            metrics.consumer_batch_size.clone(),
        );
        registry.register(
            "dlq_messages",
            "Messages in the dead-letter stream",
            metrics.dlq_messages.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Postgres pool connections by state (idle, in_use)",
            metrics.db_pool.clone(),
        );
        *metrics
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = registry;
        metrics
    }

    /// Records a breaker's state (called on every transition).
    pub fn set_breaker_state(&self, downstream: &str, state: State) {
        self.breaker_state
            .get_or_create(&Downstream {
                downstream: downstream.to_owned(),
            })
            .set(state.as_gauge());
    }

    /// Whether `dependency` is usable now.
    pub fn set_dependency_up(&self, dependency: &str, up: bool) {
        self.dependency_up
            .get_or_create(&Dependency {
                dependency: dependency.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Exports the relay's counters at zero before anything happened.
    pub fn init_relay(&self, relay: &str) {
        let _ = self.relay_duplicates.get_or_create(&Name {
            name: relay.to_owned(),
        });
    }

    /// Whether this process leads the follower `name` (one replica per
    /// database does; the others stand by for its lock).
    pub fn set_follower_leader(&self, name: &str, leading: bool) {
        self.follower_leader
            .get_or_create(&Name {
                name: name.to_owned(),
            })
            .set(i64::from(leading));
    }

    /// A publish JetStream acknowledged as a duplicate of a message it
    /// already had (dropped, within the stream's duplicate window).
    pub fn relay_duplicate(&self, relay: &str) {
        self.relay_duplicates
            .get_or_create(&Name {
                name: relay.to_owned(),
            })
            .inc();
    }

    /// Records one served gRPC call.
    pub fn grpc_served(&self, method: &str, code: &str, seconds: f64) {
        self.grpc_requests
            .get_or_create(&MethodCode {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.grpc_duration
            .get_or_create(&Method {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts appended events of `event_type`.
    pub fn events_appended(&self, event_type: &str, count: u64) {
        self.events_appended
            .get_or_create(&EventType {
                r#type: event_type.to_owned(),
            })
            .inc_by(count);
    }

    /// Counts a published event of `event_type`.
    pub fn event_published(&self, event_type: &str) {
        self.events_published
            .get_or_create(&EventType {
                r#type: event_type.to_owned(),
            })
            .inc();
    }

    /// Counts a consumed event of `event_type` by what became of it.
    pub fn event_consumed(&self, event_type: &str, outcome: &str) {
        self.events_consumed
            .get_or_create(&Consumed {
                r#type: event_type.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The relay's backlog: events and the age of the oldest, in seconds.
    pub fn set_relay_lag(&self, relay: &str, events: i64, seconds: f64) {
        let name = Name {
            name: relay.to_owned(),
        };
        self.relay_lag_events.get_or_create(&name).set(events);
        self.relay_lag_seconds.get_or_create(&name).set(seconds);
    }

    /// A consumer's undelivered backlog.
    pub fn set_consumer_pending(&self, consumer: &str, pending: i64) {
        self.consumer_pending
            .get_or_create(&Name {
                name: consumer.to_owned(),
            })
            .set(pending);
    }

    /// Exports a consumer's series at zero before anything happens, so
    /// `rate()` works from the start.
    pub fn init_consumer(&self, consumer: &str) {
        let name = Name {
            name: consumer.to_owned(),
        };
        self.consumer_redeliveries.get_or_create(&name).inc_by(0);
        self.consumer_pending.get_or_create(&name).set(0);
    }

    /// Counts a redelivered message.
    pub fn consumer_redelivery(&self, consumer: &str) {
        self.consumer_redeliveries
            .get_or_create(&Name {
                name: consumer.to_owned(),
            })
            .inc();
    }

    /// Records the size of a batch one of the consumer's lanes handled.
    pub fn consumer_batch(&self, consumer: &str, messages: usize) {
        self.consumer_batch_size
            .get_or_create(&Name {
                name: consumer.to_owned(),
            })
            .observe(messages as f64);
    }

    /// Messages in the dead-letter stream.
    pub fn set_dlq_messages(&self, count: i64) {
        self.dlq_messages.set(count);
    }

    /// The pool's connections.
    pub fn set_db_pool(&self, pool: &sqlx::PgPool) {
        let idle = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
        let size = i64::from(pool.size());
        self.db_pool
            .get_or_create(&PoolState {
                state: "idle".to_owned(),
            })
            .set(idle);
        self.db_pool
            .get_or_create(&PoolState {
                state: "in_use".to_owned(),
            })
            .set((size - idle).max(0));
    }

    /// The text exposition of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        // The standard process metrics, read from /proc at each scrape,
        // before the OpenMetrics terminator.
        let process = process::process_metrics();
        match out.rfind("# EOF") {
            Some(at) => out.insert_str(at, &process),
            None => out.push_str(&process),
        }
        out
    }

    /// Sets `shop_build_info{service, version} 1`.
    pub fn set_build_info(&self, service: &str, version: &str) {
        self.build_info
            .get_or_create(&BuildInfo {
                service: service.to_owned(),
                version: version.to_owned(),
            })
            .set(1);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BuildInfo {
    service: String,
    version: String,
}

/// Samples the pool into `metrics` every few seconds until `shutdown`.
pub async fn sample_pool(
    metrics: Metrics,
    pool: sqlx::PgPool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        metrics.set_db_pool(&pool);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_carry_build_info_and_the_standard_process_metrics() {
        let metrics = Metrics::new();
        metrics.set_build_info("order-service", "1.2.3");
        let text = metrics.encode();
        assert!(
            text.contains("shop_build_info{service=\"order-service\",version=\"1.2.3\"} 1"),
            "{text}"
        );
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(
            text.trim_end().ends_with("# EOF"),
            "the terminator stays last"
        );
    }
}
