//! The Redis connection pool, built in one place. Redis is optional: without `REDIS_URL`
//! the hub runs its in-process bus and registries.

use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use secrecy::{ExposeSecret, SecretString};

/// Pooled Redis connections for commands (not for SUBSCRIBE, which needs its own).
pub type RedisPool = bb8::Pool<RedisConnectionManager>;

/// How long a command waits for a pooled connection; with Redis down, that bounds how long a
/// request that needs it takes to fail.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections kept for commands; Redis multiplexes cheaply, so a few suffice.
const REDIS_POOL_SIZE: u32 = 16;

/// Builds the pool without connecting: the hub starts even while Redis is away, and
/// `/readyz` says so.
pub fn build_pool(url: &SecretString) -> Result<RedisPool, redis::RedisError> {
    let manager = RedisConnectionManager::new(url.expose_secret())?;
    Ok(bb8::Pool::builder()
        .max_size(REDIS_POOL_SIZE)
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .build_unchecked(manager))
}

/// One PING, for readiness checks.
pub async fn ping(pool: &RedisPool) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut conn = pool.get().await?;
    let _: String = redis::cmd("PING").query_async(&mut *conn).await?;
    Ok(())
}
