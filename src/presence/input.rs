//! What clients send about presence, parsed once: `now_playing` reports (socket and REST),
//! `transfer` and `command`. Each parse returns a sentence a client can be shown.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::domain::{DeviceId, InvalidInput, TrackId};

/// Longest position accepted in a report: a day.
const MAX_PROGRESS_MS: i64 = 24 * 60 * 60 * 1000;

/// What a device reports it plays (the server stamps the time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayReport {
    pub track_id: String,
    pub progress_ms: i64,
    pub is_playing: bool,
}

/// A `now_playing` body: `{track_id, progress_ms, is_playing}`; `track_id: null` means
/// nothing is playing. `progress_ms` defaults to 0, `is_playing` to true.
#[derive(Debug, Deserialize)]
pub struct PlayReportInput {
    track_id: Option<String>,
    #[serde(default)]
    progress_ms: i64,
    #[serde(default = "playing_by_default")]
    is_playing: bool,
}

fn playing_by_default() -> bool {
    true
}

impl PlayReportInput {
    /// The report, or `None` when nothing is playing.
    pub fn parse(self) -> Result<Option<PlayReport>, InvalidInput> {
        let Some(track_id) = self.track_id else {
            return Ok(None);
        };
        let track_id = TrackId::parse(&track_id)?;
        if !(0..=MAX_PROGRESS_MS).contains(&self.progress_ms) {
            return Err(InvalidInput::new(
                "progress_ms",
                "must be between 0 and 86400000",
            ));
        }
        Ok(Some(PlayReport {
            track_id: track_id.as_str().to_owned(),
            progress_ms: self.progress_ms,
            is_playing: self.is_playing,
        }))
    }
}

/// A `transfer` body: `{device_id, play}`.
#[derive(Debug, Deserialize)]
pub struct TransferInput {
    device_id: String,
    #[serde(default)]
    play: bool,
}

impl TransferInput {
    pub fn parse(self) -> Result<(DeviceId, bool), InvalidInput> {
        Ok((DeviceId::parse(&self.device_id)?, self.play))
    }
}

/// The actions a `command` may carry.
pub const ACTIONS: [&str; 5] = ["play", "pause", "next", "previous", "seek"];

/// A `command` body: `{device_id, action, progress_ms?}`; `seek` needs `progress_ms`.
#[derive(Debug, Deserialize)]
pub struct CommandInput {
    device_id: String,
    action: String,
    progress_ms: Option<i64>,
}

impl CommandInput {
    /// The target device and the `command` payload it will be pushed (naming the sender).
    pub fn parse(self, from: &DeviceId) -> Result<(DeviceId, Value), InvalidInput> {
        let device = DeviceId::parse(&self.device_id)?;
        if !ACTIONS.contains(&self.action.as_str()) {
            return Err(InvalidInput::new(
                "action",
                "must be one of play, pause, next, previous, seek",
            ));
        }
        if let Some(progress) = self.progress_ms
            && !(0..=MAX_PROGRESS_MS).contains(&progress)
        {
            return Err(InvalidInput::new(
                "progress_ms",
                "must be between 0 and 86400000",
            ));
        }
        if self.action == "seek" && self.progress_ms.is_none() {
            return Err(InvalidInput::new("progress_ms", "is required to seek"));
        }
        let mut payload = json!({"action": self.action, "from_device_id": from.as_str()});
        if let (Some(progress), Some(map)) = (self.progress_ms, payload.as_object_mut()) {
            map.insert("progress_ms".into(), json!(progress));
        }
        Ok((device, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(body: Value) -> Result<Option<PlayReport>, String> {
        serde_json::from_value::<PlayReportInput>(body)
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reports_parse_with_defaults_and_null_means_nothing() {
        assert_eq!(
            report(json!({"track_id": "t1"})),
            Ok(Some(PlayReport {
                track_id: "t1".into(),
                progress_ms: 0,
                is_playing: true
            }))
        );
        assert_eq!(report(json!({"track_id": null})), Ok(None));
        assert!(report(json!({"track_id": "t", "progress_ms": -1})).is_err());
        assert!(report(json!({"track_id": "t", "progress_ms": "x"})).is_err());
        assert!(report(json!({"track_id": ""})).is_err());
        assert!(report(json!({"track_id": "t", "is_playing": 1})).is_err());
    }

    #[test]
    fn commands_name_a_known_action_and_seek_needs_a_position() {
        let from = DeviceId::parse("me").unwrap();
        let parse = |body: Value| {
            serde_json::from_value::<CommandInput>(body)
                .map_err(|e| e.to_string())
                .and_then(|c| c.parse(&from).map_err(|e| e.to_string()))
        };
        let (device, payload) = parse(json!({"device_id": "d1", "action": "pause"})).unwrap();
        assert_eq!(device.as_str(), "d1");
        assert_eq!(payload, json!({"action": "pause", "from_device_id": "me"}));
        let (_, payload) =
            parse(json!({"device_id": "d1", "action": "seek", "progress_ms": 5})).unwrap();
        assert_eq!(payload["progress_ms"], 5);
        assert!(parse(json!({"device_id": "d1", "action": "seek"})).is_err());
        assert!(parse(json!({"device_id": "d1", "action": "dance"})).is_err());
        assert!(parse(json!({"device_id": "a b", "action": "play"})).is_err());
        assert!(parse(json!({"action": "play"})).is_err());
    }
}
