//! Cache-aside in Redis, for data several replicas read from the store again and again (the
//! public profile behind a handle, catalog tracks a replica has not cached yet): read Redis,
//! else the store, then keep the answer with a TTL; a write invalidates.
//!
//! Redis is a help, never a dependency: each call is bounded (`CALL_TIMEOUT`, 50 ms); a transient
//! error is retried up to `ATTEMPTS` (3) times with jittered backoff, after which the store
//! answers alone. Without `REDIS_URL` every read goes to the store.

use std::time::Duration;

use prometheus::IntCounterVec;
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::redis::RedisPool;

/// Longest one Redis call may take.
const CALL_TIMEOUT: Duration = Duration::from_millis(50);

/// Tries of one Redis call before the store answers alone.
const ATTEMPTS: u32 = 3;

/// How long after a write its keys are forgotten a second time.
const SECOND_INVALIDATION: Duration = Duration::from_secs(1);

/// The first backoff between tries; it doubles, with up to as much again of jitter.
const BACKOFF: Duration = Duration::from_millis(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts by cache name (a fixed set: `profile`, `sharing`, `track`).
#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: IntCounterVec,
    pub misses: IntCounterVec,
    pub errors: IntCounterVec,
}

#[derive(Clone)]
pub struct CacheAside {
    redis: Option<(RedisPool, std::sync::Arc<str>)>,
    metrics: CacheMetrics,
    /// Until when calls skip Redis, after one failed every try: an outage then costs each
    /// request nothing instead of the tries' time.
    skip_until: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How long calls skip Redis after one failed every try.
const BACK_OFF_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl CacheAside {
    pub fn new(redis: Option<RedisPool>, namespace: &str, metrics: CacheMetrics) -> Self {
        Self {
            redis: redis.map(|pool| (pool, namespace.into())),
            metrics,
            skip_until: std::sync::Arc::new(std::sync::Mutex::new(None)),
        }
    }

    fn key(namespace: &str, cache: &str, key: &str) -> String {
        format!("{namespace}:cache:{cache}:{key}")
    }

    /// Runs `call` against Redis with the bound and the retries; `None` when it never
    /// succeeded (counted as an error).
    async fn attempt<T, F, Fut>(&self, cache: &str, call: F) -> Option<T>
    where
        F: Fn(RedisPool) -> Fut,
        Fut: std::future::Future<Output = Result<T, BoxError>>,
    {
        let (pool, _) = self.redis.as_ref()?;
        let skipping = {
            let skip = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
            skip.is_some_and(|until| std::time::Instant::now() < until)
        };
        if skipping {
            self.metrics.errors.with_label_values(&[cache]).inc();
            return None;
        }
        let mut backoff = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(CALL_TIMEOUT, call(pool.clone())).await {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(error)) => tracing::debug!(%error, cache, attempt, "cache call failed"),
                Err(_) => tracing::debug!(cache, attempt, "cache call timed out"),
            }
            if attempt < ATTEMPTS {
                let jitter = rand::rng().random_range(0..=backoff.as_micros() as u64);
                tokio::time::sleep(backoff + Duration::from_micros(jitter)).await;
                backoff *= 2;
            }
        }
        self.metrics.errors.with_label_values(&[cache]).inc();
        *self.skip_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + BACK_OFF_AFTER_FAILURE);
        None
    }

    /// The cached values of `keys` (`None` for each one not cached, or when Redis is away).
    pub async fn get_many<T: DeserializeOwned>(
        &self,
        cache: &str,
        keys: &[String],
    ) -> Vec<Option<T>> {
        let Some((_, namespace)) = &self.redis else {
            return keys.iter().map(|_| None).collect();
        };
        if keys.is_empty() {
            return Vec::new();
        }
        let full: Vec<String> = keys
            .iter()
            .map(|k| Self::key(namespace, cache, k))
            .collect();
        let found: Option<Vec<Option<String>>> = self
            .attempt(cache, |pool| {
                let full = full.clone();
                async move {
                    let mut conn = pool.get().await?;
                    let values: Vec<Option<String>> = redis::cmd("MGET")
                        .arg(&full)
                        .query_async(&mut *conn)
                        .await?;
                    Ok(values)
                }
            })
            .await;
        let values: Vec<Option<T>> = match found {
            Some(values) => values
                .into_iter()
                .map(|v| v.and_then(|text| serde_json::from_str(&text).ok()))
                .collect(),
            None => keys.iter().map(|_| None).collect(),
        };
        let hits = values.iter().filter(|v| v.is_some()).count() as u64;
        self.metrics.hits.with_label_values(&[cache]).inc_by(hits);
        self.metrics
            .misses
            .with_label_values(&[cache])
            .inc_by(keys.len() as u64 - hits);
        values
    }

    /// Keeps `entries` for `ttl`.
    pub async fn put_many<T: Serialize>(
        &self,
        cache: &str,
        entries: &[(String, T)],
        ttl: Duration,
    ) {
        let Some((_, namespace)) = &self.redis else {
            return;
        };
        let encoded: Vec<(String, String)> = entries
            .iter()
            .filter_map(|(key, value)| {
                Some((
                    Self::key(namespace, cache, key),
                    serde_json::to_string(value).ok()?,
                ))
            })
            .collect();
        if encoded.is_empty() {
            return;
        }
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.attempt(cache, |pool| {
            let encoded = encoded.clone();
            async move {
                let mut conn = pool.get().await?;
                let mut pipe = redis::pipe();
                for (key, value) in &encoded {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(millis)
                        .ignore();
                }
                let () = pipe.query_async(&mut *conn).await?;
                Ok(())
            }
        })
        .await;
    }

    /// Forgets `keys` (after the store changed them).
    pub async fn invalidate(&self, cache: &str, keys: &[String]) {
        let Some((_, namespace)) = &self.redis else {
            return;
        };
        if keys.is_empty() {
            return;
        }
        let full: Vec<String> = keys
            .iter()
            .map(|k| Self::key(namespace, cache, k))
            .collect();
        self.attempt(cache, |pool| {
            let full = full.clone();
            async move {
                let mut conn = pool.get().await?;
                let _: i64 = redis::cmd("DEL").arg(&full).query_async(&mut *conn).await?;
                Ok(())
            }
        })
        .await;
    }

    /// Forgets `keys` now and again a second later: a reader that loaded the old value from
    /// the store just before the write may put it back in between.
    pub async fn invalidate_twice(&self, cache: &'static str, keys: Vec<String>) {
        if self.redis.is_none() || keys.is_empty() {
            return;
        }
        self.invalidate(cache, &keys).await;
        let again = self.clone();
        // tokio's spawn, not actix's: job workers call this from outside the actix arbiter.
        tokio::spawn(async move {
            tokio::time::sleep(SECOND_INVALIDATION).await;
            again.invalidate(cache, &keys).await;
        });
    }

    /// The cached value of `key`, else `load`'s (kept for `ttl` when it succeeded).
    pub async fn get_or_load<T, E, F, Fut>(
        &self,
        cache: &str,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let keys = [key.to_owned()];
        if let Some(Some(cached)) = self.get_many::<T>(cache, &keys).await.pop() {
            return Ok(cached);
        }
        let loaded = load().await?;
        self.put_many(cache, &[(key.to_owned(), &loaded)], ttl)
            .await;
        Ok(loaded)
    }
}
