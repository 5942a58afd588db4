//! Integration tests against real Postgres and a real nats-server (one test
//! binary for the whole workspace: one link, shared test kit).
//!
//! Run with `scripts/test`, which makes sure both servers are available.

mod balancing;
mod cluster;
mod deploy;
mod e2e;
mod fuzz;
mod group_commit;
mod helpers;
mod hostile;
mod notification_api;
mod notifications;
mod observability;
mod order_api;
mod orders;
mod relay;
mod schema;
mod shared_reads;
mod sign_in;
mod streams;
mod user_api;
