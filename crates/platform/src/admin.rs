//! The admin HTTP port every service serves beside gRPC: `/metrics`
//! (Prometheus), `/livez` (the process is up) and `/readyz` (its
//! dependencies are usable).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{StartError, metrics::Metrics};

/// Whether a service can do its work; `/readyz` and the gRPC health service
/// report it.
#[derive(Clone, Default)]
pub struct Readiness {
    pool: Option<sqlx::PgPool>,
    nats: Option<async_nats::Client>,
    breakers: Vec<Arc<resilience::CircuitBreaker>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("postgres", &self.pool.is_some())
            .field("nats", &self.nats.is_some())
            .field("breakers", &self.breakers.len())
            .finish()
    }
}

impl Readiness {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Postgres must answer.
    #[must_use]
    pub fn postgres(mut self, pool: sqlx::PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// NATS must be connected.
    #[must_use]
    pub fn nats(mut self, client: async_nats::Client) -> Self {
        self.nats = Some(client);
        self
    }

    /// A breaker that must not be open.
    #[must_use]
    pub fn breaker(mut self, breaker: Arc<resilience::CircuitBreaker>) -> Self {
        self.breakers.push(breaker);
        self
    }

    /// What is wrong, or empty if ready.
    pub async fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(pool) = &self.pool {
            let ping = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query("SELECT 1").execute(pool),
            )
            .await;
            if !matches!(ping, Ok(Ok(_))) {
                problems.push("postgres unreachable".to_owned());
            }
        }
        if let Some(nats) = &self.nats
            && nats.connection_state() != async_nats::connection::State::Connected
        {
            problems.push("nats disconnected".to_owned());
        }
        for breaker in &self.breakers {
            if breaker.state() == resilience::State::Open {
                problems.push(format!("circuit breaker to {} is open", breaker.name()));
            }
        }
        problems
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
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
    let problems = state.readiness.problems().await;
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
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
        let (listener, addr) = crate::grpc::bind(addr).await?;
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
