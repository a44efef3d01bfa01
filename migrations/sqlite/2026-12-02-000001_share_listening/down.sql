ALTER TABLE preferences DROP COLUMN share_listening;
