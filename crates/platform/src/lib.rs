//! What every service needs and no business rule touches: configuration,
//! telemetry, the gRPC server kit (health, reflection, graceful shutdown),
//! the error-to-`Status` mapping helpers, and connections to Postgres and NATS.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod grpc;
pub mod hex;
pub mod metrics;
pub mod nats;
pub mod net;
pub mod paging;
pub mod ports;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod trace;

/// Any error, boxed, as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a service could not start. Every variant carries its cause.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] Box<figment::Error>),
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("nats at {url}: {source}")]
    Nats {
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// A setting that cannot be used: which one, and why.
    #[error("{setting}: {source}")]
    Setting {
        setting: String,
        #[source]
        source: BoxError,
    },
}

impl StartError {
    /// A setting (named as in the environment) that cannot be used.
    pub fn setting(setting: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Setting {
            setting: setting.into(),
            source: source.into(),
        }
    }

    /// NATS at `url` could not be reached or refused a declaration.
    pub fn nats(url: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Nats {
            url: url.into(),
            source: source.into(),
        }
    }
}
