//! The devices this replica owns: those with a socket here, and the REST players it heard
//! last. Their registry entries are written (and their changes published) by one writer task,
//! in order; heartbeats keep them fresh, silence takes them offline, and plays that count are
//! recorded.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::Presence;
use crate::domain::{Device, DeviceId, UserId};
use crate::presence::plays::PlayTracker;
use crate::presence::registry::Write;
use crate::presence::{
    AnyRegistry, DeviceEntry, InstanceId, NowPlaying, PlayReport, REST_OWNER, Registry,
    instance_id, now_ms,
};
use crate::realtime::events::UserEvent;
use crate::realtime::hub::{Hub, Publish, SocketId};
use crate::store::plays;

/// Most registry writes sent in one round trip.
const MAX_WRITE_BATCH: usize = 256;

/// Stamps a report with the time it was heard.
fn stamped(report: PlayReport, at: i64) -> NowPlaying {
    NowPlaying {
        track_id: report.track_id,
        progress_ms: report.progress_ms,
        is_playing: report.is_playing,
        at,
        track: None,
    }
}

/// A registry write and the events to publish once it is done.
pub(super) enum Job {
    Put(Vec<Write>, Vec<(UserId, UserEvent)>),
    /// A pipeline report's entry: written (and its events published) unless the registry
    /// holds a play reported later.
    PutUnlessOlder(Write, Vec<(UserId, UserEvent)>),
    Remove(Vec<(UserId, InstanceId)>, Vec<(UserId, UserEvent)>),
}

/// Writes jobs in order, batching consecutive ones of a kind, and publishes their events
/// once written (so a replica that reads the registry after an event sees the write).
pub(super) async fn run_writer(
    registry: AnyRegistry,
    hub: Addr<Hub>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
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
                Job::PutUnlessOlder(write, events) => {
                    match registry.put_unless_older(write).await {
                        Ok(true) => (Ok(()), events),
                        Ok(false) => {
                            tracing::debug!("a late report's presence was refused");
                            (Ok(()), Vec::new())
                        }
                        Err(error) => (Err(error), events),
                    }
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
pub(super) struct Local {
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
pub(super) struct RestDevice {
    online_at: i64,
    last_report: Instant,
    last_report_ms: i64,
    plays: PlayTracker,
}

impl Presence {
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

    fn record_play(&self, user: UserId, play: crate::presence::plays::Counted, device: DeviceId) {
        let store = self.store.clone();
        actix::spawn(async move {
            let result = async {
                let mut pooled = store.conn().await?;
                plays::record(&mut pooled.conn(), user, &play, device.as_str()).await
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
    pub(super) fn process_leaves(&mut self) {
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
    pub(super) fn refresh(&mut self) {
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

    /// A socket of `user` speaking for `device` connected: the device is online (its entry
    /// is written when new or changed).
    pub(super) fn connected(&mut self, user: UserId, device: Device, socket: SocketId) {
        let key = (user, device.id.clone());
        let kind = device.kind.as_str();
        if let Some(local) = self.local.get_mut(&key) {
            if !local.sockets.contains(&socket) {
                local.sockets.push(socket);
            }
            local.left_at = None;
            local.last_heartbeat = Instant::now();
            let changed =
                !local.online || local.entry.name != device.name || local.entry.kind != kind;
            if changed {
                local.online = true;
                let entry = Arc::make_mut(&mut local.entry);
                entry.name = device.name;
                entry.kind = kind.to_owned();
                self.publish_local(&key);
            }
            return;
        }
        let entry = DeviceEntry {
            device_id: device.id.as_str().to_owned(),
            name: device.name,
            kind: kind.to_owned(),
            online_at: now_ms(),
            now_playing: None,
            seq: 0,
            expires_at: 0,
        };
        let local = Local {
            entry: Arc::new(entry),
            sockets: vec![socket],
            last_heartbeat: Instant::now(),
            left_at: None,
            online: true,
            plays: PlayTracker::default(),
        };
        self.local.insert(key.clone(), local);
        self.publish_local(&key);
    }

    /// A socket of the device closed: once it was the last, the device leaves after the
    /// leave delay.
    pub(super) fn disconnected(&mut self, user: UserId, device: DeviceId, socket: SocketId) {
        let key = (user, device);
        let Some(local) = self.local.get_mut(&key) else {
            return;
        };
        local.sockets.retain(|s| *s != socket);
        if local.sockets.is_empty() {
            let now = Instant::now();
            local.left_at = Some(now);
            self.leaving.push_back((now + self.times.leave_delay, key));
            if self.times.leave_delay.is_zero() {
                self.process_leaves();
            }
        }
    }

    /// The device showed it is alive; one taken offline for silence comes back.
    pub(super) fn heartbeat(&mut self, user: UserId, device: DeviceId) {
        let key = (user, device);
        if let Some(local) = self.local.get_mut(&key) {
            local.last_heartbeat = Instant::now();
            if !local.online && !local.sockets.is_empty() {
                local.online = true;
                self.publish_local(&key);
            }
        }
    }

    /// A device with a socket here reports what it plays (`None`: nothing).
    pub(super) fn playing(&mut self, user: UserId, device: DeviceId, report: Option<PlayReport>) {
        let key = (user, device);
        let Some(mut local) = self.local.remove(&key) else {
            return;
        };
        let now_playing = report.map(|r| stamped(r, now_ms()));
        self.track_play(&mut local.plays, now_playing.as_ref(), key.0, &key.1);
        Arc::make_mut(&mut local.entry).now_playing = now_playing;
        local.last_heartbeat = Instant::now();
        local.online = !local.sockets.is_empty();
        self.local.insert(key.clone(), local);
        self.publish_local(&key);
    }

    /// A player without a socket reports what it plays over REST (`None`: it stopped).
    pub(super) fn rest_playing(
        &mut self,
        user: UserId,
        device: Device,
        report: Option<PlayReport>,
    ) {
        let now_playing = report.map(|r| stamped(r, now_ms()));
        self.write_rest(user, device, now_playing, true, None, None);
    }

    /// Writes what a REST player plays (`None`: nothing) as its shared instance; with
    /// `track_plays`, this replica's tracker decides whether a play counted (the now-playing
    /// pipeline decides that itself, durably, before it calls this). The entry lasts the
    /// presence TTL, or until `lasts_until` (ms since the epoch) when that is later.
    pub(super) fn write_rest(
        &mut self,
        user: UserId,
        device: Device,
        now_playing: Option<NowPlaying>,
        track_plays: bool,
        lasts_until: Option<i64>,
        unless_older: Option<UserEvent>,
    ) {
        let key = (user, device.id.clone());
        let instance = instance_id(device.id.as_str(), REST_OWNER);
        let seq = self.next_seq();
        let mut rest = self.rest.remove(&key).unwrap_or_else(|| RestDevice {
            online_at: now_ms(),
            last_report: Instant::now(),
            last_report_ms: now_ms(),
            plays: PlayTracker::default(),
        });
        rest.last_report = Instant::now();
        rest.last_report_ms = now_ms();
        if track_plays {
            self.track_play(&mut rest.plays, now_playing.as_ref(), user, &key.1);
        }
        let Some(now_playing) = now_playing else {
            // Any replica may write a REST instance, and their clocks differ: a withdrawal
            // removes whatever version a view shows.
            let event = UserEvent::PresenceRemove {
                instance: instance.clone(),
                seq: u64::MAX,
            };
            self.send_job(Job::Remove(vec![(user, instance)], vec![(user, event)]));
            return;
        };
        let entry = DeviceEntry {
            device_id: device.id.as_str().to_owned(),
            name: device.name,
            kind: device.kind.as_str().to_owned(),
            online_at: rest.online_at,
            now_playing: Some(now_playing),
            seq,
            expires_at: self.expiry().max(lasts_until.unwrap_or(0)),
        };
        self.rest.insert(key, rest);
        let entry = Arc::new(entry);
        let event = UserEvent::PresenceUpsert {
            instance: instance.clone(),
            entry: entry.clone(),
        };
        let job = match unless_older {
            Some(push) => {
                Job::PutUnlessOlder((user, instance, entry), vec![(user, event), (user, push)])
            }
            None => Job::Put(vec![(user, instance, entry)], vec![(user, event)]),
        };
        self.send_job(job);
    }

    /// Rewrites and republishes every online local entry (after the bus was lost, the
    /// registry may have lost them).
    pub(super) fn republish_online(&mut self) {
        let online: Vec<(UserId, DeviceId)> = self
            .local
            .iter()
            .filter(|(_, l)| l.online)
            .map(|(key, _)| key.clone())
            .collect();
        for key in online {
            self.publish_local(&key);
        }
    }
}
