//! Jobs run in this process: queues in memory, tokio tasks, at most `concurrency` at once.
//! Nothing survives the process: a crash or restart loses waiting and delayed jobs (the
//! hub says so once at start-up). Without `REDIS_URL` this is the embedded default.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::{
    DeadJob, EnqueueError, Failure, Handlers, IDEMPOTENCY_TTL, JobMetrics, JobSettings, Options,
    Priority, QueueStatus, Status, fetch_order,
};

/// Most dead letters kept in process (the oldest go first).
const MAX_DEAD: usize = 10_000;

/// One job as it waits.
#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    kind: String,
    payload: Value,
    priority: Priority,
    /// Runs so far.
    attempts: u32,
}

/// One queue per priority.
#[derive(Default)]
struct Queues {
    critical: VecDeque<Entry>,
    default: VecDeque<Entry>,
    low: VecDeque<Entry>,
}

impl Queues {
    fn of(&mut self, priority: Priority) -> &mut VecDeque<Entry> {
        match priority {
            Priority::Critical => &mut self.critical,
            Priority::Default => &mut self.default,
            Priority::Low => &mut self.low,
        }
    }
}

#[derive(Default)]
struct State {
    queues: Queues,
    /// Due time (and id, for a total order) → job.
    delayed: BTreeMap<(Instant, u64), Entry>,
    /// Idempotency key → until when it is remembered.
    idempotency: HashMap<String, Instant>,
    dead: Vec<DeadJob>,
    next_id: u64,
    /// Jobs running now, by priority.
    running: [usize; 3],
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
    /// Told whenever a job finishes (for a draining shutdown).
    finished: Notify,
    permits: Arc<Semaphore>,
    handlers: Handlers,
    settings: JobSettings,
    metrics: JobMetrics,
}

/// The in-process jobs: cheap to clone.
#[derive(Clone)]
pub struct MemoryJobs {
    inner: Arc<Inner>,
}

impl MemoryJobs {
    /// Starts the dispatcher on the current runtime.
    pub fn start(handlers: Handlers, settings: JobSettings, metrics: JobMetrics) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            finished: Notify::new(),
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            handlers,
            settings,
            metrics,
        });
        tokio::spawn(dispatch(inner.clone()));
        let jobs = Self { inner };
        tokio::spawn(observe_depth(jobs.clone()));
        jobs
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a job (its kind checked by [`super::Jobs::enqueue_value`]); `Ok(None)` when
    /// its idempotency key was used already.
    pub(super) fn enqueue_value(
        &self,
        kind: &str,
        payload: Value,
        options: Options,
    ) -> Result<Option<u64>, EnqueueError> {
        let mut state = self.state();
        if state.closed {
            return Err(EnqueueError::Closed);
        }
        if let Some(key) = &options.idempotency_key {
            let now = Instant::now();
            if state.idempotency.get(key).is_some_and(|until| *until > now) {
                return Ok(None);
            }
            if state.idempotency.len() >= 1024 && state.idempotency.len().is_power_of_two() {
                state.idempotency.retain(|_, until| *until > now);
            }
            state.idempotency.insert(key.clone(), now + IDEMPOTENCY_TTL);
        }
        self.inner
            .metrics
            .enqueued
            .with_label_values(&[self.inner.handlers.label(kind)])
            .inc();
        state.next_id += 1;
        let entry = Entry {
            id: state.next_id,
            kind: kind.to_owned(),
            payload,
            priority: options.priority.unwrap_or(Priority::Default),
            attempts: 0,
        };
        let id = entry.id;
        match options.delay.filter(|d| !d.is_zero()) {
            Some(delay) => {
                state.delayed.insert((Instant::now() + delay, id), entry);
            }
            None => state.queues.of(entry.priority).push_back(entry),
        }
        drop(state);
        self.inner.wake.notify_one();
        Ok(Some(id))
    }

    /// The jobs that could not be done.
    pub fn dead(&self) -> Vec<DeadJob> {
        self.state().dead.clone()
    }

    /// Puts dead job `id` back in its queue with its attempts reset.
    pub fn retry_dead(&self, id: u64) -> bool {
        let mut state = self.state();
        let Some(at) = state.dead.iter().position(|d| d.id == id) else {
            return false;
        };
        let dead = state.dead.remove(at);
        let entry = Entry {
            id: dead.id,
            kind: dead.kind,
            payload: dead.payload,
            priority: dead.priority,
            attempts: 0,
        };
        state.queues.of(entry.priority).push_back(entry);
        drop(state);
        self.inner.wake.notify_one();
        true
    }

    pub fn drop_dead(&self, id: u64) -> bool {
        let mut state = self.state();
        let before = state.dead.len();
        state.dead.retain(|d| d.id != id);
        state.dead.len() < before
    }

    /// Counts per queue. In process, the one replica is the scheduler's leader.
    pub fn status(&self) -> Status {
        let mut state = self.state();
        let queues = Priority::ALL
            .into_iter()
            .map(|priority| QueueStatus {
                priority,
                waiting: state.queues.of(priority).len() as u64,
                in_flight: state.running.get(priority.index()).copied().unwrap_or(0) as u64,
            })
            .collect();
        Status {
            backend: "memory",
            queues,
            delayed: state.delayed.len() as u64,
            dead: state.dead.len() as u64,
            leader: Some("this process".to_owned()),
        }
    }

    /// Stops taking jobs and waits up to `deadline` for those running; what was waiting is
    /// lost with the process.
    pub async fn shutdown(&self, deadline: Duration) {
        self.state().closed = true;
        self.inner.wake.notify_one();
        let drained = async {
            loop {
                let finished = self.inner.finished.notified();
                if self.state().running.iter().sum::<usize>() == 0 {
                    return;
                }
                finished.await;
            }
        };
        if tokio::time::timeout(deadline, drained).await.is_err() {
            tracing::warn!(
                running = self.state().running.iter().sum::<usize>(),
                "jobs still running at the drain deadline"
            );
        }
    }
}

/// Refreshes the depth gauges every 5 s, until the jobs are shut down.
async fn observe_depth(jobs: MemoryJobs) {
    loop {
        if jobs.state().closed {
            return;
        }
        jobs.inner.metrics.observe(&jobs.status());
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// The dispatcher: moves due delayed jobs to their queues, and starts jobs while permits last.
async fn dispatch(inner: Arc<Inner>) {
    loop {
        let permit = match inner.permits.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return,
        };
        let (next, sleep_until) = {
            let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.closed {
                return;
            }
            let now = Instant::now();
            while let Some(entry) = state.delayed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let entry = entry.remove();
                state.queues.of(entry.priority).push_back(entry);
            }
            let next = fetch_order()
                .into_iter()
                .find_map(|p| state.queues.of(p).pop_front());
            if let Some(entry) = &next
                && let Some(running) = state.running.get_mut(entry.priority.index())
            {
                *running += 1;
            }
            let sleep_until = state.delayed.keys().next().map(|(due, _)| *due);
            (next, sleep_until)
        };
        let Some(entry) = next else {
            drop(permit);
            match sleep_until {
                Some(due) => {
                    tokio::select! {
                        () = inner.wake.notified() => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => inner.wake.notified().await,
            }
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let outcome = inner
                .handlers
                .run(
                    &inner.metrics,
                    entry.id,
                    &entry.kind,
                    entry.attempts,
                    entry.payload.clone(),
                )
                .await;
            let priority = entry.priority.index();
            settle(&inner, entry, outcome);
            if let Some(running) = inner
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .running
                .get_mut(priority)
            {
                *running -= 1;
            }
            drop(permit);
            inner.finished.notify_waiters();
            inner.wake.notify_one();
        });
    }
}

/// After a run: done, tried again later, or dead.
fn settle(inner: &Inner, mut entry: Entry, outcome: Result<(), Failure>) {
    entry.attempts += 1;
    let label = inner.handlers.label(&entry.kind).to_owned();
    let error = match outcome {
        Ok(()) => {
            inner.metrics.succeeded.with_label_values(&[&label]).inc();
            return;
        }
        Err(Failure::Retry(error)) if entry.attempts < inner.settings.max_attempts => {
            inner.metrics.retried.with_label_values(&[&label]).inc();
            let due = Instant::now() + inner.settings.backoff(entry.attempts);
            tracing::debug!(job = entry.id, kind = entry.kind, attempt = entry.attempts, %error, "job failed; retrying");
            let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.delayed.insert((due, entry.id), entry);
            return;
        }
        Err(Failure::Retry(error) | Failure::Permanent(error)) => error,
    };
    inner.metrics.dead.with_label_values(&[&label]).inc();
    tracing::warn!(job = entry.id, kind = entry.kind, attempts = entry.attempts, %error, "job dead-lettered");
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    if state.dead.len() >= MAX_DEAD {
        state.dead.remove(0);
        tracing::warn!(
            kept = MAX_DEAD,
            "in-process dead letters full: the oldest is forgotten"
        );
    }
    state.dead.push(DeadJob {
        id: entry.id,
        kind: entry.kind,
        priority: entry.priority,
        payload: entry.payload,
        attempts: entry.attempts,
        error,
    });
}
