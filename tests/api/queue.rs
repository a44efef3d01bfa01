//! The queue REST API: plyr.fm's own queue tests mirrored, plus ETags, ops and hydration.

use reqwest::Response;
use serde_json::{Value, json};

use crate::helpers::{Account, TestApp, error_code};

crate::on_both_backends!(
    a_bad_body_beside_a_pending_session_check_gets_its_answer,
    a_new_user_has_an_empty_queue_at_revision_zero,
    the_first_put_creates_revision_one,
    get_returns_the_saved_state_with_an_etag_equal_to_the_revision,
    put_with_a_matching_if_match_succeeds,
    put_with_a_mismatched_if_match_is_a_conflict,
    put_without_if_match_always_succeeds,
    if_match_may_be_quoted_or_not_and_garbage_is_refused,
    if_none_match_answers_304,
    queues_are_isolated_per_user,
    hydration_keeps_order_and_duplicates_and_drops_unknown_ids,
    invalid_states_are_refused_and_store_nothing,
    unknown_state_fields_are_kept,
    ops_apply_to_the_latest_state_and_report_skips,
    entry_ids_survive_a_snapshot_replace,
    auto_advance_comes_from_preferences,
    a_track_added_after_the_queue_names_it_shows_up_at_once,
);

async fn a_track_added_after_the_queue_names_it_shows_up_at_once(app: TestApp) {
    let account = app.register().await;
    let body: Value = put(&app, &account, plyr_state(&["late"], 0), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["tracks"], json!([]));
    app.seed_tracks(
        &account,
        &json!([{"id": "late", "title": "Late", "artist": "A"}]),
    )
    .await;
    let body: Value = get(&app, &account).await.json().await.unwrap();
    assert_eq!(body["tracks"][0]["title"], "Late");
}

async fn get(app: &TestApp, account: &Account) -> Response {
    app.client
        .get(app.url("/queue/"))
        .bearer_auth(&account.access_token)
        .send()
        .await
        .unwrap()
}

async fn put(app: &TestApp, account: &Account, state: Value, if_match: Option<&str>) -> Response {
    let mut request = app
        .client
        .put(app.url("/queue/"))
        .bearer_auth(&account.access_token)
        .json(&json!({"state": state}));
    if let Some(value) = if_match {
        request = request.header("if-match", value);
    }
    request.send().await.unwrap()
}

async fn ops(app: &TestApp, account: &Account, ops: Value) -> Value {
    let response = app
        .post_json_authed(
            "/queue/ops",
            &account.access_token,
            &json!({"base_revision": 0, "ops": ops}),
        )
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn plyr_state(tracks: &[&str], current: usize) -> Value {
    json!({
        "track_ids": tracks,
        "current_index": current,
        "current_track_id": tracks.get(current),
        "shuffle": false,
        "original_order_ids": tracks,
    })
}

async fn a_new_user_has_an_empty_queue_at_revision_zero(app: TestApp) {
    let account = app.register().await;
    let response = get(&app, &account).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"0\"");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["state"]["track_ids"], json!([]));
    assert_eq!(body["state"]["current_index"], 0);
    assert_eq!(body["state"]["current_track_id"], Value::Null);
    assert_eq!(body["state"]["shuffle"], false);
    assert_eq!(body["state"]["auto_advance"], true);
    assert_eq!(body["state"]["original_order_ids"], json!([]));
    assert_eq!(body["revision"], 0);
    assert_eq!(body["tracks"], json!([]));
    // The same without the trailing slash.
    let bare = app
        .client
        .get(app.url("/queue"))
        .bearer_auth(&account.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 200);
}

async fn the_first_put_creates_revision_one(app: TestApp) {
    let account = app.register().await;
    let mut state = plyr_state(&["track1", "track2", "track3"], 1);
    state["shuffle"] = json!(true);
    let response = put(&app, &account, state.clone(), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["revision"], 1);
    for field in [
        "track_ids",
        "current_index",
        "current_track_id",
        "shuffle",
        "original_order_ids",
    ] {
        assert_eq!(body["state"][field], state[field], "{field}");
    }
    assert!(body["state"]["auto_advance"].is_boolean());
    assert_eq!(body["state"]["entry_ids"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["tracks"], json!([]));
}

async fn get_returns_the_saved_state_with_an_etag_equal_to_the_revision(app: TestApp) {
    let account = app.register().await;
    let state = plyr_state(&["track1", "track2"], 0);
    let revision = put(&app, &account, state.clone(), None)
        .await
        .json::<Value>()
        .await
        .unwrap()["revision"]
        .clone();
    let response = get(&app, &account).await;
    assert_eq!(
        response.headers()["etag"],
        format!("\"{revision}\"").as_str()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["revision"], revision);
    assert_eq!(body["state"]["track_ids"], state["track_ids"]);
    assert_eq!(body["state"]["current_track_id"], "track1");
}

async fn put_with_a_matching_if_match_succeeds(app: TestApp) {
    let account = app.register().await;
    let first: Value = put(&app, &account, plyr_state(&["track1"], 0), None)
        .await
        .json()
        .await
        .unwrap();
    let revision = first["revision"].as_i64().unwrap();
    let response = put(
        &app,
        &account,
        plyr_state(&["track1", "track2"], 0),
        Some(&format!("\"{revision}\"")),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["state"]["track_ids"], json!(["track1", "track2"]));
    assert_eq!(body["revision"], revision + 1);
}

async fn put_with_a_mismatched_if_match_is_a_conflict(app: TestApp) {
    let account = app.register().await;
    put(&app, &account, plyr_state(&["track1"], 0), None).await;
    let response = put(
        &app,
        &account,
        plyr_state(&["track1", "track2"], 0),
        Some("\"999\""),
    )
    .await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("conflict"),
        "{body}"
    );
    // Nothing changed.
    let body: Value = get(&app, &account).await.json().await.unwrap();
    assert_eq!(
        (
            body["revision"].as_i64(),
            body["state"]["track_ids"].clone()
        ),
        (Some(1), json!(["track1"]))
    );
}

async fn put_without_if_match_always_succeeds(app: TestApp) {
    let account = app.register().await;
    put(&app, &account, plyr_state(&["track1"], 0), None).await;
    let response = put(
        &app,
        &account,
        plyr_state(&["track1", "track2", "track3"], 0),
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["state"]["track_ids"],
        json!(["track1", "track2", "track3"])
    );
    assert_eq!(body["revision"], 2);
}

async fn if_match_may_be_quoted_or_not_and_garbage_is_refused(app: TestApp) {
    let account = app.register().await;
    put(&app, &account, plyr_state(&["a"], 0), None).await;
    assert_eq!(
        put(&app, &account, plyr_state(&["b"], 0), Some("1"))
            .await
            .status(),
        200
    );
    assert_eq!(
        put(&app, &account, plyr_state(&["c"], 0), Some("\"2\""))
            .await
            .status(),
        200
    );
    assert_eq!(
        error_code(
            put(&app, &account, plyr_state(&["d"], 0), Some("banana")).await,
            400
        )
        .await,
        "invalid_if_match"
    );
    // The creating write of a new user matches revision 0.
    let other = app.register().await;
    assert_eq!(
        put(&app, &other, plyr_state(&["a"], 0), Some("\"0\""))
            .await
            .status(),
        200
    );
    let body: Value = get(&app, &account).await.json().await.unwrap();
    assert_eq!(body["state"]["track_ids"], json!(["c"]));
}

async fn if_none_match_answers_304(app: TestApp) {
    let account = app.register().await;
    put(&app, &account, plyr_state(&["a"], 0), None).await;
    let request = |tag: &str| {
        app.client
            .get(app.url("/queue/"))
            .bearer_auth(&account.access_token)
            .header("if-none-match", tag.to_owned())
            .send()
    };
    let fresh = request("\"1\"").await.unwrap();
    assert_eq!(fresh.status(), 304);
    assert_eq!(fresh.headers()["etag"], "\"1\"");
    assert_eq!(request("\"0\"").await.unwrap().status(), 200);
}

async fn queues_are_isolated_per_user(app: TestApp) {
    let one = app.register().await;
    let two = app.register().await;
    put(&app, &one, plyr_state(&["user1_track1"], 0), None).await;
    put(&app, &two, plyr_state(&["user2_track1"], 0), None).await;
    let body: Value = get(&app, &two).await.json().await.unwrap();
    assert_eq!(body["state"]["track_ids"], json!(["user2_track1"]));
    let body: Value = get(&app, &one).await.json().await.unwrap();
    assert_eq!(body["state"]["track_ids"], json!(["user1_track1"]));
}

async fn hydration_keeps_order_and_duplicates_and_drops_unknown_ids(app: TestApp) {
    let account = app.register().await;
    app.seed_tracks(&account, &json!([
        {"id": "t1", "title": "One", "artist": "A", "album": "Alb", "duration_ms": 1000, "image_url": "https://img.example/1.jpg"},
        {"id": "t2", "title": "Two", "artist": "B"},
    ]))
    .await;
    let body: Value = put(
        &app,
        &account,
        plyr_state(&["t2", "ghost", "t1", "t2"], 0),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    let ids: Vec<&str> = body["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["t2", "t1", "t2"]);
    assert_eq!(
        body["tracks"][1],
        json!({"id": "t1", "title": "One", "artist": "A", "album": "Alb", "duration_ms": 1000, "image_url": "https://img.example/1.jpg"})
    );
    let again: Value = get(&app, &account).await.json().await.unwrap();
    assert_eq!(again["tracks"], body["tracks"]);
}

async fn invalid_states_are_refused_and_store_nothing(app: TestApp) {
    let account = app.register().await;
    put(&app, &account, plyr_state(&["a"], 0), None).await;
    let cases = [
        json!({"track_ids": ["a", "b"], "current_index": 2}),
        json!({"track_ids": [], "current_index": 1}),
        json!({"track_ids": [""]}),
        json!({"track_ids": ["x".repeat(200)]}),
    ];
    for state in cases {
        assert_eq!(
            error_code(put(&app, &account, state.clone(), None).await, 422).await,
            "invalid_input",
            "{state}"
        );
    }
    let wrong_types = put(&app, &account, json!({"track_ids": "a"}), None).await;
    assert_eq!(error_code(wrong_types, 422).await, "invalid_body");
    let body: Value = get(&app, &account).await.json().await.unwrap();
    assert_eq!(body["revision"], 1);
}

async fn unknown_state_fields_are_kept(app: TestApp) {
    let account = app.register().await;
    let mut state = plyr_state(&["a"], 0);
    state["continuation_from_index"] = json!(3);
    state["continuation_label"] = json!("from the album");
    state["progress_ms"] = json!(1234);
    put(&app, &account, state, None).await;
    let body: Value = get(&app, &account).await.json().await.unwrap();
    assert_eq!(body["state"]["continuation_from_index"], 3);
    assert_eq!(body["state"]["continuation_label"], "from the album");
    assert_eq!(body["state"]["progress_ms"], 1234);
}

async fn ops_apply_to_the_latest_state_and_report_skips(app: TestApp) {
    let account = app.register().await;
    let body = ops(
        &app,
        &account,
        json!([{"op": "append", "track_ids": ["a", "b", "c"]}]),
    )
    .await;
    assert_eq!(body["revision"], 1);
    assert_eq!(body["skipped"], json!([]));
    let entries = body["state"]["entry_ids"].clone();
    let body = ops(
        &app,
        &account,
        json!([
            {"op": "move", "entry_id": entries[2], "after_entry_id": null},
            {"op": "remove", "entry_id": "no-such-entry"},
            {"op": "remove", "entry_id": entries[0]},
            {"op": "next"},
        ]),
    )
    .await;
    assert_eq!(body["skipped"], json!([1, 2]));
    assert_eq!(body["state"]["track_ids"], json!(["a", "c", "b"]));
    assert_eq!(body["state"]["current_track_id"], "c");
    assert_eq!(body["revision"], 2);
    // A batch that changes nothing makes no new revision.
    let body = ops(
        &app,
        &account,
        json!([{"op": "remove", "entry_id": "gone"}]),
    )
    .await;
    assert_eq!(
        (body["revision"].as_i64(), body["skipped"].clone()),
        (Some(2), json!([0]))
    );
    let bad = app
        .post_json_authed(
            "/queue/ops",
            &account.access_token,
            &json!({"ops": [{"op": "explode"}]}),
        )
        .await;
    assert_eq!(error_code(bad, 422).await, "invalid_body");
}

async fn entry_ids_survive_a_snapshot_replace(app: TestApp) {
    let account = app.register().await;
    let first: Value = put(&app, &account, plyr_state(&["a", "b", "c"], 0), None)
        .await
        .json()
        .await
        .unwrap();
    let second: Value = put(&app, &account, plyr_state(&["c", "a"], 0), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        second["state"]["entry_ids"][0],
        first["state"]["entry_ids"][2]
    );
    assert_eq!(
        second["state"]["entry_ids"][1],
        first["state"]["entry_ids"][0]
    );
}

async fn preferences(app: &TestApp, account: &Account) -> Value {
    app.get_with_token("/preferences/", &account.access_token)
        .await
        .json()
        .await
        .unwrap()
}

async fn auto_advance_comes_from_preferences(app: TestApp) {
    let account = app.register().await;
    let prefs: Value = preferences(&app, &account).await;
    assert_eq!(prefs["auto_advance"], true);
    let patched = app
        .patch_preferences(&account, &json!({"auto_advance": false, "theme": "dark"}))
        .await;
    assert_eq!(patched.status(), 200);
    let mut state = plyr_state(&["a"], 0);
    state["auto_advance"] = json!(true);
    let body: Value = put(&app, &account, state, None).await.json().await.unwrap();
    assert_eq!(body["state"]["auto_advance"], false);
    let prefs: Value = preferences(&app, &account).await;
    assert_eq!(
        prefs,
        json!({"auto_advance": false, "share_listening": true, "theme": "dark"})
    );
    // The flags take booleans only; a refused patch changes nothing, not even its other
    // fields.
    for bad in [
        json!({"auto_advance": "yes"}),
        json!({"share_listening": 0, "theme": "light"}),
        json!({"theme": "light", "share_listening": null}),
    ] {
        let refused = app.patch_preferences(&account, &bad).await;
        assert_eq!(error_code(refused, 422).await, "invalid_input", "{bad}");
    }
    let after: Value = preferences(&app, &account).await;
    assert_eq!(after, prefs);
    let off = app
        .patch_preferences(&account, &json!({"share_listening": false}))
        .await;
    assert_eq!(off.status(), 200);
    let prefs: Value = preferences(&app, &account).await;
    assert_eq!(
        prefs,
        json!({"auto_advance": false, "share_listening": false, "theme": "dark"})
    );
}

#[actix_web::test]
async fn browsers_on_an_allowed_origin_may_read_the_etag() {
    let app = TestApp::spawn_tuned(crate::helpers::Backend::Sqlite, |s| {
        s.allowed_origins = "https://app.example.com".into()
    })
    .await;
    let account = app.register().await;
    let response = app
        .client
        .get(app.url("/queue/"))
        .bearer_auth(&account.access_token)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("etag"), "{exposed}");
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/queue/"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization, if-match, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let elsewhere = app
        .client
        .get(app.url("/queue/"))
        .bearer_auth(&account.access_token)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(
        elsewhere
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[actix_web::test]
async fn a_same_origin_browser_write_is_not_refused_by_default() {
    let app = TestApp::spawn(crate::helpers::Backend::Sqlite).await;
    let account = app.register().await;
    let own = app.address.clone();
    let response = app
        .client
        .put(app.url("/queue/"))
        .bearer_auth(&account.access_token)
        .header("origin", own)
        .json(&json!({"state": {"track_ids": ["a"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let foreign = app
        .client
        .put(app.url("/queue/"))
        .bearer_auth(&account.access_token)
        .header("origin", "https://evil.example")
        .json(&json!({"state": {"track_ids": ["b"]}}))
        .send()
        .await
        .unwrap();
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

/// Issue 10, defect 5: on SQLite, a malformed body on an authenticated route right after
/// login (the session check's query still pending when the JSON extractor failed) dropped the
/// connection with no answer (25 of 30). Every such request gets its 400, on both backends.
async fn a_bad_body_beside_a_pending_session_check_gets_its_answer(app: TestApp) {
    for round in 0..30 {
        // A fresh login each time: its session is not cached yet, so the check queries.
        let account = app.register().await;
        let response = app
            .client
            .put(app.url("/queue/"))
            .bearer_auth(&account.access_token)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: no answer: {e}"));
        assert_eq!(
            error_code(response, 400).await,
            "malformed_json",
            "round {round}"
        );
    }
}
