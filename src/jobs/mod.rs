//! Background jobs: a port with typed job kinds, priorities with weighted choice, retries
//! with capped exponential backoff and full jitter, dead letters, idempotency keys and
//! not-before times, and two implementations behind [`Jobs`]: in process ([`MemoryJobs`], the
//! embedded default, not durable) and on Redis Streams ([`RedisJobs`], durable and shared by
//! every replica). [`scheduler`] runs periodic jobs once per period across replicas.
//! `docs/jobs.md` has the guarantees; `shared/design/JOBS.md` the Redis recipe.

mod memory;
mod metrics;
mod redis;
pub mod scheduler;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use self::memory::MemoryJobs;
pub use self::metrics::JobMetrics;
pub use self::redis::{RedisJobSettings, RedisJobs};

/// How soon a job should run, relative to others waiting.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
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

    /// Its place in [`Priority::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Critical => 0,
            Self::Default => 1,
            Self::Low => 2,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// How long an idempotency key is remembered: longer than any period a scheduled job uses.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(8 * 86_400);

/// A kind of job whose payload is a `P`: enqueueing takes exactly that type.
pub struct Kind<P> {
    name: &'static str,
    _payload: PhantomData<fn(P)>,
}

impl<P> Kind<P> {
    /// A kind named `name`: letters, digits, `_`, `.` and `-` only (the Redis queues keep the
    /// name in a delimited record).
    pub const fn new(name: &'static str) -> Self {
        assert!(
            valid_kind(name),
            "a job kind is named with [A-Za-z0-9_.-] only"
        );
        Self {
            name,
            _payload: PhantomData,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Whether `name` may name a job kind.
pub const fn valid_kind(name: &str) -> bool {
    let mut rest = name.as_bytes();
    if rest.is_empty() || rest.len() > 100 {
        return false;
    }
    while let [b, tail @ ..] = rest {
        if !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.' || *b == b'-') {
            return false;
        }
        rest = tail;
    }
    true
}

/// One run of a job, as its handler gets it.
#[derive(Debug, Clone)]
pub struct Job<P> {
    /// The job's id: the same on every run of it (a retry, a reclaimed run), so an effect
    /// keyed by it happens once however often the job runs.
    pub id: u64,
    /// Runs before this one (0 on the first).
    pub attempt: u32,
    pub payload: P,
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
    pub priority: Priority,
    pub payload: Value,
    pub attempts: u32,
    pub error: String,
}

/// One queue's counts, for `segue jobs status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStatus {
    pub priority: Priority,
    /// Enqueued, not yet taken by a worker.
    pub waiting: u64,
    /// Taken by a worker and not yet done (running, or held by a replica that died, until
    /// it is reclaimed).
    pub in_flight: u64,
}

/// What the jobs are doing, for `segue jobs status` and `GET /admin/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub backend: &'static str,
    pub queues: Vec<QueueStatus>,
    /// Waiting for a not-before time or a retry's backoff.
    pub delayed: u64,
    pub dead: u64,
    /// The scheduler's current leader (a replica name), if any holds the lease.
    pub leader: Option<String>,
}

/// Reading or changing the queues failed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("the job queues in Redis could not be reached: {0}")]
    Redis(#[from] ::redis::RedisError),
}

type Handler =
    Arc<dyn Fn(u64, u32, Value) -> BoxFuture<'static, Result<(), Failure>> + Send + Sync>;

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
        F: Fn(Job<P>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), Failure>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.by_kind.insert(
            kind.name,
            Arc::new(move |id, attempt, payload: Value| {
                let handler = handler.clone();
                Box::pin(async move {
                    let payload: P = serde_json::from_value(payload)
                        .map_err(|e| Failure::Permanent(format!("unreadable payload: {e}")))?;
                    handler(Job {
                        id,
                        attempt,
                        payload,
                    })
                    .await
                }) as BoxFuture<'static, Result<(), Failure>>
            }),
        );
        self
    }

    /// The metric label of `kind`: its own name when a handler takes it, else `unknown` (a
    /// queue in Redis may hold any name).
    fn label<'a>(&'a self, kind: &'a str) -> &'a str {
        match self.by_kind.get_key_value(kind) {
            Some((name, _)) => name,
            None => "unknown",
        }
    }

    /// Runs one job, counted and timed: its handler's outcome, a permanent failure when no handler takes its
    /// kind, a retryable one when the handler panicked. The run's span carries the job's
    /// id, kind and attempt.
    async fn run(
        &self,
        metrics: &JobMetrics,
        id: u64,
        kind: &str,
        attempt: u32,
        payload: Value,
    ) -> Result<(), Failure> {
        use futures_util::FutureExt;
        use tracing::Instrument;
        let label = self.label(kind);
        metrics.started.with_label_values(&[label]).inc();
        let Some(handler) = self.by_kind.get(kind).cloned() else {
            return Err(Failure::Permanent(format!("no handler for {kind:?}")));
        };
        let span = tracing::info_span!("job", id, kind, attempt);
        let timer = metrics.duration.with_label_values(&[label]).start_timer();
        let outcome = std::panic::AssertUnwindSafe(handler(id, attempt, payload).instrument(span))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(Failure::Retry("the handler panicked".into())));
        timer.observe_duration();
        outcome
    }
}

/// Enqueueing failed: the job was not taken.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the job payload could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the job queue is shut down")]
    Closed,
    #[error("{0:?} cannot name a job kind: [A-Za-z0-9_.-] only")]
    Kind(String),
    #[error("the job queue in Redis could not take the job: {0}")]
    Unavailable(#[from] ::redis::RedisError),
}

/// The jobs of this replica: in process or on Redis Streams. Cheap to clone.
#[derive(Clone)]
pub enum Jobs {
    Memory(MemoryJobs),
    Redis(RedisJobs),
}

impl Jobs {
    /// Enqueues a job of `kind`; `Ok(None)` when its idempotency key was used already.
    pub async fn enqueue<P: Serialize>(
        &self,
        kind: &Kind<P>,
        payload: &P,
        options: Options,
    ) -> Result<Option<u64>, EnqueueError> {
        let payload = serde_json::to_value(payload)?;
        self.enqueue_value(kind.name(), payload, options).await
    }

    /// Enqueues a job as raw JSON (tests, and a kind known only by name).
    pub async fn enqueue_value(
        &self,
        kind: &str,
        payload: Value,
        options: Options,
    ) -> Result<Option<u64>, EnqueueError> {
        if !valid_kind(kind) {
            return Err(EnqueueError::Kind(kind.to_owned()));
        }
        match self {
            Self::Memory(jobs) => jobs.enqueue_value(kind, payload, options),
            Self::Redis(jobs) => jobs.enqueue_value(kind, payload, options).await,
        }
    }

    pub async fn status(&self) -> Result<Status, JobsError> {
        match self {
            Self::Memory(jobs) => Ok(jobs.status()),
            Self::Redis(jobs) => jobs.status().await,
        }
    }

    /// The dead letters, oldest first (at most `limit`).
    pub async fn dead(&self, limit: usize) -> Result<Vec<DeadJob>, JobsError> {
        match self {
            Self::Memory(jobs) => Ok(jobs.dead().into_iter().take(limit).collect()),
            Self::Redis(jobs) => jobs.dead(limit).await,
        }
    }

    /// Puts dead job `id` back in its queue for a fresh set of attempts; false when no dead
    /// job has that id.
    pub async fn retry_dead(&self, id: u64) -> Result<bool, JobsError> {
        match self {
            Self::Memory(jobs) => Ok(jobs.retry_dead(id)),
            Self::Redis(jobs) => jobs.retry_dead(id).await,
        }
    }

    /// Deletes dead job `id`; false when no dead job has that id.
    pub async fn drop_dead(&self, id: u64) -> Result<bool, JobsError> {
        match self {
            Self::Memory(jobs) => Ok(jobs.drop_dead(id)),
            Self::Redis(jobs) => jobs.drop_dead(id).await,
        }
    }

    /// Stops taking jobs and waits up to `deadline` for those running to finish. On Redis,
    /// jobs still running then, and those taken but not started, stay pending and are
    /// reclaimed by another replica after the visibility timeout.
    pub async fn shutdown(&self, deadline: Duration) {
        match self {
            Self::Memory(jobs) => jobs.shutdown(deadline).await,
            Self::Redis(jobs) => jobs.shutdown(deadline).await,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
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
