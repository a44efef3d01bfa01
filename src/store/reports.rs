//! `track_reports`: what each account reported of a catalog track (its ISRC, its length, the
//! cover it sent once rendered). A report is its own account's: that account sees it, nobody
//! else does, until a second account reports the same thing. Then the catalog takes it where
//! it has nothing, and replaces what it has only when more accounts report the new value than
//! the old one. So one account (or one hostile player) cannot re-time, re-cover or re-number
//! a track for others, and a few accounts that did are outvoted by the listeners who come
//! after them. Each vote is one indexed count of the value at hand.

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

/// What one report says of the track it is about.
#[derive(Debug, Clone, Copy, Default)]
pub struct Said<'a> {
    pub isrc: Option<&'a str>,
    pub duration_ms: Option<i64>,
    /// The cover it sent, once rendered.
    pub artwork: Option<&'a str>,
}

impl<'a> Said<'a> {
    /// Only a rendered cover.
    pub fn cover(hash: &'a str) -> Self {
        Self {
            artwork: Some(hash),
            ..Self::default()
        }
    }
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

/// Gives `track_id` what `said` says where enough accounts agree: where the catalog has
/// nothing, once [`CORROBORATED_BY`] accounts reported the value; where it has something
/// else, once more accounts reported the value than the catalog's (an ISRC only if no other
/// track has it). True when the track changed.
pub async fn corroborate(
    conn: &mut Conn<'_>,
    track_id: &str,
    said: Said<'_>,
) -> Result<bool, StoreError> {
    let current: Option<(Option<String>, Option<i64>, Option<String>)> = run!(conn, c => tracks::table
        .find(track_id)
        .select((tracks::isrc, tracks::duration_ms, tracks::artwork_hash))
        .first(c)
        .await
        .optional())?;
    let Some((isrc, duration_ms, artwork_hash)) = current else {
        return Ok(false);
    };
    let mut changed = false;
    if let Some(value) = said.isrc
        && isrc.as_deref() != Some(value)
        && outvotes(
            conn,
            track_id,
            Field::Isrc(value),
            isrc.as_deref().map(Field::Isrc),
        )
        .await?
    {
        let taken: i64 = run!(conn, c => tracks::table
            .filter(tracks::isrc.eq(value))
            .count()
            .get_result(c)
            .await)?;
        if taken == 0 {
            changed |= run!(conn, c => diesel::update(tracks::table.find(track_id))
                .set(tracks::isrc.eq(value))
                .execute(c)
                .await)?
                > 0;
        }
    }
    if let Some(value) = said.duration_ms
        && duration_ms.is_none_or(|d| (d - value).abs() > SAME_LENGTH_MS)
        && outvotes(
            conn,
            track_id,
            Field::Length(value),
            duration_ms.map(Field::Length),
        )
        .await?
    {
        changed |= run!(conn, c => diesel::update(tracks::table.find(track_id))
            .set(tracks::duration_ms.eq(value))
            .execute(c)
            .await)?
            > 0;
    }
    if let Some(value) = said.artwork
        && artwork_hash.as_deref() != Some(value)
        && outvotes(
            conn,
            track_id,
            Field::Artwork(value),
            artwork_hash.as_deref().map(Field::Artwork),
        )
        .await?
    {
        changed |= run!(conn, c => diesel::update(tracks::table.find(track_id))
            .set(tracks::artwork_hash.eq(value))
            .execute(c)
            .await)?
            > 0;
    }
    Ok(changed)
}

/// One value of one field, as voted on.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Isrc(&'a str),
    /// Any length within [`SAME_LENGTH_MS`] is the same.
    Length(i64),
    Artwork(&'a str),
}

/// Whether `new` has the votes to replace `old` (`None`: nothing there yet).
async fn outvotes(
    conn: &mut Conn<'_>,
    track_id: &str,
    new: Field<'_>,
    old: Option<Field<'_>>,
) -> Result<bool, StoreError> {
    let for_new = votes(conn, track_id, new).await?;
    if for_new < CORROBORATED_BY as i64 {
        return Ok(false);
    }
    Ok(match old {
        None => true,
        Some(old) => for_new > votes(conn, track_id, old).await?,
    })
}

/// How many accounts reported `field` for `track_id` (one row per account).
async fn votes(conn: &mut Conn<'_>, track_id: &str, field: Field<'_>) -> Result<i64, StoreError> {
    let mine = reports::table.filter(reports::track_id.eq(track_id));
    Ok(match field {
        Field::Isrc(isrc) => run!(conn, c => mine
            .filter(reports::isrc.eq(isrc))
            .count()
            .get_result(c)
            .await)?,
        Field::Length(ms) => run!(conn, c => mine
            .filter(reports::duration_ms.between(ms - SAME_LENGTH_MS, ms + SAME_LENGTH_MS))
            .count()
            .get_result(c)
            .await)?,
        Field::Artwork(hash) => run!(conn, c => mine
            .filter(reports::artwork_hash.eq(hash))
            .count()
            .get_result(c)
            .await)?,
    })
}
