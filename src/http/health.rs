//! Liveness, readiness and metrics.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::error::ApiError;
use crate::telemetry::Metrics;

/// How long a readiness probe waits for each part before calling it unreachable.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The process is up and serving.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The hub can do its work: the store answers, and Redis too when configured. Otherwise 503
/// naming the parts that failed.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let store = tokio::time::timeout(READINESS_TIMEOUT, state.store.ping()).await;
    let mut failing = Vec::new();
    if !matches!(store, Ok(Ok(()))) {
        failing.push("store");
    }
    if let Some(pool) = &state.redis
        && !matches!(
            tokio::time::timeout(READINESS_TIMEOUT, crate::redis::ping(pool)).await,
            Ok(Ok(()))
        )
    {
        failing.push("redis");
    }
    if failing.is_empty() {
        HttpResponse::Ok().json(json!({
            "status": "ready",
            "store": state.store.backend_name(),
            "redis": state.redis.is_some(),
        }))
    } else {
        HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE).json(json!({
            "detail": format!("Not ready: {} unreachable.", failing.join(" and ")),
            "code": "not_ready",
            "failing": failing,
        }))
    }
}

/// Prometheus text exposition.
/// Prometheus text; with `SEGUE_OPERATOR_TOKEN` set, only for the operator.
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
) -> Result<HttpResponse, ApiError> {
    if state.settings.operator_token().is_some() {
        super::extract::require_operator(&req, &state)?;
    }
    let body = metrics.render().map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body))
}
