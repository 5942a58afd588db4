//! user-service: users, credentials (argon2id) and access tokens.
//!
//! Layout: [`config`] (settings), [`app`] (composition and lifecycle),
//! [`grpc`] (proto <-> domain, `Status` mapping), [`store`] (Postgres),
//! [`auth`] (password hashing and tokens), [`throttle`] (failed sign-ins),
//! [`integration`] (`user.*` events
//! for the outbox relay).

pub mod app;
pub mod auth;
pub mod config;
pub mod grpc;
pub mod hashing;
pub mod integration;
pub mod store;
pub mod throttle;

pub use app::Application;
pub use config::Settings;
