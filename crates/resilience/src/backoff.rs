//! Capped exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng as _;

/// How much of the delay is random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`: the widest spread (callers retrying a
    /// shared downstream).
    Full,
    /// Uniform in `[ceiling / 2, ceiling]`: still spread, but every gap is at
    /// least as long as the one before (redelivery of one message).
    Equal,
}

/// Capped exponential backoff: the ceiling before retry `n` is
/// `min(max, base * 2^n)` and the delay is drawn below it per [`Jitter`].
/// Retries from many clients spread out instead of arriving in waves, and no
/// delay ever exceeds `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// Full jitter.
    #[must_use]
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: Jitter::Full,
        }
    }

    /// Equal jitter: gaps grow, jittered.
    #[must_use]
    pub const fn equal(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: Jitter::Equal,
        }
    }

    /// The upper bound of the delay before retry number `attempt` (0-based).
    #[must_use]
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2_u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A jittered delay before retry number `attempt` (0-based).
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let floor = match self.jitter {
            Jitter::Full => 0,
            Jitter::Equal => nanos / 2,
        };
        Duration::from_nanos(rand::thread_rng().gen_range(floor..=nanos))
    }
}

impl Default for Backoff {
    /// 50 ms doubling to at most 5 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_then_stays_capped() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(
            backoff.ceiling(200),
            Duration::from_secs(1),
            "no overflow for huge attempts"
        );
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..8 {
            let delays: Vec<_> = (0..200).map(|_| backoff.delay(attempt)).collect();
            assert!(delays.iter().all(|d| *d <= backoff.ceiling(attempt)));
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(
                distinct.len() > 150,
                "full jitter spreads delays (attempt {attempt})"
            );
        }
        let mean = (0..2000)
            .map(|_| backoff.delay(3).as_secs_f64())
            .sum::<f64>()
            / 2000.0;
        assert!(
            (0.3..0.5).contains(&mean),
            "uniform over [0, 800 ms]: mean {mean}"
        );
    }
}
