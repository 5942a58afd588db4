//! The admin HTTP port every service serves beside gRPC: `/metrics`
//! (Prometheus), `/livez` (the process is up) and `/readyz` (whether to
//! send it traffic, ADR 13).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{StartError, metrics::Metrics};

/// Whether a replica should receive traffic (ADR 13): `/readyz` and the
/// gRPC health service report it. Postgres unreachable or shutting down is
/// *not ready*; NATS away or an open breaker is *degraded* (still ready:
/// rerouting would not help, and the outbox keeps the write path open).
/// Postgres is checked by [`Readiness::watch`] in the background, so asking
/// costs nothing and answers at once.
#[derive(Clone, Default)]
pub struct Readiness {
    pool: Option<sqlx::PgPool>,
    nats: Option<async_nats::Client>,
    breakers: Vec<Arc<resilience::CircuitBreaker>>,
    state: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    postgres_down: AtomicBool,
    draining: AtomicBool,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("postgres", &self.pool.is_some())
            .field("nats", &self.nats.is_some())
            .field("breakers", &self.breakers.len())
            .field("state", &self.state)
            .finish()
    }
}

/// What readiness found: reasons not to send traffic, and degraded
/// dependencies that do not stop this replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub problems: Vec<String>,
    pub degraded: Vec<String>,
}

/// How often the background check pings Postgres, and how long it waits.
const PING_EVERY: Duration = Duration::from_millis(500);
const PING_TIMEOUT: Duration = Duration::from_secs(1);

impl Readiness {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Postgres must answer (checked by [`Readiness::watch`]).
    #[must_use]
    pub fn postgres(mut self, pool: sqlx::PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// NATS should be connected (degraded when not).
    #[must_use]
    pub fn nats(mut self, client: async_nats::Client) -> Self {
        self.nats = Some(client);
        self
    }

    /// A breaker that should be closed (degraded when open).
    #[must_use]
    pub fn breaker(mut self, breaker: Arc<resilience::CircuitBreaker>) -> Self {
        self.breakers.push(breaker);
        self
    }

    /// Whether the background check last found Postgres unreachable: calls
    /// that need it can fail fast.
    #[must_use]
    pub fn postgres_down(&self) -> bool {
        self.pool.is_some() && self.state.postgres_down.load(Ordering::Relaxed)
    }

    /// From now on not ready: the replica is shutting down.
    pub fn drain(&self) {
        self.state.draining.store(true, Ordering::Relaxed);
    }

    /// What stops this replica, and what is degraded; no I/O.
    #[must_use]
    pub fn report(&self) -> Report {
        let mut report = Report::default();
        if self.state.draining.load(Ordering::Relaxed) {
            report.problems.push("shutting down".to_owned());
        }
        if self.postgres_down() {
            report.problems.push("postgres unreachable".to_owned());
        }
        if let Some(nats) = &self.nats
            && nats.connection_state() != async_nats::connection::State::Connected
        {
            report.degraded.push("nats disconnected".to_owned());
        }
        for breaker in &self.breakers {
            if breaker.state() == resilience::State::Open {
                report
                    .degraded
                    .push(format!("circuit breaker to {} is open", breaker.name()));
            }
        }
        report
    }

    /// Reasons not to send traffic, or empty if ready.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        self.report().problems
    }

    /// Sets `shop_dependency_up` from the current state (also at every
    /// scrape, so it is never behind what `/readyz` says).
    pub fn publish(&self, metrics: &Metrics) {
        if self.pool.is_some() {
            metrics.set_dependency_up("postgres", !self.postgres_down());
        }
        if let Some(nats) = &self.nats {
            metrics.set_dependency_up(
                "nats",
                nats.connection_state() == async_nats::connection::State::Connected,
            );
        }
        for breaker in &self.breakers {
            metrics.set_dependency_up(breaker.name(), breaker.state() != resilience::State::Open);
        }
    }

    /// Keeps the Postgres state and `shop_dependency_up` current until
    /// `shutdown`. The ping uses its own connection, not the pool: a pool
    /// saturated by load is busy, not down, and must not make every replica
    /// unready at once. Postgres counts as down after two failed pings in a
    /// row (about a second), and as up again at the first answer.
    pub async fn watch(self, metrics: Metrics, shutdown: CancellationToken) {
        use sqlx::Connection as _;
        let mut connection: Option<sqlx::PgConnection> = None;
        let mut failures = 0_u32;
        loop {
            if let Some(pool) = &self.pool {
                let ping = tokio::time::timeout(PING_TIMEOUT, async {
                    if connection.is_none() {
                        connection =
                            Some(sqlx::PgConnection::connect_with(&pool.connect_options()).await?);
                    }
                    match connection.as_mut() {
                        Some(conn) => conn.ping().await,
                        None => Ok(()),
                    }
                })
                .await;
                if matches!(ping, Ok(Ok(()))) {
                    failures = 0;
                } else {
                    failures += 1;
                    connection = None;
                }
                let down = failures >= 2;
                if down != self.state.postgres_down.swap(down, Ordering::Relaxed) {
                    if down {
                        tracing::warn!("postgres unreachable: not ready, failing fast");
                    } else {
                        tracing::info!("postgres reachable again");
                    }
                }
            }
            self.publish(&metrics);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(PING_EVERY) => {}
            }
        }
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state.readiness.publish(&state.metrics);
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let report = state.readiness.report();
    let degraded = if report.degraded.is_empty() {
        String::new()
    } else {
        format!(" (degraded: {})", report.degraded.join("; "))
    };
    if report.problems.is_empty() {
        (StatusCode::OK, format!("ready{degraded}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}{degraded}\n", report.problems.join("; ")),
        )
    }
}

/// A bound admin port, not yet serving.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl AdminServer {
    /// Binds the admin port (port 0 picks a free one).
    ///
    /// # Errors
    ///
    /// When the address is taken or invalid.
    pub async fn bind(addr: &str) -> Result<Self, StartError> {
        let (listener, addr) = crate::net::bind(addr).await?;
        Ok(Self { listener, addr })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`.
    pub async fn serve(self, metrics: Metrics, readiness: Readiness, shutdown: CancellationToken) {
        let app = Router::new()
            .route("/metrics", get(render_metrics))
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .with_state(AdminState { metrics, readiness });
        let result = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "admin server failed");
        }
    }
}
