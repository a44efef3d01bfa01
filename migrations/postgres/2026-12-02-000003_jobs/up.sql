-- One row per tick of a periodic job that ran: which job (id) ran it, for which leader
-- (epoch), what it removed, and how often a different job came for the same tick (a tick
-- enqueued twice; the scheduler's idempotency keys keep this 0).
CREATE TABLE periodic_runs (
    job TEXT NOT NULL,
    tick BIGINT NOT NULL,
    job_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    ran_at TIMESTAMP NOT NULL,
    removed BIGINT NOT NULL DEFAULT 0,
    doubled INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, tick)
);

-- The effect of a probe job (an operator's end-to-end check of the workers): one row per
-- job id, with how many runs of it completed.
CREATE TABLE job_probes (
    job_id BIGINT PRIMARY KEY NOT NULL,
    runs INTEGER NOT NULL,
    finished_at TIMESTAMP NOT NULL
);
