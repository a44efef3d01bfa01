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
    pub async fn is_revoked(&self, session: &str) -> Result<bool, StoreError> {
        if let Some(revoked) = self.revoked.get(session).await {
            return Ok(revoked);
        }
        let mut pooled = self.store.conn().await?;
        let revoked = tokens::family_revoked(&mut pooled.conn(), session).await?;
        self.revoked.insert(session.to_owned(), revoked).await;
        Ok(revoked)
    }

    /// Records a revocation made on this replica, so it takes effect here at once.
    pub async fn mark_revoked(&self, session: &str) {
        self.revoked.insert(session.to_owned(), true).await;
    }
}
