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
