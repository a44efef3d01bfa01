//! The lost-update checker (issue 15): many concurrent writes of every kind (REST ops,
//! conditional `PUT`s that re-read on 409, ops over the socket) across two replicas, while
//! Redis is restarted once and one replica is killed. Every write appends one track of its
//! own, so the history is checkable from the final state alone: every acknowledged track is
//! there, the revision counts the tracks (no revision lost or doubled), each acknowledgement
//! has a revision of its own, and every device ends on the store's state.
//!
//! `SEGUE_LOST_UPDATE_WRITES` sets how many writes (default 600 in the test command);
//! `scripts/faults/lost-updates.sh` runs 10,000.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::{Value, json};

use super::{Device, Replica, Writes, append, assert_consistent};
use crate::helpers::{
    Account, DatabaseGuard, HubProcess, PrivateRedis, fresh_postgres_database, unique,
};
use crate::phoenix::connect_url;

/// How one writer writes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    RestOps,
    ConditionalPut,
    SocketOps,
}

/// Writers per replica: two of each kind but one conditional `PUT` (it moves the whole queue
/// each time, so a few suffice to race the others).
const KINDS: [Kind; 5] = [
    Kind::RestOps,
    Kind::RestOps,
    Kind::ConditionalPut,
    Kind::SocketOps,
    Kind::SocketOps,
];

fn writes_wanted() -> usize {
    std::env::var("SEGUE_LOST_UPDATE_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// A writer's view of the replicas: it writes to its own until that one stops answering,
/// then to the other (as a client fails over).
struct Target {
    bases: [String; 2],
    preferred: usize,
    failed_over: bool,
}

impl Target {
    fn base(&self) -> &str {
        let index = if self.failed_over {
            1 - self.preferred
        } else {
            self.preferred
        };
        &self.bases[index]
    }

    fn fail_over(&mut self) {
        self.failed_over = true;
    }
}

/// Appends tracks `{tag}-{n}` until `done` writes were acknowledged by all writers together.
async fn writer(
    kind: Kind,
    mut target: Target,
    account: Account,
    tag: String,
    acknowledged: Arc<AtomicUsize>,
    wanted: usize,
) -> Writes {
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut writes = Writes::default();
    let mut socket: Option<(crate::phoenix::PhxClient, String)> = None;
    let topic = format!("queue:{}", account.id);
    let mut n = 0;
    while acknowledged.load(Ordering::Acquire) < wanted {
        n += 1;
        let track = format!("{tag}-{n}");
        let outcome: Result<i64, u16> = match kind {
            Kind::RestOps => {
                let sent = client
                    .post(format!("{}/queue/ops", target.base()))
                    .bearer_auth(&account.access_token)
                    .json(&json!({"ops": [{"op": "append", "track_ids": [track]}]}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.expect("json");
                        Ok(body["revision"].as_i64().expect("revision"))
                    }
                    Ok(r) => Err(r.status().as_u16()),
                    Err(_) => Err(0),
                }
            }
            Kind::ConditionalPut => conditional_put(&client, target.base(), &account, &track).await,
            Kind::SocketOps => {
                if socket.is_none() {
                    let url = format!(
                        "{}/socket/websocket?vsn=2.0.0&token={}&device_id={tag}",
                        target.base().replacen("http", "ws", 1),
                        account.access_token
                    );
                    if let Ok(mut opened) = connect_url(&url).await {
                        let (join_ref, reply) = opened.join(&topic, json!({"revision": 0})).await;
                        if reply[4]["status"] == "ok" {
                            socket = Some((opened, join_ref));
                        }
                    }
                }
                match socket.as_mut() {
                    None => Err(0),
                    Some((open, join_ref)) => {
                        let reference = open
                            .push(
                                Some(join_ref),
                                &topic,
                                "ops",
                                json!({"base_revision": 0, "ops": [{"op": "append", "track_ids": [track]}]}),
                            )
                            .await;
                        match open
                            .reply_dropping_others(&reference, Duration::from_secs(20))
                            .await
                        {
                            Some(reply) if reply[4]["status"] == "ok" => {
                                Ok(reply[4]["response"]["revision"].as_i64().expect("revision"))
                            }
                            // The reason, in the statuses the REST writers get: the
                            // replica's store or session was away (503) or the write was
                            // refused as conflicting (409); anything else fails the check.
                            Some(reply) => Err(match reply[4]["response"]["reason"].as_str() {
                                Some("unavailable") => 503,
                                Some("conflict") => 409,
                                _ => panic!("a socket write was refused: {reply}"),
                            }),
                            None => {
                                socket = None;
                                Err(0)
                            }
                        }
                    }
                }
            }
        };
        match outcome {
            Ok(revision) => {
                writes.acknowledged.push((revision, track));
                acknowledged.fetch_add(1, Ordering::AcqRel);
            }
            Err(status) => {
                writes.refused.push(status);
                if status == 0 {
                    // No answer: the replica may be gone; the next write goes to the other.
                    target.fail_over();
                    socket = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    writes
}

/// Read, add the track, write back with `If-Match`; on 409 read again (with a short random
/// backoff), as the protocol tells clients to.
async fn conditional_put(
    client: &Client,
    base: &str,
    account: &Account,
    track: &str,
) -> Result<i64, u16> {
    use rand::Rng;
    for _ in 0..50 {
        let read = client
            .get(format!("{base}/queue/"))
            .bearer_auth(&account.access_token)
            .send()
            .await
            .map_err(|_| 0_u16)?;
        if read.status() != 200 {
            return Err(read.status().as_u16());
        }
        let current: Value = read.json().await.map_err(|_| 0_u16)?;
        let revision = current["revision"].as_i64().expect("revision");
        let mut state = current["state"].clone();
        match state["track_ids"].as_array_mut() {
            Some(tracks) => tracks.push(json!(track)),
            None => state["track_ids"] = json!([track]),
        }
        let put = client
            .put(format!("{base}/queue/"))
            .bearer_auth(&account.access_token)
            .header("if-match", format!("\"{revision}\""))
            .json(&json!({"state": state}))
            .send()
            .await
            .map_err(|_| 0_u16)?;
        match put.status().as_u16() {
            200 => {
                let body: Value = put.json().await.map_err(|_| 0_u16)?;
                return Ok(body["revision"].as_i64().expect("revision"));
            }
            409 => {
                let pause = rand::rng().random_range(1..20);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            other => return Err(other),
        }
    }
    // Outrun fifty times in a row: counted as refused, which is allowed (not acknowledged).
    Err(409)
}

#[actix_web::test]
async fn concurrent_writes_of_every_kind_survive_a_redis_restart_and_a_replica_kill() {
    let wanted = writes_wanted();
    let (name, database) = fresh_postgres_database().await;
    let _guard = DatabaseGuard(name);
    let mut redis = PrivateRedis::start();
    let redis_url = redis.url();
    let namespace = unique("segue_lost");
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("SEGUE_REDIS_NAMESPACE", namespace.as_str()),
        ("SEGUE_QUEUE_MAX_ENTRIES", "20000"),
        ("SEGUE_MAX_BODY_BYTES", "8388608"),
        ("SEGUE_WS_OUTBOUND_QUEUE", "100000"),
        ("SEGUE_LOG", "warn"),
    ];
    let a = HubProcess::start(&env).await;
    let mut b = HubProcess::start(&env).await;
    let account = a.register().await;
    let mut devices = vec![
        Device::join(&a, &account, "watcher-a").await,
        Device::join(&b, &account, "watcher-b").await,
    ];
    let mut earlier = vec![append(&a, &account, "setup").await];
    assert!(
        devices[1]
            .catch_up(earlier[0].0, Duration::from_secs(10))
            .await,
        "the replicas never linked"
    );

    // The watchers read all along, as clients do (a socket that stops reading is closed).
    let following: Vec<_> = devices.into_iter().map(Device::follow).collect();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let bases = [a.address.clone(), b.address.clone()];
    let mut tasks = Vec::new();
    for replica in 0..2 {
        for (index, kind) in KINDS.iter().enumerate() {
            let target = Target {
                bases: bases.clone(),
                preferred: replica,
                failed_over: false,
            };
            tasks.push(tokio::spawn(writer(
                *kind,
                target,
                account.clone(),
                format!("r{replica}k{index}"),
                acknowledged.clone(),
                wanted,
            )));
        }
    }
    let started = Instant::now();
    let reach = |share: usize| {
        let acknowledged = acknowledged.clone();
        async move {
            while acknowledged.load(Ordering::Acquire) < wanted * share / 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    reach(1).await;
    redis.halt();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume();
    let redis_restarted = started.elapsed();
    reach(2).await;
    b.child.kill().expect("SIGKILL");
    b.child.wait().expect("reaped");
    let killed = Instant::now();
    let mut writes = Writes::default();
    for task in tasks {
        let done = task.await.expect("writer");
        writes.acknowledged.extend(done.acknowledged);
        writes.refused.extend(done.refused);
    }
    let took = started.elapsed();
    let mut devices = Vec::new();
    for device in following {
        devices.push(device.stop().await);
    }
    let bad: Vec<u16> = writes
        .refused
        .iter()
        .copied()
        .filter(|s| ![0, 409, 503].contains(s))
        .collect();
    assert!(bad.is_empty(), "writes failed with {bad:?}");
    // The killed replica's watcher moves to the survivor, as its client would.
    if !devices[1].closed_within(Duration::from_secs(5)).await {
        panic!("the killed replica's socket stayed open");
    }
    devices[1].rejoin(&a, &account, "watcher-b").await;
    let converged = assert_consistent(
        &[&a as &dyn Replica],
        &account,
        &writes,
        &earlier,
        &mut devices,
        killed,
    )
    .await;
    earlier.clear();
    let by_kind = |prefix: &str| {
        writes
            .acknowledged
            .iter()
            .filter(|(_, t)| t.contains(prefix))
            .count()
    };
    println!(
        "lost updates: {} writes acknowledged in {} ms ({} REST ops, {} conditional PUTs, {} socket \
         ops), {} refused (no answer, 409 or 503), 0 lost, revisions contiguous; Redis restarted at \
         {} ms, a replica killed at {} ms; every device on the store's state {} ms after the kill",
        writes.acknowledged.len(),
        took.as_millis(),
        by_kind("k0-") + by_kind("k1-"),
        by_kind("k2-"),
        by_kind("k3-") + by_kind("k4-"),
        writes.refused.len(),
        redis_restarted.as_millis(),
        (killed - started).as_millis(),
        converged.as_millis()
    );
}
