DROP TABLE job_probes;
DROP TABLE periodic_runs;
