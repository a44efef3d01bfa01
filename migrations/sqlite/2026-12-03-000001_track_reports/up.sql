-- What each account reported of a catalog track: its ISRC, its length, and the cover it sent
-- once that rendered. A report is its own account's until another account agrees: the
-- catalog takes an ISRC, a length or artwork from reports only when two accounts report the
-- same, and replaces one only when more accounts report the new value (src/store/reports.rs).
-- Keep in step with the other backend's migration and src/store/schema.rs.
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
-- Each vote is a count of one value among one track's reports.
CREATE INDEX track_reports_isrc ON track_reports (track_id, isrc);
CREATE INDEX track_reports_duration ON track_reports (track_id, duration_ms);
CREATE INDEX track_reports_artwork ON track_reports (track_id, artwork_hash);

-- What single reports wrote on tracks made from reports, before votes, is nobody's vote.
UPDATE tracks SET isrc = NULL, duration_ms = NULL, artwork_hash = NULL
WHERE match_key IS NOT NULL;

-- When a device's current play would have ended unreported (NULL: none): what the sweep of
-- silent plays selects by.
ALTER TABLE ingest_plays ADD COLUMN ends_at BIGINT;
CREATE INDEX ingest_plays_ends_at ON ingest_plays (ends_at);
