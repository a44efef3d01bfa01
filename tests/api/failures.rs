//! The hub with its database or Redis gone: clear, quick failures, and recovery.

use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::Value;

use crate::helpers::{PrivatePostgres, PrivateRedis, TestApp, error_code, temp_dir, test_settings};

/// A hub on a private PostgreSQL cluster that the test may stop.
async fn app_on_private_postgres(pg: &PrivatePostgres) -> TestApp {
    let url = pg.url("postgres");
    let setup = async move {
        let mut admin = AsyncPgConnection::establish(&url)
            .await
            .expect("connect private pg");
        admin
            .batch_execute("CREATE DATABASE segue")
            .await
            .expect("create db");
    };
    crate::helpers::block_on_thread(setup);
    let dir = temp_dir("pg_failure");
    let mut settings = test_settings(&dir);
    settings.database_url = Some(pg.url("segue").into());
    TestApp::spawn_with(settings, dir, None).await
}

#[actix_web::test]
async fn a_fresh_postgres_database_is_migrated_at_start_up() {
    let pg = PrivatePostgres::start();
    let app = app_on_private_postgres(&pg).await;
    // Registration writes users, refresh_tokens and devices: the migrations ran.
    let account = app.register().await;
    assert_eq!(
        app.login_raw(&account.handle, &account.password)
            .await
            .status(),
        200
    );
}

#[actix_web::test]
async fn readyz_reports_a_stopped_database_and_requests_fail_fast() {
    let pg = PrivatePostgres::start();
    let app = app_on_private_postgres(&pg).await;
    let account = app.register().await;
    assert_eq!(app.get("/readyz").await.status(), 200);

    pg.halt();
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_ready");
    assert_eq!(body["failing"], serde_json::json!(["store"]));

    let started = Instant::now();
    let response = app.login_raw(&account.handle, &account.password).await;
    let elapsed = started.elapsed();
    assert_eq!(error_code(response, 503).await, "unavailable");
    assert!(
        elapsed < Duration::from_secs(3),
        "login took {elapsed:?} with the database down"
    );

    // Back up: the hub recovers without a restart.
    pg.resume();
    assert!(app.wait_until_ready().await, "readyz never recovered");
    assert_eq!(
        app.login_raw(&account.handle, &account.password)
            .await
            .status(),
        200
    );
}

#[actix_web::test]
async fn readyz_reports_a_stopped_redis() {
    let mut redis = PrivateRedis::start();
    let dir = temp_dir("redis_failure");
    let mut settings = test_settings(&dir);
    settings.redis_url = Some(redis.url().into());
    let app = TestApp::spawn_with(settings, dir, None).await;
    let body: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["redis"], true);

    redis.halt();
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["failing"], serde_json::json!(["redis"]));
    // The store is unaffected: accounts still work without Redis.
    assert_eq!(
        app.register_raw("erin", "correct horse").await.status(),
        201
    );

    redis.resume();
    assert!(
        app.wait_until_ready().await,
        "readyz never recovered after Redis came back"
    );
}

/// Issue 10, defect 7: replicas started together on an empty PostgreSQL database all start
/// (without the migration lock one died on a duplicate key in `pg_type`).
#[actix_web::test]
async fn replicas_started_together_on_an_empty_database_all_start() {
    let admin_url = crate::helpers::admin_database_url();
    let name = crate::helpers::unique("segue_empty");
    let create = format!("CREATE DATABASE \"{name}\"");
    let admin = admin_url.clone();
    crate::helpers::block_on_thread(async move {
        let mut conn = AsyncPgConnection::establish(&admin).await.expect("connect");
        conn.batch_execute(&create)
            .await
            .expect("create an empty database");
    });
    let url = crate::helpers::with_database(&admin_url, &name);
    let dirs: Vec<_> = (0..6).map(|_| temp_dir("migrate_race")).collect();
    let starts = dirs.iter().map(|dir| {
        let mut settings = test_settings(dir);
        settings.database_url = Some(url.clone().into());
        async move { segue::store::Store::connect(&settings).await }
    });
    let outcomes = futures_util::future::join_all(starts).await;
    for outcome in &outcomes {
        if let Err(error) = outcome {
            panic!("a replica failed to start: {}", segue::error::chain(error));
        }
    }
    drop(outcomes);
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    crate::helpers::drop_database_blocking(name);
}
