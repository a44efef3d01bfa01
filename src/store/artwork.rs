//! `artwork` (one row per rendered image) and `artwork_waiters` (plays shown before their
//! artwork was ready).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};

use super::schema::{artwork, artwork_waiters as waiters};
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// One stored file of a rendition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// `webp` or `jpg`.
    pub format: String,
    pub key: String,
    pub bytes: u64,
}

/// One size of an artwork, in every format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSize {
    pub size: String,
    pub width: u32,
    pub height: u32,
    pub files: Vec<StoredFile>,
}

/// An artwork's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtworkRecord {
    pub hash: String,
    pub source_bytes: u64,
    pub source_width: u32,
    pub source_height: u32,
    pub sizes: Vec<StoredSize>,
}

/// A play waiting for its artwork.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Waiter {
    pub user: i64,
    pub device_id: String,
    pub track_id: String,
    /// When it started waiting (a newer wait of the same device replaces it).
    pub created_at: NaiveDateTime,
}

pub(super) type Row = (String, i64, i32, i32, String);

pub(super) fn record(
    (hash, source_bytes, width, height, renditions): Row,
) -> Result<ArtworkRecord, StoreError> {
    let sizes = serde_json::from_str(&renditions)
        .map_err(|e| StoreError::Corrupt(format!("artwork {hash}: renditions: {e}")))?;
    Ok(ArtworkRecord {
        source_bytes: u64::try_from(source_bytes).unwrap_or(0),
        source_width: u32::try_from(width).unwrap_or(0),
        source_height: u32::try_from(height).unwrap_or(0),
        hash,
        sizes,
    })
}

/// The artwork `hash`, when it was rendered.
pub async fn find(conn: &mut Conn<'_>, hash: &str) -> Result<Option<ArtworkRecord>, StoreError> {
    let row: Option<Row> = run!(conn, c => artwork::table
        .find(hash)
        .select((
            artwork::hash,
            artwork::source_bytes,
            artwork::source_width,
            artwork::source_height,
            artwork::renditions,
        ))
        .first(c)
        .await
        .optional())?;
    row.map(record).transpose()
}

/// Records a rendered artwork (replacing the row of an earlier rendering of the same bytes).
pub async fn save(
    conn: &mut Conn<'_>,
    art: &ArtworkRecord,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    let renditions = serde_json::to_string(&art.sizes)
        .map_err(|e| StoreError::Corrupt(format!("artwork {}: {e}", art.hash)))?;
    let values = (
        artwork::hash.eq(&art.hash),
        artwork::source_bytes.eq(i64::try_from(art.source_bytes).unwrap_or(i64::MAX)),
        artwork::source_width.eq(i32::try_from(art.source_width).unwrap_or(i32::MAX)),
        artwork::source_height.eq(i32::try_from(art.source_height).unwrap_or(i32::MAX)),
        artwork::renditions.eq(&renditions),
        artwork::created_at.eq(now),
    );
    run!(conn, c => diesel::insert_into(artwork::table)
        .values(values)
        .on_conflict(artwork::hash)
        .do_update()
        .set(artwork::renditions.eq(&renditions))
        .execute(c)
        .await)?;
    Ok(())
}

/// Notes that `device` of `user` shows `track_id` without artwork `hash` yet.
pub async fn wait_for(
    conn: &mut Conn<'_>,
    hash: &str,
    user: UserId,
    device_id: &str,
    track_id: &str,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    let values = (
        waiters::hash.eq(hash),
        waiters::user_id.eq(user.0),
        waiters::device_id.eq(device_id),
        waiters::track_id.eq(track_id),
        waiters::created_at.eq(now),
    );
    run!(conn, c => diesel::insert_into(waiters::table)
        .values(values)
        .on_conflict((waiters::hash, waiters::user_id, waiters::device_id))
        .do_update()
        .set((waiters::track_id.eq(track_id), waiters::created_at.eq(now)))
        .execute(c)
        .await)?;
    Ok(())
}

const WAITER: (
    waiters::user_id,
    waiters::device_id,
    waiters::track_id,
    waiters::created_at,
) = (
    waiters::user_id,
    waiters::device_id,
    waiters::track_id,
    waiters::created_at,
);

/// The plays waiting for artwork `hash` (left in place: each is forgotten once it was told,
/// so a failure on the way tells it next time).
pub async fn waiters(conn: &mut Conn<'_>, hash: &str) -> Result<Vec<Waiter>, StoreError> {
    Ok(run!(conn, c => waiters::table
        .filter(waiters::hash.eq(hash))
        .select(WAITER)
        .load(c)
        .await)?)
}

/// Forgets `waiter` of artwork `hash`, unless the device started waiting again since.
pub async fn forget_waiter(
    conn: &mut Conn<'_>,
    hash: &str,
    waiter: &Waiter,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::delete(
        waiters::table
            .filter(waiters::hash.eq(hash))
            .filter(waiters::user_id.eq(waiter.user))
            .filter(waiters::device_id.eq(&waiter.device_id))
            .filter(waiters::created_at.eq(waiter.created_at)),
    )
    .execute(c)
    .await)?;
    Ok(())
}

/// Takes the waiters of artwork `hash` — all of them (it will never render), or only
/// `user`'s `device_id` (which found it rendered itself).
pub async fn take_waiters(
    conn: &mut Conn<'_>,
    hash: &str,
    only: Option<(UserId, &str)>,
) -> Result<Vec<Waiter>, StoreError> {
    let columns = WAITER;
    Ok(run!(conn, c => {
        let mut delete = diesel::delete(waiters::table)
            .filter(waiters::hash.eq(hash))
            .into_boxed();
        if let Some((user, device)) = only {
            delete = delete
                .filter(waiters::user_id.eq(user.0))
                .filter(waiters::device_id.eq(device.to_owned()));
        }
        delete.returning(columns).get_results(c).await
    })?)
}

/// Deletes waiters older than `cutoff` (their artwork never came); returns how many went.
pub async fn purge_waiters(
    conn: &mut Conn<'_>,
    cutoff: NaiveDateTime,
) -> Result<usize, StoreError> {
    Ok(
        run!(conn, c => diesel::delete(waiters::table.filter(waiters::created_at.lt(cutoff)))
        .execute(c)
        .await)?,
    )
}
