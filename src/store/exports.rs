//! `exports`: a listener's exports (`POST /exports`), and the pages of their data the export
//! job streams from the store.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{artists, devices, exports, play_history as ph, tracks};
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// An export's row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Export {
    pub id: String,
    pub user_id: i64,
    pub kind: String,
    pub status: String,
    pub rows: i64,
    pub bytes: i64,
    pub object_key: Option<String>,
    pub error: Option<String>,
    pub created_at: NaiveDateTime,
    pub finished_at: Option<NaiveDateTime>,
    pub expires_at: Option<NaiveDateTime>,
}

const COLUMNS: (
    exports::id,
    exports::user_id,
    exports::kind,
    exports::status,
    exports::rows_written,
    exports::bytes_written,
    exports::object_key,
    exports::error,
    exports::created_at,
    exports::finished_at,
    exports::expires_at,
) = (
    exports::id,
    exports::user_id,
    exports::kind,
    exports::status,
    exports::rows_written,
    exports::bytes_written,
    exports::object_key,
    exports::error,
    exports::created_at,
    exports::finished_at,
    exports::expires_at,
);

/// Records a new pending export; a unique violation means one of its kind is in flight.
pub async fn create(
    conn: &mut Conn<'_>,
    id: &str,
    user: UserId,
    kind: &str,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::insert_into(exports::table)
        .values((
            exports::id.eq(id),
            exports::user_id.eq(user.0),
            exports::kind.eq(kind),
            exports::status.eq("pending"),
            exports::created_at.eq(now),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// The export `id`, if it is `user`'s.
pub async fn find(
    conn: &mut Conn<'_>,
    user: UserId,
    id: &str,
) -> Result<Option<Export>, StoreError> {
    Ok(run!(conn, c => exports::table
        .filter(exports::id.eq(id))
        .filter(exports::user_id.eq(user.0))
        .select(COLUMNS)
        .first(c)
        .await
        .optional())?)
}

/// The export `id`, whoever's it is (the job's view).
pub async fn by_id(conn: &mut Conn<'_>, id: &str) -> Result<Option<Export>, StoreError> {
    Ok(run!(conn, c => exports::table
        .find(id)
        .select(COLUMNS)
        .first(c)
        .await
        .optional())?)
}

/// The user's exports, newest first.
pub async fn list(conn: &mut Conn<'_>, user: UserId) -> Result<Vec<Export>, StoreError> {
    Ok(run!(conn, c => exports::table
        .filter(exports::user_id.eq(user.0))
        .order((exports::created_at.desc(), exports::id.desc()))
        .select(COLUMNS)
        .load(c)
        .await)?)
}

/// Marks the export running (unless it finished already: a replayed job does nothing).
pub async fn start(conn: &mut Conn<'_>, id: &str) -> Result<bool, StoreError> {
    let changed = run!(conn, c => diesel::update(
        exports::table
            .filter(exports::id.eq(id))
            .filter(exports::status.eq_any(["pending", "running"])),
    )
    .set(exports::status.eq("running"))
    .execute(c)
    .await)?;
    Ok(changed > 0)
}

/// Marks the export done: `rows` rows, `bytes` bytes under `key`, downloadable until
/// `expires_at`.
pub async fn finish(
    conn: &mut Conn<'_>,
    id: &str,
    rows: i64,
    bytes: i64,
    key: &str,
    now: NaiveDateTime,
    expires_at: NaiveDateTime,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::update(exports::table.find(id))
        .set((
            exports::status.eq("done"),
            exports::rows_written.eq(rows),
            exports::bytes_written.eq(bytes),
            exports::object_key.eq(key),
            exports::finished_at.eq(now),
            exports::expires_at.eq(expires_at),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// Marks the export failed (its job gave up), kept until `expires_at` to be seen.
pub async fn fail(
    conn: &mut Conn<'_>,
    id: &str,
    why: &str,
    now: NaiveDateTime,
    expires_at: NaiveDateTime,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::update(exports::table.find(id))
        .set((
            exports::status.eq("failed"),
            exports::error.eq(why),
            exports::finished_at.eq(now),
            exports::expires_at.eq(expires_at),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// Exports that expired before `now`, at most `limit`.
pub async fn expired(
    conn: &mut Conn<'_>,
    now: NaiveDateTime,
    limit: i64,
) -> Result<Vec<Export>, StoreError> {
    Ok(run!(conn, c => exports::table
        .filter(exports::expires_at.lt(now))
        .order(exports::expires_at)
        .limit(limit)
        .select(COLUMNS)
        .load(c)
        .await)?)
}

pub async fn delete(conn: &mut Conn<'_>, id: &str) -> Result<(), StoreError> {
    run!(conn, c => diesel::delete(exports::table.find(id)).execute(c).await)?;
    Ok(())
}

/// One play as an export shows it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct ExportedPlay {
    #[serde(skip)]
    pub id: i64,
    pub played_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub listened_ms: Option<i64>,
    pub track_id: String,
    pub title: Option<String>,
    pub artist: Option<String>,
    pub album: Option<String>,
    pub device_id: Option<String>,
    pub device_name: Option<String>,
}

/// The user's plays after play `after` (by id, oldest first), at most `limit`: one page of
/// an export, read by key, so a page costs the same however deep into the history it is.
pub async fn plays_page(
    conn: &mut Conn<'_>,
    user: UserId,
    after: i64,
    limit: i64,
) -> Result<Vec<ExportedPlay>, StoreError> {
    Ok(run!(conn, c => ph::table
        .left_join(tracks::table.on(tracks::id.eq(ph::track_id)))
        .left_join(artists::table.on(artists::id.eq(tracks::artist_id)))
        .left_join(
            devices::table.on(devices::user_id
                .eq(ph::user_id)
                .and(devices::device_id.nullable().eq(ph::device_id))),
        )
        .filter(ph::user_id.eq(user.0))
        .filter(ph::id.gt(after))
        .order(ph::id)
        .limit(limit)
        .select((
            ph::id,
            ph::played_at,
            ph::started_at,
            ph::listened_ms,
            ph::track_id,
            tracks::title.nullable(),
            artists::name.nullable(),
            tracks::album.nullable(),
            ph::device_id,
            devices::name.nullable(),
        ))
        .load(c)
        .await)?)
}
