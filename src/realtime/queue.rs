//! Queue reads and writes, for REST and socket alike.
//!
//! * Every write is a compare-and-swap in the store (the only judge of conflicts between
//!   replicas) and is pushed as `queue_changed` to every device of the user joined to
//!   `queue:{user_id}`, on every replica.
//! * Writes for a user run one at a time through that user's [`UserSession`] on this replica
//!   (see [`Queues::replace`] and [`Queues::apply`]).
//! * Each replica keeps users' current queues in a moka cache (TTL and capacity from the
//!   settings), but only while it hears the user's bus channel, so a cached queue is never
//!   stale without the replica hearing of it. A change heard from another replica updates the
//!   cached entry when it is the next revision and drops it when revisions were skipped (the
//!   next read goes to the store). Losing the bus drops every entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::Addr;
use moka::sync::Cache;
use rand::SeedableRng;
use rand::rngs::StdRng;
use scoped_futures::ScopedFutureExt;
use serde::Serialize;
use serde_json::{Value, json};

use super::events::UserEvent;
use super::hub::{Hub, Publish, SessionOf};
use super::session::{QueueCommand, UserSession};
use crate::cache::CacheAside;
use crate::domain::queue::{QueueOp, QueueState};
use crate::domain::{DeviceId, InvalidInput, UserId};
use crate::settings::Settings;
use crate::store::catalog::{self, TrackView};
use crate::store::queue::{self as stored, Written};
use crate::store::{self, Store, StoreError, preferences};

/// How many times an operation batch is re-applied to a newer state, without locking, when
/// another write won the race for the same revision; after that it is applied under the
/// queue row's lock, which cannot lose (ops never fail for contention).
const OPTIMISTIC_OP_ATTEMPTS: usize = 3;

/// How long a replica keeps trying to read a queue back after a write of unknown outcome.
const RECONCILE_FOR: Duration = Duration::from_secs(120);

/// The first wait before reading it back (doubled after each failed read, up to the most).
const RECONCILE_FIRST_WAIT: Duration = Duration::from_millis(250);
const RECONCILE_MOST_WAIT: Duration = Duration::from_secs(4);

/// Read-backs running at once on a replica: after an outage every user who wrote during it
/// is reconciled, and the store that just came back must not get all of them in one burst.
const RECONCILE_CONCURRENCY: usize = 8;

/// Tracks remembered for hydration, and for how long.
const TRACK_CACHE_CAPACITY: u64 = 100_000;
const TRACK_CACHE_TTL: Duration = Duration::from_secs(300);

/// How long an id the catalog does not know is remembered as unknown, so a queue full of
/// them costs no query per request; a track added meanwhile shows up on other replicas
/// after at most this long (at once on the replica that added it).
const UNKNOWN_TRACK_TTL: Duration = Duration::from_secs(10);

/// A queue as served: state (with `auto_advance` from preferences), revision, hydrated tracks.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    pub state: QueueState,
    pub revision: i64,
    pub tracks: Vec<TrackView>,
    /// Set (and sent, as `"tracks_incomplete": true`) when some tracks could not be read: a
    /// cached queue read, or a write that committed, as the store went away is served with the
    /// tracks this replica had cached. Missing ones are then not known to be absent from the
    /// catalog, only unread.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tracks_incomplete: bool,
}

/// A user's current queue as this replica knows it.
#[derive(Debug, Clone, PartialEq)]
struct Current {
    /// With `auto_advance` already filled from preferences.
    state: QueueState,
    revision: i64,
}

impl Current {
    /// The stored queue (revision 0 and empty when there is none) with the user's
    /// `auto_advance`.
    fn from_store(stored: Option<stored::StoredQueue>, auto_advance: bool) -> Self {
        let (mut state, revision) = stored.map(|s| (s.state, s.revision)).unwrap_or_default();
        state.auto_advance = auto_advance;
        Self { state, revision }
    }
}

/// Why a queue write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue changed since revision {expected}; the current revision is {current}")]
    Conflict { expected: i64, current: i64 },
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the user's session on this replica is gone")]
    SessionGone,
}

/// The `queue_changed` push for `view`; `origin` is the device that made the change (`None`
/// for a resync the server sends on its own).
pub fn changed_event(user: UserId, view: &QueueView, origin: Option<&DeviceId>) -> UserEvent {
    let mut payload = serde_json::to_value(view).unwrap_or_else(|_| json!({}));
    if let Value::Object(map) = &mut payload {
        let origin = origin.map_or(Value::Null, |d| Value::String(d.as_str().to_owned()));
        map.insert("origin_device_id".into(), origin);
    }
    UserEvent::Push {
        topic: format!("queue:{user}"),
        event: "queue_changed".into(),
        payload,
        revision: Some(view.revision),
    }
}

struct Inner {
    store: Store,
    hub: Addr<Hub>,
    /// Known tracks by id. Only tracks that exist are cached, so a track added to the catalog
    /// shows up at once; an edited one may show its old fields here for up to the TTL.
    tracks: Cache<String, TrackView>,
    /// Tracks other replicas read already (Redis), between this replica's cache and the store.
    cache: CacheAside,
    /// Ids the catalog did not know when last asked.
    unknown_tracks: Cache<String, ()>,
    /// The user sessions writes were last sent to (their addresses; a stopped one fails the
    /// send and is asked for again). Short-lived, so writes still pass through the hub now
    /// and then, which keeps a busy session from being retired.
    sessions: Cache<UserId, Addr<UserSession>>,
    /// Users' current queues, filled only while this replica hears their channel.
    queues: Cache<UserId, Arc<Current>>,
    /// False while the bus is lost: nothing may be cached then.
    bus_up: AtomicBool,
    max_entries: usize,
    /// Users whose queue is being reconciled after a write of unknown outcome, each with
    /// whether another such write came while it ran (then it starts over).
    reconciling: std::sync::Mutex<HashMap<UserId, bool>>,
    reconcile_slots: tokio::sync::Semaphore,
    /// How long after the store answers again a write it was sent earlier may still commit
    /// (a reply is due within the statement and connect timeouts).
    settle: Duration,
}

/// One replica's queue service; cheap to clone.
#[derive(Clone)]
pub struct Queues {
    inner: Arc<Inner>,
}

impl Queues {
    pub fn new(store: Store, hub: Addr<Hub>, cache: CacheAside, settings: &Settings) -> Self {
        let tracks = Cache::builder()
            .max_capacity(TRACK_CACHE_CAPACITY)
            .time_to_live(TRACK_CACHE_TTL)
            .build();
        let queues = Cache::builder()
            .max_capacity(settings.queue_cache_capacity)
            .time_to_live(Duration::from_secs(settings.queue_cache_ttl_secs))
            .build();
        let unknown_tracks = Cache::builder()
            .max_capacity(TRACK_CACHE_CAPACITY)
            .time_to_live(UNKNOWN_TRACK_TTL)
            .build();
        let linger = Duration::from_secs(settings.session_linger_secs);
        let sessions = Cache::builder()
            .max_capacity(settings.queue_cache_capacity)
            .time_to_live((linger / 2).max(Duration::from_secs(1)))
            .build();
        let inner = Inner {
            store,
            cache,
            hub,
            sessions,
            tracks,
            unknown_tracks,
            queues,
            bus_up: AtomicBool::new(true),
            max_entries: settings.queue_max_entries,
            reconciling: std::sync::Mutex::default(),
            reconcile_slots: tokio::sync::Semaphore::new(RECONCILE_CONCURRENCY),
            settle: Duration::from_millis(
                settings
                    .db_statement_timeout_ms
                    .saturating_add(settings.db_connect_timeout_ms),
            ),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The user's queue (revision 0 and an empty state for a user without one).
    ///
    /// A queue served from the cache keeps answering while the store is away: tracks that
    /// cannot be read then are left out and the view says `tracks_incomplete`.
    pub async fn read(&self, user: UserId) -> Result<QueueView, QueueError> {
        let current = self.current(user).await?;
        match self.view(current.state.clone(), current.revision).await {
            Err(QueueError::Store(error)) if error.is_unavailable() => {
                tracing::debug!(%error, %user, "tracks unreadable; serving the cached ones");
                Ok(self.cached_view(current.state.clone(), current.revision))
            }
            other => other,
        }
    }

    /// The cached queue, or the store's (cached when this replica hears the user's channel).
    async fn current(&self, user: UserId) -> Result<Arc<Current>, QueueError> {
        if let Some(current) = self.inner.queues.get(&user) {
            return Ok(current);
        }
        // Make sure a session exists and this replica hears the user's channel before
        // trusting what it reads for longer than this request.
        let subscribed = match self.inner.hub.send(SessionOf { user }).await {
            Ok((_, subscribed)) => subscribed.await.is_ok(),
            Err(_) => false,
        };
        let current = Arc::new(self.load(user).await?);
        if subscribed && self.inner.bus_up.load(Ordering::Acquire) {
            self.remember(user, current.clone());
        }
        Ok(current)
    }

    /// The store's queue after a lost compare-and-swap: the cache was behind (the winner's
    /// push is on its way). The cached entry stays until something later replaces it, so reads
    /// keep being served from memory even if the store fails now.
    async fn reload(&self, user: UserId) -> Result<Arc<Current>, QueueError> {
        let fresh = Arc::new(self.load(user).await?);
        if self.inner.queues.contains_key(&user) {
            self.remember(user, fresh.clone());
        }
        Ok(fresh)
    }

    /// Caches `next` as the user's queue unless the cache holds a later revision already (a
    /// push heard while this replica was reading the store must not be undone by the older
    /// read).
    fn remember(&self, user: UserId, next: Arc<Current>) {
        use moka::ops::compute::Op;
        let _ = self
            .inner
            .queues
            .entry(user)
            .and_compute_with(|cached| match cached {
                Some(entry) if entry.value().revision >= next.revision => Op::Nop,
                _ => Op::Put(next.clone()),
            });
    }

    /// The store's queue and the user's `auto_advance`.
    async fn load(&self, user: UserId) -> Result<Current, StoreError> {
        let mut pooled = self.inner.store.conn().await?;
        let mut conn = pooled.conn();
        let stored = stored::load(&mut conn, user).await?;
        let auto_advance = preferences::load(&mut conn, user).await?.auto_advance;
        Ok(Current::from_store(stored, auto_advance))
    }

    /// Stores a full snapshot. `expected` is the revision the client based it on (`None`:
    /// last write wins). Entry ids of surviving entries are kept. Runs in the user's session.
    pub async fn replace(
        &self,
        user: UserId,
        expected: Option<i64>,
        incoming: QueueState,
        device: &DeviceId,
    ) -> Result<QueueView, QueueError> {
        incoming.validate_incoming(self.inner.max_entries)?;
        let command = QueueCommand::Replace {
            expected,
            incoming,
            device: device.clone(),
        };
        self.in_session(user, command).await.map(|(view, _)| view)
    }

    /// Applies `ops` to the latest state, whatever revision the client based them on; returns
    /// the new view and the indexes of skipped ops. Runs in the user's session.
    pub async fn apply(
        &self,
        user: UserId,
        ops: Vec<QueueOp>,
        device: &DeviceId,
    ) -> Result<(QueueView, Vec<usize>), QueueError> {
        for op in &ops {
            op.validate()?;
        }
        self.in_session(
            user,
            QueueCommand::Apply {
                ops,
                device: device.clone(),
            },
        )
        .await
    }

    async fn in_session(
        &self,
        user: UserId,
        command: QueueCommand,
    ) -> Result<(QueueView, Vec<usize>), QueueError> {
        // The session's address is remembered for a while, so a write costs one actor round
        // trip, not two; going through the hub again now and then keeps the session in use.
        if let Some(session) = self.inner.sessions.get(&user) {
            match session.send(command.clone()).await {
                Ok(result) => return result,
                // Retired meanwhile, so the command never ran: ask the hub for the session.
                Err(_) => self.inner.sessions.invalidate(&user),
            }
        }
        let (session, _) = self
            .inner
            .hub
            .send(SessionOf { user })
            .await
            .map_err(|_| QueueError::SessionGone)?;
        self.inner.sessions.insert(user, session.clone());
        session
            .send(command)
            .await
            .map_err(|_| QueueError::SessionGone)?
    }

    /// Carries out a command; called by the user's session, one command at a time.
    pub(super) async fn execute(
        &self,
        user: UserId,
        command: QueueCommand,
    ) -> Result<(QueueView, Vec<usize>), QueueError> {
        let result = match command {
            QueueCommand::Replace {
                expected,
                incoming,
                device,
            } => self
                .replace_now(user, expected, incoming, &device)
                .await
                .map(|view| (view, Vec::new())),
            QueueCommand::Apply { ops, device } => self.apply_now(user, &ops, &device).await,
        };
        if let Err(QueueError::Store(error)) = &result
            && error.is_unavailable()
        {
            self.reconcile_later(user);
        }
        result
    }

    /// After a write failed with the store away, its outcome is unknown: the server may still
    /// commit what it was sent (a paused server does when it wakes). Once the store answers,
    /// the user's queue is read again and pushed to every device and replica, so none stays
    /// on the revision before it; and read once more after [`Inner::settle`], since the late
    /// commit can land just after that first read. One reconciliation per user at a time (a
    /// write of unknown outcome meanwhile makes it start over); it gives up, and says so,
    /// after [`RECONCILE_FOR`] without the store.
    fn reconcile_later(&self, user: UserId) {
        let Ok(mut reconciling) = self.inner.reconciling.lock() else {
            return;
        };
        if let Some(again) = reconciling.get_mut(&user) {
            *again = true;
            return;
        }
        reconciling.insert(user, false);
        drop(reconciling);
        let queues = self.clone();
        actix_web::rt::spawn(async move { queues.reconcile(user).await });
    }

    async fn reconcile(&self, user: UserId) {
        let mut started = std::time::Instant::now();
        let mut wait = RECONCILE_FIRST_WAIT;
        // Reads that succeeded since the last write of unknown outcome, and what was pushed.
        let mut reads = 0;
        let mut pushed = None;
        loop {
            let pause = if reads == 0 {
                crate::clock::jittered(wait)
            } else {
                self.inner.settle
            };
            tokio::time::sleep(pause).await;
            match self.read_back(user, pushed).await {
                Ok(revision) => {
                    pushed = Some(revision);
                    reads += 1;
                }
                Err(error) => {
                    reads = 0;
                    wait = (wait * 2).min(RECONCILE_MOST_WAIT);
                    if started.elapsed() >= RECONCILE_FOR {
                        if self.finish_reconciling(user) {
                            tracing::warn!(%user, %error, "gave up reconciling a queue after a write of unknown outcome");
                            return;
                        }
                        // Another write of unknown outcome: its own full time to be read back.
                        started = std::time::Instant::now();
                    }
                    continue;
                }
            }
            if reads < 2 {
                continue;
            }
            if self.finish_reconciling(user) {
                return;
            }
            reads = 0;
            wait = RECONCILE_FIRST_WAIT;
            started = std::time::Instant::now();
        }
    }

    /// Ends `user`'s reconciliation, unless another write of unknown outcome came meanwhile
    /// (then it is marked seen and false returned: the caller starts over). Checked and ended
    /// under one lock, so no such write can slip in between.
    fn finish_reconciling(&self, user: UserId) -> bool {
        let Ok(mut reconciling) = self.inner.reconciling.lock() else {
            return true;
        };
        if reconciling.get_mut(&user).is_some_and(std::mem::take) {
            return false;
        }
        reconciling.remove(&user);
        true
    }

    /// Reads the user's queue from the store into the cache and, unless it is at revision
    /// `pushed` already, pushes it to every device and replica; returns its revision.
    async fn read_back(&self, user: UserId, pushed: Option<i64>) -> Result<i64, StoreError> {
        let fresh = {
            let _slot = self.inner.reconcile_slots.acquire().await;
            Arc::new(self.load(user).await?)
        };
        if self.inner.queues.contains_key(&user) {
            self.remember(user, fresh.clone());
        }
        if pushed != Some(fresh.revision) {
            let view = self
                .view_or_cached(fresh.state.clone(), fresh.revision)
                .await;
            self.inner.hub.do_send(Publish {
                user,
                event: changed_event(user, &view, None),
            });
        }
        Ok(fresh.revision)
    }

    async fn replace_now(
        &self,
        user: UserId,
        expected: Option<i64>,
        incoming: QueueState,
        device: &DeviceId,
    ) -> Result<QueueView, QueueError> {
        let mut current = self.current(user).await?;
        loop {
            if let Some(expected) = expected
                && expected != current.revision
            {
                // The cache may be behind the store: check there before refusing.
                let fresh = self.load(user).await?;
                if expected != fresh.revision {
                    return Err(QueueError::Conflict {
                        expected,
                        current: fresh.revision,
                    });
                }
                current = Arc::new(fresh);
            }
            let state = current.state.replace_with(incoming.clone());
            match self.swap(user, &current, state, device).await? {
                Some(view) => return Ok(view),
                // Someone else wrote in between: with If-Match that is a conflict (unless the
                // store still says otherwise); without, last write wins on top of theirs.
                None => current = self.reload(user).await?,
            }
        }
    }

    async fn apply_now(
        &self,
        user: UserId,
        ops: &[QueueOp],
        device: &DeviceId,
    ) -> Result<(QueueView, Vec<usize>), QueueError> {
        let mut rng = StdRng::from_os_rng();
        let mut current = self.current(user).await?;
        for _ in 0..OPTIMISTIC_OP_ATTEMPTS {
            let mut state = current.state.clone();
            let skipped = state.apply_all(ops, self.inner.max_entries, &mut rng);
            if skipped.len() == ops.len() {
                // Nothing changed: no new revision.
                let view = self.view(current.state.clone(), current.revision).await?;
                return Ok((view, skipped));
            }
            if let Some(view) = self.swap(user, &current, state, device).await? {
                return Ok((view, skipped));
            }
            current = self.reload(user).await?;
        }
        loop {
            if let Some(done) = self.apply_locked(user, ops, device, &mut rng).await? {
                return Ok(done);
            }
        }
    }

    /// Applies `ops` to the stored queue under its row lock (PostgreSQL), in one transaction,
    /// so no other replica's write can come in between. `None` only when two first writes of
    /// the queue raced (there was no row to lock yet); the next attempt finds the row.
    async fn apply_locked(
        &self,
        user: UserId,
        ops: &[QueueOp],
        device: &DeviceId,
        rng: &mut StdRng,
    ) -> Result<Option<(QueueView, Vec<usize>)>, QueueError> {
        let max_entries = self.inner.max_entries;
        let mut pooled = self.inner.store.conn().await?;
        let outcome = pooled
            .conn()
            .transaction(|conn| {
                async move {
                    let stored = stored::load_locked(conn, user).await?;
                    let auto_advance = preferences::load(conn, user).await?.auto_advance;
                    let Current { state, revision } = Current::from_store(stored, auto_advance);
                    let mut next = state.clone();
                    let skipped = next.apply_all(ops, max_entries, rng);
                    if skipped.len() == ops.len() {
                        return Ok::<_, StoreError>(Some((state, revision, skipped, false)));
                    }
                    let written = stored::compare_and_swap(
                        conn,
                        user,
                        revision,
                        &next,
                        Some(device.as_str()),
                        store::now(),
                    )
                    .await?;
                    Ok(match written {
                        Written::Stored(revision) => Some((next, revision, skipped, true)),
                        Written::Conflict => None,
                    })
                }
                .scope_boxed()
            })
            .await?;
        drop(pooled);
        let Some((state, revision, skipped, changed)) = outcome else {
            return Ok(None);
        };
        let view = if changed {
            self.stored(user, state, revision, device).await?
        } else {
            self.view(state, revision).await?
        };
        Ok(Some((view, skipped)))
    }

    /// One compare-and-swap on top of `base`. On success the cache holds the new state and
    /// the change is pushed to the user's devices; on a lost race `None`.
    async fn swap(
        &self,
        user: UserId,
        base: &Current,
        mut state: QueueState,
        device: &DeviceId,
    ) -> Result<Option<QueueView>, QueueError> {
        state.auto_advance = base.state.auto_advance;
        let mut pooled = self.inner.store.conn().await?;
        let written = stored::compare_and_swap(
            &mut pooled.conn(),
            user,
            base.revision,
            &state,
            Some(device.as_str()),
            store::now(),
        )
        .await?;
        drop(pooled);
        let Written::Stored(revision) = written else {
            return Ok(None);
        };
        self.stored(user, state, revision, device).await.map(Some)
    }

    /// After `state` was stored as `revision`: the cache holds it and the user's devices are
    /// told.
    async fn stored(
        &self,
        user: UserId,
        state: QueueState,
        revision: i64,
        device: &DeviceId,
    ) -> Result<QueueView, QueueError> {
        if self.inner.queues.contains_key(&user) {
            self.remember(
                user,
                Arc::new(Current {
                    state: state.clone(),
                    revision,
                }),
            );
        }
        // The write is committed: it is acknowledged and pushed whatever happens next. Should
        // the store fail the track lookup now (it went away just after the commit), the view
        // carries the tracks this replica has cached.
        let view = self.view_or_cached(state, revision).await;
        self.inner.hub.do_send(Publish {
            user,
            event: changed_event(user, &view, Some(device)),
        });
        Ok(view)
    }

    /// A `queue_changed` heard from another replica: a later revision replaces the cached
    /// queue (the push carries the whole state); an older one changes nothing.
    pub fn observe(&self, user: UserId, revision: i64, payload: &Value) {
        let Some(current) = self.inner.queues.get(&user) else {
            return;
        };
        let Ok(state) =
            serde_json::from_value::<QueueState>(payload.get("state").cloned().unwrap_or_default())
        else {
            self.inner.queues.invalidate(&user);
            return;
        };
        // Its tracks are worth knowing even when the state is not news: this replica may hold
        // that state already (read back from the store after a lost race) without its tracks,
        // and would have to ask the store for them, which may be away.
        let complete = payload.get("tracks_incomplete") != Some(&Value::Bool(true));
        self.learn_tracks(&state.track_ids, payload.get("tracks"), complete);
        // A push carries the whole state at its revision, so a later one replaces the cached
        // entry even when revisions in between were not heard (with writers on several
        // replicas, another's change can arrive before this replica's own is cached).
        if revision > current.revision {
            self.remember(user, Arc::new(Current { state, revision }));
        }
    }

    /// Remembers what another replica's change says of its tracks (those it sent are known;
    /// when its list is `complete`, the other ids of the queue are not in the catalog), so
    /// this replica can serve the queue without asking the store, even while the store is
    /// away. Only fills gaps: what this replica cached itself stays.
    fn learn_tracks(&self, ids: &[String], tracks: Option<&Value>, complete: bool) {
        let sent: Vec<TrackView> = tracks
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        for id in ids {
            if self.knows_track(id) {
                continue;
            }
            match sent.iter().find(|track| track.id == *id) {
                Some(track) => self.inner.tracks.insert(id.clone(), track.clone()),
                None if complete => self.inner.unknown_tracks.insert(id.clone(), ()),
                None => {}
            }
        }
    }

    /// Drops a user's cached queue (their session here ended, or their preferences changed).
    pub fn forget(&self, user: UserId) {
        self.inner.queues.invalidate(&user);
    }

    /// The bus is lost: nothing cached can be trusted, and nothing may be cached until it is
    /// back.
    pub fn bus_lost(&self) {
        self.inner.bus_up.store(false, Ordering::Release);
        self.inner.queues.invalidate_all();
    }

    pub fn bus_restored(&self) {
        self.inner.bus_up.store(true, Ordering::Release);
    }

    /// [`view`](Self::view), or, should the store fail the track lookup, the view with the
    /// tracks this replica has cached (for a write already committed, which is acknowledged
    /// and pushed whatever happens next).
    async fn view_or_cached(&self, state: QueueState, revision: i64) -> QueueView {
        match self.view(state.clone(), revision).await {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(%error, revision, "tracks of a stored queue could not be read; using the cached ones");
                self.cached_view(state, revision)
            }
        }
    }

    /// `state` with the tracks this replica has cached; `tracks_incomplete` when some of its
    /// ids are neither cached nor known to be missing from the catalog.
    fn cached_view(&self, state: QueueState, revision: i64) -> QueueView {
        let mut tracks = Vec::with_capacity(state.track_ids.len());
        let mut tracks_incomplete = false;
        for id in &state.track_ids {
            match self.inner.tracks.get(id) {
                Some(track) => tracks.push(track),
                None => tracks_incomplete |= !self.inner.unknown_tracks.contains_key(id),
            }
        }
        QueueView {
            tracks,
            tracks_incomplete,
            state,
            revision,
        }
    }

    /// Hydrates `state` into a view: one track per position, duplicates kept, order kept,
    /// unknown ids dropped; tracks come from the cache, the rest from one query.
    pub async fn view(&self, state: QueueState, revision: i64) -> Result<QueueView, QueueError> {
        let tracks = self.tracks(&state.track_ids).await?;
        Ok(QueueView {
            state,
            revision,
            tracks,
            tracks_incomplete: false,
        })
    }

    /// The catalog's tracks for `ids`, one per known id, in order; from the cache, the rest
    /// from one query.
    pub async fn tracks(&self, ids: &[String]) -> Result<Vec<TrackView>, QueueError> {
        let mut missing: Vec<&str> = Vec::new();
        for id in ids {
            let known =
                self.inner.tracks.contains_key(id) || self.inner.unknown_tracks.contains_key(id);
            if !known && !missing.contains(&id.as_str()) {
                missing.push(id);
            }
        }
        if !missing.is_empty() {
            let keys: Vec<String> = missing.iter().map(|id| (*id).to_owned()).collect();
            let shared = self.inner.cache.get_many::<TrackView>("track", &keys).await;
            for track in shared.into_iter().flatten() {
                missing.retain(|id| *id != track.id);
                self.inner.tracks.insert(track.id.clone(), track);
            }
        }
        if !missing.is_empty() {
            let mut pooled = self.inner.store.conn().await?;
            let found = catalog::find_tracks(&mut pooled.conn(), &missing).await?;
            let shared: Vec<(String, &TrackView)> = found
                .iter()
                .map(|track| (track.id.clone(), track))
                .collect();
            self.inner
                .cache
                .put_many("track", &shared, TRACK_CACHE_TTL)
                .await;
            for id in &missing {
                if !found.iter().any(|track| track.id == *id) {
                    self.inner.unknown_tracks.insert((*id).to_owned(), ());
                }
            }
            for track in found {
                self.inner.tracks.insert(track.id.clone(), track);
            }
        }
        Ok(ids
            .iter()
            .filter_map(|id| self.inner.tracks.get(id))
            .collect())
    }

    /// Whether the track caches know `id` (as a track, or as an id the catalog lacks).
    pub fn knows_track(&self, id: &str) -> bool {
        self.inner.tracks.contains_key(id) || self.inner.unknown_tracks.contains_key(id)
    }

    /// A track's length, if the track is cached and has one.
    pub fn cached_duration(&self, id: &str) -> Option<i64> {
        self.inner.tracks.get(id).and_then(|t| t.duration_ms)
    }

    /// Forgets cached tracks after the catalog changed, here and in the shared cache (twice:
    /// at once, and again a moment later, in case a replica that read the old track from the
    /// store just before the change puts it back).
    pub async fn forget_tracks(&self, ids: &[String]) {
        self.forget_local_tracks(ids);
        self.inner
            .cache
            .invalidate_twice("track", ids.to_vec())
            .await;
    }

    /// Drops this replica's copies of `ids` (another replica changed them and cleared the
    /// shared cache).
    pub fn forget_local_tracks(&self, ids: &[String]) {
        for id in ids {
            self.inner.tracks.invalidate(id);
            self.inner.unknown_tracks.invalidate(id);
        }
    }
}
