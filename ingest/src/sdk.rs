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
//!
//! A client that accepts gzip gets the bundle gzipped (compressed once, at
//! the first request, at the best level), with `Vary: Accept-Encoding` and an
//! ETag of its own (`…-gz`), so caches keep the two apart and `304` works for
//! each.

use std::io::Write;
use std::sync::LazyLock;

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

/// One encoding of the bundle: its bytes and ETag.
struct Encoded {
    bytes: Vec<u8>,
    etag: String,
    content_encoding: Option<&'static str>,
}

static IDENTITY: LazyLock<Encoded> = LazyLock::new(|| Encoded {
    bytes: SDK_BUNDLE.to_vec(),
    etag: etag(""),
    content_encoding: None,
});

static GZIP: LazyLock<Encoded> = LazyLock::new(|| Encoded {
    bytes: gzip(SDK_BUNDLE),
    etag: etag("-gz"),
    content_encoding: Some("gzip"),
});

/// The bundle gzipped at the best level.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

fn etag(suffix: &str) -> String {
    format!(
        "\"{:08x}-{}{suffix}\"",
        crc32fast::hash(SDK_BUNDLE),
        SDK_BUNDLE.len()
    )
}

/// Whether `Accept-Encoding` allows gzip (`gzip` or `*`, not at `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

fn bundle(headers: &HeaderMap, cache: &'static str) -> Response {
    let encoded: &Encoded = if accepts_gzip(headers) {
        &GZIP
    } else {
        &IDENTITY
    };
    let tag = encoded.etag.as_str();
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (
            header::ETAG,
            HeaderValue::from_str(tag).expect("an etag is ascii"),
        ),
        (header::VARY, HeaderValue::from_static("Accept-Encoding")),
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
    let mut resp = (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript; charset=utf-8"),
        )],
        encoded.bytes.as_slice(),
    )
        .into_response();
    if let Some(encoding) = encoded.content_encoding {
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
    }
    resp
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

    #[test]
    fn gzip_is_offered_only_where_accepted() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate, br")));
        assert!(accepts_gzip(&h("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts_gzip(&h("*")));
        assert!(!accepts_gzip(&h("gzip;q=0, br")));
        assert!(!accepts_gzip(&h("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
        assert_ne!(GZIP.etag, IDENTITY.etag);
    }
}
