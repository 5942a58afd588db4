//! Composition root and lifecycle of user-service.

use std::{net::SocketAddr, time::Duration};

use contracts::user::v1::user_service_server::UserServiceServer;
use es_postgres::{Relay, RelayConfig};
use platform::StartError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;

use crate::{
    Settings, auth::TokenIssuer, config::AuthSettings, grpc::UserApi, integration::UserEvents,
    store::UserStore,
};

/// A built, not yet running user-service: its port is bound, its database
/// migrated and its stream declared.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    api: UserApi,
    relay: Relay<UserEvents>,
}

impl Application {
    /// # Errors
    ///
    /// Fails when Postgres or NATS stay unreachable past the start-up wait,
    /// a migration fails, the signing key is too short, or the port is taken.
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
            platform::nats::connect(&settings.nats_url, "user-service", wait).await?;
        messaging::ensure_stream(&js, messaging::USERS_STREAM, &settings.streams)
            .await
            .map_err(|e| StartError::Nats(e.to_string()))?;
        let relay = Relay::new(
            settings.database_url.clone(),
            js,
            UserEvents,
            RelayConfig::new("user-events"),
        );
        let api = UserApi::new(UserStore::new(pool), token_issuer(&settings.auth)?);
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
        tracing::info!(addr = %self.addr, "user-service serving");
        let relay = tokio::spawn(self.relay.run(shutdown.clone()));
        let result = platform::grpc::serve(
            tonic::service::Routes::new(UserServiceServer::new(self.api)),
            UserServiceServer::<UserApi>::NAME,
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

fn token_issuer(auth: &AuthSettings) -> Result<TokenIssuer, StartError> {
    let ttl = chrono::Duration::seconds(i64::try_from(auth.token_ttl_secs).unwrap_or(3600));
    let key = auth.signing_key.expose().as_bytes().to_vec();
    let key = if key.is_empty() {
        tracing::warn!(
            "APP_AUTH__SIGNING_KEY is not set: using a random key; tokens die with this process"
        );
        use rand::RngCore as _;
        let mut key = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        key
    } else if key.len() < 32 {
        return Err(StartError::Other(
            "APP_AUTH__SIGNING_KEY must be at least 32 bytes".to_owned(),
        ));
    } else {
        key
    };
    Ok(TokenIssuer::new(&auth.key_id, &key, &auth.issuer, ttl))
}
