//! The jobs' Prometheus metrics: counts by kind, run time, queue depth, reclaims, leader
//! changes.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::Status;

#[derive(Clone)]
pub struct JobMetrics {
    /// Jobs enqueued, by kind.
    pub enqueued: IntCounterVec,
    /// Runs started, by kind.
    pub started: IntCounterVec,
    pub succeeded: IntCounterVec,
    /// Runs that failed and will be tried again, by kind.
    pub retried: IntCounterVec,
    /// Jobs moved to the dead letters, by kind.
    pub dead: IntCounterVec,
    /// Run time, by kind.
    pub duration: HistogramVec,
    /// Jobs per queue and state (`waiting`, `in_flight`), and `delayed` / `dead` (queue
    /// `all`), as of the last sweep.
    pub depth: IntGaugeVec,
    /// Entries taken over from a replica that stopped holding them.
    pub reclaimed: IntCounter,
    /// Times this replica became the scheduler's leader.
    pub leader_changes: IntCounter,
}

impl JobMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let by_kind = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let counter = IntCounterVec::new(Opts::new(name, help), &["kind"])?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let duration = HistogramVec::new(
            HistogramOpts::new("jobs_duration_seconds", "Time a job's run took").buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
            ]),
            &["kind"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let depth = IntGaugeVec::new(
            Opts::new("jobs_queue_depth", "Jobs per queue and state"),
            &["queue", "state"],
        )?;
        registry.register(Box::new(depth.clone()))?;
        let reclaimed = IntCounter::new(
            "jobs_reclaimed_total",
            "Job entries taken over from a replica that stopped holding them",
        )?;
        registry.register(Box::new(reclaimed.clone()))?;
        let leader_changes = IntCounter::new(
            "jobs_leader_changes_total",
            "Times this replica became the scheduler's leader",
        )?;
        registry.register(Box::new(leader_changes.clone()))?;
        Ok(Self {
            enqueued: by_kind("jobs_enqueued_total", "Jobs enqueued")?,
            started: by_kind("jobs_started_total", "Job runs started")?,
            succeeded: by_kind("jobs_succeeded_total", "Job runs that succeeded")?,
            retried: by_kind(
                "jobs_retried_total",
                "Job runs that failed and will be retried",
            )?,
            dead: by_kind("jobs_dead_total", "Jobs moved to the dead letters")?,
            duration,
            depth,
            reclaimed,
            leader_changes,
        })
    }

    pub fn observe(&self, status: &Status) {
        for queue in &status.queues {
            let name = queue.priority.name();
            self.depth
                .with_label_values(&[name, "waiting"])
                .set(gauge(queue.waiting));
            self.depth
                .with_label_values(&[name, "in_flight"])
                .set(gauge(queue.in_flight));
        }
        self.depth
            .with_label_values(&["all", "delayed"])
            .set(gauge(status.delayed));
        self.depth
            .with_label_values(&["all", "dead"])
            .set(gauge(status.dead));
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
