//! The facts one event contributes to profiles, and [`project`], which
//! computes them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::context::{ContextView, email_of};
use super::{FoldError, Named, TraitValue, counter_name};
use crate::event::{Control, ControlAction, Event, EventType, IdKind, Identifier};
use crate::identity::{Action, Evidence, Key, Rules};

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
    /// Kept only under the event's primary identifier, whose partition of
    /// the log has one projector: a count is a read-modify-write, so it
    /// needs one writer (accounts, written from every member's partition,
    /// are not counted).
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
    /// `member`, the event's primary identifier, belongs to `account` (a
    /// [`IdKind::GroupId`] identifier): the event was a `group` call or named
    /// the account in `context.groupId` or `context.externalIds`. Merge:
    /// [`Named::include`], kept both under the account (its users) and under
    /// the member (its accounts). Membership is never identity evidence: the
    /// members of an account stay separate people.
    Member {
        /// The account.
        account: Identifier,
        /// The person's identifier that named it.
        member: Identifier,
        /// What the event says of the membership.
        named: Named,
    },
}

/// What one event contributes to profiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// Where this event's timeline entry, traits and count are kept: the
    /// partition key of its log record.
    pub primary: Identifier,
    /// Its facts, in the order a store applies them: every identifier
    /// named (people, then accounts), then the evidence linking them, the
    /// traits (by name), the count, the timeline entries, and the
    /// memberships.
    pub facts: Vec<Fact>,
}

impl Projection {
    /// Every identifier the event names: people, sorted, then accounts.
    pub fn identifiers(&self) -> impl Iterator<Item = &Identifier> {
        self.facts.iter().filter_map(|f| match f {
            Fact::Named { id, .. } => Some(id),
            _ => None,
        })
    }
}

/// Whether [`project`] may give `ev` a [`Fact::Trait`] (or, for a control
/// record, change traits some other way): a test that reads no JSON. It
/// never says no when `project` gives one (the ingest parser's fuzz target
/// checks that); it may say yes when it does not.
pub fn may_set_traits(ev: &Event) -> bool {
    ev.control.is_some()
        || (matches!(ev.kind, EventType::Identify | EventType::Group) && ev.traits.is_some())
        // `context.traits`, its key perhaps written with escapes.
        || ev
            .context
            .as_deref()
            .is_some_and(|c| c.contains("\"traits\"") || c.contains("\\u"))
}

/// Computes the [`Projection`] of one event. Pure. Fails only for an event
/// ingest would have refused (see [`FoldError`]).
///
/// Accounts: a `group` call's `groupId`, `context.groupId` and the
/// `group_id` entries of `context.externalIds` name the event's accounts
/// (values blocked by the built-in defaults of [`Rules::defaults`] name
/// none). Each account is [`Fact::Named`], gets the event in its timeline,
/// and [`Fact::Member`] the event's primary; a `group` call's `traits` are
/// its account's traits. Accounts keep no counts (see [`Fact::Counted`]).
pub fn project(ev: &Event) -> Result<Projection, FoldError> {
    let primary = ev.primary_identifier();
    if let Some(control) = &ev.control {
        return project_control(ev, control, primary);
    }
    if ev.source_id == crate::audience::EVALUATOR_SOURCE {
        return Ok(project_generated(ev, primary));
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
    let mut accounts = BTreeSet::new();
    if let (EventType::Group, Some(g)) = (ev.kind, &ev.group_id) {
        accounts.insert(g.clone());
    }
    // Only `traits`, `externalIds` and `groupId` of the context matter here;
    // the rest is skipped without building it.
    if let Some(text) = ev.context.as_deref() {
        let ctx = ContextView::read(text)?;
        if let Some(ct) = ctx.traits()? {
            if let Some(email) = email_of(&ct) {
                ids.insert(Identifier::new(IdKind::Email, email));
            }
            traits.extend(ct);
        }
        let external = ctx.external_ids()?;
        ids.extend(external.users);
        accounts.extend(external.accounts);
        accounts.extend(ctx.group_id());
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
    let blocked = Rules::defaults();
    let accounts: Vec<Identifier> = accounts
        .into_iter()
        .filter(|g| Identifier::check_value(g).is_ok() && !blocked.is_blocked_value(g))
        .map(|g| Identifier::new(IdKind::GroupId, g))
        .collect();
    // A `group` call's traits describe its account, not the person.
    let mut account_traits = Map::new();
    if ev.kind == EventType::Group
        && let Some(text) = ev.traits.as_deref()
    {
        account_traits =
            serde_json::from_str(text).map_err(|e| FoldError::new("traits", format!("{e}")))?;
    }
    let group_account = ev
        .group_id
        .as_deref()
        .filter(|_| ev.kind == EventType::Group)
        .and_then(|g| accounts.iter().find(|a| a.value == g));

    let time = ev.timestamp;
    let key = Key {
        received_at: ev.received_at,
        message_id: ev.message_id.clone(),
    };
    let mut facts = Vec::with_capacity(
        ids.len() + traits.len() + 3 + accounts.len() * 3 + account_traits.len(),
    );
    let named = Named::once(time, key.clone(), ev.source_id.as_str());
    facts.extend(ids.iter().chain(&accounts).map(|id| Fact::Named {
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
    if let Some(account) = group_account {
        facts.extend(account_traits.into_iter().map(|(name, value)| Fact::Trait {
            id: account.clone(),
            name,
            value: TraitValue {
                value,
                updated_at: time,
                message_id: ev.message_id.clone(),
            },
        }));
    }
    let counter = counter_name(ev);
    facts.push(Fact::Counted {
        id: primary.clone(),
        counter: counter.clone(),
        time,
    });
    for id in std::iter::once(&primary).chain(&accounts) {
        facts.push(Fact::Timeline {
            id: id.clone(),
            time,
            message_id: ev.message_id.clone(),
            counter: counter.clone(),
        });
    }
    facts.extend(accounts.into_iter().map(|account| Fact::Member {
        account,
        member: primary.clone(),
        named: named.clone(),
    }));
    Ok(Projection { primary, facts })
}

/// An event the audience evaluator appended (an audience entered or
/// exited, a computed trait changed): history, so its one fact is its
/// timeline entry. It names no identifier (the profile it reports on was
/// named by the events that made it), links nothing, sets no trait and
/// counts nothing: as activity it would move the seen times audiences test,
/// and as evidence it would make the evaluator's own output decide who a
/// profile's holder is.
fn project_generated(ev: &Event, primary: Identifier) -> Projection {
    Projection {
        facts: vec![Fact::Timeline {
            id: primary.clone(),
            time: ev.timestamp,
            message_id: ev.message_id.clone(),
            counter: counter_name(ev),
        }],
        primary,
    }
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
        if id.kind == IdKind::GroupId {
            return Err(FoldError::new(
                format!("control.identifiers[{i}]"),
                "names an account, which is never merged or split",
            ));
        }
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
