//! `POST /auth/register`, `/auth/login`, `/auth/refresh`, `/auth/logout`.
//!
//! A login (or registration) starts a session: a refresh-token family and the device it was
//! made from. Each refresh spends the presented token and issues the next one of the family;
//! presenting a spent token again means it was stolen or replayed, and the whole family is
//! revoked.
//!
//! The refresh token travels in the JSON body (apps), or, for a client that asks with
//! `"refresh_token_in": "cookie"` (the web page), in an `HttpOnly`, `Secure`,
//! `SameSite=Strict` cookie scoped to `/auth/refresh`, out of any script's reach.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::http::header::{CACHE_CONTROL, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use chrono::TimeDelta;
use scoped_futures::ScopedFutureExt;
use serde::{Deserialize, Serialize};

use super::{AppState, AuthenticatedUser};
use crate::abuse::{ClientIp, Guard, Rule};
use crate::auth::fast_path::{Known, TokenFacts};
use crate::auth::{hash_refresh_token, random_token};
use crate::domain::{Device, DeviceId, DisplayName, Handle, InvalidInput, Password, UserId};
use crate::error::ApiError;
use crate::realtime::Realtime;
use crate::store::tokens::{self, NewRefreshToken};
use crate::store::users::{self, NewUser, UserRecord};
use crate::store::{self, Conn, StoreError};
use crate::store::{blocks, devices};

/// Body of register and login. The device fields are optional: a client that omits
/// `device_id` is given one, which it should keep.
#[derive(Deserialize)]
pub struct Credentials {
    handle: String,
    password: String,
    display_name: Option<String>,
    device_id: Option<String>,
    device_name: Option<String>,
    device_kind: Option<String>,
    /// Register only: a stable identifier of the device beyond its `device_id` (an app's
    /// install id, say), counted by the per-device registration limit.
    device_fingerprint: Option<String>,
    #[serde(default)]
    refresh_token_in: RefreshTokenIn,
}

/// Longest accepted `device_fingerprint`.
const MAX_FINGERPRINT_LEN: usize = 128;

/// The keys the per-device registration limit counts a registration by: the device id the
/// client chose (one the server assigns says nothing), and its fingerprint.
fn device_keys(body: &Credentials, device: &Device) -> Result<Vec<String>, InvalidInput> {
    let mut keys = Vec::new();
    // Counted without regard to case, so `Phone-1` and `phone-1` are one device.
    if body.device_id.is_some() {
        keys.push(format!("id:{}", device.id.as_str().to_lowercase()));
    }
    if let Some(fingerprint) = body.device_fingerprint.as_deref().map(str::trim) {
        if fingerprint.is_empty() || fingerprint.len() > MAX_FINGERPRINT_LEN {
            return Err(InvalidInput::new(
                "device_fingerprint",
                "must be 1 to 128 characters",
            ));
        }
        keys.push(format!("fp:{}", fingerprint.to_lowercase()));
    }
    Ok(keys)
}

/// Where a client wants its refresh token.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshTokenIn {
    /// In the JSON answer, as `refresh_token`.
    #[default]
    Body,
    /// In the [`REFRESH_COOKIE`] only (the answer has no `refresh_token`).
    Cookie,
}

/// The cookie that carries a refresh token for a client that asked for it.
pub const REFRESH_COOKIE: &str = "segue_refresh";

/// The only path the refresh cookie is sent to.
pub const REFRESH_COOKIE_PATH: &str = "/auth/refresh";

/// Body of `POST /auth/refresh`: the token, unless the cookie carries it (then `{}`).
#[derive(Deserialize)]
pub struct RefreshRequest {
    refresh_token: Option<String>,
    /// Where to put the next token; by default where this one came from.
    refresh_token_in: Option<RefreshTokenIn>,
}

#[derive(Serialize)]
struct UserView {
    id: UserId,
    handle: String,
    display_name: String,
}

#[derive(Serialize)]
struct TokenResponse {
    user: UserView,
    access_token: String,
    /// Absent when the token travels in the cookie.
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    token_type: &'static str,
    /// Seconds until `access_token` expires.
    expires_in: u64,
    /// The device this login belongs to (the one sent, or one assigned now).
    device_id: DeviceId,
}

/// The device a login is made from.
fn device_of(body: &Credentials) -> Result<Device, InvalidInput> {
    Device::parse(
        body.device_id.as_deref(),
        body.device_name.as_deref(),
        body.device_kind.as_deref(),
    )
}

/// A new session's refresh token, as given to the client once.
struct IssuedRefresh {
    token: String,
    family: String,
}

/// Stores a refresh token for `family` (a new family when `None`) and records the device.
async fn start_session(
    conn: &mut Conn<'_>,
    state: &AppState,
    user: &UserRecord,
    device: &Device,
) -> Result<IssuedRefresh, StoreError> {
    let family = random_token(16);
    let token = random_token(32);
    issue_refresh(conn, state, user.id, &family, &device.id, &token).await?;
    devices::record(conn, user.user_id(), device).await?;
    Ok(IssuedRefresh { token, family })
}

/// Stores (hashed) `token` as the next refresh token of `family`.
async fn issue_refresh(
    conn: &mut Conn<'_>,
    state: &AppState,
    user_id: i64,
    family: &str,
    device: &DeviceId,
    token: &str,
) -> Result<(), StoreError> {
    let now = store::now();
    let ttl = TimeDelta::seconds(
        i64::try_from(state.settings.refresh_token_ttl_secs).unwrap_or(i64::MAX),
    );
    tokens::insert(
        conn,
        &NewRefreshToken {
            user_id,
            family_id: family,
            device_id: device.as_str(),
            token_hash: &hash_refresh_token(token),
            created_at: now,
            expires_at: now
                .checked_add_signed(ttl)
                .unwrap_or(chrono::NaiveDateTime::MAX),
        },
    )
    .await?;
    Ok(())
}

/// Tells the fast path about tokens of `user_id`'s session `family` the store just issued
/// (`spent: false`) or spent, in one round trip.
async fn remember(state: &AppState, user_id: i64, family: &str, tokens: &[(&str, bool)]) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ttl_ms = i64::try_from(state.settings.refresh_token_ttl_secs)
        .unwrap_or(i64::MAX / 1_000)
        .saturating_mul(1_000);
    let tokens: Vec<(String, TokenFacts)> = tokens
        .iter()
        .map(|(hash, spent)| {
            let facts = TokenFacts {
                user_id,
                family: family.to_owned(),
                expires_at_ms: now_ms.saturating_add(ttl_ms),
                spent: *spent,
            };
            ((*hash).to_owned(), facts)
        })
        .collect();
    state.fast_path.remember(&tokens, now_ms).await;
}

/// The refresh cookie carrying `token` (an empty one that clears it when `None`).
fn refresh_cookie(state: &AppState, token: Option<String>) -> Cookie<'static> {
    let clear = token.is_none();
    let max_age = i64::try_from(state.settings.refresh_token_ttl_secs).unwrap_or(i64::MAX);
    let mut cookie = Cookie::build(REFRESH_COOKIE, token.unwrap_or_default())
        .path(REFRESH_COOKIE_PATH)
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::seconds(max_age))
        .finish();
    if clear {
        cookie.make_removal();
    }
    cookie
}

/// The answer every successful login, registration and refresh sends: the new access token,
/// and the refresh token where the client wants it. Never cached.
fn token_response(
    state: &AppState,
    status: StatusCode,
    user: &UserRecord,
    device: &DeviceId,
    refresh: IssuedRefresh,
    delivery: RefreshTokenIn,
) -> Result<HttpResponse, ApiError> {
    let access_token = state
        .keys
        .issue(user.user_id(), device, &refresh.family)
        .map_err(ApiError::internal)?;
    let mut response = HttpResponse::build(status);
    response.insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")));
    let refresh_token = match delivery {
        RefreshTokenIn::Body => Some(refresh.token),
        RefreshTokenIn::Cookie => {
            response.cookie(refresh_cookie(state, Some(refresh.token)));
            None
        }
    };
    Ok(response.json(TokenResponse {
        user: UserView {
            id: user.user_id(),
            handle: user.handle.clone(),
            display_name: user.display_name.clone(),
        },
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.keys.ttl().as_secs(),
        device_id: device.clone(),
    }))
}

/// `POST /auth/register` → 201 with a session; a taken handle → 409.
pub async fn register(
    state: web::Data<AppState>,
    cache: web::Data<crate::cache::CacheAside>,
    body: web::Json<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let handle = Handle::parse(&body.handle)?;
    let display_name = match body.display_name.as_deref() {
        Some(name) => DisplayName::parse(name)?,
        None => DisplayName::parse(&body.handle)?,
    };
    let device = device_of(&body)?;
    let device_keys = device_keys(&body, &device)?;
    let device_limit = state.settings.device_accounts_max;
    let since = store::now() - TimeDelta::days(i64::from(state.settings.device_accounts_days));
    if device_limit > 0 && !device_keys.is_empty() {
        // Before the costly hash; checked again, exactly, inside the transaction.
        let mut pooled = state.store.conn().await?;
        let made = blocks::accounts_from_device(&mut pooled.conn(), &device_keys, since).await?;
        if made >= i64::from(device_limit) {
            return Err(too_many_accounts());
        }
    }
    let password_hash = state
        .passwords
        .hash(Password::parse(body.password)?)
        .await?;

    let mut pooled = state.store.conn().await?;
    let state_ref = state.get_ref();
    let outcome = pooled
        .conn()
        .transaction(|conn| {
            async move {
                let new_user = NewUser {
                    handle: handle.as_str(),
                    display_name: display_name.as_str(),
                    password_hash: &password_hash,
                    created_at: store::now(),
                };
                // Registrations from one device take turns (PostgreSQL: a lock per device
                // key), and each is written first, then counted (this one included): a write
                // first takes SQLite's write lock, so concurrent registrations queue instead
                // of failing to upgrade a read lock ("database is locked").
                conn.lock_keys_for_transaction(&device_keys).await?;
                let user = users::insert(conn, &new_user).await?;
                blocks::record_registration(conn, &device_keys, user.user_id()).await?;
                if device_limit > 0
                    && blocks::accounts_from_device(conn, &device_keys, since).await?
                        > i64::from(device_limit)
                {
                    // Rolled back: nothing of the refused registration stays.
                    return Err(StoreError::Refused);
                }
                let refresh = start_session(conn, state_ref, &user, &device).await?;
                Ok::<_, StoreError>((user, refresh, device))
            }
            .scope_boxed()
        })
        .await;
    let (user, refresh, device) = match outcome {
        Err(e) if e.is_unique_violation() => {
            return Err(ApiError::conflict(
                "handle_taken",
                "That handle is already taken.",
            ));
        }
        Err(StoreError::Refused) => return Err(too_many_accounts()),
        other => other?,
    };
    tracing::info!(user = user.id, "account registered");
    let issued = hash_refresh_token(&refresh.token);
    remember(&state, user.id, &refresh.family, &[(&issued, false)]).await;
    // A replica may have cached that the handle was nobody's.
    cache
        .invalidate_twice("profile", vec![user.handle.clone()])
        .await;
    token_response(
        &state,
        StatusCode::CREATED,
        &user,
        &device.id,
        refresh,
        body.refresh_token_in,
    )
}

/// 429 `device_limit`: this device made its accounts for the window.
fn too_many_accounts() -> ApiError {
    ApiError::client(
        StatusCode::TOO_MANY_REQUESTS,
        "device_limit",
        "This device has created as many accounts as it may for now.",
    )
}

/// `POST /auth/login` → a new session; any mismatch → 401 without saying which part.
pub async fn login(
    state: web::Data<AppState>,
    guard: web::Data<Guard>,
    body: web::Json<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let wrong = || {
        ApiError::unauthorized(
            "invalid_credentials",
            "The handle or the password is wrong.",
        )
    };
    let device = device_of(&body)?;
    let delivery = body.refresh_token_in;
    let handle = Handle::parse(&body.handle).ok();
    if let Some(handle) = &handle {
        // Wrong guesses at one account are limited whoever makes them (per address is the
        // guard's); a right password spends nothing, and a refusal here is nobody's violation
        // (the failures may be an attacker's, the refused attempt its owner's).
        guard
            .refuse_if_spent(Rule::LoginHandle, handle.as_str())
            .await?;
    }
    let mut pooled = state.store.conn().await?;
    // A handle that cannot exist is just a wrong handle; the hash check still runs so that
    // the answer takes as long as for a real account.
    let user = match &handle {
        Some(handle) => users::find_by_handle(&mut pooled.conn(), handle).await?,
        None => None,
    };
    let stored_hash = user.as_ref().map(|u| u.password_hash.clone());
    if !state.passwords.verify(body.password, stored_hash).await? {
        if let Some(handle) = &handle {
            guard.spend(Rule::LoginHandle, handle.as_str()).await;
        }
        return Err(wrong());
    }
    let user = user.ok_or_else(wrong)?;
    let state_ref = state.get_ref();
    let (user, refresh, device) = pooled
        .conn()
        .transaction(|conn| {
            async move {
                let refresh = start_session(conn, state_ref, &user, &device).await?;
                Ok::<_, StoreError>((user, refresh, device))
            }
            .scope_boxed()
        })
        .await?;
    let issued = hash_refresh_token(&refresh.token);
    remember(&state, user.id, &refresh.family, &[(&issued, false)]).await;
    token_response(&state, StatusCode::OK, &user, &device.id, refresh, delivery)
}

/// What presenting a refresh token came to.
enum RefreshOutcome {
    Rotated {
        user: UserRecord,
        device: DeviceId,
        refresh: IssuedRefresh,
    },
    /// A spent token presented again: its session is revoked.
    Reused {
        user: UserId,
        session: String,
    },
    Revoked {
        session: String,
    },
    Expired,
    Unknown,
}

/// `POST /auth/refresh` → the next token pair; the presented token is spent.
///
/// The successor is derived from the presented token ([`TokenKeys::successor_of`]), so a
/// client that presents the same token again within `SEGUE_REFRESH_GRACE_SECS` of spending it
/// (its answer was lost, or two tabs refreshed at once) gets the same successor back, as long
/// as that successor is still unspent. Any other reuse of a spent token revokes the family.
///
/// [`TokenKeys::successor_of`]: crate::auth::TokenKeys::successor_of
///
/// The token comes from the body, or else from the refresh cookie; the next one goes where
/// `refresh_token_in` says, by default where this one came from, but a token from the cookie
/// only ever goes back into the cookie. A refused cookie is cleared.
pub async fn refresh(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    guard: web::Data<Guard>,
    client: ClientIp,
    request: HttpRequest,
    body: web::Json<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let in_body = body.refresh_token.filter(|token| !token.trim().is_empty());
    let (presented, came_in) = match (in_body, request.cookie(REFRESH_COOKIE)) {
        (Some(token), _) => (token, RefreshTokenIn::Body),
        (None, Some(cookie)) => (cookie.value().to_owned(), RefreshTokenIn::Cookie),
        (None, None) => {
            return Err(InvalidInput::new(
                "refresh_token",
                "is missing: send it in the body, or log in with \"refresh_token_in\": \"cookie\" to have the browser send it",
            )
            .into());
        }
    };
    // A token kept out of scripts' reach stays there: a script on the page could otherwise
    // ask for the next one in the body and carry the login away.
    let delivery = match (came_in, body.refresh_token_in) {
        (RefreshTokenIn::Cookie, Some(RefreshTokenIn::Body)) => {
            return Err(InvalidInput::new(
                "refresh_token_in",
                "a refresh token from the cookie is only ever renewed into the cookie",
            )
            .into());
        }
        (came_in, asked) => asked.unwrap_or(came_in),
    };
    let answer = async {
        let presented = presented.trim();
        let family = session_of(&state, presented).await?;
        if let Some(family) = family.filter(|_| guard.quota(Rule::RefreshSession).is_some()) {
            guard.limit(Rule::RefreshSession, &family, client.0).await?;
        }
        rotate(&state, &realtime, presented, delivery).await
    };
    match answer.await {
        Err(refused) if came_in == RefreshTokenIn::Cookie && refused.status_code() == 401 => {
            let mut response = refused.error_response();
            response
                .add_cookie(&refresh_cookie(&state, None))
                .map_err(ApiError::internal)?;
            Ok(response)
        }
        answer => answer,
    }
}

/// The session `presented` belongs to, from the fast path (which refuses at once a token of
/// an ended session, or an expired one) or else, when the session limit needs it, the store
/// (and the fast path learns it). `None`: unknown here; the store decides.
async fn session_of(state: &AppState, presented: &str) -> Result<Option<String>, ApiError> {
    let hash = hash_refresh_token(presented);
    match state.fast_path.lookup(&hash).await {
        Known::Ended => return Err(session_ended()),
        Known::Session(facts) => return Ok(Some(facts.family)),
        Known::Nothing => {}
    }
    if state.settings.rate_limit_refresh_session.0.is_none() {
        return Ok(None);
    }
    let known = {
        let mut pooled = state.store.conn().await?;
        tokens::find(&mut pooled.conn(), &hash).await?
    };
    let Some(known) = known else {
        return Ok(None);
    };
    if known.revoked_at.is_some() {
        state.fast_path.session_ended(&known.family_id).await;
    } else {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let facts = TokenFacts {
            user_id: known.user_id,
            family: known.family_id.clone(),
            expires_at_ms: known.expires_at.and_utc().timestamp_millis(),
            spent: known.spent_at.is_some(),
        };
        state.fast_path.remember(&[(hash, facts)], now_ms).await;
    }
    Ok(Some(known.family_id))
}

fn session_ended() -> ApiError {
    ApiError::unauthorized("session_revoked", "This login has ended; log in again.")
}

fn refresh_expired() -> ApiError {
    ApiError::unauthorized(
        "refresh_token_expired",
        "The refresh token has expired; log in again.",
    )
}

/// Spends `presented` and answers with the next token pair, or says why not.
async fn rotate(
    state: &web::Data<AppState>,
    realtime: &Realtime,
    presented: &str,
    delivery: RefreshTokenIn,
) -> Result<HttpResponse, ApiError> {
    let presented = presented.to_owned();
    let presented_hash = hash_refresh_token(&presented);
    let spent_hash = presented_hash.clone();
    let successor = state.keys.successor_of(&presented);
    let grace = TimeDelta::seconds(i64::try_from(state.settings.refresh_grace_secs).unwrap_or(0));
    let mut pooled = state.store.conn().await?;
    let state_ref = state.get_ref();
    let outcome = pooled
        .conn()
        .transaction(|conn| {
            async move {
                let now = store::now();
                if let Some(spent) = tokens::spend(conn, &presented_hash, now).await? {
                    // A logout racing an earlier rotation may have revoked the family's
                    // other tokens but not this one (PostgreSQL's statement snapshot did not
                    // see it yet): any revoked token ends the family.
                    if tokens::family_revoked(conn, &spent.family_id).await? {
                        return Ok(RefreshOutcome::Revoked {
                            session: spent.family_id,
                        });
                    }
                    let (user, device) = owner_of(conn, &spent).await?;
                    issue_refresh(
                        conn,
                        state_ref,
                        spent.user_id,
                        &spent.family_id,
                        &device,
                        &successor,
                    )
                    .await?;
                    let refresh = IssuedRefresh {
                        token: successor,
                        family: spent.family_id,
                    };
                    return Ok::<_, StoreError>(RefreshOutcome::Rotated {
                        user,
                        device,
                        refresh,
                    });
                }
                let Some(known) = tokens::find(conn, &presented_hash).await? else {
                    return Ok(RefreshOutcome::Unknown);
                };
                if known.revoked_at.is_some() {
                    return Ok(RefreshOutcome::Revoked {
                        session: known.family_id,
                    });
                }
                let Some(spent_at) = known.spent_at else {
                    return Ok(RefreshOutcome::Expired);
                };
                if now.signed_duration_since(spent_at) <= grace
                    && let Some(next) = tokens::find(conn, &hash_refresh_token(&successor)).await?
                    && next.spent_at.is_none()
                    && next.revoked_at.is_none()
                    && next.expires_at > now
                {
                    // A retry within the grace: the same successor again.
                    let (user, device) = owner_of(conn, &known).await?;
                    let refresh = IssuedRefresh {
                        token: successor,
                        family: known.family_id,
                    };
                    return Ok(RefreshOutcome::Rotated {
                        user,
                        device,
                        refresh,
                    });
                }
                // Committed with the transaction: the revocation must stick even though the
                // request fails.
                tokens::revoke_family(conn, UserId(known.user_id), &known.family_id, now).await?;
                tracing::warn!(
                    user = known.user_id,
                    "refresh token reused; session revoked"
                );
                Ok(RefreshOutcome::Reused {
                    user: UserId(known.user_id),
                    session: known.family_id,
                })
            }
            .scope_boxed()
        })
        .await?;
    match outcome {
        RefreshOutcome::Rotated {
            user,
            device,
            refresh,
        } => {
            // The store has spent the one and stored the other: now the fast path learns it.
            let next = hash_refresh_token(&refresh.token);
            let written = [(spent_hash.as_str(), true), (next.as_str(), false)];
            remember(state, user.id, &refresh.family, &written).await;
            token_response(state, StatusCode::OK, &user, &device, refresh, delivery)
        }
        RefreshOutcome::Reused { user, session } => {
            // Only once the revocation is committed: its sockets close and its tokens are
            // refused on every replica.
            state.sessions.mark_revoked(&session).await;
            state.fast_path.session_ended(&session).await;
            realtime.end_session(user, &session);
            Err(ApiError::unauthorized(
                "refresh_token_reused",
                "This refresh token was already used; the session has been ended. Log in again.",
            ))
        }
        RefreshOutcome::Revoked { session } => {
            state.fast_path.session_ended(&session).await;
            Err(session_ended())
        }
        RefreshOutcome::Expired => Err(refresh_expired()),
        RefreshOutcome::Unknown => Err(ApiError::unauthorized(
            "invalid_refresh_token",
            "The refresh token is not valid.",
        )),
    }
}

/// The account and device a stored refresh token belongs to.
async fn owner_of(
    conn: &mut Conn<'_>,
    token: &tokens::RefreshTokenRecord,
) -> Result<(UserRecord, DeviceId), StoreError> {
    let device =
        DeviceId::parse(&token.device_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let user = users::find(conn, UserId(token.user_id))
        .await?
        .ok_or_else(|| StoreError::Corrupt("refresh token without user".into()))?;
    Ok((user, device))
}

/// `POST /auth/logout` → 204; the session's refresh tokens and access tokens stop working,
/// and its sockets are closed on every replica.
pub async fn logout(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let mut pooled = state.store.conn().await?;
    tokens::revoke_family(
        &mut pooled.conn(),
        caller.user_id,
        &caller.session,
        store::now(),
    )
    .await?;
    state.sessions.mark_revoked(&caller.session).await;
    state.fast_path.session_ended(&caller.session).await;
    realtime.end_session(caller.user_id, &caller.session);
    // A web page's refresh cookie goes with its session.
    Ok(HttpResponse::NoContent()
        .cookie(refresh_cookie(&state, None))
        .finish())
}
