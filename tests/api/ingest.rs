//! The now-playing pipeline: `POST /ingest/plays`, enrichment, artwork in the blob store
//! (local directory and S3 on s3s-fs), serving it, and overlays over SSE.

use std::time::{Duration, Instant};

use reqwest::Response;
use serde_json::{Value, json};

use crate::artwork::jpeg;
use crate::helpers::{Account, Backend, PrivateS3, TestApp, error_code};
use crate::wire::{SseEvent, SseParser};

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

pub use crate::wire::multipart;

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
    assert!(app.history(&account).await.is_empty());

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
    let plays = app.history(&account).await;
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
        (
            json!({"title": "t", "artist": "a", "duration_ms": -5}),
            422,
            "invalid_input",
        ),
        (
            json!({"title": "t", "artist": "a", "duration_ms": 1000, "progress_ms": 5000}),
            422,
            "invalid_input",
        ),
        (
            json!({"title": "t", "artist": "a", "duration_ms": 1000, "isrc": "bogus"}),
            422,
            "invalid_input",
        ),
        (
            json!({"title": "t", "artist": "a", "duration_ms": 1000, "played_at": "2001-01-01T00:00:00Z"}),
            422,
            "invalid_input",
        ),
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
    let response = raw("application/json", b"{\"title\":".to_vec())
        .await
        .unwrap();
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
    // Shown in its own report's words (they are this account's, not the catalog's).
    let two = until_playing(&app, &account, |p| {
        p["track"]["title"] == "get lucky" && p["at"] != one["at"]
    })
    .await;
    assert_eq!(one["track_id"], two["track_id"]);
    // Now known to this account by its ISRC, whatever the words.
    let mut third = short_track("Completely Different Words", 0);
    third["isrc"] = json!("usqx9-13-00108");
    ingest_json(&app, &account, &third).await;
    let three = until_playing(&app, &account, |p| {
        p["at"] != two["at"] && !p["at"].is_null()
    })
    .await;
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
pub async fn fetch_renditions(
    app: &TestApp,
    artwork: &Value,
) -> Vec<(String, image::ImageFormat, u32, u32)> {
    let mut seen = Vec::new();
    for size in artwork["sizes"].as_array().unwrap() {
        for (key, format) in [
            ("webp", image::ImageFormat::WebP),
            ("jpeg", image::ImageFormat::Jpeg),
        ] {
            let url = app.url(size[key].as_str().unwrap());
            let response = reqwest::get(&url).await.unwrap();
            assert_eq!(response.status(), 200, "{url}");
            let bytes = response.bytes().await.unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), format, "{url}");
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!(decoded.width(), size["width"].as_u64().unwrap() as u32);
            assert_eq!(decoded.height(), size["height"].as_u64().unwrap() as u32);
            seen.push((
                size["size"].as_str().unwrap().to_owned(),
                format,
                decoded.width(),
                decoded.height(),
            ));
        }
    }
    seen
}

/// A hub on PostgreSQL with its blobs in the local directory (`None`) or on `s3`.
pub async fn hub_on(
    s3: Option<&PrivateS3>,
    tune: impl FnOnce(&mut segue::settings::Settings),
) -> TestApp {
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
    let response =
        ingest_multipart(&app, &account, &short_track("Cover Story", 0), Some(&cover)).await;
    assert_eq!(response.status(), 202);
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    let artwork = &playing["track"]["artwork"];
    assert_eq!(artwork["hash"], segue::artwork::hash(&cover));
    assert_eq!(
        (artwork["width"].as_u64(), artwork["height"].as_u64()),
        (Some(900), Some(600))
    );
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
    // The catalog's copy of the track does not: one account's cover is its own until another
    // account sends the same (tests/api/ingest_trust.rs).
    let track_id = playing["track_id"].as_str().unwrap();
    let track: Value = app
        .get_with_token(&format!("/tracks/{track_id}"), &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(track["id"], track_id);
    assert!(track["artwork"].is_null(), "{track}");
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
    ingest_multipart(
        &app,
        &account,
        &short_track("Cover Story", 500),
        Some(&cover),
    )
    .await;
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
    let url = playing["track"]["artwork"]["sizes"][0]["webp"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = app.get(&url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
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
    let url = playing["track"]["artwork"]["sizes"][1]["jpeg"]
        .as_str()
        .unwrap()
        .to_owned();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_redirects.get(app.url(&url)).send().await.unwrap();
    assert_eq!(response.status(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let cdn = hub_on(Some(&s3), |s| {
        s.s3_public_base_url = Some("https://cdn.example.test/art".into())
    })
    .await;
    let response = no_redirects.get(cdn.url(&url)).send().await.unwrap();
    assert_eq!(response.status(), 302);
    let hash = playing["track"]["artwork"]["hash"].as_str().unwrap();
    assert_eq!(
        response.headers()["location"],
        format!("https://cdn.example.test/art/artwork/{hash}/small.jpg").as_str()
    );
}

/// Reads Server-Sent Events from a streaming response.
pub struct SseReader {
    response: Response,
    parser: SseParser,
}

impl SseReader {
    pub fn new(response: Response) -> Self {
        Self {
            response,
            parser: SseParser::default(),
        }
    }

    /// The next event with data, or `None` once the stream has ended; panics after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.parser.next_event() {
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an SSE event in time")
                .expect("the stream reads");
            match chunk {
                Some(bytes) => self.parser.push(&bytes),
                None => return None,
            }
        }
    }

    /// Events until one for which `done` holds.
    pub async fn until(&mut self, done: impl Fn(&SseEvent) -> bool) -> SseEvent {
        loop {
            let event = self
                .next(Duration::from_secs(15))
                .await
                .expect("stream open");
            if done(&event) {
                return event;
            }
        }
    }
}

pub async fn create_overlay(app: &TestApp, account: &Account) -> Value {
    let response = app
        .client
        .post(app.url("/overlays"))
        .bearer_auth(&account.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn open_events(app: &TestApp, events_url: &str) -> SseReader {
    let response = app.client.get(app.url(events_url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    SseReader::new(response)
}

fn friend_plays(list: &crate::presence::PresenceList, done: impl Fn(&Value) -> bool) -> bool {
    list.keys
        .values()
        .flatten()
        .any(|meta| done(&meta["now_playing"]))
}

/// Two replicas on one PostgreSQL database and one bucket (replicas need a shared blob
/// store), over `bus`.
async fn two_replicas(bus: crate::helpers::ClusterBus, s3: &PrivateS3) -> Vec<TestApp> {
    let endpoint = s3.endpoint();
    crate::helpers::spawn_cluster_tuned(2, bus, move |settings| {
        settings.s3_bucket = Some("artwork".into());
        settings.s3_endpoint = Some(endpoint.clone());
        settings.s3_access_key_id = Some(crate::helpers::S3_ACCESS_KEY.into());
        settings.s3_secret_access_key = Some(crate::helpers::S3_SECRET_KEY.into());
    })
    .await
}

#[actix_web::test]
async fn across_replicas_on_the_memory_bus() {
    let s3 = PrivateS3::start("artwork");
    let replicas = two_replicas(crate::helpers::ClusterBus::Memory, &s3).await;
    a_report_on_one_replica_reaches_devices_friends_and_overlays_on_another(replicas).await;
}

#[actix_web::test]
async fn across_replicas_over_redis() {
    let s3 = PrivateS3::start("artwork");
    let bus = crate::helpers::ClusterBus::Redis(crate::helpers::redis_url());
    let replicas = two_replicas(bus, &s3).await;
    a_report_on_one_replica_reaches_devices_friends_and_overlays_on_another(replicas).await;
}

async fn a_report_on_one_replica_reaches_devices_friends_and_overlays_on_another(
    replicas: Vec<TestApp>,
) {
    let (a, b) = (&replicas[0], &replicas[1]);
    let alice = a.register().await;
    let bob = b.register().await;
    let response = b
        .client
        .post(b.url(&format!("/follows/{}", alice.id)))
        .bearer_auth(&bob.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let mut alice_tv = crate::presence::device_socket(b, &alice, "tv").await;
    let devices = format!("devices:{}", alice.id);
    alice_tv.join_ok(&devices).await;
    let mut bob_phone = crate::presence::device_socket(b, &bob, "phone").await;
    let friends = format!("friends:{}", bob.id);
    bob_phone.join_ok(&friends).await;
    let overlay = create_overlay(a, &alice).await;
    assert!(
        overlay["name"].as_str().unwrap().split('-').count() == 3,
        "{overlay}"
    );
    assert!(overlay["token"].as_str().unwrap().len() >= 43, "{overlay}");
    let mut stream = open_events(b, overlay["events_url"].as_str().unwrap()).await;
    let first = stream.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.event, "track");
    assert!(first.data["playing"].is_null(), "{:?}", first.data);

    let cover = jpeg(640, 640);
    let response = ingest_multipart(a, &alice, &short_track("Across", 0), Some(&cover)).await;
    assert_eq!(response.status(), 202);

    // Alice's other device, on replica B: the track, then the track with its artwork.
    let pushed = alice_tv.event(&devices, "track").await;
    assert_eq!(pushed[4]["track"]["title"], "Across");
    assert_eq!(pushed[4]["device_id"], alice.device_id.as_str());
    let with_art = if pushed[4]["track"]["artwork"].is_null() {
        alice_tv.event(&devices, "track").await
    } else {
        pushed
    };
    let artwork = with_art[4]["track"]["artwork"].clone();
    assert_eq!(artwork["hash"], segue::artwork::hash(&cover));

    // Bob's friends view on B.
    let mut list = crate::presence::PresenceList::default();
    crate::presence::until(&mut bob_phone, &friends, &mut list, |l| {
        friend_plays(l, |n| !n["track"]["artwork"].is_null())
    })
    .await;

    // The overlay stream on B: the track, then its artwork; ids increase.
    let shown = stream
        .until(|e| e.data["playing"]["title"] == "Across")
        .await;
    let art = stream
        .until(|e| !e.data["playing"]["artwork"].is_null())
        .await;
    assert!(
        art.id.parse::<u64>().unwrap() > shown.id.parse::<u64>().unwrap() || shown.id == art.id
    );
    assert_eq!(art.data["playing"]["artist"], "The Testers");
    assert_eq!(fetch_renditions(b, &artwork).await.len(), 8);

    // The overlay page is there while the overlay is.
    let page = b.get(overlay["page_url"].as_str().unwrap()).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("EventSource"));

    // Revoked on A: B's stream ends within a second, and the overlay is gone.
    let revoked_at = Instant::now();
    let response = a
        .client
        .delete(a.url(&format!("/overlays/{}", overlay["id"].as_str().unwrap())))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    while stream.next(Duration::from_secs(2)).await.is_some() {}
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        revoked_at.elapsed()
    );
    for path in [
        overlay["events_url"].as_str().unwrap(),
        overlay["page_url"].as_str().unwrap(),
    ] {
        assert_eq!(error_code(b.get(path).await, 404).await, "unknown_overlay");
    }
}

#[actix_web::test]
async fn the_same_artwork_from_fifty_users_at_once_is_decoded_and_uploaded_once() {
    let s3 = PrivateS3::start("artwork");
    let bus = crate::helpers::ClusterBus::Redis(crate::helpers::redis_url());
    let replicas = two_replicas(bus, &s3).await;
    let mut accounts = Vec::new();
    for n in 0..50 {
        accounts.push((n % 2, replicas[n % 2].register().await));
    }
    let cover = jpeg(1000, 1000);
    let metadata = short_track("Shared Cover", 0);
    let reports = accounts.iter().map(|(replica, account)| {
        ingest_multipart(&replicas[*replica], account, &metadata, Some(&cover))
    });
    for response in futures_util::future::join_all(reports).await {
        assert_eq!(response.status(), 202);
    }
    for (replica, account) in &accounts {
        until_playing(&replicas[*replica], account, |p| {
            !p["track"]["artwork"].is_null()
        })
        .await;
    }
    let mut rendered = 0.0;
    let mut uploaded = 0.0;
    for replica in &replicas {
        rendered += replica.metric("segue_artwork_rendered_total").await;
        uploaded += replica.metric("segue_artwork_uploads_total").await;
    }
    assert_eq!((rendered, uploaded), (1.0, 8.0));
}

#[actix_web::test]
async fn with_s3_away_the_play_is_shown_without_artwork_which_comes_once_s3_is_back() {
    let mut s3 = PrivateS3::start("artwork");
    let app = hub_on(Some(&s3), |s| {
        s.jobs_backoff_base_ms = 100;
        s.jobs_backoff_cap_ms = 300;
        s.jobs_max_attempts = 100;
    })
    .await;
    let account = app.register().await;
    s3.halt();
    let cover = jpeg(500, 500);
    let response = ingest_multipart(
        &app,
        &account,
        &short_track("Offline Cover", 0),
        Some(&cover),
    )
    .await;
    assert_eq!(response.status(), 202);
    let playing = until_playing(&app, &account, |p| p["track"]["title"] == "Offline Cover").await;
    assert!(playing["track"]["artwork"].is_null());
    let retried = r#"segue_jobs_retried_total{kind="artwork.render"}"#;
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.metric(retried).await < 1.0 {
        assert!(Instant::now() < deadline, "the artwork job never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s3.resume();
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    assert_eq!(
        fetch_renditions(&app, &playing["track"]["artwork"])
            .await
            .len(),
        8
    );
}

#[actix_web::test]
async fn an_object_deleted_from_the_bucket_is_uploaded_again_on_the_next_play() {
    let s3 = PrivateS3::start("artwork");
    // Verified artwork is trusted for no time, so the next report looks at the objects.
    let app = hub_on(Some(&s3), |s| s.artwork_verified_secs = 0).await;
    let account = app.register().await;
    let cover = jpeg(400, 400);
    ingest_multipart(&app, &account, &short_track("Vanishing", 0), Some(&cover)).await;
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    let hash = playing["track"]["artwork"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let blobs = segue::blobs::Blobs::S3(segue::blobs::S3Blobs::new(&s3.settings("artwork")));
    let key = segue::blobs::BlobKey::parse(&format!("artwork/{hash}/medium.jpg")).unwrap();
    blobs.delete(&key).await.unwrap();
    assert!(!blobs.exists(&key).await.unwrap());
    ingest_multipart(&app, &account, &short_track("Vanishing", 300), Some(&cover)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !blobs.exists(&key).await.unwrap() {
        assert!(Instant::now() < deadline, "the object never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("segue_artwork_rendered_total").await, 2.0);
    assert_eq!(
        fetch_renditions(&app, &playing["track"]["artwork"])
            .await
            .len(),
        8
    );
}

/// A report's job delivered again (as after a lost acknowledgement) changes nothing twice.
/// Replaying the first report (position 0) and, 1.2 s later, the second (1.2 s in) would,
/// applied afresh, restart the play and count it a second time.
#[actix_web::test]
async fn a_replayed_play_job_changes_nothing_twice() {
    let app = TestApp::spawn_with_redis(Backend::Postgres).await;
    let account = app.register().await;
    let id_of = |body: Value| body["ingest_id"].as_str().unwrap().to_owned();
    let first = id_of(
        ingest_json(&app, &account, &short_track("Replayed", 0))
            .await
            .json()
            .await
            .unwrap(),
    );
    until_playing(&app, &account, |p| p["progress_ms"] == 0).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let second = id_of(
        ingest_json(&app, &account, &short_track("Replayed", 1_200))
            .await
            .json()
            .await
            .unwrap(),
    );
    until_playing(&app, &account, |p| p["progress_ms"] == 1_200).await;
    assert_eq!(app.history(&account).await.len(), 1);

    let client = redis::Client::open(crate::helpers::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("{{{}:jobs}}:q:critical", app.settings.redis_namespace);
    let ran = r#"segue_jobs_succeeded_total{kind="ingest.play"}"#;
    let mut runs = 2.0;
    for (n, (ingest_id, progress)) in [(first, 0), (second, 1_200)].into_iter().enumerate() {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(1_200)).await;
        }
        let job = json!({
            "ingest_id": ingest_id,
            "user": account.id,
            "device_id": account.device_id,
            "received_at": segue::presence::now_ms(),
            "report": {"title": "Replayed", "artist": "The Testers", "album": "Loopback",
                       "duration_ms": 2_000, "isrc": null, "track_number": null,
                       "progress_ms": progress, "is_playing": true, "played_at": null,
                       "source": "segue-tests"},
        });
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("id")
            .arg(9_000_000 + n)
            .arg("kind")
            .arg("ingest.play")
            .arg("attempt")
            .arg(0)
            .arg("payload")
            .arg(job.to_string())
            .query_async::<String>(&mut conn)
            .await
            .unwrap();
        runs += 1.0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while app.metric(ran).await < runs {
            if Instant::now() >= deadline {
                let retried = app
                    .metric(r#"segue_jobs_retried_total{kind="ingest.play"}"#)
                    .await;
                panic!(
                    "replay {n} never ran: {} runs, {retried} retried",
                    app.metric(ran).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(app.history(&account).await.len(), 1);
}
