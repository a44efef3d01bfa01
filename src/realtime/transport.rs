//! The WebSocket transport: the only module that touches `actix_ws`.
//!
//! [`accept`] completes the upgrade and returns two halves: a stream of [`Inbound`] messages
//! for the connection actor, and an [`Outbox`] it writes [`Outbound`] messages to. The outbox
//! is a bounded queue drained by a writer task; when a client stops reading, the queue fills,
//! `Outbox::send` fails, and the connection closes instead of buffering without bound.
//! [`Outbox::abort`] drops the socket at once, even with the queue full.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::{Stream, StreamExt};
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};

/// The subprotocol a Phoenix client offers and the server echoes.
pub const SUBPROTOCOL: &str = "phoenix";

/// How long one write may wait for the client to read before the socket is dropped.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The client broke the protocol or its session ended (1008).
    Policy,
}

/// What the connection actor writes.
#[derive(Debug)]
pub enum Outbound {
    Text(ByteString),
    Pong(Bytes),
    Close(CloseKind),
}

/// The sending half of a socket.
pub struct Outbox {
    queue: mpsc::Sender<Outbound>,
    /// Tells the writer to drop the socket now. A `Notify` rather than a oneshot: dropping
    /// the outbox must let the writer finish what is queued, not abort it.
    abort: Arc<Notify>,
}

/// The outbox is full: the client is not reading.
#[derive(Debug)]
pub struct Full;

impl Outbox {
    /// Queues a message without waiting.
    pub fn send(&self, message: Outbound) -> Result<(), Full> {
        self.queue.try_send(message).map_err(|_| Full)
    }

    /// Drops the socket without flushing what is queued.
    pub fn abort(&mut self) {
        self.abort.notify_one();
    }
}

/// Completes the upgrade (echoing the `phoenix` subprotocol when offered). `max_message` caps
/// each message, continuation frames included; `queue` bounds the outbox.
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
            Err(_) => Inbound::Broken,
        });
    let (sender, receiver) = mpsc::channel(queue);
    let abort = Arc::new(Notify::new());
    actix_web::rt::spawn(write(session, receiver, abort.clone()));
    Ok((
        response,
        inbound,
        Outbox {
            queue: sender,
            abort,
        },
    ))
}

fn close_reason(kind: CloseKind) -> CloseReason {
    let code = match kind {
        CloseKind::Normal => CloseCode::Normal,
        CloseKind::GoingAway => CloseCode::Away,
        CloseKind::TooLarge => CloseCode::Size,
        CloseKind::Policy => CloseCode::Policy,
    };
    CloseReason {
        code,
        description: None,
    }
}

/// The writer task: drains the outbox into the socket, one message at a time.
async fn write(
    mut session: actix_ws::Session,
    mut queue: mpsc::Receiver<Outbound>,
    aborted: Arc<Notify>,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = aborted.notified() => return,
            message = queue.recv() => message,
        };
        let written = match message {
            Some(Outbound::Text(text)) => bounded(&aborted, session.text(text)).await,
            Some(Outbound::Pong(bytes)) => bounded(&aborted, session.pong(&bytes)).await,
            Some(Outbound::Close(kind)) => {
                let _ = tokio::time::timeout(
                    WRITE_STALL_TIMEOUT,
                    session.close(Some(close_reason(kind))),
                )
                .await;
                return;
            }
            None => {
                let _ = tokio::time::timeout(WRITE_STALL_TIMEOUT, session.close(None)).await;
                return;
            }
        };
        // A socket the client has closed, or one it has not read for the whole stall timeout,
        // is dropped; the connection actor then sees its inbound stream end.
        if !written {
            return;
        }
    }
}

/// Waits for one write, unless the socket is aborted or the client stalls it too long.
async fn bounded(
    aborted: &Notify,
    write: impl std::future::Future<Output = Result<(), actix_ws::Closed>>,
) -> bool {
    tokio::select! {
        biased;
        () = aborted.notified() => false,
        written = tokio::time::timeout(WRITE_STALL_TIMEOUT, write) => matches!(written, Ok(Ok(()))),
    }
}
