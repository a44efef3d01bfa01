//! Where a reported artwork's bytes wait between the report and the artwork job: in Redis
//! when the hub has it (any replica's worker may run the job), else in a directory under
//! `$SEGUE_DATA_DIR` (one replica). Redis keeps its data in memory and evicts nothing, so
//! what waits there is bounded: only checked images are staged (see
//! [`super::inspect`]), each for at most [`STAGED_TTL`], and all of them together within
//! `artwork_staged_max_bytes`, and each account within an eighth of it (a ledger of what is
//! staged, by whom and until when, kept by two Lua scripts, so the budgets are exact whatever
//! crashes in between).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::redis::RedisPool;

/// How long staged bytes wait for the artwork job: well past its retries with the default
/// backoff (about nine minutes over ten attempts).
pub const STAGED_TTL: Duration = Duration::from_secs(60 * 60);

/// Longest a staging call may take against Redis.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("the staging directory failed: {0}")]
    Local(#[from] std::io::Error),
    #[error("staging in Redis failed: {0}")]
    Redis(String),
}

/// What staging a cover did. A staging's generation names it: every report of a cover while
/// it waits gets the same one (their artwork jobs are one job), and a cover rendered, removed
/// and staged again gets a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    /// This call staged it.
    New(String),
    /// It was staged already.
    Already(String),
    /// Staging it would pass the budget of staged bytes: not staged.
    Full,
}

#[derive(Clone)]
pub enum Staging {
    Local(Arc<PathBuf>),
    Redis(Arc<RedisStaging>),
}

pub struct RedisStaging {
    pool: RedisPool,
    /// `{<ns>:artwork}:staged:` (then the hash).
    prefix: String,
    /// `{<ns>:artwork}:staging` (the ledger), `…:bytes` (sizes) and `…:total`.
    ledger: [String; 3],
    /// `{<ns>:artwork}:staging:account:` (then the account's id): each account's total.
    accounts: String,
    max_bytes: u64,
    stage: redis::Script,
    unstage: redis::Script,
}

/// The share of the staging budget one account may hold: a few accounts cannot fill it for
/// everyone.
pub const ACCOUNT_SHARE: u64 = 8;

impl Staging {
    pub fn local(dir: PathBuf) -> Self {
        Self::Local(Arc::new(dir))
    }

    /// Staging in Redis under `namespace`, holding at most `max_bytes` in all, and at most an
    /// eighth of that (or one cover) for any one account. Its keys share one hash tag, so its
    /// scripts also run on a Redis Cluster.
    pub fn redis(pool: RedisPool, namespace: &str, max_bytes: u64) -> Self {
        let tag = format!("{{{namespace}:artwork}}");
        let ledger = format!("{tag}:staging");
        Self::Redis(Arc::new(RedisStaging {
            pool,
            prefix: format!("{tag}:staged:"),
            accounts: format!("{ledger}:account:"),
            ledger: [
                ledger.clone(),
                format!("{ledger}:bytes"),
                format!("{ledger}:total"),
            ],
            max_bytes,
            stage: redis::Script::new(include_str!("stage.lua")),
            unstage: redis::Script::new(include_str!("unstage.lua")),
        }))
    }

    /// Stages `bytes` as artwork `hash` (a checked hash: hex only) for `account`, unless it
    /// is staged already or (in Redis) a budget of staged bytes would be passed; `max_cover`
    /// is the largest cover accepted (an account may always stage one).
    pub async fn stage(
        &self,
        hash: &str,
        bytes: Bytes,
        account: i64,
        max_cover: u64,
    ) -> Result<Staged, StagingError> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(hash);
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || stage_file(&dir, &path, &bytes))
                    .await
                    .map_err(std::io::Error::other)?
            }
            Self::Redis(redis) => {
                let share = (redis.max_bytes / ACCOUNT_SHARE).max(max_cover);
                let mut invocation = redis.stage.prepare_invoke();
                invocation
                    .key(format!("{}{hash}", redis.prefix))
                    .key(&redis.ledger[0])
                    .key(&redis.ledger[1])
                    .key(&redis.ledger[2])
                    .key(format!("{}{account}", redis.accounts))
                    .arg(bytes.as_ref())
                    .arg(STAGED_TTL.as_secs())
                    .arg(redis.max_bytes)
                    .arg(share)
                    .arg(hash)
                    .arg(account)
                    .arg(&redis.accounts);
                let (outcome, generation): (i64, String) = bounded(&redis.pool, invocation).await?;
                Ok(match outcome {
                    1 => Staged::New(generation),
                    0 => Staged::Already(generation),
                    _ => Staged::Full,
                })
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
            Self::Redis(redis) => {
                let key = format!("{}{hash}", redis.prefix);
                let bytes: Option<Vec<u8>> = redis_call(&redis.pool, |mut cmd| {
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
            Self::Redis(redis) => {
                let mut invocation = redis.unstage.prepare_invoke();
                invocation
                    .key(format!("{}{hash}", redis.prefix))
                    .key(&redis.ledger[0])
                    .key(&redis.ledger[1])
                    .key(&redis.ledger[2])
                    .arg(hash)
                    .arg(&redis.accounts);
                let _: i64 = bounded(&redis.pool, invocation).await?;
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

/// The generation of the local staging at `path`: its file's modification time, in ms.
fn generation(path: &std::path::Path) -> Result<String, StagingError> {
    let modified = std::fs::metadata(path)?.modified()?;
    let ms = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    Ok(ms.to_string())
}

/// Writes a temporary file, then links it to `path` only if nothing is there (a link fails
/// on an existing target, which makes it the "set if absent" of the local store).
fn stage_file(
    dir: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
) -> Result<Staged, StagingError> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    if path.exists() {
        if !is_stale(path) {
            return Ok(Staged::Already(generation(path)?));
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
        Ok(()) => Ok(Staged::New(generation(path)?)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(Staged::Already(generation(path)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// One bounded script call.
async fn bounded<T: redis::FromRedisValue>(
    pool: &RedisPool,
    invocation: redis::ScriptInvocation<'_>,
) -> Result<T, StagingError> {
    let call = async {
        let mut conn = pool
            .get()
            .await
            .map_err(|e| StagingError::Redis(e.to_string()))?;
        invocation
            .invoke_async::<T>(&mut *conn)
            .await
            .map_err(|e| StagingError::Redis(e.to_string()))
    };
    tokio::time::timeout(REDIS_TIMEOUT, call)
        .await
        .map_err(|_| StagingError::Redis("timed out".into()))?
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
