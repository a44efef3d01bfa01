//! The `RateLimit-Policy` and `RateLimit` response headers of the IETF httpapi draft
//! ("RateLimit header fields for HTTP"): `RateLimit-Policy: "login_ip";q=10;w=20` (a quota of
//! `q` per `w` seconds) and `RateLimit: "login_ip";r=3;t=12` (`r` left, `t` seconds until the
//! whole quota is back).

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Decision, Quota};

pub const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const STATE: HeaderName = HeaderName::from_static("ratelimit");

fn seconds(duration: std::time::Duration) -> u64 {
    duration.as_secs_f64().ceil() as u64
}

/// Sets both headers for `rule` (a fixed name: letters and `_` only).
pub fn insert(headers: &mut HeaderMap, rule: &str, quota: Quota, decision: &Decision) {
    let policy = format!(
        "\"{rule}\";q={};w={}",
        quota.burst().get(),
        seconds(quota.window()).max(1)
    );
    let state = format!(
        "\"{rule}\";r={};t={}",
        decision.remaining,
        seconds(decision.reset_after)
    );
    if let (Ok(policy), Ok(state)) = (HeaderValue::try_from(policy), HeaderValue::try_from(state)) {
        headers.insert(POLICY, policy);
        headers.insert(STATE, state);
    }
}
