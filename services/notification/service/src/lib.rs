//! notification-service: consumes `user.*` and `order.*` integration events
//! from durable JetStream consumers and records (and delivers) one
//! notification per event and channel.
//!
//! Layout: [`config`], [`app`] (composition and lifecycle), [`consumer`]
//! (JetStream -> deliveries, retries, dead letters), [`channels`] (log,
//! SMTP, webhooks), [`store`] (Postgres), [`grpc`] (queries, webhooks),
//! [`watch`] (live notifications).

pub mod app;
pub mod channels;
pub mod config;
pub mod consumer;
pub mod egress;
pub mod grpc;
pub mod store;
pub mod watch;

pub use app::Application;
pub use config::Settings;
