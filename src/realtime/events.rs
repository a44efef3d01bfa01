//! What travels on a user's bus channel, between replicas.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::presence::DeviceEntry;

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
    /// Close the sockets of one login session. Never sent on the bus: a replica delivers it
    /// to the user's local session when it hears [`ReplicaEvent::SessionEnded`].
    EndSession { session: String },
    /// The user's preferences changed: cached queues (which carry `auto_advance`) are stale;
    /// `share_listening` is the new value when that changed (whether followers see the
    /// user's presence), applied in order with the user's presence events.
    PreferencesChanged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        share_listening: Option<bool>,
    },
    /// One of the user's presence entries was written (by its owner).
    PresenceUpsert {
        instance: String,
        /// Shared with the owner's record and every view of this replica.
        entry: Arc<DeviceEntry>,
    },
    /// One of the user's presence entries was removed; `seq` is newer than the entry's.
    PresenceRemove { instance: String, seq: u64 },
    /// The user's output device changed (`play`: start playing there).
    OutputChanged { device_id: String, play: bool },
    /// A command for one device of the user, pushed as `command` on `devices:{user}`.
    DeviceCommand { device_id: String, payload: Value },
    /// The user followed or unfollowed someone.
    FollowsChanged,
}

impl UserEvent {
    /// Whether the replica's presence actor needs to hear it.
    pub fn concerns_presence(&self) -> bool {
        matches!(
            self,
            Self::PresenceUpsert { .. }
                | Self::PresenceRemove { .. }
                | Self::OutputChanged { .. }
                | Self::FollowsChanged
                | Self::PreferencesChanged { .. }
        )
    }
}

/// An event as a bus body (JSON).
fn to_body(event: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(event).unwrap_or_default())
}

/// An event from a bus body; `None` for a body this version does not understand.
fn from_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_slice(body).ok()
}

impl UserEvent {
    /// The bus body.
    pub fn encode(&self) -> Bytes {
        to_body(self)
    }

    /// Reads a bus body; `None` for a body this version does not understand.
    pub fn decode(body: &[u8]) -> Option<Self> {
        from_body(body)
    }
}

/// News every replica needs, on the bus's replica-wide channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplicaEvent {
    /// A login session ended (logout, refresh-token reuse): every replica stops accepting its
    /// tokens and closes its sockets.
    SessionEnded {
        user: crate::domain::UserId,
        session: String,
    },
    /// A client address is blocked until `until_ms` (milliseconds since the epoch).
    AddressBlocked { address: String, until_ms: i64 },
    /// A client address's block was lifted.
    AddressUnblocked { address: String },
    /// These catalog tracks changed (their artwork, say): cached copies are stale.
    TracksChanged { ids: Vec<String> },
    /// An overlay was revoked: its open streams end, on every replica.
    OverlayRevoked { token_hash: String },
}

impl ReplicaEvent {
    /// The bus body.
    pub fn encode(&self) -> Bytes {
        to_body(self)
    }

    /// Reads a bus body; `None` for a body this version does not understand.
    pub fn decode(body: &[u8]) -> Option<Self> {
        from_body(body)
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
            UserEvent::PreferencesChanged {
                share_listening: None,
            },
            UserEvent::PreferencesChanged {
                share_listening: Some(false),
            },
            UserEvent::PresenceUpsert {
                instance: "d/r".into(),
                entry: Arc::new(DeviceEntry {
                    device_id: "d".into(),
                    name: "Phone".into(),
                    kind: "phone".into(),
                    online_at: 1,
                    now_playing: None,
                    seq: 2,
                    expires_at: 3,
                }),
            },
            UserEvent::PresenceRemove {
                instance: "d/r".into(),
                seq: 4,
            },
            UserEvent::OutputChanged {
                device_id: "d".into(),
                play: true,
            },
            UserEvent::DeviceCommand {
                device_id: "d".into(),
                payload: json!({"action": "pause"}),
            },
            UserEvent::FollowsChanged,
        ];
        for event in events {
            assert_eq!(UserEvent::decode(&event.encode()), Some(event));
        }
        assert_eq!(UserEvent::decode(br#"{"kind":"unknown"}"#), None);
        let ended = ReplicaEvent::SessionEnded {
            user: crate::domain::UserId(7),
            session: "abc".into(),
        };
        assert_eq!(ReplicaEvent::decode(&ended.encode()), Some(ended));
        assert_eq!(ReplicaEvent::decode(br#"{"kind":"unknown"}"#), None);
    }
}
