//! The Redis connection pool, built in one place. Redis is optional: without `REDIS_URL`
//! the hub runs its in-process bus and registries.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use redis::RedisFuture;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
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

/// A [`ConnectionManager`] that is replaced by a fresh one when a command on it times out.
/// redis-rs reconnects only when a connection reports that it dropped; one that went silent
/// (a half-open link, or a proxy or failover that lost it without a word) reports nothing, and
/// every command on it would time out for ever: the job workers stopped for good after the
/// link to Redis was black-holed for two seconds
/// (`faults::jobs::jobs_carry_on_after_the_link_to_redis_went_silent`).
pub struct Redialing {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The manager in use, and how many times it was replaced.
    current: RwLock<(u64, ConnectionManager)>,
}

impl Redialing {
    /// Connects lazily (the first command connects), as [`ConnectionManager::new_lazy_with_config`].
    pub fn new_lazy(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> Result<Arc<Self>, redis::RedisError> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Arc::new(Self {
            client,
            config,
            current: RwLock::new((0, manager)),
        }))
    }

    /// A handle for commands (cheap; it implements `ConnectionLike`). Each command runs on
    /// the manager current at the time, so a handle kept for long (the scheduler's) moves on
    /// with the replacements.
    pub fn connection(self: &Arc<Self>) -> Redialed {
        Redialed {
            owner: self.clone(),
        }
    }

    /// The manager in use and its generation.
    fn current(&self) -> (u64, ConnectionManager) {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A command on manager `generation` timed out: replace it, unless another caller did.
    fn redial(&self, generation: u64) {
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                tracing::warn!("a Redis connection stopped answering; replacing it");
                *current = (generation + 1, fresh);
            }
            Err(error) => tracing::warn!(%error, "could not replace a silent Redis connection"),
        }
    }
}

/// A command handle of a [`Redialing`] connection.
#[derive(Clone)]
pub struct Redialed {
    owner: Arc<Redialing>,
}

impl Redialed {
    fn after<T>(&self, generation: u64, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(error) = &result
            && error.is_timeout()
        {
            self.owner.redial(generation);
        }
        result
    }
}

impl ConnectionLike for Redialed {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let (generation, mut manager) = self.owner.current();
            let result = manager.req_packed_command(cmd).await;
            self.after(generation, result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let (generation, mut manager) = self.owner.current();
            let result = manager.req_packed_commands(pipeline, offset, count).await;
            self.after(generation, result)
        })
    }

    fn get_db(&self) -> i64 {
        self.owner.current().1.get_db()
    }
}
