//! order-service: event-sourced orders with CQRS read models.
//!
//! Layout: [`config`] (settings), [`app`] (composition and lifecycle),
//! [`grpc`] (proto <-> domain, `Status` mapping), [`commands`] (load, decide, append), [`queries`]
//! and [`projections`] (read models), [`history`] (audit trail and time
//! travel), [`integration`] (`order.*` events for the outbox relay).

pub mod app;
mod cache;
pub mod commands;
pub mod config;
pub mod grpc;
pub mod history;
pub mod integration;
pub mod projections;
pub mod proto;
pub mod queries;
pub mod wire;

pub use app::Application;
pub use config::Settings;
