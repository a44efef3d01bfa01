//! The blocked addresses this replica refuses, kept in memory for a lookup per request. The
//! store holds them (so they survive restarts and the `segue blocks` command can change them);
//! each replica reads them every [`SYNC_EVERY`] and hears new ones at once on the bus.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How often a replica reads the store's blocks (changes made by the command line show up
/// within this).
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

/// Address key → until (milliseconds since the epoch), and when this replica learnt of it.
#[derive(Clone, Default)]
pub struct Blocks {
    inner: Arc<RwLock<HashMap<String, (i64, Instant)>>>,
}

impl Blocks {
    /// Until when `address` is blocked, if it is at `now_ms`.
    pub fn until(&self, address: &str, now_ms: i64) -> Option<i64> {
        let blocks = self.inner.read().unwrap_or_else(|p| p.into_inner());
        blocks
            .get(address)
            .map(|(until, _)| *until)
            .filter(|until| *until > now_ms)
    }

    pub fn insert(&self, address: String, until_ms: i64) {
        let mut blocks = self.inner.write().unwrap_or_else(|p| p.into_inner());
        blocks.insert(address, (until_ms, Instant::now()));
    }

    pub fn remove(&self, address: &str) {
        let mut blocks = self.inner.write().unwrap_or_else(|p| p.into_inner());
        blocks.remove(address);
    }

    /// Becomes `blocks` as the store had them when read at `read_at`, keeping what this
    /// replica learnt since (a block heard on the bus while the read was under way).
    pub fn replace_all(&self, blocks: HashMap<String, i64>, read_at: Instant) {
        let mut current = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let newer: Vec<(String, (i64, Instant))> = current
            .drain()
            .filter(|(_, (_, learnt))| *learnt >= read_at)
            .collect();
        *current = blocks
            .into_iter()
            .map(|(address, until)| (address, (until, read_at)))
            .collect();
        current.extend(newer);
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
