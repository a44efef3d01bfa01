//! The operator's endpoints under `/admin/` (operator token only; without one configured
//! they answer 404): the blocked addresses, and the background jobs.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::extract::require_operator;
use crate::abuse::{Guard, address_key};
use crate::domain::InvalidInput;
use crate::error::ApiError;
use crate::jobs::{Jobs, Options};
use crate::store::blocks;
use crate::store::jobs as store_jobs;

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

/// The job queues could not be read or changed: 503, naming the part.
fn jobs_unavailable(error: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Unavailable {
        part: "the job queues",
        source: Box::new(error),
    }
}

/// Dead letters listed by `GET /admin/jobs`.
const DEAD_LISTED: usize = 100;

/// `GET /admin/jobs` → per queue waiting and in flight, delayed, dead (the first 100 listed
/// with their last error), the scheduler's leader and this replica's name, and the upkeep's
/// latest runs.
pub async fn jobs_status(
    req: HttpRequest,
    state: web::Data<AppState>,
    jobs: web::Data<Jobs>,
    realtime: web::Data<crate::realtime::Realtime>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    let status = jobs.status().await.map_err(jobs_unavailable)?;
    let dead = jobs.dead(DEAD_LISTED).await.map_err(jobs_unavailable)?;
    let mut pooled = state.store.conn().await?;
    let runs = store_jobs::recent_runs(&mut pooled.conn(), crate::upkeep::UPKEEP_JOB, 10).await?;
    let runs: Vec<_> = runs
        .iter()
        .map(|run| {
            json!({
                "tick": run.tick,
                "job_id": run.job_id,
                "epoch": run.epoch,
                "ran_at": run.ran_at.and_utc().to_rfc3339(),
                "removed": run.removed,
                "doubled": run.doubled,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "backend": status.backend,
        "queues": status.queues,
        "delayed": status.delayed,
        "dead": status.dead,
        "leader": status.leader,
        "replica": realtime.replica.to_string(),
        "dead_jobs": dead,
        "periodic": [{
            "job": crate::upkeep::UPKEEP_JOB,
            "schedule": state.settings.upkeep_schedule,
            "recent_runs": runs,
        }],
    })))
}

/// `POST /admin/jobs/dead/{id}/retry` → 200 `{retried: id}`, back in its queue with fresh
/// attempts; 404 `no_such_job` when no dead job has that id.
pub async fn retry_dead_job(
    req: HttpRequest,
    state: web::Data<AppState>,
    jobs: web::Data<Jobs>,
    path: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    let id = path.into_inner();
    if !jobs.retry_dead(id).await.map_err(jobs_unavailable)? {
        return Err(no_such_job(id));
    }
    Ok(HttpResponse::Ok().json(json!({ "retried": id })))
}

/// `DELETE /admin/jobs/dead/{id}` → 204; 404 `no_such_job` when no dead job has that id.
pub async fn drop_dead_job(
    req: HttpRequest,
    state: web::Data<AppState>,
    jobs: web::Data<Jobs>,
    path: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    let id = path.into_inner();
    if !jobs.drop_dead(id).await.map_err(jobs_unavailable)? {
        return Err(no_such_job(id));
    }
    Ok(HttpResponse::NoContent().finish())
}

fn no_such_job(id: u64) -> ApiError {
    ApiError::not_found("no_such_job", format!("No dead job has id {id}."))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProbes {
    count: u32,
    #[serde(default)]
    work_ms: u64,
}

/// Most probes one request enqueues.
pub const MAX_PROBES: u32 = 10_000;

/// `POST /admin/jobs/probes` `{count, work_ms?}` → 202 `{ids}`: `count` probe jobs, each
/// waiting `work_ms` then recording its id in the store's `job_probes` (an end-to-end check
/// of the workers; the crash tests count these rows).
pub async fn enqueue_probes(
    req: HttpRequest,
    state: web::Data<AppState>,
    jobs: web::Data<Jobs>,
    body: web::Json<NewProbes>,
) -> Result<HttpResponse, ApiError> {
    require_operator(&req, &state)?;
    if !(1..=MAX_PROBES).contains(&body.count) {
        return Err(InvalidInput::new("count", "must be 1 to 10000").into());
    }
    let most = u64::try_from(crate::upkeep::MAX_PROBE_WORK.as_millis()).unwrap_or(u64::MAX);
    if body.work_ms > most {
        return Err(InvalidInput::new("work_ms", "must be at most 60000 (a minute)").into());
    }
    let probe = crate::upkeep::Probe {
        work_ms: body.work_ms,
    };
    let mut ids = Vec::with_capacity(body.count as usize);
    for _ in 0..body.count {
        let id = jobs
            .enqueue(&crate::upkeep::PROBE, &probe, Options::default())
            .await
            .map_err(jobs_unavailable)?;
        ids.extend(id);
    }
    Ok(HttpResponse::Accepted().json(json!({ "ids": ids })))
}
