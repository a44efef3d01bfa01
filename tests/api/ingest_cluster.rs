//! The now-playing pipeline's failure matrix across hub processes sharing PostgreSQL and
//! Redis: a worker killed mid-job, and Redis restarted from its AOF with reports queued.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{Account, HubProcess, NO_RATE_LIMITS, PrivateRedis, account_from, unique};
use crate::ingest::short_track;
use crate::jobs_cluster::{Cluster, exit_of, metric, signal};

async fn register(hub: &HubProcess) -> Account {
    let handle: String = unique("ing").replace('_', "").chars().take(20).collect();
    let password = "correct horse battery";
    let response = reqwest::Client::new()
        .post(format!("{}/auth/register", hub.address))
        .json(&serde_json::json!({"handle": handle, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    account_from(&response.json().await.unwrap(), &handle, password)
}

async fn ingest(
    client: &reqwest::Client,
    hub: &HubProcess,
    account: &Account,
    body: &Value,
) -> String {
    let response = client
        .post(format!("{}/ingest/plays", hub.address))
        .bearer_auth(&account.access_token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["ingest_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until every report of `ids` was applied (or fails after `within`).
async fn all_applied(cluster: &Cluster, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut pooled = cluster.store.conn().await.unwrap();
        let mut conn = pooled.conn();
        let mut missing = 0;
        for id in ids {
            if segue::store::ingests::applied(&mut conn, id)
                .await
                .unwrap()
                .is_none()
            {
                missing += 1;
            }
        }
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} reports never applied",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn plays_of(cluster: &Cluster, account: &Account) -> usize {
    let mut pooled = cluster.store.conn().await.unwrap();
    segue::store::plays::recent(&mut pooled.conn(), segue::domain::UserId(account.id), 100)
        .await
        .unwrap()
        .len()
}

fn extra() -> Vec<(&'static str, &'static str)> {
    let mut extra = NO_RATE_LIMITS.to_vec();
    extra.push(("SEGUE_JOBS_BACKOFF_BASE_MS", "100"));
    extra.push(("SEGUE_JOBS_BACKOFF_CAP_MS", "500"));
    extra
}

/// Two hubs work the queues; one is killed with SIGKILL while both are applying reports.
/// The other reclaims what the dead one held: every report is applied, every play counted
/// exactly once.
#[actix_web::test]
async fn a_worker_killed_mid_job_loses_no_report_and_counts_no_play_twice() {
    let cluster = Cluster::new(&extra()).await;
    let mut doomed = cluster.hub().await;
    let survivor = cluster.hub().await;
    let mut accounts = Vec::new();
    for _ in 0..40 {
        accounts.push(register(&survivor).await);
    }
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for account in &accounts {
        ids.push(ingest(&client, &doomed, account, &short_track("Reclaimed", 0)).await);
    }
    // 1.2 s of a 2 s track later, every play counts; these reports race the kill.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let later = short_track("Reclaimed", 1_200);
    let second = futures_util::future::join_all(
        accounts.iter().map(|a| ingest(&client, &doomed, a, &later)),
    )
    .await;
    ids.extend(second);
    signal(&doomed, "KILL");
    let applied = applied_count(&cluster, &ids).await;
    eprintln!(
        "{applied} of {} reports applied when the worker died",
        ids.len()
    );
    let _ = exit_of(&mut doomed, Duration::from_secs(5)).await;
    all_applied(&cluster, &ids, Duration::from_secs(60)).await;
    for account in &accounts {
        assert_eq!(plays_of(&cluster, account).await, 1, "{}", account.handle);
    }
    eprintln!(
        "reclaimed by the survivor: {}",
        metric(&survivor, "segue_jobs_reclaimed_total").await
    );
}

async fn applied_count(cluster: &Cluster, ids: &[String]) -> usize {
    let mut pooled = cluster.store.conn().await.unwrap();
    let mut conn = pooled.conn();
    let mut applied = 0;
    for id in ids {
        if segue::store::ingests::applied(&mut conn, id)
            .await
            .unwrap()
            .is_some()
        {
            applied += 1;
        }
    }
    applied
}

/// 300 reports are acknowledged; Redis is killed at once, with most still queued, and
/// restarted from its append-only file: every acknowledged report is applied.
#[actix_web::test]
async fn reports_queued_when_redis_restarts_from_its_aof_are_all_applied() {
    let mut redis = PrivateRedis::start_durable();
    let url = redis.url();
    let mut extra = extra();
    extra.push(("REDIS_URL", url.as_str()));
    let cluster = Cluster::new(&extra).await;
    let hub = cluster.hub().await;
    let accounts = [
        register(&hub).await,
        register(&hub).await,
        register(&hub).await,
    ];
    let client = reqwest::Client::new();
    let bodies: Vec<Value> = (0..300)
        .map(|n| short_track(&format!("Queued {n}"), 0))
        .collect();
    let ids = futures_util::future::join_all(
        bodies
            .iter()
            .enumerate()
            .map(|(n, body)| ingest(&client, &hub, &accounts[n % 3], body)),
    )
    .await;
    redis.halt();
    let applied = applied_count(&cluster, &ids).await;
    eprintln!(
        "{applied} of {} reports applied when Redis went down",
        ids.len()
    );
    assert!(
        applied < ids.len(),
        "reports were still queued when Redis went down"
    );
    redis.resume();
    all_applied(&cluster, &ids, Duration::from_secs(60)).await;
}

/// Decompression bombs and truncated images, thirty of each, cost a hub process little
/// memory: each is refused at the door from its header (or its missing end), before any
/// decoding or staging.
#[actix_web::test]
async fn hostile_images_keep_a_hubs_memory_bounded() {
    let hub = HubProcess::start(&NO_RATE_LIMITS).await;
    let account = register(&hub).await;
    let client = reqwest::Client::new();
    let bomb = crate::artwork::png_claiming(60_000, 60_000);
    let truncated = {
        let mut cover = crate::artwork::jpeg(3000, 3000);
        cover.truncate(cover.len() - 1024);
        cover
    };
    let before = hub.rss_kib();
    for n in 0..60 {
        let image = if n % 2 == 0 { &bomb } else { &truncated };
        // A fresh image each time (a byte appended after its end), so none is known.
        let mut image = image.clone();
        image.extend((n as u32).to_be_bytes());
        let (content_type, body) =
            crate::ingest::multipart(&short_track(&format!("Bomb {n}"), 0), Some(&image), None);
        let response = client
            .post(format!("{}/ingest/plays", hub.address))
            .bearer_auth(&account.access_token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&hub, "segue_artwork_refused_total").await < 60.0 {
        assert!(Instant::now() < deadline, "not every image was refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&hub, "segue_artwork_rendered_total").await, 0.0);
    let grown = hub.rss_kib().saturating_sub(before);
    eprintln!("RSS grew by {grown} KiB over 60 hostile images");
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}
