//! Liveness, readiness and metrics endpoints.
//!
//! - [`routes`], on the public listener: `/healthz`, and `/readyz` saying
//!   only `ok` or `down` per backend (a backend's error text can name hosts,
//!   paths and versions, so it goes to the log).
//! - [`admin_routes`], on the admin listener when one is configured:
//!   `/metrics`, `/healthz`, and `/readyz` with each backend's error.
//! - [`metrics_routes`]: `/metrics` alone, which the binary adds to the
//!   public listener when there is no admin listener.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::AppState;

/// `/healthz` and the terse `/readyz`, for the public listener.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(|s| readyz(s, Detail::Terse)))
}

/// `/metrics` alone.
pub fn metrics_routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// `/healthz`, the detailed `/readyz` and `/metrics`, for the admin listener.
pub fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(|s| readyz(s, Detail::Errors)))
        .merge(metrics_routes())
}

/// What `/readyz` tells about a backend that is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Only `down`.
    Terse,
    /// `down` and the error.
    Errors,
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn bounded(
    check: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    match tokio::time::timeout(READY_CHECK_TIMEOUT, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {READY_CHECK_TIMEOUT:?}")),
    }
}

/// How long `/readyz` waits for each backend.
const READY_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1_500);

/// 200 when the backends this process needs answer, else 503; both the log
/// and the store are reported either way.
async fn readyz(State(state): State<AppState>, detail: Detail) -> Response {
    // Concurrently, and bounded: a probe must answer within its own timeout
    // even when a backend hangs.
    let (log, store) = tokio::join!(
        bounded(async { state.log.check_ready().await.map_err(|e| e.to_string()) }),
        bounded(async { state.store.check_ready().await.map_err(|e| e.to_string()) }),
    );
    let needs = state.readiness;
    let status = if (!needs.log || log.is_ok()) && (!needs.store || store.is_ok()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let show = |backend: &str, r: Result<(), String>| match r {
        Ok(()) => json!({"status": "ok"}),
        Err(e) => {
            tracing::warn!(backend, error = %e, "readiness check failed");
            match detail {
                Detail::Terse => json!({"status": "down"}),
                Detail::Errors => json!({"status": "down", "error": e}),
            }
        }
    };
    (
        status,
        axum::Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "log": show("log", log),
            "store": show("store", store),
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
