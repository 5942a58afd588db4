//! Failure handling shared by every service, with no I/O of its own:
//! capped exponential [`Backoff`] with full jitter (gRPC retries, relay and
//! projection restarts, consumer redelivery delays: one implementation),
//! a [`RetryBudget`] that keeps retries to a fraction of calls, and a
//! [`CircuitBreaker`] per downstream.
//!
//! Time comes from `tokio::time`, so tests run with paused time.

mod backoff;
mod breaker;
mod budget;

pub use backoff::{Backoff, Jitter};
pub use breaker::{BreakerConfig, BreakerOpen, CircuitBreaker, Outcome, Permit, State};
pub use budget::RetryBudget;
