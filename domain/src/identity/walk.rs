//! [`Walk`]: how a reader finds a profile from one identifier, written once
//! for the model and every store. It is sans-IO: the caller reads the
//! evidence of the identifiers the walk asks for, feeds it back, and
//! finally gets the decided profile.

use std::collections::BTreeSet;

use std::collections::BTreeMap;

use super::{Action, Evidence, Graph, Key, Rules};
use crate::event::{IdKind, Identifier};
use crate::profile::{Fact, MAX_PROFILE_IDENTIFIERS, Named, Projection};

/// The most pieces of evidence one identifier may carry before its linked
/// component counts as too large (see [`Walk`]). A store reads one more than
/// this to tell.
pub const MAX_ID_EVIDENCE: usize = 4_096;

/// A breadth-first walk over the evidence from one identifier: every
/// identifier that shares evidence with it, directly or not, except blocked
/// ones (stores do not index evidence under a blocked identifier, and the
/// walk does not pass through one). The identifiers it reaches form the
/// **component**; the identity decisions ([`Graph::replay`]) over the
/// component's evidence say which of them are the start's profile.
///
/// A component of more than [`MAX_PROFILE_IDENTIFIERS`] identifiers, or in
/// which one identifier carries more than [`MAX_ID_EVIDENCE`] pieces of
/// evidence, is **too large**: none of it is merged, and each identifier is
/// a profile of its own. That bounds every read, and a hostile client that
/// links thousands of ids to one value only unmerges that component. The
/// rule looks only at stored evidence, so it does not depend on arrival
/// order.
#[derive(Debug)]
pub struct Walk<'r> {
    rules: &'r Rules,
    start: Identifier,
    reached: BTreeSet<Identifier>,
    pending: Vec<Identifier>,
    evidence: BTreeSet<Evidence>,
    too_large: bool,
    /// The most pieces of evidence read under one identifier.
    busiest: usize,
}

impl<'r> Walk<'r> {
    /// A walk from `start`.
    pub fn new(rules: &'r Rules, start: Identifier) -> Self {
        let pending = if rules.is_blocked(&start) {
            Vec::new()
        } else {
            vec![start.clone()]
        };
        Self {
            rules,
            reached: BTreeSet::from([start.clone()]),
            start,
            pending,
            evidence: BTreeSet::new(),
            too_large: false,
            busiest: 0,
        }
    }

    /// The identifiers whose evidence to read next; empty when the walk is
    /// done.
    pub fn wanted(&mut self) -> Vec<Identifier> {
        if self.too_large {
            return Vec::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// Feeds the evidence stored under one identifier the walk asked for:
    /// all of it, or [`MAX_ID_EVIDENCE`] + 1 pieces if there are more.
    pub fn add(&mut self, evidence: Vec<Evidence>) {
        if self.too_large {
            return;
        }
        if evidence.len() > MAX_ID_EVIDENCE {
            self.too_large = true;
            return;
        }
        self.busiest = self.busiest.max(evidence.len());
        for e in evidence {
            for id in &e.ids {
                if !self.rules.is_blocked(id) && self.reached.insert(id.clone()) {
                    self.pending.push(id.clone());
                }
            }
            self.evidence.insert(e);
        }
        if self.reached.len() > MAX_PROFILE_IDENTIFIERS {
            self.too_large = true;
        }
    }

    /// The decisions over the component, and the members of the start's
    /// profile (the start alone if the component is too large).
    pub fn finish(self) -> Resolved<'r> {
        if self.too_large {
            let mut graph = Graph::new(self.rules);
            graph.name(&self.start);
            return Resolved {
                graph,
                members: vec![self.start],
                too_large: true,
                settled: None,
            };
        }
        let latest = self.evidence.last().map(|e| e.key.clone());
        let graph = Graph::replay(self.rules, self.evidence);
        let members: Vec<Identifier> = graph
            .members(&self.start)
            .map(|m| m.cloned().collect())
            .unwrap_or_else(|| vec![self.start.clone()]);
        // The profile is its whole component when the walk reached no
        // identifier outside it (none refused, split off or in another
        // profile; blocked ones are never reached).
        let settled = (members.len() == self.reached.len()).then(|| Settled {
            latest,
            room: MAX_ID_EVIDENCE - self.busiest,
        });
        Resolved {
            graph,
            members,
            too_large: false,
            settled,
        }
    }
}

/// What lets a reader carry a resolved profile over later events without
/// walking its evidence again: set when the profile is the whole of its
/// linked component. See [`Settled::carry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The largest key of the component's evidence (`None`: it has none).
    pub latest: Option<Key>,
    /// How many more pieces of evidence its busiest identifier may gain
    /// before a walk would find the component too large.
    pub room: usize,
}

impl Settled {
    /// Whether the profile whose named members are `members` (each with
    /// what its events said of it) is resolved the same after an event with
    /// this `projection` is folded, as far as this can tell without reading
    /// the store: it says no whenever it cannot tell.
    ///
    /// Yes when every person the event names is a member already named by
    /// an event no later in canonical order (so the holder stays), and its
    /// evidence, if any, links only members and sorts after all the
    /// component's evidence: decided incrementally, such evidence finds its
    /// identifiers in one profile and changes nothing ([`Graph::decide`]).
    /// Admin instructions, and anything else, say no.
    ///
    /// Each yes to an event with evidence spends one piece of `room` (the
    /// event may add a piece under each member); with none left, it says no.
    /// Accounts ([`IdKind::GroupId`]) never join a person's profile, so
    /// naming one changes nothing here.
    ///
    /// Two things outside the log are not seen here: a change of the
    /// workspace's identity rules, and a rebuild of the store. A reader that
    /// carries profiles must drop them on either.
    pub fn carry(
        &mut self,
        members: &BTreeMap<Identifier, Named>,
        projection: &Projection,
    ) -> bool {
        let mut linked = false;
        for fact in &projection.facts {
            match fact {
                Fact::Named { id, named } => {
                    if id.kind == IdKind::GroupId {
                        continue;
                    }
                    if members.get(id).is_none_or(|m| m.first > named.first) {
                        return false;
                    }
                }
                Fact::Linked(e) => {
                    let kept = matches!(e.action, Action::Event | Action::Alias)
                        && e.ids.iter().all(|i| members.contains_key(i))
                        && self.latest.as_ref().is_some_and(|l| e.key >= *l);
                    if !kept {
                        return false;
                    }
                    linked = true;
                }
                Fact::Trait { .. }
                | Fact::Counted { .. }
                | Fact::Timeline { .. }
                | Fact::Member { .. } => {}
            }
        }
        if linked {
            if self.room == 0 {
                return false;
            }
            self.room -= 1;
        }
        true
    }
}

/// What a [`Walk`] found.
#[derive(Debug)]
pub struct Resolved<'r> {
    /// Every decision over the component, for explaining them.
    pub graph: Graph<'r>,
    /// The members of the start's profile, sorted.
    pub members: Vec<Identifier>,
    /// Whether the component was too large to merge.
    pub too_large: bool,
    /// Set when the start's profile is the whole of its component, so that
    /// a reader may carry it over later events ([`Settled::carry`]).
    pub settled: Option<Settled>,
}
