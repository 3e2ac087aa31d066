//! Serves the browser SDK (`sdk-js/`), so a site needs only its Trailmark
//! host: the snippet loads `{apiHost}/sdk/v1/trailmark.min.js`.
//!
//! The bundle is built by `npm run build` in `sdk-js/` and copied by hand to
//! `ingest/assets/` (`cp sdk-js/dist/trailmark.min.js ingest/assets/`),
//! where it is committed and compiled in. The README's test command fails
//! when the committed copy is not the build of the committed source.
//!
//! Two paths: the major version (`/sdk/v1/…`) is cached for a day and then
//! revalidated by ETag, so fixes reach sites within a day; the exact version
//! (`/sdk/{SDK_VERSION}/…`) never changes and is cached for a year.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use trailmark_http::AppState;

/// The bundle, minified.
pub const SDK_BUNDLE: &[u8] = include_bytes!("../assets/trailmark.min.js");

/// The bundle's version; `sdk-js/package.json` says the same.
pub const SDK_VERSION: &str = "0.1.0";

/// The routes serving the bundle.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/sdk/v1/trailmark.min.js",
            get(|headers: HeaderMap| async move {
                bundle(
                    &headers,
                    "public, max-age=86400, stale-while-revalidate=604800",
                )
            }),
        )
        .route(
            &format!("/sdk/{SDK_VERSION}/trailmark.min.js"),
            get(|headers: HeaderMap| async move {
                bundle(&headers, "public, max-age=31536000, immutable")
            }),
        )
}

fn etag() -> String {
    format!(
        "\"{:08x}-{}\"",
        crc32fast::hash(SDK_BUNDLE),
        SDK_BUNDLE.len()
    )
}

fn bundle(headers: &HeaderMap, cache: &'static str) -> Response {
    let tag = etag();
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (
            header::ETAG,
            HeaderValue::from_str(&tag).expect("an etag is ascii"),
        ),
        (
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        ),
    ];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript; charset=utf-8"),
        )],
        SDK_BUNDLE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_packages() {
        let package = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sdk-js/package.json"
        ))
        .expect("sdk-js/package.json");
        assert!(
            package.contains(&format!("\"version\": \"{SDK_VERSION}\"")),
            "SDK_VERSION must match sdk-js/package.json"
        );
        assert!(!SDK_BUNDLE.is_empty());
    }
}
