//! Streaming overlays: `POST/GET /overlays`, `DELETE /overlays/{id}` (the owner's), and
//! what a streaming program's browser source loads with no login, the token being the
//! credential: `GET /overlay/{token}` (a page) and `GET /overlay/{token}/events` (SSE).

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, Responder, web};
use actix_web_lab::sse;
use rand::Rng;
use scoped_futures::ScopedFutureExt;
use serde::Deserialize;
use serde_json::json;

use super::{AppState, AuthenticatedUser};
use crate::domain::{UserId, parse_text};
use crate::error::ApiError;
use crate::realtime::Realtime;
use crate::realtime::events::ReplicaEvent;
use crate::realtime::hub::Announce;
use crate::realtime::overlays::{Close, Open, Opened};
use crate::store::StoreError;
use crate::store::overlays::{self, Overlay};

/// Most overlays one account may have.
pub const MAX_OVERLAYS: i64 = 20;

/// Keep-alive comments on an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The reconnect delay a browser is told to use.
const RETRY: Duration = Duration::from_secs(3);

const ADJECTIVES: [&str; 16] = [
    "violet", "amber", "azure", "coral", "crimson", "golden", "jade", "lilac", "misty", "olive",
    "rusty", "silver", "sunny", "teal", "velvet", "wild",
];
const ANIMALS: [&str; 16] = [
    "otter", "badger", "crane", "falcon", "fox", "heron", "ibex", "koala", "lynx", "marten",
    "newt", "owl", "panda", "quail", "raven", "wren",
];

/// A friendly name such as `violet-otter-42`.
fn friendly_name() -> String {
    let mut rng = rand::rng();
    let adjective = ADJECTIVES
        .get(rng.random_range(0..ADJECTIVES.len()))
        .unwrap_or(&"quiet");
    let animal = ANIMALS
        .get(rng.random_range(0..ANIMALS.len()))
        .unwrap_or(&"owl");
    format!("{adjective}-{animal}-{}", rng.random_range(10..100))
}

fn token_hash(token: &str) -> String {
    crate::auth::sha256_hex(token.as_bytes())
}

fn unknown_overlay() -> ApiError {
    ApiError::not_found(
        "unknown_overlay",
        "There is no such overlay (it may have been revoked).",
    )
}

fn view(overlay: &Overlay) -> serde_json::Value {
    json!({
        "id": overlay.id,
        "name": overlay.name,
        "created_at": overlay.created_at.and_utc().to_rfc3339(),
    })
}

#[derive(Debug, Deserialize, Default)]
pub struct NewOverlay {
    name: Option<String>,
}

/// `POST /overlays` `{name?}` → 201 `{id, name, token, page_url, events_url}`; the token (256
/// random bits) is shown this once and kept only as its hash.
pub async fn create(
    state: web::Data<AppState>,
    caller: AuthenticatedUser,
    body: Option<web::Json<NewOverlay>>,
) -> Result<HttpResponse, ApiError> {
    let body = body.map(|b| b.into_inner()).unwrap_or_default();
    let name = match body.name {
        Some(name) => parse_text("name", &name, 1, 64)?,
        None => friendly_name(),
    };
    let token = crate::auth::random_token(32);
    let overlay = Overlay {
        id: format!("ovl_{}", crate::auth::random_token(12)),
        user_id: caller.user_id.0,
        name,
        created_at: crate::store::now(),
    };
    // Written, then counted (this one included) under the account's lock, and rolled back
    // when past the cap: a burst cannot pass it (a write first also takes SQLite's write
    // lock, so concurrent creations queue rather than fail to upgrade a read lock).
    let lock = format!("overlays:{}", caller.user_id);
    let hash = token_hash(&token);
    let mut pooled = state.store.conn().await?;
    let created = pooled
        .conn()
        .transaction(|conn| {
            async move {
                conn.lock_keys_for_transaction(&[lock]).await?;
                overlays::create(conn, &overlay, &hash).await?;
                if overlays::count(conn, caller.user_id).await? > MAX_OVERLAYS {
                    return Err(StoreError::Refused);
                }
                Ok(overlay)
            }
            .scope_boxed()
        })
        .await;
    let overlay = match created {
        Err(StoreError::Refused) => {
            return Err(ApiError::client(
                StatusCode::CONFLICT,
                "too_many_overlays",
                format!("An account may have {MAX_OVERLAYS} overlays; revoke one first."),
            ));
        }
        other => other?,
    };
    let mut answer = view(&overlay);
    if let Some(map) = answer.as_object_mut() {
        map.insert("token".into(), json!(token));
        map.insert("page_url".into(), json!(format!("/overlay/{token}")));
        map.insert(
            "events_url".into(),
            json!(format!("/overlay/{token}/events")),
        );
    }
    Ok(HttpResponse::Created().json(answer))
}

/// `GET /overlays` → `{overlays: [{id, name, created_at}]}`.
pub async fn list(
    state: web::Data<AppState>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let mut pooled = state.store.conn().await?;
    let found = overlays::list(&mut pooled.conn(), caller.user_id).await?;
    let listed: Vec<_> = found.iter().map(view).collect();
    Ok(HttpResponse::Ok().json(json!({ "overlays": listed })))
}

/// `DELETE /overlays/{id}` → 204; the overlay's open streams end on every replica.
pub async fn revoke(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let mut pooled = state.store.conn().await?;
    let token_hash = overlays::delete(&mut pooled.conn(), caller.user_id, &path.into_inner())
        .await?
        .ok_or_else(unknown_overlay)?;
    realtime
        .hub
        .do_send(Announce(ReplicaEvent::OverlayRevoked { token_hash }));
    Ok(HttpResponse::NoContent().finish())
}

/// The overlay a token opens, or 404.
async fn by_token(state: &AppState, token: &str) -> Result<(Overlay, String), ApiError> {
    if token.is_empty() || token.len() > 128 {
        return Err(unknown_overlay());
    }
    let hash = token_hash(token);
    let mut pooled = state.store.conn().await?;
    let overlay = overlays::by_token_hash(&mut pooled.conn(), &hash)
        .await?
        .ok_or_else(unknown_overlay)?;
    Ok((overlay, hash))
}

/// `GET /overlay/{token}/events`: `event: track` with the current state on connect (unless
/// `Last-Event-ID` says the reader has it), then on every change, ids increasing;
/// keep-alive comments every 15 s; ends when the overlay is revoked.
pub async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    path: web::Path<String>,
) -> Result<impl Responder, ApiError> {
    let (overlay, token_hash) = by_token(&state, &path.into_inner()).await?;
    let user = UserId(overlay.user_id);
    let Opened {
        stream,
        state: mut shown,
        mut revoked,
    } = realtime
        .overlays
        .send(Open {
            user,
            token_hash: token_hash.clone(),
        })
        .await
        .map_err(ApiError::internal)?;
    // A revocation between the lookup and the opening announced itself before this stream
    // was there to hear it: look again now that it would hear one.
    let still = match state.store.conn().await {
        Ok(mut pooled) => overlays::by_token_hash(&mut pooled.conn(), &token_hash).await,
        Err(error) => Err(error),
    };
    if !matches!(still, Ok(Some(_))) {
        realtime.overlays.do_send(Close { user, stream });
        return Err(match still {
            Err(error) => error.into(),
            _ => unknown_overlay(),
        });
    }
    let seen: Option<u64> = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (sender, receiver) = tokio::sync::mpsc::channel::<sse::Event>(2);
    let overlays = realtime.overlays.clone();
    actix_web::rt::spawn(async move {
        let event = |shown: &crate::realtime::overlays::Shown| {
            sse::Data::new_json(&shown.payload)
                .map(|data| sse::Event::Data(data.event("track").id(shown.id.to_string())))
        };
        let mut first = true;
        loop {
            let current = shown.borrow_and_update().clone();
            let skip = first && (current.id == 0 || seen == Some(current.id));
            first = false;
            if !skip {
                let Ok(message) = event(&current) else { break };
                if sender.send(message).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                changed = shown.changed() => if changed.is_err() { break },
                _ = &mut revoked => break,
                () = sender.closed() => break,
            }
        }
        overlays.do_send(Close { user, stream });
    });
    Ok(sse::Sse::from_infallible_receiver(receiver)
        .with_keep_alive(KEEP_ALIVE)
        .with_retry_duration(RETRY)
        .customize()
        .insert_header((header::CACHE_CONTROL, "no-store")))
}

/// `GET /overlay/{token}`: the page a streaming program's browser source shows.
pub async fn page(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let token = path.into_inner();
    by_token(&state, &token).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; connect-src 'self'; img-src 'self' https: data:; \
             style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        ))
        .insert_header((header::X_FRAME_OPTIONS, "SAMEORIGIN"))
        .body(OVERLAY_PAGE))
}

/// The overlay page: no external assets, transparent, live from `./events` (relative, so the
/// token never appears in the page itself).
const OVERLAY_PAGE: &str = include_str!("overlay.html");
