//! Exports: `POST /exports`, `GET /exports/`, `GET /exports/{id}` (the owner's), and
//! `GET /exports/{id}/download` (a signed link the hub serves when the blobs are local; on S3
//! the link is presigned and the hub is not in the way). Built by [`crate::exports`].

use std::time::Duration;

use actix_files::NamedFile;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, ContentDisposition, DispositionParam, DispositionType};
use actix_web::{HttpRequest, HttpResponse, Responder, web};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, AuthenticatedUser};
use crate::blobs::{BlobKey, Blobs};
use crate::error::ApiError;
use crate::exports::{BUILD, BuildJob, ExportKind};
use crate::jobs::{Jobs, Options, Priority};
use crate::store::exports::{self as rows, Export};

fn unknown_export() -> ApiError {
    ApiError::not_found("unknown_export", "There is no such export.")
}

fn unix(t: chrono::NaiveDateTime) -> u64 {
    u64::try_from(t.and_utc().timestamp()).unwrap_or(0)
}

fn now_unix() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0)
}

/// An export as its owner sees it; `url` while it can be downloaded.
async fn view(state: &AppState, blobs: &Blobs, export: &Export) -> Result<Value, ApiError> {
    let time = |t: chrono::NaiveDateTime| t.and_utc().to_rfc3339();
    let now = crate::store::now();
    let mut url = None;
    if export.status == "done"
        && export.expires_at.is_some_and(|at| at > now)
        && let (Some(key), Some(kind)) = (&export.object_key, ExportKind::parse(&export.kind))
    {
        let ttl = Duration::from_secs(state.settings.export_link_secs);
        let key = BlobKey::parse(key).map_err(ApiError::internal)?;
        let name = kind.file_name(export.created_at);
        url = Some(match blobs {
            Blobs::S3(s3) => {
                s3.download_url(&key, ttl, &name)
                    .await
                    .map_err(|e| ApiError::Unavailable {
                        part: "the blob store",
                        source: Box::new(e),
                    })?
            }
            Blobs::Local(_) => {
                let expires = now_unix() + ttl.as_secs();
                let signature = state.keys.sign_link(&export.id, expires);
                format!(
                    "/exports/{}/download?expires={expires}&signature={signature}",
                    export.id
                )
            }
        });
    }
    Ok(json!({
        "id": export.id,
        "kind": export.kind,
        "status": export.status,
        "rows": export.rows,
        "bytes": export.bytes,
        "created_at": time(export.created_at),
        "finished_at": export.finished_at.map(time),
        "expires_at": export.expires_at.map(time),
        "error": export.error,
        "url": url,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewExport {
    kind: String,
}

/// `POST /exports {"kind": "plays_csv" | "account_json"}` → 202 `{id, status, …}`; 409
/// `export_in_flight` while one of that kind is pending or running.
pub async fn create(
    state: web::Data<AppState>,
    blobs: web::Data<Blobs>,
    jobs: web::Data<Jobs>,
    caller: AuthenticatedUser,
    body: web::Json<NewExport>,
) -> Result<HttpResponse, ApiError> {
    let kind = ExportKind::parse(&body.kind).ok_or_else(|| {
        crate::domain::InvalidInput::new("kind", "must be plays_csv or account_json")
    })?;
    let id = format!("exp_{}", crate::auth::random_token(12));
    let mut pooled = state.store.conn().await?;
    let mut conn = pooled.conn();
    match rows::create(
        &mut conn,
        &id,
        caller.user_id,
        kind.name(),
        crate::store::now(),
    )
    .await
    {
        Err(e) if e.is_unique_violation() => {
            return Err(ApiError::client(
                StatusCode::CONFLICT,
                "export_in_flight",
                format!("An export of kind {} is already under way.", kind.name()),
            ));
        }
        other => other?,
    }
    let options = Options {
        priority: Some(Priority::Low),
        idempotency_key: Some(format!("export:{id}")),
        ..Options::default()
    };
    if let Err(error) = jobs
        .enqueue(&BUILD, &BuildJob { id: id.clone() }, options)
        .await
    {
        // Nothing was queued: the row goes too, so the kind is free again.
        rows::delete(&mut conn, &id).await?;
        return Err(ApiError::Unavailable {
            part: "the job queues",
            source: Box::new(error),
        });
    }
    let export = rows::find(&mut conn, caller.user_id, &id)
        .await?
        .ok_or_else(unknown_export)?;
    drop(pooled);
    Ok(HttpResponse::Accepted().json(view(&state, &blobs, &export).await?))
}

/// `GET /exports/` → `{exports: [...]}`, newest first.
pub async fn list(
    state: web::Data<AppState>,
    blobs: web::Data<Blobs>,
    caller: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let found = {
        let mut pooled = state.store.conn().await?;
        rows::list(&mut pooled.conn(), caller.user_id).await?
    };
    let mut listed = Vec::with_capacity(found.len());
    for export in &found {
        listed.push(view(&state, &blobs, export).await?);
    }
    Ok(HttpResponse::Ok().json(json!({ "exports": listed })))
}

/// `GET /exports/{id}` → the export; 404 `unknown_export` for anyone else's.
pub async fn get(
    state: web::Data<AppState>,
    blobs: web::Data<Blobs>,
    caller: AuthenticatedUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let export = {
        let mut pooled = state.store.conn().await?;
        rows::find(&mut pooled.conn(), caller.user_id, &path.into_inner())
            .await?
            .ok_or_else(unknown_export)?
    };
    Ok(HttpResponse::Ok().json(view(&state, &blobs, &export).await?))
}

#[derive(Debug, Deserialize)]
pub struct Signed {
    expires: u64,
    signature: String,
}

/// `GET /exports/{id}/download?expires=…&signature=…`: the file, as an attachment, while the
/// link holds (403 `link_expired` after; 404 for a link that was never signed).
pub async fn download(
    req: HttpRequest,
    state: web::Data<AppState>,
    blobs: web::Data<Blobs>,
    path: web::Path<String>,
    query: web::Query<Signed>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let Blobs::Local(local) = blobs.get_ref() else {
        return Err(unknown_export());
    };
    let signed_until = query.expires;
    if !state
        .keys
        .verify_link(&id, signed_until, &query.signature, 0)
    {
        return Err(unknown_export());
    }
    if signed_until < now_unix() {
        return Err(ApiError::client(
            StatusCode::FORBIDDEN,
            "link_expired",
            "This download link has expired; ask for the export again.",
        ));
    }
    let export = {
        let mut pooled = state.store.conn().await?;
        rows::by_id(&mut pooled.conn(), &id)
            .await?
            .ok_or_else(unknown_export)?
    };
    let (Some(key), Some(kind)) = (&export.object_key, ExportKind::parse(&export.kind)) else {
        return Err(unknown_export());
    };
    if export.expires_at.is_none_or(|at| unix(at) < now_unix()) {
        return Err(unknown_export());
    }
    let key = BlobKey::parse(key).map_err(ApiError::internal)?;
    let file = NamedFile::open_async(local.path(&key))
        .await
        .map_err(|_| unknown_export())?
        .set_content_disposition(ContentDisposition {
            disposition: DispositionType::Attachment,
            parameters: vec![DispositionParam::Filename(
                kind.file_name(export.created_at),
            )],
        })
        .use_etag(false)
        .use_last_modified(false);
    let mut response = file.respond_to(&req);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(kind.content_type()),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("private, no-store"),
    );
    Ok(response)
}
