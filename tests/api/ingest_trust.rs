//! What the now-playing pipeline may believe of a report, and in what order it shows them
//! (from the review of the pipeline): one account's reports never rewrite a catalog track for
//! everyone, a refused image never hides good artwork, an older report never replaces a newer
//! one, nothing the hub acknowledged or staged is dropped, and plays count by their own
//! track's length even when the device falls silent.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::artwork::{jpeg, png_claiming};
use crate::helpers::{Account, Backend, PrivateS3, TestApp, error_code, redis_url, unique};
use crate::ingest::{ingest_json, ingest_multipart, until_playing};

/// A hub on PostgreSQL and the shared Redis (jobs, presence, staging), its blobs in the local
/// directory or on `s3`.
async fn redis_hub(
    s3: Option<&PrivateS3>,
    tune: impl FnOnce(&mut segue::settings::Settings),
) -> TestApp {
    let endpoint = s3.map(PrivateS3::endpoint);
    TestApp::spawn_tuned(Backend::Postgres, move |settings| {
        settings.redis_url = Some(redis_url().into());
        settings.redis_namespace = unique("segue_test");
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

fn song(title: &str, duration_ms: i64, isrc: Option<&str>) -> Value {
    json!({
        "title": title,
        "artist": "The Testers",
        "album": "Loopback",
        "duration_ms": duration_ms,
        "progress_ms": 0,
        "is_playing": true,
        "isrc": isrc,
    })
}

async fn until_metric(app: &TestApp, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.metric(name).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {} (wanted {at_least})",
            app.metric(name).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn history_tracks(app: &TestApp, account: &Account) -> Vec<String> {
    app.history(account)
        .await
        .iter()
        .map(|p| p["track_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// One account's report of a track (its spelling, length, ISRC and cover) is that account's
/// own until a second account says the same: it does not become the catalog's for everyone
/// (from the review: the first report set the title and length for all, an ISRC stamped on a
/// track by one report sent every later report of that ISRC to it, and any report replaced
/// the track's artwork).
#[actix_web::test]
async fn one_accounts_report_is_not_the_catalog_until_another_agrees() {
    let app = crate::ingest::hub_on(None, |_| {}).await;
    let mut accounts = Vec::new();
    for _ in 0..6 {
        accounts.push(app.register().await);
    }
    let [first, second, third, fourth, fifth, sixth] = &accounts[..] else {
        unreachable!()
    };
    let cover = jpeg(300, 300);
    let wrong = song("SHARED SONG", 1_000, Some("USRC17607839"));
    assert_eq!(
        ingest_multipart(&app, first, &wrong, Some(&cover))
            .await
            .status(),
        202
    );
    let shown = until_playing(&app, first, |p| !p["track"]["artwork"].is_null()).await;
    assert_eq!(shown["track"]["title"], "SHARED SONG");
    assert_eq!(shown["track"]["duration_ms"], 1_000);
    let hash = shown["track"]["artwork"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // Another account playing the same song sees its own report, not the first one's.
    ingest_json(&app, second, &song("Shared Song", 240_000, None)).await;
    let seen = until_playing(&app, second, |p| p["track"]["title"] == "Shared Song").await;
    assert_eq!(seen["track"]["duration_ms"], 240_000, "{seen}");
    assert!(seen["track"]["artwork"].is_null(), "{seen}");
    assert_eq!(seen["track_id"], shown["track_id"], "one catalog track");

    // The first account's ISRC was never confirmed: another song reported with it is its own.
    ingest_json(
        &app,
        third,
        &song("Another Song", 200_000, Some("USRC17607839")),
    )
    .await;
    let other = until_playing(&app, third, |p| !p.is_null()).await;
    assert_eq!(other["track"]["title"], "Another Song", "{other}");
    assert_ne!(other["track_id"], shown["track_id"]);

    // A second account sending the same cover confirms it: now everyone sees it.
    ingest_multipart(
        &app,
        second,
        &song("Shared Song", 240_000, None),
        Some(&cover),
    )
    .await;
    until_playing(&app, second, |p| {
        p["track"]["artwork"]["hash"] == hash.as_str()
    })
    .await;
    ingest_json(&app, fourth, &song("Shared Song", 240_000, None)).await;
    let confirmed = until_playing(&app, fourth, |p| !p.is_null()).await;
    assert_eq!(
        confirmed["track"]["artwork"]["hash"],
        hash.as_str(),
        "{confirmed}"
    );

    // Once the track has artwork, no report replaces it for others.
    let other_cover = jpeg(320, 320);
    ingest_multipart(
        &app,
        third,
        &song("Shared Song", 240_000, None),
        Some(&other_cover),
    )
    .await;
    until_playing(&app, third, |p| {
        p["track"]["title"] == "Shared Song"
            && !p["track"]["artwork"].is_null()
            && p["track"]["artwork"]["hash"] != hash.as_str()
    })
    .await;
    let mut later = song("Shared Song", 240_000, None);
    later["progress_ms"] = json!(5_000);
    ingest_json(&app, fourth, &later).await;
    let still = until_playing(&app, fourth, |p| p["progress_ms"] == 5_000).await;
    assert_eq!(still["track"]["artwork"]["hash"], hash.as_str(), "{still}");

    // Unless more accounts come to say otherwise: two against two keeps it, three replace it.
    let other_hash = segue::artwork::hash(&other_cover);
    for (n, who) in [fourth, fifth].into_iter().enumerate() {
        let mut report = song("Shared Song", 240_000, None);
        report["progress_ms"] = json!(10_000 + n);
        ingest_multipart(&app, who, &report, Some(&other_cover)).await;
        until_playing(&app, who, |p| {
            p["track"]["artwork"]["hash"] == other_hash.as_str()
        })
        .await;
    }
    let mut last = song("Shared Song", 240_000, None);
    last["progress_ms"] = json!(20_000);
    ingest_json(&app, sixth, &last).await;
    let outvoted = until_playing(&app, sixth, |p| p["progress_ms"] == 20_000).await;
    assert_eq!(
        outvoted["track"]["artwork"]["hash"],
        other_hash.as_str(),
        "{outvoted}"
    );
}

/// A new cover that will not render leaves the artwork a track had (from the review: the
/// report's hash was attached to the track before rendering, so a refused image hid good
/// artwork for good).
#[actix_web::test]
async fn a_refused_cover_never_hides_the_artwork_a_track_had() {
    let app = crate::ingest::hub_on(None, |_| {}).await;
    let account = app.register().await;
    let good = jpeg(300, 300);
    ingest_multipart(&app, &account, &song("Covered", 200_000, None), Some(&good)).await;
    let shown = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    let hash = shown["track"]["artwork"]["hash"].clone();

    // A PNG whose header is fine but whose pixels are missing: taken, then refused by the job.
    let broken = png_claiming(400, 400);
    let mut again = song("Covered", 200_000, None);
    again["progress_ms"] = json!(1_000);
    let response = ingest_multipart(&app, &account, &again, Some(&broken)).await;
    assert_eq!(response.status(), 202);
    until_metric(
        &app,
        r#"segue_artwork_refused_total{reason="unreadable"}"#,
        1.0,
    )
    .await;

    let mut after = song("Covered", 200_000, None);
    after["progress_ms"] = json!(2_000);
    ingest_json(&app, &account, &after).await;
    let playing = until_playing(&app, &account, |p| p["progress_ms"] == 2_000).await;
    assert_eq!(playing["track"]["artwork"]["hash"], hash, "{playing}");
}

/// A render that runs out of time is tried once more before it is refused (from the review:
/// a timeout counted as an unreadable image at once; and then, that every retry re-ran it).
#[actix_web::test]
async fn a_render_that_runs_out_of_time_is_tried_again() {
    let app = crate::ingest::hub_on(None, |s| {
        s.artwork_render_timeout_ms = 1;
        s.jobs_backoff_base_ms = 50;
        s.jobs_backoff_cap_ms = 100;
        s.jobs_max_attempts = 100;
    })
    .await;
    let account = app.register().await;
    let big = jpeg(2_400, 2_400);
    let response = ingest_multipart(&app, &account, &song("Slow", 200_000, None), Some(&big)).await;
    assert_eq!(response.status(), 202);
    // Tried once more, then refused as too slow (not as unreadable, and not for every retry).
    until_metric(
        &app,
        r#"segue_artwork_refused_total{reason="too_slow"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        app.metric(r#"segue_jobs_retried_total{kind="artwork.render"}"#)
            .await,
        1.0
    );
    assert_eq!(
        app.metric(r#"segue_artwork_refused_total{reason="unreadable"}"#)
            .await,
        0.0
    );
    let playing = until_playing(&app, &account, |p| p["track"]["title"] == "Slow").await;
    assert!(playing["track"]["artwork"].is_null());
}

/// A report applied after a newer one reached the device's presence does not replace it
/// (from the review: whichever job showed last won, so a late job showed an old track).
#[actix_web::test]
async fn an_older_report_never_replaces_what_a_device_shows() {
    let app = redis_hub(None, |_| {}).await;
    let account = app.register().await;
    ingest_json(&app, &account, &song("First", 200_000, None)).await;
    until_playing(&app, &account, |p| p["track"]["title"] == "First").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let between = segue::presence::now_ms();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The player says something newer over the plain presence API.
    let response = app
        .client
        .post(app.url("/now-playing/"))
        .bearer_auth(&account.access_token)
        .json(&json!({"track_id": "rest-track", "progress_ms": 5_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    until_playing(&app, &account, |p| p["track_id"] == "rest-track").await;

    // A report received before that, applied only now (a retried job).
    let job = json!({
        "ingest_id": "ing_late_report",
        "user": account.id,
        "device_id": account.device_id,
        "received_at": between,
        "report": {"title": "Stale", "artist": "The Testers", "album": null,
                   "duration_ms": 200_000, "isrc": null, "track_number": null,
                   "progress_ms": 0, "is_playing": true, "played_at": null, "source": null},
    });
    let ran = r#"segue_jobs_succeeded_total{kind="ingest.play"}"#;
    let before = app.metric(ran).await;
    let stream = format!("{{{}:jobs}}:q:critical", app.settings.redis_namespace);
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("id")
        .arg(9_100_000)
        .arg("kind")
        .arg("ingest.play")
        .arg("attempt")
        .arg(0)
        .arg("payload")
        .arg(job.to_string())
        .query_async(&mut redis().await)
        .await
        .unwrap();
    until_metric(&app, ran, before + 1.0).await;
    // The job handed its presence write to the presence actor before it finished; a report
    // from another device of the account, handed over after it, is written after it.
    let other: Value = app
        .login_raw(&account.handle, &account.password)
        .await
        .json()
        .await
        .unwrap();
    let marker = app
        .client
        .post(app.url("/now-playing/"))
        .bearer_auth(other["access_token"].as_str().unwrap())
        .json(&json!({"track_id": "marker-track"}))
        .send()
        .await
        .unwrap();
    assert_eq!(marker.status(), 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    let devices = loop {
        let devices: Value = app
            .get_with_token("/devices/", &account.access_token)
            .await
            .json()
            .await
            .unwrap();
        let marked = devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["now_playing"]["track_id"] == "marker-track");
        if marked {
            break devices;
        }
        assert!(
            Instant::now() < deadline,
            "the marker never showed: {devices}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mine = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == account.device_id.as_str())
        .unwrap();
    assert_eq!(mine["now_playing"]["track_id"], "rest-track", "{devices}");
}

/// A play shown before its artwork is told when the artwork comes even if the first try to
/// tell it failed (from the review: the waiting plays were deleted before they were told, so
/// an error on the way lost them).
#[actix_web::test]
async fn the_plays_waiting_for_artwork_are_told_even_after_a_failed_try() {
    let mut s3 = PrivateS3::start("artwork");
    let app = redis_hub(Some(&s3), |s| {
        s.jobs_backoff_base_ms = 100;
        s.jobs_backoff_cap_ms = 200;
        s.jobs_max_attempts = 100;
    })
    .await;
    let account = app.register().await;
    s3.halt();
    let cover = jpeg(300, 300);
    ingest_multipart(
        &app,
        &account,
        &song("Waiting", 200_000, None),
        Some(&cover),
    )
    .await;
    until_playing(&app, &account, |p| p["track"]["title"] == "Waiting").await;

    // The user's presence hash becomes unreadable (WRONGTYPE) while the artwork renders.
    let key = format!("{}:presence:{}", app.settings.redis_namespace, account.id);
    let aside = format!("{key}:aside");
    let mut conn = redis().await;
    let _: () = redis::cmd("RENAME")
        .arg(&key)
        .arg(&aside)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("broken")
        .query_async(&mut conn)
        .await
        .unwrap();
    let retried = r#"segue_jobs_retried_total{kind="artwork.render"}"#;
    s3.resume();
    until_metric(&app, "segue_artwork_rendered_total", 1.0).await;
    let after_render = app.metric(retried).await;
    until_metric(&app, retried, after_render + 1.0).await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("RENAME")
        .arg(&aside)
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();

    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    assert_eq!(playing["track"]["title"], "Waiting");
}

async fn staged_keys(app: &TestApp) -> usize {
    let pattern = format!("{{{}:artwork}}:staged:*", app.settings.redis_namespace);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut redis().await)
        .await
        .unwrap();
    keys.len()
}

/// Bytes that are not a picture the hub renders are refused at the door: nothing is staged
/// or queued (from the review: any bytes up to the cap waited in Redis for a day).
#[actix_web::test]
async fn what_is_not_a_picture_is_refused_before_it_is_staged() {
    let app = redis_hub(None, |_| {}).await;
    let account = app.register().await;
    for (image, why) in [
        (b"definitely not an image".to_vec(), "not an image"),
        (png_claiming(60_000, 60_000), "too many pixels"),
        (
            {
                let mut cut = jpeg(400, 400);
                cut.truncate(cut.len() / 2);
                cut
            },
            "truncated",
        ),
    ] {
        let response =
            ingest_multipart(&app, &account, &song("Junk", 1_000, None), Some(&image)).await;
        assert_eq!(error_code(response, 422).await, "invalid_artwork", "{why}");
    }
    assert_eq!(staged_keys(&app).await, 0);
    assert_eq!(
        app.metric(r#"segue_jobs_enqueued_total{kind="ingest.play"}"#)
            .await,
        0.0
    );
    let mut refused = 0.0;
    for reason in ["unknown_format", "too_many_pixels", "unreadable"] {
        refused += app
            .metric(&format!(
                "segue_artwork_refused_total{{reason=\"{reason}\"}}"
            ))
            .await;
    }
    assert_eq!(refused, 3.0);
}

/// Staged bytes are capped in all: past the cap a report with a new cover is asked to come
/// back later, and the room comes back once the staged covers are rendered.
#[actix_web::test]
async fn staged_covers_are_capped_in_all() {
    let mut s3 = PrivateS3::start("artwork");
    let first = jpeg(200, 200);
    let second = jpeg(210, 210);
    let cap = first.len() + second.len() / 2;
    let app = redis_hub(Some(&s3), |s| {
        s.artwork_staged_max_bytes = cap as u64;
        s.artwork_max_bytes = cap;
        s.jobs_backoff_base_ms = 100;
        s.jobs_backoff_cap_ms = 200;
        s.jobs_max_attempts = 100;
    })
    .await;
    let account = app.register().await;
    s3.halt();
    let response =
        ingest_multipart(&app, &account, &song("One", 200_000, None), Some(&first)).await;
    assert_eq!(response.status(), 202);
    let response =
        ingest_multipart(&app, &account, &song("Two", 200_000, None), Some(&second)).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(error_code(response, 503).await, "busy");
    assert_eq!(staged_keys(&app).await, 1);
    s3.resume();
    until_metric(&app, "segue_artwork_rendered_total", 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response =
            ingest_multipart(&app, &account, &song("Two", 200_000, None), Some(&second)).await;
        if response.status() == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "the room never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_playing(&app, &account, |p| {
        p["track"]["title"] == "Two" && !p["track"]["artwork"].is_null()
    })
    .await;
}

/// Bytes staged by a report whose job was never queued (the replica died in between) are
/// rendered when the next report brings the same cover (from the review: staging said
/// "already there", so no report queued the job for a day).
#[actix_web::test]
async fn a_cover_staged_without_a_job_is_rendered_on_the_next_report() {
    let app = redis_hub(None, |_| {}).await;
    let account = app.register().await;
    let cover = jpeg(260, 260);
    let hash = segue::artwork::hash(&cover);
    let key = format!("{{{}:artwork}}:staged:{hash}", app.settings.redis_namespace);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&cover)
        .arg("EX")
        .arg(3_600)
        .query_async(&mut redis().await)
        .await
        .unwrap();
    ingest_multipart(&app, &account, &song("Orphan", 200_000, None), Some(&cover)).await;
    let playing = until_playing(&app, &account, |p| !p["track"]["artwork"].is_null()).await;
    assert_eq!(playing["track"]["artwork"]["hash"], hash.as_str());
}

/// A play ended by the next track counts by its own length (from the review: only the new
/// track's length was known, so a short track ended by another needed 30 s, not half of it).
#[actix_web::test]
async fn a_play_ended_by_the_next_track_counts_by_its_own_length() {
    let app = crate::ingest::hub_on(None, |_| {}).await;
    let account = app.register().await;
    ingest_json(&app, &account, &song("Short One", 2_000, None)).await;
    let short = until_playing(&app, &account, |p| p["track"]["title"] == "Short One").await;
    let short = short["track_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    ingest_json(&app, &account, &song("Next One", 200_000, None)).await;
    until_playing(&app, &account, |p| p["track"]["title"] == "Next One").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while history_tracks(&app, &account).await != [short.as_str()] {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            history_tracks(&app, &account).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A device that falls silent mid-track has its play counted once the track would have
/// ended (from the review: nothing finished a play nobody reported the end of).
#[actix_web::test]
async fn a_play_is_counted_when_its_device_falls_silent() {
    let app = crate::ingest::hub_on(None, |s| s.play_sweep_schedule = "1s".into()).await;
    let account = app.register().await;
    ingest_json(&app, &account, &song("Last Words", 2_000, None)).await;
    let last = until_playing(&app, &account, |p| p["track"]["title"] == "Last Words").await;
    let deadline = Instant::now() + Duration::from_secs(50);
    while history_tracks(&app, &account).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the silent play was never counted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        history_tracks(&app, &account).await,
        [last["track_id"].as_str().unwrap()]
    );
}

/// Overlays created at once stay within the cap (from the review: count, then insert, let a
/// burst through), on both backends.
#[actix_web::test]
async fn overlays_created_at_once_stay_within_the_cap_on_sqlite() {
    overlays_created_at_once_stay_within_the_cap(Backend::Sqlite).await;
}

#[actix_web::test]
async fn overlays_created_at_once_stay_within_the_cap_on_postgres() {
    overlays_created_at_once_stay_within_the_cap(Backend::Postgres).await;
}

async fn overlays_created_at_once_stay_within_the_cap(backend: Backend) {
    // Two workers, so the requests really run side by side.
    let app = TestApp::spawn_tuned(backend, |s| {
        s.workers = Some(2);
        s.db_pool_size = 8;
    })
    .await;
    let account = app.register().await;
    // The documented cap (docs/protocol.md, "Overlays").
    let max: i64 = 20;
    for _ in 0..max - 1 {
        crate::ingest::create_overlay(&app, &account).await;
    }
    let created = futures_util::future::join_all((0..30).map(|_| async {
        app.client
            .post(app.url("/overlays"))
            .bearer_auth(&account.access_token)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }))
    .await;
    assert_eq!(
        created.iter().filter(|s| **s == 201).count(),
        1,
        "{created:?}"
    );
    assert!(
        created.iter().all(|s| *s == 201 || *s == 409),
        "{created:?}"
    );
    let listed: Value = app
        .get_with_token("/overlays", &account.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["overlays"].as_array().unwrap().len() as i64, max);
}
