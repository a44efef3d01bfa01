//! Overlay streams: what a user plays, for the Server-Sent Events of their overlays
//! (`GET /overlay/{token}/events`). One actor per replica keeps, for every user with an open
//! stream here, the user's presence (read once from the registry, then kept in step by the
//! events the hub hears) and the one now-playing answer derived from it, in a watch channel:
//! a slow reader gets the newest state, never a backlog.
//!
//! A revoked overlay's streams end on every replica: the revoking replica announces the
//! token's hash on the bus, and each replica's actor ends the streams opened with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use super::events::UserEvent;
use super::hub::{Hub, Unwatch, Watch};
use super::queue::Queues;
use crate::domain::UserId;
use crate::presence::{AnyRegistry, DeviceEntry, Snapshot, now_ms};
use crate::store::catalog::TrackView;

/// How often expired presence is dropped from what streams show.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// One state of a user's overlay: an increasing id, and `{"playing": …}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub id: u64,
    pub payload: Value,
}

/// An open stream's ends: the state to follow, and a signal when its overlay is revoked.
pub struct Opened {
    pub stream: u64,
    pub state: watch::Receiver<Shown>,
    pub revoked: oneshot::Receiver<()>,
}

struct Watched {
    snapshot: Snapshot,
    /// Catalog tracks looked up for reports that did not carry one: only those the user's
    /// devices play now, `None` while looking or when the catalog has no such track (looked
    /// up once, not at every refresh).
    tracks: HashMap<String, Option<TrackView>>,
    state: watch::Sender<Shown>,
    /// Open streams: stream id → the overlay's token hash and its revocation signal.
    streams: HashMap<u64, (String, oneshot::Sender<()>)>,
}

pub struct Overlays {
    hub: Addr<Hub>,
    registry: AnyRegistry,
    queues: Queues,
    users: HashMap<UserId, Watched>,
    next_stream: u64,
}

impl Overlays {
    pub fn new(hub: Addr<Hub>, registry: AnyRegistry, queues: Queues) -> Self {
        Self {
            hub,
            registry,
            queues,
            users: HashMap::new(),
            next_stream: 1,
        }
    }

    /// Derives the user's overlay state and publishes it when it changed.
    fn refresh(&mut self, user: UserId, ctx: &mut Context<Self>) {
        let Some(watched) = self.users.get_mut(&user) else {
            return;
        };
        let now = now_ms();
        watched.snapshot.entries.retain(|_, e| e.is_live(now));
        let entries = &watched.snapshot.entries;
        watched.tracks.retain(|id, _| {
            entries
                .values()
                .any(|e| e.now_playing.as_ref().is_some_and(|n| n.track_id == *id))
        });
        let listening = watched.snapshot.listening().cloned();
        let payload = match &listening {
            Some(entry) => {
                if playing_track(entry).is_none()
                    && let Some(playing) = &entry.now_playing
                    && !watched.tracks.contains_key(&playing.track_id)
                {
                    watched.tracks.insert(playing.track_id.clone(), None);
                    self.look_up(user, playing.track_id.clone(), ctx);
                }
                let watched = self.users.get(&user);
                playing_payload(entry, watched.map(|w| &w.tracks))
            }
            None => json!({"playing": null}),
        };
        let Some(watched) = self.users.get_mut(&user) else {
            return;
        };
        watched.state.send_if_modified(|shown| {
            // Id 0 is the state before the registry was read: the first real state is news
            // even when it shows nothing playing.
            if shown.id != 0 && shown.payload == payload {
                return false;
            }
            let micros = u64::try_from(now_ms()).unwrap_or(0);
            shown.id = (shown.id + 1).max(micros);
            shown.payload = payload;
            true
        });
    }

    /// Looks a catalog track up for a report that did not carry it.
    fn look_up(&self, user: UserId, track_id: String, ctx: &mut Context<Self>) {
        let queues = self.queues.clone();
        let wanted = track_id.clone();
        ctx.spawn(
            async move { queues.tracks(std::slice::from_ref(&wanted)).await }
                .into_actor(self)
                .map(move |found, actor, ctx| {
                    let Some(watched) = actor.users.get_mut(&user) else {
                        return;
                    };
                    match found {
                        Ok(mut found) => {
                            if let Some(track) = found.pop()
                                && let Some(slot) = watched.tracks.get_mut(&track.id)
                            {
                                *slot = Some(track);
                                actor.refresh(user, ctx);
                            }
                        }
                        // Looked up again at the next refresh.
                        Err(_) => {
                            watched.tracks.remove(&track_id);
                        }
                    }
                }),
        );
    }

    fn apply(&mut self, user: UserId, event: &UserEvent) -> bool {
        let Some(watched) = self.users.get_mut(&user) else {
            return false;
        };
        let snapshot = &mut watched.snapshot;
        match event {
            UserEvent::PresenceUpsert { instance, entry } => {
                let newer = snapshot
                    .entries
                    .get(instance)
                    .is_none_or(|known| known.seq < entry.seq);
                if newer {
                    snapshot.entries.insert(instance.clone(), entry.clone());
                }
            }
            UserEvent::PresenceRemove { instance, seq } => {
                if snapshot.entries.get(instance).is_some_and(|e| e.seq < *seq) {
                    snapshot.entries.remove(instance);
                }
            }
            UserEvent::OutputChanged { device_id, .. } => {
                snapshot.output = Some(device_id.clone());
            }
            _ => return false,
        }
        true
    }
}

fn playing_track(entry: &DeviceEntry) -> Option<&TrackView> {
    entry.now_playing.as_ref().and_then(|n| n.track.as_ref())
}

/// What an overlay shows of `entry`: the track with its artwork, position and state.
fn playing_payload(
    entry: &DeviceEntry,
    looked_up: Option<&HashMap<String, Option<TrackView>>>,
) -> Value {
    let Some(playing) = &entry.now_playing else {
        return json!({"playing": null});
    };
    let track = playing_track(entry).or_else(|| {
        looked_up
            .and_then(|t| t.get(&playing.track_id))
            .and_then(Option::as_ref)
    });
    json!({"playing": {
        "track_id": playing.track_id,
        "title": track.map(|t| t.title.as_str()),
        "artist": track.map(|t| t.artist.as_str()),
        "album": track.and_then(|t| t.album.as_deref()),
        "duration_ms": track.and_then(|t| t.duration_ms),
        "artwork": track.and_then(|t| t.artwork.as_ref()),
        "progress_ms": playing.progress_ms,
        "is_playing": playing.is_playing,
        "at": playing.at,
        "device_kind": entry.kind,
    }})
}

impl Actor for Overlays {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(REFRESH_EVERY, |actor, ctx| {
            let users: Vec<UserId> = actor.users.keys().copied().collect();
            for user in users {
                actor.refresh(user, ctx);
            }
        });
    }
}

/// Opens a stream of `user`'s overlay (the one whose token hashes to `token_hash`).
#[derive(Message)]
#[rtype(result = "Opened")]
pub struct Open {
    pub user: UserId,
    pub token_hash: String,
}

impl Handler<Open> for Overlays {
    type Result = MessageResult<Open>;

    fn handle(&mut self, msg: Open, ctx: &mut Context<Self>) -> Self::Result {
        let (stream, user) = (self.next_stream, msg.user);
        self.next_stream += 1;
        let (revoke, revoked) = oneshot::channel();
        if let std::collections::hash_map::Entry::Vacant(vacant) = self.users.entry(user) {
            let (state, _) = watch::channel(Shown {
                id: 0,
                payload: json!({"playing": null}),
            });
            vacant.insert(Watched {
                snapshot: Snapshot::default(),
                tracks: HashMap::new(),
                state,
                streams: HashMap::new(),
            });
            // Hear the user's channel first, then read the registry, so nothing written in
            // between is missed; what was heard meanwhile wins where it is newer.
            let (heard, hearing) = oneshot::channel();
            self.hub.do_send(Watch { user, heard });
            let registry = self.registry.clone();
            ctx.spawn(
                async move {
                    let _ = hearing.await;
                    registry.snapshot(user).await
                }
                .into_actor(self)
                .map(move |loaded, actor, ctx| {
                    let Ok(loaded) = loaded else {
                        tracing::warn!(%user, "overlay: presence unreadable; showing events only");
                        return;
                    };
                    let Some(watched) = actor.users.get_mut(&user) else {
                        return;
                    };
                    for (instance, entry) in loaded.entries {
                        let newer = watched
                            .snapshot
                            .entries
                            .get(&instance)
                            .is_none_or(|known| known.seq < entry.seq);
                        if newer {
                            watched.snapshot.entries.insert(instance, entry);
                        }
                    }
                    if watched.snapshot.output.is_none() {
                        watched.snapshot.output = loaded.output;
                    }
                    actor.refresh(user, ctx);
                }),
            );
        }
        let watched = self.users.get_mut(&user);
        let state = match watched {
            Some(watched) => {
                watched.streams.insert(stream, (msg.token_hash, revoke));
                watched.state.subscribe()
            }
            None => {
                watch::channel(Shown {
                    id: 0,
                    payload: Value::Null,
                })
                .1
            }
        };
        MessageResult(Opened {
            stream,
            state,
            revoked,
        })
    }
}

/// A stream ended (its reader went, or its overlay was revoked).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close {
    pub user: UserId,
    pub stream: u64,
}

impl Handler<Close> for Overlays {
    type Result = ();

    fn handle(&mut self, msg: Close, _: &mut Context<Self>) {
        let Some(watched) = self.users.get_mut(&msg.user) else {
            return;
        };
        watched.streams.remove(&msg.stream);
        if watched.streams.is_empty() {
            self.users.remove(&msg.user);
            self.hub.do_send(Unwatch { user: msg.user });
        }
    }
}

/// A presence event for a user, as the hub heard or published it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Observed {
    pub user: UserId,
    pub event: Arc<UserEvent>,
}

impl Handler<Observed> for Overlays {
    type Result = ();

    fn handle(&mut self, msg: Observed, ctx: &mut Context<Self>) {
        if self.apply(msg.user, &msg.event) {
            self.refresh(msg.user, ctx);
        }
    }
}

/// The overlay whose token hashes to this was revoked: its streams here end.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoked {
    pub token_hash: String,
}

impl Handler<Revoked> for Overlays {
    type Result = ();

    fn handle(&mut self, msg: Revoked, _: &mut Context<Self>) {
        for watched in self.users.values_mut() {
            let ended: Vec<u64> = watched
                .streams
                .iter()
                .filter(|(_, (hash, _))| *hash == msg.token_hash)
                .map(|(id, _)| *id)
                .collect();
            for id in ended {
                if let Some((_, revoke)) = watched.streams.remove(&id) {
                    let _ = revoke.send(());
                }
            }
        }
        // Users left without streams are dropped when each stream's Close arrives.
    }
}

impl Overlays {
    /// Whether a user event matters to overlays.
    pub fn concerns(event: &UserEvent) -> bool {
        matches!(
            event,
            UserEvent::PresenceUpsert { .. }
                | UserEvent::PresenceRemove { .. }
                | UserEvent::OutputChanged { .. }
        )
    }
}
