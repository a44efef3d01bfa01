//! The Redis bus: `PUBLISH` through the shared pool, `SUBSCRIBE` on a dedicated connection.
//!
//! Two background tasks per replica:
//! * the **publisher** sends queued messages in call order, pipelining whatever has queued up
//!   while the previous batch was in flight (one round trip for many messages);
//!   A batch that fails leaves a *gap*: until a notice of it reaches the replica-wide gap
//!   channel, the publisher keeps retrying that notice, and every other replica that hears it
//!   refreshes what it derived from the bus (`Missed`);
//! * the **subscriber** owns the pub/sub connection. It keeps the set of live channels, so
//!   that when the connection drops it can reconnect with backoff, subscribe them all again,
//!   and tell the replica (`Lost`, then `Restored`). A connection can also die silently (a
//!   Redis that hangs, a half-open link): when the subscription has heard nothing for
//!   [`PROBE_WHEN_IDLE`], the subscriber publishes a probe to a channel of its own, and when
//!   no echo comes within [`PROBE_TIMEOUT`] (or Redis says it reached no subscriber) it
//!   rebuilds the connection as if it had dropped. When the PUBLISH itself fails or is slow
//!   (the command pool is what is broken), the subscription connection is asked with a PING
//!   instead, so a healthy subscription is not torn down for its neighbour's fault.
//!   Every step of setting a connection up and every (un)subscribe is bounded by
//!   [`SUBSCRIBE_TIMEOUT`], so a hung Redis cannot wedge the subscriber either.
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
use crate::clock::jittered;
use crate::domain::UserId;
use crate::redis::RedisPool;

/// Most messages sent in one pipelined round trip.
const MAX_PUBLISH_BATCH: usize = 512;

/// First wait before reconnecting the subscriber; doubled after each failure.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait between reconnection attempts. Short, so the bus is back within about a
/// second of Redis (a subscriber is one connection per replica: retrying often costs little).
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long the subscription may hear nothing before the subscriber checks it with a probe.
pub const PROBE_WHEN_IDLE: Duration = Duration::from_secs(1);

/// How long the subscriber waits for its probe's echo before it rebuilds the connection. A
/// silently dead subscription is therefore noticed at most `PROBE_WHEN_IDLE + PROBE_TIMEOUT`
/// (2 s) after it last heard anything.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the probe's PUBLISH may take: half the echo's deadline. When it fails or takes
/// longer the subscription is asked directly (a PING on it, within the rest of the deadline),
/// so the bound above holds whatever the command side does.
const PROBE_PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// Bound on connecting the subscriber and on each SUBSCRIBE or UNSUBSCRIBE being confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the publisher retries the notice of a gap until it goes through.
const GAP_RETRY: Duration = Duration::from_millis(250);

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

/// Channel names: `<ns>:user:<id>`, `<ns>:replicas` for the replica-wide channel,
/// `<ns>:gaps` for notices of failed publishes, and `<ns>:probe:<replica>` for one replica's
/// liveness probes.
#[derive(Clone)]
struct Channels {
    prefix: String,
    replicas: String,
    gaps: String,
    probe: String,
}

impl Channels {
    fn new(namespace: &str, replica: &ReplicaId) -> Self {
        Self {
            prefix: format!("{namespace}:user:"),
            replicas: format!("{namespace}:replicas"),
            gaps: format!("{namespace}:gaps"),
            probe: format!("{namespace}:probe:{replica}"),
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
        let channels = Channels::new(namespace, &replica);
        let (publish, publish_queue) = mpsc::unbounded_channel();
        let (control, control_queue) = mpsc::unbounded_channel();
        let (notify, notices) = mpsc::unbounded_channel();
        tokio::spawn(run_publisher(
            pool.clone(),
            channels.clone(),
            replica.clone(),
            publish_queue,
        ));
        tokio::spawn(run_subscriber(Subscriber {
            client,
            pool,
            channels,
            replica,
            control: control_queue,
            notify,
            live: HashSet::new(),
            lost: false,
            probes_sent: 0,
        }));
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
    // Whether some batch failed and the other replicas have not been told yet.
    let mut gap = false;
    loop {
        if gap {
            tokio::select! {
                biased;
                received = queue.recv_many(&mut batch, MAX_PUBLISH_BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                () = tokio::time::sleep(GAP_RETRY) => {}
            }
        } else if queue.recv_many(&mut batch, MAX_PUBLISH_BATCH).await == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        if gap {
            // First, so the others refresh no earlier than what this batch carries.
            pipe.cmd("PUBLISH")
                .arg(&channels.gaps)
                .arg(encode(&replica, b""))
                .ignore();
        }
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
        match &result {
            Ok(()) if gap => {
                gap = false;
                tracing::info!("bus publishing is back; the other replicas were told of the gap");
            }
            Ok(()) => {}
            Err(error) => {
                if !gap {
                    tracing::warn!(%error, messages = batch.len(), "bus publish failed");
                }
                gap = true;
            }
        }
        for message in batch.drain(..) {
            let _ = message.done.send(result.clone());
        }
    }
}

/// State of the subscriber between connections.
struct Subscriber {
    client: redis::Client,
    /// For publishing the liveness probe.
    pool: RedisPool,
    channels: Channels,
    replica: ReplicaId,
    control: mpsc::UnboundedReceiver<Control>,
    notify: mpsc::UnboundedSender<BusNotice>,
    /// Channels that should be subscribed, whether or not the connection is up.
    live: HashSet<UserId>,
    /// Whether the replica has been told the bus was lost and not yet that it is back.
    lost: bool,
    /// Probes published so far; each carries its number.
    probes_sent: u64,
}

async fn run_subscriber(mut subscriber: Subscriber) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        match subscriber.connected().await {
            Ended::Shutdown => return,
            Ended::Served => backoff = RECONNECT_BACKOFF_MIN,
            // A connection found dead keeps the backoff growing: should the probe misjudge a
            // live one, the rebuilds at least slow down.
            Ended::Failed | Ended::Silent => {}
        }
        subscriber.mark_lost();
        if !subscriber.wait_offline(jittered(backoff)).await {
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
    /// It was up, then found silently dead by the probe.
    Silent,
    /// It could not be set up.
    Failed,
}

impl Subscriber {
    /// Connects, resubscribes every live channel, then serves until the connection drops or
    /// is found silently dead.
    async fn connected(&mut self) -> Ended {
        let pubsub =
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "bus subscriber could not connect");
                    return Ended::Failed;
                }
                Err(_) => {
                    tracing::debug!("bus subscriber timed out connecting");
                    return Ended::Failed;
                }
            };
        let (mut sink, mut stream) = pubsub.split();
        let names: Vec<String> = [
            self.channels.replicas.clone(),
            self.channels.gaps.clone(),
            self.channels.probe.clone(),
        ]
        .into_iter()
        .chain(self.live.iter().map(|u| self.channels.name(*u)))
        .collect();
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(names)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "bus resubscribe failed");
                return Ended::Failed;
            }
            Err(_) => {
                tracing::warn!("bus resubscribe timed out");
                return Ended::Failed;
            }
        }
        if self.lost {
            self.lost = false;
            tracing::info!(channels = self.live.len(), "bus connection restored");
            let _ = self.notify.send(BusNotice::Restored);
        }
        let mut last_heard = tokio::time::Instant::now();
        // The deadline of the probe in flight, if one is, and what its PUBLISH said.
        let mut awaiting_echo: Option<tokio::time::Instant> = None;
        let mut published: Option<oneshot::Receiver<Option<i64>>> = None;
        loop {
            let wake = awaiting_echo.unwrap_or(last_heard + PROBE_WHEN_IDLE);
            tokio::select! {
                // Messages first: an echo that arrived while a (un)subscribe was being
                // confirmed must count before the probe's deadline does.
                biased;
                message = stream.next() => {
                    let Some(message) = message else { return Ended::Served };
                    // Anything heard proves the subscription alive, the echo included.
                    last_heard = tokio::time::Instant::now();
                    awaiting_echo = None;
                    published = None;
                    self.forward(&message);
                }
                request = self.control.recv() => {
                    let Some(request) = request else { return Ended::Shutdown };
                    let (user, subscribe, done) = match request {
                        Control::Subscribe(user, done) => (user, true, done),
                        Control::Unsubscribe(user, done) => (user, false, done),
                    };
                    let channel = self.channels.name(user);
                    let confirmed = if subscribe {
                        self.live.insert(user);
                        tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(channel)).await
                    } else {
                        self.live.remove(&user);
                        tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(channel)).await
                    };
                    let result = match confirmed {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(error)) => Err(SubscribeError::Unavailable(error.to_string())),
                        Err(_) => Err(SubscribeError::Unavailable("Redis did not confirm in time".into())),
                    };
                    let ok = result.is_ok();
                    let _ = done.send(result);
                    if !ok {
                        return Ended::Served;
                    }
                }
                receivers = async {
                    match published.as_mut() {
                        Some(answer) => answer.await,
                        None => std::future::pending().await,
                    }
                }, if published.is_some() => {
                    published = None;
                    match receivers {
                        // Redis delivered the probe to nobody: it has lost this subscription.
                        Ok(Some(0)) => {
                            tracing::warn!("Redis holds no subscription of this replica's; rebuilding it");
                            return Ended::Silent;
                        }
                        // Delivered: the echo is on its way (or the deadline says otherwise).
                        Ok(Some(_)) => {}
                        // The command side failed, which says nothing of this connection: ask
                        // the subscription connection itself, within what is left of the echo's
                        // deadline (the PUBLISH gave up after at most half of it, so at least
                        // that much is left).
                        Ok(None) | Err(_) => {
                            let left = awaiting_echo
                                .map_or(PROBE_TIMEOUT, |d| d.saturating_duration_since(tokio::time::Instant::now()))
                                .max(PROBE_PUBLISH_TIMEOUT);
                            match tokio::time::timeout(left, sink.ping::<redis::Value>()).await {
                                Ok(Ok(_)) => {
                                    last_heard = tokio::time::Instant::now();
                                    awaiting_echo = None;
                                }
                                _ => {
                                    tracing::warn!("bus subscription does not answer PING; rebuilding it");
                                    return Ended::Silent;
                                }
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if awaiting_echo.is_some() {
                        tracing::warn!(
                            silent_for_ms = last_heard.elapsed().as_millis() as u64,
                            "bus subscription heard nothing, not even its own probe; rebuilding it"
                        );
                        return Ended::Silent;
                    }
                    awaiting_echo = Some(tokio::time::Instant::now() + PROBE_TIMEOUT);
                    published = Some(self.send_probe());
                }
            }
        }
    }

    /// Publishes a probe on this replica's own channel through the command pool. The answer
    /// is how many subscribers Redis delivered it to (`None`: the PUBLISH failed, or took more
    /// than [`PROBE_PUBLISH_TIMEOUT`]); the echo itself arrives on the subscription. The answer
    /// always comes before the echo's deadline, so that a slow command side (a checkout waiting
    /// on a dead pooled connection) is told apart from a dead subscription.
    fn send_probe(&mut self) -> oneshot::Receiver<Option<i64>> {
        self.probes_sent += 1;
        let (pool, channel) = (self.pool.clone(), self.channels.probe.clone());
        let body = encode(&self.replica, self.probes_sent.to_string().as_bytes());
        let (answer, answered) = oneshot::channel();
        tokio::spawn(async move {
            let publish = async {
                let mut conn = pool.get().await.ok()?;
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(body)
                    .query_async::<i64>(&mut *conn)
                    .await
                    .ok()
            };
            let receivers = tokio::time::timeout(PROBE_PUBLISH_TIMEOUT, publish)
                .await
                .ok()
                .flatten();
            let _ = answer.send(receivers);
        });
        answered
    }

    /// Hands a heard message to the replica.
    fn forward(&self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        if channel == self.channels.probe {
            return;
        }
        let Some((origin, body)) = decode(message.get_payload_bytes()) else {
            tracing::warn!(channel, "unreadable bus message dropped");
            return;
        };
        let notice = if channel == self.channels.replicas {
            BusNotice::Broadcast { origin, body }
        } else if channel == self.channels.gaps {
            BusNotice::Missed { origin }
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
        let channels = Channels::new("segue", &ReplicaId("r1".into()));
        assert_eq!(channels.of(Target::Replicas), "segue:replicas");
        assert_eq!(channels.probe, "segue:probe:r1");
        assert_eq!(channels.name(UserId(42)), "segue:user:42");
        assert_eq!(channels.user("segue:user:42"), Some(UserId(42)));
        assert_eq!(channels.user("other:user:42"), None);
        assert_eq!(channels.user("segue:user:x"), None);
    }
}
