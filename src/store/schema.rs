//! The one portable schema both backends share, written by hand (not by `diesel
//! print-schema`, which would describe only one backend). JSON lives in `Text` columns, ids in
//! `BigInt` or `Text`, times in `Timestamp` (UTC, without zone).

diesel::table! {
    users (id) {
        id -> BigInt,
        handle -> Text,
        display_name -> Text,
        password_hash -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    refresh_tokens (id) {
        id -> BigInt,
        user_id -> BigInt,
        family_id -> Text,
        device_id -> Text,
        token_hash -> Text,
        created_at -> Timestamp,
        expires_at -> Timestamp,
        spent_at -> Nullable<Timestamp>,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    devices (user_id, device_id) {
        user_id -> BigInt,
        device_id -> Text,
        name -> Text,
        kind -> Text,
        created_at -> Timestamp,
        last_seen_at -> Timestamp,
    }
}

diesel::table! {
    artists (id) {
        id -> BigInt,
        name -> Text,
    }
}

diesel::table! {
    tracks (id) {
        id -> Text,
        title -> Text,
        artist_id -> BigInt,
        album -> Nullable<Text>,
        duration_ms -> Nullable<BigInt>,
        image_url -> Nullable<Text>,
        updated_at -> Timestamp,
        created_by -> Nullable<BigInt>,
        isrc -> Nullable<Text>,
        match_key -> Nullable<Text>,
        artwork_hash -> Nullable<Text>,
    }
}

diesel::table! {
    queue_state (user_id) {
        user_id -> BigInt,
        state -> Text,
        revision -> BigInt,
        updated_at -> Timestamp,
        updated_by_device -> Nullable<Text>,
    }
}

diesel::table! {
    preferences (user_id) {
        user_id -> BigInt,
        auto_advance -> Bool,
        extra -> Text,
        updated_at -> Timestamp,
        share_listening -> Bool,
    }
}

diesel::table! {
    follows (follower_id, followee_id) {
        follower_id -> BigInt,
        followee_id -> BigInt,
        created_at -> Timestamp,
    }
}

diesel::table! {
    play_history (id) {
        id -> BigInt,
        user_id -> BigInt,
        track_id -> Text,
        device_id -> Nullable<Text>,
        played_at -> Timestamp,
        started_at -> Nullable<Timestamp>,
        listened_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    exports (id) {
        id -> Text,
        user_id -> BigInt,
        kind -> Text,
        status -> Text,
        rows_written -> BigInt,
        bytes_written -> BigInt,
        object_key -> Nullable<Text>,
        error -> Nullable<Text>,
        created_at -> Timestamp,
        finished_at -> Nullable<Timestamp>,
        expires_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    periodic_runs (job, tick) {
        job -> Text,
        tick -> BigInt,
        job_id -> BigInt,
        epoch -> BigInt,
        ran_at -> Timestamp,
        removed -> BigInt,
        doubled -> Integer,
    }
}

diesel::table! {
    job_probes (job_id) {
        job_id -> BigInt,
        runs -> Integer,
        finished_at -> Timestamp,
    }
}

diesel::table! {
    track_reports (track_id, user_id) {
        track_id -> Text,
        user_id -> BigInt,
        isrc -> Nullable<Text>,
        duration_ms -> Nullable<BigInt>,
        artwork_hash -> Nullable<Text>,
        updated_at -> Timestamp,
    }
}

diesel::joinable!(refresh_tokens -> users (user_id));
diesel::joinable!(track_reports -> tracks (track_id));
diesel::joinable!(devices -> users (user_id));
diesel::joinable!(tracks -> artists (artist_id));
diesel::joinable!(queue_state -> users (user_id));
diesel::joinable!(preferences -> users (user_id));
diesel::joinable!(play_history -> users (user_id));
diesel::joinable!(tracks -> artwork (artwork_hash));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    exports,
    track_reports,
    refresh_tokens,
    devices,
    artists,
    tracks,
    queue_state,
    preferences,
    follows,
    play_history,
    artwork,
);

diesel::table! {
    ip_blocks (address) {
        address -> Text,
        until -> Timestamp,
        reason -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    device_registrations (device_key, user_id) {
        device_key -> Text,
        user_id -> BigInt,
        created_at -> Timestamp,
    }
}

diesel::table! {
    artwork (hash) {
        hash -> Text,
        source_bytes -> BigInt,
        source_width -> Integer,
        source_height -> Integer,
        renditions -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    artwork_waiters (hash, user_id, device_id) {
        hash -> Text,
        user_id -> BigInt,
        device_id -> Text,
        track_id -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    ingests (id) {
        id -> Text,
        user_id -> BigInt,
        device_id -> Text,
        track_id -> Text,
        counted -> Bool,
        applied_at -> Timestamp,
    }
}

diesel::table! {
    ingest_plays (user_id, device_id) {
        user_id -> BigInt,
        device_id -> Text,
        reported_at -> BigInt,
        tracker -> Text,
        ends_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    overlays (id) {
        id -> Text,
        user_id -> BigInt,
        name -> Text,
        token_hash -> Text,
        created_at -> Timestamp,
    }
}
