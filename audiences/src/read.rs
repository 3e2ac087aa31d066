//! What the query API reads of audiences and computed traits: all through
//! [`EvaluatorReader`], which cannot write.

use std::collections::BTreeMap;

use serde_json::Value;
use trailmark_domain::Identifier;
use trailmark_domain::audience::eval::ProfileData;
use trailmark_domain::audience::{Catalog, DefinitionError};
use trailmark_store::evaluator::{EvalTable, EvaluatorReader};
use trailmark_store::{ProfileReader, ProfileRef, StoreError, TimelineQuery};
use uuid::Uuid;

use crate::evaluator::{PROGRESS, Progress};
use crate::rows::{self, HistoryRow, MemberRow, ProfileRecord};

/// The most history rows one profile's answer carries.
pub const MAX_HISTORY: usize = 1_000;

/// What the evaluator last decided for a profile.
pub async fn profile_record(
    rows_of: &dyn EvaluatorReader,
    ws: &str,
    pid: Uuid,
) -> Result<Option<ProfileRecord>, StoreError> {
    let got = rows_of
        .eval_get(EvalTable::Profiles, vec![rows::profile_key(ws, pid)])
        .await?;
    Ok(got.into_iter().next().and_then(|(_, v)| rows::decode(&v)))
}

/// A profile's changes, by definition id then number, at most
/// [`MAX_HISTORY`]; true when more were left out.
pub async fn history(
    rows_of: &dyn EvaluatorReader,
    ws: &str,
    pid: Uuid,
) -> Result<(Vec<(String, u32, HistoryRow)>, bool), StoreError> {
    let found = rows_of
        .eval_scan(
            EvalTable::History,
            &rows::history_part(ws, pid),
            None,
            None,
            MAX_HISTORY + 1,
        )
        .await?;
    let truncated = found.len() > MAX_HISTORY;
    let out = found
        .into_iter()
        .take(MAX_HISTORY)
        .filter_map(|(sort, v)| {
            let (id, n) = rows::read_history_sort(&sort)?;
            Some((id, n, rows::decode(&v)?))
        })
        .collect();
    Ok((out, truncated))
}

/// A page of an audience's members, in profile id order, after `after`.
pub async fn members(
    rows_of: &dyn EvaluatorReader,
    ws: &str,
    audience: &str,
    after: Option<Uuid>,
    limit: usize,
) -> Result<Vec<(Uuid, MemberRow)>, StoreError> {
    let after = after.map(|u| u.as_bytes().to_vec());
    let found = rows_of
        .eval_scan(
            EvalTable::Members,
            &rows::members_part(ws, audience),
            after.as_deref(),
            None,
            limit,
        )
        .await?;
    Ok(found
        .into_iter()
        .filter_map(|(k, v)| Some((Uuid::from_slice(&k).ok()?, rows::decode(&v)?)))
        .collect())
}

/// Where the evaluator has got.
pub async fn progress(rows_of: &dyn EvaluatorReader) -> Result<Progress, StoreError> {
    let got = rows_of
        .eval_get(EvalTable::Stats, vec![rows::stats_key(PROGRESS)])
        .await?;
    Ok(got
        .into_iter()
        .next()
        .and_then(|(_, v)| rows::decode(&v))
        .unwrap_or_default())
}

/// A preview: how many profiles a definition would hold now, and a sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preview {
    /// Profiles evaluated.
    pub evaluated: u64,
    /// Of which members.
    pub count: u64,
    /// Some members' holders.
    pub sample: Vec<Identifier>,
    /// Whether it stopped at its limit before evaluating every profile.
    pub truncated: bool,
}

/// How far a preview goes.
#[derive(Debug, Clone, Copy)]
pub struct PreviewLimits {
    /// The most profiles evaluated.
    pub profiles: usize,
    /// The most holders sampled.
    pub sample: usize,
    /// Past this much time it stops (after the page it is on).
    pub time: std::time::Duration,
}

/// Profiles a preview evaluates at once: each is a few store reads.
const PREVIEW_CONCURRENCY: usize = 8;

/// Evaluates a condition over a workspace's profiles as they are now,
/// without state of its own: event conditions are counted from each
/// profile's timeline (the newest matching events, as the leaf state
/// would keep them). Profiles are taken in identifier order, a page at a
/// time, several at once; it stops at `limits`, saying so (`truncated`).
pub async fn preview(
    rows_of: &dyn EvaluatorReader,
    profiles: &dyn ProfileReader,
    ws: &str,
    catalog: &Catalog,
    key: &str,
    now: i64,
    limits: PreviewLimits,
) -> Result<Preview, StoreError> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let started = std::time::Instant::now();
    let mut out = Preview::default();
    let mut after: Option<Vec<u8>> = None;
    'pages: loop {
        let page = rows_of
            .eval_scan(
                EvalTable::IdProfiles,
                ws.as_bytes(),
                after.as_deref(),
                None,
                500,
            )
            .await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        let ids: Vec<Identifier> = page
            .iter()
            .filter_map(|(sort, _)| std::str::from_utf8(sort).ok().and_then(Identifier::parse))
            .collect();
        // Each profile once, through its holder; in page order.
        let found: Vec<Option<(Identifier, bool)>> = stream::iter(ids)
            .map(|id| async move {
                let Some(profile) = profiles.resolve(ws, &id).await? else {
                    return Ok(None);
                };
                if profile.holder != id {
                    return Ok(None);
                }
                let holds = evaluate_now(profiles, ws, catalog, &profile, key, now).await?;
                Ok::<_, StoreError>(Some((id, holds)))
            })
            .buffered(PREVIEW_CONCURRENCY)
            .try_collect()
            .await?;
        for (holder, holds) in found.into_iter().flatten() {
            if out.evaluated as usize >= limits.profiles {
                out.truncated = true;
                break 'pages;
            }
            out.evaluated += 1;
            if holds {
                out.count += 1;
                if out.sample.len() < limits.sample {
                    out.sample.push(holder);
                }
            }
        }
        if page.len() < 500 {
            break;
        }
        if started.elapsed() >= limits.time {
            out.truncated = true;
            break;
        }
    }
    Ok(out)
}

/// Evaluates one profile from its timeline, for a preview.
async fn evaluate_now(
    profiles: &dyn ProfileReader,
    ws: &str,
    catalog: &Catalog,
    profile: &ProfileRef,
    key: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let traits = profiles.traits(ws, profile).await?;
    let meta = profiles.metadata(ws, profile).await?;
    let mut leaves = BTreeMap::new();
    for (spec_id, spec) in catalog.specs() {
        let mut state = spec.empty();
        let mut next: Option<(i64, String)> = None;
        // Newest first, a page at a time, until the state is full or the
        // timeline ends (bounded: at most 10 pages of 200).
        for _ in 0..10 {
            let page = profiles
                .timeline(
                    ws,
                    profile,
                    &TimelineQuery {
                        event: Some(spec.filter().event.clone()),
                        descending: true,
                        limit: 200,
                        after: next.clone(),
                        ..TimelineQuery::default()
                    },
                )
                .await?;
            for entry in &page.entries {
                let Some(ev) = event_of(entry.json.get()) else {
                    continue;
                };
                let props = trailmark_domain::audience::leaf::event_properties(&ev);
                if let Some(c) = spec.contribution(&ev, &props) {
                    state.fold(spec, &c);
                }
            }
            match page.entries.last() {
                Some(e) if page.has_more => next = Some((e.time, e.message_id.clone())),
                _ => break,
            }
        }
        leaves.insert(spec_id.clone(), state);
    }
    let data = ProfileData {
        traits: &traits,
        seen: (!meta.counts.is_empty()).then_some((meta.first_seen, meta.last_seen)),
        leaves: &leaves,
    };
    let e = catalog.evaluate(&data, now);
    Ok(e.audiences.get(key).copied().unwrap_or(false))
}

/// The event a timeline entry shows, as much as a filter reads of it.
fn event_of(json: &str) -> Option<trailmark_domain::Event> {
    let v: Value = serde_json::from_str(json).ok()?;
    let kind = trailmark_domain::EventType::from_wire(v.get("type")?.as_str()?)?;
    let timestamp = trailmark_domain::time::parse_micros(v.get("timestamp")?.as_str()?)?;
    let text = |k: &str| v.get(k).filter(|x| !x.is_null()).map(|x| x.to_string());
    Some(trailmark_domain::Event {
        workspace_id: String::new(),
        source_id: String::new(),
        message_id: v.get("message_id")?.as_str()?.to_owned(),
        kind,
        user_id: None,
        anonymous_id: None,
        event: v.get("event").and_then(|e| e.as_str()).map(str::to_owned),
        name: v.get("name").and_then(|e| e.as_str()).map(str::to_owned),
        category: None,
        group_id: None,
        previous_id: None,
        timestamp,
        original_timestamp: None,
        sent_at: None,
        received_at: timestamp,
        properties: text("properties"),
        traits: text("traits"),
        context: None,
        integrations: None,
        request_ip: None,
        blocked_ids: Vec::new(),
        control: None,
    })
}

/// Turns a definition error into the one the API shows.
pub fn describe(e: &DefinitionError) -> (String, String, Option<usize>) {
    (e.path.clone(), e.message.clone(), e.position)
}
