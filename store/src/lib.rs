//! The stores: where projections and workspaces live.
//!
//! Two traits, because they are read and written by different parts:
//!
//! - [`ProfileStore`] holds the projections the projector folds from the log
//!   (identities, traits, counts, seen times, timelines, the de-duplication
//!   window) together with the projector's checkpoints. It has two sides:
//!   the projector writes through [`ProfileWriter`], and the query API reads
//!   through [`ProfileReader`], which cannot write.
//!   [`ProfileWriter::apply`] writes a batch of events *and* the position
//!   after it in one atomic step: a crash at any point either keeps both or
//!   neither, so no event is lost or applied twice.
//! - [`WorkspaceDirectory`] holds tenants and their credentials: write keys
//!   (which can only write) and secret tokens (stored as SHA-256 digests).
//!
//! The rules of the fold are the domain's ([`trailmark_domain::profile`]); a
//! store only persists them. Stores are an open set behind these traits: this
//! crate holds the embedded [`embedded::EmbeddedStore`] (`embedded://` URIs, on
//! fjall) and, behind the `conformance` feature, the suite every store passes.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::value::RawValue;
use trailmark_domain::identity::{Decision, Outcome, RuleSettings, Settled};
use trailmark_domain::profile::{Named, TraitValue};
use trailmark_domain::{Event, Identifier};

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod evaluator;
pub mod identity;

pub use trailmark_domain::profile::MAX_PROFILE_IDENTIFIERS;

/// Store failures, each either retryable or permanent.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot serve right now; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The request cannot succeed as asked.
    #[error("{0}")]
    Invalid(String),
    /// The thing asked for already exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// An event the fold cannot read (ingest refuses such events; one comes
    /// only from an old or hand-written log). The projector dead-letters it.
    #[error("event cannot be folded: {0}")]
    Unfoldable(#[from] trailmark_domain::profile::FoldError),
}

impl StoreError {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Corrupt(_)
            | StoreError::Invalid(_)
            | StoreError::Conflict(_)
            | StoreError::Unfoldable(_) => false,
        }
    }
}

/// The stores' result type.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A batch of events read from the log, to apply atomically with the position
/// after it in each partition it covers.
#[derive(Debug, Clone)]
pub struct ApplyBatch {
    /// The consumer (projector group) whose checkpoint moves.
    pub consumer: String,
    /// For each partition the events came from, the log position after its
    /// last event: the new checkpoints.
    pub positions: Vec<(u32, u64)>,
    /// The events, in log order, each with where it was read from.
    pub events: Vec<LoggedEvent>,
    /// The de-duplication window, in microseconds of `receivedAt`.
    pub dedup_window_micros: i64,
}

/// An event and where it sits in the log. Stores that cannot write a batch
/// atomically use the position to make a replay idempotent: a partition's
/// events arrive in position order, so a fact that already includes position
/// `p` of partition `n` skips it.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    /// The partition it was read from.
    pub partition: u32,
    /// Its position in that partition.
    pub position: u64,
    /// The event.
    pub event: Event,
}

/// What [`ProfileWriter::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Events folded.
    pub applied: usize,
    /// Events dropped as duplicates.
    pub duplicates: usize,
}

/// A resolved profile: who names it, and its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRef {
    /// The member named first ([`trailmark_domain::identity::holder`]).
    pub holder: Identifier,
    /// The profile's stable id: [`trailmark_domain::identity::profile_id`]
    /// of the holder.
    pub profile_id: uuid::Uuid,
    /// Every member, with what its events said of it.
    pub identifiers: BTreeMap<Identifier, Named>,
    /// The identity decisions that concern the members, in canonical order:
    /// accepted links with their evidence, refusals with the rule, splits.
    /// The explain API shows them.
    pub decisions: Vec<Decision>,
    /// Set when the profile is the whole of its linked component: what a
    /// reader needs to carry it over later events without resolving it
    /// again ([`Settled::carry`]).
    pub settled: Option<Settled>,
}

impl ProfileRef {
    /// The first accepted link that joined `id` to another member, if any:
    /// how it came to be in the profile.
    pub fn linked_by(&self, id: &Identifier) -> Option<&Decision> {
        self.decisions.iter().find(|d| match &d.outcome {
            Outcome::Linked(ids) => ids.contains(id),
            _ => false,
        })
    }
}

/// First and last seen and event counts of a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileMetadata {
    /// The earliest event time.
    pub first_seen: i64,
    /// The latest event time.
    pub last_seen: i64,
    /// Events by counter name (the event name for `track`, `$page` and so on).
    pub counts: BTreeMap<String, u64>,
}

/// A timeline query. Times are microseconds; `start` is inclusive, `end`
/// exclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimelineQuery {
    /// Earliest event time to include.
    pub start: Option<i64>,
    /// Event time to stop before.
    pub end: Option<i64>,
    /// Only events with this counter name.
    pub event: Option<String>,
    /// Newest first.
    pub descending: bool,
    /// At most this many events.
    pub limit: usize,
    /// Resume after this `(time, messageId)` (exclusive), from a cursor.
    pub after: Option<(i64, String)>,
}

/// One timeline entry.
#[derive(Debug, Clone)]
pub struct TimelineEntry {
    /// The event time.
    pub time: i64,
    /// The `messageId`.
    pub message_id: String,
    /// The event as the query API renders it.
    pub json: Box<RawValue>,
}

/// A page of a timeline.
#[derive(Debug, Clone, Default)]
pub struct TimelinePage {
    /// The entries, in the order asked for.
    pub entries: Vec<TimelineEntry>,
    /// Whether more entries match after the last one.
    pub has_more: bool,
}

/// The projector's side of a store: folding batches of events, and its
/// checkpoints.
#[async_trait]
pub trait ProfileWriter: Send + Sync + 'static {
    /// Folds `batch.events` and moves `batch.consumer`'s checkpoint for
    /// each partition in `batch.positions`, atomically. Applying a
    /// batch again changes nothing: its events are duplicates. (Shared, so
    /// that the projector retries a batch without copying its events.)
    async fn apply(&self, batch: std::sync::Arc<ApplyBatch>) -> Result<ApplyOutcome>;

    /// The checkpoints of `consumer`: partition → position to resume from.
    async fn checkpoints(&self, consumer: &str) -> Result<BTreeMap<u32, u64>>;

    /// Deletes every projection and checkpoint, keeping workspaces; for a
    /// rebuild from the log.
    async fn reset_projections(&self) -> Result<()>;
}

/// The query API's side of a store: reading projections. It cannot write.
#[async_trait]
pub trait ProfileReader: Send + Sync + 'static {
    /// The profile `id` belongs to in `workspace`, if any event named it.
    async fn resolve(&self, workspace: &str, id: &Identifier) -> Result<Option<ProfileRef>>;

    /// The identifier whose [`ProfileRef::profile_id`] `profile_id` is (or
    /// was, before its profile merged into another), if any.
    async fn identifier_of(
        &self,
        workspace: &str,
        profile_id: uuid::Uuid,
    ) -> Result<Option<Identifier>>;

    /// A page of an account's members: the identifiers whose events named
    /// `account` (a `group_id` identifier), each with what they said of the
    /// membership, in the store's order of identifiers, after `after`, at
    /// most `limit`.
    async fn account_members(
        &self,
        workspace: &str,
        account: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>>;

    /// A page of the accounts `member` named, as
    /// [`ProfileReader::account_members`] pages.
    async fn member_accounts(
        &self,
        workspace: &str,
        member: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>>;

    /// The winning value of each trait of a profile.
    async fn traits(
        &self,
        workspace: &str,
        profile: &ProfileRef,
    ) -> Result<BTreeMap<String, TraitValue>>;

    /// First and last seen and event counts of a profile.
    async fn metadata(&self, workspace: &str, profile: &ProfileRef) -> Result<ProfileMetadata>;

    /// A page of a profile's timeline across all its identifiers, ordered by
    /// `(time, messageId)`.
    async fn timeline(
        &self,
        workspace: &str,
        profile: &ProfileRef,
        query: &TimelineQuery,
    ) -> Result<TimelinePage>;

    /// Succeeds when the store can serve reads and writes.
    async fn check_ready(&self) -> Result<()>;
}

/// A whole store: both sides and the evaluator's rows, as the binary wires
/// it. `Arc<dyn ProfileStore>` coerces to any side.
pub trait ProfileStore: ProfileWriter + ProfileReader + evaluator::EvaluatorStore {}

impl<T: ProfileWriter + ProfileReader + evaluator::EvaluatorStore + ?Sized> ProfileStore for T {}

/// A workspace (tenant).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Workspace {
    /// Its id, such as `ws_...`.
    pub id: String,
    /// A human name.
    pub name: String,
    /// When it was created, microseconds since the epoch.
    pub created_at: i64,
}

/// A newly created workspace and its credentials, shown once.
#[derive(Debug, Clone)]
pub struct CreatedWorkspace {
    /// The workspace.
    pub workspace: Workspace,
    /// The id of its first source.
    pub source_id: String,
    /// The write key of that source.
    pub write_key: String,
    /// The secret token for reading and administration.
    pub token: String,
}

/// What a write key grants: appending events to one source of one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct WriteGrant {
    /// The workspace.
    pub workspace_id: String,
    /// The source.
    pub source_id: String,
}

/// What a secret token grants: reading one workspace, and administering it
/// if its scope is [`Scope::Admin`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ReadGrant {
    /// The workspace.
    pub workspace_id: String,
    /// What the token may do.
    #[serde(default)]
    pub scope: Scope,
}

/// What a secret token may do.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read and administer (identity rules, merges and splits, tokens): the
    /// token a workspace is created with.
    #[default]
    Admin,
    /// Read profiles only.
    Read,
}

/// Tenants and their credentials.
#[async_trait]
pub trait WorkspaceDirectory: Send + Sync + 'static {
    /// Creates a workspace with one source. Credentials are generated unless
    /// given (for scripted deployments).
    async fn create_workspace(
        &self,
        name: &str,
        write_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<CreatedWorkspace>;

    /// Every workspace.
    async fn workspaces(&self) -> Result<Vec<Workspace>>;

    /// What a write key grants, if it is one.
    async fn resolve_write_key(&self, write_key: &str) -> Result<Option<WriteGrant>>;

    /// What a secret token grants, if it is one.
    async fn resolve_token(&self, token: &str) -> Result<Option<ReadGrant>>;

    /// Creates a read-only token for a workspace and returns it (shown once;
    /// only its digest is stored).
    async fn create_read_token(&self, workspace_id: &str) -> Result<String>;

    /// A workspace's identity rules as last set, if ever.
    async fn identity_rules(&self, workspace_id: &str) -> Result<Option<RuleSettings>>;

    /// Sets a workspace's identity rules (already checked by
    /// [`trailmark_domain::identity::Rules::from_settings`]).
    async fn set_identity_rules(&self, workspace_id: &str, rules: &RuleSettings) -> Result<()>;

    /// A workspace's settings whose names start with `prefix`, in name
    /// order (the audience definitions are kept as `audience/{id}` and so
    /// on; their owner says what the values hold).
    async fn settings(&self, workspace_id: &str, prefix: &str) -> Result<Vec<(String, String)>>;

    /// Sets a setting, or removes it (`None`).
    async fn put_setting(&self, workspace_id: &str, name: &str, value: Option<&str>) -> Result<()>;
}

/// The credential key of a token: `t:` and its digest for an admin token,
/// `r:` for a read-only one. Both stores spell keys this way.
pub fn token_key(scope: Scope, token: &str) -> String {
    let prefix = match scope {
        Scope::Admin => "t",
        Scope::Read => "r",
    };
    format!("{prefix}:{}", token_digest(token))
}

impl CreatedWorkspace {
    /// A new workspace with one source, for a store to persist: ids are
    /// UUIDv7s, and credentials are generated unless given. A write key that
    /// equals the token is refused.
    pub fn new(name: &str, write_key: Option<&str>, token: Option<&str>) -> Result<Self> {
        let write_key = write_key.map_or_else(|| new_secret("wk_"), str::to_owned);
        let token = token.map_or_else(|| new_secret("tmk_"), str::to_owned);
        if write_key == token {
            return Err(StoreError::Invalid(
                "the write key and the token must differ".into(),
            ));
        }
        Ok(Self {
            workspace: Workspace {
                id: format!("ws_{}", uuid::Uuid::now_v7().simple()),
                name: name.to_owned(),
                created_at: trailmark_domain::Clock::now_micros(&trailmark_domain::SystemClock),
            },
            source_id: format!("src_{}", uuid::Uuid::now_v7().simple()),
            write_key,
            token,
        })
    }
}

/// A fresh random credential with a readable prefix.
pub fn new_secret(prefix: &str) -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{a}{}", &b[..16])
}

/// The SHA-256 digest of a token, hex encoded; only digests are stored.
pub fn token_digest(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(token.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}
