//! Artists and tracks: the catalog that queue entries are hydrated from.

use std::collections::{BTreeSet, HashMap};

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use super::schema::{artists, artwork, tracks};
use super::{Conn, StoreError, run};
use crate::domain::{TrackId, UserId};

/// A track as clients see it, with its artist's name joined in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackView {
    pub id: String,
    pub title: String,
    pub artist: String,
    pub album: Option<String>,
    pub duration_ms: Option<i64>,
    pub image_url: Option<String>,
    /// The track's rendered artwork (reported by players through `POST /ingest/plays`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artwork: Option<crate::artwork::ArtworkView>,
}

/// A track to upsert, already validated.
#[derive(Debug, Clone)]
pub struct TrackInput {
    pub id: TrackId,
    pub title: String,
    pub artist: String,
    pub album: Option<String>,
    pub duration_ms: Option<i64>,
    pub image_url: Option<String>,
}

#[derive(Insertable)]
#[diesel(table_name = artists)]
struct NewArtist<'a> {
    name: &'a str,
}

#[derive(Insertable)]
#[diesel(table_name = tracks, treat_none_as_default_value = false)]
struct NewTrack<'a> {
    id: &'a str,
    title: &'a str,
    artist_id: i64,
    album: Option<&'a str>,
    duration_ms: Option<i64>,
    image_url: Option<&'a str>,
    updated_at: NaiveDateTime,
    created_by: Option<i64>,
}

/// The tracks of `ids` that exist and were not created by `author` (`None`: the operator),
/// with who created them.
pub async fn not_created_by(
    conn: &mut Conn<'_>,
    ids: &[&str],
    author: Option<UserId>,
) -> Result<Vec<String>, StoreError> {
    let owners: Vec<(String, Option<i64>)> = run!(conn, c => tracks::table
        .filter(tracks::id.eq_any(ids))
        .select((tracks::id, tracks::created_by))
        .load(c)
        .await)?;
    let author = author.map(|a| a.0);
    Ok(owners
        .into_iter()
        .filter(|(_, owner)| *owner != author)
        .map(|(id, _)| id)
        .collect())
}

/// Inserts or updates `batch`: artists are created by name as needed, tracks are replaced by
/// id; new tracks record `author` (`None`: the operator) as their creator, which an update
/// keeps. Run it inside a transaction so a failure leaves no half-written batch; callers
/// check with [`not_created_by`] first that `author` may replace the existing ones.
pub async fn upsert_tracks(
    conn: &mut Conn<'_>,
    batch: &[TrackInput],
    author: Option<UserId>,
    now: NaiveDateTime,
) -> Result<usize, StoreError> {
    let names: Vec<&str> = batch
        .iter()
        .map(|t| t.artist.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let new_artists: Vec<NewArtist<'_>> = names.iter().map(|name| NewArtist { name }).collect();
    // SQLite cannot combine a multi-row insert with ON CONFLICT in Diesel; inside the caller's
    // transaction, row-by-row costs it little. PostgreSQL gets one statement.
    match conn {
        Conn::Postgres(c) => {
            diesel::insert_into(artists::table)
                .values(&new_artists)
                .on_conflict(artists::name)
                .do_nothing()
                .execute(&mut **c)
                .await?;
        }
        Conn::Sqlite(c) => {
            for artist in &new_artists {
                diesel::insert_into(artists::table)
                    .values(artist)
                    .on_conflict(artists::name)
                    .do_nothing()
                    .execute(&mut **c)
                    .await?;
            }
        }
    }
    let ids: HashMap<String, i64> = run!(conn, c => artists::table
        .filter(artists::name.eq_any(&names))
        .select((artists::name, artists::id))
        .load::<(String, i64)>(c)
        .await)?
    .into_iter()
    .collect();

    let mut rows = Vec::with_capacity(batch.len());
    for track in batch {
        let artist_id = *ids.get(&track.artist).ok_or_else(|| {
            StoreError::Corrupt(format!("artist {:?} vanished during upsert", track.artist))
        })?;
        rows.push(NewTrack {
            id: track.id.as_str(),
            title: &track.title,
            artist_id,
            album: track.album.as_deref(),
            duration_ms: track.duration_ms,
            image_url: track.image_url.as_deref(),
            updated_at: now,
            created_by: author.map(|a| a.0),
        });
    }
    let changes = (
        tracks::title.eq(excluded(tracks::title)),
        tracks::artist_id.eq(excluded(tracks::artist_id)),
        tracks::album.eq(excluded(tracks::album)),
        tracks::duration_ms.eq(excluded(tracks::duration_ms)),
        tracks::image_url.eq(excluded(tracks::image_url)),
        tracks::updated_at.eq(excluded(tracks::updated_at)),
    );
    match conn {
        Conn::Postgres(c) => Ok(diesel::insert_into(tracks::table)
            .values(&rows)
            .on_conflict(tracks::id)
            .do_update()
            .set(changes)
            .execute(&mut **c)
            .await?),
        Conn::Sqlite(c) => {
            let mut written = 0;
            for row in &rows {
                written += diesel::insert_into(tracks::table)
                    .values(row)
                    .on_conflict(tracks::id)
                    .do_update()
                    .set(changes)
                    .execute(&mut **c)
                    .await?;
            }
            Ok(written)
        }
    }
}

type TrackRow = (
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<ArtworkRow>,
);

type ArtworkRow = (String, i64, i32, i32, String);

/// What a [`TrackRow`] is read from (tracks joined with their artists and, when there is
/// one, their artwork's row).
macro_rules! track_columns {
    () => {
        (
            tracks::id,
            tracks::title,
            artists::name,
            tracks::album,
            tracks::duration_ms,
            tracks::image_url,
            (
                artwork::hash,
                artwork::source_bytes,
                artwork::source_width,
                artwork::source_height,
                artwork::renditions,
            )
                .nullable(),
        )
    };
}

fn view((id, title, artist, album, duration_ms, image_url, art): TrackRow) -> TrackView {
    let artwork = art.and_then(|row| match super::artwork::record(row) {
        Ok(record) => Some(crate::artwork::ArtworkView::of(&record)),
        Err(error) => {
            tracing::warn!(%error, "artwork row unreadable; the track is shown without it");
            None
        }
    });
    TrackView {
        id,
        title,
        artist,
        album,
        duration_ms,
        image_url,
        artwork,
    }
}

/// The tracks among `ids` that exist, in no particular order.
pub async fn find_tracks(conn: &mut Conn<'_>, ids: &[&str]) -> Result<Vec<TrackView>, StoreError> {
    let rows: Vec<TrackRow> = run!(conn, c => tracks::table
        .inner_join(artists::table)
        .left_join(artwork::table)
        .filter(tracks::id.eq_any(ids))
        .select(track_columns!())
        .load(c)
        .await)?;
    Ok(rows.into_iter().map(view).collect())
}

diesel::define_sql_function! {
    /// SQL `lower`, on both backends.
    fn lower(text: diesel::sql_types::Text) -> diesel::sql_types::Text;
}

/// Longest search text accepted.
pub const MAX_QUERY_CHARS: usize = 100;

/// Tracks whose title, artist or album contains `query` (case-insensitive; every track when
/// `None`), ordered by artist then title, at most `limit`.
pub async fn search(
    conn: &mut Conn<'_>,
    query: Option<&str>,
    limit: i64,
) -> Result<Vec<TrackView>, StoreError> {
    // `%` and `_` in the query match themselves.
    let pattern = query.map(|q| {
        let escaped = q
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let rows: Vec<TrackRow> = run!(conn, c => {
        let mut select = tracks::table
            .inner_join(artists::table)
            .left_join(artwork::table)
            .select(track_columns!())
            .order((artists::name, tracks::title, tracks::id))
            .limit(limit)
            .into_boxed();
        if let Some(pattern) = &pattern {
            select = select.filter(
                lower(tracks::title)
                    .like(pattern.clone())
                    .escape('\\')
                    .or(lower(artists::name).like(pattern.clone()).escape('\\'))
                    .or(lower(tracks::album.assume_not_null()).like(pattern.clone()).escape('\\')),
            );
        }
        select.load(c).await
    })?;
    Ok(rows.into_iter().map(view).collect())
}

/// A track as a player reported it, already normalised (`crate::ingest::normalise`).
#[derive(Debug, Clone)]
pub struct Reported<'a> {
    pub isrc: Option<&'a str>,
    /// Artist, title and album, folded for matching.
    pub match_key: &'a str,
    pub title: &'a str,
    pub artist: &'a str,
    pub album: Option<&'a str>,
}

impl Reported<'_> {
    /// The id a new track gets, from its match key: deterministic, so two workers creating
    /// the same track at once create one.
    pub fn new_id(&self) -> String {
        format!(
            "np:{}",
            &crate::auth::sha256_hex(self.match_key.as_bytes())[..24]
        )
    }
}

/// The catalog track `user`'s report is about: by an ISRC the catalog confirmed, else by one
/// this account reported before, else by match key, else a new track (created by the
/// operator, so no account can replace it, and holding only what the match key says: the
/// ISRC and length a report gives are that account's until another agrees, see
/// [`super::reports`]). Returns its id.
pub async fn find_or_create_reported(
    conn: &mut Conn<'_>,
    reported: &Reported<'_>,
    user: UserId,
    now: NaiveDateTime,
) -> Result<String, StoreError> {
    if let Some(isrc) = reported.isrc {
        let found: Option<String> = run!(conn, c => tracks::table
            .filter(tracks::isrc.eq(isrc))
            .select(tracks::id)
            .first(c)
            .await
            .optional())?;
        if let Some(id) = found {
            return Ok(id);
        }
        if let Some(id) = super::reports::own_track_by_isrc(conn, user, isrc).await? {
            return Ok(id);
        }
    }
    let by_key: Option<String> = run!(conn, c => tracks::table
        .filter(tracks::match_key.eq(reported.match_key))
        .select(tracks::id)
        .first(c)
        .await
        .optional())?;
    if let Some(id) = by_key {
        return Ok(id);
    }
    run!(conn, c => diesel::insert_into(artists::table)
        .values(artists::name.eq(reported.artist))
        .on_conflict_do_nothing()
        .execute(c)
        .await)?;
    let artist_id: i64 = run!(conn, c => artists::table
        .filter(artists::name.eq(reported.artist))
        .select(artists::id)
        .first(c)
        .await)?;
    let id = reported.new_id();
    let row = (
        tracks::id.eq(&id),
        tracks::title.eq(reported.title),
        tracks::artist_id.eq(artist_id),
        tracks::album.eq(reported.album),
        tracks::updated_at.eq(now),
        tracks::match_key.eq(reported.match_key),
    );
    run!(conn, c => diesel::insert_into(tracks::table)
        .values(row)
        .on_conflict_do_nothing()
        .execute(c)
        .await)?;
    // A concurrent report may have created it meanwhile: the match key finds it either way.
    Ok(run!(conn, c => tracks::table
        .filter(tracks::match_key.eq(reported.match_key))
        .select(tracks::id)
        .first(c)
        .await)?)
}

/// Whether `id` is of the form the hub gives tracks it creates from reports (which no
/// account may take).
pub fn is_reported_id(id: &str) -> bool {
    id.starts_with("isrc:") || id.starts_with("np:")
}
