//! Whether a login session (a refresh-token family) is still live. Access tokens are
//! stateless, so without this a token would outlive its logout until it expired.
//!
//! The answer is cached per replica for [`SESSION_CHECK_TTL`]: a logout on this replica takes
//! effect at once, one on another replica within that time. A session is checked against the
//! store at most once per TTL, not once per request.

use std::time::Duration;

use moka::future::Cache;

use crate::store::{Store, StoreError, tokens};

/// How long a "still live" answer is trusted before the store is asked again.
const SESSION_CHECK_TTL: Duration = Duration::from_secs(30);

/// Sessions remembered at most; beyond this the least recently used are asked again.
const SESSION_CHECK_CAPACITY: u64 = 100_000;

/// Cached answers to "has this session been revoked?".
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    revoked: Cache<String, bool>,
}

impl Sessions {
    pub fn new(store: Store) -> Self {
        let revoked = Cache::builder()
            .max_capacity(SESSION_CHECK_CAPACITY)
            .time_to_live(SESSION_CHECK_TTL)
            .build();
        Self { store, revoked }
    }

    /// True when the session was revoked (logout, or reuse of a spent refresh token).
    ///
    /// The store lookup runs as a task of its own that finishes even when the caller is
    /// dropped: the bearer extractor's future is dropped whenever a sibling extractor (the
    /// JSON body, the path) fails first, and a SQLite query dropped mid-flight panics
    /// (diesel-async's `SyncConnectionWrapper` blocks in place on drop, which actix's
    /// single-threaded workers do not allow) and the request got no answer at all.
    pub async fn is_revoked(&self, session: &str) -> Result<bool, StoreError> {
        if let Some(revoked) = self.revoked.get(session).await {
            return Ok(revoked);
        }
        let (store, revoked, session) =
            (self.store.clone(), self.revoked.clone(), session.to_owned());
        let lookup = actix_web::rt::spawn(async move {
            let mut pooled = store.conn().await?;
            let answer = tokens::family_revoked(&mut pooled.conn(), &session).await?;
            revoked.insert(session, answer).await;
            Ok(answer)
        });
        lookup.await.map_err(|_| StoreError::TaskLost)?
    }

    /// Records a revocation made on this replica, so it takes effect here at once.
    pub async fn mark_revoked(&self, session: &str) {
        self.revoked.insert(session.to_owned(), true).await;
    }
}
