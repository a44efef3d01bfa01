//! Rate limits: the limiter port's acceptance suite on both implementations (in-process and
//! Redis), failing open when Redis is away, and the limits as clients meet them.

use std::time::{Duration, Instant};

use segue::ratelimit::{Limiter, MemoryLimiter, Quota, RedisLimiter};

use crate::helpers::{PrivateRedis, redis_url, unique};

fn redis_limiter(url: &str, namespace: &str) -> (RedisLimiter, prometheus::IntCounter) {
    let pool = segue::redis::build_pool(&url.to_owned().into()).unwrap();
    let fail_open = prometheus::IntCounter::new("fail_open", "test").unwrap();
    (
        RedisLimiter::new(pool, namespace, fail_open.clone()),
        fail_open,
    )
}

/// Burst 5, then one more every 200 ms.
fn quota() -> Quota {
    "5/1s".parse().unwrap()
}

/// The same behaviour from either limiter, on the real clock: the burst, then the steady rate,
/// then recovery, each key on its own budget.
async fn suite(limiter: Limiter) {
    let rule = "suite";
    for remaining in (0..5).rev() {
        let decision = limiter.check(rule, quota(), "alice").await;
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(decision.remaining, remaining);
    }
    let refused = limiter.check(rule, quota(), "alice").await;
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert!(
        refused.retry_after > Duration::from_millis(100)
            && refused.retry_after <= Duration::from_millis(200),
        "{refused:?}"
    );
    assert!(refused.reset_after >= refused.retry_after, "{refused:?}");
    // A refusal costs nothing: waiting out the retry gives exactly one more.
    assert!(
        limiter.check(rule, quota(), "bob").await.allowed,
        "bob has his own budget"
    );
    tokio::time::sleep(refused.retry_after + Duration::from_millis(20)).await;
    assert!(limiter.check(rule, quota(), "alice").await.allowed);
    assert!(!limiter.check(rule, quota(), "alice").await.allowed);
    // After a full window the whole burst is back, and no more.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for _ in 0..5 {
        assert!(limiter.check(rule, quota(), "alice").await.allowed);
    }
    assert!(!limiter.check(rule, quota(), "alice").await.allowed);
    // Another quota under another rule name is another budget.
    let other: Quota = "1/m".parse().unwrap();
    assert!(limiter.check("other", other, "alice").await.allowed);
    assert!(!limiter.check("other", other, "alice").await.allowed);
}

#[actix_web::test]
async fn the_in_process_limiter_passes_the_suite() {
    suite(Limiter::Memory(MemoryLimiter::default())).await;
}

#[actix_web::test]
async fn the_redis_limiter_passes_the_suite() {
    let (limiter, fail_open) = redis_limiter(&redis_url(), &unique("segue_rl"));
    suite(Limiter::Redis(limiter)).await;
    assert_eq!(fail_open.get(), 0, "every decision was made in Redis");
}

/// Two replicas' limiters on one Redis share one budget.
#[actix_web::test]
async fn limiters_on_one_redis_share_one_budget() {
    let namespace = unique("segue_rl");
    let (a, _) = redis_limiter(&redis_url(), &namespace);
    let (b, _) = redis_limiter(&redis_url(), &namespace);
    let mut allowed = 0;
    for i in 0..10 {
        let limiter = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(limiter.check("shared", quota(), "alice").await.allowed);
    }
    assert_eq!(allowed, 5);
}

/// Redis stopped: every decision is made in process within the bound and counted; Redis back:
/// decisions are shared again, without a restart.
#[actix_web::test]
async fn the_redis_limiter_fails_open_within_its_bound_and_recovers() {
    let mut redis = PrivateRedis::start();
    let (limiter, fail_open) = redis_limiter(&redis.url(), &unique("segue_rl"));
    assert!(limiter.check("r", quota(), "k").await.allowed);
    assert_eq!(fail_open.get(), 0);

    redis.halt();
    let started = Instant::now();
    let decision = limiter.check("r", quota(), "k").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    assert!(decision.allowed);
    // Still a limit while failing open: the process's own budget.
    let mut allowed = 1;
    for _ in 0..10 {
        allowed += usize::from(limiter.check("r", quota(), "k").await.allowed);
    }
    assert_eq!(allowed, 5, "the in-process budget applies");
    assert_eq!(fail_open.get(), 11);

    redis.resume();
    let started = Instant::now();
    loop {
        let before = fail_open.get();
        limiter.check("fresh", quota(), "k").await;
        if fail_open.get() == before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "decisions never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
