//! Floods a hostile client could send, measured on a real hub process (issue 10).
//!
//! * `--flood register|login`: `--connections` clients (default 64) send registrations, or
//!   logins with a wrong password, as fast as they are answered for `--seconds`; the hub's RSS
//!   is sampled every 50 ms. Prints answers by status, the RSS before, at its peak and
//!   10 s after the flood.
//! * `--flood stalled`: `--connections` sockets (default 50 here) join one user's topic and
//!   never read again; another socket of that user broadcasts 10 KiB events until every
//!   stalled socket has been closed for not reading. Prints the hub's descriptors and the
//!   Send-Q of its TCP connections before, while stalled, and 1 s and 10 s after the closes.

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
    /// Sockets that stop reading while they are sent to.
    Stalled,
}

pub async fn auth_flood(args: &Args, kind: Flood, dir: &Path) {
    if kind == Flood::Stalled {
        return stalled_readers(args, dir).await;
    }
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

/// The hub's open descriptors.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Connections to `port` the hub holds, and the bytes waiting in their send queues
/// (`/proc/net/tcp`: local port `port`, not listening).
fn send_queues(port: u16) -> (usize, u64) {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut held = (0, 0);
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(queues)) =
            (fields.get(1), fields.get(3), fields.get(4))
        else {
            continue;
        };
        let local_port = local
            .rsplit(':')
            .next()
            .and_then(|h| u16::from_str_radix(h, 16).ok());
        // 0A is LISTEN.
        if local_port == Some(port) && *state != "0A" {
            held.0 += 1;
            held.1 += queues
                .split(':')
                .next()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(0);
        }
    }
    held
}

async fn stalled_readers(args: &Args, dir: &Path) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let database_url = format!("sqlite://{}", dir.join("segue.db").display());
    let hub = start_hub(dir, &database_url, None, &args.hub_cpus, args.hub_workers);
    let base = format!("http://127.0.0.1:{}", hub.port);
    let body: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/auth/register"))
        .json(&json!({"handle": "stalled", "password": "correct horse"}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let token = body["access_token"].as_str().expect("token").to_owned();
    let topic = format!("echo:{}", body["user"]["id"]);
    let url = format!(
        "ws://127.0.0.1:{}/socket/websocket?vsn=2.0.0&token={token}",
        hub.port
    );
    let join = |r: usize| {
        Message::text(json!([r.to_string(), r.to_string(), topic, "phx_join", {}]).to_string())
    };
    let stalled_count = args.connections;
    let mut stalled = Vec::new();
    for n in 0..stalled_count {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("small buffer");
        let stream = socket
            .connect(([127, 0, 0, 1], hub.port).into())
            .await
            .expect("connect");
        let (mut ws, _) = tokio_tungstenite::client_async(
            url.clone().into_client_request().expect("url"),
            stream,
        )
        .await
        .expect("upgrade");
        ws.send(join(n)).await.expect("join");
        ws.next().await.expect("join reply").expect("readable");
        stalled.push(ws);
    }
    let (mut pump, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("pump");
    pump.send(join(0)).await.expect("join");
    pump.next().await.expect("join reply").expect("readable");
    // The pump reads everything it gets, so only the stalled sockets fall behind.
    let (mut pump_out, mut pump_in) = pump.split();
    tokio::spawn(async move { while pump_in.next().await.is_some() {} });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = hub.child.id();
    let (fds_before, (conns_before, queued_before)) = (descriptors(pid), send_queues(hub.port));

    let blob = "x".repeat(10_240);
    let metrics = reqwest::Client::new();
    let closed = || async {
        let text = metrics
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("segue_ws_slow_closed_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let started = Instant::now();
    let mut peak = (0usize, 0u64, 0usize);
    let mut sent = 0u64;
    loop {
        // Small batches with a pause, so the pump's own reader (on this thread) keeps up.
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..20 {
            let event = json!(["0", sent.to_string(), topic, "broadcast", {"event": "blob", "payload": {"blob": blob}}]);
            pump_out
                .send(Message::text(event.to_string()))
                .await
                .expect("pump");
            sent += 1;
        }
        let (conns, queued) = send_queues(hub.port);
        if queued > peak.1 {
            peak = (conns, queued, descriptors(pid));
        }
        if closed().await.unwrap_or(0.0) >= stalled_count as f64
            || started.elapsed() > Duration::from_secs(60)
        {
            break;
        }
    }
    let closed_after = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (fds_1s, (conns_1s, queued_1s)) = (descriptors(pid), send_queues(hub.port));
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (fds_10s, (conns_10s, queued_10s)) = (descriptors(pid), send_queues(hub.port));
    println!(
        "{stalled_count} stalled sockets + 1 pump; {sent} broadcasts of 10 KiB; all closed for not reading after {:.1} s (slow-closed: {:?})",
        closed_after.as_secs_f64(),
        closed().await
    );
    println!(
        "hub before the flood:  {fds_before} fds, {conns_before} connections, Send-Q {queued_before} B"
    );
    println!(
        "hub at the worst:      {} fds, {} connections, Send-Q {} B",
        peak.2, peak.0, peak.1
    );
    println!("hub 1 s after closing: {fds_1s} fds, {conns_1s} connections, Send-Q {queued_1s} B");
    println!(
        "hub 10 s after:        {fds_10s} fds, {conns_10s} connections, Send-Q {queued_10s} B"
    );
    drop(stalled);
}
