//! Background jobs (issue 12, first part): a port with typed job kinds, priorities with
//! weighted choice, retries with capped exponential backoff and full jitter, dead letters,
//! idempotency keys and not-before times; the in-process implementation ([`MemoryJobs`]).
//! The Redis Streams implementation (durable, shared by replicas) and the scheduler follow
//! the recipe in `shared/design/JOBS.md`.

mod memory;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use self::memory::MemoryJobs;

/// How soon a job should run, relative to others waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    Critical,
    Default,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Default, Priority::Low];

    /// The share of fetches a busy queue gets, as Asynq weighs them (6 / 3 / 1).
    pub fn weight(self) -> usize {
        match self {
            Self::Critical => 6,
            Self::Default => 3,
            Self::Low => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Default => "default",
            Self::Low => "low",
        }
    }
}

/// A kind of job whose payload is a `P`: enqueueing takes exactly that type.
pub struct Kind<P> {
    name: &'static str,
    _payload: PhantomData<fn(P)>,
}

impl<P> Kind<P> {
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            _payload: PhantomData,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Why a run failed, and whether another try may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth trying again later (a part was away, a conflict).
    Retry(String),
    /// Will never succeed (bad input): straight to dead letters.
    Permanent(String),
}

/// How a job is enqueued beyond its kind and payload.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub priority: Option<Priority>,
    /// Enqueueing a job with a key already used runs it once only.
    pub idempotency_key: Option<String>,
    /// Not run before this long from now.
    pub delay: Option<Duration>,
}

/// Retry and concurrency settings.
#[derive(Debug, Clone, Copy)]
pub struct JobSettings {
    /// Jobs run at once on this replica.
    pub concurrency: usize,
    /// Runs before a job goes to the dead letters.
    pub max_attempts: u32,
    /// The first retry's backoff cap; it doubles per attempt up to `backoff_cap`, and the
    /// wait is a random share of it (full jitter).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            concurrency: 10,
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(600),
        }
    }
}

impl JobSettings {
    /// The wait before retry number `attempt` (1 for the first retry): a random share of
    /// `min(cap, base · 2^(attempt-1))`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        use rand::Rng;
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.backoff_cap);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }
}

/// A job that could not be done: its kind, payload, attempts and last error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadJob {
    pub id: u64,
    pub kind: String,
    pub payload: Value,
    pub attempts: u32,
    pub error: String,
}

type Handler = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<(), Failure>> + Send + Sync>;

/// What runs each kind of job.
#[derive(Clone, Default)]
pub struct Handlers {
    by_kind: std::collections::HashMap<&'static str, Handler>,
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `handler` for jobs of `kind`. A payload that no longer parses as `P` is a
    /// permanent failure: it goes to the dead letters at once, never into a retry loop.
    pub fn on<P, F, Fut>(mut self, kind: &Kind<P>, handler: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), Failure>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.by_kind.insert(
            kind.name,
            Arc::new(move |payload: Value| {
                let handler = handler.clone();
                Box::pin(async move {
                    let payload: P = serde_json::from_value(payload)
                        .map_err(|e| Failure::Permanent(format!("unreadable payload: {e}")))?;
                    handler(payload).await
                }) as BoxFuture<'static, Result<(), Failure>>
            }),
        );
        self
    }

    fn get(&self, kind: &str) -> Option<Handler> {
        self.by_kind.get(kind).cloned()
    }
}

/// Enqueueing failed: the job was not taken.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the job payload could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the job queue is shut down")]
    Closed,
}

/// The order in which busy queues are tried for one fetch, as Asynq picks it: each priority
/// `weight` times, shuffled, first occurrences kept.
pub fn fetch_order() -> Vec<Priority> {
    use rand::seq::SliceRandom;
    let mut draws: Vec<Priority> = Priority::ALL
        .iter()
        .flat_map(|p| std::iter::repeat_n(*p, p.weight()))
        .collect();
    draws.shuffle(&mut rand::rng());
    let mut order = Vec::with_capacity(3);
    for priority in draws {
        if !order.contains(&priority) {
            order.push(priority);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_a_random_share_of_a_doubling_capped_ceiling() {
        let settings = JobSettings {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_millis(700),
            ..JobSettings::default()
        };
        for _ in 0..200 {
            assert!(settings.backoff(1) <= Duration::from_millis(100));
            assert!(settings.backoff(3) <= Duration::from_millis(400));
            assert!(settings.backoff(30) <= Duration::from_millis(700));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| settings.backoff(3)).collect();
        assert!(spread.len() > 10, "jittered");
    }

    #[test]
    fn the_fetch_order_favours_critical_six_to_three_to_one() {
        let mut first = std::collections::HashMap::new();
        for _ in 0..10_000 {
            *first.entry(fetch_order()[0]).or_insert(0) += 1;
        }
        let share = |p| f64::from(first[&p]) / 10_000.0;
        assert!((share(Priority::Critical) - 0.6).abs() < 0.03);
        assert!((share(Priority::Default) - 0.3).abs() < 0.03);
        assert!((share(Priority::Low) - 0.1).abs() < 0.03);
    }
}
