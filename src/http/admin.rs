//! The operator's endpoints under `/admin/` (operator token only): the blocked addresses.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::require_operator;
use crate::abuse::{Guard, address_key};
use crate::domain::InvalidInput;
use crate::error::ApiError;
use crate::store::blocks;

/// Longest block an operator may set: 30 days.
pub const MAX_BLOCK_SECS: u64 = 30 * 86_400;

/// An address as typed (`203.0.113.7`, `2001:db8::1`, or an IPv6 `/64` as the block list
/// shows it, `2001:db8::/64`) → the key blocks are kept by. Loopback and unspecified
/// addresses are refused: blocking them would shut out the machine itself.
pub fn parse_address(raw: &str) -> Result<String, InvalidInput> {
    let raw = raw.trim();
    let ip = match raw.strip_suffix("/64") {
        Some(prefix) => prefix
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(std::net::IpAddr::V6),
        None => raw.parse::<std::net::IpAddr>().ok(),
    }
    .ok_or_else(|| InvalidInput::new("address", "must be an IPv4 or IPv6 address"))?;
    if ip.is_loopback() || ip.is_unspecified() {
        return Err(InvalidInput::new(
            "address",
            "a loopback or unspecified address cannot be blocked",
        ));
    }
    Ok(address_key(ip))
}

/// `GET /admin/blocks` → `{"blocks": [{address, until, reason, created_at}]}`.
pub async fn list_blocks(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    let mut pooled = state.store.conn().await?;
    let active = blocks::active(&mut pooled.conn(), crate::store::now()).await?;
    let listed: Vec<_> = active
        .iter()
        .map(|b| {
            json!({
                "address": b.address,
                "until": b.until.and_utc().to_rfc3339(),
                "reason": b.reason,
                "created_at": b.created_at.and_utc().to_rfc3339(),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "blocks": listed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBlock {
    address: String,
    ttl_secs: Option<u64>,
}

/// `POST /admin/blocks` `{address, ttl_secs?}` → 201 `{address, until}`; on every replica
/// within a second.
pub async fn add_block(
    req: HttpRequest,
    state: web::Data<AppState>,
    guard: web::Data<Guard>,
    body: web::Json<NewBlock>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    let address = parse_address(&body.address)?;
    let ttl = body.ttl_secs.unwrap_or(state.settings.ip_block_secs);
    if !(1..=MAX_BLOCK_SECS).contains(&ttl) {
        return Err(InvalidInput::new("ttl_secs", "must be 1 to 2592000 (30 days)").into());
    }
    let until = guard
        .block(&address, Duration::from_secs(ttl), "operator")
        .await?;
    Ok(HttpResponse::Created().json(json!({ "address": address, "until_ms": until })))
}

/// `DELETE /admin/blocks/{address}` → 204, whether or not it was blocked.
pub async fn remove_block(
    req: HttpRequest,
    state: web::Data<AppState>,
    guard: web::Data<Guard>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    let address = parse_address(&path.into_inner())?;
    guard.unblock(&address).await?;
    Ok(HttpResponse::NoContent().finish())
}
