//! The wall clock that periodic work is scheduled by: the system's, or, for tests and
//! drills, the system's shifted by an amount that can be moved at run time, so that a
//! simulated day passes in a moment while timers still run in real time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall clock in Unix milliseconds (the system's unless shifted).
#[derive(Clone, Default)]
pub struct Clock {
    shift_ms: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The system's clock plus whatever `shift_ms` holds when read.
    pub fn shifted(shift_ms: Arc<AtomicI64>) -> Self {
        Self {
            shift_ms: Some(shift_ms),
        }
    }

    pub fn now_ms(&self) -> i64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let shift = self
            .shift_ms
            .as_ref()
            .map_or(0, |shift| shift.load(Ordering::Relaxed));
        system.saturating_add(shift)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.shift_ms {
            None => f.write_str("Clock::system"),
            Some(shift) => write!(f, "Clock::shifted({} ms)", shift.load(Ordering::Relaxed)),
        }
    }
}

/// Somewhere in the upper half of `wait`, so that retries which began together (replicas that
/// lost Redis at once, users whose writes failed in one outage) do not all land in the same
/// millisecond.
pub fn jittered(wait: Duration) -> Duration {
    use rand::Rng;
    let half = wait / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}
