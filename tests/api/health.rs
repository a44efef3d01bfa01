use serde_json::Value;

use crate::helpers::{Backend, TestApp, error_code};

crate::on_both_backends!(
    healthz_answers_ok,
    readyz_names_the_store,
    metrics_count_requests,
    unknown_paths_get_a_json_404
);

#[actix_web::test]
async fn readyz_checks_redis_when_it_is_configured() {
    let app = TestApp::spawn_with_redis(Backend::Postgres).await;
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["redis"], true);
    assert_eq!(body["store"], "postgres");
}

async fn healthz_answers_ok(app: TestApp) {
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

async fn readyz_names_the_store(app: TestApp) {
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    let expected = if app.settings.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(body["store"], expected);
}

async fn metrics_count_requests(app: TestApp) {
    app.get("/healthz").await;
    app.get("/healthz").await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#"segue_http_requests_total{method="GET",route="/healthz",status="200"} 2"#),
        "{text}"
    );
    assert!(
        text.contains("segue_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

async fn unknown_paths_get_a_json_404(app: TestApp) {
    assert_eq!(
        error_code(app.get("/no/such/thing").await, 404).await,
        "not_found"
    );
}
