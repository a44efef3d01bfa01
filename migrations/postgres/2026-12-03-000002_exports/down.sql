DROP TABLE exports;
DROP INDEX play_history_user_id;
ALTER TABLE play_history DROP COLUMN listened_ms;
ALTER TABLE play_history DROP COLUMN started_at;
