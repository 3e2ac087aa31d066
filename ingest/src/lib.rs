//! Ingest: the Segment HTTP Tracking API.
//!
//! `POST /v1/{track,identify,page,screen,group,alias}`, `/v1/batch` and
//! `/v1/import` (plus analytics.js's short forms `/v1/t`, `/v1/i`, ...) take
//! Segment's payloads unchanged, so a site switches by changing one host name.
//! A request is answered 200 **only after its events are durable in the log**;
//! when the log cannot take them it is answered 503 with `Retry-After`, and
//! the client retries.
//!
//! The flow of one request: decompress (gzip, the name in any case) under a
//! size cap, authenticate
//! the write key (header, query or body), parse and normalise with the domain
//! parser, encode each event with the shared Avro codec, append them to the
//! log in one call (one group commit), answer. In a batch, invalid items are
//! reported by index and `messageId` and the valid ones are kept.
//!
//! This crate knows only the [`trailmark_log::EventLog`] trait; the binary
//! chooses the backend.

pub mod sdk;

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tower_http::cors::{Any, CorsLayer};
use tower_http::decompression::RequestDecompressionLayer;
use trailmark_domain::parse::{RequestMeta, parse_batch, parse_single};
use trailmark_domain::{Event, EventType};
use trailmark_http::auth::{authorize_write, credential_from_headers, write_key_from_query};
use trailmark_http::client_ip::ClientIp;
use trailmark_http::{ApiError, AppState};
use trailmark_log::Record;
use trailmark_store::WriteGrant;

/// The ingest routes, with CORS (any origin: the browser snippet posts from
/// customers' pages) and gzip request decompression (the encoding name
/// compared case-insensitively). Size limits are applied by the handlers to
/// the *decompressed* body; the binary caps the body as sent in front.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for kind in EventType::ALL {
        let handler = move |state, conn, query, headers, body| {
            single(state, conn, query, headers, body, kind)
        };
        let short = &kind.as_str()[..1];
        router = router
            .route(&format!("/v1/{}", kind.as_str()), post(handler))
            .route(&format!("/v1/{short}"), post(handler));
    }
    router
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        .route("/v1/b", post(batch))
        .layer(RequestDecompressionLayer::new().gzip(true))
        .layer(axum::middleware::from_fn(
            trailmark_http::middleware::normalise_content_encoding,
        ))
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods([Method::POST, Method::OPTIONS])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::CONTENT_ENCODING,
                ])
                // Browsers may read it, so SDKs can honour it across origins.
                .expose_headers([header::RETRY_AFTER])
                .max_age(std::time::Duration::from_secs(86_400)),
        )
        // After the layers: the bundle is neither decompressed nor POSTed.
        .merge(sdk::routes())
}

/// Reads the whole (decompressed) body, refusing more than `limit` bytes.
/// The layers in front have capped the body as sent
/// ([`trailmark_http::middleware::wire_limit`]) and its arrival time
/// ([`trailmark_http::middleware::body_deadline`]); their errors surface
/// here, wrapped by the decompression layer.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(body_error(&*e, limit)),
    }
}

/// Why a body could not be read, as the client should hear it.
fn body_error(e: &(dyn std::error::Error + 'static), limit: usize) -> ApiError {
    use trailmark_http::middleware::{BodyTimeout, WireLimitExceeded, find_in_chain};
    if let Some(refused) = find_in_chain::<WireLimitExceeded>(e) {
        return ApiError::TooLarge {
            message: refused.to_string(),
            field: None,
        };
    }
    if find_in_chain::<LengthLimitError>(e).is_some() {
        return ApiError::TooLarge {
            message: format!("body is larger than the limit of {limit} bytes"),
            field: None,
        };
    }
    if BodyTimeout::find(e).is_some() {
        return ApiError::Timeout("the request body did not arrive in time".into());
    }
    ApiError::BadRequest {
        code: "invalid_body",
        message: format!("could not read the body: {e}"),
        field: None,
        detail: None,
    }
}

/// The client address: the one the server resolved ([`ClientIp`], which
/// believes `X-Forwarded-For` only from trusted proxies), else the peer.
struct ClientAddr(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let resolved = parts.extensions.get::<ClientIp>().map(|c| c.0);
        let peer = || {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
        };
        Ok(ClientAddr(resolved.or_else(peer)))
    }
}

/// Who is calling: the write key of the header or query string, if any, and
/// the client address.
struct Caller {
    key: Option<String>,
    ip: Option<String>,
}

impl Caller {
    fn new(headers: &HeaderMap, query: Option<&str>, conn: ClientAddr) -> Self {
        Self {
            key: credential_from_headers(headers).or_else(|| write_key_from_query(query)),
            ip: conn.0.map(|ip| ip.to_string()),
        }
    }

    /// The grant of the header/query key, else of the key found in the body.
    async fn authorize(
        &self,
        state: &AppState,
        body_key: Option<String>,
    ) -> Result<WriteGrant, ApiError> {
        authorize_write(state, self.key.as_deref().or(body_key.as_deref())).await
    }

    /// What the parser needs to know about this request.
    fn meta<'a>(&'a self, state: &AppState, grant: &'a WriteGrant) -> RequestMeta<'a> {
        RequestMeta {
            workspace_id: &grant.workspace_id,
            source_id: &grant.source_id,
            received_at: state.clock.now_micros(),
            request_ip: self.ip.as_deref(),
        }
    }
}

fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Counts events by type with one metric update per type, not per event.
fn count(state: &AppState, events: &[Event], outcome: &str) {
    let mut by_type = [0u64; EventType::ALL.len()];
    for ev in events {
        by_type[ev.kind as usize] += 1;
    }
    for (kind, n) in EventType::ALL.iter().zip(by_type) {
        if n > 0 {
            state
                .metrics
                .ingest_events
                .with_label_values(&[kind.as_str(), outcome])
                .inc_by(n);
        }
    }
}

/// Encodes and appends events; returns once they are durable.
async fn append(state: &AppState, events: &[Event]) -> Result<(), ApiError> {
    let mut records = Vec::with_capacity(events.len());
    for ev in events {
        let payload = state
            .codec
            .encode(ev)
            .map_err(|e| ApiError::Internal(format!("encoding an event failed: {e}")))?;
        records.push(Record {
            key: ev.partition_key(),
            payload,
        });
    }
    let start = Instant::now();
    let result = tokio::time::timeout(state.append_timeout, state.log.append(records)).await;
    let outcome = match &result {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    state
        .metrics
        .log_append_duration
        .with_label_values(&[outcome])
        .observe(start.elapsed().as_secs_f64());
    match result {
        Ok(Ok(_)) => {
            count(state, events, "accepted");
            Ok(())
        }
        Ok(Err(e)) => {
            count(state, events, "failed");
            tracing::warn!(error = %e, events = events.len(), "log append failed");
            Err(ApiError::from(e))
        }
        Err(_) => {
            count(state, events, "failed");
            tracing::warn!(events = events.len(), "log append timed out");
            Err(ApiError::Unavailable(
                "the log did not confirm in time".into(),
            ))
        }
    }
}

async fn single(
    State(state): State<AppState>,
    conn: ClientAddr,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
    kind: EventType,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.limits.max_event_bytes).await?;
    let caller = Caller::new(&headers, query.as_deref(), conn);
    let raw = parse_single(&bytes, &state.limits);
    // Authenticate before reporting what is wrong with the body, so that an
    // unknown caller learns nothing but 401.
    let body_key = match (&caller.key, &raw) {
        (None, Ok(r)) => r.write_key()?.map(|k| k.into_owned()),
        _ => None,
    };
    let grant = caller.authorize(&state, body_key).await?;
    let reject = |state: &AppState| {
        state
            .metrics
            .ingest_events
            .with_label_values(&[kind.as_str(), "rejected"])
            .inc();
    };
    let raw = raw.inspect_err(|_| reject(&state))?;
    let meta = caller.meta(&state, &grant);
    let mut event = raw
        .normalise(kind, &meta, &mut new_message_id)
        .inspect_err(|_| reject(&state))?;
    state
        .identity_rules
        .get(&state.directory, &grant.workspace_id)
        .await
        .mark_blocked(&mut event);
    append(&state, std::slice::from_ref(&event)).await?;
    Ok(Json(json!({"success": true})).into_response())
}

async fn batch(
    State(state): State<AppState>,
    conn: ClientAddr,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.limits.max_batch_bytes).await?;
    let caller = Caller::new(&headers, query.as_deref(), conn);
    let raw = parse_batch(&bytes, &state.limits);
    let body_key = match (&caller.key, &raw) {
        (None, Ok(r)) => r.write_key.clone(),
        _ => None,
    };
    let grant = caller.authorize(&state, body_key).await?;
    let raw = raw?;
    let meta = caller.meta(&state, &grant);
    let mut parsed = raw.normalise(&meta, &state.limits, &mut new_message_id);
    let rules = state
        .identity_rules
        .get(&state.directory, &grant.workspace_id)
        .await;
    for ev in &mut parsed.events {
        rules.mark_blocked(ev);
    }
    let rejected: Vec<_> = parsed
        .rejected
        .iter()
        .map(|r| {
            let mut error = json!({"code": r.error.code, "message": r.error.message});
            if let Some(f) = &r.error.field {
                error["field"] = f.clone().into();
            }
            // `messageId` only when the client sent one: a refused item
            // was never given one of ours.
            let mut item = json!({"index": r.index, "error": error});
            if let Some(id) = &r.message_id {
                item["messageId"] = id.clone().into();
            }
            item
        })
        .collect();
    state
        .metrics
        .ingest_events
        .with_label_values(&["batch_item", "rejected"])
        .inc_by(parsed.rejected.len() as u64);
    if parsed.events.is_empty() {
        return Err(ApiError::BadRequest {
            code: "no_valid_events",
            message: "no event in the batch is valid".into(),
            field: Some("batch".into()),
            detail: Some(json!({ "rejected": rejected })),
        });
    }
    append(&state, &parsed.events).await?;
    Ok(Json(json!({
        "success": true,
        "accepted": parsed.events.len(),
        "rejected": rejected,
    }))
    .into_response())
}
