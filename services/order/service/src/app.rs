//! Composition root and lifecycle of order-service.

use std::{net::SocketAddr, time::Duration};

use contracts::order::v1::order_service_server::OrderServiceServer;
use es_postgres::{EventStore, Relay, RelayConfig};
use platform::StartError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;

use crate::{Settings, auth::Authenticator, grpc::OrderApi, integration::OrderEvents};

/// A built, not yet running order-service: its port is bound, its database
/// migrated and its stream declared.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    api: OrderApi,
    relay: Relay,
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
        let api = OrderApi::new(EventStore::new(pool), auth);
        let (listener, addr) = platform::grpc::bind(&settings.grpc_addr).await?;
        Ok(Self {
            listener,
            addr,
            api,
            relay,
        })
    }

    /// The bound gRPC address (useful with port 0).
    #[must_use]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves gRPC and runs the outbox relay until `shutdown` fires.
    ///
    /// # Errors
    ///
    /// Fails when the gRPC transport fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(addr = %self.addr, "order-service serving");
        let relay = tokio::spawn(self.relay.run(shutdown.clone()));
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
        result
    }
}
