//! A read-heavy run across two replicas sharing Redis (issue 11): `--read-heavy` clients
//! (`--connections`, default 64 here means 16) ask both replicas for one user's public
//! now-playing page for `--seconds`; each answer needs the profile behind the handle and the
//! track it plays. Prints the answers, and per replica the cache-aside hits (store queries
//! saved) and misses (store queries made) from `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::{Args, start_hub};

/// The counters of `cache` in a hub's metrics text.
fn counter(metrics: &str, name: &str, cache: &str) -> u64 {
    let prefix = format!("{name}{{cache=\"{cache}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

pub async fn read_heavy(args: &Args, dir: &std::path::Path) {
    let database_url = format!("sqlite://{}", dir.join("segue.db").display());
    let namespace = format!("segue_reads_{}", std::process::id());
    let redis = Some((args.redis.as_str(), namespace.as_str()));
    let hubs = [
        start_hub(dir, &database_url, redis, &args.hub_cpus, args.hub_workers),
        start_hub(
            &dir.join("b"),
            &database_url,
            redis,
            &args.hub_cpus,
            args.hub_workers,
        ),
    ];
    let bases: Vec<String> = hubs
        .iter()
        .map(|h| format!("http://127.0.0.1:{}", h.port))
        .collect();
    let client = reqwest::Client::new();
    let registered: serde_json::Value = client
        .post(format!("{}/auth/register", bases[0]))
        .json(&json!({"handle": "listener", "password": "correct horse"}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let token = registered["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let tracks = json!({"tracks": [{"id": "hot-1", "title": "Hot", "artist": "Band", "duration_ms": 200000}]});
    let seeded = client
        .post(format!("{}/tracks", bases[0]))
        .bearer_auth(&token)
        .json(&tracks)
        .send()
        .await
        .expect("tracks");
    assert!(seeded.status().is_success(), "{}", seeded.status());
    let playing = client
        .post(format!("{}/now-playing/", bases[0]))
        .bearer_auth(&token)
        .json(&json!({"track_id": "hot-1", "progress_ms": 0, "is_playing": true}))
        .send()
        .await
        .expect("now playing");
    assert_eq!(playing.status(), 204);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let clients = args.connections.min(16);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let url = format!("{}/now-playing/by-handle/listener", bases[i % 2]);
        let (client, stop, answered, failed) = (
            client.clone(),
            stop.clone(),
            answered.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => answered.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    println!(
        "read-heavy: {clients} clients for {} s over 2 replicas: {} answers 200, {} other",
        args.seconds,
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    for (name, base) in ["A", "B"].iter().zip(&bases) {
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        for cache in ["profile", "track"] {
            println!(
                "replica {name} {cache:<7}: {:>7} hits (store queries saved), {:>4} misses, {} errors",
                counter(&metrics, "segue_cache_hits_total", cache),
                counter(&metrics, "segue_cache_misses_total", cache),
                counter(&metrics, "segue_cache_errors_total", cache),
            );
        }
    }
}

/// `--refresh-chains N`: N clients each refresh their own login in a chain (every answer's
/// token is the next request's) for `--seconds`, against one replica on SQLite, with Redis
/// (the fast path) when `--fast-path` is given. Prints refreshes per second and latency
/// percentiles.
pub async fn refresh_chains(args: &Args, chains: usize, dir: &std::path::Path) {
    let database_url = format!("sqlite://{}", dir.join("segue.db").display());
    let namespace = format!("segue_refresh_{}", std::process::id());
    let redis = args
        .fast_path
        .then_some((args.redis.as_str(), namespace.as_str()));

    let hub = start_hub(dir, &database_url, redis, &args.hub_cpus, args.hub_workers);
    let base = format!("http://127.0.0.1:{}", hub.port);
    let client = reqwest::Client::new();
    let mut tokens = Vec::new();
    for chain in 0..chains {
        let body: serde_json::Value = client
            .post(format!("{base}/auth/register"))
            .json(&json!({"handle": format!("chain{chain}"), "password": "correct horse"}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("json");
        tokens.push(body["refresh_token"].as_str().expect("token").to_owned());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for token in tokens {
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut token = token;
            let mut samples = Vec::new();
            let mut failed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let answer = client
                    .post(format!("{base}/auth/refresh"))
                    .json(&json!({"refresh_token": token}))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == 200 => {
                        let body: serde_json::Value = r.json().await.expect("json");
                        token = body["refresh_token"].as_str().expect("token").to_owned();
                        samples.push(started.elapsed());
                    }
                    _ => failed += 1,
                }
            }
            (samples, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (mine, lost) = task.await.expect("chain");
        samples.extend(mine);
        failed += lost;
    }
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "refresh chains ({}): {chains} chains for {} s: {} refreshes ({:.0}/s), {failed} failed; p50 {:.2} ms, p99 {:.2} ms",
        if args.fast_path {
            "fast path on (Redis)"
        } else {
            "store only"
        },
        args.seconds,
        samples.len(),
        samples.len() as f64 / args.seconds as f64,
        at(0.50),
        at(0.99),
    );
}
