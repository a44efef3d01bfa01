//! The one HTTP error type. Every failure a handler can meet becomes an [`ApiError`], which
//! answers `{"detail": "<sentence>", "code": "<snake_case>"}` with the right status. Internal
//! causes are logged with their whole chain and never sent to the client.

use std::error::Error as StdError;
use std::fmt::Write as _;

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

use crate::auth::PasswordError;
use crate::domain::InvalidInput;
use crate::store::StoreError;

type BoxError = Box<dyn StdError + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client's fault, or a state the client must handle; the detail is for the client.
    #[error("{detail}")]
    Client {
        status: StatusCode,
        code: &'static str,
        detail: String,
    },
    /// A part the hub depends on is away; the client may retry.
    #[error("{part} is unavailable")]
    Unavailable {
        part: &'static str,
        #[source]
        source: BoxError,
    },
    /// The hub is saturated for this kind of work; the client should retry after
    /// `retry_after_secs` (sent as `Retry-After`).
    #[error("{detail}")]
    Busy {
        retry_after_secs: u64,
        detail: &'static str,
    },
    /// A rate limit refused the request: 429 `code` with `Retry-After` and the IETF draft's
    /// `RateLimit-Policy` / `RateLimit` headers for `rule`.
    #[error("{detail}")]
    Limited {
        code: &'static str,
        detail: &'static str,
        rule: &'static str,
        quota: crate::ratelimit::Quota,
        decision: crate::ratelimit::Decision,
    },
    /// A bug or an unexpected failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// The body of every error response.
#[derive(Serialize)]
struct ErrorBody<'a> {
    detail: &'a str,
    code: &'a str,
}

impl ApiError {
    pub fn client(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self::Client {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::client(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unauthorized(code: &'static str, detail: impl Into<String>) -> Self {
        Self::client(StatusCode::UNAUTHORIZED, code, detail)
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::client(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::client(StatusCode::CONFLICT, code, detail)
    }

    pub fn internal(error: impl Into<BoxError>) -> Self {
        Self::Internal(error.into())
    }

    /// The stable code clients switch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Client { code, .. } => code,
            Self::Unavailable { .. } => "unavailable",
            Self::Busy { .. } => "busy",
            Self::Limited { code, .. } => code,
            Self::Internal(_) => "internal_error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Client { status, .. } => *status,
            Self::Unavailable { .. } | Self::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let detail = match self {
            Self::Client { detail, .. } => detail.clone(),
            Self::Unavailable { part, .. } => {
                tracing::warn!(error = %chain(self), "{part} unavailable");
                format!("The {part} is unavailable; try again shortly.")
            }
            Self::Busy { detail, .. } | Self::Limited { detail, .. } => (*detail).to_owned(),
            Self::Internal(_) => {
                tracing::error!(error = %chain(self), "internal error");
                "Something went wrong on our side.".to_owned()
            }
        };
        let mut response = HttpResponse::build(self.status_code()).json(ErrorBody {
            detail: &detail,
            code: self.code(),
        });
        if let Self::Busy {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        if let Self::Limited {
            rule,
            quota,
            decision,
            ..
        } = self
        {
            let retry = decision.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            crate::ratelimit::headers::insert(response.headers_mut(), rule, *quota, decision);
        }
        if self.status_code() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// An error and all its causes on one line, for logs.
pub fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

impl From<InvalidInput> for ApiError {
    fn from(error: InvalidInput) -> Self {
        Self::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            error.to_string(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() {
            Self::Unavailable {
                part: "database",
                source: Box::new(error),
            }
        } else {
            Self::Internal(Box::new(error))
        }
    }
}

impl From<PasswordError> for ApiError {
    fn from(error: PasswordError) -> Self {
        match error {
            PasswordError::Busy { retry_after_secs } => Self::Busy {
                retry_after_secs,
                detail: "Too many sign-ins are being checked right now; try again shortly.",
            },
            other => Self::Internal(Box::new(other)),
        }
    }
}

/// Turns actix's JSON body errors into the house shape.
pub fn json_error(error: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let api = match &error {
        JsonPayloadError::ContentType => ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "The body must be JSON, sent with Content-Type: application/json.",
        ),
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The body is larger than the limit of {limit} bytes."),
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => ApiError::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("The body does not have the expected fields: {e}."),
        ),
        JsonPayloadError::Deserialize(e) => ApiError::bad_request(
            "malformed_json",
            format!("The body is not valid JSON: {e}."),
        ),
        _ => ApiError::bad_request("unreadable_body", "The body could not be read."),
    };
    api.into()
}

/// Turns path-parameter errors into the house shape.
pub fn path_error(error: PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::client(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("No such resource: {error}."),
    )
    .into()
}

/// Turns query-string errors into the house shape.
pub fn query_error(error: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(
        "invalid_query",
        format!("The query string is invalid: {error}."),
    )
    .into()
}

impl From<crate::presence::RegistryError> for ApiError {
    fn from(error: crate::presence::RegistryError) -> Self {
        tracing::warn!(%error, "presence registry unavailable");
        Self::client(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Presence is unavailable right now; try again shortly.",
        )
    }
}

/// Longest original error body kept as the `detail` of a rewritten error.
const MAX_KEPT_DETAIL: usize = 300;

/// The code of an error response that did not come from [`ApiError`].
fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        500 => "internal_error",
        503 => "unavailable",
        _ => "http_error",
    }
}

/// Middleware, outermost: every error response leaves in the house shape. Errors from parts
/// that are not ours (the static file server's 400s, the CORS refusal) came as plain text;
/// they are rewritten as `{"detail", "code"}` with the same status and headers, keeping their
/// sentence when it is short text.
pub async fn json_errors(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse, actix_web::Error> {
    use actix_web::dev::ServiceResponse;
    let response = match next.call(req).await {
        Ok(response) => response.map_into_boxed_body(),
        // A middleware's refusal (CORS): answered by the dispatcher from the error, so the
        // error becomes ours.
        Err(error) if error.as_error::<ApiError>().is_some() => return Err(error),
        Err(error) => {
            let status = error.as_response_error().status_code();
            return Err(ApiError::client(status, code_for(status), error.to_string()).into());
        }
    };
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return Ok(response);
    }
    let (request, original) = response.into_parts();
    let kept: Vec<_> = original
        .headers()
        .iter()
        .filter(|(name, _)| **name != header::CONTENT_TYPE && **name != header::CONTENT_LENGTH)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let body = actix_web::body::to_bytes_limited(original.into_body(), MAX_KEPT_DETAIL)
        .await
        .ok()
        .and_then(Result::ok);
    let detail = body
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty() && !text.contains('<'))
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("The request failed")
                .to_owned()
        });
    let mut rewritten = HttpResponse::build(status).json(ErrorBody {
        detail: &detail,
        code: code_for(status),
    });
    for (name, value) in kept {
        rewritten.headers_mut().append(name, value);
    }
    Ok(ServiceResponse::new(request, rewritten))
}
