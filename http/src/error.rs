//! The one mapping from errors to HTTP responses.
//!
//! Handlers return [`ApiError`]; [`crate::middleware::request_context`] turns
//! every other error response (axum's rejections, tower-http's 413 and 415,
//! the router's 405) into one too, so every 4xx and 5xx a client sees has the
//! body `{"error":{"code","message","field"?}}`. 500 and 503 answer a stable
//! message and the request's id (`request_id`, also the `x-request-id`
//! header); the internal detail goes only to the log, under that id.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use trailmark_domain::ValidationError;
use trailmark_log::LogError;
use trailmark_store::StoreError;

use crate::request::current_request_id;

/// Seconds a client is told to wait when the log or store is unavailable.
pub const RETRY_AFTER_SECS: u64 = 5;

/// An error a handler returns. Each kind has one status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request is malformed.
    BadRequest {
        /// Machine-readable code.
        code: &'static str,
        /// Why.
        message: String,
        /// The offending field.
        field: Option<String>,
        /// Extra detail merged into the error object (batch rejections).
        detail: Option<serde_json::Value>,
    },
    /// 413: the body is over a size limit.
    TooLarge {
        /// Why.
        message: String,
        /// The offending field.
        field: Option<String>,
    },
    /// 401: missing or unknown credentials.
    Unauthorized(String),
    /// 403: credentials that may not do this.
    Forbidden(String),
    /// 404: no such thing.
    NotFound(String),
    /// 405: the route exists, the method does not.
    MethodNotAllowed(String),
    /// 409: the request conflicts with what exists (a key already taken).
    Conflict {
        /// Why.
        message: String,
        /// The field whose value conflicts.
        field: Option<String>,
    },
    /// 408: the request body did not arrive in time.
    Timeout(String),
    /// 415: a content encoding or type this route does not take.
    UnsupportedMediaType(String),
    /// Any other 4xx, from a layer or an extractor rather than a handler.
    Rejected {
        /// A 4xx status.
        status: StatusCode,
        /// Why.
        message: String,
    },
    /// 503: try again later. The text is logged, never sent.
    Unavailable(String),
    /// 500: a fault of ours. The text is logged, never sent.
    Internal(String),
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code: "invalid_field",
            message: message.into(),
            field: Some(field.to_owned()),
            detail: None,
        }
    }

    /// The error for a response of `status` that something other than a
    /// handler produced, with `text` (its plain-text body) as the message.
    pub fn from_status(status: StatusCode, text: String) -> Self {
        let text = if text.trim().is_empty() {
            status
                .canonical_reason()
                .unwrap_or("request refused")
                .to_lowercase()
        } else {
            text.trim().to_owned()
        };
        match status {
            StatusCode::BAD_REQUEST => ApiError::BadRequest {
                code: "invalid_request",
                message: text,
                field: None,
                detail: None,
            },
            StatusCode::NOT_FOUND => ApiError::NotFound(text),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(text),
            StatusCode::CONFLICT => ApiError::Conflict {
                message: text,
                field: None,
            },
            StatusCode::REQUEST_TIMEOUT => ApiError::Timeout(text),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
                message: text,
                field: None,
            },
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(text),
            StatusCode::UNAUTHORIZED => ApiError::Unauthorized(text),
            StatusCode::FORBIDDEN => ApiError::Forbidden(text),
            StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable(text),
            s if s.is_client_error() => ApiError::Rejected {
                status: s,
                message: text,
            },
            _ => ApiError::Internal(text),
        }
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Rejected { status, .. } => *status,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        if e.too_large {
            ApiError::TooLarge {
                message: e.message,
                field: e.field,
            }
        } else {
            ApiError::BadRequest {
                code: e.code,
                message: e.message,
                field: e.field,
                detail: None,
            }
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        if e.is_retryable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_retryable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (code, message, field, detail) = match self {
            ApiError::BadRequest {
                code,
                message,
                field,
                detail,
            } => (code, message, field, detail),
            ApiError::TooLarge { message, field } => ("too_large", message, field, None),
            ApiError::Unauthorized(m) => ("unauthorized", m, None, None),
            ApiError::Forbidden(m) => ("forbidden", m, None, None),
            ApiError::NotFound(m) => ("not_found", m, None, None),
            ApiError::MethodNotAllowed(m) => ("method_not_allowed", m, None, None),
            ApiError::Conflict { message, field } => ("conflict", message, field, None),
            ApiError::Timeout(m) => ("timeout", m, None, None),
            ApiError::UnsupportedMediaType(m) => ("unsupported_media_type", m, None, None),
            ApiError::Rejected { message, .. } => ("invalid_request", message, None, None),
            // The detail of a 5xx can name files, hosts or panics: it goes to
            // the log under the request id, and the client gets the id.
            ApiError::Unavailable(detail) => {
                let id = current_request_id();
                tracing::warn!(request_id = %id, error = %detail, "unavailable");
                let message = "a backend is unavailable; retry later".to_owned();
                let detail = json!({ "request_id": id.as_str() });
                ("unavailable", message, None, Some(detail))
            }
            ApiError::Internal(detail) => {
                let id = current_request_id();
                tracing::error!(request_id = %id, error = %detail, "internal error");
                let message = "internal error; quote the request_id when reporting it".to_owned();
                let detail = json!({ "request_id": id.as_str() });
                ("internal", message, None, Some(detail))
            }
        };
        let mut error = json!({"code": code, "message": message});
        if let Some(f) = field {
            error["field"] = f.into();
        }
        if let Some(serde_json::Value::Object(extra)) = detail {
            for (k, v) in extra {
                error[k] = v;
            }
        }
        let mut resp = (status, Json(json!({ "error": error }))).into_response();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            // The rest of the body may still be on its way, unread: the
            // connection cannot carry another request.
            StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE => {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            StatusCode::UNAUTHORIZED => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"trailmark\""),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(e: ApiError) -> (StatusCode, serde_json::Value) {
        let resp =
            crate::request::RequestId::scoped("r-1".into(), async { e.into_response() }).await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn server_errors_answer_a_stable_message_and_the_request_id() {
        for e in [
            ApiError::Internal("panicked at store/src/embedded.rs: range end".into()),
            ApiError::Unavailable("io error: /var/lib/trailmark/log: disk full".into()),
        ] {
            let (status, body) = body(e).await;
            assert!(status.is_server_error());
            let text = body.to_string();
            assert!(
                !text.contains("embedded.rs") && !text.contains("disk"),
                "{text}"
            );
            assert_eq!(body["error"]["request_id"], "r-1");
        }
    }

    #[tokio::test]
    async fn a_bare_status_becomes_a_json_error() {
        let (status, body) = body(ApiError::from_status(
            StatusCode::METHOD_NOT_ALLOWED,
            String::new(),
        ))
        .await;
        assert_eq!(status, 405);
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert_eq!(body["error"]["message"], "method not allowed");
    }
}
