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
//! - `GET /v1/profiles/{id}/merges`: why the profile holds each identifier.
//! - `GET /v1/profiles/{id}/links`: the accounts the profile belongs to.
//!
//! Accounts (`group_id`) are a collection of their own (`accounts`):
//! `/v1/accounts/{group_id}/traits|events|metadata|external_ids|links|users`.
//! Segment's paths, `/v1/spaces/{space}/collections/{users|accounts}/profiles/{ref}/…`,
//! serve both collections.
//!
//! Cursors are opaque (base64url JSON); they name the last item returned, so
//! a page is stable while new events arrive. This crate knows only the
//! [`trailmark_store::ProfileReader`] trait.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use trailmark_domain::identity::{Decision, Outcome, path as path_between};
use trailmark_domain::time::{format_micros, parse_micros};
use trailmark_domain::{IdKind, Identifier};
use trailmark_http::auth::Reader;
use trailmark_http::{ApiError, AppState};
use trailmark_store::{ProfileRef, TimelineQuery};

mod accounts;
pub mod admin;
pub mod audiences;

/// The largest page.
pub const MAX_LIMIT: usize = 200;

/// The Profile API routes, under Trailmark's paths and Segment's.
pub fn routes() -> Router<AppState> {
    const SEGMENT: &str = "/v1/spaces/{space_id}/collections/{collection}/profiles/{id}";
    Router::new()
        .route("/v1/profiles/{id}/traits", get(traits))
        .route("/v1/profiles/{id}/events", get(events))
        .route("/v1/profiles/{id}/external_ids", get(external_ids))
        .route("/v1/profiles/{id}/metadata", get(metadata))
        .route("/v1/profiles/{id}/merges", get(merges))
        .route(&format!("{SEGMENT}/traits"), get(traits))
        .route(&format!("{SEGMENT}/events"), get(events))
        .route(&format!("{SEGMENT}/external_ids"), get(external_ids))
        .route(&format!("{SEGMENT}/metadata"), get(metadata))
        .route(&format!("{SEGMENT}/merges"), get(merges))
        .route("/v1/profiles/{id}/links", get(accounts::links))
        .route(&format!("{SEGMENT}/links"), get(accounts::links))
        .route("/v1/accounts/{group_id}/traits", get(traits))
        .route("/v1/accounts/{group_id}/events", get(events))
        .route("/v1/accounts/{group_id}/metadata", get(metadata))
        .route("/v1/accounts/{group_id}/external_ids", get(external_ids))
        .route("/v1/accounts/{group_id}/links", get(accounts::links))
        .route("/v1/accounts/{group_id}/users", get(accounts::users))
        .route(
            "/v1/admin/identity-rules",
            get(admin::get_rules).put(admin::put_rules),
        )
        .route("/v1/admin/tokens", post(admin::create_token))
        .route("/v1/profiles/merge", post(admin::merge))
        .route("/v1/profiles/{id}/split", post(admin::split))
        .route(
            "/v1/audiences",
            get(audiences::list_audiences).post(audiences::create_audience),
        )
        .route("/v1/audiences/preview", post(audiences::preview))
        .route(
            "/v1/audiences/{id}",
            get(audiences::get_audience)
                .put(audiences::put_audience)
                .delete(audiences::delete_audience),
        )
        .route("/v1/audiences/{id}/members", get(audiences::members))
        .route(
            "/v1/computed-traits",
            get(audiences::list_traits).post(audiences::create_trait),
        )
        .route(
            "/v1/computed-traits/{id}",
            get(audiences::get_trait)
                .put(audiences::put_trait)
                .delete(audiences::delete_trait),
        )
        .route(
            "/v1/profiles/{id}/audiences",
            get(audiences::profile_audiences),
        )
        .route(
            &format!("{SEGMENT}/audiences"),
            get(audiences::profile_audiences),
        )
}

/// A profile route's path: Trailmark's (`/v1/profiles/{id}/…` or
/// `/v1/accounts/{group_id}/…`) or Segment's, which also names a space (the
/// workspace) and a collection.
#[derive(Debug, Deserialize)]
struct ProfilePath {
    #[serde(default)]
    id: String,
    #[serde(default)]
    group_id: Option<String>,
    #[serde(default)]
    space_id: Option<String>,
    #[serde(default)]
    collection: Option<String>,
}

impl ProfilePath {
    /// The route's path up to the profile, as a cursor URL repeats it.
    fn base(&self) -> String {
        if let Some(g) = &self.group_id {
            return format!("/v1/accounts/{}", encode_path_segment(g));
        }
        let id = encode_path_segment(&self.id);
        match (&self.space_id, &self.collection) {
            (Some(space), Some(collection)) => format!(
                "/v1/spaces/{}/collections/{}/profiles/{id}",
                encode_path_segment(space),
                encode_path_segment(collection)
            ),
            _ => format!("/v1/profiles/{id}"),
        }
    }

    /// Whether the path names an account rather than a person.
    fn is_account(&self) -> bool {
        self.group_id.is_some() || self.collection.as_deref() == Some("accounts")
    }

    /// The identifier the path names: an account's `group_id` identifier,
    /// or a person's `{id_type}:{id}` (perhaps `profile_id:`).
    fn identifier(&self) -> Result<Identifier, ApiError> {
        if let Some(g) = &self.group_id {
            Identifier::check_value(g).map_err(|m| ApiError::bad_field("group_id", m))?;
            return Ok(Identifier::new(IdKind::GroupId, g.clone()));
        }
        let id = parse_identifier(&self.id)?;
        match (self.is_account(), &id.kind) {
            (true, IdKind::GroupId) | (false, _) => Ok(id),
            (true, _) => Err(ApiError::NotFound(
                "an account is named group_id:{group_id}".into(),
            )),
        }
    }
}

/// The `{id_type}` that names a profile by its stable id.
const PROFILE_ID: &str = "profile_id";

fn parse_identifier(raw: &str) -> Result<Identifier, ApiError> {
    Identifier::parse(raw).ok_or_else(|| {
        ApiError::bad_field(
            "id",
            "a profile is named {id_type}:{id}, for example user_id:42, email:ann@example.com or profile_id:<uuid>",
        )
    })
}

async fn resolve(
    state: &AppState,
    reader: &Reader,
    path: &ProfilePath,
) -> Result<ProfileRef, ApiError> {
    let ws = &reader.0.workspace_id;
    // A Segment path names the space: it must be this token's workspace.
    if path.space_id.as_ref().is_some_and(|s| s != ws) {
        return Err(ApiError::NotFound(
            "no such space: the space id is the workspace id of the token".into(),
        ));
    }
    match path.collection.as_deref() {
        None | Some("users" | "accounts") => {}
        Some(other) => {
            return Err(ApiError::NotFound(format!(
                "no collection {other:?}: the collections are \"users\" and \"accounts\""
            )));
        }
    }
    let mut id = path.identifier()?;
    if id.kind.as_str() == PROFILE_ID {
        let pid = uuid::Uuid::parse_str(&id.value)
            .map_err(|_| ApiError::bad_field("id", "a profile_id is a uuid"))?;
        id = state
            .store
            .identifier_of(ws, pid)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no profile has the id {pid}")))?;
    }
    if !path.is_account() && id.kind == IdKind::GroupId {
        return Err(ApiError::NotFound(format!(
            "{id} names an account, not a person: read it at /v1/accounts/{{group_id}}"
        )));
    }
    state
        .store
        .resolve(ws, &id)
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
    class: Option<String>,
}

/// Which traits the traits route shows (`class`): all, those events set,
/// the computed ones, or audience memberships (each `true`), as Segment's
/// Profile API filters them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TraitClass {
    All,
    Trait,
    ComputedTrait,
    Audience,
}

async fn traits(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<ProfilePath>,
    p: Result<Query<TraitsParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 10)?;
    let class = match p.class.as_deref() {
        None | Some("") => TraitClass::All,
        Some("trait") => TraitClass::Trait,
        Some("computed_trait") => TraitClass::ComputedTrait,
        Some("audience") => TraitClass::Audience,
        Some(_) => {
            return Err(ApiError::bad_field(
                "class",
                "class is trait, computed_trait or audience",
            ));
        }
    };
    let after: Option<String> = p.next.as_deref().map(decode_cursor).transpose()?;
    let profile = resolve(&state, &reader, &path).await?;
    let ws = &reader.0.workspace_id;
    let mut all = match class {
        TraitClass::All | TraitClass::Trait => state.store.traits(ws, &profile).await?,
        _ => BTreeMap::new(),
    };
    // Computed traits and memberships are the evaluator's; shown like
    // traits, set by the evaluator's latest change.
    let derived: Vec<(String, Value)> = match class {
        TraitClass::All | TraitClass::ComputedTrait => {
            audiences::computed_traits_of(&state, ws, &profile)
                .await?
                .into_iter()
                .collect()
        }
        TraitClass::Audience => audiences::audiences_of(&state, ws, &profile)
            .await?
            .into_iter()
            .map(|k| (k, Value::Bool(true)))
            .collect(),
        TraitClass::Trait => Vec::new(),
    };
    for (k, v) in derived {
        all.insert(
            k,
            trailmark_domain::profile::TraitValue {
                value: v,
                updated_at: 0,
                message_id: String::new(),
            },
        );
    }
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
    let mut url = page_url(&path, "traits", limit, &next);
    if let Some(include) = &p.include {
        url.push_str(&format!("&include={}", encode_query_value(include)));
    }
    if verbose {
        url.push_str("&verbose=true");
    }
    if let Some(c) = &p.class {
        url.push_str(&format!("&class={}", encode_query_value(c)));
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
    Path(path): Path<ProfilePath>,
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
    let profile = resolve(&state, &reader, &path).await?;
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
    let mut url = page_url(&path, "events", limit, &next);
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
fn page_url(path: &ProfilePath, route: &str, limit: usize, next: &str) -> String {
    let mut url = format!("{}/{route}?limit={limit}", path.base());
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
    Path(path): Path<ProfilePath>,
    p: Result<Query<ExternalIdsParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 25)?;
    let after: Option<String> = p.next.as_deref().map(decode_cursor).transpose()?;
    let profile = resolve(&state, &reader, &path).await?;
    let (page, has_more, next) = keyed_page(
        profile
            .identifiers
            .iter()
            .map(|(ident, named)| (ident.to_string(), (ident, named))),
        after.as_deref(),
        limit,
    );
    let data: Vec<Value> = page
        .into_iter()
        .map(|(_, (ident, named))| {
            json!({
                "id": ident.value,
                "type": ident.kind.as_str(),
                "collection": if ident.kind == IdKind::GroupId { "accounts" } else { "users" },
                "encoding": "none",
                "created_at": format_micros(named.created),
                "last_seen": format_micros(named.last_seen),
                "first_message_id": named.first.message_id,
                "source_id": named.source_id,
                "linked": profile.linked_by(ident).map(link_json),
            })
        })
        .collect();
    Ok(Json(json!({
        "data": data,
        "cursor": cursor_object(page_url(&path, "external_ids", limit, &next), has_more, next, limit),
    })))
}

async fn metadata(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<ProfilePath>,
) -> Result<Json<Value>, ApiError> {
    let profile = resolve(&state, &reader, &path).await?;
    let meta = state
        .store
        .metadata(&reader.0.workspace_id, &profile)
        .await?;
    let total: u64 = meta.counts.values().sum();
    let counts: BTreeMap<&String, u64> = meta.counts.iter().map(|(k, v)| (k, *v)).collect();
    let created = profile.identifiers.values().map(|n| n.created).min();
    let first = &profile.identifiers[&profile.holder].first;
    // The newest event: one entry of the timeline, newest first.
    let newest = state
        .store
        .timeline(
            &reader.0.workspace_id,
            &profile,
            &TimelineQuery {
                descending: true,
                limit: 1,
                ..TimelineQuery::default()
            },
        )
        .await?;
    let last_message_id = newest.entries.first().map(|e| e.message_id.clone());
    let has_events = !meta.counts.is_empty();
    let computed = audiences::computed_traits_of(&state, &reader.0.workspace_id, &profile).await?;
    let member_of = audiences::audiences_of(&state, &reader.0.workspace_id, &profile).await?;
    let (first_seen, last_seen) = if path.is_account() {
        // Accounts keep no counts; their record has the seen times.
        let named = &profile.identifiers[&profile.holder];
        (named.created, named.last_seen)
    } else {
        (meta.first_seen, meta.last_seen)
    };
    Ok(Json(json!({
        "metadata": {
            "profile_id": profile.profile_id.to_string(),
            "holder": profile.holder.to_string(),
            "created_at": created.map(format_micros),
            "updated_at": (has_events || path.is_account()).then(|| format_micros(last_seen)),
            "first_message_id": first.message_id,
            "last_message_id": last_message_id,
            "first_seen": format_micros(first_seen),
            "last_seen": format_micros(last_seen),
            "total_events": total,
            "event_counts": counts,
            "identifiers": profile.identifiers.len(),
            "computed_traits": computed.keys().collect::<Vec<_>>(),
            "audiences": member_of,
        }
    })))
}

/// A decision as the explain routes show it.
fn decision_json(d: &Decision) -> Value {
    let mut v = json!({
        "message_id": d.key.message_id,
        "received_at": format_micros(d.key.received_at),
        "action": d.action.as_str(),
        "evidence": d.evidence.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    match &d.outcome {
        Outcome::Linked(ids) => {
            v["linked"] = json!(ids.iter().map(ToString::to_string).collect::<Vec<_>>());
        }
        Outcome::Refused(id, rule) => {
            v["refused"] = json!(id.to_string());
            v["rule"] = json!(rule.to_string());
        }
        Outcome::Detached(id) => {
            v["detached"] = json!(id.to_string());
        }
    }
    v
}

/// How an identifier joined its profile, for `external_ids`.
fn link_json(d: &Decision) -> Value {
    json!({
        "message_id": d.key.message_id,
        "received_at": format_micros(d.key.received_at),
        "rule": d.action.as_str(),
    })
}

/// Query string of the merges route.
#[derive(Debug, Deserialize)]
struct MergesParams {
    /// Another identifier of the profile: the answer names the links that
    /// join the two.
    to: Option<String>,
}

/// `GET /v1/profiles/{id}/merges`: why the profile holds each identifier.
/// Every accepted link with its evidence, every refused one with the rule
/// that refused it, and every split, in canonical order; with `to`, the
/// path of links from `{id}` to that identifier.
async fn merges(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<ProfilePath>,
    p: Result<Query<MergesParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let profile = resolve(&state, &reader, &path).await?;
    let mut out = json!({
        "profile_id": profile.profile_id.to_string(),
        "holder": profile.holder.to_string(),
        "identifiers": profile.identifiers.keys().map(ToString::to_string).collect::<Vec<_>>(),
        "accepted": profile.decisions.iter()
            .filter(|d| matches!(d.outcome, Outcome::Linked(_)))
            .map(decision_json).collect::<Vec<_>>(),
        "refused": profile.decisions.iter()
            .filter(|d| !matches!(d.outcome, Outcome::Linked(_)))
            .map(decision_json).collect::<Vec<_>>(),
    });
    if let Some(to) = &p.to {
        let to = Identifier::parse(to)
            .ok_or_else(|| ApiError::bad_field("to", "to is {id_type}:{id}"))?;
        let from = match parse_identifier(&path.id)? {
            id if id.kind.as_str() == PROFILE_ID => profile.holder.clone(),
            id => id,
        };
        let members: std::collections::BTreeSet<Identifier> =
            profile.identifiers.keys().cloned().collect();
        let found = path_between(&profile.decisions, &members, &from, &to).ok_or_else(|| {
            ApiError::NotFound(format!("{to} is not linked to {from} in this profile"))
        })?;
        out["path"] = json!(found.into_iter().map(decision_json).collect::<Vec<_>>());
    }
    Ok(Json(out))
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
