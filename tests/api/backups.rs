//! Backups and the restore drill: a store filled through the API is backed up into the blob
//! store (s3s-fs, or the local directory), restored with `segue backup restore` into a fresh
//! database, and a hub started on it: every table's rows are equal, logins and queues work.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::helpers::{Account, Backend, PrivateS3, TestApp};

/// Fills the hub's store through its API: accounts, a queue, a follow, plays, an overlay.
async fn fill(app: &TestApp) -> (Account, Account) {
    let one = app.register().await;
    let two = app.register().await;
    app.seed_tracks(
        &one,
        &json!([{"id": "drill-1", "title": "Drill One", "artist": "Restorers", "duration_ms": 2000}]),
    )
    .await;
    let state = json!({"track_ids": ["drill-1", "ghost"], "current_index": 0,
                       "current_track_id": "drill-1", "shuffle": false,
                       "original_order_ids": ["drill-1", "ghost"]});
    let put = app
        .client
        .put(app.url("/queue/"))
        .bearer_auth(&one.access_token)
        .json(&json!({"state": state}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let followed = app
        .client
        .post(app.url(&format!("/follows/{}", two.id)))
        .bearer_auth(&one.access_token)
        .send()
        .await
        .unwrap();
    assert!(followed.status().is_success());
    crate::ingest::create_overlay(app, &one).await;
    crate::ingest::ingest_json(app, &one, &crate::ingest::short_track("Drill Play", 0)).await;
    crate::ingest::until_playing(app, &one, |p| !p.is_null()).await;
    (one, two)
}

/// Every table's rows, in a canonical order, as text.
fn postgres_tables(url: &str) -> Vec<(String, String)> {
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([url, "-XAtq", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let names = psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1");
    names
        .lines()
        .map(|table| {
            let rows = psql(&format!(
                "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM \"{table}\" t"
            ));
            (table.to_owned(), rows)
        })
        .collect()
}

fn sqlite_tables(path: &Path) -> Vec<(String, String)> {
    let sqlite = |sql: &str| {
        let out = Command::new("sqlite3")
            .args(["-batch", "-noheader"])
            .arg(path)
            .arg(sql)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let names = sqlite("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1");
    names
        .lines()
        .map(|table| {
            let mut rows: Vec<String> = sqlite(&format!("SELECT * FROM \"{table}\""))
                .lines()
                .map(str::to_owned)
                .collect();
            rows.sort();
            (table.to_owned(), rows.join("\n"))
        })
        .collect()
}

/// Runs `segue backup …` with the hub's settings as environment.
fn segue_backup(env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_segue"));
    // Only the settings given: none the test run itself has (SEGUE_S3S_FS, say).
    for (name, _) in std::env::vars() {
        if name.starts_with("SEGUE_")
            || name.starts_with("S3_")
            || matches!(name.as_str(), "DATABASE_URL" | "REDIS_URL")
        {
            command.env_remove(name);
        }
    }
    command
        .arg("backup")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("SEGUE_LOG", "warn")
        .output()
        .unwrap()
}

fn backup_now(env: &[(&str, String)]) -> String {
    let out = segue_backup(env, &["now"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = said
        .split("backed up to ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{said}"))
        .to_owned();
    let listed = String::from_utf8_lossy(&segue_backup(env, &["list"]).stdout).into_owned();
    assert!(listed.contains(&key), "{listed}");
    key
}

/// Logs in on the restored hub, and the queue is the one saved.
async fn the_restored_hub_works(restored: &TestApp, one: &Account) {
    let login = restored.login_raw(&one.handle, &one.password).await;
    assert_eq!(login.status(), 200);
    let body: Value = login.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap();
    let queue: Value = restored
        .get_with_token("/queue/", token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        queue["state"]["track_ids"],
        json!(["drill-1", "ghost"]),
        "{queue}"
    );
    let follows: Value = restored
        .get_with_token("/follows/", token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(follows["following"].as_array().unwrap().len(), 1);
}

#[actix_web::test]
async fn a_postgres_store_backed_up_to_s3_restores_whole() {
    let s3 = PrivateS3::start("artwork");
    let endpoint = s3.endpoint();
    let app = TestApp::spawn_tuned(Backend::Postgres, |s| {
        s.s3_bucket = Some("artwork".into());
        s.s3_endpoint = Some(endpoint.clone());
        s.s3_access_key_id = Some(crate::helpers::S3_ACCESS_KEY.into());
        s.s3_secret_access_key = Some(crate::helpers::S3_SECRET_KEY.into());
    })
    .await;
    let (one, _) = fill(&app).await;
    let source = secrecy::ExposeSecret::expose_secret(app.settings.database_url.as_ref().unwrap())
        .to_owned();
    let env = vec![
        ("DATABASE_URL", source.clone()),
        (
            "SEGUE_DATA_DIR",
            app.settings.data_dir.display().to_string(),
        ),
        ("S3_BUCKET", "artwork".to_owned()),
        ("S3_ENDPOINT", endpoint),
        ("S3_ACCESS_KEY_ID", crate::helpers::S3_ACCESS_KEY.to_owned()),
        (
            "S3_SECRET_ACCESS_KEY",
            crate::helpers::S3_SECRET_KEY.to_owned(),
        ),
        (
            "SEGUE_JWT_SECRET",
            crate::helpers::TEST_JWT_SECRET.to_owned(),
        ),
    ];
    let key = backup_now(&env);
    assert!(
        key.starts_with("backups/") && key.ends_with(".pgdump.zst"),
        "{key}"
    );

    // Into an empty database.
    let name = crate::helpers::unique("segue_restore");
    let admin = crate::helpers::admin_database_url();
    let created = Command::new("psql")
        .args([
            &admin,
            "-XAtq",
            "-c",
            &format!("CREATE DATABASE \"{name}\""),
        ])
        .output()
        .unwrap();
    assert!(created.status.success());
    let _guard = crate::helpers::DatabaseGuard(name.clone());
    let target = crate::helpers::with_database(&admin, &name);
    let restored = segue_backup(&env, &["restore", &key, "--into", &target]);
    assert!(
        restored.status.success(),
        "{}{}",
        String::from_utf8_lossy(&restored.stdout),
        String::from_utf8_lossy(&restored.stderr)
    );
    let (before, after) = (postgres_tables(&source), postgres_tables(&target));
    assert!(before.len() > 10, "{before:?}");
    assert_eq!(
        before.iter().map(|t| &t.0).collect::<Vec<_>>(),
        after.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((table, rows), (_, back)) in before.iter().zip(&after) {
        assert_eq!(rows, back, "table {table}");
    }
    // A second restore into it, not empty now, is refused without --force.
    let again = segue_backup(&env, &["restore", &key, "--into", &target]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let forced = segue_backup(&env, &["restore", &key, "--into", &target, "--force"]);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );

    let dir = crate::helpers::temp_dir("restored");
    let mut settings = crate::helpers::test_settings(&dir);
    settings.database_url = Some(target.into());
    let hub = TestApp::spawn_with(settings, dir, None).await;
    the_restored_hub_works(&hub, &one).await;
}

#[actix_web::test]
async fn a_sqlite_store_backed_up_locally_restores_whole() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (one, _) = fill(&app).await;
    let data_dir = app.settings.data_dir.clone();
    let env = vec![
        ("SEGUE_DATA_DIR", data_dir.display().to_string()),
        (
            "SEGUE_JWT_SECRET",
            crate::helpers::TEST_JWT_SECRET.to_owned(),
        ),
    ];
    let key = backup_now(&env);
    assert!(key.ends_with(".sqlite.zst"), "{key}");
    assert!(data_dir.join("blobs").join(&key).is_file());

    let dir = crate::helpers::temp_dir("restored");
    let target = dir.join("segue.db");
    let restored = segue_backup(&env, &["restore", &key, "--into", target.to_str().unwrap()]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let (before, after) = (
        sqlite_tables(&data_dir.join("segue.db")),
        sqlite_tables(&target),
    );
    assert!(before.len() > 10, "{before:?}");
    assert_eq!(before, after);
    let again = segue_backup(&env, &["restore", &key, "--into", target.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let settings = crate::helpers::test_settings(&dir);
    let hub = TestApp::spawn_with(settings, dir, None).await;
    the_restored_hub_works(&hub, &one).await;
}

/// Settings that cannot work are refused before anything runs.
#[test]
fn bad_backup_commands_and_settings_are_refused() {
    for args in [
        &["later"][..],
        &["restore", "k"],
        &["restore", "k", "--into"],
        &[],
    ] {
        let out = segue_backup(&[], args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    for (name, value) in [
        ("SEGUE_BACKUP", "sometimes"),
        ("SEGUE_BACKUP_AT", "25:00"),
        ("SEGUE_BACKUP_PREFIX", "no-slash"),
        ("SEGUE_BACKUP_BUCKET", "backups"),
    ] {
        let out = segue_backup(&[(name, value.to_owned())], &["list"]);
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(name),
            "{name}"
        );
    }
}

/// The backups of a store as the hub's settings name them, with metrics of their own.
fn backups_of(settings: &segue::settings::Settings) -> segue::backups::Backups {
    let metrics = segue::telemetry::Metrics::new().unwrap();
    settings.backups(metrics.backups).unwrap()
}

/// Forty nights on a clock the test sets, against the real blob store: exactly the promised
/// copies remain (the last 7 nights, the newest of the last 4 ISO weeks and of each month).
#[actix_web::test]
async fn forty_simulated_nights_leave_exactly_the_promised_copies() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.register().await;
    let backups = backups_of(&app.settings);
    let first = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
        .unwrap()
        .and_hms_opt(3, 0, 0)
        .unwrap()
        .and_utc();
    for night in 0..40 {
        let done = backups
            .run(first + chrono::TimeDelta::days(night))
            .await
            .unwrap();
        assert!(done.bytes > 0);
    }
    let kept: Vec<i64> = backups
        .list()
        .await
        .unwrap()
        .iter()
        .map(|b| (b.taken_at.and_utc() - first).num_days())
        .collect();
    // 1 January 2026 is a Thursday: ISO weeks end on days 3, 10, 17, 24, 31 and 38; January
    // ends on day 30.
    assert_eq!(kept, vec![24, 30, 31, 33, 34, 35, 36, 37, 38, 39]);
    let on_disk = std::fs::read_dir(app.settings.data_dir.join("blobs").join("backups"))
        .unwrap()
        .count();
    assert_eq!(on_disk, kept.len(), "deleted backups leave no file behind");
}

/// A backup that fails half-way leaves no object and no part behind, and counts a failure.
#[actix_web::test]
async fn a_failed_backup_leaves_nothing_in_the_store() {
    let s3 = PrivateS3::start("artwork");
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut settings = app.settings.clone();
    settings.s3_bucket = Some("artwork".into());
    settings.s3_endpoint = Some(s3.endpoint());
    settings.s3_access_key_id = Some(crate::helpers::S3_ACCESS_KEY.into());
    settings.s3_secret_access_key = Some(crate::helpers::S3_SECRET_KEY.into());
    // A PostgreSQL database that is not there: pg_dump fails after the upload began.
    let admin = crate::helpers::admin_database_url();
    settings.database_url =
        Some(crate::helpers::with_database(&admin, &crate::helpers::unique("absent")).into());
    let metrics = segue::telemetry::Metrics::new().unwrap();
    let backups = settings.backups(metrics.backups.clone()).unwrap();
    let before = s3.files();
    let error = backups.run(chrono::Utc::now()).await.unwrap_err();
    assert!(error.to_string().contains("pg_dump"), "{error}");
    assert_eq!(metrics.backups.failures.get(), 1);
    assert_eq!(metrics.backups.last_success.get(), 0.0);
    assert!(backups.list().await.unwrap().is_empty());
    assert_eq!(s3.files(), before, "no object or part is left");
}

/// Three replicas on one PostgreSQL, Redis and bucket, on a clock the test moves from night
/// to night: the scheduler runs the nightly backup once a night, named by the night.
#[actix_web::test]
async fn three_replicas_take_one_backup_a_night() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    const DAY_MS: i64 = 86_400_000;
    let s3 = PrivateS3::start("artwork");
    let endpoint = s3.endpoint();
    let now = segue::clock::Clock::system().now_ms();
    // Noon of the next day, far from 03:00: the first sighting of the schedule runs nothing.
    let noon = (now.div_euclid(DAY_MS) + 1) * DAY_MS + DAY_MS / 2;
    let shift = Arc::new(AtomicI64::new(noon - now));
    let clock = segue::clock::Clock::shifted(shift.clone());
    let replicas = crate::helpers::spawn_cluster_tuned(
        3,
        crate::helpers::ClusterBus::Redis(crate::helpers::redis_url()),
        |s| {
            s.s3_bucket = Some("artwork".into());
            s.s3_endpoint = Some(endpoint.clone());
            s.s3_access_key_id = Some(crate::helpers::S3_ACCESS_KEY.into());
            s.s3_secret_access_key = Some(crate::helpers::S3_SECRET_KEY.into());
            s.scheduler_lease_ms = 1_500;
            s.clock = clock.clone();
        },
    )
    .await;
    let sum = |name: &'static str| {
        let replicas = &replicas;
        async move {
            let mut total = 0.0;
            for replica in replicas {
                total += crate::helpers::metric(&replica.address, name).await;
            }
            total
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sum("segue_jobs_leader_changes_total").await < 1.0 {
        assert!(std::time::Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Let the leader see the schedule once at noon.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let backups = backups_of(&replicas[0].settings);
    let first_night = noon - DAY_MS / 2 + DAY_MS + 3 * 3_600_000;
    for night in 0..3 {
        let at = first_night + night * DAY_MS;
        // A second before 03:00 of the night.
        shift.store(
            at - 1_000 - segue::clock::Clock::system().now_ms(),
            Ordering::Relaxed,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let found = backups.list().await.unwrap();
            if found.len() == usize::try_from(night + 1).unwrap() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "night {night}: {found:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    // Another moment for a second run to show itself, were there one.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let nights: Vec<i64> = backups
        .list()
        .await
        .unwrap()
        .iter()
        .map(|b| b.taken_at.and_utc().timestamp_millis())
        .collect();
    assert_eq!(
        nights,
        vec![first_night, first_night + DAY_MS, first_night + 2 * DAY_MS]
    );
    let runs = sum("segue_jobs_started_total{kind=\"backups.nightly\"}").await;
    assert_eq!(runs, 3.0, "one run a night across three replicas");

    // Two nights nobody led through: the leader catches their ticks up, but only tonight's
    // backup is taken (the missed ones would be today's data under old names).
    let tonight = first_night + 5 * DAY_MS;
    // A second past 03:00: the ticks of nights 3, 4 and 5 are all due at once.
    shift.store(
        tonight + 1_000 - segue::clock::Clock::system().now_ms(),
        Ordering::Relaxed,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while sum("segue_jobs_started_total{kind=\"backups.nightly\"}").await < 6.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the missed nights are not caught up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while backups.list().await.unwrap().len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "tonight's backup is not taken"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let last: Vec<i64> = backups
        .list()
        .await
        .unwrap()
        .iter()
        .map(|b| b.taken_at.and_utc().timestamp_millis())
        .collect();
    assert_eq!(last.last(), Some(&tonight));
    assert_eq!(last.len(), 4, "no backup for the missed nights: {last:?}");
}

/// Latencies in milliseconds, summarised.
fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    format!(
        "{} writes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        ms.last().copied().unwrap_or(0.0)
    )
}

/// Queue writes at 500/s go on while a backup of a store with a million plays is taken:
/// every write succeeds, before and during (the writes run as long as the backup does).
/// Prints both phases' latencies with `--nocapture` (a debug build's figures: compare the
/// phases with each other, not with targets).
#[actix_web::test]
async fn queue_writes_at_500_a_second_all_succeed_during_a_backup() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (name, url) = crate::helpers::fresh_postgres_database().await;
    let _guard = crate::helpers::DatabaseGuard(name);
    let hub = crate::helpers::HubProcess::start(&[
        ("DATABASE_URL", url.as_str()),
        ("SEGUE_RATE_LIMIT_ACCOUNT", "off"),
    ])
    .await;
    let client = reqwest::Client::new();
    let mut tokens = Vec::new();
    for _ in 0..10 {
        tokens.push(hub.register().await.access_token);
    }
    let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
    conn.batch_execute(
        "INSERT INTO play_history (user_id, track_id, device_id, played_at) \
         SELECT (SELECT min(id) FROM users), 'bulk-' || g, 'dev', \
                TIMESTAMP '2026-01-01' + g * INTERVAL '1 second' \
         FROM generate_series(1, 1000000) AS g",
    )
    .await
    .unwrap();

    // 500 writes a second, each timed, until `stop` is set; their latencies.
    let write_until = |stop: Arc<AtomicBool>| {
        let (client, address, tokens) = (client.clone(), hub.address.clone(), tokens.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut writes = Vec::new();
            let mut n = 0usize;
            // Bounded, so that a backup that fails (and never says it is done) fails the test
            // instead of hanging it.
            let began = Instant::now();
            while !stop.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(120) {
                tick.tick().await;
                n += 1;
                let token = tokens[n % tokens.len()].clone();
                let (client, address) = (client.clone(), address.clone());
                writes.push(tokio::spawn(async move {
                    let state = json!({"track_ids": [format!("t{n}")], "current_index": 0,
                                       "current_track_id": format!("t{n}"), "shuffle": false,
                                       "original_order_ids": [format!("t{n}")]});
                    let asked = Instant::now();
                    let status = client
                        .put(format!("{address}/queue/"))
                        .bearer_auth(token)
                        .json(&json!({"state": state}))
                        .send()
                        .await
                        .map(|r| r.status().as_u16());
                    (status, asked.elapsed().as_secs_f64() * 1000.0)
                }));
            }
            let mut latencies = Vec::new();
            for write in writes {
                let (status, ms) = write.await.unwrap();
                assert_eq!(status.ok(), Some(200), "a write failed");
                latencies.push(ms);
            }
            latencies
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let timer = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        timer.store(true, Ordering::Relaxed);
    });
    let baseline = write_until(stop).await;

    let dir = crate::helpers::temp_dir("backup-load");
    let env = vec![
        ("DATABASE_URL", url.clone()),
        ("SEGUE_DATA_DIR", dir.display().to_string()),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let backup = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let key = backup_now(&env);
        done.store(true, Ordering::Relaxed);
        (key, started.elapsed())
    });
    let (during, taken) = tokio::join!(write_until(stop), backup);
    let (key, took) = taken.unwrap();
    assert!(!during.is_empty());
    assert!(key.ends_with(".pgdump.zst"), "{key}");
    println!("baseline: {}", summary(baseline));
    println!(
        "during a backup ({:.1} s, {key}): {}",
        took.as_secs_f64(),
        summary(during)
    );
}
