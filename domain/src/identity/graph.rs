//! [`Graph`]: identity decisions taken one piece of evidence at a time, in
//! canonical order, and the record of why ([`Decision`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use super::{Action, Evidence, Key, Limit, Rules};
use crate::event::Identifier;
use crate::profile::MAX_PROFILE_IDENTIFIERS;

/// The rule that refused a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// The merged profile would hold more identifiers of `kind` than the
    /// limit allows.
    Limit {
        /// The identifier kind.
        kind: String,
        /// Its limit.
        limit: Limit,
    },
    /// The identifier's value is blocked.
    Blocked,
    /// An admin split these identifiers apart.
    Split,
    /// The merged profile would exceed [`MAX_PROFILE_IDENTIFIERS`].
    TooLarge,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Limit { kind, limit } => write!(f, "limit {kind} {limit}"),
            Rule::Blocked => f.write_str("blocked value"),
            Rule::Split => f.write_str("split by an admin"),
            Rule::TooLarge => write!(
                f,
                "a profile holds at most {MAX_PROFILE_IDENTIFIERS} identifiers"
            ),
        }
    }
}

/// What one piece of evidence decided about one identifier set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// These identifiers' profiles became one.
    Linked(Vec<Identifier>),
    /// The identifier was demoted: not linked, by this rule.
    Refused(Identifier, Rule),
    /// An admin detached the identifier from its profile.
    Detached(Identifier),
}

/// A decision, with the evidence it was taken on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The evidence's key.
    pub key: Key,
    /// What the evidence said.
    pub action: Action,
    /// Every identifier the evidence named, blocked ones included (for a
    /// split: the identifier and the members it left).
    pub evidence: Vec<Identifier>,
    /// What was decided.
    pub outcome: Outcome,
}

/// One profile: its members, each with the `receivedAt` at which it joined
/// a profile of more than one (`None` while it stands alone).
#[derive(Debug, Clone, Default)]
struct Members(BTreeMap<Identifier, Option<i64>>);

/// The identity decisions over some evidence: which identifiers form each
/// profile, and why. Feed it evidence in canonical order with
/// [`Graph::decide`], or all at once with [`Graph::replay`]; both give the
/// same result for the same evidence, whatever order it came in.
#[derive(Debug, Clone)]
pub struct Graph<'r> {
    rules: &'r Rules,
    /// Profiles by slot; merged-away slots are left empty.
    profiles: Vec<Members>,
    profile_of: HashMap<Identifier, usize>,
    /// Pairs an admin split apart, both ways round.
    separated: HashMap<Identifier, BTreeSet<Identifier>>,
    decisions: Vec<Decision>,
    last: Option<Key>,
}

impl<'r> Graph<'r> {
    /// A graph with no evidence.
    pub fn new(rules: &'r Rules) -> Self {
        Self {
            rules,
            profiles: Vec::new(),
            profile_of: HashMap::new(),
            separated: HashMap::new(),
            decisions: Vec::new(),
            last: None,
        }
    }

    /// Decides all of `evidence` in canonical order. Duplicates count once.
    pub fn replay(rules: &'r Rules, evidence: impl IntoIterator<Item = Evidence>) -> Self {
        let sorted: BTreeSet<Evidence> = evidence.into_iter().collect();
        let mut graph = Self::new(rules);
        for e in sorted {
            graph.decide(&e);
        }
        graph
    }

    /// The key of the last evidence decided: evidence that sorts after it
    /// may be decided incrementally; evidence before it needs a replay.
    pub fn last(&self) -> Option<&Key> {
        self.last.as_ref()
    }

    /// Makes `id` known, as a profile of its own if it is new.
    pub fn name(&mut self, id: &Identifier) {
        if !self.profile_of.contains_key(id) {
            self.profile_of.insert(id.clone(), self.profiles.len());
            self.profiles
                .push(Members(BTreeMap::from([(id.clone(), None)])));
        }
    }

    /// Decides one piece of evidence. The caller keeps canonical order:
    /// `e.key` sorts after every key decided before (or equals the last, for
    /// a duplicate, which changes nothing).
    pub fn decide(&mut self, e: &Evidence) {
        debug_assert!(self.last.as_ref().is_none_or(|l| *l <= e.key));
        self.last = Some(e.key.clone());
        for id in &e.ids {
            self.name(id);
        }
        let decided = |outcome| Decision {
            key: e.key.clone(),
            action: e.action,
            evidence: e.ids.iter().cloned().collect(),
            outcome,
        };
        if e.action == Action::Split {
            for id in &e.ids {
                // The decision names the members the identifier left too,
                // so that their profile's explanation shows the split.
                let left: Vec<Identifier> = self.profiles[self.profile_of[id]]
                    .0
                    .keys()
                    .cloned()
                    .collect();
                if self.detach(id) {
                    let mut d = decided(Outcome::Detached(id.clone()));
                    d.evidence = left;
                    self.decisions.push(d);
                }
            }
            return;
        }
        let mut ids: Vec<Identifier> = Vec::with_capacity(e.ids.len());
        for id in &e.ids {
            if self.rules.is_blocked(id) {
                if e.ids.len() > 1 {
                    self.decisions
                        .push(decided(Outcome::Refused(id.clone(), Rule::Blocked)));
                }
            } else {
                ids.push(id.clone());
            }
        }
        // Most important first, so demotion pops from the end.
        ids.sort_by(|a, b| self.rules.demote_order(b, a));
        loop {
            let parts: BTreeSet<usize> = ids.iter().map(|i| self.profile_of[i]).collect();
            if parts.len() < 2 {
                return;
            }
            match self.violation(&parts, e.key.received_at, e.action) {
                None => {
                    self.merge(&parts, e.key.received_at);
                    self.decisions.push(decided(Outcome::Linked(ids)));
                    return;
                }
                Some(rule) => {
                    let demoted = ids.pop().expect("two parts need two identifiers");
                    self.decisions
                        .push(decided(Outcome::Refused(demoted, rule)));
                }
            }
        }
    }

    /// The first rule that merging `parts` at `now` would break.
    fn violation(&self, parts: &BTreeSet<usize>, now: i64, action: Action) -> Option<Rule> {
        let size: usize = parts.iter().map(|p| self.profiles[*p].0.len()).sum();
        if size > MAX_PROFILE_IDENTIFIERS {
            return Some(Rule::TooLarge);
        }
        if action != Action::Merge {
            for p in parts {
                for m in self.profiles[*p].0.keys() {
                    let split = self.separated.get(m).into_iter().flatten().any(|s| {
                        let q = self.profile_of[s];
                        q != *p && parts.contains(&q)
                    });
                    if split {
                        return Some(Rule::Split);
                    }
                }
            }
        }
        if action != Action::Event {
            return None;
        }
        // Per kind: how many count against the limit in each part, and in
        // all of them together. A merge breaks a limit only if it raises the
        // count past it: a profile already over (by an admin merge, or rules
        // made stricter) may still gain identifiers of other kinds.
        let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for p in parts {
            let mut mine: BTreeMap<&str, usize> = BTreeMap::new();
            for (m, joined) in &self.profiles[*p].0 {
                let limit = self.rules.limit(&m.kind);
                let counts_now = match (limit.window, joined) {
                    (None, _) | (_, None) => true,
                    (Some(w), Some(at)) => *at > now - w.micros(),
                };
                if counts_now {
                    *mine.entry(m.kind.as_str()).or_default() += 1;
                }
            }
            for (kind, n) in mine {
                let c = counts.entry(kind).or_default();
                c.0 += n;
                c.1 = c.1.max(n);
            }
        }
        for (kind, (total, most)) in counts {
            let limit = self.rules.limit(&crate::event::IdKind::parse(kind));
            if total > limit.max as usize && total > most {
                return Some(Rule::Limit {
                    kind: kind.to_owned(),
                    limit,
                });
            }
        }
        None
    }

    /// Makes `parts` one profile; every member that stood alone joins at
    /// `now`.
    fn merge(&mut self, parts: &BTreeSet<usize>, now: i64) {
        // Into the largest slot, so that an identifier moves few times.
        let into = *parts
            .iter()
            .max_by_key(|p| (self.profiles[**p].0.len(), std::cmp::Reverse(**p)))
            .expect("parts");
        for p in parts {
            if *p == into {
                continue;
            }
            let moved = std::mem::take(&mut self.profiles[*p].0);
            for (m, joined) in moved {
                self.profile_of.insert(m.clone(), into);
                self.profiles[into].0.insert(m, joined);
            }
        }
        for joined in self.profiles[into].0.values_mut() {
            joined.get_or_insert(now);
        }
    }

    /// Detaches `id` from its profile; false if it stands alone.
    fn detach(&mut self, id: &Identifier) -> bool {
        let p = self.profile_of[id];
        if self.profiles[p].0.len() < 2 {
            return false;
        }
        self.profiles[p].0.remove(id);
        let others: Vec<Identifier> = self.profiles[p].0.keys().cloned().collect();
        for o in &others {
            self.separated
                .entry(o.clone())
                .or_default()
                .insert(id.clone());
        }
        self.separated.entry(id.clone()).or_default().extend(others);
        self.profile_of.insert(id.clone(), self.profiles.len());
        self.profiles
            .push(Members(BTreeMap::from([(id.clone(), None)])));
        true
    }

    /// The members of `id`'s profile, if `id` is known.
    pub fn members(&self, id: &Identifier) -> Option<impl Iterator<Item = &Identifier>> {
        let p = *self.profile_of.get(id)?;
        Some(self.profiles[p].0.keys())
    }

    /// Every profile of more than one identifier, as its members.
    pub fn profiles(&self) -> impl Iterator<Item = Vec<&Identifier>> {
        self.profiles
            .iter()
            .filter(|m| m.0.len() > 1)
            .map(|m| m.0.keys().collect())
    }

    /// Whether `a` and `b` are one profile.
    pub fn same(&self, a: &Identifier, b: &Identifier) -> bool {
        match (self.profile_of.get(a), self.profile_of.get(b)) {
            (Some(p), Some(q)) => p == q,
            _ => false,
        }
    }

    /// Every decision taken, in canonical order.
    pub fn decisions(&self) -> &[Decision] {
        &self.decisions
    }

    /// The decisions that concern any of `members`: links that joined them,
    /// links refused to or from them, and splits, in canonical order.
    pub fn decisions_about<'a>(
        &'a self,
        members: &'a BTreeSet<Identifier>,
    ) -> impl Iterator<Item = &'a Decision> {
        self.decisions
            .iter()
            .filter(|d| d.evidence.iter().any(|i| members.contains(i)))
    }

    /// The accepted links that join `from` to `to` (see [`path`]).
    pub fn path(&self, from: &Identifier, to: &Identifier) -> Option<Vec<&Decision>> {
        if !self.same(from, to) {
            return None;
        }
        let members: BTreeSet<Identifier> = self.members(from)?.cloned().collect();
        path(&self.decisions, &members, from, to)
    }
}

/// The accepted links among `members` that join `from` to `to`, fewest
/// first, in order along the path: the answer to "why is this identifier
/// part of this profile". `None` if no such path exists, as when a split
/// detached the identifier that bridged two members (they stay one
/// profile; the link that joined them is gone from the members).
pub fn path<'d>(
    decisions: &'d [Decision],
    members: &BTreeSet<Identifier>,
    from: &Identifier,
    to: &Identifier,
) -> Option<Vec<&'d Decision>> {
    if !members.contains(from) || !members.contains(to) {
        return None;
    }
    if from == to {
        return Some(Vec::new());
    }
    let mut adjacent: BTreeMap<&Identifier, Vec<(&Identifier, &Decision)>> = BTreeMap::new();
    for d in decisions {
        if let Outcome::Linked(ids) = &d.outcome {
            let inside: Vec<&Identifier> = ids.iter().filter(|i| members.contains(*i)).collect();
            for a in &inside {
                for b in &inside {
                    if a != b {
                        adjacent.entry(a).or_default().push((b, d));
                    }
                }
            }
        }
    }
    let mut came: BTreeMap<&Identifier, (&Identifier, &Decision)> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(at) = queue.pop_front() {
        if at == to {
            let mut found = Vec::new();
            let mut cur = to;
            while cur != from {
                let (prev, d) = came[cur];
                found.push(d);
                cur = prev;
            }
            found.reverse();
            return Some(found);
        }
        for (next, d) in adjacent.get(at).into_iter().flatten() {
            if *next != from && !came.contains_key(next) {
                came.insert(next, (at, d));
                queue.push_back(next);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
