//! Accounts: who belongs to which account, read both ways.
//!
//! An account is named by its `group_id`, from `group` calls,
//! `context.groupId` and `context.externalIds` of type `group_id` (see
//! [`trailmark_domain::profile::project`]). Its traits, events, metadata and
//! external ids are served by the profile routes, keyed by the account's
//! identifier; this module serves the memberships:
//!
//! - `GET /v1/accounts/{group_id}/users`: the account's members, paged,
//!   each resolved to the person's profile;
//! - `GET …/links`, as Segment's Profile API answers it: for a person, the
//!   accounts it belongs to; for an account, its users.
//!
//! A membership is kept under the identifier that named the account (the
//! event's `userId`, else its `anonymousId`), so one person who joined under
//! two identifiers is listed once per identifier; each entry carries the
//! person's `profile_id`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use trailmark_domain::Identifier;
use trailmark_domain::profile::Named;
use trailmark_domain::time::format_micros;
use trailmark_http::auth::Reader;
use trailmark_http::{ApiError, AppState};

use super::{
    ProfilePath, bad_query, cursor_object, decode_cursor, encode_cursor, limit, page_url, resolve,
};

/// The most accounts `links` lists for one person: a write key can make a
/// person join any number of accounts, and a read must stay bounded.
pub const MAX_PERSON_ACCOUNTS: usize = 1_000;

/// Query string of the paged membership routes.
#[derive(Debug, Deserialize)]
pub(crate) struct PageParams {
    limit: Option<usize>,
    next: Option<String>,
}

/// One side of a membership as the routes show it.
fn membership_json(other: &Identifier, named: &Named) -> Value {
    json!({
        "id": other.value,
        "type": other.kind.as_str(),
        "collection": if other.kind == trailmark_domain::IdKind::GroupId { "accounts" } else { "users" },
        "encoding": "none",
        "created_at": format_micros(named.created),
        "last_seen": format_micros(named.last_seen),
        "first_message_id": named.first.message_id,
        "source_id": named.source_id,
    })
}

/// The most membership rows `links` reads for one person, over all its
/// identifiers: each identifier reads what is left of it, so a person with
/// many identifiers, each in many accounts, costs a bounded read.
const MAX_PERSON_MEMBERSHIP_ROWS: usize = 4 * MAX_PERSON_ACCOUNTS;

/// A page of an account's members: the `next` cursor read, the rows after
/// it, each with its person's profile, whether more follow, and the cursor
/// to the next page (empty when none).
struct MemberPage {
    rows: Vec<(Identifier, Named, Option<trailmark_store::ProfileRef>)>,
    has_more: bool,
    next: String,
}

async fn member_page(
    state: &AppState,
    ws: &str,
    account: &Identifier,
    next: Option<&str>,
    limit: usize,
) -> Result<MemberPage, ApiError> {
    let after = next
        .map(decode_cursor::<String>)
        .transpose()?
        .map(|s| {
            Identifier::parse(&s)
                .ok_or_else(|| ApiError::bad_field("next", "next is not a cursor this api issued"))
        })
        .transpose()?;
    let mut found = state
        .store
        .account_members(ws, account, after.as_ref(), limit + 1)
        .await?;
    let has_more = found.len() > limit;
    found.truncate(limit);
    let next = match (has_more, found.last()) {
        (true, Some((m, _))) => encode_cursor(&m.to_string()),
        _ => String::new(),
    };
    let mut rows: Vec<(Identifier, Named, Option<trailmark_store::ProfileRef>)> =
        Vec::with_capacity(found.len());
    for (member, named) in found {
        // Members of one person resolve to one profile: walk it once.
        let known = rows
            .iter()
            .filter_map(|(_, _, p)| p.as_ref())
            .find(|p| p.identifiers.contains_key(&member))
            .cloned();
        let profile = match known {
            Some(p) => Some(p),
            None => state.store.resolve(ws, &member).await?,
        };
        rows.push((member, named, profile));
    }
    Ok(MemberPage {
        rows,
        has_more,
        next,
    })
}

/// `GET /v1/accounts/{group_id}/users`: the account's members, in the
/// store's order, `limit` (default 25, at most 200) at a time.
pub(crate) async fn users(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<ProfilePath>,
    p: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let limit = limit(p.limit, 25)?;
    let ws = &reader.0.workspace_id;
    let account = resolve(&state, &reader, &path).await?.holder;
    let MemberPage {
        rows: page,
        has_more,
        next,
    } = member_page(&state, ws, &account, p.next.as_deref(), limit).await?;
    let data: Vec<Value> = page
        .iter()
        .map(|(member, named, profile)| {
            let mut v = membership_json(member, named);
            v["profile_id"] = json!(profile.as_ref().map(|p| p.profile_id.to_string()));
            v["holder"] = json!(profile.as_ref().map(|p| p.holder.to_string()));
            v
        })
        .collect();
    Ok(Json(json!({
        "data": data,
        "cursor": cursor_object(page_url(&path, "users", limit, &next), has_more, next, limit),
    })))
}

/// `GET …/links`, Segment's shape: `{"data":[{"to_collection", "profile_id",
/// "external_ids":[…]}]}`. For a person, one entry per account it belongs to
/// (any member identifier's), at most [`MAX_PERSON_ACCOUNTS`], reading at
/// most [`MAX_PERSON_MEMBERSHIP_ROWS`] rows (`truncated` says when either
/// cut the list); for an
/// account, one entry per member profile on the page (`limit`, `next` as
/// `users`), with the identifiers that joined.
pub(crate) async fn links(
    State(state): State<AppState>,
    reader: Reader,
    Path(path): Path<ProfilePath>,
    p: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = p.map_err(bad_query)?;
    let ws = &reader.0.workspace_id;
    let profile = resolve(&state, &reader, &path).await?;
    if path.is_account() {
        let limit = limit(p.limit, 25)?;
        let MemberPage {
            rows: page,
            has_more,
            next,
        } = member_page(&state, ws, &profile.holder, p.next.as_deref(), limit).await?;
        // One entry per person, in the order their first member came.
        let mut order: Vec<String> = Vec::new();
        let mut by_profile: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (member, named, profile) in &page {
            let key = profile
                .as_ref()
                .map_or_else(|| member.to_string(), |p| p.profile_id.to_string());
            if !by_profile.contains_key(&key) {
                order.push(key.clone());
            }
            by_profile
                .entry(key)
                .or_default()
                .push(membership_json(member, named));
        }
        let data: Vec<Value> = order
            .into_iter()
            .map(|k| {
                let ids = by_profile.remove(&k).unwrap_or_default();
                json!({"to_collection": "users", "profile_id": k, "external_ids": ids})
            })
            .collect();
        return Ok(Json(json!({
            "data": data,
            "cursor": cursor_object(page_url(&path, "links", limit, &next), has_more, next, limit),
        })));
    }
    let mut accounts: BTreeMap<Identifier, Named> = BTreeMap::new();
    let mut truncated = false;
    let mut budget = MAX_PERSON_MEMBERSHIP_ROWS;
    for member in profile.identifiers.keys() {
        if budget == 0 {
            truncated = true;
            break;
        }
        let want = budget.min(MAX_PERSON_ACCOUNTS + 1);
        let rows = state.store.member_accounts(ws, member, None, want).await?;
        budget -= rows.len();
        truncated |= rows.len() > MAX_PERSON_ACCOUNTS || rows.len() == want;
        for (account, named) in rows {
            match accounts.get_mut(&account) {
                Some(n) => n.include(&named),
                None => {
                    accounts.insert(account, named);
                }
            }
        }
    }
    truncated |= accounts.len() > MAX_PERSON_ACCOUNTS;
    let data: Vec<Value> = accounts
        .iter()
        .take(MAX_PERSON_ACCOUNTS)
        .map(|(account, named)| {
            json!({
                "to_collection": "accounts",
                "profile_id": trailmark_domain::identity::profile_id(ws, account).to_string(),
                "external_ids": [membership_json(account, named)],
            })
        })
        .collect();
    Ok(Json(json!({ "data": data, "truncated": truncated })))
}
