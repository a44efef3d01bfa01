//! Wiring: builds every part from [`Settings`], binds the listener (port 0 in tests, which
//! then learn the real port from [`Application::port`]) and runs the HTTP server.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};

use crate::auth::{Sessions, TokenKeys, TokenKeysError};
use crate::error;
use crate::http::{self, AppState};
use crate::settings::{Settings, SettingsError};
use crate::store::{Store, StoreInitError};
use crate::telemetry::{self, Metrics};

/// Seconds a graceful shutdown (SIGTERM, SIGINT) waits for requests in flight.
const SHUTDOWN_GRACE_SECS: u64 = 10;

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
    Bind { addr: String, source: std::io::Error },
    #[error("metrics could not be registered")]
    Metrics(#[from] prometheus::Error),
}

/// A built hub, listening but not yet serving until [`run_until_stopped`](Self::run_until_stopped).
pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate()?;
        let addr = settings.bind_addr()?;
        let store = Store::connect(&settings).await?;
        let keys = TokenKeys::from_settings(&settings)?;
        let redis = settings.redis_url.as_ref().map(crate::redis::build_pool).transpose()?;
        let metrics = Metrics::new()?;
        let listener = TcpListener::bind(addr)
            .map_err(|source| StartupError::Bind { addr: addr.to_string(), source })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr: addr.to_string(), source })?
            .port();
        tracing::info!(%addr, port, store = store.backend_name(), redis = redis.is_some(), "segue starting");

        let max_body = settings.max_body_bytes;
        let workers = settings.workers;
        let state = web::Data::new(AppState {
            settings: Arc::new(settings),
            sessions: Sessions::new(store.clone()),
            store,
            keys,
            redis,
        });
        let metrics = http::metrics_data(metrics);
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(from_fn(telemetry::observe_requests))
                .app_data(state.clone())
                .app_data(metrics.clone())
                .app_data(web::JsonConfig::default().limit(max_body).error_handler(error::json_error))
                .app_data(web::PayloadConfig::new(max_body))
                .app_data(web::PathConfig::default().error_handler(error::path_error))
                .app_data(web::QueryConfig::default().error_handler(error::query_error))
                .configure(http::routes)
                .default_service(web::to(http::not_found))
        })
        .shutdown_timeout(SHUTDOWN_GRACE_SECS);
        if let Some(workers) = workers {
            server = server.workers(workers);
        }
        let server = server
            .listen(listener)
            .map_err(|source| StartupError::Bind { addr: addr.to_string(), source })?
            .run();
        Ok(Self { port, server })
    }

    /// The port actually bound (useful when the settings asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that can stop the server from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT (graceful) or [`ServerHandle::stop`].
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
