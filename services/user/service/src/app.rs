//! Composition root and lifecycle of user-service.

use std::{net::SocketAddr, time::Duration};

use contracts::user::v1::user_service_server::UserServiceServer;
use es_postgres::{Relay, RelayConfig};
use platform::{
    StartError,
    admin::{AdminServer, Readiness},
    metrics::Metrics,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService as _;

use crate::{
    Settings, auth::TokenIssuer, config::AuthSettings, grpc::UserApi, integration::UserEvents,
    store::UserStore, throttle::SignInThrottle,
};

/// A built, not yet running user-service: its ports are bound, its database
/// migrated and its stream declared.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    admin: AdminServer,
    api: UserApi,
    relay: Relay<UserEvents>,
    metrics: Metrics,
    readiness: Readiness,
    tls: Option<tonic::transport::ServerTlsConfig>,
    pool: sqlx::PgPool,
    throttle: SignInThrottle,
}

impl Application {
    /// # Errors
    ///
    /// Fails when Postgres or NATS stay unreachable past the start-up wait,
    /// a migration fails, a signing key is invalid, or a port is taken.
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
        let (nats, js) = platform::nats::connect(&settings.nats_url, "user-service", wait).await?;
        messaging::declare_stream(&js, messaging::USERS_STREAM, &settings.streams)
            .await
            .map_err(|e| StartError::nats(&settings.nats_url, e))?;
        let metrics = Metrics::new();
        metrics.set_build_info("user-service", env!("CARGO_PKG_VERSION"));
        let relay = Relay::new(
            settings.database_url.expose(),
            js,
            UserEvents,
            RelayConfig::new("user-events"),
        )
        .with_metrics(metrics.clone());
        let auth = &settings.auth;
        let (tokens, signing_key) = token_issuer(auth)?;
        let throttle = SignInThrottle::new(pool.clone(), auth.throttle.clone(), &signing_key)
            .map_err(|e| StartError::setting("APP_AUTH__THROTTLE__*", e))?;
        let api = UserApi::new(
            UserStore::new(pool.clone()),
            tokens,
            throttle.clone(),
            crate::hashing::HashPool::per_core(),
            metrics.clone(),
        );
        let readiness = Readiness::new().postgres(pool.clone()).nats(nats);
        let (listener, addr) = platform::net::bind(&settings.grpc_addr).await?;
        let admin = AdminServer::bind(&settings.admin_addr).await?;
        let tls = settings.tls.config()?;
        Ok(Self {
            listener,
            addr,
            admin,
            api,
            relay,
            metrics,
            pool,
            readiness,
            tls,
            throttle,
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

    /// Serves gRPC and the admin port and runs the outbox relay until
    /// `shutdown` fires.
    ///
    /// # Errors
    ///
    /// Fails when the gRPC transport fails.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        tracing::info!(addr = %self.addr, admin = %self.admin.addr(), "user-service serving");
        platform::grpc::Service {
            routes: tonic::service::Routes::new(UserServiceServer::new(self.api)),
            name: UserServiceServer::<UserApi>::NAME,
            listener: self.listener,
            admin: self.admin,
            metrics: self.metrics.clone(),
            readiness: self.readiness,
            tls: self.tls,
            background: vec![
                tokio::spawn(self.relay.run(shutdown.clone())),
                tokio::spawn(
                    self.throttle
                        .prune_until_stopped(Duration::from_secs(60), shutdown.clone()),
                ),
                tokio::spawn(platform::metrics::sample_pool(
                    self.metrics.clone(),
                    self.pool,
                    shutdown.clone(),
                )),
            ],
        }
        .run(shutdown)
        .await
    }
}

const MIN_KEY_BYTES: usize = 32;

fn check_key(what: &str, key: &[u8]) -> Result<(), StartError> {
    if key.len() < MIN_KEY_BYTES {
        return Err(StartError::setting(
            what,
            format!("must be at least {MIN_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// The signing key (from the file if one is named, else the variable, else
/// random) and the older verification keys; also the signing key itself.
fn token_issuer(auth: &AuthSettings) -> Result<(TokenIssuer, Vec<u8>), StartError> {
    let ttl = chrono::Duration::seconds(i64::try_from(auth.token_ttl_secs).unwrap_or(3600));
    let key = match &auth.signing_key_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| StartError::setting(format!("APP_AUTH__SIGNING_KEY_FILE {path}"), e))?
            .trim()
            .as_bytes()
            .to_vec(),
        None => auth.signing_key.expose().as_bytes().to_vec(),
    };
    let key = if key.is_empty() {
        tracing::warn!(
            "no signing key configured: using a random key; tokens die with this process"
        );
        use rand::RngCore as _;
        let mut key = vec![0u8; MIN_KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut key);
        key
    } else {
        check_key("the signing key", &key)?;
        key
    };
    let mut issuer = TokenIssuer::new(&auth.key_id, &key, &auth.issuer, ttl);
    for entry in auth
        .verification_keys
        .expose()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (kid, key) = entry.split_once('=').ok_or_else(|| {
            StartError::setting("APP_AUTH__VERIFICATION_KEYS", "must be kid=key,kid=key")
        })?;
        check_key(&format!("verification key {kid}"), key.as_bytes())?;
        issuer = issuer.with_verification_key(kid.trim(), key.as_bytes());
    }
    Ok((issuer, key))
}
