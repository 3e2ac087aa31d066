//! Identity resolution: which identifiers are one person, decided by a
//! workspace's merge protection [`Rules`] as a pure function of the
//! evidence.
//!
//! # Evidence, and the canonical order
//! Every event that carries several identifiers is [`Evidence`] that they are
//! one person: its `userId` with its `anonymousId`, its email, its external
//! ids. So are an `alias` (the client says so explicitly) and an admin's
//! forced merge; an admin's split is evidence that they are not. Evidence is
//! decided one piece at a time in the **canonical order** of its [`Key`],
//! `(receivedAt, messageId)`, never in arrival order:
//!
//! - `receivedAt` is stamped by ingest and stored in the log, so a rebuild
//!   reproduces every decision;
//! - a historical `/v1/import` carries old event times but a new
//!   `receivedAt`, so it cannot reach back and rewrite old decisions;
//! - a store decides new evidence incrementally when it sorts after all the
//!   evidence it has, and replays the linked component otherwise. Evidence
//!   that arrives out of canonical order does so only because partitions
//!   are consumed at different speeds, so **a late event can flip a decision
//!   only within projector lag** (and during a rebuild, before it finishes).
//!
//! # The decision (Segment's algorithm)
//! For each piece of evidence, in canonical order:
//!
//! 1. Blocked values ([`Rules::is_blocked`]) are dropped: they never link.
//! 2. The profiles its identifiers belong to are the candidates to merge.
//!    If they are one profile, nothing changes.
//! 3. The merge is checked: the merged profile may not hold more identifiers
//!    of a kind than its [`Limit`] allows (counting, for a windowed limit,
//!    those that joined within the window), may not rejoin identifiers an
//!    admin split apart, and may not exceed
//!    [`crate::profile::MAX_PROFILE_IDENTIFIERS`].
//! 4. If a check fails, the identifier of the evidence with the lowest
//!    priority ([`Rules::demote_order`]) is **demoted**: refused, with the
//!    rule that refused it, and matching is tried again without it.
//!
//! `alias` is exempt from limits, since the client states the link outright
//! (and its `previousId` is linked under both readings, `user_id` and
//! `anonymous_id`, see [`crate::profile::project`]); an admin merge is
//! exempt from limits and splits. Nothing is exempt from blocked values or
//! the profile size cap.
//!
//! # Profile ids
//! A profile's id is [`profile_id`] of its **holder**: the member named
//! first in canonical order ([`holder`]). Merging keeps the id of the side
//! with the earliest evidence, every identifier keeps resolving to its
//! profile, and so does every id a profile ever had (it is the id of one of
//! its members). Segments, webhooks and deletion key on it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::event::Identifier;

mod graph;
pub mod rules;
mod walk;

pub use graph::{Decision, Graph, Outcome, Rule, path};
pub use rules::{Limit, RuleError, RuleSettings, Rules, Window};
pub use walk::{MAX_ID_EVIDENCE, Resolved, Settled, Walk};

/// The canonical order of identity evidence: when ingest received the event,
/// then its `messageId`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    /// `receivedAt`, microseconds since the epoch.
    pub received_at: i64,
    /// The event's `messageId` (or the control record's).
    pub message_id: String,
}

/// What a piece of evidence says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// An event carried the identifiers together.
    Event,
    /// An `alias` call: exempt from limits.
    Alias,
    /// An admin's forced merge: exempt from limits and splits.
    Merge,
    /// An admin's split: each identifier leaves its profile, and is never
    /// again merged with the members it left, except by an admin merge.
    Split,
}

impl Action {
    /// The name the explain API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Event => "event",
            Action::Alias => "alias",
            Action::Merge => "admin_merge",
            Action::Split => "admin_split",
        }
    }
}

/// One piece of identity evidence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Evidence {
    /// Where it sorts.
    pub key: Key,
    /// What it says.
    pub action: Action,
    /// The identifiers it names.
    pub ids: BTreeSet<Identifier>,
}

/// A day, in microseconds: the granularity at which repeated evidence is
/// kept when a windowed limit is configured.
const DAY_MICROS: i64 = 86_400_000_000;

impl Evidence {
    /// Repeats of one identifier set that fall in one bucket decide the same
    /// thing, so a store keeps only the first of each `(ids, bucket)`. With
    /// no windowed limit the bucket is always 0: a repeat never changes a
    /// decision. With one, it is the UTC day of `receivedAt`, so that a link
    /// refused today is tried again by its first repeat on a later day, once
    /// the window may have moved on.
    pub fn bucket(&self, rules: &Rules) -> i64 {
        match (self.action, rules.shortest_window()) {
            (Action::Event, Some(_)) => self.key.received_at.div_euclid(DAY_MICROS),
            _ => 0,
        }
    }
}

impl Evidence {
    /// The bytes that name this evidence's slot: a store keeps one piece of
    /// evidence per slot, the one with the smallest key. Two pieces share a
    /// slot when they say the same thing about the same identifiers in the
    /// same [`Evidence::bucket`].
    pub fn slot(&self, rules: &Rules) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(self.action.as_str().as_bytes());
        out.push(0);
        // An admin's instructions are each their own: a split, a merge and
        // a split again of one identifier are three decisions. A retry of
        // one instruction carries its messageId, so it still shares a slot.
        if matches!(self.action, Action::Merge | Action::Split) {
            out.extend_from_slice(self.key.message_id.as_bytes());
            out.push(0);
        }
        out.extend_from_slice(&self.bucket(rules).to_be_bytes());
        for id in &self.ids {
            out.extend_from_slice(id.kind.as_str().as_bytes());
            out.push(0);
            out.extend_from_slice(id.value.as_bytes());
            out.push(0);
        }
        out
    }
}

/// The holder of a profile: the member named first, by the canonical key of
/// the first event that named each (ties by identifier).
pub fn holder<'a, I>(members: I) -> Option<&'a Identifier>
where
    I: IntoIterator<Item = (&'a Identifier, &'a Key)>,
{
    members
        .into_iter()
        .min_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
        .map(|(id, _)| id)
}

/// The `profile_id` of a profile whose holder is `holder`: a name-based
/// UUID (version 5) of the workspace and the identifier, so it is the same
/// on every rebuild, and guessing it requires knowing the identifier.
pub fn profile_id(workspace: &str, holder: &Identifier) -> uuid::Uuid {
    const NAMESPACE: uuid::Uuid = uuid::uuid!("3f0c2b8e-5d4a-4e8f-9a61-7b2d9c1e0f54");
    let name = format!("{workspace}\0{holder}");
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_id_is_stable_and_per_workspace() {
        let u = Identifier::parse("user_id:alice").unwrap();
        assert_eq!(profile_id("ws", &u), profile_id("ws", &u));
        assert_ne!(profile_id("ws", &u), profile_id("other", &u));
        assert_eq!(profile_id("ws", &u).get_version_num(), 5);
    }

    #[test]
    fn the_holder_is_named_first() {
        let k = |t: i64, m: &str| Key {
            received_at: t,
            message_id: m.into(),
        };
        let a = Identifier::parse("anonymous_id:a").unwrap();
        let u = Identifier::parse("user_id:u").unwrap();
        let (ka, ku) = (k(20, "m1"), k(10, "m9"));
        assert_eq!(holder([(&a, &ka), (&u, &ku)]), Some(&u));
        let ku = k(20, "m1");
        assert_eq!(holder([(&u, &ku), (&a, &ka)]), Some(&a), "ties by id");
    }
}
