//! Queue reads and writes, for REST and socket alike: every write is a compare-and-swap in
//! the store, and every successful write is pushed as `queue_changed` to every device of the
//! user joined to `queue:{user_id}`, on every replica.

use std::time::Duration;

use actix::Addr;
use moka::future::Cache;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::{Value, json};

use super::events::UserEvent;
use super::hub::{Hub, Publish};
use crate::domain::queue::{QueueOp, QueueState};
use crate::domain::{DeviceId, InvalidInput, UserId};
use crate::store::catalog::{self, TrackView};
use crate::store::queue::{self as stored, StoredQueue, Written};
use crate::store::{self, Store, StoreError, preferences};

/// How many times an operation batch is re-applied to a newer state when another write won
/// the race for the same revision.
const MAX_OP_RETRIES: usize = 16;

/// Tracks remembered for hydration, and for how long.
const TRACK_CACHE_CAPACITY: u64 = 100_000;
const TRACK_CACHE_TTL: Duration = Duration::from_secs(300);

/// A queue as served: state (with `auto_advance` from preferences), revision, hydrated tracks.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    pub state: QueueState,
    pub revision: i64,
    pub tracks: Vec<TrackView>,
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

/// Why a queue write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue changed since revision {expected}; the current revision is {current}")]
    Conflict { expected: i64, current: i64 },
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One replica's queue service; cheap to clone.
#[derive(Clone)]
pub struct Queues {
    store: Store,
    hub: Addr<Hub>,
    /// Known tracks by id. Only tracks that exist are cached, so a track added to the catalog
    /// shows up at once; an edited one may show its old fields here for up to the TTL.
    tracks: Cache<String, TrackView>,
    max_entries: usize,
}

impl Queues {
    pub fn new(store: Store, hub: Addr<Hub>, max_entries: usize) -> Self {
        let tracks = Cache::builder()
            .max_capacity(TRACK_CACHE_CAPACITY)
            .time_to_live(TRACK_CACHE_TTL)
            .build();
        Self {
            store,
            hub,
            tracks,
            max_entries,
        }
    }

    /// The most entries a queue may hold.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The user's queue (revision 0 and an empty state for a user without one).
    pub async fn read(&self, user: UserId) -> Result<QueueView, QueueError> {
        let mut pooled = self.store.conn().await?;
        let mut conn = pooled.conn();
        let stored = stored::load(&mut conn, user).await?;
        let auto_advance = preferences::load(&mut conn, user).await?.auto_advance;
        drop(pooled);
        let (mut state, revision) = stored.map(|s| (s.state, s.revision)).unwrap_or_default();
        state.auto_advance = auto_advance;
        self.view(state, revision).await
    }

    /// Stores a full snapshot. `expected` is the revision the client based it on (`None`:
    /// last write wins). Entry ids of surviving entries are kept.
    pub async fn replace(
        &self,
        user: UserId,
        expected: Option<i64>,
        incoming: QueueState,
        device: &DeviceId,
    ) -> Result<QueueView, QueueError> {
        incoming.validate_incoming(self.max_entries)?;
        loop {
            let current = self.load(user).await?;
            let base = current.as_ref().map_or(0, |c| c.revision);
            if let Some(expected) = expected
                && expected != base
            {
                return Err(QueueError::Conflict {
                    expected,
                    current: base,
                });
            }
            let previous = current.map(|c| c.state).unwrap_or_default();
            let state = previous.replace_with(incoming.clone());
            match self.swap(user, base, &state, device).await? {
                Some(view) => return Ok(view),
                // Someone else wrote in between: with If-Match that is a conflict; without,
                // last write wins, so go again on top of theirs.
                None if expected.is_some() => {
                    let current = self.load(user).await?.map_or(0, |c| c.revision);
                    return Err(QueueError::Conflict {
                        expected: base,
                        current,
                    });
                }
                None => continue,
            }
        }
    }

    /// Applies `ops` to the latest state, whatever revision the client based them on; returns
    /// the new view and the indexes of skipped ops.
    pub async fn apply(
        &self,
        user: UserId,
        ops: &[QueueOp],
        device: &DeviceId,
    ) -> Result<(QueueView, Vec<usize>), QueueError> {
        for op in ops {
            op.validate()?;
        }
        let mut rng = StdRng::from_os_rng();
        for _ in 0..MAX_OP_RETRIES {
            let current = self.load(user).await?;
            let base = current.as_ref().map_or(0, |c| c.revision);
            let mut state = current.map(|c| c.state).unwrap_or_default();
            let skipped = state.apply_all(ops, self.max_entries, &mut rng);
            if skipped.len() == ops.len() {
                // Nothing changed: no new revision.
                let view = self.read(user).await?;
                return Ok((view, skipped));
            }
            if let Some(view) = self.swap(user, base, &state, device).await? {
                return Ok((view, skipped));
            }
        }
        let current = self.load(user).await?.map_or(0, |c| c.revision);
        Err(QueueError::Conflict {
            expected: current,
            current,
        })
    }

    async fn load(&self, user: UserId) -> Result<Option<StoredQueue>, StoreError> {
        let mut pooled = self.store.conn().await?;
        stored::load(&mut pooled.conn(), user).await
    }

    /// One compare-and-swap; on success the change is pushed to the user's devices.
    async fn swap(
        &self,
        user: UserId,
        base: i64,
        state: &QueueState,
        device: &DeviceId,
    ) -> Result<Option<QueueView>, QueueError> {
        let mut pooled = self.store.conn().await?;
        let mut conn = pooled.conn();
        let written = stored::compare_and_swap(
            &mut conn,
            user,
            base,
            state,
            Some(device.as_str()),
            store::now(),
        )
        .await?;
        let Written::Stored(revision) = written else {
            return Ok(None);
        };
        let auto_advance = preferences::load(&mut conn, user).await?.auto_advance;
        drop(pooled);
        let mut state = state.clone();
        state.auto_advance = auto_advance;
        let view = self.view(state, revision).await?;
        self.push(user, &view, device);
        Ok(Some(view))
    }

    /// Sends `queue_changed` to every device of the user, here and on other replicas.
    fn push(&self, user: UserId, view: &QueueView, origin: &DeviceId) {
        self.hub.do_send(Publish {
            user,
            event: changed_event(user, view, Some(origin)),
        });
    }

    /// Hydrates `state` into a view: one track per position, duplicates kept, order kept,
    /// unknown ids dropped; tracks come from the cache, the rest from one query.
    pub async fn view(&self, state: QueueState, revision: i64) -> Result<QueueView, QueueError> {
        let mut missing: Vec<&str> = Vec::new();
        for id in &state.track_ids {
            if !self.tracks.contains_key(id) && !missing.contains(&id.as_str()) {
                missing.push(id);
            }
        }
        if !missing.is_empty() {
            let mut pooled = self.store.conn().await?;
            let found = catalog::find_tracks(&mut pooled.conn(), &missing).await?;
            for track in found {
                self.tracks.insert(track.id.clone(), track).await;
            }
        }
        let mut tracks = Vec::with_capacity(state.track_ids.len());
        for id in &state.track_ids {
            if let Some(track) = self.tracks.get(id).await {
                tracks.push(track);
            }
        }
        Ok(QueueView {
            state,
            revision,
            tracks,
        })
    }

    /// Forgets cached tracks after the catalog changed.
    pub async fn forget_tracks(&self, ids: impl IntoIterator<Item = &str>) {
        for id in ids {
            self.tracks.invalidate(id).await;
        }
    }
}
