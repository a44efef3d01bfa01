//! The now-playing pipeline end to end, in one process: two hub replicas on one fresh
//! PostgreSQL database and one Redis namespace (bus and jobs), sharing one blob directory.
//!
//! 1. Latency: `--users` accounts each with an overlay whose SSE stream is open on replica B;
//!    reports carrying a known cover (multipart) go to replica A at `--rate` per second for
//!    `--secs` seconds; each report's time from sending to its overlay event on B is recorded.
//! 2. Throughput: JSON reports to replica A alone, `--concurrency` at a time for `--secs`;
//!    acknowledged per second, and applied per second (until the queue drained).
//!
//! `cargo bench --bench ingest` (PostgreSQL at `TEST_DATABASE_URL`, default
//! postgres://postgres@127.0.0.1:5432/postgres; Redis at `TEST_REDIS_URL`). Prints one line
//! per measurement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

// Shared with the integration tests, which use all of it.
#[allow(dead_code)]
#[path = "../../tests/support/wire.rs"]
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segue::settings::Settings;
use segue::startup::Application;
use serde_json::{Value, json};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn psql(admin: &str, sql: &str) {
    let status = std::process::Command::new("psql")
        .args([admin, "-q", "-c", sql])
        .status()
        .expect("psql");
    assert!(status.success(), "{sql}");
}

fn cover() -> Vec<u8> {
    let side = 1000u16;
    let mut pixels = Vec::with_capacity(usize::from(side) * usize::from(side) * 3);
    for y in 0..side {
        for x in 0..side {
            pixels.extend([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8]);
        }
    }
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&pixels, side, side, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    out
}

fn settings(database: &str, redis: &str, namespace: &str, data_dir: &std::path::Path) -> Settings {
    Settings {
        bind: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        database_url: Some(database.to_owned().into()),
        redis_url: Some(redis.to_owned().into()),
        redis_namespace: namespace.to_owned(),
        jwt_secret: Some("bench-secret-of-at-least-thirty-two-bytes!".into()),
        workers: Some(1),
        db_pool_size: 16,
        jobs_concurrency: 32,
        ..Settings::default()
    }
    .with_limits_off()
}

struct User {
    token: String,
    events: String,
}

async fn register(client: &reqwest::Client, base: &str, n: u64) -> User {
    let handle = format!("bench{n}x{}", std::process::id());
    let body: Value = client
        .post(format!("{base}/auth/register"))
        .json(&json!({"handle": handle, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    let overlay: Value = client
        .post(format!("{base}/overlays"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    User {
        token,
        events: overlay["events_url"].as_str().unwrap().to_owned(),
    }
}

fn report(progress_ms: u64) -> Value {
    json!({"title": "Bench Track", "artist": "Bench", "album": "Loopback",
           "duration_ms": 3_600_000, "progress_ms": progress_ms})
}

async fn send_multipart(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    progress: u64,
    image: &[u8],
) {
    let (content_type, body) = wire::multipart(&report(progress), Some(image), None);
    let response = client
        .post(format!("{base}/ingest/plays"))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// When each progress value first appeared on one overlay stream, and whether it carried
/// artwork.
type Seen = Arc<Mutex<HashMap<u64, (Instant, bool)>>>;

/// Follows one overlay stream into `seen`.
async fn follow(mut response: reqwest::Response, seen: Seen) {
    let mut parser = wire::SseParser::default();
    while let Ok(Some(chunk)) = response.chunk().await {
        parser.push(&chunk);
        while let Some(event) = parser.next_event() {
            let playing = &event.data["playing"];
            if let Some(progress) = playing["progress_ms"].as_u64() {
                let art = !playing["artwork"].is_null();
                seen.lock()
                    .unwrap()
                    .entry(progress)
                    .or_insert((Instant::now(), art));
            }
        }
    }
}

/// Reports applied so far: rows in `ingests`.
fn applied_count(database: &str) -> u64 {
    let out = std::process::Command::new("psql")
        .args([database, "-tAq", "-c", "SELECT count(*) FROM ingests"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn run() {
    let users_count = arg("--users", 50);
    let rate = arg("--rate", 200);
    let secs = arg("--secs", 10);
    let concurrency = arg("--concurrency", 64);
    let admin = env(
        "TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let redis = env("TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let name = format!("segue_bench_ingest_{}", std::process::id());
    psql(&admin, &format!("CREATE DATABASE {name}"));
    let database = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("TEST_DATABASE_URL needs a database part"),
    };
    let data_dir = std::env::temp_dir().join(&name);
    let namespace = name.clone();
    let mut bases = Vec::new();
    for _ in 0..2 {
        let app = Application::build(settings(&database, &redis, &namespace, &data_dir))
            .await
            .unwrap();
        bases.push(format!("http://127.0.0.1:{}", app.port()));
        actix_web::rt::spawn(app.run_until_stopped());
    }
    let (a, b) = (bases[0].clone(), bases[1].clone());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let mut users = Vec::new();
    for n in 0..users_count {
        users.push(register(&client, &a, n).await);
    }
    let image = cover();
    // The cover becomes known: rendered once, verified by both replicas.
    let seen: Vec<Seen> = (0..users.len())
        .map(|_| Arc::new(Mutex::new(HashMap::new())))
        .collect();
    for (user, seen) in users.iter().zip(&seen) {
        let response = client
            .get(format!("{b}{}", user.events))
            .send()
            .await
            .unwrap();
        actix_web::rt::spawn(follow(response, seen.clone()));
    }
    for base in [&a, &b] {
        send_multipart(&client, base, &users[0].token, 1, &image).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen[0].lock().unwrap().get(&1).is_some_and(|(_, art)| *art) {
            seen[0].lock().unwrap().remove(&1);
            assert!(Instant::now() < deadline, "the cover never appeared");
            tokio::time::sleep(Duration::from_millis(20)).await;
            send_multipart(&client, base, &users[0].token, 1, &image).await;
        }
    }

    // 1. Latency at `rate` reports per second, reports to A, overlay streams on B.
    let total = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let sent: Arc<Mutex<Vec<(usize, u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let user = (i % users.len() as u64) as usize;
        let progress = 10 + i * 10;
        let (client, a, token, image, sent) = (
            client.clone(),
            a.clone(),
            users[user].token.clone(),
            image.clone(),
            sent.clone(),
        );
        tasks.push(actix_web::rt::spawn(async move {
            let at = Instant::now();
            send_multipart(&client, &a, &token, progress, &image).await;
            sent.lock().unwrap().push((user, progress, at));
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let offered = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut latencies = Vec::new();
    let mut missing = 0;
    let mut without_art = 0;
    for (user, progress, at) in sent.lock().unwrap().iter() {
        match seen[*user].lock().unwrap().get(progress) {
            Some((when, art)) => {
                latencies.push(when.duration_since(*at).as_secs_f64() * 1e3);
                if !art {
                    without_art += 1;
                }
            }
            None => missing += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "ingest → overlay SSE (report to A, stream on B, known cover, multipart {} KiB): {} reports at {:.0}/s offered over {} users: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} not shown (superseded by a newer report of the same user before the stream looked), {} shown without artwork",
        image.len() / 1024,
        total,
        total as f64 / offered.as_secs_f64(),
        users.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0),
        missing,
        without_art,
    );

    // 2. Throughput on replica A alone, JSON reports.
    let applied_before = applied_count(&database);
    let window = Duration::from_secs(secs);
    let acknowledged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, a, users_tokens, acknowledged) = (
            client.clone(),
            a.clone(),
            users.iter().map(|u| u.token.clone()).collect::<Vec<_>>(),
            acknowledged.clone(),
        );
        workers.push(actix_web::rt::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < window {
                let token =
                    &users_tokens[((w + n * concurrency) % users_tokens.len() as u64) as usize];
                let response = client
                    .post(format!("{a}/ingest/plays"))
                    .bearer_auth(token)
                    .json(&report(1_000_000 + n))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                acknowledged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let took = started.elapsed();
    let acked = acknowledged.load(std::sync::atomic::Ordering::Relaxed);
    let expected = applied_before + acked;
    while applied_count(&database) < expected && started.elapsed() < window * 10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = started.elapsed();
    println!(
        "ingest throughput on one replica (JSON, {concurrency} at a time, {secs} s): {:.0} reports/s acknowledged; all {} applied after {:.1} s ({:.0} applied/s)",
        acked as f64 / took.as_secs_f64(),
        acked,
        drained.as_secs_f64(),
        acked as f64 / drained.as_secs_f64(),
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    psql(&admin, &format!("DROP DATABASE {name} WITH (FORCE)"));
    std::process::exit(0);
}

fn main() {
    actix_web::rt::System::new().block_on(run());
}
