//! Floods a hostile client could send, measured on a real hub process (issue 10).
//!
//! * `--flood register|login`: `--connections` clients (default 64) send registrations, or
//!   logins with a wrong password, as fast as they are answered for `--seconds`; the hub's RSS
//!   is sampled every 50 ms. Prints answers by status, the RSS before, at its peak and
//!   10 s after the flood.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;

use crate::{Args, start_hub};

/// How often the hub's RSS is read during a flood.
const RSS_SAMPLE: Duration = Duration::from_millis(50);

/// How long after the flood the RSS is read again.
const SETTLE: Duration = Duration::from_secs(10);

/// What a flood sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flood {
    /// Registrations of new accounts (one argon2 hash each).
    Register,
    /// Logins to one account with a wrong password (one argon2 verification each).
    Login,
}

pub async fn auth_flood(args: &Args, kind: Flood, dir: &Path) {
    let database_url = format!("sqlite://{}", dir.join("segue.db").display());
    let hub = start_hub(dir, &database_url, None, &args.hub_cpus, args.hub_workers);
    let base = format!("http://127.0.0.1:{}", hub.port);
    let client = reqwest::Client::new();
    // The account wrong-password logins aim at.
    let created = client
        .post(format!("{base}/auth/register"))
        .json(&json!({"handle": "victim", "password": "correct horse"}))
        .send()
        .await
        .expect("register the target account");
    assert_eq!(created.status(), 201);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = hub.rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..args.connections)
        .map(|c| {
            let (client, base, stop, statuses, counter) = (
                reqwest::Client::new(),
                base.clone(),
                stop.clone(),
                statuses.clone(),
                counter.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let (path, body) = if kind == Flood::Register {
                        let handle = format!("flood{c}x{n}");
                        (
                            "register",
                            json!({"handle": handle, "password": "correct horse"}),
                        )
                    } else {
                        (
                            "login",
                            json!({"handle": "victim", "password": "wrong password"}),
                        )
                    };
                    let status = match client
                        .post(format!("{base}/auth/{path}"))
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    };
                    *statuses.lock().await.entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    let mut peak = before;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(RSS_SAMPLE).await;
        peak = peak.max(hub.rss_kib());
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let at_end = hub.rss_kib();
    tokio::time::sleep(SETTLE).await;
    let settled = hub.rss_kib();

    let statuses = statuses.lock().await;
    let total: u64 = statuses.values().sum();
    println!(
        "{kind:?} flood: {} connections for {:.1} s, {total} requests ({:.0}/s)",
        args.connections,
        elapsed,
        total as f64 / elapsed
    );
    for (status, count) in statuses.iter() {
        let label = if *status == 0 {
            "no answer".to_owned()
        } else {
            status.to_string()
        };
        println!("  {label:>9}: {count}");
    }
    println!(
        "server RSS: {before} KiB before, {peak} KiB at the peak (+{} KiB), {at_end} KiB at the end, {settled} KiB {} s later",
        peak.saturating_sub(before),
        SETTLE.as_secs()
    );
}
