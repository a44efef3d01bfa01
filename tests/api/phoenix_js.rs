//! The official `phoenix` npm client (tests/node) against a real hub.

use std::process::Command;

use crate::helpers::{Backend, TestApp};

/// Runs a script of tests/node with `args`; returns its JSON result line.
pub fn run_node(script: &str, args: &[&str]) -> serde_json::Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/phoenix").exists(),
        "tests/node has no node_modules: run scripts/test.sh, which installs them"
    );
    let output = Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "no result from {script}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(output.status.success(), "{script} failed: {result}");
    result
}

#[actix_web::test]
async fn the_official_client_connects_joins_heartbeats_and_rejoins_after_a_drop() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let account = app.register().await;
    let url = format!("{}/socket", app.address.replacen("http", "ws", 1));
    let user = account.id.to_string();
    // Node blocks; run it off the runtime so the hub keeps serving.
    let result = tokio::task::spawn_blocking(move || {
        run_node("phoenix_socket.mjs", &[&url, &account.access_token, &user])
    })
    .await
    .expect("node runner");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["pingReplies"], serde_json::json!([1, 2]), "{result}");
    assert!(
        result["heartbeatReplies"].as_u64().unwrap_or(0) >= 2,
        "{result}"
    );
}

#[actix_web::test]
async fn the_official_presence_class_tracks_devices_and_friends_across_two_replicas() {
    use crate::helpers::{ClusterBus, redis_url, spawn_cluster};

    let replicas = spawn_cluster(2, ClusterBus::Redis(redis_url())).await;
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let bob = a.register().await;
    let carol = b.register().await;
    let follow = a
        .client
        .post(a.url(&format!("/follows/{}", alice.id)))
        .bearer_auth(&bob.access_token)
        .send()
        .await
        .expect("follow");
    assert_eq!(follow.status(), 201);
    let socket = |app: &TestApp| format!("{}/socket", app.address.replacen("http", "ws", 1));
    let config = serde_json::json!({
        "urlA": socket(a),
        "urlB": socket(b),
        "alice": {"id": alice.id, "token": alice.access_token},
        "bob": {"id": bob.id, "token": bob.access_token},
        "carol": {"id": carol.id, "token": carol.access_token},
    })
    .to_string();
    let result = tokio::task::spawn_blocking(move || run_node("phoenix_presence.mjs", &[&config]))
        .await
        .expect("node runner");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(
        result["steps"].as_array().map(Vec::len),
        Some(5),
        "{result}"
    );
    assert_eq!(
        result["joinReply"],
        serde_json::json!({"device_id": "alice-b"})
    );
    // The Presence class reported the leave of alice-b with no metas left for it.
    let leaves = result["leaves"].as_array().expect("leaves");
    assert!(
        leaves
            .iter()
            .any(|l| l["key"] == "alice-b" && l["remaining"] == 0),
        "{result}"
    );
    // A user who follows nobody saw nobody, at any point.
    assert_eq!(result["carolKeys"], serde_json::json!([]), "{result}");
    assert_eq!(result["carolFinal"], serde_json::json!([]), "{result}");
}
