//! The Redis bus: `PUBLISH` through the shared pool, `SUBSCRIBE` on a dedicated connection.
//!
//! Two background tasks per replica:
//! * the **publisher** sends queued messages in call order, pipelining whatever has queued up
//!   while the previous batch was in flight (one round trip for many messages);
//! * the **subscriber** owns the pub/sub connection. It keeps the set of live channels, so
//!   that when the connection drops it can reconnect with backoff, subscribe them all again,
//!   and tell the replica (`Lost`, then `Restored`).
//!
//! Wire format of a message: the publishing replica's id, a newline, the opaque body.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{
    Bus, BusMessage, BusNotice, BusNotices, PublishError, Published, ReplicaId, SubscribeError,
};
use crate::domain::UserId;
use crate::redis::RedisPool;

/// Most messages sent in one pipelined round trip.
const MAX_PUBLISH_BATCH: usize = 512;

/// First wait before reconnecting the subscriber; doubled after each failure.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait between reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where a message goes.
#[derive(Clone, Copy)]
enum Target {
    User(UserId),
    Replicas,
}

/// A message waiting for the publisher.
struct Outgoing {
    target: Target,
    body: Bytes,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// A request for the subscriber.
enum Control {
    Subscribe(UserId, oneshot::Sender<Result<(), SubscribeError>>),
    Unsubscribe(UserId, oneshot::Sender<Result<(), SubscribeError>>),
}

/// One replica's handle on the Redis bus; cheap to clone.
#[derive(Clone)]
pub struct RedisBus {
    publish: mpsc::UnboundedSender<Outgoing>,
    control: mpsc::UnboundedSender<Control>,
}

/// Channel names: `<ns>:user:<id>`, and `<ns>:replicas` for the replica-wide channel.
#[derive(Clone)]
struct Channels {
    prefix: String,
    replicas: String,
}

impl Channels {
    fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{namespace}:user:"),
            replicas: format!("{namespace}:replicas"),
        }
    }

    fn name(&self, user: UserId) -> String {
        format!("{}{}", self.prefix, user.0)
    }

    fn of(&self, target: Target) -> String {
        match target {
            Target::User(user) => self.name(user),
            Target::Replicas => self.replicas.clone(),
        }
    }

    fn user(&self, channel: &str) -> Option<UserId> {
        channel.strip_prefix(&self.prefix)?.parse().ok().map(UserId)
    }
}

impl RedisBus {
    /// Starts the publisher and subscriber tasks on the current runtime.
    pub fn start(
        client: redis::Client,
        pool: RedisPool,
        namespace: &str,
        replica: ReplicaId,
    ) -> (Self, BusNotices) {
        let channels = Channels::new(namespace);
        let (publish, publish_queue) = mpsc::unbounded_channel();
        let (control, control_queue) = mpsc::unbounded_channel();
        let (notify, notices) = mpsc::unbounded_channel();
        tokio::spawn(run_publisher(
            pool,
            channels.clone(),
            replica.clone(),
            publish_queue,
        ));
        tokio::spawn(run_subscriber(client, channels, control_queue, notify));
        (Self { publish, control }, notices)
    }

    async fn control(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), SubscribeError>>) -> Control,
    ) -> Result<(), SubscribeError> {
        let (done, result) = oneshot::channel();
        self.control
            .send(make(done))
            .map_err(|_| SubscribeError::Closed)?;
        result.await.unwrap_or(Err(SubscribeError::Closed))
    }
}

impl RedisBus {
    fn send(&self, target: Target, body: Bytes) -> Published {
        let (done, result) = oneshot::channel();
        match self.publish.send(Outgoing { target, body, done }) {
            Ok(()) => Published::pending(result),
            Err(_) => Published::ready(Err(PublishError::Closed)),
        }
    }
}

impl Bus for RedisBus {
    fn publish(&self, user: UserId, body: Bytes) -> Published {
        self.send(Target::User(user), body)
    }

    fn broadcast(&self, body: Bytes) -> Published {
        self.send(Target::Replicas, body)
    }

    async fn subscribe(&self, user: UserId) -> Result<(), SubscribeError> {
        self.control(|done| Control::Subscribe(user, done)).await
    }

    async fn unsubscribe(&self, user: UserId) -> Result<(), SubscribeError> {
        self.control(|done| Control::Unsubscribe(user, done)).await
    }
}

/// Prefixes `body` with the publishing replica's id.
fn encode(origin: &ReplicaId, body: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(origin.as_str().len() + 1 + body.len());
    wire.extend_from_slice(origin.as_str().as_bytes());
    wire.push(b'\n');
    wire.extend_from_slice(body);
    wire
}

/// Splits a wire message into origin and body.
fn decode(wire: &[u8]) -> Option<(ReplicaId, Bytes)> {
    let split = wire.iter().position(|&b| b == b'\n')?;
    let (origin, rest) = wire.split_at(split);
    let origin = std::str::from_utf8(origin).ok()?;
    Some((
        ReplicaId(origin.into()),
        Bytes::copy_from_slice(rest.get(1..)?),
    ))
}

async fn run_publisher(
    pool: RedisPool,
    channels: Channels,
    replica: ReplicaId,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut batch = Vec::with_capacity(MAX_PUBLISH_BATCH);
    while queue.recv_many(&mut batch, MAX_PUBLISH_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for message in &batch {
            pipe.cmd("PUBLISH")
                .arg(channels.of(message.target))
                .arg(encode(&replica, &message.body))
                .ignore();
        }
        let result = match pool.get().await {
            Ok(mut conn) => pipe
                .query_async::<()>(&mut *conn)
                .await
                .map_err(|e| PublishError::Unavailable(e.to_string())),
            Err(e) => Err(PublishError::Unavailable(e.to_string())),
        };
        if let Err(error) = &result {
            tracing::warn!(%error, messages = batch.len(), "bus publish failed");
        }
        for message in batch.drain(..) {
            let _ = message.done.send(result.clone());
        }
    }
}

/// State of the subscriber between connections.
struct Subscriber {
    client: redis::Client,
    channels: Channels,
    control: mpsc::UnboundedReceiver<Control>,
    notify: mpsc::UnboundedSender<BusNotice>,
    /// Channels that should be subscribed, whether or not the connection is up.
    live: HashSet<UserId>,
    /// Whether the replica has been told the bus was lost and not yet that it is back.
    lost: bool,
}

async fn run_subscriber(
    client: redis::Client,
    channels: Channels,
    control: mpsc::UnboundedReceiver<Control>,
    notify: mpsc::UnboundedSender<BusNotice>,
) {
    let mut subscriber = Subscriber {
        client,
        channels,
        control,
        notify,
        live: HashSet::new(),
        lost: false,
    };
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        match subscriber.connected().await {
            Ended::Shutdown => return,
            Ended::Served => backoff = RECONNECT_BACKOFF_MIN,
            Ended::Failed => {}
        }
        subscriber.mark_lost();
        if !subscriber.wait_offline(backoff).await {
            return;
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

/// How a connection of the subscriber ended.
enum Ended {
    /// The bus handle was dropped: stop for good.
    Shutdown,
    /// It was up and serving, then dropped.
    Served,
    /// It could not be set up.
    Failed,
}

impl Subscriber {
    /// Connects, resubscribes every live channel, then serves until the connection drops.
    async fn connected(&mut self) -> Ended {
        let pubsub = match self.client.get_async_pubsub().await {
            Ok(pubsub) => pubsub,
            Err(error) => {
                tracing::debug!(%error, "bus subscriber could not connect");
                return Ended::Failed;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let names: Vec<String> = std::iter::once(self.channels.replicas.clone())
            .chain(self.live.iter().map(|u| self.channels.name(*u)))
            .collect();
        if let Err(error) = sink.subscribe(names).await {
            tracing::warn!(%error, "bus resubscribe failed");
            return Ended::Failed;
        }
        if self.lost {
            self.lost = false;
            tracing::info!(channels = self.live.len(), "bus connection restored");
            let _ = self.notify.send(BusNotice::Restored);
        }
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { return Ended::Served };
                    self.forward(&message);
                }
                request = self.control.recv() => {
                    let Some(request) = request else { return Ended::Shutdown };
                    let ok = match request {
                        Control::Subscribe(user, done) => {
                            self.live.insert(user);
                            let result = sink.subscribe(self.channels.name(user)).await;
                            let ok = result.is_ok();
                            let _ = done.send(result.map_err(|e| SubscribeError::Unavailable(e.to_string())));
                            ok
                        }
                        Control::Unsubscribe(user, done) => {
                            self.live.remove(&user);
                            let result = sink.unsubscribe(self.channels.name(user)).await;
                            let ok = result.is_ok();
                            let _ = done.send(result.map_err(|e| SubscribeError::Unavailable(e.to_string())));
                            ok
                        }
                    };
                    if !ok {
                        return Ended::Served;
                    }
                }
            }
        }
    }

    /// Hands a heard message to the replica.
    fn forward(&self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        let Some((origin, body)) = decode(message.get_payload_bytes()) else {
            tracing::warn!(channel, "unreadable bus message dropped");
            return;
        };
        let notice = if channel == self.channels.replicas {
            BusNotice::Broadcast { origin, body }
        } else if let Some(user) = self.channels.user(channel) {
            BusNotice::Message(BusMessage { user, origin, body })
        } else {
            return;
        };
        let _ = self.notify.send(notice);
    }

    fn mark_lost(&mut self) {
        if !self.lost {
            self.lost = true;
            tracing::warn!("bus connection lost; reconnecting");
            let _ = self.notify.send(BusNotice::Lost);
        }
    }

    /// Waits `delay` while answering requests: the set of live channels is kept up to date,
    /// and callers learn the bus is away. False when the bus handle was dropped.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                request = self.control.recv() => {
                    let unavailable = || Err(SubscribeError::Unavailable("reconnecting".into()));
                    match request {
                        None => return false,
                        Some(Control::Subscribe(user, done)) => {
                            self.live.insert(user);
                            let _ = done.send(unavailable());
                        }
                        Some(Control::Unsubscribe(user, done)) => {
                            // Nothing to undo on a connection that is gone.
                            self.live.remove(&user);
                            let _ = done.send(Ok(()));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_messages_round_trip() {
        let origin = ReplicaId::generate();
        let (decoded_origin, body) = decode(&encode(&origin, b"{\"a\":\n1}")).unwrap();
        assert_eq!(decoded_origin, origin);
        assert_eq!(&body[..], b"{\"a\":\n1}");
    }

    #[test]
    fn a_message_without_an_origin_is_unreadable() {
        assert!(decode(b"no newline here").is_none());
    }

    #[test]
    fn channel_names_map_back_to_users() {
        let channels = Channels::new("segue");
        assert_eq!(channels.of(Target::Replicas), "segue:replicas");
        assert_eq!(channels.name(UserId(42)), "segue:user:42");
        assert_eq!(channels.user("segue:user:42"), Some(UserId(42)));
        assert_eq!(channels.user("other:user:42"), None);
        assert_eq!(channels.user("segue:user:x"), None);
    }
}
