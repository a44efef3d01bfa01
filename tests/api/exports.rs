//! Exports (`POST /exports`): the CSV parses back to exactly the store's plays, on both
//! backends and both blob stores; the account JSON holds the account and no overlay token;
//! links expire; another account's export is a 404; `export_ready` reaches a device on the
//! other replica; expired exports are deleted; a long history streams in bounded memory.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Account, Backend, PrivateS3, TestApp, error_code};
use segue::domain::UserId;
use segue::presence::plays::Counted;

/// A hub on `backend`, its blobs local or on `s3`.
async fn hub(
    backend: Backend,
    s3: Option<&PrivateS3>,
    tune: impl FnOnce(&mut segue::settings::Settings),
) -> TestApp {
    let endpoint = s3.map(PrivateS3::endpoint);
    TestApp::spawn_tuned(backend, move |settings| {
        if let Some(endpoint) = endpoint {
            settings.s3_bucket = Some("artwork".into());
            settings.s3_endpoint = Some(endpoint);
            settings.s3_access_key_id = Some(crate::helpers::S3_ACCESS_KEY.into());
            settings.s3_secret_access_key = Some(crate::helpers::S3_SECRET_KEY.into());
        }
        tune(settings);
    })
    .await
}

/// Tracks whose words need quoting or would start a formula.
fn tricky_tracks() -> Value {
    json!([
        {"id": "x-formula", "title": "=HYPERLINK(\"http://evil\")", "artist": "@Mention", "album": "+Plus"},
        {"id": "x-quotes", "title": "Comma, \"Quoted\" Title", "artist": "-Minus", "album": "Semi; colon"},
        {"id": "x-plain", "title": "Plain Song", "artist": "Plain Artist"},
    ])
}

/// Records `count` plays for `account` straight in the store (cycling over the tricky tracks
/// and one the catalog lacks), one second apart; returns them as (track id, played at ms).
async fn record_plays(app: &TestApp, account: &Account, count: usize) -> Vec<(String, i64)> {
    let store = segue::store::Store::connect(&app.settings).await.unwrap();
    let mut pooled = store.conn().await.unwrap();
    let mut conn = pooled.conn();
    let ids = ["x-formula", "x-quotes", "x-plain", "not-in-catalog"];
    let start = 1_790_000_000_000i64;
    let mut made = Vec::new();
    for n in 0..count {
        let track = ids[n % ids.len()];
        let at = start + n as i64 * 1_000;
        let play = Counted {
            track_id: track.to_owned(),
            started_at: at - 40_000,
            listened_ms: 30_000 + n as i64,
        };
        let when = chrono::DateTime::from_timestamp_millis(at)
            .unwrap()
            .naive_utc();
        segue::store::plays::record_at(
            &mut conn,
            UserId(account.id),
            &play,
            &account.device_id,
            when,
        )
        .await
        .unwrap();
        made.push((track.to_owned(), at));
    }
    made
}

async fn request_export(app: &TestApp, account: &Account, kind: &str) -> Value {
    let response = app
        .client
        .post(app.url("/exports"))
        .bearer_auth(&account.access_token)
        .json(&json!({"kind": kind}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert!(
        ["pending", "running", "done"].contains(&body["status"].as_str().unwrap()),
        "{body}"
    );
    body
}

async fn until_done(app: &TestApp, account: &Account, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body: Value = app
            .get_with_token(&format!("/exports/{id}"), &account.access_token)
            .await
            .json()
            .await
            .unwrap();
        if body["status"] == "done" {
            return body;
        }
        assert_ne!(body["status"], "failed", "{body}");
        assert!(
            Instant::now() < deadline,
            "the export never finished: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Downloads an export's link: relative links from the hub, absolute ones (presigned) as
/// they are.
async fn download(app: &TestApp, url: &str) -> reqwest::Response {
    let url = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    reqwest::get(url).await.unwrap()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn plays_csv_parses_back_to_the_stores_plays(backend: Backend, s3: Option<&PrivateS3>) {
    let app = hub(backend, s3, |_| {}).await;
    let account = app.register().await;
    app.seed_tracks(&account, &tricky_tracks()).await;
    let made = record_plays(&app, &account, 41).await;
    let requested = request_export(&app, &account, "plays_csv").await;
    let id = requested["id"].as_str().unwrap();
    let done = until_done(&app, &account, id).await;
    assert_eq!(done["rows"], 41);
    let url = done["url"].as_str().unwrap();
    let response = download(&app, url).await;
    assert_eq!(response.status(), 200, "{url}");
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    assert!(disposition.contains("segue-plays-"), "{disposition}");
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, done["bytes"].as_u64().unwrap());

    let mut reader = csv::Reader::from_reader(bytes.as_ref());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, segue::exports::CSV_HEADER);
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), made.len());
    let expected_words = |track: &str| match track {
        "x-formula" => ("'=HYPERLINK(\"http://evil\")", "'@Mention", "'+Plus"),
        "x-quotes" => ("Comma, \"Quoted\" Title", "'-Minus", "Semi; colon"),
        "x-plain" => ("Plain Song", "Plain Artist", ""),
        _ => ("", "", ""),
    };
    for (n, (row, (track, at))) in rows.iter().zip(&made).enumerate() {
        let (title, artist, album) = expected_words(track);
        assert_eq!(&row[0], rfc3339(*at), "row {n}");
        assert_eq!(&row[1], rfc3339(at - 40_000), "row {n}");
        assert_eq!(&row[2], (30_000 + n).to_string(), "row {n}");
        assert_eq!(&row[3], track.as_str(), "row {n}");
        assert_eq!(
            (&row[4], &row[5], &row[6]),
            (title, artist, album),
            "row {n}"
        );
        assert_eq!(&row[7], account.device_id.as_str(), "row {n}");
        assert!(!row[8].is_empty(), "row {n}: the device's name");
    }
    // Nobody else sees it, or gets it with a forged or altered link.
    let stranger = app.register().await;
    let response = app
        .get_with_token(&format!("/exports/{id}"), &stranger.access_token)
        .await;
    assert_eq!(error_code(response, 404).await, "unknown_export");
    if url.starts_with('/') {
        let forged = url.replace("signature=", "signature=x");
        assert_eq!(download(&app, &forged).await.status(), 404);
        let later = url.replacen("expires=", "expires=9", 1);
        assert_eq!(download(&app, &later).await.status(), 404);
    } else {
        assert!(url.contains("X-Amz-Signature="), "{url}");
        assert!(url.contains("response-content-disposition="), "{url}");
    }
}

#[actix_web::test]
async fn plays_csv_on_sqlite_and_the_local_store() {
    plays_csv_parses_back_to_the_stores_plays(Backend::Sqlite, None).await;
}

#[actix_web::test]
async fn plays_csv_on_postgres_and_the_local_store() {
    plays_csv_parses_back_to_the_stores_plays(Backend::Postgres, None).await;
}

#[actix_web::test]
async fn plays_csv_on_postgres_and_s3() {
    let s3 = PrivateS3::start("artwork");
    plays_csv_parses_back_to_the_stores_plays(Backend::Postgres, Some(&s3)).await;
}

#[actix_web::test]
async fn plays_csv_on_sqlite_and_s3() {
    let s3 = PrivateS3::start("artwork");
    plays_csv_parses_back_to_the_stores_plays(Backend::Sqlite, Some(&s3)).await;
}

/// The account JSON holds the profile, devices, queue, follows, overlays (without their
/// tokens) and plays.
#[actix_web::test]
async fn account_json_holds_the_account_and_no_overlay_token() {
    let app = hub(Backend::Postgres, None, |_| {}).await;
    let account = app.register().await;
    let friend = app.register().await;
    app.seed_tracks(&account, &tricky_tracks()).await;
    let followed = app
        .client
        .post(app.url(&format!("/follows/{}", friend.id)))
        .bearer_auth(&account.access_token)
        .send()
        .await
        .unwrap();
    assert!(followed.status().is_success(), "{}", followed.status());
    let overlay = crate::ingest::create_overlay(&app, &account).await;
    let token = overlay["token"].as_str().unwrap().to_owned();
    record_plays(&app, &account, 5).await;
    let requested = request_export(&app, &account, "account_json").await;
    let done = until_done(&app, &account, requested["id"].as_str().unwrap()).await;
    assert_eq!(done["rows"], 5);
    let text = download(&app, done["url"].as_str().unwrap())
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains(&token),
        "the overlay's token is in the export"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["format"], "segue.account.v1");
    assert_eq!(body["profile"]["handle"], account.handle.as_str());
    assert_eq!(body["profile"]["id"], account.id);
    assert!(
        body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device_id"] == account.device_id.as_str()),
        "{body}"
    );
    assert_eq!(body["follows"][0]["handle"], friend.handle.as_str());
    assert_eq!(body["overlays"][0]["id"], overlay["id"]);
    assert_eq!(body["plays"].as_array().unwrap().len(), 5);
    assert_eq!(body["plays"][0]["track_id"], "x-formula");
    assert_eq!(body["plays"][0]["title"], "=HYPERLINK(\"http://evil\")");
    assert!(body.get("preferences").is_some());
}

/// A link stops working when it expires; one export of a kind is in flight at a time; bad
/// requests change nothing.
#[actix_web::test]
async fn links_expire_and_one_export_per_kind_runs_at_a_time() {
    let app = hub(Backend::Postgres, None, |s| s.export_link_secs = 1).await;
    let account = app.register().await;
    for bad in [
        json!({"kind": "everything"}),
        json!({}),
        json!({"kind": "plays_csv", "x": 1}),
    ] {
        let response = app
            .client
            .post(app.url("/exports"))
            .bearer_auth(&account.access_token)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{bad}");
    }
    let listed: Value = app
        .get_with_token("/exports/", &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["exports"], json!([]));
    record_plays(&app, &account, 3).await;
    let requested = request_export(&app, &account, "plays_csv").await;
    let id = requested["id"].as_str().unwrap();
    let done = until_done(&app, &account, id).await;
    let url = done["url"].as_str().unwrap().to_owned();
    assert_eq!(download(&app, &url).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let response = download(&app, &url).await;
    assert_eq!(error_code(response, 403).await, "link_expired");
    // A fresh link works again.
    let again: Value = app
        .get_with_token(&format!("/exports/{id}"), &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        download(&app, again["url"].as_str().unwrap())
            .await
            .status(),
        200
    );

    // In flight: the store refuses a second pending export of a kind.
    let store = segue::store::Store::connect(&app.settings).await.unwrap();
    let mut pooled = store.conn().await.unwrap();
    segue::store::exports::create(
        &mut pooled.conn(),
        "exp_held_by_test",
        UserId(account.id),
        "account_json",
        segue::store::now(),
    )
    .await
    .unwrap();
    let response = app
        .client
        .post(app.url("/exports"))
        .bearer_auth(&account.access_token)
        .json(&json!({"kind": "account_json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response, 409).await, "export_in_flight");
    // Another kind is free.
    request_export(&app, &account, "plays_csv").await;
}

/// Exports past their time are deleted, object and row.
#[actix_web::test]
async fn expired_exports_are_deleted() {
    let app = hub(Backend::Sqlite, None, |s| {
        s.export_keep_secs = 1;
        s.exports_sweep_schedule = "1s".into();
    })
    .await;
    let account = app.register().await;
    record_plays(&app, &account, 2).await;
    let requested = request_export(&app, &account, "plays_csv").await;
    let id = requested["id"].as_str().unwrap();
    until_done(&app, &account, id).await;
    let object = app
        .settings
        .data_dir
        .join("blobs/exports")
        .join(account.id.to_string())
        .join(format!("{id}.csv"));
    assert!(object.is_file(), "{}", object.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = app
            .get_with_token(&format!("/exports/{id}"), &account.access_token)
            .await;
        if response.status() == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the export was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!object.exists());
}

/// `export_ready` reaches the user's device on the other replica.
#[actix_web::test]
async fn export_ready_reaches_a_device_on_another_replica() {
    let replicas = crate::helpers::spawn_cluster(
        2,
        crate::helpers::ClusterBus::Redis(crate::helpers::redis_url()),
    )
    .await;
    let account = replicas[0].register().await;
    let mut socket = crate::phoenix::connect(&replicas[1], &account.access_token).await;
    socket.join_ok(&format!("devices:{}", account.id)).await;
    record_plays(&replicas[0], &account, 2).await;
    let requested = request_export(&replicas[0], &account, "plays_csv").await;
    let frame = socket
        .event(&format!("devices:{}", account.id), "export_ready")
        .await;
    let ready = &frame[4];
    assert_eq!(ready["id"], requested["id"], "{ready}");
    assert_eq!(ready["status"], "done");
    assert_eq!(ready["rows"], 2);
}

/// Inserts `count` plays of `account` straight into the PostgreSQL store at `url`, one a
/// second from 2026-01-01, over 5,000 tracks.
pub async fn bulk_plays(url: &str, account: &Account, count: i64) {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    conn.batch_execute(&format!(
        "INSERT INTO play_history (user_id, track_id, device_id, played_at, started_at, listened_ms) \
         SELECT {user}, 'bulk-' || (g % 5000), '{device}', \
                TIMESTAMP '2026-01-01' + g * INTERVAL '1 second', \
                TIMESTAMP '2026-01-01' + g * INTERVAL '1 second' - INTERVAL '40 seconds', \
                30000 + g % 1000 \
         FROM generate_series(1, {count}) AS g",
        user = account.id,
        device = account.device_id,
    ))
    .await
    .unwrap();
}

/// A million plays export in bounded memory: the hub process's resident set grows by less
/// than 64 MiB while it builds the CSV (pages of 2,000 read by key, 8 MiB parts written as
/// they fill).
#[actix_web::test]
async fn a_million_plays_export_in_bounded_memory() {
    let (name, url) = crate::helpers::fresh_postgres_database().await;
    let _guard = crate::helpers::DatabaseGuard(name);
    let hub = crate::helpers::HubProcess::start(&[("DATABASE_URL", url.as_str())]).await;
    let client = reqwest::Client::new();
    let account = hub.register().await;
    const PLAYS: i64 = 1_000_000;
    bulk_plays(&url, &account, PLAYS).await;
    let before = hub.rss_kib();
    let requested: Value = client
        .post(format!("{}/exports", hub.address))
        .bearer_auth(&account.access_token)
        .json(&json!({"kind": "plays_csv"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = requested["id"].as_str().unwrap().to_owned();
    let (mut peak, started) = (before, Instant::now());
    let done = loop {
        peak = peak.max(hub.rss_kib());
        let body: Value = client
            .get(format!("{}/exports/{id}", hub.address))
            .bearer_auth(&account.access_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["status"] == "done" {
            break body;
        }
        assert_ne!(body["status"], "failed", "{body}");
        assert!(started.elapsed() < Duration::from_secs(300), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let grown = peak.saturating_sub(before);
    eprintln!(
        "exported {PLAYS} plays ({} bytes) in {:.1} s; RSS peak grew by {grown} KiB",
        done["bytes"],
        started.elapsed().as_secs_f64()
    );
    assert_eq!(done["rows"], PLAYS);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    // The file is all there: its size, and a count of its lines.
    let path = hub
        .data_dir()
        .join("blobs/exports")
        .join(account.id.to_string())
        .join(format!("{id}.csv"));
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(size, done["bytes"].as_u64().unwrap());
    let text = std::fs::read(&path).unwrap();
    let lines = text.iter().filter(|b| **b == b'\n').count() as i64;
    assert_eq!(lines, PLAYS + 1, "a header and one line per play");
}

/// Exports asked for are limited per account (each reads the whole history): over the
/// limit, 429 `rate_limited` naming `export_account`, and no export is made.
#[actix_web::test]
async fn asking_for_exports_too_often_is_refused_and_makes_none() {
    let app = TestApp::spawn_tuned(Backend::Sqlite, |s| {
        s.rate_limit_export_account = segue::ratelimit::Limit(Some("2/h".parse().unwrap()));
    })
    .await;
    let account = app.register().await;
    request_export(&app, &account, "plays_csv").await;
    request_export(&app, &account, "account_json").await;
    let refused = app
        .client
        .post(app.url("/exports"))
        .bearer_auth(&account.access_token)
        .json(&json!({"kind": "account_json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["ratelimit-policy"],
        "\"export_account\";q=2;w=3600"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited", "{body}");
    let listed: Value = app
        .get_with_token("/exports/", &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["exports"].as_array().unwrap().len(), 2, "{listed}");
    // Another account has its own budget.
    let other = app.register().await;
    request_export(&app, &other, "plays_csv").await;
}
