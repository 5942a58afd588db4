//! A retry budget: retries may add at most `ratio` of the calls made.

use std::sync::Mutex;

/// Token bucket in thousandths of a token (no float drift): every call
/// deposits `ratio` of a token, every retry withdraws one. `reserve` tokens
/// are there from the start so a quiet client can still retry; the bucket
/// holds at most `max`.
#[derive(Debug)]
pub struct RetryBudget {
    deposit_milli: u64,
    max_milli: u64,
    milli_tokens: Mutex<u64>,
}

const ONE: u64 = 1000;

impl RetryBudget {
    /// A budget of `percent` retries per 100 calls, `reserve` tokens to start,
    /// at most `max` banked.
    #[must_use]
    pub fn new(percent: u32, reserve: u32, max: u32) -> Self {
        let max_milli = u64::from(max) * ONE;
        Self {
            deposit_milli: u64::from(percent) * ONE / 100,
            max_milli,
            milli_tokens: Mutex::new((u64::from(reserve) * ONE).min(max_milli)),
        }
    }

    /// Records a first attempt.
    pub fn deposit(&self) {
        if let Ok(mut tokens) = self.milli_tokens.lock() {
            *tokens = (*tokens + self.deposit_milli).min(self.max_milli);
        }
    }

    /// Takes a token for a retry; `false` when the budget is spent.
    #[must_use]
    pub fn try_withdraw(&self) -> bool {
        match self.milli_tokens.lock() {
            Ok(mut tokens) if *tokens >= ONE => {
                *tokens -= ONE;
                true
            }
            _ => false,
        }
    }
}

impl Default for RetryBudget {
    /// 10 % of calls, 10 retries in reserve, at most 100 banked.
    fn default() -> Self {
        Self::new(10, 10, 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_ten_percent_of_calls_beyond_the_reserve() {
        let budget = RetryBudget::new(10, 5, 100);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            // A failing downstream: every call wants to retry.
            if budget.try_withdraw() {
                retries += 1;
            }
        }
        assert_eq!(
            retries, 105,
            "100 from 10 % of 1000 calls, 5 from the reserve"
        );
    }

    #[test]
    fn an_empty_budget_refuses_until_calls_refill_it() {
        let budget = RetryBudget::new(10, 0, 10);
        assert!(!budget.try_withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }
}
