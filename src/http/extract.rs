//! `Authorization: Bearer <access token>` → [`AuthenticatedUser`]; the client's address →
//! [`ClientIp`].

use std::future::Future;
use std::pin::Pin;

use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};

use super::AppState;
use crate::abuse::ClientIp;
use crate::auth::{Identity, TokenError};
use crate::error::ApiError;

/// The caller of an authenticated endpoint: who, from which device, in which login session.
#[derive(Debug, Clone)]
pub struct AuthenticatedUser(pub Identity);

impl std::ops::Deref for AuthenticatedUser {
    type Target = Identity;
    fn deref(&self) -> &Identity {
        &self.0
    }
}

impl FromRequest for AuthenticatedUser {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer_token(req).map(str::to_owned);
        // Verified already by the guard (the same token: the headers do not change).
        let verified = req
            .extensions()
            .get::<super::guard::Verified>()
            .map(|v| v.0.clone());
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            let token = token?;
            let identity = match verified {
                Some(identity) => Ok(identity),
                None => state.keys.identify(&token),
            };
            let identity = identity.map_err(|e| match e {
                TokenError::Expired => ApiError::unauthorized(
                    "token_expired",
                    "The access token has expired; refresh it.",
                ),
                TokenError::Invalid => {
                    ApiError::unauthorized("invalid_token", "The access token is not valid.")
                }
            })?;
            if state.sessions.is_revoked(&identity.session).await? {
                return Err(ApiError::unauthorized(
                    "session_revoked",
                    "This login has ended; log in again.",
                ));
            }
            Ok(Self(identity))
        })
    }
}

/// Checks that the caller presents the operator token (`SEGUE_OPERATOR_TOKEN`). The tokens are
/// compared as SHA-256 digests, so the comparison's time says nothing about the token.
pub fn require_operator(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    use secrecy::ExposeSecret;
    use sha2::{Digest, Sha256};
    // Without an operator token the operator's routes are not there at all.
    let Some(expected) = state.settings.operator_token() else {
        return Err(ApiError::client(
            actix_web::http::StatusCode::NOT_FOUND,
            "not_found",
            "No such route.",
        ));
    };
    let presented = bearer_token(req)?;
    if Sha256::digest(presented.as_bytes()) != Sha256::digest(expected.expose_secret().as_bytes()) {
        return Err(ApiError::client(
            actix_web::http::StatusCode::FORBIDDEN,
            "operator_only",
            "Only the operator may do this; the token presented is not the operator token.",
        ));
    }
    Ok(())
}

/// The token of an `Authorization: Bearer` header.
fn bearer_token(req: &HttpRequest) -> Result<&str, ApiError> {
    bearer_in(req.headers())
}

/// The token of an `Authorization: Bearer` header in `headers` (the scheme in any case), as
/// every part that reads one (the extractor, the guard) reads it.
pub fn bearer_in(headers: &header::HeaderMap) -> Result<&str, ApiError> {
    let malformed = || {
        ApiError::unauthorized(
            "invalid_token",
            "The Authorization header must be 'Bearer <token>'.",
        )
    };
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized(
            "missing_token",
            "This endpoint needs an access token (Authorization: Bearer <token>).",
        )
    })?;
    let (scheme, token) = value
        .to_str()
        .map_err(|_| malformed())?
        .split_once(' ')
        .ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

/// The client's address as the guard worked it out (the peer's, outside the guard).
impl FromRequest for ClientIp {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let known = req.extensions().get::<ClientIp>().copied();
        std::future::ready(Ok(
            known.unwrap_or_else(|| ClientIp(peer_ip(req.peer_addr())))
        ))
    }
}

/// The peer's address (unspecified when the transport has none, as in some tests).
pub fn peer_ip(peer: Option<std::net::SocketAddr>) -> std::net::IpAddr {
    peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |addr| addr.ip())
}
