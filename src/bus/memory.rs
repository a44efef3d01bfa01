//! The in-process bus. A [`MemoryNetwork`] is the shared medium; each replica attaches a
//! [`MemoryBus`] to it. `cargo run` uses a network of one; tests attach several replicas to
//! one network to run a cluster in one process without Redis.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Bus, BusMessage, BusNotice, BusNotices, Published, ReplicaId, SubscribeError};
use crate::domain::UserId;

/// Replicas and their subscriptions.
#[derive(Default)]
struct Members {
    /// Each attached replica's notice queue.
    replicas: HashMap<ReplicaId, mpsc::UnboundedSender<BusNotice>>,
    /// Which replicas hear which user's channel.
    channels: HashMap<UserId, HashSet<ReplicaId>>,
}

/// The shared medium several in-process replicas can attach to. It also carries the
/// in-process presence registry, so such replicas share presence as they would through Redis.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    // A std Mutex, not tokio's: it is never held across an await, and every critical
    // section is a few map operations.
    members: Arc<Mutex<Members>>,
    presence: crate::presence::MemoryRegistry,
}

impl MemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches a replica; its notices arrive on the returned stream.
    pub fn attach(&self, replica: ReplicaId) -> (MemoryBus, BusNotices) {
        let (sender, notices) = mpsc::unbounded_channel();
        self.lock().replicas.insert(replica.clone(), sender);
        (
            MemoryBus {
                network: self.clone(),
                replica,
            },
            notices,
        )
    }

    /// The presence registry of replicas on this network.
    pub fn presence_registry(&self) -> crate::presence::MemoryRegistry {
        self.presence.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One replica's handle on a [`MemoryNetwork`].
#[derive(Clone)]
pub struct MemoryBus {
    network: MemoryNetwork,
    replica: ReplicaId,
}

impl Bus for MemoryBus {
    fn publish(&self, user: UserId, body: Bytes) -> Published {
        let mut members = self.network.lock();
        let Members { replicas, channels } = &mut *members;
        if let Some(listeners) = channels.get(&user) {
            for replica in listeners {
                if let Some(queue) = replicas.get(replica) {
                    let message = BusMessage {
                        user,
                        origin: self.replica.clone(),
                        body: body.clone(),
                    };
                    let _ = queue.send(BusNotice::Message(message));
                }
            }
        }
        Published::ready(Ok(()))
    }

    fn broadcast(&self, body: Bytes) -> Published {
        for queue in self.network.lock().replicas.values() {
            let _ = queue.send(BusNotice::Broadcast {
                origin: self.replica.clone(),
                body: body.clone(),
            });
        }
        Published::ready(Ok(()))
    }

    async fn subscribe(&self, user: UserId) -> Result<(), SubscribeError> {
        self.network
            .lock()
            .channels
            .entry(user)
            .or_default()
            .insert(self.replica.clone());
        Ok(())
    }

    async fn unsubscribe(&self, user: UserId) -> Result<(), SubscribeError> {
        let mut members = self.network.lock();
        if let Some(listeners) = members.channels.get_mut(&user) {
            listeners.remove(&self.replica);
            if listeners.is_empty() {
                members.channels.remove(&user);
            }
        }
        Ok(())
    }
}
