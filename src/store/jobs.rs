//! What background jobs leave in the store: a record per tick of each periodic job
//! (`periodic_runs`), and the effect of probe jobs (`job_probes`). Both are keyed so that a
//! job run twice (at-least-once delivery) has its effect once.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{job_probes, periodic_runs};
use super::{Conn, StoreError, run};

/// What a periodic job's run finds for its tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickClaim {
    /// The tick's first run: do the work.
    First,
    /// A run of the same job again (a redelivery): the work is idempotent, do it again.
    Again,
    /// Another job already ran this tick (it was enqueued twice): counted, and skipped.
    Doubled,
}

/// One periodic run as listed.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct PeriodicRun {
    pub job: String,
    pub tick: i64,
    pub job_id: i64,
    pub epoch: i64,
    pub ran_at: NaiveDateTime,
    pub removed: i64,
    pub doubled: i32,
}

/// Claims `tick` of `job` for job `job_id` (see [`TickClaim`]).
pub async fn claim_tick(
    conn: &mut Conn<'_>,
    job: &str,
    tick: i64,
    job_id: i64,
    epoch: i64,
    now: NaiveDateTime,
) -> Result<TickClaim, StoreError> {
    let inserted = run!(conn, c => diesel::insert_into(periodic_runs::table)
        .values((
            periodic_runs::job.eq(job),
            periodic_runs::tick.eq(tick),
            periodic_runs::job_id.eq(job_id),
            periodic_runs::epoch.eq(epoch),
            periodic_runs::ran_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c)
        .await)?;
    if inserted == 1 {
        return Ok(TickClaim::First);
    }
    let owner: i64 = run!(conn, c => periodic_runs::table
        .find((job, tick))
        .select(periodic_runs::job_id)
        .first(c)
        .await)?;
    if owner == job_id {
        return Ok(TickClaim::Again);
    }
    run!(conn, c => diesel::update(periodic_runs::table.find((job, tick)))
        .set(periodic_runs::doubled.eq(periodic_runs::doubled + 1))
        .execute(c)
        .await)?;
    Ok(TickClaim::Doubled)
}

/// Records what `tick` of `job` removed.
pub async fn finish_tick(
    conn: &mut Conn<'_>,
    job: &str,
    tick: i64,
    removed: i64,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::update(periodic_runs::table.find((job, tick)))
        .set(periodic_runs::removed.eq(removed))
        .execute(c)
        .await)?;
    Ok(())
}

/// The latest `limit` runs of `job`, newest first.
pub async fn recent_runs(
    conn: &mut Conn<'_>,
    job: &str,
    limit: i64,
) -> Result<Vec<PeriodicRun>, StoreError> {
    Ok(run!(conn, c => periodic_runs::table
        .filter(periodic_runs::job.eq(job))
        .order(periodic_runs::tick.desc())
        .limit(limit)
        .load(c)
        .await)?)
}

/// Forgets runs of every periodic job before `cutoff`.
pub async fn purge_runs(conn: &mut Conn<'_>, cutoff: NaiveDateTime) -> Result<usize, StoreError> {
    Ok(
        run!(conn, c => diesel::delete(periodic_runs::table.filter(periodic_runs::ran_at.lt(cutoff)))
        .execute(c)
        .await)?,
    )
}

/// A probe job's effect: its row, with one more completed run.
pub async fn record_probe(
    conn: &mut Conn<'_>,
    job_id: i64,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::insert_into(job_probes::table)
        .values((
            job_probes::job_id.eq(job_id),
            job_probes::runs.eq(1),
            job_probes::finished_at.eq(now),
        ))
        .on_conflict(job_probes::job_id)
        .do_update()
        .set((
            job_probes::runs.eq(job_probes::runs + 1),
            job_probes::finished_at.eq(now),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// Probe effects: job id → completed runs, for the ids asked.
pub async fn probe_runs(conn: &mut Conn<'_>, ids: &[i64]) -> Result<Vec<(i64, i32)>, StoreError> {
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let rows: Vec<(i64, i32)> = run!(conn, c => job_probes::table
            .filter(job_probes::job_id.eq_any(chunk))
            .select((job_probes::job_id, job_probes::runs))
            .load(c)
            .await)?;
        found.extend(rows);
    }
    Ok(found)
}

/// Forgets probe effects older than `cutoff`.
pub async fn purge_probes(conn: &mut Conn<'_>, cutoff: NaiveDateTime) -> Result<usize, StoreError> {
    Ok(
        run!(conn, c => diesel::delete(job_probes::table.filter(job_probes::finished_at.lt(cutoff)))
        .execute(c)
        .await)?,
    )
}
