//! The audience evaluator's side of a store: a small ordered key-value
//! space with atomic commits, plus its de-duplication rows and checkpoints.
//!
//! The evaluator (crate `trailmark-audiences`) owns every rule of its state:
//! how a leaf state folds, what a profile's evaluation record holds, which
//! index rows go with it. A store only keeps rows, in a closed set of
//! [`EvalTable`]s, each keyed by a partition part and a sort part
//! ([`EvalKey`]), and commits a step's writes with its checkpoint
//! ([`EvaluatorStore::eval_commit`]). So the rules have one home, and the two
//! stores differ only in how they persist rows:
//!
//! - embedded: one fjall keyspace; a commit is one atomic batch, checkpoint
//!   included;
//! - CQL: one table partitioned by `(table, part)`; a commit writes the
//!   standalone [`EvalCommit::rows`] concurrently, then each
//!   [`EvalCommit::groups`] entry as one logged batch (all or nothing), in
//!   order, then the de-duplication rows, then the checkpoint. Every write is
//!   idempotent, so a step cut short and replayed ends the same.
//!
//! Only one evaluator writes at a time (it holds a lease in distributed
//! mode), so reads followed by writes never race.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::Result;

/// The evaluator's tables: a closed set, so each store lists them with an
/// exhaustive match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvalTable {
    /// Leaf states: part `ws identifier`, sort `spec id`.
    Leaves,
    /// A profile's evaluation record: part `ws`, sort `profile id`.
    Profiles,
    /// The profile each identifier was last evaluated under: part `ws`,
    /// sort `identifier`.
    IdProfiles,
    /// An audience's members: part `ws audience`, sort `profile id`.
    Members,
    /// When profiles must be evaluated again: part `hour`, sort
    /// `deadline ws profile id`.
    Deadlines,
    /// Membership changes: part `ws profile id`, sort `audience n`.
    History,
    /// Events waiting to be appended to the log: part empty, sort `sequence`.
    Outbox,
    /// Profiles to evaluate once the evaluator has caught up: part `ws`,
    /// sort `identifier`.
    Dirty,
    /// Per-definition figures (audience sizes): part `ws`, sort `id`.
    Stats,
}

impl EvalTable {
    /// Every table, in a fixed order.
    pub const ALL: [EvalTable; 9] = [
        EvalTable::Leaves,
        EvalTable::Profiles,
        EvalTable::IdProfiles,
        EvalTable::Members,
        EvalTable::Deadlines,
        EvalTable::History,
        EvalTable::Outbox,
        EvalTable::Dirty,
        EvalTable::Stats,
    ];

    /// Its number in stored keys; never reused.
    pub fn code(self) -> u8 {
        match self {
            EvalTable::Leaves => 1,
            EvalTable::Profiles => 2,
            EvalTable::IdProfiles => 3,
            EvalTable::Members => 4,
            EvalTable::Deadlines => 5,
            EvalTable::History => 6,
            EvalTable::Outbox => 7,
            EvalTable::Dirty => 8,
            EvalTable::Stats => 9,
        }
    }
}

/// A row's key: the part rows are grouped by (a CQL partition), and the
/// sort key within it. Scans stay within one part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvalKey {
    /// The grouping part.
    pub part: Vec<u8>,
    /// The order within the part.
    pub sort: Vec<u8>,
}

impl EvalKey {
    /// A key.
    pub fn new(part: impl Into<Vec<u8>>, sort: impl Into<Vec<u8>>) -> Self {
        Self {
            part: part.into(),
            sort: sort.into(),
        }
    }
}

/// One write of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalWrite {
    /// Sets a row.
    Put(EvalTable, EvalKey, Vec<u8>),
    /// Removes a row.
    Delete(EvalTable, EvalKey),
}

/// What one step of the evaluator writes.
#[derive(Debug, Clone, Default)]
pub struct EvalCommit {
    /// The consumer whose checkpoint moves (and whose de-duplication rows
    /// these are).
    pub consumer: String,
    /// Writes that stand alone (leaf states, each fenced by its own
    /// position), written first, in any order.
    pub rows: Vec<EvalWrite>,
    /// Writes, in groups: a group is written all or nothing, groups in
    /// order (a profile's record goes in one group with its index rows and
    /// outbox entries).
    pub groups: Vec<Vec<EvalWrite>>,
    /// Messages seen: `(partition, workspace, messageId, receivedAt)`.
    pub seen: Vec<(u32, String, String, i64)>,
    /// The de-duplication window, to purge rows older than it.
    pub dedup_window_micros: i64,
    /// The new checkpoints, written last.
    pub positions: Vec<(u32, u64)>,
}

/// Reading the evaluator's rows: all the query API may do with them.
#[async_trait]
pub trait EvaluatorReader: Send + Sync + 'static {
    /// The rows of `keys` that exist.
    async fn eval_get(
        &self,
        table: EvalTable,
        keys: Vec<EvalKey>,
    ) -> Result<Vec<(EvalKey, Vec<u8>)>>;

    /// Up to `limit` rows of one part, in sort order, after `after`
    /// (exclusive) and before `before` (exclusive) when given.
    async fn eval_scan(
        &self,
        table: EvalTable,
        part: &[u8],
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Up to `limit` rows of each of `parts`, in sort order, in the order
    /// of `parts`: one call for many parts (a step's profiles' leaf
    /// states), so a store can read them together.
    async fn eval_parts(
        &self,
        table: EvalTable,
        parts: Vec<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<Vec<(Vec<u8>, Vec<u8>)>>>;
}

/// The evaluator's state, kept by a store: reading, de-duplication and
/// commits.
#[async_trait]
pub trait EvaluatorStore: EvaluatorReader {
    /// When `consumer` last saw each of these `(workspace, messageId)`, if
    /// within its de-duplication rows.
    async fn eval_seen(
        &self,
        consumer: &str,
        messages: Vec<(String, String)>,
    ) -> Result<BTreeMap<(String, String), i64>>;

    /// Writes a step: its groups, its de-duplication rows, its checkpoint.
    async fn eval_commit(&self, commit: Arc<EvalCommit>) -> Result<()>;
}
