//! The presence actor: one per replica.
//!
//! * It **owns** the presence of every device with a socket here (`owned.rs`): it writes the
//!   device's entry to the registry when the first socket of the device connects, keeps the
//!   entry's expiry ahead while heartbeats come (Phoenix heartbeats and `now_playing`), marks
//!   the device offline after the TTL without one, and removes it a short delay after its last
//!   socket left (a quick reconnect does not flap). Every change is written, then published on
//!   the user's bus channel, in order, by one writer task. It also notices plays worth keeping
//!   in `play_history`.
//! * It **shows** presence to sockets here joined to `devices:{user}` and `friends:{user}`
//!   (`views.rs`): one view per watched user, kept up by the events heard on the user's
//!   channel, from which each viewer gets `presence_state` and then `presence_diff`s.
//! * It **reads** those views from the registry (`reads.rs`): once this replica hears the
//!   user's channel, again when entries reach their expiry (so the devices of a replica that
//!   died without a word leave every list within the TTL), and after the bus was lost.
//!
//! This file holds the actor's state and its messages; each handler hands over to one of the
//! three.

mod owned;
mod reads;
mod views;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use self::owned::{Job, Local, RestDevice};
use self::views::{DeviceViewer, FriendsViewer, Watched};
use super::connection::ToSocket;
use super::events::UserEvent;
use super::hub::{Hub, SocketId};
use super::queue::Queues;
use crate::bus::ReplicaId;
use crate::domain::{Device, DeviceId, UserId};
use crate::presence::view::RefGen;
use crate::presence::{AnyRegistry, PlayReport};
use crate::store::Store;

/// The presence timings, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct PresenceTimes {
    /// A device not heard from for this long is offline; entries expire this long after their
    /// last refresh.
    pub ttl: Duration,
    /// How long a device whose last socket left stays listed.
    pub leave_delay: Duration,
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
    leaving: VecDeque<(std::time::Instant, (UserId, DeviceId))>,
    rest: HashMap<(UserId, DeviceId), RestDevice>,
    views: HashMap<UserId, Watched>,
    /// Users to read from the registry: the watch's generation, and the hub's signal that
    /// their channel is heard.
    to_load: Vec<(UserId, u64, oneshot::Receiver<bool>)>,
    /// The next watch generation.
    generations: u64,
    /// A read of `to_load` is under way.
    loading: bool,
    /// The last number given to a read of users' consent (`share_listening`).
    consent_reads: u64,
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
        actix::spawn(owned::run_writer(registry.clone(), hub.clone(), jobs));
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
            consent_reads: 0,
            device_viewers: HashMap::new(),
            friend_viewers: HashMap::new(),
        }
    }
}

impl Actor for Presence {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let refresh = (self.times.ttl / 3).max(Duration::from_millis(100));
        ctx.run_interval(refresh, |this, _| this.refresh());
        let leaves = (self.times.leave_delay / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        ctx.run_interval(leaves, |this, _| this.process_leaves());
        let sweep = (self.times.ttl / 4).min(reads::VIEW_SWEEP_MAX);
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
        self.connected(msg.user, msg.device, msg.socket);
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
        self.disconnected(msg.user, msg.device, msg.socket);
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
        self.heartbeat(msg.user, msg.device);
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
        self.playing(msg.user, msg.device, msg.report);
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
        self.rest_playing(msg.user, msg.device, msg.report);
    }
}

/// The now-playing pipeline applied a report (or its artwork became ready): shown as the
/// device's REST instance, stamped with the report's own time. Plays were already counted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PipelinePlaying {
    pub user: UserId,
    pub device: Device,
    pub now_playing: crate::presence::NowPlaying,
    /// When the entry may lapse (the track's expected end), if later than the presence TTL.
    pub lasts_until: Option<i64>,
    /// Published with the entry, and only if the entry is written (a report applied late,
    /// refused by the registry, is not pushed either).
    pub push: UserEvent,
}

impl Handler<PipelinePlaying> for Presence {
    type Result = ();

    fn handle(&mut self, msg: PipelinePlaying, _: &mut Context<Self>) {
        self.write_rest(
            msg.user,
            msg.device,
            Some(msg.now_playing),
            false,
            msg.lasts_until,
            Some(msg.push),
        );
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
                self.watch_devices(msg.socket, msg.user, msg.recipient, msg.topic, ctx)
            }
            Shown::Friends => {
                self.watch_friends(msg.socket, msg.user, msg.recipient, msg.topic, ctx)
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
        self.observe(msg.user, msg.event, ctx);
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
        self.republish_online();
        self.reread_views(ctx);
    }
}
