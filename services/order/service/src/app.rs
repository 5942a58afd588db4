//! Composition root and lifecycle of order-service.

use std::{net::SocketAddr, time::Duration};

use contracts::order::v1::order_service_server::OrderServiceServer;
use std::sync::Arc;

use es_postgres::{EventStore, Relay, RelayConfig, projection, tail::TailConfig};
use platform::StartError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;

use crate::{
    Settings,
    auth::Authenticator,
    commands::OrderCommands,
    grpc::OrderApi,
    integration::OrderEvents,
    projections::{OrderSummary, OrdersByUser},
    queries::ReadModels,
};

/// A built, not yet running order-service: its port is bound, its database
/// migrated and its stream declared.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    api: OrderApi,
    relay: Relay<OrderEvents>,
    pool: sqlx::PgPool,
    database_url: String,
}

impl Application {
    /// # Errors
    ///
    /// Fails when Postgres or NATS stay unreachable past the start-up wait,
    /// a migration fails, a URL is invalid, or the port is taken.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let wait = Duration::from_secs(settings.startup_wait_secs);
        let pool = platform::db::pool(&settings.database_url, settings.database_max_connections)?;
        platform::db::migrate(
            &pool,
            vec![es_postgres::migrator(), sqlx::migrate!("./migrations")],
            wait,
        )
        .await?;
        let (_client, js) =
            platform::nats::connect(&settings.nats_url, "order-service", wait).await?;
        messaging::ensure_stream(&js, messaging::ORDERS_STREAM, &settings.streams)
            .await
            .map_err(|e| StartError::Nats(e.to_string()))?;
        let relay = Relay::new(
            settings.database_url.clone(),
            js,
            OrderEvents,
            RelayConfig::new("order-events"),
        );
        let auth = Authenticator::new(
            &settings.user_service_url,
            Duration::from_millis(settings.user_service_timeout_ms),
        )?;
        let commands = OrderCommands::new(EventStore::new(pool.clone()), settings.snapshot_every);
        let reads = ReadModels::new(
            pool.clone(),
            Duration::from_millis(settings.read_your_writes_timeout_ms),
        );
        let api = OrderApi::new(commands, reads, auth);
        let (listener, addr) = platform::grpc::bind(&settings.grpc_addr).await?;
        Ok(Self {
            listener,
            addr,
            api,
            relay,
            pool,
            database_url: settings.database_url,
        })
    }

    /// The bound gRPC address (useful with port 0).
    #[must_use]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves gRPC and runs the outbox relay and the projections until
    /// `shutdown` fires.
    ///
    /// # Errors
    ///
    /// Fails when the gRPC transport fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(addr = %self.addr, "order-service serving");
        let relay = tokio::spawn(self.relay.run(shutdown.clone()));
        let projection_config = TailConfig {
            poll_interval: Duration::from_millis(250),
            ..TailConfig::default()
        };
        let projections = [
            tokio::spawn(projection::run(
                self.pool.clone(),
                self.database_url.clone(),
                Arc::new(OrderSummary),
                projection_config.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(projection::run(
                self.pool.clone(),
                self.database_url.clone(),
                Arc::new(OrdersByUser),
                projection_config,
                shutdown.clone(),
            )),
        ];
        let result = platform::grpc::serve(
            tonic::service::Routes::new(OrderServiceServer::new(self.api)),
            OrderServiceServer::<OrderApi>::NAME,
            self.listener,
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        if let Err(error) = relay.await {
            tracing::error!(%error, "outbox relay task failed");
        }
        for task in projections {
            if let Err(error) = task.await {
                tracing::error!(%error, "projection task failed");
            }
        }
        result
    }
}
