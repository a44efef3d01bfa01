//! Redis faults while jobs run on two replicas: Redis hung (`DEBUG SLEEP`), the consumers'
//! connections killed (`CLIENT KILL TYPE normal`), and Redis killed with `kill -9` and
//! restarted from its append-only file, one after another while probes are being worked
//! through. Every job acknowledged at enqueue must have its effect; duplicates (a job whose
//! acknowledgement was lost runs again: delivery is at least once) are counted and printed.

use std::time::{Duration, Instant};

use crate::helpers::PrivateRedis;
use crate::jobs_cluster::{Cluster, metric, pending, status};

const PROBES: u32 = 600;
const WORK_MS: u64 = 100;

/// Two replicas' cluster whose jobs run ten at a time per replica (so the probes take 3 s in
/// all, longer than the faults), on the Redis at `redis` (else the shared one).
async fn cluster(redis: Option<&str>) -> Cluster {
    let mut extra = vec![("SEGUE_JOBS_CONCURRENCY", "10")];
    if let Some(url) = redis {
        extra.push(("REDIS_URL", url));
    }
    Cluster::new(&extra).await
}

/// Waits until every probe of `ids` has its effect (none acknowledged is lost); how many runs
/// there were beyond one each (delivery is at least once).
async fn all_done_once_or_more(cluster: &Cluster, ids: &[i64]) -> i32 {
    let runs = cluster.all_probes_done(ids, Duration::from_secs(60)).await;
    assert_eq!(
        runs.len(),
        ids.len(),
        "every acknowledged job had its effect"
    );
    runs.values().map(|n| n - 1).sum()
}

#[actix_web::test]
async fn jobs_in_flight_survive_redis_hanging_losing_its_clients_and_being_killed() {
    let mut redis = PrivateRedis::start_durable();
    let url = redis.url();
    let cluster = cluster(Some(&url)).await;
    let a = cluster.hub().await;
    let b = cluster.hub().await;
    let ids = cluster.probes(&a, PROBES, WORK_MS).await;
    assert_eq!(ids.len(), PROBES as usize);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Hung for a second, connections open.
    let hang = {
        let port = redis.port;
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "DEBUG", "SLEEP", "1"])
                .output()
                .expect("redis-cli")
        })
    };
    hang.await.expect("DEBUG SLEEP");
    let done_after_hang = cluster.probe_runs(&ids).await.len();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every client connection (the consumers' blocking reads among them) dropped at once.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let done_after_client_kill = cluster.probe_runs(&ids).await.len();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Killed outright, restarted from its append-only file half a second later.
    redis.halt();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume();
    let restarted = Instant::now();
    let done_at_restart = cluster.probe_runs(&ids).await.len();
    assert!(
        done_at_restart < ids.len(),
        "the faults came too late: every probe was done before the kill"
    );

    let duplicates = all_done_once_or_more(&cluster, &ids).await;
    let finished = restarted.elapsed();
    let deadline = Instant::now() + Duration::from_secs(15);
    for hub in [&a, &b] {
        while pending(&status(hub).await) > 0 {
            assert!(
                Instant::now() < deadline,
                "jobs left in the queues: {}",
                status(hub).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let reclaimed = metric(&a, "segue_jobs_reclaimed_total").await
        + metric(&b, "segue_jobs_reclaimed_total").await;
    println!(
        "fault jobs under Redis faults: {PROBES} probes of {WORK_MS} ms on two replicas; done \
         {done_after_hang} after DEBUG SLEEP 1, {done_after_client_kill} after CLIENT KILL \
         ({} clients), {done_at_restart} when Redis came back from kill -9; all done {} ms \
         later ({} ms in all), 0 lost, {duplicates} run twice, {reclaimed} reclaimed",
        killed.trim(),
        finished.as_millis(),
        started.elapsed().as_millis()
    );
}

/// The network to Redis black-holed for two seconds (connections open, nothing answers) while
/// both replicas work through probes: the connections that lost bytes stay dead, and the
/// workers must notice and carry on over fresh ones.
#[actix_web::test]
async fn jobs_carry_on_after_the_link_to_redis_went_silent() {
    let redis = PrivateRedis::start_durable();
    let link = super::proxy::Link::start(([127, 0, 0, 1], redis.port).into());
    let url = link.redis_url();
    let cluster = cluster(Some(&url)).await;
    let a = cluster.hub().await;
    let b = cluster.hub().await;
    let ids = cluster.probes(&a, PROBES, WORK_MS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    link.blackhole();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done_when_silenced = cluster.probe_runs(&ids).await.len();
    link.pass();
    let healed = Instant::now();
    assert!(
        done_when_silenced < ids.len(),
        "the fault came too late: every probe was done"
    );
    let duplicates = all_done_once_or_more(&cluster, &ids).await;
    let finished = healed.elapsed();
    println!(
        "fault jobs, link to Redis silent 2 s: {done_when_silenced} of {PROBES} probes done when \
         it healed, all done {} ms later, 0 lost, {duplicates} run twice",
        finished.as_millis()
    );
    drop((a, b));
}

/// A replica paused (SIGSTOP) for five seconds with jobs in flight: to the other it is dead,
/// and its jobs are reclaimed after the visibility timeout and done there; when it wakes, what
/// it still held is finished once more at most (delivery is at least once), and none is lost.
#[actix_web::test]
async fn jobs_of_a_paused_replica_are_reclaimed_and_none_is_lost() {
    use crate::jobs_cluster::signal;
    let cluster = cluster(None).await;
    let paused = cluster.hub().await;
    let ids = cluster.probes(&paused, 100, 300).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let other = cluster.hub().await;
    signal(&paused, "STOP");
    let stopped = Instant::now();
    // Visibility 1.5 s and a sweep: the other replica takes over within the pause.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&other, "segue_jobs_reclaimed_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "nothing was reclaimed from the paused replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reclaimed_after = stopped.elapsed();
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed())).await;
    signal(&paused, "CONT");
    let duplicates = all_done_once_or_more(&cluster, &ids).await;
    println!(
        "fault jobs, replica paused 5 s: the other reclaimed its jobs {} ms after the pause; all \
         100 done, 0 lost, {duplicates} run twice",
        reclaimed_after.as_millis()
    );
}
