//! Wiring: builds every part from [`Settings`], binds the listener (port 0 in tests, which
//! then learn the real port from [`Application::port`]) and runs the HTTP server.

use std::net::TcpListener;
use std::sync::Arc;

use actix_cors::Cors;
use actix_http::HttpService;
use actix_service::{IntoServiceFactory, ServiceFactoryExt, fn_service, map_config};
use actix_web::dev::{AppConfig, Server, ServerHandle};
use actix_web::http::header;
use actix_web::middleware::{DefaultHeaders, from_fn};
use actix_web::{App, web};

use crate::abuse::{Blocks, Guard};
use crate::artwork::library::Library;
use crate::artwork::staging::Staging;
use crate::auth::{Passwords, Sessions, TokenKeys, TokenKeysError};
use crate::bus::{AnyBus, MemoryNetwork, RedisBus, ReplicaId};
use crate::cache::CacheAside;
use crate::error;
use crate::http::{self, AppState};
use crate::jobs::scheduler::{LeaseSettings, Scheduler};
use crate::jobs::{Jobs, MemoryJobs, RedisJobSettings, RedisJobs};
use crate::presence::{AnyRegistry, RedisRegistry};
use crate::ratelimit::{Limiter, MemoryLimiter, RedisLimiter};
use crate::realtime::{Realtime, Stores};
use crate::settings::{Settings, SettingsError};
use crate::store::{Store, StoreInitError};
use crate::tcp::AbortableStream;
use crate::telemetry::{self, Metrics};

/// Seconds a graceful shutdown (SIGTERM, SIGINT) waits for requests in flight.
const SHUTDOWN_GRACE_SECS: u64 = 10;

/// How long a client has to send a request's head (actix-web's default).
const CLIENT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a connection being shut down may take to close (actix-web's default).
const CLIENT_DISCONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the hub could not start; each variant names the part.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("the store could not be opened")]
    Store(#[from] StoreInitError),
    #[error("the token key could not be loaded")]
    TokenKeys(#[from] TokenKeysError),
    #[error("REDIS_URL could not be used")]
    Redis(#[from] redis::RedisError),
    #[error("could not listen on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the password hashing threads could not start")]
    Hashing(#[source] std::io::Error),
    #[error("metrics could not be registered")]
    Metrics(#[from] prometheus::Error),
}

/// Cross-origin rules for browsers: the origins of `SEGUE_ALLOWED_ORIGINS` (`None`: any) may
/// call the API with a bearer token and the queue's conditional headers, and may read `ETag`.
fn cors(origins: Option<&[String]>) -> Cors {
    let cors = Cors::default()
        .allowed_methods(["GET", "PUT", "POST", "PATCH", "DELETE"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
        ])
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            crate::ratelimit::headers::POLICY,
            crate::ratelimit::headers::STATE,
        ])
        .max_age(3600);
    match origins {
        None => cors.allow_any_origin(),
        Some(list) => list
            .iter()
            .fold(cors, |cors, origin| cors.allowed_origin(origin)),
    }
}

/// Headers every response carries: the web page may load only its own scripts, styles and
/// sockets (and pictures from anywhere over HTTPS), never be framed, and no response is
/// sniffed into another type or leaks the page's address to other sites.
fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https: data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'",
        ))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::REFERRER_POLICY, "no-referrer"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
}

/// A built hub, listening but not yet serving until [`run_until_stopped`](Self::run_until_stopped).
pub struct Application {
    port: u16,
    server: Server,
    jobs: Jobs,
    scheduler: Scheduler,
    /// How long jobs running at a shutdown may take to finish.
    drain: std::time::Duration,
    /// Told to close every socket when a shutdown starts.
    hub: actix::Addr<crate::realtime::hub::Hub>,
}

/// This replica's background jobs: on Redis Streams when `REDIS_URL` is set, else in
/// process (said once, with what that loses).
fn start_jobs(
    settings: &Arc<Settings>,
    store: &Store,
    replica: &str,
    metrics: &Metrics,
    pipeline: crate::ingest::Pipeline,
    exporter: crate::exports::Exporter,
    backups: crate::backups::Backups,
) -> Result<Jobs, StartupError> {
    let handlers = crate::upkeep::handlers(store.clone(), settings.clone());
    let handlers = backups.handlers(exporter.handlers(pipeline.handlers(handlers)));
    let job_settings = settings.job_settings();
    Ok(match &settings.redis_url {
        Some(url) => {
            let client = ::redis::Client::open(secrecy::ExposeSecret::expose_secret(url))?;
            let timing = RedisJobSettings {
                visibility: std::time::Duration::from_millis(settings.jobs_visibility_ms),
                sweep_every: std::time::Duration::from_millis(settings.jobs_sweep_ms),
                ..RedisJobSettings::default()
            };
            Jobs::Redis(RedisJobs::start(
                client,
                &settings.redis_namespace,
                replica.to_owned(),
                handlers,
                job_settings,
                timing,
                metrics.jobs.clone(),
            )?)
        }
        None => {
            tracing::warn!(
                "background jobs run in this process (no REDIS_URL): a crash or restart loses \
                 every job waiting, delayed or running; set REDIS_URL for durable jobs shared \
                 by every replica"
            );
            Jobs::Memory(MemoryJobs::start(
                handlers,
                job_settings,
                metrics.jobs.clone(),
            ))
        }
    })
}

impl Application {
    /// Builds a replica with the in-process bus to itself (or Redis, when configured).
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        Self::build_on(settings, MemoryNetwork::new()).await
    }

    /// Builds a replica whose in-process bus is attached to `network`, so several replicas in
    /// one process form a cluster without Redis. With `REDIS_URL` set the network is unused.
    pub async fn build_on(
        settings: Settings,
        network: MemoryNetwork,
    ) -> Result<Self, StartupError> {
        settings.validate()?;
        let addr = settings.bind_addr()?;
        let store = Store::connect(&settings).await?;
        let keys = TokenKeys::from_settings(&settings)?;
        let redis = settings
            .redis_url
            .as_ref()
            .map(crate::redis::build_pool)
            .transpose()?;
        let metrics = Metrics::new()?;
        let replica = ReplicaId::generate();
        let settings = Arc::new(settings);
        let job_replica = replica.to_string();
        let blobs = settings.blobs()?;
        let bus = match (&settings.redis_url, &redis) {
            (Some(url), Some(pool)) => {
                let client = ::redis::Client::open(secrecy::ExposeSecret::expose_secret(url))?;
                let (bus, notices) = RedisBus::start(
                    client,
                    pool.clone(),
                    &settings.redis_namespace,
                    replica.clone(),
                );
                (AnyBus::Redis(bus), notices)
            }
            _ => {
                let (bus, notices) = network.attach(replica.clone());
                (AnyBus::Memory(bus), notices)
            }
        };
        let bus_kind = bus.0.kind();
        let registry = match &redis {
            Some(pool) => AnyRegistry::Redis(RedisRegistry::new(
                pool.clone(),
                &settings.redis_namespace,
                std::time::Duration::from_secs(settings.presence_ttl_secs),
            )),
            None => AnyRegistry::Memory(network.presence_registry()),
        };
        let sessions = Sessions::new(store.clone());
        let cache = CacheAside::new(redis.clone(), &settings.redis_namespace, metrics.cache());
        let blocks = Blocks::default();
        let stores = Stores {
            registry,
            store: store.clone(),
            cache: cache.clone(),
            blocks: blocks.clone(),
        };
        let realtime = web::Data::new(Realtime::start(
            replica,
            bus,
            stores,
            sessions.clone(),
            &settings,
            metrics.clone(),
        ));
        let queues = web::Data::new(realtime.queues.clone());
        let hub = realtime.hub.clone();
        let listener = TcpListener::bind(addr).map_err(|source| StartupError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: addr.to_string(),
                source,
            })?
            .port();
        // Workers and the scheduler start once the listener is bound: a hub that fails to
        // start leaves nothing running.
        if settings.redis_url.is_some() && matches!(blobs, crate::blobs::Blobs::Local(_)) {
            tracing::warn!(
                "blobs live in this replica's own directory: with several replicas, artwork one \
                 renders is not served by the others; set S3_BUCKET for a shared store"
            );
        }
        let staging = match &redis {
            Some(pool) => Staging::redis(
                pool.clone(),
                &settings.redis_namespace,
                settings.artwork_staged_max_bytes,
            ),
            None => Staging::local(settings.data_dir.join("staging")),
        };
        let library = Library::new(
            store.clone(),
            blobs.clone(),
            staging,
            settings.artwork(),
            metrics.artwork.clone(),
        );
        let pipeline = crate::ingest::Pipeline {
            store: store.clone(),
            library: library.clone(),
            hub: realtime.hub.clone(),
            presence: realtime.presence.clone(),
            registry: realtime.registry.clone(),
            queues: realtime.queues.clone(),
            max_attempts: settings.job_settings().max_attempts,
        };
        let exporter = crate::exports::Exporter {
            store: store.clone(),
            blobs: blobs.clone(),
            hub: realtime.hub.clone(),
            keep: std::time::Duration::from_secs(settings.export_keep_secs),
            max_attempts: settings.job_settings().max_attempts,
        };
        let jobs = start_jobs(
            &settings,
            &store,
            &job_replica,
            &metrics,
            pipeline,
            exporter,
            settings.backups(metrics.backups.clone())?,
        )?;
        let scheduler = Scheduler::start(
            jobs.clone(),
            crate::upkeep::periodic(&settings),
            job_replica,
            LeaseSettings {
                ttl: std::time::Duration::from_millis(settings.scheduler_lease_ms),
            },
            metrics.jobs.clone(),
            settings.clock.clone(),
        );
        let drain = std::time::Duration::from_secs(settings.jobs_drain_secs);
        tracing::info!(%addr, port, store = store.backend_name(), bus = bus_kind, jobs = jobs.backend(), blobs = blobs.backend(), "segue starting");

        let max_body = settings.max_body_bytes;
        let origins = settings.origins();
        let workers = settings.workers;
        let send_buffer = settings.tcp_send_buffer_bytes;
        let static_dir = settings.static_dir.clone();
        if !static_dir.join("index.html").is_file() {
            tracing::warn!(dir = %static_dir.display(), "no index.html in the static directory: the web page is not served");
        }
        let passwords = Passwords::start(
            settings.password_hash_threads(),
            std::time::Duration::from_millis(settings.password_hash_wait_ms),
        )
        .map_err(StartupError::Hashing)?;
        let limiter = match &redis {
            Some(pool) => Limiter::Redis(RedisLimiter::new(
                pool.clone(),
                &settings.redis_namespace,
                metrics.rate_limit_fail_open.clone(),
            )),
            None => Limiter::Memory(MemoryLimiter::default()),
        };
        let announcer = realtime.clone();
        let guard = Guard::new(
            limiter,
            settings.clone(),
            blocks,
            store.clone(),
            metrics.clone(),
            move |change| announcer.announce_block(change),
        );
        if let Err(error) = guard.sync_blocks().await {
            tracing::warn!(%error, "could not read the blocked addresses; starting without them");
        }
        guard.start_upkeep();
        let guard = web::Data::new(guard);
        let cache = web::Data::new(cache);
        let fast_path = crate::auth::fast_path::FastPath::new(
            if settings.refresh_fast_path {
                cache.get_ref().clone()
            } else {
                CacheAside::new(None, &settings.redis_namespace, metrics.cache())
            },
            std::time::Duration::from_secs(settings.refresh_token_ttl_secs),
        );
        let state = web::Data::new(AppState {
            passwords,
            settings,
            sessions,
            sightings: crate::store::sightings::Sightings::start(store.clone()),
            store,
            keys,
            redis,
            fast_path,
        });
        let metrics = http::metrics_data(metrics);
        let jobs_data = web::Data::new(jobs.clone());
        let blobs = web::Data::new(blobs);
        let library = web::Data::new(library);
        let app = move || {
            App::new()
                .wrap(security_headers())
                // Inside CORS, so that a browser on an allowed origin can read a 429.
                .wrap(from_fn(http::guard::guard))
                .wrap(cors(origins.as_deref()))
                .wrap(from_fn(telemetry::observe_requests))
                .app_data(state.clone())
                .app_data(guard.clone())
                .app_data(cache.clone())
                .app_data(metrics.clone())
                .app_data(realtime.clone())
                .app_data(queues.clone())
                .app_data(jobs_data.clone())
                .app_data(blobs.clone())
                .app_data(library.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(max_body)
                        .error_handler(error::json_error),
                )
                .app_data(web::PayloadConfig::new(max_body))
                .app_data(web::PathConfig::default().error_handler(error::path_error))
                .app_data(web::QueryConfig::default().error_handler(error::query_error))
                .configure(http::routes)
                .service(http::static_files(&static_dir))
                // Outermost, so that it sees every error, the middlewares' own included.
                .wrap(from_fn(error::json_errors))
        };
        // actix-web's `HttpServer`, assembled from its parts so that every connection runs
        // over an `AbortableStream`: a socket closed for not reading must give its TCP
        // connection back at once, which nothing above the stream can make the dispatcher do.
        // Signals are handled in `run_until_stopped`, so that jobs stop being fetched the
        // moment one arrives.
        let mut server = Server::build()
            .shutdown_timeout(SHUTDOWN_GRACE_SECS)
            .disable_signals();
        if let Some(workers) = workers {
            server = server.workers(workers);
        }
        // Tells idle keep-alive connections to close when a graceful shutdown starts.
        let shutting_down = server.graceful_shutdown_signal();
        let server = server
            .listen("segue", listener, move || {
                let shutting_down = shutting_down.clone();
                let app = app()
                    .into_factory()
                    .map_err(|e: actix_web::Error| e.error_response());
                fn_service(move |io: actix_web::rt::net::TcpStream| async move {
                    let peer = io.peer_addr().ok();
                    // A client that stops reading may not pin megabytes of kernel memory.
                    if send_buffer > 0
                        && let Err(error) =
                            socket2::SockRef::from(&io).set_send_buffer_size(send_buffer)
                    {
                        tracing::warn!(%error, "could not bound a connection's send buffer");
                    }
                    Ok::<_, actix_http::error::DispatchError>((AbortableStream::new(io), peer))
                })
                .and_then(
                    HttpService::build()
                        .graceful_shutdown_signal(move || {
                            let signal = shutting_down.clone();
                            async move { signal.notified().await }
                        })
                        // actix-web's own defaults.
                        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
                        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
                        .on_connect_ext(|io: &AbortableStream, data| {
                            data.insert(io.handle());
                        })
                        .h1(map_config(app, |_| AppConfig::default())),
                )
            })
            .map_err(|source| StartupError::Bind {
                addr: addr.to_string(),
                source,
            })?
            .run();
        Ok(Self {
            port,
            server,
            jobs,
            scheduler,
            drain,
            hub,
        })
    }

    /// The port actually bound (useful when the settings asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that can stop the server from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT or [`ServerHandle::stop`]. Either way the stop is
    /// graceful: the scheduler gives up its lease, jobs stop being fetched and those running
    /// get `jobs_drain_secs` to finish (on Redis the rest are reclaimed by another replica),
    /// while requests in flight get their own grace.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self {
            server,
            jobs,
            scheduler,
            drain,
            hub,
            ..
        } = self;
        let handle = server.handle();
        let mut server = std::pin::pin!(server);
        let served = tokio::select! {
            served = &mut server => Some(served),
            () = stop_signal() => None,
        };
        tracing::info!("segue stopping");
        // Stop accepting connections (those the kernel queues meanwhile are reset when the
        // listener closes, and a client or balancer tries another replica), then close the
        // sockets: they would otherwise hold the graceful stop for its whole grace, silent,
        // and their clients would learn of it only when the process is gone. A socket whose
        // upgrade is still in flight (or accepted just before the pause took effect) is
        // closed by the hub when it attaches.
        // (The server handles commands only while it is polled.)
        let mut served = served;
        if served.is_none() {
            tokio::select! {
                () = handle.pause() => {}
                result = &mut server => served = Some(result),
            }
        }
        match hub.send(crate::realtime::hub::Drain).await {
            Ok(sockets) => tracing::info!(sockets, "closing sockets (1012, service restart)"),
            Err(error) => tracing::warn!(%error, "could not close the sockets"),
        }
        let stop_jobs = async {
            scheduler.stop().await;
            jobs.shutdown(drain).await;
        };
        match served {
            Some(served) => {
                stop_jobs.await;
                served
            }
            None => {
                let (_, _, served) = tokio::join!(handle.stop(true), stop_jobs, server);
                served
            }
        }
    }
}

/// The first SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "cannot listen for signals; stop the hub by killing it");
            std::future::pending::<()>().await;
        }
    }
}
