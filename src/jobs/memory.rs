//! Jobs run in this process: queues in memory, tokio tasks, at most `concurrency` at once.
//! Nothing survives the process: a crash or restart loses waiting and delayed jobs (the
//! hub says so once at start-up). Without `REDIS_URL` this is the embedded default.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::{
    DeadJob, EnqueueError, Failure, Handlers, JobSettings, Kind, Options, Priority, fetch_order,
};

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
    idempotency: HashSet<String>,
    dead: Vec<DeadJob>,
    next_id: u64,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Notify,
    permits: Arc<Semaphore>,
    handlers: Handlers,
    settings: JobSettings,
}

/// The in-process jobs: cheap to clone.
#[derive(Clone)]
pub struct MemoryJobs {
    inner: Arc<Inner>,
}

impl MemoryJobs {
    /// Starts the dispatcher on the current runtime.
    pub fn start(handlers: Handlers, settings: JobSettings) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            handlers,
            settings,
        });
        tokio::spawn(dispatch(inner.clone()));
        Self { inner }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues a job of `kind`; `Ok(None)` when its idempotency key was used already.
    pub fn enqueue<P: Serialize>(
        &self,
        kind: &Kind<P>,
        payload: &P,
        options: Options,
    ) -> Result<Option<u64>, EnqueueError> {
        let payload = serde_json::to_value(payload)?;
        self.enqueue_value(kind.name(), payload, options)
    }

    /// Enqueues a job as raw JSON (the operator's retry of a dead job; tests).
    pub fn enqueue_value(
        &self,
        kind: &str,
        payload: Value,
        options: Options,
    ) -> Result<Option<u64>, EnqueueError> {
        let mut state = self.state();
        if state.closed {
            return Err(EnqueueError::Closed);
        }
        if let Some(key) = &options.idempotency_key
            && !state.idempotency.insert(key.clone())
        {
            return Ok(None);
        }
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

    /// Jobs waiting now (critical, default, low) and delayed (for status and tests).
    pub fn waiting(&self) -> ([usize; 3], usize) {
        let state = self.state();
        let queues = &state.queues;
        (
            [
                queues.critical.len(),
                queues.default.len(),
                queues.low.len(),
            ],
            state.delayed.len(),
        )
    }

    /// Stops taking jobs; those running finish.
    pub fn close(&self) {
        self.state().closed = true;
        self.inner.wake.notify_one();
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
            let outcome = match inner.handlers.get(&entry.kind) {
                Some(handler) => handler(entry.payload.clone()).await,
                None => Err(Failure::Permanent(format!(
                    "no handler for {:?}",
                    entry.kind
                ))),
            };
            settle(&inner, entry, outcome);
            drop(permit);
            inner.wake.notify_one();
        });
    }
}

/// After a run: done, tried again later, or dead.
fn settle(inner: &Inner, mut entry: Entry, outcome: Result<(), Failure>) {
    entry.attempts += 1;
    let error = match outcome {
        Ok(()) => return,
        Err(Failure::Retry(error)) if entry.attempts < inner.settings.max_attempts => {
            let due = Instant::now() + inner.settings.backoff(entry.attempts);
            tracing::debug!(job = entry.id, kind = entry.kind, attempt = entry.attempts, %error, "job failed; retrying");
            let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.delayed.insert((due, entry.id), entry);
            return;
        }
        Err(Failure::Retry(error) | Failure::Permanent(error)) => error,
    };
    tracing::warn!(job = entry.id, kind = entry.kind, attempts = entry.attempts, %error, "job dead-lettered");
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    state.dead.push(DeadJob {
        id: entry.id,
        kind: entry.kind,
        payload: entry.payload,
        attempts: entry.attempts,
        error,
    });
}
