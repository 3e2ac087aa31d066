//! The profile fold: how events become profiles.
//!
//! Every rule here is commutative and idempotent, so that a profile does not
//! depend on the order in which partitions are consumed, and replaying the log
//! gives the same result:
//!
//! - **Identity.** Every identifier an event carries is linked to the others
//!   (`userId` with `anonymousId`, `traits.email`, `context.externalIds`, and
//!   for `alias` the `previousId`). Linked identifiers form one profile. The
//!   smallest identifier of a profile is its root, whatever the order of links.
//! - **Traits.** Each trait keeps the value with the latest event time; ties
//!   break on `messageId`. Traits are kept per identifier and merged on read, so
//!   merging two profiles never rewrites data.
//! - **Counts and seen times.** Counted per identifier and summed on read;
//!   first seen is a minimum, last seen a maximum.
//! - **De-duplication.** An event whose `messageId` the workspace has seen
//!   within the de-duplication window (measured in `receivedAt`) is dropped
//!   whole. Retries of one message carry the same partition key, so this
//!   decision is taken in partition order and replays identically. The one
//!   order-dependent case is inherent to any window: copies of one message
//!   spread over more than a window apart may count once or twice depending
//!   on which arrives first (their timeline entry is one either way).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::{Event, EventType, IdKind, Identifier};

/// A trait value with the event that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    /// The value.
    pub value: Value,
    /// The event time that set it, microseconds since the epoch.
    pub updated_at: i64,
    /// The `messageId` of that event.
    pub message_id: String,
}

impl TraitValue {
    /// Whether `self` wins over `other`: a later event time, or on a tie the
    /// larger `messageId`, so the outcome never depends on arrival order.
    pub fn supersedes(&self, other: &TraitValue) -> bool {
        (self.updated_at, &self.message_id) > (other.updated_at, &other.message_id)
    }
}

/// Keeps the winning value per trait name.
pub fn merge_trait(
    traits: &mut BTreeMap<String, TraitValue>,
    name: impl Into<String>,
    value: TraitValue,
) {
    let name = name.into();
    match traits.get(&name) {
        Some(current) if !value.supersedes(current) => {}
        _ => {
            traits.insert(name, value);
        }
    }
}

/// Whether an event received at `received_at` duplicates one with the same
/// `messageId` received at `previous` (if any), for a window in microseconds.
pub fn is_duplicate(previous: Option<i64>, received_at: i64, window_micros: i64) -> bool {
    previous.is_some_and(|p| (received_at - p).abs() <= window_micros)
}

/// The name an event is counted under: the event name for `track`, and
/// `$page`, `$identify` and so on for the other call types.
pub fn counter_name(ev: &Event) -> String {
    match ev.kind {
        EventType::Track => ev.event.clone().unwrap_or_default(),
        other => format!("${other}"),
    }
}

/// The facts one event contributes to profiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// Where this event's timeline entry, traits and count are stored.
    pub primary: Identifier,
    /// Every identifier the event carries, primary included, sorted; all of
    /// them are linked into one profile.
    pub identifiers: Vec<Identifier>,
    /// Trait assignments, from `context.traits` and an identify's `traits`
    /// (which wins where both name a trait), by name.
    pub traits: Vec<(String, Value)>,
    /// The name the event is counted under.
    pub counter: String,
    /// The event time.
    pub time: i64,
    /// The event's `messageId`.
    pub message_id: String,
}

/// The parts of `context` that the fold reads.
#[derive(Deserialize)]
struct ContextView<'a> {
    #[serde(default)]
    traits: Option<Value>,
    #[serde(
        default,
        rename = "externalIds",
        deserialize_with = "lenient_external_ids"
    )]
    external_ids: Option<Vec<ExternalId>>,
    #[serde(skip)]
    _text: std::marker::PhantomData<&'a str>,
}

#[derive(Deserialize)]
struct ExternalId {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// `externalIds` that is not a list of objects is ignored, not an error.
fn lenient_external_ids<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ExternalId>>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(match v {
        Value::Array(items) => Some(
            items
                .into_iter()
                .filter_map(|i| serde_json::from_value(i).ok())
                .collect(),
        ),
        _ => None,
    })
}

fn parse_object(text: Option<&str>) -> Option<Map<String, Value>> {
    text.and_then(|t| serde_json::from_str::<Map<String, Value>>(t).ok())
}

fn email_of(traits: &Map<String, Value>) -> Option<&str> {
    traits
        .get("email")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

/// Computes the [`Projection`] of one event. Pure.
pub fn project(ev: &Event) -> Projection {
    let primary = ev.primary_identifier();
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
    let context = ev
        .context
        .as_deref()
        .and_then(|c| serde_json::from_str::<ContextView<'_>>(c).ok());
    if let Some(ctx) = context {
        if let Some(Value::Object(ct)) = ctx.traits {
            if let Some(email) = email_of(&ct) {
                ids.insert(Identifier::new(IdKind::Email, email));
            }
            traits.extend(ct);
        }
        for x in ctx.external_ids.unwrap_or_default() {
            let id = match x.id {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            if let (Some(id), Some(kind)) = (id, x.kind.filter(|t| !t.is_empty())) {
                ids.insert(Identifier::new(IdKind::parse(&kind), id));
            }
        }
    }
    if ev.kind == EventType::Identify
        && let Some(t) = parse_object(ev.traits.as_deref())
    {
        if let Some(email) = email_of(&t) {
            ids.insert(Identifier::new(IdKind::Email, email));
        }
        traits.extend(t);
    }
    ids.retain(|i| !i.value.is_empty() && !i.value.contains('\0'));
    Projection {
        primary,
        identifiers: ids.into_iter().collect(),
        traits: traits.into_iter().collect(),
        counter: counter_name(ev),
        time: ev.timestamp,
        message_id: ev.message_id.clone(),
    }
}

/// A profile as the query API shows it: the union of its identifiers' data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileView {
    /// The linked identifiers, with the earliest event time each was seen at.
    pub identifiers: BTreeMap<Identifier, i64>,
    /// The winning value of each trait.
    pub traits: BTreeMap<String, TraitValue>,
    /// Event counts by [`counter_name`].
    pub counts: BTreeMap<String, u64>,
    /// The earliest event time.
    pub first_seen: i64,
    /// The latest event time.
    pub last_seen: i64,
}

impl ProfileView {
    /// The total number of events.
    pub fn total_events(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// First and last event time of one identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The earliest event time.
    pub first: i64,
    /// The latest event time.
    pub last: i64,
}

impl Seen {
    /// Widens the range to include `time`.
    pub fn include(self, time: i64) -> Self {
        Self {
            first: self.first.min(time),
            last: self.last.max(time),
        }
    }
}

/// An in-memory fold of a workspace's events: the executable specification
/// that every store must agree with.
#[derive(Debug, Clone, Default)]
pub struct ProfileModel {
    window_micros: i64,
    root: BTreeMap<Identifier, Identifier>,
    created: BTreeMap<Identifier, i64>,
    traits: BTreeMap<Identifier, BTreeMap<String, TraitValue>>,
    counts: BTreeMap<Identifier, BTreeMap<String, u64>>,
    seen: BTreeMap<Identifier, Seen>,
    timeline: BTreeMap<Identifier, BTreeMap<(i64, String), Event>>,
    dedup: BTreeMap<String, i64>,
}

impl ProfileModel {
    /// An empty model with a de-duplication window in microseconds.
    pub fn new(window_micros: i64) -> Self {
        Self {
            window_micros,
            ..Self::default()
        }
    }

    /// Folds one event. Returns false when it was dropped as a duplicate.
    pub fn apply(&mut self, ev: &Event) -> bool {
        let prev = self.dedup.get(&ev.message_id).copied();
        if is_duplicate(prev, ev.received_at, self.window_micros) {
            return false;
        }
        self.dedup.insert(ev.message_id.clone(), ev.received_at);
        let p = project(ev);
        for id in &p.identifiers {
            let c = self.created.entry(id.clone()).or_insert(p.time);
            *c = (*c).min(p.time);
            self.root.entry(id.clone()).or_insert_with(|| id.clone());
        }
        for pair in p.identifiers.windows(2) {
            self.link(&pair[0], &pair[1]);
        }
        let traits = self.traits.entry(p.primary.clone()).or_default();
        for (name, value) in p.traits {
            merge_trait(
                traits,
                name,
                TraitValue {
                    value,
                    updated_at: p.time,
                    message_id: p.message_id.clone(),
                },
            );
        }
        *self
            .counts
            .entry(p.primary.clone())
            .or_default()
            .entry(p.counter)
            .or_default() += 1;
        let seen = self.seen.entry(p.primary.clone()).or_insert(Seen {
            first: p.time,
            last: p.time,
        });
        *seen = seen.include(p.time);
        self.timeline
            .entry(p.primary)
            .or_default()
            .insert((p.time, p.message_id), ev.clone());
        true
    }

    fn link(&mut self, a: &Identifier, b: &Identifier) {
        let ra = self.root[a].clone();
        let rb = self.root[b].clone();
        if ra == rb {
            return;
        }
        let (keep, gone) = if ra < rb { (ra, rb) } else { (rb, ra) };
        for r in self.root.values_mut() {
            if *r == gone {
                *r = keep.clone();
            }
        }
    }

    /// The root identifier of the profile `id` belongs to.
    pub fn root_of(&self, id: &Identifier) -> Option<&Identifier> {
        self.root.get(id)
    }

    /// The profile that `id` belongs to, if any event named it.
    pub fn profile(&self, id: &Identifier) -> Option<ProfileView> {
        let root = self.root.get(id)?;
        let mut view = ProfileView {
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            ..ProfileView::default()
        };
        for (member, r) in &self.root {
            if r != root {
                continue;
            }
            view.identifiers
                .insert(member.clone(), self.created[member]);
            for (name, t) in self.traits.get(member).into_iter().flatten() {
                merge_trait(&mut view.traits, name.clone(), t.clone());
            }
            for (name, n) in self.counts.get(member).into_iter().flatten() {
                *view.counts.entry(name.clone()).or_default() += n;
            }
            if let Some(s) = self.seen.get(member) {
                view.first_seen = view.first_seen.min(s.first);
                view.last_seen = view.last_seen.max(s.last);
            }
        }
        Some(view)
    }

    /// The profile's events in time order (then `messageId`).
    pub fn timeline(&self, id: &Identifier) -> Vec<&Event> {
        let Some(root) = self.root.get(id) else {
            return Vec::new();
        };
        let mut all: Vec<(&(i64, String), &Event)> = self
            .root
            .iter()
            .filter(|(_, r)| *r == root)
            .filter_map(|(m, _)| self.timeline.get(m))
            .flatten()
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter().map(|(_, e)| e).collect()
    }

    /// Every root identifier, one per profile.
    pub fn roots(&self) -> BTreeSet<&Identifier> {
        self.root.values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ev(
        kind: EventType,
        msg: &str,
        user: Option<&str>,
        anon: Option<&str>,
        t: i64,
    ) -> Event {
        Event {
            workspace_id: "ws".into(),
            source_id: "src".into(),
            message_id: msg.into(),
            kind,
            user_id: user.map(Into::into),
            anonymous_id: anon.map(Into::into),
            event: (kind == EventType::Track).then(|| "Clicked".into()),
            name: None,
            category: None,
            group_id: None,
            previous_id: None,
            timestamp: t,
            original_timestamp: None,
            sent_at: None,
            received_at: t,
            properties: None,
            traits: None,
            context: None,
            integrations: None,
            request_ip: None,
        }
    }

    #[test]
    fn later_event_time_wins_even_when_it_arrives_first() {
        let mut m = ProfileModel::new(i64::MAX);
        let mut late = ev(EventType::Identify, "m2", Some("u"), None, 200);
        late.traits = Some(r#"{"plan":"pro"}"#.into());
        let mut early = ev(EventType::Identify, "m1", Some("u"), None, 100);
        early.traits = Some(r#"{"plan":"free","name":"Ann"}"#.into());
        m.apply(&late);
        m.apply(&early);
        let p = m.profile(&Identifier::new(IdKind::UserId, "u")).unwrap();
        assert_eq!(p.traits["plan"].value, "pro");
        assert_eq!(p.traits["plan"].message_id, "m2");
        assert_eq!(p.traits["name"].value, "Ann");
    }

    #[test]
    fn identify_links_anonymous_and_user_and_email() {
        let mut m = ProfileModel::new(i64::MAX);
        m.apply(&ev(EventType::Track, "m1", None, Some("a1"), 10));
        let mut id = ev(EventType::Identify, "m2", Some("u1"), Some("a1"), 20);
        id.traits = Some(r#"{"email":"x@y.z"}"#.into());
        m.apply(&id);
        let by_email = m.profile(&Identifier::new(IdKind::Email, "x@y.z")).unwrap();
        assert_eq!(by_email.identifiers.len(), 3);
        assert_eq!(by_email.counts["Clicked"], 1);
        assert_eq!(by_email.counts["$identify"], 1);
        assert_eq!(by_email.first_seen, 10);
        assert_eq!(
            m.timeline(&Identifier::new(IdKind::AnonymousId, "a1"))
                .len(),
            2
        );
    }

    #[test]
    fn identify_traits_beat_context_traits_in_one_event() {
        let mut e = ev(EventType::Identify, "m1", Some("u"), None, 10);
        e.traits = Some(r#"{"plan":"from-traits"}"#.into());
        e.context = Some(r#"{"traits":{"plan":"from-context","extra":1}}"#.into());
        let p = project(&e);
        assert_eq!(
            p.traits,
            vec![
                ("extra".to_owned(), serde_json::json!(1)),
                ("plan".to_owned(), serde_json::json!("from-traits"))
            ]
        );
    }

    #[test]
    fn duplicates_count_once_within_the_window() {
        let mut m = ProfileModel::new(100);
        let e = ev(EventType::Track, "m1", Some("u"), None, 10);
        assert!(m.apply(&e));
        assert!(!m.apply(&e));
        let mut later = e.clone();
        later.received_at += 1_000;
        assert!(m.apply(&later), "outside the window it is a new event");
    }
}
