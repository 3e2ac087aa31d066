//! Liveness, readiness and metrics endpoints.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::AppState;

/// `/healthz`, `/readyz` and `/metrics`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
async fn readyz(State(state): State<AppState>) -> Response {
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
    let show = |r: Result<(), String>| match r {
        Ok(()) => json!({"status": "ok"}),
        Err(e) => json!({"status": "down", "error": e}),
    };
    (
        status,
        axum::Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "log": show(log),
            "store": show(store),
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
