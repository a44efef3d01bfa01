//! The connection actor: one per socket. It owns the socket's Phoenix state (joined topics
//! and their join refs), answers heartbeats, enforces the size, idle and garbage limits, and
//! writes to the socket's bounded outbox. It registers with the hub in `started` and leaves
//! only in `stopped`, so every way a socket ends (client close, idle timeout, slow reader,
//! logout, protocol error) unregisters it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use serde_json::{Value, json};

use super::channels::{self, ChannelContext, Reply, Response};
use super::frame::{self, Frame};
use super::hub::{Attach, Detach, Hub, SocketId};
use super::presence::{self, Presence, Shown};
use super::queue::Queues;
use super::session::Member;
use super::topics::Topic;
use super::transport::{CloseKind, Inbound, Outbound, Outbox};
use crate::auth::Identity;
use crate::domain::Device;
use crate::presence::AnyRegistry;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Most topics one socket may have joined at once.
pub const MAX_JOINED_TOPICS: usize = 100;

/// Malformed frames tolerated per [`BAD_FRAME_WINDOW`] before the socket is closed.
const MAX_BAD_FRAMES: u32 = 10;

/// Messages refused in a row for the socket's message budget before it is closed.
pub const MAX_REFUSED: u32 = 20;

/// One socket's message budget (the socket lives on one replica, so it is counted here).
type Budget = governor::DefaultDirectRateLimiter;

/// The window over which malformed frames are counted.
const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);

/// Limits every socket of a replica shares.
#[derive(Debug, Clone)]
pub struct SocketLimits {
    /// Largest message handled; larger ones (up to the transport's hard cap) get an error reply.
    pub max_message_bytes: usize,
    /// A socket that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Frames queued for a socket before it counts as not reading and is closed.
    pub outbound_queue: usize,
    /// How long past its access token's expiry a socket may still act before it is closed.
    pub token_grace: Duration,
    /// Messages a socket may send (`None`: no limit); past it they get error replies, and
    /// [`MAX_REFUSED`] refusals in a row close the socket.
    pub messages: Option<crate::ratelimit::Quota>,
}

impl SocketLimits {
    /// The transport's hard cap: a message beyond it cannot be read at all and closes the
    /// socket (1009). Between the two limits a message is read only to answer it.
    pub fn hard_cap(&self) -> usize {
        self.max_message_bytes.saturating_mul(4)
    }
}

/// What every connection of a replica shares (one allocation per replica, not per socket).
pub struct Shared {
    pub hub: Addr<Hub>,
    pub queues: Queues,
    pub presence: Addr<Presence>,
    pub registry: AnyRegistry,
    pub store: Store,
    pub limits: SocketLimits,
    pub metrics: Metrics,
    /// The blocked client addresses: a socket from one is closed at its next message.
    pub blocks: crate::abuse::Blocks,
    /// Now-playing reports per device over sockets (`SEGUE_RATE_LIMIT_INGEST_DEVICE`),
    /// counted on this replica, where the device's sockets usually all are.
    pub ingest: Option<(crate::ratelimit::MemoryLimiter, crate::ratelimit::Quota)>,
}

/// A topic this socket has joined.
struct Joined {
    join_ref: String,
    topic: Topic,
    /// The latest revision this socket was sent for the topic; pushes at or below it are
    /// stale and dropped.
    revision: Option<i64>,
    /// While the join's reply is being prepared, pushes wait here (revision, frame), so none
    /// can overtake the reply's state.
    waiting: Option<Vec<(Option<i64>, ByteString)>>,
}

pub struct Connection {
    id: SocketId,
    identity: Identity,
    device: Device,
    /// The client's address key, as blocks are kept.
    address: String,
    shared: Arc<Shared>,
    outbox: Outbox,
    /// Joined topics by name.
    joined: HashMap<String, Joined>,
    last_heard: Instant,
    bad_frames: u32,
    bad_window_start: Instant,
    budget: Option<Budget>,
    /// Messages refused in a row for the budget.
    refused: u32,
    /// Set once the socket is being closed, so nothing more is written.
    closing: bool,
    /// This socket's place under the per-account and per-address caps, given back on drop.
    _slot: super::limits::SocketSlot,
}

impl Connection {
    pub fn new(
        id: SocketId,
        identity: Identity,
        device: Device,
        address: String,
        shared: Arc<Shared>,
        outbox: Outbox,
        slot: super::limits::SocketSlot,
    ) -> Self {
        let now = Instant::now();
        let budget = shared
            .limits
            .messages
            .map(|quota| governor::RateLimiter::direct(quota.to_governor()));
        Self {
            budget,
            refused: 0,
            address,
            id,
            identity,
            device,
            shared,
            outbox,
            joined: HashMap::new(),
            last_heard: now,
            bad_frames: 0,
            bad_window_start: now,
            closing: false,
            _slot: slot,
        }
    }

    /// Queues a frame; a full outbox means the client stopped reading, and the socket goes.
    fn send(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        if self.outbox.send(Outbound::Text(text)).is_err() {
            tracing::warn!(socket = self.id, user = %self.identity.user_id, "client not reading; closing socket");
            self.shared.metrics.ws_slow_closed.inc();
            self.closing = true;
            self.outbox.abort();
            ctx.stop();
        } else {
            self.shared.metrics.ws_frames_out.inc();
        }
    }

    /// Closes the socket with `kind`, after what is already queued.
    fn close(&mut self, kind: CloseKind, ctx: &mut Context<Self>) {
        if !self.closing {
            self.closing = true;
            self.outbox.close(kind);
        }
        ctx.stop();
    }

    /// Counts a malformed frame; too many in the window closes the socket.
    fn bad_frame(&mut self, ctx: &mut Context<Self>) {
        self.shared.metrics.ws_bad_frames.inc();
        if self.bad_window_start.elapsed() > BAD_FRAME_WINDOW {
            self.bad_window_start = Instant::now();
            self.bad_frames = 0;
        }
        self.bad_frames += 1;
        if self.bad_frames > MAX_BAD_FRAMES {
            tracing::info!(
                socket = self.id,
                "too many malformed frames; closing socket"
            );
            self.close(CloseKind::Policy, ctx);
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let too_large = text.len() > self.shared.limits.max_message_bytes;
        match frame::decode(text) {
            Ok(frame) if !too_large => self.on_frame(frame, ctx),
            Ok(frame) => {
                let reply = frame::error_reply(
                    frame.join_ref.as_deref(),
                    frame.reference.as_deref(),
                    &frame.topic,
                    "message too large",
                );
                self.send(reply, ctx);
                self.bad_frame(ctx);
            }
            Err(malformed) => {
                if let Some(reference) = malformed.reference.as_deref() {
                    let topic = malformed.topic.as_deref().unwrap_or("phoenix");
                    let reason = if too_large {
                        "message too large"
                    } else {
                        malformed.reason
                    };
                    let reply = frame::error_reply(
                        malformed.join_ref.as_deref(),
                        Some(reference),
                        topic,
                        reason,
                    );
                    self.send(reply, ctx);
                }
                self.bad_frame(ctx);
            }
        }
    }

    /// Whether the message budget allows one more; a refusal is answered, and too many in a
    /// row close the socket.
    fn within_budget(&mut self, frame: &Frame, ctx: &mut Context<Self>) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        if budget.check().is_ok() {
            self.refused = 0;
            return true;
        }
        self.refused += 1;
        self.shared
            .metrics
            .rate_limited
            .with_label_values(&["socket_messages"])
            .inc();
        if self.refused > MAX_REFUSED {
            tracing::info!(socket = self.id, "over its message budget; closing socket");
            self.close(CloseKind::RateLimited, ctx);
        } else if frame.reference.is_some() {
            let reply = frame::error_reply(
                frame.join_ref.as_deref(),
                frame.reference.as_deref(),
                &frame.topic,
                "rate limited",
            );
            self.send(reply, ctx);
        }
        false
    }

    fn on_frame(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if self.shared.blocks.until(&self.address, now_ms).is_some() {
            tracing::info!(socket = self.id, "its address is blocked; closing socket");
            return self.close(CloseKind::AddressBlocked, ctx);
        }
        if !self.within_budget(&frame, ctx) {
            return;
        }
        if frame.topic == "phoenix" && frame.event == "heartbeat" {
            self.shared.presence.do_send(presence::Heartbeat {
                user: self.identity.user_id,
                device: self.device.id.clone(),
            });
            let reply = frame::reply(None, frame.reference.as_deref(), "phoenix", true, json!({}));
            self.send(reply, ctx);
            return;
        }
        match frame.event.as_str() {
            "phx_join" => self.join(frame, ctx),
            "phx_leave" => self.leave(frame, ctx),
            _ => self.client_event(frame, ctx),
        }
    }

    fn join(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        // The join's own ref is its join_ref; clients send both.
        let join_ref = frame
            .join_ref
            .clone()
            .or_else(|| frame.reference.clone())
            .unwrap_or_default();
        let reply_error = |this: &mut Self, reason: &str, ctx: &mut Context<Self>| {
            let reply = frame::error_reply(
                Some(&join_ref),
                frame.reference.as_deref(),
                &frame.topic,
                reason,
            );
            this.send(reply, ctx);
        };
        let topic = match Topic::route(&frame.topic, &self.identity) {
            Ok(topic) => topic,
            Err(refusal) => return reply_error(self, refusal.reason(), ctx),
        };
        // Joining a joined topic again ends the old join first, as Phoenix does.
        if let Some(old) = self.joined.remove(&frame.topic) {
            self.stop_showing(&old.topic);
            let close = frame::encode(
                Some(&old.join_ref),
                Some(&old.join_ref),
                &frame.topic,
                "phx_close",
                &json!({}),
            );
            self.send(close, ctx);
        } else if self.joined.len() >= MAX_JOINED_TOPICS {
            return reply_error(self, "too many channels joined", ctx);
        }
        let reply = channels::join(&topic, &frame.payload, &self.context());
        let reference = frame.reference.clone();
        let name = frame.topic.clone();
        match reply {
            Reply::Now(response) => {
                let revision = response
                    .as_ref()
                    .ok()
                    .and_then(|r| r.get("revision"))
                    .and_then(Value::as_i64);
                let joined = response.is_ok().then(|| topic.clone());
                if joined.is_some() {
                    self.joined.insert(
                        name.clone(),
                        Joined {
                            join_ref: join_ref.clone(),
                            topic,
                            revision,
                            waiting: None,
                        },
                    );
                }
                self.finish_reply(&join_ref, reference.as_deref(), &name, response, ctx);
                if let Some(topic) = joined {
                    self.start_showing(&topic, &name, ctx);
                }
            }
            Reply::Later(future) => {
                let joined = Joined {
                    join_ref: join_ref.clone(),
                    topic,
                    revision: None,
                    waiting: Some(Vec::new()),
                };
                self.joined.insert(name.clone(), joined);
                ctx.spawn(future.into_actor(self).map(move |response, this, ctx| {
                    this.finish_join(&name, &join_ref, reference.as_deref(), response, ctx);
                }));
            }
        }
    }

    /// Sends a join's late reply, then whatever was pushed meanwhile and is newer than it.
    fn finish_join(
        &mut self,
        name: &str,
        join_ref: &str,
        reference: Option<&str>,
        response: Response,
        ctx: &mut Context<Self>,
    ) {
        let current = self.joined.get_mut(name).filter(|j| j.join_ref == join_ref);
        let Some(joined) = current else {
            // Left or joined again meanwhile: this join's reply is moot.
            return;
        };
        let waiting = joined.waiting.take().unwrap_or_default();
        if response.is_err() {
            self.joined.remove(name);
            return self.finish_reply(join_ref, reference, name, response, ctx);
        }
        joined.revision = response
            .as_ref()
            .ok()
            .and_then(|r| r.get("revision"))
            .and_then(Value::as_i64);
        self.finish_reply(join_ref, reference, name, response, ctx);
        for (revision, text) in waiting {
            self.push(name, revision, text, ctx);
        }
    }

    fn finish_reply(
        &mut self,
        join_ref: &str,
        reference: Option<&str>,
        topic: &str,
        response: Response,
        ctx: &mut Context<Self>,
    ) {
        let ok = response.is_ok();
        let body = response.unwrap_or_else(|e| e);
        let reply = frame::reply(Some(join_ref), reference, topic, ok, body);
        self.send(reply, ctx);
    }

    fn context(&self) -> ChannelContext<'_> {
        ChannelContext {
            identity: &self.identity,
            device: &self.device.id,
            hub: &self.shared.hub,
            queues: &self.shared.queues,
            presence: &self.shared.presence,
            registry: &self.shared.registry,
            store: &self.shared.store,
            ingest: self.shared.ingest.as_ref(),
        }
    }

    /// After a presence topic's join reply: the presence actor sends `presence_state`.
    fn start_showing(&self, topic: &Topic, name: &str, ctx: &mut Context<Self>) {
        let Some(shown) = shown_on(topic) else {
            return;
        };
        self.shared.presence.do_send(presence::WatchTopic {
            socket: self.id,
            user: self.identity.user_id,
            shown,
            recipient: ctx.address().recipient(),
            topic: name.into(),
        });
    }

    /// A presence topic was left (or joined again): no more diffs for the old join.
    fn stop_showing(&self, topic: &Topic) {
        let Some(shown) = shown_on(topic) else {
            return;
        };
        self.shared.presence.do_send(presence::UnwatchTopic {
            socket: self.id,
            shown,
        });
    }

    /// Writes a broadcast for `topic` if the socket joined it and it is not stale.
    fn push(
        &mut self,
        topic: &str,
        revision: Option<i64>,
        text: ByteString,
        ctx: &mut Context<Self>,
    ) {
        let Some(joined) = self.joined.get_mut(topic) else {
            return;
        };
        if let Some(waiting) = joined.waiting.as_mut() {
            if waiting.len() >= self.shared.limits.outbound_queue {
                self.shared.metrics.ws_slow_closed.inc();
                return self.close(CloseKind::Policy, ctx);
            }
            waiting.push((revision, text));
            return;
        }
        if let Some(revision) = revision {
            if joined.revision.is_some_and(|seen| seen >= revision) {
                return;
            }
            joined.revision = Some(revision);
        }
        self.send(text, ctx);
    }

    fn leave(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        let current = self.joined.get(&frame.topic).map(|j| j.join_ref.clone());
        let stale = current.is_some() && frame.join_ref.is_some() && frame.join_ref != current;
        if stale {
            return;
        }
        let reply = frame::reply(
            frame.join_ref.as_deref(),
            frame.reference.as_deref(),
            &frame.topic,
            true,
            json!({}),
        );
        self.send(reply, ctx);
        if let Some(join_ref) = current {
            if let Some(old) = self.joined.remove(&frame.topic) {
                self.stop_showing(&old.topic);
            }
            let close = frame::encode(
                Some(&join_ref),
                Some(&join_ref),
                &frame.topic,
                "phx_close",
                &json!({}),
            );
            self.send(close, ctx);
        }
    }

    fn client_event(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        let Some(joined) = self.joined.get(&frame.topic) else {
            let reply = frame::error_reply(
                frame.join_ref.as_deref(),
                frame.reference.as_deref(),
                &frame.topic,
                "unmatched topic",
            );
            return self.send(reply, ctx);
        };
        // A frame of an earlier join of this topic belongs to a channel that no longer exists.
        if frame.join_ref.as_deref() != Some(joined.join_ref.as_str()) {
            return;
        }
        let reply =
            channels::handle_in(&joined.topic, &frame.event, frame.payload, &self.context());
        let join_ref = joined.join_ref.clone();
        match reply {
            Reply::Now(response) => {
                self.finish_reply(
                    &join_ref,
                    frame.reference.as_deref(),
                    &frame.topic,
                    response,
                    ctx,
                );
            }
            Reply::Later(future) => {
                let (reference, topic) = (frame.reference, frame.topic);
                ctx.spawn(future.into_actor(self).map(move |response, this, ctx| {
                    this.finish_reply(&join_ref, reference.as_deref(), &topic, response, ctx);
                }));
            }
        }
    }
}

impl Actor for Connection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.shared.metrics.ws_open.inc();
        self.shared.hub.do_send(Attach {
            user: self.identity.user_id,
            member: Member {
                socket: self.id,
                recipient: ctx.address().recipient(),
                login_session: self.identity.session.clone(),
                device: self.device.id.clone(),
            },
        });
        self.shared.presence.do_send(presence::Connected {
            user: self.identity.user_id,
            device: self.device.clone(),
            socket: self.id,
        });
        // A socket acts no longer than its token is valid (plus the grace): then it is closed,
        // and the client reconnects with a fresh token.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let lapses = Duration::from_secs(self.identity.expires_at).saturating_sub(now);
        ctx.run_later(lapses + self.shared.limits.token_grace, |this, ctx| {
            tracing::debug!(socket = this.id, "access token lapsed; closing socket");
            this.close(CloseKind::TokenExpired, ctx);
        });
        // Checked at half the timeout, so an idle socket goes between 1 and 1.5 timeouts.
        let check = self.shared.limits.idle_timeout / 2;
        ctx.run_interval(check, |this, ctx| {
            if this.last_heard.elapsed() > this.shared.limits.idle_timeout {
                tracing::debug!(socket = this.id, "idle socket closed");
                this.close(CloseKind::GoingAway, ctx);
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.shared.metrics.ws_open.dec();
        self.shared.hub.do_send(Detach {
            user: self.identity.user_id,
            socket: self.id,
        });
        self.shared.presence.do_send(presence::Disconnected {
            user: self.identity.user_id,
            device: self.device.id.clone(),
            socket: self.id,
        });
    }
}

impl StreamHandler<Inbound> for Connection {
    fn handle(&mut self, message: Inbound, ctx: &mut Context<Self>) {
        self.last_heard = Instant::now();
        match message {
            Inbound::Text(text) => {
                self.shared.metrics.ws_frames_in.inc();
                self.on_text(&text, ctx);
            }
            Inbound::Binary => self.bad_frame(ctx),
            Inbound::Ping(bytes) => {
                if self.outbox.send(Outbound::Pong(bytes)).is_err() {
                    self.close(CloseKind::Policy, ctx);
                }
            }
            Inbound::Pong => {}
            Inbound::Close => self.close(CloseKind::Normal, ctx),
            Inbound::TooLarge => {
                self.shared.metrics.ws_bad_frames.inc();
                self.close(CloseKind::TooLarge, ctx);
            }
            Inbound::Broken => self.close(CloseKind::Policy, ctx),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The client went away.
        self.closing = true;
        ctx.stop();
    }
}

/// The presence a topic shows, if it is a presence topic.
fn shown_on(topic: &Topic) -> Option<Shown> {
    match topic {
        Topic::Devices(_) => Some(Shown::Devices),
        Topic::Friends(_) => Some(Shown::Friends),
        Topic::Echo(..) | Topic::Queue(_) => None,
    }
}

/// What a user's session sends to each of the user's sockets.
#[derive(Message)]
#[rtype(result = "()")]
pub enum ToSocket {
    /// A broadcast for `topic`, already encoded; written only if the socket joined the topic
    /// and, when it carries a revision, only if that revision is newer than the socket's.
    Push {
        topic: Arc<str>,
        text: ByteString,
        revision: Option<i64>,
    },
    /// Close the socket (e.g. its login session ended).
    Close(CloseKind),
}

impl Handler<ToSocket> for Connection {
    type Result = ();

    fn handle(&mut self, message: ToSocket, ctx: &mut Context<Self>) {
        match message {
            ToSocket::Push {
                topic,
                text,
                revision,
            } => self.push(&topic, revision, text, ctx),
            ToSocket::Close(kind) => self.close(kind, ctx),
        }
    }
}
