//! The hub's own background jobs: the store's periodic upkeep (what would otherwise pile up
//! without bound), and the probe an operator enqueues to check the workers end to end.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use serde::{Deserialize, Serialize};

use crate::jobs::scheduler::{Every, Periodic, Tick};
use crate::jobs::{Failure, Handlers, Job, Kind};
use crate::settings::Settings;
use crate::store::{Store, StoreError, artwork, blocks, ingests, jobs, plays, tokens};

/// The periodic upkeep: expired refresh-token sessions, device registrations outside every
/// limit window, plays older than `play_history_days`, old run records and probes.
pub const UPKEEP: Kind<Tick> = Kind::new("store.upkeep");

/// A probe: waits `work_ms`, then records its job id in `job_probes`.
pub const PROBE: Kind<Probe> = Kind::new("jobs.probe");

/// The name the upkeep's runs are recorded under.
pub const UPKEEP_JOB: &str = "store.upkeep";

/// Longest a probe may pretend to work.
pub const MAX_PROBE_WORK: Duration = Duration::from_secs(60);

/// How long applied ingest ids are kept: past the job queue's idempotency window, a job
/// cannot be enqueued again under its key.
const KEEP_INGESTS: TimeDelta = TimeDelta::days(9);

/// How long a play waits for artwork that never came.
const KEEP_WAITERS: TimeDelta = TimeDelta::days(2);

/// How long run records and probe effects are kept.
const KEEP_RECORDS: TimeDelta = TimeDelta::days(30);

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Probe {
    pub work_ms: u64,
}

/// The periodic jobs of a hub with these settings (validated: the schedule parses).
pub fn periodic(settings: &Settings) -> Vec<Periodic> {
    let mut periodic = Vec::new();
    for (name, schedule, kind) in [
        (UPKEEP_JOB, &settings.upkeep_schedule, &UPKEEP),
        (
            crate::ingest::SWEEP_JOB,
            &settings.play_sweep_schedule,
            &crate::ingest::SWEEP,
        ),
        (
            crate::exports::EXPIRE_JOB,
            &settings.exports_sweep_schedule,
            &crate::exports::EXPIRE,
        ),
    ] {
        match Every::parse(schedule) {
            Ok(every) => periodic.push(Periodic::new(name, every, kind)),
            Err(error) => tracing::error!(%error, name, "not scheduled"),
        }
    }
    if settings.backup == "on" {
        match settings.backup_schedule() {
            Ok(every) => periodic.push(Periodic::new(
                crate::backups::NIGHTLY_JOB,
                every,
                &crate::backups::NIGHTLY,
            )),
            Err(error) => tracing::error!(%error, "no nightly backup scheduled"),
        }
    }
    periodic
}

/// What runs the hub's jobs.
pub fn handlers(store: Store, settings: Arc<Settings>) -> Handlers {
    let upkeep_store = store.clone();
    Handlers::new()
        .on(&UPKEEP, move |job: Job<Tick>| {
            let (store, settings) = (upkeep_store.clone(), settings.clone());
            async move { upkeep(&store, &settings, job).await.map_err(retry) }
        })
        .on(&PROBE, move |job: Job<Probe>| {
            let store = store.clone();
            async move {
                let work = Duration::from_millis(job.payload.work_ms).min(MAX_PROBE_WORK);
                tokio::time::sleep(work).await;
                let mut pooled = store.conn().await.map_err(retry)?;
                jobs::record_probe(&mut pooled.conn(), id(job.id), crate::store::now())
                    .await
                    .map_err(retry)
            }
        })
}

/// A store that failed may answer next time.
fn retry(error: StoreError) -> Failure {
    Failure::Retry(error.to_string())
}

fn id(job: u64) -> i64 {
    i64::try_from(job).unwrap_or(i64::MAX)
}

async fn upkeep(store: &Store, settings: &Settings, job: Job<Tick>) -> Result<(), StoreError> {
    let Tick { tick, epoch } = job.payload;
    let mut pooled = store.conn().await?;
    let mut conn = pooled.conn();
    let now = crate::store::now();
    let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    let claim = jobs::claim_tick(&mut conn, UPKEEP_JOB, tick, id(job.id), epoch, now).await?;
    if claim == jobs::TickClaim::Doubled {
        tracing::warn!(
            tick,
            job = job.id,
            "upkeep: this tick already ran under another job"
        );
        return Ok(());
    }
    let sessions = tokens::purge_expired_sessions(&mut conn, now).await?;
    let window = TimeDelta::days(i64::from(settings.device_accounts_days));
    let registrations = blocks::purge_registrations(&mut conn, now - window).await?;
    let plays = match settings.play_history_days {
        0 => 0,
        days => plays::purge_before(&mut conn, now - TimeDelta::days(i64::from(days))).await?,
    };
    let records = jobs::purge_runs(&mut conn, now - KEEP_RECORDS).await?
        + jobs::purge_probes(&mut conn, now - KEEP_RECORDS).await?
        + ingests::purge_before(&mut conn, now - KEEP_INGESTS).await?
        + artwork::purge_waiters(&mut conn, now - KEEP_WAITERS).await?;
    let removed = sessions + registrations + plays + records;
    jobs::finish_tick(
        &mut conn,
        UPKEEP_JOB,
        tick,
        i64::try_from(removed).unwrap_or(i64::MAX),
    )
    .await?;
    tracing::info!(tick, sessions, registrations, plays, records, "upkeep done");
    Ok(())
}
