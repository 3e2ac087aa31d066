//! [`Walk`]: how a reader finds a profile from one identifier, written once
//! for the model and every store. It is sans-IO: the caller reads the
//! evidence of the identifiers the walk asks for, feeds it back, and
//! finally gets the decided profile.

use std::collections::BTreeSet;

use super::{Evidence, Graph, Rules};
use crate::event::Identifier;
use crate::profile::MAX_PROFILE_IDENTIFIERS;

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
            };
        }
        let graph = Graph::replay(self.rules, self.evidence);
        let members = graph
            .members(&self.start)
            .map(|m| m.cloned().collect())
            .unwrap_or_else(|| vec![self.start.clone()]);
        Resolved {
            graph,
            members,
            too_large: false,
        }
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
}
