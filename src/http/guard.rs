//! The middleware every request passes first: it works out the client's address, refuses a
//! blocked one (403 `ip_blocked`) before any other work, and counts the request against its
//! rate limits (429 `rate_limited`). Allowed answers carry the tightest limit's `RateLimit`
//! headers.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{HttpMessage, ResponseError, web};

use super::AppState;
use crate::abuse::{ClientIp, Guard, Rule, address_key};
use crate::auth::Identity;
use crate::ratelimit::{Decision, Quota, headers};

/// The identity of the request's bearer token, verified by the guard.
#[derive(Clone)]
pub struct Verified(pub Identity);

/// Paths no limit applies to: probes and the operator's scrape.
const UNLIMITED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The limits one request counts against: its rule and the key it is counted by. A valid
/// bearer token's identity is kept in the request for the extractor, which then need not
/// verify the token again.
fn limits_of(req: &ServiceRequest, state: &AppState, address: &str) -> Vec<(Rule, String)> {
    // The path as routing sees it (percent-decoded): `/auth/%6cogin` is `/auth/login`.
    let path = req.match_info().as_str().to_owned();
    if UNLIMITED.contains(&path.as_str()) {
        return Vec::new();
    }
    let caller = super::extract::bearer_in(req.headers())
        .ok()
        .and_then(|token| state.keys.identify(token).ok());
    let mut limits = Vec::with_capacity(2);
    match &caller {
        Some(identity) => limits.push((Rule::Account, identity.user_id.to_string())),
        None => limits.push((Rule::AnonymousIp, address.to_owned())),
    }
    let post = req.method() == Method::POST;
    match path.trim_end_matches('/') {
        "/auth/login" if post => limits.push((Rule::LoginIp, address.to_owned())),
        "/auth/register" if post => limits.push((Rule::RegisterIp, address.to_owned())),
        "/socket/websocket" => limits.push((Rule::SocketIp, address.to_owned())),
        "/exports" if post => {
            if let Some(identity) = &caller {
                limits.push((Rule::ExportAccount, identity.user_id.to_string()));
            }
        }
        "/now-playing" | "/ingest/plays" if post => {
            if let Some(identity) = &caller {
                let device = format!("{}/{}", identity.user_id, identity.device_id.as_str());
                limits.push((Rule::IngestDevice, device));
            }
        }
        _ => {}
    }
    if let Some(identity) = caller {
        req.extensions_mut().insert(Verified(identity));
    }
    limits
}

pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let (Some(guard), Some(state)) = (
        req.app_data::<web::Data<Guard>>().cloned(),
        req.app_data::<web::Data<AppState>>().cloned(),
    ) else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let client = guard.client_ip(super::extract::peer_ip(req.peer_addr()), req.headers());
    req.extensions_mut().insert(ClientIp(client));
    // Probes, the operator's scrape and the operator's own endpoints stay reachable from a
    // blocked address (the operator token guards the latter).
    let exempt = UNLIMITED.contains(&req.match_info().as_str())
        || req.match_info().as_str().starts_with("/admin/");
    if !exempt && let Err(refusal) = guard.refuse_blocked(client) {
        return Ok(req.into_response(refusal.error_response()));
    }
    let address = address_key(client);
    let mut tightest: Option<(Rule, Quota, Decision)> = None;
    for (rule, key) in limits_of(&req, &state, &address) {
        match guard.limit(rule, &key, client).await {
            Ok(Some((quota, decision))) => {
                if tightest.is_none_or(|(_, _, t)| decision.remaining < t.remaining) {
                    tightest = Some((rule, quota, decision));
                }
            }
            Ok(None) => {}
            Err(refusal) => return Ok(req.into_response(refusal.error_response())),
        }
    }
    let mut response = next.call(req).await?.map_into_boxed_body();
    // A handler's own refusal carries its rule's headers; those stay.
    if let Some((rule, quota, decision)) = tightest
        && !response.headers().contains_key(headers::POLICY)
    {
        headers::insert(response.headers_mut(), rule.name(), quota, &decision);
    }
    Ok(response)
}
