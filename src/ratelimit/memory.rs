//! The in-process limiter: `governor`'s GCRA, one keyed limiter per rule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use governor::RateLimiter;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::state::keyed::DashMapStateStore;

use super::{Decision, Quota};

type Keyed<C> = RateLimiter<String, DashMapStateStore<String>, C, StateInformationMiddleware>;

/// Each rule's limiter, and the quota it was made with.
type Rules<C> = HashMap<String, (Quota, Arc<Keyed<C>>)>;

/// Limits kept in this process only (one replica's view).
pub struct MemoryLimiter<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl<C: Clock> Clone for MemoryLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<C: Clock> {
    clock: C,
    rules: Mutex<Rules<C>>,
    /// Until when each refused (rule, key) stays refused, for [`MemoryLimiter::peek`]:
    /// `governor` has no look without a spend.
    refused: Mutex<HashMap<(String, String), C::Instant>>,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

impl<C: Clock + Clone> MemoryLimiter<C> {
    /// A limiter reading time from `clock` (tests pass a clock they move by hand).
    pub fn with_clock(clock: C) -> Self {
        Self {
            inner: Arc::new(Inner {
                clock,
                rules: Mutex::new(HashMap::new()),
                refused: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn limiter(&self, rule: &str, quota: Quota) -> Arc<Keyed<C>> {
        let mut rules = self
            .inner
            .rules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match rules.get(rule) {
            Some((made_with, limiter)) if *made_with == quota => limiter.clone(),
            _ => {
                let governed = quota.to_governor();
                let plain: RateLimiter<String, _, C, NoOpMiddleware<C::Instant>> = RateLimiter::new(
                    governed,
                    DashMapStateStore::default(),
                    self.inner.clock.clone(),
                );
                let limiter = Arc::new(plain.with_middleware::<StateInformationMiddleware>());
                rules.insert(rule.to_owned(), (quota, limiter.clone()));
                limiter
            }
        }
    }

    /// Counts one attempt of `key` under `rule`'s `quota`.
    pub fn check(&self, rule: &str, quota: Quota, key: &str) -> Decision {
        let limiter = self.limiter(rule, quota);
        match limiter.check_key(&key.to_owned()) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    remaining,
                    retry_after: std::time::Duration::ZERO,
                    reset_after: quota.interval() * (quota.burst().get() - remaining),
                }
            }
            Err(refused) => {
                let retry_after = refused.wait_time_from(self.inner.clock.now());
                self.inner
                    .refused
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(
                        (rule.to_owned(), key.to_owned()),
                        refused.earliest_possible(),
                    );
                Decision {
                    allowed: false,
                    remaining: 0,
                    retry_after,
                    reset_after: retry_after + quota.interval() * (quota.burst().get() - 1),
                }
            }
        }
    }

    /// Whether `key` is refused under `rule` now, counting nothing. Refusals are remembered
    /// when a spend meets them, so the first attempt after the budget ran out is allowed by a
    /// peek (and refused when spent).
    pub fn peek(&self, rule: &str, quota: Quota, key: &str) -> Decision {
        let now = self.inner.clock.now();
        let refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&(rule.to_owned(), key.to_owned()))
            .copied()
            .filter(|until| *until > now);
        match refused {
            Some(until) => {
                let retry_after = until.duration_since(now).into();
                Decision {
                    allowed: false,
                    remaining: 0,
                    retry_after,
                    reset_after: retry_after + quota.interval() * (quota.burst().get() - 1),
                }
            }
            None => Decision::unlimited(quota),
        }
    }

    /// Forgets keys whose budget is full again, so the maps hold only recent ones.
    pub fn sweep(&self) {
        let now = self.inner.clock.now();
        self.inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|_, until| *until > now);
        let rules: Vec<Arc<Keyed<C>>> = {
            let rules = self
                .inner
                .rules
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            rules.values().map(|(_, limiter)| limiter.clone()).collect()
        };
        for limiter in rules {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys remembered across all rules (after a [`sweep`](Self::sweep), the recent ones).
    pub fn len(&self) -> usize {
        let rules = self
            .inner
            .rules
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        rules.values().map(|(_, limiter)| limiter.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    /// The GCRA at its boundary, on a clock moved by hand: the burst, then exactly the steady
    /// rate, then the full burst again after a rest.
    #[test]
    fn a_burst_then_the_steady_rate_then_recovery() {
        let clock = FakeRelativeClock::default();
        let limiter = MemoryLimiter::with_clock(clock.clone());
        let quota: Quota = "3/300ms".parse().unwrap(); // burst 3, one per 100 ms
        for remaining in [2, 1, 0] {
            let decision = limiter.check("r", quota, "k");
            assert!(decision.allowed);
            assert_eq!(decision.remaining, remaining);
        }
        let refused = limiter.check("r", quota, "k");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // Another key has its own budget.
        assert!(limiter.check("r", quota, "other").allowed);
        // One interval later, exactly one more.
        clock.advance(Duration::from_millis(99));
        assert!(!limiter.check("r", quota, "k").allowed);
        clock.advance(Duration::from_millis(1));
        assert!(limiter.check("r", quota, "k").allowed);
        let refused = limiter.check("r", quota, "k");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // A full rest gives the whole burst back, and no more.
        clock.advance(Duration::from_millis(300));
        for _ in 0..3 {
            assert!(limiter.check("r", quota, "k").allowed);
        }
        assert!(!limiter.check("r", quota, "k").allowed);
    }

    #[test]
    fn a_sweep_forgets_keys_whose_budget_is_back() {
        let clock = FakeRelativeClock::default();
        let limiter = MemoryLimiter::with_clock(clock.clone());
        let quota: Quota = "2/s".parse().unwrap();
        for key in 0..100 {
            limiter.check("r", quota, &key.to_string());
        }
        assert_eq!(limiter.len(), 100);
        clock.advance(Duration::from_secs(2));
        limiter.sweep();
        assert!(limiter.is_empty());
    }
}
