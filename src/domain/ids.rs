//! Typed identifiers, so a user id can never be passed where a track id belongs.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{InvalidInput, parse_text};

/// A user's numeric id, assigned by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub i64);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Longest accepted device id; clients generate UUIDs or similar.
const DEVICE_ID_MAX: usize = 64;

/// A device's id, chosen by the client once and kept (or assigned by the server).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(String);

impl DeviceId {
    /// Accepts 1 to 64 characters of letters, digits, `-`, `_`, `.` and `:`.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let ok = !raw.is_empty()
            && raw.len() <= DEVICE_ID_MAX
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidInput::new(
                "device_id",
                "must be 1 to 64 letters, digits, '-', '_', '.' or ':'",
            ))
        }
    }

    /// A fresh random id for a device that did not bring one.
    pub fn generate() -> Self {
        Self(crate::auth::random_token(12))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What sort of device this is, as shown in device lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Web,
    Desktop,
    Phone,
    Tablet,
    Speaker,
    Tv,
    Car,
    #[default]
    Other,
}

impl DeviceKind {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        serde_json::from_value(serde_json::Value::String(raw.to_owned())).map_err(|_| {
            InvalidInput::new(
                "device_kind",
                "must be one of web, desktop, phone, tablet, speaker, tv, car, other",
            )
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Web => "web",
            Self::Desktop => "desktop",
            Self::Phone => "phone",
            Self::Tablet => "tablet",
            Self::Speaker => "speaker",
            Self::Tv => "tv",
            Self::Car => "car",
            Self::Other => "other",
        }
    }
}

/// Longest accepted track id. Track ids are opaque strings chosen by the catalog's owner.
pub const TRACK_ID_MAX: usize = 128;

/// An opaque catalog id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TrackId(String);

impl TrackId {
    /// Accepts 1 to 128 characters without control characters or surrounding spaces.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let text = parse_text("track id", raw, 1, TRACK_ID_MAX)?;
        if text.len() != raw.len() {
            return Err(InvalidInput::new(
                "track id",
                "must not start or end with spaces",
            ));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_is_a_valid_device_id() {
        assert!(DeviceId::parse("0b7d6c1e-4f0a-4c55-9d1a-2f8e1d3c4b5a").is_ok());
    }

    #[test]
    fn a_device_id_with_spaces_or_slashes_is_rejected() {
        assert!(DeviceId::parse("my phone").is_err());
        assert!(DeviceId::parse("a/b").is_err());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn generated_device_ids_parse() {
        let id = DeviceId::generate();
        assert_eq!(DeviceId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn device_kinds_parse_from_lowercase_names() {
        assert_eq!(DeviceKind::parse("phone"), Ok(DeviceKind::Phone));
        assert!(DeviceKind::parse("toaster").is_err());
        assert_eq!(DeviceKind::Speaker.as_str(), "speaker");
    }

    #[test]
    fn track_ids_are_opaque_but_bounded() {
        assert!(TrackId::parse("at://did:plc:abc/fm.plyr.track/3k2").is_ok());
        assert!(TrackId::parse("").is_err());
        assert!(TrackId::parse(" padded").is_err());
        assert!(TrackId::parse("tab\there").is_err());
        assert!(TrackId::parse(&"t".repeat(TRACK_ID_MAX + 1)).is_err());
    }
}
