//! Presence over REST: `GET /devices/`, the follow graph, `now-playing` for players without
//! a socket, the public `GET /now-playing/by-handle/{handle}`, and `GET /history/`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AppState, AuthenticatedUser};
use crate::cache::CacheAside;
use crate::domain::{Device, Handle, UserId};
use crate::error::ApiError;
use crate::presence::input::PlayReportInput;
use crate::realtime::Realtime;
use crate::realtime::events::UserEvent;
use crate::realtime::hub::Publish;
use crate::realtime::presence::RestPlaying;
use crate::realtime::queue::Queues;
use crate::store::{devices, follows, plays, preferences, users};

/// `GET /devices/`: every device the account has been seen on, with presence.
pub async fn list_devices(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let user = caller.user_id;
    let known = {
        let mut pooled = state.store.conn().await?;
        devices::list(&mut pooled.conn(), user).await?
    };
    let snapshot = realtime.registry.snapshot(user).await?;
    let output = snapshot.output.as_deref();
    let mut listed: Vec<Value> = known
        .iter()
        .map(|device| {
            let entries: Vec<_> = snapshot
                .entries
                .values()
                .filter(|e| e.device_id == device.device_id)
                .collect();
            let online_at = entries.iter().map(|e| e.online_at).min();
            let now_playing = entries
                .iter()
                .filter_map(|e| e.now_playing.as_ref())
                .max_by_key(|n| n.at);
            json!({
                "device_id": device.device_id,
                "name": device.name,
                "kind": device.kind,
                "last_seen_at": device.last_seen_at.and_utc().to_rfc3339(),
                "online": !entries.is_empty(),
                "online_at": online_at,
                "is_output": output == Some(device.device_id.as_str()),
                "now_playing": now_playing,
            })
        })
        .collect();
    // Online devices first, then the most recently seen.
    listed.sort_by_key(|d| !d["online"].as_bool().unwrap_or(false));
    Ok(HttpResponse::Ok().json(json!({ "devices": listed, "output_device_id": output })))
}

/// How long a replica may answer a handle's public profile from the shared cache.
const PROFILE_TTL: Duration = Duration::from_secs(60);

/// What anyone may know of an account: `{id, handle, display_name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicProfile {
    pub id: i64,
    pub handle: String,
    pub display_name: String,
}

/// The public profile behind `handle` (`None`: no such account), through the shared cache.
async fn profile_by_handle(
    state: &AppState,
    cache: &CacheAside,
    handle: &Handle,
) -> Result<Option<PublicProfile>, ApiError> {
    cache
        .get_or_load("profile", handle.as_str(), PROFILE_TTL, || async {
            let mut pooled = state.store.conn().await?;
            let account = users::find_by_handle(&mut pooled.conn(), handle).await?;
            Ok::<_, ApiError>(account.map(|a| PublicProfile {
                id: a.id,
                handle: a.handle,
                display_name: a.display_name,
            }))
        })
        .await
}

/// `GET /users/by-handle/{handle}` → `{id, handle, display_name}` (to follow someone by
/// handle); 404 `unknown_user`.
pub async fn user_by_handle(
    state: web::Data<AppState>,
    cache: web::Data<CacheAside>,
    _caller: AuthenticatedUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let unknown = || ApiError::not_found("unknown_user", "There is no user with that handle.");
    let handle = Handle::parse(&path.into_inner()).map_err(|_| unknown())?;
    let profile = profile_by_handle(&state, &cache, &handle)
        .await?
        .ok_or_else(unknown)?;
    Ok(HttpResponse::Ok().json(profile))
}

/// `GET /follows/`.
pub async fn list_follows(
    state: web::Data<AppState>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let mut pooled = state.store.conn().await?;
    let following = follows::following(&mut pooled.conn(), caller.user_id).await?;
    Ok(HttpResponse::Ok().json(json!({ "following": following })))
}

/// Tells every replica showing `follower`'s `friends:` that the follow list changed.
fn follows_changed(realtime: &Realtime, follower: UserId) {
    realtime.hub.do_send(Publish {
        user: follower,
        event: UserEvent::FollowsChanged,
    });
}

/// `POST /follows/{user_id}`: 201 when new, 200 when already following.
pub async fn follow(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let followee = UserId(path.into_inner());
    if followee == caller.user_id {
        return Err(ApiError::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            "cannot_follow_self",
            "You cannot follow yourself.",
        ));
    }
    let mut pooled = state.store.conn().await?;
    let mut conn = pooled.conn();
    let Some(account) = users::find(&mut conn, followee).await? else {
        return Err(ApiError::not_found(
            "unknown_user",
            "There is no user with that id.",
        ));
    };
    let new = follows::follow(&mut conn, caller.user_id, followee).await?;
    if new {
        follows_changed(&realtime, caller.user_id);
    }
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(json!({
        "following": {"id": account.id, "handle": account.handle, "display_name": account.display_name}
    })))
}

/// `DELETE /follows/{user_id}`: 204 whether or not the caller followed them.
pub async fn unfollow(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
    path: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let followee = UserId(path.into_inner());
    let mut pooled = state.store.conn().await?;
    if follows::unfollow(&mut pooled.conn(), caller.user_id, followee).await? {
        follows_changed(&realtime, caller.user_id);
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The caller's device as the store knows it (name and kind), or a plain one.
async fn caller_device(state: &AppState, caller: &AuthenticatedUser) -> Result<Device, ApiError> {
    let mut pooled = state.store.conn().await?;
    Ok(devices::known_or_plain(
        &mut pooled.conn(),
        caller.user_id,
        caller.device_id.as_str(),
    )
    .await?)
}

/// `POST /now-playing/` `{track_id, progress_ms, is_playing}`: what a player without a
/// socket plays; shown like a socket's report until the TTL passes without another.
pub async fn report_playing(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
    body: web::Json<PlayReportInput>,
) -> Result<HttpResponse, ApiError> {
    let report = body.into_inner().parse()?;
    let device = caller_device(&state, &caller).await?;
    realtime.presence.do_send(RestPlaying {
        user: caller.user_id,
        device,
        report,
    });
    Ok(HttpResponse::NoContent().finish())
}

/// `DELETE /now-playing/`: the player stopped.
pub async fn stop_playing(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let device = caller_device(&state, &caller).await?;
    realtime.presence.do_send(RestPlaying {
        user: caller.user_id,
        device,
        report: None,
    });
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /now-playing/by-handle/{handle}` (public): 200 with what the user plays, 204 when
/// nothing or when the user does not share it (`share_listening` off), 404 for an unknown
/// handle. Read from the registry, so every replica answers
/// the same.
pub async fn by_handle(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    queues: web::Data<Queues>,
    cache: web::Data<CacheAside>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let unknown = || ApiError::not_found("unknown_user", "There is no user with that handle.");
    let handle = Handle::parse(&path.into_inner()).map_err(|_| unknown())?;
    let account = profile_by_handle(&state, &cache, &handle)
        .await?
        .ok_or_else(unknown)?;
    let user = UserId(account.id);
    // Read from the store each time, never cached: a user who turns sharing off is hidden
    // from the next request on.
    let shares = {
        let mut pooled = state.store.conn().await?;
        preferences::shares_listening(&mut pooled.conn(), user).await?
    };
    // A user who does not share what they play answers as one who plays nothing.
    if !shares {
        return Ok(HttpResponse::NoContent().finish());
    }
    let snapshot = realtime.registry.snapshot(user).await?;
    let Some(entry) = snapshot.listening() else {
        return Ok(HttpResponse::NoContent().finish());
    };
    let Some(playing) = entry.now_playing.as_ref() else {
        return Ok(HttpResponse::NoContent().finish());
    };
    let track = queues
        .tracks(std::slice::from_ref(&playing.track_id))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .pop();
    Ok(HttpResponse::Ok().json(json!({
        "user": {"id": account.id, "handle": account.handle, "display_name": account.display_name},
        // The device's kind, not its private name ("Alice's phone").
        "device": {"device_id": entry.device_id, "kind": entry.kind},
        "track_id": playing.track_id,
        "progress_ms": playing.progress_ms,
        "is_playing": playing.is_playing,
        "at": playing.at,
        "track": track,
    })))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    limit: Option<i64>,
}

/// `GET /history/?limit=N`: the caller's recorded plays, newest first (default 50, at most 500).
pub async fn history(
    state: web::Data<AppState>,
    caller: AuthenticatedUser,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(crate::domain::InvalidInput::new("limit", "must be 1 to 500").into());
    }
    let mut pooled = state.store.conn().await?;
    let played = plays::recent(&mut pooled.conn(), caller.user_id, limit).await?;
    let played: Vec<Value> = played
        .into_iter()
        .map(|p| {
            json!({
                "track_id": p.track_id,
                "device_id": p.device_id,
                "played_at": p.played_at.and_utc().to_rfc3339(),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "plays": played })))
}
