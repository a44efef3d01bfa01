//! The bus between replicas: per-user channels carrying opaque messages.
//!
//! A port with two real implementations, chosen by `REDIS_URL`:
//! [`MemoryBus`] (in-process; the embedded default, and a way to run several replicas in one
//! process) and [`RedisBus`] (Redis pub/sub, publishing through the pool and subscribing on a
//! dedicated connection that reconnects by itself).
//!
//! A replica subscribes to `user:{id}` while that user has a session on it, and hears the one
//! replica-wide channel (`replicas`, for news every replica needs, such as an ended login)
//! for its whole life. Everything a
//! subscribed replica hears arrives on the [`BusNotice`] stream handed out at construction,
//! tagged with the replica that published it, so the receiver can drop its own messages
//! (it delivered those locally already). The bus knows nothing of what messages mean.

mod memory;
mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use memory::{MemoryBus, MemoryNetwork};
pub use redis::RedisBus;

use crate::domain::UserId;

/// Identifies one running hub; carried by every message it publishes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaId(Arc<str>);

impl ReplicaId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(crate::auth::random_token(9).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message heard on a user's channel.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub user: UserId,
    /// The replica that published it.
    pub origin: ReplicaId,
    /// Opaque to the bus.
    pub body: Bytes,
}

/// What the bus tells its replica.
#[derive(Debug, Clone)]
pub enum BusNotice {
    Message(BusMessage),
    /// A message heard on the replica-wide channel.
    Broadcast {
        /// The replica that published it.
        origin: ReplicaId,
        body: Bytes,
    },
    /// The connection to the bus was lost: messages published meanwhile are missed.
    Lost,
    /// The connection is back and every live channel is subscribed again; anything derived
    /// from bus messages should be refreshed.
    Restored,
    /// Another replica failed to publish some messages (its link to the bus was down while
    /// this replica's was not): anything derived from bus messages should be refreshed.
    Missed {
        /// The replica whose messages were lost.
        origin: ReplicaId,
    },
}

/// The stream of notices a bus hands to its replica's relay.
pub type BusNotices = mpsc::UnboundedReceiver<BusNotice>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("the bus is unreachable: {0}")]
    Unavailable(String),
    #[error("the bus is shutting down")]
    Closed,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SubscribeError {
    #[error("the bus is unreachable; the channel will be subscribed when it is back: {0}")]
    Unavailable(String),
    #[error("the bus is shutting down")]
    Closed,
}

/// The port. Publishing enqueues at once, in call order, and returns a [`Published`] that
/// resolves when the message has left (awaiting it is optional).
pub trait Bus: Clone + Send + Sync + 'static {
    /// Publishes `body` on `user`'s channel.
    fn publish(&self, user: UserId, body: Bytes) -> Published;
    /// Publishes `body` on the replica-wide channel, which every replica hears.
    fn broadcast(&self, body: Bytes) -> Published;

    /// Starts hearing `user`'s channel. Resolves once the subscription is live; on error the
    /// channel is still remembered and subscribed when the bus is back.
    fn subscribe(&self, user: UserId) -> impl Future<Output = Result<(), SubscribeError>> + Send;

    /// Stops hearing `user`'s channel.
    fn unsubscribe(&self, user: UserId) -> impl Future<Output = Result<(), SubscribeError>> + Send;
}

/// The outcome of one publish, available once it has been sent (or failed).
pub struct Published(PublishedInner);

enum PublishedInner {
    Ready(Option<Result<(), PublishError>>),
    Pending(oneshot::Receiver<Result<(), PublishError>>),
}

impl Published {
    fn ready(result: Result<(), PublishError>) -> Self {
        Self(PublishedInner::Ready(Some(result)))
    }

    fn pending(receiver: oneshot::Receiver<Result<(), PublishError>>) -> Self {
        Self(PublishedInner::Pending(receiver))
    }
}

impl Future for Published {
    type Output = Result<(), PublishError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PublishedInner::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(PublishError::Closed)))
            }
            PublishedInner::Pending(receiver) => Pin::new(receiver)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(PublishError::Closed))),
        }
    }
}

/// Whichever bus this replica was configured with.
#[derive(Clone)]
pub enum AnyBus {
    Memory(MemoryBus),
    Redis(RedisBus),
}

impl AnyBus {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

impl Bus for AnyBus {
    fn publish(&self, user: UserId, body: Bytes) -> Published {
        match self {
            Self::Memory(bus) => bus.publish(user, body),
            Self::Redis(bus) => bus.publish(user, body),
        }
    }

    fn broadcast(&self, body: Bytes) -> Published {
        match self {
            Self::Memory(bus) => bus.broadcast(body),
            Self::Redis(bus) => bus.broadcast(body),
        }
    }

    async fn subscribe(&self, user: UserId) -> Result<(), SubscribeError> {
        match self {
            Self::Memory(bus) => bus.subscribe(user).await,
            Self::Redis(bus) => bus.subscribe(user).await,
        }
    }

    async fn unsubscribe(&self, user: UserId) -> Result<(), SubscribeError> {
        match self {
            Self::Memory(bus) => bus.unsubscribe(user).await,
            Self::Redis(bus) => bus.unsubscribe(user).await,
        }
    }
}
