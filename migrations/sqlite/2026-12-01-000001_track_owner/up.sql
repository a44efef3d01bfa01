-- The account that created a track (NULL: the operator, e.g. segue seed-demo); only it may
-- replace the track.
ALTER TABLE tracks ADD COLUMN created_by BIGINT REFERENCES users (id) ON DELETE SET NULL;
