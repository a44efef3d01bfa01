//! Abuse protection: who the client is ([`client_ip`]), the rate-limit rules and what a
//! refusal costs (counted violations, then a block of the address on every replica), and the
//! block list ([`Blocks`]). The limits themselves are decided by [`crate::ratelimit`].

mod blocks;
mod client_ip;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use self::blocks::{Blocks, SYNC_EVERY};
pub use self::client_ip::{ForwardedHeader, TrustedProxies, address_key, client_ip};
use crate::error::ApiError;
use crate::ratelimit::{Decision, Limiter, Quota};
use crate::settings::Settings;
use crate::store::{Store, blocks as stored};
use crate::telemetry::Metrics;

/// What is limited, each by its own quota from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Logins per client address.
    LoginIp,
    /// Logins per handle.
    LoginHandle,
    /// Registrations per client address.
    RegisterIp,
    /// Refreshes per login session.
    RefreshSession,
    /// Requests per account.
    Account,
    /// Requests per address without a valid access token.
    AnonymousIp,
    /// Now-playing reports per device.
    IngestDevice,
    /// Exports asked for per account (each reads the whole history).
    ExportAccount,
    /// Socket upgrades per address.
    SocketIp,
    /// Messages per socket.
    SocketMessages,
    /// Refusals per address, before it is blocked.
    Violations,
}

impl Rule {
    /// The rule's name in metrics, headers and Redis keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::LoginIp => "login_ip",
            Self::LoginHandle => "login_handle",
            Self::RegisterIp => "register_ip",
            Self::RefreshSession => "refresh_session",
            Self::Account => "account",
            Self::AnonymousIp => "anonymous_ip",
            Self::IngestDevice => "ingest_device",
            Self::ExportAccount => "export_account",
            Self::SocketIp => "socket_ip",
            Self::SocketMessages => "socket_messages",
            Self::Violations => "violations",
        }
    }

    fn quota(self, settings: &Settings) -> Option<Quota> {
        let limit = match self {
            Self::LoginIp => settings.rate_limit_login_ip,
            Self::LoginHandle => settings.rate_limit_login_handle,
            Self::RegisterIp => settings.rate_limit_register_ip,
            Self::RefreshSession => settings.rate_limit_refresh_session,
            Self::Account => settings.rate_limit_account,
            Self::AnonymousIp => settings.rate_limit_anonymous_ip,
            Self::IngestDevice => settings.rate_limit_ingest_device,
            Self::ExportAccount => settings.rate_limit_export_account,
            Self::SocketIp => settings.rate_limit_socket_ip,
            Self::SocketMessages => settings.rate_limit_socket_messages,
            Self::Violations => settings.ip_block_after,
        };
        limit.0
    }
}

/// A change to the block list, for every replica to hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockChange {
    Blocked { address: String, until_ms: i64 },
    Lifted { address: String },
}

type Announce = Arc<dyn Fn(BlockChange) + Send + Sync>;

/// The replica's abuse protection, shared by the HTTP layer and the sockets.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

struct Inner {
    limiter: Limiter,
    settings: Arc<Settings>,
    trusted: TrustedProxies,
    blocks: Blocks,
    store: Store,
    metrics: Metrics,
    /// Tells every replica about a block change (the bus).
    announce: Announce,
}

/// 429 `rate_limited` for `rule`.
fn limited(rule: Rule, quota: Quota, decision: Decision) -> ApiError {
    ApiError::Limited {
        code: "rate_limited",
        detail: "Too many requests; slow down and retry after the time Retry-After gives.",
        rule: rule.name(),
        quota,
        decision,
    }
}

/// A request's client address, as the guard worked it out (in the request's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl Guard {
    pub fn new(
        limiter: Limiter,
        settings: Arc<Settings>,
        blocks: Blocks,
        store: Store,
        metrics: Metrics,
        announce: impl Fn(BlockChange) + Send + Sync + 'static,
    ) -> Self {
        // Settings were validated at start-up.
        let trusted = TrustedProxies::parse(&settings.trusted_proxies).unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                limiter,
                settings,
                trusted,
                blocks,
                store,
                metrics,
                announce: Arc::new(announce),
            }),
        }
    }

    /// The client of a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &actix_web::http::header::HeaderMap) -> IpAddr {
        client_ip(
            peer,
            headers,
            &self.inner.trusted,
            self.inner.settings.forwarded_header,
        )
    }

    pub fn blocks(&self) -> &Blocks {
        &self.inner.blocks
    }

    pub fn limiter(&self) -> &Limiter {
        &self.inner.limiter
    }

    /// The quota of `rule`, `None` when it is off.
    pub fn quota(&self, rule: Rule) -> Option<Quota> {
        rule.quota(&self.inner.settings)
    }

    /// 403 `ip_blocked` when `ip`'s address is blocked.
    pub fn refuse_blocked(&self, ip: IpAddr) -> Result<(), ApiError> {
        let now = chrono::Utc::now().timestamp_millis();
        match self.inner.blocks.until(&address_key(ip), now) {
            Some(_) => {
                self.inner.metrics.ip_blocked_requests.inc();
                Err(ApiError::client(
                    actix_web::http::StatusCode::FORBIDDEN,
                    "ip_blocked",
                    "Requests from this address are blocked for a while after too many refused ones.",
                ))
            }
            None => Ok(()),
        }
    }

    /// Counts one attempt of `key` under `rule`: `Ok(None)` when the rule is off, the decision
    /// when allowed, 429 `rate_limited` when not (a violation for `client`, which may block
    /// its address).
    pub async fn limit(
        &self,
        rule: Rule,
        key: &str,
        client: IpAddr,
    ) -> Result<Option<(Quota, Decision)>, ApiError> {
        let Some(quota) = self.quota(rule) else {
            return Ok(None);
        };
        let decision = self.inner.limiter.check(rule.name(), quota, key).await;
        if decision.allowed {
            return Ok(Some((quota, decision)));
        }
        self.inner
            .metrics
            .rate_limited
            .with_label_values(&[rule.name()])
            .inc();
        self.violation(client).await;
        Err(limited(rule, quota, decision))
    }

    /// 429 `rate_limited` when `key` is over `rule`'s budget now; counts nothing (no attempt,
    /// no violation). For rules that count failures only ([`Guard::spend`] after one).
    pub async fn refuse_if_spent(&self, rule: Rule, key: &str) -> Result<(), ApiError> {
        let Some(quota) = self.quota(rule) else {
            return Ok(());
        };
        let decision = self.inner.limiter.peek(rule.name(), quota, key).await;
        if decision.allowed {
            return Ok(());
        }
        self.inner
            .metrics
            .rate_limited
            .with_label_values(&[rule.name()])
            .inc();
        Err(limited(rule, quota, decision))
    }

    /// Counts one failure of `key` under `rule` (no violation for anyone: the failures of a
    /// handle may be anybody's).
    pub async fn spend(&self, rule: Rule, key: &str) {
        if let Some(quota) = self.quota(rule) {
            self.inner.limiter.check(rule.name(), quota, key).await;
        }
    }

    /// Whether `ip` may never be blocked automatically (loopback, trusted proxies).
    fn exempt(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.inner.trusted.contains(ip)
    }

    /// A refusal for `client`: past `SEGUE_IP_BLOCK_AFTER` of them, its address is blocked.
    async fn violation(&self, client: IpAddr) {
        if self.exempt(client) {
            return;
        }
        let Some(quota) = self.quota(Rule::Violations) else {
            return;
        };
        let address = address_key(client);
        let decision = self
            .inner
            .limiter
            .check(Rule::Violations.name(), quota, &address)
            .await;
        if decision.allowed {
            return;
        }
        let ttl = Duration::from_secs(self.inner.settings.ip_block_secs);
        if let Err(error) = self.block(&address, ttl, "auto").await {
            tracing::warn!(%error, %address, "could not block an address");
        }
    }

    /// Blocks `address` (an address key) for `ttl` on every replica; `source` is `auto` or
    /// `operator`.
    pub async fn block(
        &self,
        address: &str,
        ttl: Duration,
        source: &'static str,
    ) -> Result<i64, crate::store::StoreError> {
        let now = crate::store::now();
        let until = now
            .checked_add_signed(chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::MAX))
            .unwrap_or(chrono::NaiveDateTime::MAX);
        {
            let mut pooled = self.inner.store.conn().await?;
            stored::block(&mut pooled.conn(), address, until, source).await?;
        }
        let until_ms = until.and_utc().timestamp_millis();
        self.inner.blocks.insert(address.to_owned(), until_ms);
        (self.inner.announce)(BlockChange::Blocked {
            address: address.to_owned(),
            until_ms,
        });
        self.inner
            .metrics
            .ip_blocks
            .with_label_values(&[source])
            .inc();
        tracing::warn!(%address, ttl_secs = ttl.as_secs(), source, "address blocked");
        Ok(until_ms)
    }

    /// Lifts the block of `address` on every replica; `true` if there was one.
    pub async fn unblock(&self, address: &str) -> Result<bool, crate::store::StoreError> {
        let lifted = {
            let mut pooled = self.inner.store.conn().await?;
            stored::unblock(&mut pooled.conn(), address).await?
        };
        self.inner.blocks.remove(address);
        (self.inner.announce)(BlockChange::Lifted {
            address: address.to_owned(),
        });
        tracing::info!(%address, "address block lifted");
        Ok(lifted)
    }

    /// Reads the store's blocks into this replica's list (at start and every [`SYNC_EVERY`]).
    pub async fn sync_blocks(&self) -> Result<(), crate::store::StoreError> {
        let read_at = std::time::Instant::now();
        let active = {
            let mut pooled = self.inner.store.conn().await?;
            stored::active(&mut pooled.conn(), crate::store::now()).await?
        };
        let blocks = active
            .into_iter()
            .map(|b| (b.address, b.until.and_utc().timestamp_millis()))
            .collect();
        self.inner.blocks.replace_all(blocks, read_at);
        Ok(())
    }

    /// Keeps the block list in step with the store, and the in-process limiter's memory to
    /// recent keys, for as long as the replica runs.
    pub fn start_upkeep(&self) {
        let guard = self.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_EVERY);
            let mut ticks: u64 = 0;
            loop {
                tick.tick().await;
                ticks += 1;
                if let Err(error) = guard.sync_blocks().await {
                    tracing::warn!(%error, "could not read the blocked addresses");
                }
                if ticks.is_multiple_of(30) {
                    guard.inner.limiter.sweep();
                }
            }
        });
    }
}
