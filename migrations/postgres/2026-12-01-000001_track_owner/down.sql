ALTER TABLE tracks DROP COLUMN created_by;
