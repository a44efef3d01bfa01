//! Start-up with bad configuration: the real binary, one clear sentence, nothing served.

use std::process::Command;

use crate::helpers::temp_dir;

/// Runs the `segue` binary with `env` and returns its exit code and standard error.
fn run_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = temp_dir("config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_segue"));
    command
        .env_clear()
        .env("SEGUE_DATA_DIR", &dir)
        .env("SEGUE_BIND", "127.0.0.1:0");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run segue");
    let _ = std::fs::remove_dir_all(dir);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_value_stops_start_up_naming_the_setting() {
    let cases = [
        (("SEGUE_BIND", "not-an-address"), "SEGUE_BIND"),
        (("SEGUE_MAX_BODY_BYTES", "lots"), "SEGUE_MAX_BODY_BYTES"),
        (("SEGUE_MAX_BODY_BYTES", "0"), "SEGUE_MAX_BODY_BYTES"),
        (("SEGUE_LOG_FORMAT", "xml"), "SEGUE_LOG_FORMAT"),
        (("SEGUE_JWT_SECRET", "short"), "SEGUE_JWT_SECRET"),
        (
            ("SEGUE_NO_SUCH_SETTING", "1"),
            "SEGUE_NO_SUCH_SETTING: not a setting",
        ),
        // Near misses are refused, named as they were set, not read as another setting.
        (("SEGUE_ BIND", "127.0.0.1:1"), "SEGUE_ BIND: not a setting"),
        (("SEGUE_BIND.", "127.0.0.1:1"), "SEGUE_BIND.: not a setting"),
        (("REDIS_URL", "http://localhost"), "REDIS_URL"),
        (("SEGUE_CONFIG", "/nonexistent/segue.toml"), "SEGUE_CONFIG"),
        (("SEGUE_PRESENCE_TTL_SECS", "0"), "SEGUE_PRESENCE_TTL_SECS"),
        (
            ("SEGUE_PRESENCE_TTL_SECS", "soon"),
            "SEGUE_PRESENCE_TTL_SECS",
        ),
        (
            ("SEGUE_PRESENCE_LEAVE_DELAY_MS", "600000"),
            "SEGUE_PRESENCE_LEAVE_DELAY_MS",
        ),
        (
            ("SEGUE_UPKEEP_SCHEDULE", "whenever"),
            "SEGUE_UPKEEP_SCHEDULE",
        ),
        (
            ("SEGUE_UPKEEP_SCHEDULE", "daily 25:00"),
            "SEGUE_UPKEEP_SCHEDULE",
        ),
        (("SEGUE_JOBS_CONCURRENCY", "0"), "SEGUE_JOBS_CONCURRENCY"),
        (("SEGUE_ARTWORK_MAX_BYTES", "0"), "SEGUE_ARTWORK_MAX_BYTES"),
        (
            ("SEGUE_ARTWORK_MAX_BYTES", "99999999999"),
            "SEGUE_ARTWORK_MAX_BYTES",
        ),
        (("SEGUE_ARTWORK_RENDERS", "0"), "SEGUE_ARTWORK_RENDERS"),
        (
            ("SEGUE_ARTWORK_STAGED_MAX_BYTES", "0"),
            "SEGUE_ARTWORK_STAGED_MAX_BYTES",
        ),
        (
            ("SEGUE_PLAY_SWEEP_SCHEDULE", "0s"),
            "SEGUE_PLAY_SWEEP_SCHEDULE",
        ),
        (
            ("SEGUE_JOBS_MAX_ATTEMPTS", "many"),
            "SEGUE_JOBS_MAX_ATTEMPTS",
        ),
        (("SEGUE_JOBS_SWEEP_MS", "60000"), "SEGUE_JOBS_SWEEP_MS"),
        (
            ("SEGUE_JOBS_VISIBILITY_MS", "10"),
            "SEGUE_JOBS_VISIBILITY_MS",
        ),
        (
            ("SEGUE_SCHEDULER_LEASE_MS", "100"),
            "SEGUE_SCHEDULER_LEASE_MS",
        ),
        (("SEGUE_ADMIN_TOKEN", "short"), "SEGUE_ADMIN_TOKEN"),
        (
            ("SEGUE_TCP_SEND_BUFFER_BYTES", "100"),
            "SEGUE_TCP_SEND_BUFFER_BYTES",
        ),
        (
            ("SEGUE_TCP_SEND_BUFFER_BYTES", "lots"),
            "SEGUE_TCP_SEND_BUFFER_BYTES",
        ),
        (("S3_BUCKET", "artwork"), "S3_ACCESS_KEY_ID"),
    ];
    for ((key, value), named) in cases {
        let (code, stderr) = run_with(&[(key, value)]);
        assert_eq!(code, Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    }
}

#[test]
fn the_operator_token_set_twice_must_agree() {
    let (code, stderr) = run_with(&[
        (
            "SEGUE_OPERATOR_TOKEN",
            "one-operator-token-of-at-least-32-bytes",
        ),
        (
            "SEGUE_ADMIN_TOKEN",
            "another-operator-token-of-32-bytes-or-more",
        ),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("SEGUE_ADMIN_TOKEN"), "{stderr}");
    assert!(
        !stderr.contains("one-operator-token"),
        "never printed: {stderr}"
    );
}

#[test]
fn a_database_url_with_a_password_is_never_printed() {
    let (code, stderr) = run_with(&[("DATABASE_URL", "mysql://admin:hunter2@db/segue")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_config_file_is_read_and_the_environment_wins_over_it() {
    let dir = temp_dir("config_file");
    let file = dir.join("segue.toml");
    std::fs::write(&file, "max_body_bytes = 0\n").unwrap();
    // The file's bad value is reported under the setting's name...
    let (code, stderr) = run_with(&[("SEGUE_CONFIG", file.to_str().unwrap())]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("SEGUE_MAX_BODY_BYTES"), "{stderr}");
    // ...and an environment variable overrides it (then start-up fails on the next bad one).
    std::fs::write(
        &file,
        "max_body_bytes = 0\nredis_namespace = \"bad namespace\"\n",
    )
    .unwrap();
    let (code, stderr) = run_with(&[
        ("SEGUE_CONFIG", file.to_str().unwrap()),
        ("SEGUE_MAX_BODY_BYTES", "1000"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("SEGUE_REDIS_NAMESPACE"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[actix_web::test]
async fn the_binary_serves_on_embedded_defaults_and_stops_gracefully_on_sigterm() {
    let mut hub = crate::helpers::HubProcess::start(&[]).await;
    let client = reqwest::Client::new();
    let register = client
        .post(format!("{}/auth/register", hub.address))
        .json(&serde_json::json!({"handle": "frank", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(register.status(), 201);
    assert!(
        hub.data_dir().join("segue.db").exists(),
        "the embedded default is a SQLite file"
    );
    let log = hub.log();
    assert!(
        log.contains("background jobs run in this process")
            && log.contains("a crash or restart loses"),
        "the in-process jobs say once what they lose: {log}"
    );
    assert_eq!(
        log.matches("background jobs run in this process").count(),
        1
    );
    // Run from the repository (as `cargo run` is), it serves the web page from ./static.
    let page = client
        .get(format!("{}/", hub.address))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<title>Segue</title>"));

    let status = Command::new("kill")
        .args(["-TERM", &hub.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(code) = hub.child.try_wait().unwrap() {
            exited = Some(code);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        exited.is_some_and(|s| s.success()),
        "exit after SIGTERM: {exited:?}"
    );
}

/// Issue 10, defect 9: the SQLite files (password and token hashes) were created
/// world-readable. The data directory is 0700, the database and its journal 0600.
#[actix_web::test]
async fn the_embedded_store_is_private_to_the_hubs_user() {
    use std::os::unix::fs::PermissionsExt;
    let parent = crate::helpers::temp_dir("private");
    let data_dir = parent.join("data");
    let mut settings = crate::helpers::test_settings(&data_dir);
    settings.jwt_secret = None;
    let app = crate::helpers::TestApp::spawn_with(settings, parent.clone(), None).await;
    app.register().await;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700, "data directory");
    for file in ["segue.db", "segue.db-wal", "segue.db-shm", "token.key"] {
        assert_eq!(mode(&data_dir.join(file)), 0o600, "{file}");
    }
}
