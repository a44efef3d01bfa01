//! A user's session on this replica: the sockets that user has here, and the one place the
//! user's events fan out to them. One per online user per replica, started and retired by the
//! [`Hub`](super::hub::Hub). It also runs the user's queue writes one at a time.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::connection::ToSocket;
use super::events::UserEvent;
use super::frame;
use super::hub::SocketId;
use super::queue::{QueueError, QueueView, Queues};
use super::transport::CloseKind;
use crate::domain::queue::{QueueOp, QueueState};
use crate::domain::{DeviceId, UserId};

/// One socket of the user.
pub struct Member {
    pub socket: SocketId,
    pub recipient: Recipient<ToSocket>,
    /// The login session (refresh family) the socket authenticated with.
    pub login_session: String,
    pub device: DeviceId,
}

pub struct UserSession {
    user: UserId,
    members: HashMap<SocketId, Member>,
    /// The replica's queue service; the session runs the user's queue writes one at a time.
    queues: Option<Queues>,
}

impl UserSession {
    pub fn new(user: UserId, queues: Option<Queues>) -> Self {
        Self {
            user,
            members: HashMap::new(),
            queues,
        }
    }
}

impl Actor for UserSession {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        tracing::debug!(user = %self.user, "session started");
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        tracing::debug!(user = %self.user, "session stopped");
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Join(pub Member);

impl Handler<Join> for UserSession {
    type Result = ();

    fn handle(&mut self, Join(member): Join, _: &mut Context<Self>) {
        self.members.insert(member.socket, member);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave(pub SocketId);

impl Handler<Leave> for UserSession {
    type Result = ();

    fn handle(&mut self, Leave(socket): Leave, _: &mut Context<Self>) {
        self.members.remove(&socket);
    }
}

/// An event for this user, from this replica or another.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub UserEvent);

impl Handler<Deliver> for UserSession {
    type Result = ();

    fn handle(&mut self, Deliver(event): Deliver, _: &mut Context<Self>) {
        match event {
            UserEvent::Push {
                topic,
                event,
                payload,
                revision,
            } => {
                // Encoded once for all the user's sockets; a broadcast carries no join_ref, so
                // the same text is right for every socket joined to the topic.
                let text = frame::encode(None, None, &topic, &event, &payload);
                let topic: Arc<str> = topic.into();
                for member in self.members.values() {
                    member.recipient.do_send(ToSocket::Push {
                        topic: topic.clone(),
                        text: text.clone(),
                        revision,
                    });
                }
            }
            UserEvent::OutputChanged { device_id, play } => {
                let topic: Arc<str> = format!("devices:{}", self.user).into();
                let payload = serde_json::json!({"device_id": device_id, "play": play});
                let text = frame::encode(None, None, &topic, "output_changed", &payload);
                for member in self.members.values() {
                    member.recipient.do_send(ToSocket::Push {
                        topic: topic.clone(),
                        text: text.clone(),
                        revision: None,
                    });
                }
            }
            UserEvent::DeviceCommand { device_id, payload } => {
                let topic: Arc<str> = format!("devices:{}", self.user).into();
                let text = frame::encode(None, None, &topic, "command", &payload);
                let targets = self
                    .members
                    .values()
                    .filter(|m| m.device.as_str() == device_id);
                for member in targets {
                    member.recipient.do_send(ToSocket::Push {
                        topic: topic.clone(),
                        text: text.clone(),
                        revision: None,
                    });
                }
            }
            // Presence views are the presence actor's; the hub hands these to it.
            UserEvent::PreferencesChanged { .. }
            | UserEvent::PresenceUpsert { .. }
            | UserEvent::PresenceRemove { .. }
            | UserEvent::FollowsChanged => {}
            UserEvent::EndSession { session } => {
                for member in self.members.values().filter(|m| m.login_session == session) {
                    member
                        .recipient
                        .do_send(ToSocket::Close(CloseKind::SessionEnded));
                }
            }
        }
    }
}

/// Closes every socket of this user here with `kind` (the replica is shutting down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll(pub CloseKind);

impl Handler<CloseAll> for UserSession {
    type Result = ();

    fn handle(&mut self, CloseAll(kind): CloseAll, _: &mut Context<Self>) {
        for member in self.members.values() {
            member.recipient.do_send(ToSocket::Close(kind));
        }
    }
}

/// A queue write for this user. Handled atomically: the next one starts only when this one
/// is stored and pushed, so a replica's writes for a user never race each other.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(QueueView, Vec<usize>), QueueError>")]
pub enum QueueCommand {
    Replace {
        expected: Option<i64>,
        incoming: QueueState,
        device: DeviceId,
    },
    Apply {
        ops: Vec<QueueOp>,
        device: DeviceId,
    },
}

impl Handler<QueueCommand> for UserSession {
    type Result = AtomicResponse<Self, Result<(QueueView, Vec<usize>), QueueError>>;

    fn handle(&mut self, command: QueueCommand, _: &mut Context<Self>) -> Self::Result {
        let (queues, user) = (self.queues.clone(), self.user);
        AtomicResponse::new(Box::pin(
            async move {
                match queues {
                    Some(queues) => queues.execute(user, command).await,
                    None => Err(QueueError::SessionGone),
                }
            }
            .into_actor(self),
        ))
    }
}

/// Retire the session (sent by the hub once the user has no sockets here).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for UserSession {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
