//! Fuzzing by property tests (issue 15): the parsers that take what clients and operators
//! send, fed arbitrary and near-valid input. None may panic, and what they accept must keep
//! the invariants the rest of the hub relies on. (`cargo fuzz` needs a nightly compiler, which
//! this project's machines cannot fetch; proptest shrinks a failure to a small case, which is
//! then kept below as a regression test.)
//!
//! Each target runs `SEGUE_FUZZ_CASES` cases (default 256 in the test command);
//! `scripts/faults/fuzz.sh` runs them with many more.

use std::collections::HashSet;

use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::SeedableRng;
use serde_json::{Map, Value, json};

use segue::artwork::{self, Limits};
use segue::domain::queue::{QueueOp, QueueState};
use segue::ingest::report::ReportInput;
use segue::realtime::frame;
use segue::settings::Settings;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("SEGUE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        // Failures are kept as named tests in this file, not as files beside it.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Strings that break naive parsers: empty, blank, NUL and control characters, invalid
/// surrogates' replacements, very long, numeric-looking, JSON-looking.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" \t\n".to_owned()),
        Just("\u{0}".to_owned()),
        Just("\u{feff}x\u{200b}".to_owned()),
        Just("9".repeat(40)),
        Just("-1".to_owned()),
        Just("1e309".to_owned()),
        Just("x".repeat(5_000)),
        Just("é".repeat(700)),
        Just("{\"a\":[1,".to_owned()),
        "\\PC{0,40}",
        "[a-z_:0-9]{0,12}",
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((nasty_string(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// An object whose keys are mostly `known` ones, with any values.
fn object_with(known: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => prop::sample::select(known).prop_map(str::to_owned),
        1 => nasty_string(),
    ];
    prop::collection::vec((key, json_value()), 0..8)
        .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>()))
}

// ---- Phoenix frames -----------------------------------------------------------------------

/// Frames that are nearly right: five-ish elements of plausible types.
fn near_frame() -> impl Strategy<Value = String> {
    let reference = prop_oneof![
        Just(Value::Null),
        "[0-9]{1,4}".prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        json_value(),
    ];
    let name = prop_oneof![
        "[a-z_]{1,10}(:[0-9]{1,6})?".prop_map(Value::String),
        json_value()
    ];
    let payload = prop_oneof![3 => object_with(&["revision", "ops", "state"]), 1 => json_value()];
    (
        reference.clone(),
        reference,
        name.clone(),
        name,
        payload,
        0..3_usize,
    )
        .prop_map(|(join_ref, reference, topic, event, payload, extra)| {
            let mut items = vec![join_ref, reference, topic, event, payload];
            items.truncate(3 + extra.min(2));
            if extra == 2 {
                items.push(Value::Null);
            }
            Value::Array(items).to_string()
        })
}

fn check_frame(text: &str) {
    match frame::decode(text) {
        Ok(decoded) => {
            assert!(!decoded.topic.is_empty() && !decoded.event.is_empty());
            // What was accepted encodes and decodes to itself.
            let encoded = frame::encode(
                decoded.join_ref.as_deref(),
                decoded.reference.as_deref(),
                &decoded.topic,
                &decoded.event,
                &Value::Object(decoded.payload.clone()),
            );
            assert_eq!(frame::decode(&encoded).as_ref(), Ok(&decoded));
        }
        Err(malformed) => assert!(!malformed.reason.is_empty()),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn phoenix_frames_from_any_text_never_panic(text in "\\PC{0,200}") {
        check_frame(&text);
    }

    #[test]
    fn phoenix_frames_nearly_right_are_decoded_or_refused_with_a_reason(text in near_frame()) {
        check_frame(&text);
    }
}

// ---- Queue state and operations ---------------------------------------------------------

const STATE_FIELDS: &[&str] = &[
    "track_ids",
    "entry_ids",
    "current_index",
    "current_track_id",
    "shuffle",
    "original_order_ids",
    "original_order_entry_ids",
    "repeat_mode",
    "progress_ms",
    "auto_advance",
];

/// A state as a client might send it: often well-formed, sometimes not.
fn sent_state() -> impl Strategy<Value = Value> {
    let tracks = prop::collection::vec("t[0-9]{1,2}", 0..12);
    let plausible = (tracks, any::<u16>(), any::<bool>(), 0..4_u8, any::<u32>()).prop_map(
        |(tracks, index, shuffle, repeat, progress)| {
            let index = if tracks.is_empty() {
                0
            } else {
                usize::from(index) % (tracks.len() + 1)
            };
            let repeat_mode = ["none", "one", "all", "sometimes"][usize::from(repeat)];
            json!({
                "track_ids": tracks,
                "current_index": index,
                "shuffle": shuffle,
                "repeat_mode": repeat_mode,
                "progress_ms": progress,
            })
        },
    );
    prop_oneof![3 => plausible, 1 => object_with(STATE_FIELDS)]
}

fn assert_invariants(state: &QueueState) {
    assert_eq!(state.track_ids.len(), state.entry_ids.len());
    let unique: HashSet<&String> = state.entry_ids.iter().collect();
    assert_eq!(unique.len(), state.entry_ids.len(), "entry ids repeat");
    if state.track_ids.is_empty() {
        assert_eq!(state.current_index, 0);
    } else {
        assert!(state.current_index < state.track_ids.len());
    }
}

const OP_NAMES: &[&str] = &[
    "append",
    "play_next",
    "play_now",
    "remove",
    "move",
    "jump",
    "next",
    "previous",
    "shuffle",
    "unshuffle",
    "clear_up_next",
    "set_repeat",
    "seek",
    "explode",
];

/// An op as a client might send it: a known name with fields of any shape.
fn sent_op(entries: Vec<String>) -> impl Strategy<Value = Value> {
    let entry = prop_oneof![
        prop::sample::select(if entries.is_empty() {
            vec!["e0".to_owned()]
        } else {
            entries
        })
        .prop_map(Value::String),
        json_value(),
    ];
    let fields = (
        prop::collection::vec("t[0-9]{1,2}", 0..4),
        entry.clone(),
        prop_oneof![Just(Value::Null), entry],
        prop_oneof![Just(json!("none")), Just(json!("all")), json_value()],
        prop_oneof![any::<u32>().prop_map(|n| json!(n)), json_value()],
    );
    (
        prop::sample::select(OP_NAMES),
        fields,
        object_with(&["track_ids", "entry_id"]),
    )
        .prop_map(|(name, (tracks, entry_id, after, mode, progress), noise)| {
            // The fields the op takes (an op refuses any other), now and then with noise on
            // top so that refusals are exercised too.
            let fields = [
                ("track_ids", json!(tracks)),
                ("track_id", json!(tracks.first())),
                ("entry_id", entry_id),
                ("after_entry_id", after),
                ("mode", mode),
                ("progress_ms", progress),
            ];
            let takes: &[&str] = match name {
                "append" | "play_next" => &["track_ids"],
                "play_now" => &["track_id"],
                "remove" | "jump" => &["entry_id"],
                "move" => &["entry_id", "after_entry_id"],
                "set_repeat" => &["mode"],
                "seek" => &["progress_ms"],
                _ => &[],
            };
            let mut op = Map::new();
            op.insert("op".to_owned(), json!(name));
            for (key, value) in fields {
                if takes.contains(&key) {
                    op.insert(key.to_owned(), value);
                }
            }
            if let Value::Object(noise) = noise
                && tracks.len() == 3
            {
                op.extend(noise);
            }
            Value::Object(op)
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_sent_queue_state_is_refused_or_stored_keeping_the_invariants(
        sent in sent_state(),
        base in sent_state(),
    ) {
        let Ok(incoming) = serde_json::from_value::<QueueState>(sent) else { return Ok(()) };
        if incoming.validate_incoming(10_000).is_err() {
            return Ok(());
        }
        let base = serde_json::from_value::<QueueState>(base)
            .ok()
            .filter(|b| b.validate_incoming(10_000).is_ok())
            .map(|b| QueueState::default().replace_with(b))
            .unwrap_or_default();
        let stored = base.replace_with(incoming);
        assert_invariants(&stored);
        // What is stored reads back as itself.
        let round_trip: QueueState =
            serde_json::from_value(serde_json::to_value(&stored).unwrap()).unwrap();
        prop_assert_eq!(round_trip, stored);
    }

    #[test]
    fn sent_queue_ops_are_refused_or_applied_keeping_the_invariants(
        (start, ops) in sent_state().prop_flat_map(|sent| {
            let state = serde_json::from_value::<QueueState>(sent)
                .ok()
                .filter(|s| s.validate_incoming(64).is_ok())
                .map(|s| QueueState::default().replace_with(s))
                .unwrap_or_default();
            let entries = state.entry_ids.clone();
            (Just(state), prop::collection::vec(sent_op(entries), 1..8))
        }),
        seed in any::<u64>(),
    ) {
        let mut state = start;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let parsed: Vec<QueueOp> = ops
            .into_iter()
            .filter_map(|op| serde_json::from_value::<QueueOp>(op).ok())
            .filter(|op| op.validate().is_ok())
            .collect();
        let skipped = state.apply_all(&parsed, 64, &mut rng);
        prop_assert!(skipped.iter().all(|i| *i < parsed.len()));
        prop_assert!(state.track_ids.len() <= 64);
        assert_invariants(&state);
    }
}

// ---- Now-playing reports ------------------------------------------------------------------

const REPORT_FIELDS: &[&str] = &[
    "title",
    "artist",
    "album",
    "duration_ms",
    "isrc",
    "track_number",
    "progress_ms",
    "is_playing",
    "played_at",
    "source",
];

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_now_playing_report_is_refused_with_a_field_or_parsed_within_bounds(
        body in object_with(REPORT_FIELDS),
        now_ms in 0..4_000_000_000_000_i64,
    ) {
        let Ok(input) = serde_json::from_value::<ReportInput>(body) else { return Ok(()) };
        match input.parse(now_ms) {
            Ok(report) => {
                prop_assert!(!report.title.trim().is_empty());
                prop_assert!(!report.artist.trim().is_empty());
                prop_assert!(report.duration_ms >= 0 && report.progress_ms >= 0);
                let nul = char::from(0);
                prop_assert!(!report.title.contains(nul) && !report.artist.contains(nul));
            }
            Err(invalid) => prop_assert!(!invalid.to_string().is_empty()),
        }
    }
}

// ---- The image guard ----------------------------------------------------------------------

/// Small valid images in each accepted format, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let picture =
        image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
    let mut seeds = Vec::new();
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::WebP,
    ] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        picture.write_to(&mut bytes, format).expect("encode seed");
        seeds.push(bytes.into_inner());
    }
    seeds
}

/// A seed image with some bytes changed, some cut off, or some inserted.
fn mutated_image() -> impl Strategy<Value = Vec<u8>> {
    (
        0..3_usize,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        prop::option::of(any::<prop::sample::Index>()),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(which, flips, cut, insert)| {
            let mut bytes = seeds().swap_remove(which);
            for (at, value) in flips {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            let at = bytes.len() / 2;
            bytes.splice(at..at, insert);
            bytes
        })
}

fn small_limits() -> Limits {
    Limits {
        max_bytes: 64 * 1024,
        max_side: 256,
        max_pixels: 256 * 256,
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn the_image_guard_refuses_or_renders_any_bytes(bytes in prop_oneof![
        3 => mutated_image(),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]) {
        let limits = small_limits();
        if let Ok((width, height)) = artwork::inspect(&bytes, &limits) {
            prop_assert!(width > 0 && height > 0 && width <= limits.max_side && height <= limits.max_side);
            if let Ok(processed) = artwork::process(&bytes, &limits) {
                prop_assert!(!processed.renditions.is_empty());
            }
        }
    }
}

// ---- Settings -----------------------------------------------------------------------------

/// Every setting the README documents.
fn documented_settings() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let mut names: Vec<String> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| {
            word.starts_with("SEGUE_")
                || ["DATABASE_URL", "REDIS_URL"].contains(word)
                || word.starts_with("S3_")
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    assert!(
        names.len() > 50,
        "the README's settings table was not found"
    );
    names
}

/// Settings names with values from every class: numbers at and past every edge, words,
/// URLs, blanks.
fn setting() -> impl Strategy<Value = (String, String)> {
    let value = prop_oneof![
        Just("0".to_owned()),
        Just("1".to_owned()),
        Just("-1".to_owned()),
        Just(u64::MAX.to_string()),
        Just(i64::MAX.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("1.5".to_owned()),
        Just("true".to_owned()),
        Just("[1,2]".to_owned()),
        Just("{a=1}".to_owned()),
        Just("redis://127.0.0.1:1".to_owned()),
        Just("postgres://x@127.0.0.1:1/db".to_owned()),
        Just("daily 03:00".to_owned()),
        Just("10/s:5".to_owned()),
        nasty_string(),
        (0..u64::MAX).prop_map(|n| n.to_string()),
    ];
    (prop::sample::select(documented_settings()), value)
}

/// Ten years, the longest any duration setting may be.
const DURATION_MAX_SECS: u64 = 10 * 366 * 86_400;

/// Whether `value` for `name` is a duration the hub cannot use (it would overflow a clock).
fn overlong(name: &str, value: &str) -> bool {
    let Ok(number) = value.parse::<u64>() else {
        return false;
    };
    (name.ends_with("_SECS") && number > DURATION_MAX_SECS)
        || (name.ends_with("_MS") && number > DURATION_MAX_SECS * 1_000)
}

proptest! {
    #![proptest_config(config(256))]

    /// Whatever one sets, the settings load or are refused naming a setting, and none that
    /// loads holds a duration too long to add to a clock.
    #[test]
    fn any_setting_loads_or_is_refused_by_name(pairs in prop::collection::vec(setting(), 1..4)) {
        match Settings::from_vars(pairs.clone()) {
            Ok(_) => {
                // The last value of a name is the one that counts.
                for (index, (name, value)) in pairs.iter().enumerate() {
                    let last = !pairs.iter().skip(index + 1).any(|(n, _)| n == name);
                    prop_assert!(
                        !(last && overlong(name, value)),
                        "{name}={value} was accepted"
                    );
                }
            }
            Err(error) => {
                prop_assert!(!error.setting.is_empty() && !error.problem.is_empty());
            }
        }
    }
}

/// Found by the settings target: any duration up to `u64::MAX` loaded, and the hub adds
/// durations to clocks (the store's reply deadline is `Instant::now() + statement timeout +
/// connect timeout`, and `Instant + Duration` panics on overflow).
#[test]
fn a_duration_setting_beyond_ten_years_is_refused() {
    for name in [
        "SEGUE_DB_CONNECT_TIMEOUT_MS",
        "SEGUE_ACCESS_TOKEN_TTL_SECS",
        "SEGUE_JOBS_VISIBILITY_MS",
    ] {
        let error = Settings::from_vars([(name.to_owned(), u64::MAX.to_string())])
            .err()
            .unwrap_or_else(|| panic!("{name} = u64::MAX was accepted"));
        assert_eq!(error.setting, name);
    }
}

// ---- A live socket ------------------------------------------------------------------------

fn frames_to_send() -> usize {
    std::env::var("SEGUE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Near-valid frames and garbage down the sockets of a live hub. A socket that sends more
/// than a few malformed frames is closed by design (then the test opens another); the hub
/// keeps serving throughout and a fresh socket works at the end.
#[actix_web::test]
async fn a_hub_fed_random_frames_keeps_serving() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    use crate::helpers::{Backend, TestApp};
    use crate::phoenix::connect;

    let app = TestApp::spawn(Backend::Sqlite).await;
    let account = app.register().await;
    let mut runner = TestRunner::deterministic();
    let strategy = prop_oneof![3 => near_frame(), 1 => "\\PC{0,80}"];
    let mut socket = connect(&app, &account.access_token).await;
    let mut closed = 0;
    for _ in 0..frames_to_send() {
        let text = strategy.new_tree(&mut runner).expect("a frame").current();
        if !socket.try_send_text(&text).await {
            closed += 1;
            socket = connect(&app, &account.access_token).await;
        }
        socket.drain_now().await;
    }
    let mut fresh = connect(&app, &account.access_token).await;
    let reference = fresh.push(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(fresh.reply_to(&reference).await[4]["status"], "ok");
    assert_eq!(app.get("/healthz").await.status(), 200);
    println!(
        "random frames: {} sent, {closed} sockets closed for malformed frames",
        frames_to_send()
    );
}

/// Well-formed frames with payloads of any shape on the user's own topics, sent as a client
/// would (events carry their topic's current join ref): every one gets a reply (ok, or an
/// error with a reason) and the socket is never closed for them.
#[actix_web::test]
async fn well_formed_frames_with_any_payload_are_each_answered() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    use crate::helpers::{Backend, TestApp};
    use crate::phoenix::connect;

    let app = TestApp::spawn(Backend::Sqlite).await;
    let account = app.register().await;
    let mut socket = connect(&app, &account.access_token).await;
    let topics = vec![
        format!("queue:{}", account.id),
        format!("devices:{}", account.id),
        format!("friends:{}", account.id),
        "phoenix".to_owned(),
    ];
    let strategy = (
        prop::sample::select(topics),
        prop::sample::select(vec![
            "phx_join",
            "ops",
            "replace",
            "phx_leave",
            "heartbeat",
            "broadcast",
            "now_playing",
        ]),
        object_with(&[
            "revision",
            "ops",
            "state",
            "base_revision",
            "event",
            "payload",
        ]),
    );
    let mut runner = TestRunner::deterministic();
    let mut errors = 0;
    // The current join of each topic, as a client keeps it: its events carry that join's ref.
    let mut joined: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for n in 0..frames_to_send() {
        let (topic, event, payload) = strategy.new_tree(&mut runner).expect("a frame").current();
        let reference = format!("f{n}");
        let join_ref = if event == "phx_join" {
            Some(reference.clone())
        } else {
            joined.get(&topic).cloned()
        };
        let frame = json!([join_ref, reference, topic, event, payload]).to_string();
        assert!(
            socket.try_send_text(&frame).await,
            "the socket was closed after {n} frames"
        );
        let Ok(reply) = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            socket.reply_to(&reference),
        )
        .await
        else {
            panic!("no reply to {frame}");
        };
        match event {
            "phx_join" if reply[4]["status"] == "ok" => {
                joined.insert(topic, reference);
            }
            "phx_join" | "phx_leave" => {
                joined.remove(&topic);
            }
            _ => {}
        }
        match reply[4]["status"].as_str() {
            Some("ok") => {}
            Some("error") => {
                errors += 1;
                assert!(
                    reply[4]["response"]["reason"].is_string(),
                    "an error reply without a reason: {reply}"
                );
            }
            _ => panic!("an odd reply: {reply}"),
        }
    }
    println!(
        "well-formed frames: {} answered, {errors} with an error",
        frames_to_send()
    );
}
