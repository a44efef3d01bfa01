//! `GET/PUT /queue/` (wire-compatible with plyr.fm), `POST /queue/ops`, and
//! `GET/PATCH /preferences/`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AppState, AuthenticatedUser};
use crate::domain::queue::{QueueOp, QueueState};
use crate::error::ApiError;
use crate::realtime::Realtime;
use crate::realtime::events::UserEvent;
use crate::realtime::hub::Publish;
use crate::realtime::queue::{QueueError, QueueView, Queues};
use crate::store::preferences::{self, Preferences};

#[derive(Deserialize)]
pub struct PutQueue {
    state: QueueState,
}

#[derive(Deserialize)]
pub struct PostOps {
    /// The revision the client last saw; informational (ops apply to the latest state).
    #[serde(default)]
    #[allow(dead_code)]
    base_revision: Option<i64>,
    ops: Vec<QueueOp>,
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match error {
            QueueError::Conflict { expected, current } => ApiError::conflict(
                "conflict",
                format!(
                    "Queue conflict: the queue is at revision {current}, not {expected}. Fetch it and try again."
                ),
            ),
            QueueError::Invalid(invalid) => invalid.into(),
            QueueError::Store(store) => store.into(),
            QueueError::SessionGone => ApiError::internal(error),
        }
    }
}

/// A revision in an `If-Match` / `If-None-Match` value: `"7"` or `7`.
fn parse_revision(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    let unquoted = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    unquoted.parse().ok().filter(|r: &i64| *r >= 0)
}

/// The `If-Match` revision: `None` when absent, 400 when unreadable.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(parse_revision)
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_if_match",
                "If-Match must be a queue revision, e.g. \"7\" (quotes optional).",
            )
        })
}

/// True when an `If-None-Match` header names `revision` (or is `*`).
fn none_match(headers: &HeaderMap, revision: i64) -> bool {
    let Some(value) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    value
        .split(',')
        .any(|tag| tag.trim() == "*" || parse_revision(tag) == Some(revision))
}

fn etag(revision: i64) -> (header::HeaderName, HeaderValue) {
    let value = HeaderValue::from_str(&format!("\"{revision}\""))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    (header::ETAG, value)
}

/// The body of every queue response: the view, plus `skipped` after ops.
#[derive(Serialize)]
struct QueueBody<'a> {
    #[serde(flatten)]
    view: &'a QueueView,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<&'a [usize]>,
}

/// Serialises the view straight into the response (no intermediate JSON tree).
fn queue_response(view: &QueueView, skipped: Option<&[usize]>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(etag(view.revision))
        .json(QueueBody { view, skipped })
}

/// `GET /queue/` → `{state, revision, tracks}` with `ETag`; 304 on a matching `If-None-Match`.
pub async fn get_queue(
    req: HttpRequest,
    queues: web::Data<Queues>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let view = queues.read(caller.user_id).await?;
    if none_match(req.headers(), view.revision) {
        return Ok(HttpResponse::build(StatusCode::NOT_MODIFIED)
            .insert_header(etag(view.revision))
            .finish());
    }
    Ok(queue_response(&view, None))
}

/// `PUT /queue/` `{state}` → like GET. `If-Match` makes it conditional (409 on mismatch);
/// without it the last write wins.
pub async fn put_queue(
    req: HttpRequest,
    queues: web::Data<Queues>,
    caller: AuthenticatedUser,
    body: web::Json<PutQueue>,
) -> Result<HttpResponse, ApiError> {
    let expected = if_match(req.headers())?;
    let view = queues
        .replace(
            caller.user_id,
            expected,
            body.into_inner().state,
            &caller.device_id,
        )
        .await?;
    Ok(queue_response(&view, None))
}

/// `POST /queue/ops` `{base_revision, ops}` → like GET plus `skipped`.
pub async fn post_ops(
    queues: web::Data<Queues>,
    caller: AuthenticatedUser,
    body: web::Json<PostOps>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body.ops.is_empty() || body.ops.len() > 100 {
        return Err(
            crate::domain::InvalidInput::new("ops", "must hold 1 to 100 operations").into(),
        );
    }
    let (view, skipped) = queues
        .apply(caller.user_id, body.ops, &caller.device_id)
        .await?;
    Ok(queue_response(&view, Some(&skipped)))
}

/// `GET /preferences/`.
pub async fn get_preferences(
    state: web::Data<AppState>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let mut pooled = state.store.conn().await?;
    let preferences = preferences::load(&mut pooled.conn(), caller.user_id).await?;
    Ok(HttpResponse::Ok().json(preferences))
}

/// Longest accepted preferences document, serialized.
const MAX_PREFERENCES_BYTES: usize = 16 * 1024;

/// `PATCH /preferences/` with the fields to change; `auto_advance` and `share_listening` must
/// be booleans, other fields are kept as sent (`null` removes one).
pub async fn patch_preferences(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
    body: web::Json<Map<String, Value>>,
) -> Result<HttpResponse, ApiError> {
    let patch = body.into_inner();
    let mut pooled = state.store.conn().await?;
    let mut conn = pooled.conn();
    let mut preferences: Preferences = preferences::load(&mut conn, caller.user_id).await?;
    let before = preferences.clone();
    for (key, value) in patch {
        let flag = match key.as_str() {
            "auto_advance" => Some(("auto_advance", &mut preferences.auto_advance)),
            "share_listening" => Some(("share_listening", &mut preferences.share_listening)),
            _ => None,
        };
        if let Some((field, flag)) = flag {
            let Value::Bool(on) = value else {
                return Err(
                    crate::domain::InvalidInput::new(field, "must be true or false").into(),
                );
            };
            *flag = on;
            continue;
        }
        match value {
            Value::Null => {
                preferences.extra.remove(&key);
            }
            value => {
                preferences.extra.insert(key, value);
            }
        }
    }
    if serde_json::to_vec(&preferences)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
        > MAX_PREFERENCES_BYTES
    {
        return Err(
            crate::domain::InvalidInput::new("preferences", "must be at most 16 KiB").into(),
        );
    }
    preferences::store(&mut conn, caller.user_id, &preferences).await?;
    // Cached queues carry auto_advance, and followers' views depend on share_listening:
    // every replica hears a change of either (the new share_listening with it).
    let sharing_changed = preferences.share_listening != before.share_listening;
    if sharing_changed || preferences.auto_advance != before.auto_advance {
        realtime.hub.do_send(Publish {
            user: caller.user_id,
            event: UserEvent::PreferencesChanged {
                share_listening: sharing_changed.then_some(preferences.share_listening),
            },
        });
    }
    Ok(HttpResponse::Ok().json(preferences))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_parse_with_or_without_quotes() {
        assert_eq!(parse_revision("\"7\""), Some(7));
        assert_eq!(parse_revision("7"), Some(7));
        assert_eq!(parse_revision(" W/\"3\" "), Some(3));
        assert_eq!(parse_revision("\"seven\""), None);
        assert_eq!(parse_revision("-1"), None);
        assert_eq!(parse_revision("\"7"), None);
    }
}
