//! Logs and metrics. Logs go through `tracing` (text, or JSON with `SEGUE_LOG_FORMAT=json`);
//! metrics live in a registry per [`Application`](crate::startup::Application), so that two
//! replicas in one test process keep separate counts, and are served as Prometheus text.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, Settings};

/// Installs the global log subscriber. `RUST_LOG`, when set, wins over `SEGUE_LOG`.
pub fn init_tracing(settings: &Settings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests build many applications) keeps the first subscriber.
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The hub's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by method, route pattern and status.
    http_requests: IntCounterVec,
    /// Time to answer, by method and route pattern.
    http_duration: HistogramVec,
    /// Open WebSockets.
    pub ws_open: IntGauge,
    /// Text frames received.
    pub ws_frames_in: IntCounter,
    /// Frames queued for sockets.
    pub ws_frames_out: IntCounter,
    /// Malformed, oversized or binary frames received.
    pub ws_bad_frames: IntCounter,
    /// Sockets closed because the client stopped reading.
    pub ws_slow_closed: IntCounter,
    /// Users with a session on this replica.
    pub sessions: IntGauge,
    /// Events published on the bus.
    pub bus_published: IntCounter,
    /// Events heard from other replicas.
    pub bus_heard: IntCounter,
    /// Times the bus connection was lost.
    pub bus_lost: IntCounter,
    /// Times the bus connection came back.
    pub bus_restored: IntCounter,
    pub bus_missed: IntCounter,
    /// Requests and messages refused by a rate limit, by rule (a fixed set of names).
    pub rate_limited: IntCounterVec,
    /// Rate-limit decisions made in process because Redis did not answer in time.
    pub rate_limit_fail_open: IntCounter,
    /// Client addresses blocked, by how (`auto` or `operator`).
    pub ip_blocks: IntCounterVec,
    /// Requests refused because their address is blocked.
    pub ip_blocked_requests: IntCounter,
    /// Cache-aside reads answered by Redis, by cache (store queries saved).
    pub cache_hits: IntCounterVec,
    /// Cache-aside reads Redis could not answer, by cache.
    pub cache_misses: IntCounterVec,
    /// Cache-aside calls that failed every try, by cache (the store answered alone).
    pub cache_errors: IntCounterVec,
    /// The background jobs' counts, run times, depths, reclaims and leader changes.
    pub jobs: crate::jobs::JobMetrics,
    /// The now-playing pipeline's artwork work.
    pub artwork: ArtworkMetrics,
    /// The store's backups.
    pub backups: BackupMetrics,
}

/// The last backup that succeeded (its time, how long it took, its size) and how many
/// failed.
#[derive(Clone)]
pub struct BackupMetrics {
    pub last_success: Gauge,
    pub last_duration: Gauge,
    pub last_bytes: Gauge,
    pub failures: IntCounter,
}

/// What the artwork job did: images decoded and rendered, objects uploaded, known artwork
/// checked without decoding, images refused (by reason).
#[derive(Clone)]
pub struct ArtworkMetrics {
    pub rendered: IntCounter,
    pub uploaded: IntCounter,
    pub verified: IntCounter,
    pub refused: IntCounterVec,
    /// Reports whose artwork was already known to this replica (no staging, no job).
    pub known: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("segue".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered"),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time to answer an HTTP request",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["method", "route"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests and messages refused by a rate limit",
            ),
            &["rule"],
        )?;
        let ip_blocks = IntCounterVec::new(
            Opts::new("ip_blocks_total", "Client addresses blocked"),
            &["source"],
        )?;
        let by_cache = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let counter = IntCounterVec::new(Opts::new(name, help), &["cache"])?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let cache_hits = by_cache("cache_hits_total", "Cache-aside reads answered by Redis")?;
        let cache_misses = by_cache(
            "cache_misses_total",
            "Cache-aside reads Redis could not answer",
        )?;
        let cache_errors = by_cache(
            "cache_errors_total",
            "Cache-aside calls that failed every try",
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(ip_blocks.clone()))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let gauge = IntGauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let counter = IntCounter::new(name, help)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let jobs = crate::jobs::JobMetrics::register(&registry)?;
        let refused = IntCounterVec::new(
            Opts::new(
                "artwork_refused_total",
                "Reported images the artwork job refused",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        let artwork = ArtworkMetrics {
            rendered: counter("artwork_rendered_total", "Images decoded and rendered")?,
            uploaded: counter(
                "artwork_uploads_total",
                "Renditions written to the blob store",
            )?,
            verified: counter(
                "artwork_verified_total",
                "Known artwork whose objects were checked instead of rendered",
            )?,
            known: counter(
                "artwork_known_total",
                "Reports whose artwork this replica knew already",
            )?,
            refused,
        };
        let float = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            let gauge = Gauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let backups = BackupMetrics {
            last_success: float(
                "backup_last_success_timestamp_seconds",
                "When the last backup that succeeded was taken (Unix seconds)",
            )?,
            last_duration: float(
                "backup_last_duration_seconds",
                "How long the last backup that succeeded took",
            )?,
            last_bytes: float(
                "backup_last_bytes",
                "The size of the last backup that succeeded (compressed)",
            )?,
            failures: counter("backup_failures_total", "Backups that failed")?,
        };
        Ok(Self {
            jobs,
            artwork,
            backups,
            ws_open: gauge("ws_open", "Open WebSockets")?,
            ws_frames_in: counter("ws_frames_in_total", "Text frames received")?,
            ws_frames_out: counter("ws_frames_out_total", "Frames queued for sockets")?,
            ws_bad_frames: counter(
                "ws_bad_frames_total",
                "Malformed, oversized or binary frames",
            )?,
            ws_slow_closed: counter("ws_slow_closed_total", "Sockets closed for not reading")?,
            sessions: gauge("sessions", "Users with a session on this replica")?,
            bus_published: counter("bus_published_total", "Events published on the bus")?,
            bus_heard: counter("bus_heard_total", "Events heard from other replicas")?,
            bus_lost: counter("bus_lost_total", "Times the bus connection was lost")?,
            bus_restored: counter("bus_restored_total", "Times the bus connection came back")?,
            bus_missed: counter(
                "bus_missed_total",
                "Times another replica said some of its messages were not published",
            )?,
            rate_limit_fail_open: counter(
                "rate_limit_fail_open_total",
                "Rate-limit decisions made in process because Redis did not answer in time",
            )?,
            ip_blocked_requests: counter(
                "ip_blocked_requests_total",
                "Requests refused because their address is blocked",
            )?,
            rate_limited,
            ip_blocks,
            cache_hits,
            cache_misses,
            cache_errors,
            registry,
            http_requests,
            http_duration,
        })
    }

    /// Everything, in Prometheus text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The method as a metric label: the standard ones by name, anything else as `OTHER`, so a
/// client inventing methods cannot grow the label set (20,000 made-up methods once grew
/// `/metrics` to 36 MB).
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Middleware: counts and times every request, and logs it (failures louder than successes).
pub async fn observe_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let response = next.call(req).await?;
    let elapsed = started.elapsed();
    let request = response.request();
    // The route pattern, not the path, so ids do not explode the label set; every path no
    // route matches is one value.
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let status = response.status();
    if let Some(metrics) = metrics {
        metrics
            .http_requests
            .with_label_values(&[method, route.as_str(), status.as_str()])
            .inc();
        metrics
            .http_duration
            .with_label_values(&[method, route.as_str()])
            .observe(elapsed.as_secs_f64());
    }
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::warn!(%method, %route, status = status.as_u16(), latency_ms, "request failed");
    } else if status.is_client_error() {
        tracing::info!(%method, %route, status = status.as_u16(), latency_ms, "request refused");
    } else {
        tracing::debug!(%method, %route, status = status.as_u16(), latency_ms, "request");
    }
    Ok(response)
}

impl Metrics {
    /// The cache-aside counters.
    pub fn cache(&self) -> crate::cache::CacheMetrics {
        crate::cache::CacheMetrics {
            hits: self.cache_hits.clone(),
            misses: self.cache_misses.clone(),
            errors: self.cache_errors.clone(),
        }
    }
}
