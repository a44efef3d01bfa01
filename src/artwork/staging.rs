//! Where a reported artwork's bytes wait between the report and the artwork job: in Redis
//! when the hub has it (any replica's worker may run the job), else in a directory under
//! `$SEGUE_DATA_DIR` (one replica). Staging is also how concurrent reports of the same new
//! artwork find each other: only the report that stages it first enqueues the job.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::redis::RedisPool;

/// How long staged bytes wait for the artwork job (it retries with backoff meanwhile).
pub const STAGED_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest a staging call may take against Redis.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("the staging directory failed: {0}")]
    Local(#[from] std::io::Error),
    #[error("staging in Redis failed: {0}")]
    Redis(String),
}

#[derive(Clone)]
pub enum Staging {
    Local(Arc<PathBuf>),
    Redis { pool: RedisPool, prefix: Arc<str> },
}

impl Staging {
    pub fn local(dir: PathBuf) -> Self {
        Self::Local(Arc::new(dir))
    }

    pub fn redis(pool: RedisPool, namespace: &str) -> Self {
        Self::Redis {
            pool,
            prefix: format!("{namespace}:artwork:staged:").into(),
        }
    }

    /// Stages `bytes` as artwork `hash` (a checked hash: hex only). True when this call
    /// staged it; false when it was staged already (a job for it is on its way).
    pub async fn stage(&self, hash: &str, bytes: Bytes) -> Result<bool, StagingError> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(hash);
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || stage_file(&dir, &path, &bytes))
                    .await
                    .map_err(std::io::Error::other)?
            }
            Self::Redis { pool, prefix } => {
                let key = format!("{prefix}{hash}");
                let set: Option<String> = redis_call(pool, |mut cmd| {
                    cmd.arg("SET")
                        .arg(&key)
                        .arg(bytes.as_ref())
                        .arg("NX")
                        .arg("EX")
                        .arg(STAGED_TTL.as_secs());
                    cmd
                })
                .await?;
                Ok(set.is_some())
            }
        }
    }

    /// The staged bytes of `hash`, if they are still there.
    pub async fn load(&self, hash: &str) -> Result<Option<Bytes>, StagingError> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(hash);
                tokio::task::spawn_blocking(move || match std::fs::read(&path) {
                    Ok(bytes) if !is_stale(&path) => Ok(Some(Bytes::from(bytes))),
                    Ok(_) => Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(StagingError::Local(e)),
                })
                .await
                .map_err(|e| StagingError::Local(std::io::Error::other(e)))?
            }
            Self::Redis { pool, prefix } => {
                let key = format!("{prefix}{hash}");
                let bytes: Option<Vec<u8>> = redis_call(pool, |mut cmd| {
                    cmd.arg("GET").arg(&key);
                    cmd
                })
                .await?;
                Ok(bytes.map(Bytes::from))
            }
        }
    }

    /// Removes the staged bytes of `hash` (its job is done, or gave up).
    pub async fn remove(&self, hash: &str) -> Result<(), StagingError> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(hash);
                tokio::task::spawn_blocking(move || match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                })
                .await
                .map_err(std::io::Error::other)??;
                Ok(())
            }
            Self::Redis { pool, prefix } => {
                let key = format!("{prefix}{hash}");
                let _: i64 = redis_call(pool, |mut cmd| {
                    cmd.arg("DEL").arg(&key);
                    cmd
                })
                .await?;
                Ok(())
            }
        }
    }
}

/// Staged bytes older than the TTL count as gone (the local store has no expiry of its own).
fn is_stale(path: &std::path::Path) -> bool {
    let modified = std::fs::metadata(path).and_then(|m| m.modified());
    modified.is_ok_and(|at| {
        SystemTime::now()
            .duration_since(at)
            .is_ok_and(|age| age > STAGED_TTL)
    })
}

/// Writes a temporary file, then links it to `path` only if nothing is there (a link fails
/// on an existing target, which makes it the "set if absent" of the local store).
fn stage_file(
    dir: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
) -> Result<bool, StagingError> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    if path.exists() {
        if !is_stale(path) {
            return Ok(false);
        }
        std::fs::remove_file(path)?;
    }
    let temp = dir.join(format!(".tmp-{}", crate::auth::random_token(9)));
    let linked = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::hard_link(&temp, path)
    })();
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One bounded Redis command.
async fn redis_call<T: redis::FromRedisValue>(
    pool: &RedisPool,
    build: impl FnOnce(redis::Cmd) -> redis::Cmd,
) -> Result<T, StagingError> {
    let cmd = build(redis::Cmd::new());
    let call = async {
        let mut conn = pool
            .get()
            .await
            .map_err(|e| StagingError::Redis(e.to_string()))?;
        cmd.query_async::<T>(&mut *conn)
            .await
            .map_err(|e| StagingError::Redis(e.to_string()))
    };
    tokio::time::timeout(REDIS_TIMEOUT, call)
        .await
        .map_err(|_| StagingError::Redis("timed out".into()))?
}
