//! The hub: one per replica. It owns the map from user to [`UserSession`], spawns sessions
//! when a user's first socket (or first queue request) arrives, subscribes the replica to that
//! user's bus channel for as long as the session lives or the presence actor watches the user
//! (a friend's presence), and retires the session a while after it was last used and its last
//! socket left. What it hears about presence it hands to the presence actor.
//!
//! Every socket attaches and detaches through the hub, so the hub's count of a user's sockets
//! is exact and a session is never retired while a socket is on its way to it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::connection::ToSocket;
use super::events::{ReplicaEvent, UserEvent};
use super::overlays::Overlays;
use super::presence::{Observed, Presence};
use super::queue::{Queues, changed_event};
use super::session::{self, Member, UserSession};
use super::transport::CloseKind;
use crate::auth::Sessions;
use crate::bus::{AnyBus, Bus};
use crate::domain::UserId;
use crate::telemetry::Metrics;

/// Identifies one socket within a replica.
pub type SocketId = u64;

/// Whether this replica hears a user's channel.
enum Subscription {
    /// The first attempt is under way; these wait for its outcome.
    Pending(Vec<oneshot::Sender<bool>>),
    /// The first attempt finished: `true` if it succeeded.
    Done(bool),
}

impl Subscription {
    /// Tells `waiter` whether the channel is heard, now or once the first attempt is done.
    fn wait(&mut self, waiter: oneshot::Sender<bool>) {
        match self {
            Subscription::Pending(waiters) => waiters.push(waiter),
            Subscription::Done(ok) => {
                let _ = waiter.send(*ok);
            }
        }
    }
}

/// Why this replica hears a user's channel: a session here, or the presence actor watching.
struct Hearing {
    subscription: Subscription,
    session: bool,
    watchers: usize,
    /// Tells this subscription from an earlier one of the same user, whose outcome may
    /// still arrive.
    epoch: u64,
}

/// A session and how many sockets it has.
struct Entry {
    session: Addr<UserSession>,
    sockets: usize,
    /// When a socket or request last used the session; it is retired once it has had no
    /// socket for the linger time since then.
    last_used: Instant,
}

pub struct Hub {
    bus: AnyBus,
    sessions: HashMap<UserId, Entry>,
    hearing: HashMap<UserId, Hearing>,
    /// The next subscription epoch.
    epochs: u64,
    /// How long a session outlives its last use (a quick reconnect finds it warm).
    linger: Duration,
    /// Set right after start ([`UseQueues`]).
    queues: Option<Queues>,
    /// Set right after start ([`UsePresence`]).
    presence: Option<Addr<Presence>>,
    /// Set right after start ([`UseOverlays`]).
    overlays: Option<Addr<Overlays>>,
    /// The replica's blocked addresses, once the guard hands them over.
    blocks: Option<crate::abuse::Blocks>,
    /// Which login sessions have ended, as the HTTP layer and socket upgrades check them.
    logins: Sessions,
    metrics: Metrics,
    /// Set by [`Drain`]: the replica is stopping, and a socket that arrives now (its upgrade
    /// was in flight) is closed as the others were.
    draining: bool,
}

impl Hub {
    pub fn new(bus: AnyBus, linger: Duration, logins: Sessions, metrics: Metrics) -> Self {
        Self {
            logins,
            bus,
            sessions: HashMap::new(),
            hearing: HashMap::new(),
            epochs: 0,
            linger,
            queues: None,
            presence: None,
            overlays: None,
            blocks: None,
            metrics,
            draining: false,
        }
    }

    /// The user's channel, subscribing when this replica does not hear it yet.
    fn hear(&mut self, user: UserId, ctx: &mut Context<Self>) -> &mut Hearing {
        if !self.hearing.contains_key(&user) {
            self.epochs += 1;
            let epoch = self.epochs;
            let bus = self.bus.clone();
            ctx.spawn(
                async move { bus.subscribe(user).await }
                    .into_actor(self)
                    .map(move |result, hub, _| {
                        if let Err(error) = &result {
                            tracing::warn!(%error, %user, "bus subscribe failed");
                        }
                        let current = hub.hearing.get_mut(&user).filter(|h| h.epoch == epoch);
                        if let Some(hearing) = current {
                            let done = Subscription::Done(result.is_ok());
                            if let Subscription::Pending(waiters) =
                                std::mem::replace(&mut hearing.subscription, done)
                            {
                                for waiter in waiters {
                                    let _ = waiter.send(result.is_ok());
                                }
                            }
                        }
                    }),
            );
        }
        let epoch = self.epochs;
        self.hearing.entry(user).or_insert_with(|| Hearing {
            subscription: Subscription::Pending(Vec::new()),
            session: false,
            watchers: 0,
            epoch,
        })
    }

    /// Stops hearing the user's channel once nothing here needs it.
    fn stop_hearing_if_unused(&mut self, user: UserId, ctx: &mut Context<Self>) {
        let unused = self
            .hearing
            .get(&user)
            .is_some_and(|h| !h.session && h.watchers == 0);
        if !unused {
            return;
        }
        self.hearing.remove(&user);
        // Not hearing the channel any more, the replica may not keep the queue cached.
        if let Some(queues) = &self.queues {
            queues.forget(user);
        }
        let bus = self.bus.clone();
        ctx.spawn(
            async move {
                if let Err(error) = bus.unsubscribe(user).await {
                    tracing::warn!(%error, %user, "bus unsubscribe failed");
                }
            }
            .into_actor(self),
        );
    }

    /// The user's entry, creating the session (and subscribing) when there is none. Counts
    /// as a use: a pending retirement is called off.
    fn entry(&mut self, user: UserId, ctx: &mut Context<Self>) -> &mut Entry {
        if !self.sessions.contains_key(&user) {
            self.hear(user, ctx).session = true;
            self.metrics.sessions.set(self.sessions.len() as i64 + 1);
        }
        let queues = self.queues.clone();
        let entry = self.sessions.entry(user).or_insert_with(|| Entry {
            session: UserSession::new(user, queues).start(),
            sockets: 0,
            last_used: Instant::now(),
        });
        entry.last_used = Instant::now();
        entry
    }

    /// Retires every session that has had no socket and no use for the linger time. One
    /// periodic sweep, not a timer per use: an actix context polls all its timers on every
    /// wake-up, so per-request timers made each hub message cost O(pending timers).
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let idle: Vec<UserId> = self
            .sessions
            .iter()
            .filter(|(_, entry)| {
                entry.sockets == 0 && now.duration_since(entry.last_used) >= self.linger
            })
            .map(|(user, _)| *user)
            .collect();
        for user in idle {
            self.retire(user, ctx);
        }
    }

    fn retire(&mut self, user: UserId, ctx: &mut Context<Self>) {
        if let Some(entry) = self.sessions.remove(&user) {
            entry.session.do_send(session::Stop);
            self.metrics.sessions.set(self.sessions.len() as i64);
            if let Some(hearing) = self.hearing.get_mut(&user) {
                hearing.session = false;
            }
            self.stop_hearing_if_unused(user, ctx);
        }
    }

    /// Hands presence events to the presence actor.
    fn tell_presence(&self, user: UserId, event: &UserEvent) {
        if let Some(presence) = &self.presence
            && event.concerns_presence()
        {
            presence.do_send(Observed {
                user,
                event: event.clone(),
            });
        }
    }

    /// Hands presence events to the overlay streams.
    fn tell_overlays(&self, user: UserId, event: &UserEvent) {
        if let Some(overlays) = &self.overlays
            && Overlays::concerns(event)
        {
            overlays.do_send(super::overlays::Observed {
                user,
                event: std::sync::Arc::new(event.clone()),
            });
        }
    }

    /// Keeps the queue cache in step with an event for `user`.
    fn observe(&self, user: UserId, event: &UserEvent) {
        let Some(queues) = &self.queues else { return };
        match event {
            UserEvent::Push {
                topic,
                payload,
                revision: Some(revision),
                ..
            } if topic.starts_with("queue:") => {
                queues.observe(user, *revision, payload);
            }
            UserEvent::PreferencesChanged { .. } => queues.forget(user),
            _ => {}
        }
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Sessions go between one and one-and-a-quarter linger times after their last use.
        let every = (self.linger / 4).max(Duration::from_millis(100));
        ctx.run_interval(every, |hub, ctx| hub.sweep(ctx));
    }
}

/// A socket of `user` arrived.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach {
    pub user: UserId,
    pub member: Member,
}

impl Handler<Attach> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) {
        if self.draining {
            msg.member
                .recipient
                .do_send(ToSocket::Close(CloseKind::Restarting));
        }
        let entry = self.entry(msg.user, ctx);
        entry.sockets += 1;
        entry.session.do_send(session::Join(msg.member));
    }
}

/// The session of `user` (created if needed), and a signal that resolves to whether this
/// replica hears the user's channel: a read made after it cannot miss a later change made on
/// another replica. A session kept only for requests is retired after the linger time.
#[derive(Message)]
#[rtype(result = "(Addr<UserSession>, oneshot::Receiver<bool>)")]
pub struct SessionOf {
    pub user: UserId,
}

impl Handler<SessionOf> for Hub {
    type Result = MessageResult<SessionOf>;

    fn handle(&mut self, msg: SessionOf, ctx: &mut Context<Self>) -> Self::Result {
        let session = self.entry(msg.user, ctx).session.clone();
        let (done, signal) = oneshot::channel();
        self.hear(msg.user, ctx).subscription.wait(done);
        MessageResult((session, signal))
    }
}

/// A socket of `user` left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    pub user: UserId,
    pub socket: SocketId,
}

impl Handler<Detach> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Detach, _: &mut Context<Self>) {
        let Some(entry) = self.sessions.get_mut(&msg.user) else {
            return;
        };
        entry.session.do_send(session::Leave(msg.socket));
        entry.sockets = entry.sockets.saturating_sub(1);
        // The linger time counts from the last socket leaving.
        entry.last_used = Instant::now();
    }
}

/// An event for `user` raised on this replica: delivered to the local sockets now and
/// published for the other replicas.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub user: UserId,
    pub event: UserEvent,
}

impl Handler<Publish> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        let body = msg.event.encode();
        if matches!(msg.event, UserEvent::PreferencesChanged { .. }) {
            self.observe(msg.user, &msg.event);
        }
        self.tell_presence(msg.user, &msg.event);
        self.tell_overlays(msg.user, &msg.event);
        if let Some(entry) = self.sessions.get(&msg.user) {
            entry.session.do_send(session::Deliver(msg.event));
        }
        // Enqueued now, so publishes leave in the order they were raised; the outcome is
        // only logged (the bus logs failures itself).
        drop(self.bus.publish(msg.user, body));
        self.metrics.bus_published.inc();
    }
}

/// A login session ended on this replica: it ends on every replica, by the bus.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndSession {
    pub user: UserId,
    pub session: String,
}

impl Handler<EndSession> for Hub {
    type Result = ();

    fn handle(&mut self, msg: EndSession, _: &mut Context<Self>) {
        let event = ReplicaEvent::SessionEnded {
            user: msg.user,
            session: msg.session,
        };
        drop(self.bus.broadcast(event.encode()));
        self.metrics.bus_published.inc();
        self.apply(event);
    }
}

/// A replica-wide event of this replica: applied here, and sent to every other.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Announce(pub ReplicaEvent);

impl Handler<Announce> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Announce, _: &mut Context<Self>) {
        drop(self.bus.broadcast(msg.0.encode()));
        self.metrics.bus_published.inc();
        self.apply(msg.0);
    }
}

/// The replica's block list, kept in step with what other replicas announce.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UseBlocks(pub crate::abuse::Blocks);

impl Handler<UseBlocks> for Hub {
    type Result = ();

    fn handle(&mut self, msg: UseBlocks, _: &mut Context<Self>) {
        self.blocks = Some(msg.0);
    }
}

/// A replica-wide event heard from another replica.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HeardBroadcast {
    pub body: Bytes,
}

impl Handler<HeardBroadcast> for Hub {
    type Result = ();

    fn handle(&mut self, msg: HeardBroadcast, _: &mut Context<Self>) {
        self.metrics.bus_heard.inc();
        match ReplicaEvent::decode(&msg.body) {
            Some(event) => self.apply(event),
            None => tracing::warn!("unreadable replica-wide bus event dropped"),
        }
    }
}

impl Hub {
    /// What a replica-wide event means here.
    fn apply(&mut self, event: ReplicaEvent) {
        match event {
            ReplicaEvent::AddressBlocked { address, until_ms } => {
                if let Some(blocks) = &self.blocks {
                    blocks.insert(address, until_ms);
                }
            }
            ReplicaEvent::AddressUnblocked { address } => {
                if let Some(blocks) = &self.blocks {
                    blocks.remove(&address);
                }
            }
            ReplicaEvent::TracksChanged { ids } => {
                if let Some(queues) = &self.queues {
                    queues.forget_local_tracks(&ids);
                }
            }
            ReplicaEvent::OverlayRevoked { token_hash } => {
                if let Some(overlays) = &self.overlays {
                    overlays.do_send(super::overlays::Revoked { token_hash });
                }
            }
            ReplicaEvent::SessionEnded { user, session } => {
                let logins = self.logins.clone();
                let ended = session.clone();
                actix::spawn(async move { logins.mark_revoked(&ended).await });
                if let Some(entry) = self.sessions.get(&user) {
                    entry
                        .session
                        .do_send(session::Deliver(UserEvent::EndSession { session }));
                }
            }
        }
    }
}

/// An event for `user` heard from another replica.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heard {
    pub user: UserId,
    pub body: Bytes,
}

impl Handler<Heard> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Heard, _: &mut Context<Self>) {
        self.metrics.bus_heard.inc();
        let Some(event) = UserEvent::decode(&msg.body) else {
            tracing::warn!(user = %msg.user, "unreadable bus event dropped");
            return;
        };
        self.observe(msg.user, &event);
        self.tell_presence(msg.user, &event);
        self.tell_overlays(msg.user, &event);
        if let Some(entry) = self.sessions.get(&msg.user) {
            entry.session.do_send(session::Deliver(event));
        }
    }
}

/// The bus connection was lost: events from other replicas are missed until it is back, so
/// nothing cached can be trusted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BusLost;

impl Handler<BusLost> for Hub {
    type Result = ();

    fn handle(&mut self, _: BusLost, _: &mut Context<Self>) {
        self.metrics.bus_lost.inc();
        // An ended login published meanwhile would not be heard: check sessions against the
        // store until the bus is back.
        self.logins.distrust_cache();
        if let Some(queues) = &self.queues {
            queues.bus_lost();
        }
    }
}

/// The bus connection came back after a loss: every user with a session here gets a fresh
/// `queue_changed`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BusRestored;

impl Handler<BusRestored> for Hub {
    type Result = ();

    fn handle(&mut self, _: BusRestored, ctx: &mut Context<Self>) {
        self.metrics.bus_restored.inc();
        self.resync(ctx);
    }
}

/// Another replica could not publish some of its messages while this replica's bus was up:
/// what this replica derived from the bus may be stale, as after a loss of its own.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BusMissed;

impl Handler<BusMissed> for Hub {
    type Result = ();

    fn handle(&mut self, _: BusMissed, ctx: &mut Context<Self>) {
        self.metrics.bus_missed.inc();
        if let Some(queues) = &self.queues {
            queues.bus_lost();
        }
        self.resync(ctx);
    }
}

/// Store reads in flight at once while a resync sends every session its queue: a resync of
/// thousands of sessions must not take every pooled connection (requests need them too).
const RESYNC_CONCURRENCY: usize = 4;

impl Hub {
    /// Refreshes everything derived from bus messages that may have been missed: cached login
    /// answers, presence, and every local user's queue, sent again as the store has it (a
    /// device already at that revision drops it).
    fn resync(&mut self, ctx: &mut Context<Self>) {
        use futures_util::StreamExt;

        self.logins.trust_cache_again();
        // Presence heard meanwhile was missed too: the presence actor rewrites its own
        // entries and re-reads every view.
        if let Some(presence) = &self.presence {
            presence.do_send(super::presence::Resync);
        }
        let Some(queues) = self.queues.clone() else {
            return;
        };
        queues.bus_restored();
        let sessions: Vec<(UserId, Addr<UserSession>)> = self
            .sessions
            .iter()
            .map(|(user, entry)| (*user, entry.session.clone()))
            .collect();
        ctx.spawn(
            futures_util::stream::iter(sessions)
                .for_each_concurrent(RESYNC_CONCURRENCY, move |(user, session)| {
                    let queues = queues.clone();
                    async move {
                        match queues.read(user).await {
                            Ok(view) => {
                                session.do_send(session::Deliver(changed_event(user, &view, None)))
                            }
                            Err(error) => tracing::warn!(%error, %user, "queue resync failed"),
                        }
                    }
                })
                .into_actor(self),
        );
    }
}

/// The replica is shutting down: every socket here is closed with 1012 (service restart),
/// so clients reconnect, to another replica, at once instead of when the process is gone.
/// Sockets that attach later (their upgrade was in flight) are closed the same way.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Drain;

impl Handler<Drain> for Hub {
    type Result = usize;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> usize {
        self.draining = true;
        for entry in self.sessions.values() {
            entry
                .session
                .do_send(session::CloseAll(CloseKind::Restarting));
        }
        self.sessions.values().map(|entry| entry.sockets).sum()
    }
}

/// Gives the hub the queue service (built after the hub, which it needs).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UseQueues(pub Queues);

impl Handler<UseQueues> for Hub {
    type Result = ();

    fn handle(&mut self, UseQueues(queues): UseQueues, _: &mut Context<Self>) {
        self.queues = Some(queues);
    }
}

/// Gives the hub the presence actor (built after the hub, which it needs).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UsePresence(pub Addr<Presence>);

impl Handler<UsePresence> for Hub {
    type Result = ();

    fn handle(&mut self, UsePresence(presence): UsePresence, _: &mut Context<Self>) {
        self.presence = Some(presence);
    }
}

/// Gives the hub the overlay streams' actor (built after the hub, which it needs).
#[derive(Message)]
#[rtype(result = "()")]
pub struct UseOverlays(pub Addr<Overlays>);

impl Handler<UseOverlays> for Hub {
    type Result = ();

    fn handle(&mut self, UseOverlays(overlays): UseOverlays, _: &mut Context<Self>) {
        self.overlays = Some(overlays);
    }
}

/// Keep hearing `user`'s channel until the matching [`Unwatch`] (the presence actor shows
/// that user to sockets here). `heard` says once whether the subscription is live.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub user: UserId,
    pub heard: oneshot::Sender<bool>,
}

impl Handler<Watch> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Watch, ctx: &mut Context<Self>) {
        let hearing = self.hear(msg.user, ctx);
        hearing.watchers += 1;
        hearing.subscription.wait(msg.heard);
    }
}

/// Ends one [`Watch`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub user: UserId,
}

impl Handler<Unwatch> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, ctx: &mut Context<Self>) {
        if let Some(hearing) = self.hearing.get_mut(&msg.user) {
            hearing.watchers = hearing.watchers.saturating_sub(1);
        }
        self.stop_hearing_if_unused(msg.user, ctx);
    }
}
