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

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] Box<figment::Error>),
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Other(String),
}
