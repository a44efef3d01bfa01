//! The relay: feeds what the bus hears to the hub, dropping what this replica published
//! itself (its local sockets had those already).

use actix::prelude::*;

use super::hub::{BusLost, BusMissed, BusRestored, Heard, HeardBroadcast, Hub};
use crate::bus::{BusNotice, BusNotices, ReplicaId};

pub struct Relay {
    replica: ReplicaId,
    hub: Addr<Hub>,
}

impl Relay {
    /// Starts a relay reading `notices`.
    pub fn start(replica: ReplicaId, hub: Addr<Hub>, notices: BusNotices) -> Addr<Self> {
        Relay::create(|ctx| {
            ctx.add_stream(tokio_stream_of(notices));
            Relay { replica, hub }
        })
    }
}

/// Adapts the bus's receiver to a `Stream`.
fn tokio_stream_of(mut notices: BusNotices) -> impl futures_util::Stream<Item = BusNotice> {
    futures_util::stream::poll_fn(move |cx| notices.poll_recv(cx))
}

impl Actor for Relay {
    type Context = Context<Self>;
}

impl StreamHandler<BusNotice> for Relay {
    fn handle(&mut self, notice: BusNotice, _: &mut Context<Self>) {
        match notice {
            BusNotice::Message(message) if message.origin == self.replica => {}
            BusNotice::Message(message) => {
                self.hub.do_send(Heard {
                    user: message.user,
                    body: message.body,
                });
            }
            BusNotice::Broadcast { origin, .. } if origin == self.replica => {}
            BusNotice::Broadcast { body, .. } => self.hub.do_send(HeardBroadcast { body }),
            BusNotice::Lost => self.hub.do_send(BusLost),
            BusNotice::Restored => self.hub.do_send(BusRestored),
            BusNotice::Missed { origin } if origin == self.replica => {}
            BusNotice::Missed { .. } => self.hub.do_send(BusMissed),
        }
    }
}
