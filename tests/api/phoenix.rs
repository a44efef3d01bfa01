//! A small Phoenix Channels V2 client for tests: raw enough to send malformed frames, with
//! helpers for the common exchanges.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::TestApp;

/// How long a test waits for an expected frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(5);

pub struct PhxClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
    /// Frames read while looking for another one.
    pending: VecDeque<Value>,
}

/// The socket URL of `app` with extra query parameters.
pub fn socket_url(app: &TestApp, query: &str) -> String {
    format!(
        "{}/socket/websocket?{query}",
        app.address.replacen("http", "ws", 1)
    )
}

/// Opens a socket with `token` as a query parameter.
pub async fn connect(app: &TestApp, token: &str) -> PhxClient {
    connect_url(&socket_url(app, &format!("vsn=2.0.0&token={token}")))
        .await
        .expect("socket connects")
}

/// Opens a socket at `url` with no extra headers.
pub async fn connect_url(url: &str) -> Result<PhxClient, tokio_tungstenite::tungstenite::Error> {
    connect_request(url.into_client_request()?).await
}

/// Opens a socket with a hand-made request (headers, subprotocols).
pub async fn connect_request(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<PhxClient, tokio_tungstenite::tungstenite::Error> {
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(PhxClient::new(ws))
}

/// The HTTP status an upgrade was refused with.
pub fn refused_status(error: tokio_tungstenite::tungstenite::Error) -> u16 {
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

impl PhxClient {
    pub fn new(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        Self {
            ws,
            next_ref: 1,
            pending: VecDeque::new(),
        }
    }

    fn take_ref(&mut self) -> String {
        let reference = self.next_ref.to_string();
        self.next_ref += 1;
        reference
    }

    /// Sends one raw WebSocket message (frames, for fragmentation tests).
    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// Sends a text frame; false when the socket is closed.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).await.is_ok()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send frame");
    }

    /// Sends `[join_ref, ref, topic, event, payload]` and returns the ref.
    pub async fn push(
        &mut self,
        join_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> String {
        let reference = self.take_ref();
        let frame = json!([join_ref, reference, topic, event, payload]);
        self.send_text(&frame.to_string()).await;
        reference
    }

    /// Joins `topic`; returns the join ref and the reply frame.
    pub async fn join(&mut self, topic: &str, payload: Value) -> (String, Value) {
        let reference = self.take_ref();
        let frame = json!([reference, reference, topic, "phx_join", payload]);
        self.send_text(&frame.to_string()).await;
        let reply = self.reply_to(&reference).await;
        (reference, reply)
    }

    /// Joins `topic` and asserts the join succeeded; returns the join ref.
    pub async fn join_ok(&mut self, topic: &str) -> String {
        let (join_ref, reply) = self.join(topic, json!({})).await;
        assert_eq!(reply[4]["status"], "ok", "join {topic}: {reply}");
        join_ref
    }

    /// Reads one text frame from the socket, or `None` on close.
    async fn read(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("frame within wait")?;
            match message.ok()? {
                Message::Text(text) => {
                    return Some(serde_json::from_str(&text).expect("server frames are JSON"));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Reads until the `phx_reply` to `reference`, keeping other frames for later.
    pub async fn reply_to(&mut self, reference: &str) -> Value {
        if let Some(index) = self.pending.iter().position(|f| is_reply_to(f, reference)) {
            return self.pending.remove(index).expect("index is valid");
        }
        loop {
            let frame = self
                .read()
                .await
                .expect("socket open while waiting for a reply");
            if is_reply_to(&frame, reference) {
                return frame;
            }
            self.pending.push_back(frame);
        }
    }

    /// Reads until a frame with `event` on `topic`, keeping others for later.
    pub async fn event(&mut self, topic: &str, event: &str) -> Value {
        if let Some(index) = self
            .pending
            .iter()
            .position(|f| f[2] == topic && f[3] == event)
        {
            return self.pending.remove(index).expect("index is valid");
        }
        loop {
            let frame = self
                .read()
                .await
                .expect("socket open while waiting for an event");
            if frame[2] == topic && frame[3] == event {
                return frame;
            }
            self.pending.push_back(frame);
        }
    }

    /// Reads until a frame for which `wanted` holds, keeping others for later.
    pub async fn next_matching(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(index) = self.pending.iter().position(&wanted) {
            return self.pending.remove(index).expect("index is valid");
        }
        loop {
            let frame = self
                .read()
                .await
                .expect("socket open while waiting for a frame");
            if wanted(&frame) {
                return frame;
            }
            self.pending.push_back(frame);
        }
    }

    /// Whether a frame for which `unwanted` holds arrives within `wait` (frames read meanwhile
    /// are kept).
    pub async fn sees_within(&mut self, wait: Duration, unwanted: impl Fn(&Value) -> bool) -> bool {
        if self.pending.iter().any(&unwanted) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).expect("server frames are JSON");
                let seen = unwanted(&frame);
                self.pending.push_back(frame);
                if seen {
                    return true;
                }
            }
        }
        false
    }

    /// The next text frame as sent, unparsed (frames kept by other readers are not looked
    /// at), or `None` when nothing arrives within `wait` or the socket closed.
    pub async fn next_text_within(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => return Some(text.as_str().to_owned()),
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => return None,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// The next frame (kept ones first), or `None` when nothing arrives within `wait` or the
    /// socket closed.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        if let Some(frame) = self.pending.pop_front() {
            return Some(frame);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Some(serde_json::from_str(&text).expect("server frames are JSON"));
                }
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => return None,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Reads until the reply to `reference`, dropping every other frame (for writers that do
    /// not care what else the socket carries); `None` when the socket closed or `wait` ran out.
    pub async fn reply_dropping_others(
        &mut self,
        reference: &str,
        wait: Duration,
    ) -> Option<Value> {
        if let Some(index) = self.pending.iter().position(|f| is_reply_to(f, reference)) {
            return self.pending.remove(index);
        }
        self.pending.clear();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(&text).expect("server frames are JSON");
                    if is_reply_to(&frame, reference) {
                        return Some(frame);
                    }
                }
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => return None,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Reads and discards whatever has already arrived.
    pub async fn drain_now(&mut self) {
        self.pending.clear();
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(20), self.ws.next()).await
        {}
    }

    /// Reads and discards the next `count` frames.
    pub async fn skip(&mut self, count: usize) {
        for _ in 0..count {
            if self.pending.pop_front().is_none() {
                self.read()
                    .await
                    .expect("socket open while skipping frames");
            }
        }
    }

    /// Asserts that nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        assert!(
            self.pending.is_empty(),
            "unexpected frames: {:?}",
            self.pending
        );
        if let Ok(Some(Ok(message))) = tokio::time::timeout(wait, self.ws.next()).await {
            panic!("expected silence, got {message:?}");
        }
    }

    /// Waits for the server to close the socket; returns its close frame.
    pub async fn closed(&mut self, wait: Duration) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("socket closed within wait");
            match next {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

fn is_reply_to(frame: &Value, reference: &str) -> bool {
    frame[3] == "phx_reply" && frame[1] == reference
}
