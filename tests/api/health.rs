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

/// Issue 10, defect 6: every made-up HTTP method added a label value to `/metrics`.
#[actix_web::test]
async fn made_up_methods_and_paths_do_not_grow_the_metrics() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        app.client
            .request(method, app.url(&format!("/made/up/{i}")))
            .send()
            .await
            .unwrap();
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(!text.contains("INVENTED"), "{text}");
    let counted = text
        .lines()
        .find(|l| l.starts_with(r#"segue_http_requests_total{method="OTHER""#))
        .unwrap_or_else(|| panic!("no OTHER line in {text}"));
    assert!(counted.ends_with(" 50"), "{counted}");
}

/// With `SEGUE_OPERATOR_TOKEN` set, `/metrics` answers only to the operator.
#[actix_web::test]
async fn metrics_can_be_kept_for_the_operator() {
    let operator = "operator-token-operator-token-0123456789";
    let app = TestApp::spawn_tuned(Backend::Sqlite, |s| {
        s.operator_token = Some(operator.into());
    })
    .await;
    assert_eq!(
        error_code(app.get("/metrics").await, 401).await,
        "missing_token"
    );
    let account = app.register().await;
    assert_eq!(
        error_code(
            app.get_with_token("/metrics", &account.access_token).await,
            403
        )
        .await,
        "operator_only"
    );
    let response = app.get_with_token("/metrics", operator).await;
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("segue_http_requests_total")
    );
}

/// Issue 10, defect 9: a method a path does not have answered 405 with an empty body and no
/// `Allow`.
#[actix_web::test]
async fn a_method_a_path_lacks_gets_a_json_405_with_allow() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for (method, path, allow) in [
        (reqwest::Method::PATCH, "/healthz", "GET"),
        (reqwest::Method::DELETE, "/queue/", "GET, PUT"),
        (reqwest::Method::GET, "/auth/login", "POST"),
    ] {
        let response = app
            .client
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], allow, "{path}");
        assert_eq!(
            error_code(response, 405).await,
            "method_not_allowed",
            "{path}"
        );
    }
}

/// Issue 10, defect 9: errors from the parts that are not ours (the static file server's
/// 400s, the CORS refusal) were plain text.
#[actix_web::test]
async fn every_error_is_json_even_from_the_file_server_and_cors() {
    let app = TestApp::spawn_tuned(Backend::Sqlite, |s| {
        s.allowed_origins = "https://app.example".into();
    })
    .await;
    // A path the file server refuses to read (a segment starting with a dot).
    let response = app.get("/.hidden").await;
    let status = response.status().as_u16();
    assert!(status == 400 || status == 404, "{status}");
    let body: Value = response.json().await.expect("a JSON body");
    assert!(
        body["code"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    // A browser preflight from an origin that is not allowed.
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/queue/"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "PUT")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("origin"),
        "{body}"
    );
}
