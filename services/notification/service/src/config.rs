//! notification-service settings: defaults overridden by `APP_...` variables.

use messaging::StreamLimits;
use platform::{client::ClientSettings, config::Secret};
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
    /// `APP_USER_SERVICE__URL`, ...: where callers' tokens are validated.
    pub user_service: ClientSettings,
    /// `APP_TOKEN_CACHE_SECS`: how long a validated token is trusted.
    pub token_cache_secs: u64,
    /// `APP_CHANNELS`: enabled channels, comma-separated: `log`, `email`, `webhook`.
    pub channels: String,
    pub smtp: SmtpSettings,
    /// Deadline of one webhook POST.
    pub webhook_timeout_ms: u64,
    /// `APP_WEBHOOK_ALLOWED_NETWORKS`: addresses or CIDR blocks webhooks may
    /// reach although not public (`127.0.0.0/8,::1` for local receivers);
    /// empty by default: public addresses only.
    pub webhook_allowed_networks: String,
    /// Prefix of the durable consumer names (one per subscribed stream).
    pub consumer_prefix: String,
    /// Seconds the server waits for an ack before redelivering.
    pub ack_wait_secs: u64,
    /// `APP_MAX_DELIVER`: failed attempts of one message before it is
    /// dead-lettered (waiting for its order's previous event is not a failure).
    pub max_deliver: i64,
    /// `APP_MAX_WAIT_SECS`: how long a message may wait for its order's
    /// previous event (from when it was published) before it is
    /// dead-lettered as "waited too long".
    pub max_wait_secs: u64,
    /// `APP_CONSUMER_LANES`: messages handled at once per consumer, in
    /// parallel across orders (one order's messages always share a lane).
    /// Each lane commits its own batches: fewer lanes make fewer, larger
    /// transactions; more keep one slow endpoint from holding up more
    /// orders (ADR 16).
    pub consumer_lanes: usize,
    /// `APP_CONSUMER_BATCH`: most messages one lane handles in one
    /// transaction (it takes what has queued up, so one when idle).
    pub consumer_batch: usize,
    /// Redelivery delays: capped exponential backoff with full jitter.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// `APP_LIMITS__*`: per-user caps.
    pub limits: UserLimits,
    /// Fault injection for chaos tests; zero in production.
    pub faults: Faults,
    /// How long start-up waits for Postgres and NATS.
    pub startup_wait_secs: u64,
}

/// What one user may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserLimits {
    /// `APP_LIMITS__WEBHOOKS_PER_USER`: registered (not deleted) webhooks.
    pub webhooks_per_user: u32,
    /// `APP_LIMITS__WATCHES_PER_USER`: open `WatchNotifications` streams,
    /// per replica.
    pub watches_per_user: u32,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            webhooks_per_user: 10,
            watches_per_user: 4,
        }
    }
}

/// `APP_SMTP__...`: the mail server for the email channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// `From:` of every mail.
    pub from: String,
    pub username: String,
    pub password: Secret,
    /// Require STARTTLS (off for a local relay).
    pub starttls: bool,
    pub timeout_ms: u64,
}

/// `APP_FAULTS__...`: deliberate slowness for chaos tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Sleep between recording a delivery and acking the message (the
    /// window a crash test kills the process in).
    pub pause_before_ack_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: "127.0.0.1:50053".to_owned(),
            database_url: platform::config::DatabaseUrl::new(
                "postgres://postgres@127.0.0.1:5432/shop_notifications",
            ),
            database_max_connections: 24,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            streams: StreamLimits::default(),
            admin_addr: "127.0.0.1:9093".to_owned(),
            tls: platform::tls::ServerTls::default(),
            user_service: platform::auth::default_user_service(),
            token_cache_secs: 30,
            channels: "log,webhook".to_owned(),
            smtp: SmtpSettings {
                host: "127.0.0.1".to_owned(),
                port: 25,
                from: "shop@localhost".to_owned(),
                username: String::new(),
                password: Secret::default(),
                starttls: false,
                timeout_ms: 10_000,
            },
            webhook_timeout_ms: 5000,
            webhook_allowed_networks: String::new(),
            consumer_prefix: "notification-service".to_owned(),
            ack_wait_secs: 30,
            max_deliver: 8,
            max_wait_secs: 600,
            consumer_lanes: 2,
            consumer_batch: 64,
            limits: UserLimits::default(),
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            faults: Faults::default(),
            startup_wait_secs: 30,
        }
    }
}

impl Settings {
    /// Whether `channel` (`log`, `email`, `webhook`) is enabled.
    #[must_use]
    pub fn channel_enabled(&self, channel: &str) -> bool {
        self.channels
            .split(',')
            .any(|c| c.trim().eq_ignore_ascii_case(channel))
    }
}
