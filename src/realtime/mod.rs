//! The realtime core: the Phoenix Channels V2 socket, its actors, and the bus relay.
//!
//! Layers, each testable alone:
//! * [`transport`]: bytes ↔ WebSocket messages (the only `actix_ws` user), bounded outbox;
//! * [`frame`]: messages ↔ Phoenix frames;
//! * [`connection`]: frames ↔ joins, replies and pushes, per socket (an actor);
//! * [`topics`] and [`channels`]: what each topic is and does;
//! * [`session`]: one actor per online user per replica, fanning events out to their sockets;
//! * [`hub`]: one actor per replica, user → session, and the bus subscriptions;
//! * [`relay`]: bus → hub, dropping this replica's own messages;
//! * [`queue`]: queue reads and writes (run in the user's session), the replica's queue cache,
//!   and `queue_changed`;
//! * [`presence`]: one actor per replica owning its sockets' device presence and showing
//!   `devices:` and `friends:` presence to its sockets.
//!
//! ```text
//! socket ─▶ Connection ─▶ channels ─▶ Hub::Publish ─┬─▶ UserSession ─▶ Connection(s) ─▶ sockets
//!                                                   └─▶ bus ─▶ other replicas: Relay ─▶ Hub ─▶ …
//! ```

pub mod channels;
pub mod connection;
pub mod events;
pub mod frame;
pub mod hub;
pub mod limits;
pub mod overlays;
pub mod presence;
pub mod queue;
pub mod relay;
pub mod session;
pub mod topics;
pub mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;

use std::time::Duration;

pub use connection::SocketLimits;

use self::connection::Shared;
use self::hub::Hub;
use self::presence::{Presence, PresenceTimes};
use self::queue::Queues;
use crate::bus::{AnyBus, BusNotices, ReplicaId};
use crate::domain::{Device, UserId};
use crate::presence::AnyRegistry;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry::Metrics;

/// The realtime side of one replica, as the HTTP layer reaches it.
pub struct Realtime {
    pub replica: ReplicaId,
    pub hub: Addr<Hub>,
    pub queues: Queues,
    pub presence: Addr<Presence>,
    pub overlays: Addr<overlays::Overlays>,
    pub registry: AnyRegistry,
    shared: Arc<Shared>,
    next_socket: AtomicU64,
    /// Sockets held per account and per client address, against their caps.
    sockets: Arc<limits::SocketCounts>,
}

/// Where the realtime layer keeps and finds things.
pub struct Stores {
    /// The presence registry.
    pub registry: AnyRegistry,
    /// The system of record.
    pub store: Store,
    /// Hot data shared between replicas (catalog tracks).
    pub cache: crate::cache::CacheAside,
    /// The blocked client addresses (kept in step with other replicas by the hub).
    pub blocks: crate::abuse::Blocks,
}

impl Realtime {
    /// Starts the hub and the relay on the current arbiter.
    pub fn start(
        replica: ReplicaId,
        bus: (AnyBus, BusNotices),
        stores: Stores,
        logins: crate::auth::Sessions,
        settings: &Settings,
        metrics: Metrics,
    ) -> Self {
        let Stores {
            registry,
            store,
            cache,
            blocks,
        } = stores;
        let (bus, notices) = bus;
        let linger = Duration::from_secs(settings.session_linger_secs);
        let hub = Hub::new(bus, linger, logins, metrics.clone()).start();
        relay::Relay::start(replica.clone(), hub.clone(), notices);
        hub.do_send(hub::UseBlocks(blocks.clone()));
        let queues = Queues::new(store.clone(), hub.clone(), cache, settings);
        hub.do_send(hub::UseQueues(queues.clone()));
        let times = PresenceTimes {
            ttl: Duration::from_secs(settings.presence_ttl_secs),
            leave_delay: Duration::from_millis(settings.presence_leave_delay_ms),
        };
        let presence = Presence::new(
            replica.clone(),
            registry.clone(),
            hub.clone(),
            store.clone(),
            queues.clone(),
            times,
        )
        .start();
        hub.do_send(hub::UsePresence(presence.clone()));
        let overlays =
            overlays::Overlays::new(hub.clone(), registry.clone(), queues.clone()).start();
        hub.do_send(hub::UseOverlays(overlays.clone()));
        let limits = SocketLimits {
            max_message_bytes: settings.ws_max_message_bytes,
            idle_timeout: Duration::from_secs(settings.ws_idle_timeout_secs),
            outbound_queue: settings.ws_outbound_queue,
            token_grace: Duration::from_secs(settings.ws_token_grace_secs),
            messages: settings.rate_limit_socket_messages.0,
        };
        let ingest = settings
            .rate_limit_ingest_device
            .0
            .map(|quota| (crate::ratelimit::MemoryLimiter::default(), quota));
        if let Some((limiter, _)) = ingest.clone() {
            // Only devices heard from lately stay in it.
            actix::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    limiter.sweep();
                }
            });
        }
        let shared = Arc::new(Shared {
            hub: hub.clone(),
            queues: queues.clone(),
            presence: presence.clone(),
            registry: registry.clone(),
            store,
            blocks,
            ingest: ingest.clone(),
            limits,
            metrics,
        });
        Self {
            replica,
            hub,
            queues,
            presence,
            overlays,
            registry,
            shared,
            next_socket: AtomicU64::new(1),
            sockets: limits::SocketCounts::new(
                settings.ws_max_sockets_per_user,
                settings.ws_max_sockets_per_ip,
            ),
        }
    }

    /// A fresh socket id.
    pub fn next_socket_id(&self) -> hub::SocketId {
        self.next_socket.fetch_add(1, Ordering::Relaxed)
    }

    /// A place for one more socket of `user` from `address`, unless a cap is reached.
    pub fn reserve_socket(
        &self,
        user: UserId,
        address: Option<std::net::IpAddr>,
    ) -> Result<limits::SocketSlot, limits::CapReached> {
        self.sockets.reserve(user, address)
    }

    /// Completes a socket upgrade for an authenticated `identity` speaking for `device`, and
    /// starts the socket's connection actor, which holds `slot` for its life.
    pub fn accept(
        &self,
        req: &actix_web::HttpRequest,
        body: actix_web::web::Payload,
        identity: crate::auth::Identity,
        device: Device,
        address: std::net::IpAddr,
        slot: limits::SocketSlot,
    ) -> Result<actix_web::HttpResponse, actix_web::Error> {
        let limits = &self.shared.limits;
        let (response, inbound, outbox) =
            transport::accept(req, body, limits.hard_cap(), limits.outbound_queue)?;
        let (id, shared) = (self.next_socket_id(), self.shared.clone());
        connection::Connection::create(move |ctx| {
            ctx.add_stream(inbound);
            let address = crate::abuse::address_key(address);
            connection::Connection::new(id, identity, device, address, shared, outbox, slot)
        });
        Ok(response)
    }

    /// Tells every replica (this one too) about a change to the blocked addresses.
    pub fn announce_block(&self, change: crate::abuse::BlockChange) {
        let event = match change {
            crate::abuse::BlockChange::Blocked { address, until_ms } => {
                events::ReplicaEvent::AddressBlocked { address, until_ms }
            }
            crate::abuse::BlockChange::Lifted { address } => {
                events::ReplicaEvent::AddressUnblocked { address }
            }
        };
        self.hub.do_send(hub::Announce(event));
    }

    /// Ends one login session on every replica: its tokens are refused and its sockets
    /// closed everywhere, by the bus's replica-wide channel.
    pub fn end_session(&self, user: UserId, session: &str) {
        self.hub.do_send(hub::EndSession {
            user,
            session: session.to_owned(),
        });
    }
}
