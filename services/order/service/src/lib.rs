//! order-service: order commands and queries over an event-sourced store.
//!
//! Layout: [`config`] (settings), [`app`] (composition and lifecycle),
//! [`grpc`] (proto <-> domain, `Status` mapping), [`auth`] (token check
//! against user-service), [`integration`] (`order.*` events for the outbox
//! relay).

pub mod app;
pub mod auth;
pub mod config;
pub mod grpc;
pub mod integration;

pub use app::Application;
pub use config::Settings;
