//! The presence registry: where every replica reads every user's device entries and output
//! device. A port with two real implementations, chosen like the bus: [`MemoryRegistry`]
//! (in-process; the embedded default, shared by replicas of one process) and
//! [`RedisRegistry`] (a hash per user, `{ns}:presence:{user}`, field = instance, value = the
//! entry's JSON, plus `{ns}:output:{user}`).
//!
//! Entries carry their own expiry (Redis 7.0 has no per-field TTL): readers never return an
//! expired entry and delete the ones they find, and the whole hash expires one TTL after its
//! last write, so a replica killed mid-flight leaves nothing behind for longer than the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{DeviceEntry, InstanceId, Snapshot, now_ms};
use crate::domain::UserId;
use crate::redis::RedisPool;

/// How long an output device choice is remembered without being changed.
const OUTPUT_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("the presence registry is unreachable: {0}")]
    Unavailable(String),
}

/// One entry to write. Shared, so the in-process registry keeps the owner's copy instead of
/// one of its own.
pub type Write = (UserId, InstanceId, Arc<DeviceEntry>);

/// The port. Writes of one caller are applied in call order.
pub trait Registry: Clone + Send + Sync + 'static {
    /// Creates or replaces entries.
    fn put(&self, writes: Vec<Write>) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Writes one entry unless its instance holds a play reported later than this entry's
    /// (`now_playing.at`): a report applied late never replaces a newer one. True when written.
    fn put_unless_older(
        &self,
        write: Write,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Deletes entries (absent ones are fine).
    fn remove(
        &self,
        removals: Vec<(UserId, InstanceId)>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The live entries and output device of each user, in the order asked.
    fn snapshots(
        &self,
        users: Vec<UserId>,
    ) -> impl Future<Output = Result<Vec<Snapshot>, RegistryError>> + Send;

    /// Makes `device_id` the user's output device.
    fn set_output(
        &self,
        user: UserId,
        device_id: String,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// Whichever registry this replica was configured with.
#[derive(Clone)]
pub enum AnyRegistry {
    Memory(MemoryRegistry),
    Redis(RedisRegistry),
}

impl AnyRegistry {
    /// One user's snapshot.
    pub async fn snapshot(&self, user: UserId) -> Result<Snapshot, RegistryError> {
        let mut all = self.snapshots(vec![user]).await?;
        Ok(all.pop().unwrap_or_default())
    }
}

impl Registry for AnyRegistry {
    async fn put(&self, writes: Vec<Write>) -> Result<(), RegistryError> {
        match self {
            Self::Memory(r) => r.put(writes).await,
            Self::Redis(r) => r.put(writes).await,
        }
    }

    async fn put_unless_older(&self, write: Write) -> Result<bool, RegistryError> {
        match self {
            Self::Memory(r) => r.put_unless_older(write).await,
            Self::Redis(r) => r.put_unless_older(write).await,
        }
    }

    async fn remove(&self, removals: Vec<(UserId, InstanceId)>) -> Result<(), RegistryError> {
        match self {
            Self::Memory(r) => r.remove(removals).await,
            Self::Redis(r) => r.remove(removals).await,
        }
    }

    async fn snapshots(&self, users: Vec<UserId>) -> Result<Vec<Snapshot>, RegistryError> {
        match self {
            Self::Memory(r) => r.snapshots(users).await,
            Self::Redis(r) => r.snapshots(users).await,
        }
    }

    async fn set_output(&self, user: UserId, device_id: String) -> Result<(), RegistryError> {
        match self {
            Self::Memory(r) => r.set_output(user, device_id).await,
            Self::Redis(r) => r.set_output(user, device_id).await,
        }
    }
}

/// One user in the in-process registry: a small vector of entries (a user has a handful of
/// devices, and a map's nodes would cost more than the entries).
#[derive(Default)]
struct Held {
    entries: Vec<(InstanceId, Arc<DeviceEntry>)>,
    output: Option<String>,
}

/// The in-process registry; clones share one map.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    // A std Mutex: never held across an await, each critical section a few map operations.
    users: Arc<Mutex<HashMap<UserId, Held>>>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Held>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Registry for MemoryRegistry {
    async fn put(&self, writes: Vec<Write>) -> Result<(), RegistryError> {
        let mut users = self.lock();
        for (user, instance, entry) in writes {
            let held = users.entry(user).or_default();
            match held.entries.iter_mut().find(|(i, _)| *i == instance) {
                Some(slot) => slot.1 = entry,
                None => {
                    // Exactly one more slot: most users have one or two devices.
                    held.entries.reserve_exact(1);
                    held.entries.push((instance, entry));
                }
            }
        }
        Ok(())
    }

    async fn put_unless_older(&self, write: Write) -> Result<bool, RegistryError> {
        let (user, instance, entry) = write;
        let older = {
            let users = self.lock();
            users
                .get(&user)
                .and_then(|held| held.entries.iter().find(|(i, _)| *i == instance))
                .is_some_and(|(_, current)| reported_later(current, &entry))
        };
        if older {
            return Ok(false);
        }
        self.put(vec![(user, instance, entry)]).await?;
        Ok(true)
    }

    async fn remove(&self, removals: Vec<(UserId, InstanceId)>) -> Result<(), RegistryError> {
        let mut users = self.lock();
        for (user, instance) in removals {
            if let Some(held) = users.get_mut(&user) {
                held.entries.retain(|(i, _)| *i != instance);
                if held.entries.is_empty() && held.output.is_none() {
                    users.remove(&user);
                }
            }
        }
        Ok(())
    }

    async fn snapshots(&self, users: Vec<UserId>) -> Result<Vec<Snapshot>, RegistryError> {
        let now = now_ms();
        let mut map = self.lock();
        Ok(users
            .into_iter()
            .map(|user| match map.get_mut(&user) {
                Some(held) => {
                    held.entries.retain(|(_, e)| e.is_live(now));
                    Snapshot {
                        entries: held
                            .entries
                            .iter()
                            .map(|(instance, entry)| (instance.clone(), entry.clone()))
                            .collect(),
                        output: held.output.clone(),
                    }
                }
                None => Snapshot::default(),
            })
            .collect())
    }

    async fn set_output(&self, user: UserId, device_id: String) -> Result<(), RegistryError> {
        self.lock().entry(user).or_default().output = Some(device_id);
        Ok(())
    }
}

/// Whether `current` shows a play reported later than `entry`'s.
fn reported_later(current: &DeviceEntry, entry: &DeviceEntry) -> bool {
    match (&current.now_playing, &entry.now_playing) {
        (Some(current), Some(new)) => current.at > new.at,
        _ => false,
    }
}

/// The Redis registry; cheap to clone.
#[derive(Clone)]
pub struct RedisRegistry {
    pool: RedisPool,
    namespace: Arc<str>,
    /// How long a user's hash outlives its last write.
    ttl: Duration,
    put_newer: Arc<redis::Script>,
}

impl RedisRegistry {
    pub fn new(pool: RedisPool, namespace: &str, ttl: Duration) -> Self {
        Self {
            pool,
            namespace: namespace.into(),
            ttl,
            put_newer: Arc::new(redis::Script::new(include_str!("put_newer.lua"))),
        }
    }

    fn entries_key(&self, user: UserId) -> String {
        format!("{}:presence:{}", self.namespace, user.0)
    }

    fn output_key(&self, user: UserId) -> String {
        format!("{}:output:{}", self.namespace, user.0)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RegistryError> {
        let unavailable = |e: &dyn std::fmt::Display| RegistryError::Unavailable(e.to_string());
        let mut conn = self.pool.get().await.map_err(|e| unavailable(&e))?;
        pipe.query_async(&mut *conn)
            .await
            .map_err(|e| unavailable(&e))
    }
}

impl Registry for RedisRegistry {
    async fn put(&self, writes: Vec<Write>) -> Result<(), RegistryError> {
        if writes.is_empty() {
            return Ok(());
        }
        let ttl_ms = self.ttl.as_millis() as i64;
        let now = super::now_ms();
        let mut pipe = redis::pipe();
        for (user, instance, entry) in &writes {
            let key = self.entries_key(*user);
            let json = serde_json::to_string(&**entry).unwrap_or_default();
            pipe.hset(&key, instance, json).ignore();
            // The hash outlives its last write by the TTL, or by as long as its longest entry
            // lasts (a pipeline report lasts to the end of its track): set when the hash has
            // no expiry yet (NX), else only ever lengthened (GT), so a heartbeat's short write
            // never cuts a long entry's time.
            let keep = ttl_ms.max(entry.expires_at - now);
            pipe.cmd("PEXPIRE").arg(&key).arg(keep).arg("NX").ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(keep).arg("GT").ignore();
        }
        self.run::<()>(&pipe).await
    }

    async fn put_unless_older(&self, write: Write) -> Result<bool, RegistryError> {
        let (user, instance, entry) = write;
        let keep = (self.ttl.as_millis() as i64).max(entry.expires_at - super::now_ms());
        let at = entry.now_playing.as_ref().map_or(i64::MIN, |n| n.at);
        let json = serde_json::to_string(&*entry).unwrap_or_default();
        let unavailable = |e: &dyn std::fmt::Display| RegistryError::Unavailable(e.to_string());
        let mut conn = self.pool.get().await.map_err(|e| unavailable(&e))?;
        let written: i64 = self
            .put_newer
            .key(self.entries_key(user))
            .arg(instance.as_str())
            .arg(json)
            .arg(at)
            .arg(keep)
            .invoke_async(&mut *conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(written == 1)
    }

    async fn remove(&self, removals: Vec<(UserId, InstanceId)>) -> Result<(), RegistryError> {
        if removals.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (user, instance) in &removals {
            pipe.hdel(self.entries_key(*user), instance).ignore();
        }
        self.run::<()>(&pipe).await
    }

    async fn snapshots(&self, users: Vec<UserId>) -> Result<Vec<Snapshot>, RegistryError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in &users {
            pipe.hgetall(self.entries_key(*user));
            pipe.get(self.output_key(*user));
        }
        let replies: Vec<(HashMap<String, String>, Option<String>)> = {
            let flat: Vec<redis::Value> = self.run(&pipe).await?;
            let mut flat = flat.into_iter();
            let mut pairs = Vec::with_capacity(users.len());
            while let (Some(entries), Some(output)) = (flat.next(), flat.next()) {
                pairs.push((
                    redis::from_redis_value(entries).unwrap_or_default(),
                    redis::from_redis_value(output).unwrap_or_default(),
                ));
            }
            pairs
        };
        let now = now_ms();
        let mut expired = redis::pipe();
        let mut any_expired = false;
        let snapshots = users
            .iter()
            .zip(replies)
            .map(|(user, (fields, output))| {
                let mut snapshot = Snapshot {
                    output,
                    ..Snapshot::default()
                };
                for (instance, json) in fields {
                    match serde_json::from_str::<DeviceEntry>(&json) {
                        Ok(entry) if entry.is_live(now) => {
                            snapshot.entries.insert(instance, Arc::new(entry));
                        }
                        Ok(_) => {
                            expired.hdel(self.entries_key(*user), instance).ignore();
                            any_expired = true;
                        }
                        // Written by a version this one cannot read (a rolling upgrade): not
                        // shown, and left to its owner and the hash's TTL.
                        Err(error) => {
                            tracing::debug!(%error, %instance, "unreadable presence entry skipped");
                        }
                    }
                }
                snapshot
            })
            .collect();
        if any_expired && let Err(error) = self.run::<()>(&expired).await {
            tracing::debug!(%error, "could not delete expired presence entries");
        }
        Ok(snapshots)
    }

    async fn set_output(&self, user: UserId, device_id: String) -> Result<(), RegistryError> {
        let mut pipe = redis::pipe();
        pipe.set_ex(self.output_key(user), device_id, OUTPUT_TTL.as_secs())
            .ignore();
        self.run::<()>(&pipe).await
    }
}
