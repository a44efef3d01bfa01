//! Backups of the store into the blob store, and their restore. PostgreSQL is dumped by
//! `pg_dump --format=custom`, SQLite copied by `VACUUM INTO` a temporary file; either way the
//! bytes go through zstd into an upload in parts ([`crate::blobs::Upload`]), so a backup is
//! never whole in memory, and a failure aborts the upload (no orphan parts). Backups are
//! named by their time (`backups/2026-12-02T030000Z.pgdump.zst`); after each one, the
//! retention keeps the newest of each of the last N days, weeks and months
//! ([`Retention::keep`]) and deletes the rest.
//!
//! Scheduled by the leader-elected scheduler ([`NIGHTLY`], daily at `SEGUE_BACKUP_AT`, UTC)
//! unless `SEGUE_BACKUP=off`, and run by hand with `segue backup now`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;

use crate::blobs::{BlobError, BlobKey, Blobs, Upload};
use crate::jobs::scheduler::{Every, Tick};
use crate::jobs::{Failure, Handlers, Job, Kind};
use crate::settings::DatabaseTarget;

/// The nightly backup (periodic).
pub const NIGHTLY: Kind<Tick> = Kind::new("backups.nightly");

/// The name the nightly backup's schedule runs under.
pub const NIGHTLY_JOB: &str = "backups.nightly";

/// Bytes read from the source at a time.
const CHUNK: usize = 256 * 1024;

/// zstd's level: fast, and most of the gain.
const LEVEL: i32 = 3;

/// How many backups of each period are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
}

impl Retention {
    /// Of backups taken at `times`, the ones to keep: the newest of each of the last `daily`
    /// days that have one, of the last `weekly` ISO weeks, and of the last `monthly` months.
    pub fn keep(&self, times: &[NaiveDateTime]) -> BTreeSet<NaiveDateTime> {
        let mut newest_first: Vec<NaiveDateTime> = times.to_vec();
        newest_first.sort_unstable_by(|a, b| b.cmp(a));
        let mut kept = BTreeSet::new();
        let mut pick = |count: usize, period: &dyn Fn(&NaiveDateTime) -> (i32, u32)| {
            let mut seen = Vec::new();
            for time in &newest_first {
                let key = period(time);
                if seen.contains(&key) {
                    continue;
                }
                if seen.len() == count {
                    break;
                }
                seen.push(key);
                kept.insert(*time);
            }
        };
        pick(self.daily, &|t| (t.year(), t.ordinal()));
        pick(self.weekly, &|t| (t.iso_week().year(), t.iso_week().week()));
        pick(self.monthly, &|t| (t.year(), t.month()));
        kept
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{program} failed: {detail}")]
    Tool {
        program: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(String),
    #[error("{0:?} is not a backup key (backups/<time>.<pgdump|sqlite>.zst)")]
    NotABackup(String),
    #[error("the target database is not empty ({0}); restore with --force to replace it")]
    NotEmpty(String),
}

/// One backup in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub key: String,
    pub taken_at: NaiveDateTime,
    /// `pgdump` or `sqlite`.
    pub format: String,
}

impl Backup {
    /// Reads a backup's key back: `<prefix><YYYY-MM-DDTHHMMSSZ>.<format>.zst`.
    pub fn parse(prefix: &str, key: &str) -> Option<Self> {
        let name = key.strip_prefix(prefix)?.strip_suffix(".zst")?;
        let (time, format) = name.split_once('.')?;
        if !matches!(format, "pgdump" | "sqlite") {
            return None;
        }
        let taken_at = NaiveDateTime::parse_from_str(time, "%Y-%m-%dT%H%M%SZ").ok()?;
        Some(Self {
            key: key.to_owned(),
            taken_at,
            format: format.to_owned(),
        })
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct Done {
    pub key: String,
    pub bytes: u64,
    pub took: Duration,
    /// Older backups the retention deleted.
    pub deleted: Vec<String>,
}

/// Backs up and restores one store.
#[derive(Clone)]
pub struct Backups {
    pub database: DatabaseTarget,
    pub blobs: Blobs,
    /// `backups/` (or `SEGUE_BACKUP_PREFIX`).
    pub prefix: String,
    pub retention: Retention,
    /// When the nightly backup runs (`daily SEGUE_BACKUP_AT`).
    pub nightly: Every,
    /// The clock nights are told by (the scheduler's).
    pub clock: crate::clock::Clock,
    pub metrics: crate::telemetry::BackupMetrics,
}

impl Backups {
    /// Adds the nightly backup's handler (a failure is retried by the jobs port).
    pub fn handlers(self, handlers: Handlers) -> Handlers {
        handlers.on(&NIGHTLY, move |job: Job<Tick>| {
            let backups = self.clone();
            let tick = job.payload.tick;
            // Named by the night it belongs to, so a retry replaces its own try's object.
            let night = DateTime::from_timestamp_millis(backups.nightly.start_of(tick))
                .unwrap_or_else(Utc::now);
            let tonight = backups.nightly.tick_at(backups.clock.now_ms());
            async move {
                // A night nobody led through (caught up later) would be today's data under
                // an old night's name, and would push real older backups out of the retention.
                if tick < tonight {
                    tracing::warn!(
                        tick,
                        tonight,
                        "a missed night's backup is skipped: tonight's stands for it"
                    );
                    return Ok(());
                }
                match backups.run(night).await {
                    Ok(done) => {
                        tracing::info!(
                            key = done.key,
                            bytes = done.bytes,
                            took_ms = done.took.as_millis() as u64,
                            deleted = done.deleted.len(),
                            "backup done"
                        );
                        Ok(())
                    }
                    Err(error) => {
                        let why = crate::error::chain(&error);
                        tracing::error!(error = why, "backup failed");
                        Err(Failure::Retry(why))
                    }
                }
            }
        })
    }

    fn key_at(&self, now: DateTime<Utc>) -> String {
        let format = match self.database {
            DatabaseTarget::Postgres(_) => "pgdump",
            DatabaseTarget::Sqlite(_) => "sqlite",
        };
        format!(
            "{}{}.{format}.zst",
            self.prefix,
            now.format("%Y-%m-%dT%H%M%SZ")
        )
    }

    /// Takes a backup named by `now`, then applies the retention.
    pub async fn run(&self, now: DateTime<Utc>) -> Result<Done, BackupError> {
        let started = Instant::now();
        let key = self.key_at(now);
        let bytes = match self.take(&key).await {
            Ok(bytes) => bytes,
            Err(error) => {
                self.metrics.failures.inc();
                return Err(error);
            }
        };
        let took = started.elapsed();
        self.metrics
            .last_success
            .set(self.clock.now_ms() as f64 / 1000.0);
        self.metrics.last_duration.set(took.as_secs_f64());
        self.metrics.last_bytes.set(bytes as f64);
        // The backup is safe now: a retention that fails is logged and tried again after the
        // next backup, never a reason to take this one again.
        let deleted = match self.apply_retention().await {
            Ok(deleted) => deleted,
            Err(error) => {
                let why = crate::error::chain(&error);
                tracing::warn!(
                    error = why,
                    "backup retention failed; the next backup tries again"
                );
                Vec::new()
            }
        };
        Ok(Done {
            key,
            bytes,
            took,
            deleted,
        })
    }

    /// Writes a backup under `key`; its compressed size.
    async fn take(&self, key: &str) -> Result<u64, BackupError> {
        let blob_key = BlobKey::parse(key).map_err(|e| BackupError::NotABackup(e.0))?;
        let upload = self.blobs.upload(&blob_key, "application/zstd").await?;
        self.write_into(upload).await
    }

    /// The backups in the store, oldest first.
    pub async fn list(&self) -> Result<Vec<Backup>, BackupError> {
        let keys = self.blobs.list(&self.prefix).await?;
        let mut found: Vec<Backup> = keys
            .iter()
            .filter_map(|key| Backup::parse(&self.prefix, key))
            .collect();
        found.sort_by_key(|b| b.taken_at);
        Ok(found)
    }

    /// Deletes the backups the retention does not keep; returns their keys.
    pub async fn apply_retention(&self) -> Result<Vec<String>, BackupError> {
        let found = self.list().await?;
        let times: Vec<NaiveDateTime> = found.iter().map(|b| b.taken_at).collect();
        let kept = self.retention.keep(&times);
        let mut deleted = Vec::new();
        for backup in found {
            if !kept.contains(&backup.taken_at) {
                let key = BlobKey::parse(&backup.key).map_err(|e| BackupError::NotABackup(e.0))?;
                self.blobs.delete(&key).await?;
                deleted.push(backup.key);
            }
        }
        Ok(deleted)
    }

    /// Restores backup `key` into `into` (a PostgreSQL URL, or a SQLite file's path), which
    /// must be empty unless `force`.
    pub async fn restore(&self, key: &str, into: &str, force: bool) -> Result<(), BackupError> {
        let backup = Backup::parse(&self.prefix, key)
            .ok_or_else(|| BackupError::NotABackup(key.to_owned()))?;
        let blob_key = BlobKey::parse(key).map_err(|e| BackupError::NotABackup(e.0))?;
        let mut download = self
            .blobs
            .download(&blob_key)
            .await?
            .ok_or_else(|| BackupError::NotABackup(key.to_owned()))?;
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let input = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        let into = into.to_owned();
        let restorer =
            tokio::task::spawn_blocking(move || consume(&backup.format, input, &into, force));
        loop {
            let next = match download.chunk().await {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => break,
                Err(error) => Err(std::io::Error::other(error)),
            };
            let failed = next.is_err();
            // A closed channel: the restorer stopped early (it refused, or failed) and says why.
            if tx.send(next).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
        restorer.await.map_err(std::io::Error::other)?
    }

    /// Makes the backup on a blocking thread and writes it into `upload` as it comes;
    /// finishes the upload, or aborts it if either side fails.
    async fn write_into(&self, mut upload: Upload) -> Result<u64, BackupError> {
        let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
        let database = self.database.clone();
        let maker = tokio::task::spawn_blocking(move || produce(&database, ChannelWriter::new(tx)));
        let mut stored = Ok(());
        while let Some(chunk) = rx.recv().await {
            if let Err(error) = upload.write(&chunk).await {
                stored = Err(error);
                break;
            }
        }
        // Closing the channel stops a maker still writing.
        drop(rx);
        // A maker that panicked made nothing whole: abort as for any failure.
        let made = maker
            .await
            .unwrap_or_else(|panic| Err(std::io::Error::other(panic).into()));
        match (stored, made) {
            (Ok(()), Ok(())) => Ok(upload.finish().await?),
            (Err(error), _) => {
                upload.abort().await;
                Err(error.into())
            }
            (Ok(()), Err(error)) => {
                upload.abort().await;
                Err(error)
            }
        }
    }
}

/// Chunks in flight between a blocking thread and the blob store: memory holds at most
/// this many chunks of a backup, whatever its size.
const IN_FLIGHT: usize = 4;

/// Sends what is written to it down a channel in chunks of [`CHUNK`] (the end of a backup
/// being made on a blocking thread).
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            tx,
            buffer: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Reads what a channel brings (the start of a restore, on a blocking thread); a failed
/// download arrives as an error, never as the end.
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.current = chunk?,
            }
        }
        let n = out.len().min(self.current.len());
        let taken = self.current.split_to(n);
        if let Some(out) = out.get_mut(..n) {
            out.copy_from_slice(&taken);
        }
        Ok(n)
    }
}

/// Makes the backup of `database` on this (blocking) thread, compressed into `out`.
fn produce(database: &DatabaseTarget, out: ChannelWriter) -> Result<(), BackupError> {
    let mut encoder = zstd::stream::write::Encoder::new(out, LEVEL)?;
    match database {
        DatabaseTarget::Postgres(url) => dump_postgres(url, &mut encoder)?,
        DatabaseTarget::Sqlite(path) => copy_sqlite(path, &mut encoder)?,
    }
    encoder.finish()?.flush()?;
    Ok(())
}

/// A child's standard error, read on a thread of its own so that a chatty child never
/// blocks on a full pipe while its output is read.
fn collect_stderr(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut said = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut said);
        }
        said
    })
}

/// Waits for `child` and turns a failure into what it said.
fn finished(
    program: &'static str,
    mut child: std::process::Child,
    stderr: std::thread::JoinHandle<String>,
    piped: std::io::Result<u64>,
) -> Result<(), BackupError> {
    if piped.is_err() {
        // The other end stopped (the upload failed, or this side did): no use going on.
        let _ = child.kill();
    }
    let status = child.wait()?;
    let said = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(BackupError::Tool {
            program,
            detail: format!("{status}: {}", said.trim()),
        });
    }
    piped?;
    Ok(())
}

fn dump_postgres(url: &SecretString, out: &mut impl Write) -> Result<(), BackupError> {
    let mut child = std::process::Command::new("pg_dump")
        .args([
            "--format=custom",
            "--compress=0",
            // A lock held by a migration fails the backup (retried) rather than hanging it.
            "--lock-wait-timeout=60000",
            "--no-owner",
            "--no-privileges",
            "--dbname",
        ])
        .arg(url.expose_secret())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BackupError::Tool {
            program: "pg_dump",
            detail: e.to_string(),
        })?;
    let stderr = collect_stderr(&mut child);
    let piped = match child.stdout.take() {
        Some(mut stdout) => std::io::copy(&mut stdout, out),
        None => Err(std::io::Error::other("pg_dump gave no output")),
    };
    finished("pg_dump", child, stderr, piped)
}

/// A consistent copy of the SQLite database (`VACUUM INTO` a file beside it), compressed.
fn copy_sqlite(path: &Path, out: &mut impl Write) -> Result<(), BackupError> {
    let copy = path.with_file_name(format!(".backup-{}.sqlite", crate::auth::random_token(9)));
    let outcome = vacuum_into(path, &copy).and_then(|()| {
        let mut file = std::fs::File::open(&copy)?;
        std::io::copy(&mut file, out)?;
        Ok(())
    });
    let _ = std::fs::remove_file(&copy);
    outcome
}

fn vacuum_into(source: &Path, target: &Path) -> Result<(), BackupError> {
    use diesel::{Connection, RunQueryDsl, SqliteConnection};
    let url = source.to_string_lossy().into_owned();
    let mut conn =
        SqliteConnection::establish(&url).map_err(|e| BackupError::Store(e.to_string()))?;
    diesel::sql_query("VACUUM INTO ?")
        .bind::<diesel::sql_types::Text, _>(target.to_string_lossy().into_owned())
        .execute(&mut conn)
        .map_err(|e| BackupError::Store(format!("VACUUM INTO: {e}")))?;
    Ok(())
}

/// Restores a backup of `format` read from `input` into `into`, on this (blocking) thread.
fn consume(format: &str, input: ChannelReader, into: &str, force: bool) -> Result<(), BackupError> {
    match format {
        "pgdump" => restore_postgres(input, into, force),
        _ => restore_sqlite(input, Path::new(into), force),
    }
}

fn restore_postgres(input: ChannelReader, into: &str, force: bool) -> Result<(), BackupError> {
    let tables = count_tables(into)?;
    if tables > 0 && !force {
        return Err(BackupError::NotEmpty(format!("{tables} tables")));
    }
    let mut decoder = zstd::stream::read::Decoder::new(input)?;
    let mut command = std::process::Command::new("pg_restore");
    // One transaction: a restore that fails half-way leaves the target as it was.
    command.args([
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--single-transaction",
    ]);
    if force {
        command.args(["--clean", "--if-exists"]);
    }
    let mut child = command
        .arg("--dbname")
        .arg(into)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BackupError::Tool {
            program: "pg_restore",
            detail: e.to_string(),
        })?;
    let stderr = collect_stderr(&mut child);
    let piped = match child.stdin.take() {
        // Dropping stdin at the end of the arm tells pg_restore the dump is whole.
        Some(mut stdin) => std::io::copy(&mut decoder, &mut stdin),
        None => Err(std::io::Error::other("pg_restore took no input")),
    };
    finished("pg_restore", child, stderr, piped)
}

/// Tables in the target's `public` schema.
fn count_tables(url: &str) -> Result<i64, BackupError> {
    let output = std::process::Command::new("psql")
        .args([
            "-XtAq",
            "-c",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
        ])
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BackupError::Tool {
            program: "psql",
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(BackupError::Tool {
            program: "psql",
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|e| BackupError::Store(format!("counting tables: {e}")))
}

fn restore_sqlite(input: ChannelReader, into: &Path, force: bool) -> Result<(), BackupError> {
    let exists = std::fs::metadata(into).is_ok_and(|m| m.len() > 0);
    if exists && !force {
        return Err(BackupError::NotEmpty(into.display().to_string()));
    }
    if let Some(dir) = into.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let temp: PathBuf =
        into.with_file_name(format!(".restore-{}.sqlite", crate::auth::random_token(9)));
    let written = (|| -> std::io::Result<()> {
        let mut decoder = zstd::stream::read::Decoder::new(input)?;
        let mut file = std::fs::File::create(&temp)?;
        std::io::copy(&mut decoder, &mut file)?;
        file.sync_all()
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(error.into());
    }
    // A restored database replaces the old one whole, with no stale journal beside it; the
    // old journal is kept aside until the new database is in place, and put back if not.
    let mut aside = Vec::new();
    for stale in ["-wal", "-shm"] {
        let journal = PathBuf::from(format!("{}{stale}", into.display()));
        let kept = PathBuf::from(format!("{}{stale}", temp.display()));
        if std::fs::rename(&journal, &kept).is_ok() {
            aside.push((journal, kept));
        }
    }
    if let Err(error) = std::fs::rename(&temp, into) {
        for (journal, kept) in aside {
            let _ = std::fs::rename(kept, journal);
        }
        let _ = std::fs::remove_file(&temp);
        return Err(error.into());
    }
    for (_, kept) in aside {
        let _ = std::fs::remove_file(kept);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: u32, hour: u32) -> NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(hour, 0, 0)
            .unwrap()
            + chrono::TimeDelta::days(i64::from(day))
    }

    #[test]
    fn forty_days_of_nightly_backups_keep_seven_days_four_weeks_and_the_months() {
        let retention = Retention {
            daily: 7,
            weekly: 4,
            monthly: 12,
        };
        // A backup every night at 03:00 for 40 days, the retention applied after each.
        let mut kept: Vec<NaiveDateTime> = Vec::new();
        for day in 0..40 {
            kept.push(at(day, 3));
            let keep = retention.keep(&kept);
            kept.retain(|t| keep.contains(t));
        }
        let days: Vec<u32> = kept
            .iter()
            .map(|t| (*t - at(0, 3)).num_days() as u32)
            .collect();
        // The last seven nights (days 33–39); the newest of each of the last four ISO weeks
        // (days 24, 31, 38 and 39: the Sundays, and Monday 9 February); the newest of each
        // month (31 January, day 30; February's is day 39).
        assert_eq!(
            days,
            vec![24, 30, 31, 33, 34, 35, 36, 37, 38, 39],
            "{kept:?}"
        );
    }

    #[test]
    fn the_newest_backup_of_a_period_stands_for_it() {
        let retention = Retention {
            daily: 1,
            weekly: 0,
            monthly: 0,
        };
        let times = [at(0, 1), at(0, 2), at(0, 3)];
        assert_eq!(retention.keep(&times), BTreeSet::from([at(0, 3)]));
    }

    #[test]
    fn backup_keys_read_back() {
        let backup = Backup::parse("backups/", "backups/2026-12-02T030000Z.pgdump.zst").unwrap();
        assert_eq!(backup.format, "pgdump");
        assert_eq!(backup.taken_at, at(335, 3));
        for bad in [
            "backups/2026-12-02T030000Z.tar.zst",
            "backups/yesterday.pgdump.zst",
            "other/2026-12-02T030000Z.pgdump.zst",
            "backups/2026-12-02T030000Z.pgdump",
        ] {
            assert!(Backup::parse("backups/", bad).is_none(), "{bad}");
        }
    }
}
