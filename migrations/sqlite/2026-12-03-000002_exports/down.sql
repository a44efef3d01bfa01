DROP TABLE exports;
ALTER TABLE play_history DROP COLUMN listened_ms;
ALTER TABLE play_history DROP COLUMN started_at;
