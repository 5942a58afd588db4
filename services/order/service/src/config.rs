//! order-service settings: defaults overridden by `APP_...` variables.

use messaging::StreamLimits;
use platform::client::ClientSettings;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// `APP_GRPC_ADDR`; port 0 picks a free one.
    pub grpc_addr: String,
    /// `APP_DATABASE_URL`.
    pub database_url: platform::config::DatabaseUrl,
    pub database_max_connections: u32,
    /// `APP_NATS_URL`.
    pub nats_url: String,
    pub streams: StreamLimits,
    /// `APP_ADMIN_ADDR`: `/metrics`, `/livez`, `/readyz`.
    pub admin_addr: String,
    /// `APP_TLS__CERT_FILE` / `__KEY_FILE` / `__CLIENT_CA_FILE`: TLS (and
    /// mutual TLS) on the gRPC port; unset: plaintext.
    pub tls: platform::tls::ServerTls,
    /// `APP_USER_SERVICE__URL`, `__TIMEOUT_MS`, `__BREAKER_...`: where and
    /// how tokens are validated.
    pub user_service: ClientSettings,
    /// `APP_TOKEN_CACHE_SECS`: how long a validated token is trusted.
    pub token_cache_secs: u64,
    /// `APP_SNAPSHOT_EVERY`: store an aggregate snapshot every N events.
    pub snapshot_every: i64,
    /// `APP_APPEND_WRITERS`: concurrent appends; commands that queue behind
    /// them are group-committed, up to `APP_APPEND_BATCH` per statement.
    /// 0 turns group commit off (one statement per command). One writer
    /// makes the largest batches; more help only a Postgres with cores to
    /// spare (ADR 16).
    pub append_writers: usize,
    pub append_batch: usize,
    /// `APP_AGGREGATE_CACHE`: orders whose latest state a replica keeps, so
    /// commands on them skip the load (0: none).
    pub aggregate_cache: usize,
    /// Longest a query waits for its `min_position` (read-your-writes).
    pub read_your_writes_timeout_ms: u64,
    /// How long start-up waits for Postgres and NATS.
    pub startup_wait_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50052".to_owned(),
            database_url: platform::config::DatabaseUrl::new(
                "postgres://postgres@127.0.0.1:5432/shop_orders",
            ),
            database_max_connections: 20,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            streams: StreamLimits::default(),
            admin_addr: "127.0.0.1:9092".to_owned(),
            tls: platform::tls::ServerTls::default(),
            user_service: platform::auth::default_user_service(),
            token_cache_secs: 30,
            snapshot_every: 50,
            append_writers: 1,
            append_batch: 128,
            aggregate_cache: 10_000,
            read_your_writes_timeout_ms: 3000,
            startup_wait_secs: 30,
        }
    }
}
