//! `POST /ingest/plays`: a player reports what it plays, as JSON or as `multipart/form-data`
//! (a `metadata` JSON part and an optional `artwork` image part). Everything is checked here;
//! the answer, `202 {"ingest_id"}`, comes once the report is durably queued, never after
//! enrichment or artwork (see [`crate::ingest`]).

use actix_web::http::StatusCode;
use actix_web::http::header::CONTENT_TYPE;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;

use super::AuthenticatedUser;
use crate::artwork::library::{Library, OfferError};
use crate::error::ApiError;
use crate::ingest::{ARTWORK, ArtworkJob, PLAY, PlayJob, ReportInput};
use crate::jobs::{Jobs, Options, Priority};
use crate::presence::now_ms;

/// Largest JSON report (or `metadata` part).
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Longest `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 128;

fn bad(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, detail)
}

fn too_large(what: &str, max: usize) -> ApiError {
    ApiError::client(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("The {what} is larger than the {max} bytes allowed."),
    )
}

fn queues_unavailable(error: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Unavailable {
        part: "the job queues",
        source: Box::new(error),
    }
}

/// Reads a body or part up to `max` bytes; more is refused without reading on.
async fn read_limited<S, E>(mut stream: S, max: usize, what: &str) -> Result<Bytes, ApiError>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| bad("bad_body", format!("The {what} could not be read: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(too_large(what, max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn parse_metadata(bytes: &[u8]) -> Result<ReportInput, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| bad("invalid_json", format!("The report is not valid JSON: {e}")))
}

/// The report and its image, from either body form.
async fn read_report(
    req: &HttpRequest,
    payload: web::Payload,
    max_artwork: usize,
) -> Result<(ReportInput, Option<Bytes>), ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence {
        "application/json" => {
            let body = read_limited(payload, MAX_METADATA_BYTES, "report").await?;
            Ok((parse_metadata(&body)?, None))
        }
        "multipart/form-data" => {
            let mut form = actix_multipart::Multipart::new(req.headers(), payload);
            let (mut metadata, mut artwork) = (None, None);
            while let Some(field) = form.next().await {
                let field = field.map_err(|e| bad("bad_multipart", e.to_string()))?;
                let name = field.name().unwrap_or("").to_owned();
                match name.as_str() {
                    "metadata" if metadata.is_none() => {
                        let bytes =
                            read_limited(field, MAX_METADATA_BYTES, "metadata part").await?;
                        metadata = Some(parse_metadata(&bytes)?);
                    }
                    "artwork" if artwork.is_none() => {
                        let bytes = read_limited(field, max_artwork, "artwork").await?;
                        if bytes.is_empty() {
                            return Err(bad("bad_multipart", "The artwork part is empty."));
                        }
                        artwork = Some(bytes);
                    }
                    "metadata" | "artwork" => {
                        return Err(bad(
                            "bad_multipart",
                            format!("The {name} part appears twice."),
                        ));
                    }
                    _ => {
                        return Err(bad(
                            "bad_multipart",
                            format!("Unknown part {name:?}: only metadata and artwork are read."),
                        ));
                    }
                }
            }
            let metadata =
                metadata.ok_or_else(|| bad("bad_multipart", "The metadata part is missing."))?;
            Ok((metadata, artwork))
        }
        _ => Err(ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the report as application/json or multipart/form-data.",
        )),
    }
}

/// The ingest id: derived from the client's `Idempotency-Key` (a retried request gets the
/// same id and is queued once), else random.
fn ingest_id(req: &HttpRequest, caller: &AuthenticatedUser) -> Result<String, ApiError> {
    let Some(key) = req.headers().get("idempotency-key") else {
        return Ok(format!("ing_{}", crate::auth::random_token(16)));
    };
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            bad(
                "bad_idempotency_key",
                "Idempotency-Key must be 1 to 128 visible ASCII characters.",
            )
        })?;
    let scoped = format!("{}\n{}\n{key}", caller.user_id, caller.device_id.as_str());
    Ok(format!(
        "ing_{}",
        &crate::auth::sha256_hex(scoped.as_bytes())[..32]
    ))
}

/// `POST /ingest/plays` → 202 `{"ingest_id"}`.
pub async fn ingest_play(
    req: HttpRequest,
    caller: AuthenticatedUser,
    jobs: web::Data<Jobs>,
    library: web::Data<Library>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let ingest_id = ingest_id(&req, &caller)?;
    let (input, image) = read_report(&req, payload, library.limits().max_bytes).await?;
    let received_at = now_ms();
    let report = input.parse(received_at)?;
    let mut artwork = None;
    if let Some(image) = image {
        let offered = library.offer(image, caller.user_id.0).await.map_err(|error| match error {
            OfferError::Refused(refused) => ApiError::client(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_artwork",
                format!("The artwork was not taken: {refused}."),
            ),
            OfferError::Busy => ApiError::Busy {
                retry_after_secs: 60,
                detail: "Too many covers are waiting to be rendered; send this one again later.",
            },
            OfferError::Staging(error) => ApiError::Unavailable {
                part: "artwork staging",
                source: Box::new(error),
            },
        })?;
        if let Some(staging) = &offered.staging {
            // One job per staging of a cover, whichever report brings it: a cover staged by a
            // report whose replica died before enqueueing gets its job from the next report.
            // On failure the staged bytes stay (they expire); the client retries the report.
            let job = ArtworkJob {
                hash: offered.hash.clone(),
            };
            let options = Options {
                priority: Some(Priority::Default),
                idempotency_key: Some(format!("artwork:{}:{staging}", offered.hash)),
                ..Options::default()
            };
            jobs.enqueue(&ARTWORK, &job, options)
                .await
                .map_err(queues_unavailable)?;
        }
        artwork = Some(offered.hash);
    }
    let job = PlayJob {
        ingest_id: ingest_id.clone(),
        user: caller.user_id.0,
        device_id: caller.device_id.as_str().to_owned(),
        received_at,
        report,
        artwork,
    };
    let options = Options {
        priority: Some(Priority::Critical),
        idempotency_key: Some(format!("ingest:{ingest_id}")),
        ..Options::default()
    };
    jobs.enqueue(&PLAY, &job, options)
        .await
        .map_err(queues_unavailable)?;
    Ok(HttpResponse::Accepted().json(json!({ "ingest_id": ingest_id })))
}
