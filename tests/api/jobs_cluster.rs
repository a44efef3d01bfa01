//! Jobs across hub processes sharing one Redis and one PostgreSQL database: a replica killed
//! with jobs in flight, a graceful stop, and the scheduler's leader dying.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{DatabaseGuard, HubProcess, fresh_postgres_database, redis_url, unique};

const OPERATOR: &str = "jobs-operator-token-of-at-least-32-bytes";

/// A database, a Redis namespace and the settings every hub of one test shares.
pub struct Cluster {
    _database: DatabaseGuard,
    env: Vec<(String, String)>,
    pub store: segue::store::Store,
}

impl Cluster {
    pub async fn new(extra: &[(&str, &str)]) -> Self {
        let (name, database) = fresh_postgres_database().await;
        let guard = DatabaseGuard(name);
        let mut env: Vec<(String, String)> = [
            ("DATABASE_URL", database.as_str()),
            ("REDIS_URL", redis_url().as_str()),
            ("SEGUE_REDIS_NAMESPACE", unique("jobs_cluster").as_str()),
            ("SEGUE_OPERATOR_TOKEN", OPERATOR),
            ("SEGUE_JOBS_VISIBILITY_MS", "1500"),
            ("SEGUE_JOBS_SWEEP_MS", "300"),
            ("SEGUE_LOG", "warn"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value.to_string()));
        }
        let settings = segue::settings::Settings {
            database_url: Some(database.clone().into()),
            ..Default::default()
        };
        let store = segue::store::Store::connect(&settings).await.unwrap();
        Self {
            _database: guard,
            env,
            store,
        }
    }

    /// The shared PostgreSQL database.
    pub fn database_url(&self) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == "DATABASE_URL")
            .map(|(_, v)| v.as_str())
            .expect("DATABASE_URL")
    }

    pub async fn hub(&self) -> HubProcess {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        HubProcess::start(&env).await
    }

    /// Enqueues `count` probes through `hub`; their job ids.
    pub async fn probes(&self, hub: &HubProcess, count: u32, work_ms: u64) -> Vec<i64> {
        let response = reqwest::Client::new()
            .post(format!("{}/admin/jobs/probes", hub.address))
            .bearer_auth(OPERATOR)
            .json(&json!({"count": count, "work_ms": work_ms}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        body["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_i64().unwrap())
            .collect()
    }

    /// Completed runs per probe job id, for those of `ids` that have any.
    pub async fn probe_runs(&self, ids: &[i64]) -> BTreeMap<i64, i32> {
        let mut pooled = self.store.conn().await.unwrap();
        segue::store::jobs::probe_runs(&mut pooled.conn(), ids)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Waits until every probe of `ids` has its row (or fails after `within`).
    pub async fn all_probes_done(&self, ids: &[i64], within: Duration) -> BTreeMap<i64, i32> {
        let deadline = Instant::now() + within;
        loop {
            let runs = self.probe_runs(ids).await;
            if runs.len() == ids.len() {
                return runs;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} probes done",
                runs.len(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn periodic_runs(&self) -> Vec<segue::store::jobs::PeriodicRun> {
        let mut pooled = self.store.conn().await.unwrap();
        segue::store::jobs::recent_runs(&mut pooled.conn(), segue::upkeep::UPKEEP_JOB, 1_000)
            .await
            .unwrap()
    }
}

pub async fn status(hub: &HubProcess) -> Value {
    let response = reqwest::Client::new()
        .get(format!("{}/admin/jobs", hub.address))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

pub async fn metric(hub: &HubProcess, name: &str) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", hub.address))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn signal(hub: &HubProcess, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &hub.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits for the process to exit; its exit status and how long that took.
pub async fn exit_of(
    hub: &mut HubProcess,
    within: Duration,
) -> (std::process::ExitStatus, Duration) {
    let asked = Instant::now();
    loop {
        if let Some(status) = hub.child.try_wait().unwrap() {
            return (status, asked.elapsed());
        }
        assert!(
            asked.elapsed() < within,
            "the hub did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn pending(status: &Value) -> u64 {
    status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["waiting"].as_u64().unwrap() + q["in_flight"].as_u64().unwrap())
        .sum()
}

/// Two hubs share the queues; one is killed with SIGKILL while it holds jobs. The other
/// reclaims them after the visibility timeout: every one of 1,000 jobs has its effect, once.
#[actix_web::test]
async fn a_replica_killed_with_jobs_in_flight_loses_none() {
    let cluster = Cluster::new(&[]).await;
    let mut doomed = cluster.hub().await;
    let survivor = cluster.hub().await;
    let ids = cluster.probes(&doomed, 1_000, 100).await;
    assert_eq!(ids.len(), 1_000);
    // Both replicas are at work (ten jobs each at a time, 100 ms apiece: 5 s in all, so some
    // are left however slowly the enqueue went) when one dies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cluster.probe_runs(&ids).await.len();
    assert!(before < 1_000, "still jobs to do when the replica dies");
    let in_flight: u64 = status(&doomed).await["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["in_flight"].as_u64().unwrap())
        .sum();
    signal(&doomed, "KILL");
    let killed = Instant::now();
    let _ = exit_of(&mut doomed, Duration::from_secs(5)).await;
    let runs = cluster.all_probes_done(&ids, Duration::from_secs(60)).await;
    let recovered = killed.elapsed();
    assert_eq!(runs.len(), 1_000, "every job's effect exists");
    assert!(runs.values().all(|n| *n >= 1));
    let reclaimed = metric(&survivor, "segue_jobs_reclaimed_total").await;
    assert!(
        reclaimed >= 1.0,
        "the survivor took over what the dead one held"
    );
    // visibility 1.5 s + a sweep (0.3 s), plus the survivor working through the backlog.
    assert!(recovered < Duration::from_secs(30), "{recovered:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(&status(&survivor).await) > 0 {
        assert!(Instant::now() < deadline, "{}", status(&survivor).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "1,000 jobs, one replica of two killed with {before} done and {in_flight} in flight on \
         both: all done {recovered:?} after the kill, {reclaimed} reclaimed"
    );
}

/// SIGTERM with long jobs running: fetching stops, the jobs finish inside the drain
/// deadline, the process exits cleanly, and nothing is run twice to completion.
#[actix_web::test]
async fn sigterm_drains_jobs_in_flight_and_leaves_the_rest_to_the_other_replica() {
    let cluster = Cluster::new(&[("SEGUE_JOBS_DRAIN_SECS", "10")]).await;
    let mut stopping = cluster.hub().await;
    let other = cluster.hub().await;
    let ids = cluster.probes(&stopping, 60, 1_500).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    signal(&stopping, "TERM");
    let (exit, took) = exit_of(&mut stopping, Duration::from_secs(12)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(500),
        "it waited for its jobs: {took:?}"
    );
    let runs = cluster.all_probes_done(&ids, Duration::from_secs(30)).await;
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "run to completion more than once: {twice:?}"
    );
    assert!(
        pending(&status(&other).await) == 0,
        "{}",
        status(&other).await
    );
}

/// SIGTERM with jobs longer than the drain deadline: the process exits at the deadline, the
/// unfinished jobs are reclaimed by the other replica and completed there, once.
#[actix_web::test]
async fn jobs_cut_off_by_the_drain_deadline_are_reclaimed_and_completed_once() {
    let cluster = Cluster::new(&[("SEGUE_JOBS_DRAIN_SECS", "1")]).await;
    let mut stopping = cluster.hub().await;
    let ids = cluster.probes(&stopping, 5, 4_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = cluster.hub().await;
    signal(&stopping, "TERM");
    let (exit, took) = exit_of(&mut stopping, Duration::from_secs(8)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        took < Duration::from_secs(4),
        "it stopped at the drain deadline: {took:?}"
    );
    assert!(
        cluster.probe_runs(&ids).await.is_empty(),
        "none had finished"
    );
    let runs = cluster.all_probes_done(&ids, Duration::from_secs(30)).await;
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    assert!(metric(&other, "segue_jobs_reclaimed_total").await >= 5.0);
}

/// Three hubs, a periodic job every second: each tick runs exactly once, across a kill of
/// the leader; another replica leads within the lease TTL.
#[actix_web::test]
async fn a_periodic_job_runs_once_per_period_across_a_leader_kill() {
    let cluster = Cluster::new(&[
        ("SEGUE_UPKEEP_SCHEDULE", "1s"),
        ("SEGUE_SCHEDULER_LEASE_MS", "3000"),
    ])
    .await;
    let mut hubs = vec![
        cluster.hub().await,
        cluster.hub().await,
        cluster.hub().await,
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.periodic_runs().await.len() < 5 {
        assert!(Instant::now() < deadline, "the upkeep does not run");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let leader = status(&hubs[0]).await["leader"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut at = None;
    for (i, hub) in hubs.iter().enumerate() {
        if status(hub).await["replica"] == leader.as_str() {
            at = Some(i);
        }
    }
    let at = at.expect("the leader is one of the three");
    let mut doomed = hubs.remove(at);
    let ticks_before = cluster.periodic_runs().await.len();
    signal(&doomed, "KILL");
    let killed = Instant::now();
    let _ = exit_of(&mut doomed, Duration::from_secs(5)).await;
    let took_over = loop {
        let now_leading = status(&hubs[0]).await["leader"].as_str().map(str::to_owned);
        if now_leading.is_some_and(|l| l != leader) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "nobody took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The lease lapses at most its TTL (3 s) after the last renewal; the others ask for it
    // every third of that.
    assert!(
        took_over <= Duration::from_millis(3_000 + 1_000 + 300),
        "within the lease TTL and one asking interval: {took_over:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.periodic_runs().await.len() < ticks_before + 6 {
        assert!(
            Instant::now() < deadline,
            "the upkeep stopped after the kill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the last enqueued ticks finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut runs = cluster.periodic_runs().await;
    runs.sort_by_key(|r| r.tick);
    assert!(runs.len() >= 11, "{} periods", runs.len());
    let ticks: Vec<i64> = runs.iter().map(|r| r.tick).collect();
    let first = ticks[0];
    let expected: Vec<i64> = (first..first + ticks.len() as i64).collect();
    assert_eq!(ticks, expected, "no period missed");
    assert!(
        runs.iter().all(|r| r.doubled == 0),
        "none enqueued twice: {runs:?}"
    );
    let epochs: std::collections::BTreeSet<i64> = runs.iter().map(|r| r.epoch).collect();
    assert!(
        epochs.len() >= 2,
        "a second leader enqueued some: {epochs:?}"
    );
    eprintln!(
        "{} periods, each once; the leader killed, another led {took_over:?} later",
        runs.len()
    );
}
