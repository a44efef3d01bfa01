//! The refresh-token fast path: what Redis keeps of each refresh token (by its hash: the
//! session it belongs to, its expiry, whether it is spent) and of each ended session, so a
//! refresh finds its token's session without a store query, and a token of an ended session
//! is refused without one.
//!
//! The store stays the truth. Every change is written there first and to Redis after, so what
//! Redis says can only lag behind the store, never lead it: an ended session stays ended.
//! Redis therefore decides only the refusal it can prove (the session ended); anything else,
//! a miss or a lagging spent flag included, goes to the store, which also does every rotation.
//! A Redis that restarts empty loses nothing but speed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::CacheAside;

/// What Redis keeps of one refresh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFacts {
    pub user_id: i64,
    /// The session (refresh-token family).
    pub family: String,
    pub expires_at_ms: i64,
    pub spent: bool,
}

/// How the fast path answers a presented token before the store is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Nothing known: ask the store.
    Nothing,
    /// The token's session, still to be rotated by the store.
    Session(TokenFacts),
    /// Its session ended (logout, reuse): refused.
    Ended,
}

/// The fast path over the replica's cache-aside (a no-op without Redis).
#[derive(Clone)]
pub struct FastPath {
    cache: CacheAside,
    /// How long an ended session is remembered: as long as any of its tokens could live.
    session_ttl: Duration,
}

const TOKENS: &str = "refresh";
const ENDED: &str = "session_ended";

impl FastPath {
    pub fn new(cache: CacheAside, refresh_token_ttl: Duration) -> Self {
        Self {
            cache,
            session_ttl: refresh_token_ttl,
        }
    }

    /// What Redis knows of the token with hash `token_hash`.
    pub async fn lookup(&self, token_hash: &str) -> Known {
        let Some(Some(facts)) = self
            .cache
            .get_many::<TokenFacts>(TOKENS, &[token_hash.to_owned()])
            .await
            .pop()
        else {
            return Known::Nothing;
        };
        let ended = self
            .cache
            .get_many::<bool>(ENDED, std::slice::from_ref(&facts.family))
            .await
            .pop()
            .flatten()
            .unwrap_or(false);
        // Expiry is not decided here: the spent flag may lag (a rotation whose write to
        // Redis failed), and presenting a spent token, expired or not, may be reuse, which
        // only the store can tell.
        if ended {
            Known::Ended
        } else {
            Known::Session(facts)
        }
    }

    /// Remembers tokens the store just wrote (issued, or spent), in one round trip, until
    /// the latest of them expires (a spent one staying longer is harmless: spent stays spent).
    pub async fn remember(&self, tokens: &[(String, TokenFacts)], now_ms: i64) {
        let latest = tokens
            .iter()
            .map(|(_, f)| f.expires_at_ms)
            .max()
            .unwrap_or(0);
        let left = u64::try_from(latest.saturating_sub(now_ms)).unwrap_or(0);
        if left == 0 {
            return;
        }
        self.cache
            .put_many(TOKENS, tokens, Duration::from_millis(left))
            .await;
    }

    /// Remembers that a session ended (after the store revoked it).
    pub async fn session_ended(&self, family: &str) {
        let entry = [(family.to_owned(), true)];
        self.cache.put_many(ENDED, &entry, self.session_ttl).await;
    }
}
