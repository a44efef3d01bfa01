//! Several replicas sharing one database and one bus: the in-process network, or Redis.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::{ClusterBus, PrivateRedis, TestApp, spawn_cluster};
use crate::phoenix::{FRAME_WAIT, PhxClient, connect};

crate::on_both_buses!(
    a_broadcast_on_one_replica_reaches_the_users_sockets_on_the_other_exactly_once,
    logout_on_one_replica_closes_the_sessions_sockets_on_the_other,
);

async fn a_broadcast_on_one_replica_reaches_the_users_sockets_on_the_other_exactly_once(
    replicas: Vec<TestApp>,
) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let bob = a.register().await;
    let topic = format!("echo:{}", alice.id);

    let mut alice_on_a = connect(a, &alice.access_token).await;
    let mut alice_on_b = connect(b, &alice.access_token).await;
    let mut bob_on_b = connect(b, &bob.access_token).await;
    let mut bob_on_a = connect(a, &bob.access_token).await;
    let join_ref = alice_on_a.join_ok(&topic).await;
    alice_on_b.join_ok(&topic).await;
    bob_on_b.join_ok(&format!("echo:{}", bob.id)).await;
    bob_on_a.join_ok(&format!("echo:{}", bob.id)).await;
    // B subscribes to Alice's channel when her socket attaches; wait until that is live.
    wait_until_linked(&mut alice_on_a, &join_ref, &mut alice_on_b, &topic).await;

    for n in 0..3 {
        let reference = alice_on_a
            .push(
                Some(&join_ref),
                &topic,
                "broadcast",
                json!({"event": "said", "payload": {"n": n}}),
            )
            .await;
        assert_eq!(alice_on_a.reply_to(&reference).await[4]["status"], "ok");
    }
    for n in 0..3 {
        let expected = json!([null, null, topic, "said", {"n": n}]);
        assert_eq!(alice_on_b.event(&topic, "said").await, expected);
        assert_eq!(alice_on_a.event(&topic, "said").await, expected);
    }
    // Exactly once: nothing more arrives, and Bob hears nothing on either replica.
    alice_on_b.expect_silence(Duration::from_millis(300)).await;
    alice_on_a.expect_silence(Duration::from_millis(100)).await;
    bob_on_b.expect_silence(Duration::from_millis(100)).await;
    bob_on_a.expect_silence(Duration::from_millis(100)).await;
}

async fn logout_on_one_replica_closes_the_sessions_sockets_on_the_other(replicas: Vec<TestApp>) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let topic = format!("echo:{}", alice.id);
    let mut on_b = connect(b, &alice.access_token).await;
    on_b.join_ok(&topic).await;
    // A logout's event reaches B only once B hears Alice's channel; a socket on A proves it.
    let other: serde_json::Value = a
        .login_raw(&alice.handle, &alice.password)
        .await
        .json()
        .await
        .unwrap();
    let mut on_a = connect(a, other["access_token"].as_str().unwrap()).await;
    let join_ref = on_a.join_ok(&topic).await;
    wait_until_linked(&mut on_a, &join_ref, &mut on_b, &topic).await;
    let response = a.logout(&alice.access_token).await;
    assert_eq!(response.status(), 204);
    let close = on_b.closed(FRAME_WAIT).await.expect("close frame");
    assert_eq!(close.code, CloseCode::Policy);
}

/// Broadcasts probes from `from` until `to` (on another replica) hears one, so the other
/// replica's bus subscription is known to be live; then drains both sockets.
async fn wait_until_linked(from: &mut PhxClient, join_ref: &str, to: &mut PhxClient, topic: &str) {
    for attempt in 0..50 {
        let reference = from
            .push(
                Some(join_ref),
                topic,
                "broadcast",
                json!({"event": "probe", "payload": {"attempt": attempt}}),
            )
            .await;
        from.reply_to(&reference).await;
        if tokio::time::timeout(Duration::from_millis(100), to.event(topic, "probe"))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            from.drain_now().await;
            to.drain_now().await;
            return;
        }
    }
    panic!("the replicas never linked");
}

#[actix_web::test]
async fn delivery_between_replicas_resumes_after_redis_restarts() {
    let mut redis = PrivateRedis::start();
    let replicas = spawn_cluster(2, ClusterBus::Redis(redis.url())).await;
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let topic = format!("echo:{}", alice.id);
    let mut on_a = connect(a, &alice.access_token).await;
    let mut on_b = connect(b, &alice.access_token).await;
    let join_ref = on_a.join_ok(&topic).await;
    on_b.join_ok(&topic).await;
    wait_until_linked(&mut on_a, &join_ref, &mut on_b, &topic).await;

    redis.halt();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.resume();
    // Wait until B has resubscribed.
    let mut restored = false;
    for _ in 0..100 {
        if b.metric("segue_bus_restored_total").await >= 1.0 {
            restored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(restored, "replica B never reported the bus restored");

    // The publisher's pool reconnects on demand; a broadcast may need a retry while it does.
    let mut delivered = false;
    for attempt in 0..20 {
        let reference = on_a
            .push(
                Some(&join_ref),
                &topic,
                "broadcast",
                json!({"event": "said", "payload": {"attempt": attempt}}),
            )
            .await;
        on_a.reply_to(&reference).await;
        if let Ok(frame) =
            tokio::time::timeout(Duration::from_millis(500), on_b.event(&topic, "said")).await
        {
            assert_eq!(frame[3], "said");
            delivered = true;
            break;
        }
    }
    assert!(
        delivered,
        "no broadcast reached replica B after Redis came back"
    );
}
