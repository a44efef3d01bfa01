-- What each account reported of a catalog track: its ISRC, its length, and the cover it sent
-- once that rendered. A report is its own account's until another account agrees: the
-- catalog takes an ISRC, a length or artwork from reports only when two accounts report the
-- same (src/store/reports.rs), and never replaces what it has. Keep in step with the other
-- backend's migration and src/store/schema.rs.
CREATE TABLE track_reports (
    track_id TEXT NOT NULL REFERENCES tracks (id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    isrc TEXT,
    duration_ms BIGINT,
    artwork_hash TEXT,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (track_id, user_id)
);
CREATE INDEX track_reports_user_isrc ON track_reports (user_id, isrc);
