//! Redis faults: restarts, kills, a killed subscriber connection, a hung server, a server
//! that never answers, and a link cut between one replica and Redis.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::proxy::Link;
use super::{
    Device, Replica, Writers, append, assert_consistent, link_devices, metric_reaches,
    presence_settles,
};
use crate::helpers::{Account, ClusterBus, PrivateRedis, TestApp, spawn_cluster_each};

/// Two replicas on PostgreSQL, each reaching a private Redis through a link of its own; one
/// user with a device on each, the bus known to be live.
struct Rig {
    redis: PrivateRedis,
    links: [Link; 2],
    replicas: Vec<TestApp>,
    account: Account,
    devices: Vec<Device>,
    /// Writes made while setting up.
    earlier: Vec<(i64, String)>,
}

impl Rig {
    async fn start() -> Self {
        let redis = PrivateRedis::start();
        let upstream: SocketAddr = ([127, 0, 0, 1], redis.port).into();
        let links = [Link::start(upstream), Link::start(upstream)];
        let urls = [links[0].redis_url(), links[1].redis_url()];
        let replicas = spawn_cluster_each(2, ClusterBus::Redis(redis.url()), |index, settings| {
            settings.redis_url = Some(urls[index].clone().into());
        })
        .await;
        let account = replicas[0].register().await;
        let (devices, earlier) = link_devices([&replicas[0], &replicas[1]], &account).await;
        Self {
            redis,
            links,
            replicas,
            account,
            devices,
            earlier,
        }
    }

    fn apps(&self) -> [&TestApp; 2] {
        [&self.replicas[0], &self.replicas[1]]
    }

    fn replicas(&self) -> [&dyn Replica; 2] {
        [&self.replicas[0], &self.replicas[1]]
    }
}

/// Runs `fault` (which returns once Redis is usable again) while writers on both replicas
/// append to the queue, then checks that nothing acknowledged was lost and that every device
/// converged; prints the figures.
async fn survives(name: &str, fault: impl AsyncFnOnce(&mut Rig)) {
    let mut rig = Rig::start().await;
    let writers = Writers::start(&rig.replicas(), &rig.account);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    fault(&mut rig).await;
    let healed = Instant::now();
    let writes = writers.finish().await;
    let refused_badly: Vec<u16> = writes
        .refused
        .iter()
        .copied()
        .filter(|status| *status != 503)
        .collect();
    assert!(
        refused_badly.is_empty(),
        "writes failed other than with 503: {refused_badly:?}"
    );
    let apps: [&dyn Replica; 2] = [&rig.replicas[0], &rig.replicas[1]];
    let converged = assert_consistent(
        &apps,
        &rig.account,
        &writes,
        &rig.earlier,
        &mut rig.devices,
        healed,
    )
    .await;
    // And the bus carries new changes again, both ways.
    for (writer, watcher) in [(0, 1), (1, 0)] {
        let written = append(apps[writer], &rig.account, &format!("after-{writer}")).await;
        assert!(
            rig.devices[watcher]
                .catch_up(written.0, Duration::from_secs(5))
                .await,
            "after {name}, a change on one replica no longer reaches the other"
        );
    }
    // Presence too: each replica shows both devices online again.
    for app in apps {
        presence_settles(
            app,
            &rig.account,
            &["device-a", "device-b"],
            &["device-a", "device-b"],
            Duration::from_secs(10),
        )
        .await;
    }
    let presence = healed.elapsed();
    println!(
        "fault {name}: lasted {} ms; {} writes acknowledged, {} refused with 503, 0 lost; \
         every device on the store's state {} ms after Redis was usable; presence whole again \
         within {} ms",
        healed.duration_since(started).as_millis(),
        writes.acknowledged.len(),
        writes.refused.len(),
        converged.as_millis(),
        presence.as_millis()
    );
}

#[actix_web::test]
async fn redis_shut_down_without_saving_and_restarted() {
    survives("SHUTDOWN NOSAVE", async |rig| {
        rig.redis.cli(&["SHUTDOWN", "NOSAVE"]);
        rig.redis.halt();
        tokio::time::sleep(Duration::from_secs(1)).await;
        rig.redis.resume();
    })
    .await;
}

#[actix_web::test]
async fn redis_killed_and_restarted() {
    survives("kill -9", async |rig| {
        rig.redis.halt();
        tokio::time::sleep(Duration::from_secs(1)).await;
        rig.redis.resume();
    })
    .await;
}

#[actix_web::test]
async fn the_subscriber_connections_alone_killed() {
    survives("CLIENT KILL TYPE pubsub", async |rig| {
        let killed = rig.redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert_eq!(killed.trim(), "2", "one subscriber per replica");
    })
    .await;
}

#[actix_web::test]
async fn redis_hung_for_five_seconds() {
    survives("DEBUG SLEEP 5", async |rig| {
        let port = rig.redis.port;
        // redis-cli returns when the server wakes: then it is usable again.
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "DEBUG", "SLEEP", "5"])
                .output()
                .expect("redis-cli")
        })
        .await
        .expect("DEBUG SLEEP");
    })
    .await;
}

/// Silences the links as `silence` does and waits until every replica counted its
/// subscription lost (found out by the probe); prints how long that took.
async fn found_out_by_the_probe(rig: &mut Rig, name: &str, silence: fn(&Link)) {
    for app in rig.apps() {
        assert_eq!(
            app.metric("segue_bus_lost_total").await,
            0.0,
            "lost before the fault"
        );
    }
    for link in &rig.links {
        silence(link);
    }
    let started = Instant::now();
    for app in rig.apps() {
        let noticed = metric_reaches(app, "segue_bus_lost_total", 1.0, Duration::from_secs(10))
            .await
            .expect("the silent subscription was never noticed");
        println!(
            "{name}: replica noticed its dead subscription after {} ms",
            noticed.max(started.elapsed()).as_millis()
        );
    }
}

/// A Redis (or a link to it) that keeps every connection open and never answers: nothing
/// tells the hub the connections are dead. The subscriber finds out by its probe.
#[actix_web::test]
async fn redis_that_never_answers_is_found_out_by_the_probe() {
    survives("silent Redis", async |rig| {
        found_out_by_the_probe(rig, "silent Redis", Link::blackhole).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The connections open meanwhile stay dead (as half-open ones do); new ones work.
        for link in &rig.links {
            link.pass();
        }
    })
    .await;
}

/// Only the subscription goes silent (as when a proxy or a failover drops it without a word)
/// while commands keep working: PING-free traffic cannot tell, the probe's echo can.
#[actix_web::test]
async fn a_subscription_that_alone_goes_silent_is_found_out_by_the_probe() {
    survives("silent subscription", async |rig| {
        found_out_by_the_probe(rig, "silent subscription", Link::blackhole_subscribers).await;
        for link in &rig.links {
            link.pass();
        }
    })
    .await;
}

/// The converse: commands hang (every pooled connection silent, so a checkout waits out its
/// timeout) while the subscriptions are fine. The probe's PUBLISH cannot get through, the
/// PING on the subscription can: nothing is torn down. (Before, the PUBLISH used up the echo's
/// deadline and every replica rebuilt a live subscription within 2 s: seen failing.)
#[actix_web::test]
async fn slow_redis_commands_do_not_tear_down_a_live_subscription() {
    let rig = Rig::start().await;
    let lost_before = [
        rig.replicas[0].metric("segue_bus_lost_total").await,
        rig.replicas[1].metric("segue_bus_lost_total").await,
    ];
    for link in &rig.links {
        link.blackhole_commands();
    }
    // Several probe rounds: idle 1 s, PUBLISH given up after 500 ms, PING answered.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (app, before) in rig.apps().into_iter().zip(lost_before) {
        assert_eq!(
            app.metric("segue_bus_lost_total").await,
            before,
            "a live subscription was rebuilt because commands were slow"
        );
    }
    for link in &rig.links {
        link.pass();
    }
}

#[actix_web::test]
async fn the_network_to_redis_cut_and_restored() {
    survives("network to Redis cut", async |rig| {
        for link in &rig.links {
            link.sever();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for link in &rig.links {
            link.pass();
        }
    })
    .await;
}

/// Issue 15: when only one replica lost Redis, the messages it failed to publish were lost
/// for the others, whose own bus never dropped: their devices stayed on the old queue until
/// some later write. Now the replica tells the others of the gap once it can, and they
/// re-read the store.
#[actix_web::test]
async fn changes_a_replica_could_not_publish_reach_the_others_once_it_can() {
    let mut rig = Rig::start().await;
    rig.links[0].sever();
    let apps: [&dyn Replica; 2] = [&rig.replicas[0], &rig.replicas[1]];
    // Written on A while A alone is cut off from Redis.
    let mut during = Vec::new();
    for n in 0..3 {
        during.push(append(apps[0], &rig.account, &format!("cut-{n}")).await);
    }
    // Longer than a publish waits for a connection: A's messages cannot just be late.
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.links[0].pass();
    let healed = Instant::now();
    let writes = super::Writes {
        acknowledged: during,
        ..super::Writes::default()
    };
    let converged = assert_consistent(
        &apps,
        &rig.account,
        &writes,
        &rig.earlier,
        &mut rig.devices,
        healed,
    )
    .await;
    println!(
        "one replica cut off from Redis: the other's device had its changes {} ms after the link was back",
        converged.as_millis()
    );
}
