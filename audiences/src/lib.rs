//! Audiences and computed traits: their stored definitions, and the
//! evaluator that keeps every profile's memberships and computed traits
//! current from the log.
//!
//! # How it fits
//! The domain says what a definition means ([`trailmark_domain::audience`]);
//! this crate runs it. The [`Evaluator`] is one more consumer of the log,
//! with its own consumer group (`evaluator`): in `trailmark serve` it runs
//! in-process, in distributed mode as `trailmark evaluator`. It follows the
//! projector (it evaluates a batch only once the projector has applied it,
//! so identities and traits are there to read), folds each event into small
//! per-identifier leaf states, re-evaluates the profiles the batch touched,
//! and re-evaluates profiles whose windows expire at their deadline (the
//! sweep), with an injected clock.
//!
//! # Delivery
//! Every change of a membership or computed trait is an event appended to
//! the log (`Audience Entered`, `Audience Exited`, `Computed Trait Changed`;
//! see [`emit`]), so timelines, history and replays come from the log. A
//! change is written to the store with the profile's new state and an outbox
//! entry, atomically (one logged batch in CQL), and the outbox is then
//! appended to the log; a crash in between appends it again with the same
//! `messageId`, which consumers de-duplicate. A change is never decided
//! twice: the state records each change's number, and a replay of the log
//! (a restart, or a rebuild that lost the state) first restores that state
//! from the evaluator's own events, then evaluates. The evaluator skips its
//! own events otherwise, and definitions may not count them, so it never
//! feeds on its own output.
//!
//! # Layout
//! - [`definitions`]: definitions and their versions, stored as workspace
//!   settings; status records.
//! - [`rows`]: the evaluator's rows, keyed for [`trailmark_store::evaluator`].
//! - [`emit`]: the events it appends.
//! - [`evaluator`]: the consumer loop (fold, evaluate, sweep, publish,
//!   backfill).
//! - [`profile`]: evaluating one profile into writes and events.
//! - [`read`]: what the query API reads (members, a profile's audiences and
//!   history, computed traits, previews).

pub mod definitions;
pub mod emit;
pub mod evaluator;
pub mod profile;
pub mod read;
pub mod rows;

pub use definitions::{Definitions, DefinitionsError, Kind};
pub use evaluator::{Evaluator, EvaluatorConfig};

/// Evaluator failures.
#[derive(Debug, thiserror::Error)]
pub enum EvaluatorError {
    /// The log failed permanently.
    #[error(transparent)]
    Log(#[from] trailmark_log::LogError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] trailmark_store::StoreError),
    /// An event could not be encoded.
    #[error("encoding an event: {0}")]
    Encode(String),
}

impl EvaluatorError {
    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            EvaluatorError::Log(e) => e.is_retryable(),
            EvaluatorError::Store(e) => e.is_retryable(),
            EvaluatorError::Encode(_) => false,
        }
    }
}

/// The evaluator's result type.
pub type Result<T> = std::result::Result<T, EvaluatorError>;
