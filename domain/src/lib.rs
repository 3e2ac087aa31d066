//! The pure domain of Trailmark: everything that decides *what* happens to an
//! event, with no IO and no async.
//!
//! # Layout
//! - [`event`]: the normalised [`Event`] that ingest writes to the log and the
//!   projector reads back, its closed set of [`EventType`]s and the
//!   [`Identifier`]s it carries.
//! - [`parse`]: the Segment HTTP Tracking API parser. It validates a request
//!   body, merges batch-level `context`/`integrations`, assigns `messageId`s and
//!   corrects clock skew, producing [`Event`]s or per-item [`ValidationError`]s.
//! - [`profile`]: the fold. [`profile::project`] turns one event into the
//!   [`profile::Projection`] of [`profile::Fact`]s it contributes (identifiers
//!   named, links, traits, a count, a timeline entry), a closed enum whose
//!   variants each say how they merge; [`profile::ProfileModel`] folds them in
//!   memory with commutative, idempotent rules (last event time wins per trait,
//!   min/max seen times, identity evidence that only accumulates). The stores
//!   handle the same facts with exhaustive matches, and their conformance
//!   suite checks them against this model on generated streams.
//! - [`identity`]: which identifiers are one person. A workspace's
//!   [`identity::Rules`] (limits, blocked values, priority) decide the
//!   evidence in the canonical order `(receivedAt, messageId)`
//!   ([`identity::Graph`]); [`identity::Walk`] is how every reader (the
//!   model and both stores) finds a profile from one identifier.
//! - [`clock`]: the injected [`Clock`], so tests control time.
//!
//! Everything above this crate (log, store, services) depends on it; it
//! depends on nothing of Trailmark's.

pub mod audience;
pub mod clock;
pub mod event;
pub mod identity;
mod json;
pub mod parse;
pub mod profile;
pub mod time;

pub use clock::{Clock, ManualClock, SystemClock};
pub use event::{Event, EventType, IdKind, Identifier};
pub use parse::{Limits, ParsedBatch, RejectedItem, ValidationError};
