DROP TABLE track_reports;
