//! When a device's reports add up to a play worth keeping in `play_history`.
//!
//! A play counts once it has been *listened to* for 30 s or half the track, whichever is
//! less. Listening time is what the reports show: while a device says it is playing, the
//! position it reports may advance by at most the wall time between reports (a seek forward
//! is not listening). A play that ends (another track, nothing, the device gone) is credited
//! with the time since its last report if it was playing. A play is recorded at most once;
//! going back to the start of the same track after it was recorded is a new play.

use super::NowPlaying;

/// Listening time after which any track counts as played.
pub const PLAYED_AFTER_MS: i64 = 30_000;

/// How long a paused play lasts unreported before it is taken to have ended.
pub const PAUSED_FOR_MS: i64 = 30 * 60 * 1000;

/// A report this close to the start of the track, after a recorded play, is a replay.
const RESTART_WITHIN_MS: i64 = 2_000;

/// Listening needed for a track of `duration_ms` (unknown: 30 s).
pub fn threshold(duration_ms: Option<i64>) -> i64 {
    match duration_ms {
        Some(duration) if duration > 0 => (duration / 2).min(PLAYED_AFTER_MS),
        _ => PLAYED_AFTER_MS,
    }
}

/// A play that just counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub track_id: String,
    /// When the play began, in ms since the epoch.
    pub started_at: i64,
    /// How long it had been listened to when it counted.
    pub listened_ms: i64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Play {
    track_id: String,
    /// When the play began (0 in state saved before this was kept: its first report then).
    #[serde(default)]
    started_at: i64,
    progress_ms: i64,
    at: i64,
    is_playing: bool,
    listened_ms: i64,
    recorded: bool,
    /// The track's length as known when the play began (a later report may be of another
    /// track, whose length is all the caller then knows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duration_ms: Option<i64>,
}

impl Play {
    fn duration(&self, duration_of: &impl Fn(&str) -> Option<i64>) -> Option<i64> {
        self.duration_ms
            .or_else(|| duration_of(&self.track_id))
            .filter(|d| *d > 0)
    }
}

/// One device's current play (kept as JSON between reports the enrichment job applies).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PlayTracker {
    current: Option<Play>,
}

impl PlayTracker {
    /// Takes a report (`None`: nothing playing) made at `at_ms`; `duration_of` gives a track's
    /// length when known. Returns the track to record, if a play just counted.
    pub fn report(
        &mut self,
        report: Option<&NowPlaying>,
        at_ms: i64,
        duration_of: impl Fn(&str) -> Option<i64>,
    ) -> Option<Counted> {
        let same_track = match (&self.current, report) {
            (Some(play), Some(report)) => play.track_id == report.track_id,
            _ => false,
        };
        if !same_track {
            let finished = self.finish(at_ms, &duration_of);
            self.current = report.map(|r| Play {
                track_id: r.track_id.clone(),
                progress_ms: r.progress_ms,
                at: at_ms,
                started_at: at_ms,
                is_playing: r.is_playing,
                listened_ms: 0,
                recorded: false,
                duration_ms: duration_of(&r.track_id),
            });
            return finished;
        }
        let (Some(play), Some(report)) = (self.current.as_mut(), report) else {
            return None;
        };
        let advance = report.progress_ms - play.progress_ms;
        if play.recorded && advance < 0 && report.progress_ms <= RESTART_WITHIN_MS {
            play.listened_ms = 0;
            play.recorded = false;
        } else if play.is_playing && advance > 0 {
            let elapsed = (at_ms - play.at).max(0);
            play.listened_ms += advance.min(elapsed);
        }
        play.progress_ms = report.progress_ms;
        play.at = at_ms;
        play.is_playing = report.is_playing;
        Self::check(play, &duration_of)
    }

    /// Ends the current play at `at_ms` (the device went away); returns the track to record,
    /// if it counted.
    pub fn finish(
        &mut self,
        at_ms: i64,
        duration_of: &impl Fn(&str) -> Option<i64>,
    ) -> Option<Counted> {
        let mut play = self.current.take()?;
        if play.is_playing {
            let mut elapsed = (at_ms - play.at).max(0);
            if let Some(duration) = play.duration(duration_of) {
                elapsed = elapsed.min((duration - play.progress_ms).max(0));
            }
            play.listened_ms += elapsed;
        }
        Self::check(&mut play, duration_of)
    }

    /// When the current play, unreported since, would have ended: its track's end when it
    /// was playing and its length is known; [`PAUSED_FOR_MS`] after its last report when it
    /// was paused (a pause is not an end); its last report otherwise. `None` when idle.
    pub fn expected_end(&self) -> Option<i64> {
        let play = self.current.as_ref()?;
        Some(match play.duration_ms {
            _ if !play.is_playing => play.at + PAUSED_FOR_MS,
            Some(duration) => play.at + (duration - play.progress_ms).max(0),
            None => play.at,
        })
    }

    fn check(play: &mut Play, duration_of: &impl Fn(&str) -> Option<i64>) -> Option<Counted> {
        if !play.recorded && play.listened_ms >= threshold(play.duration(duration_of)) {
            play.recorded = true;
            return Some(Counted {
                track_id: play.track_id.clone(),
                started_at: if play.started_at > 0 {
                    play.started_at
                } else {
                    play.at
                },
                listened_ms: play.listened_ms,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(track: &str, progress_ms: i64, is_playing: bool) -> NowPlaying {
        NowPlaying {
            track_id: track.into(),
            progress_ms,
            is_playing,
            at: 0,
            track: None,
        }
    }

    fn unknown(_: &str) -> Option<i64> {
        None
    }

    #[test]
    fn thresholds_are_thirty_seconds_or_half_the_track() {
        assert_eq!(threshold(None), 30_000);
        assert_eq!(threshold(Some(40_000)), 20_000);
        assert_eq!(threshold(Some(600_000)), 30_000);
        assert_eq!(threshold(Some(0)), 30_000);
    }

    #[test]
    fn a_play_counts_once_after_thirty_seconds_of_listening() {
        let mut tracker = PlayTracker::default();
        assert_eq!(tracker.report(Some(&at("t", 0, true)), 0, unknown), None);
        assert_eq!(
            tracker.report(Some(&at("t", 20_000, true)), 20_000, unknown),
            None
        );
        assert_eq!(
            tracker
                .report(Some(&at("t", 30_000, true)), 30_000, unknown)
                .map(|c| c.track_id),
            Some("t".into())
        );
        assert_eq!(
            tracker.report(Some(&at("t", 60_000, true)), 60_000, unknown),
            None
        );
        // Switching track does not record the same play again.
        assert_eq!(
            tracker.report(Some(&at("u", 0, true)), 61_000, unknown),
            None
        );
    }

    #[test]
    fn a_seek_forward_is_not_listening() {
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("t", 0, true)), 0, unknown);
        assert_eq!(
            tracker.report(Some(&at("t", 100_000, true)), 1_000, unknown),
            None
        );
        assert_eq!(
            tracker
                .report(Some(&at("t", 129_000, true)), 30_000, unknown)
                .map(|c| c.track_id),
            Some("t".into())
        );
    }

    #[test]
    fn paused_time_does_not_count() {
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("t", 0, true)), 0, unknown);
        tracker.report(Some(&at("t", 10_000, false)), 10_000, unknown);
        assert_eq!(
            tracker.report(Some(&at("t", 10_000, false)), 90_000, unknown),
            None
        );
        assert_eq!(tracker.finish(200_000, &unknown), None);
    }

    #[test]
    fn a_play_that_ends_is_credited_with_the_time_since_its_last_report() {
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("t", 0, true)), 0, unknown);
        assert_eq!(
            tracker
                .report(Some(&at("u", 0, true)), 31_000, unknown)
                .map(|c| c.track_id),
            Some("t".into())
        );
        assert_eq!(tracker.report(None, 40_000, unknown), None);
        tracker.report(Some(&at("v", 0, true)), 50_000, unknown);
        assert_eq!(
            tracker.finish(85_000, &unknown).map(|c| c.track_id),
            Some("v".into())
        );
    }

    #[test]
    fn short_tracks_count_after_half_and_credit_stops_at_their_end() {
        let short = |_: &str| Some(20_000);
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("t", 0, true)), 0, short);
        assert_eq!(
            tracker
                .report(Some(&at("t", 10_000, true)), 10_000, short)
                .map(|c| c.track_id),
            Some("t".into())
        );
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("t", 15_000, true)), 0, short);
        // Only 5 s were left of the track, however long the device stayed silent.
        assert_eq!(tracker.finish(60_000, &short), None);
    }

    #[test]
    fn going_back_to_the_start_after_a_recorded_play_is_a_new_play() {
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("t", 0, true)), 0, unknown);
        assert!(
            tracker
                .report(Some(&at("t", 30_000, true)), 30_000, unknown)
                .is_some()
        );
        assert_eq!(
            tracker.report(Some(&at("t", 0, true)), 31_000, unknown),
            None
        );
        assert_eq!(
            tracker
                .report(Some(&at("t", 30_000, true)), 61_000, unknown)
                .map(|c| c.track_id),
            Some("t".into())
        );
    }

    #[test]
    fn a_play_ended_by_another_track_counts_by_its_own_length() {
        // Only the track just reported has a known length, as in the pipeline's job.
        let only = |id: &'static str, duration: i64| move |t: &str| (t == id).then_some(duration);
        let mut tracker = PlayTracker::default();
        tracker.report(Some(&at("short", 0, true)), 0, only("short", 2_000));
        assert_eq!(tracker.expected_end(), Some(2_000));
        assert_eq!(
            tracker
                .report(Some(&at("next", 0, true)), 1_200, only("next", 200_000))
                .map(|c| c.track_id),
            Some("short".into())
        );
    }

    #[test]
    fn a_silent_play_ends_at_its_tracks_end_or_its_last_report() {
        let mut tracker = PlayTracker::default();
        assert_eq!(tracker.expected_end(), None);
        tracker.report(Some(&at("t", 500, true)), 10_000, |_| Some(2_000));
        assert_eq!(tracker.expected_end(), Some(11_500));
        // Paused: a pause is not an end.
        tracker.report(Some(&at("t", 900, false)), 10_400, |_| Some(2_000));
        assert_eq!(tracker.expected_end(), Some(10_400 + PAUSED_FOR_MS));
        let mut unknown_length = PlayTracker::default();
        unknown_length.report(Some(&at("u", 0, true)), 5_000, unknown);
        assert_eq!(unknown_length.expected_end(), Some(5_000));
    }
}
