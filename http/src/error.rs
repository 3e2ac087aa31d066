//! The one mapping from errors to HTTP responses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use trailmark_domain::ValidationError;
use trailmark_log::LogError;
use trailmark_store::StoreError;

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
    /// 503: try again later.
    Unavailable(String),
    /// 500: a fault of ours.
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

    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
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
            ApiError::Unavailable(m) => ("unavailable", m, None, None),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                ("internal", m, None, None)
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
