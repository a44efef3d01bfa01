//! The web page in `static/`: served at `/`, and driven in Debian's Chromium (through
//! `playwright-core`, tests/node/web_e2e.mjs) as two devices of one user on two replicas.
//! Also the demo catalog's seed command and the catalog search the page uses.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::helpers::{ClusterBus, redis_url, spawn_cluster};
use crate::phoenix_js::run_node;

/// The demo catalog as `POST /tracks` takes it.
fn demo_catalog() -> Value {
    let tracks: Vec<Value> = segue::demo::tracks()
        .into_iter()
        .map(|t| {
            json!({"id": t.id.as_str(), "title": t.title, "artist": t.artist,
                   "album": t.album, "duration_ms": t.duration_ms})
        })
        .collect();
    Value::Array(tracks)
}

#[actix_web::test]
async fn the_page_and_its_modules_are_served_at_the_root() {
    let replicas = spawn_cluster(1, ClusterBus::Memory).await;
    let app = &replicas[0];
    for (path, kind, marker) in [
        ("/", "text/html", "<title>Segue</title>"),
        (
            "/app.js",
            "javascript",
            "import { Socket, Presence, reply }",
        ),
        ("/segue.js", "javascript", "export class Socket"),
        ("/style.css", "text/css", ":root"),
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.contains(kind), "{path}: {content_type}");
        assert!(response.text().await.unwrap().contains(marker), "{path}");
    }
    // Paths that are neither routes nor files keep the JSON error.
    let missing = app.get("/no-such-file.js").await;
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
}

#[actix_web::test]
async fn the_catalog_can_be_searched_by_title_artist_or_album() {
    let replicas = spawn_cluster(1, ClusterBus::Memory).await;
    let app = &replicas[0];
    let alice = app.register().await;
    app.seed_tracks(&alice, &demo_catalog()).await;
    let search = |q: &str| {
        let path = format!("/tracks?q={}", urlencode(q));
        let token = alice.access_token.clone();
        async move {
            let body: Value = app
                .get_with_token(&path, &token)
                .await
                .json()
                .await
                .unwrap();
            body["tracks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["title"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(search("morning").await, vec!["Morning Static"]);
    assert_eq!(search("KETTLE").await.len(), 4, "by artist, any case");
    assert_eq!(search("afterglow").await.len(), 4, "by album");
    assert!(search("100%").await.is_empty(), "% matches itself");
    let all: Value = app
        .get_with_token("/tracks?limit=5", &alice.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["tracks"].as_array().unwrap().len(), 5);
    for bad in ["/tracks?limit=0", "/tracks?limit=201"] {
        assert_eq!(
            app.get_with_token(bad, &alice.access_token).await.status(),
            422,
            "{bad}"
        );
    }
    assert_eq!(app.get("/tracks").await.status(), 401);
    let found: Value = app
        .get_with_token(
            &format!("/users/by-handle/{}", alice.handle),
            &alice.access_token,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(found["id"], alice.id);
    let missing = app
        .get_with_token("/users/by-handle/nobody-here", &alice.access_token)
        .await;
    assert_eq!(missing.status(), 404);
}

fn urlencode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[actix_web::test]
async fn seed_demo_loads_the_demo_catalog_into_the_configured_store() {
    let dir = crate::helpers::temp_dir("seed");
    for _ in 0..2 {
        // Twice: seeding again replaces the same tracks.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_segue"))
            .arg("seed-demo")
            .env_clear()
            .env("SEGUE_DATA_DIR", &dir)
            .env("SEGUE_LOG", "warn")
            .output()
            .expect("run segue seed-demo");
        assert!(output.status.success());
        assert!(String::from_utf8_lossy(&output.stdout).contains("24 tracks"));
    }
    let settings = segue::settings::Settings {
        data_dir: dir.clone(),
        ..segue::settings::Settings::default()
    };
    let store = segue::store::Store::connect(&settings).await.unwrap();
    let mut pooled = store.conn().await.unwrap();
    let tracks = segue::store::catalog::search(&mut pooled.conn(), None, 200)
        .await
        .unwrap();
    assert_eq!(tracks.len(), segue::demo::tracks().len());
    drop(pooled);
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_segue"))
        .arg("dance")
        .env_clear()
        .env("SEGUE_DATA_DIR", &dir)
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("seed-demo"));
    let _ = std::fs::remove_dir_all(dir);
}

#[actix_web::test]
async fn two_browsers_of_one_user_on_two_replicas_see_each_others_edits() {
    let replicas = spawn_cluster(2, ClusterBus::Redis(redis_url())).await;
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice: crate::helpers::Account = a.register().await;
    let friend = b.register().await;
    assert_eq!(
        friend.password, alice.password,
        "the script signs both in with one password"
    );
    a.seed_tracks(&alice, &demo_catalog()).await;
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("web-two-devices.png");
    let _ = std::fs::remove_file(&screenshot);
    let config = json!({
        "urlA": a.address,
        "urlB": b.address,
        "handle": alice.handle,
        "password": alice.password,
        "friendHandle": friend.handle,
        "screenshot": screenshot,
    })
    .to_string();
    let result = tokio::task::spawn_blocking(move || run_node("web_e2e.mjs", &[&config]))
        .await
        .expect("node runner");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        result["steps"].as_array().map(Vec::len),
        Some(9),
        "{result}"
    );
    let friend_sees = result["friendSees"].as_str().unwrap_or_default();
    assert!(
        friend_sees.contains("listening to Morning Static"),
        "{result}"
    );
    assert!(
        result["notice"].as_str().unwrap().contains("Laptop"),
        "{result}"
    );
    assert!(
        result.get("pageErrors").is_none(),
        "the page threw: {result}"
    );
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot at {} is {size} bytes",
        screenshot.display()
    );
    println!("web: screenshot saved at {}", screenshot.display());
}

#[actix_web::test]
async fn the_pages_client_module_joins_heartbeats_reconnects_and_merges_presence() {
    let replicas = spawn_cluster(1, ClusterBus::Memory).await;
    let app = &replicas[0];
    let alice = app.register().await;
    let second = app.login_raw(&alice.handle, &alice.password).await;
    let second: Value = second.json().await.unwrap();
    let config = json!({
        "url": app.address,
        "userId": alice.id,
        "tokenA": alice.access_token,
        "tokenB": second["access_token"],
    })
    .to_string();
    let result = tokio::task::spawn_blocking(move || run_node("segue_client.mjs", &[&config]))
        .await
        .expect("node runner");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        result["steps"].as_array().map(Vec::len),
        Some(7),
        "{result}"
    );
    assert_eq!(result["joins"], 2, "{result}");
}

/// Issue 10, defect 9 too: the page kept its refresh token in `localStorage`; now it lives in
/// an `HttpOnly` cookie the page's scripts cannot read, through refreshes in two tabs.
#[actix_web::test]
async fn two_tabs_of_one_browser_stay_signed_in_through_token_refreshes() {
    // Six-second access tokens: the page renews them every five seconds.
    let replicas = crate::helpers::spawn_cluster_tuned(1, ClusterBus::Memory, |s| {
        s.access_token_ttl_secs = 6;
    })
    .await;
    let app = &replicas[0];
    let alice = app.register().await;
    app.seed_tracks(&alice, &demo_catalog()).await;
    let config = json!({
        "url": app.address,
        "handle": alice.handle,
        "password": alice.password,
        "waitMs": 12_000,
    })
    .to_string();
    let result = tokio::task::spawn_blocking(move || run_node("web_tabs.mjs", &[&config]))
        .await
        .expect("node runner");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        result["steps"].as_array().map(Vec::len),
        Some(5),
        "{result}"
    );
}

/// Issue 10, defect 9: symbolic links inside `SEGUE_STATIC_DIR` were followed out of it, and
/// the page was sent without security headers.
#[actix_web::test]
async fn the_page_stays_inside_its_directory_and_carries_security_headers() {
    let outside = crate::helpers::temp_dir("outside");
    std::fs::write(outside.join("secret.txt"), "not for the web").unwrap();
    let site = crate::helpers::temp_dir("site");
    std::fs::write(site.join("index.html"), "<title>Segue</title>").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), site.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(&outside, site.join("elsewhere")).unwrap();
    let app = crate::helpers::TestApp::spawn_tuned(crate::helpers::Backend::Sqlite, |s| {
        s.static_dir = site.clone();
    })
    .await;
    for path in ["/leak.txt", "/elsewhere/secret.txt"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert!(!response.text().await.unwrap().contains("not for the web"));
    }
    let page = app.get("/").await;
    assert_eq!(page.status(), 200);
    let headers = page.headers();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let _ = std::fs::remove_dir_all(outside);
    let _ = std::fs::remove_dir_all(site);
}

#[actix_web::test]
async fn the_page_shows_artwork_and_makes_and_revokes_overlays() {
    let app = crate::helpers::TestApp::spawn(crate::helpers::Backend::Sqlite).await;
    let alice = app.register().await;
    let cover = crate::artwork::jpeg(600, 600);
    let title = "Painted Sky";
    let response = crate::ingest::ingest_multipart(
        &app,
        &alice,
        &crate::ingest::short_track(title, 0),
        Some(&cover),
    )
    .await;
    assert_eq!(response.status(), 202);
    crate::ingest::until_playing(&app, &alice, |p| !p["track"]["artwork"].is_null()).await;
    let config = json!({
        "url": app.address,
        "handle": alice.handle,
        "password": alice.password,
        "title": title,
    })
    .to_string();
    let result = tokio::task::spawn_blocking(move || run_node("web_artwork.mjs", &[&config]))
        .await
        .expect("node runner");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        result["steps"].as_array().map(Vec::len),
        Some(5),
        "{result}"
    );
    let srcset = result["deviceArtSrcset"].as_str().unwrap_or_default();
    assert_eq!(srcset.matches(".webp ").count(), 4, "{result}");
    assert_eq!(result["overlayArtist"], "The Testers", "{result}");
    assert_eq!(
        (result["listed"].as_u64(), result["listedAfter"].as_u64()),
        (Some(1), Some(0)),
        "{result}"
    );
    assert!(
        result.get("pageErrors").is_none(),
        "the page threw: {result}"
    );
}
