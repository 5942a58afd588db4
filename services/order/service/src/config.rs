//! order-service settings: defaults overridden by `APP_...` variables.

use messaging::StreamLimits;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// `APP_GRPC_ADDR`; port 0 picks a free one.
    pub grpc_addr: String,
    /// `APP_DATABASE_URL`.
    pub database_url: String,
    pub database_max_connections: u32,
    /// `APP_NATS_URL`.
    pub nats_url: String,
    pub streams: StreamLimits,
    /// `APP_USER_SERVICE_URL`: where tokens are validated.
    pub user_service_url: String,
    /// Deadline of each call to user-service.
    pub user_service_timeout_ms: u64,
    /// `APP_SNAPSHOT_EVERY`: store an aggregate snapshot every N events.
    pub snapshot_every: i64,
    /// Longest a query waits for its `min_position` (read-your-writes).
    pub read_your_writes_timeout_ms: u64,
    /// How long start-up waits for Postgres and NATS.
    pub startup_wait_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50052".to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/shop_orders".to_owned(),
            database_max_connections: 10,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            streams: StreamLimits::default(),
            user_service_url: "http://127.0.0.1:50051".to_owned(),
            user_service_timeout_ms: 2000,
            snapshot_every: 50,
            read_your_writes_timeout_ms: 3000,
            startup_wait_secs: 30,
        }
    }
}
