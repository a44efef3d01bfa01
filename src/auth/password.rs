//! Argon2id password hashing on a small pool of threads of its own.
//!
//! One hash costs tens of milliseconds of CPU and about 19 MiB of working memory (argon2's
//! default parameters), so hashing is bounded twice over: at most `threads` hashes run at once,
//! each on a long-lived thread of this pool that allocates its working memory once and reuses
//! it for every hash (left to the allocator, each 19 MiB buffer was freed into whichever malloc
//! arena the thread last used, and a flood left hundreds of megabytes behind); and a request
//! waits at most `wait` for a turn before it is refused with [`PasswordError::Busy`] (503 with
//! `Retry-After`). A flood of registrations or logins then costs the hub `threads` × 19 MiB and
//! a bounded queue of waiting requests, however long it lasts.

use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::domain::Password;

/// A hash of a random password, verified against when the handle does not exist, so that a
/// login for an unknown handle takes as long as one with a wrong password.
static DUMMY_HASH: LazyLock<Option<String>> = LazyLock::new(|| {
    hash_with(
        &mut Workspace::default(),
        crate::auth::random_token(16).as_bytes(),
    )
    .ok()
});

/// The working memory of one hashing thread, grown to the largest parameters met and kept.
#[derive(Default)]
struct Workspace {
    blocks: Vec<Block>,
}

impl Workspace {
    /// Memory for one hash with `params`.
    fn blocks(&mut self, params: &Params) -> &mut [Block] {
        let count = params.block_count();
        if self.blocks.len() < count {
            self.blocks.resize(count, Block::default());
        }
        let (used, _) = self.blocks.split_at_mut(count);
        used
    }
}

/// Argon2's output for `password` and `salt` with `argon2`'s parameters, computed in `workspace`.
fn compute(
    workspace: &mut Workspace,
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &Salt,
) -> Result<Output, PasswordError> {
    let length = argon2
        .params()
        .output_len()
        .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let mut buffer = [0u8; Output::MAX_LENGTH];
    let out = buffer
        .get_mut(..length)
        .ok_or_else(|| PasswordError::Hash("output length out of range".into()))?;
    argon2
        .hash_password_into_with_memory(password, salt, out, workspace.blocks(argon2.params()))
        .map_err(|e| PasswordError::Hash(e.to_string()))?;
    Output::new(out).map_err(|e| PasswordError::Hash(e.to_string()))
}

/// A PHC string (`$argon2id$v=19$...`) for `password` with a fresh salt and the default
/// parameters.
fn hash_with(workspace: &mut Workspace, password: &[u8]) -> Result<String, PasswordError> {
    let argon2 = Argon2::default();
    let mut salt = [0u8; Salt::RECOMMENDED_LENGTH];
    rand::rng().fill_bytes(&mut salt);
    let salt = Salt::new(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?;
    let output = compute(workspace, &argon2, password, &salt)?;
    let hash = PasswordHash {
        algorithm: Algorithm::default().ident(),
        version: Some(Version::default().into()),
        params: ParamsString::try_from(argon2.params())
            .map_err(|e| PasswordError::Hash(e.to_string()))?,
        salt: Some(salt),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `stored` (compared in constant time), using the
/// algorithm, version and parameters the string names.
fn verify_with(
    workspace: &mut Workspace,
    password: &[u8],
    stored: &str,
) -> Result<bool, PasswordError> {
    let invalid = |e: argon2::password_hash::Error| PasswordError::Hash(e.to_string());
    let hash = PasswordHash::new(stored).map_err(|e| PasswordError::Hash(e.to_string()))?;
    let algorithm = Algorithm::try_from(hash.algorithm.as_str()).map_err(invalid)?;
    let version = match hash.version {
        Some(version) => {
            Version::try_from(version).map_err(|e| PasswordError::Hash(e.to_string()))?
        }
        None => Version::default(),
    };
    let params = Params::try_from(&hash).map_err(invalid)?;
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return Err(PasswordError::Hash(
            "the stored hash has no salt or output".into(),
        ));
    };
    let output = compute(
        workspace,
        &Argon2::new(algorithm, version, params),
        password,
        &salt,
    )?;
    // `Output`'s equality is constant-time.
    Ok(output == expected)
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// Every hashing thread stayed busy for the whole wait; the client should retry later.
    #[error("every password hashing thread is busy")]
    Busy {
        /// Whole seconds after which a retry is sensible.
        retry_after_secs: u64,
    },
    #[error("the hashing pool has stopped")]
    Stopped,
}

/// One unit of work for a hashing thread, given that thread's working memory.
type Job = Box<dyn FnOnce(&mut Workspace) + Send>;

/// The replica's password hashing pool. Cloning shares the pool.
#[derive(Clone)]
pub struct Passwords {
    jobs: mpsc::Sender<Job>,
    /// One permit per thread: a job is handed to the pool only with a permit, so jobs never
    /// queue inside the pool and the wait for a permit is the whole wait.
    permits: Arc<Semaphore>,
    /// Longest a request waits for a permit.
    wait: Duration,
}

impl Passwords {
    /// Starts `threads` hashing threads; they end when the last clone is dropped.
    pub fn start(threads: usize, wait: Duration) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("segue-hash-{index}"))
                .spawn(move || {
                    let mut workspace = Workspace::default();
                    loop {
                        // A std Mutex: the lock is held only while waiting for the next job,
                        // never while hashing.
                        let job = match queue.lock() {
                            Ok(receiver) => receiver.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut workspace),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs,
            permits: Arc::new(Semaphore::new(threads)),
            wait,
        })
    }

    /// Runs `work` on a hashing thread once one is free, waiting at most `self.wait`.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Workspace) -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let permit: OwnedSemaphorePermit =
            tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| PasswordError::Busy {
                    retry_after_secs: self.wait.as_secs().max(1),
                })?
                .map_err(|_| PasswordError::Stopped)?;
        let (reply, answer) = oneshot::channel();
        // The permit travels with the job and is released when the work is done, even if the
        // request that asked for it has gone.
        let job: Job = Box::new(move |workspace| {
            let output = work(workspace);
            drop(permit);
            let _ = reply.send(output);
        });
        self.jobs.send(job).map_err(|_| PasswordError::Stopped)?;
        answer.await.map_err(|_| PasswordError::Stopped)
    }

    /// Hashes a password into a PHC string (`$argon2id$v=19$...`) with a fresh salt.
    pub async fn hash(&self, password: Password) -> Result<String, PasswordError> {
        self.run(move |workspace| hash_with(workspace, password.expose().as_bytes()))
            .await?
    }

    /// Checks `password` against a stored PHC string; with no stored hash (unknown account)
    /// it spends the same effort and answers false.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, PasswordError> {
        self.run(move |workspace| {
            let known = stored.is_some();
            let hash = stored.or_else(|| DUMMY_HASH.clone()).unwrap_or_default();
            let matches = verify_with(workspace, password.as_bytes(), &hash)?;
            Ok(known && matches)
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn pool(threads: usize, wait_ms: u64) -> Passwords {
        Passwords::start(threads, Duration::from_millis(wait_ms)).expect("threads start")
    }

    #[tokio::test]
    async fn a_hashed_password_verifies_and_a_wrong_one_does_not() {
        let passwords = pool(1, 5_000);
        let password = Password::parse("correct horse".into()).expect("valid password");
        let hash = passwords.hash(password).await.expect("hashing works");
        assert!(hash.starts_with("$argon2id$"));
        assert!(matches!(
            passwords
                .verify("correct horse".into(), Some(hash.clone()))
                .await,
            Ok(true)
        ));
        assert!(matches!(
            passwords.verify("wrong horse".into(), Some(hash)).await,
            Ok(false)
        ));
    }

    #[test]
    fn hashes_made_by_the_crate_verify_here_and_hashes_made_here_verify_with_the_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let mut workspace = Workspace::default();
        let theirs = Argon2::default()
            .hash_password(b"correct horse")
            .expect("crate hashes")
            .to_string();
        assert!(verify_with(&mut workspace, b"correct horse", &theirs).expect("verifies"));
        assert!(!verify_with(&mut workspace, b"wrong horse", &theirs).expect("verifies"));
        let ours = hash_with(&mut workspace, b"correct horse").expect("hashes");
        let parsed = PasswordHash::new(&ours).expect("a PHC string");
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
    }

    #[test]
    fn a_hash_with_other_parameters_verifies_in_a_reused_workspace() {
        use argon2::password_hash::PasswordHasher;
        let mut workspace = Workspace::default();
        hash_with(&mut workspace, b"first").expect("hashes");
        let small = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(64, 2, 1, None).expect("params"),
        );
        let stored = small
            .hash_password(b"correct horse")
            .expect("hashes")
            .to_string();
        assert!(verify_with(&mut workspace, b"correct horse", &stored).expect("verifies"));
        assert!(!verify_with(&mut workspace, b"correct hors", &stored).expect("verifies"));
    }

    #[tokio::test]
    async fn an_unknown_account_never_verifies() {
        assert!(matches!(
            pool(1, 5_000).verify("anything at all".into(), None).await,
            Ok(false)
        ));
    }

    #[tokio::test]
    async fn no_more_jobs_run_at_once_than_there_are_threads() {
        let passwords = pool(2, 10_000);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs = (0..8).map(|_| {
            let (running, most) = (running.clone(), most.clone());
            passwords.run(move |_| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            })
        });
        let results = futures_util::future::join_all(jobs).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_caller_that_waits_longer_than_allowed_is_refused_as_busy() {
        let passwords = pool(1, 10);
        let slow = passwords.run(|_| std::thread::sleep(Duration::from_millis(300)));
        let late = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            passwords.run(|_| ()).await
        };
        let (slow, late) = tokio::join!(slow, late);
        assert!(slow.is_ok());
        assert!(matches!(late, Err(PasswordError::Busy { .. })));
    }
}
