//! Audiences and computed traits over HTTP. Admin tokens define; read
//! tokens read.
//!
//! - `POST /v1/audiences` `{key, name?, description?, definition | query}`
//!   → 201 `{id, key, status, version}`; `GET /v1/audiences` (paged:
//!   `limit`, `next`); `GET`, `PUT`, `DELETE /v1/audiences/{id}`. `GET` shows
//!   `{status, size, size_as_of, eval_lag_ms, version, live_version, …}`.
//! - `POST /v1/audiences/preview` `{definition | query}` → `{count, sample,
//!   evaluated, complete, took_ms}`, evaluated from profiles' timelines now
//!   (only what the condition reads, and the audiences and computed traits
//!   it names), over at most [`PREVIEW_PROFILES`] profiles or
//!   [`PREVIEW_TIME`].
//! - `GET /v1/audiences/{id}/members?limit&next`.
//! - `GET /v1/profiles/{ref}/audiences?include=history`.
//! - `/v1/computed-traits` the same (no preview or members); the values are
//!   served by `/v1/profiles/{ref}/traits?class=computed_trait` and listed
//!   in `/metadata`.
//!
//! A bad definition is a 400 naming its path (`definition.and[2].op`, or
//! `query` with the byte `position` of the error in the text).

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use trailmark_audiences::definitions::{DefinitionInput, DefinitionRecord, StatusRecord};
use trailmark_audiences::{Definitions, DefinitionsError, Kind, read};
use trailmark_domain::audience::json::condition_from_json;
use trailmark_domain::audience::query::parse_query;
use trailmark_domain::audience::{AudienceDef, Catalog, DefinitionError};
use trailmark_domain::time::format_micros;
use trailmark_http::auth::{Admin, Reader};
use trailmark_http::{ApiError, AppState};
use trailmark_store::ProfileRef;

use crate::admin::bad_json;

use super::{ProfilePath, bad_query, cursor_object, decode_cursor, encode_cursor, limit, resolve};

/// The most profiles one preview evaluates, and the time after which it
/// stops (at the end of the page of 500 identifiers it is on); past either,
/// the answer says it is incomplete (`complete: false`). It evaluates only
/// what the condition reads, several profiles at once: see
/// `benches/RESULTS.md` for how many profiles that is on a 2-core machine.
pub const PREVIEW_PROFILES: usize = 100_000;
/// See [`PREVIEW_PROFILES`].
pub const PREVIEW_TIME: std::time::Duration = std::time::Duration::from_secs(2);

fn definitions(state: &AppState) -> Definitions {
    Definitions::with_clock(state.directory.clone(), state.clock.clone())
}

/// A definition error as a 400 naming its path.
fn invalid(e: &DefinitionError) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_definition",
        message: e.message.clone(),
        field: Some(e.path.clone()),
        detail: e.position.map(|p| json!({ "position": p })),
    }
}

/// A definitions failure as the API answers it.
fn api(e: DefinitionsError) -> ApiError {
    {
        match e {
            DefinitionsError::Invalid(d) => invalid(&d),
            DefinitionsError::NotFound => ApiError::NotFound("no such definition".into()),
            DefinitionsError::Conflict(key) => ApiError::Conflict {
                message: format!("the key {key:?} is taken"),
                field: Some("key".into()),
            },
            DefinitionsError::Store(s) => s.into(),
        }
    }
}

/// A create or update request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DefinitionBody {
    key: Option<String>,
    name: Option<String>,
    description: Option<String>,
    definition: Option<Value>,
    query: Option<String>,
}

impl From<DefinitionBody> for DefinitionInput {
    fn from(b: DefinitionBody) -> Self {
        DefinitionInput {
            key: b.key,
            name: b.name,
            description: b.description,
            definition: b.definition,
            query: b.query,
        }
    }
}

/// What the API shows of a definition and its status.
fn show(r: &DefinitionRecord, st: &StatusRecord, lag_ms: u64) -> Value {
    let latest = r.latest();
    let status = if st.live_version == Some(latest.version) {
        "live"
    } else {
        "backfilling"
    };
    let mut v = json!({
        "id": r.id,
        "key": r.key,
        "name": r.name,
        "description": r.description,
        "definition": latest.definition,
        "version": latest.version,
        "live_version": st.live_version,
        "status": status,
        "eval_lag_ms": lag_ms,
        "created_at": format_micros(r.created_at),
        "updated_at": format_micros(latest.created_at),
    });
    if let Some(q) = &latest.query {
        v["query"] = json!(q);
    }
    if r.kind == Kind::Audience {
        v["size"] = json!(st.size);
        v["size_as_of"] = if st.size_as_of == 0 {
            Value::Null
        } else {
            json!(format_micros(st.size_as_of))
        };
    }
    v
}

/// How far behind the log the evaluator is, in milliseconds: the age of
/// the oldest record it has not evaluated (0 when caught up).
async fn eval_lag_ms(state: &AppState) -> Result<u64, ApiError> {
    let progress = read::progress(&*state.audiences).await?;
    let ends = state.log.end_positions().await.unwrap_or_default();
    let behind = ends
        .iter()
        .enumerate()
        .any(|(p, end)| progress.positions.get(&(p as u32)).copied().unwrap_or(0) < *end);
    if !behind && !progress.busy {
        return Ok(0);
    }
    let now = state.clock.now_micros();
    Ok(((now - progress.at).max(0) / 1_000) as u64)
}

async fn create(
    state: AppState,
    ws: &str,
    kind: Kind,
    body: Result<Json<DefinitionBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let r = definitions(&state)
        .create(ws, kind, body.into())
        .await
        .map_err(api)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": r.id,
            "key": r.key,
            "status": "backfilling",
            "version": r.latest().version,
        })),
    )
        .into_response())
}

async fn get_one(state: AppState, ws: &str, kind: Kind, id: &str) -> Result<Json<Value>, ApiError> {
    let defs = definitions(&state);
    let r = defs.get(ws, kind, id).await.map_err(api)?;
    let st = defs.status(ws, id).await?;
    let lag = eval_lag_ms(&state).await?;
    Ok(Json(show(&r, &st, lag)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PageParams {
    limit: Option<usize>,
    next: Option<String>,
}

async fn list(
    state: AppState,
    ws: &str,
    kind: Kind,
    p: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 25)?;
    let after: Option<String> = p.next.as_deref().map(decode_cursor).transpose()?;
    let defs = definitions(&state);
    let mut all = defs.list(ws, kind).await?;
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all.retain(|r| after.as_ref().is_none_or(|a| &r.id > a));
    let has_more = all.len() > limit;
    all.truncate(limit);
    let lag = eval_lag_ms(&state).await?;
    let mut items = Vec::with_capacity(all.len());
    for r in &all {
        items.push(show(r, &defs.status(ws, &r.id).await?, lag));
    }
    let next = match (has_more, all.last()) {
        (true, Some(r)) => encode_cursor(&r.id),
        _ => String::new(),
    };
    let base = match kind {
        Kind::Audience => "/v1/audiences",
        Kind::ComputedTrait => "/v1/computed-traits",
    };
    let mut url = format!("{base}?limit={limit}");
    if !next.is_empty() {
        url.push_str(&format!("&next={next}"));
    }
    Ok(Json(json!({
        "data": items,
        "cursor": cursor_object(url, has_more, next, limit),
    })))
}

pub(crate) async fn create_audience(
    State(state): State<AppState>,
    Admin(grant): Admin,
    body: Result<Json<DefinitionBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    create(state, &grant.workspace_id, Kind::Audience, body).await
}

pub(crate) async fn create_trait(
    State(state): State<AppState>,
    Admin(grant): Admin,
    body: Result<Json<DefinitionBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    create(state, &grant.workspace_id, Kind::ComputedTrait, body).await
}

pub(crate) async fn list_audiences(
    State(state): State<AppState>,
    Reader(grant): Reader,
    p: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    list(state, &grant.workspace_id, Kind::Audience, p).await
}

pub(crate) async fn list_traits(
    State(state): State<AppState>,
    Reader(grant): Reader,
    p: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    list(state, &grant.workspace_id, Kind::ComputedTrait, p).await
}

pub(crate) async fn get_audience(
    State(state): State<AppState>,
    Reader(grant): Reader,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    get_one(state, &grant.workspace_id, Kind::Audience, &id).await
}

pub(crate) async fn get_trait(
    State(state): State<AppState>,
    Reader(grant): Reader,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    get_one(state, &grant.workspace_id, Kind::ComputedTrait, &id).await
}

async fn update(
    state: AppState,
    ws: &str,
    kind: Kind,
    id: &str,
    body: Result<Json<DefinitionBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let defs = definitions(&state);
    let r = defs.update(ws, kind, id, body.into()).await.map_err(api)?;
    let st = defs.status(ws, id).await?;
    let lag = eval_lag_ms(&state).await?;
    Ok(Json(show(&r, &st, lag)))
}

pub(crate) async fn put_audience(
    State(state): State<AppState>,
    Admin(grant): Admin,
    Path(id): Path<String>,
    body: Result<Json<DefinitionBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    update(state, &grant.workspace_id, Kind::Audience, &id, body).await
}

pub(crate) async fn put_trait(
    State(state): State<AppState>,
    Admin(grant): Admin,
    Path(id): Path<String>,
    body: Result<Json<DefinitionBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    update(state, &grant.workspace_id, Kind::ComputedTrait, &id, body).await
}

pub(crate) async fn delete_audience(
    State(state): State<AppState>,
    Admin(grant): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    definitions(&state)
        .delete(&grant.workspace_id, Kind::Audience, &id)
        .await
        .map_err(api)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete_trait(
    State(state): State<AppState>,
    Admin(grant): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    definitions(&state)
        .delete(&grant.workspace_id, Kind::ComputedTrait, &id)
        .await
        .map_err(api)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A preview request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PreviewBody {
    definition: Option<Value>,
    query: Option<String>,
    sample: Option<usize>,
}

pub(crate) async fn preview(
    State(state): State<AppState>,
    Reader(grant): Reader,
    body: Result<Json<PreviewBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let ws = &grant.workspace_id;
    let condition = match (&body.definition, &body.query) {
        (Some(d), None) => condition_from_json(d, "definition").map_err(|e| invalid(&e))?,
        (None, Some(q)) => parse_query(q).map_err(|e| invalid(&e))?,
        _ => {
            return Err(ApiError::bad_field(
                "definition",
                "give definition or query, one of them",
            ));
        }
    };
    let sample = body.sample.unwrap_or(10).min(100);
    // The workspace's computed traits and audiences it may refer to, as
    // they stand (newest versions).
    let defs = definitions(&state);
    let audiences = defs.list(ws, Kind::Audience).await?;
    let traits = defs.list(ws, Kind::ComputedTrait).await?;
    let pick = |rs: &[DefinitionRecord]| -> Vec<(DefinitionRecord, u32)> {
        rs.iter().map(|r| (r.clone(), r.latest().version)).collect()
    };
    let base = trailmark_audiences::definitions::compile(&pick(&audiences), &pick(&traits));
    let key = "__preview";
    let mut with: BTreeMap<String, trailmark_domain::audience::ast::Condition> = base
        .audiences()
        .iter()
        .map(|a| (a.key.clone(), a.condition.clone()))
        .collect();
    with.insert(key.to_owned(), condition.clone());
    let trait_keys = base.traits().iter().map(|t| t.key.clone()).collect();
    trailmark_domain::audience::check_references(&with, &trait_keys, key, "definition")
        .map_err(|e| invalid(&e))?;
    // Only what the condition reads, directly or through the audiences it
    // names: each spec in the catalog is counted from every profile's
    // timeline, so the workspace's other definitions would only cost time.
    let mut keys: BTreeSet<String> = BTreeSet::new();
    let mut trait_names: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<&trailmark_domain::audience::ast::Condition> = vec![&condition];
    while let Some(c) = todo.pop() {
        for leaf in c.leaves() {
            match leaf {
                trailmark_domain::audience::ast::Condition::Audience(k) => {
                    if keys.insert(k.clone())
                        && let Some(a) = with.get(k)
                    {
                        todo.push(a);
                    }
                }
                trailmark_domain::audience::ast::Condition::ComputedTrait(p) => {
                    trait_names.insert(p.name.clone());
                }
                _ => {}
            }
        }
    }
    let mut all: Vec<AudienceDef> = base
        .audiences()
        .iter()
        .filter(|a| keys.contains(&a.key))
        .cloned()
        .collect();
    all.push(AudienceDef {
        id: key.to_owned(),
        key: key.to_owned(),
        version: 0,
        condition,
    });
    let traits = base
        .traits()
        .iter()
        .filter(|t| trait_names.contains(&t.key))
        .cloned()
        .collect();
    let catalog = Catalog::new(all, traits);
    let now = state.clock.now_micros();
    let started = std::time::Instant::now();
    let p = read::preview(
        &*state.audiences,
        &*state.store,
        ws,
        &catalog,
        key,
        now,
        read::PreviewLimits {
            profiles: PREVIEW_PROFILES,
            sample,
            time: PREVIEW_TIME,
        },
    )
    .await?;
    Ok(Json(json!({
        "count": p.count,
        "sample": p.sample.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        "evaluated": p.evaluated,
        "complete": !p.truncated,
        "took_ms": started.elapsed().as_millis() as u64,
    })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct MembersParams {
    limit: Option<usize>,
    next: Option<String>,
    cursor: Option<String>,
}

pub(crate) async fn members(
    State(state): State<AppState>,
    Reader(grant): Reader,
    Path(id): Path<String>,
    p: Result<Query<MembersParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 100)?;
    let ws = &grant.workspace_id;
    // The audience must exist in this workspace.
    definitions(&state)
        .get(ws, Kind::Audience, &id)
        .await
        .map_err(api)?;
    let raw = p.next.as_deref().or(p.cursor.as_deref());
    let after: Option<uuid::Uuid> = raw.map(decode_cursor).transpose()?;
    let mut page = read::members(&*state.audiences, ws, &id, after, limit + 1).await?;
    let has_more = page.len() > limit;
    page.truncate(limit);
    let next = match (has_more, page.last()) {
        (true, Some((pid, _))) => encode_cursor(pid),
        _ => String::new(),
    };
    let data: Vec<Value> = page
        .iter()
        .map(|(pid, m)| {
            json!({
                "profile_id": pid,
                "identifier": m.holder,
                "since": format_micros(m.since),
                "version": m.version,
            })
        })
        .collect();
    let mut url = format!("/v1/audiences/{id}/members?limit={limit}");
    if !next.is_empty() {
        url.push_str(&format!("&next={next}"));
    }
    Ok(Json(json!({
        "data": data,
        "cursor": cursor_object(url, has_more, next, limit),
    })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ProfileAudiencesParams {
    include: Option<String>,
}

pub(crate) async fn profile_audiences(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<ProfilePath>,
    p: Result<Query<ProfileAudiencesParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let with_history = match p.include.as_deref() {
        None | Some("") => false,
        Some("history") => true,
        Some(_) => return Err(ApiError::bad_field("include", "include is history")),
    };
    let profile = resolve(&state, &reader, &path).await?;
    let ws = &reader.0.workspace_id;
    let defs = definitions(&state);
    let audiences = defs.list(ws, Kind::Audience).await?;
    let record = read::profile_record(&*state.audiences, ws, profile.profile_id)
        .await?
        .unwrap_or_default();
    let (history, truncated) = if with_history {
        read::history(&*state.audiences, ws, profile.profile_id).await?
    } else {
        (Vec::new(), false)
    };
    let mut data = Vec::new();
    for a in &audiences {
        let state_of = record.audiences.get(&a.id);
        let member = state_of.is_some_and(|s| s.member);
        if !member && !with_history {
            continue;
        }
        let mut v = json!({
            "id": a.id,
            "key": a.key,
            "member": member,
            "version": state_of.map(|s| s.version),
        });
        if member && let Some(s) = state_of {
            v["entered_at"] = json!(format_micros(s.since));
        }
        if with_history {
            let changes: Vec<Value> = history
                .iter()
                .filter(|(id, _, _)| id == &a.id)
                .map(|(_, n, h)| {
                    json!({
                        "n": n,
                        "change": if h.member { "entered" } else { "exited" },
                        "at": format_micros(h.at),
                        "version": h.version,
                        "cause": h.cause.to_json(),
                    })
                })
                .collect();
            // Periods: each entry, with the exit that closed it.
            let mut periods = Vec::new();
            let mut open: Option<&Value> = None;
            for c in &changes {
                if c["change"] == "entered" {
                    open = Some(c);
                } else if let Some(e) = open.take() {
                    periods.push(json!({
                        "entered_at": e["at"], "exited_at": c["at"],
                        "entered_cause": e["cause"], "exited_cause": c["cause"],
                    }));
                }
            }
            if let Some(e) = open {
                periods.push(json!({
                    "entered_at": e["at"], "exited_at": null,
                    "entered_cause": e["cause"], "exited_cause": null,
                }));
            }
            if changes.is_empty() {
                continue;
            }
            v["history"] = json!(changes);
            v["periods"] = json!(periods);
        }
        data.push(v);
    }
    Ok(Json(json!({
        "profile_id": profile.profile_id,
        "data": data,
        "history_truncated": truncated,
    })))
}

/// A profile's computed traits, by key.
pub(crate) async fn computed_traits_of(
    state: &AppState,
    ws: &str,
    profile: &ProfileRef,
) -> Result<Map<String, Value>, ApiError> {
    let record = read::profile_record(&*state.audiences, ws, profile.profile_id)
        .await?
        .unwrap_or_default();
    if record.traits.is_empty() {
        return Ok(Map::new());
    }
    let traits = definitions(state).list(ws, Kind::ComputedTrait).await?;
    Ok(traits
        .iter()
        .filter_map(|t| {
            let s = record.traits.get(&t.id)?;
            (!s.value.is_null()).then(|| (t.key.clone(), s.value.clone()))
        })
        .collect())
}

/// The keys of a profile's audiences (those it is a member of).
pub(crate) async fn audiences_of(
    state: &AppState,
    ws: &str,
    profile: &ProfileRef,
) -> Result<Vec<String>, ApiError> {
    let record = read::profile_record(&*state.audiences, ws, profile.profile_id)
        .await?
        .unwrap_or_default();
    if record.audiences.is_empty() {
        return Ok(Vec::new());
    }
    let audiences = definitions(state).list(ws, Kind::Audience).await?;
    Ok(audiences
        .iter()
        .filter(|a| record.audiences.get(&a.id).is_some_and(|s| s.member))
        .map(|a| a.key.clone())
        .collect())
}
