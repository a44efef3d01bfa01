//! Cache-aside in Redis: the helper on its own (read-through, invalidation, falling back to
//! the store when Redis is away), and as replicas use it (a profile or track one replica read
//! is a hit on the other; a write is seen by the next read).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use segue::cache::CacheAside;
use serde_json::{Value, json};

use crate::helpers::{ClusterBus, PrivateRedis, redis_url, spawn_cluster, unique};

fn cache_on(url: &str) -> (CacheAside, segue::telemetry::Metrics) {
    let pool = segue::redis::build_pool(&url.to_owned().into()).unwrap();
    let metrics = segue::telemetry::Metrics::new().unwrap();
    (
        CacheAside::new(Some(pool), &unique("segue_cache"), metrics.cache()),
        metrics,
    )
}

/// A loader that counts its calls and answers `value`.
fn counted(calls: &Arc<AtomicUsize>, value: &str) -> impl Future<Output = Result<String, String>> {
    calls.fetch_add(1, Ordering::SeqCst);
    std::future::ready(Ok(value.to_owned()))
}

#[actix_web::test]
async fn the_helper_reads_through_keeps_and_invalidates() {
    let (cache, metrics) = cache_on(&redis_url());
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(60);
    let first: Result<String, String> = cache
        .get_or_load("t", "k", ttl, || counted(&calls, "one"))
        .await;
    assert_eq!(first.unwrap(), "one");
    let second: Result<String, String> = cache
        .get_or_load("t", "k", ttl, || counted(&calls, "two"))
        .await;
    assert_eq!(second.unwrap(), "one", "kept");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    cache.invalidate("t", &["k".to_owned()]).await;
    let third: Result<String, String> = cache
        .get_or_load("t", "k", ttl, || counted(&calls, "three"))
        .await;
    assert_eq!(third.unwrap(), "three");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A failed load is not kept.
    let failed: Result<String, String> = cache
        .get_or_load("t", "bad", ttl, || async { Err("no".to_owned()) })
        .await;
    assert!(failed.is_err());
    let after: Result<String, String> = cache
        .get_or_load("t", "bad", ttl, || counted(&calls, "ok"))
        .await;
    assert_eq!(after.unwrap(), "ok");
    // Entries expire.
    let _: Result<String, String> = cache
        .get_or_load("t", "brief", Duration::from_millis(100), || {
            counted(&calls, "x")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = calls.load(Ordering::SeqCst);
    let _: Result<String, String> = cache
        .get_or_load("t", "brief", ttl, || counted(&calls, "y"))
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    assert_eq!(metrics.cache_hits.with_label_values(&["t"]).get(), 1);
    assert_eq!(metrics.cache_errors.with_label_values(&["t"]).get(), 0);
}

/// Redis away: after its bounded retries the store answers alone, quickly, and the failures
/// are counted; Redis back: cached again.
#[actix_web::test]
async fn with_redis_away_the_store_answers_alone() {
    let mut redis = PrivateRedis::start();
    let (cache, metrics) = cache_on(&redis.url());
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(60);
    redis.halt();
    for _ in 0..3 {
        let started = Instant::now();
        let answer: Result<String, String> = cache
            .get_or_load("t", "k", ttl, || counted(&calls, "v"))
            .await;
        assert_eq!(answer.unwrap(), "v");
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "every read went to the store"
    );
    assert!(metrics.cache_errors.with_label_values(&["t"]).get() >= 3);
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _: Result<String, String> = cache
            .get_or_load("t", "back", ttl, || counted(&calls, "v"))
            .await;
        let hits = metrics.cache_hits.with_label_values(&["t"]).get();
        if hits > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never cached again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one replica read from the store, the other finds in the cache; a handle registered
/// after it was looked up in vain is found at once.
#[actix_web::test]
async fn replicas_share_profiles_and_tracks_through_the_cache() {
    let replicas = spawn_cluster(2, ClusterBus::Redis(redis_url())).await;
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let bob = a.register().await;
    a.seed_tracks(
        &alice,
        &json!([{"id": "shared-1", "title": "Shared", "artist": "Band", "duration_ms": 200000}]),
    )
    .await;
    let path = format!("/users/by-handle/{}", alice.handle);
    assert_eq!(
        a.get_with_token(&path, &bob.access_token).await.status(),
        200
    );
    let hits = r#"segue_cache_hits_total{cache="profile"}"#;
    let before = b.metric(hits).await;
    let found: Value = b
        .get_with_token(&path, &bob.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(found["handle"], alice.handle.as_str());
    assert_eq!(
        b.metric(hits).await,
        before + 1.0,
        "B answered from the cache"
    );

    // Looked up in vain, then registered: found at once, on the replica that cached the miss.
    let handle: String = unique("late").replace('_', "").chars().take(20).collect();
    let late = format!("/users/by-handle/{handle}");
    assert_eq!(
        b.get_with_token(&late, &bob.access_token).await.status(),
        404
    );
    assert_eq!(
        a.register_raw(&handle, "correct horse battery")
            .await
            .status(),
        201
    );
    assert_eq!(
        b.get_with_token(&late, &bob.access_token).await.status(),
        200
    );

    // A track hydrated on A is a hit on B.
    let reported = a
        .client
        .post(a.url("/now-playing/"))
        .bearer_auth(&alice.access_token)
        .json(&json!({"track_id": "shared-1", "progress_ms": 0, "is_playing": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(reported.status(), 204);
    let page = format!("/now-playing/by-handle/{}", alice.handle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.get(&page).await.status() != 200 {
        assert!(Instant::now() < deadline, "never playing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let track_hits = r#"segue_cache_hits_total{cache="track"}"#;
    let before = b.metric(track_hits).await;
    let body: Value = b.get(&page).await.json().await.unwrap();
    assert_eq!(body["track"]["title"], "Shared");
    assert_eq!(b.metric(track_hits).await, before + 1.0);
}
