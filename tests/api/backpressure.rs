//! A client that stops reading is disconnected, and the server's memory stays flat while it
//! is being flooded. The hub runs as a process of its own so its memory can be measured.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{HubProcess, metric};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Broadcasts pumped at the stalled socket, and the size of each.
const FLOOD_MESSAGES: usize = 8_000;
const FLOOD_PAYLOAD_BYTES: usize = 10_240;

/// Allowed growth of the server's RSS over the flood. Buffering the flood for the stalled
/// socket would take FLOOD_MESSAGES × FLOOD_PAYLOAD_BYTES ≈ 80 MiB.
const RSS_GROWTH_BOUND_KIB: u64 = 16 * 1024;

#[actix_web::test]
async fn a_client_that_stops_reading_is_closed_and_memory_stays_flat() {
    let hub = HubProcess::start(&[("SEGUE_WS_OUTBOUND_QUEUE", "64")]).await;
    let client = reqwest::Client::new();
    let body: Value = client
        .post(format!("{}/auth/register", hub.address))
        .json(&json!({"handle": "flooded", "password": "correct horse"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["access_token"].as_str().unwrap();
    let user = body["user"]["id"].as_i64().unwrap();
    let topic = format!("echo:{user}");
    let url = format!(
        "{}/socket/websocket?vsn=2.0.0&token={token}",
        hub.address.replacen("http", "ws", 1)
    );

    // The stalled client: a tiny receive buffer, joined, then never read again.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let hub_addr: std::net::SocketAddr = hub.address.trim_start_matches("http://").parse().unwrap();
    let stream = socket.connect(hub_addr).await.unwrap();
    let stalled_port = stream.local_addr().unwrap().port();
    let (mut stalled, _) =
        tokio_tungstenite::client_async(url.clone().into_client_request().unwrap(), stream)
            .await
            .unwrap();
    stalled
        .send(Message::text(
            json!(["1", "1", topic, "phx_join", {}]).to_string(),
        ))
        .await
        .unwrap();
    let reply = stalled.next().await.expect("join reply").expect("readable");
    assert!(
        reply.to_text().unwrap().contains(r#""status":"ok""#),
        "{reply}"
    );

    let mut pump = crate::phoenix::connect_url(&url).await.unwrap();
    let join_ref = pump.join_ok(&topic).await;
    let before = hub.rss_kib();

    let blob = "x".repeat(FLOOD_PAYLOAD_BYTES);
    for n in 0..FLOOD_MESSAGES {
        pump.push(
            Some(&join_ref),
            &topic,
            "broadcast",
            json!({"event": "blob", "payload": {"n": n, "blob": blob}}),
        )
        .await;
        // Keep the pump's own socket drained (a reply and its own copy per push), so only the
        // stalled socket falls behind.
        if n % 100 == 99 {
            pump.skip(200).await;
        }
    }
    let closed = metric(&hub.address, "segue_ws_slow_closed_total").await;
    let open = metric(&hub.address, "segue_ws_open").await;
    let after = hub.rss_kib();
    println!(
        "backpressure: server RSS {before} KiB before, {after} KiB after {FLOOD_MESSAGES} × {FLOOD_PAYLOAD_BYTES} B \
         broadcasts (growth {} KiB, bound {RSS_GROWTH_BOUND_KIB} KiB)",
        after.saturating_sub(before)
    );
    assert_eq!(closed, 1.0, "the stalled socket was closed for not reading");
    assert_eq!(open, 1.0, "only the pump's socket is still open");
    assert!(
        after.saturating_sub(before) < RSS_GROWTH_BOUND_KIB,
        "RSS grew from {before} to {after} KiB"
    );
    // Issue 10, defect 2: the server side of the connection used to stay, with its
    // descriptor and megabytes of Send-Q, until the client left. Now it is gone at once.
    let started = std::time::Instant::now();
    while let Some(send_q) = server_side_send_queue(hub_addr.port(), stalled_port) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the server still holds the stalled connection ({send_q} bytes queued) {:?} after closing it",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "backpressure: the stalled connection was released {:?} after the flood",
        started.elapsed()
    );
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The send queue of the server's end of the TCP connection from `client_port` to
/// `server_port`, if that end still exists (`/proc/net/tcp`, IPv4 loopback).
fn server_side_send_queue(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (fields.get(1)?, fields.get(2)?, fields.get(4)?);
        (port(local)? == server_port && port(remote)? == client_port)
            .then(|| u64::from_str_radix(queues.split(':').next()?, 16).ok())
            .flatten()
    })
}
