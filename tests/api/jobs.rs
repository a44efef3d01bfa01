//! Background jobs: the port's acceptance suite (issue 12). It runs on the in-process
//! implementation now; the Redis Streams one will run the same cases.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segue::jobs::{Failure, Handlers, JobSettings, Kind, MemoryJobs, Options, Priority};
use serde::{Deserialize, Serialize};

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

/// Waits until `done` holds (or fails after 5 s).
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[actix_web::test]
async fn a_job_runs_and_a_failing_one_is_retried_with_backoff_then_dead_lettered() {
    let ran = Arc::new(AtomicU32::new(0));
    let tries = Arc::new(AtomicU32::new(0));
    let (r, t) = (ran.clone(), tries.clone());
    let handlers = Handlers::new().on(&WORK, move |work: Work| {
        let (ran, tries) = (r.clone(), t.clone());
        async move {
            match work.n {
                // Fails twice, then succeeds.
                1 if tries.fetch_add(1, Ordering::SeqCst) < 2 => Err(Failure::Retry("busy".into())),
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
    let jobs = MemoryJobs::start(handlers, settings());
    jobs.enqueue(&WORK, &Work { n: 0 }, Options::default())
        .unwrap();
    until("the plain job ran", || ran.load(Ordering::SeqCst) == 1).await;
    let started = Instant::now();
    jobs.enqueue(&WORK, &Work { n: 1 }, Options::default())
        .unwrap();
    until("the flaky job succeeded", || {
        ran.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        tries.load(Ordering::SeqCst),
        3,
        "two failures, then the run that worked"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "backoff is capped at 100 ms"
    );
    jobs.enqueue(&WORK, &Work { n: 2 }, Options::default())
        .unwrap();
    jobs.enqueue(&WORK, &Work { n: 3 }, Options::default())
        .unwrap();
    until("both dead", || jobs.dead().len() == 2).await;
    let dead: HashMap<String, (u32, String)> = jobs
        .dead()
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
}

#[actix_web::test]
async fn an_unreadable_payload_or_unknown_kind_goes_straight_to_dead_letters() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handlers = Handlers::new().on(&WORK, move |_: Work| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let jobs = MemoryJobs::start(handlers, settings());
    jobs.enqueue_value(
        "work",
        serde_json::json!({"n": "not a number"}),
        Options::default(),
    )
    .unwrap();
    jobs.enqueue_value(
        "nobody-handles-this",
        serde_json::json!({}),
        Options::default(),
    )
    .unwrap();
    until("both dead", || jobs.dead().len() == 2).await;
    assert!(
        jobs.dead().iter().all(|d| d.attempts == 1),
        "{:?}",
        jobs.dead()
    );
    assert!(
        jobs.dead()[0].error.contains("unreadable payload"),
        "{:?}",
        jobs.dead()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[actix_web::test]
async fn an_idempotency_key_runs_a_job_once_and_not_before_is_kept() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = runs.clone();
    let handlers = Handlers::new().on(&WORK, move |work: Work| {
        r.lock().unwrap().push((work.n, Instant::now()));
        async { Ok(()) }
    });
    let jobs = MemoryJobs::start(handlers, settings());
    let keyed = || Options {
        idempotency_key: Some("purge:2026-12-02".into()),
        ..Options::default()
    };
    assert!(
        jobs.enqueue(&WORK, &Work { n: 1 }, keyed())
            .unwrap()
            .is_some()
    );
    assert!(
        jobs.enqueue(&WORK, &Work { n: 1 }, keyed())
            .unwrap()
            .is_none(),
        "taken once"
    );
    let enqueued = Instant::now();
    let later = Options {
        delay: Some(Duration::from_millis(300)),
        ..Options::default()
    };
    jobs.enqueue(&WORK, &Work { n: 2 }, later).unwrap();
    until("the delayed job ran", || runs.lock().unwrap().len() == 2).await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.iter().filter(|(n, _)| *n == 1).count(), 1);
    let (_, at) = runs.iter().find(|(n, _)| *n == 2).unwrap();
    assert!(
        at.duration_since(enqueued) >= Duration::from_millis(300),
        "not before"
    );
}

#[actix_web::test]
async fn no_more_than_the_concurrency_run_at_once() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (r, m, d) = (running.clone(), most.clone(), done.clone());
    let handlers = Handlers::new().on(&WORK, move |_: Work| {
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
    let jobs = MemoryJobs::start(handlers, settings());
    for n in 0..20 {
        jobs.enqueue(&WORK, &Work { n }, Options::default())
            .unwrap();
    }
    until("all ran", || done.load(Ordering::SeqCst) == 20).await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "exactly the limit, never more"
    );
}

/// Under a backlog in every queue, busy queues get about 60 / 30 / 10 % of the runs.
#[actix_web::test]
async fn a_backlog_is_served_by_priority_weights() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let handlers = Handlers::new().on(&WORK, move |work: Work| {
        o.lock().unwrap().push(work.n);
        async { Ok(()) }
    });
    let jobs = MemoryJobs::start(
        handlers,
        JobSettings {
            concurrency: 1,
            ..settings()
        },
    );
    // Enqueued without yielding: on this single-threaded runtime the dispatcher runs only
    // once the whole backlog is in.
    for (n, priority) in [
        (0, Priority::Critical),
        (1, Priority::Default),
        (2, Priority::Low),
    ] {
        for _ in 0..2_000 {
            let options = Options {
                priority: Some(priority),
                ..Options::default()
            };
            jobs.enqueue(&WORK, &Work { n }, options).unwrap();
        }
    }
    until("1,000 ran", || order.lock().unwrap().len() >= 1_000).await;
    let first: Vec<u32> = order.lock().unwrap().iter().take(1_000).copied().collect();
    let share = |n| first.iter().filter(|m| **m == n).count() as f64 / 1_000.0;
    assert!((share(0) - 0.6).abs() < 0.05, "critical {}", share(0));
    assert!((share(1) - 0.3).abs() < 0.05, "default {}", share(1));
    assert!((share(2) - 0.1).abs() < 0.04, "low {}", share(2));
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
