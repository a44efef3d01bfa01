//! Background jobs: no-op throughput on one replica (in process and through Redis), enqueue
//! → start latency on an idle system, and the cost of a reclaim sweep over 10,000 pending
//! entries. Runs on one current-thread runtime, as the hub's jobs do.
//!
//! `cargo bench --bench jobs` (Redis at `TEST_REDIS_URL`, default redis://127.0.0.1:6379;
//! `-- --jobs N` for another backlog, `-- --concurrency N` for another worker limit).
//! Prints one line per measurement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use segue::jobs::{
    Handlers, Job, JobMetrics, JobSettings, Jobs, Kind, MemoryJobs, Options, RedisJobSettings,
    RedisJobs,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Noop {
    at_us: u64,
}

const NOOP: Kind<Noop> = Kind::new("bench.noop");

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn namespace(label: &str) -> String {
    format!("bench_{label}_{}", std::process::id())
}

fn metrics() -> JobMetrics {
    JobMetrics::register(&prometheus::Registry::new()).unwrap()
}

/// Microseconds since `epoch`, which every job's payload and handler share.
fn since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// Handlers counting runs, and recording each run's delay since its payload's `at_us`.
fn counting(epoch: Instant) -> (Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<u64>>>, Handlers) {
    let done = Arc::new(AtomicUsize::new(0));
    let delays = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (d, l) = (done.clone(), delays.clone());
    let handlers = Handlers::new().on(&NOOP, move |job: Job<Noop>| {
        let started = since(epoch);
        if job.payload.at_us > 0 {
            l.lock()
                .unwrap()
                .push(started.saturating_sub(job.payload.at_us));
        }
        d.fetch_add(1, Ordering::Relaxed);
        async { Ok(()) }
    });
    (done, delays, handlers)
}

fn start(
    on: &str,
    label: &str,
    handlers: Handlers,
    settings: JobSettings,
    timing: RedisJobSettings,
) -> Jobs {
    match on {
        "in process" => Jobs::Memory(MemoryJobs::start(handlers, settings, metrics())),
        _ => Jobs::Redis(
            RedisJobs::start(
                redis::Client::open(redis_url()).unwrap(),
                &namespace(label),
                format!("bench-{label}"),
                handlers,
                settings,
                timing,
                metrics(),
            )
            .unwrap(),
        ),
    }
}

/// Enqueues `count` jobs from 32 tasks at once; how long that took.
async fn fill(jobs: &Jobs, count: usize) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let jobs = jobs.clone();
            tokio::spawn(async move {
                for _ in (t..count).step_by(32) {
                    jobs.enqueue(&NOOP, &Noop { at_us: 0 }, Options::default())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

async fn until(done: &AtomicUsize, count: usize) {
    while done.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// A backlog of `count` no-op jobs enqueued with no worker running, then one replica's
/// workers started: jobs run per second until the backlog is gone.
async fn throughput(on: &str, count: usize, concurrency: usize) {
    let epoch = Instant::now();
    let label = format!("throughput{concurrency}");
    let settings = JobSettings {
        concurrency,
        ..JobSettings::default()
    };
    // Enqueue through a handle without workers, so the backlog is all in before any run.
    let filler = match on {
        "in process" => None,
        _ => Some(Jobs::Redis(
            RedisJobs::client(
                redis::Client::open(redis_url()).unwrap(),
                &namespace(&label),
                metrics(),
            )
            .unwrap(),
        )),
    };
    let (done, _, handlers) = counting(epoch);
    let (jobs, filled) = match &filler {
        Some(filler) => {
            let filled = fill(filler, count).await;
            (
                start(on, &label, handlers, settings, RedisJobSettings::default()),
                filled,
            )
        }
        None => {
            let jobs = start(on, &label, handlers, settings, RedisJobSettings::default());
            // In process, enqueueing never yields: the backlog is all in before any run.
            let started = Instant::now();
            for _ in 0..count {
                jobs.enqueue(&NOOP, &Noop { at_us: 0 }, Options::default())
                    .await
                    .unwrap();
            }
            (jobs, started.elapsed())
        }
    };
    let started = Instant::now();
    until(&done, count).await;
    let ran = started.elapsed();
    println!(
        "{on:<10} no-op throughput  jobs={count:<7} concurrency={concurrency:<3} enqueue {:>9.0}/s   run {:>9.0}/s",
        count as f64 / filled.as_secs_f64(),
        count as f64 / ran.as_secs_f64(),
    );
    jobs.shutdown(Duration::from_secs(5)).await;
    cleanup(&namespace(&label)).await;
}

/// One job at a time on an idle replica: from the enqueue call to the handler starting.
async fn latency(on: &str, samples: usize) {
    let epoch = Instant::now();
    let (done, delays, handlers) = counting(epoch);
    let jobs = start(
        on,
        "latency",
        handlers,
        JobSettings::default(),
        RedisJobSettings::default(),
    );
    // Warm the connections.
    jobs.enqueue(&NOOP, &Noop { at_us: 0 }, Options::default())
        .await
        .unwrap();
    until(&done, 1).await;
    for n in 0..samples {
        jobs.enqueue(
            &NOOP,
            &Noop {
                at_us: since(epoch).max(1),
            },
            Options::default(),
        )
        .await
        .unwrap();
        until(&done, n + 2).await;
        // Idle between jobs, as the fetcher would be: in its blocking read.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut delays = delays.lock().unwrap().clone();
    delays.sort_unstable();
    let at = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)] as f64;
    println!(
        "{on:<10} enqueue → start   n={:<6} p50={:>7.0}µs p99={:>7.0}µs max={:>7.0}µs",
        delays.len(),
        at(0.5),
        at(0.99),
        *delays.last().unwrap() as f64,
    );
    jobs.shutdown(Duration::from_secs(5)).await;
    cleanup(&namespace("latency")).await;
}

/// 10,000 entries pending for a consumer that died: what one sweep costs while they are
/// not yet idle long enough (the common case: every sweep of every replica), and once they
/// are (each sweep takes over 100 per queue).
async fn reclaim_sweep(pending: usize) {
    let label = "reclaim";
    let ns = namespace(label);
    let client = redis::Client::open(redis_url()).unwrap();
    let filler = Jobs::Redis(RedisJobs::client(client.clone(), &ns, metrics()).unwrap());
    fill(&filler, pending).await;
    // A consumer that takes every entry, then dies.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let queue = format!("{{{ns}:jobs}}:q:default");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&queue)
        .arg("workers")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .or_else(|e: redis::RedisError| {
            if e.code() == Some("BUSYGROUP") {
                Ok(())
            } else {
                Err(e)
            }
        })
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("dead-consumer")
        .arg("COUNT")
        .arg(pending)
        .arg("STREAMS")
        .arg(&queue)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let visibility = Duration::from_secs(5);
    let taken_at = Instant::now();
    let epoch = Instant::now();
    let (done, _, handlers) = counting(epoch);
    let survivor = RedisJobs::start(
        client,
        &ns,
        "bench-survivor".into(),
        handlers,
        JobSettings::default(),
        RedisJobSettings {
            visibility,
            // The benchmark sweeps by hand.
            sweep_every: Duration::from_secs(3_600),
            ..RedisJobSettings::default()
        },
        metrics(),
    )
    .unwrap();
    let mut idle = Vec::new();
    while idle.len() < 50 && taken_at.elapsed() < visibility / 2 {
        let started = Instant::now();
        assert_eq!(survivor.reclaim_once().await.unwrap(), 0);
        idle.push(started.elapsed());
    }
    idle.sort();
    tokio::time::sleep(visibility.saturating_sub(taken_at.elapsed())).await;
    let started = Instant::now();
    let mut sweeps = 0;
    let mut taken = 0;
    while taken < pending {
        let one = Instant::now();
        let took = survivor.reclaim_once().await.unwrap();
        taken += took;
        sweeps += 1;
        if sweeps == 1 {
            println!(
                "redis      reclaim sweep     pending={pending} none idle yet: p50={:>6.0}µs max={:>6.0}µs (n={}); first sweep taking over {took}: {:>6.0}µs",
                idle[idle.len() / 2].as_secs_f64() * 1e6,
                idle.last().unwrap().as_secs_f64() * 1e6,
                idle.len(),
                one.elapsed().as_secs_f64() * 1e6,
            );
        }
        // Let the runs of what was taken finish, as the sweeper's interval would.
        until(&done, taken).await;
    }
    println!(
        "redis      reclaim all       pending={pending} in {sweeps} sweeps, {:.0} ms with their runs",
        started.elapsed().as_secs_f64() * 1e3
    );
    Jobs::Redis(survivor).shutdown(Duration::from_secs(5)).await;
    cleanup(&ns).await;
}

async fn cleanup(ns: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{ns}:jobs}}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

fn main() {
    let count = arg("--jobs", 100_000);
    let concurrency = arg("--concurrency", 10);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        throughput("in process", count * 2, concurrency).await;
        throughput("redis", count / 2, concurrency).await;
        throughput("redis", count / 2, 64).await;
        latency("in process", 2_000).await;
        latency("redis", 2_000).await;
        reclaim_sweep(10_000).await;
    });
}
