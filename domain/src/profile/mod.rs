//! The profile fold: how events become profiles.
//!
//! One event becomes a [`Projection`]: its primary identifier and the
//! [`Fact`]s it contributes, computed by [`project`], purely. `Fact` is a
//! closed enum, and each variant names the rule by which it merges. The
//! executable specification, [`ProfileModel`], and every store fold the same
//! facts with exhaustive matches, so a new kind of fact is a compile error in
//! each of them until it is handled; the stores are property-tested against
//! the model.
//!
//! Every rule is commutative and idempotent, so that a profile does not
//! depend on the order in which partitions are consumed, and replaying the log
//! gives the same result:
//!
//! - **Identity.** Every identifier an event carries is linked to its primary
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

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Event, EventType};
use crate::identity::Key;

mod context;
mod fact;
mod model;

pub(crate) use context::ContextView;
pub use fact::{Fact, Projection, may_set_traits, project};
pub use model::{ProfileModel, ProfileView};

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

/// The most identifiers one profile links. A component of identifiers
/// joined by evidence larger than this (a shared device, a hard-coded
/// `userId` that is not blocked, or a hostile client linking thousands of
/// ids) is not merged at all: each of its identifiers stands alone (see
/// [`crate::identity::Walk`]). The rule looks only at stored evidence, which
/// is the same whatever order it arrived in, and a store decides it by
/// walking at most this many identifiers.
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
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What the events that named one identifier say about it. Every field
/// merges commutatively ([`Named::include`]), so a store keeps it without
/// caring about order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The earliest event time (the identifier's `created_at`).
    pub created: i64,
    /// The latest event time, to the minute (floored): exact, it would
    /// rewrite the record on every event, which costs the fold more than
    /// anything else it does; to the minute, a busy identifier's record is
    /// rewritten at most once a minute.
    pub last_seen: i64,
    /// The canonical key of the first event that named it: its
    /// `first_message_id`, and what makes it its profile's holder (see
    /// [`crate::identity::holder`]).
    pub first: Key,
    /// The source of that first event.
    pub source_id: String,
}

impl Named {
    /// What one event at `time`, with `key`, from `source_id`, says.
    pub fn once(time: i64, key: Key, source_id: impl Into<String>) -> Self {
        Self {
            created: time,
            last_seen: time.div_euclid(MINUTE_MICROS) * MINUTE_MICROS,
            first: key,
            source_id: source_id.into(),
        }
    }

    /// Merges what another event says: the earliest and latest times, and
    /// the first key with its source.
    pub fn include(&mut self, other: &Named) {
        self.created = self.created.min(other.created);
        self.last_seen = self.last_seen.max(other.last_seen);
        if other.first < self.first {
            self.first = other.first.clone();
            self.source_id = other.source_id.clone();
        }
    }
}

/// A minute, in microseconds: the granularity of [`Named::last_seen`].
pub const MINUTE_MICROS: i64 = 60_000_000;

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
