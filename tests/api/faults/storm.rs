//! The reconnect storm (issue 15): every socket of a replica that restarts comes back at once
//! to the one that stays. `SEGUE_STORM_SOCKETS` sockets (1,000 in the test command;
//! `scripts/faults/storm.sh` opens 10,000), five devices per user, each joined to its user's
//! `queue:` topic on replica A. A is stopped with SIGTERM (it closes them all with 1012); each
//! client then reconnects to B as a client with capped exponential backoff and full jitter
//! does (attempt k waits a random time in [0, min(10 s, 1 s × 2^k)]) and joins again. The
//! test measures how long until every one is joined on B, the peak Redis command rate (a
//! private Redis, sampled every 100 ms), the store's transactions, and B's `/healthz` latency
//! all along, and requires that every socket got back and B never stopped answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{
    DatabaseGuard, HubProcess, PrivateRedis, TEST_JWT_SECRET, fresh_postgres_database, unique,
};

const DEVICES_PER_USER: usize = 5;
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Long enough for PostgreSQL's backends to have reported their statistics.
const STATS_SETTLE: Duration = Duration::from_secs(11);

fn sockets_wanted() -> usize {
    std::env::var("SEGUE_STORM_SOCKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// What the clients saw, together.
#[derive(Default)]
struct Tally {
    on_a: AtomicUsize,
    closed_with_1012: AtomicUsize,
    back_on_b: AtomicUsize,
    failed_attempts: AtomicUsize,
    /// Why attempts failed, and how often.
    failures: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket at `url` and joins `topic`; the stream once the join was answered ok, else
/// why not (an HTTP status the upgrade was refused with, or what went wrong).
async fn join(url: &str, topic: &str) -> Result<Socket, String> {
    use tokio_tungstenite::tungstenite::Error;
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|error| match error {
            Error::Http(response) => format!("upgrade refused {}", response.status().as_u16()),
            Error::Io(error) => format!("connect: {}", error.kind()),
            other => format!("handshake: {other}"),
        })?;
    ws.send(Message::text(
        json!(["1", "1", topic, "phx_join", {}]).to_string(),
    ))
    .await
    .map_err(|_| "send join".to_owned())?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "join unanswered".to_owned())?
            .ok_or("closed before the join reply")?
            .map_err(|_| "closed before the join reply".to_owned())?;
        if let Message::Text(text) = message
            && text.contains("phx_reply")
        {
            return if text.contains(r#""status":"ok""#) {
                Ok(ws)
            } else {
                let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                Err(format!("join refused: {}", reply[4]["response"]["reason"]))
            };
        }
    }
}

/// One device: joins on A, waits for A to close it, comes back to B with backoff, then holds
/// its socket (reading it) until `stop`.
#[allow(clippy::too_many_arguments)]
async fn device(
    a: String,
    b: String,
    topic: String,
    opening: Arc<Semaphore>,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ws = {
        let _permit = opening.acquire().await.expect("semaphore");
        join(&a, &topic).await.expect("a device joins on A")
    };
    tally.on_a.fetch_add(1, Ordering::AcqRel);
    // Until A closes it.
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Close(Some(frame)) = &message
            && u16::from(frame.code) == 1012
        {
            tally.closed_with_1012.fetch_add(1, Ordering::AcqRel);
        }
    }
    drop(ws);
    let mut attempt = 0_u32;
    let mut ws = loop {
        let window = BACKOFF_BASE
            .saturating_mul(2_u32.saturating_pow(attempt))
            .min(BACKOFF_CAP);
        let wait = window.mul_f64(rand::rng().random::<f64>());
        tokio::time::sleep(wait).await;
        match join(&b, &topic).await {
            Ok(ws) => break ws,
            Err(why) => *tally.failures.lock().unwrap().entry(why).or_default() += 1,
        }
        tally.failed_attempts.fetch_add(1, Ordering::AcqRel);
        attempt += 1;
    };
    tally.back_on_b.fetch_add(1, Ordering::AcqRel);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            message = ws.next() => if message.is_none() { break },
        }
    }
}

/// Redis's count of commands processed so far.
fn redis_commands(redis: &PrivateRedis) -> u64 {
    redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_commands_processed")
}

/// The store's transactions so far (PostgreSQL's statistics for the database). A backend
/// reports its counts at most once a second while busy, and within 10 s of going idle.
async fn store_transactions(database: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(database, tokio_postgres::NoTls)
        .await
        .expect("connect for statistics");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("pg_stat_database");
    row.get(0)
}

#[actix_web::test]
async fn a_reconnect_storm_comes_back_to_the_surviving_replica() {
    let sockets = sockets_wanted();
    let users = sockets.div_ceil(DEVICES_PER_USER);
    let (name, database) = fresh_postgres_database().await;
    let _guard = DatabaseGuard(name);
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let namespace = unique("segue_storm");
    let limit = (sockets * 2).to_string();
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("SEGUE_REDIS_NAMESPACE", namespace.as_str()),
        ("SEGUE_WS_MAX_SOCKETS_PER_IP", limit.as_str()),
        ("SEGUE_LOG", "warn"),
    ];
    let hub_a = HubProcess::start(&env).await;
    let hub_b = HubProcess::start(&env).await;

    // Accounts straight into the store (hashing thousands of passwords would take minutes),
    // and their access tokens signed with the hubs' key.
    let settings = segue::settings::Settings {
        database_url: Some(database.clone().into()),
        ..Default::default()
    };
    let store = segue::store::Store::connect(&settings)
        .await
        .expect("store");
    let keys =
        segue::auth::TokenKeys::from_secret(TEST_JWT_SECRET.as_bytes(), Duration::from_secs(3600));
    let mut accounts = Vec::with_capacity(users);
    {
        let mut pooled = store.conn().await.expect("conn");
        for n in 0..users {
            let handle = format!("storm{n}");
            let user = segue::store::users::insert(
                &mut pooled.conn(),
                &segue::store::users::NewUser {
                    handle: &handle,
                    display_name: &handle,
                    password_hash: "not-a-hash",
                    created_at: segue::store::now(),
                },
            )
            .await
            .expect("insert user");
            let device = segue::domain::DeviceId::parse(&format!("storm-{n}")).expect("device id");
            let token = keys
                .issue(user.user_id(), &device, &format!("storm-family-{n}"))
                .expect("token");
            accounts.push((user.id, token));
        }
    }

    let tally = Arc::new(Tally::default());
    let (stop, stopping) = watch::channel(false);
    let opening = Arc::new(Semaphore::new(64));
    let ws = |hub: &HubProcess| hub.address.replacen("http", "ws", 1);
    let mut tasks = Vec::with_capacity(sockets);
    for index in 0..sockets {
        let (id, token) = &accounts[index / DEVICES_PER_USER];
        let query = format!("vsn=2.0.0&token={token}&device_id=storm-{index}");
        tasks.push(tokio::spawn(device(
            format!("{}/socket/websocket?{query}", ws(&hub_a)),
            format!("{}/socket/websocket?{query}", ws(&hub_b)),
            format!("queue:{id}"),
            opening.clone(),
            tally.clone(),
            stopping.clone(),
        )));
    }
    let opened = Instant::now();
    while tally.on_a.load(Ordering::Acquire) < sockets {
        assert!(
            opened.elapsed() < Duration::from_secs(300),
            "only {} of {sockets} sockets joined on A",
            tally.on_a.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opening_took = opened.elapsed();
    // Until every backend has reported what the joins cost.
    tokio::time::sleep(STATS_SETTLE).await;

    let commands_before = redis_commands(&redis);
    let transactions_before = store_transactions(&database).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &hub_a.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let storm = Instant::now();
    let client = reqwest::Client::new();
    let mut last_commands = commands_before;
    let mut peak_rate = 0_u64;
    let mut worst_health = Duration::ZERO;
    let mut sampled = Instant::now();
    while tally.back_on_b.load(Ordering::Acquire) < sockets {
        assert!(
            storm.elapsed() < Duration::from_secs(180),
            "only {} of {sockets} sockets came back within 3 minutes",
            tally.back_on_b.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = Instant::now();
        let health = client
            .get(format!("{}/healthz", hub_b.address))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(
            health.is_ok_and(|r| r.status() == 200),
            "the surviving replica stopped answering /healthz during the storm"
        );
        worst_health = worst_health.max(asked.elapsed());
        let commands = redis_commands(&redis);
        let interval = sampled.elapsed().as_secs_f64();
        sampled = Instant::now();
        peak_rate = peak_rate.max(((commands - last_commands) as f64 / interval) as u64);
        last_commands = commands;
    }
    let all_back = storm.elapsed();
    let commands = redis_commands(&redis) - commands_before;
    tokio::time::sleep(STATS_SETTLE).await;
    let transactions = store_transactions(&database).await - transactions_before;
    stop.send_replace(true);
    for task in tasks {
        task.await.expect("device");
    }
    let closed_with_1012 = tally.closed_with_1012.load(Ordering::Acquire);
    assert_eq!(
        closed_with_1012, sockets,
        "every socket of the stopping replica is closed with 1012"
    );
    println!(
        "reconnect storm: {sockets} sockets ({users} users) joined on A in {} ms; after SIGTERM \
         all back on B in {} ms (full-jitter backoff, first window 1 s), {} failed attempts; \
         Redis {commands} commands in all, peak {peak_rate}/s; store {transactions} transactions \
         ({:.1} per socket); B's /healthz at worst {} ms; failures {:?}",
        opening_took.as_millis(),
        all_back.as_millis(),
        tally.failed_attempts.load(Ordering::Acquire),
        transactions as f64 / sockets as f64,
        worst_health.as_millis(),
        tally.failures.lock().unwrap()
    );
}
