//! What travels on a user's bus channel, between replicas.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An event for every socket of one user, wherever it is connected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UserEvent {
    /// Push `event` with `payload` to the user's sockets joined to `topic`.
    Push {
        topic: String,
        event: String,
        payload: Value,
    },
    /// Close the sockets of one login session (the user logged out).
    EndSession { session: String },
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
            },
            UserEvent::EndSession {
                session: "abc".into(),
            },
        ];
        for event in events {
            assert_eq!(UserEvent::decode(&event.encode()), Some(event));
        }
        assert_eq!(UserEvent::decode(br#"{"kind":"unknown"}"#), None);
    }
}
