//! `GET /artwork/{hash}/{size}.{webp|jpg}`: a rendition of an artwork. From the local store
//! the hub serves the bytes (immutable: the hash names the source); from S3 it redirects to
//! a short-lived presigned URL, or to `S3_PUBLIC_BASE_URL` when a CDN fronts the bucket.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::artwork::{Format, is_hash, object_key, size_named};
use crate::blobs::{BlobKey, BlobUrl, Blobs};
use crate::error::ApiError;

/// How long a presigned artwork URL stays valid.
const PRESIGNED_FOR: Duration = Duration::from_secs(60 * 60);

/// How long a client may reuse a redirect (well inside the presigned URL's life).
const REDIRECT_MAX_AGE: u64 = 50 * 60;

fn missing() -> ApiError {
    ApiError::not_found("unknown_artwork", "There is no such artwork.")
}

/// The answer, before caching headers.
pub async fn get_artwork(
    req: HttpRequest,
    blobs: web::Data<Blobs>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (hash, file) = path.into_inner();
    let (size, extension) = file.split_once('.').ok_or_else(missing)?;
    let format = Format::from_extension(extension).ok_or_else(missing)?;
    let (size, _) = size_named(size).ok_or_else(missing)?;
    if !is_hash(&hash) {
        return Err(missing());
    }
    let key = BlobKey::parse(&object_key(&hash, size, format)).map_err(|_| missing())?;
    let unavailable = |e: crate::blobs::BlobError| ApiError::Unavailable {
        part: "the blob store",
        source: Box::new(e),
    };
    match blobs.url(&key, PRESIGNED_FOR).await.map_err(unavailable)? {
        BlobUrl::External(url) => Ok(HttpResponse::Found()
            .insert_header((header::LOCATION, url))
            .insert_header((
                header::CACHE_CONTROL,
                format!("private, max-age={REDIRECT_MAX_AGE}"),
            ))
            .finish()),
        BlobUrl::Hub => {
            // Renditions of a hash never change: the key itself is a strong validator.
            let etag = format!("\"{hash}-{size}-{extension}\"");
            let cache = (header::CACHE_CONTROL, "public, max-age=31536000, immutable");
            let matches = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
            if matches {
                return Ok(HttpResponse::NotModified()
                    .insert_header((header::ETAG, etag))
                    .insert_header(cache)
                    .finish());
            }
            let bytes = blobs
                .get(&key)
                .await
                .map_err(unavailable)?
                .ok_or_else(missing)?;
            Ok(HttpResponse::Ok()
                .content_type(format.content_type())
                .insert_header((header::ETAG, etag))
                .insert_header(cache)
                .body(bytes))
        }
    }
}
