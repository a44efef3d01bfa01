//! The system of record: Diesel over PostgreSQL (production) or SQLite (the embedded
//! default), picked at run time from `DATABASE_URL`.
//!
//! There is one concrete [`Store`], not a trait: queries are written once against the portable
//! [`schema`] and run on whichever backend is live through the private `run!` macro, whose
//! two arms each type-check on their own. Store functions take a [`Conn`], so the caller
//! decides whether they run alone or inside [`Conn::transaction`].
//!
//! Backend-specific code is limited to this file (pool set-up, session settings, migrations);
//! `grep -n Postgres src/store` finds all of it.

pub mod artwork;
pub mod blocking;
pub mod blocks;
pub mod catalog;
mod deadline;
pub mod devices;
pub mod exports;
pub mod follows;
pub mod ingests;
pub mod jobs;
pub mod overlays;
pub mod plays;
pub mod preferences;
pub mod queue;
pub mod reports;
pub mod schema;
pub mod sightings;
pub mod tokens;
pub mod users;

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::{Connection, SqliteConnection};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{
    AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection, TransactionManager,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt;
use scoped_futures::ScopedBoxFuture;
use secrecy::ExposeSecret;

use crate::settings::{DatabaseTarget, Settings};

/// The SQLite connection type: Diesel's synchronous connection, run on tokio's blocking pool
/// ([`blocking::BlockingPool`]: a statement dropped midway is waited for without panicking).
pub type SqliteConn = SyncConnectionWrapper<SqliteConnection, blocking::BlockingPool>;

const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// How long SQLite waits on a lock held by another connection before failing the statement.
/// Writers are serialised by SQLite itself; five seconds covers a burst of them.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

/// How long an idle pooled connection is kept before it is closed, so a quiet hub does not
/// pin server-side resources for ever.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Upper bound on a pooled connection's life, so connections are renewed after database
/// fail-overs and server-side leaks cannot accumulate.
const POOL_MAX_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// A failure of the store, with what the client should be told derived from it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had within the connect timeout.
    #[error("the database is unreachable")]
    Unavailable(#[source] bb8::RunError<PoolError>),
    /// The server did not answer a round trip within this long.
    #[error("the database did not answer within {0:?}")]
    Unresponsive(Duration),
    /// A query failed.
    #[error("a database query failed")]
    Query(#[from] DieselError),
    /// A stored value could not be read back (e.g. JSON that no longer parses).
    #[error("a stored value is corrupt: {0}")]
    Corrupt(String),
    /// A task running store work ended without an answer (it panicked).
    #[error("a store task ended without an answer")]
    TaskLost,
    /// A transaction's own check refused what it was about to commit (rolled back).
    #[error("refused by a check inside the transaction")]
    Refused,
    /// One failure that several callers share (their requests waited on one lookup).
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// True when the failure is the database being away rather than a bad query; the HTTP
    /// layer answers 503 for these.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Unresponsive(_) => true,
            Self::Shared(inner) => inner.is_unavailable(),
            Self::Query(DieselError::BrokenTransactionManager) => true,
            Self::Query(DieselError::DatabaseError(kind, info)) => match kind {
                // The connection died under the query (the server went away, or its reply
                // was overdue).
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                    true
                }
                // The server ending the session (restart, `pg_terminate_backend`, crash of
                // another backend): SQLSTATE class 57P, which Diesel reports without its code,
                // only by message.
                DatabaseErrorKind::Unknown => info.message().starts_with("terminating connection"),
                _ => false,
            },
            _ => false,
        }
    }

    /// True when an insert hit a unique constraint.
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            Self::Query(DieselError::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                _
            ))
        )
    }
}

/// Start-up failures of the store; each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreInitError {
    #[error("could not create the data directory {path}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("could not connect to the database to run migrations")]
    Connect(#[source] diesel::ConnectionError),
    #[error("could not run database migrations")]
    Migrate(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("could not set up the SQLite database")]
    Sqlite(#[source] DieselError),
    #[error("the migration thread panicked")]
    Panicked,
}

/// The two connection pools; exactly one exists for the life of the process.
#[derive(Clone)]
enum Pools {
    Postgres(Pool<AsyncPgConnection>),
    Sqlite(Pool<SqliteConn>),
}

/// Handle to the system of record; cheap to clone (the pools are reference counted).
#[derive(Clone)]
pub struct Store {
    pools: Pools,
    /// Raised when a connection found the server unresponsive (PostgreSQL only).
    suspicion: deadline::Suspicion,
    connect_timeout: Duration,
}

/// A borrowed connection of either backend, as store functions take it.
pub enum Conn<'a> {
    Postgres(&'a mut AsyncPgConnection),
    Sqlite(&'a mut SqliteConn),
}

/// A connection checked out of the pool; it returns to the pool when dropped.
// Lives on the stack for one request; boxing the larger variant would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum PooledConn {
    Postgres(PooledConnection<'static, AsyncPgConnection>),
    Sqlite(PooledConnection<'static, SqliteConn>),
}

/// Runs one Diesel expression on whichever backend `$conn` (a `&mut Conn`) holds. Each arm is
/// type-checked separately, so the expression must be valid SQL for both backends.
macro_rules! run {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::store::Conn::Postgres(inner) => {
                let $c = &mut **inner;
                $body
            }
            $crate::store::Conn::Sqlite(inner) => {
                let $c = &mut **inner;
                $body
            }
        }
    };
}
pub(crate) use run;

impl Conn<'_> {
    /// Serialises the transactions that name any of `keys` until the one holding them ends:
    /// PostgreSQL takes a transaction-scoped advisory lock per key (in a fixed order, so two
    /// cannot deadlock); SQLite needs nothing, as its writers are serialised already.
    pub async fn lock_keys_for_transaction(&mut self, keys: &[String]) -> Result<(), StoreError> {
        if let Conn::Postgres(conn) = self {
            let mut sorted: Vec<&String> = keys.iter().collect();
            sorted.sort();
            sorted.dedup();
            for key in sorted {
                diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind::<diesel::sql_types::Text, _>(key)
                    .execute(&mut **conn)
                    .await?;
            }
        }
        Ok(())
    }
}

impl Store {
    /// Runs pending migrations, then builds the pool for the configured backend.
    pub async fn connect(settings: &Settings) -> Result<Self, StoreInitError> {
        let target = settings
            .database()
            .map_err(|e| StoreInitError::Migrate(Box::new(std::io::Error::other(e.to_string()))))?;
        if let DatabaseTarget::Sqlite(path) = &target
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            create_private_dir(dir).map_err(|source| StoreInitError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        if let DatabaseTarget::Sqlite(path) = &target {
            // The file holds password and token hashes: readable by the hub's user only.
            // SQLite creates its `-wal` and `-shm` files with the same permissions.
            create_private_file(path).map_err(|source| StoreInitError::DataDir {
                path: path.display().to_string(),
                source,
            })?;
        }
        run_migrations(target.clone()).await?;

        let suspicion = deadline::Suspicion::default();
        let connect_timeout = settings.db_connect_timeout();
        let pools = match target {
            DatabaseTarget::Postgres(url) => {
                let statement_timeout = settings.db_statement_timeout_ms;
                // A reply may take as long as the server lets a statement run, plus the time a
                // round trip may take on a slow link.
                let reply_limit =
                    Duration::from_millis(statement_timeout) + settings.db_connect_timeout();
                let on_setup = suspicion.clone();
                let mut config = ManagerConfig::<AsyncPgConnection>::default();
                config.recycling_method = RecyclingMethod::Fast;
                config.custom_setup = Box::new(move |url| {
                    let suspicion = on_setup.clone();
                    async move {
                        let mut conn =
                            deadline::establish(url, connect_timeout, reply_limit, suspicion)
                                .await?;
                        // A runaway query must not hold a pooled connection for ever.
                        conn.batch_execute(&format!("SET statement_timeout = {statement_timeout}"))
                            .await
                            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    }
                    .boxed()
                });
                let manager = AsyncDieselConnectionManager::new_with_config(
                    url.expose_secret().to_owned(),
                    config,
                );
                Pools::Postgres(
                    pool_builder(settings, settings.db_pool_size).build_unchecked(manager),
                )
            }
            DatabaseTarget::Sqlite(path) => {
                let mut config = ManagerConfig::<SqliteConn>::default();
                config.recycling_method = RecyclingMethod::Fast;
                config.custom_setup = Box::new(|url| {
                    async move {
                        let mut conn = SqliteConn::establish(url).await?;
                        conn.batch_execute(&sqlite_pragmas())
                            .await
                            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    }
                    .boxed()
                });
                let manager = AsyncDieselConnectionManager::new_with_config(
                    path.to_string_lossy().into_owned(),
                    config,
                );
                // SQLite serialises writers; a few connections give concurrent readers (WAL)
                // without piling writers up on the file lock.
                Pools::Sqlite(
                    pool_builder(settings, settings.db_pool_size.min(4)).build_unchecked(manager),
                )
            }
        };
        Ok(Self {
            pools,
            suspicion,
            connect_timeout,
        })
    }

    /// Which backend is live, for logs and readiness output.
    pub fn backend_name(&self) -> &'static str {
        match self.pools {
            Pools::Postgres(_) => "postgres",
            Pools::Sqlite(_) => "sqlite",
        }
    }

    /// Checks a connection out of the pool, waiting at most the configured connect timeout.
    ///
    /// A PostgreSQL connection the server has closed while it sat in the pool (a restart,
    /// `pg_terminate_backend`) is discarded here rather than handed out to fail its first
    /// query. While the store is suspect (a reply was overdue), the connection must first
    /// answer one round trip within the connect timeout, so requests to a server that stopped
    /// answering fail within that timeout too.
    pub async fn conn(&self) -> Result<PooledConn, StoreError> {
        match &self.pools {
            Pools::Postgres(pool) => {
                let mut pooled = loop {
                    let mut pooled = pool.get_owned().await.map_err(StoreError::Unavailable)?;
                    if !diesel_async::pooled_connection::PoolableConnection::is_broken(&mut *pooled)
                    {
                        break pooled;
                    }
                    // Dropped: the pool sees it is broken and closes it.
                };
                if self.suspicion.is_raised() {
                    let probe = diesel::sql_query("SELECT 1").execute(&mut *pooled);
                    match tokio::time::timeout(self.connect_timeout, probe).await {
                        Ok(Ok(_)) => self.suspicion.clear(),
                        Ok(Err(error)) => return Err(StoreError::Query(error)),
                        Err(_) => {
                            return Err(StoreError::Unresponsive(self.connect_timeout));
                        }
                    }
                }
                Ok(PooledConn::Postgres(pooled))
            }
            Pools::Sqlite(pool) => Ok(PooledConn::Sqlite(
                pool.get_owned().await.map_err(StoreError::Unavailable)?,
            )),
        }
    }

    /// One round trip to the database, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut pooled = self.conn().await?;
        run!(&mut pooled.conn(), c => diesel::sql_query("SELECT 1").execute(c).await)?;
        Ok(())
    }
}

impl PooledConn {
    /// The connection, as store functions take it.
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Postgres(c) => Conn::Postgres(c),
            Self::Sqlite(c) => Conn::Sqlite(c),
        }
    }
}

impl<'c> Conn<'c> {
    /// Runs `f` in a transaction: committed when it returns `Ok`, rolled back otherwise.
    ///
    /// Written over the backends' transaction managers rather than their closure-based
    /// `transaction`, so one closure type serves both. A future dropped mid-transaction
    /// leaves the connection marked as in a transaction, and the pool discards it.
    pub async fn transaction<'a, T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: for<'r> FnOnce(&'r mut Conn<'c>) -> ScopedBoxFuture<'a, 'r, Result<T, E>> + Send + 'a,
        E: From<DieselError> + Send + 'a,
        T: Send + 'a,
    {
        self.begin().await?;
        match f(self).await {
            Ok(value) => {
                self.commit().await?;
                Ok(value)
            }
            Err(error) => {
                // The error that ended the transaction is the one worth reporting; a failed
                // rollback marks the connection broken and the pool drops it.
                if let Err(rollback) = self.rollback().await {
                    tracing::warn!(error = %rollback, "rollback failed");
                }
                Err(error)
            }
        }
    }

    async fn begin(&mut self) -> Result<(), DieselError> {
        match self {
            Conn::Postgres(c) => PgTransactions::begin_transaction(&mut **c).await,
            Conn::Sqlite(c) => SqliteTransactions::begin_transaction(&mut **c).await,
        }
    }

    async fn commit(&mut self) -> Result<(), DieselError> {
        match self {
            Conn::Postgres(c) => PgTransactions::commit_transaction(&mut **c).await,
            Conn::Sqlite(c) => SqliteTransactions::commit_transaction(&mut **c).await,
        }
    }

    async fn rollback(&mut self) -> Result<(), DieselError> {
        match self {
            Conn::Postgres(c) => PgTransactions::rollback_transaction(&mut **c).await,
            Conn::Sqlite(c) => SqliteTransactions::rollback_transaction(&mut **c).await,
        }
    }
}

type PgTransactions = <AsyncPgConnection as AsyncConnection>::TransactionManager;
type SqliteTransactions = <SqliteConn as AsyncConnection>::TransactionManager;

/// Pool settings shared by both backends.
fn pool_builder<M: bb8::ManageConnection>(settings: &Settings, size: u32) -> bb8::Builder<M> {
    bb8::Pool::builder()
        .max_size(size)
        // A request waits at most this long for a connection; with the database down, that
        // bounds how long it takes to answer 503.
        .connection_timeout(settings.db_connect_timeout())
        // Checking each connection out with a round trip would cost a query per request; a
        // broken connection fails its query instead and is discarded.
        .test_on_check_out(false)
        .idle_timeout(Some(POOL_IDLE_TIMEOUT))
        .max_lifetime(Some(POOL_MAX_LIFETIME))
}

/// Per-connection SQLite settings: a busy timeout instead of an instant `database is locked`
/// (first, so the statements after it wait too), WAL so readers never block the writer, and
/// foreign keys on (SQLite leaves them off by default).
fn sqlite_pragmas() -> String {
    format!(
        "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}; PRAGMA journal_mode = WAL; \
         PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;"
    )
}

/// Applies the embedded migrations for `target`.
///
/// Diesel's migration harness is synchronous. It runs on a plain thread of its own: actix's
/// runtime is single-threaded, where blocking (or `block_in_place`) is not allowed, and
/// `AsyncConnectionWrapper` needs a runtime it can block on, which it builds itself on a
/// thread that has none.
async fn run_migrations(target: DatabaseTarget) -> Result<(), StoreInitError> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let outcome = match target {
            DatabaseTarget::Postgres(url) => migrate_postgres(url.expose_secret()).map(|_| ()),
            DatabaseTarget::Sqlite(path) => migrate_sqlite(&path),
        };
        let _ = done.send(outcome);
    });
    result.await.map_err(|_| StoreInitError::Panicked)?
}

/// The PostgreSQL advisory lock replicas take around their migrations ("segue" in ASCII), so
/// that any number of them can start at once on an empty database: without it two replicas
/// both created diesel's bookkeeping table and one died on a duplicate key in `pg_type`.
const MIGRATION_LOCK: i64 = 0x0073_6567_7565;

fn migrate_postgres(url: &str) -> Result<(), StoreInitError> {
    let mut conn = <AsyncConnectionWrapper<AsyncPgConnection> as Connection>::establish(url)
        .map_err(StoreInitError::Connect)?;
    // A session lock: held until this connection closes at the end of the function, on
    // every path, so a replica that fails mid-migration never leaves it taken.
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        &format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"),
    )
    .map_err(|e| StoreInitError::Migrate(Box::new(e)))?;
    conn.run_pending_migrations(POSTGRES_MIGRATIONS)
        .map_err(StoreInitError::Migrate)?;
    Ok(())
}

fn migrate_sqlite(path: &Path) -> Result<(), StoreInitError> {
    let mut conn = <SqliteConnection as Connection>::establish(&path.to_string_lossy())
        .map_err(StoreInitError::Connect)?;
    conn.batch_execute(&sqlite_pragmas())
        .map_err(StoreInitError::Sqlite)?;
    conn.run_pending_migrations(SQLITE_MIGRATIONS)
        .map_err(StoreInitError::Migrate)?;
    Ok(())
}

/// Creates `dir` (and its missing parents) readable by this user only (0700 on Unix); an
/// existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates an empty `path` readable by this user only (0600 on Unix) unless it exists.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The current time as stored: UTC without zone, truncated to microseconds so a value reads
/// back equal on both backends.
pub fn now() -> chrono::NaiveDateTime {
    let now = chrono::Utc::now().naive_utc();
    chrono::DurationRound::duration_trunc(now, chrono::TimeDelta::microseconds(1)).unwrap_or(now)
}
