//! The bus port's acceptance suite, run against both implementations: the in-process
//! network and Redis pub/sub (shared Redis, a namespace per test; a private Redis for the
//! restart test).

use std::time::Duration;

use bytes::Bytes;
use segue::bus::{AnyBus, Bus, BusNotice, BusNotices, MemoryNetwork, RedisBus, ReplicaId};
use segue::domain::UserId;

use crate::helpers::{PrivateRedis, redis_url, unique};

/// One replica's view of the bus under test.
struct Node {
    replica: ReplicaId,
    bus: AnyBus,
    notices: BusNotices,
}

enum Kind {
    Memory,
    Redis,
}

/// Two replicas on one medium.
fn pair(kind: Kind) -> (Node, Node) {
    match kind {
        Kind::Memory => {
            let network = MemoryNetwork::new();
            let node = |network: &MemoryNetwork| {
                let replica = ReplicaId::generate();
                let (bus, notices) = network.attach(replica.clone());
                Node {
                    replica,
                    bus: AnyBus::Memory(bus),
                    notices,
                }
            };
            (node(&network), node(&network))
        }
        Kind::Redis => {
            let namespace = unique("segue_bus");
            (
                redis_node(&redis_url(), &namespace),
                redis_node(&redis_url(), &namespace),
            )
        }
    }
}

fn redis_node(url: &str, namespace: &str) -> Node {
    let replica = ReplicaId::generate();
    let pool = segue::redis::build_pool(&url.to_owned().into()).expect("pool");
    let client = redis::Client::open(url).expect("client");
    let (bus, notices) = RedisBus::start(client, pool, namespace, replica.clone());
    Node {
        replica,
        bus: AnyBus::Redis(bus),
        notices,
    }
}

/// The next message notice, skipping connection notices.
async fn next_message(node: &mut Node) -> segue::bus::BusMessage {
    loop {
        let notice = tokio::time::timeout(Duration::from_secs(5), node.notices.recv())
            .await
            .expect("a notice within 5 s")
            .expect("bus open");
        if let BusNotice::Message(message) = notice {
            return message;
        }
    }
}

async fn expect_no_message(node: &mut Node, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(notice)) = tokio::time::timeout_at(deadline, node.notices.recv()).await {
        if let BusNotice::Message(message) = notice {
            panic!("unexpected message for user {}", message.user);
        }
    }
}

macro_rules! on_both_buses {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[actix_web::test]
                async fn memory() {
                    super::$name(super::Kind::Memory).await;
                }

                #[actix_web::test]
                async fn redis() {
                    super::$name(super::Kind::Redis).await;
                }
            }
        )*
    };
}

on_both_buses!(
    a_message_reaches_subscribed_replicas_tagged_with_its_origin,
    other_users_channels_stay_silent,
    unsubscribing_stops_delivery,
    messages_arrive_in_the_order_published,
    a_broadcast_reaches_every_replica_tagged_with_its_origin,
);

async fn a_broadcast_reaches_every_replica_tagged_with_its_origin(kind: Kind) {
    let (mut a, mut b) = pair(kind);
    // A subscription resolves once the bus connection is live; the replica-wide channel is
    // heard from then on without asking.
    a.bus.subscribe(UserId(9)).await.expect("subscribe");
    b.bus.subscribe(UserId(9)).await.expect("subscribe");
    a.bus
        .broadcast(Bytes::from_static(b"everyone"))
        .await
        .expect("broadcast");
    let sender = a.replica.clone();
    for node in [&mut a, &mut b] {
        let notice = loop {
            let notice = tokio::time::timeout(Duration::from_secs(5), node.notices.recv())
                .await
                .expect("a notice within 5 s")
                .expect("bus open");
            if !matches!(notice, BusNotice::Restored | BusNotice::Lost) {
                break notice;
            }
        };
        let BusNotice::Broadcast { origin, body } = notice else {
            panic!("expected a broadcast, got {notice:?}");
        };
        assert_eq!(origin, sender);
        assert_eq!(&body[..], b"everyone");
    }
    // A user's channel hears nothing of it.
    expect_no_message(&mut b, Duration::from_millis(200)).await;
}

async fn a_message_reaches_subscribed_replicas_tagged_with_its_origin(kind: Kind) {
    let (mut a, mut b) = pair(kind);
    let user = UserId(7);
    b.bus.subscribe(user).await.expect("subscribe");
    a.bus.subscribe(user).await.expect("subscribe");
    a.bus
        .publish(user, Bytes::from_static(b"hello"))
        .await
        .expect("publish");
    let origin = a.replica.clone();
    // Both hear it, tagged with A: A's relay drops its own, B's delivers it.
    for node in [&mut a, &mut b] {
        let message = next_message(node).await;
        assert_eq!(message.user, user);
        assert_eq!(&message.body[..], b"hello");
        assert_eq!(message.origin, origin);
    }
}

async fn other_users_channels_stay_silent(kind: Kind) {
    let (a, mut b) = pair(kind);
    b.bus.subscribe(UserId(1)).await.expect("subscribe");
    a.bus
        .publish(UserId(2), Bytes::from_static(b"not for you"))
        .await
        .expect("publish");
    expect_no_message(&mut b, Duration::from_millis(300)).await;
}

async fn unsubscribing_stops_delivery(kind: Kind) {
    let (a, mut b) = pair(kind);
    let user = UserId(3);
    b.bus.subscribe(user).await.expect("subscribe");
    a.bus
        .publish(user, Bytes::from_static(b"one"))
        .await
        .expect("publish");
    assert_eq!(&next_message(&mut b).await.body[..], b"one");
    b.bus.unsubscribe(user).await.expect("unsubscribe");
    a.bus
        .publish(user, Bytes::from_static(b"two"))
        .await
        .expect("publish");
    expect_no_message(&mut b, Duration::from_millis(300)).await;
}

async fn messages_arrive_in_the_order_published(kind: Kind) {
    let (a, mut b) = pair(kind);
    let user = UserId(4);
    b.bus.subscribe(user).await.expect("subscribe");
    let published: Vec<_> = (0..500)
        .map(|i| a.bus.publish(user, Bytes::from(i.to_string())))
        .collect();
    for outcome in published {
        outcome.await.expect("publish");
    }
    for expected in 0..500 {
        let message = next_message(&mut b).await;
        assert_eq!(message.body, Bytes::from(expected.to_string()));
        assert_eq!(message.origin, a.replica);
    }
}

#[actix_web::test]
async fn the_redis_bus_reconnects_resubscribes_and_says_so() {
    let mut redis = PrivateRedis::start();
    let namespace = unique("segue_bus");
    let a = redis_node(&redis.url(), &namespace);
    let mut b = redis_node(&redis.url(), &namespace);
    let user = UserId(5);
    b.bus.subscribe(user).await.expect("subscribe");

    redis.halt();
    let lost = tokio::time::timeout(Duration::from_secs(5), b.notices.recv())
        .await
        .expect("notice");
    assert!(matches!(lost, Some(BusNotice::Lost)), "{lost:?}");
    // Publishing while Redis is away fails clearly.
    assert!(
        a.bus
            .publish(user, Bytes::from_static(b"lost"))
            .await
            .is_err()
    );

    redis.resume();
    let restored = tokio::time::timeout(Duration::from_secs(10), b.notices.recv())
        .await
        .expect("notice");
    assert!(
        matches!(restored, Some(BusNotice::Restored)),
        "{restored:?}"
    );
    a.bus
        .publish(user, Bytes::from_static(b"back"))
        .await
        .expect("publish after restart");
    assert_eq!(&next_message(&mut b).await.body[..], b"back");
}
