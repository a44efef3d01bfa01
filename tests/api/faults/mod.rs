//! Fault injection (issue 15): two replicas on PostgreSQL and a private Redis, a fault while
//! devices watch and writers write, then the checks every row of `docs/reliability.md`
//! promises: nothing acknowledged lost, revisions contiguous, every device back on the
//! store's state. Each test prints the figure it measured (`--nocapture` shows it);
//! `scripts/faults/` runs the long versions.

mod authz;
mod jobs;
mod lost_update;
mod postgres;
pub mod proxy;
mod redis;
mod replica;
mod storm;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::{Value, json};

use crate::helpers::{Account, HubProcess, TestApp};
use crate::phoenix::{PhxClient, connect_url};

/// A hub the fault tests talk to: in this process ([`TestApp`]) or a process of its own
/// ([`HubProcess`], for faults that kill or pause it).
pub trait Replica {
    fn base(&self) -> &str;
    /// The PostgreSQL database it uses.
    fn database_url(&self) -> String;
}

impl Replica for TestApp {
    fn base(&self) -> &str {
        &self.address
    }

    fn database_url(&self) -> String {
        use secrecy::ExposeSecret;
        self.settings
            .database_url
            .as_ref()
            .expect("a PostgreSQL replica")
            .expose_secret()
            .to_owned()
    }
}

impl Replica for HubProcess {
    fn base(&self) -> &str {
        &self.address
    }

    fn database_url(&self) -> String {
        self.database_url.clone().expect("a PostgreSQL replica")
    }
}

/// A device of the test's user: a socket joined to `queue:{id}` that remembers the last
/// state it was sent.
pub struct Device {
    socket: PhxClient,
    topic: String,
    pub revision: i64,
    pub state: Value,
}

impl Device {
    pub async fn join(app: &(impl Replica + ?Sized), account: &Account, name: &str) -> Self {
        let url = format!(
            "{}/socket/websocket?vsn=2.0.0&token={}&device_id={name}",
            app.base().replacen("http", "ws", 1),
            account.access_token
        );
        let mut socket = connect_url(&url).await.expect("socket connects");
        let topic = format!("queue:{}", account.id);
        let (_, reply) = socket.join(&topic, json!({})).await;
        assert_eq!(reply[4]["status"], "ok", "join {topic}: {reply}");
        let response = &reply[4]["response"];
        Self {
            socket,
            topic,
            revision: response["revision"].as_i64().unwrap_or(0),
            state: response["state"].clone(),
        }
    }

    /// Opens a new socket on `app` and joins again with the revision it has, as a client whose
    /// socket dropped does; what the join brings may not be older than what it had.
    pub async fn rejoin(&mut self, app: &(impl Replica + ?Sized), account: &Account, name: &str) {
        let url = format!(
            "{}/socket/websocket?vsn=2.0.0&token={}&device_id={name}",
            app.base().replacen("http", "ws", 1),
            account.access_token
        );
        let mut socket = connect_url(&url).await.expect("socket connects");
        let (_, reply) = socket
            .join(&self.topic, json!({"revision": self.revision}))
            .await;
        assert_eq!(reply[4]["status"], "ok", "rejoin {}: {reply}", self.topic);
        let response = &reply[4]["response"];
        let revision = response["revision"].as_i64().expect("revision");
        assert!(
            revision >= self.revision,
            "a rejoin brought revision {revision} to a device at {}",
            self.revision
        );
        if response["unchanged"] != true {
            self.state = response["state"].clone();
        }
        self.revision = revision;
        self.socket = socket;
    }

    /// Sends a Phoenix heartbeat, as a client does every few seconds (presence counts a device
    /// online while it is heard from); the reply is read, and dropped, with later frames.
    pub async fn heartbeat(&mut self) {
        let frame = json!([null, "hb", "phoenix", "heartbeat", {}]).to_string();
        let _ = self.socket.try_send_text(&frame).await;
    }

    /// The code of the close frame the hub sends within `within` (`None`: closed without one).
    pub async fn close_code(&mut self, within: Duration) -> Option<u16> {
        self.socket
            .closed(within)
            .await
            .map(|frame| u16::from(frame.code))
    }

    /// Whether the socket was closed within `within` (frames meanwhile are read and dropped).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.socket.next_within(left).await.is_none() {
                return Instant::now() < deadline;
            }
        }
    }

    /// Reads `queue_changed` pushes until this device is at `revision` or later; false when
    /// `within` runs out first. A device is never sent a revision at or below one it has.
    pub async fn catch_up(&mut self, revision: i64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.revision < revision {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.socket.next_within(left).await else {
                return false;
            };
            if frame[2] != self.topic.as_str() || frame[3] != "queue_changed" {
                continue;
            }
            let pushed = frame[4]["revision"].as_i64().expect("revision");
            assert!(
                pushed > self.revision,
                "a device at revision {} was sent revision {pushed}",
                self.revision
            );
            self.revision = pushed;
            self.state = frame[4]["state"].clone();
        }
        true
    }
}

/// One device of `account` on each replica (`device-a`, `device-b`), and proof that the
/// replicas hear each other: a write on each reached the other's device. Returns the devices
/// and those setup writes.
pub async fn link_devices(
    replicas: [&dyn Replica; 2],
    account: &Account,
) -> (Vec<Device>, Vec<(i64, String)>) {
    let mut devices = vec![
        Device::join(replicas[0], account, "device-a").await,
        Device::join(replicas[1], account, "device-b").await,
    ];
    let mut earlier = Vec::new();
    for (writer, watcher) in [(0, 1), (1, 0)] {
        let written = append(replicas[writer], account, &format!("setup-{writer}")).await;
        assert!(
            devices[watcher]
                .catch_up(written.0, Duration::from_secs(10))
                .await,
            "the replicas never linked"
        );
        earlier.push(written);
    }
    (devices, earlier)
}

/// A [`Device`] reading its pushes in the background and heartbeating, as a client does
/// while others write (the hub closes a socket that stops reading, or that is silent for a
/// minute); [`Following::stop`] hands it back.
pub struct Following {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Device>,
}

impl Device {
    pub fn follow(mut self) -> Following {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            // Pushes of a long queue are large: each is only skimmed for its topic, event and
            // revision (checked to be newer), and the last one read whole at the end.
            #[derive(serde::Deserialize)]
            struct Skim(
                serde::de::IgnoredAny,
                serde::de::IgnoredAny,
                String,
                String,
                Revision,
            );
            #[derive(serde::Deserialize)]
            struct Revision {
                revision: Option<i64>,
            }
            let mut last = None;
            // It heartbeats as a client does (the hub closes a socket idle for a minute).
            let mut beat = Instant::now();
            while !stopping.load(Ordering::Acquire) {
                if beat.elapsed() > Duration::from_secs(20) {
                    beat = Instant::now();
                    self.heartbeat().await;
                }
                let Some(text) = self
                    .socket
                    .next_text_within(Duration::from_millis(200))
                    .await
                else {
                    // Quiet, or closed (then nothing to read until the test moves the device).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let Ok(Skim(_, _, topic, event, payload)) = serde_json::from_str(&text) else {
                    continue;
                };
                if topic != self.topic || event != "queue_changed" {
                    continue;
                }
                let pushed = payload.revision.expect("revision");
                assert!(
                    pushed > self.revision,
                    "a device at revision {} was sent revision {pushed}",
                    self.revision
                );
                self.revision = pushed;
                last = Some(text);
            }
            if let Some(text) = last {
                let frame: Value = serde_json::from_str(&text).expect("a push is JSON");
                self.state = frame[4]["state"].clone();
            }
            self
        });
        Following { stop, task }
    }
}

impl Following {
    pub async fn stop(self) -> Device {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.task
            .await
            .expect("a followed device's reader panicked")
    }
}

/// What a writer saw: (revision, track it appended) per acknowledged write, and the status
/// of every refused one.
#[derive(Default)]
pub struct Writes {
    pub acknowledged: Vec<(i64, String)>,
    pub refused: Vec<u16>,
    /// The longest a refused write took to be answered.
    pub slowest_refusal: Duration,
}

/// Appends one fresh track per request to the user's queue on `base` until `stop` is set.
pub async fn write_until(
    base: String,
    token: String,
    tag: String,
    stop: Arc<AtomicBool>,
) -> Writes {
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut writes = Writes::default();
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let track = format!("{tag}-{n}");
        let started = Instant::now();
        let sent = client
            .post(format!("{base}/queue/ops"))
            .bearer_auth(&token)
            .json(&json!({"ops": [{"op": "append", "track_ids": [track]}]}))
            .send()
            .await;
        let refused_before = writes.refused.len();
        match sent {
            Ok(response) if response.status() == 200 => {
                let body: Value = response.json().await.expect("json body");
                writes
                    .acknowledged
                    .push((body["revision"].as_i64().expect("revision"), track));
            }
            Ok(response) => writes.refused.push(response.status().as_u16()),
            // No answer is not an acknowledgement.
            Err(_) => writes.refused.push(0),
        }
        if writes.refused.len() > refused_before {
            writes.slowest_refusal = writes.slowest_refusal.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writes
}

/// Writers on every replica, running until [`Writers::finish`].
pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Writes>>,
}

impl Writers {
    pub fn start(replicas: &[&dyn Replica], account: &Account) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = replicas
            .iter()
            .enumerate()
            .map(|(index, app)| {
                tokio::spawn(write_until(
                    app.base().to_owned(),
                    account.access_token.clone(),
                    format!("w{index}"),
                    stop.clone(),
                ))
            })
            .collect();
        Self { stop, tasks }
    }

    pub async fn finish(self) -> Writes {
        self.stop.store(true, Ordering::Release);
        let mut all = Writes::default();
        for task in self.tasks {
            let writes = task.await.expect("writer task");
            all.acknowledged.extend(writes.acknowledged);
            all.refused.extend(writes.refused);
            all.slowest_refusal = all.slowest_refusal.max(writes.slowest_refusal);
        }
        all
    }
}

/// The user's queue as a replica serves it once it is at `revision` at least.
pub async fn queue_at_least(app: &dyn Replica, account: &Account, revision: i64) -> Value {
    let started = Instant::now();
    let client = Client::new();
    loop {
        let response = client
            .get(format!("{}/queue/", app.base()))
            .bearer_auth(&account.access_token)
            .send()
            .await
            .expect("queue read");
        if response.status() == 200 {
            let body: Value = response.json().await.expect("json body");
            if body["revision"].as_i64().unwrap_or(0) >= revision {
                return body;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{} never served revision {revision}",
            app.base()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checks after a fault: every acknowledged write is in the store's queue, each with a
/// revision of its own, the revisions contiguous, both replicas serve the same queue, and
/// every device reaches it. Returns how long the slowest device took, from `healed`.
pub async fn assert_consistent(
    replicas: &[&dyn Replica],
    account: &Account,
    writes: &Writes,
    earlier: &[(i64, String)],
    devices: &mut [Device],
    healed: Instant,
) -> Duration {
    let mut acknowledged: Vec<(i64, String)> = earlier.to_vec();
    acknowledged.extend(writes.acknowledged.iter().cloned());
    let last = acknowledged.iter().map(|(r, _)| *r).max().unwrap_or(0);
    let first = replicas.first().expect("a replica");
    let stored = queue_at_least(*first, account, last).await;
    let revision = stored["revision"].as_i64().expect("revision");
    // What the replica serves is what the store holds (not a cache that stopped moving).
    let (in_store, store_tracks) = read_store(*first, account).await;
    assert_eq!(
        in_store, revision,
        "the replica serves another revision than the store's"
    );
    assert_eq!(
        Value::from(store_tracks),
        stored["state"]["track_ids"],
        "the replica serves other tracks than the store's"
    );
    for other in replicas.iter().skip(1) {
        let there = queue_at_least(*other, account, revision).await;
        assert_eq!(there["state"], stored["state"], "the replicas disagree");
    }
    let tracks: Vec<&str> = stored["state"]["track_ids"]
        .as_array()
        .expect("track ids")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .map(|(_, t)| t)
        .filter(|t| !tracks.contains(&t.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // Each acknowledged write has a revision of its own within the history. (A refused write
    // may still have been applied, as when its answer is lost on the way.)
    let mut revisions: Vec<i64> = acknowledged.iter().map(|(r, _)| *r).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        acknowledged.len(),
        "two writes acknowledged with one revision"
    );
    assert!(
        revisions.iter().all(|r| (1..=revision).contains(r)),
        "an acknowledged revision is beyond the store's {revision}"
    );
    // The history is contiguous: the store's queue holds one entry per applied write.
    assert_eq!(
        i64::try_from(tracks.len()).expect("length"),
        revision,
        "the store's revision does not count its writes"
    );
    let ambiguous = revision - i64::try_from(acknowledged.len()).expect("count");
    if ambiguous > 0 {
        println!("{ambiguous} refused write(s) had been applied nonetheless");
    }
    let mut slowest = Duration::ZERO;
    // A device that was not reading has every push since to read (at 10,000 writes, gigabytes
    // of queue JSON): its wait grows with the writes.
    let wait = Duration::from_secs(15)
        + Duration::from_millis(20) * u32::try_from(acknowledged.len()).unwrap_or(u32::MAX);
    for device in devices.iter_mut() {
        assert!(
            device.catch_up(revision, wait).await,
            "a device stayed at revision {} of {revision}",
            device.revision
        );
        assert_eq!(
            device.state, stored["state"],
            "a device ended on another state"
        );
        slowest = slowest.max(healed.elapsed());
    }
    slowest
}

/// The user's queue revision and track ids, read from `app`'s PostgreSQL database itself.
pub async fn read_store(app: &dyn Replica, account: &Account) -> (i64, Vec<String>) {
    use diesel::sql_types::{BigInt, Text};
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        revision: i64,
        #[diesel(sql_type = Text)]
        state: String,
    }
    let url = app.database_url();
    let user = account.id;
    let row = crate::helpers::block_on_thread(async move {
        let mut conn = AsyncPgConnection::establish(&url).await.expect("connect");
        diesel::sql_query("SELECT revision, state FROM queue_state WHERE user_id = $1")
            .bind::<BigInt, _>(user)
            .get_result::<Row>(&mut conn)
            .await
            .expect("the user's queue row")
    });
    let state: Value = serde_json::from_str(&row.state).expect("stored state is JSON");
    let tracks = state["track_ids"]
        .as_array()
        .expect("track ids")
        .iter()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    (row.revision, tracks)
}

/// The user's devices `app` shows online (`GET /devices/`).
pub async fn online_devices(app: &dyn Replica, account: &Account) -> Vec<String> {
    let listed: Value = Client::new()
        .get(format!("{}/devices/", app.base()))
        .bearer_auth(&account.access_token)
        .send()
        .await
        .expect("devices")
        .json()
        .await
        .expect("json");
    listed["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["online"] == true)
        .filter_map(|d| d["device_id"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until `app` shows exactly `expected` of `watched` online; how long it took.
pub async fn presence_settles(
    app: &dyn Replica,
    account: &Account,
    watched: &[&str],
    expected: &[&str],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let online = online_devices(app, account).await;
        let shown: Vec<&str> = watched
            .iter()
            .copied()
            .filter(|d| online.iter().any(|o| o == d))
            .collect();
        if shown == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{} shows {shown:?} online, not {expected:?}",
            app.base()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes one track on `app` and returns (revision, track).
pub async fn append(app: &dyn Replica, account: &Account, track: &str) -> (i64, String) {
    let response = Client::new()
        .post(format!("{}/queue/ops", app.base()))
        .bearer_auth(&account.access_token)
        .json(&json!({"ops": [{"op": "append", "track_ids": [track]}]}))
        .send()
        .await
        .expect("append");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json body");
    (
        body["revision"].as_i64().expect("revision"),
        track.to_owned(),
    )
}

/// Waits until `app`'s metric `name` reaches `at_least`; how long that took, or `None`
/// after `within`.
pub async fn metric_reaches(
    app: &dyn Replica,
    name: &str,
    at_least: f64,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if crate::helpers::metric(app.base(), name).await >= at_least {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}
