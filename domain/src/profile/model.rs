//! [`ProfileModel`]: the fold in memory, the executable specification every
//! store is tested against, and [`ProfileView`], a profile as read.

use std::collections::{BTreeMap, BTreeSet};

use super::{Fact, FoldError, Named, Seen, TraitValue, is_duplicate, merge_trait, project};
use crate::event::{Event, Identifier};
use crate::identity::{Decision, Evidence, MAX_ID_EVIDENCE, Resolved, Rules, Walk, holder};

/// A profile as the query API shows it: the union of its identifiers' data.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileView {
    /// The member that names the profile ([`crate::identity::holder`]).
    pub holder: Identifier,
    /// The members, with what their events said of each.
    pub identifiers: BTreeMap<Identifier, Named>,
    /// The winning value of each trait.
    pub traits: BTreeMap<String, TraitValue>,
    /// Event counts by [`counter_name`](super::counter_name).
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

/// An in-memory fold of a workspace's events: the executable specification
/// that every store must agree with.
#[derive(Debug, Clone, Default)]
pub struct ProfileModel {
    window_micros: i64,
    rules: Rules,
    named: BTreeMap<Identifier, Named>,
    /// Evidence by each identifier it is kept under, then by slot.
    evidence: BTreeMap<Identifier, BTreeMap<Vec<u8>, Evidence>>,
    traits: BTreeMap<Identifier, BTreeMap<String, TraitValue>>,
    counts: BTreeMap<Identifier, BTreeMap<String, u64>>,
    seen: BTreeMap<Identifier, Seen>,
    timeline: BTreeMap<Identifier, BTreeMap<(i64, String), Event>>,
    /// Memberships by account, then member.
    members: BTreeMap<Identifier, BTreeMap<Identifier, Named>>,
    dedup: BTreeMap<String, i64>,
}

impl ProfileModel {
    /// An empty model with a de-duplication window in microseconds and the
    /// default identity rules.
    pub fn new(window_micros: i64) -> Self {
        Self::with_rules(window_micros, Rules::default())
    }

    /// An empty model with a de-duplication window and identity rules.
    pub fn with_rules(window_micros: i64, rules: Rules) -> Self {
        Self {
            window_micros,
            rules,
            ..Self::default()
        }
    }

    /// The identity rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
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
        for fact in p.facts {
            match fact {
                Fact::Named { id, named } => match self.named.get_mut(&id) {
                    Some(n) => n.include(&named),
                    None => {
                        self.named.insert(id, named);
                    }
                },
                Fact::Linked(evidence) => {
                    let slot = evidence.slot(&self.rules);
                    for id in &evidence.ids {
                        if self.rules.is_blocked(id) {
                            continue;
                        }
                        let kept = self.evidence.entry(id.clone()).or_default();
                        match kept.get(&slot) {
                            Some(e) if e.key <= evidence.key => {}
                            _ => {
                                kept.insert(slot.clone(), evidence.clone());
                            }
                        }
                    }
                }
                Fact::Trait { id, name, value } => {
                    merge_trait(self.traits.entry(id).or_default(), name, value);
                }
                Fact::Counted { id, counter, time } => {
                    *self
                        .counts
                        .entry(id.clone())
                        .or_default()
                        .entry(counter)
                        .or_default() += 1;
                    let seen = self.seen.entry(id).or_insert(Seen {
                        first: time,
                        last: time,
                    });
                    *seen = seen.include(time);
                }
                Fact::Timeline {
                    id,
                    time,
                    message_id,
                    counter: _,
                } => {
                    self.timeline
                        .entry(id)
                        .or_default()
                        .insert((time, message_id), ev.clone());
                }
                Fact::Member {
                    account,
                    member,
                    named,
                } => match self.members.entry(account).or_default().entry(member) {
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        o.get_mut().include(&named);
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(named);
                    }
                },
            }
        }
        Ok(true)
    }

    /// The members of an account (a [`crate::IdKind::GroupId`] identifier):
    /// the identifiers that named it, each with what their events said of
    /// the membership.
    pub fn account_members(&self, account: &Identifier) -> BTreeMap<Identifier, Named> {
        self.members.get(account).cloned().unwrap_or_default()
    }

    /// The accounts `member` named, with what its events said of each.
    pub fn member_accounts(&self, member: &Identifier) -> BTreeMap<Identifier, Named> {
        self.members
            .iter()
            .filter_map(|(account, m)| Some((account.clone(), m.get(member)?.clone())))
            .collect()
    }

    /// Every account any event named.
    pub fn accounts(&self) -> impl Iterator<Item = &Identifier> {
        self.members.keys()
    }

    /// The walk from `id` over the evidence, finished.
    pub fn resolve(&self, id: &Identifier) -> Option<Resolved<'_>> {
        self.named.get(id)?;
        let mut walk = Walk::new(&self.rules, id.clone());
        loop {
            let next = walk.wanted();
            if next.is_empty() {
                break;
            }
            for i in next {
                let kept = self.evidence.get(&i).into_iter().flat_map(|m| m.values());
                walk.add(kept.take(MAX_ID_EVIDENCE + 1).cloned().collect());
            }
        }
        Some(walk.finish())
    }

    /// The identifiers of the profile `id` belongs to, sorted, if any event
    /// named it: those an event named (an admin's instruction alone does not
    /// show an identifier).
    pub fn members(&self, id: &Identifier) -> Option<Vec<Identifier>> {
        let mut members = self.resolve(id)?.members;
        members.retain(|m| self.named.contains_key(m));
        Some(members)
    }

    /// The identity decisions that concern the members of `id`'s profile,
    /// in canonical order (what a store's `ProfileRef` carries).
    pub fn decisions(&self, id: &Identifier) -> Option<Vec<Decision>> {
        let resolved = self.resolve(id)?;
        let members: BTreeSet<Identifier> = resolved.members.iter().cloned().collect();
        Some(resolved.graph.decisions_about(&members).cloned().collect())
    }

    /// The holder of the profile `id` belongs to.
    pub fn holder_of(&self, id: &Identifier) -> Option<Identifier> {
        let members = self.members(id)?;
        holder(members.iter().map(|m| (m, &self.named[m].first))).cloned()
    }

    /// The profile that `id` belongs to, if any event named it.
    pub fn profile(&self, id: &Identifier) -> Option<ProfileView> {
        let members = self.members(id)?;
        let mut view = ProfileView {
            holder: holder(members.iter().map(|m| (m, &self.named[m].first)))?.clone(),
            identifiers: BTreeMap::new(),
            traits: BTreeMap::new(),
            counts: BTreeMap::new(),
            first_seen: i64::MAX,
            last_seen: i64::MIN,
        };
        for member in &members {
            view.identifiers
                .insert(member.clone(), self.named[member].clone());
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
            .iter()
            .filter_map(|m| self.timeline.get(m))
            .flatten()
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter().map(|(_, e)| e).collect()
    }

    /// Every identifier any event named, accounts' included.
    pub fn identifiers(&self) -> impl Iterator<Item = &Identifier> {
        self.named.keys()
    }

    /// The people's profiles, each as its sorted members, one per profile
    /// (accounts are not people's profiles).
    pub fn profiles(&self) -> BTreeSet<Vec<Identifier>> {
        self.named
            .keys()
            .filter(|id| id.kind != crate::IdKind::GroupId)
            .filter_map(|id| self.members(id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, IdKind};
    use crate::profile::project;

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
            blocked_ids: Vec::new(),
            control: None,
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

    fn traits_of(p: &crate::profile::Projection) -> Vec<(String, serde_json::Value)> {
        p.facts
            .iter()
            .filter_map(|f| match f {
                Fact::Trait { name, value, .. } => Some((name.clone(), value.value.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_email_in_another_case_is_the_same_person() {
        let mut m = ProfileModel::new(i64::MAX);
        let mut a = ev(EventType::Identify, "m1", None, Some("a1"), 10);
        a.traits = Some(r#"{"email":"Ann@Example.com"}"#.into());
        let mut b = ev(EventType::Identify, "m2", None, Some("a2"), 20);
        b.traits = Some(r#"{"email":" ann@example.COM "}"#.into());
        m.apply(&a).unwrap();
        m.apply(&b).unwrap();
        let p = m
            .profile(&Identifier::parse("email:ANN@example.com").unwrap())
            .unwrap();
        let ids: Vec<String> = p.identifiers.keys().map(ToString::to_string).collect();
        assert_eq!(
            ids,
            [
                "anonymous_id:a1",
                "anonymous_id:a2",
                "email:ann@example.com"
            ]
        );
        // The trait keeps what the client sent.
        assert_eq!(p.traits["email"].value, " ann@example.COM ");
    }

    #[test]
    fn identify_traits_beat_context_traits_in_one_event() {
        let mut e = ev(EventType::Identify, "m1", Some("u"), None, 10);
        e.traits = Some(r#"{"plan":"from-traits"}"#.into());
        e.context = Some(r#"{"traits":{"plan":"from-context","extra":1}}"#.into());
        let p = project(&e).unwrap();
        assert_eq!(
            traits_of(&p),
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
        assert_eq!(
            traits_of(&p),
            vec![("plan".to_owned(), serde_json::json!("c"))]
        );
        assert!(
            p.identifiers()
                .any(|i| *i == Identifier::new(IdKind::External("t".into()), "x"))
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
    fn accounts_keep_group_traits_and_members_apart_from_people() {
        let mut m = ProfileModel::new(i64::MAX);
        let acme = Identifier::new(IdKind::GroupId, "acme");
        let mut g1 = ev(EventType::Group, "m1", Some("u1"), None, 10);
        g1.group_id = Some("acme".into());
        g1.traits = Some(r#"{"name":"Acme","email":"billing@acme.test"}"#.into());
        let mut g2 = ev(EventType::Group, "m2", Some("u2"), None, 20);
        g2.group_id = Some("acme".into());
        g2.traits = Some(r#"{"plan":"enterprise"}"#.into());
        let mut t = ev(EventType::Track, "m3", None, Some("a3"), 30);
        t.context = Some(
            r#"{"groupId":"acme","externalIds":[{"type":"group_id","id":"beta","collection":"accounts"},{"type":"sfdc","id":"x","collection":"accounts"}]}"#
                .into(),
        );
        let mut blocked = ev(EventType::Group, "m4", Some("u1"), None, 40);
        blocked.group_id = Some("null".into());
        blocked.traits = Some(r#"{"name":"nobody"}"#.into());
        for e in [&g1, &g2, &t, &blocked] {
            m.apply(e).unwrap();
        }
        // Two members of one account stay two people.
        let u1 = Identifier::new(IdKind::UserId, "u1");
        assert_eq!(m.members(&u1).unwrap(), vec![u1.clone()]);
        // The group's traits are the account's, not the person's (and its
        // email links no one).
        assert!(m.profile(&u1).unwrap().traits.is_empty());
        let account = m.profile(&acme).unwrap();
        assert_eq!(account.traits["name"].value, "Acme");
        assert_eq!(account.traits["plan"].value, "enterprise");
        assert!(account.counts.is_empty(), "accounts keep no counts");
        let events: Vec<&str> = m
            .timeline(&acme)
            .iter()
            .map(|e| e.message_id.as_str())
            .collect();
        assert_eq!(events, ["m1", "m2", "m3"]);
        let members: Vec<String> = m
            .account_members(&acme)
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(members, ["anonymous_id:a3", "user_id:u1", "user_id:u2"]);
        let of_a3: Vec<String> = m
            .member_accounts(&Identifier::new(IdKind::AnonymousId, "a3"))
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(of_a3, ["group_id:acme", "group_id:beta"]);
        // A blocked groupId names no account; `sfdc` of the accounts
        // collection is not a person's identifier.
        assert!(
            m.profile(&Identifier::new(IdKind::GroupId, "null"))
                .is_none()
        );
        assert!(m.profile(&Identifier::parse("sfdc:x").unwrap()).is_none());
        assert_eq!(m.member_accounts(&u1).len(), 1);
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
