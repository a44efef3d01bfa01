//! `track_reports`: what each account reported of a catalog track (its ISRC, its length, the
//! cover it sent once rendered). A report is its own account's: that account sees it, nobody
//! else does, until a second account reports the same thing. Then the catalog takes it, if
//! the catalog has nothing there yet; what the catalog has is never replaced by a report. So
//! one account (or one hostile player) cannot rename, re-time or re-cover a track for others.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::artwork::ArtworkRecord;
use super::schema::{track_reports as reports, tracks};
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// Distinct accounts that must report the same value before the catalog takes it.
pub const CORROBORATED_BY: usize = 2;

/// Two reported lengths this close are the same length.
const SAME_LENGTH_MS: i64 = 2_000;

/// Reports of a track looked at when corroborating a length (the newest ones).
const LENGTHS_LOOKED_AT: i64 = 50;

/// What one report says of the track it is about.
#[derive(Debug, Clone, Copy)]
pub struct Said<'a> {
    pub isrc: Option<&'a str>,
    pub duration_ms: Option<i64>,
}

/// Records what `user` reported of `track_id` (their newest report wins; the cover they
/// sent is kept until another renders).
pub async fn record(
    conn: &mut Conn<'_>,
    track_id: &str,
    user: UserId,
    said: Said<'_>,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    let values = (
        reports::track_id.eq(track_id),
        reports::user_id.eq(user.0),
        reports::isrc.eq(said.isrc),
        reports::duration_ms.eq(said.duration_ms),
        reports::updated_at.eq(now),
    );
    let changes = (
        reports::isrc.eq(said.isrc),
        reports::duration_ms.eq(said.duration_ms),
        reports::updated_at.eq(now),
    );
    run!(conn, c => diesel::insert_into(reports::table)
        .values(values)
        .on_conflict((reports::track_id, reports::user_id))
        .do_update()
        .set(changes)
        .execute(c)
        .await)?;
    Ok(())
}

/// The track `user` reported with `isrc` most lately, if any (an account's own ISRC finds its
/// own track before anyone agrees with it).
pub async fn own_track_by_isrc(
    conn: &mut Conn<'_>,
    user: UserId,
    isrc: &str,
) -> Result<Option<String>, StoreError> {
    Ok(run!(conn, c => reports::table
        .filter(reports::user_id.eq(user.0))
        .filter(reports::isrc.eq(isrc))
        .order(reports::updated_at.desc())
        .select(reports::track_id)
        .first(c)
        .await
        .optional())?)
}

/// Notes that the cover `user` sent for `track_id` rendered as artwork `hash`.
pub async fn set_artwork(
    conn: &mut Conn<'_>,
    track_id: &str,
    user: UserId,
    hash: &str,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    let values = (
        reports::track_id.eq(track_id),
        reports::user_id.eq(user.0),
        reports::artwork_hash.eq(hash),
        reports::updated_at.eq(now),
    );
    run!(conn, c => diesel::insert_into(reports::table)
        .values(values)
        .on_conflict((reports::track_id, reports::user_id))
        .do_update()
        .set(reports::artwork_hash.eq(hash))
        .execute(c)
        .await)?;
    Ok(())
}

/// The artwork `user` sent for `track_id`, once it rendered.
pub async fn own_artwork(
    conn: &mut Conn<'_>,
    track_id: &str,
    user: UserId,
) -> Result<Option<ArtworkRecord>, StoreError> {
    let hash: Option<Option<String>> = run!(conn, c => reports::table
        .find((track_id, user.0))
        .select(reports::artwork_hash)
        .first(c)
        .await
        .optional())?;
    match hash.flatten() {
        Some(hash) => super::artwork::find(conn, &hash).await,
        None => Ok(None),
    }
}

/// Gives `track_id` whatever two accounts agree on and the catalog lacks: an ISRC (unless
/// another track has it), a length, artwork. True when the track changed.
pub async fn corroborate(conn: &mut Conn<'_>, track_id: &str) -> Result<bool, StoreError> {
    let current: Option<(Option<String>, Option<i64>, Option<String>)> = run!(conn, c => tracks::table
        .find(track_id)
        .select((tracks::isrc, tracks::duration_ms, tracks::artwork_hash))
        .first(c)
        .await
        .optional())?;
    let Some((isrc, duration_ms, artwork_hash)) = current else {
        return Ok(false);
    };
    if isrc.is_some() && duration_ms.is_some() && artwork_hash.is_some() {
        return Ok(false);
    }
    // One row per account, so counting rows counts accounts.
    let said: Vec<(Option<String>, Option<String>)> = run!(conn, c => reports::table
        .filter(reports::track_id.eq(track_id))
        .select((reports::isrc, reports::artwork_hash))
        .load(c)
        .await)?;
    let mut changed = false;
    if isrc.is_none()
        && let Some(agreed) = agreed_on(said.iter().filter_map(|(isrc, _)| isrc.as_deref()))
    {
        let taken: i64 = run!(conn, c => tracks::table
            .filter(tracks::isrc.eq(agreed))
            .count()
            .get_result(c)
            .await)?;
        if taken == 0 {
            changed |= run!(conn, c => diesel::update(tracks::table.find(track_id))
                .filter(tracks::isrc.is_null())
                .set(tracks::isrc.eq(agreed))
                .execute(c)
                .await)?
                > 0;
        }
    }
    if duration_ms.is_none()
        && let Some(agreed) = agreed_length(conn, track_id).await?
    {
        changed |= run!(conn, c => diesel::update(tracks::table.find(track_id))
            .filter(tracks::duration_ms.is_null())
            .set(tracks::duration_ms.eq(agreed))
            .execute(c)
            .await)?
            > 0;
    }
    if artwork_hash.is_none()
        && let Some(agreed) = agreed_on(said.iter().filter_map(|(_, hash)| hash.as_deref()))
    {
        changed |= run!(conn, c => diesel::update(tracks::table.find(track_id))
            .filter(tracks::artwork_hash.is_null())
            .set(tracks::artwork_hash.eq(agreed))
            .execute(c)
            .await)?
            > 0;
    }
    Ok(changed)
}

/// The value said most often, if at least [`CORROBORATED_BY`] said it.
fn agreed_on<'a>(said: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for value in said {
        match counts.iter_mut().find(|(v, _)| *v == value) {
            Some((_, n)) => *n += 1,
            None => counts.push((value, 1)),
        }
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n >= CORROBORATED_BY)
        .max_by_key(|(_, n)| *n)
        .map(|(value, _)| value)
}

/// A length two accounts agree on (within [`SAME_LENGTH_MS`]): the smaller of the closest pair.
async fn agreed_length(conn: &mut Conn<'_>, track_id: &str) -> Result<Option<i64>, StoreError> {
    let mut lengths: Vec<Option<i64>> = run!(conn, c => reports::table
        .filter(reports::track_id.eq(track_id))
        .filter(reports::duration_ms.is_not_null())
        .order(reports::updated_at.desc())
        .limit(LENGTHS_LOOKED_AT)
        .select(reports::duration_ms)
        .load(c)
        .await)?;
    lengths.sort_unstable();
    let lengths: Vec<i64> = lengths.into_iter().flatten().collect();
    Ok(lengths
        .iter()
        .zip(lengths.iter().skip(1))
        .filter(|(a, b)| **b - **a <= SAME_LENGTH_MS)
        .min_by_key(|(a, b)| **b - **a)
        .map(|(a, _)| *a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_agreed_on_once_two_accounts_say_it() {
        assert_eq!(agreed_on(["a"].into_iter()), None);
        assert_eq!(agreed_on(["a", "b"].into_iter()), None);
        assert_eq!(agreed_on(["a", "b", "b"].into_iter()), Some("b"));
        assert_eq!(agreed_on(["a", "b", "a", "a", "b"].into_iter()), Some("a"));
    }
}
