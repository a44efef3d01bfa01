-- Whether followers (friends: views) and the public now-playing page may see what the user
-- plays. On by default, as music apps do.
ALTER TABLE preferences ADD COLUMN share_listening BOOLEAN NOT NULL DEFAULT TRUE;
-- A choice saved before the column existed (kept then with the other free-form fields) holds.
UPDATE preferences SET share_listening = FALSE
    WHERE (extra::jsonb -> 'share_listening') = 'false'::jsonb;
