//! The WebSocket transport: the only module that touches `actix_ws`.
//!
//! [`accept`] completes the upgrade and returns two halves: a stream of [`Inbound`] messages
//! for the connection actor, and an [`Outbox`] it writes [`Outbound`] messages to. The outbox
//! is bounded: when a client stops reading it fills, `Outbox::send` fails, and the connection
//! closes instead of buffering without bound. [`Outbox::abort`] drops the socket at once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{FutureExt, SinkExt, Stream, StreamExt};
use tokio::sync::Notify;

use crate::tcp::AbortHandle;

/// The subprotocol a Phoenix client offers and the server echoes.
pub const SUBPROTOCOL: &str = "phoenix";

/// How long one write may wait for the client to read before the socket is dropped.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a socket the server closed may take to finish the closing handshake before its
/// connection is aborted.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What the client sent, as the connection actor sees it.
#[derive(Debug)]
pub enum Inbound {
    Text(ByteString),
    /// Phoenix's binary frames are not spoken here.
    Binary,
    Ping(Bytes),
    Pong,
    Close,
    /// A message over the transport's hard size cap; the stream cannot continue after it.
    TooLarge,
    /// A protocol error; the stream cannot continue after it.
    Broken,
}

/// Why the server closes a socket; each maps to a WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Orderly close (1000).
    Normal,
    /// Nothing heard for too long, or the server is going away (1001).
    GoingAway,
    /// A message too large to read (1009).
    TooLarge,
    /// The client broke the protocol (1008).
    Policy,
    /// The socket's login session ended: logout, or reuse of a spent refresh token (1008,
    /// reason `session ended`).
    SessionEnded,
    /// The socket's access token lapsed (1008, reason `token expired`): reconnect with a
    /// fresh one.
    TokenExpired,
    /// The socket went on sending over its message budget (1008, reason `rate limited`).
    RateLimited,
    /// The socket's client address was blocked (1008, reason `address blocked`).
    AddressBlocked,
    /// This replica is shutting down (1012, service restart): reconnect, to another replica.
    Restarting,
}

/// What the connection actor writes.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(ByteString),
    Pong(Bytes),
    Close(CloseKind),
}

impl Outbound {
    fn into_message(self) -> actix_ws::Message {
        match self {
            Self::Text(text) => actix_ws::Message::Text(text),
            Self::Pong(bytes) => actix_ws::Message::Pong(bytes),
            Self::Close(kind) => actix_ws::Message::Close(Some(close_reason(kind))),
        }
    }
}

/// The sending half of a socket.
///
/// Frames go straight into the socket's send channel when it has room (the usual case: no
/// task, no extra queue). When it is full, they wait in a queue of at most `limit` frames
/// that a flush task drains in order; a frame that finds that queue full means the client
/// has stopped reading.
pub struct Outbox {
    /// `None` once the socket is closed or aborted.
    session: Option<actix_ws::Session>,
    /// Ends the TCP connection under the socket at once (absent when the connection was not
    /// accepted by this server's listener, as in unit tests of the layers above).
    connection: Option<AbortHandle>,
    backlog: Rc<RefCell<Backlog>>,
    limit: usize,
}

/// Frames waiting for room in the socket's send channel.
#[derive(Default)]
struct Backlog {
    frames: VecDeque<Outbound>,
    /// A flush task is draining `frames`; new frames must queue behind it to keep order.
    flushing: bool,
    /// The flush task gave up (client gone, or stalled too long).
    dead: bool,
    /// Wakes the flush task to drop the socket at once.
    abort: Rc<Notify>,
}

/// The outbox cannot take the frame: the client is not reading (or is gone).
#[derive(Debug)]
pub struct Full;

impl Outbox {
    /// Queues a frame without waiting.
    pub fn send(&mut self, frame: Outbound) -> Result<(), Full> {
        let session = self.session.as_mut().ok_or(Full)?;
        {
            let mut backlog = self.backlog.borrow_mut();
            if backlog.dead {
                return Err(Full);
            }
            if backlog.flushing {
                if backlog.frames.len() >= self.limit {
                    return Err(Full);
                }
                backlog.frames.push_back(frame);
                return Ok(());
            }
        }
        match session.send(frame.clone().into_message()).now_or_never() {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(Full),
            None => {
                let mut backlog = self.backlog.borrow_mut();
                backlog.frames.push_back(frame);
                backlog.flushing = true;
                let abort = backlog.abort.clone();
                actix_web::rt::spawn(flush(
                    session.clone(),
                    self.backlog.clone(),
                    abort,
                    self.connection.clone(),
                ));
                Ok(())
            }
        }
    }

    /// Sends a close frame after what is queued (when it fits), then lets the socket end; a
    /// client that has not finished the closing handshake within `CLOSE_LINGER` (2 s) (it may
    /// not be reading at all) has its connection aborted.
    pub fn close(&mut self, kind: CloseKind) {
        if self.send(Outbound::Close(kind)).is_err() {
            return self.abort();
        }
        // Dropping this handle ends the socket once the close frame is out (the flush task,
        // if any, holds its own handle until then).
        self.session = None;
        if let Some(connection) = self.connection.clone() {
            actix_web::rt::spawn(async move {
                tokio::time::sleep(CLOSE_LINGER).await;
                connection.abort();
            });
        }
    }

    /// Drops the socket without flushing what is queued, and its TCP connection with it.
    pub fn abort(&mut self) {
        let backlog = self.backlog.borrow();
        backlog.abort.notify_one();
        drop(backlog);
        self.session = None;
        if let Some(connection) = &self.connection {
            connection.abort();
        }
    }
}

/// Completes the upgrade (echoing the `phoenix` subprotocol when offered). `max_message` caps
/// each message, continuation frames included; `queue` bounds the backlog.
pub fn accept(
    req: &HttpRequest,
    body: web::Payload,
    max_message: usize,
    queue: usize,
) -> Result<(HttpResponse, impl Stream<Item = Inbound> + 'static, Outbox), actix_web::Error> {
    let (response, session, messages) = actix_ws::handle_with_protocols(req, body, &[SUBPROTOCOL])?;
    let inbound = messages
        .max_frame_size(max_message)
        .aggregate_continuations()
        .max_continuation_size(max_message)
        .map(|item| match item {
            Ok(AggregatedMessage::Text(text)) => Inbound::Text(text),
            Ok(AggregatedMessage::Binary(_)) => Inbound::Binary,
            Ok(AggregatedMessage::Ping(bytes)) => Inbound::Ping(bytes),
            Ok(AggregatedMessage::Pong(_)) => Inbound::Pong,
            Ok(AggregatedMessage::Close(_)) => Inbound::Close,
            Err(ProtocolError::Overflow) => Inbound::TooLarge,
            // actix-ws reports a fragmented message over `max_continuation_size` only as an
            // I/O error with this text; it is the same "too large" as a single frame's.
            Err(ProtocolError::Io(e)) if e.to_string().contains("maximum continuation size") => {
                Inbound::TooLarge
            }
            Err(_) => Inbound::Broken,
        });
    let outbox = Outbox {
        session: Some(session),
        connection: req.conn_data::<AbortHandle>().cloned(),
        backlog: Rc::default(),
        limit: queue,
    };
    Ok((response, inbound, outbox))
}

fn close_reason(kind: CloseKind) -> CloseReason {
    let (code, description) = match kind {
        CloseKind::Normal => (CloseCode::Normal, None),
        CloseKind::GoingAway => (CloseCode::Away, None),
        CloseKind::TooLarge => (CloseCode::Size, None),
        CloseKind::Policy => (CloseCode::Policy, None),
        CloseKind::SessionEnded => (CloseCode::Policy, Some("session ended")),
        CloseKind::TokenExpired => (CloseCode::Policy, Some("token expired")),
        CloseKind::RateLimited => (CloseCode::Policy, Some("rate limited")),
        CloseKind::AddressBlocked => (CloseCode::Policy, Some("address blocked")),
        CloseKind::Restarting => (CloseCode::Restart, Some("service restart")),
    };
    CloseReason {
        code,
        description: description.map(str::to_owned),
    }
}

/// The flush task: drains the backlog into the socket in order, then ends. A client that
/// reads nothing for the whole stall timeout, or an abort, drops the socket.
async fn flush(
    mut session: actix_ws::Session,
    backlog: Rc<RefCell<Backlog>>,
    abort: Rc<Notify>,
    connection: Option<AbortHandle>,
) {
    loop {
        let next = {
            let mut backlog = backlog.borrow_mut();
            match backlog.frames.pop_front() {
                Some(frame) => frame,
                None => {
                    backlog.flushing = false;
                    return;
                }
            }
        };
        let sent = tokio::select! {
            biased;
            () = abort.notified() => false,
            sent = tokio::time::timeout(WRITE_STALL_TIMEOUT, session.send(next.into_message())) => {
                matches!(sent, Ok(Ok(())))
            }
        };
        if !sent {
            let mut backlog = backlog.borrow_mut();
            backlog.dead = true;
            backlog.frames.clear();
            if let Some(connection) = &connection {
                connection.abort();
            }
            return;
        }
    }
}
