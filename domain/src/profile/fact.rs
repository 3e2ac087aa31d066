//! The facts one event contributes to profiles, and [`project`], which
//! computes them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::context::{ContextView, email_of};
use super::{FoldError, Named, TraitValue, counter_name};
use crate::event::{Control, ControlAction, Event, EventType, IdKind, Identifier};
use crate::identity::{Action, Evidence, Key};

/// One thing an event says about profiles. Each variant names the
/// identifier it is kept under and the rule by which it merges with what is
/// already known; every rule is commutative and idempotent except where it
/// says "once per event", which de-duplication guarantees.
///
/// The model and every store handle facts with exhaustive matches: adding a
/// variant fails to compile until each of them says how it keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// The event named `id`. Merge: [`Named::include`] (earliest and latest
    /// time, first canonical key).
    Named {
        /// The identifier.
        id: Identifier,
        /// What the event says about it.
        named: Named,
    },
    /// The event is evidence that its identifiers are one person. Merge:
    /// one piece per [`Evidence::slot`], the one with the smallest key, kept
    /// under each identifier of it that is not blocked; profiles are decided
    /// from the evidence on read ([`crate::identity::Walk`]). Every
    /// identifier of it is also [`Fact::Named`].
    Linked(Evidence),
    /// A trait of `id`. Merge: the value with the latest `(time, messageId)`
    /// wins ([`TraitValue::supersedes`]).
    Trait {
        /// The identifier it is kept under (the event's primary).
        id: Identifier,
        /// The trait's name.
        name: String,
        /// Its value, time and `messageId`.
        value: TraitValue,
    },
    /// The event, counted for `id` under `counter`. Merge: once per event,
    /// counts add; first seen is the earliest time, last seen the latest.
    Counted {
        /// The identifier it is kept under (the event's primary).
        id: Identifier,
        /// The name it is counted under ([`counter_name`]).
        counter: String,
        /// The event time.
        time: i64,
    },
    /// The event's entry in `id`'s timeline. Merge: an upsert keyed by
    /// `(time, messageId)`; the entry's content is the event itself.
    Timeline {
        /// The identifier it is kept under (the event's primary).
        id: Identifier,
        /// The event time.
        time: i64,
        /// The event's `messageId`.
        message_id: String,
        /// The name it is counted under, for filtering by event.
        counter: String,
    },
}

/// What one event contributes to profiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// Where this event's timeline entry, traits and count are kept: the
    /// partition key of its log record.
    pub primary: Identifier,
    /// Its facts, in the order a store applies them: every identifier
    /// named, then the evidence linking them, the traits (by name), the
    /// count, and the timeline entry.
    pub facts: Vec<Fact>,
}

impl Projection {
    /// Every identifier the event names, sorted.
    pub fn identifiers(&self) -> impl Iterator<Item = &Identifier> {
        self.facts.iter().filter_map(|f| match f {
            Fact::Named { id, .. } => Some(id),
            _ => None,
        })
    }
}

/// Computes the [`Projection`] of one event. Pure. Fails only for an event
/// ingest would have refused (see [`FoldError`]).
pub fn project(ev: &Event) -> Result<Projection, FoldError> {
    let primary = ev.primary_identifier();
    if let Some(control) = &ev.control {
        return project_control(ev, control, primary);
    }
    let mut ids = BTreeSet::new();
    ids.insert(primary.clone());
    if let Some(u) = &ev.user_id {
        ids.insert(Identifier::new(IdKind::UserId, u.clone()));
    }
    if let Some(a) = &ev.anonymous_id {
        ids.insert(Identifier::new(IdKind::AnonymousId, a.clone()));
    }
    if let (EventType::Alias, Some(prev)) = (ev.kind, &ev.previous_id) {
        // previousId may be a former userId or an anonymousId; Segment does not
        // say which, so both readings are linked.
        ids.insert(Identifier::new(IdKind::UserId, prev.clone()));
        ids.insert(Identifier::new(IdKind::AnonymousId, prev.clone()));
    }

    // A trait named in both `context.traits` and an identify's `traits` takes
    // the identify's value: both carry the same time and messageId, so the
    // fold could not tell them apart.
    let mut traits = BTreeMap::new();
    // Only `traits` and `externalIds` of the context matter here; the rest is
    // skipped without building it.
    if let Some(text) = ev.context.as_deref() {
        let ctx = ContextView::read(text)?;
        if let Some(ct) = ctx.traits()? {
            if let Some(email) = email_of(&ct) {
                ids.insert(Identifier::new(IdKind::Email, email));
            }
            traits.extend(ct);
        }
        ids.extend(ctx.external_ids()?);
    }
    if ev.kind == EventType::Identify
        && let Some(text) = ev.traits.as_deref()
    {
        let t: Map<String, Value> =
            serde_json::from_str(text).map_err(|e| FoldError::new("traits", format!("{e}")))?;
        if let Some(email) = email_of(&t) {
            ids.insert(Identifier::new(IdKind::Email, email));
        }
        traits.extend(t);
    }
    ids.retain(|i| Identifier::check_value(&i.value).is_ok());

    let time = ev.timestamp;
    let key = Key {
        received_at: ev.received_at,
        message_id: ev.message_id.clone(),
    };
    let mut facts = Vec::with_capacity(ids.len() + traits.len() + 3);
    let named = Named::once(time, key.clone(), ev.source_id.as_str());
    facts.extend(ids.iter().map(|id| Fact::Named {
        id: id.clone(),
        named: named.clone(),
    }));
    if ids.len() > 1 {
        let action = if ev.kind == EventType::Alias {
            Action::Alias
        } else {
            Action::Event
        };
        facts.push(Fact::Linked(Evidence { key, action, ids }));
    }
    facts.extend(traits.into_iter().map(|(name, value)| Fact::Trait {
        id: primary.clone(),
        name,
        value: TraitValue {
            value,
            updated_at: time,
            message_id: ev.message_id.clone(),
        },
    }));
    let counter = counter_name(ev);
    facts.push(Fact::Counted {
        id: primary.clone(),
        counter: counter.clone(),
        time,
    });
    facts.push(Fact::Timeline {
        id: primary.clone(),
        time,
        message_id: ev.message_id.clone(),
        counter,
    });
    Ok(Projection { primary, facts })
}

/// A control record's one fact: the admin's instruction, as evidence. It
/// names no identifier (the admin API accepts only identifiers events have
/// named), counts nothing and has no timeline entry.
fn project_control(
    ev: &Event,
    control: &Control,
    primary: Identifier,
) -> Result<Projection, FoldError> {
    let mut ids = BTreeSet::new();
    for (i, text) in control.identifiers.iter().enumerate() {
        let id = Identifier::parse(text)
            .filter(|id| Identifier::check_value(&id.value).is_ok())
            .ok_or_else(|| {
                FoldError::new(format!("control.identifiers[{i}]"), "not {id_type}:{id}")
            })?;
        ids.insert(id);
    }
    if ids.is_empty() {
        return Err(FoldError::new("control.identifiers", "names no identifier"));
    }
    let action = match control.action {
        ControlAction::Merge => Action::Merge,
        ControlAction::Split => Action::Split,
    };
    let key = Key {
        received_at: ev.received_at,
        message_id: ev.message_id.clone(),
    };
    Ok(Projection {
        primary,
        facts: vec![Fact::Linked(Evidence { key, action, ids })],
    })
}
