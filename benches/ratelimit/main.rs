//! What a rate limit adds to a request: the latency of one limiter decision, in process and
//! through Redis, as p50 / p99 / max over many sequential decisions (each on one of 1,000
//! keys, as many clients would), and of reading the bearer token the guard counts accounts by.
//!
//! `cargo bench --bench ratelimit` (Redis at `TEST_REDIS_URL`, default redis://127.0.0.1:6379;
//! `-- --decisions N` for another count). Prints one line per measurement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use segue::ratelimit::{Limiter, MemoryLimiter, Quota, RedisLimiter};

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (
        at(0.50),
        at(0.99),
        *samples.last().unwrap_or(&Duration::ZERO),
    )
}

fn report(what: &str, samples: Vec<Duration>) {
    let count = samples.len();
    let (p50, p99, max) = percentiles(samples);
    println!(
        "{what:<34} n={count:<7} p50={:>8.1}µs p99={:>8.1}µs max={:>8.1}µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        max.as_secs_f64() * 1e6
    );
}

async fn decisions(limiter: &Limiter, count: usize) -> Vec<Duration> {
    // Generous enough that most decisions allow, as on a healthy hub.
    let quota: Quota = "1000/s:1000".parse().expect("quota");
    let keys: Vec<String> = (0..1_000).map(|i| format!("203.0.113.{i}")).collect();
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let key = &keys[i % keys.len()];
        let started = Instant::now();
        let decision = limiter.check("bench", quota, key).await;
        samples.push(started.elapsed());
        std::hint::black_box(decision);
    }
    samples
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count = args
        .iter()
        .position(|a| a == "--decisions")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let memory = Limiter::Memory(MemoryLimiter::default());
        decisions(&memory, count).await; // warm
        report("in-process decision", decisions(&memory, count).await);

        let url = std::env::var("TEST_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let pool = segue::redis::build_pool(&url.into()).expect("redis url");
        let fail_open = prometheus::IntCounter::new("fail_open", "bench").expect("counter");
        let namespace = format!("segue_bench_{}", std::process::id());
        let redis = Limiter::Redis(RedisLimiter::new(pool, &namespace, fail_open.clone()));
        decisions(&redis, 1_000).await; // connect, load the script
        report("redis decision (loopback)", decisions(&redis, count).await);
        if fail_open.get() > 0 {
            println!(
                "warning: {} decisions failed open to the process",
                fail_open.get()
            );
        }

        let keys = segue::auth::TokenKeys::from_secret(&[7; 32], Duration::from_secs(900));
        let token = keys
            .issue(
                segue::domain::UserId(42),
                &segue::domain::DeviceId::parse("bench").expect("device"),
                "family",
            )
            .expect("token");
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            std::hint::black_box(keys.verify(&token).is_ok());
            samples.push(started.elapsed());
        }
        report("bearer token read (HS256 verify)", samples);
    });
}
