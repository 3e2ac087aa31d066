//! The query API, shaped like Segment's Profile API.
//!
//! A profile is named by any of its identifiers, `{id_type}:{id}`, where
//! `id_type` is `user_id`, `anonymous_id`, `email` or an external id type.
//! Every route needs the workspace's secret token; a write key is refused.
//!
//! - `GET /v1/profiles/{id}/traits`: `{"traits":{…},"cursor":{…}}`, with
//!   `limit` (default 10, at most 200), `include=a,b`, `verbose=true` and
//!   `next`.
//! - `GET /v1/profiles/{id}/events`: the timeline across all linked
//!   identifiers, with `start`, `end`, `sort=asc|desc` (default `desc`),
//!   `event`, `limit` (default 10, at most 200) and `next`.
//! - `GET /v1/profiles/{id}/external_ids`: the linked identifiers.
//! - `GET /v1/profiles/{id}/metadata`: first and last seen, event counts.
//!
//! Cursors are opaque (base64url JSON); they name the last item returned, so
//! a page is stable while new events arrive. This crate knows only the
//! [`trailmark_store::ProfileReader`] trait.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use trailmark_domain::Identifier;
use trailmark_domain::time::{format_micros, parse_micros};
use trailmark_http::auth::Reader;
use trailmark_http::{ApiError, AppState};
use trailmark_store::{ProfileRef, TimelineQuery};

/// The largest page.
pub const MAX_LIMIT: usize = 200;

/// The Profile API routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/profiles/{id}/traits", get(traits))
        .route("/v1/profiles/{id}/events", get(events))
        .route("/v1/profiles/{id}/external_ids", get(external_ids))
        .route("/v1/profiles/{id}/metadata", get(metadata))
}

fn parse_identifier(raw: &str) -> Result<Identifier, ApiError> {
    Identifier::parse(raw).ok_or_else(|| {
        ApiError::bad_field(
            "id",
            "a profile is named {id_type}:{id}, for example user_id:42 or email:ann@example.com",
        )
    })
}

async fn resolve(state: &AppState, reader: &Reader, raw: &str) -> Result<ProfileRef, ApiError> {
    let id = parse_identifier(raw)?;
    state
        .store
        .resolve(&reader.0.workspace_id, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no profile has the identifier {id}")))
}

/// A query string that does not parse is a 400 like any other bad field;
/// serde's message names the parameter.
fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_query",
        message: rejection.body_text().to_lowercase(),
        field: None,
        detail: None,
    }
}

fn limit(raw: Option<usize>, default: usize) -> Result<usize, ApiError> {
    match raw {
        None => Ok(default),
        Some(0) => Err(ApiError::bad_field("limit", "limit must be at least 1")),
        Some(n) if n > MAX_LIMIT => Err(ApiError::bad_field(
            "limit",
            format!("limit must be at most {MAX_LIMIT}"),
        )),
        Some(n) => Ok(n),
    }
}

fn encode_cursor<T: Serialize>(c: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(c).expect("cursor serialises"))
}

fn decode_cursor<T: DeserializeOwned>(raw: &str) -> Result<T, ApiError> {
    URL_SAFE_NO_PAD
        .decode(raw)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::bad_field("next", "next is not a cursor this api issued"))
}

/// The `cursor` object every paged route returns.
fn cursor_object(url: String, has_more: bool, next: String, limit: usize) -> Value {
    json!({"url": url, "has_more": has_more, "next": next, "limit": limit})
}

/// One page of items named by string keys: the `limit` smallest keys after
/// the cursor's, in key order, and the cursor to the next page (empty when
/// none). Items are sorted here, so paging never depends on the order the
/// caller happened to hold them in.
fn keyed_page<T>(
    items: impl Iterator<Item = (String, T)>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<(String, T)>, bool, String) {
    let mut items: Vec<(String, T)> = items
        .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let has_more = items.len() > limit;
    items.truncate(limit);
    let next = match (has_more, items.last()) {
        (true, Some((k, _))) => encode_cursor(k),
        _ => String::new(),
    };
    (items, has_more, next)
}

/// Query string of the traits route.
#[derive(Debug, Deserialize)]
struct TraitsParams {
    limit: Option<usize>,
    include: Option<String>,
    verbose: Option<bool>,
    next: Option<String>,
}

async fn traits(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
    p: Result<Query<TraitsParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 10)?;
    let after: Option<String> = p.next.as_deref().map(decode_cursor).transpose()?;
    let profile = resolve(&state, &reader, &id).await?;
    let all = state.store.traits(&reader.0.workspace_id, &profile).await?;
    let include: Option<Vec<&str>> = p.include.as_deref().map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    });
    let verbose = p.verbose.unwrap_or(false);
    let (page, has_more, next) = keyed_page(
        all.iter()
            .filter(|(k, _)| include.as_ref().is_none_or(|inc| inc.contains(&k.as_str())))
            .map(|(k, t)| (k.clone(), t)),
        after.as_deref(),
        limit,
    );
    let out: Map<String, Value> = page
        .into_iter()
        .map(|(name, t)| {
            let value = if verbose {
                json!({
                    "value": t.value,
                    "updated_at": format_micros(t.updated_at),
                    "message_id": t.message_id,
                })
            } else {
                t.value.clone()
            };
            (name, value)
        })
        .collect();
    let mut url = page_url(&id, "traits", limit, &next);
    if let Some(include) = &p.include {
        url.push_str(&format!("&include={}", encode_query_value(include)));
    }
    if verbose {
        url.push_str("&verbose=true");
    }
    Ok(Json(json!({
        "traits": out,
        "cursor": cursor_object(url, has_more, next, limit),
    })))
}

/// Query string of the events route.
#[derive(Debug, Deserialize)]
struct EventsParams {
    start: Option<String>,
    end: Option<String>,
    sort: Option<String>,
    event: Option<String>,
    limit: Option<usize>,
    next: Option<String>,
}

/// The events cursor: the last entry returned and the direction.
#[derive(Debug, Serialize, Deserialize)]
struct EventsCursor {
    t: i64,
    m: String,
    d: bool,
}

fn time_param(raw: Option<&str>, field: &str) -> Result<Option<i64>, ApiError> {
    raw.map(|s| {
        parse_micros(s).ok_or_else(|| {
            ApiError::bad_field(field, format!("{field} is not an iso 8601 timestamp"))
        })
    })
    .transpose()
}

async fn events(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
    p: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 10)?;
    let descending = match p.sort.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(ApiError::bad_field("sort", "sort is asc or desc")),
    };
    let start = time_param(p.start.as_deref(), "start")?;
    let end = time_param(p.end.as_deref(), "end")?;
    let cursor: Option<EventsCursor> = p.next.as_deref().map(decode_cursor).transpose()?;
    if cursor.as_ref().is_some_and(|c| c.d != descending) {
        return Err(ApiError::bad_field(
            "next",
            "the cursor was issued for the other sort order",
        ));
    }
    let profile = resolve(&state, &reader, &id).await?;
    let query = TimelineQuery {
        start,
        end,
        event: p.event.clone().filter(|e| !e.is_empty()),
        descending,
        limit,
        after: cursor.map(|c| (c.t, c.m)),
    };
    let page = state
        .store
        .timeline(&reader.0.workspace_id, &profile, &query)
        .await?;
    let next = match (page.has_more, page.entries.last()) {
        (true, Some(last)) => encode_cursor(&EventsCursor {
            t: last.time,
            m: last.message_id.clone(),
            d: descending,
        }),
        _ => String::new(),
    };
    let mut url = page_url(&id, "events", limit, &next);
    url.push_str(if descending {
        "&sort=desc"
    } else {
        "&sort=asc"
    });
    for (k, v) in [("start", &p.start), ("end", &p.end), ("event", &p.event)] {
        if let Some(v) = v {
            url.push_str(&format!("&{k}={}", encode_query_value(v)));
        }
    }
    // The stored events are copied into the answer as the JSON text they
    // are, never parsed again: a read must not fail on what was accepted.
    #[derive(Serialize)]
    struct EventsPage<'a> {
        data: Vec<&'a RawValue>,
        cursor: Value,
    }
    Ok(Json(EventsPage {
        data: page.entries.iter().map(|e| e.json.as_ref()).collect(),
        cursor: cursor_object(url, page.has_more, next, limit),
    })
    .into_response())
}

/// The URL of the page after this one: the route, with the profile's
/// identifier re-encoded as a path segment, `limit`, and `next` when there
/// is a next page. Callers append the route's other parameters.
fn page_url(id: &str, route: &str, limit: usize, next: &str) -> String {
    let mut url = format!(
        "/v1/profiles/{}/{route}?limit={limit}",
        encode_path_segment(id)
    );
    if !next.is_empty() {
        url.push_str(&format!("&next={next}"));
    }
    url
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved
/// characters.
fn encode_query_value(v: &str) -> String {
    percent_encode(v, b"")
}

/// Percent-encodes a path segment; `:` (which `{id_type}:{id}` uses) and `@`
/// may stand in one as they are.
fn encode_path_segment(v: &str) -> String {
    percent_encode(v, b":@")
}

fn percent_encode(v: &str, also_allowed: &[u8]) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || also_allowed.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Query string of the external ids route.
#[derive(Debug, Deserialize)]
struct ExternalIdsParams {
    limit: Option<usize>,
    next: Option<String>,
}

async fn external_ids(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
    p: Result<Query<ExternalIdsParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 25)?;
    let after: Option<String> = p.next.as_deref().map(decode_cursor).transpose()?;
    let profile = resolve(&state, &reader, &id).await?;
    let (page, has_more, next) = keyed_page(
        profile
            .identifiers
            .iter()
            .map(|(ident, created)| (ident.to_string(), (ident, *created))),
        after.as_deref(),
        limit,
    );
    let data: Vec<Value> = page
        .into_iter()
        .map(|(_, (ident, created))| {
            json!({
                "id": ident.value,
                "type": ident.kind.as_str(),
                "collection": "users",
                "encoding": "none",
                "created_at": format_micros(created),
            })
        })
        .collect();
    Ok(Json(json!({
        "data": data,
        "cursor": cursor_object(page_url(&id, "external_ids", limit, &next), has_more, next, limit),
    })))
}

async fn metadata(
    State(state): State<AppState>,
    reader: Reader,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let profile = resolve(&state, &reader, &id).await?;
    let meta = state
        .store
        .metadata(&reader.0.workspace_id, &profile)
        .await?;
    let total: u64 = meta.counts.values().sum();
    let counts: BTreeMap<&String, u64> = meta.counts.iter().map(|(k, v)| (k, *v)).collect();
    Ok(Json(json!({
        "metadata": {
            "profile_id": profile.root.to_string(),
            "first_seen": format_micros(meta.first_seen),
            "last_seen": format_micros(meta.last_seen),
            "total_events": total,
            "event_counts": counts,
            "identifiers": profile.identifiers.len(),
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_pages_follow_key_order_whatever_the_input_order() {
        // Identifier order puts user_id before external types; string order
        // does not. Paging by string key must still see every item once.
        let keys = ["user_id:1", "stripe_id:9", "anonymous_id:a", "email:x"];
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, has_more, next) = keyed_page(
                keys.iter().map(|k| (k.to_string(), ())),
                after.as_deref(),
                3,
            );
            seen.extend(page.into_iter().map(|(k, _)| k));
            if !has_more {
                assert!(next.is_empty());
                break;
            }
            after = Some(decode_cursor::<String>(&next).unwrap());
        }
        assert_eq!(
            seen,
            ["anonymous_id:a", "email:x", "stripe_id:9", "user_id:1"]
        );
    }
}
