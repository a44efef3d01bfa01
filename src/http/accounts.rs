//! `POST /auth/register`, `/auth/login`, `/auth/refresh`, `/auth/logout`.
//!
//! A login (or registration) starts a session: a refresh-token family and the device it was
//! made from. Each refresh spends the presented token and issues the next one of the family;
//! presenting a spent token again means it was stolen or replayed, and the whole family is
//! revoked.

use actix_web::{HttpResponse, web};
use chrono::TimeDelta;
use scoped_futures::ScopedFutureExt;
use serde::{Deserialize, Serialize};

use super::{AppState, AuthenticatedUser};
use crate::auth::{hash_refresh_token, random_token};
use crate::domain::{Device, DeviceId, DisplayName, Handle, InvalidInput, Password, UserId};
use crate::error::ApiError;
use crate::realtime::Realtime;
use crate::store::devices;
use crate::store::tokens::{self, NewRefreshToken};
use crate::store::users::{self, NewUser, UserRecord};
use crate::store::{self, Conn, StoreError};

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
}

#[derive(Deserialize)]
pub struct RefreshRequest {
    refresh_token: String,
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
    refresh_token: String,
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

/// The response every successful login, registration and refresh sends.
fn token_response(
    state: &AppState,
    user: &UserRecord,
    device: &DeviceId,
    refresh: IssuedRefresh,
) -> Result<TokenResponse, ApiError> {
    let access_token = state
        .keys
        .issue(user.user_id(), device, &refresh.family)
        .map_err(ApiError::internal)?;
    Ok(TokenResponse {
        user: UserView {
            id: user.user_id(),
            handle: user.handle.clone(),
            display_name: user.display_name.clone(),
        },
        access_token,
        refresh_token: refresh.token,
        token_type: "Bearer",
        expires_in: state.keys.ttl().as_secs(),
        device_id: device.clone(),
    })
}

/// `POST /auth/register` → 201 with a session; a taken handle → 409.
pub async fn register(
    state: web::Data<AppState>,
    body: web::Json<Credentials>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let handle = Handle::parse(&body.handle)?;
    let display_name = match body.display_name.as_deref() {
        Some(name) => DisplayName::parse(name)?,
        None => DisplayName::parse(&body.handle)?,
    };
    let device = device_of(&body)?;
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
                let user = users::insert(conn, &new_user).await?;
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
        other => other?,
    };
    tracing::info!(user = user.id, "account registered");
    Ok(HttpResponse::Created().json(token_response(&state, &user, &device.id, refresh)?))
}

/// `POST /auth/login` → a new session; any mismatch → 401 without saying which part.
pub async fn login(
    state: web::Data<AppState>,
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
    let mut pooled = state.store.conn().await?;
    // A handle that cannot exist is just a wrong handle; the hash check still runs so that
    // the answer takes as long as for a real account.
    let user = match Handle::parse(&body.handle) {
        Ok(handle) => users::find_by_handle(&mut pooled.conn(), &handle).await?,
        Err(_) => None,
    };
    let stored_hash = user.as_ref().map(|u| u.password_hash.clone());
    if !state.passwords.verify(body.password, stored_hash).await? {
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
    Ok(HttpResponse::Ok().json(token_response(&state, &user, &device.id, refresh)?))
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
    Revoked,
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
pub async fn refresh(
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    body: web::Json<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    let presented = body.into_inner().refresh_token.trim().to_owned();
    let presented_hash = hash_refresh_token(&presented);
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
                    return Ok(RefreshOutcome::Revoked);
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
        } => Ok(HttpResponse::Ok().json(token_response(&state, &user, &device, refresh)?)),
        RefreshOutcome::Reused { user, session } => {
            // Only once the revocation is committed: its sockets close and its tokens are
            // refused on every replica.
            state.sessions.mark_revoked(&session).await;
            realtime.end_session(user, &session);
            Err(ApiError::unauthorized(
                "refresh_token_reused",
                "This refresh token was already used; the session has been ended. Log in again.",
            ))
        }
        RefreshOutcome::Revoked => Err(ApiError::unauthorized(
            "session_revoked",
            "This login has ended; log in again.",
        )),
        RefreshOutcome::Expired => Err(ApiError::unauthorized(
            "refresh_token_expired",
            "The refresh token has expired; log in again.",
        )),
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
    realtime.end_session(caller.user_id, &caller.session);
    Ok(HttpResponse::NoContent().finish())
}
