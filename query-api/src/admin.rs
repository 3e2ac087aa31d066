//! The identity admin API: a workspace's merge-protection rules, forced
//! merges and splits, and read-only tokens. Every route needs the
//! workspace's admin token ([`Admin`]); a read-only token or a write key
//! gets 403.
//!
//! - `GET /v1/admin/identity-rules`, `PUT /v1/admin/identity-rules`: the
//!   rules as [`RuleSettings`] JSON. A change applies to new data at once
//!   (within [`trailmark_http::auth::RULES_TTL`] in other processes), and to
//!   all history on `trailmark rebuild`.
//! - `POST /v1/profiles/merge` `{"identifiers":[…], "messageId"?}` and
//!   `POST /v1/profiles/{id}/split` `{"messageId"?}`: appended to the log as
//!   control records (schema v3), so a rebuild reproduces them; a retry with
//!   the same `messageId` is de-duplicated like any event. 202 once the
//!   record is durable; the projector applies it like any other.
//! - `POST /v1/admin/tokens` `{"scope":"read"}`: a new read-only token.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use trailmark_domain::event::{Control, ControlAction};
use trailmark_domain::identity::{RuleSettings, Rules};
use trailmark_domain::{Event, EventType, IdKind, Identifier};
use trailmark_http::auth::Admin;
use trailmark_http::{ApiError, AppState};
use trailmark_log::Record;

/// The most identifiers one forced merge may name.
pub const MAX_MERGE_IDENTIFIERS: usize = 100;

/// A JSON body that does not read as a 400 with serde's reason (shared by
/// the admin and audience routes).
pub(crate) fn bad_json(rejection: JsonRejection) -> ApiError {
    ApiError::BadRequest {
        code: "invalid_json",
        message: rejection.body_text().to_lowercase(),
        field: None,
        detail: None,
    }
}

pub(crate) async fn get_rules(
    State(state): State<AppState>,
    Admin(grant): Admin,
) -> Result<Json<Value>, ApiError> {
    let settings = state
        .directory
        .identity_rules(&grant.workspace_id)
        .await?
        .unwrap_or_default();
    // Shown as the rules read them: defaults filled in.
    let rules = Rules::from_settings(&settings)
        .map_err(|e| ApiError::Internal(format!("stored identity rules: {e}")))?;
    Ok(Json(json!({ "rules": rules.settings() })))
}

pub(crate) async fn put_rules(
    State(state): State<AppState>,
    Admin(grant): Admin,
    body: Result<Json<RuleSettings>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(settings) = body.map_err(bad_json)?;
    let rules =
        Rules::from_settings(&settings).map_err(|e| ApiError::bad_field(&e.field, e.message))?;
    state
        .directory
        .set_identity_rules(&grant.workspace_id, &settings)
        .await?;
    state.identity_rules.forget(&grant.workspace_id);
    Ok(Json(json!({ "rules": rules.settings() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    scope: String,
}

pub(crate) async fn create_token(
    State(state): State<AppState>,
    Admin(grant): Admin,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body.map_err(bad_json)?;
    if req.scope != "read" {
        return Err(ApiError::bad_field(
            "scope",
            "only read tokens can be created; the admin token comes with the workspace",
        ));
    }
    let token = state
        .directory
        .create_read_token(&grant.workspace_id)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": token, "scope": "read"})),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MergeRequest {
    identifiers: Vec<String>,
    message_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SplitRequest {
    message_id: Option<String>,
}

pub(crate) async fn merge(
    State(state): State<AppState>,
    Admin(grant): Admin,
    body: Result<Json<MergeRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body.map_err(bad_json)?;
    if !(2..=MAX_MERGE_IDENTIFIERS).contains(&req.identifiers.len()) {
        return Err(ApiError::bad_field(
            "identifiers",
            format!("a merge names 2 to {MAX_MERGE_IDENTIFIERS} identifiers"),
        ));
    }
    let mut ids = Vec::with_capacity(req.identifiers.len());
    for (i, raw) in req.identifiers.iter().enumerate() {
        ids.push(
            known(
                &state,
                &grant.workspace_id,
                raw,
                &format!("identifiers[{i}]"),
            )
            .await?,
        );
    }
    control(
        &state,
        &grant.workspace_id,
        ControlAction::Merge,
        ids,
        req.message_id,
    )
    .await
}

pub(crate) async fn split(
    State(state): State<AppState>,
    Admin(grant): Admin,
    Path(id): Path<String>,
    body: Option<Json<SplitRequest>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body.map(|Json(r)| r).unwrap_or_default();
    let id = known(&state, &grant.workspace_id, &id, "id").await?;
    control(
        &state,
        &grant.workspace_id,
        ControlAction::Split,
        vec![id],
        req.message_id,
    )
    .await
}

/// An identifier some event named, not blocked, or the error naming `field`.
async fn known(state: &AppState, ws: &str, raw: &str, field: &str) -> Result<Identifier, ApiError> {
    let id = Identifier::parse(raw)
        .filter(|i| Identifier::check_value(&i.value).is_ok() && i.kind.as_str() != "profile_id")
        .ok_or_else(|| ApiError::bad_field(field, "an identifier is {id_type}:{id}"))?;
    if id.kind == IdKind::GroupId {
        return Err(ApiError::bad_field(
            field,
            format!("{id} names an account: accounts are never merged or split"),
        ));
    }
    if state
        .identity_rules
        .get(&state.directory, ws)
        .await
        .is_blocked(&id)
    {
        return Err(ApiError::bad_field(
            field,
            format!("{id} is a blocked value: it never links"),
        ));
    }
    if state.store.resolve(ws, &id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "no profile has the identifier {id}"
        )));
    }
    Ok(id)
}

/// Appends a control record; answers once it is durable.
async fn control(
    state: &AppState,
    ws: &str,
    action: ControlAction,
    ids: Vec<Identifier>,
    message_id: Option<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let message_id = match message_id {
        Some(m) if m.is_empty() || m.len() > 100 => {
            return Err(ApiError::bad_field("messageId", "1 to 100 characters"));
        }
        Some(m) => m,
        None => uuid::Uuid::now_v7().to_string(),
    };
    let now = state.clock.now_micros();
    let identifiers: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let event = Event {
        workspace_id: ws.to_owned(),
        source_id: "admin".into(),
        message_id: message_id.clone(),
        kind: EventType::Control,
        user_id: None,
        anonymous_id: None,
        event: None,
        name: None,
        category: None,
        group_id: None,
        previous_id: None,
        timestamp: now,
        original_timestamp: None,
        sent_at: None,
        received_at: now,
        properties: None,
        traits: None,
        context: None,
        integrations: None,
        request_ip: None,
        blocked_ids: Vec::new(),
        control: Some(Control {
            action,
            identifiers: identifiers.clone(),
        }),
    };
    let payload = state
        .codec
        .encode(&event)
        .map_err(|e| ApiError::Internal(format!("encoding a control record failed: {e}")))?;
    let record = Record {
        key: event.partition_key(),
        payload,
    };
    tokio::time::timeout(state.append_timeout, state.log.append(vec![record]))
        .await
        .map_err(|_| {
            ApiError::from(trailmark_log::LogError::Unavailable(
                "the log timed out".into(),
            ))
        })??;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "message_id": message_id,
            "action": match action { ControlAction::Merge => "merge", ControlAction::Split => "split" },
            "identifiers": identifiers,
        })),
    ))
}
