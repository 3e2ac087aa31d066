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
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::{Event, EventType, IdKind, Identifier, MAX_EXTERNAL_IDS};
use crate::json::last_wins;

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

/// The most identifiers one profile links. A connected component of linked
/// identifiers larger than this (a shared device, a hard-coded `userId:
/// "null"`, or a hostile client linking thousands of ids) is not merged at
/// all: each of its identifiers stands alone, as if never linked. The rule
/// looks only at the component, which is the same whatever order its links
/// arrived in, and a store can decide it by walking at most this many
/// identifiers.
pub const MAX_PROFILE_IDENTIFIERS: usize = 1_000;

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

/// Why an event cannot be folded: a field the fold reads cannot be read.
/// Ingest refuses such events, so one reaches the fold only from a log
/// written by an older build or by hand; the projector sets it aside as a
/// dead letter rather than fold part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FoldError {
    /// The field at fault, in the request's spelling (`context.externalIds[2].type`).
    pub field: String,
    /// Why, lowercase.
    pub message: String,
}

impl FoldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The parts of `context` that the fold reads, as raw JSON; a repeated key
/// keeps its last value, as everywhere else.
#[derive(Debug, Default)]
pub(crate) struct ContextView<'a> {
    traits: Option<&'a RawValue>,
    external_ids: Option<&'a RawValue>,
}

last_wins!(ContextView {
    "traits" => traits,
    "externalIds" => external_ids,
});

/// One entry of `context.externalIds`.
#[derive(Debug, Default)]
struct ExternalIdView<'a> {
    id: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
}

last_wins!(ExternalIdView {
    "id" => id,
    "type" => kind,
});

impl<'a> ContextView<'a> {
    /// Reads the `context` object's text.
    pub(crate) fn read(text: &'a str) -> Result<Self, FoldError> {
        serde_json::from_str(text).map_err(|e| FoldError::new("context", format!("{e}")))
    }

    /// `context.traits`, when it is an object (anything else is not traits).
    fn traits(&self) -> Result<Option<Map<String, Value>>, FoldError> {
        match self.traits {
            Some(t) if t.get().starts_with('{') => serde_json::from_str(t.get())
                .map(Some)
                .map_err(|e| FoldError::new("context.traits", format!("{e}"))),
            _ => Ok(None),
        }
    }

    /// The identifiers of `context.externalIds`: a list of at most
    /// [`MAX_EXTERNAL_IDS`] objects, each with a valid `type` (see
    /// [`IdKind::check`]) and an `id` string or number.
    pub(crate) fn external_ids(&self) -> Result<Vec<Identifier>, FoldError> {
        const FIELD: &str = "context.externalIds";
        let Some(raw) = self.external_ids.filter(|r| r.get() != "null") else {
            return Ok(Vec::new());
        };
        let items: Vec<&RawValue> = serde_json::from_str(raw.get())
            .map_err(|_| FoldError::new(FIELD, "must be a list of {id, type} objects"))?;
        if items.len() > MAX_EXTERNAL_IDS {
            return Err(FoldError::new(
                FIELD,
                format!(
                    "holds {} ids, more than the limit of {MAX_EXTERNAL_IDS}",
                    items.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let at = |part: &str| format!("{FIELD}[{i}]{part}");
            let x: ExternalIdView<'_> = serde_json::from_str(item.get())
                .map_err(|_| FoldError::new(at(""), "must be an {id, type} object"))?;
            let kind = match x
                .kind
                .map(|k| serde_json::from_str::<std::borrow::Cow<'_, str>>(k.get()))
            {
                Some(Ok(k)) => k,
                _ => return Err(FoldError::new(at(".type"), "must be a string")),
            };
            IdKind::check(&kind).map_err(|m| FoldError::new(at(".type"), m))?;
            let id = match x.id.map(|v| serde_json::from_str::<Value>(v.get())) {
                Some(Ok(Value::String(s))) => s,
                Some(Ok(Value::Number(n))) => n.to_string(),
                _ => {
                    return Err(FoldError::new(at(".id"), "must be a string or a number"));
                }
            };
            Identifier::check_value(&id).map_err(|m| FoldError::new(at(".id"), m))?;
            out.push(Identifier::new(IdKind::parse(&kind), id));
        }
        Ok(out)
    }
}

/// An email that links a profile: a trimmed string that is a valid
/// identifier value. A longer one stays a trait but links nothing.
fn email_of(traits: &Map<String, Value>) -> Option<&str> {
    traits
        .get("email")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|e| Identifier::check_value(e).is_ok())
}

/// Computes the [`Projection`] of one event. Pure. Fails only for an event
/// ingest would have refused (see [`FoldError`]).
pub fn project(ev: &Event) -> Result<Projection, FoldError> {
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
    Ok(Projection {
        primary,
        identifiers: ids.into_iter().collect(),
        traits: traits.into_iter().collect(),
        counter: counter_name(ev),
        time: ev.timestamp,
        message_id: ev.message_id.clone(),
    })
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

    /// Folds one event. Returns false when it was dropped as a duplicate,
    /// and an error, changing nothing, when it cannot be folded.
    pub fn apply(&mut self, ev: &Event) -> Result<bool, FoldError> {
        let prev = self.dedup.get(&ev.message_id).copied();
        if is_duplicate(prev, ev.received_at, self.window_micros) {
            return Ok(false);
        }
        let p = project(ev)?;
        self.dedup.insert(ev.message_id.clone(), ev.received_at);
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
        Ok(true)
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

    /// The identifiers of the profile `id` belongs to (see
    /// [`MAX_PROFILE_IDENTIFIERS`]), if any event named it.
    pub fn members(&self, id: &Identifier) -> Option<Vec<&Identifier>> {
        let root = self.root.get(id)?;
        let members: Vec<&Identifier> = self
            .root
            .iter()
            .filter(|(_, r)| *r == root)
            .map(|(m, _)| m)
            .collect();
        if members.len() > MAX_PROFILE_IDENTIFIERS {
            let (own, _) = self.root.get_key_value(id)?;
            return Some(vec![own]);
        }
        Some(members)
    }

    /// The root identifier of the profile `id` belongs to: its smallest.
    pub fn root_of(&self, id: &Identifier) -> Option<&Identifier> {
        self.members(id)?.into_iter().min()
    }

    /// The profile that `id` belongs to, if any event named it.
    pub fn profile(&self, id: &Identifier) -> Option<ProfileView> {
        let members = self.members(id)?;
        let mut view = ProfileView {
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            ..ProfileView::default()
        };
        for member in members {
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
        if view.first_seen == i64::MAX {
            // Identifiers named only as links of others' events: no events,
            // shown as the stores show them.
            view.first_seen = 0;
            view.last_seen = 0;
        }
        Some(view)
    }

    /// The profile's events in time order (then `messageId`).
    pub fn timeline(&self, id: &Identifier) -> Vec<&Event> {
        let Some(members) = self.members(id) else {
            return Vec::new();
        };
        let mut all: Vec<(&(i64, String), &Event)> = members
            .into_iter()
            .filter_map(|m| self.timeline.get(m))
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
        m.apply(&late).unwrap();
        m.apply(&early).unwrap();
        let p = m.profile(&Identifier::new(IdKind::UserId, "u")).unwrap();
        assert_eq!(p.traits["plan"].value, "pro");
        assert_eq!(p.traits["plan"].message_id, "m2");
        assert_eq!(p.traits["name"].value, "Ann");
    }

    #[test]
    fn identify_links_anonymous_and_user_and_email() {
        let mut m = ProfileModel::new(i64::MAX);
        m.apply(&ev(EventType::Track, "m1", None, Some("a1"), 10))
            .unwrap();
        let mut id = ev(EventType::Identify, "m2", Some("u1"), Some("a1"), 20);
        id.traits = Some(r#"{"email":"x@y.z"}"#.into());
        m.apply(&id).unwrap();
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
        let p = project(&e).unwrap();
        assert_eq!(
            p.traits,
            vec![
                ("extra".to_owned(), serde_json::json!(1)),
                ("plan".to_owned(), serde_json::json!("from-traits"))
            ]
        );
    }

    #[test]
    fn repeated_context_keys_keep_the_last_value() {
        let mut e = ev(EventType::Track, "m1", Some("u"), None, 10);
        e.context = Some(
            r#"{"traits":{"plan":"a"},"externalIds":[],"traits":{"plan":"b","plan":"c"},"externalIds":[{"type":"t","id":"x"}]}"#.into(),
        );
        let p = project(&e).unwrap();
        assert_eq!(p.traits, vec![("plan".to_owned(), serde_json::json!("c"))]);
        assert!(
            p.identifiers
                .contains(&Identifier::new(IdKind::External("t".into()), "x"))
        );
    }

    #[test]
    fn unreadable_fields_fail_the_fold_naming_them() {
        let mut e = ev(EventType::Identify, "m1", Some("u"), None, 10);
        e.traits = Some(format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200)));
        assert_eq!(project(&e).unwrap_err().field, "traits");
        let mut m = ProfileModel::new(i64::MAX);
        assert!(m.apply(&e).is_err());
        assert!(m.profile(&Identifier::new(IdKind::UserId, "u")).is_none());
        e.traits = None;
        e.context = Some(r#"{"externalIds":[{"type":"user_id\u0000alice","id":"X"}]}"#.into());
        assert_eq!(
            project(&e).unwrap_err().field,
            "context.externalIds[0].type"
        );
    }

    #[test]
    fn duplicates_count_once_within_the_window() {
        let mut m = ProfileModel::new(100);
        let e = ev(EventType::Track, "m1", Some("u"), None, 10);
        assert!(m.apply(&e).unwrap());
        assert!(!m.apply(&e).unwrap());
        let mut later = e.clone();
        later.received_at += 1_000;
        assert!(
            m.apply(&later).unwrap(),
            "outside the window it is a new event"
        );
    }
}
