//! Presence: which of a user's devices are online, what each plays, which one is the output;
//! and, through follows, which friends are listening now.
//!
//! * [`DeviceEntry`] is one device's presence as its owner publishes it. A device with a
//!   socket is owned by the replica that holds the socket (instance `{device_id}/{replica}`);
//!   a player reporting over REST has the shared instance `{device_id}/rest`. Only the owner
//!   writes an instance, and every write carries a higher `seq`.
//! * [`registry`] is where entries live for every replica to read: a port with an in-process
//!   and a Redis implementation. Entries carry an expiry their owner keeps pushing forward, so
//!   the entries of a replica that died vanish within the TTL.
//! * [`view`] turns a user's entries into the metas the `phoenix` client's `Presence` class
//!   expects, and changes into `presence_diff`s. Pure, so every rule is unit-tested.
//! * [`plays`] decides when a report means a track was played (for `play_history`).
//!
//! The actor that ties these to sockets is [`crate::realtime::presence`].

pub mod input;
pub mod plays;
pub mod registry;
pub mod view;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use input::PlayReport;
pub use registry::{AnyRegistry, MemoryRegistry, RedisRegistry, Registry, RegistryError};

/// What a device reports it plays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NowPlaying {
    pub track_id: String,
    /// Position in the track when reported.
    pub progress_ms: i64,
    pub is_playing: bool,
    /// When it was reported, in milliseconds since the Unix epoch.
    pub at: i64,
    /// The track as the catalog knows it, when the report came through the now-playing
    /// pipeline (`POST /ingest/plays`), with its artwork once that is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<crate::store::catalog::TrackView>,
}

/// One device's presence, as its owner writes it to the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    pub device_id: String,
    pub name: String,
    pub kind: String,
    /// When the device came online, in milliseconds since the Unix epoch.
    pub online_at: i64,
    pub now_playing: Option<NowPlaying>,
    /// Raised by the owner on every change, so readers can tell a newer entry from an older.
    pub seq: u64,
    /// After this (milliseconds since the epoch) the entry no longer counts: its owner stopped
    /// refreshing it.
    pub expires_at: i64,
}

impl DeviceEntry {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at > now_ms
    }
}

/// The registry field of an entry: `{device_id}/{owner}`.
pub type InstanceId = String;

/// The instance of a device owned by `owner` (a replica id, or [`REST_OWNER`]).
pub fn instance_id(device_id: &str, owner: &str) -> InstanceId {
    format!("{device_id}/{owner}")
}

/// The owner of entries written by `POST /now-playing/` (any replica may write them).
pub const REST_OWNER: &str = "rest";

/// Everything the registry holds for one user: live entries and the output device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Shared with the in-process registry (and then with the views built from it).
    pub entries: BTreeMap<InstanceId, Arc<DeviceEntry>>,
    pub output: Option<String>,
}

impl Snapshot {
    /// Whether some live entry is for `device_id`.
    pub fn has_device(&self, device_id: &str) -> bool {
        self.entries.values().any(|e| e.device_id == device_id)
    }

    /// What the user is listening to, as one answer: the output device's report if it has
    /// one, else the most recent report (playing ones first).
    pub fn listening(&self) -> Option<&DeviceEntry> {
        let reporting = self.entries.values().filter(|e| e.now_playing.is_some());
        let output = self.output.as_deref();
        reporting.map(|e| &**e).max_by_key(|e| {
            let playing = e.now_playing.as_ref().is_some_and(|n| n.is_playing);
            let at = e.now_playing.as_ref().map_or(0, |n| n.at);
            (Some(e.device_id.as_str()) == output, playing, at)
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(device: &str, playing: Option<(bool, i64)>) -> DeviceEntry {
        DeviceEntry {
            device_id: device.into(),
            name: device.into(),
            kind: "phone".into(),
            online_at: 1,
            now_playing: playing.map(|(is_playing, at)| NowPlaying {
                track_id: format!("t-{device}"),
                progress_ms: 0,
                is_playing,
                at,
                track: None,
            }),
            seq: 1,
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn listening_prefers_the_output_device_then_playing_then_recent() {
        let mut snapshot = Snapshot::default();
        assert!(snapshot.listening().is_none());
        snapshot
            .entries
            .insert("a/r".into(), Arc::new(entry("a", Some((false, 30)))));
        snapshot
            .entries
            .insert("b/r".into(), Arc::new(entry("b", Some((true, 10)))));
        snapshot
            .entries
            .insert("c/r".into(), Arc::new(entry("c", None)));
        snapshot
            .entries
            .insert("d/r".into(), Arc::new(entry("d", Some((true, 20)))));
        assert_eq!(snapshot.listening().unwrap().device_id, "d");
        snapshot.output = Some("a".into());
        assert_eq!(snapshot.listening().unwrap().device_id, "a");
        snapshot.output = Some("c".into());
        assert_eq!(snapshot.listening().unwrap().device_id, "d");
    }
}
