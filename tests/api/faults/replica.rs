//! Replica faults: a replica killed (SIGKILL) or stopped (SIGTERM) while writers and devices
//! use it, and a replica paused (SIGSTOP) for 20 s. Each replica is a `segue` process of its
//! own on one PostgreSQL database and one Redis namespace.

use std::time::{Duration, Instant};

use super::{Device, Writers, assert_consistent, link_devices, online_devices};
use crate::helpers::{
    Account, DatabaseGuard, HubProcess, PrivatePostgres, fresh_postgres_database, redis_url, unique,
};
use crate::phoenix::connect_url;

/// Presence entries of a replica that stopped vanish from others' views after this.
const PRESENCE_TTL_SECS: u64 = 2;

/// Two hub processes, one user with a device on each, the bus known to be live.
struct Rig {
    _database: DatabaseGuard,
    a: HubProcess,
    b: HubProcess,
    account: Account,
    devices: Vec<Device>,
    earlier: Vec<(i64, String)>,
}

impl Rig {
    async fn start() -> Self {
        let (name, database) = fresh_postgres_database().await;
        let guard = DatabaseGuard(name);
        let namespace = unique("segue_replica");
        let redis = redis_url();
        let ttl = PRESENCE_TTL_SECS.to_string();
        let env = [
            ("DATABASE_URL", database.as_str()),
            ("REDIS_URL", redis.as_str()),
            ("SEGUE_REDIS_NAMESPACE", namespace.as_str()),
            ("SEGUE_PRESENCE_TTL_SECS", ttl.as_str()),
            ("SEGUE_LOG", "warn"),
        ];
        let a = HubProcess::start(&env).await;
        let b = HubProcess::start(&env).await;
        let account = a.register().await;
        let (devices, earlier) = link_devices([&a, &b], &account).await;
        Self {
            _database: guard,
            a,
            b,
            account,
            devices,
            earlier,
        }
    }

    /// B's device reconnects to A, as a client whose replica went away does; then both
    /// devices must end on the store's state. How long after `since` they did.
    async fn move_to_a_and_converge(&mut self, writes: &super::Writes, since: Instant) -> Duration {
        self.devices[1]
            .rejoin(&self.a, &self.account, "device-b")
            .await;
        assert_consistent(
            &[&self.a],
            &self.account,
            writes,
            &self.earlier,
            &mut self.devices,
            since,
        )
        .await
    }

    fn signal(&self, hub: &HubProcess, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &hub.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }
}

/// Refusals a write may get from a replica that is going away: no answer (0) or 503; never
/// 500.
fn assert_refused_cleanly(refused: &[u16]) {
    let bad: Vec<u16> = refused
        .iter()
        .copied()
        .filter(|s| ![0, 503].contains(s))
        .collect();
    assert!(bad.is_empty(), "writes failed with {bad:?}");
}

/// SIGKILL mid-writes: the other replica carries on, the killed replica's device moves to it
/// (as a client reconnects) and both devices end on the store's state.
#[actix_web::test]
async fn a_replica_killed_during_writes_and_fan_out_loses_nothing_acknowledged() {
    let mut rig = Rig::start().await;
    let writers = Writers::start(&[&rig.a, &rig.b], &rig.account);
    tokio::time::sleep(Duration::from_millis(400)).await;
    rig.b.child.kill().expect("SIGKILL");
    rig.b.child.wait().expect("reaped");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let writes = writers.finish().await;
    assert_refused_cleanly(&writes.refused);
    assert!(
        rig.devices[1].closed_within(Duration::from_secs(5)).await,
        "the killed replica's socket stayed open"
    );
    let converged = rig.move_to_a_and_converge(&writes, killed).await;
    println!(
        "fault replica SIGKILL: {} writes acknowledged, {} refused; both devices on the store's \
         state {} ms after the kill (one of them moved to the survivor)",
        writes.acknowledged.len(),
        writes.refused.len(),
        converged.as_millis()
    );
}

/// SIGTERM with writes in flight: the replica closes its sockets at once with 1012 (service
/// restart) so their clients move to another replica, finishes what it accepted and exits 0;
/// every write it acknowledged is in the store. (Before, its sockets stayed open and silent
/// until the 10 s grace ran out: seen failing, the process exited after 10,040 ms.)
#[actix_web::test]
async fn a_replica_stopped_with_sigterm_finishes_what_it_accepted() {
    let mut rig = Rig::start().await;
    let writers = Writers::start(&[&rig.a, &rig.b], &rig.account);
    tokio::time::sleep(Duration::from_millis(400)).await;
    rig.signal(&rig.b, "TERM");
    let stopped = Instant::now();
    assert_eq!(
        rig.devices[1].close_code(Duration::from_secs(5)).await,
        Some(1012),
        "the stopping replica's socket was not closed with 1012"
    );
    let closed_after = stopped.elapsed();
    let status = loop {
        if let Some(status) = rig.b.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "the replica did not stop within 15 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let exited_after = stopped.elapsed();
    assert!(status.success(), "exit status {status}");
    // Nothing holds the stop for its whole grace any more.
    assert!(
        exited_after < Duration::from_secs(9),
        "the replica took {exited_after:?} to stop"
    );
    let writes = writers.finish().await;
    assert_refused_cleanly(&writes.refused);
    let converged = rig.move_to_a_and_converge(&writes, stopped).await;
    println!(
        "fault replica SIGTERM: sockets closed (1012) after {} ms, exited 0 after {} ms; {} writes \
         acknowledged, {} refused; both devices on the store's state {} ms after the signal",
        closed_after.as_millis(),
        exited_after.as_millis(),
        writes.acknowledged.len(),
        writes.refused.len(),
        converged.as_millis()
    );
}

/// SIGSTOP for 20 s: to the other replica it is dead (its device leaves the presence view
/// within the TTL) while writes go on there; when it wakes it sends its device nothing older
/// than what the device has, and the device ends on the store's state.
#[actix_web::test]
async fn a_replica_paused_for_twenty_seconds_is_handled_as_dead_and_wakes_up_current() {
    let mut rig = Rig::start().await;
    let writers = Writers::start(&[&rig.a], &rig.account);
    rig.signal(&rig.b, "STOP");
    let paused = Instant::now();
    // Both clients go on heartbeating (B's socket buffers them) and reading what they are
    // sent (a client that stops reading is closed); A must drop B's device.
    let mut gone = None;
    while paused.elapsed() < Duration::from_secs(20) {
        for device in &mut rig.devices {
            device.heartbeat().await;
            device.catch_up(i64::MAX, Duration::from_millis(20)).await;
        }
        if gone.is_none() {
            let online = online_devices(&rig.a, &rig.account).await;
            if online.iter().any(|d| d == "device-a") && !online.iter().any(|d| d == "device-b") {
                gone = Some(paused.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone = gone.expect("the paused replica's device stayed online on the other replica");
    println!(
        "paused replica: its device left the other replica's presence after {} ms (TTL {PRESENCE_TTL_SECS} s)",
        gone.as_millis()
    );
    rig.signal(&rig.b, "CONT");
    let woke = Instant::now();
    let writes = writers.finish().await;
    assert_refused_cleanly(&writes.refused);
    // Whatever B sends now may not be older than what its device has (catch_up checks every
    // push); should B close the socket (idle while paused), the device comes back to B.
    let last = writes
        .acknowledged
        .iter()
        .map(|(r, _)| *r)
        .max()
        .unwrap_or(0);
    if !rig.devices[1].catch_up(last, Duration::from_secs(10)).await {
        rig.devices[1]
            .rejoin(&rig.b, &rig.account, "device-b")
            .await;
    }
    let converged = assert_consistent(
        &[&rig.a, &rig.b],
        &rig.account,
        &writes,
        &rig.earlier,
        &mut rig.devices,
        woke,
    )
    .await;
    // Awake, B hears its device's heartbeats again and shows it to A.
    let back = loop {
        for device in &mut rig.devices {
            device.heartbeat().await;
        }
        let online = online_devices(&rig.a, &rig.account).await;
        if ["device-a", "device-b"]
            .iter()
            .all(|d| online.iter().any(|o| o == d))
        {
            break woke.elapsed();
        }
        assert!(
            woke.elapsed() < Duration::from_secs(15),
            "the woken replica's device never came back online: {online:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "fault replica SIGSTOP 20 s: {} writes acknowledged on the other replica; both devices on \
         the store's state {} ms after it woke; its device shown online again {} ms after",
        writes.acknowledged.len(),
        converged.as_millis(),
        back.as_millis()
    );
}

/// A socket whose upgrade is still in flight when SIGTERM arrives (here: waiting on a paused
/// PostgreSQL to record its device) is closed with 1012 as soon as it opens, like the sockets
/// that were open, and the replica stops accepting new connections first. (Before, such a
/// socket stayed open, silent, until the graceful stop's 10 s grace ran out: seen failing.)
#[actix_web::test]
async fn a_socket_that_opens_while_its_replica_stops_is_closed_with_1012() {
    let pg = PrivatePostgres::start();
    pg.create_database("segue");
    let database = pg.url("segue");
    let hub =
        HubProcess::start(&[("DATABASE_URL", database.as_str()), ("SEGUE_LOG", "warn")]).await;
    let account = hub.register().await;
    let url = format!(
        "{}/socket/websocket?vsn=2.0.0&token={}&device_id=late",
        hub.address.replacen("http", "ws", 1),
        account.access_token
    );
    pg.signal_all("STOP");
    let upgrade = tokio::spawn(async move { connect_url(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &hub.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -TERM failed");
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.signal_all("CONT");
    let mut socket = upgrade
        .await
        .expect("upgrade task")
        .expect("the upgrade in flight completes");
    let closed = socket.closed(Duration::from_secs(5)).await;
    assert_eq!(
        closed.map(|frame| u16::from(frame.code)),
        Some(1012),
        "a socket that opened during the stop was not closed with 1012"
    );
    println!(
        "fault replica SIGTERM, upgrade in flight: its socket closed (1012) {} ms after the signal",
        stopped.elapsed().as_millis()
    );
}

/// SIGKILL during an export: the replica building a 200,000-play CSV dies mid-way; the export
/// job is reclaimed by the other replica after the visibility timeout and finished there. The
/// file behind the link is whole (a header and one line per play, the size the export
/// reports) and the export is reported done once.
#[actix_web::test]
async fn a_replica_killed_during_an_export_leaves_it_to_the_other_which_finishes_it() {
    const PLAYS: i64 = 200_000;
    let s3 = crate::helpers::PrivateS3::start("exports");
    let endpoint = s3.endpoint();
    let cluster = crate::jobs_cluster::Cluster::new(&[
        ("S3_BUCKET", "exports"),
        ("S3_ENDPOINT", endpoint.as_str()),
        ("S3_ACCESS_KEY_ID", crate::helpers::S3_ACCESS_KEY),
        ("S3_SECRET_ACCESS_KEY", crate::helpers::S3_SECRET_KEY),
    ])
    .await;
    let mut doomed = cluster.hub().await;
    let account = doomed.register().await;
    crate::exports::bulk_plays(cluster.database_url(), &account, PLAYS).await;
    let client = reqwest::Client::new();
    let status_of = async |hub: &HubProcess, id: &str| -> serde_json::Value {
        client
            .get(format!("{}/exports/{id}", hub.address))
            .bearer_auth(&account.access_token)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json")
    };
    let requested: serde_json::Value = client
        .post(format!("{}/exports", doomed.address))
        .bearer_auth(&account.access_token)
        .json(&serde_json::json!({"kind": "plays_csv"}))
        .send()
        .await
        .expect("export")
        .json()
        .await
        .expect("json");
    let id = requested["id"].as_str().expect("id").to_owned();
    let asked = Instant::now();
    while status_of(&doomed, &id).await["status"] != "running" {
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "the export never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-way: it has been reading and writing for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let survivor = cluster.hub().await;
    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().expect("reaped");
    let killed = Instant::now();
    let done = loop {
        let body = status_of(&survivor, &id).await;
        if body["status"] == "done" {
            break body;
        }
        assert_ne!(body["status"], "failed", "{body}");
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "the export was never finished: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let finished = killed.elapsed();
    assert_eq!(done["rows"], PLAYS, "{done}");
    let url = done["url"].as_str().expect("a link");
    let url = if url.starts_with('/') {
        format!("{}{url}", survivor.address)
    } else {
        url.to_owned()
    };
    let file = client
        .get(url)
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("body");
    assert_eq!(file.len() as u64, done["bytes"].as_u64().expect("bytes"));
    let lines = file.iter().filter(|b| **b == b'\n').count() as i64;
    assert_eq!(lines, PLAYS + 1, "a header and one line per play");
    println!(
        "fault replica SIGKILL mid-export: {PLAYS} plays; finished by the other replica {} ms \
         after the kill ({} bytes, whole)",
        finished.as_millis(),
        file.len()
    );
}
