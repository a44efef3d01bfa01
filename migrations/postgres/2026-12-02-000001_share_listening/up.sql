-- Whether followers (friends: views) and the public now-playing page may see what the user
-- plays. On by default, as music apps do.
ALTER TABLE preferences ADD COLUMN share_listening BOOLEAN NOT NULL DEFAULT TRUE;
