//! user-service settings: defaults overridden by `APP_...` variables.

use messaging::StreamLimits;
use platform::config::Secret;
use serde::{Deserialize, Serialize};

use crate::throttle::ThrottleSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub auth: AuthSettings,
    /// How long start-up waits for Postgres and NATS.
    pub startup_wait_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthSettings {
    /// `APP_AUTH__SIGNING_KEY`: HMAC-SHA256 key for access tokens, at least
    /// 32 bytes. Empty (and no file) means a random key per process (tokens
    /// die with it), which is only fit for the local stack.
    pub signing_key: Secret,
    /// `APP_AUTH__SIGNING_KEY_FILE`: read the key from this file instead
    /// (a mounted Kubernetes secret).
    pub signing_key_file: Option<String>,
    /// `APP_AUTH__KEY_ID`: the `kid` tokens are signed with.
    pub key_id: String,
    /// `APP_AUTH__VERIFICATION_KEYS`: older keys still accepted while tokens
    /// signed with them are alive, as `kid=key,kid=key`.
    pub verification_keys: Secret,
    pub token_ttl_secs: u64,
    pub issuer: String,
    /// `APP_AUTH__THROTTLE__*`: failed sign-in throttling (ADR 0012).
    pub throttle: ThrottleSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50051".to_owned(),
            database_url: platform::config::DatabaseUrl::new(
                "postgres://postgres@127.0.0.1:5432/shop_users",
            ),
            database_max_connections: 10,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            streams: StreamLimits::default(),
            admin_addr: "127.0.0.1:9091".to_owned(),
            tls: platform::tls::ServerTls::default(),
            auth: AuthSettings {
                signing_key: Secret::default(),
                signing_key_file: None,
                key_id: "k1".to_owned(),
                verification_keys: Secret::default(),
                token_ttl_secs: 3600,
                issuer: "shop.user-service".to_owned(),
                throttle: ThrottleSettings::default(),
            },
            startup_wait_secs: 30,
        }
    }
}
