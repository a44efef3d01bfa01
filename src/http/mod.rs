//! The REST API: routes, shared state and the request extractors. Handlers parse their input
//! into domain values at the edge, call the store or the realtime layer, and answer JSON;
//! every failure is an [`ApiError`].

mod accounts;
pub mod admin;
mod artwork;
mod catalog;
mod exports;
mod extract;
pub mod guard;
mod health;
mod ingest;
mod overlays;
mod presence;
mod queue;
mod socket;

use std::sync::Arc;

use actix_web::{HttpResponse, ResponseError, web};

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
    /// What Redis knows of refresh tokens and ended sessions (nothing without Redis).
    pub fast_path: crate::auth::fast_path::FastPath,
    /// Socket upgrades' device sightings, written in groups.
    pub sightings: crate::store::sightings::Sightings,
}

/// A resource at `paths` whose methods are `allow` (as the `Allow` header lists them); any
/// other method gets the JSON 405 with that header.
fn resource(paths: &[&str], allow: &'static str) -> actix_web::Resource {
    web::resource(paths.to_vec()).default_service(web::to(move || method_not_allowed(allow)))
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(&["/healthz"], "GET").route(web::get().to(health::healthz)))
        .service(resource(&["/readyz"], "GET").route(web::get().to(health::readyz)))
        .service(resource(&["/metrics"], "GET").route(web::get().to(health::metrics)))
        .service(
            web::scope("/auth")
                .service(resource(&["/register"], "POST").route(web::post().to(accounts::register)))
                .service(resource(&["/login"], "POST").route(web::post().to(accounts::login)))
                .service(resource(&["/refresh"], "POST").route(web::post().to(accounts::refresh)))
                .service(resource(&["/logout"], "POST").route(web::post().to(accounts::logout))),
        )
        .service(resource(&["/socket/websocket"], "GET").route(web::get().to(socket::upgrade)))
        .service(
            resource(&["/queue/", "/queue"], "GET, PUT")
                .route(web::get().to(queue::get_queue))
                .route(web::put().to(queue::put_queue)),
        )
        .service(resource(&["/queue/ops"], "POST").route(web::post().to(queue::post_ops)))
        .service(
            resource(&["/preferences/", "/preferences"], "GET, PATCH")
                .route(web::get().to(queue::get_preferences))
                .route(web::patch().to(queue::patch_preferences)),
        )
        .service(
            resource(&["/devices/", "/devices"], "GET")
                .route(web::get().to(presence::list_devices)),
        )
        .service(
            resource(&["/follows/", "/follows"], "GET")
                .route(web::get().to(presence::list_follows)),
        )
        .service(
            resource(&["/follows/{user_id}"], "POST, DELETE")
                .route(web::post().to(presence::follow))
                .route(web::delete().to(presence::unfollow)),
        )
        .service(
            resource(&["/now-playing/", "/now-playing"], "POST, DELETE")
                .route(web::post().to(presence::report_playing))
                .route(web::delete().to(presence::stop_playing)),
        )
        .service(
            resource(&["/now-playing/by-handle/{handle}"], "GET")
                .route(web::get().to(presence::by_handle)),
        )
        .service(
            resource(&["/history/", "/history"], "GET").route(web::get().to(presence::history)),
        )
        .service(
            resource(&["/users/by-handle/{handle}"], "GET")
                .route(web::get().to(presence::user_by_handle)),
        )
        .service(
            resource(&["/tracks", "/tracks/"], "GET, POST")
                .route(web::get().to(catalog::search_tracks))
                .route(web::post().to(catalog::upsert_tracks)),
        )
        .service(resource(&["/tracks/{id}"], "GET").route(web::get().to(catalog::get_track)))
        .service(
            resource(&["/ingest/plays", "/ingest/plays/"], "POST")
                .route(web::post().to(ingest::ingest_play)),
        )
        .service(
            resource(&["/artwork/{hash}/{file}"], "GET").route(web::get().to(artwork::get_artwork)),
        )
        .service(
            resource(&["/overlays", "/overlays/"], "GET, POST")
                .route(web::get().to(overlays::list))
                .route(web::post().to(overlays::create)),
        )
        .service(resource(&["/overlays/{id}"], "DELETE").route(web::delete().to(overlays::revoke)))
        .service(
            resource(&["/exports", "/exports/"], "GET, POST")
                .route(web::get().to(exports::list))
                .route(web::post().to(exports::create)),
        )
        .service(resource(&["/exports/{id}"], "GET").route(web::get().to(exports::get)))
        .service(
            resource(&["/exports/{id}/download"], "GET").route(web::get().to(exports::download)),
        )
        .service(resource(&["/overlay/{token}"], "GET").route(web::get().to(overlays::page)))
        .service(
            resource(&["/overlay/{token}/events"], "GET").route(web::get().to(overlays::events)),
        )
        .service(
            resource(&["/admin/blocks", "/admin/blocks/"], "GET, POST")
                .route(web::get().to(admin::list_blocks))
                .route(web::post().to(admin::add_block)),
        )
        .service(
            resource(&["/admin/blocks/{address}"], "DELETE")
                .route(web::delete().to(admin::remove_block)),
        )
        .service(
            resource(&["/admin/jobs", "/admin/jobs/"], "GET")
                .route(web::get().to(admin::jobs_status)),
        )
        .service(
            resource(&["/admin/jobs/dead/{id}/retry"], "POST")
                .route(web::post().to(admin::retry_dead_job)),
        )
        .service(
            resource(&["/admin/jobs/dead/{id}"], "DELETE")
                .route(web::delete().to(admin::drop_dead_job)),
        )
        .service(
            resource(&["/admin/jobs/probes"], "POST").route(web::post().to(admin::enqueue_probes)),
        );
}

/// The answer to a method a resource does not have: 405 in the house error shape, with
/// `Allow`.
async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = ApiError::client(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("This path allows {allow} only."),
    )
    .error_response();
    response.headers_mut().insert(
        actix_web::http::header::ALLOW,
        actix_web::http::header::HeaderValue::from_static(allow),
    );
    response
}

/// The web page's files from `dir`, at `/` (`index.html` for `/`); any other path that
/// nothing matches gets the JSON 404. Only files that really lie inside `dir` are served: a
/// symbolic link that leads out of it is answered as if it were not there.
pub fn static_files(dir: &std::path::Path) -> actix_files::Files {
    let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    actix_files::Files::new("/", dir)
        .index_file("index.html")
        .use_etag(true)
        .use_last_modified(true)
        .path_filter(move |path, _| {
            root.join(path)
                .canonicalize()
                .is_ok_and(|real| real.starts_with(&root))
        })
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
