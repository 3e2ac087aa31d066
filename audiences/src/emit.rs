//! The events the evaluator appends to the log: `Audience Entered` and
//! `Audience Exited` in Segment's shape, and `Computed Trait Changed`.
//!
//! Each has a `messageId` derived from what it reports (workspace,
//! definition, profile, change number), so writing it twice (a crash
//! between the append and the outbox clean-up) gives the same message,
//! which every consumer de-duplicates.

use serde_json::{Value, json};
use trailmark_domain::audience::EVALUATOR_SOURCE;
use trailmark_domain::{Event, EventType, IdKind, Identifier};
use uuid::Uuid;

use crate::rows::Cause;

/// The name of an entry event.
pub const ENTERED: &str = "Audience Entered";
/// The name of an exit event.
pub const EXITED: &str = "Audience Exited";
/// The name of a computed trait's change event.
pub const TRAIT_CHANGED: &str = "Computed Trait Changed";

/// What one change reports.
pub struct Change<'a> {
    /// The workspace.
    pub ws: &'a str,
    /// The profile's holder and members (to name it by `userId` or
    /// `anonymousId`).
    pub holder: &'a Identifier,
    /// The profile's members.
    pub members: &'a [Identifier],
    /// The profile's id.
    pub profile_id: Uuid,
    /// The definition's id, key and version.
    pub definition: (&'a str, &'a str, u32),
    /// The change's number for this profile and definition.
    pub n: u32,
    /// When it happened (a window's boundary, or when it was evaluated).
    pub at: i64,
    /// When it was decided.
    pub now: i64,
    /// Why.
    pub cause: &'a Cause,
}

/// The `messageId` of a change: stable for the same change.
pub fn message_id(ws: &str, definition: &str, profile: Uuid, n: u32) -> String {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("trailmark/{ws}/{definition}/{profile}/{n}").as_bytes(),
    )
    .hyphenated()
    .to_string()
}

/// An `Audience Entered` (`member`) or `Audience Exited` event.
pub fn membership(c: &Change<'_>, member: bool) -> Event {
    let (id, key, version) = c.definition;
    let properties = json!({
        "audience_key": key,
        "audience_id": id,
        "audience_version": version,
        "profile_id": c.profile_id,
        "transition": c.n,
        "cause": c.cause.to_json(),
    });
    event(
        c,
        if member { ENTERED } else { EXITED },
        properties,
        "audience",
    )
}

/// A `Computed Trait Changed` event.
pub fn trait_changed(c: &Change<'_>, value: &Value, previous: &Value) -> Event {
    let (id, key, version) = c.definition;
    let properties = json!({
        "trait_key": key,
        "trait_id": id,
        "trait_version": version,
        "value": value,
        "previous_value": previous,
        "profile_id": c.profile_id,
        "transition": c.n,
        "cause": c.cause.to_json(),
    });
    event(c, TRAIT_CHANGED, properties, "computed_trait")
}

fn event(c: &Change<'_>, name: &str, properties: Value, class: &str) -> Event {
    let (id, key, _) = c.definition;
    let pick = |kind: IdKind| {
        if c.holder.kind == kind {
            return Some(c.holder.value.clone());
        }
        c.members
            .iter()
            .find(|m| m.kind == kind)
            .map(|m| m.value.clone())
    };
    let user_id = pick(IdKind::UserId);
    let anonymous_id = pick(IdKind::AnonymousId).or_else(|| {
        // A profile is always named by a userId or an anonymousId; should
        // one not be, the holder's value stands in.
        user_id.is_none().then(|| c.holder.value.clone())
    });
    let context = json!({
        "personas": {
            "computation_class": class,
            "computation_id": id,
            "computation_key": key,
        },
        "library": {"name": EVALUATOR_SOURCE},
    });
    Event {
        workspace_id: c.ws.to_owned(),
        source_id: EVALUATOR_SOURCE.to_owned(),
        message_id: message_id(c.ws, id, c.profile_id, c.n),
        kind: EventType::Track,
        user_id,
        anonymous_id,
        event: Some(name.to_owned()),
        name: None,
        category: None,
        group_id: None,
        previous_id: None,
        timestamp: c.at,
        original_timestamp: None,
        sent_at: None,
        received_at: c.now,
        properties: Some(properties.to_string()),
        traits: None,
        context: Some(context.to_string()),
        integrations: None,
        request_ip: None,
        blocked_ids: Vec::new(),
        control: None,
    }
}

/// What an event the evaluator emitted reports, read back when the log is
/// replayed (after a rebuild, the log is the only record of what was
/// emitted): `(definition id, profile id, n, member)`, for audience events.
pub fn read_membership(ev: &Event) -> Option<(String, Uuid, u32, bool, u32)> {
    if ev.source_id != EVALUATOR_SOURCE {
        return None;
    }
    let member = match ev.event.as_deref()? {
        ENTERED => true,
        EXITED => false,
        _ => return None,
    };
    let p: Value = serde_json::from_str(ev.properties.as_deref()?).ok()?;
    Some((
        p.get("audience_id")?.as_str()?.to_owned(),
        p.get("profile_id")?.as_str()?.parse().ok()?,
        u32::try_from(p.get("transition")?.as_u64()?).ok()?,
        member,
        u32::try_from(p.get("audience_version")?.as_u64()?).ok()?,
    ))
}
