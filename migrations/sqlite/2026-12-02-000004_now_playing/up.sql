-- The now-playing pipeline (POST /ingest/plays). Keep in step with the other backend's
-- migration and src/store/schema.rs.

-- Players report tracks by ISRC, or by artist, title and album: `match_key` is those three
-- normalised (see src/ingest/normalise.rs). `artwork_hash` names the track's artwork (a row of
-- `artwork` once it is rendered).
ALTER TABLE tracks ADD COLUMN isrc TEXT;
ALTER TABLE tracks ADD COLUMN match_key TEXT;
ALTER TABLE tracks ADD COLUMN artwork_hash TEXT;
CREATE UNIQUE INDEX tracks_isrc ON tracks (isrc);
CREATE UNIQUE INDEX tracks_match_key ON tracks (match_key);

-- One row per rendered artwork: its identity (SHA-256 of the source bytes), the source's size,
-- and the renditions stored in the blob store (JSON: size, format, key, width, height, bytes).
CREATE TABLE artwork (
    hash TEXT PRIMARY KEY NOT NULL,
    source_bytes BIGINT NOT NULL,
    source_width INTEGER NOT NULL,
    source_height INTEGER NOT NULL,
    renditions TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);

-- Plays shown before their artwork was ready: the artwork job tells these devices when it is.
CREATE TABLE artwork_waiters (
    hash TEXT NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    track_id TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (hash, user_id, device_id)
);

-- Reports applied by the enrichment job, by ingest id: a replayed job finds its row and
-- changes nothing twice. Purged with the job queue's idempotency window.
CREATE TABLE ingests (
    id TEXT PRIMARY KEY NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    track_id TEXT NOT NULL,
    counted BOOLEAN NOT NULL,
    applied_at TIMESTAMP NOT NULL
);
CREATE INDEX ingests_applied ON ingests (applied_at);

-- Each reporting device's current play (the once-per-play rules' state, JSON), so any
-- replica's worker continues where the last report left it.
CREATE TABLE ingest_plays (
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    reported_at BIGINT NOT NULL,
    tracker TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Streaming overlays: a friendly name and the SHA-256 of a bearer token (the token itself is
-- shown once, at creation). Deleting the row revokes it.
CREATE TABLE overlays (
    id TEXT PRIMARY KEY NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX overlays_user ON overlays (user_id);
