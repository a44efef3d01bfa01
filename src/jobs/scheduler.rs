//! Periodic jobs, run once per period across every replica.
//!
//! With Redis, one replica at a time leads: it holds a lease (`SET NX PX` with its token,
//! taken together with a fresh fencing epoch by one script), renews it with a
//! compare-then-`PEXPIRE` script, acts only until a local deadline short of the lease's end,
//! and steps down on any renewal failure. Each period's job is enqueued under a
//! `(job, tick)` idempotency key, so even two leaders at once (a paused one and its
//! successor) enqueue it once; the last tick enqueued is kept in Redis, guarded by the epoch,
//! so a new leader enqueues the ticks its predecessor missed. In process, the one replica
//! leads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::redis::Redialed;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::Clock;

use super::{JobMetrics, Jobs, Kind, Options, Priority, RedisJobs};

/// Ticks a new leader enqueues at most to catch up on ones missed while nobody led.
const MAX_CATCH_UP: i64 = 10;

/// When a periodic job is due: every `period`, counted from the Unix epoch plus `offset`
/// (`daily 04:00` is a period of a day and an offset of four hours, in UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    period: Duration,
    offset: Duration,
}

/// A schedule that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a schedule: write an interval from 1s to a week (`90s`, `15m`, `6h`) or `daily HH:MM` (UTC)"
)]
pub struct BadSchedule(String);

impl Every {
    pub fn interval(period: Duration) -> Self {
        Self {
            period: period.max(Duration::from_secs(1)),
            offset: Duration::ZERO,
        }
    }

    /// `90s`, `15m`, `6h` (at least a second), or `daily HH:MM` in UTC.
    pub fn parse(raw: &str) -> Result<Self, BadSchedule> {
        let bad = || BadSchedule(raw.to_owned());
        let text = raw.trim();
        if let Some(time) = text.strip_prefix("daily ") {
            let (hours, minutes) = time.trim().split_once(':').ok_or_else(bad)?;
            let hours: u64 = hours.parse().map_err(|_| bad())?;
            let minutes: u64 = minutes.parse().map_err(|_| bad())?;
            if hours > 23 || minutes > 59 {
                return Err(bad());
            }
            return Ok(Self {
                period: Duration::from_secs(86_400),
                offset: Duration::from_secs(hours * 3600 + minutes * 60),
            });
        }
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (count, unit) = text.split_at(split);
        let count: u64 = count.parse().map_err(|_| bad())?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        let secs = count.saturating_mul(unit_secs);
        // Idempotency keys (8 days) outlive a tick by at least a day only up to a week.
        if count == 0 || secs > 7 * 86_400 {
            return Err(bad());
        }
        Ok(Self::interval(Duration::from_secs(secs)))
    }

    /// The tick `now_ms` (Unix milliseconds) falls in.
    pub fn tick_at(&self, now_ms: i64) -> i64 {
        let period = i64::try_from(self.period.as_millis()).unwrap_or(i64::MAX);
        let offset = i64::try_from(self.offset.as_millis()).unwrap_or(0);
        (now_ms - offset).div_euclid(period)
    }

    /// When tick `tick` starts (Unix milliseconds).
    pub fn start_of(&self, tick: i64) -> i64 {
        let period = i64::try_from(self.period.as_millis()).unwrap_or(i64::MAX);
        let offset = i64::try_from(self.offset.as_millis()).unwrap_or(0);
        tick.saturating_mul(period).saturating_add(offset)
    }

    /// The schedule in one word (`<period ms>+<offset ms>`): ticks of different schedules
    /// are different numbers, so what is remembered of them is kept apart.
    pub fn signature(&self) -> String {
        format!("{}+{}", self.period.as_millis(), self.offset.as_millis())
    }

    /// Milliseconds from `now_ms` until the next tick starts.
    fn until_next(&self, now_ms: i64) -> Duration {
        let period = i64::try_from(self.period.as_millis()).unwrap_or(i64::MAX);
        let offset = i64::try_from(self.offset.as_millis()).unwrap_or(0);
        let next_start = (self.tick_at(now_ms) + 1) * period + offset;
        Duration::from_millis(u64::try_from(next_start - now_ms).unwrap_or(0))
    }
}

/// The payload a periodic job's handler gets: which tick it is, and the fencing epoch of the
/// leader that enqueued it.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Tick {
    pub tick: i64,
    pub epoch: u64,
}

/// One periodic job: its name, schedule and kind (whose payload is a [`Tick`]).
#[derive(Debug, Clone)]
pub struct Periodic {
    pub name: &'static str,
    pub every: Every,
    kind: &'static str,
    pub priority: Priority,
}

impl Periodic {
    pub fn new(name: &'static str, every: Every, kind: &Kind<Tick>) -> Self {
        Self {
            name,
            every,
            kind: kind.name(),
            priority: Priority::Low,
        }
    }
}

/// How the scheduler's lease is timed.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How long a lease lasts unless renewed; a dead leader's successor takes over within it.
    pub ttl: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
        }
    }
}

impl LeaseSettings {
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long before the lease ends the leader stops acting (2 s, or a fifth of short
    /// leases).
    fn margin(&self) -> Duration {
        Duration::from_secs(2).min(self.ttl / 5)
    }
}

/// The replica named in a lease token.
pub fn holder_of(token: &str) -> String {
    token.to_owned()
}

/// A running scheduler; stop it with [`Scheduler::stop`] (a leader gives its lease up).
pub struct Scheduler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Scheduler {
    /// Starts scheduling `periodic` on `jobs`. `replica` names this replica in the lease.
    /// Ticks are read off `clock` (the system's, but for tests).
    pub fn start(
        jobs: Jobs,
        periodic: Vec<Periodic>,
        replica: String,
        lease: LeaseSettings,
        metrics: JobMetrics,
        clock: Clock,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(lead(
            jobs, periodic, replica, lease, metrics, clock, stopped,
        ));
        Self { stop, task }
    }

    /// Stops scheduling; a leader gives up its lease so that another replica leads at once.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Where the lease and the last ticks live (one per scheduler: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Lease {
    /// In process: always the leader, ticks remembered here.
    Local { last: HashMap<String, i64> },
    Redis {
        conn: Redialed,
        keys: super::redis::Keys,
        token: String,
        scripts: Arc<LeaseScripts>,
    },
}

struct LeaseScripts {
    acquire: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    advance: redis::Script,
}

impl LeaseScripts {
    fn load() -> Self {
        Self {
            acquire: redis::Script::new(include_str!("lua/lease_acquire.lua")),
            renew: redis::Script::new(include_str!("lua/lease_renew.lua")),
            release: redis::Script::new(include_str!("lua/lease_release.lua")),
            advance: redis::Script::new(include_str!("lua/tick_advance.lua")),
        }
    }
}

impl Lease {
    fn of(jobs: &Jobs, replica: &str) -> Self {
        match jobs {
            Jobs::Memory(_) => Self::Local {
                last: HashMap::new(),
            },
            Jobs::Redis(redis) => Self::redis(redis, replica),
        }
    }

    fn redis(jobs: &RedisJobs, replica: &str) -> Self {
        Self::Redis {
            conn: jobs.connection(),
            keys: jobs.keys().clone(),
            token: replica.to_owned(),
            scripts: Arc::new(LeaseScripts::load()),
        }
    }

    /// Takes the lease if nobody holds it: its epoch, or `None`.
    async fn acquire(
        &mut self,
        settings: &LeaseSettings,
    ) -> Result<Option<u64>, redis::RedisError> {
        match self {
            Self::Local { .. } => Ok(Some(1)),
            Self::Redis {
                conn,
                keys,
                token,
                scripts,
            } => {
                scripts
                    .acquire
                    .key(&keys.leader)
                    .key(&keys.epoch)
                    .arg(token.as_str())
                    .arg(ttl_ms(settings))
                    .invoke_async(conn)
                    .await
            }
        }
    }

    /// Extends the lease; false when it is no longer ours.
    async fn renew(&mut self, settings: &LeaseSettings) -> Result<bool, redis::RedisError> {
        match self {
            Self::Local { .. } => Ok(true),
            Self::Redis {
                conn,
                keys,
                token,
                scripts,
            } => {
                let renewed: u32 = scripts
                    .renew
                    .key(&keys.leader)
                    .arg(token.as_str())
                    .arg(ttl_ms(settings))
                    .invoke_async(conn)
                    .await?;
                Ok(renewed == 1)
            }
        }
    }

    async fn release(&mut self) {
        if let Self::Redis {
            conn,
            keys,
            token,
            scripts,
        } = self
        {
            let released: Result<u32, _> = scripts
                .release
                .key(&keys.leader)
                .arg(token.as_str())
                .invoke_async(conn)
                .await;
            if let Err(error) = released {
                tracing::debug!(%error, "scheduler: giving up the lease failed (it expires)");
            }
        }
    }

    /// The last tick of `job` enqueued by any leader.
    async fn last_tick(&mut self, job: &str) -> Result<Option<i64>, redis::RedisError> {
        match self {
            Self::Local { last } => Ok(last.get(job).copied()),
            Self::Redis { conn, keys, .. } => {
                redis::cmd("GET")
                    .arg(keys.tick(job))
                    .query_async(conn)
                    .await
            }
        }
    }

    /// Records `tick` of `job` as enqueued, unless a newer leader (epoch) took over: false
    /// then.
    async fn advance(
        &mut self,
        job: &str,
        tick: i64,
        epoch: u64,
    ) -> Result<bool, redis::RedisError> {
        match self {
            Self::Local { last } => {
                last.insert(job.to_owned(), tick);
                Ok(true)
            }
            Self::Redis {
                conn,
                keys,
                scripts,
                ..
            } => {
                let advanced: i64 = scripts
                    .advance
                    .key(&keys.epoch)
                    .key(keys.tick(job))
                    .arg(epoch)
                    .arg(tick)
                    .invoke_async(conn)
                    .await?;
                Ok(advanced >= 0)
            }
        }
    }
}

fn ttl_ms(settings: &LeaseSettings) -> u64 {
    u64::try_from(settings.ttl.as_millis()).unwrap_or(u64::MAX)
}

/// The scheduler's loop: lead when the lease is free, enqueue due ticks while leading.
async fn lead(
    jobs: Jobs,
    periodic: Vec<Periodic>,
    replica: String,
    settings: LeaseSettings,
    metrics: JobMetrics,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) {
    let mut lease = Lease::of(&jobs, &replica);
    // While leading: the epoch, and the local instant to stop acting at.
    let mut leading: Option<(u64, Instant)> = None;
    let mut next_renewal = Instant::now();
    loop {
        if *stop.borrow() {
            if leading.is_some() {
                lease.release().await;
            }
            return;
        }
        if Instant::now() >= next_renewal {
            let asked = Instant::now();
            match leading {
                None => match lease.acquire(&settings).await {
                    Ok(Some(epoch)) => {
                        tracing::info!(replica, epoch, "scheduler: leading");
                        metrics.leader_changes.inc();
                        leading = Some((epoch, asked + settings.ttl - settings.margin()));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::debug!(%error, "scheduler: could not ask for the lease"),
                },
                Some((epoch, _)) => match lease.renew(&settings).await {
                    Ok(true) => leading = Some((epoch, asked + settings.ttl - settings.margin())),
                    Ok(false) => {
                        tracing::warn!(
                            replica,
                            epoch,
                            "scheduler: the lease was lost; stepping down"
                        );
                        leading = None;
                    }
                    Err(error) => {
                        tracing::warn!(replica, epoch, %error, "scheduler: renewing the lease failed; stepping down");
                        leading = None;
                    }
                },
            }
            next_renewal = asked + settings.renew_every();
        }
        if let Some((epoch, deadline)) = leading {
            for job in &periodic {
                if Instant::now() >= deadline {
                    break;
                }
                let now = clock.now_ms();
                if let Err(error) = enqueue_due(&jobs, &mut lease, job, epoch, now).await {
                    tracing::warn!(job = job.name, %error, "scheduler: enqueueing a tick failed; trying again");
                }
            }
        }
        // Wake for the next renewal or the next tick, whichever is first.
        let now = clock.now_ms();
        let next_tick = periodic
            .iter()
            .map(|p| p.every.until_next(now))
            .min()
            .unwrap_or(settings.renew_every());
        let wake = next_renewal.min(Instant::now() + next_tick);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            changed = stop.changed() => {
                // The `Scheduler` was dropped without `stop`: stop as well, never spin.
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Enqueues every tick of `job` from the one after the last enqueued up to the current (at
/// most [`MAX_CATCH_UP`]), each under its `(job, tick)` idempotency key.
async fn enqueue_due(
    jobs: &Jobs,
    lease: &mut Lease,
    job: &Periodic,
    epoch: u64,
    now_ms: i64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let current = job.every.tick_at(now_ms);
    // Ticks are remembered per schedule: after a schedule change the job starts afresh.
    let remembered = format!("{}:{}", job.name, job.every.signature());
    let last = lease.last_tick(&remembered).await?;
    let first = match last {
        Some(last) if last >= current => return Ok(()),
        Some(last) => (last + 1).max(current - MAX_CATCH_UP + 1),
        // Never scheduled before: as cron does, the first run is at the next tick, not now.
        None => {
            lease.advance(&remembered, current, epoch).await?;
            return Ok(());
        }
    };
    if let Some(last) = last
        && first > last + 1
    {
        tracing::warn!(
            job = job.name,
            skipped = first - last - 1,
            "scheduler: ticks nobody enqueued are skipped"
        );
    }
    for tick in first..=current {
        let payload = serde_json::to_value(Tick { tick, epoch })?;
        let options = Options {
            priority: Some(job.priority),
            idempotency_key: Some(format!("tick:{remembered}:{tick}")),
            delay: None,
        };
        let enqueued = jobs
            .enqueue_value(job.kind, payload as Value, options)
            .await?;
        tracing::debug!(job = job.name, tick, ?enqueued, "scheduler: tick enqueued");
        if !lease.advance(&remembered, tick, epoch).await? {
            return Err("a newer leader took over".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_as_intervals_or_daily_times() {
        assert_eq!(
            Every::parse("90s"),
            Ok(Every::interval(Duration::from_secs(90)))
        );
        assert_eq!(
            Every::parse("15m"),
            Ok(Every::interval(Duration::from_secs(900)))
        );
        assert_eq!(
            Every::parse(" 6h "),
            Ok(Every::interval(Duration::from_secs(21_600)))
        );
        let daily = Every::parse("daily 04:30").unwrap();
        assert_eq!(daily.period, Duration::from_secs(86_400));
        assert_eq!(daily.offset, Duration::from_secs(4 * 3600 + 30 * 60));
        for bad in [
            "",
            "0s",
            "169h",
            "5",
            "5d",
            "s",
            "daily 24:00",
            "daily 4",
            "daily xx:10",
            "-5s",
        ] {
            assert!(Every::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_daily_tick_starts_at_its_time_of_day() {
        let daily = Every::parse("daily 04:00").unwrap();
        let day = 86_400_000;
        let four = 4 * 3_600_000;
        // 2026-12-02 03:59:59.999 UTC belongs to the day before's tick; 04:00 starts a new one.
        let midnight = 20_424 * day;
        assert_eq!(
            daily.tick_at(midnight + four - 1),
            daily.tick_at(midnight + four) - 1
        );
        assert_eq!(
            daily.tick_at(midnight + four),
            daily.tick_at(midnight + four + day - 1)
        );
        assert_eq!(
            daily.until_next(midnight + four - 1_000),
            Duration::from_secs(1)
        );
        let minute = Every::parse("1m").unwrap();
        assert_eq!(
            minute.until_next(60_000 * 7 + 59_000),
            Duration::from_secs(1)
        );
    }
}
