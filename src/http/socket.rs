//! `GET /socket/websocket?vsn=2.0.0`: the Phoenix socket's upgrade. Everything that can be
//! refused is refused here, with a plain HTTP status, before the upgrade: the official client
//! retries a refused *join* for ever, so bad credentials must never get that far.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use serde::Deserialize;

use super::AppState;
use crate::domain::Device;
use crate::error::ApiError;
use crate::realtime::Realtime;

/// The only protocol version spoken.
const PROTOCOL_VERSION: &str = "2.0.0";

/// How the `phoenix` client's `authToken` option rides in `Sec-WebSocket-Protocol`.
const AUTH_TOKEN_PREFIX: &str = "base64url.bearer.phx.";

#[derive(Deserialize)]
pub struct SocketParams {
    vsn: Option<String>,
    token: Option<String>,
    device_id: Option<String>,
    device_name: Option<String>,
    device_kind: Option<String>,
}

/// The access token from the subprotocol header, or else from the `token` parameter.
fn presented_token(req: &HttpRequest, params: &SocketParams) -> Result<Option<String>, ApiError> {
    for value in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for protocol in value.split(',').map(str::trim) {
            if let Some(encoded) = protocol.strip_prefix(AUTH_TOKEN_PREFIX) {
                let encoded = encoded.trim_end_matches('=');
                let bytes = STANDARD_NO_PAD
                    .decode(encoded)
                    .or_else(|_| URL_SAFE_NO_PAD.decode(encoded))
                    .map_err(|_| forbidden("The token in Sec-WebSocket-Protocol is not base64."))?;
                let token = String::from_utf8(bytes)
                    .map_err(|_| forbidden("The token in Sec-WebSocket-Protocol is not text."))?;
                return Ok(Some(token));
            }
        }
    }
    Ok(params.token.clone())
}

fn forbidden(detail: &str) -> ApiError {
    ApiError::client(actix_web::http::StatusCode::FORBIDDEN, "forbidden", detail)
}

/// A browser's `Origin` must be the hub's own or on the allow-list; clients that send none
/// (native apps, servers) are not subject to the check.
fn origin_allowed(req: &HttpRequest, allowed: Option<&[String]>) -> bool {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    else {
        return true;
    };
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    let Some(allowed) = allowed else { return true };
    if allowed.contains(&origin) {
        return true;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    !host.is_empty() && origin_host == host.to_ascii_lowercase()
}

pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    params: web::Query<SocketParams>,
    state: web::Data<AppState>,
    realtime: web::Data<Realtime>,
    client: crate::abuse::ClientIp,
) -> Result<HttpResponse, ApiError> {
    if params.vsn.as_deref() != Some(PROTOCOL_VERSION) {
        return Err(ApiError::bad_request(
            "unsupported_version",
            format!("This server speaks Phoenix protocol vsn={PROTOCOL_VERSION} only."),
        ));
    }
    let token = presented_token(&req, &params)?.ok_or_else(|| {
        ApiError::unauthorized(
            "missing_token",
            "Connecting needs an access token (authToken, or the token parameter).",
        )
    })?;
    let identity = state
        .keys
        .identify(&token)
        .map_err(|e| forbidden(&format!("The access token is not accepted: {e}.")))?;
    if state.sessions.is_revoked(&identity.session).await? {
        return Err(forbidden("This login has ended; log in again."));
    }
    if !origin_allowed(&req, state.settings.origins().as_deref()) {
        return Err(forbidden("This origin may not open sockets here."));
    }
    let device = Device::parse(
        params.device_id.as_deref(),
        params.device_name.as_deref(),
        params.device_kind.as_deref(),
    )?;
    let slot = realtime
        .reserve_socket(identity.user_id, Some(client.0))
        .map_err(|cap| {
            ApiError::client(
                actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_sockets",
                format!("No more sockets: {cap}. Close one first."),
            )
        })?;
    state
        .sightings
        .record(identity.user_id, &device)
        .await
        .map_err(crate::store::StoreError::Shared)?;

    realtime
        .accept(&req, body, identity, device, client.0, slot)
        .map_err(|e| ApiError::bad_request("not_a_websocket", format!("The upgrade failed: {e}.")))
}
