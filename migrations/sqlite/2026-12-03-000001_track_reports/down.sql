DROP INDEX ingest_plays_ends_at;
ALTER TABLE ingest_plays DROP COLUMN ends_at;
DROP TABLE track_reports;
