use serde_json::{Value, json};

use crate::helpers::{TestApp, error_code};

crate::on_both_backends!(
    tracks_are_upserted_and_read_back,
    an_upsert_replaces_a_track_and_reuses_artists,
    an_invalid_batch_stores_nothing,
    unknown_tracks_are_404,
    writing_the_catalog_needs_a_token,
    only_the_account_that_created_a_track_may_replace_it,
);

/// Issue 10, defect 9: any account could replace any catalog track that others' queues show.
async fn only_the_account_that_created_a_track_may_replace_it(app: TestApp) {
    let (alice, mallory) = (app.register().await, app.register().await);
    let batch = |title: &str| {
        json!({"tracks": [
            {"id": "mine", "title": title, "artist": "Alice"},
        ]})
    };
    let response = app
        .post_json_authed("/tracks", &alice.access_token, &batch("Original"))
        .await;
    assert_eq!(response.status(), 200);
    // Another account's batch that touches it is refused whole, naming the track.
    let mixed = json!({"tracks": [
        {"id": "new-one", "title": "Fresh", "artist": "Mallory"},
        {"id": "mine", "title": "Defaced", "artist": "Mallory"},
    ]});
    let response = app
        .post_json_authed("/tracks", &mallory.access_token, &mixed)
        .await;
    let body: Value = {
        assert_eq!(response.status(), 403);
        response.json().await.unwrap()
    };
    assert_eq!(body["code"], "track_not_yours");
    assert!(
        body["detail"].as_str().unwrap().starts_with("track 1:"),
        "{body}"
    );
    let track: Value = app.get("/tracks/mine").await.json().await.unwrap();
    assert_eq!(track["title"], "Original");
    assert_eq!(app.get("/tracks/new-one").await.status(), 404);
    // Its creator may.
    let response = app
        .post_json_authed("/tracks", &alice.access_token, &batch("Remastered"))
        .await;
    assert_eq!(response.status(), 200);
    let track: Value = app.get("/tracks/mine").await.json().await.unwrap();
    assert_eq!(track["title"], "Remastered");
}

async fn tracks_are_upserted_and_read_back(app: TestApp) {
    let account = app.register().await;
    let tracks = json!([
        {"id": "t1", "title": "Blue in Green", "artist": "Miles Davis", "album": "Kind of Blue", "duration_ms": 337000, "image_url": "https://img.example/kob.jpg"},
        {"id": "at://did:plc:x/fm.plyr.track/2", "title": "So What", "artist": "Miles Davis"},
    ]);
    let response = app
        .post_json_authed("/tracks", &account.access_token, &json!({"tracks": tracks}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["upserted"], 2);

    let t1: Value = app.get("/tracks/t1").await.json().await.unwrap();
    assert_eq!(
        t1,
        json!({"id": "t1", "title": "Blue in Green", "artist": "Miles Davis", "album": "Kind of Blue", "duration_ms": 337000, "image_url": "https://img.example/kob.jpg"})
    );
    let t2 = app
        .get("/tracks/at:%2F%2Fdid:plc:x%2Ffm.plyr.track%2F2")
        .await;
    assert_eq!(t2.status(), 200);
    let t2: Value = t2.json().await.unwrap();
    assert_eq!(t2["title"], "So What");
    assert_eq!(t2["album"], Value::Null);
}

async fn an_upsert_replaces_a_track_and_reuses_artists(app: TestApp) {
    let account = app.register().await;
    app.seed_tracks(
        &account,
        &json!([{"id": "t1", "title": "Old", "artist": "A", "duration_ms": 1000}]),
    )
    .await;
    app.seed_tracks(
        &account,
        &json!([
            {"id": "t1", "title": "New", "artist": "B"},
            {"id": "t2", "title": "Other", "artist": "A"},
        ]),
    )
    .await;
    let t1: Value = app.get("/tracks/t1").await.json().await.unwrap();
    assert_eq!(t1["title"], "New");
    assert_eq!(t1["artist"], "B");
    assert_eq!(t1["duration_ms"], Value::Null);
    let t2: Value = app.get("/tracks/t2").await.json().await.unwrap();
    assert_eq!(t2["artist"], "A");
}

async fn an_invalid_batch_stores_nothing(app: TestApp) {
    let account = app.register().await;
    let cases = [
        json!([{"id": "ok", "title": "Fine", "artist": "A"}, {"id": "bad", "title": "Long", "artist": "A", "duration_ms": -5}]),
        json!([{"id": "ok", "title": "Fine", "artist": "A"}, {"id": "ok", "title": "Twice", "artist": "A"}]),
        json!([{"id": "ok", "title": "", "artist": "A"}]),
        json!([{"id": "ok", "title": "Fine", "artist": "A", "image_url": "javascript:alert(1)"}]),
        json!([{"id": " ok", "title": "Fine", "artist": "A"}]),
        json!([]),
    ];
    for tracks in cases {
        let response = app
            .post_json_authed("/tracks", &account.access_token, &json!({"tracks": tracks}))
            .await;
        assert_eq!(error_code(response, 422).await, "invalid_input", "{tracks}");
    }
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("t{i}"), "title": "T", "artist": "A"}))
        .collect();
    let response = app
        .post_json_authed(
            "/tracks",
            &account.access_token,
            &json!({"tracks": too_many}),
        )
        .await;
    assert_eq!(error_code(response, 422).await, "invalid_input");
    assert_eq!(app.get("/tracks/ok").await.status(), 404);
    assert_eq!(app.get("/tracks/t0").await.status(), 404);
}

async fn unknown_tracks_are_404(app: TestApp) {
    assert_eq!(
        error_code(app.get("/tracks/nope").await, 404).await,
        "track_not_found"
    );
}

async fn writing_the_catalog_needs_a_token(app: TestApp) {
    let response = app
        .post_json(
            "/tracks",
            &json!({"tracks": [{"id": "t", "title": "T", "artist": "A"}]}),
        )
        .await;
    assert_eq!(error_code(response, 401).await, "missing_token");
    assert_eq!(app.get("/tracks/t").await.status(), 404);
}
