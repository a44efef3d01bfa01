//! `play_history`: one row per counted play (see [`crate::presence::plays`]).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::play_history as ph;
use super::{Conn, StoreError, run};
use crate::domain::UserId;
use crate::presence::plays::Counted;

/// A recorded play.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct Played {
    pub track_id: String,
    pub device_id: Option<String>,
    pub played_at: chrono::NaiveDateTime,
}

pub async fn record(
    conn: &mut Conn<'_>,
    user: UserId,
    play: &Counted,
    device_id: &str,
) -> Result<(), StoreError> {
    record_at(conn, user, play, device_id, super::now()).await
}

/// Records a play that counted at `now`.
pub async fn record_at(
    conn: &mut Conn<'_>,
    user: UserId,
    play: &Counted,
    device_id: &str,
    now: chrono::NaiveDateTime,
) -> Result<(), StoreError> {
    let started = chrono::DateTime::from_timestamp_millis(play.started_at).map(|t| t.naive_utc());
    run!(conn, c => diesel::insert_into(ph::table)
        .values((
            ph::user_id.eq(user.0),
            ph::track_id.eq(&play.track_id),
            ph::device_id.eq(device_id),
            ph::played_at.eq(now),
            ph::started_at.eq(started),
            ph::listened_ms.eq(play.listened_ms),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// The user's most recent plays, newest first.
pub async fn recent(
    conn: &mut Conn<'_>,
    user: UserId,
    limit: i64,
) -> Result<Vec<Played>, StoreError> {
    Ok(run!(conn, c => ph::table
        .filter(ph::user_id.eq(user.0))
        .select((ph::track_id, ph::device_id, ph::played_at))
        .order((ph::played_at.desc(), ph::id.desc()))
        .limit(limit)
        .load(c)
        .await)?)
}

/// Deletes plays from before `cutoff`; returns how many went.
pub async fn purge_before(
    conn: &mut Conn<'_>,
    cutoff: chrono::NaiveDateTime,
) -> Result<usize, StoreError> {
    Ok(
        run!(conn, c => diesel::delete(ph::table.filter(ph::played_at.lt(cutoff)))
        .execute(c)
        .await)?,
    )
}
