//! What travels on a user's bus channel, between replicas.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An event for every socket of one user, wherever it is connected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UserEvent {
    /// Push `event` with `payload` to the user's sockets joined to `topic`. A push with a
    /// `revision` is dropped by a socket that already has that revision or a later one, so
    /// each device sees a topic's revisions only ever increase.
    Push {
        topic: String,
        event: String,
        payload: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<i64>,
    },
    /// Close the sockets of one login session (the user logged out).
    EndSession { session: String },
    /// The user's preferences changed: cached queues (which carry `auto_advance`) are stale.
    PreferencesChanged,
}

impl UserEvent {
    /// The bus body.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads a bus body; `None` for a body this version does not understand.
    pub fn decode(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn events_round_trip_through_their_bus_encoding() {
        let events = [
            UserEvent::Push {
                topic: "echo:1".into(),
                event: "said".into(),
                payload: json!({"a": 1}),
                revision: None,
            },
            UserEvent::Push {
                topic: "queue:1".into(),
                event: "queue_changed".into(),
                payload: json!({}),
                revision: Some(4),
            },
            UserEvent::EndSession {
                session: "abc".into(),
            },
            UserEvent::PreferencesChanged,
        ];
        for event in events {
            assert_eq!(UserEvent::decode(&event.encode()), Some(event));
        }
        assert_eq!(UserEvent::decode(br#"{"kind":"unknown"}"#), None);
    }
}
