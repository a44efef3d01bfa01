//! Whether a login session (a refresh-token family) is still live. Access tokens are
//! stateless, so without this a token would outlive its logout until it expired.
//!
//! The answer is cached per replica for [`SESSION_CHECK_TTL`], so a session is checked against
//! the store at most once per TTL, not once per request. A session that ends is marked here at
//! once on the replica that ended it and, by the bus's replica-wide channel, on every other
//! replica (the hub calls [`mark_revoked`](Sessions::mark_revoked)). While the bus is away
//! such news could be missed, so cached "still live" answers are not trusted then, and are
//! all dropped when the bus is back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use moka::future::Cache;

use crate::store::{Store, StoreError, tokens};

/// How long a "still live" answer is trusted before the store is asked again.
const SESSION_CHECK_TTL: Duration = Duration::from_secs(30);

/// Sessions remembered at most; beyond this the least recently used are asked again.
const SESSION_CHECK_CAPACITY: u64 = 100_000;

/// A store lookup of one session, awaited by every request that asked while it ran.
type Lookup = Shared<BoxFuture<'static, Result<bool, Arc<StoreError>>>>;

/// Cached answers to "has this session been revoked?".
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    revoked: Cache<String, bool>,
    /// Lookups under way, by session, each with its number (so that only it removes itself).
    inflight: Arc<std::sync::Mutex<HashMap<String, (u64, Lookup)>>>,
    /// Lookups started so far.
    lookups: Arc<std::sync::atomic::AtomicU64>,
    /// Bumped whenever the bus is lost or back: a lookup that read before then does not
    /// cache its "live" (it may predate a revocation whose notice was missed, in a cache
    /// that was emptied after the read).
    epoch: Arc<std::sync::atomic::AtomicU64>,
    /// False while the bus is lost: "still live" answers are then read from the store.
    trusted: Arc<AtomicBool>,
}

impl Sessions {
    pub fn new(store: Store) -> Self {
        let revoked = Cache::builder()
            .max_capacity(SESSION_CHECK_CAPACITY)
            .time_to_live(SESSION_CHECK_TTL)
            .build();
        Self {
            store,
            revoked,
            inflight: Arc::default(),
            lookups: Arc::default(),
            epoch: Arc::default(),
            trusted: Arc::new(AtomicBool::new(true)),
        }
    }

    /// True when the session was revoked (logout, or reuse of a spent refresh token).
    ///
    /// The store lookup runs as a task of its own that finishes even when the caller is
    /// dropped: the bearer extractor's future is dropped whenever a sibling extractor (the
    /// JSON body, the path) fails first, and a SQLite query dropped mid-flight panics
    /// (diesel-async's `SyncConnectionWrapper` blocks in place on drop, which actix's
    /// single-threaded workers do not allow) and the request got no answer at all.
    pub async fn is_revoked(&self, session: &str) -> Result<bool, StoreError> {
        let trusted = self.trusted.load(Ordering::Acquire);
        if let Some(revoked) = self.revoked.get(session).await
            && (revoked || trusted)
        {
            return Ok(revoked);
        }
        let answer = self.lookup(session).await.map_err(StoreError::Shared)?;
        // A revocation heard while the lookup was in flight (it may have begun before this
        // request did) wins over the older "live" it read.
        if !answer && self.revoked.get(session).await == Some(true) {
            return Ok(true);
        }
        Ok(answer)
    }

    /// The store's answer for `session`, shared by every request that asks while one lookup
    /// is in flight: a storm of sockets of one login reconnecting at once costs one query.
    /// The lookup leaves the in-flight map when it ends, however it ends (a panicked or
    /// cancelled task included), so the next request asks the store afresh.
    fn lookup(&self, session: &str) -> Lookup {
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, running)) = inflight.get(session) {
            return running.clone();
        }
        let (store, revoked, key) = (self.store.clone(), self.revoked.clone(), session.to_owned());
        let (epochs, started) = (self.epoch.clone(), self.epoch.load(Ordering::Acquire));
        let task = actix_web::rt::spawn(async move {
            let mut pooled = store.conn().await?;
            let answer = tokens::family_revoked(&mut pooled.conn(), &key).await?;
            if answer {
                revoked.insert(key, true).await;
            } else if epochs.load(Ordering::Acquire) == started {
                // A revocation heard while this read was in flight must not be overwritten
                // by the older "live" the read saw.
                revoked.entry(key).or_insert(false).await;
            }
            // Else the bus went or came back meanwhile (a revocation may have been missed
            // and the cache emptied since this read): its "live" is not kept.
            Ok::<_, StoreError>(answer)
        });
        let id = self.lookups.fetch_add(1, Ordering::Relaxed);
        let (map, key) = (self.inflight.clone(), session.to_owned());
        let shared = async move {
            let result = match task.await {
                Ok(answer) => answer.map_err(Arc::new),
                Err(_) => Err(Arc::new(StoreError::TaskLost)),
            };
            let mut inflight = map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if inflight
                .get(&key)
                .is_some_and(|(running, _)| *running == id)
            {
                inflight.remove(&key);
            }
            result
        }
        .boxed()
        .shared();
        inflight.insert(session.to_owned(), (id, shared.clone()));
        shared
    }

    /// The bus is lost: revocations on other replicas may go unheard.
    pub fn distrust_cache(&self) {
        self.trusted.store(false, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The bus is back: forget every cached answer (some revocation may have been missed),
    /// then trust the cache again.
    pub fn trust_cache_again(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.revoked.invalidate_all();
        self.trusted.store(true, Ordering::Release);
    }

    /// Records a revocation (made here or heard from another replica), so it takes effect
    /// here at once.
    pub async fn mark_revoked(&self, session: &str) {
        self.revoked.insert(session.to_owned(), true).await;
    }
}
