//! The rate-limit port: "may `key` do one more thing under `quota` now?", answered by the
//! in-process [`MemoryLimiter`] (`governor`; the embedded default, and the fallback) or by
//! the [`RedisLimiter`] (one GCRA script per decision, so every replica shares one budget).
//! Both implement the same generic cell rate algorithm and pass one acceptance suite
//! (`tests/api/ratelimit.rs`).

pub mod headers;
mod memory;
mod redis;

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

pub use self::memory::MemoryLimiter;
pub use self::redis::RedisLimiter;

/// A limit: `burst` at once, then one more every `interval` (`rate` per `period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// How many may be done at once, from rest.
    burst: NonZeroU32,
    /// How long until one more may be done; never zero.
    interval: Duration,
}

impl Quota {
    /// `rate` per `period`, with a burst of `rate`.
    pub fn per(rate: NonZeroU32, period: Duration) -> Option<Self> {
        let interval = period / rate.get();
        (!interval.is_zero()).then_some(Self {
            burst: rate,
            interval,
        })
    }

    /// The same rate, with another burst.
    pub fn with_burst(self, burst: NonZeroU32) -> Self {
        Self { burst, ..self }
    }

    /// The same quota as `governor` writes it.
    pub fn to_governor(self) -> governor::Quota {
        // Never `None`: no `Quota` has a zero interval.
        governor::Quota::with_period(self.interval)
            .unwrap_or(governor::Quota::per_second(self.burst))
            .allow_burst(self.burst)
    }

    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long a full burst takes to come back (the window the `RateLimit` headers name).
    pub fn window(&self) -> Duration {
        self.interval * self.burst.get()
    }
}

/// Written `<rate>/<period>` (burst = rate) or `<rate>/<period>:<burst>`, the period as a
/// number and a unit (`ms`, `s`, `m`, `h`, `d`; `1` may be left out): `20/m`, `5/10m`,
/// `10/s:100`.
impl FromStr for Quota {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("{text:?} is not a rate like 20/m, 5/10m or 10/s:100 (or off)");
        let (rate, rest) = text.trim().split_once('/').ok_or_else(invalid)?;
        let (period, burst) = match rest.split_once(':') {
            Some((period, burst)) => (period, Some(burst)),
            None => (rest, None),
        };
        let rate: NonZeroU32 = rate.trim().parse().map_err(|_| invalid())?;
        let period = parse_period(period.trim()).ok_or_else(invalid)?;
        let quota = Quota::per(rate, period).ok_or_else(invalid)?;
        match burst {
            Some(burst) => Ok(quota.with_burst(burst.trim().parse().map_err(|_| invalid())?)),
            None => Ok(quota),
        }
    }
}

fn parse_period(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (count, unit) = text.split_at(split);
    let count: u64 = if count.is_empty() {
        1
    } else {
        count.parse().ok()?
    };
    let unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3_600),
        "d" => Duration::from_secs(86_400),
        _ => return None,
    };
    (count > 0).then(|| unit.checked_mul(u32::try_from(count).ok()?))?
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = self.window();
        write!(f, "{}/{}ms", self.burst, window.as_millis())
    }
}

/// A rule's quota in the settings: a [`Quota`], or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<Quota>);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(Limit(None));
        }
        text.parse()
            .map(|quota| Limit(Some(quota)))
            .map_err(serde::de::Error::custom)
    }
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// How many more may be done at once after this one.
    pub remaining: u32,
    /// When refused: how long until one may be done.
    pub retry_after: Duration,
    /// How long until the full burst is back.
    pub reset_after: Duration,
}

impl Decision {
    /// Allowed, with the whole burst left.
    pub fn unlimited(quota: Quota) -> Self {
        Self {
            allowed: true,
            remaining: quota.burst.get(),
            retry_after: Duration::ZERO,
            reset_after: Duration::ZERO,
        }
    }
}

/// A limiter of either kind. Keys are `<rule>` plus the limited party (`login_ip`,
/// `203.0.113.7`); a rule's quota may change between calls (a quota change starts the key
/// afresh in memory, and is applied from the next call in Redis).
#[derive(Clone)]
pub enum Limiter {
    Memory(MemoryLimiter),
    Redis(RedisLimiter),
}

impl Limiter {
    /// Counts one attempt of `key` under `rule`'s `quota`.
    pub async fn check(&self, rule: &str, quota: Quota, key: &str) -> Decision {
        match self {
            Self::Memory(limiter) => limiter.check(rule, quota, key),
            Self::Redis(limiter) => limiter.check(rule, quota, key).await,
        }
    }

    /// Whether one more attempt of `key` would be allowed now, counting nothing.
    pub async fn peek(&self, rule: &str, quota: Quota, key: &str) -> Decision {
        match self {
            Self::Memory(limiter) => limiter.peek(rule, quota, key),
            Self::Redis(limiter) => limiter.peek(rule, quota, key).await,
        }
    }

    /// Forgets in-process keys whose budget is full again.
    pub fn sweep(&self) {
        match self {
            Self::Memory(limiter) => limiter.sweep(),
            Self::Redis(limiter) => limiter.fallback().sweep(),
        }
    }

    /// Which kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse_from_their_written_form() {
        let twenty_a_minute = "20/m".parse::<Quota>().unwrap();
        assert_eq!(twenty_a_minute.burst().get(), 20);
        assert_eq!(twenty_a_minute.interval(), Duration::from_secs(3));
        let slow = "5/10m".parse::<Quota>().unwrap();
        assert_eq!(slow.interval(), Duration::from_secs(120));
        let bursty = " 10/s:100 ".parse::<Quota>().unwrap();
        assert_eq!(
            (bursty.burst().get(), bursty.interval()),
            (100, Duration::from_millis(100))
        );
        assert_eq!(
            "3/500ms".parse::<Quota>().unwrap().interval(),
            Duration::from_nanos(166_666_666)
        );
        for bad in [
            "",
            "20",
            "20/",
            "0/m",
            "20/0m",
            "20/w",
            "x/m",
            "20/m:0",
            "20/m:",
            "-1/m",
            "20/1y",
            "2000000000/1ms",
        ] {
            assert!(bad.parse::<Quota>().is_err(), "{bad:?}");
        }
    }
}
