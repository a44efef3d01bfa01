//! The now-playing pipeline: `POST /ingest/plays`, enrichment, artwork in the blob store
//! (local directory and S3 on s3s-fs), serving it, and overlays over SSE.

use std::time::{Duration, Instant};

use reqwest::Response;
use serde_json::{Value, json};

use crate::artwork::jpeg;
use crate::helpers::{Account, Backend, PrivateS3, TestApp, error_code};

/// A report body for a short track (two seconds: a play counts after one of listening).
pub fn short_track(title: &str, progress_ms: i64) -> Value {
    json!({
        "title": title,
        "artist": "The Testers",
        "album": "Loopback",
        "duration_ms": 2_000,
        "progress_ms": progress_ms,
        "is_playing": true,
        "source": "segue-tests",
    })
}

pub async fn ingest_json(app: &TestApp, account: &Account, body: &Value) -> Response {
    app.client
        .post(app.url("/ingest/plays"))
        .bearer_auth(&account.access_token)
        .json(body)
        .send()
        .await
        .expect("ingest")
}

/// A `multipart/form-data` body with a `metadata` part and, when given, an `artwork` part.
pub fn multipart(metadata: &Value, artwork: Option<&[u8]>, extra: Option<&str>) -> (String, Vec<u8>) {
    let boundary = "segue-test-boundary-7d1f";
    let mut body = Vec::new();
    body.extend(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\nContent-Type: application/json\r\n\r\n{metadata}\r\n"
    ).as_bytes());
    if let Some(image) = artwork {
        body.extend(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"artwork\"; filename=\"cover.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        ).as_bytes());
        body.extend(image);
        body.extend(b"\r\n");
    }
    if let Some(name) = extra {
        body.extend(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nx\r\n"
        ).as_bytes());
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub async fn ingest_multipart(
    app: &TestApp,
    account: &Account,
    metadata: &Value,
    artwork: Option<&[u8]>,
) -> Response {
    let (content_type, body) = multipart(metadata, artwork, None);
    app.client
        .post(app.url("/ingest/plays"))
        .bearer_auth(&account.access_token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("ingest")
}

/// Polls `GET /devices/` until the caller's device plays a track for which `done` holds.
pub async fn until_playing(
    app: &TestApp,
    account: &Account,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let devices: Value = app
            .get_with_token("/devices/", &account.access_token)
            .await
            .json()
            .await
            .unwrap();
        let playing = devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == account.device_id.as_str())
            .map(|d| d["now_playing"].clone())
            .unwrap_or(Value::Null);
        if done(&playing) {
            return playing;
        }
        assert!(Instant::now() < deadline, "never got there: {devices}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn history(app: &TestApp, account: &Account) -> Vec<Value> {
    let body: Value = app
        .get_with_token("/history/", &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    body["plays"].as_array().unwrap().clone()
}

crate::on_both_backends!(
    a_report_is_enriched_shown_and_its_play_counted_once,
    bad_reports_are_refused_and_nothing_is_queued,
    the_same_track_reported_by_isrc_or_with_credits_is_one_catalog_track,
);

async fn a_report_is_enriched_shown_and_its_play_counted_once(app: TestApp) {
    let account = app.register().await;
    let response = ingest_json(&app, &account, &short_track("  First   Light ", 0)).await;
    assert_eq!(response.status(), 202);
    let ingest_id = response.json::<Value>().await.unwrap()["ingest_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ingest_id.starts_with("ing_"), "{ingest_id}");
    let playing = until_playing(&app, &account, |p| p["track"]["title"] == "First Light").await;
    assert_eq!(playing["track"]["artist"], "The Testers");
    assert_eq!(playing["progress_ms"], 0);
    let track_id = playing["track_id"].as_str().unwrap().to_owned();
    assert!(track_id.starts_with("np:"), "{track_id}");
    let track: Value = app
        .get_with_token(&format!("/tracks/{track_id}"), &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(track["album"], "Loopback");
    assert!(history(&app, &account).await.is_empty());

    // 1.2 s of listening to a 2 s track: the play counts, once, however often it is sent.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let later = short_track("First Light", 1_200);
    for _ in 0..3 {
        let response = app
            .client
            .post(app.url("/ingest/plays"))
            .bearer_auth(&account.access_token)
            .header("idempotency-key", "report-2")
            .json(&later)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    until_playing(&app, &account, |p| p["progress_ms"] == 1_200).await;
    // A further report of the same play (progress moving on) does not count it again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = ingest_json(&app, &account, &short_track("First Light", 1_500)).await;
    assert_eq!(response.status(), 202);
    until_playing(&app, &account, |p| p["progress_ms"] == 1_500).await;
    let plays = history(&app, &account).await;
    assert_eq!(plays.len(), 1, "{plays:?}");
    assert_eq!(plays[0]["track_id"], track_id.as_str());
}

async fn bad_reports_are_refused_and_nothing_is_queued(app: TestApp) {
    let account = app.register().await;
    let enqueued = r#"segue_jobs_enqueued_total{kind="ingest.play"}"#;
    let mut missing_title = short_track("x", 0);
    missing_title.as_object_mut().unwrap().remove("title");
    let cases: Vec<(Value, u16, &str)> = vec![
        (missing_title, 422, "invalid_input"),
        (json!({"title": "t", "artist": "a", "duration_ms": -5}), 422, "invalid_input"),
        (json!({"title": "t", "artist": "a", "duration_ms": 1000, "progress_ms": 5000}), 422, "invalid_input"),
        (json!({"title": "t", "artist": "a", "duration_ms": 1000, "isrc": "bogus"}), 422, "invalid_input"),
        (json!({"title": "t", "artist": "a", "duration_ms": 1000, "played_at": "2001-01-01T00:00:00Z"}), 422, "invalid_input"),
        (json!(["not", "an", "object"]), 400, "invalid_json"),
    ];
    for (body, status, code) in cases {
        let response = ingest_json(&app, &account, &body).await;
        assert_eq!(error_code(response, status).await, code, "{body}");
    }
    let raw = |content_type: &'static str, body: Vec<u8>| {
        app.client
            .post(app.url("/ingest/plays"))
            .bearer_auth(&account.access_token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let response = raw("application/json", b"{\"title\":".to_vec()).await.unwrap();
    assert_eq!(error_code(response, 400).await, "invalid_json");
    let response = raw("text/plain", b"hello".to_vec()).await.unwrap();
    assert_eq!(error_code(response, 415).await, "unsupported_media_type");
    // Multipart: an unknown part, a missing metadata part, an image over the cap.
    let (content_type, body) = multipart(&short_track("t", 0), None, Some("surprise"));
    let response = app
        .client
        .post(app.url("/ingest/plays"))
        .bearer_auth(&account.access_token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response, 400).await, "bad_multipart");
    let oversized = vec![0u8; app.settings.artwork_max_bytes + 1];
    let response = ingest_multipart(&app, &account, &short_track("t", 0), Some(&oversized)).await;
    assert_eq!(error_code(response, 413).await, "payload_too_large");
    let response = app
        .client
        .post(app.url("/ingest/plays"))
        .header("content-type", "application/json")
        .body(short_track("t", 0).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = app
        .client
        .post(app.url("/ingest/plays"))
        .bearer_auth(&account.access_token)
        .header("idempotency-key", "é".repeat(80))
        .json(&short_track("t", 0))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response, 400).await, "bad_idempotency_key");
    assert_eq!(app.metric(enqueued).await, 0.0);
    // And a good one is queued (so the metric above could have moved).
    let response = ingest_json(&app, &account, &short_track("t", 0)).await;
    assert_eq!(response.status(), 202);
    assert_eq!(app.metric(enqueued).await, 1.0);
}

async fn the_same_track_reported_by_isrc_or_with_credits_is_one_catalog_track(app: TestApp) {
    let account = app.register().await;
    let mut first = short_track("Get Lucky (feat. Pharrell Williams)", 0);
    first["artist"] = json!("Daft Punk");
    first["album"] = json!("Random Access Memories");
    ingest_json(&app, &account, &first).await;
    let one = until_playing(&app, &account, |p| !p["track_id"].is_null()).await;
    let mut second = short_track("get lucky", 0);
    second["artist"] = json!("DAFT PUNK ft. Pharrell Williams");
    second["album"] = json!("Random  Access Memories");
    second["isrc"] = json!("USQX91300108");
    ingest_json(&app, &account, &second).await;
    let two = until_playing(&app, &account, |p| p["track"]["title"] == "Get Lucky (feat. Pharrell Williams)" && p["at"] != one["at"]).await;
    assert_eq!(one["track_id"], two["track_id"]);
    // Now known by its ISRC, whatever the words.
    let mut third = short_track("Completely Different Words", 0);
    third["isrc"] = json!("usqx9-13-00108");
    ingest_json(&app, &account, &third).await;
    let three = until_playing(&app, &account, |p| p["at"] != two["at"] && !p["at"].is_null()).await;
    assert_eq!(three["track_id"], one["track_id"]);
    // The hub's own ids are not for accounts to take.
    let response = app
        .client
        .post(app.url("/tracks"))
        .bearer_auth(&account.access_token)
        .json(&json!({"tracks": [{"id": "isrc:USQX91300108", "title": "Mine", "artist": "Me"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response, 422).await, "invalid_input");
}

/// The renditions an artwork view lists, fetched and decoded: (size, format, width, height).
pub async fn fetch_renditions(app: &TestApp, artwork: &Value) -> Vec<(String, image::ImageFormat, u32, u32)> {
    let mut seen = Vec::new();
    for size in artwork["sizes"].as_array().unwrap() {
        for (key, format) in [("webp", image::ImageFormat::WebP), ("jpeg", image::ImageFormat::Jpeg)] {
            let url = app.url(size[key].as_str().unwrap());
            let response = reqwest::get(&url).await.unwrap();
            assert_eq!(response.status(), 200, "{url}");
            let bytes = response.bytes().await.unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), format, "{url}");
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!(decoded.width(), size["width"].as_u64().unwrap() as u32);
            assert_eq!(decoded.height(), size["height"].as_u64().unwrap() as u32);
            seen.push((size["size"].as_str().unwrap().to_owned(), format, decoded.width(), decoded.height()));
        }
    }
    seen
}

/// A hub on PostgreSQL with its blobs in the local directory (`None`) or on `s3`.
async fn hub_on(s3: Option<&PrivateS3>, tune: impl FnOnce(&mut segue::settings::Settings)) -> TestApp {
    let endpoint = s3.map(PrivateS3::endpoint);
    TestApp::spawn_tuned(Backend::Postgres, move |settings| {
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

async fn artwork_is_shown_after_the_track_and_served_in_every_size(s3: Option<&PrivateS3>) {
    let app = hub_on(s3, |_| {}).await;
    let account = app.register().await;
    let cover = jpeg(900, 600);
    let response = ingest_multipart(&app, &account, &short_track("Cover Story", 0), Some(&cover)).await;
    assert_eq!(response.status(), 202);
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    let artwork = &playing["track"]["artwork"];
    assert_eq!(artwork["hash"], segue::artwork::hash(&cover));
    assert_eq!((artwork["width"].as_u64(), artwork["height"].as_u64()), (Some(900), Some(600)));
    let renditions = fetch_renditions(&app, artwork).await;
    let sizes: Vec<(String, u32, u32)> = renditions
        .iter()
        .filter(|r| r.1 == image::ImageFormat::Jpeg)
        .map(|r| (r.0.clone(), r.2, r.3))
        .collect();
    assert_eq!(
        sizes,
        vec![
            ("thumb".to_owned(), 128, 85),
            ("small".to_owned(), 300, 200),
            ("medium".to_owned(), 640, 427),
            ("large".to_owned(), 900, 600),
        ]
    );
    assert_eq!(app.metric("segue_artwork_rendered_total").await, 1.0);
    assert_eq!(app.metric("segue_artwork_uploads_total").await, 8.0);
    // The catalog's copy of the track carries it too.
    let track_id = playing["track_id"].as_str().unwrap();
    let track: Value = app
        .get_with_token(&format!("/tracks/{track_id}"), &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(track["artwork"]["hash"], artwork["hash"]);
    // Unknown renditions are 404s.
    for path in [
        format!("/artwork/{}/huge.jpg", artwork["hash"].as_str().unwrap()),
        format!("/artwork/{}/thumb.gif", artwork["hash"].as_str().unwrap()),
        "/artwork/nothex/thumb.jpg".to_owned(),
    ] {
        let response = app.get(&path).await;
        assert_eq!(error_code(response, 404).await, "unknown_artwork", "{path}");
    }
    // Reported again: known, so neither decoded nor uploaded again.
    ingest_multipart(&app, &account, &short_track("Cover Story", 500), Some(&cover)).await;
    until_playing(&app, &account, |p| p["progress_ms"] == 500).await;
    assert_eq!(app.metric("segue_artwork_rendered_total").await, 1.0);
    assert_eq!(app.metric("segue_artwork_known_total").await, 1.0);
}

#[actix_web::test]
async fn artwork_on_the_local_store() {
    artwork_is_shown_after_the_track_and_served_in_every_size(None).await;
}

#[actix_web::test]
async fn artwork_on_s3() {
    let s3 = PrivateS3::start("artwork");
    artwork_is_shown_after_the_track_and_served_in_every_size(Some(&s3)).await;
}

#[actix_web::test]
async fn local_artwork_is_served_immutable_with_an_etag() {
    let app = hub_on(None, |_| {}).await;
    let account = app.register().await;
    let cover = jpeg(200, 200);
    ingest_multipart(&app, &account, &short_track("Etag", 0), Some(&cover)).await;
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    let url = playing["track"]["artwork"]["sizes"][0]["webp"].as_str().unwrap().to_owned();
    let response = app.get(&url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(response.headers()["content-type"], "image/webp");
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let again = app
        .client
        .get(app.url(&url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
}

#[actix_web::test]
async fn artwork_on_s3_redirects_to_a_presigned_url_or_the_cdn() {
    let s3 = PrivateS3::start("artwork");
    let app = hub_on(Some(&s3), |_| {}).await;
    let account = app.register().await;
    let cover = jpeg(300, 300);
    ingest_multipart(&app, &account, &short_track("Signed", 0), Some(&cover)).await;
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    let url = playing["track"]["artwork"]["sizes"][1]["jpeg"].as_str().unwrap().to_owned();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_redirects.get(app.url(&url)).send().await.unwrap();
    assert_eq!(response.status(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let cdn = hub_on(Some(&s3), |s| s.s3_public_base_url = Some("https://cdn.example.test/art".into())).await;
    let response = no_redirects.get(cdn.url(&url)).send().await.unwrap();
    assert_eq!(response.status(), 302);
    let hash = playing["track"]["artwork"]["hash"].as_str().unwrap();
    assert_eq!(
        response.headers()["location"],
        format!("https://cdn.example.test/art/artwork/{hash}/small.jpg").as_str()
    );
}

#[actix_web::test]
async fn hostile_images_leave_the_play_recorded_and_the_artwork_refused() {
    let app = hub_on(None, |_| {}).await;
    let account = app.register().await;
    let truncated = {
        let mut cover = jpeg(400, 400);
        cover.truncate(cover.len() / 2);
        cover
    };
    let images: Vec<Vec<u8>> = vec![
        b"definitely not an image".to_vec(),
        truncated,
        crate::artwork::png_claiming(60_000, 60_000),
    ];
    for (n, image) in images.iter().enumerate() {
        let title = format!("Hostile {n}");
        let response = ingest_multipart(&app, &account, &short_track(&title, 0), Some(image)).await;
        assert_eq!(response.status(), 202);
        let playing = until_playing(&app, &account, |p| p["track"]["title"] == title.as_str()).await;
        assert!(playing["track"]["artwork"].is_null());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = || async {
        let mut total = 0.0;
        for reason in ["unknown_format", "unreadable", "too_many_pixels"] {
            total += app
                .metric(&format!("segue_artwork_refused_total{{reason=\"{reason}\"}}"))
                .await;
        }
        total
    };
    while refused().await < 3.0 {
        assert!(Instant::now() < deadline, "not every image was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("segue_artwork_rendered_total").await, 0.0);
    assert_eq!(app.metric("segue_artwork_uploads_total").await, 0.0);
}
