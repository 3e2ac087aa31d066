//! The event log: Trailmark's source of truth.
//!
//! Ingest appends validated events here and acknowledges them only once
//! [`EventLog::append`] returns, which means the records are durable.
//! Projectors consume the log through a [`Subscription`] and fold it into the
//! stores; every projection can be rebuilt by reading the log again.
//!
//! The log is an open set of backends behind one trait: this crate holds the
//! trait, the embedded [`file::FileLog`] (`file://` URIs) and, behind the
//! `conformance` feature, the suite every backend must pass. The Kafka backend
//! lives in its own crate so that only the binary links `rdkafka`.
//!
//! Records are opaque bytes with a partition key. The log keeps records of one
//! partition in append order; the partition of a key is [`partition_for`], so
//! one key's records are always read back in the order they were appended.
//! Positions are opaque, increasing `u64`s per partition: a consumer resumes
//! from the position *after* the last record it applied.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod file;

/// Log failures, each either retryable or permanent.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot take or serve records right now (IO error, broker down,
    /// overloaded). Retrying later may succeed.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The log was shut down.
    #[error("log is closed")]
    Closed,
    /// Stored data failed its integrity check.
    #[error("corrupt log data in partition {partition} at {position}: {reason}")]
    Corrupt {
        /// The partition.
        partition: u32,
        /// The position of the bad record.
        position: u64,
        /// What was wrong.
        reason: String,
    },
    /// The request cannot succeed as asked (bad partition, bad URI, a backend
    /// that is not compiled in).
    #[error("{0}")]
    Invalid(String),
}

impl LogError {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            LogError::Unavailable(_) | LogError::Closed => true,
            LogError::Corrupt { .. } | LogError::Invalid(_) => false,
        }
    }
}

/// The log's result type.
pub type Result<T> = std::result::Result<T, LogError>;

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The partition key: records with equal keys keep their order.
    pub key: Vec<u8>,
    /// The encoded event.
    pub payload: Vec<u8>,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The partition it was read from.
    pub partition: u32,
    /// Its position in the partition.
    pub position: u64,
    /// The position of the record after it: where to resume.
    pub next_position: u64,
    /// The encoded event.
    pub payload: Bytes,
}

/// A record the projector set aside because it could not be decoded or
/// applied, with where it came from and why. Dead letters are kept apart from
/// the log and can be appended to it again once the cause is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The log it came from (a topic name, or `file` for the file log).
    pub source: String,
    /// Its partition there.
    pub partition: u32,
    /// Its position there.
    pub position: u64,
    /// What went wrong.
    pub error: String,
    /// The record, unchanged.
    pub payload: Bytes,
}

/// Where a durable record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The partition.
    pub partition: u32,
    /// Its position.
    pub position: u64,
}

/// Where a consumer group starts reading each partition: the store answers
/// from its checkpoints, so a restarted projector resumes where its last
/// durable write left off.
#[async_trait]
pub trait StartPositions: Send + Sync {
    /// The position to resume `partition` from; `None` means the earliest.
    async fn start_position(&self, partition: u32) -> Result<Option<u64>>;
}

/// Starts every partition from the earliest record.
#[derive(Debug, Default, Clone, Copy)]
pub struct FromEarliest;

#[async_trait]
impl StartPositions for FromEarliest {
    async fn start_position(&self, _partition: u32) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// A consumer's view of the log.
#[async_trait]
pub trait Subscription: Send {
    /// Up to `max` records, in order within each partition. Waits up to `wait`
    /// for records when none are ready, then returns what it has (maybe none).
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// The partitions this consumer currently reads.
    fn assigned(&self) -> Vec<u32>;
}

/// The event log.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// The number of partitions.
    fn partitions(&self) -> u32;

    /// Appends records and returns once every one of them is durable, with
    /// where each landed, in input order. On error none of them may be taken
    /// as durable (some may still appear in the log; consumers de-duplicate).
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>>;

    /// Joins consumer group `group`; each assigned partition starts at the
    /// position `start` gives for it.
    async fn subscribe(
        &self,
        group: &str,
        start: Arc<dyn StartPositions>,
    ) -> Result<Box<dyn Subscription>>;

    /// The position after the last durable record, per partition.
    async fn end_positions(&self) -> Result<Vec<u64>>;

    /// Records how far `group` has consumed each partition, durably. Trailmark's
    /// projector keeps its authoritative positions in the store, atomically
    /// with its writes, and commits them here too so that operators and other
    /// tools can see consumer progress and lag from the log alone.
    async fn commit_positions(&self, group: &str, positions: &[(u32, u64)]) -> Result<()>;

    /// The positions last committed by `group`, per partition.
    async fn committed_positions(
        &self,
        group: &str,
    ) -> Result<std::collections::BTreeMap<u32, u64>>;

    /// Succeeds when the log can take appends.
    async fn check_ready(&self) -> Result<()>;

    /// Durably sets records aside in the dead-letter queue.
    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> Result<()>;

    /// Up to `max` dead letters from position `from` of the dead-letter queue,
    /// each with its position there, in order.
    async fn dead_letters(&self, from: u64, max: usize) -> Result<Vec<(u64, DeadLetter)>>;
}

/// The partition of a key: CRC-32 of the key modulo the partition count.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}
