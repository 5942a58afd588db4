//! notification-service: consumes `user.*` and `order.*` integration events
//! from durable JetStream consumers and records (and delivers) one
//! notification per event and channel.
//!
//! Layout: [`config`], [`app`] (composition and lifecycle), [`consumer`]
//! (JetStream -> domain), [`store`] (Postgres), [`grpc`] (queries).

pub mod app;
pub mod config;
pub mod consumer;
pub mod grpc;
pub mod store;

pub use app::Application;
pub use config::Settings;
