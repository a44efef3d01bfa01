//! Jobs on Redis Streams, shared by every replica and durable as far as Redis is (AOF): one
//! stream per priority read through one consumer group, a delayed set for not-before times
//! and retries, a dead-letter stream. The recipe, and why each step is so, is in
//! `shared/design/JOBS.md`; every key is in `docs/redis-keys.md`.
//!
//! A replica's tasks: the fetcher (weighted non-blocking reads, one blocking read across the
//! three streams when all are empty, on a connection of its own), the acknowledger (batches
//! `XACK` + `XDEL` of finished entries), the lease keeper (renews what this replica holds),
//! the promoter (moves due delayed jobs into their streams) and the sweeper (reclaims
//! entries of replicas that stopped, dead-letters entries that kill their process, forgets
//! departed consumers, refreshes the depth gauges).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;

use crate::redis::{Redialed, Redialing};
use redis::streams::StreamReadReply;
use redis::{RedisError, Value as RedisValue};
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::{
    DeadJob, EnqueueError, Failure, Handlers, IDEMPOTENCY_TTL, JobMetrics, JobSettings, JobsError,
    Options, Priority, QueueStatus, Status, fetch_order,
};

/// The consumer group every replica reads through.
const GROUP: &str = "workers";

/// How long one blocking read waits for a job when every queue is empty.
const BLOCK: Duration = Duration::from_secs(2);

/// Most entries one read takes.
const MAX_BATCH: usize = 64;

/// Most delayed jobs one promotion moves (it runs again at once when there were more).
const PROMOTE_BATCH: usize = 100;

/// Most entries one reclaim call takes per stream.
const RECLAIM_BATCH: usize = 100;

/// Most reclaim calls per stream in one sweep. Each looks at up to 1,000 pending entries
/// (about 4 ms of Redis with 10,000 pending); the cursor carries on at the next sweep, so the
/// whole list is covered every `pending / 2,000` sweeps.
const RECLAIM_CALLS: usize = 2;

/// A consumer holding nothing and silent this long is forgotten.
const FORGET_CONSUMERS_AFTER: Duration = Duration::from_secs(3600);

/// Timing of the Redis implementation.
#[derive(Debug, Clone, Copy)]
pub struct RedisJobSettings {
    /// An entry held this long without its lease renewed is reclaimed by another replica.
    pub visibility: Duration,
    /// How often idle entries are looked for.
    pub sweep_every: Duration,
    /// How often due delayed jobs are moved to their queues.
    pub promote_every: Duration,
}

impl Default for RedisJobSettings {
    fn default() -> Self {
        Self {
            visibility: Duration::from_secs(30),
            sweep_every: Duration::from_secs(5),
            promote_every: Duration::from_millis(250),
        }
    }
}

/// Every key of the jobs, in one hash tag so that the scripts also run on a Redis Cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    tag: String,
    pub queues: [String; 3],
    pub delayed: String,
    pub dead: String,
    pub sequence: String,
    pub leader: String,
    pub epoch: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        let tag = format!("{{{namespace}:jobs}}");
        Self {
            queues: Priority::ALL.map(|p| format!("{tag}:q:{}", p.name())),
            delayed: format!("{tag}:delayed"),
            dead: format!("{tag}:dead"),
            sequence: format!("{tag}:seq"),
            leader: format!("{tag}:leader"),
            epoch: format!("{tag}:epoch"),
            tag,
        }
    }

    pub fn queue(&self, priority: Priority) -> &str {
        self.queues.get(priority.index()).map_or("", String::as_str)
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.tag)
    }

    /// The key a scheduler keeps a periodic job's last enqueued tick under.
    pub fn tick(&self, job: &str) -> String {
        format!("{}:tick:{job}", self.tag)
    }
}

/// One entry as read from a stream.
#[derive(Debug, Clone)]
struct Entry {
    priority: Priority,
    /// The stream entry's id (`<ms>-<seq>`).
    entry_id: String,
    id: u64,
    kind: String,
    attempt: u32,
    /// The payload as stored (JSON text).
    payload: String,
}

impl Entry {
    fn from_fields(priority: Priority, entry_id: String, fields: &HashMap<String, String>) -> Self {
        let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
        Self {
            priority,
            entry_id,
            id: field("id").parse().unwrap_or(0),
            kind: field("kind"),
            attempt: field("attempt").parse().unwrap_or(0),
            payload: field("payload"),
        }
    }
}

struct Scripts {
    enqueue: redis::Script,
    settle: redis::Script,
    promote: redis::Script,
    renew: redis::Script,
    reclaim: redis::Script,
    forget_consumers: redis::Script,
    retry_dead: redis::Script,
    hand_back: redis::Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            enqueue: redis::Script::new(include_str!("lua/enqueue.lua")),
            settle: redis::Script::new(include_str!("lua/settle.lua")),
            promote: redis::Script::new(include_str!("lua/promote.lua")),
            renew: redis::Script::new(include_str!("lua/renew.lua")),
            reclaim: redis::Script::new(include_str!("lua/reclaim.lua")),
            forget_consumers: redis::Script::new(include_str!("lua/forget_consumers.lua")),
            retry_dead: redis::Script::new(include_str!("lua/retry_dead.lua")),
            hand_back: redis::Script::new(include_str!("lua/hand_back.lua")),
        }
    }
}

/// What the reclaim script answers: the next cursor, the entries taken over (id, fields), and
/// the kinds of those it dead-lettered instead.
type Claimed = (String, Vec<(String, HashMap<String, String>)>, Vec<String>);

/// A finished entry waiting to be acknowledged.
struct Ack {
    priority: Priority,
    entry_id: String,
}

struct Inner {
    keys: Keys,
    /// For every command but the blocking read; reconnects by itself, and is replaced when a
    /// command times out (a silent connection).
    commands: Arc<Redialing>,
    /// Only for the blocking read: a blocked connection serves nothing else, and its
    /// response timeout must outlast the block (so a timeout means it went silent).
    blocking: Arc<Redialing>,
    scripts: Scripts,
    consumer: String,
    handlers: Handlers,
    settings: JobSettings,
    timing: RedisJobSettings,
    metrics: JobMetrics,
    permits: Arc<Semaphore>,
    /// Entries this replica holds, by priority, and whether each has started (the rest wait
    /// for a permit): the lease keeper renews exactly these, a shutdown hands back those not
    /// started.
    held: Mutex<[HashMap<String, bool>; 3]>,
    /// Where each queue's reclaim scan goes on from (`XAUTOCLAIM` looks at a bounded number
    /// of pending entries per call).
    cursors: Mutex<[String; 3]>,
    /// Reclaimed entries waiting for a permit.
    reclaimed: Mutex<VecDeque<Entry>>,
    reclaimed_ready: Notify,
    running: AtomicUsize,
    finished: Notify,
    /// Set once a shutdown's drain is over: jobs finishing later are not acknowledged.
    drained: AtomicBool,
    /// Whether the fetcher's last call to Redis failed (so an outage is logged once).
    failing: AtomicBool,
    acks: mpsc::UnboundedSender<Ack>,
    stop: watch::Sender<bool>,
}

/// The jobs on Redis Streams: cheap to clone.
#[derive(Clone)]
pub struct RedisJobs {
    inner: Arc<Inner>,
    /// The acknowledger, awaited by a shutdown so that no finished job is left unacked.
    acker: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl RedisJobs {
    /// Starts this replica's workers on the current runtime. Nothing connects yet: with
    /// Redis away the hub starts, enqueueing fails with a clear error, and the workers
    /// connect once Redis is back.
    pub fn start(
        client: redis::Client,
        namespace: &str,
        consumer: String,
        handlers: Handlers,
        settings: JobSettings,
        timing: RedisJobSettings,
        metrics: JobMetrics,
    ) -> Result<Self, RedisError> {
        let (jobs, acks) = Self::build(
            client, namespace, consumer, handlers, settings, timing, metrics,
        )?;
        let inner = &jobs.inner;
        tokio::spawn(fetch(inner.clone()));
        tokio::spawn(keep_leases(inner.clone()));
        tokio::spawn(promote(inner.clone()));
        tokio::spawn(sweep(inner.clone()));
        tokio::spawn(run_reclaimed(inner.clone()));
        let acker = tokio::spawn(acknowledge(inner.clone(), acks));
        *jobs.acker.lock().unwrap_or_else(|p| p.into_inner()) = Some(acker);
        Ok(jobs)
    }

    /// The queues without workers: to enqueue, read their status and handle dead letters
    /// (`segue jobs`).
    pub fn client(
        client: redis::Client,
        namespace: &str,
        metrics: JobMetrics,
    ) -> Result<Self, RedisError> {
        let (jobs, _) = Self::build(
            client,
            namespace,
            String::new(),
            Handlers::new(),
            JobSettings::default(),
            RedisJobSettings::default(),
            metrics,
        )?;
        Ok(jobs)
    }

    fn build(
        client: redis::Client,
        namespace: &str,
        consumer: String,
        handlers: Handlers,
        settings: JobSettings,
        timing: RedisJobSettings,
        metrics: JobMetrics,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ack>), RedisError> {
        let commands = Redialing::new_lazy(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1)),
        )?;
        let blocking = Redialing::new_lazy(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(BLOCK + Duration::from_secs(1)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1)),
        )?;
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            keys: Keys::new(namespace),
            commands,
            blocking,
            scripts: Scripts::load(),
            consumer,
            handlers,
            settings,
            timing,
            metrics,
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            held: Mutex::new(Default::default()),
            cursors: Mutex::new(["0-0".to_owned(), "0-0".to_owned(), "0-0".to_owned()]),
            reclaimed: Mutex::new(VecDeque::new()),
            reclaimed_ready: Notify::new(),
            running: AtomicUsize::new(0),
            finished: Notify::new(),
            drained: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            acks,
            stop,
        });
        let jobs = Self {
            inner,
            acker: Arc::new(Mutex::new(None)),
        };
        Ok((jobs, acks_rx))
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// A connection for commands (the scheduler shares it).
    pub fn connection(&self) -> Redialed {
        self.inner.commands.connection()
    }

    pub(super) async fn enqueue_value(
        &self,
        kind: &str,
        payload: Value,
        options: Options,
    ) -> Result<Option<u64>, EnqueueError> {
        // Taken even while this replica shuts down: other replicas run it.
        let keys = &self.inner.keys;
        let priority = options.priority.unwrap_or(Priority::Default);
        let idempotency = options
            .idempotency_key
            .as_deref()
            .map(|k| keys.idempotency(k));
        let delay_ms = options
            .delay
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let id: Option<u64> = self
            .inner
            .scripts
            .enqueue
            .key(&keys.sequence)
            .key(keys.queue(priority))
            .key(&keys.delayed)
            .key(idempotency.as_deref().unwrap_or(&keys.sequence))
            .arg(kind)
            .arg(payload.to_string())
            .arg(priority.index())
            .arg(delay_ms)
            .arg(IDEMPOTENCY_TTL.as_secs())
            .arg(if idempotency.is_some() { "1" } else { "0" })
            .invoke_async(&mut self.inner.commands.connection())
            .await?;
        if id.is_some() {
            self.inner
                .metrics
                .enqueued
                .with_label_values(&[self.inner.handlers.label(kind)])
                .inc();
        }
        Ok(id)
    }

    pub(super) async fn status(&self) -> Result<Status, JobsError> {
        status(&self.inner).await
    }

    /// The dead letters, oldest first, with their entry ids and payloads as stored.
    async fn dead_entries(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, String, DeadJob)>, JobsError> {
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(&self.inner.keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.inner.commands.connection())
            .await?;
        Ok(entries
            .into_iter()
            .map(|(entry_id, fields)| {
                let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
                let payload = field("payload");
                let dead = DeadJob {
                    id: field("id").parse().unwrap_or(0),
                    kind: field("kind"),
                    priority: Priority::from_name(&field("priority")).unwrap_or(Priority::Default),
                    payload: serde_json::from_str(&payload)
                        .unwrap_or_else(|_| Value::String(payload.clone())),
                    attempts: field("attempts").parse().unwrap_or(0),
                    error: field("error"),
                };
                (entry_id, payload, dead)
            })
            .collect())
    }

    pub(super) async fn dead(&self, limit: usize) -> Result<Vec<DeadJob>, JobsError> {
        Ok(self
            .dead_entries(limit)
            .await?
            .into_iter()
            .map(|(_, _, dead)| dead)
            .collect())
    }

    /// The dead letter of job `id`, found by reading the dead stream (which an operator keeps
    /// short), with its entry id and its payload as stored.
    async fn find_dead(&self, id: u64) -> Result<Option<(String, String, DeadJob)>, JobsError> {
        Ok(self
            .dead_entries(100_000)
            .await?
            .into_iter()
            .find(|(_, _, dead)| dead.id == id))
    }

    pub(super) async fn retry_dead(&self, id: u64) -> Result<bool, JobsError> {
        let Some((entry_id, payload, dead)) = self.find_dead(id).await? else {
            return Ok(false);
        };
        let keys = &self.inner.keys;
        let moved: u32 = self
            .inner
            .scripts
            .retry_dead
            .key(&keys.dead)
            .key(keys.queue(dead.priority))
            .arg(entry_id)
            .arg(dead.id)
            .arg(&dead.kind)
            .arg(payload)
            .invoke_async(&mut self.inner.commands.connection())
            .await?;
        Ok(moved == 1)
    }

    pub(super) async fn drop_dead(&self, id: u64) -> Result<bool, JobsError> {
        let Some((entry_id, _, _)) = self.find_dead(id).await? else {
            return Ok(false);
        };
        let deleted: u32 = redis::cmd("XDEL")
            .arg(&self.inner.keys.dead)
            .arg(entry_id)
            .query_async(&mut self.inner.commands.connection())
            .await?;
        Ok(deleted == 1)
    }

    /// One reclaim sweep over every queue now (the sweeper runs it every `sweep_every`);
    /// the number of entries taken over. Public for the benchmark.
    pub async fn reclaim_once(&self) -> Result<usize, RedisError> {
        reclaim(&self.inner).await
    }

    pub(super) async fn shutdown(&self, deadline: Duration) {
        let inner = &self.inner;
        inner.stop.send_replace(true);
        hand_back(inner).await;
        let drained = async {
            loop {
                let finished = inner.finished.notified();
                if inner.running.load(Ordering::SeqCst) == 0 {
                    return;
                }
                finished.await;
            }
        };
        if tokio::time::timeout(deadline, drained).await.is_err() {
            tracing::warn!(
                running = inner.running.load(Ordering::SeqCst),
                "jobs still running at the drain deadline: they stay pending and are reclaimed"
            );
        }
        inner.drained.store(true, Ordering::SeqCst);
        // Whatever finished is acknowledged before the process goes.
        let acker = self.acker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(acker) = acker {
            let _ = tokio::time::timeout(Duration::from_secs(2), acker).await;
        }
    }
}

fn stopped(inner: &Inner) -> bool {
    *inner.stop.borrow()
}

fn held(inner: &Inner) -> std::sync::MutexGuard<'_, [HashMap<String, bool>; 3]> {
    inner.held.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands back the entries this replica took but has not started: idle as if their lease had
/// lapsed (so the next sweep of any replica takes them) and their delivery not counted (they
/// never ran, so they must not count towards dead-lettering).
async fn hand_back(inner: &Arc<Inner>) {
    inner
        .reclaimed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    let unstarted: Vec<(Priority, Vec<String>)> = {
        let held = held(inner);
        Priority::ALL
            .into_iter()
            .zip(held.iter())
            .map(|(p, ids)| {
                let ids = ids
                    .iter()
                    .filter(|(_, started)| !**started)
                    .map(|(id, _)| id.clone())
                    .collect();
                (p, ids)
            })
            .filter(|(_, ids): &(Priority, Vec<String>)| !ids.is_empty())
            .collect()
    };
    for (priority, ids) in unstarted {
        let handed: Result<u32, RedisError> = inner
            .scripts
            .hand_back
            .key(inner.keys.queue(priority))
            .arg(&inner.consumer)
            .arg(u64::try_from(inner.timing.visibility.as_millis()).unwrap_or(u64::MAX))
            .arg(&ids)
            .invoke_async(&mut inner.commands.connection())
            .await;
        match handed {
            Ok(n) => tracing::info!(handed = n, "jobs: handed back entries not started"),
            Err(error) => {
                tracing::warn!(%error, "jobs: handing back entries failed; they are reclaimed later")
            }
        }
        if let Some(map) = held(inner).get_mut(priority.index()) {
            map.retain(|_, started| *started);
        }
    }
}

/// Creates the consumer group on every stream (and the streams), starting from their first
/// entry so that jobs enqueued before any worker ran are not skipped.
async fn ensure_groups(inner: &Inner) -> Result<(), RedisError> {
    let mut conn = inner.commands.connection();
    for queue in &inner.keys.queues {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(queue)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits before trying Redis again after a failure; false when stopping.
async fn pause_after_error(inner: &Inner, what: &str, error: &RedisError, pause: Duration) -> bool {
    // Said once per outage, not twice a second.
    if inner.failing.swap(true, Ordering::SeqCst) {
        tracing::debug!(%error, "jobs: {what} failed; trying again in {pause:?}");
    } else {
        tracing::warn!(%error, "jobs: {what} failed; trying again every {pause:?}");
    }
    let mut stop = inner.stop.subscribe();
    tokio::select! {
        () = tokio::time::sleep(pause) => !stopped(inner),
        _ = stop.wait_for(|s| *s) => false,
    }
}

fn entries_of(reply: StreamReadReply, inner: &Inner) -> Vec<Entry> {
    let mut entries = Vec::new();
    for stream in reply.keys {
        let Some(priority) = Priority::ALL
            .into_iter()
            .find(|p| inner.keys.queue(*p) == stream.key)
        else {
            continue;
        };
        for id in stream.ids {
            let fields: HashMap<String, String> = id
                .map
                .iter()
                .filter_map(|(k, v)| {
                    redis::from_redis_value_ref::<String>(v)
                        .ok()
                        .map(|v| (k.clone(), v))
                })
                .collect();
            entries.push(Entry::from_fields(priority, id.id, &fields));
        }
    }
    entries
}

/// The fetcher: takes as many entries as there are free permits, from the queues in a
/// weighted order, and starts them.
async fn fetch(inner: Arc<Inner>) {
    let mut groups_ready = false;
    let mut stop = inner.stop.subscribe();
    loop {
        if stopped(&inner) {
            return;
        }
        if !groups_ready {
            match ensure_groups(&inner).await {
                Ok(()) => groups_ready = true,
                Err(error) => {
                    if pause_after_error(
                        &inner,
                        "creating the consumer group",
                        &error,
                        Duration::from_secs(1),
                    )
                    .await
                    {
                        continue;
                    }
                    return;
                }
            }
        }
        let first = tokio::select! {
            permit = inner.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match inner.permits.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let entries = match read(&inner, &mut permits).await {
            Ok(read) => {
                if inner.failing.swap(false, Ordering::SeqCst) {
                    tracing::info!("jobs: Redis answers again");
                }
                read
            }
            Err(error) => {
                if error.code() == Some("NOGROUP") {
                    // Redis lost the group (restarted without persistence): make it anew.
                    groups_ready = false;
                }
                drop(permits);
                if pause_after_error(&inner, "reading jobs", &error, Duration::from_millis(500))
                    .await
                {
                    continue;
                }
                return;
            }
        };
        for entry in entries {
            let permit = match permits.pop() {
                Some(permit) => permit,
                // A blocking read may bring one entry per stream: the extra wait their turn.
                None => tokio::select! {
                    permit = inner.permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    // Left held: the shutdown hands it back.
                    _ = stop.wait_for(|s| *s) => return,
                },
            };
            start(&inner, entry, permit);
        }
    }
}

/// Non-blocking reads of up to one entry per permit from the queues in weighted order (the
/// first that has any wins); when all are empty, one blocking read across the three, holding
/// one permit only (so that what the sweeper reclaims meanwhile can start) and asking each
/// stream for one entry.
async fn read(
    inner: &Inner,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Result<Vec<Entry>, RedisError> {
    let count = permits.len();
    let mut conn = inner.commands.connection();
    for priority in fetch_order() {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&inner.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(inner.keys.queue(priority))
            .arg(">")
            .query_async(&mut conn)
            .await?;
        let entries = reply.map(|r| entries_of(r, inner)).unwrap_or_default();
        if !entries.is_empty() {
            held_insert(inner, &entries);
            return Ok(entries);
        }
    }
    permits.truncate(1);
    let mut blocking = inner.blocking.connection();
    let mut stop = inner.stop.subscribe();
    let read = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&inner.consumer)
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&inner.keys.queues)
        .arg(&[">", ">", ">"][..])
        .to_owned();
    let reply: Option<StreamReadReply> = tokio::select! {
        reply = read.query_async(&mut blocking) => reply?,
        // Entries the abandoned read was given stay pending and are reclaimed.
        _ = stop.wait_for(|s| *s) => None,
    };
    let entries = reply.map(|r| entries_of(r, inner)).unwrap_or_default();
    held_insert(inner, &entries);
    Ok(entries)
}

fn held_insert(inner: &Inner, entries: &[Entry]) {
    let mut held = held(inner);
    for entry in entries {
        if let Some(map) = held.get_mut(entry.priority.index()) {
            map.insert(entry.entry_id.clone(), false);
        }
    }
}

fn held_remove(inner: &Inner, entry: &Entry) {
    if let Some(set) = held(inner).get_mut(entry.priority.index()) {
        set.remove(&entry.entry_id);
    }
}

/// Runs one entry on its own task, holding `permit` until it is settled. Once a shutdown
/// has begun nothing starts: the entry stays held, to be handed back.
fn start(inner: &Arc<Inner>, entry: Entry, permit: OwnedSemaphorePermit) {
    if stopped(inner) {
        return;
    }
    if let Some(map) = held(inner).get_mut(entry.priority.index()) {
        map.insert(entry.entry_id.clone(), true);
    }
    inner.running.fetch_add(1, Ordering::SeqCst);
    let inner = inner.clone();
    tokio::spawn(async move {
        let payload = serde_json::from_str(&entry.payload);
        let outcome = match payload {
            Ok(payload) => {
                inner
                    .handlers
                    .run(
                        &inner.metrics,
                        entry.id,
                        &entry.kind,
                        entry.attempt,
                        payload,
                    )
                    .await
            }
            Err(e) => Err(Failure::Permanent(format!("unreadable payload: {e}"))),
        };
        settle(&inner, &entry, outcome).await;
        held_remove(&inner, &entry);
        inner.running.fetch_sub(1, Ordering::SeqCst);
        drop(permit);
        inner.finished.notify_waiters();
    });
}

/// After a run: acknowledged (success), delayed for a retry, or dead-lettered.
async fn settle(inner: &Inner, entry: &Entry, outcome: Result<(), Failure>) {
    let label = inner.handlers.label(&entry.kind);
    let runs = entry.attempt + 1;
    let (error, backoff_ms) = match outcome {
        Ok(()) => {
            inner.metrics.succeeded.with_label_values(&[label]).inc();
            let _ = inner.acks.send(Ack {
                priority: entry.priority,
                entry_id: entry.entry_id.clone(),
            });
            return;
        }
        Err(Failure::Retry(error)) if runs < inner.settings.max_attempts => {
            inner.metrics.retried.with_label_values(&[label]).inc();
            let backoff = inner.settings.backoff(runs);
            tracing::debug!(job = entry.id, kind = entry.kind, attempt = runs, %error, "job failed; retrying");
            (
                error,
                i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX),
            )
        }
        Err(Failure::Retry(error) | Failure::Permanent(error)) => {
            inner.metrics.dead.with_label_values(&[label]).inc();
            tracing::warn!(job = entry.id, kind = entry.kind, attempts = runs, %error, "job dead-lettered");
            (error, -1)
        }
    };
    let keys = &inner.keys;
    for pause in [0, 200, 1000] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let settled: Result<u32, RedisError> = inner
            .scripts
            .settle
            .key(keys.queue(entry.priority))
            .key(&keys.delayed)
            .key(&keys.dead)
            .arg(&entry.entry_id)
            .arg(entry.id)
            .arg(&entry.kind)
            .arg(runs)
            .arg(&entry.payload)
            .arg(&error)
            .arg(backoff_ms)
            .arg(entry.priority.index())
            .arg(entry.priority.name())
            .arg(&inner.consumer)
            .invoke_async(&mut inner.commands.connection())
            .await;
        match settled {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, job = entry.id, "jobs: settling a failed run failed")
            }
        }
    }
    // Left pending: reclaimed after the visibility timeout and run again.
}

/// The acknowledger: `XACK` + `XDEL` for finished entries, in batches, atomically per
/// stream (so that an entry is never acknowledged yet still counted in its stream). On a
/// Redis error the batch is kept and tried again.
async fn acknowledge(inner: Arc<Inner>, mut acks: mpsc::UnboundedReceiver<Ack>) {
    let mut batch: Vec<Ack> = Vec::new();
    loop {
        if batch.is_empty() {
            let poll = if stopped(&inner) { 10 } else { 100 };
            match tokio::time::timeout(Duration::from_millis(poll), acks.recv()).await {
                Ok(Some(ack)) => batch.push(ack),
                Ok(None) => return,
                Err(_) => {
                    // Stopping, and nothing left that could still finish in time.
                    let settled = inner.running.load(Ordering::SeqCst) == 0
                        || inner.drained.load(Ordering::SeqCst);
                    if stopped(&inner) && settled && acks.is_empty() {
                        return;
                    }
                    continue;
                }
            }
        }
        while batch.len() < 1024 {
            match acks.try_recv() {
                Ok(ack) => batch.push(ack),
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for priority in Priority::ALL {
            let ids: Vec<&str> = batch
                .iter()
                .filter(|a| a.priority == priority)
                .map(|a| a.entry_id.as_str())
                .collect();
            if !ids.is_empty() {
                let queue = inner.keys.queue(priority);
                pipe.cmd("XACK").arg(queue).arg(GROUP).arg(&ids).ignore();
                pipe.cmd("XDEL").arg(queue).arg(&ids).ignore();
            }
        }
        match pipe
            .query_async::<()>(&mut inner.commands.connection())
            .await
        {
            Ok(()) => batch.clear(),
            Err(error) => {
                tracing::warn!(%error, pending = batch.len(), "jobs: acknowledging failed; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The lease keeper: every visibility/4, renews the entries this replica holds, until a
/// shutdown's drain is over (jobs draining keep their leases, so nobody else runs them
/// meanwhile).
async fn keep_leases(inner: Arc<Inner>) {
    let every = inner.timing.visibility / 4;
    loop {
        tokio::time::sleep(every).await;
        if inner.drained.load(Ordering::SeqCst) {
            return;
        }
        let batches: Vec<(Priority, Vec<String>)> = {
            let held = held(&inner);
            Priority::ALL
                .into_iter()
                .zip(held.iter())
                .filter(|(_, ids)| !ids.is_empty())
                .map(|(p, ids)| (p, ids.keys().cloned().collect()))
                .collect()
        };
        for (priority, ids) in batches {
            let renewed: Result<u32, RedisError> = inner
                .scripts
                .renew
                .key(inner.keys.queue(priority))
                .arg(&inner.consumer)
                .arg(&ids)
                .invoke_async(&mut inner.commands.connection())
                .await;
            if let Err(error) = renewed {
                tracing::warn!(%error, "jobs: renewing leases failed");
            }
        }
    }
}

/// The promoter: moves due delayed jobs into their queues.
async fn promote(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    loop {
        let moved: Result<usize, RedisError> = inner
            .scripts
            .promote
            .key(&inner.keys.delayed)
            .key(&inner.keys.queues)
            .key(&inner.keys.dead)
            .arg(PROMOTE_BATCH)
            .invoke_async(&mut inner.commands.connection())
            .await;
        let pause = match moved {
            Ok(n) if n >= PROMOTE_BATCH => Duration::ZERO,
            Ok(_) => inner.timing.promote_every,
            Err(error) => {
                tracing::debug!(%error, "jobs: promoting delayed jobs failed");
                inner.timing.promote_every.max(Duration::from_secs(1))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Takes over idle entries of every queue (up to a batch per queue), for
/// [`run_reclaimed`] to start.
async fn reclaim(inner: &Arc<Inner>) -> Result<usize, RedisError> {
    let mut taken = 0;
    for priority in Priority::ALL {
        let mut claimed = Vec::new();
        // Scan on from where the last sweep stopped, a few calls at most per sweep: each
        // call looks at up to ten times the batch, so entries behind a long run of live ones
        // are reached too.
        for _ in 0..RECLAIM_CALLS {
            let cursor = inner
                .cursors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(priority.index())
                .cloned()
                .unwrap_or_else(|| "0-0".to_owned());
            let reclaimed: Result<Claimed, RedisError> = inner
                .scripts
                .reclaim
                .key(inner.keys.queue(priority))
                .key(&inner.keys.dead)
                .arg(&inner.consumer)
                .arg(u64::try_from(inner.timing.visibility.as_millis()).unwrap_or(u64::MAX))
                .arg(&cursor)
                .arg(RECLAIM_BATCH)
                .arg(inner.settings.max_attempts)
                .arg(priority.name())
                .invoke_async(&mut inner.commands.connection())
                .await;
            let (next, batch, dead_kinds) = match reclaimed {
                Ok(reclaimed) => reclaimed,
                // No group yet (nothing ever fetched, or Redis lost it): nothing to reclaim.
                Err(e) if e.code() == Some("NOGROUP") => {
                    ensure_groups(inner).await?;
                    break;
                }
                Err(e) => return Err(e),
            };
            for kind in &dead_kinds {
                inner
                    .metrics
                    .dead
                    .with_label_values(&[inner.handlers.label(kind)])
                    .inc();
            }
            claimed.extend(batch);
            let wrapped = next == "0-0";
            if let Some(slot) = inner
                .cursors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(priority.index())
            {
                *slot = next;
            }
            if wrapped || claimed.len() >= RECLAIM_BATCH {
                break;
            }
        }
        // An entry this replica still holds (its lease lapsed while Redis was away) is
        // already running or waiting here: claiming it renewed it, nothing more.
        let entries: Vec<Entry> = {
            let held = held(inner);
            claimed
                .into_iter()
                .filter(|(id, _)| {
                    !held
                        .get(priority.index())
                        .is_some_and(|h| h.contains_key(id))
                })
                .map(|(id, fields)| Entry::from_fields(priority, id, &fields))
                .collect()
        };
        taken += entries.len();
        held_insert(inner, &entries);
        inner
            .reclaimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(entries);
        inner.reclaimed_ready.notify_one();
    }
    if taken > 0 {
        inner.metrics.reclaimed.inc_by(taken as u64);
        tracing::info!(taken, "jobs: reclaimed entries a stopped replica held");
    }
    Ok(taken)
}

/// Starts reclaimed entries as permits free up (competing fairly with the fetcher).
async fn run_reclaimed(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    loop {
        let entry = loop {
            let ready = inner.reclaimed_ready.notified();
            let next = inner
                .reclaimed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            if let Some(entry) = next {
                break entry;
            }
            tokio::select! {
                () = ready => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        };
        let permit = tokio::select! {
            permit = inner.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            // Left pending: another replica reclaims it.
            _ = stop.wait_for(|s| *s) => return,
        };
        start(&inner, entry, permit);
    }
}

/// The sweeper: reclaims, forgets departed consumers, refreshes the depth gauges.
async fn sweep(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    loop {
        tokio::select! {
            () = tokio::time::sleep(inner.timing.sweep_every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // While reclaimed entries still wait for permits, taking more would only hold them
        // from other replicas.
        let waiting = inner
            .reclaimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if waiting < inner.settings.concurrency * 4
            && let Err(error) = reclaim(&inner).await
        {
            tracing::debug!(%error, "jobs: reclaiming failed");
        }
        let forgot: Result<u32, RedisError> = inner
            .scripts
            .forget_consumers
            .key(&inner.keys.queues)
            .arg(u64::try_from(FORGET_CONSUMERS_AFTER.as_millis()).unwrap_or(u64::MAX))
            .arg(&inner.consumer)
            .invoke_async(&mut inner.commands.connection())
            .await;
        if let Err(error) = forgot {
            tracing::debug!(%error, "jobs: forgetting departed consumers failed");
        }
        if let Ok(status) = status(&inner).await {
            inner.metrics.observe(&status);
        }
    }
}

async fn status(inner: &Inner) -> Result<Status, JobsError> {
    let keys = &inner.keys;
    let mut pipe = redis::pipe();
    for queue in &keys.queues {
        pipe.cmd("XLEN").arg(queue);
    }
    for queue in &keys.queues {
        pipe.cmd("XPENDING").arg(queue).arg(GROUP);
    }
    pipe.cmd("ZCARD").arg(&keys.delayed);
    pipe.cmd("XLEN").arg(&keys.dead);
    pipe.cmd("GET").arg(&keys.leader);
    // XPENDING on a stream without the group yet is an error: make them first.
    ensure_groups(inner).await?;
    let replies: Vec<RedisValue> = pipe.query_async(&mut inner.commands.connection()).await?;
    let number = |v: Option<&RedisValue>| -> u64 {
        v.and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
            .unwrap_or(0)
    };
    let pending = |v: Option<&RedisValue>| -> u64 {
        match v {
            Some(RedisValue::Array(summary)) => number(summary.first()),
            _ => 0,
        }
    };
    let queues = Priority::ALL
        .into_iter()
        .enumerate()
        .map(|(i, priority)| {
            let length = number(replies.get(i));
            let in_flight = pending(replies.get(3 + i));
            QueueStatus {
                priority,
                waiting: length.saturating_sub(in_flight),
                in_flight,
            }
        })
        .collect();
    let leader = replies
        .get(8)
        .and_then(|v| redis::from_redis_value_ref::<Option<String>>(v).ok())
        .flatten()
        .map(|token| super::scheduler::holder_of(&token));
    Ok(Status {
        backend: "redis",
        queues,
        delayed: number(replies.get(6)),
        dead: number(replies.get(7)),
        leader,
    })
}
