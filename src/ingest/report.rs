//! A play report as `POST /ingest/plays` takes it, validated at the edge: every field that
//! reaches the job queue is within its bounds.

use serde::{Deserialize, Serialize};

use super::normalise;
use crate::domain::{InvalidInput, parse_text};

/// Longest title, artist or album.
const TEXT_MAX: usize = 300;
/// Longest track accepted: a day.
const DURATION_MAX_MS: i64 = 24 * 60 * 60 * 1000;
/// How far in the past a report's `played_at` may lie.
const PLAYED_AT_PAST_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// How far ahead of the hub's clock a `played_at` may be (players' clocks drift).
const PLAYED_AT_AHEAD_MS: i64 = 5 * 60 * 1000;
/// Longest `source` (the player app's name).
const SOURCE_MAX: usize = 64;

/// The JSON body (or `metadata` part) of a report.
#[derive(Debug, Deserialize)]
pub struct ReportInput {
    title: Option<String>,
    artist: Option<String>,
    album: Option<String>,
    duration_ms: Option<i64>,
    isrc: Option<String>,
    track_number: Option<i64>,
    progress_ms: Option<i64>,
    is_playing: Option<bool>,
    played_at: Option<String>,
    source: Option<String>,
}

/// A validated report, as the enrichment job gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub title: String,
    pub artist: String,
    pub album: Option<String>,
    pub duration_ms: i64,
    pub isrc: Option<String>,
    pub track_number: Option<i64>,
    pub progress_ms: i64,
    pub is_playing: bool,
    /// When the player says the play started, in milliseconds since the epoch.
    pub played_at: Option<i64>,
    pub source: Option<String>,
}

fn required(field: &'static str, value: Option<String>) -> Result<String, InvalidInput> {
    let value = value.ok_or_else(|| InvalidInput::new(field, "is required"))?;
    Ok(normalise::tidy(&parse_text(field, &value, 1, TEXT_MAX)?))
}

impl ReportInput {
    /// Checks every field; `now_ms` is the hub's clock (for `played_at`).
    pub fn parse(self, now_ms: i64) -> Result<Report, InvalidInput> {
        let title = required("title", self.title)?;
        let artist = required("artist", self.artist)?;
        let album = match self.album {
            Some(album) if !album.trim().is_empty() => {
                Some(normalise::tidy(&parse_text("album", &album, 1, TEXT_MAX)?))
            }
            _ => None,
        };
        let duration_ms = self
            .duration_ms
            .ok_or_else(|| InvalidInput::new("duration_ms", "is required"))?;
        if !(1..=DURATION_MAX_MS).contains(&duration_ms) {
            return Err(InvalidInput::new(
                "duration_ms",
                "must be between 1 and 86400000",
            ));
        }
        let isrc = match self.isrc {
            Some(raw) if !raw.trim().is_empty() => {
                Some(normalise::isrc(&raw).ok_or_else(|| {
                    InvalidInput::new(
                        "isrc",
                        "must be an ISRC: 2 letters, 3 letters or digits, 7 digits",
                    )
                })?)
            }
            _ => None,
        };
        if let Some(number) = self.track_number
            && !(1..=999).contains(&number)
        {
            return Err(InvalidInput::new(
                "track_number",
                "must be between 1 and 999",
            ));
        }
        let progress_ms = self.progress_ms.unwrap_or(0);
        if !(0..=duration_ms).contains(&progress_ms) {
            return Err(InvalidInput::new(
                "progress_ms",
                "must be between 0 and duration_ms",
            ));
        }
        let played_at = self
            .played_at
            .map(|raw| parse_played_at(&raw, now_ms))
            .transpose()?;
        let source = self
            .source
            .map(|raw| parse_text("source", &raw, 1, SOURCE_MAX))
            .transpose()?;
        Ok(Report {
            title,
            artist,
            album,
            duration_ms,
            isrc,
            track_number: self.track_number,
            progress_ms,
            is_playing: self.is_playing.unwrap_or(true),
            played_at,
            source,
        })
    }
}

fn parse_played_at(raw: &str, now_ms: i64) -> Result<i64, InvalidInput> {
    let at = chrono::DateTime::parse_from_rfc3339(raw)
        .map_err(|_| InvalidInput::new("played_at", "must be an RFC 3339 time"))?
        .timestamp_millis();
    if at < now_ms - PLAYED_AT_PAST_MS || at > now_ms + PLAYED_AT_AHEAD_MS {
        return Err(InvalidInput::new(
            "played_at",
            "must be within the last 30 days (and not ahead of now)",
        ));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn parse(body: Value) -> Result<Report, String> {
        serde_json::from_value::<ReportInput>(body)
            .map_err(|e| e.to_string())?
            .parse(NOW)
            .map_err(|e| e.to_string())
    }

    fn good() -> Value {
        json!({"title": " Get  Lucky ", "artist": "Daft Punk", "album": "RAM", "duration_ms": 248000})
    }

    #[test]
    fn a_minimal_report_gets_defaults_and_tidy_text() {
        let report = parse(good()).unwrap();
        assert_eq!(report.title, "Get Lucky");
        assert_eq!(report.progress_ms, 0);
        assert!(report.is_playing);
        assert_eq!(report.isrc, None);
    }

    #[test]
    fn every_field_is_bounded() {
        let cases = [
            ("title", json!("")),
            ("title", json!("x".repeat(301))),
            ("artist", json!("a\u{7}b")),
            ("duration_ms", json!(0)),
            ("duration_ms", json!(86_400_001)),
            ("isrc", json!("nope")),
            ("track_number", json!(0)),
            ("progress_ms", json!(-1)),
            ("progress_ms", json!(248_001)),
            ("played_at", json!("yesterday")),
            ("played_at", json!("2020-01-01T00:00:00Z")),
            ("source", json!("s".repeat(65))),
        ];
        for (field, value) in cases {
            let mut body = good();
            body[field] = value.clone();
            let error = parse(body).expect_err(field);
            assert!(error.starts_with(field), "{field} = {value}: {error}");
        }
        let mut missing = good();
        missing.as_object_mut().unwrap().remove("duration_ms");
        assert!(parse(missing).unwrap_err().starts_with("duration_ms"));
    }

    #[test]
    fn played_at_is_read_as_rfc3339() {
        let mut body = good();
        body["played_at"] = json!("2027-01-15T08:00:00+01:00");
        let at = parse(body).unwrap().played_at.unwrap();
        // 2027-01-15T08:00:00Z is NOW; the report's time is an hour before it.
        assert_eq!(at, NOW - 3_600_000);
    }
}
