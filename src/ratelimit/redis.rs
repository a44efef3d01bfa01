//! The shared limiter: one GCRA script per decision in Redis, bounded in time, failing open.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use super::{Decision, MemoryLimiter, Quota};
use crate::redis::RedisPool;

/// Longest a decision waits for Redis (connection and script) before it is made in process.
pub const DECISION_TIMEOUT: Duration = Duration::from_millis(50);

/// After Redis failed a decision, how long decisions go straight to the process's limiter
/// (so a Redis outage costs each request nothing, not the whole timeout).
const BACK_OFF: Duration = Duration::from_secs(1);

/// Whether a decision counts the attempt.
#[derive(Clone, Copy)]
enum Mode {
    Spend,
    Peek,
}

/// Limits shared by every replica through Redis, with the process's own limiter to fall back
/// on: a limit may be lenient while Redis is away (each replica counts alone), never a wall.
#[derive(Clone)]
pub struct RedisLimiter {
    pool: RedisPool,
    /// One multiplexed connection every decision shares (a clone each), taken from the pool
    /// once and again after a failure: checking a connection out per decision made decisions
    /// wait for the pool under load, past their bound.
    shared: Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    namespace: Arc<str>,
    script: Arc<redis::Script>,
    fallback: MemoryLimiter,
    fail_open: IntCounter,
    /// Until when decisions skip Redis.
    skip_until: Arc<Mutex<Option<Instant>>>,
}

impl RedisLimiter {
    pub fn new(pool: RedisPool, namespace: &str, fail_open: IntCounter) -> Self {
        Self {
            pool,
            shared: Arc::new(tokio::sync::Mutex::new(None)),
            namespace: namespace.into(),
            script: Arc::new(redis::Script::new(include_str!("gcra.lua"))),
            fallback: MemoryLimiter::default(),
            fail_open,
            skip_until: Arc::new(Mutex::new(None)),
        }
    }

    /// The Redis key of `key` under `rule`.
    fn key(&self, rule: &str, key: &str) -> String {
        format!("{}:rl:{rule}:{key}", self.namespace)
    }

    fn skipping(&self) -> bool {
        let skip = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        skip.is_some_and(|until| Instant::now() < until)
    }

    /// Counts one attempt of `key` under `rule`'s `quota`, in Redis when it answers within
    /// `DECISION_TIMEOUT` (50 ms), else in process.
    pub async fn check(&self, rule: &str, quota: Quota, key: &str) -> Decision {
        self.decide_or_fall_back(rule, quota, key, Mode::Spend)
            .await
    }

    /// Whether one more attempt of `key` would be allowed now, counting nothing.
    pub async fn peek(&self, rule: &str, quota: Quota, key: &str) -> Decision {
        self.decide_or_fall_back(rule, quota, key, Mode::Peek).await
    }

    async fn decide_or_fall_back(
        &self,
        rule: &str,
        quota: Quota,
        key: &str,
        mode: Mode,
    ) -> Decision {
        if !self.skipping() {
            match tokio::time::timeout(DECISION_TIMEOUT, self.decide(rule, quota, key, mode)).await
            {
                Ok(Ok(decision)) => return decision,
                Ok(Err(error)) => {
                    tracing::warn!(%error, rule, "rate limit: Redis failed; deciding in process")
                }
                Err(_) => tracing::warn!(rule, "rate limit: Redis too slow; deciding in process"),
            }
            self.forget_connection();
            *self.skip_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + BACK_OFF);
        }
        self.fail_open.inc();
        match mode {
            Mode::Spend => self.fallback.check(rule, quota, key),
            Mode::Peek => self.fallback.peek(rule, quota, key),
        }
    }

    async fn decide(
        &self,
        rule: &str,
        quota: Quota,
        key: &str,
        mode: Mode,
    ) -> Result<Decision, Box<dyn std::error::Error + Send + Sync>> {
        let mut conn = self.connection().await?;
        let interval_us = u64::try_from(quota.interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = self
            .script
            .key(self.key(rule, key))
            .arg(quota.burst().get())
            .arg(interval_us)
            .arg(match mode {
                Mode::Spend => "spend",
                Mode::Peek => "peek",
            })
            .invoke_async(&mut conn)
            .await
            .inspect_err(|_| self.forget_connection())?;
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        Ok(Decision {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: micros(retry_us),
            reset_after: micros(reset_us),
        })
    }

    /// A clone of the shared connection, taken from the pool when there is none.
    async fn connection(
        &self,
    ) -> Result<redis::aio::MultiplexedConnection, Box<dyn std::error::Error + Send + Sync>> {
        let mut shared = self.shared.lock().await;
        if let Some(conn) = shared.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.pool.get().await?.clone();
        *shared = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the shared connection after a failure, so the next decision takes a fresh one.
    fn forget_connection(&self) {
        if let Ok(mut shared) = self.shared.try_lock() {
            *shared = None;
        }
    }

    /// The in-process limiter decisions fall back on (swept with the others).
    pub fn fallback(&self) -> &MemoryLimiter {
        &self.fallback
    }
}
