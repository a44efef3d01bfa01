-- Exports (POST /exports) and what a play's export row says. Keep in step with the other
-- backend's migration and src/store/schema.rs.

-- When a play began and how long it had been listened to when it counted (NULL for plays
-- recorded before this was kept).
ALTER TABLE play_history ADD COLUMN started_at TIMESTAMP;
ALTER TABLE play_history ADD COLUMN listened_ms BIGINT;
-- An export reads a user's plays in pages by id.
CREATE INDEX play_history_user_id ON play_history (user_id, id);

-- One row per export: built by the export.build job into the blob store under object_key,
-- downloadable until expires_at, then deleted by the exports.expire job.
CREATE TABLE exports (
    id TEXT PRIMARY KEY NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    rows_written BIGINT NOT NULL DEFAULT 0,
    bytes_written BIGINT NOT NULL DEFAULT 0,
    object_key TEXT,
    error TEXT,
    created_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    expires_at TIMESTAMP
);
CREATE INDEX exports_user ON exports (user_id, created_at);
CREATE INDEX exports_expires ON exports (expires_at);
-- One export in flight per account and kind.
CREATE UNIQUE INDEX exports_in_flight ON exports (user_id, kind)
    WHERE status IN ('pending', 'running');
