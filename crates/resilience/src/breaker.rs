//! A circuit breaker per downstream: closed, open (fail fast), half-open
//! (a bounded number of trial calls).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// Thresholds of one breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: u32,
    /// How long an open breaker fails fast before letting trials through.
    pub open_for: Duration,
    /// Trial calls allowed at once while half-open.
    pub half_open_max_calls: u32,
    /// Successful trials that close a half-open breaker.
    pub success_threshold: u32,
    /// Deadline of each trial call (shorter than a normal call's, so a
    /// still-sick downstream is detected quickly).
    pub trial_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            half_open_max_calls: 1,
            success_threshold: 1,
            trial_timeout: Duration::from_millis(500),
        }
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 open, 2 half-open.
    #[must_use]
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// The result of a call, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The downstream answered (also with a client error such as NOT_FOUND).
    Success,
    /// The downstream failed or did not answer.
    Failure,
}

/// The breaker refused a call without trying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOpen {
    /// When the next trial will be allowed, if known.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("circuit breaker is open")
    }
}

impl std::error::Error for BreakerOpen {}

/// Permission to make one call; report its outcome with [`CircuitBreaker::record`].
///
/// A permit dropped without a report (the caller gave up: its own deadline
/// passed, its request was cancelled) counts as neither success nor
/// failure, and a half-open trial slot it held is freed: a trial that is
/// never reported must not keep the breaker half-open forever.
#[derive(Debug)]
#[must_use]
pub struct Permit {
    trial: bool,
    /// The deadline this call must keep to (shorter for trials).
    pub timeout: Option<Duration>,
    /// The half-open episode a trial belongs to, and the breaker to give
    /// its slot back to if dropped unreported.
    slot: Option<(u64, Arc<Mutex<Inner>>)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((episode, inner)) = self.slot.take()
            && let Ok(mut inner) = inner.lock()
            && inner.episode == episode
        {
            inner.trials_in_flight = inner.trials_in_flight.saturating_sub(1);
        }
    }
}

impl Permit {
    /// Whether this is a half-open trial call.
    #[must_use]
    pub fn is_trial(&self) -> bool {
        self.trial
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
    opened_at: Instant,
    trials_in_flight: u32,
    trial_successes: u32,
    /// Counts half-open episodes, so a late trial never touches a newer one.
    episode: u64,
}

type Listener = Arc<dyn Fn(&str, State, State) + Send + Sync>;

/// A circuit breaker. Cheap to share (`Arc` it).
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
    on_transition: Option<Listener>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl CircuitBreaker {
    #[must_use]
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        Self {
            name: name.into(),
            config,
            inner: Arc::new(Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                opened_at: Instant::now(),
                trials_in_flight: 0,
                trial_successes: 0,
                episode: 0,
            })),
            on_transition: None,
        }
    }

    /// Calls `listener(name, from, to)` on every transition (besides the log
    /// line every transition gets), e.g. to set a gauge.
    #[must_use]
    pub fn on_transition(
        mut self,
        listener: impl Fn(&str, State, State) + Send + Sync + 'static,
    ) -> Self {
        self.on_transition = Some(Arc::new(listener));
        self
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    /// The current state (an open breaker whose wait is over still reads
    /// open until the next call moves it to half-open).
    #[must_use]
    pub fn state(&self) -> State {
        self.inner.lock().map_or(State::Open, |i| i.state)
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        if from == to {
            return;
        }
        inner.state = to;
        match to {
            State::Open => {
                inner.opened_at = Instant::now();
                inner.trials_in_flight = 0;
                inner.trial_successes = 0;
            }
            State::HalfOpen => {
                inner.trials_in_flight = 0;
                inner.trial_successes = 0;
                inner.episode += 1;
            }
            State::Closed => inner.consecutive_failures = 0,
        }
        tracing::warn!(breaker = %self.name, from = from.as_str(), to = to.as_str(), "circuit breaker state changed");
        if let Some(listener) = &self.on_transition {
            listener(&self.name, from, to);
        }
    }

    /// Asks to make a call.
    ///
    /// # Errors
    ///
    /// [`BreakerOpen`] while open, or while half-open with every trial slot taken.
    pub fn try_acquire(&self) -> Result<Permit, BreakerOpen> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| BreakerOpen { retry_after: None })?;
        if inner.state == State::Open {
            let waited = inner.opened_at.elapsed();
            if waited < self.config.open_for {
                return Err(BreakerOpen {
                    retry_after: Some(self.config.open_for - waited),
                });
            }
            self.transition(&mut inner, State::HalfOpen);
        }
        match inner.state {
            State::Closed => Ok(Permit {
                trial: false,
                timeout: None,
                slot: None,
            }),
            State::HalfOpen if inner.trials_in_flight < self.config.half_open_max_calls => {
                inner.trials_in_flight += 1;
                Ok(Permit {
                    trial: true,
                    timeout: Some(self.config.trial_timeout),
                    slot: Some((inner.episode, Arc::clone(&self.inner))),
                })
            }
            _ => Err(BreakerOpen { retry_after: None }),
        }
    }

    /// Reports how a permitted call went.
    pub fn record(&self, mut permit: Permit, outcome: Outcome) {
        let slot = permit.slot.take();
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if permit.trial {
            // A trial that ends after the breaker moved on counts for nothing.
            let current = slot.is_some_and(|(episode, _)| episode == inner.episode);
            if !current || inner.state != State::HalfOpen {
                return;
            }
            inner.trials_in_flight = inner.trials_in_flight.saturating_sub(1);
            match outcome {
                Outcome::Failure => self.transition(&mut inner, State::Open),
                Outcome::Success => {
                    inner.trial_successes += 1;
                    if inner.trial_successes >= self.config.success_threshold {
                        self.transition(&mut inner, State::Closed);
                    }
                }
            }
            return;
        }
        if inner.state != State::Closed {
            return;
        }
        match outcome {
            Outcome::Success => inner.consecutive_failures = 0,
            Outcome::Failure => {
                inner.consecutive_failures += 1;
                if inner.consecutive_failures >= self.config.failure_threshold {
                    self.transition(&mut inner, State::Open);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_secs(10),
                half_open_max_calls: 2,
                success_threshold: 2,
                trial_timeout: Duration::from_millis(200),
            },
        )
    }

    fn fail(b: &CircuitBreaker) {
        let permit = b.try_acquire().expect("permitted");
        b.record(permit, Outcome::Failure);
    }

    fn succeed(b: &CircuitBreaker) {
        let permit = b.try_acquire().expect("permitted");
        b.record(permit, Outcome::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let b = breaker();
        fail(&b);
        fail(&b);
        succeed(&b);
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), State::Closed, "the success reset the streak");
        fail(&b);
        assert_eq!(b.state(), State::Open);
        let refused = b.try_acquire().expect_err("fails fast");
        assert_eq!(refused.retry_after, Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_wait_it_lets_a_bounded_number_of_trials_through() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(b.try_acquire().is_err(), "still open after 9 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        let first = b.try_acquire().expect("first trial");
        assert!(first.is_trial());
        assert_eq!(
            first.timeout,
            Some(Duration::from_millis(200)),
            "trials have their own deadline"
        );
        assert_eq!(b.state(), State::HalfOpen);
        let second = b.try_acquire().expect("second trial");
        assert!(b.try_acquire().is_err(), "only two trials at once");
        b.record(first, Outcome::Success);
        assert_eq!(b.state(), State::HalfOpen, "one success is not enough");
        b.record(second, Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        assert!(!b.try_acquire().expect("closed").is_trial());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_it_again_for_the_full_wait() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&b);
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_acquire().is_err(), "the wait restarted");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_dropped_unreported_frees_its_slot_and_counts_for_nothing() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(10)).await;
        // Both trial slots taken, then abandoned (the caller's deadline passed).
        let first = b.try_acquire().expect("trial");
        let second = b.try_acquire().expect("trial");
        assert!(first.is_trial() && second.is_trial());
        assert!(b.try_acquire().is_err(), "every slot is taken");
        drop(first);
        drop(second);
        assert_eq!(
            b.state(),
            State::HalfOpen,
            "an abandoned trial is no failure"
        );
        // The slots are free again and the breaker can close.
        succeed(&b);
        succeed(&b);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_trial_of_an_earlier_episode_never_frees_a_newer_slot() {
        let b = CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: 1,
                open_for: Duration::from_secs(10),
                half_open_max_calls: 1,
                success_threshold: 1,
                trial_timeout: Duration::from_millis(200),
            },
        );
        fail(&b);
        tokio::time::advance(Duration::from_secs(10)).await;
        let stale = b.try_acquire().expect("trial");
        let failing = b.try_acquire();
        assert!(failing.is_err(), "one slot");
        b.record(stale, Outcome::Failure); // opens again
        tokio::time::advance(Duration::from_secs(10)).await;
        let current = b.try_acquire().expect("a trial of the new episode");
        let old = {
            // A permit from the previous episode, dropped now, must not free
            // the current episode's only slot.
            let mut inner = b.inner.lock().expect("lock");
            inner.trials_in_flight += 1;
            Permit {
                trial: true,
                timeout: None,
                slot: Some((inner.episode - 1, Arc::clone(&b.inner))),
            }
        };
        drop(old);
        assert!(
            b.try_acquire().is_err(),
            "the current trial still holds the slot"
        );
        drop(current);
    }

    #[tokio::test(start_paused = true)]
    async fn every_transition_is_reported() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), calls.clone());
        let b = breaker().on_transition(move |name, from, to| {
            assert_eq!(name, "test");
            c.fetch_add(1, Ordering::SeqCst);
            s.lock().expect("lock").push((from, to));
        });
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(10)).await;
        succeed(&b);
        succeed(&b);
        assert_eq!(
            *seen.lock().expect("lock"),
            [
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed)
            ]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
