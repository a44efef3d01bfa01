//! Background jobs: the port's acceptance suite, run on both implementations (in process
//! and Redis Streams), then what only the Redis one does (leases, reclaims, outages).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segue::clock::Clock;
use segue::jobs::{
    Failure, Handlers, Job, JobMetrics, JobSettings, Jobs, Kind, MemoryJobs, Options, Priority,
    RedisJobSettings, RedisJobs,
};
use serde::{Deserialize, Serialize};

use crate::helpers::{PrivateRedis, redis_url, unique};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    n: u32,
}

const WORK: Kind<Work> = Kind::new("work");

fn settings() -> JobSettings {
    JobSettings {
        concurrency: 4,
        max_attempts: 3,
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
    }
}

/// Short timings, so that reclaims and promotions happen within a test.
fn timing() -> RedisJobSettings {
    RedisJobSettings {
        visibility: Duration::from_millis(800),
        sweep_every: Duration::from_millis(200),
        promote_every: Duration::from_millis(20),
    }
}

fn metrics() -> JobMetrics {
    JobMetrics::register(&prometheus::Registry::new()).unwrap()
}

/// Where the suite runs.
#[derive(Clone, Copy)]
pub enum On {
    Memory,
    Redis,
}

/// A consumer on the Redis queues under `namespace` (several share them by using one).
fn redis_consumer(
    url: &str,
    namespace: &str,
    handlers: Handlers,
    settings: JobSettings,
) -> RedisJobs {
    RedisJobs::start(
        redis::Client::open(url).unwrap(),
        namespace,
        unique("consumer"),
        handlers,
        settings,
        timing(),
        metrics(),
    )
    .unwrap()
}

fn start(on: On, handlers: Handlers, settings: JobSettings) -> Jobs {
    match on {
        On::Memory => Jobs::Memory(MemoryJobs::start(handlers, settings, metrics())),
        On::Redis => Jobs::Redis(redis_consumer(
            &redis_url(),
            &unique("jobs"),
            handlers,
            settings,
        )),
    }
}

/// Generates one test per implementation from `async fn name(on: On)`.
macro_rules! on_both_queues {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[actix_web::test]
                async fn in_process() {
                    super::$name(super::On::Memory).await;
                }

                #[actix_web::test]
                async fn redis() {
                    super::$name(super::On::Redis).await;
                }
            }
        )*
    };
}

/// Waits until `done` holds (or fails after 10 s).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn dead_soon(jobs: &Jobs, count: usize) -> Vec<segue::jobs::DeadJob> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dead = jobs.dead(100).await.unwrap();
        if dead.len() >= count {
            return dead;
        }
        assert!(Instant::now() < deadline, "never {count} dead: {dead:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

on_both_queues!(
    a_job_runs_and_a_failing_one_is_retried_with_backoff_then_dead_lettered,
    an_unreadable_payload_or_unknown_kind_goes_straight_to_dead_letters,
    an_idempotency_key_runs_a_job_once_and_not_before_is_kept,
    no_more_than_the_concurrency_run_at_once,
    a_backlog_is_served_by_priority_weights,
    a_dead_job_is_retried_or_dropped_by_id,
);

async fn a_job_runs_and_a_failing_one_is_retried_with_backoff_then_dead_lettered(on: On) {
    let ran = Arc::new(AtomicU32::new(0));
    let tries = Arc::new(AtomicU32::new(0));
    let attempts_seen = Arc::new(Mutex::new(Vec::new()));
    let (r, t, a) = (ran.clone(), tries.clone(), attempts_seen.clone());
    let handlers = Handlers::new().on(&WORK, move |job: Job<Work>| {
        let (ran, tries, seen) = (r.clone(), t.clone(), a.clone());
        async move {
            match job.payload.n {
                // Fails twice, then succeeds.
                1 => {
                    seen.lock().unwrap().push((job.id, job.attempt));
                    if tries.fetch_add(1, Ordering::SeqCst) < 2 {
                        return Err(Failure::Retry("busy".into()));
                    }
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
                // Never succeeds.
                2 => Err(Failure::Retry("always".into())),
                3 => Err(Failure::Permanent("bad".into())),
                _ => {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        }
    });
    let jobs = start(on, handlers, settings());
    jobs.enqueue(&WORK, &Work { n: 0 }, Options::default())
        .await
        .unwrap();
    until("the plain job ran", || ran.load(Ordering::SeqCst) == 1).await;
    let started = Instant::now();
    let id = jobs
        .enqueue(&WORK, &Work { n: 1 }, Options::default())
        .await
        .unwrap()
        .unwrap();
    until("the flaky job succeeded", || {
        ran.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        *attempts_seen.lock().unwrap(),
        vec![(id, 0), (id, 1), (id, 2)],
        "two failures, then the run that worked, all of one job"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "backoff is capped at 100 ms: {:?}",
        started.elapsed()
    );
    jobs.enqueue(&WORK, &Work { n: 2 }, Options::default())
        .await
        .unwrap();
    jobs.enqueue(&WORK, &Work { n: 3 }, Options::default())
        .await
        .unwrap();
    let dead: HashMap<String, (u32, String)> = dead_soon(&jobs, 2)
        .await
        .into_iter()
        .map(|d| (d.payload.to_string(), (d.attempts, d.error)))
        .collect();
    assert_eq!(
        dead[r#"{"n":2}"#],
        (3, "always".to_owned()),
        "after max_attempts"
    );
    assert_eq!(
        dead[r#"{"n":3}"#],
        (1, "bad".to_owned()),
        "a permanent failure at once"
    );
    let status = jobs.status().await.unwrap();
    assert_eq!(status.dead, 2);
    assert_eq!(status.delayed, 0);
    assert!(status.queues.iter().all(|q| q.waiting == 0), "{status:?}");
}

async fn an_unreadable_payload_or_unknown_kind_goes_straight_to_dead_letters(on: On) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handlers = Handlers::new().on(&WORK, move |_: Job<Work>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let jobs = start(on, handlers, settings());
    jobs.enqueue_value(
        "work",
        serde_json::json!({"n": "not a number"}),
        Options::default(),
    )
    .await
    .unwrap();
    jobs.enqueue_value(
        "nobody-handles-this",
        serde_json::json!({}),
        Options::default(),
    )
    .await
    .unwrap();
    let dead = dead_soon(&jobs, 2).await;
    assert!(dead.iter().all(|d| d.attempts == 1), "{dead:?}");
    assert!(
        dead.iter().any(|d| d.error.contains("unreadable payload")),
        "{dead:?}"
    );
    assert!(
        dead.iter().any(|d| d.error.contains("no handler")),
        "{dead:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let refused = jobs
        .enqueue_value("no|pipes", serde_json::json!({}), Options::default())
        .await;
    assert!(
        matches!(refused, Err(segue::jobs::EnqueueError::Kind(_))),
        "{refused:?}"
    );
}

async fn an_idempotency_key_runs_a_job_once_and_not_before_is_kept(on: On) {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = runs.clone();
    let handlers = Handlers::new().on(&WORK, move |job: Job<Work>| {
        r.lock().unwrap().push((job.payload.n, Instant::now()));
        async { Ok(()) }
    });
    let jobs = start(on, handlers, settings());
    let keyed = || Options {
        idempotency_key: Some("purge:2026-12-02".into()),
        ..Options::default()
    };
    assert!(
        jobs.enqueue(&WORK, &Work { n: 1 }, keyed())
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        jobs.enqueue(&WORK, &Work { n: 1 }, keyed())
            .await
            .unwrap()
            .is_none(),
        "taken once"
    );
    let enqueued = Instant::now();
    let later = Options {
        delay: Some(Duration::from_millis(300)),
        ..Options::default()
    };
    jobs.enqueue(&WORK, &Work { n: 2 }, later).await.unwrap();
    assert_eq!(jobs.status().await.unwrap().delayed, 1);
    until("the delayed job ran", || runs.lock().unwrap().len() == 2).await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.iter().filter(|(n, _)| *n == 1).count(), 1);
    let (_, at) = runs.iter().find(|(n, _)| *n == 2).unwrap();
    assert!(
        at.duration_since(enqueued) >= Duration::from_millis(300),
        "not before"
    );
}

async fn no_more_than_the_concurrency_run_at_once(on: On) {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (r, m, d) = (running.clone(), most.clone(), done.clone());
    let handlers = Handlers::new().on(&WORK, move |_: Job<Work>| {
        let (running, most, done) = (r.clone(), m.clone(), d.clone());
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let jobs = start(on, handlers, settings());
    for n in 0..40 {
        jobs.enqueue(&WORK, &Work { n }, Options::default())
            .await
            .unwrap();
    }
    until("all ran", || done.load(Ordering::SeqCst) == 40).await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "exactly the limit, never more"
    );
}

/// Under a backlog in every queue, busy queues get about 60 / 30 / 10 % of the runs.
async fn a_backlog_is_served_by_priority_weights(on: On) {
    let order = Arc::new(Mutex::new(Vec::new()));
    // The first job taken waits here until the whole backlog is in.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (o, g) = (order.clone(), gate.clone());
    let handlers = Handlers::new().on(&WORK, move |job: Job<Work>| {
        let (order, gate) = (o.clone(), g.clone());
        async move {
            if job.payload.n == 9 {
                let _ = gate.acquire().await;
            } else {
                order.lock().unwrap().push(job.payload.n);
            }
            Ok(())
        }
    });
    let jobs = start(
        on,
        handlers,
        JobSettings {
            concurrency: 1,
            ..settings()
        },
    );
    jobs.enqueue(&WORK, &Work { n: 9 }, Options::default())
        .await
        .unwrap();
    for (n, priority) in [
        (0, Priority::Critical),
        (1, Priority::Default),
        (2, Priority::Low),
    ] {
        for _ in 0..2_500 {
            let options = Options {
                priority: Some(priority),
                ..Options::default()
            };
            jobs.enqueue(&WORK, &Work { n }, options).await.unwrap();
        }
    }
    gate.add_permits(1);
    // 2,000 draws: the bounds below are over four standard deviations wide.
    until("2,000 ran", || order.lock().unwrap().len() >= 2_000).await;
    let first: Vec<u32> = order.lock().unwrap().iter().take(2_000).copied().collect();
    let share = |n| first.iter().filter(|m| **m == n).count() as f64 / 2_000.0;
    assert!((share(0) - 0.6).abs() < 0.05, "critical {}", share(0));
    assert!((share(1) - 0.3).abs() < 0.05, "default {}", share(1));
    assert!((share(2) - 0.1).abs() < 0.04, "low {}", share(2));
}

async fn a_dead_job_is_retried_or_dropped_by_id(on: On) {
    let fixed = Arc::new(AtomicU32::new(0));
    let ran = Arc::new(AtomicU32::new(0));
    let (f, r) = (fixed.clone(), ran.clone());
    let handlers = Handlers::new().on(&WORK, move |_: Job<Work>| {
        let (fixed, ran) = (f.clone(), r.clone());
        async move {
            if fixed.load(Ordering::SeqCst) == 0 {
                return Err(Failure::Permanent("not yet".into()));
            }
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let jobs = start(on, handlers, settings());
    let high = Options {
        priority: Some(Priority::Critical),
        ..Options::default()
    };
    let first = jobs
        .enqueue(&WORK, &Work { n: 1 }, high)
        .await
        .unwrap()
        .unwrap();
    let second = jobs
        .enqueue(&WORK, &Work { n: 2 }, Options::default())
        .await
        .unwrap()
        .unwrap();
    let dead = dead_soon(&jobs, 2).await;
    assert_eq!(
        dead.iter().find(|d| d.id == first).unwrap().priority,
        Priority::Critical
    );
    fixed.store(1, Ordering::SeqCst);
    assert!(jobs.retry_dead(first).await.unwrap());
    assert!(!jobs.retry_dead(first).await.unwrap(), "moved once");
    until("the retried job ran", || ran.load(Ordering::SeqCst) == 1).await;
    assert!(jobs.drop_dead(second).await.unwrap());
    assert!(!jobs.drop_dead(second).await.unwrap());
    assert!(!jobs.retry_dead(424_242).await.unwrap(), "no such job");
    assert!(jobs.dead(100).await.unwrap().is_empty());
}

/// Runs of each job id, and a handler that records them; `n == 1` never finishes (a job
/// whose replica hangs or dies), `n == 2` takes 2.5 s.
fn recording() -> (Arc<Mutex<Vec<u64>>>, Handlers) {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = runs.clone();
    let handlers = Handlers::new().on(&WORK, move |job: Job<Work>| {
        let runs = r.clone();
        async move {
            match job.payload.n {
                1 => std::future::pending::<()>().await,
                2 => tokio::time::sleep(Duration::from_millis(2_500)).await,
                _ => {}
            }
            runs.lock().unwrap().push(job.id);
            Ok(())
        }
    });
    (runs, handlers)
}

/// A handler that runs nothing, on a consumer that only reclaims what others dropped.
fn recording_consumer(namespace: &str, settings: JobSettings) -> (Arc<Mutex<Vec<u64>>>, RedisJobs) {
    let (runs, handlers) = recording();
    (
        runs,
        redis_consumer(&redis_url(), namespace, handlers, settings),
    )
}

#[actix_web::test]
async fn a_long_job_keeps_its_lease_and_runs_once_among_two_replicas() {
    let namespace = unique("jobs");
    let (runs_a, a) = recording_consumer(&namespace, settings());
    let (runs_b, b) = recording_consumer(&namespace, settings());
    let jobs = Jobs::Redis(a.clone());
    // 2.5 s of work against a visibility timeout of 0.8 s: only renewals keep it leased.
    let id = jobs
        .enqueue(&WORK, &Work { n: 2 }, Options::default())
        .await
        .unwrap()
        .unwrap();
    until("it ran", || {
        runs_a.lock().unwrap().len() + runs_b.lock().unwrap().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let all: Vec<u64> = [
        runs_a.lock().unwrap().clone(),
        runs_b.lock().unwrap().clone(),
    ]
    .concat();
    assert_eq!(
        all,
        vec![id],
        "once, never reclaimed while its replica renewed the lease"
    );
    let status = jobs.status().await.unwrap();
    assert!(
        status
            .queues
            .iter()
            .all(|q| q.in_flight == 0 && q.waiting == 0),
        "{status:?}"
    );
    drop(b);
}

#[actix_web::test]
async fn the_entries_of_a_stopped_replica_are_reclaimed_after_the_visibility_timeout() {
    let namespace = unique("jobs");
    let (_, a) = recording_consumer(&namespace, settings());
    let id = Jobs::Redis(a.clone())
        .enqueue(&WORK, &Work { n: 1 }, Options::default())
        .await
        .unwrap()
        .unwrap();
    let held = Instant::now();
    loop {
        let status = Jobs::Redis(a.clone()).status().await.unwrap();
        if status.queues[1].in_flight == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The replica stops renewing (as one killed would) while its job hangs.
    Jobs::Redis(a.clone()).shutdown(Duration::ZERO).await;
    let (runs, handlers) = recording();
    // On the second replica the job no longer hangs.
    let b = redis_consumer(
        &redis_url(),
        &namespace,
        Handlers::new().on(&WORK, {
            let runs = runs.clone();
            move |job: Job<Work>| {
                runs.lock().unwrap().push(job.id);
                async { Ok(()) }
            }
        }),
        settings(),
    );
    drop(handlers);
    until("reclaimed and run", || runs.lock().unwrap().len() == 1).await;
    let waited = held.elapsed();
    assert_eq!(*runs.lock().unwrap(), vec![id]);
    assert!(
        waited >= timing().visibility,
        "not before the visibility timeout: {waited:?}"
    );
    assert!(
        waited < timing().visibility + timing().sweep_every * 3 + Duration::from_millis(500),
        "within the timeout and a sweep: {waited:?}"
    );
    let status = Jobs::Redis(b).status().await.unwrap();
    assert!(status.queues.iter().all(|q| q.in_flight == 0), "{status:?}");
}

#[actix_web::test]
async fn an_entry_that_keeps_killing_its_replica_goes_to_the_dead_letters() {
    let namespace = unique("jobs");
    let once = JobSettings {
        max_attempts: 1,
        ..settings()
    };
    let (_, a) = recording_consumer(&namespace, once);
    let id = Jobs::Redis(a.clone())
        .enqueue(&WORK, &Work { n: 1 }, Options::default())
        .await
        .unwrap()
        .unwrap();
    until("taken", || true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    Jobs::Redis(a.clone()).shutdown(Duration::ZERO).await;
    let (runs, b) = recording_consumer(&namespace, once);
    let dead = dead_soon(&Jobs::Redis(b), 1).await;
    assert_eq!(dead[0].id, id);
    assert!(
        dead[0].error.contains("stopped while running it 1 times"),
        "{dead:?}"
    );
    assert!(runs.lock().unwrap().is_empty(), "not run a second time");
}

#[actix_web::test]
async fn with_redis_gone_enqueue_fails_at_once_with_a_clear_error() {
    let port = crate::helpers::free_port();
    let (_, handlers) = recording();
    let jobs = Jobs::Redis(redis_consumer(
        &format!("redis://127.0.0.1:{port}"),
        &unique("jobs"),
        handlers,
        settings(),
    ));
    let asked = Instant::now();
    let refused = jobs
        .enqueue(&WORK, &Work { n: 0 }, Options::default())
        .await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let error = refused.unwrap_err();
    assert!(
        matches!(error, segue::jobs::EnqueueError::Unavailable(_)),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("Redis could not take the job"),
        "{error}"
    );
}

#[actix_web::test]
async fn waiting_jobs_survive_a_redis_restart_with_aof_and_the_workers_reconnect() {
    let mut redis = PrivateRedis::start_durable();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (r, g) = (ran.clone(), gate.clone());
    let handlers = Handlers::new().on(&WORK, move |job: Job<Work>| {
        let (ran, gate) = (r.clone(), g.clone());
        async move {
            // Held until Redis is back, so that the rest wait in the queues meanwhile.
            let _ = gate.acquire().await;
            ran.lock().unwrap().push(job.id);
            Ok(())
        }
    });
    let jobs = Jobs::Redis(redis_consumer(
        &redis.url(),
        &unique("jobs"),
        handlers,
        JobSettings {
            concurrency: 1,
            ..settings()
        },
    ));
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(
            jobs.enqueue(&WORK, &Work { n: 10 + n }, Options::default())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let later = Options {
        delay: Some(Duration::from_millis(500)),
        ..Options::default()
    };
    for n in 0..10 {
        ids.push(
            jobs.enqueue(&WORK, &Work { n: 100 + n }, later.clone())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    redis.halt();
    redis.resume();
    gate.add_permits(1_000);
    until("every job ran", || ran.lock().unwrap().len() >= ids.len()).await;
    let mut seen = ran.lock().unwrap().clone();
    seen.sort_unstable();
    seen.dedup();
    ids.sort_unstable();
    assert_eq!(seen, ids, "none lost");
    let status = jobs.status().await.unwrap();
    assert!(
        status
            .queues
            .iter()
            .all(|q| q.waiting == 0 && q.in_flight == 0),
        "{status:?}"
    );
}

crate::on_both_backends!(the_purges_remove_only_what_nothing_needs_any_more);

/// What the periodic purges will delete: refresh-token sessions whose every token expired
/// (whole sessions only: a revoked token must outlive its session's live ones), and device
/// registrations outside every limit window.
async fn the_purges_remove_only_what_nothing_needs_any_more(app: crate::helpers::TestApp) {
    use chrono::TimeDelta;
    use segue::store::{blocks, tokens};
    let live = app.register().await;
    let store = segue::store::Store::connect(&app.settings).await.unwrap();
    let mut pooled = store.conn().await.unwrap();
    let mut conn = pooled.conn();
    let now = segue::store::now();
    let long_ago = now - TimeDelta::days(40);
    let token = |family: &'static str, hash: &'static str, expires_at| tokens::NewRefreshToken {
        user_id: live.id,
        family_id: family,
        device_id: "d",
        token_hash: hash,
        created_at: long_ago,
        expires_at,
    };
    // A session all of whose tokens expired; one with an expired token and a live one.
    tokens::insert(&mut conn, &token("dead", "h1", now - TimeDelta::days(2)))
        .await
        .unwrap();
    tokens::insert(&mut conn, &token("dead", "h2", now - TimeDelta::days(1)))
        .await
        .unwrap();
    tokens::insert(&mut conn, &token("mixed", "h3", now - TimeDelta::days(2)))
        .await
        .unwrap();
    tokens::insert(&mut conn, &token("mixed", "h4", now + TimeDelta::days(1)))
        .await
        .unwrap();
    let purged = tokens::purge_expired_sessions(&mut conn, now)
        .await
        .unwrap();
    assert_eq!(purged, 2, "the dead session's two tokens");
    assert!(tokens::find(&mut conn, "h1").await.unwrap().is_none());
    assert!(
        tokens::find(&mut conn, "h3").await.unwrap().is_some(),
        "its session lives"
    );
    assert_eq!(
        app.refresh_raw(&live.refresh_token).await.status(),
        200,
        "a live login lives"
    );

    blocks::record_registration(
        &mut conn,
        &["id:old".to_owned()],
        segue::domain::UserId(live.id),
    )
    .await
    .unwrap();
    let cutoff = now + TimeDelta::seconds(1);
    assert_eq!(
        blocks::purge_registrations(&mut conn, cutoff)
            .await
            .unwrap(),
        1
    );
    let since = now - TimeDelta::days(30);
    let left = blocks::accounts_from_device(&mut conn, &["id:old".to_owned()], since)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

const OPERATOR: &str = "jobs-operator-token-of-at-least-32-bytes";

async fn admin(
    app: &crate::helpers::TestApp,
    method: reqwest::Method,
    path: &str,
) -> reqwest::Response {
    app.client
        .request(method, app.url(path))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap()
}

async fn admin_status(app: &crate::helpers::TestApp) -> serde_json::Value {
    let response = admin(app, reqwest::Method::GET, "/admin/jobs").await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[actix_web::test]
async fn without_an_operator_token_the_admin_routes_are_not_there() {
    let app = crate::helpers::TestApp::spawn(crate::helpers::Backend::Sqlite).await;
    for (method, path) in [
        (reqwest::Method::GET, "/admin/jobs"),
        (reqwest::Method::POST, "/admin/jobs/dead/1/retry"),
        (reqwest::Method::DELETE, "/admin/jobs/dead/1"),
        (reqwest::Method::GET, "/admin/blocks"),
    ] {
        let response = admin(&app, method.clone(), path).await;
        assert_eq!(
            crate::helpers::error_code(response, 404).await,
            "not_found",
            "{method} {path}"
        );
    }
    assert_eq!(
        app.get("/metrics").await.status(),
        200,
        "metrics stay open without a token"
    );
}

/// Probes through `POST /admin/jobs/probes` on a hub whose jobs run in process: they run,
/// their effect is in the store, the status and metrics say so; bad requests change nothing.
#[actix_web::test]
async fn probes_run_in_process_and_the_status_shows_them() {
    let app = crate::helpers::TestApp::spawn_tuned(crate::helpers::Backend::Sqlite, |s| {
        s.operator_token = Some(OPERATOR.into());
    })
    .await;
    for (body, field) in [
        (serde_json::json!({"count": 0}), "count"),
        (serde_json::json!({"count": 10_001}), "count"),
        (
            serde_json::json!({"count": 1, "work_ms": 60_001}),
            "work_ms",
        ),
    ] {
        let response = app
            .client
            .post(app.url("/admin/jobs/probes"))
            .bearer_auth(OPERATOR)
            .json(&body)
            .send()
            .await
            .unwrap();
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(error.to_string().contains(field), "{error}");
    }
    let response = app
        .client
        .post(app.url("/admin/jobs/probes"))
        .bearer_auth(OPERATOR)
        .json(&serde_json::json!({"count": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let ids: Vec<i64> = response.json::<serde_json::Value>().await.unwrap()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    let store = segue::store::Store::connect(&app.settings).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pooled = store.conn().await.unwrap();
        let runs = segue::store::jobs::probe_runs(&mut pooled.conn(), &ids)
            .await
            .unwrap();
        if runs.len() == 3 {
            assert!(runs.iter().all(|(_, n)| *n == 1));
            break;
        }
        assert!(Instant::now() < deadline, "probes never ran: {runs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = admin_status(&app).await;
    assert_eq!(status["backend"], "memory");
    assert_eq!(status["leader"], "this process");
    assert_eq!(status["periodic"][0]["job"], "store.upkeep");
    let metrics = admin(&app, reqwest::Method::GET, "/metrics")
        .await
        .text()
        .await
        .unwrap();
    for counted in ["enqueued", "started", "succeeded"] {
        let line = format!("segue_jobs_{counted}_total{{kind=\"jobs.probe\"}} 3");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

/// A dead letter on a Redis-backed hub, seen and handled over HTTP and with `segue jobs`.
#[actix_web::test]
async fn operators_see_retry_and_drop_dead_jobs_over_http_and_with_segue_jobs() {
    let app = crate::helpers::TestApp::spawn_tuned(crate::helpers::Backend::Sqlite, |s| {
        s.operator_token = Some(OPERATOR.into());
        s.redis_url = Some(redis_url().into());
        s.redis_namespace = unique("jobs_admin");
        s.jobs_max_attempts = 1;
    })
    .await;
    let namespace = app.settings.redis_namespace.clone();
    let outside = Jobs::Redis(
        RedisJobs::client(
            redis::Client::open(redis_url()).unwrap(),
            &namespace,
            metrics(),
        )
        .unwrap(),
    );
    // A kind no hub handles (written by a newer release, say): dead at once, with why.
    let id = outside
        .enqueue_value(
            "from.the.future",
            serde_json::json!({"x": 1}),
            Options::default(),
        )
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = admin_status(&app).await;
        if status["dead"] == 1 {
            break status;
        }
        assert!(Instant::now() < deadline, "never dead: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["backend"], "redis");
    assert_eq!(status["dead_jobs"][0]["id"], id);
    assert_eq!(status["dead_jobs"][0]["kind"], "from.the.future");
    assert!(
        status["dead_jobs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no handler")
    );
    assert_eq!(status["leader"], status["replica"], "the one hub leads");

    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_segue"))
            .arg("jobs")
            .args(args)
            .env_clear()
            .env("REDIS_URL", redis_url())
            .env("SEGUE_REDIS_NAMESPACE", &namespace)
            .env("SEGUE_LOG", "warn")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, out, _) = cli(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("dead 1"), "{out}");
    assert!(
        out.contains(status["replica"].as_str().unwrap()),
        "names the leader: {out}"
    );
    let (code, out, _) = cli(&["dead", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("{id}\tfrom.the.future")), "{out}");
    let (code, _, err) = cli(&["dead", "retry", "99999999"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no dead job has id 99999999"), "{err}");
    let (code, _, err) = cli(&["dead", "retry", "soon"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not a job id"), "{err}");
    let (code, out, _) = cli(&["dead", "retry", &id.to_string()]);
    assert_eq!(code, Some(0));
    assert!(out.contains("back in its queue"), "{out}");
    // Still unhandled, so dead again; this time dropped over HTTP.
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin_status(&app).await["dead"] != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retried = admin(
        &app,
        reqwest::Method::POST,
        &format!("/admin/jobs/dead/{id}/retry"),
    )
    .await;
    assert_eq!(retried.status(), 200);
    while admin_status(&app).await["dead"] != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dropped = admin(
        &app,
        reqwest::Method::DELETE,
        &format!("/admin/jobs/dead/{id}"),
    )
    .await;
    assert_eq!(dropped.status(), 204);
    let again = admin(
        &app,
        reqwest::Method::DELETE,
        &format!("/admin/jobs/dead/{id}"),
    )
    .await;
    assert_eq!(crate::helpers::error_code(again, 404).await, "no_such_job");
    let bad = admin(&app, reqwest::Method::POST, "/admin/jobs/dead/abc/retry").await;
    assert_eq!(crate::helpers::error_code(bad, 404).await, "not_found");
    assert_eq!(admin_status(&app).await["dead"], 0);
    let (code, _, err) = {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_segue"))
            .args(["jobs", "status"])
            .env_clear()
            .env("SEGUE_LOG", "warn")
            .output()
            .unwrap();
        (
            output.status.code(),
            (),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(
        code,
        Some(2),
        "without Redis there are no shared queues to read"
    );
    assert!(err.contains("GET /admin/jobs"), "{err}");
}

#[actix_web::test]
async fn the_upkeep_runs_on_its_schedule_and_removes_what_expired_on_sqlite() {
    the_upkeep_runs_on_its_schedule_and_removes_what_expired(crate::helpers::Backend::Sqlite).await;
}

#[actix_web::test]
async fn the_upkeep_runs_on_its_schedule_and_removes_what_expired_on_postgres() {
    the_upkeep_runs_on_its_schedule_and_removes_what_expired(crate::helpers::Backend::Postgres)
        .await;
}

/// The periodic upkeep, on a one-second schedule, removes an expired session and records
/// its run.
async fn the_upkeep_runs_on_its_schedule_and_removes_what_expired(
    backend: crate::helpers::Backend,
) {
    let app =
        crate::helpers::TestApp::spawn_tuned(backend, |s| s.upkeep_schedule = "1s".into()).await;
    use chrono::TimeDelta;
    use segue::store::tokens;
    let account = app.register().await;
    let store = segue::store::Store::connect(&app.settings).await.unwrap();
    let now = segue::store::now();
    {
        let mut pooled = store.conn().await.unwrap();
        let expired = tokens::NewRefreshToken {
            user_id: account.id,
            family_id: "expired",
            device_id: "d",
            token_hash: "expired-hash",
            created_at: now - TimeDelta::days(40),
            expires_at: now - TimeDelta::days(10),
        };
        tokens::insert(&mut pooled.conn(), &expired).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pooled = store.conn().await.unwrap();
        let mut conn = pooled.conn();
        let runs = segue::store::jobs::recent_runs(&mut conn, segue::upkeep::UPKEEP_JOB, 10)
            .await
            .unwrap();
        if runs.iter().any(|r| r.removed >= 1) {
            assert!(
                tokens::find(&mut conn, "expired-hash")
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                runs.iter().all(|r| r.doubled == 0 && r.epoch == 1),
                "{runs:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upkeep never removed it: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        app.refresh_raw(&account.refresh_token).await.status(),
        200,
        "a live session lives"
    );
}

/// With Redis gone, enqueueing through the hub fails at once with a clear 503 while the rest
/// of the hub serves; when Redis is back, jobs are taken and run again without a restart.
#[actix_web::test]
async fn with_redis_gone_the_hub_refuses_jobs_quickly_and_serves_the_rest() {
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let app = crate::helpers::TestApp::spawn_tuned(crate::helpers::Backend::Sqlite, |s| {
        s.operator_token = Some(OPERATOR.into());
        s.redis_url = Some(url.into());
    })
    .await;
    let probe = |count: u32| {
        app.client
            .post(app.url("/admin/jobs/probes"))
            .bearer_auth(OPERATOR)
            .json(&serde_json::json!({"count": count}))
            .send()
    };
    assert_eq!(probe(1).await.unwrap().status(), 202);
    redis.halt();
    let asked = Instant::now();
    let refused = probe(1).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        crate::helpers::error_code(refused, 503).await,
        "unavailable"
    );
    assert_eq!(
        app.register_raw("fran", "correct horse").await.status(),
        201,
        "the rest serves"
    );
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    let ids: Vec<i64> = loop {
        let response = probe(2).await.unwrap();
        if response.status() == 202 {
            let body: serde_json::Value = response.json().await.unwrap();
            break body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_i64().unwrap())
                .collect();
        }
        assert!(Instant::now() < deadline, "enqueueing never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let store = segue::store::Store::connect(&app.settings).await.unwrap();
    loop {
        let mut pooled = store.conn().await.unwrap();
        let runs = segue::store::jobs::probe_runs(&mut pooled.conn(), &ids)
            .await
            .unwrap();
        if runs.len() == ids.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workers never came back: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Regression (review of issue 12): the last tick a scheduler enqueued was kept as a bare
/// number, so after a schedule was lengthened (say `1s` → `3s`) the stored tick of the old
/// schedule stayed "ahead" for ages and the job never ran again.
#[actix_web::test]
async fn a_lengthened_schedule_keeps_running() {
    use segue::jobs::scheduler::{Every, LeaseSettings, Periodic, Scheduler, Tick};
    const TICKED: Kind<Tick> = Kind::new("test.ticked");
    let namespace = unique("jobs_sched");
    let ticks = Arc::new(Mutex::new(Vec::new()));
    let t = ticks.clone();
    let handlers = Handlers::new().on(&TICKED, move |job: Job<Tick>| {
        t.lock().unwrap().push(job.payload.tick);
        async { Ok(()) }
    });
    let jobs = Jobs::Redis(redis_consumer(
        &redis_url(),
        &namespace,
        handlers,
        settings(),
    ));
    let lease = LeaseSettings {
        ttl: Duration::from_secs(3),
    };
    let every_second = Periodic::new("ticked", Every::parse("1s").unwrap(), &TICKED);
    let scheduler = Scheduler::start(
        jobs.clone(),
        vec![every_second],
        "a".into(),
        lease,
        metrics(),
        Clock::system(),
    );
    until("a tick ran on the 1 s schedule", || {
        !ticks.lock().unwrap().is_empty()
    })
    .await;
    scheduler.stop().await;
    ticks.lock().unwrap().clear();
    let every_two = Periodic::new("ticked", Every::parse("2s").unwrap(), &TICKED);
    let scheduler = Scheduler::start(
        jobs.clone(),
        vec![every_two],
        "b".into(),
        lease,
        metrics(),
        Clock::system(),
    );
    // The first tick of a new schedule is its next one (within 2 s), then every 2 s.
    let deadline = Instant::now() + Duration::from_secs(7);
    while ticks.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lengthened schedule never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    scheduler.stop().await;
}

/// Regression (review of issue 12): each sweep restarted `XAUTOCLAIM` at `0-0`, which looks
/// at no more than 1,000 pending entries per call; with over 1,000 live entries ahead of them,
/// a dead replica's entries were never reached.
#[actix_web::test]
async fn entries_behind_a_thousand_live_ones_are_reclaimed() {
    let namespace = unique("jobs_deep");
    let client = redis::Client::open(redis_url()).unwrap();
    let outside = Jobs::Redis(RedisJobs::client(client.clone(), &namespace, metrics()).unwrap());
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let queue = format!("{{{namespace}:jobs}}:q:default");
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", &queue, "workers", "0", "MKSTREAM"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let take = |consumer: &'static str, count: usize| {
        redis::cmd("XREADGROUP")
            .arg(
                &[
                    "GROUP",
                    "workers",
                    consumer,
                    "COUNT",
                    &count.to_string(),
                    "STREAMS",
                    &queue,
                    ">",
                ][..],
            )
            .to_owned()
    };
    for _ in 0..1_100 {
        outside
            .enqueue(&WORK, &Work { n: 0 }, Options::default())
            .await
            .unwrap();
    }
    let live: redis::streams::StreamReadReply =
        take("live", 1_100).query_async(&mut conn).await.unwrap();
    for _ in 0..200 {
        outside
            .enqueue(&WORK, &Work { n: 3 }, Options::default())
            .await
            .unwrap();
    }
    let _: redis::Value = take("dead", 200).query_async(&mut conn).await.unwrap();
    tokio::time::sleep(timing().visibility + Duration::from_millis(100)).await;
    // The live consumer renews its 1,100; the dead one's 200 lie idle behind them.
    let ids: Vec<String> = live.keys[0].ids.iter().map(|id| id.id.clone()).collect();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&[queue.as_str(), "workers", "live", "0"][..])
        .arg(&ids)
        .arg(&["IDLE", "0", "JUSTID"][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let handlers = Handlers::new().on(&WORK, move |_: Job<Work>| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let sweeping = RedisJobs::start(
        client,
        &namespace,
        "sweeper".into(),
        handlers,
        JobSettings {
            concurrency: 50,
            ..settings()
        },
        RedisJobSettings {
            // Swept by hand below.
            sweep_every: Duration::from_secs(3_600),
            ..timing()
        },
        metrics(),
    )
    .unwrap();
    let mut taken = 0;
    for _ in 0..3 {
        taken += sweeping.reclaim_once().await.unwrap();
    }
    assert_eq!(
        taken, 200,
        "the dead consumer's entries, and none of the live one's"
    );
    until("they ran", || ran.load(Ordering::SeqCst) == 200).await;
}

/// Regression (review of issue 12): leases stopped being renewed the moment a shutdown began,
/// so a job still draining past the visibility timeout was reclaimed and run a second time
/// elsewhere while it finished here.
#[actix_web::test]
async fn a_job_draining_at_shutdown_keeps_its_lease() {
    let namespace = unique("jobs");
    let (runs_a, a) = recording_consumer(&namespace, settings());
    let id = Jobs::Redis(a.clone())
        .enqueue(&WORK, &Work { n: 2 }, Options::default())
        .await
        .unwrap()
        .unwrap();
    loop {
        if Jobs::Redis(a.clone()).status().await.unwrap().queues[1].in_flight == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (runs_b, _b) = recording_consumer(&namespace, settings());
    // 2.5 s of work, drained for up to 5 s, against a visibility timeout of 0.8 s.
    Jobs::Redis(a).shutdown(Duration::from_secs(5)).await;
    assert_eq!(*runs_a.lock().unwrap(), vec![id], "finished while draining");
    // A second run (taken over at 0.8 s, 2.5 s long) would have finished by now.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        runs_b.lock().unwrap().is_empty(),
        "never taken over: {:?}",
        runs_b.lock().unwrap()
    );
}

/// Regression (review of issue 12): a dead job whose payload is a JSON string was put back
/// with the string's bare text as its payload, no longer JSON, and died again as unreadable.
#[actix_web::test]
async fn a_dead_job_with_a_string_payload_is_retried_intact() {
    const TEXT: Kind<String> = Kind::new("test.text");
    let fixed = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (f, s) = (fixed.clone(), seen.clone());
    let handlers = Handlers::new().on(&TEXT, move |job: Job<String>| {
        let (fixed, seen) = (f.clone(), s.clone());
        async move {
            if fixed.load(Ordering::SeqCst) == 0 {
                return Err(Failure::Permanent("not yet".into()));
            }
            seen.lock().unwrap().push(job.payload);
            Ok(())
        }
    });
    for on in [On::Memory, On::Redis] {
        fixed.store(0, Ordering::SeqCst);
        seen.lock().unwrap().clear();
        let jobs = start(on, handlers.clone(), settings());
        let id = jobs
            .enqueue(&TEXT, &"a | b".to_owned(), Options::default())
            .await
            .unwrap()
            .unwrap();
        dead_soon(&jobs, 1).await;
        fixed.store(1, Ordering::SeqCst);
        assert!(jobs.retry_dead(id).await.unwrap());
        until("the retried job ran", || !seen.lock().unwrap().is_empty()).await;
        assert_eq!(*seen.lock().unwrap(), vec!["a | b".to_owned()]);
    }
}
