//! The REST API: routes, shared state and the request extractors. Handlers parse their input
//! into domain values at the edge, call the store or the realtime layer, and answer JSON;
//! every failure is an [`ApiError`].

mod accounts;
mod catalog;
mod extract;
mod health;
mod presence;
mod queue;
mod socket;

use std::sync::Arc;

use actix_web::{HttpResponse, web};

pub use extract::AuthenticatedUser;

use crate::auth::{Passwords, Sessions, TokenKeys};
use crate::error::ApiError;
use crate::redis::RedisPool;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry::Metrics;

/// What every handler may reach; one per application, shared by its workers.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub keys: TokenKeys,
    pub sessions: Sessions,
    /// The bounded password hashing pool.
    pub passwords: Passwords,
    /// Present when `REDIS_URL` is set.
    pub redis: Option<RedisPool>,
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .service(
            web::scope("/auth")
                .route("/register", web::post().to(accounts::register))
                .route("/login", web::post().to(accounts::login))
                .route("/refresh", web::post().to(accounts::refresh))
                .route("/logout", web::post().to(accounts::logout)),
        )
        .route("/socket/websocket", web::get().to(socket::upgrade))
        .service(
            web::resource(["/queue/", "/queue"])
                .route(web::get().to(queue::get_queue))
                .route(web::put().to(queue::put_queue)),
        )
        .route("/queue/ops", web::post().to(queue::post_ops))
        .service(
            web::resource(["/preferences/", "/preferences"])
                .route(web::get().to(queue::get_preferences))
                .route(web::patch().to(queue::patch_preferences)),
        )
        .route("/devices/", web::get().to(presence::list_devices))
        .route("/devices", web::get().to(presence::list_devices))
        .route("/follows/", web::get().to(presence::list_follows))
        .route("/follows", web::get().to(presence::list_follows))
        .service(
            web::resource("/follows/{user_id}")
                .route(web::post().to(presence::follow))
                .route(web::delete().to(presence::unfollow)),
        )
        .service(
            web::resource(["/now-playing/", "/now-playing"])
                .route(web::post().to(presence::report_playing))
                .route(web::delete().to(presence::stop_playing)),
        )
        .route(
            "/now-playing/by-handle/{handle}",
            web::get().to(presence::by_handle),
        )
        .route("/history/", web::get().to(presence::history))
        .route("/history", web::get().to(presence::history))
        .route(
            "/users/by-handle/{handle}",
            web::get().to(presence::user_by_handle),
        )
        .service(
            web::resource(["/tracks", "/tracks/"])
                .route(web::get().to(catalog::search_tracks))
                .route(web::post().to(catalog::upsert_tracks)),
        )
        .route("/tracks/{id}", web::get().to(catalog::get_track));
}

/// The web page's files from `dir`, at `/` (`index.html` for `/`); any other path that
/// nothing matches gets the JSON 404.
pub fn static_files(dir: &std::path::Path) -> actix_files::Files {
    actix_files::Files::new("/", dir)
        .index_file("index.html")
        .use_etag(true)
        .use_last_modified(true)
        .default_handler(web::to(not_found))
}

/// The answer to a path no route matches, in the house error shape.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(
        "not_found",
        "There is nothing at this path.",
    ))
}

/// Makes `Metrics` reachable from handlers and middleware.
pub fn metrics_data(metrics: Metrics) -> web::Data<Metrics> {
    web::Data::new(metrics)
}
