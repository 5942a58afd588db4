//! notification-service settings: defaults overridden by `APP_...` variables.

use messaging::StreamLimits;
use platform::client::ClientSettings;
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
    /// `APP_ADMIN_ADDR`: `/metrics`, `/livez`, `/readyz`.
    pub admin_addr: String,
    /// `APP_USER_SERVICE__URL`, ...: where callers' tokens are validated.
    pub user_service: ClientSettings,
    /// `APP_TOKEN_CACHE_SECS`: how long a validated token is trusted.
    pub token_cache_secs: u64,
    /// Prefix of the durable consumer names (one per subscribed stream).
    pub consumer_prefix: String,
    /// Seconds the server waits for an ack before redelivering.
    pub ack_wait_secs: u64,
    /// Deliveries before JetStream stops redelivering a message.
    pub max_deliver: i64,
    /// How long start-up waits for Postgres and NATS.
    pub startup_wait_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50053".to_owned(),
            database_url: "postgres://postgres@127.0.0.1:5432/shop_notifications".to_owned(),
            database_max_connections: 10,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            streams: StreamLimits::default(),
            admin_addr: "127.0.0.1:9093".to_owned(),
            user_service: platform::auth::default_user_service(),
            token_cache_secs: 30,
            consumer_prefix: "notification-service".to_owned(),
            ack_wait_secs: 30,
            max_deliver: 10,
            startup_wait_secs: 30,
        }
    }
}
