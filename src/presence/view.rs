//! What one replica shows of one user's presence, and how it changes, in the shape the
//! `phoenix` client's `Presence` class merges: `presence_state` `{key: {metas: [...]}}`, then
//! `presence_diff` `{joins: {key: {metas}}, leaves: {key: {metas}}}`.
//!
//! Every meta version carries its own `phx_ref`; a changed meta is the leave of the old
//! version and the join of the new one (with `phx_ref_prev`), as Phoenix sends it. The same
//! view serves `devices:{user}` (key: device id) and `friends:{follower}` (key: the user id).
//! Refs are made by the viewing replica, so every socket of that replica sees one consistent
//! history.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{DeviceEntry, InstanceId, Snapshot};

/// Makes `phx_ref`s unique within a replica.
#[derive(Debug)]
pub struct RefGen {
    prefix: String,
    next: u64,
}

impl RefGen {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            next: 0,
        }
    }

    pub fn fresh(&mut self) -> String {
        self.next += 1;
        format!("{}{:x}", self.prefix, self.next)
    }
}

/// One entry as shown: the entry and the ref its current meta was shown under. (The meta
/// itself is derived when needed: keeping it would cost more memory than the entry.)
#[derive(Debug, Clone)]
struct Shown {
    instance: InstanceId,
    /// Shared with the event it came in (and, on the owner's replica, the owner's record).
    entry: Arc<DeviceEntry>,
    phx_ref: String,
}

impl Shown {
    fn meta(&self, output: Option<&str>, previous: Option<&str>) -> Value {
        let mut meta = meta_of(&self.entry, output);
        meta.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        if let Some(previous) = previous {
            meta.insert("phx_ref_prev".into(), Value::String(previous.to_owned()));
        }
        Value::Object(meta)
    }
}

/// The metas that joined and left in one change.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Change {
    pub joins: Vec<Value>,
    pub leaves: Vec<Value>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    fn extend(&mut self, other: Change) {
        self.joins.extend(other.joins);
        self.leaves.extend(other.leaves);
    }

    /// The `presence_diff` keyed by device id (`devices:{user}`).
    pub fn by_device(&self) -> Value {
        json!({"joins": group_by_device(&self.joins), "leaves": group_by_device(&self.leaves)})
    }

    /// The `presence_diff` for followers (`friends:{follower}`): every meta under one key,
    /// as [`for_friends`] shows it.
    pub fn for_friends(&self, key: &str) -> Value {
        let side = |metas: &[Value]| {
            let mut map = Map::new();
            if !metas.is_empty() {
                let metas: Vec<Value> = metas.iter().map(for_friends).collect();
                map.insert(key.to_owned(), json!({ "metas": metas }));
            }
            Value::Object(map)
        };
        json!({"joins": side(&self.joins), "leaves": side(&self.leaves)})
    }
}

fn group_by_device(metas: &[Value]) -> Value {
    let mut map = Map::new();
    for meta in metas {
        let device = meta.get("device_id").and_then(Value::as_str).unwrap_or("");
        let slot = map
            .entry(device.to_owned())
            .or_insert_with(|| json!({"metas": []}));
        if let Some(list) = slot.get_mut("metas").and_then(Value::as_array_mut) {
            list.push(meta.clone());
        }
    }
    Value::Object(map)
}

/// A meta as followers see it: the device's kind and what it plays, not its private name
/// ("Alice's phone"), which only the owner's own devices see.
pub fn for_friends(meta: &Value) -> Value {
    let mut meta = meta.clone();
    if let Some(fields) = meta.as_object_mut() {
        fields.remove("name");
    }
    meta
}

/// The meta clients see for `entry`, without refs.
fn meta_of(entry: &DeviceEntry, output: Option<&str>) -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert("device_id".into(), json!(entry.device_id));
    meta.insert("name".into(), json!(entry.name));
    meta.insert("kind".into(), json!(entry.kind));
    meta.insert("online_at".into(), json!(entry.online_at));
    meta.insert(
        "is_output".into(),
        json!(output == Some(entry.device_id.as_str())),
    );
    meta.insert("now_playing".into(), json!(entry.now_playing));
    meta
}

/// One user's presence as this replica shows it. A user has a handful of devices, so the
/// entries are a small vector (a map's nodes would cost more than the entries).
#[derive(Debug, Clone, Default)]
pub struct View {
    shown: Vec<Shown>,
    output: Option<String>,
}

impl View {
    pub fn from_snapshot(snapshot: Snapshot, refs: &mut RefGen) -> Self {
        let mut view = View::default();
        // Into an empty view, everything is a join; the joins are not needed.
        let _ = view.replace(snapshot, refs);
        view
    }

    fn find(&self, instance: &str) -> Option<usize> {
        self.shown.iter().position(|s| s.instance == instance)
    }

    /// Every meta, with its ref.
    pub fn metas(&self) -> Vec<Value> {
        let output = self.output.as_deref();
        self.shown.iter().map(|s| s.meta(output, None)).collect()
    }

    /// `presence_state` for `devices:{user}`.
    pub fn devices_state(&self) -> Value {
        group_by_device(&self.metas())
    }

    pub fn is_empty(&self) -> bool {
        self.shown.is_empty()
    }

    /// Every device as a join (for a viewer who starts seeing this user).
    pub fn joined(&self) -> Change {
        Change {
            joins: self.metas(),
            leaves: Vec::new(),
        }
    }

    /// Every device as a leave (for a viewer who stops seeing this user).
    pub fn left(&self) -> Change {
        Change {
            joins: Vec::new(),
            leaves: self.metas(),
        }
    }

    /// The earliest expiry of a shown entry.
    pub fn next_expiry(&self) -> Option<i64> {
        self.shown.iter().map(|s| s.entry.expires_at).min()
    }

    /// Shows `entry` under `instance` unless what is shown is as new or newer.
    pub fn upsert(
        &mut self,
        instance: &str,
        entry: impl Into<Arc<DeviceEntry>>,
        refs: &mut RefGen,
    ) -> Change {
        let entry = entry.into();
        let output = self.output.as_deref();
        let Some(index) = self.find(instance) else {
            let shown = Shown {
                instance: instance.to_owned(),
                entry,
                phx_ref: refs.fresh(),
            };
            let join = shown.meta(output, None);
            // Exactly one more slot: most users have one or two devices.
            self.shown.reserve_exact(1);
            self.shown.push(shown);
            return Change {
                joins: vec![join],
                leaves: Vec::new(),
            };
        };
        let Some(shown) = self.shown.get_mut(index) else {
            return Change::default();
        };
        if shown.entry.seq >= entry.seq {
            if entry.expires_at > shown.entry.expires_at {
                Arc::make_mut(&mut shown.entry).expires_at = entry.expires_at;
            }
            return Change::default();
        }
        if meta_of(&entry, output) == meta_of(&shown.entry, output) {
            shown.entry = entry;
            return Change::default();
        }
        let old = shown.meta(output, None);
        let previous = std::mem::replace(&mut shown.phx_ref, refs.fresh());
        shown.entry = entry;
        Change {
            joins: vec![shown.meta(output, Some(&previous))],
            leaves: vec![old],
        }
    }

    /// Takes `instance` off, unless what is shown is newer than the removal.
    pub fn remove(&mut self, instance: &str, seq: u64) -> Change {
        let Some(index) = self.find(instance) else {
            return Change::default();
        };
        if self.shown.get(index).is_some_and(|s| s.entry.seq > seq) {
            return Change::default();
        }
        let shown = self.shown.swap_remove(index);
        Change {
            joins: Vec::new(),
            leaves: vec![shown.meta(self.output.as_deref(), None)],
        }
    }

    /// Marks `device_id` as the output device.
    pub fn set_output(&mut self, device_id: Option<String>, refs: &mut RefGen) -> Change {
        let before = std::mem::replace(&mut self.output, device_id);
        let mut change = Change::default();
        let output = self.output.as_deref();
        for shown in &mut self.shown {
            let was = before.as_deref() == Some(shown.entry.device_id.as_str());
            let is = output == Some(shown.entry.device_id.as_str());
            if was != is {
                change.leaves.push(shown.meta(before.as_deref(), None));
                let previous = std::mem::replace(&mut shown.phx_ref, refs.fresh());
                change.joins.push(shown.meta(output, Some(&previous)));
            }
        }
        change
    }

    /// Takes the registry's `snapshot` as the truth, except for entries this view has seen
    /// newer versions of (their events overtook the read).
    pub fn replace(&mut self, snapshot: Snapshot, refs: &mut RefGen) -> Change {
        self.replace_except(snapshot, &HashSet::new(), false, refs)
    }

    /// Like [`replace`](Self::replace), but the instances in `heard` (and the output device
    /// when `output_heard`) keep what this view shows: events about them arrived while the
    /// snapshot was being read, so they are newer than it, whatever it says.
    pub fn replace_except(
        &mut self,
        mut snapshot: Snapshot,
        heard: &HashSet<InstanceId>,
        output_heard: bool,
        refs: &mut RefGen,
    ) -> Change {
        let mut change = Change::default();
        snapshot
            .entries
            .retain(|instance, _| !heard.contains(instance));
        let gone: Vec<InstanceId> = self
            .shown
            .iter()
            .filter(|s| !heard.contains(&s.instance) && !snapshot.entries.contains_key(&s.instance))
            .map(|s| s.instance.clone())
            .collect();
        for instance in gone {
            change.extend(self.remove(&instance, u64::MAX));
        }
        if !output_heard {
            change.extend(self.set_output(snapshot.output, refs));
        }
        for (instance, entry) in snapshot.entries {
            change.extend(self.upsert(&instance, entry, refs));
        }
        change
    }

    /// Drops entries whose expiry has passed (used when the registry cannot be asked).
    pub fn expire(&mut self, now_ms: i64) -> Change {
        let expired: Vec<(InstanceId, u64)> = self
            .shown
            .iter()
            .filter(|s| !s.entry.is_live(now_ms))
            .map(|s| (s.instance.clone(), s.entry.seq))
            .collect();
        let mut change = Change::default();
        for (instance, seq) in expired {
            change.extend(self.remove(&instance, seq));
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::NowPlaying;

    fn entry(device: &str, seq: u64) -> DeviceEntry {
        DeviceEntry {
            device_id: device.into(),
            name: format!("{device} name"),
            kind: "phone".into(),
            online_at: 100,
            now_playing: None,
            seq,
            expires_at: 1_000,
        }
    }

    fn refs() -> RefGen {
        RefGen::new("r")
    }

    #[test]
    fn a_new_entry_is_a_join_with_a_fresh_ref() {
        let (mut view, mut refs) = (View::default(), refs());
        let change = view.upsert("a/1", entry("a", 1), &mut refs);
        assert!(change.leaves.is_empty());
        assert_eq!(change.joins.len(), 1);
        assert_eq!(change.joins[0]["device_id"], "a");
        assert_eq!(change.joins[0]["phx_ref"], "r1");
        assert_eq!(change.joins[0]["is_output"], false);
        assert_eq!(change.joins[0]["now_playing"], Value::Null);
        let diff = change.by_device();
        assert_eq!(diff["joins"]["a"]["metas"][0]["phx_ref"], "r1");
        assert_eq!(diff["leaves"], json!({}));
    }

    #[test]
    fn an_update_leaves_the_old_meta_and_joins_the_new_with_phx_ref_prev() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 1), &mut refs);
        let mut playing = entry("a", 2);
        playing.now_playing = Some(NowPlaying {
            track_id: "t1".into(),
            progress_ms: 5,
            is_playing: true,
            at: 7,
            track: None,
        });
        let change = view.upsert("a/1", playing, &mut refs);
        assert_eq!(change.leaves.len(), 1);
        assert_eq!(change.leaves[0]["phx_ref"], "r1");
        assert_eq!(change.joins[0]["phx_ref"], "r2");
        assert_eq!(change.joins[0]["phx_ref_prev"], "r1");
        assert_eq!(change.joins[0]["now_playing"]["track_id"], "t1");
        assert_eq!(view.metas()[0]["phx_ref"], "r2");
    }

    #[test]
    fn older_or_equal_versions_change_nothing() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 5), &mut refs);
        assert!(view.upsert("a/1", entry("a", 4), &mut refs).is_empty());
        assert!(view.upsert("a/1", entry("a", 5), &mut refs).is_empty());
        // A newer version with the same meta (a refresh) changes no ref either.
        let mut refreshed = entry("a", 6);
        refreshed.expires_at = 2_000;
        assert!(view.upsert("a/1", refreshed, &mut refs).is_empty());
        assert_eq!(view.next_expiry(), Some(2_000));
        assert!(
            view.remove("a/1", 5).is_empty(),
            "a removal older than the entry"
        );
        let gone = view.remove("a/1", 6);
        assert_eq!(gone.leaves.len(), 1);
        assert!(view.is_empty());
    }

    #[test]
    fn output_changes_re_ref_exactly_the_metas_whose_flag_changed() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 1), &mut refs);
        view.upsert("b/1", entry("b", 1), &mut refs);
        let change = view.set_output(Some("b".into()), &mut refs);
        assert_eq!(change.joins.len(), 1);
        assert_eq!(change.joins[0]["device_id"], "b");
        assert_eq!(change.joins[0]["is_output"], true);
        let change = view.set_output(Some("a".into()), &mut refs);
        let devices: Vec<_> = change
            .joins
            .iter()
            .map(|m| m["device_id"].clone())
            .collect();
        assert_eq!(devices, vec![json!("a"), json!("b")]);
        assert!(view.set_output(Some("a".into()), &mut refs).is_empty());
    }

    #[test]
    fn a_device_on_two_replicas_is_one_key_with_two_metas() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 1), &mut refs);
        view.upsert("a/2", entry("a", 1), &mut refs);
        let state = view.devices_state();
        assert_eq!(state["a"]["metas"].as_array().unwrap().len(), 2);
        let change = view.remove("a/1", 1);
        assert_eq!(
            change.for_friends("7")["leaves"]["7"]["metas"][0]["device_id"],
            "a"
        );
        assert_eq!(change.for_friends("7")["joins"], json!({}));
        let left = &change.for_friends("7")["leaves"]["7"]["metas"][0];
        assert!(
            left.get("name").is_none() && left.get("kind").is_some(),
            "{left}"
        );
    }

    #[test]
    fn a_snapshot_replaces_the_view_but_keeps_newer_events() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 3), &mut refs);
        view.upsert("b/1", entry("b", 1), &mut refs);
        let mut snapshot = Snapshot::default();
        snapshot
            .entries
            .insert("a/1".into(), Arc::new(entry("a", 2)));
        snapshot
            .entries
            .insert("c/1".into(), Arc::new(entry("c", 1)));
        let change = view.replace(snapshot, &mut refs);
        let left: Vec<_> = change
            .leaves
            .iter()
            .map(|m| m["device_id"].clone())
            .collect();
        let joined: Vec<_> = change
            .joins
            .iter()
            .map(|m| m["device_id"].clone())
            .collect();
        assert_eq!(left, vec![json!("b")]);
        assert_eq!(joined, vec![json!("c")]);
        assert_eq!(view.metas().len(), 2);
    }

    #[test]
    fn expiry_drops_only_entries_past_their_time() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 1), &mut refs);
        let mut later = entry("b", 1);
        later.expires_at = 5_000;
        view.upsert("b/1", later, &mut refs);
        assert!(view.expire(999).is_empty());
        let change = view.expire(1_000);
        assert_eq!(change.leaves.len(), 1);
        assert_eq!(change.leaves[0]["device_id"], "a");
        assert_eq!(view.next_expiry(), Some(5_000));
    }

    #[test]
    fn a_snapshot_read_while_events_arrived_keeps_what_they_said() {
        let (mut view, mut refs) = (View::default(), refs());
        view.upsert("a/1", entry("a", 1), &mut refs);
        // Heard while the read was in flight: a new device joined, "a" left, output moved.
        view.upsert("d/1", entry("d", 1), &mut refs);
        view.remove("a/1", 2);
        view.set_output(Some("d".into()), &mut refs);
        let heard: HashSet<InstanceId> = ["d/1".to_owned(), "a/1".to_owned()].into();
        let mut stale = Snapshot::default();
        stale.entries.insert("a/1".into(), Arc::new(entry("a", 1)));
        let change = view.replace_except(stale, &heard, true, &mut refs);
        assert!(change.is_empty(), "{change:?}");
        let metas = view.metas();
        assert_eq!(metas.len(), 1);
        assert_eq!(metas[0]["device_id"], "d");
        assert_eq!(metas[0]["is_output"], true);
    }
}
