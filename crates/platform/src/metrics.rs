//! The service's Prometheus registry (no global state: one per service,
//! passed by value) and the metrics every service shares. Labels are bounded:
//! method names, codes, downstream names; never ids.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use resilience::State;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Downstream {
    downstream: String,
}

/// A service's metrics. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<std::sync::Mutex<Registry>>,
    breaker_state: Family<Downstream, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the shared metrics, every name prefixed `shop_`.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shop");
        let breaker_state = Family::<Downstream, Gauge>::default();
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state per downstream: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        Self {
            registry: Arc::new(std::sync::Mutex::new(registry)),
            breaker_state,
        }
    }

    /// Registers a service-specific metric.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    /// Records a breaker's state (called on every transition).
    pub fn set_breaker_state(&self, downstream: &str, state: State) {
        self.breaker_state
            .get_or_create(&Downstream {
                downstream: downstream.to_owned(),
            })
            .set(state.as_gauge());
    }

    /// The text exposition of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}
