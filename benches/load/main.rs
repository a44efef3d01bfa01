//! Segue's load harness: real hub processes, real sockets, numbers printed.
//!
//! ```text
//! cargo bench --bench load -- [--replicas 1|2] [--users N] [--sockets-per-user N]
//!                             [--rate EVENTS_PER_S] [--seconds N] [--workers N]
//! ```
//!
//! It seeds `users` accounts into a fresh SQLite database, starts the release `segue` binary
//! (one replica with the in-process bus, or two sharing Redis), pinned to core 0 (see
//! `--hub-cpus`), and opens `users × sockets-per-user` authenticated sockets from worker
//! processes pinned to core 1 (`--load-cpus`),
//! spread over 127.0.0.x source addresses (a process here holds at most ~20,000 files). Each
//! socket joins `echo:{user}`. A publisher (core 1) then sends `rate` user-scoped events per
//! second through the first replica for `seconds`; with two replicas every socket is on the
//! second, so every event crosses Redis. It prints sockets held, server RSS per socket,
//! deliveries per second, end-to-end latency percentiles and losses.
//!
//! `--queue` measures queue writes instead (PUT on the first replica → `queue_changed`);
//! `--presence` measures presence fan-out: `users` followers of one user, their sockets on
//! `friends:` spread over the replicas, and that user's device reporting `now_playing` at
//! `rate`/s on the first replica. `--presence-memory N` measures, in-process, the server
//! memory presence takes per online device (N devices tracked, listed in registry and views).
//! `--flood register|login` measures what a flood of registrations or wrong-password logins
//! costs the hub (`floods.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod floods;
mod reads;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use segue::auth::TokenKeys;
use segue::domain::{DeviceId, UserId};
use segue::settings::Settings;
use segue::store::{Store, follows, users};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The key every process of a run signs and checks tokens with.
const SECRET: &str = "load-harness-secret-load-harness-secret-0123";

/// Sockets a worker opens at once while connecting.
const CONNECT_CONCURRENCY: usize = 256;

/// Most sockets one worker process holds (a process here can hold ~20,000 files).
const MAX_SOCKETS_PER_WORKER: usize = 8_000;

/// How often an otherwise idle socket heartbeats, as the JS client does.
const HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(about = "Segue load harness")]
pub(crate) struct Args {
    /// 1: one replica, in-process bus. 2: two replicas over Redis, publisher on the first,
    /// sockets on the second.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    #[arg(long, default_value_t = 1)]
    sockets_per_user: usize,
    /// Events per second, each to one user (all that user's sockets receive it).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Users the publisher sends to (one publisher socket each, on the first replica);
    /// events go round-robin over them. Keep sockets + publishers under the server's
    /// ~20,000 open files with one replica.
    #[arg(long, default_value_t = 100)]
    publishers: usize,
    /// Load-generator processes (more are used if the sockets need them).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Redis for two replicas.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Use a fresh PostgreSQL database made through this admin URL (e.g.
    /// postgres://postgres@127.0.0.1:5432/postgres) instead of SQLite.
    #[arg(long)]
    postgres: Option<String>,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
    /// Measure queue writes instead of echo broadcasts: the publisher PUTs `/queue/` (a
    /// small snapshot carrying its send time) on the first replica; sockets join `queue:{user}`
    /// and time each `queue_changed`.
    #[arg(long)]
    queue: bool,
    /// Measure presence: user 1 is followed by `users` other users, whose sockets join
    /// `friends:{user}` (spread over the replicas); a device of user 1 on the first replica
    /// reports `now_playing` `rate` times a second; every follower times every update.
    #[arg(long)]
    presence: bool,
    /// Measure presence memory in-process with this many online devices (two per user, each
    /// user's `devices:` shown to one viewer) and exit.
    #[arg(long)]
    presence_memory: Option<usize>,
    /// With --presence-memory: keep the registry in Redis (`--redis`), as a deployment of
    /// several replicas does, instead of in the process.
    #[arg(long)]
    redis_registry: bool,
    /// CPUs for each replica, `;`-separated in replica order (taskset lists), e.g. `0;1`
    /// to give each replica its own core. One entry applies to every replica.
    #[arg(long, default_value = "0")]
    hub_cpus: String,
    /// HTTP worker threads per replica (`SEGUE_WORKERS`); sockets are spread over them.
    #[arg(long, default_value_t = 1)]
    hub_workers: usize,
    /// CPUs for the load generator (workers and publisher), as a taskset list.
    #[arg(long, default_value = "1")]
    load_cpus: String,
    /// Flood the hub instead: `register` (new accounts) or `login` (wrong passwords) from
    /// `--connections` clients for `--seconds`, printing the hub's RSS before, at the peak
    /// and after.
    #[arg(long)]
    flood: Option<floods::Flood>,
    /// Clients of a flood.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Read-heavy run over two replicas sharing `--redis`: clients (`--connections`, at most
    /// 16) read one user's public now-playing page for `--seconds`; prints the cache-aside
    /// hits (store queries saved) and misses of each replica.
    #[arg(long)]
    read_heavy: bool,
    /// Refresh throughput: this many clients each refresh their own login in a chain for
    /// `--seconds` (one replica, SQLite); with `--fast-path`, Redis keeps what it can.
    #[arg(long)]
    refresh_chains: Option<usize>,
    /// With --refresh-chains: give the replica `--redis` (the refresh fast path).
    #[arg(long)]
    fast_path: bool,
    /// Internal: run as a load-generator worker.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(devices) = args.presence_memory {
        drop(runtime);
        let redis = args.redis_registry.then_some(args.redis.clone());
        return presence_memory(devices, redis);
    }
    if let Some(chains) = args.refresh_chains {
        let dir = std::env::temp_dir().join(format!("segue-refresh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        runtime.block_on(reads::refresh_chains(&args, chains, &dir));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if args.read_heavy {
        let dir = std::env::temp_dir().join(format!("segue-reads-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("b")).unwrap();
        runtime.block_on(reads::read_heavy(&args, &dir));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if let Some(kind) = args.flood {
        let dir = std::env::temp_dir().join(format!("segue-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        runtime.block_on(floods::auth_flood(&args, kind, &dir));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    match &args.worker {
        Some(spec) => runtime.block_on(worker(spec)),
        None => runtime.block_on(coordinate(args)),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn token(user: i64, device: &str) -> String {
    let keys = TokenKeys::from_secret(SECRET.as_bytes(), Duration::from_secs(6 * 3600));
    keys.issue(UserId(user), &DeviceId::parse(device).unwrap(), "bench")
        .unwrap()
}

/// Opens a socket from `source` and joins `{kind}:{user}` (`echo` or `queue`).
async fn open_socket(
    port: u16,
    source: &str,
    user: i64,
    device: &str,
    kind: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(format!("{source}:0").parse().unwrap())
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let url = format!(
        "ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&token={}&device_id={device}",
        token(user, device)
    );
    // tungstenite's default read buffer is 128 KiB, zeroed for every read: with thousands of
    // small frames that memset was most of the load generator's time (and so of the
    // measured latency). Frames here are small.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url.into_client_request().unwrap(),
        stream,
        Some(config),
    )
    .await
    .map_err(|e| e.to_string())?;
    let join = json!(["1", "1", format!("{kind}:{user}"), "phx_join", {}]).to_string();
    ws.send(Message::text(join))
        .await
        .map_err(|e| e.to_string())?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if text.contains(r#""status":"ok""#) => Ok(ws),
        other => Err(format!("join failed: {other:?}")),
    }
}

// ---------------------------------------------------------------------------------------
// Worker: holds sockets, measures what arrives.

/// What a worker reports.
#[derive(Default)]
struct Received {
    count: AtomicU64,
    histogram: Mutex<Option<Histogram<u64>>>,
}

async fn worker(spec: &str) {
    // port,source,first_user,last_user,sockets_per_user,topic kind
    let parts: Vec<&str> = spec.split(',').collect();
    let kind = parts[5].to_owned();
    let port: u16 = parts[0].parse().unwrap();
    let source = parts[1].to_owned();
    let first: i64 = parts[2].parse().unwrap();
    let last: i64 = parts[3].parse().unwrap();
    let per_user: usize = parts[4].parse().unwrap();

    let received = Arc::new(Received {
        count: AtomicU64::new(0),
        histogram: Mutex::new(Some(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap())),
    });
    let targets: Vec<(i64, usize)> = (first..=last)
        .flat_map(|u| (0..per_user).map(move |k| (u, k)))
        .collect();
    let failures = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut handles = Vec::new();
            for (user, k) in targets {
                let (received, failures, connected, permits, source, kind) = (
                    received.clone(),
                    failures.clone(),
                    connected.clone(),
                    permits.clone(),
                    source.clone(),
                    kind.clone(),
                );
                handles.push(tokio::task::spawn_local(async move {
                    let permit = permits.acquire_owned().await.unwrap();
                    let device = format!("b{user}-{k}");
                    let ws = match open_socket(port, &source, user, &device, &kind).await {
                        Ok(ws) => ws,
                        Err(error) => {
                            if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("worker {source}: {error}");
                            }
                            return;
                        }
                    };
                    drop(permit);
                    connected.fetch_add(1, Ordering::Relaxed);
                    hold(ws, received).await;
                }));
            }
            // Wait for every connection attempt to settle.
            loop {
                let settled = connected.load(Ordering::Relaxed) + failures.load(Ordering::Relaxed);
                if settled as usize >= handles.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "READY {} {}",
                connected.load(Ordering::Relaxed),
                failures.load(Ordering::Relaxed)
            );
            std::io::stdout().flush().unwrap();
            // Wait for STOP on stdin (read on a blocking thread).
            tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
            })
            .await
            .unwrap();
            let histogram = received.histogram.lock().await.take().unwrap();
            let buckets: Vec<(u64, u64)> = histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect();
            println!(
                "RESULT {}",
                json!({"received": received.count.load(Ordering::Relaxed), "buckets": buckets})
            );
            std::io::stdout().flush().unwrap();
            std::process::exit(0);
        })
        .await;
}

/// Reads a socket for ever, recording every `said` event's latency; heartbeats meanwhile.
async fn hold(
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    received: Arc<Received>,
) {
    let (mut sink, mut stream) = ws.split();
    // Spread heartbeats so they do not all fire at once.
    let offset = Duration::from_millis(rand_offset(HEARTBEAT.as_millis() as u64));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
    let mut reference = 1u64;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(Ok(Message::Text(text))) = message else { return };
                let arrived = now_ns();
                // A presence update is found by a plain search (a follower socket gets many,
                // and parsing each would add the client's time to the measured latency).
                if let Some(sent) = presence_send_time(&text) {
                    received.count.fetch_add(1, Ordering::Relaxed);
                    if let Some(histogram) = received.histogram.lock().await.as_mut() {
                        let _ = histogram.record((arrived.saturating_sub(sent) / 1_000).max(1));
                    }
                    continue;
                }
                let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                // An echo broadcast carries its send time in the payload, a queue change in
                // the state the publisher wrote.
                let sent = match frame[3].as_str() {
                    Some("said") => frame[4]["t"].as_u64(),
                    Some("queue_changed") => frame[4]["state"]["t"].as_u64(),
                    _ => None,
                };
                if let Some(sent) = sent {
                    received.count.fetch_add(1, Ordering::Relaxed);
                    let micros = arrived.saturating_sub(sent) / 1_000;
                    if let Some(histogram) = received.histogram.lock().await.as_mut() {
                        let _ = histogram.record(micros.max(1));
                    }
                }
            }
            _ = heartbeat.tick() => {
                reference += 1;
                let frame = json!([null, reference.to_string(), "phoenix", "heartbeat", {}]).to_string();
                if sink.send(Message::text(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The send time carried by a `presence_diff` whose joined meta plays track `t<ns>`.
fn presence_send_time(text: &str) -> Option<u64> {
    if !text.contains(r#""presence_diff""#) {
        return None;
    }
    let joins = text.find(r#""joins""#)?;
    let leaves = text.find(r#""leaves""#).unwrap_or(text.len());
    let (start, end) = if joins < leaves {
        (joins, leaves)
    } else {
        (joins, text.len())
    };
    let within = text.get(start..end)?;
    let at = within.find(r#""track_id":"t"#)? + r#""track_id":"t"#.len();
    let digits: String = within
        .get(at..)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn rand_offset(max: u64) -> u64 {
    (now_ns() / 7) % max.max(1)
}

// ---------------------------------------------------------------------------------------
// Coordinator.

pub(crate) struct Hub {
    child: Child,
    port: u16,
}

impl Hub {
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Seeds `count` accounts (ids 1..=count) into the fresh database at `database_url`.
async fn seed(dir: &Path, database_url: &str, count: usize, followed: Option<i64>) {
    use scoped_futures::ScopedFutureExt;
    let settings = Settings {
        data_dir: dir.to_path_buf(),
        database_url: Some(database_url.to_owned().into()),
        ..Settings::default()
    };
    let store = Store::connect(&settings).await.expect("open the store");
    let mut pooled = store.conn().await.expect("connection");
    pooled
        .conn()
        .transaction(|conn| {
            async move {
                let now = segue::store::now();
                for i in 1..=count {
                    let handle = format!("bench{i}");
                    let user = users::NewUser {
                        handle: &handle,
                        display_name: &handle,
                        password_hash: "not-a-login",
                        created_at: now,
                    };
                    let inserted = users::insert(conn, &user).await?;
                    if let Some(star) = followed.filter(|star| *star != inserted.id) {
                        follows::follow(conn, inserted.user_id(), UserId(star)).await?;
                    }
                }
                Ok::<_, segue::store::StoreError>(())
            }
            .scope_boxed()
        })
        .await
        .expect("seed users");
}

pub(crate) fn start_hub(
    dir: &Path,
    database_url: &str,
    redis: Option<(&str, &str)>,
    cpus: &str,
    workers: usize,
) -> Hub {
    let port = free_port();
    let mut command = Command::new("taskset");
    command
        .args(["-c", cpus, env!("CARGO_BIN_EXE_segue")])
        .env_clear()
        .env("SEGUE_BIND", format!("127.0.0.1:{port}"))
        .env("SEGUE_DATA_DIR", dir)
        .env("DATABASE_URL", database_url)
        .env("SEGUE_JWT_SECRET", SECRET)
        .env("SEGUE_WORKERS", workers.to_string())
        // The harness holds thousands of sockets per account and per address on purpose.
        .env("SEGUE_WS_MAX_SOCKETS_PER_USER", "1000000")
        .env("SEGUE_WS_MAX_SOCKETS_PER_IP", "1000000")
        // And it registers, logs in and sends far faster than people do: what it measures
        // is the hub's work, not its limits (`--flood` runs measure floods with limits off
        // too, so that every request reaches the work it floods).
        .env("SEGUE_RATE_LIMIT_LOGIN_IP", "off")
        .env("SEGUE_RATE_LIMIT_LOGIN_HANDLE", "off")
        .env("SEGUE_RATE_LIMIT_REGISTER_IP", "off")
        .env("SEGUE_RATE_LIMIT_REFRESH_SESSION", "off")
        .env("SEGUE_RATE_LIMIT_ACCOUNT", "off")
        .env("SEGUE_RATE_LIMIT_ANONYMOUS_IP", "off")
        .env("SEGUE_RATE_LIMIT_INGEST_DEVICE", "off")
        .env("SEGUE_RATE_LIMIT_SOCKET_IP", "off")
        .env("SEGUE_RATE_LIMIT_SOCKET_MESSAGES", "off")
        .env("SEGUE_IP_BLOCK_AFTER", "off")
        .env("SEGUE_DEVICE_ACCOUNTS_MAX", "0")
        .env("SEGUE_LOG", "warn")
        .stdout(Stdio::null());
    // A run that measures the refresh path with its per-session limit on (as deployed).
    if let Ok(limit) = std::env::var("SEGUE_BENCH_REFRESH_LIMIT") {
        command.env("SEGUE_RATE_LIMIT_REFRESH_SESSION", limit);
    }
    if let Some((url, namespace)) = redis {
        command
            .env("REDIS_URL", url)
            // Only --refresh-chains refreshes; it measures with the fast path on.
            .env("SEGUE_REFRESH_FAST_PATH", "true")
            .env("SEGUE_REDIS_NAMESPACE", namespace);
    }
    // Wrapped at once, so every path (including the panic below) kills and reaps it.
    let hub = Hub {
        child: command
            .spawn()
            .expect("start segue (is taskset installed?)"),
        port,
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return hub;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("segue did not start");
}

struct Worker {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

fn percentile(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}

async fn coordinate(args: Args) {
    // The coordinator (and so the publisher) runs on core 1, beside the workers.
    let _ = Command::new("taskset")
        .args(["-p", "-c", &args.load_cpus, &std::process::id().to_string()])
        .output();
    let sockets = args.users * args.sockets_per_user;
    let dir: PathBuf = std::env::temp_dir().join(format!("segue-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // SQLite in the run's directory, or a fresh PostgreSQL database (dropped at the end).
    let (database_url, pg_database) = match &args.postgres {
        None => (format!("sqlite://{}", dir.join("segue.db").display()), None),
        Some(admin) => {
            let name = format!("segue_load_{}", std::process::id());
            let status = Command::new("psql")
                .args([admin.as_str(), "-qc", &format!("CREATE DATABASE {name}")])
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "could not create the PostgreSQL database"
            );
            let base = admin
                .rsplit_once('/')
                .map_or(admin.as_str(), |(base, _)| base);
            (format!("{base}/{name}"), Some((admin.clone(), name)))
        }
    };
    // With --presence, user 1 is the followed user and users 2..=users+1 follow them.
    let (first_user, seeded) = if args.presence {
        (2, args.users + 1)
    } else {
        (1, args.users)
    };
    println!("seeding {seeded} users");
    seed(&dir, &database_url, seeded, args.presence.then_some(1)).await;

    let namespace = format!("segue_load_{}", std::process::id());
    let redis = (args.replicas == 2).then_some((args.redis.as_str(), namespace.as_str()));
    let hubs: Vec<Hub> = (0..args.replicas)
        .map(|i| {
            let hub_dir = dir.join(format!("replica{i}"));
            std::fs::create_dir_all(&hub_dir).unwrap();
            let cpus: Vec<&str> = args.hub_cpus.split(';').collect();
            start_hub(
                &hub_dir,
                &database_url,
                redis,
                cpus[i.min(cpus.len() - 1)],
                args.hub_workers,
            )
        })
        .collect();
    let publisher_hub = &hubs[0];
    let socket_hub = &hubs[hubs.len() - 1];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = socket_hub.rss_kib();

    // Workers: contiguous user ranges, each on its own source address.
    let worker_count = args
        .workers
        .max(sockets.div_ceil(MAX_SOCKETS_PER_WORKER))
        .max(1);
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut workers = Vec::new();
    let worker_count = if args.presence {
        // Followers are spread over the replicas: at least one worker per replica.
        worker_count.max(hubs.len())
    } else {
        worker_count
    };
    let users_per_worker = args.users.div_ceil(worker_count);
    for w in 0..worker_count {
        let first = w * users_per_worker + first_user;
        let last = ((w + 1) * users_per_worker + first_user - 1).min(seeded);
        if first > last {
            continue;
        }
        let (port, kind) = if args.presence {
            (hubs[w % hubs.len()].port, "friends")
        } else if args.queue {
            (socket_hub.port, "queue")
        } else {
            (socket_hub.port, "echo")
        };
        let spec = format!(
            "{port},127.0.0.{},{first},{last},{},{kind}",
            w + 2,
            args.sockets_per_user,
        );
        let mut child = Command::new("taskset")
            .args(["-c", &args.load_cpus])
            .arg(&exe)
            .args(["--worker", &spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start worker");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        workers.push(Worker { child, stdout });
    }
    let mut held = 0u64;
    let mut failed = 0u64;
    for worker in &mut workers {
        let mut line = String::new();
        worker.stdout.read_line(&mut line).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"READY"), "worker said {line:?}");
        held += fields[1].parse::<u64>().unwrap();
        failed += fields[2].parse::<u64>().unwrap();
    }
    let connect_time = started.elapsed();
    // Let the server settle (sessions, subscriptions) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = socket_hub.rss_kib();
    let per_socket = (loaded.saturating_sub(baseline)) as f64 / held.max(1) as f64;

    // The publisher: one socket per target user on the first replica.
    let publisher_users = if args.presence {
        1
    } else {
        args.users.min(args.publishers).max(1)
    };
    let mut publishers = Vec::with_capacity(publisher_users);
    if args.presence {
        let ws = open_socket(publisher_hub.port, "127.0.0.1", 1, "star", "devices")
            .await
            .unwrap();
        let (sink, mut stream) = ws.split();
        tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        publishers.push(sink);
    }
    for user in 1..=publisher_users as i64 {
        if args.queue || args.presence {
            break;
        }
        let ws = open_socket(
            publisher_hub.port,
            "127.0.0.1",
            user,
            &format!("pub{user}"),
            "echo",
        )
        .await
        .unwrap();
        let (sink, mut stream) = ws.split();
        // Drain what the publisher's own sockets receive.
        tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        publishers.push(sink);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "publishing {} events/s for {} s to {} of {} users ({} sockets each)",
        args.rate, args.seconds, publisher_users, args.users, args.sockets_per_user
    );
    let mut sent = 0u64;
    let client = reqwest::Client::new();
    let put_failures = Arc::new(AtomicU64::new(0));
    let run = Duration::from_secs(args.seconds);
    let publish_start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut next_user = 0usize;
    while publish_start.elapsed() < run {
        tick.tick().await;
        let due = (publish_start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            let index = next_user % publisher_users;
            next_user += 1;
            let user = index + 1;
            if args.queue {
                // One PUT per event, in flight concurrently so the rate holds.
                let (client, url) = (
                    client.clone(),
                    format!("http://127.0.0.1:{}/queue/", publisher_hub.port),
                );
                let token = token(user as i64, &format!("pub{user}"));
                let failed = put_failures.clone();
                tokio::spawn(async move {
                    let body = json!({"state": {"track_ids": ["t1", "t2"], "t": now_ns()}});
                    let ok = client
                        .put(url)
                        .bearer_auth(token)
                        .json(&body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            } else if args.presence {
                let frame = json!(["1", sent.to_string(), "devices:1", "now_playing",
                    {"track_id": format!("t{}", now_ns()), "progress_ms": 0, "is_playing": true}]);
                publishers[0]
                    .send(Message::text(frame.to_string()))
                    .await
                    .unwrap();
            } else {
                let frame = json!(["1", sent.to_string(), format!("echo:{user}"), "broadcast",
                    {"event": "said", "payload": {"t": now_ns(), "s": sent}}]);
                publishers[index]
                    .send(Message::text(frame.to_string()))
                    .await
                    .unwrap();
            }
            sent += 1;
        }
    }
    let publish_elapsed = publish_start.elapsed();
    // Events go only to the publisher's users; their sockets on the workers receive them.
    // A presence update goes to every follower's socket.
    let expected = if args.presence {
        sent * held
    } else {
        sent * args.sockets_per_user as u64
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
    let mut received = 0u64;
    for worker in &mut workers {
        let stdin = worker.child.stdin.as_mut().unwrap();
        stdin.write_all(b"STOP\n").unwrap();
        let mut line = String::new();
        worker.stdout.read_line(&mut line).unwrap();
        let result: Value = serde_json::from_str(line.trim_start_matches("RESULT ")).unwrap();
        received += result["received"].as_u64().unwrap();
        for bucket in result["buckets"].as_array().unwrap() {
            histogram
                .record_n(bucket[0].as_u64().unwrap(), bucket[1].as_u64().unwrap())
                .unwrap();
        }
        let _ = worker.child.wait();
    }
    let final_rss = socket_hub.rss_kib();
    drop(hubs);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some((admin, name)) = pg_database {
        let _ = Command::new("psql")
            .args([
                admin.as_str(),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            ])
            .status();
    }

    let what = if args.presence {
        "presence updates (now_playing → every follower's presence_diff)"
    } else if args.queue {
        "queue writes (PUT /queue/ → queue_changed)"
    } else {
        "echo broadcasts"
    };
    println!("measuring           {what}");
    let scenario = if args.replicas == 2 {
        "two replicas over Redis"
    } else {
        "one replica, in-process bus"
    };
    println!();
    println!("scenario            {scenario}");
    println!(
        "sockets held        {held} of {sockets} ({failed} failed), connected in {:.1} s",
        connect_time.as_secs_f64()
    );
    println!(
        "server RSS          {baseline} KiB idle, {loaded} KiB with sockets, {final_rss} KiB at the end"
    );
    println!("RSS per socket      {:.1} KiB", per_socket);
    println!(
        "events published    {sent} in {:.2} s ({:.0}/s)",
        publish_elapsed.as_secs_f64(),
        sent as f64 / publish_elapsed.as_secs_f64()
    );
    println!(
        "deliveries          {received} of {expected} expected ({:.0}/s)",
        received as f64 / publish_elapsed.as_secs_f64()
    );
    println!("lost                {}", expected.saturating_sub(received));
    if args.queue {
        println!(
            "failed PUTs         {}",
            put_failures.load(Ordering::Relaxed)
        );
    }
    println!(
        "latency ms          p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        percentile(&histogram, 0.50),
        percentile(&histogram, 0.99),
        percentile(&histogram, 0.999),
        histogram.max() as f64 / 1000.0
    );
}

// ---------------------------------------------------------------------------------------
// Presence memory, in-process.

/// Resident memory of this process, in KiB.
fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Swallows what the presence actor pushes to a viewer.
struct Sink;

impl actix::Actor for Sink {
    type Context = actix::Context<Self>;
}

impl actix::Handler<segue::realtime::connection::ToSocket> for Sink {
    type Result = ();

    fn handle(&mut self, _: segue::realtime::connection::ToSocket, _: &mut Self::Context) {}
}

/// Devices brought online between waits in [`presence_memory`].
const BATCH: usize = 2_000;

/// Waits until the registry lists two playing devices for each of `users` (asked 1,000
/// users at a time, so Redis is never blocked by one huge pipeline).
async fn settle(registry: &segue::presence::AnyRegistry, users: &[UserId]) {
    use segue::presence::Registry;
    for chunk in users.chunks(1_000) {
        loop {
            let snapshots = registry.snapshots(chunk.to_vec()).await.unwrap();
            let playing: usize = snapshots
                .iter()
                .flat_map(|s| s.entries.values())
                .filter(|e| e.now_playing.is_some())
                .count();
            if playing >= 2 * chunk.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts one replica's realtime side (in-process bus and registry, SQLite), brings
/// `devices` devices online through the presence actor (two per user, each user's
/// `devices:` topic shown to one viewer), has each report a track, and prints the growth of
/// this process's RSS per device.
fn presence_memory(devices: usize, redis: Option<String>) {
    use actix::Actor;
    use segue::domain::Device;
    use segue::presence::AnyRegistry;
    use segue::realtime::presence::{Connected, Playing, Shown, WatchTopic};

    actix::System::new().block_on(async move {
        let dir = std::env::temp_dir().join(format!("segue-presence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings = Settings {
            data_dir: dir.clone(),
            ..Settings::default()
        };
        let store = Store::connect(&settings).await.unwrap();
        let network = segue::bus::MemoryNetwork::new();
        let replica = segue::bus::ReplicaId::generate();
        let bus = network.attach(replica.clone());
        let namespace = format!("segue_presence_memory_{}", std::process::id());
        let registry = match &redis {
            Some(url) => {
                let pool = segue::redis::build_pool(&url.clone().into()).unwrap();
                AnyRegistry::Redis(segue::presence::RedisRegistry::new(
                    pool,
                    &namespace,
                    Duration::from_secs(settings.presence_ttl_secs),
                ))
            }
            None => AnyRegistry::Memory(network.presence_registry()),
        };
        let metrics = segue::telemetry::Metrics::new().unwrap();
        let stores = segue::realtime::Stores {
            registry: registry.clone(),
            store: store.clone(),
            cache: segue::cache::CacheAside::new(None, &namespace, metrics.cache()),
            blocks: segue::abuse::Blocks::default(),
        };
        let realtime = segue::realtime::Realtime::start(
            replica,
            (segue::bus::AnyBus::Memory(bus.0), bus.1),
            stores,
            segue::auth::Sessions::new(store),
            &settings,
            metrics,
        );
        let users = devices.div_ceil(2);
        let sink = Sink.start().recipient();
        // Everything that exists before the devices do (runtime, pools, caches) is baseline.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = own_rss_kib();
        for user in 1..=users as i64 {
            realtime.presence.do_send(WatchTopic {
                socket: u64::MAX - user as u64,
                user: UserId(user),
                shown: Shown::Devices,
                recipient: sink.clone(),
                topic: format!("devices:{user}").into(),
            });
        }
        // In batches, each settled before the next, so what is measured is what presence
        // keeps, not the high-water mark of messages in flight.
        let all: Vec<UserId> = (1..=users as i64).map(UserId).collect();
        for index in 0..devices {
            if index % BATCH == 0 && index > 0 {
                settle(&registry, &all[(index - BATCH) / 2..index / 2]).await;
            }
            let user = UserId((index / 2 + 1) as i64);
            let id = format!("device-{index:08}");
            let device = Device::parse(Some(&id), Some("Living room speaker"), Some("speaker"))
                .unwrap();
            realtime.presence.do_send(Connected {
                user,
                device: device.clone(),
                socket: index as u64,
            });
            realtime.presence.do_send(Playing {
                user,
                device: device.id,
                report: Some(segue::presence::PlayReport {
                    // Listeners share tracks: 1,000 distinct ones over all devices.
                    track_id: format!("spotify:track:{:022}", index % 1_000),
                    progress_ms: 12_345,
                    is_playing: true,
                }),
            });
        }
        settle(&registry, &all[users.saturating_sub(BATCH / 2)..]).await;
        settle(&registry, &all).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = own_rss_kib();
        let kept = if redis.is_some() {
            "registry in Redis"
        } else {
            "in-process registry"
        };
        println!("measuring           presence memory, in-process (one replica, {kept})");
        println!("online devices      {devices} ({users} users, each user's devices: shown to one viewer)");
        println!("RSS                 {before} KiB before, {after} KiB after");
        println!(
            "RSS per device      {:.2} KiB (tracked device, its registry entry unless in Redis, its view on a viewer, now playing)",
            after.saturating_sub(before) as f64 / devices as f64
        );
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(url) = &redis {
            // The entries expire by themselves; remove them now all the same.
            let client = ::redis::Client::open(url.as_str()).unwrap();
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> = ::redis::cmd("KEYS")
                    .arg(format!("{namespace}:*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                for chunk in keys.chunks(1_000) {
                    let _: Result<(), _> = ::redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
                }
            }
        }
        actix::System::current().stop();
    });
}
