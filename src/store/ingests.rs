//! `ingests` (reports the enrichment job applied, by ingest id) and `ingest_plays` (each
//! reporting device's current play, for the once-per-play rules).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{ingest_plays as plays, ingests};
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// An applied report: which track it was about and whether it made a play count.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Applied {
    pub track_id: String,
    pub counted: bool,
}

/// The report `id`, if it was applied.
pub async fn applied(conn: &mut Conn<'_>, id: &str) -> Result<Option<Applied>, StoreError> {
    Ok(run!(conn, c => ingests::table
        .find(id)
        .select((ingests::track_id, ingests::counted))
        .first(c)
        .await
        .optional())?)
}

/// Records that report `id` was applied.
pub async fn mark_applied(
    conn: &mut Conn<'_>,
    id: &str,
    user: UserId,
    device_id: &str,
    applied: &Applied,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::insert_into(ingests::table)
        .values((
            ingests::id.eq(id),
            ingests::user_id.eq(user.0),
            ingests::device_id.eq(device_id),
            ingests::track_id.eq(&applied.track_id),
            ingests::counted.eq(applied.counted),
            ingests::applied_at.eq(now),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// A device's play state: when its newest applied report was made, and the tracker (JSON).
pub async fn tracker(
    conn: &mut Conn<'_>,
    user: UserId,
    device_id: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    Ok(run!(conn, c => plays::table
        .find((user.0, device_id))
        .select((plays::reported_at, plays::tracker))
        .first(c)
        .await
        .optional())?)
}

/// Replaces a device's play state; `ends_at` is when its current play would end unreported
/// (`None`: nothing playing).
pub async fn save_tracker(
    conn: &mut Conn<'_>,
    user: UserId,
    device_id: &str,
    reported_at: i64,
    tracker: &str,
    ends_at: Option<i64>,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::insert_into(plays::table)
        .values((
            plays::user_id.eq(user.0),
            plays::device_id.eq(device_id),
            plays::reported_at.eq(reported_at),
            plays::tracker.eq(tracker),
            plays::ends_at.eq(ends_at),
        ))
        .on_conflict((plays::user_id, plays::device_id))
        .do_update()
        .set((
            plays::reported_at.eq(reported_at),
            plays::tracker.eq(tracker),
            plays::ends_at.eq(ends_at),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// Devices whose current play would have ended unreported before `before_ms`, soonest
/// first, at most `limit` (an indexed range: plays not due yet are never looked at).
pub async fn silent(
    conn: &mut Conn<'_>,
    before_ms: i64,
    limit: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    Ok(run!(conn, c => plays::table
        .filter(plays::ends_at.lt(before_ms))
        .order(plays::ends_at)
        .limit(limit)
        .select((plays::user_id, plays::device_id))
        .load(c)
        .await)?)
}

/// Forgets applied reports from before `cutoff` (a job older than that cannot be replayed);
/// returns how many went.
pub async fn purge_before(conn: &mut Conn<'_>, cutoff: NaiveDateTime) -> Result<usize, StoreError> {
    Ok(
        run!(conn, c => diesel::delete(ingests::table.filter(ingests::applied_at.lt(cutoff)))
            .execute(c)
            .await)?,
    )
}
