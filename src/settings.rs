//! Typed settings, layered: defaults in code, then an optional TOML file named by
//! `SEGUE_CONFIG`, then environment variables (`SEGUE_<FIELD>`, plus the conventional
//! `DATABASE_URL`, `REDIS_URL` and `S3_*` names). A bad value stops start-up with one sentence
//! that names the setting; secrets are wrapped so that they never print.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::ratelimit::{Limit, Quota};

/// Settings read from the environment without the `SEGUE_` prefix, by their usual names.
const UNPREFIXED: [&str; 8] = [
    "DATABASE_URL",
    "REDIS_URL",
    "S3_ENDPOINT",
    "S3_BUCKET",
    "S3_REGION",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_PUBLIC_BASE_URL",
];

/// Everything the hub can be told at start-up. Field `foo_bar` is set by `SEGUE_FOO_BAR`
/// (or its usual unprefixed name: `DATABASE_URL`, `REDIS_URL`, `S3_*`) or by `foo_bar = ...` in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `host:port` the HTTP server listens on; port 0 picks a free port (tests).
    pub bind: String,
    /// Where the embedded defaults keep their files: the SQLite database, the generated
    /// token-signing key, local blobs.
    pub data_dir: PathBuf,
    /// The web page's files, served at `/` (a relative path is relative to the working
    /// directory: `cargo run` in the repository finds `static/`).
    pub static_dir: PathBuf,
    /// `postgres://…` or `sqlite://path`; unset means SQLite at `$data_dir/segue.db`.
    pub database_url: Option<SecretString>,
    /// `redis://…`; unset means the in-process bus and registries (one replica only).
    pub redis_url: Option<SecretString>,
    /// Prefix of every Redis key and channel, so deployments and tests can share one Redis.
    pub redis_namespace: String,
    /// S3-compatible endpoint URL (MinIO, R2, …); unset means AWS's own endpoints.
    pub s3_endpoint: Option<String>,
    /// Bucket for artwork and exports; unset means blobs live under `$data_dir/blobs`.
    pub s3_bucket: Option<String>,
    /// Region name sent to S3.
    pub s3_region: String,
    /// S3 access key id.
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key.
    pub s3_secret_access_key: Option<SecretString>,
    /// A CDN or public bucket URL in front of the bucket: object URLs are `<base>/<key>`
    /// instead of presigned.
    pub s3_public_base_url: Option<String>,
    /// Largest artwork image a report may carry (bytes); larger is refused with 413.
    pub artwork_max_bytes: usize,
    /// Artwork images decoded at once on one replica (each may take one core).
    pub artwork_renders: usize,
    /// Longest one artwork render may take (ms); one that runs over is tried again later.
    pub artwork_render_timeout_ms: u64,
    /// Most bytes of reported covers waiting in Redis to be rendered, all reports together;
    /// past it a report with a new cover is answered 503 `busy` (Redis only).
    pub artwork_staged_max_bytes: u64,
    /// How long a replica trusts artwork it verified without checking its objects again
    /// (seconds; 0: check on every report that brings it).
    pub artwork_verified_secs: u64,
    /// HMAC key for access tokens. Every replica of one deployment needs the same key; when
    /// unset, a key is generated once and kept in `$data_dir/token.key`.
    pub jwt_secret: Option<SecretString>,
    /// The operator's bearer token: the `/admin/` routes answer only to it (and are not
    /// there, 404, while it is unset), and when set `GET /metrics` answers only to it too.
    /// At least 32 bytes.
    pub operator_token: Option<SecretString>,
    /// Another name for `operator_token` (`SEGUE_ADMIN_TOKEN`); set either, or both alike.
    pub admin_token: Option<SecretString>,
    /// Lifetime of an access token, in seconds.
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds.
    pub refresh_token_ttl_secs: u64,
    /// How long after a refresh token is spent presenting it again returns the same
    /// successor instead of ending the session (a retried or doubled refresh), in seconds;
    /// 0 turns the grace off.
    pub refresh_grace_secs: u64,
    /// Whether refreshes consult Redis first for what it knows of refresh tokens (the fast
    /// path; needs `REDIS_URL`). Off by default: on this project's machine it costs more
    /// round trips than the store queries it saves (docs/benchmarks.md).
    pub refresh_fast_path: bool,
    /// Largest accepted HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// Password hashes (register, login) run at once; unset means one per core. Each takes
    /// about 19 MiB while it runs.
    pub password_hash_threads: Option<usize>,
    /// How long a register or login waits for a hashing thread before it is answered 503
    /// with `Retry-After`, in milliseconds.
    pub password_hash_wait_ms: u64,
    /// Connections per database pool.
    pub db_pool_size: u32,
    /// How long a request waits for a database connection before it fails with 503.
    pub db_connect_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` for every pooled connection.
    pub db_statement_timeout_ms: u64,
    /// HTTP worker threads; unset means one per core.
    pub workers: Option<usize>,
    /// Largest WebSocket message handled, in bytes (continuation frames count together).
    pub ws_max_message_bytes: usize,
    /// A socket that sends nothing (not even a heartbeat) for this long is closed.
    pub ws_idle_timeout_secs: u64,
    /// Frames queued for one socket before it counts as not reading and is closed.
    pub ws_outbound_queue: usize,
    /// The kernel send buffer of each client connection, in bytes (`SO_SNDBUF`; the kernel
    /// doubles it for its bookkeeping); 0 leaves it to the kernel's autotuning, which lets a
    /// client that stops reading pin up to `net.ipv4.tcp_wmem`'s maximum (4 MiB) each.
    pub tcp_send_buffer_bytes: usize,
    /// Most sockets one account may hold open on this replica.
    pub ws_max_sockets_per_user: usize,
    /// Most sockets one client address may hold open on this replica (behind a proxy that
    /// hides client addresses, the proxy's own address counts).
    pub ws_max_sockets_per_ip: usize,
    /// How long past its access token's expiry a socket may still act before it is closed
    /// (1008, `token expired`), in seconds.
    pub ws_token_grace_secs: u64,
    /// Browser origins allowed to open sockets, comma-separated; empty means the hub's own
    /// origin only, `*` means any. Clients that send no `Origin` (non-browsers) are allowed.
    pub allowed_origins: String,
    /// How long a user's session outlives their last socket on this replica, in seconds.
    pub session_linger_secs: u64,
    /// Most entries one queue may hold.
    pub queue_max_entries: usize,
    /// How long a replica keeps a user's queue cached without hearing of it, in seconds.
    pub queue_cache_ttl_secs: u64,
    /// Most users whose queue a replica keeps cached (least recently used go first).
    pub queue_cache_capacity: u64,
    /// A device not heard from (heartbeat or `now_playing`) for this long is offline; a
    /// replica that dies leaves its devices listed at most this long, in seconds.
    pub presence_ttl_secs: u64,
    /// How long a device whose last socket closed stays listed, so a quick reconnect does
    /// not flap, in milliseconds.
    pub presence_leave_delay_ms: u64,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` name the client, as comma-separated
    /// addresses or CIDRs; from any other peer those headers are ignored.
    pub trusted_proxies: String,
    /// The header those proxies write the client's address into: `x-forwarded-for` (nginx's
    /// `proxy_add_x_forwarded_for`, HAProxy's `forwardfor`) or `forwarded` (RFC 7239).
    pub forwarded_header: crate::abuse::ForwardedHeader,
    /// Logins per client address (rates are written `20/m`, `5/10m`, `10/s:100` with a
    /// burst, or `off`).
    pub rate_limit_login_ip: Limit,
    /// Wrong-password logins per handle, whoever tries; while over it, the handle's logins
    /// are refused.
    pub rate_limit_login_handle: Limit,
    /// Registrations per client address.
    pub rate_limit_register_ip: Limit,
    /// Refreshes per login session.
    pub rate_limit_refresh_session: Limit,
    /// Requests per account, on every authenticated route.
    pub rate_limit_account: Limit,
    /// Requests per client address without a valid access token.
    pub rate_limit_anonymous_ip: Limit,
    /// Now-playing reports per device (REST: shared by every replica; sockets: counted on
    /// the replica that holds them).
    pub rate_limit_ingest_device: Limit,
    /// Exports asked for (`POST /exports`) per account.
    pub rate_limit_export_account: Limit,
    /// Socket upgrades per client address.
    pub rate_limit_socket_ip: Limit,
    /// Messages per socket; a socket over it gets error replies, and is closed if it goes on.
    pub rate_limit_socket_messages: Limit,
    /// Refusals by any rate limit an address may collect before it is blocked (e.g. `20/10m`:
    /// more than 20 within ten minutes); `off` never blocks automatically.
    pub ip_block_after: Limit,
    /// How long an automatic block lasts, in seconds.
    pub ip_block_secs: u64,
    /// Accounts one device (its `device_id`, or the `device_fingerprint` sent at
    /// registration) may create within `device_accounts_days`; 0 means no limit.
    pub device_accounts_max: u32,
    /// The window of `device_accounts_max`, in days.
    pub device_accounts_days: u32,
    /// Background jobs run at once on this replica.
    pub jobs_concurrency: usize,
    /// Runs of a failing job before it goes to the dead letters.
    pub jobs_max_attempts: u32,
    /// The first retry waits up to this long; each further one up to twice as long as the
    /// one before (full jitter), at most `jobs_backoff_cap_ms`, in milliseconds.
    pub jobs_backoff_base_ms: u64,
    pub jobs_backoff_cap_ms: u64,
    /// A job held by a replica that stopped renewing its lease (it died or hung) is run
    /// elsewhere after this long, in milliseconds (Redis only).
    pub jobs_visibility_ms: u64,
    /// How often replicas look for such jobs, in milliseconds (Redis only).
    pub jobs_sweep_ms: u64,
    /// On SIGTERM, how long jobs running may take to finish before the process exits (the
    /// rest are reclaimed by another replica), in seconds.
    pub jobs_drain_secs: u64,
    /// How long the scheduler's leader holds its lease unless renewed; a dead leader's
    /// successor takes over within it, in milliseconds (Redis only).
    pub scheduler_lease_ms: u64,
    /// When the store's upkeep (expired sessions, old device registrations, lapsed address
    /// blocks, old plays) runs: an interval (`90s`, `15m`, `6h`) or `daily HH:MM` in UTC.
    pub upkeep_schedule: String,
    /// Plays older than this many days are deleted by the upkeep; 0 keeps them forever.
    pub play_history_days: u32,
    /// How often plays of players that fell silent mid-track are ended (and counted): an
    /// interval (`90s`, `15m`, `6h`) or `daily HH:MM` in UTC.
    pub play_sweep_schedule: String,
    /// `on` (default): the store is backed up nightly into the blob store; `off`: only by
    /// hand (`segue backup now`).
    pub backup: String,
    /// When the nightly backup runs, `HH:MM` in UTC.
    pub backup_at: String,
    /// A bucket of its own for backups (same endpoint and credentials as `S3_BUCKET`);
    /// unset: the hub's blob store.
    pub backup_bucket: Option<String>,
    /// Where in the blob store backups go (ends with `/`).
    pub backup_prefix: String,
    /// Backups kept: the newest of each of the last this many days, ISO weeks and months.
    pub backup_keep_daily: u32,
    pub backup_keep_weekly: u32,
    pub backup_keep_monthly: u32,
    /// The wall clock periodic jobs are scheduled by: the system's, shifted only by tests
    /// (not a setting).
    #[serde(skip)]
    pub clock: crate::clock::Clock,
    /// How long a finished export is kept (seconds), then deleted.
    pub export_keep_secs: u64,
    /// How long an export's download link works (seconds).
    pub export_link_secs: u64,
    /// How often expired exports are deleted (same forms as `upkeep_schedule`).
    pub exports_sweep_schedule: String,
    /// `text` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// Log filter in `tracing`'s `EnvFilter` syntax; `RUST_LOG` wins when set.
    pub log: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./data"),
            static_dir: PathBuf::from("./static"),
            database_url: None,
            redis_url: None,
            redis_namespace: "segue".into(),
            s3_endpoint: None,
            s3_bucket: None,
            s3_region: "us-east-1".into(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_public_base_url: None,
            artwork_max_bytes: 10 * 1024 * 1024,
            artwork_renders: 1,
            artwork_render_timeout_ms: 30_000,
            artwork_verified_secs: 600,
            artwork_staged_max_bytes: 256 * 1024 * 1024,
            jwt_secret: None,
            operator_token: None,
            admin_token: None,
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 60 * 60,
            refresh_grace_secs: 30,
            refresh_fast_path: false,
            max_body_bytes: 1024 * 1024,
            password_hash_threads: None,
            password_hash_wait_ms: 2_000,
            db_pool_size: 16,
            db_connect_timeout_ms: 2_000,
            db_statement_timeout_ms: 5_000,
            workers: None,
            ws_max_message_bytes: 64 * 1024,
            ws_idle_timeout_secs: 60,
            ws_outbound_queue: 256,
            tcp_send_buffer_bytes: 128 * 1024,
            ws_token_grace_secs: 30,
            ws_max_sockets_per_user: 64,
            ws_max_sockets_per_ip: 1_024,
            allowed_origins: String::new(),
            session_linger_secs: 30,
            queue_max_entries: 10_000,
            queue_cache_ttl_secs: 300,
            queue_cache_capacity: 10_000,
            presence_ttl_secs: 60,
            presence_leave_delay_ms: 3_000,
            trusted_proxies: String::new(),
            forwarded_header: crate::abuse::ForwardedHeader::XForwardedFor,
            rate_limit_login_ip: limit(30, MINUTE, 10),
            rate_limit_login_handle: limit(20, HOUR, 10),
            rate_limit_register_ip: limit(20, HOUR, 5),
            rate_limit_refresh_session: limit(10, MINUTE, 10),
            rate_limit_account: limit(20, SECOND, 200),
            rate_limit_anonymous_ip: limit(10, SECOND, 100),
            rate_limit_ingest_device: limit(30, MINUTE, 10),
            rate_limit_export_account: limit(10, HOUR, 3),
            rate_limit_socket_ip: limit(60, MINUTE, 20),
            rate_limit_socket_messages: limit(20, SECOND, 100),
            ip_block_after: limit(20, 10 * MINUTE, 20),
            ip_block_secs: 15 * 60,
            device_accounts_max: 3,
            device_accounts_days: 30,
            jobs_concurrency: 10,
            jobs_max_attempts: 10,
            jobs_backoff_base_ms: 1_000,
            jobs_backoff_cap_ms: 600_000,
            jobs_visibility_ms: 30_000,
            jobs_sweep_ms: 5_000,
            jobs_drain_secs: 10,
            scheduler_lease_ms: 10_000,
            upkeep_schedule: "daily 04:00".into(),
            play_sweep_schedule: "1m".into(),
            backup: "on".into(),
            backup_at: "03:00".into(),
            backup_bucket: None,
            backup_prefix: "backups/".into(),
            backup_keep_daily: 7,
            backup_keep_weekly: 4,
            backup_keep_monthly: 12,
            clock: crate::clock::Clock::system(),
            export_keep_secs: 7 * 86_400,
            export_link_secs: 15 * 60,
            exports_sweep_schedule: "15m".into(),
            play_history_days: 365,
            log_format: LogFormat::Text,
            log: "info".into(),
        }
    }
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3_600);

/// `rate` per `period` with a burst of `burst` (a default; all of them are valid).
fn limit(rate: u32, period: Duration, burst: u32) -> Limit {
    let quota = std::num::NonZeroU32::new(rate).and_then(|rate| Quota::per(rate, period));
    let burst = std::num::NonZeroU32::new(burst);
    Limit(
        quota
            .zip(burst)
            .map(|(quota, burst)| quota.with_burst(burst)),
    )
}

/// A setting that cannot be used, with the name a person would set it by.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {setting}: {problem}")]
pub struct SettingsError {
    /// The environment variable (or file key) at fault.
    pub setting: String,
    /// One sentence saying what is wrong.
    pub problem: String,
}

impl SettingsError {
    fn new(setting: &str, problem: impl Into<String>) -> Self {
        Self {
            setting: setting.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Bounds of `SEGUE_TCP_SEND_BUFFER_BYTES` (other than 0).
const TCP_SEND_BUFFER_MIN: usize = 4 * 1024;
const TCP_SEND_BUFFER_MAX: usize = 16 * 1024 * 1024;

/// Which database the store talks to, decided once from `DATABASE_URL`.
#[derive(Debug, Clone)]
pub enum DatabaseTarget {
    /// A PostgreSQL connection URL (kept secret: it may hold a password).
    Postgres(SecretString),
    /// Path of a SQLite database file.
    Sqlite(PathBuf),
}

/// An environment value as figment reads one: `5` a number, `true` a boolean, `[1, 2]` an
/// array, anything else text.
fn env_value(value: &str) -> figment::value::Value {
    value
        .parse()
        .unwrap_or_else(|_| figment::value::Value::from(value.to_owned()))
}

/// Longest any duration setting may be: far beyond any sensible value, and short enough that
/// the hub can add it to a clock or to another duration without overflowing.
const DURATION_MAX_SECS: u64 = 10 * 366 * 86_400;

impl Settings {
    /// Reads the layered settings from the process environment.
    pub fn load() -> Result<Self, SettingsError> {
        Self::from_vars(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// Reads the layered settings from `vars` as if they were the environment: the file named
    /// by `SEGUE_CONFIG`, then `SEGUE_*`, then the unprefixed names. Values are read as
    /// figment reads the environment (`5` a number, `true` a boolean, anything else text).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut prefixed = figment::value::Dict::new();
        let mut unprefixed = figment::value::Dict::new();
        let mut config = None;
        for (key, value) in vars {
            // As figment's `Env` reads names: trimmed, any case.
            let upper = key.trim().to_ascii_uppercase();
            if upper == "SEGUE_CONFIG" {
                config = Some(PathBuf::from(value));
            } else if let Some(name) = upper.strip_prefix("SEGUE_").filter(|n| !n.is_empty()) {
                prefixed.insert(name.to_ascii_lowercase(), env_value(&value));
            } else if UNPREFIXED.contains(&upper.as_str()) {
                unprefixed.insert(upper.to_ascii_lowercase(), env_value(&value));
            }
        }
        let mut figment = Figment::new();
        if let Some(path) = config {
            if !path.is_file() {
                return Err(SettingsError::new(
                    "SEGUE_CONFIG",
                    format!("no configuration file at {}", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment
            .merge(Serialized::defaults(prefixed))
            .merge(Serialized::defaults(unprefixed));
        let settings: Settings = figment.extract().map_err(|error| match &error.kind {
            // Named as it was set (a stray space or dot included), not in serde's words.
            figment::error::Kind::UnknownField(field, _) => SettingsError::new(
                &env_name(field),
                "not a setting (the README's settings table lists them all)",
            ),
            kind => {
                let field = error.path.last().cloned().unwrap_or_default();
                SettingsError::new(&env_name(&field), kind.to_string())
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every duration setting at most [`DURATION_MAX_SECS`] (before, `u64::MAX` was accepted
    /// and overflowed when added to a clock).
    fn durations_in_range(&self) -> Result<(), SettingsError> {
        let seconds = [
            ("SEGUE_ARTWORK_VERIFIED_SECS", self.artwork_verified_secs),
            ("SEGUE_ACCESS_TOKEN_TTL_SECS", self.access_token_ttl_secs),
            ("SEGUE_REFRESH_TOKEN_TTL_SECS", self.refresh_token_ttl_secs),
            ("SEGUE_REFRESH_GRACE_SECS", self.refresh_grace_secs),
            ("SEGUE_WS_IDLE_TIMEOUT_SECS", self.ws_idle_timeout_secs),
            ("SEGUE_WS_TOKEN_GRACE_SECS", self.ws_token_grace_secs),
            ("SEGUE_SESSION_LINGER_SECS", self.session_linger_secs),
            ("SEGUE_QUEUE_CACHE_TTL_SECS", self.queue_cache_ttl_secs),
            ("SEGUE_PRESENCE_TTL_SECS", self.presence_ttl_secs),
            ("SEGUE_IP_BLOCK_SECS", self.ip_block_secs),
            ("SEGUE_JOBS_DRAIN_SECS", self.jobs_drain_secs),
            ("SEGUE_EXPORT_KEEP_SECS", self.export_keep_secs),
            ("SEGUE_EXPORT_LINK_SECS", self.export_link_secs),
        ];
        let milliseconds = [
            (
                "SEGUE_ARTWORK_RENDER_TIMEOUT_MS",
                self.artwork_render_timeout_ms,
            ),
            ("SEGUE_PASSWORD_HASH_WAIT_MS", self.password_hash_wait_ms),
            ("SEGUE_DB_CONNECT_TIMEOUT_MS", self.db_connect_timeout_ms),
            (
                "SEGUE_DB_STATEMENT_TIMEOUT_MS",
                self.db_statement_timeout_ms,
            ),
            (
                "SEGUE_PRESENCE_LEAVE_DELAY_MS",
                self.presence_leave_delay_ms,
            ),
            ("SEGUE_JOBS_BACKOFF_BASE_MS", self.jobs_backoff_base_ms),
            ("SEGUE_JOBS_BACKOFF_CAP_MS", self.jobs_backoff_cap_ms),
            ("SEGUE_JOBS_VISIBILITY_MS", self.jobs_visibility_ms),
            ("SEGUE_JOBS_SWEEP_MS", self.jobs_sweep_ms),
            ("SEGUE_SCHEDULER_LEASE_MS", self.scheduler_lease_ms),
        ];
        let too_long = seconds
            .iter()
            .find(|(_, value)| *value > DURATION_MAX_SECS)
            .or_else(|| {
                milliseconds
                    .iter()
                    .find(|(_, value)| *value > DURATION_MAX_SECS * 1_000)
            });
        match too_long {
            Some((name, _)) => Err(SettingsError::new(
                name,
                format!("must be at most {DURATION_MAX_SECS} seconds (ten years)"),
            )),
            None => Ok(()),
        }
    }

    /// Checks the values a type alone cannot; `load` calls it, tests building settings by
    /// hand may too.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.bind_addr()?;
        self.database()?;
        self.durations_in_range()?;
        if let Some(url) = &self.redis_url {
            let url = url.expose_secret();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(SettingsError::new(
                    "REDIS_URL",
                    "must start with redis:// or rediss://",
                ));
            }
        }
        let namespace_ok = !self.redis_namespace.is_empty()
            && self.redis_namespace.len() <= 64
            && self
                .redis_namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !namespace_ok {
            return Err(SettingsError::new(
                "SEGUE_REDIS_NAMESPACE",
                "must be 1 to 64 letters, digits, '_', '-' or '.'",
            ));
        }
        if let Some(secret) = &self.jwt_secret
            && secret.expose_secret().len() < 32
        {
            return Err(SettingsError::new(
                "SEGUE_JWT_SECRET",
                "must be at least 32 bytes long",
            ));
        }
        if self.s3_bucket.is_some() {
            self.s3_settings()?;
        }
        for (name, token) in [
            ("SEGUE_OPERATOR_TOKEN", &self.operator_token),
            ("SEGUE_ADMIN_TOKEN", &self.admin_token),
        ] {
            if let Some(token) = token
                && token.expose_secret().len() < 32
            {
                return Err(SettingsError::new(name, "must be at least 32 bytes long"));
            }
        }
        if let (Some(operator), Some(admin)) = (&self.operator_token, &self.admin_token)
            && operator.expose_secret() != admin.expose_secret()
        {
            return Err(SettingsError::new(
                "SEGUE_ADMIN_TOKEN",
                "names the operator token too, and differs from SEGUE_OPERATOR_TOKEN: set one",
            ));
        }
        if !(1..=1_000).contains(&self.jobs_concurrency) {
            return Err(SettingsError::new(
                "SEGUE_JOBS_CONCURRENCY",
                "must be between 1 and 1000",
            ));
        }
        if !(1..=100).contains(&self.jobs_max_attempts) {
            return Err(SettingsError::new(
                "SEGUE_JOBS_MAX_ATTEMPTS",
                "must be between 1 and 100",
            ));
        }
        if self.jobs_backoff_base_ms == 0 || self.jobs_backoff_cap_ms < self.jobs_backoff_base_ms {
            return Err(SettingsError::new(
                "SEGUE_JOBS_BACKOFF_CAP_MS",
                "must be at least SEGUE_JOBS_BACKOFF_BASE_MS, which must be above zero",
            ));
        }
        if !(200..=86_400_000).contains(&self.jobs_visibility_ms) {
            return Err(SettingsError::new(
                "SEGUE_JOBS_VISIBILITY_MS",
                "must be between 200 (0.2 s) and 86400000 (a day)",
            ));
        }
        if self.jobs_sweep_ms == 0 || self.jobs_sweep_ms > self.jobs_visibility_ms {
            return Err(SettingsError::new(
                "SEGUE_JOBS_SWEEP_MS",
                "must be above zero and at most SEGUE_JOBS_VISIBILITY_MS",
            ));
        }
        if self.jobs_drain_secs > 3_600 {
            return Err(SettingsError::new(
                "SEGUE_JOBS_DRAIN_SECS",
                "must be at most 3600 (an hour)",
            ));
        }
        if !(1_000..=600_000).contains(&self.scheduler_lease_ms) {
            return Err(SettingsError::new(
                "SEGUE_SCHEDULER_LEASE_MS",
                "must be between 1000 (a second) and 600000 (ten minutes)",
            ));
        }
        if self.artwork_max_bytes > 64 * 1024 * 1024 {
            return Err(SettingsError::new(
                "SEGUE_ARTWORK_MAX_BYTES",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        if self.artwork_staged_max_bytes < self.artwork_max_bytes as u64 {
            return Err(SettingsError::new(
                "SEGUE_ARTWORK_STAGED_MAX_BYTES",
                "must be at least SEGUE_ARTWORK_MAX_BYTES (room for one cover)",
            ));
        }
        crate::jobs::scheduler::Every::parse(&self.upkeep_schedule)
            .map_err(|e| SettingsError::new("SEGUE_UPKEEP_SCHEDULE", e.to_string()))?;
        crate::jobs::scheduler::Every::parse(&self.play_sweep_schedule)
            .map_err(|e| SettingsError::new("SEGUE_PLAY_SWEEP_SCHEDULE", e.to_string()))?;
        crate::jobs::scheduler::Every::parse(&self.exports_sweep_schedule)
            .map_err(|e| SettingsError::new("SEGUE_EXPORTS_SWEEP_SCHEDULE", e.to_string()))?;
        if !matches!(self.backup.as_str(), "on" | "off") {
            return Err(SettingsError::new("SEGUE_BACKUP", "must be on or off"));
        }
        self.backup_schedule()?;
        let prefix_ok = self.backup_prefix.ends_with('/')
            && crate::blobs::BlobKey::parse(&format!("{}x", self.backup_prefix)).is_ok();
        if !prefix_ok {
            return Err(SettingsError::new(
                "SEGUE_BACKUP_PREFIX",
                "must be /-separated segments of [A-Za-z0-9._-] ending with /",
            ));
        }
        if self.backup_bucket.is_some() && self.s3_bucket.is_none() {
            return Err(SettingsError::new(
                "SEGUE_BACKUP_BUCKET",
                "needs S3_BUCKET's endpoint and credentials (set S3_BUCKET too)",
            ));
        }
        if self.backup_keep_daily + self.backup_keep_weekly + self.backup_keep_monthly == 0 {
            return Err(SettingsError::new(
                "SEGUE_BACKUP_KEEP_DAILY",
                "keeping no backup at all: keep at least one daily, weekly or monthly",
            ));
        }
        // A presigned S3 link lasts at most a week.
        if !(1..=7 * 86_400).contains(&self.export_link_secs) {
            return Err(SettingsError::new(
                "SEGUE_EXPORT_LINK_SECS",
                "must be between 1 and 604800 (a week)",
            ));
        }
        let positive = [
            ("SEGUE_ACCESS_TOKEN_TTL_SECS", self.access_token_ttl_secs),
            ("SEGUE_REFRESH_TOKEN_TTL_SECS", self.refresh_token_ttl_secs),
            ("SEGUE_MAX_BODY_BYTES", self.max_body_bytes as u64),
            ("SEGUE_ARTWORK_MAX_BYTES", self.artwork_max_bytes as u64),
            ("SEGUE_ARTWORK_RENDERS", self.artwork_renders as u64),
            (
                "SEGUE_ARTWORK_STAGED_MAX_BYTES",
                self.artwork_staged_max_bytes,
            ),
            (
                "SEGUE_ARTWORK_RENDER_TIMEOUT_MS",
                self.artwork_render_timeout_ms,
            ),
            ("SEGUE_DB_POOL_SIZE", u64::from(self.db_pool_size)),
            ("SEGUE_PASSWORD_HASH_WAIT_MS", self.password_hash_wait_ms),
            ("SEGUE_DB_CONNECT_TIMEOUT_MS", self.db_connect_timeout_ms),
            (
                "SEGUE_DB_STATEMENT_TIMEOUT_MS",
                self.db_statement_timeout_ms,
            ),
            (
                "SEGUE_WS_MAX_MESSAGE_BYTES",
                self.ws_max_message_bytes as u64,
            ),
            ("SEGUE_WS_IDLE_TIMEOUT_SECS", self.ws_idle_timeout_secs),
            ("SEGUE_WS_OUTBOUND_QUEUE", self.ws_outbound_queue as u64),
            (
                "SEGUE_WS_MAX_SOCKETS_PER_USER",
                self.ws_max_sockets_per_user as u64,
            ),
            (
                "SEGUE_WS_MAX_SOCKETS_PER_IP",
                self.ws_max_sockets_per_ip as u64,
            ),
            ("SEGUE_QUEUE_MAX_ENTRIES", self.queue_max_entries as u64),
            ("SEGUE_QUEUE_CACHE_TTL_SECS", self.queue_cache_ttl_secs),
            ("SEGUE_QUEUE_CACHE_CAPACITY", self.queue_cache_capacity),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(SettingsError::new(name, "must be greater than zero"));
        }
        if self.tcp_send_buffer_bytes != 0
            && !(TCP_SEND_BUFFER_MIN..=TCP_SEND_BUFFER_MAX).contains(&self.tcp_send_buffer_bytes)
        {
            return Err(SettingsError::new(
                "SEGUE_TCP_SEND_BUFFER_BYTES",
                format!(
                    "must be 0 (the kernel decides) or {TCP_SEND_BUFFER_MIN} to {TCP_SEND_BUFFER_MAX}"
                ),
            ));
        }
        let bad_origin = self.allowed_origins.split(',').map(str::trim).find(|o| {
            !o.is_empty() && *o != "*" && !(o.starts_with("http://") || o.starts_with("https://"))
        });
        if let Some(origin) = bad_origin {
            return Err(SettingsError::new(
                "SEGUE_ALLOWED_ORIGINS",
                format!("{origin:?} is not an origin like https://app.example.com (or *)"),
            ));
        }
        if self.workers == Some(0) {
            return Err(SettingsError::new(
                "SEGUE_WORKERS",
                "must be greater than zero",
            ));
        }
        if self.ws_token_grace_secs > 3_600 {
            return Err(SettingsError::new(
                "SEGUE_WS_TOKEN_GRACE_SECS",
                "must be at most 3600 (an hour)",
            ));
        }
        if self.refresh_grace_secs > 300 {
            return Err(SettingsError::new(
                "SEGUE_REFRESH_GRACE_SECS",
                "must be at most 300 (five minutes)",
            ));
        }
        if !matches!(self.password_hash_threads, None | Some(1..=256)) {
            return Err(SettingsError::new(
                "SEGUE_PASSWORD_HASH_THREADS",
                "must be between 1 and 256",
            ));
        }
        if !(1..=3_600).contains(&self.presence_ttl_secs) {
            return Err(SettingsError::new(
                "SEGUE_PRESENCE_TTL_SECS",
                "must be between 1 and 3600 seconds",
            ));
        }
        crate::abuse::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|problem| SettingsError::new("SEGUE_TRUSTED_PROXIES", problem))?;
        if self.ip_block_secs == 0 || self.ip_block_secs > 30 * 86_400 {
            return Err(SettingsError::new(
                "SEGUE_IP_BLOCK_SECS",
                "must be between 1 and 2592000 (30 days)",
            ));
        }
        if !(1..=366).contains(&self.device_accounts_days) {
            return Err(SettingsError::new(
                "SEGUE_DEVICE_ACCOUNTS_DAYS",
                "must be between 1 and 366",
            ));
        }
        if self.presence_leave_delay_ms > 60_000 {
            return Err(SettingsError::new(
                "SEGUE_PRESENCE_LEAVE_DELAY_MS",
                "must be at most 60000 (a minute)",
            ));
        }
        Ok(())
    }

    /// The bucket's settings, when `S3_BUCKET` is set: then the key pair is required, and
    /// URLs must be `http(s)://`.
    pub fn s3_settings(&self) -> Result<Option<crate::blobs::S3Settings>, SettingsError> {
        let Some(bucket) = &self.s3_bucket else {
            return Ok(None);
        };
        let url_ok = |url: &str| url.starts_with("http://") || url.starts_with("https://");
        if let Some(endpoint) = &self.s3_endpoint
            && !url_ok(endpoint)
        {
            return Err(SettingsError::new(
                "S3_ENDPOINT",
                "must start with http:// or https://",
            ));
        }
        if let Some(base) = &self.s3_public_base_url
            && !url_ok(base)
        {
            return Err(SettingsError::new(
                "S3_PUBLIC_BASE_URL",
                "must start with http:// or https://",
            ));
        }
        if bucket.is_empty() || bucket.len() > 63 {
            return Err(SettingsError::new(
                "S3_BUCKET",
                "must be 1 to 63 characters",
            ));
        }
        let (Some(access_key_id), Some(secret_access_key)) =
            (&self.s3_access_key_id, &self.s3_secret_access_key)
        else {
            return Err(SettingsError::new(
                "S3_ACCESS_KEY_ID",
                "S3_BUCKET is set: S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY are needed too",
            ));
        };
        Ok(Some(crate::blobs::S3Settings {
            endpoint: self.s3_endpoint.clone(),
            bucket: bucket.clone(),
            region: self.s3_region.clone(),
            access_key_id: access_key_id.clone(),
            secret_access_key: secret_access_key.clone(),
            public_base_url: self.s3_public_base_url.clone(),
        }))
    }

    /// The object store: the bucket when `S3_BUCKET` is set, else `$SEGUE_DATA_DIR/blobs`.
    /// These settings with every rate limit, the address block and the accounts-per-device
    /// limit off: for load tests and benchmarks, which act faster than people do.
    pub fn with_limits_off(self) -> Self {
        use crate::ratelimit::Limit;
        Self {
            rate_limit_login_ip: Limit(None),
            rate_limit_login_handle: Limit(None),
            rate_limit_register_ip: Limit(None),
            rate_limit_refresh_session: Limit(None),
            rate_limit_account: Limit(None),
            rate_limit_anonymous_ip: Limit(None),
            rate_limit_ingest_device: Limit(None),
            rate_limit_export_account: Limit(None),
            rate_limit_socket_ip: Limit(None),
            rate_limit_socket_messages: Limit(None),
            ip_block_after: Limit(None),
            device_accounts_max: 0,
            ..self
        }
    }

    /// What the artwork library works with.
    pub fn artwork(&self) -> crate::artwork::library::LibrarySettings {
        crate::artwork::library::LibrarySettings {
            limits: crate::artwork::Limits {
                max_bytes: self.artwork_max_bytes,
                ..crate::artwork::Limits::default()
            },
            renders: self.artwork_renders,
            render_timeout: std::time::Duration::from_millis(self.artwork_render_timeout_ms),
            verified_for: std::time::Duration::from_secs(self.artwork_verified_secs),
        }
    }

    /// Where backups go: `SEGUE_BACKUP_BUCKET` when set, else the hub's blob store.
    pub fn backup_blobs(&self) -> Result<crate::blobs::Blobs, SettingsError> {
        match (&self.backup_bucket, self.s3_settings()?) {
            (Some(bucket), Some(mut s3)) => {
                s3.bucket.clone_from(bucket);
                s3.public_base_url = None;
                Ok(crate::blobs::Blobs::S3(crate::blobs::S3Blobs::new(&s3)))
            }
            _ => self.blobs(),
        }
    }

    /// When the nightly backup runs.
    pub fn backup_schedule(&self) -> Result<crate::jobs::scheduler::Every, SettingsError> {
        crate::jobs::scheduler::Every::parse(&format!("daily {}", self.backup_at))
            .map_err(|_| SettingsError::new("SEGUE_BACKUP_AT", "must be HH:MM (UTC)"))
    }

    /// What the backups work with (the metrics are the hub's).
    pub fn backups(
        &self,
        metrics: crate::telemetry::BackupMetrics,
    ) -> Result<crate::backups::Backups, SettingsError> {
        let keep = |n: u32| n as usize;
        Ok(crate::backups::Backups {
            database: self.database()?,
            blobs: self.backup_blobs()?,
            prefix: self.backup_prefix.clone(),
            retention: crate::backups::Retention {
                daily: keep(self.backup_keep_daily),
                weekly: keep(self.backup_keep_weekly),
                monthly: keep(self.backup_keep_monthly),
            },
            nightly: self.backup_schedule()?,
            clock: self.clock.clone(),
            metrics,
        })
    }

    pub fn blobs(&self) -> Result<crate::blobs::Blobs, SettingsError> {
        Ok(match self.s3_settings()? {
            Some(s3) => crate::blobs::Blobs::S3(crate::blobs::S3Blobs::new(&s3)),
            None => crate::blobs::Blobs::Local(crate::blobs::LocalBlobs::new(
                self.data_dir.join("blobs"),
            )),
        })
    }

    /// The operator's token, by either of its names.
    pub fn operator_token(&self) -> Option<&SecretString> {
        self.operator_token.as_ref().or(self.admin_token.as_ref())
    }

    /// How jobs retry and how many run at once.
    pub fn job_settings(&self) -> crate::jobs::JobSettings {
        crate::jobs::JobSettings {
            concurrency: self.jobs_concurrency,
            max_attempts: self.jobs_max_attempts,
            backoff_base: Duration::from_millis(self.jobs_backoff_base_ms),
            backoff_cap: Duration::from_millis(self.jobs_backoff_cap_ms),
        }
    }

    /// The address to listen on.
    pub fn bind_addr(&self) -> Result<SocketAddr, SettingsError> {
        let invalid = || {
            SettingsError::new(
                "SEGUE_BIND",
                format!("must be host:port, got {:?}", self.bind),
            )
        };
        if let Ok(addr) = self.bind.parse() {
            return Ok(addr);
        }
        self.bind
            .to_socket_addrs()
            .map_err(|_| invalid())?
            .next()
            .ok_or_else(invalid)
    }

    /// The database named by `DATABASE_URL`, or the embedded SQLite file.
    pub fn database(&self) -> Result<DatabaseTarget, SettingsError> {
        let Some(url) = &self.database_url else {
            return Ok(DatabaseTarget::Sqlite(self.data_dir.join("segue.db")));
        };
        let raw = url.expose_secret();
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(DatabaseTarget::Postgres(url.clone()));
        }
        if let Some(path) = raw.strip_prefix("sqlite://") {
            if path.is_empty() || path.contains(":memory:") {
                return Err(SettingsError::new(
                    "DATABASE_URL",
                    "sqlite:// needs a file path, e.g. sqlite://./data/segue.db",
                ));
            }
            return Ok(DatabaseTarget::Sqlite(PathBuf::from(path)));
        }
        if raw.is_empty() {
            return Ok(DatabaseTarget::Sqlite(self.data_dir.join("segue.db")));
        }
        // Only the scheme is echoed back: the rest may hold a password.
        let scheme = raw.split("://").next().unwrap_or_default();
        Err(SettingsError::new(
            "DATABASE_URL",
            format!(
                "must start with postgres://, postgresql:// or sqlite:// (got scheme {scheme:?})"
            ),
        ))
    }

    /// The configured origin allow-list: `None` for "any origin", otherwise the list (empty:
    /// same origin only).
    pub fn origins(&self) -> Option<Vec<String>> {
        let entries: Vec<String> = self
            .allowed_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        if entries.iter().any(|o| o == "*") {
            None
        } else {
            Some(entries)
        }
    }

    /// How long a request waits for a pooled database connection.
    pub fn db_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.db_connect_timeout_ms)
    }

    /// Threads of the password hashing pool.
    pub fn password_hash_threads(&self) -> usize {
        self.password_hash_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        })
    }

    /// Where the generated token-signing key is kept when `SEGUE_JWT_SECRET` is unset.
    pub fn token_key_path(&self) -> PathBuf {
        self.data_dir.join("token.key")
    }
}

/// The environment variable that sets `field`.
fn env_name(field: &str) -> String {
    let upper = field.to_ascii_uppercase();
    if UNPREFIXED.contains(&upper.as_str()) {
        upper
    } else {
        format!("SEGUE_{upper}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_database(url: &str) -> Settings {
        Settings {
            database_url: Some(url.into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_use_sqlite_in_the_data_dir() {
        let settings = Settings::default();
        assert!(settings.validate().is_ok());
        match settings.database() {
            Ok(DatabaseTarget::Sqlite(path)) => assert_eq!(path, PathBuf::from("./data/segue.db")),
            other => panic!("expected sqlite, got {other:?}"),
        }
    }

    #[test]
    fn a_postgres_url_selects_postgres() {
        assert!(matches!(
            with_database("postgres://u:p@localhost/db").database(),
            Ok(DatabaseTarget::Postgres(_))
        ));
    }

    #[test]
    fn an_unknown_scheme_is_rejected_without_echoing_the_password() {
        let error = with_database("mysql://user:hunter2@host/db")
            .database()
            .err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("DATABASE_URL"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn a_bad_bind_address_names_the_setting() {
        let settings = Settings {
            bind: "not an address".into(),
            ..Settings::default()
        };
        let message = settings
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("SEGUE_BIND"), "{message}");
    }

    #[test]
    fn a_short_jwt_secret_is_rejected() {
        let settings = Settings {
            jwt_secret: Some("short".into()),
            ..Settings::default()
        };
        assert!(settings.validate().is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let settings = Settings {
            jwt_secret: Some("a-very-secret-key-that-is-long-enough".into()),
            database_url: Some("postgres://u:hunter2@localhost/db".into()),
            ..Settings::default()
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains("a-very-secret"));
    }

    #[test]
    fn env_names_follow_the_documented_scheme() {
        assert_eq!(env_name("database_url"), "DATABASE_URL");
        assert_eq!(env_name("max_body_bytes"), "SEGUE_MAX_BODY_BYTES");
    }
}
