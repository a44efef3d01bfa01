//! The presence actor: one per replica.
//!
//! * It **owns** the presence of every device with a socket here: it writes the device's
//!   entry to the registry when the first socket of the device connects, keeps the entry's
//!   expiry ahead while heartbeats come (Phoenix heartbeats and `now_playing`), marks the
//!   device offline after the TTL without one, and removes it a short delay after its last
//!   socket left (a quick reconnect does not flap). Every change is written, then published on
//!   the user's bus channel, in order, by one writer task.
//! * It **shows** presence to sockets here joined to `devices:{user}` and `friends:{user}`:
//!   one [`View`] per watched user, loaded from the registry once this replica hears the
//!   user's channel, then kept up by the events heard on it. A view whose entries reach their
//!   expiry is read again from the registry, so the devices of a replica that died without a
//!   word leave every list within the TTL.
//! * It notices plays worth keeping in `play_history`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::connection::ToSocket;
use super::events::UserEvent;
use super::frame;
use super::hub::{Hub, Publish, SocketId, Unwatch, Watch};
use super::queue::Queues;
use crate::bus::ReplicaId;
use crate::domain::{Device, DeviceId, UserId};
use crate::presence::plays::PlayTracker;
use crate::presence::registry::Write;
use crate::presence::view::{Change, RefGen, View};
use crate::presence::{
    AnyRegistry, DeviceEntry, InstanceId, NowPlaying, PlayReport, REST_OWNER, Registry, Snapshot,
    instance_id, now_ms,
};
use crate::store::{Store, follows, plays};

/// Most registry writes sent in one round trip.
const MAX_WRITE_BATCH: usize = 256;

/// Most users read from the registry in one round trip when they start being shown.
const MAX_LOAD_BATCH: usize = 1_000;

/// How often views are checked for entries past their expiry (at most).
const VIEW_SWEEP_MAX: Duration = Duration::from_secs(1);

/// Stamps a report with the time it was heard.
fn stamped(report: PlayReport, at: i64) -> NowPlaying {
    NowPlaying {
        track_id: report.track_id,
        progress_ms: report.progress_ms,
        is_playing: report.is_playing,
        at,
    }
}

/// The presence timings, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct PresenceTimes {
    /// A device not heard from for this long is offline; entries expire this long after their
    /// last refresh.
    pub ttl: Duration,
    /// How long a device whose last socket left stays listed.
    pub leave_delay: Duration,
}

/// A registry write and the events to publish once it is done.
enum Job {
    Put(Vec<Write>, Vec<(UserId, UserEvent)>),
    Remove(Vec<(UserId, InstanceId)>, Vec<(UserId, UserEvent)>),
}

/// Writes jobs in order, batching consecutive ones of a kind, and publishes their events
/// once written (so a replica that reads the registry after an event sees the write).
async fn run_writer(registry: AnyRegistry, hub: Addr<Hub>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut batch = Vec::new();
    while jobs.recv_many(&mut batch, MAX_WRITE_BATCH).await > 0 {
        let mut drained = batch.drain(..).peekable();
        while let Some(first) = drained.next() {
            let (result, events) = match first {
                Job::Put(mut writes, mut events) => {
                    while let Some(Job::Put(more, then)) =
                        drained.next_if(|j| matches!(j, Job::Put(..)))
                    {
                        writes.extend(more);
                        events.extend(then);
                    }
                    (registry.put(writes).await, events)
                }
                Job::Remove(mut removals, mut events) => {
                    while let Some(Job::Remove(more, then)) =
                        drained.next_if(|j| matches!(j, Job::Remove(..)))
                    {
                        removals.extend(more);
                        events.extend(then);
                    }
                    (registry.remove(removals).await, events)
                }
            };
            if let Err(error) = result {
                tracing::warn!(%error, "presence registry write failed");
            }
            for (user, event) in events {
                hub.do_send(Publish { user, event });
            }
        }
    }
}

/// A device with a socket here.
struct Local {
    /// Shared with the in-process registry's copy (changes copy it on write).
    entry: Arc<DeviceEntry>,
    /// Usually one.
    sockets: Vec<SocketId>,
    last_heartbeat: Instant,
    /// Set while the device has no socket here.
    left_at: Option<Instant>,
    /// False once heartbeats stopped for the TTL (the socket may still be open).
    online: bool,
    plays: PlayTracker,
}

/// A player reporting over REST, as this replica last heard it.
struct RestDevice {
    online_at: i64,
    last_report: Instant,
    last_report_ms: i64,
    plays: PlayTracker,
}

/// A user whose presence sockets here are shown.
#[derive(Default)]
struct Watched {
    /// Tells this watch from an earlier one of the same user, whose reads may still return.
    generation: u64,
    /// `None` until the first read of the registry is back.
    view: Option<View>,
    /// Events heard while loading, applied on top of the first read.
    buffered: Vec<UserEvent>,
    /// A read of the registry is under way.
    reloading: bool,
    /// Instances (and whether the output) that events changed while that read was under
    /// way: the view's version of them is newer than the read's.
    heard: HashSet<InstanceId>,
    output_heard: bool,
    /// The last read failed: read again at the next sweep.
    stale: bool,
    /// Read again once the read under way is back (the bus came back meanwhile).
    reread: bool,
    device_viewers: HashSet<SocketId>,
    friend_viewers: HashSet<SocketId>,
}

/// A socket joined to `devices:{user}`.
struct DeviceViewer {
    user: UserId,
    recipient: Recipient<ToSocket>,
    topic: Arc<str>,
    state_sent: bool,
}

/// A socket joined to `friends:{follower}`.
struct FriendsViewer {
    follower: UserId,
    recipient: Recipient<ToSocket>,
    topic: Arc<str>,
    followees: HashSet<UserId>,
    loaded: bool,
    state_sent: bool,
    /// Counts reads of the follow list; only the latest one's answer is applied (two reads
    /// may finish in either order).
    follows_read: u64,
}

pub struct Presence {
    replica: ReplicaId,
    registry: AnyRegistry,
    hub: Addr<Hub>,
    store: Store,
    queues: Queues,
    times: PresenceTimes,
    writer: mpsc::UnboundedSender<Job>,
    /// The last `seq` given out: microseconds since the epoch, kept increasing.
    seq: u64,
    refs: RefGen,
    local: HashMap<(UserId, DeviceId), Local>,
    /// Devices whose last socket left, in the order they left.
    leaving: VecDeque<(Instant, (UserId, DeviceId))>,
    rest: HashMap<(UserId, DeviceId), RestDevice>,
    views: HashMap<UserId, Watched>,
    /// Users to read from the registry: the watch's generation, and the hub's signal that
    /// their channel is heard.
    to_load: Vec<(UserId, u64, oneshot::Receiver<bool>)>,
    /// The next watch generation.
    generations: u64,
    /// A read of `to_load` is under way.
    loading: bool,
    device_viewers: HashMap<SocketId, DeviceViewer>,
    friend_viewers: HashMap<SocketId, FriendsViewer>,
}

impl Presence {
    pub fn new(
        replica: ReplicaId,
        registry: AnyRegistry,
        hub: Addr<Hub>,
        store: Store,
        queues: Queues,
        times: PresenceTimes,
    ) -> Self {
        let (writer, jobs) = mpsc::unbounded_channel();
        actix::spawn(run_writer(registry.clone(), hub.clone(), jobs));
        let refs = RefGen::new(&format!("{}.", replica.as_str()));
        Self {
            replica,
            registry,
            hub,
            store,
            queues,
            times,
            writer,
            seq: 0,
            refs,
            local: HashMap::new(),
            leaving: VecDeque::new(),
            rest: HashMap::new(),
            views: HashMap::new(),
            to_load: Vec::new(),
            generations: 0,
            loading: false,
            device_viewers: HashMap::new(),
            friend_viewers: HashMap::new(),
        }
    }

    fn next_seq(&mut self) -> u64 {
        let micros = u64::try_from(now_ms()).unwrap_or(0).saturating_mul(1_000);
        self.seq = (self.seq + 1).max(micros);
        self.seq
    }

    fn expiry(&self) -> i64 {
        now_ms() + self.times.ttl.as_millis() as i64
    }

    fn instance(&self, device: &DeviceId) -> InstanceId {
        instance_id(device.as_str(), self.replica.as_str())
    }

    fn send_job(&self, job: Job) {
        // The writer lives as long as the actor's arbiter; a send fails only at shutdown.
        let _ = self.writer.send(job);
    }

    /// Writes a local device's entry under a new `seq` and publishes it.
    fn publish_local(&mut self, key: &(UserId, DeviceId)) {
        let (seq, expires_at, instance) = (self.next_seq(), self.expiry(), self.instance(&key.1));
        let Some(local) = self.local.get_mut(key) else {
            return;
        };
        let entry = Arc::make_mut(&mut local.entry);
        entry.seq = seq;
        entry.expires_at = expires_at;
        let entry = local.entry.clone();
        let event = UserEvent::PresenceUpsert {
            instance: instance.clone(),
            entry: entry.clone(),
        };
        self.send_job(Job::Put(
            vec![(key.0, instance, entry)],
            vec![(key.0, event)],
        ));
    }

    /// Removes a local device's entry and publishes that; `forget` drops the local record
    /// too (otherwise it stays, offline, while its socket is open).
    fn take_offline(&mut self, key: &(UserId, DeviceId), forget: bool) {
        let (seq, instance) = (self.next_seq(), self.instance(&key.1));
        let record = {
            let Some(local) = self.local.get_mut(key) else {
                return;
            };
            local.online = false;
            Arc::make_mut(&mut local.entry).now_playing = None;
            let queues = &self.queues;
            local
                .plays
                .finish(now_ms(), &|id: &str| queues.cached_duration(id))
        };
        if forget {
            self.local.remove(key);
        }
        if let Some(track) = record {
            self.record_play(key.0, track, key.1.clone());
        }
        let event = UserEvent::PresenceRemove {
            instance: instance.clone(),
            seq,
        };
        self.send_job(Job::Remove(vec![(key.0, instance)], vec![(key.0, event)]));
    }

    fn record_play(&self, user: UserId, track: String, device: DeviceId) {
        let store = self.store.clone();
        actix::spawn(async move {
            let result = async {
                let mut pooled = store.conn().await?;
                plays::record(&mut pooled.conn(), user, &track, device.as_str()).await
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(%error, %user, "could not record a play");
            }
        });
    }

    /// Feeds a report to a play tracker; records what counted, and warms the track cache
    /// for a track not seen yet (its length sets the threshold).
    fn track_play(
        &self,
        plays: &mut PlayTracker,
        report: Option<&NowPlaying>,
        user: UserId,
        device: &DeviceId,
    ) {
        if let Some(report) = report
            && !self.queues.knows_track(&report.track_id)
        {
            let (queues, id) = (self.queues.clone(), report.track_id.clone());
            actix::spawn(async move {
                let _ = queues.tracks(&[id]).await;
            });
        }
        let queues = &self.queues;
        if let Some(track) = plays.report(report, now_ms(), |id| queues.cached_duration(id)) {
            self.record_play(user, track, device.clone());
        }
    }

    /// Removes devices whose last socket left at least the leave delay ago.
    fn process_leaves(&mut self) {
        let now = Instant::now();
        while let Some((deadline, _)) = self.leaving.front() {
            if *deadline > now {
                break;
            }
            let Some((_, key)) = self.leaving.pop_front() else {
                break;
            };
            let gone = self.local.get(&key).is_some_and(|local| {
                local.sockets.is_empty()
                    && local
                        .left_at
                        .is_some_and(|left| left + self.times.leave_delay <= now)
            });
            if gone {
                self.take_offline(&key, true);
            }
        }
    }

    /// Pushes the local entries' expiry ahead; devices silent for the TTL go offline.
    fn refresh(&mut self) {
        let ttl = self.times.ttl;
        let silent: Vec<(UserId, DeviceId)> = self
            .local
            .iter()
            .filter(|(_, l)| l.online && l.last_heartbeat.elapsed() > ttl)
            .map(|(key, _)| key.clone())
            .collect();
        for key in silent {
            tracing::debug!(user = %key.0, device = %key.1, "no heartbeat for the TTL: offline");
            self.take_offline(&key, false);
        }
        let expires_at = self.expiry();
        let replica = self.replica.clone();
        let writes: Vec<Write> = self
            .local
            .iter_mut()
            .filter(|(_, l)| l.online)
            .map(|((user, device), local)| {
                Arc::make_mut(&mut local.entry).expires_at = expires_at;
                let instance = instance_id(device.as_str(), replica.as_str());
                (*user, instance, local.entry.clone())
            })
            .collect();
        if !writes.is_empty() {
            self.send_job(Job::Put(writes, Vec::new()));
        }
        // REST players tracked here that stopped reporting: their entries expire by
        // themselves. Their last play is credited only up to their last report here (they
        // may have stopped, or gone on reporting to another replica).
        let stale: Vec<(UserId, DeviceId)> = self
            .rest
            .iter()
            .filter(|(_, r)| r.last_report.elapsed() > ttl)
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(mut rest) = self.rest.remove(&key) {
                let queues = &self.queues;
                if let Some(track) = rest
                    .plays
                    .finish(rest.last_report_ms, &|id: &str| queues.cached_duration(id))
                {
                    self.record_play(key.0, track, key.1);
                }
            }
        }
    }

    /// Starts showing `users` (those not shown yet are read from the registry once this
    /// replica hears their channels).
    fn watch(&mut self, users: impl IntoIterator<Item = UserId>, ctx: &mut Context<Self>) {
        let mut new = Vec::new();
        let mut heard = Vec::new();
        for user in users {
            if self.views.contains_key(&user) {
                continue;
            }
            self.generations += 1;
            let generation = self.generations;
            self.views.insert(
                user,
                Watched {
                    generation,
                    ..Watched::default()
                },
            );
            let (done, signal) = oneshot::channel();
            self.hub.do_send(Watch { user, heard: done });
            new.push((user, generation));
            heard.push(signal);
        }
        self.to_load.extend(
            new.into_iter()
                .zip(heard)
                .map(|((user, generation), signal)| (user, generation, signal)),
        );
        self.load_next(ctx);
    }

    /// Reads the next batch of newly watched users from the registry, one batch at a time (a
    /// burst of joins, say after a restart, becomes a few large reads, not thousands).
    fn load_next(&mut self, ctx: &mut Context<Self>) {
        if self.loading || self.to_load.is_empty() {
            return;
        }
        self.loading = true;
        let batch: Vec<_> = self
            .to_load
            .drain(..self.to_load.len().min(MAX_LOAD_BATCH))
            .collect();
        let mut users = Vec::with_capacity(batch.len());
        let mut heard = Vec::with_capacity(batch.len());
        for (user, generation, signal) in batch {
            users.push((user, generation));
            heard.push(signal);
        }
        let registry = self.registry.clone();
        let asked = users.iter().map(|(user, _)| *user).collect();
        ctx.spawn(
            async move {
                for signal in heard {
                    let _ = signal.await;
                }
                registry.snapshots(asked).await
            }
            .into_actor(self)
            .map(move |result, this, ctx| {
                this.loaded(users, result);
                this.loading = false;
                this.load_next(ctx);
            }),
        );
    }

    /// The first read of `users` is back: their views start, and their viewers get state.
    fn loaded(
        &mut self,
        users: Vec<(UserId, u64)>,
        result: Result<Vec<Snapshot>, crate::presence::RegistryError>,
    ) {
        let failed = result.is_err();
        if let Err(error) = &result {
            tracing::warn!(%error, "presence read failed; retrying");
        }
        let mut snapshots = result.unwrap_or_default().into_iter();
        for (user, generation) in users {
            let snapshot = snapshots.next().unwrap_or_default();
            let Some(watched) = self.views.get_mut(&user) else {
                continue;
            };
            // Read for an earlier watch of this user (released and watched again since).
            if watched.generation != generation || watched.view.is_some() {
                continue;
            }
            let mut view = View::from_snapshot(snapshot, &mut self.refs);
            for event in watched.buffered.drain(..) {
                apply(&mut view, event, &mut self.refs);
            }
            watched.view = Some(view);
            watched.stale = failed || std::mem::take(&mut watched.reread);
            let devices: Vec<SocketId> = watched.device_viewers.iter().copied().collect();
            let friends: Vec<SocketId> = watched.friend_viewers.iter().copied().collect();
            for socket in devices {
                self.send_devices_state(socket);
            }
            for socket in friends {
                let sent = self
                    .friend_viewers
                    .get(&socket)
                    .is_some_and(|v| v.state_sent);
                if sent {
                    self.send_friend_joined(socket, user);
                } else {
                    self.send_friends_state(socket);
                }
            }
        }
    }

    /// Stops showing `user` once no socket here looks at them.
    fn release(&mut self, user: UserId) {
        let unused = self
            .views
            .get(&user)
            .is_some_and(|w| w.device_viewers.is_empty() && w.friend_viewers.is_empty());
        if unused {
            self.views.remove(&user);
            self.hub.do_send(Unwatch { user });
        }
    }

    fn send_devices_state(&mut self, socket: SocketId) {
        let Some(viewer) = self.device_viewers.get_mut(&socket) else {
            return;
        };
        let Some(view) = self.views.get(&viewer.user).and_then(|w| w.view.as_ref()) else {
            return;
        };
        if viewer.state_sent {
            return;
        }
        viewer.state_sent = true;
        let text = frame::encode(
            None,
            None,
            &viewer.topic,
            "presence_state",
            &view.devices_state(),
        );
        push(&viewer.recipient, &viewer.topic, text);
    }

    /// Sends a friends viewer its state once its follows and all their views are loaded.
    fn send_friends_state(&mut self, socket: SocketId) {
        let Some(viewer) = self.friend_viewers.get_mut(&socket) else {
            return;
        };
        if viewer.state_sent || !viewer.loaded {
            return;
        }
        let mut state = Map::new();
        for user in &viewer.followees {
            match self.views.get(user).and_then(|w| w.view.as_ref()) {
                Some(view) if !view.is_empty() => {
                    let metas: Vec<Value> = view
                        .metas()
                        .iter()
                        .map(crate::presence::view::for_friends)
                        .collect();
                    state.insert(user.to_string(), json!({ "metas": metas }));
                }
                Some(_) => {}
                None => return,
            }
        }
        viewer.state_sent = true;
        let text = frame::encode(
            None,
            None,
            &viewer.topic,
            "presence_state",
            &Value::Object(state),
        );
        push(&viewer.recipient, &viewer.topic, text);
    }

    /// Tells a friends viewer that already has its state about every device of `user`.
    fn send_friend_joined(&self, socket: SocketId, user: UserId) {
        let Some(viewer) = self.friend_viewers.get(&socket) else {
            return;
        };
        let Some(view) = self.views.get(&user).and_then(|w| w.view.as_ref()) else {
            return;
        };
        if !viewer.state_sent || view.is_empty() {
            return;
        }
        let change = Change {
            joins: view.metas(),
            leaves: Vec::new(),
        };
        let text = frame::encode(
            None,
            None,
            &viewer.topic,
            "presence_diff",
            &change.for_friends(&user.to_string()),
        );
        push(&viewer.recipient, &viewer.topic, text);
    }

    /// Sends `change` of `user`'s presence to every socket here that shows it.
    fn broadcast(&self, user: UserId, change: &Change) {
        if change.is_empty() {
            return;
        }
        let Some(watched) = self.views.get(&user) else {
            return;
        };
        if !watched.device_viewers.is_empty() {
            let topic: Arc<str> = format!("devices:{user}").into();
            let text = frame::encode(None, None, &topic, "presence_diff", &change.by_device());
            for socket in &watched.device_viewers {
                if let Some(viewer) = self.device_viewers.get(socket).filter(|v| v.state_sent) {
                    push(&viewer.recipient, &viewer.topic, text.clone());
                }
            }
        }
        if !watched.friend_viewers.is_empty() {
            let payload = change.for_friends(&user.to_string()).to_string();
            for socket in &watched.friend_viewers {
                if let Some(viewer) = self.friend_viewers.get(socket).filter(|v| v.state_sent) {
                    let text = frame::broadcast_raw(&viewer.topic, "presence_diff", &payload);
                    push(&viewer.recipient, &viewer.topic, text);
                }
            }
        }
    }

    /// A friends viewer's follows are now `followees`: unfollowed users leave its list,
    /// newly followed ones join it.
    fn set_followees(
        &mut self,
        socket: SocketId,
        followees: HashSet<UserId>,
        ctx: &mut Context<Self>,
    ) {
        let Some(viewer) = self.friend_viewers.get_mut(&socket) else {
            return;
        };
        let removed: Vec<UserId> = viewer.followees.difference(&followees).copied().collect();
        let added: Vec<UserId> = followees.difference(&viewer.followees).copied().collect();
        viewer.followees = followees;
        viewer.loaded = true;
        let state_sent = viewer.state_sent;
        let (recipient, topic) = (viewer.recipient.clone(), viewer.topic.clone());
        for user in removed {
            if let Some(watched) = self.views.get_mut(&user) {
                watched.friend_viewers.remove(&socket);
                if let Some(view) = watched
                    .view
                    .as_ref()
                    .filter(|v| state_sent && !v.is_empty())
                {
                    let change = Change {
                        joins: Vec::new(),
                        leaves: view.metas(),
                    };
                    let payload = change.for_friends(&user.to_string());
                    push(
                        &recipient,
                        &topic,
                        frame::encode(None, None, &topic, "presence_diff", &payload),
                    );
                }
            }
            self.release(user);
        }
        self.watch(added.iter().copied(), ctx);
        for user in &added {
            if let Some(watched) = self.views.get_mut(user) {
                watched.friend_viewers.insert(socket);
            }
            if state_sent {
                self.send_friend_joined(socket, *user);
            }
        }
        self.send_friends_state(socket);
    }

    /// Reads a friends viewer's follows from the store and applies them.
    fn load_followees(&mut self, socket: SocketId, follower: UserId, ctx: &mut Context<Self>) {
        let Some(viewer) = self.friend_viewers.get_mut(&socket) else {
            return;
        };
        viewer.follows_read += 1;
        let read = viewer.follows_read;
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let mut pooled = store.conn().await?;
                follows::followee_ids(&mut pooled.conn(), follower).await
            }
            .into_actor(self)
            .map(move |result, this, ctx| match result {
                Ok(ids) => {
                    let latest = this
                        .friend_viewers
                        .get(&socket)
                        .is_some_and(|v| v.follows_read == read);
                    if latest {
                        this.set_followees(socket, ids.into_iter().collect(), ctx);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %follower, "could not read follows; retrying");
                    ctx.run_later(Duration::from_secs(1), move |this, ctx| {
                        if this.friend_viewers.contains_key(&socket) {
                            this.load_followees(socket, follower, ctx);
                        }
                    });
                }
            }),
        );
    }

    fn unwatch_devices(&mut self, socket: SocketId) {
        if let Some(viewer) = self.device_viewers.remove(&socket) {
            if let Some(watched) = self.views.get_mut(&viewer.user) {
                watched.device_viewers.remove(&socket);
            }
            self.release(viewer.user);
        }
    }

    fn unwatch_friends(&mut self, socket: SocketId) {
        if let Some(viewer) = self.friend_viewers.remove(&socket) {
            for user in viewer.followees {
                if let Some(watched) = self.views.get_mut(&user) {
                    watched.friend_viewers.remove(&socket);
                }
                self.release(user);
            }
        }
    }

    /// Reads again the views whose entries reached their expiry (or whose last read failed).
    fn sweep_views(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        let due: Vec<UserId> = self
            .views
            .iter_mut()
            .filter(|(_, w)| {
                !w.reloading
                    && w.view.as_ref().is_some_and(|v| {
                        w.stale || v.next_expiry().is_some_and(|expiry| expiry <= now)
                    })
            })
            .map(|(user, w)| {
                w.reloading = true;
                *user
            })
            .collect();
        if due.is_empty() {
            return;
        }
        self.reload(due, ctx);
    }

    /// Reads `users` (whose views are marked `reloading`) again from the registry.
    fn reload(&mut self, users: Vec<UserId>, ctx: &mut Context<Self>) {
        let registry = self.registry.clone();
        let generations: Vec<u64> = users
            .iter()
            .map(|user| self.views.get(user).map_or(0, |w| w.generation))
            .collect();
        let asked = users.clone();
        ctx.spawn(
            async move { registry.snapshots(asked).await }
                .into_actor(self)
                .map(move |result, this, _| {
                    let failed = result.is_err();
                    let mut snapshots = result.unwrap_or_default().into_iter();
                    for (user, generation) in users.into_iter().zip(generations) {
                        let snapshot = snapshots.next();
                        let Some(watched) = this.views.get_mut(&user) else {
                            continue;
                        };
                        if watched.generation != generation {
                            continue;
                        }
                        watched.reloading = false;
                        watched.stale = failed || std::mem::take(&mut watched.reread);
                        let heard = std::mem::take(&mut watched.heard);
                        let output_heard = std::mem::take(&mut watched.output_heard);
                        let Some(view) = watched.view.as_mut() else {
                            continue;
                        };
                        let change = match snapshot {
                            Some(snapshot) => {
                                view.replace_except(snapshot, &heard, output_heard, &mut this.refs)
                            }
                            // The registry is away: entries past their expiry go anyway, as
                            // nobody can have refreshed them.
                            None => view.expire(now_ms()),
                        };
                        this.broadcast(user, &change);
                    }
                }),
        );
    }
}

/// Applies a presence event to a view.
fn apply(view: &mut View, event: UserEvent, refs: &mut RefGen) -> Change {
    match event {
        UserEvent::PresenceUpsert { instance, entry } => view.upsert(&instance, entry, refs),
        UserEvent::PresenceRemove { instance, seq } => view.remove(&instance, seq),
        UserEvent::OutputChanged { device_id, .. } => view.set_output(Some(device_id), refs),
        _ => Change::default(),
    }
}

fn push(recipient: &Recipient<ToSocket>, topic: &Arc<str>, text: bytestring::ByteString) {
    recipient.do_send(ToSocket::Push {
        topic: topic.clone(),
        text,
        revision: None,
    });
}

impl Actor for Presence {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let refresh = (self.times.ttl / 3).max(Duration::from_millis(100));
        ctx.run_interval(refresh, |this, _| this.refresh());
        let leaves = (self.times.leave_delay / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        ctx.run_interval(leaves, |this, _| this.process_leaves());
        let sweep = (self.times.ttl / 4).min(VIEW_SWEEP_MAX);
        ctx.run_interval(sweep, |this, ctx| this.sweep_views(ctx));
    }
}

/// A socket of `user` speaking for `device` connected here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connected {
    pub user: UserId,
    pub device: Device,
    pub socket: SocketId,
}

impl Handler<Connected> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Connected, _: &mut Context<Self>) {
        let key = (msg.user, msg.device.id.clone());
        let kind = msg.device.kind.as_str();
        if let Some(local) = self.local.get_mut(&key) {
            if !local.sockets.contains(&msg.socket) {
                local.sockets.push(msg.socket);
            }
            local.left_at = None;
            local.last_heartbeat = Instant::now();
            let changed =
                !local.online || local.entry.name != msg.device.name || local.entry.kind != kind;
            if changed {
                local.online = true;
                let entry = Arc::make_mut(&mut local.entry);
                entry.name = msg.device.name;
                entry.kind = kind.to_owned();
                self.publish_local(&key);
            }
            return;
        }
        let entry = DeviceEntry {
            device_id: msg.device.id.as_str().to_owned(),
            name: msg.device.name,
            kind: kind.to_owned(),
            online_at: now_ms(),
            now_playing: None,
            seq: 0,
            expires_at: 0,
        };
        let local = Local {
            entry: Arc::new(entry),
            sockets: vec![msg.socket],
            last_heartbeat: Instant::now(),
            left_at: None,
            online: true,
            plays: PlayTracker::default(),
        };
        self.local.insert(key.clone(), local);
        self.publish_local(&key);
    }
}

/// A socket of `user` speaking for `device` closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    pub user: UserId,
    pub device: DeviceId,
    pub socket: SocketId,
}

impl Handler<Disconnected> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Disconnected, _: &mut Context<Self>) {
        self.unwatch_devices(msg.socket);
        self.unwatch_friends(msg.socket);
        let key = (msg.user, msg.device);
        let Some(local) = self.local.get_mut(&key) else {
            return;
        };
        local.sockets.retain(|socket| *socket != msg.socket);
        if local.sockets.is_empty() {
            let now = Instant::now();
            local.left_at = Some(now);
            self.leaving.push_back((now + self.times.leave_delay, key));
            if self.times.leave_delay.is_zero() {
                self.process_leaves();
            }
        }
    }
}

/// A device showed it is alive (a Phoenix heartbeat).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    pub user: UserId,
    pub device: DeviceId,
}

impl Handler<Heartbeat> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Heartbeat, _: &mut Context<Self>) {
        let key = (msg.user, msg.device);
        if let Some(local) = self.local.get_mut(&key) {
            local.last_heartbeat = Instant::now();
            if !local.online && !local.sockets.is_empty() {
                local.online = true;
                self.publish_local(&key);
            }
        }
    }
}

/// A device with a socket here reports what it plays (`None`: nothing).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Playing {
    pub user: UserId,
    pub device: DeviceId,
    pub report: Option<PlayReport>,
}

impl Handler<Playing> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Playing, _: &mut Context<Self>) {
        let key = (msg.user, msg.device);
        let Some(mut local) = self.local.remove(&key) else {
            return;
        };
        let now_playing = msg.report.map(|r| stamped(r, now_ms()));
        self.track_play(&mut local.plays, now_playing.as_ref(), key.0, &key.1);
        Arc::make_mut(&mut local.entry).now_playing = now_playing;
        local.last_heartbeat = Instant::now();
        local.online = !local.sockets.is_empty();
        self.local.insert(key.clone(), local);
        self.publish_local(&key);
    }
}

/// A player without a socket reports what it plays over REST (`None`: it stopped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RestPlaying {
    pub user: UserId,
    pub device: Device,
    pub report: Option<PlayReport>,
}

impl Handler<RestPlaying> for Presence {
    type Result = ();

    fn handle(&mut self, msg: RestPlaying, _: &mut Context<Self>) {
        let key = (msg.user, msg.device.id.clone());
        let instance = instance_id(msg.device.id.as_str(), REST_OWNER);
        let seq = self.next_seq();
        let now_playing = msg.report.map(|r| stamped(r, now_ms()));
        let mut rest = self.rest.remove(&key).unwrap_or_else(|| RestDevice {
            online_at: now_ms(),
            last_report: Instant::now(),
            last_report_ms: now_ms(),
            plays: PlayTracker::default(),
        });
        rest.last_report = Instant::now();
        rest.last_report_ms = now_ms();
        self.track_play(&mut rest.plays, now_playing.as_ref(), msg.user, &key.1);
        let Some(now_playing) = now_playing else {
            // Any replica may write a REST instance, and their clocks differ: a withdrawal
            // removes whatever version a view shows.
            let event = UserEvent::PresenceRemove {
                instance: instance.clone(),
                seq: u64::MAX,
            };
            self.send_job(Job::Remove(
                vec![(msg.user, instance)],
                vec![(msg.user, event)],
            ));
            return;
        };
        let entry = DeviceEntry {
            device_id: msg.device.id.as_str().to_owned(),
            name: msg.device.name,
            kind: msg.device.kind.as_str().to_owned(),
            online_at: rest.online_at,
            now_playing: Some(now_playing),
            seq,
            expires_at: self.expiry(),
        };
        self.rest.insert(key, rest);
        let entry = Arc::new(entry);
        let event = UserEvent::PresenceUpsert {
            instance: instance.clone(),
            entry: entry.clone(),
        };
        self.send_job(Job::Put(
            vec![(msg.user, instance, entry)],
            vec![(msg.user, event)],
        ));
    }
}

/// Which presence topic a socket watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// `devices:{user}`.
    Devices,
    /// `friends:{user}`.
    Friends,
}

/// A socket joined a presence topic of its user: send it `presence_state`, then diffs.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchTopic {
    pub socket: SocketId,
    pub user: UserId,
    pub shown: Shown,
    pub recipient: Recipient<ToSocket>,
    pub topic: Arc<str>,
}

impl Handler<WatchTopic> for Presence {
    type Result = ();

    fn handle(&mut self, msg: WatchTopic, ctx: &mut Context<Self>) {
        match msg.shown {
            Shown::Devices => {
                self.unwatch_devices(msg.socket);
                self.device_viewers.insert(
                    msg.socket,
                    DeviceViewer {
                        user: msg.user,
                        recipient: msg.recipient,
                        topic: msg.topic,
                        state_sent: false,
                    },
                );
                self.watch([msg.user], ctx);
                if let Some(watched) = self.views.get_mut(&msg.user) {
                    watched.device_viewers.insert(msg.socket);
                }
                self.send_devices_state(msg.socket);
            }
            Shown::Friends => {
                self.unwatch_friends(msg.socket);
                self.friend_viewers.insert(
                    msg.socket,
                    FriendsViewer {
                        follower: msg.user,
                        recipient: msg.recipient,
                        topic: msg.topic,
                        followees: HashSet::new(),
                        loaded: false,
                        state_sent: false,
                        follows_read: 0,
                    },
                );
                self.load_followees(msg.socket, msg.user, ctx);
            }
        }
    }
}

/// A socket left a presence topic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UnwatchTopic {
    pub socket: SocketId,
    pub shown: Shown,
}

impl Handler<UnwatchTopic> for Presence {
    type Result = ();

    fn handle(&mut self, msg: UnwatchTopic, _: &mut Context<Self>) {
        match msg.shown {
            Shown::Devices => self.unwatch_devices(msg.socket),
            Shown::Friends => self.unwatch_friends(msg.socket),
        }
    }
}

/// A presence event for `user`, published here or heard from another replica.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Observed {
    pub user: UserId,
    pub event: UserEvent,
}

impl Handler<Observed> for Presence {
    type Result = ();

    fn handle(&mut self, msg: Observed, ctx: &mut Context<Self>) {
        if matches!(msg.event, UserEvent::FollowsChanged) {
            let sockets: Vec<SocketId> = self
                .friend_viewers
                .iter()
                .filter(|(_, v)| v.follower == msg.user)
                .map(|(socket, _)| *socket)
                .collect();
            for socket in sockets {
                self.load_followees(socket, msg.user, ctx);
            }
            return;
        }
        let Some(watched) = self.views.get_mut(&msg.user) else {
            return;
        };
        let Some(view) = watched.view.as_mut() else {
            watched.buffered.push(msg.event);
            return;
        };
        // Two transfers made at once on two replicas: the registry keeps the last write, but
        // replicas may hear the events in either order; a re-read settles it.
        if matches!(msg.event, UserEvent::OutputChanged { .. }) {
            watched.stale = true;
        }
        if watched.reloading {
            match &msg.event {
                UserEvent::PresenceUpsert { instance, .. }
                | UserEvent::PresenceRemove { instance, .. } => {
                    watched.heard.insert(instance.clone());
                }
                UserEvent::OutputChanged { .. } => watched.output_heard = true,
                _ => {}
            }
        }
        let change = apply(view, msg.event, &mut self.refs);
        self.broadcast(msg.user, &change);
    }
}

/// The bus is back after a loss: rewrite and republish the local entries (the registry may
/// have lost them), and read every view again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

impl Handler<Resync> for Presence {
    type Result = ();

    fn handle(&mut self, _: Resync, ctx: &mut Context<Self>) {
        let online: Vec<(UserId, DeviceId)> = self
            .local
            .iter()
            .filter(|(_, l)| l.online)
            .map(|(key, _)| key.clone())
            .collect();
        for key in online {
            self.publish_local(&key);
        }
        let mut users = Vec::new();
        for (user, watched) in &mut self.views {
            if watched.view.is_some() && !watched.reloading {
                watched.reloading = true;
                users.push(*user);
            } else {
                // A read under way may have been answered while the bus was away.
                watched.reread = true;
            }
        }
        if !users.is_empty() {
            // After the rewrites above are queued, so this replica's own entries are back.
            ctx.run_later(Duration::from_millis(200), move |this, ctx| {
                this.reload(users, ctx)
            });
        }
    }
}
