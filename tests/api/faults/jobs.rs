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

#[actix_web::test]
async fn jobs_in_flight_survive_redis_hanging_losing_its_clients_and_being_killed() {
    let mut redis = PrivateRedis::start_durable();
    let url = redis.url();
    // Ten at a time per replica: the probes take 3 s in all, longer than the faults.
    let cluster = Cluster::new(&[
        ("REDIS_URL", url.as_str()),
        ("SEGUE_JOBS_CONCURRENCY", "10"),
    ])
    .await;
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

    let runs = cluster.all_probes_done(&ids, Duration::from_secs(60)).await;
    let finished = restarted.elapsed();
    assert_eq!(
        runs.len(),
        ids.len(),
        "every acknowledged job had its effect"
    );
    let duplicates: i32 = runs.values().map(|n| n - 1).sum();
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
