//! The hub: one per replica. It owns the map from user to [`UserSession`], spawns sessions
//! when a user's first socket arrives, subscribes the replica to that user's bus channel for
//! as long as the session lives, and retires the session a while after the last socket left.
//!
//! Every socket attaches and detaches through the hub, so the hub's count of a user's sockets
//! is exact and a session is never retired while a socket is on its way to it.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::events::UserEvent;
use super::queue::{Queues, changed_event};
use super::session::{self, Member, UserSession};
use crate::bus::{AnyBus, Bus};
use crate::domain::UserId;
use crate::telemetry::Metrics;

/// Identifies one socket within a replica.
pub type SocketId = u64;

/// A session and how many sockets it has.
struct Entry {
    session: Addr<UserSession>,
    sockets: usize,
    /// Bumped on every attach, so a retirement scheduled before it is called off.
    generation: u64,
    /// Whether the first bus subscription attempt has finished (successfully or not).
    subscribed: bool,
    /// Callers of [`AwaitSubscribed`] waiting for it.
    waiters: Vec<oneshot::Sender<()>>,
}

pub struct Hub {
    bus: AnyBus,
    sessions: HashMap<UserId, Entry>,
    /// How long a session outlives its last socket (a quick reconnect finds it warm).
    linger: Duration,
    /// Set right after start ([`UseQueues`]); used to resync after a bus loss.
    queues: Option<Queues>,
    metrics: Metrics,
}

impl Hub {
    pub fn new(bus: AnyBus, linger: Duration, metrics: Metrics) -> Self {
        Self {
            bus,
            sessions: HashMap::new(),
            linger,
            queues: None,
            metrics,
        }
    }

    fn retire(&mut self, user: UserId, generation: u64, ctx: &mut Context<Self>) {
        let idle = self
            .sessions
            .get(&user)
            .is_some_and(|entry| entry.sockets == 0 && entry.generation == generation);
        if !idle {
            return;
        }
        if let Some(entry) = self.sessions.remove(&user) {
            entry.session.do_send(session::Stop);
            self.metrics.sessions.set(self.sessions.len() as i64);
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
    }
}

impl Actor for Hub {
    type Context = Context<Self>;
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
        let user = msg.user;
        if !self.sessions.contains_key(&user) {
            let bus = self.bus.clone();
            // Subscribing is asynchronous; the session serves local sockets meanwhile, and
            // reads that must not miss a later change wait for it (`AwaitSubscribed`).
            ctx.spawn(
                async move { bus.subscribe(user).await }
                    .into_actor(self)
                    .map(move |result, hub, _| {
                        if let Err(error) = result {
                            tracing::warn!(%error, %user, "bus subscribe failed");
                        }
                        if let Some(entry) = hub.sessions.get_mut(&user) {
                            entry.subscribed = true;
                            for waiter in entry.waiters.drain(..) {
                                let _ = waiter.send(());
                            }
                        }
                    }),
            );
        }
        let entry = self.sessions.entry(user).or_insert_with(|| Entry {
            session: UserSession::new(user).start(),
            sockets: 0,
            generation: 0,
            subscribed: false,
            waiters: Vec::new(),
        });
        entry.sockets += 1;
        entry.generation += 1;
        entry.session.do_send(session::Join(msg.member));
        self.metrics.sessions.set(self.sessions.len() as i64);
    }
}

/// Resolves once this replica hears `user`'s bus channel (or has tried to and failed; a bus
/// that comes back later triggers a resync). A read made after this cannot miss a later
/// change made on another replica.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AwaitSubscribed {
    pub user: UserId,
}

impl Handler<AwaitSubscribed> for Hub {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: AwaitSubscribed, _: &mut Context<Self>) -> Self::Result {
        match self.sessions.get_mut(&msg.user) {
            Some(entry) if !entry.subscribed => {
                let (done, wait) = oneshot::channel();
                entry.waiters.push(done);
                Box::pin(async move {
                    let _ = wait.await;
                })
            }
            // Subscribed, or no socket of the user here (nothing to miss).
            _ => Box::pin(async {}),
        }
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

    fn handle(&mut self, msg: Detach, ctx: &mut Context<Self>) {
        let Some(entry) = self.sessions.get_mut(&msg.user) else {
            return;
        };
        entry.session.do_send(session::Leave(msg.socket));
        entry.sockets = entry.sockets.saturating_sub(1);
        if entry.sockets == 0 {
            let (user, generation) = (msg.user, entry.generation);
            ctx.run_later(self.linger, move |hub, ctx| {
                hub.retire(user, generation, ctx)
            });
        }
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
        if let Some(entry) = self.sessions.get(&msg.user) {
            entry.session.do_send(session::Deliver(msg.event));
        }
        // Enqueued now, so publishes leave in the order they were raised; the outcome is
        // only logged (the bus logs failures itself).
        drop(self.bus.publish(msg.user, body));
        self.metrics.bus_published.inc();
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
        let Some(entry) = self.sessions.get(&msg.user) else {
            return;
        };
        match UserEvent::decode(&msg.body) {
            Some(event) => entry.session.do_send(session::Deliver(event)),
            None => tracing::warn!(user = %msg.user, "unreadable bus event dropped"),
        }
    }
}

/// The bus connection was lost: events from other replicas are missed until it is back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BusLost;

impl Handler<BusLost> for Hub {
    type Result = ();

    fn handle(&mut self, _: BusLost, _: &mut Context<Self>) {
        self.metrics.bus_lost.inc();
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
        let Some(queues) = self.queues.clone() else {
            return;
        };
        // Changes made elsewhere while the bus was away were missed: send every user here
        // their queue as the store has it (a device already at that revision drops it).
        for (user, entry) in &self.sessions {
            let (queues, session, user) = (queues.clone(), entry.session.clone(), *user);
            ctx.spawn(
                async move {
                    match queues.read(user).await {
                        Ok(view) => {
                            session.do_send(session::Deliver(changed_event(user, &view, None)))
                        }
                        Err(error) => tracing::warn!(%error, %user, "queue resync failed"),
                    }
                }
                .into_actor(self),
            );
        }
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

/// How many users have a session here (for metrics and tests).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SessionCount;

impl Handler<SessionCount> for Hub {
    type Result = usize;

    fn handle(&mut self, _: SessionCount, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}
