//! Composition root and lifecycle of order-service.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use contracts::order::v1::order_service_server::OrderServiceServer;
use es_postgres::{
    EventStore, Relay, RelayConfig, projection,
    tail::{SharedReads, TailConfig},
};
use platform::{
    StartError,
    admin::{AdminServer, Readiness},
    auth::Authenticator,
    metrics::Metrics,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;

use crate::{
    Settings,
    commands::OrderCommands,
    grpc::OrderApi,
    integration::OrderEvents,
    projections::{OrderSummary, OrdersByUser},
    queries::ReadModels,
};

/// A built, not yet running order-service: its ports are bound, its database
/// migrated and its stream declared.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    admin: AdminServer,
    api: OrderApi,
    relay: Relay<OrderEvents>,
    pool: sqlx::PgPool,
    database_url: platform::config::DatabaseUrl,
    shared_reads: SharedReads,
    metrics: Metrics,
    readiness: Readiness,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Application {
    /// # Errors
    ///
    /// Fails when Postgres or NATS stay unreachable past the start-up wait,
    /// a migration fails, a URL is invalid, or a port is taken.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let wait = Duration::from_secs(settings.startup_wait_secs);
        let pool = platform::db::pool(
            settings.database_url.expose(),
            settings.database_max_connections,
        )?;
        platform::db::migrate(
            &pool,
            vec![es_postgres::migrator(), sqlx::migrate!("./migrations")],
            wait,
        )
        .await?;
        let (nats, js) = platform::nats::connect(&settings.nats_url, "order-service", wait).await?;
        messaging::declare_stream(&js, messaging::ORDERS_STREAM, &settings.streams)
            .await
            .map_err(|e| StartError::nats(&settings.nats_url, e))?;
        let metrics = Metrics::new();
        metrics.set_build_info("order-service", env!("CARGO_PKG_VERSION"));
        // The relay and both projections read the same events: one read
        // serves the three (see `tail::SharedReads`).
        let shared_reads = SharedReads::new(settings.database_url.expose());
        let mut relay_config = RelayConfig::new("order-events");
        relay_config.tail.shared_reads = Some(shared_reads.clone());
        let relay = Relay::new(
            settings.database_url.expose(),
            js,
            OrderEvents,
            relay_config,
        )
        .with_metrics(metrics.clone());
        let auth = Authenticator::new(
            &settings.user_service,
            Duration::from_secs(settings.token_cache_secs),
            &metrics,
        )?;
        let readiness = Readiness::new()
            .postgres(pool.clone())
            .nats(nats)
            .breaker(auth.breaker().clone());
        let mut store = EventStore::new(pool.clone());
        if settings.append_writers > 0 {
            store = store.with_group_commit(settings.append_writers, settings.append_batch);
        }
        let commands = OrderCommands::new(store, settings.snapshot_every)
            .with_metrics(metrics.clone())
            .with_cache(settings.aggregate_cache);
        let reads = ReadModels::new(
            pool.clone(),
            Duration::from_millis(settings.read_your_writes_timeout_ms),
        );
        let api = OrderApi::new(commands, reads, auth);
        let (listener, addr) = platform::net::bind(&settings.grpc_addr).await?;
        let admin = AdminServer::bind(&settings.admin_addr).await?;
        let tls = settings.tls.config()?;
        Ok(Self {
            listener,
            addr,
            admin,
            api,
            relay,
            pool,
            database_url: settings.database_url,
            shared_reads,
            metrics,
            readiness,
            tls,
        })
    }

    /// The bound gRPC address (useful with port 0).
    #[must_use]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound admin address (`/metrics`, `/livez`, `/readyz`).
    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// Serves gRPC and the admin port, and runs the outbox relay and the
    /// projections, until `shutdown` fires.
    ///
    /// # Errors
    ///
    /// Fails when the gRPC transport fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(addr = %self.addr, admin = %self.admin.addr(), "order-service serving");
        let projection_config = TailConfig {
            poll_interval: Duration::from_millis(250),
            metrics: Some(self.metrics.clone()),
            shared_reads: Some(self.shared_reads),
            ..TailConfig::default()
        };
        let background = vec![
            tokio::spawn(platform::metrics::sample_pool(
                self.metrics.clone(),
                self.pool.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(self.relay.run(shutdown.clone())),
            tokio::spawn(projection::run(
                self.pool.clone(),
                self.database_url.expose().to_owned(),
                Arc::new(OrderSummary),
                projection_config.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(projection::run(
                self.pool,
                self.database_url.expose().to_owned(),
                Arc::new(OrdersByUser),
                projection_config,
                shutdown.clone(),
            )),
        ];
        platform::grpc::Service {
            routes: tonic::service::Routes::new(OrderServiceServer::new(self.api)),
            name: OrderServiceServer::<OrderApi>::NAME,
            listener: self.listener,
            admin: self.admin,
            metrics: self.metrics.clone(),
            readiness: self.readiness,
            tls: self.tls,
            background,
        }
        .run(shutdown)
        .await
    }
}
