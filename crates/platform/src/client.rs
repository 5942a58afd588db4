//! The client stack for calls between services: a deadline on every call
//! (the caller's remaining deadline, passed on), retries of retryable codes
//! only, with capped jittered backoff inside a retry budget, all behind a
//! circuit breaker per downstream.

use std::{future::Future, sync::Arc, time::Duration};

use resilience::{Backoff, BreakerConfig, CircuitBreaker, Outcome, RetryBudget};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::metrics::Metrics;

/// Settings of the client of one downstream (`APP_<DOWNSTREAM>__...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSettings {
    /// e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Deadline of a whole call, retries included, when the caller gave none.
    pub timeout_ms: u64,
    /// Deadline of one attempt.
    pub per_try_timeout_ms: u64,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Retries allowed per 100 calls (beyond a small reserve).
    pub retry_budget_percent: u32,
    pub breaker_failure_threshold: u32,
    pub breaker_open_ms: u64,
    pub breaker_half_open_max_calls: u32,
    pub breaker_success_threshold: u32,
    pub breaker_trial_timeout_ms: u64,
    /// `…__TLS__*`: see [`crate::tls`].
    pub tls: crate::tls::ClientTls,
}

impl ClientSettings {
    /// Defaults for a downstream at `url`.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout_ms: 2000,
            per_try_timeout_ms: 800,
            max_attempts: 3,
            backoff_base_ms: 25,
            backoff_max_ms: 400,
            retry_budget_percent: 10,
            breaker_failure_threshold: 5,
            breaker_open_ms: 5000,
            breaker_half_open_max_calls: 1,
            breaker_success_threshold: 1,
            breaker_trial_timeout_ms: 500,
            tls: crate::tls::ClientTls::default(),
        }
    }
}

/// Whether a failed attempt may be retried. UNAVAILABLE always (the call
/// did not run); the rest only for idempotent methods. A connection reset
/// mid-call surfaces from tonic as UNKNOWN ("transport error") or CANCELLED,
/// so those count as retryable transport failures too.
#[must_use]
pub fn retryable(code: Code, idempotent: bool) -> bool {
    match code {
        Code::Unavailable => true,
        Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unknown
        | Code::Cancelled => idempotent,
        _ => false,
    }
}

/// Whether the downstream is sick (counts against the breaker). Client
/// errors such as NOT_FOUND or UNAUTHENTICATED mean it is working. We never
/// cancel our own calls (a timeout is DEADLINE_EXCEEDED), so CANCELLED means
/// the connection went away.
#[must_use]
pub fn is_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
            | Code::ResourceExhausted
    )
}

/// The policy around every call to one downstream.
#[derive(Debug, Clone)]
pub struct CallPolicy {
    downstream: String,
    timeout: Duration,
    per_try_timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    budget: Arc<RetryBudget>,
    breaker: Arc<CircuitBreaker>,
}

impl CallPolicy {
    /// Builds the policy; the breaker's state goes to `metrics` on every
    /// transition.
    #[must_use]
    pub fn new(downstream: &str, settings: &ClientSettings, metrics: &Metrics) -> Self {
        let ms = Duration::from_millis;
        let gauge = metrics.clone();
        gauge.set_breaker_state(downstream, resilience::State::Closed);
        let breaker = CircuitBreaker::new(
            downstream,
            BreakerConfig {
                failure_threshold: settings.breaker_failure_threshold.max(1),
                open_for: ms(settings.breaker_open_ms),
                half_open_max_calls: settings.breaker_half_open_max_calls.max(1),
                success_threshold: settings.breaker_success_threshold.max(1),
                trial_timeout: ms(settings.breaker_trial_timeout_ms),
            },
        )
        .on_transition(move |name, _, to| gauge.set_breaker_state(name, to));
        Self {
            downstream: downstream.to_owned(),
            timeout: ms(settings.timeout_ms),
            per_try_timeout: ms(settings.per_try_timeout_ms),
            max_attempts: settings.max_attempts.max(1),
            backoff: Backoff::new(ms(settings.backoff_base_ms), ms(settings.backoff_max_ms)),
            budget: Arc::new(RetryBudget::new(settings.retry_budget_percent, 10, 100)),
            breaker: Arc::new(breaker),
        }
    }

    #[must_use]
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// Runs `attempt(timeout)` under the policy. `attempt` must send its
    /// request with that timeout (tonic's `Request::set_timeout`), so the
    /// downstream sees the remaining deadline. `caller_deadline` is the
    /// deadline of the request being served, if it had one: the call never
    /// outlives it.
    ///
    /// # Errors
    ///
    /// The last attempt's status; UNAVAILABLE when the breaker is open;
    /// DEADLINE_EXCEEDED when no time is left.
    pub async fn call<T, F, Fut>(
        &self,
        caller_deadline: Option<Instant>,
        idempotent: bool,
        mut attempt: F,
    ) -> Result<T, Status>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let own = Instant::now() + self.timeout;
        let deadline = caller_deadline.map_or(own, |d| d.min(own));
        self.budget.deposit();
        let mut tries = 0;
        loop {
            tries += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Status::deadline_exceeded(format!(
                    "no time left to call {}",
                    self.downstream
                )));
            }
            let permit = self.breaker.try_acquire().map_err(|open| {
                Status::unavailable(format!(
                    "{} is unavailable (circuit open{})",
                    self.downstream,
                    open.retry_after
                        .map(|d| format!(", retry in {} ms", d.as_millis()))
                        .unwrap_or_default()
                ))
            })?;
            let timeout = permit
                .timeout
                .unwrap_or(self.per_try_timeout)
                .min(remaining);
            let result = match tokio::time::timeout(timeout, attempt(timeout)).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{} did not answer in time",
                    self.downstream
                ))),
            };
            // A deadline cut short by the *caller's* deadline says nothing
            // about the downstream: a caller sending `grpc-timeout: 500u`
            // must not be able to open the breaker for everyone.
            let full_time = permit.timeout.unwrap_or(self.per_try_timeout);
            let cut_short = timeout < full_time;
            let failed = matches!(&result, Err(status) if is_failure(status.code())
                && !(cut_short && matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled)));
            self.breaker.record(
                permit,
                if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
            );
            let status = match result {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            if tries >= self.max_attempts || !retryable(status.code(), idempotent) {
                return Err(status);
            }
            let delay = self.backoff.delay(tries - 1);
            if Instant::now() + delay >= deadline || !self.budget.try_withdraw() {
                return Err(status);
            }
            tracing::debug!(downstream = %self.downstream, code = ?status.code(), ?delay, "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    fn settings() -> ClientSettings {
        ClientSettings {
            timeout_ms: 10_000,
            per_try_timeout_ms: 1000,
            max_attempts: 4,
            backoff_base_ms: 100,
            backoff_max_ms: 300,
            breaker_failure_threshold: 100,
            ..ClientSettings::new("http://unused")
        }
    }

    /// Calls with every attempt answering `code`; returns the attempt count,
    /// the instants of the attempts and the result code.
    async fn run(policy: &CallPolicy, idempotent: bool, code: Code) -> (u32, Vec<Instant>, Code) {
        let attempts = Arc::new(AtomicU32::new(0));
        let times = Arc::new(Mutex::new(Vec::new()));
        let (a, t) = (attempts.clone(), times.clone());
        let result: Result<(), Status> = policy
            .call(None, idempotent, move |_| {
                a.fetch_add(1, Ordering::SeqCst);
                t.lock().expect("lock").push(Instant::now());
                async move { Err(Status::new(code, "no")) }
            })
            .await;
        let times = times.lock().expect("lock").clone();
        (
            attempts.load(Ordering::SeqCst),
            times,
            result.expect_err("fails").code(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_with_capped_jittered_gaps() {
        let policy = CallPolicy::new("down", &settings(), &Metrics::new());
        let (attempts, times, code) = run(&policy, false, Code::Unavailable).await;
        assert_eq!((attempts, code), (4, Code::Unavailable));
        let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for (n, gap) in gaps.iter().enumerate() {
            let ceiling = Backoff::new(Duration::from_millis(100), Duration::from_millis(300))
                .ceiling(n as u32);
            assert!(*gap <= ceiling, "gap {n} = {gap:?} exceeds {ceiling:?}");
        }
        // And there *is* a backoff: over 30 calls the mean gap before each
        // retry is near half its ceiling (full jitter), far from the zero
        // that retrying at once would give (a mean below a quarter is a
        // ~5-sigma event for uniform gaps).
        let mut sums = [Duration::ZERO; 3];
        for _ in 0..30 {
            let policy = CallPolicy::new("down", &settings(), &Metrics::new());
            let (_, times, _) = run(&policy, false, Code::Unavailable).await;
            for (n, w) in times.windows(2).enumerate() {
                sums[n] += w[1] - w[0];
            }
        }
        for (n, sum) in sums.iter().enumerate() {
            let ceiling = Backoff::new(Duration::from_millis(100), Duration::from_millis(300))
                .ceiling(n as u32);
            let mean = *sum / 30;
            assert!(
                mean >= ceiling / 4,
                "mean gap {n} = {mean:?}, ceiling {ceiling:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_retryable_codes_are_retried() {
        let policy = CallPolicy::new("down", &settings(), &Metrics::new());
        assert_eq!(run(&policy, true, Code::InvalidArgument).await.0, 1);
        assert_eq!(run(&policy, true, Code::Unauthenticated).await.0, 1);
        assert_eq!(
            run(&policy, false, Code::DeadlineExceeded).await.0,
            1,
            "not idempotent"
        );
        assert_eq!(
            run(&policy, true, Code::DeadlineExceeded).await.0,
            4,
            "idempotent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_caps_retries_under_sustained_failure() {
        let never_opens = ClientSettings {
            breaker_failure_threshold: u32::MAX,
            ..settings()
        };
        let policy = CallPolicy::new("down", &never_opens, &Metrics::new());
        let mut attempts = 0;
        for _ in 0..200 {
            attempts += run(&policy, false, Code::Unavailable).await.0;
        }
        let retries = attempts - 200;
        // 10 in reserve + 10 % of 200 calls.
        assert!(retries <= 30, "{retries} retries for 200 calls");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_get_what_is_left_of_the_callers_deadline() {
        let policy = CallPolicy::new("slow", &settings(), &Metrics::new());
        let given = Arc::new(Mutex::new(Vec::new()));
        let g = given.clone();
        let deadline = Instant::now() + Duration::from_millis(1500);
        let result: Result<(), Status> = policy
            .call(Some(deadline), true, move |timeout| {
                g.lock().expect("lock").push(timeout);
                async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(())
                }
            })
            .await;
        assert_eq!(
            result.expect_err("times out").code(),
            Code::DeadlineExceeded
        );
        let given = given.lock().expect("lock").clone();
        assert_eq!(given[0], Duration::from_secs(1), "per-try cap");
        assert!(
            given
                .iter()
                .skip(1)
                .all(|t| *t < Duration::from_millis(500)),
            "{given:?}"
        );
        assert!(
            Instant::now() <= deadline + Duration::from_millis(1),
            "never past the caller's deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_of_the_callers_own_short_deadline_never_open_the_breaker() {
        let policy = CallPolicy::new(
            "user-service",
            &ClientSettings {
                max_attempts: 1,
                breaker_failure_threshold: 3,
                ..settings()
            },
            &Metrics::new(),
        );
        // A hostile caller: `grpc-timeout: 500u` on every request.
        for _ in 0..50 {
            let deadline = Instant::now() + Duration::from_micros(500);
            let result: Result<(), Status> = policy
                .call(Some(deadline), false, |_| async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(())
                })
                .await;
            assert_eq!(
                result.expect_err("too short").code(),
                Code::DeadlineExceeded
            );
        }
        assert_eq!(policy.breaker().state(), resilience::State::Closed);
        // The downstream's own slowness, with the full per-try time, still counts.
        for _ in 0..3 {
            let result: Result<(), Status> = policy
                .call(None, false, |_| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(())
                })
                .await;
            assert!(result.is_err());
        }
        assert_eq!(policy.breaker().state(), resilience::State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_fails_fast_without_calling() {
        let policy = CallPolicy::new(
            "down",
            &ClientSettings {
                max_attempts: 1,
                breaker_failure_threshold: 3,
                breaker_open_ms: 1000,
                ..settings()
            },
            &Metrics::new(),
        );
        for _ in 0..3 {
            assert_eq!(run(&policy, false, Code::Unavailable).await.0, 1);
        }
        assert_eq!(policy.breaker().state(), resilience::State::Open);
        let (attempts, _, code) = run(&policy, false, Code::Unavailable).await;
        assert_eq!((attempts, code), (0, Code::Unavailable));
        tokio::time::advance(Duration::from_millis(1000)).await;
        let result: Result<(), Status> = policy.call(None, false, |_| async { Ok(()) }).await;
        assert!(result.is_ok());
        assert_eq!(policy.breaker().state(), resilience::State::Closed);
    }
}
