//! `POST /tracks` (batch upsert) and `GET /tracks/{id}`: enough catalog for queues to be
//! hydrated in tests and demos.

use std::collections::HashSet;

use actix_web::{HttpResponse, web};
use scoped_futures::ScopedFutureExt;
use serde::Deserialize;
use serde_json::json;

use super::{AppState, AuthenticatedUser};
use crate::domain::{InvalidInput, TrackId, parse_text};
use crate::error::ApiError;
use crate::realtime::queue::Queues;
use crate::store::catalog::{self, TrackInput};
use crate::store::{self, StoreError};

/// Most tracks one `POST /tracks` may carry.
pub const MAX_TRACKS_PER_BATCH: usize = 1_000;

/// Longest accepted track (a day), as a bound against nonsense, not a judgement on art.
const MAX_DURATION_MS: i64 = 24 * 60 * 60 * 1000;

#[derive(Deserialize)]
pub struct TrackBatch {
    tracks: Vec<TrackBody>,
}

#[derive(Deserialize)]
struct TrackBody {
    id: String,
    title: String,
    artist: String,
    album: Option<String>,
    duration_ms: Option<i64>,
    image_url: Option<String>,
}

impl TrackBody {
    fn parse(self) -> Result<TrackInput, InvalidInput> {
        let duration_ok = self
            .duration_ms
            .is_none_or(|ms| (0..=MAX_DURATION_MS).contains(&ms));
        if !duration_ok {
            return Err(InvalidInput::new(
                "duration_ms",
                "must be between 0 and 86400000",
            ));
        }
        let image_url = self.image_url.map(|url| parse_url(&url)).transpose()?;
        Ok(TrackInput {
            id: TrackId::parse(&self.id)?,
            title: parse_text("title", &self.title, 1, 512)?,
            artist: parse_text("artist", &self.artist, 1, 256)?,
            album: self
                .album
                .map(|a| parse_text("album", &a, 1, 512))
                .transpose()?,
            duration_ms: self.duration_ms,
            image_url,
        })
    }
}

/// Accepts an absolute http(s) URL of sane length.
fn parse_url(raw: &str) -> Result<String, InvalidInput> {
    let url = parse_text("image_url", raw, 1, 2048)?;
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(url)
    } else {
        Err(InvalidInput::new(
            "image_url",
            "must be an http:// or https:// URL",
        ))
    }
}

/// `POST /tracks` → `{"upserted": n}`. The whole batch is validated before anything is
/// written, and written in one transaction.
pub async fn upsert_tracks(
    state: web::Data<AppState>,
    queues: web::Data<Queues>,
    caller: AuthenticatedUser,
    body: web::Json<TrackBatch>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body.tracks.is_empty() || body.tracks.len() > MAX_TRACKS_PER_BATCH {
        return Err(InvalidInput::new(
            "tracks",
            format!("must hold 1 to {MAX_TRACKS_PER_BATCH} tracks"),
        )
        .into());
    }
    let mut batch = Vec::with_capacity(body.tracks.len());
    let mut seen = HashSet::new();
    for (index, track) in body.tracks.into_iter().enumerate() {
        let track = track.parse().map_err(|e| {
            InvalidInput::new(
                "tracks",
                format!("track {index}: {}: {}", e.field, e.problem),
            )
        })?;
        if catalog::is_reported_id(track.id.as_str()) {
            return Err(InvalidInput::new(
                "tracks",
                format!(
                    "track {index}: ids starting with \"isrc:\" or \"np:\" are the hub's own \
                     (tracks players report)"
                ),
            )
            .into());
        }
        if !seen.insert(track.id.clone()) {
            return Err(InvalidInput::new(
                "tracks",
                format!(
                    "track {index}: id {:?} appears twice in the batch",
                    track.id.as_str()
                ),
            )
            .into());
        }
        batch.push(track);
    }
    let ids: Vec<String> = batch.iter().map(|t| t.id.as_str().to_owned()).collect();
    let author = caller.user_id;
    let mut pooled = state.store.conn().await?;
    let upserted = pooled
        .conn()
        .transaction(|conn| {
            async move {
                // Only the account that created a track may replace it (the operator's, such
                // as the demo catalog, are nobody's to change): others' queues show it.
                let id_list: Vec<&str> = batch.iter().map(|t| t.id.as_str()).collect();
                let theirs = catalog::not_created_by(conn, &id_list, Some(author)).await?;
                if let Some(index) = batch.iter().position(|t| theirs.iter().any(|id| id == t.id.as_str())) {
                    return Ok(Err(index));
                }
                catalog::upsert_tracks(conn, &batch, Some(author), store::now())
                    .await
                    .map(Ok)
            }
            .scope_boxed()
        })
        .await
        .map_err(|e: StoreError| ApiError::from(e))?
        .map_err(|index| {
            ApiError::client(
                actix_web::http::StatusCode::FORBIDDEN,
                "track_not_yours",
                format!("track {index}: a track with this id exists and was not created by this account; nothing was written."),
            )
        })?;
    // Hydration on this replica sees the new and changed tracks at once.
    queues.forget_tracks(&ids).await;
    Ok(HttpResponse::Ok().json(json!({ "upserted": upserted })))
}

/// `GET /tracks/{id}` → the track, or 404.
pub async fn get_track(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = TrackId::parse(&id)
        .map_err(|_| ApiError::not_found("track_not_found", "There is no such track."))?;
    let mut pooled = state.store.conn().await?;
    let found = catalog::find_tracks(&mut pooled.conn(), &[id.as_str()]).await?;
    let track = found
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found("track_not_found", "There is no such track."))?;
    Ok(HttpResponse::Ok().json(track))
}

#[derive(Deserialize)]
pub struct SearchQuery {
    q: Option<String>,
    limit: Option<i64>,
}

/// `GET /tracks?q=…&limit=…` → `{"tracks": [...]}`: tracks whose title, artist or album
/// contains `q` (case-insensitive; all tracks without `q`), by artist and title; `limit`
/// 1–200, default 50.
pub async fn search_tracks(
    state: web::Data<AppState>,
    _caller: AuthenticatedUser,
    query: web::Query<SearchQuery>,
) -> Result<HttpResponse, ApiError> {
    let SearchQuery { q, limit } = query.into_inner();
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(InvalidInput::new("limit", "must be 1 to 200").into());
    }
    let q = q.map(|q| q.trim().to_owned()).filter(|q| !q.is_empty());
    if let Some(q) = &q
        && (q.chars().count() > catalog::MAX_QUERY_CHARS || q.chars().any(char::is_control))
    {
        return Err(InvalidInput::new(
            "q",
            "must be at most 100 characters, without control characters",
        )
        .into());
    }
    let mut pooled = state.store.conn().await?;
    let tracks = catalog::search(&mut pooled.conn(), q.as_deref(), limit).await?;
    Ok(HttpResponse::Ok().json(json!({ "tracks": tracks })))
}
