//! Wire formats the integration tests and the benchmarks both speak to a hub: a
//! `multipart/form-data` report for `POST /ingest/plays`, and the events of a Server-Sent
//! Events stream. Included by path (`tests/api/main.rs`, `benches/ingest/main.rs`).

use serde_json::Value;

/// A `multipart/form-data` body with a `metadata` part and, when given, an `artwork` part and
/// an `extra` part of that name: `(content type, body)`.
pub fn multipart(
    metadata: &Value,
    artwork: Option<&[u8]>,
    extra: Option<&str>,
) -> (String, Vec<u8>) {
    let boundary = "segue-test-boundary-7d1f";
    let mut body = Vec::new();
    body.extend(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\nContent-Type: application/json\r\n\r\n{metadata}\r\n"
    ).as_bytes());
    if let Some(image) = artwork {
        body.extend(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"artwork\"; filename=\"cover.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        ).as_bytes());
        body.extend(image);
        body.extend(b"\r\n");
    }
    if let Some(name) = extra {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nx\r\n")
                .as_bytes(),
        );
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// One Server-Sent Event: its name, id and JSON data.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// Turns a stream's chunks into events.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: String,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.push_str(&String::from_utf8_lossy(chunk));
    }

    /// The next whole event with data, if one has arrived (comments and keep-alives are
    /// skipped; data that is not JSON panics).
    pub fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::from("message"), String::new(), None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).expect("JSON data"));
                }
            }
            if let Some(data) = data {
                return Some(SseEvent { event, id, data });
            }
        }
        None
    }
}
