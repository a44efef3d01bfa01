//! The play queue: its state, its validation, and the operations devices apply to it.
//!
//! Every entry has a server-assigned `entry_id` (parallel to `track_ids`), so operations name
//! entries rather than positions: two devices editing at once both keep their edits, because
//! each operation is applied to whatever the latest state is. Operations are pure functions
//! of the state (and, for `shuffle`, a random source); the session actor and the store decide
//! when they run.

use std::collections::{HashMap, HashSet};

use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ids::TRACK_ID_MAX;
use super::{InvalidInput, parse_text};

/// How many times `shuffle` reshuffles to get an order different from the current one.
const SHUFFLE_ATTEMPTS: usize = 8;

/// Characters of randomness in a generated entry id.
const ENTRY_ID_BYTES: usize = 6;

/// The field (kept with the state, hidden from nothing) that remembers the entry order before
/// a server-side shuffle, so `unshuffle` restores it exactly, duplicates included.
const ORIGINAL_ENTRY_ORDER: &str = "original_order_entry_ids";

/// What happens at the end of the queue and on `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepeatMode {
    #[default]
    None,
    One,
    All,
}

fn default_true() -> bool {
    true
}

/// One user's queue, as stored and as sent to clients. Fields the server does not know are
/// kept in `extra` exactly as a client sent them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    #[serde(default)]
    pub track_ids: Vec<String>,
    /// Server-assigned, parallel to `track_ids`, unique within the queue, stable for the
    /// life of the entry.
    #[serde(default)]
    pub entry_ids: Vec<String>,
    #[serde(default)]
    pub current_index: usize,
    #[serde(default)]
    pub current_track_id: Option<String>,
    #[serde(default)]
    pub shuffle: bool,
    /// The track order before shuffling (plyr.fm's field; track ids).
    #[serde(default)]
    pub original_order_ids: Vec<String>,
    #[serde(default)]
    pub repeat_mode: RepeatMode,
    #[serde(default)]
    pub progress_ms: u64,
    /// Always filled from the user's preferences when the state is served.
    #[serde(default = "default_true")]
    pub auto_advance: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for QueueState {
    fn default() -> Self {
        Self {
            track_ids: Vec::new(),
            entry_ids: Vec::new(),
            current_index: 0,
            current_track_id: None,
            shuffle: false,
            original_order_ids: Vec::new(),
            repeat_mode: RepeatMode::None,
            progress_ms: 0,
            auto_advance: true,
            extra: Map::new(),
        }
    }
}

/// A fresh entry id.
fn new_entry_id() -> String {
    crate::auth::random_token(ENTRY_ID_BYTES)
}

impl QueueState {
    /// Checks a state a client sent (before entry ids are assigned): track ids of sane
    /// length, at most `max_entries` of them, `current_index` in range (0 when empty).
    pub fn validate_incoming(&self, max_entries: usize) -> Result<(), InvalidInput> {
        if self.track_ids.len() > max_entries {
            return Err(InvalidInput::new(
                "track_ids",
                format!("a queue holds at most {max_entries} entries"),
            ));
        }
        for id in &self.track_ids {
            parse_text("track_ids", id, 1, TRACK_ID_MAX)?;
        }
        let in_range = if self.track_ids.is_empty() {
            self.current_index == 0
        } else {
            self.current_index < self.track_ids.len()
        };
        if !in_range {
            return Err(InvalidInput::new(
                "current_index",
                format!(
                    "must be within the queue's {} entries",
                    self.track_ids.len()
                ),
            ));
        }
        Ok(())
    }

    /// The invariants every stored state keeps.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.entry_ids.len() != self.track_ids.len() {
            return Err("entry_ids and track_ids differ in length".into());
        }
        let unique: HashSet<&String> = self.entry_ids.iter().collect();
        if unique.len() != self.entry_ids.len() {
            return Err("entry ids repeat".into());
        }
        let in_range = if self.track_ids.is_empty() {
            self.current_index == 0
        } else {
            self.current_index < self.track_ids.len()
        };
        if !in_range {
            return Err("current_index out of range".into());
        }
        if self.current_track_id.as_ref() != self.track_ids.get(self.current_index) {
            return Err("current_track_id does not match current_index".into());
        }
        Ok(())
    }

    /// Makes `current_track_id` agree with `current_index`.
    fn settle(&mut self) {
        if self.track_ids.is_empty() {
            self.current_index = 0;
        } else if self.current_index >= self.track_ids.len() {
            self.current_index = self.track_ids.len() - 1;
        }
        self.current_track_id = self.track_ids.get(self.current_index).cloned();
    }

    /// Takes `incoming` (a full snapshot a client sent) as the new state. Entries that survive
    /// keep their ids: by the `entry_ids` the client sent where they name an entry of this
    /// state with the same track, otherwise by matching track ids in order.
    pub fn replace_with(&self, mut incoming: QueueState) -> QueueState {
        let mut unused: HashMap<&str, Vec<&str>> = HashMap::new();
        for (track, entry) in self.track_ids.iter().zip(&self.entry_ids).rev() {
            unused
                .entry(track.as_str())
                .or_default()
                .push(entry.as_str());
        }
        let known: HashMap<&str, &str> = self
            .entry_ids
            .iter()
            .map(String::as_str)
            .zip(self.track_ids.iter().map(String::as_str))
            .collect();
        // Entry ids a client sent count only when they still line up with its track ids (a
        // client that edited `track_ids` of a state it fetched may send stale ones).
        let sent = std::mem::take(&mut incoming.entry_ids);
        let sent = if sent.len() == incoming.track_ids.len() {
            sent
        } else {
            Vec::new()
        };
        let mut taken: HashSet<String> = HashSet::new();
        let mut entry_ids = Vec::with_capacity(incoming.track_ids.len());
        for (index, track) in incoming.track_ids.iter().enumerate() {
            let claimed = sent
                .get(index)
                .filter(|id| {
                    known.get(id.as_str()) == Some(&track.as_str()) && !taken.contains(*id)
                })
                .cloned();
            let id = claimed.or_else(|| {
                let candidates = unused.get_mut(track.as_str())?;
                while let Some(candidate) = candidates.pop() {
                    if !taken.contains(candidate) {
                        return Some(candidate.to_owned());
                    }
                }
                None
            });
            let id = id.unwrap_or_else(|| fresh_id(&taken));
            taken.insert(id.clone());
            entry_ids.push(id);
        }
        incoming.entry_ids = entry_ids;
        incoming.settle();
        incoming
    }

    fn position(&self, entry: &str) -> Option<usize> {
        self.entry_ids.iter().position(|e| e == entry)
    }

    fn insert(&mut self, at: usize, tracks: &[String]) {
        let taken: HashSet<String> = self.entry_ids.iter().cloned().collect();
        let mut taken = taken;
        for (offset, track) in tracks.iter().enumerate() {
            let id = fresh_id(&taken);
            taken.insert(id.clone());
            self.track_ids.insert(at + offset, track.clone());
            self.entry_ids.insert(at + offset, id);
        }
    }

    /// Applies one operation; `Err(Skipped)` when it names an entry that is gone or asks for
    /// something the state does not allow (the state is then unchanged).
    pub fn apply(
        &mut self,
        op: &QueueOp,
        max_entries: usize,
        rng: &mut impl Rng,
    ) -> Result<(), Skipped> {
        let added = match op {
            QueueOp::Append { track_ids } | QueueOp::PlayNext { track_ids } => track_ids.len(),
            QueueOp::PlayNow { .. } => 1,
            _ => 0,
        };
        if self.track_ids.len() + added > max_entries {
            return Err(Skipped);
        }
        match op {
            QueueOp::Append { track_ids } => {
                let end = self.track_ids.len();
                self.insert(end, track_ids);
            }
            QueueOp::PlayNext { track_ids } => {
                let at = if self.track_ids.is_empty() {
                    0
                } else {
                    self.current_index + 1
                };
                self.insert(at, track_ids);
            }
            QueueOp::PlayNow { track_id } => {
                if self.track_ids.is_empty() {
                    self.insert(0, std::slice::from_ref(track_id));
                    self.current_index = 0;
                } else {
                    self.insert(self.current_index + 1, std::slice::from_ref(track_id));
                    self.current_index += 1;
                }
                self.progress_ms = 0;
            }
            QueueOp::Remove { entry_id } => {
                let at = self.position(entry_id).ok_or(Skipped)?;
                if at == self.current_index {
                    return Err(Skipped);
                }
                self.track_ids.remove(at);
                self.entry_ids.remove(at);
                if at < self.current_index {
                    self.current_index -= 1;
                }
            }
            QueueOp::Move {
                entry_id,
                after_entry_id,
            } => {
                let from = self.position(entry_id).ok_or(Skipped)?;
                if from <= self.current_index {
                    return Err(Skipped);
                }
                let anchor = match after_entry_id {
                    None => self.current_index,
                    Some(after) => {
                        let anchor = self.position(after).ok_or(Skipped)?;
                        if anchor < self.current_index || anchor == from {
                            return Err(Skipped);
                        }
                        anchor
                    }
                };
                let track = self.track_ids.remove(from);
                let entry = self.entry_ids.remove(from);
                let anchor = if anchor > from { anchor - 1 } else { anchor };
                self.track_ids.insert(anchor + 1, track);
                self.entry_ids.insert(anchor + 1, entry);
            }
            QueueOp::Jump { entry_id } => {
                self.current_index = self.position(entry_id).ok_or(Skipped)?;
                self.progress_ms = 0;
            }
            QueueOp::Next => {
                if self.track_ids.is_empty() {
                    return Err(Skipped);
                }
                match self.repeat_mode {
                    RepeatMode::One => {}
                    _ if self.current_index + 1 < self.track_ids.len() => self.current_index += 1,
                    RepeatMode::All => self.current_index = 0,
                    RepeatMode::None => return Err(Skipped),
                }
                self.progress_ms = 0;
            }
            QueueOp::Previous => {
                if self.track_ids.is_empty() {
                    return Err(Skipped);
                }
                match self.repeat_mode {
                    RepeatMode::One => {}
                    _ if self.current_index > 0 => self.current_index -= 1,
                    RepeatMode::All => self.current_index = self.track_ids.len() - 1,
                    // At the start with no repeat: restart the current track.
                    RepeatMode::None => {}
                }
                self.progress_ms = 0;
            }
            QueueOp::Shuffle => self.shuffle_up_next(rng),
            QueueOp::Unshuffle => self.unshuffle(),
            QueueOp::ClearUpNext => {
                let keep = if self.track_ids.is_empty() {
                    0
                } else {
                    self.current_index + 1
                };
                self.track_ids.truncate(keep);
                self.entry_ids.truncate(keep);
            }
            QueueOp::SetRepeat { mode } => self.repeat_mode = *mode,
            QueueOp::Seek { progress_ms } => {
                if self.track_ids.is_empty() {
                    return Err(Skipped);
                }
                self.progress_ms = *progress_ms;
            }
        }
        self.settle();
        Ok(())
    }

    /// The (entry id, track id) pairs from `start` on.
    fn up_next(&self, start: usize) -> Vec<(String, String)> {
        let entries = self.entry_ids.iter().skip(start).cloned();
        entries
            .zip(self.track_ids.iter().skip(start).cloned())
            .collect()
    }

    /// Writes `pairs` back from `start` on (as many as `up_next(start)` returned).
    fn set_up_next(&mut self, start: usize, pairs: Vec<(String, String)>) {
        let slots = self
            .entry_ids
            .iter_mut()
            .zip(self.track_ids.iter_mut())
            .skip(start);
        for ((entry_slot, track_slot), (entry, track)) in slots.zip(pairs) {
            *entry_slot = entry;
            *track_slot = track;
        }
    }

    /// Fisher–Yates over up-next only (rand's `shuffle`), retried for an order that differs
    /// from the current one when one exists; remembers the order before for `unshuffle`.
    fn shuffle_up_next(&mut self, rng: &mut impl Rng) {
        let start = if self.track_ids.is_empty() {
            0
        } else {
            self.current_index + 1
        };
        if !self.shuffle {
            self.original_order_ids = self.track_ids.clone();
            let order: Vec<Value> = self.entry_ids.iter().cloned().map(Value::String).collect();
            self.extra
                .insert(ORIGINAL_ENTRY_ORDER.into(), Value::Array(order));
        }
        self.shuffle = true;
        let mut pairs = self.up_next(start);
        let before: Vec<String> = pairs.iter().map(|(_, track)| track.clone()).collect();
        let distinct_tracks = before.iter().collect::<HashSet<_>>().len() > 1;
        for _ in 0..SHUFFLE_ATTEMPTS {
            pairs.shuffle(rng);
            let same = pairs.iter().map(|(_, track)| track).eq(before.iter());
            if !same || !distinct_tracks {
                break;
            }
        }
        self.set_up_next(start, pairs);
    }

    /// Puts up-next back in the order it had before shuffling: by the remembered entry order,
    /// or (for a shuffle a client made) by `original_order_ids`.
    fn unshuffle(&mut self) {
        let start = if self.track_ids.is_empty() {
            0
        } else {
            self.current_index + 1
        };
        let remembered: Option<Vec<String>> = self.extra.get(ORIGINAL_ENTRY_ORDER).and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
        });
        let mut pairs = self.up_next(start);
        let rank: HashMap<String, usize> = match remembered {
            Some(order) => order.into_iter().enumerate().map(|(i, e)| (e, i)).collect(),
            None => {
                // Rank each entry by the next unused occurrence of its track in the order.
                let mut slots: HashMap<&str, Vec<usize>> = HashMap::new();
                for (i, track) in self.original_order_ids.iter().enumerate().rev() {
                    slots.entry(track.as_str()).or_default().push(i);
                }
                pairs
                    .iter()
                    .filter_map(|(entry, track)| {
                        slots
                            .get_mut(track.as_str())
                            .and_then(Vec::pop)
                            .map(|i| (entry.clone(), i))
                    })
                    .collect()
            }
        };
        // Entries added after the shuffle keep their relative order, after the known ones.
        pairs.sort_by_key(|(entry, _)| rank.get(entry).copied().unwrap_or(usize::MAX));
        self.set_up_next(start, pairs);
        self.shuffle = false;
        self.original_order_ids.clear();
        self.extra.remove(ORIGINAL_ENTRY_ORDER);
    }

    /// Applies `ops` in order; returns the indexes of those that were skipped.
    pub fn apply_all(
        &mut self,
        ops: &[QueueOp],
        max_entries: usize,
        rng: &mut impl Rng,
    ) -> Vec<usize> {
        ops.iter()
            .enumerate()
            .filter_map(|(index, op)| self.apply(op, max_entries, rng).err().map(|_| index))
            .collect()
    }
}

/// An id not in `taken`.
fn fresh_id(taken: &HashSet<String>) -> String {
    loop {
        let id = new_entry_id();
        if !taken.contains(&id) {
            return id;
        }
    }
}

/// An operation was not applied: the entry it names is gone, or the state does not allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped;

/// An edit of the queue, naming entries rather than positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueueOp {
    Append {
        track_ids: Vec<String>,
    },
    PlayNext {
        track_ids: Vec<String>,
    },
    PlayNow {
        track_id: String,
    },
    Remove {
        entry_id: String,
    },
    Move {
        entry_id: String,
        after_entry_id: Option<String>,
    },
    Jump {
        entry_id: String,
    },
    Next,
    Previous,
    Shuffle,
    Unshuffle,
    ClearUpNext,
    SetRepeat {
        mode: RepeatMode,
    },
    Seek {
        progress_ms: u64,
    },
}

impl QueueOp {
    /// Checks the track ids an op carries.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let tracks: &[String] = match self {
            Self::Append { track_ids } | Self::PlayNext { track_ids } => {
                if track_ids.is_empty() {
                    return Err(InvalidInput::new(
                        "track_ids",
                        "must name at least one track",
                    ));
                }
                track_ids
            }
            Self::PlayNow { track_id } => std::slice::from_ref(track_id),
            _ => &[],
        };
        for id in tracks {
            parse_text("track_ids", id, 1, TRACK_ID_MAX)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const MAX: usize = 10_000;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn queue(tracks: &[&str]) -> QueueState {
        let incoming = QueueState {
            track_ids: tracks.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        QueueState::default().replace_with(incoming)
    }

    fn tracks(state: &QueueState) -> Vec<&str> {
        state.track_ids.iter().map(String::as_str).collect()
    }

    fn apply(state: &mut QueueState, op: QueueOp) -> Result<(), Skipped> {
        let result = state.apply(&op, MAX, &mut rng());
        state.check_invariants().expect("invariants hold");
        result
    }

    #[test]
    fn a_snapshot_gets_entry_ids_and_a_current_track() {
        let state = queue(&["a", "b", "a"]);
        assert_eq!(state.entry_ids.len(), 3);
        assert_eq!(state.current_track_id.as_deref(), Some("a"));
        state.check_invariants().unwrap();
    }

    #[test]
    fn replacing_keeps_the_ids_of_surviving_entries() {
        let old = queue(&["a", "b", "c"]);
        let incoming = QueueState {
            track_ids: vec!["c".into(), "a".into(), "d".into()],
            ..Default::default()
        };
        let new = old.replace_with(incoming);
        assert_eq!(new.entry_ids[0], old.entry_ids[2]);
        assert_eq!(new.entry_ids[1], old.entry_ids[0]);
        assert!(!old.entry_ids.contains(&new.entry_ids[2]));
    }

    #[test]
    fn replacing_honours_entry_ids_the_client_sent() {
        let old = queue(&["a", "a"]);
        let incoming = QueueState {
            track_ids: vec!["a".into()],
            entry_ids: vec![old.entry_ids[1].clone()],
            ..Default::default()
        };
        assert_eq!(
            old.replace_with(incoming).entry_ids,
            vec![old.entry_ids[1].clone()]
        );
    }

    #[test]
    fn an_out_of_range_index_or_an_oversized_queue_is_invalid() {
        let state = QueueState {
            track_ids: vec!["a".into()],
            current_index: 1,
            ..Default::default()
        };
        assert!(state.validate_incoming(MAX).is_err());
        let empty = QueueState {
            current_index: 3,
            ..Default::default()
        };
        assert!(empty.validate_incoming(MAX).is_err());
        let big = QueueState {
            track_ids: vec!["a".into(); 3],
            ..Default::default()
        };
        assert!(big.validate_incoming(2).is_err());
        let blank = QueueState {
            track_ids: vec![String::new()],
            ..Default::default()
        };
        assert!(blank.validate_incoming(MAX).is_err());
    }

    #[test]
    fn unknown_fields_are_kept() {
        let state: QueueState = serde_json::from_value(
            serde_json::json!({"track_ids": ["a"], "continuation_label": "x"}),
        )
        .unwrap();
        assert_eq!(
            state.extra.get("continuation_label"),
            Some(&Value::from("x"))
        );
        let back = serde_json::to_value(&state).unwrap();
        assert_eq!(back["continuation_label"], "x");
    }

    #[test]
    fn append_adds_to_the_end_and_play_next_after_the_current_entry() {
        let mut state = queue(&["a", "b"]);
        apply(
            &mut state,
            QueueOp::Append {
                track_ids: vec!["c".into()],
            },
        )
        .unwrap();
        apply(
            &mut state,
            QueueOp::PlayNext {
                track_ids: vec!["x".into(), "y".into()],
            },
        )
        .unwrap();
        assert_eq!(tracks(&state), ["a", "x", "y", "b", "c"]);
        assert_eq!(state.current_index, 0);
    }

    #[test]
    fn appending_to_an_empty_queue_makes_the_first_track_current() {
        let mut state = QueueState::default();
        apply(
            &mut state,
            QueueOp::Append {
                track_ids: vec!["a".into()],
            },
        )
        .unwrap();
        assert_eq!(state.current_track_id.as_deref(), Some("a"));
    }

    #[test]
    fn play_now_makes_a_new_entry_current_and_keeps_up_next() {
        let mut state = queue(&["a", "b", "c"]);
        apply(
            &mut state,
            QueueOp::PlayNow {
                track_id: "z".into(),
            },
        )
        .unwrap();
        assert_eq!(tracks(&state), ["a", "z", "b", "c"]);
        assert_eq!(state.current_track_id.as_deref(), Some("z"));
    }

    #[test]
    fn the_current_entry_cannot_be_removed_and_a_gone_entry_is_skipped() {
        let mut state = queue(&["a", "b"]);
        let current = state.entry_ids[0].clone();
        assert_eq!(
            apply(&mut state, QueueOp::Remove { entry_id: current }),
            Err(Skipped)
        );
        let b = state.entry_ids[1].clone();
        apply(
            &mut state,
            QueueOp::Remove {
                entry_id: b.clone(),
            },
        )
        .unwrap();
        assert_eq!(
            apply(&mut state, QueueOp::Remove { entry_id: b }),
            Err(Skipped)
        );
        assert_eq!(tracks(&state), ["a"]);
    }

    #[test]
    fn removing_a_played_entry_keeps_the_current_one_current() {
        let mut state = queue(&["a", "b", "c"]);
        state.current_index = 2;
        state.settle();
        let a = state.entry_ids[0].clone();
        apply(&mut state, QueueOp::Remove { entry_id: a }).unwrap();
        assert_eq!(state.current_track_id.as_deref(), Some("c"));
    }

    #[test]
    fn move_reorders_up_next_by_entry() {
        let mut state = queue(&["a", "b", "c", "d"]);
        let d = state.entry_ids[3].clone();
        let b = state.entry_ids[1].clone();
        apply(
            &mut state,
            QueueOp::Move {
                entry_id: d.clone(),
                after_entry_id: None,
            },
        )
        .unwrap();
        assert_eq!(tracks(&state), ["a", "d", "b", "c"]);
        apply(
            &mut state,
            QueueOp::Move {
                entry_id: d,
                after_entry_id: Some(b),
            },
        )
        .unwrap();
        assert_eq!(tracks(&state), ["a", "b", "d", "c"]);
        let current = state.entry_ids[0].clone();
        assert_eq!(
            apply(
                &mut state,
                QueueOp::Move {
                    entry_id: current,
                    after_entry_id: None
                }
            ),
            Err(Skipped)
        );
    }

    #[test]
    fn next_and_previous_honour_repeat() {
        let mut state = queue(&["a", "b"]);
        apply(&mut state, QueueOp::Next).unwrap();
        assert_eq!(state.current_index, 1);
        assert_eq!(apply(&mut state, QueueOp::Next), Err(Skipped));
        apply(
            &mut state,
            QueueOp::SetRepeat {
                mode: RepeatMode::All,
            },
        )
        .unwrap();
        apply(&mut state, QueueOp::Next).unwrap();
        assert_eq!(state.current_index, 0);
        apply(&mut state, QueueOp::Previous).unwrap();
        assert_eq!(state.current_index, 1);
        apply(
            &mut state,
            QueueOp::SetRepeat {
                mode: RepeatMode::One,
            },
        )
        .unwrap();
        apply(&mut state, QueueOp::Seek { progress_ms: 5_000 }).unwrap();
        apply(&mut state, QueueOp::Next).unwrap();
        assert_eq!((state.current_index, state.progress_ms), (1, 0));
    }

    #[test]
    fn jump_makes_an_entry_current() {
        let mut state = queue(&["a", "b", "c"]);
        let c = state.entry_ids[2].clone();
        apply(&mut state, QueueOp::Jump { entry_id: c }).unwrap();
        assert_eq!(state.current_track_id.as_deref(), Some("c"));
    }

    #[test]
    fn shuffle_permutes_only_up_next_and_unshuffle_restores_it() {
        let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut state = queue(&refs);
        let before = state.clone();
        apply(&mut state, QueueOp::Shuffle).unwrap();
        assert!(state.shuffle);
        assert_eq!(state.track_ids[0], "t0");
        assert_ne!(state.track_ids, before.track_ids);
        let mut sorted = state.entry_ids.clone();
        sorted.sort();
        let mut expected = before.entry_ids.clone();
        expected.sort();
        assert_eq!(sorted, expected);
        assert_eq!(state.original_order_ids, before.track_ids);
        apply(&mut state, QueueOp::Unshuffle).unwrap();
        assert_eq!(state.entry_ids, before.entry_ids);
        assert!(!state.shuffle);
    }

    #[test]
    fn clear_up_next_keeps_history_and_the_current_entry() {
        let mut state = queue(&["a", "b", "c"]);
        apply(&mut state, QueueOp::Next).unwrap();
        apply(&mut state, QueueOp::ClearUpNext).unwrap();
        assert_eq!(tracks(&state), ["a", "b"]);
    }

    #[test]
    fn ops_past_the_size_limit_are_skipped() {
        let mut state = queue(&["a"]);
        let op = QueueOp::Append {
            track_ids: vec!["b".into(), "c".into()],
        };
        assert_eq!(state.apply(&op, 2, &mut rng()), Err(Skipped));
        assert_eq!(tracks(&state), ["a"]);
    }

    #[test]
    fn ops_parse_from_their_wire_form() {
        let op: QueueOp = serde_json::from_value(
            serde_json::json!({"op": "move", "entry_id": "e1", "after_entry_id": null}),
        )
        .unwrap();
        assert_eq!(
            op,
            QueueOp::Move {
                entry_id: "e1".into(),
                after_entry_id: None
            }
        );
        assert!(serde_json::from_value::<QueueOp>(serde_json::json!({"op": "explode"})).is_err());
        assert!(QueueOp::Append { track_ids: vec![] }.validate().is_err());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// An op drawn over a small track alphabet, naming entries by position in the
        /// current state (or a made-up id), so that sequences exercise real entries.
        #[derive(Debug, Clone)]
        enum Draw {
            Append(Vec<u8>),
            PlayNext(Vec<u8>),
            PlayNow(u8),
            Remove(usize),
            Move(usize, Option<usize>),
            Jump(usize),
            Next,
            Previous,
            Shuffle,
            Unshuffle,
            ClearUpNext,
            Repeat(u8),
            Seek(u32),
            Replace(Vec<u8>, usize),
        }

        fn draw() -> impl Strategy<Value = Draw> {
            prop_oneof![
                prop::collection::vec(0u8..6, 1..4).prop_map(Draw::Append),
                prop::collection::vec(0u8..6, 1..3).prop_map(Draw::PlayNext),
                (0u8..6).prop_map(Draw::PlayNow),
                (0usize..12).prop_map(Draw::Remove),
                ((0usize..12), prop::option::of(0usize..12)).prop_map(|(a, b)| Draw::Move(a, b)),
                (0usize..12).prop_map(Draw::Jump),
                Just(Draw::Next),
                Just(Draw::Previous),
                Just(Draw::Shuffle),
                Just(Draw::Unshuffle),
                Just(Draw::ClearUpNext),
                (0u8..3).prop_map(Draw::Repeat),
                any::<u32>().prop_map(Draw::Seek),
                (prop::collection::vec(0u8..6, 0..8), 0usize..8)
                    .prop_map(|(t, i)| Draw::Replace(t, i)),
            ]
        }

        fn entry(state: &QueueState, at: usize) -> String {
            state
                .entry_ids
                .get(at)
                .cloned()
                .unwrap_or_else(|| "gone".into())
        }

        fn names(tracks: &[u8]) -> Vec<String> {
            tracks.iter().map(|t| format!("t{t}")).collect()
        }

        proptest! {
            #[test]
            fn random_op_sequences_keep_the_invariants(draws in prop::collection::vec(draw(), 1..40)) {
                let mut state = QueueState::default();
                let mut rng = rng();
                for draw in draws {
                    let op = match draw {
                        Draw::Append(t) => QueueOp::Append { track_ids: names(&t) },
                        Draw::PlayNext(t) => QueueOp::PlayNext { track_ids: names(&t) },
                        Draw::PlayNow(t) => QueueOp::PlayNow { track_id: format!("t{t}") },
                        Draw::Remove(at) => QueueOp::Remove { entry_id: entry(&state, at) },
                        Draw::Move(at, after) => QueueOp::Move {
                            entry_id: entry(&state, at),
                            after_entry_id: after.map(|a| entry(&state, a)),
                        },
                        Draw::Jump(at) => QueueOp::Jump { entry_id: entry(&state, at) },
                        Draw::Next => QueueOp::Next,
                        Draw::Previous => QueueOp::Previous,
                        Draw::Shuffle => QueueOp::Shuffle,
                        Draw::Unshuffle => QueueOp::Unshuffle,
                        Draw::ClearUpNext => QueueOp::ClearUpNext,
                        Draw::Repeat(m) => QueueOp::SetRepeat {
                            mode: [RepeatMode::None, RepeatMode::One, RepeatMode::All][usize::from(m % 3)],
                        },
                        Draw::Seek(ms) => QueueOp::Seek { progress_ms: u64::from(ms) },
                        Draw::Replace(t, i) => {
                            let incoming = QueueState {
                                track_ids: names(&t),
                                current_index: if t.is_empty() { 0 } else { i % t.len() },
                                ..Default::default()
                            };
                            state = state.replace_with(incoming);
                            prop_assert!(state.check_invariants().is_ok(), "{:?}", state.check_invariants());
                            continue;
                        }
                    };
                    let before = state.clone();
                    let shuffling = matches!(op, QueueOp::Shuffle);
                    let outcome = state.apply(&op, 64, &mut rng);
                    prop_assert!(state.check_invariants().is_ok(), "{op:?}: {:?}", state.check_invariants());
                    if outcome.is_err() {
                        prop_assert_eq!(&state.track_ids, &before.track_ids, "a skipped op changed nothing");
                        prop_assert_eq!(&state.entry_ids, &before.entry_ids);
                    }
                    if shuffling {
                        // A permutation of up-next, with history and the current entry in place.
                        let split = if before.track_ids.is_empty() { 0 } else { before.current_index + 1 };
                        prop_assert_eq!(&state.entry_ids[..split], &before.entry_ids[..split]);
                        let mut after: Vec<&String> = state.entry_ids[split..].iter().collect();
                        let mut was: Vec<&String> = before.entry_ids[split..].iter().collect();
                        after.sort();
                        was.sort();
                        prop_assert_eq!(after, was);
                    }
                }
            }
        }
    }
}
