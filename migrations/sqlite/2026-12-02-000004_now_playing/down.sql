DROP TABLE ingest_plays;
DROP TABLE ingests;
DROP TABLE artwork_waiters;
DROP TABLE artwork;
DROP INDEX tracks_match_key;
DROP INDEX tracks_isrc;
ALTER TABLE tracks DROP COLUMN artwork_hash;
ALTER TABLE tracks DROP COLUMN match_key;
ALTER TABLE tracks DROP COLUMN isrc;
