//! What sockets here are shown: one view per watched user, the sockets joined to
//! `devices:{user}` (every device of their own account) and to `friends:{follower}` (the
//! devices of the accounts they follow, as followers see them), and the `presence_state` and
//! `presence_diff` each is sent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{Map, Value, json};

use super::Presence;
use crate::domain::UserId;
use crate::presence::InstanceId;
use crate::presence::view::{Change, RefGen, View};
use crate::realtime::connection::ToSocket;
use crate::realtime::events::UserEvent;
use crate::realtime::frame;
use crate::realtime::hub::{SocketId, Unwatch};
use crate::store::follows;

/// A user whose presence sockets here are shown.
#[derive(Default)]
pub(super) struct Watched {
    /// Tells this watch from an earlier one of the same user, whose reads may still return.
    pub(super) generation: u64,
    /// `None` until the first read of the registry is back.
    pub(super) view: Option<View>,
    /// Events heard while loading, applied on top of the first read.
    pub(super) buffered: Vec<UserEvent>,
    /// A read of the registry is under way.
    pub(super) reloading: bool,
    /// Instances (and whether the output) that events changed while that read was under
    /// way: the view's version of them is newer than the read's.
    pub(super) heard: HashSet<InstanceId>,
    pub(super) output_heard: bool,
    /// The last read failed: read again at the next sweep.
    pub(super) stale: bool,
    /// Read again once the read under way is back (the bus came back meanwhile).
    pub(super) reread: bool,
    /// Whether the user lets followers see their presence (`share_listening`).
    pub(super) consent: Consent,
    /// The read of the consent whose answer counts (a number from `Presence::consent_reads`).
    pub(super) consent_read: u64,
    pub(super) device_viewers: HashSet<SocketId>,
    pub(super) friend_viewers: HashSet<SocketId>,
}

/// Whether followers see a watched user, as the store last said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Consent {
    /// Not read yet: followers' state waits for it.
    #[default]
    Unread,
    Shared,
    /// Not shared, or not known because the read failed (followers see nothing they may
    /// not; a retry follows).
    Hidden,
}

impl Consent {
    fn shows(self) -> bool {
        self == Consent::Shared
    }
}

/// A socket joined to `devices:{user}`.
pub(super) struct DeviceViewer {
    user: UserId,
    recipient: Recipient<ToSocket>,
    topic: Arc<str>,
    state_sent: bool,
}

/// A socket joined to `friends:{follower}`.
pub(super) struct FriendsViewer {
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

/// Applies a presence event to a view.
pub(super) fn apply(view: &mut View, event: UserEvent, refs: &mut RefGen) -> Change {
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

impl FriendsViewer {
    /// Sends this viewer a `presence_diff` of `user`'s devices.
    fn send_diff(&self, user: UserId, change: &Change) {
        let payload = change.for_friends(&user.to_string());
        let text = frame::encode(None, None, &self.topic, "presence_diff", &payload);
        push(&self.recipient, &self.topic, text);
    }
}

impl Presence {
    /// A socket joined `devices:{user}`.
    pub(super) fn watch_devices(
        &mut self,
        socket: SocketId,
        user: UserId,
        recipient: Recipient<ToSocket>,
        topic: Arc<str>,
        ctx: &mut Context<Self>,
    ) {
        self.unwatch_devices(socket);
        let viewer = DeviceViewer {
            user,
            recipient,
            topic,
            state_sent: false,
        };
        self.device_viewers.insert(socket, viewer);
        self.watch([user], ctx);
        if let Some(watched) = self.views.get_mut(&user) {
            watched.device_viewers.insert(socket);
        }
        self.send_devices_state(socket);
    }

    /// A socket joined `friends:{follower}`: its follows are read, then their views.
    pub(super) fn watch_friends(
        &mut self,
        socket: SocketId,
        follower: UserId,
        recipient: Recipient<ToSocket>,
        topic: Arc<str>,
        ctx: &mut Context<Self>,
    ) {
        self.unwatch_friends(socket);
        let viewer = FriendsViewer {
            follower,
            recipient,
            topic,
            followees: HashSet::new(),
            loaded: false,
            state_sent: false,
            follows_read: 0,
        };
        self.friend_viewers.insert(socket, viewer);
        self.load_followees(socket, follower, ctx);
    }

    pub(super) fn unwatch_devices(&mut self, socket: SocketId) {
        if let Some(viewer) = self.device_viewers.remove(&socket) {
            if let Some(watched) = self.views.get_mut(&viewer.user) {
                watched.device_viewers.remove(&socket);
            }
            self.release(viewer.user);
        }
    }

    pub(super) fn unwatch_friends(&mut self, socket: SocketId) {
        if let Some(viewer) = self.friend_viewers.remove(&socket) {
            for user in viewer.followees {
                if let Some(watched) = self.views.get_mut(&user) {
                    watched.friend_viewers.remove(&socket);
                }
                self.release(user);
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

    /// A presence event for `user`: their view changes and its viewers hear how; a change of
    /// follows makes the follower's friends viewers read them again.
    pub(super) fn observe(&mut self, user: UserId, event: UserEvent, ctx: &mut Context<Self>) {
        if matches!(event, UserEvent::FollowsChanged) {
            let sockets: Vec<SocketId> = self
                .friend_viewers
                .iter()
                .filter(|(_, v)| v.follower == user)
                .map(|(socket, _)| *socket)
                .collect();
            for socket in sockets {
                self.load_followees(socket, user, ctx);
            }
            return;
        }
        if let UserEvent::PreferencesChanged { share_listening } = event {
            // Applied at once, in order with the user's other events, so nothing played after
            // the change reaches a follower; reads of the old value still under way no
            // longer count.
            if let Some(shares) = share_listening
                && self.views.contains_key(&user)
            {
                self.start_consent_read(&[user]);
                let consent = if shares {
                    Consent::Shared
                } else {
                    Consent::Hidden
                };
                self.set_consent(user, consent);
            }
            return;
        }
        let Some(watched) = self.views.get_mut(&user) else {
            return;
        };
        let Some(view) = watched.view.as_mut() else {
            watched.buffered.push(event);
            return;
        };
        // Two transfers made at once on two replicas: the registry keeps the last write, but
        // replicas may hear the events in either order; a re-read settles it.
        if matches!(event, UserEvent::OutputChanged { .. }) {
            watched.stale = true;
        }
        if watched.reloading {
            match &event {
                UserEvent::PresenceUpsert { instance, .. }
                | UserEvent::PresenceRemove { instance, .. } => {
                    watched.heard.insert(instance.clone());
                }
                UserEvent::OutputChanged { .. } => watched.output_heard = true,
                _ => {}
            }
        }
        let change = apply(view, event, &mut self.refs);
        self.broadcast(user, &change);
    }

    /// `user`'s view has its first read: its viewers get their state (or, for friends viewers
    /// that have it already, `user`'s devices as joins).
    pub(super) fn view_ready(&mut self, user: UserId) {
        let Some(watched) = self.views.get(&user) else {
            return;
        };
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

    /// The store answered whether `user` lets followers see them: followers who have their
    /// state see `user`'s devices join or leave as that changed, and those waiting for their
    /// state may get it now.
    pub(super) fn set_consent(&mut self, user: UserId, consent: Consent) {
        let Some(watched) = self.views.get_mut(&user) else {
            return;
        };
        let was = watched.consent.shows();
        watched.consent = consent;
        let Some(view) = watched.view.as_ref() else {
            // Its viewers are told once the view's first read is back.
            return;
        };
        let change = match (was, consent.shows()) {
            (false, true) => view.joined(),
            (true, false) => view.left(),
            _ => Change::default(),
        };
        let friends: Vec<SocketId> = watched.friend_viewers.iter().copied().collect();
        for socket in friends {
            let Some(viewer) = self.friend_viewers.get(&socket) else {
                continue;
            };
            if !viewer.state_sent {
                self.send_friends_state(socket);
            } else if !change.is_empty() {
                viewer.send_diff(user, &change);
            }
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
        let state = view.devices_state();
        let text = frame::encode(None, None, &viewer.topic, "presence_state", &state);
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
            let Some(watched) = self.views.get(user) else {
                return;
            };
            let Some(view) = watched.view.as_ref() else {
                return;
            };
            if watched.consent == Consent::Unread {
                return;
            }
            if watched.consent.shows() && !view.is_empty() {
                let metas: Vec<Value> = view
                    .metas()
                    .iter()
                    .map(crate::presence::view::for_friends)
                    .collect();
                state.insert(user.to_string(), json!({ "metas": metas }));
            }
        }
        viewer.state_sent = true;
        let state = Value::Object(state);
        let text = frame::encode(None, None, &viewer.topic, "presence_state", &state);
        push(&viewer.recipient, &viewer.topic, text);
    }

    /// Tells a friends viewer that already has its state about every device of `user`.
    fn send_friend_joined(&self, socket: SocketId, user: UserId) {
        let Some(viewer) = self.friend_viewers.get(&socket).filter(|v| v.state_sent) else {
            return;
        };
        let Some(watched) = self.views.get(&user).filter(|w| w.consent.shows()) else {
            return;
        };
        if let Some(view) = watched.view.as_ref().filter(|v| !v.is_empty()) {
            viewer.send_diff(user, &view.joined());
        }
    }

    /// Sends `change` of `user`'s presence to every socket here that shows it.
    pub(super) fn broadcast(&self, user: UserId, change: &Change) {
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
        if watched.consent.shows() && !watched.friend_viewers.is_empty() {
            // Serialised once; each viewer's frame differs only by its topic.
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
        for user in removed {
            if let Some(watched) = self.views.get_mut(&user) {
                watched.friend_viewers.remove(&socket);
                let viewer = self.friend_viewers.get(&socket).filter(|v| v.state_sent);
                let view =
                    (watched.view.as_ref()).filter(|v| watched.consent.shows() && !v.is_empty());
                if let (Some(viewer), Some(view)) = (viewer, view) {
                    viewer.send_diff(user, &view.left());
                }
            }
            self.release(user);
        }
        self.watch(added.iter().copied(), ctx);
        for user in added {
            if let Some(watched) = self.views.get_mut(&user) {
                watched.friend_viewers.insert(socket);
            }
            self.send_friend_joined(socket, user);
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
}
