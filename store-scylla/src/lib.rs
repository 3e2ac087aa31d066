//! The distributed store: [`ProfileStore`] and [`WorkspaceDirectory`] on
//! ScyllaDB, or on Apache Cassandra, which speaks the same CQL (`scylla://`
//! URIs). The binary wires it in; the services only see the traits. Tests run
//! it against a real Cassandra 5 with the same conformance suite as the
//! embedded store.
//!
//! # Delivery guarantee
//! CQL has no atomic write across partitions, so [`ProfileStore::apply`] makes
//! every write **idempotent** instead and orders them: first the effects of the
//! batch's new events, then their de-duplication rows, then the checkpoints. A
//! failure at any point leaves the checkpoint behind the effects, the batch is
//! applied again, and applying again changes nothing. So every logged event is
//! reflected exactly once, which is what the embedded store's atomic batch
//! gives too.
//!
//! How each fact stays idempotent, with no counters and no read before most
//! writes:
//! - **Timelines** are keyed by `(workspace, identifier, bucket)` and
//!   clustered by `(time, messageId)`: an upsert. Buckets are
//!   [`BUCKET_MICROS`] wide, so a heavy user's partitions stay bounded, and a
//!   `timeline_buckets` index lets a page skip empty stretches.
//! - **Identity** is a grow-only set of links between identifiers, resolved to
//!   connected components on read (the root is the smallest identifier, as in
//!   the domain's model). Edges commute, so projectors of different partitions
//!   can link the same person at once without a race. An identifier's earliest
//!   time is a cell written with the write timestamp `-SHIFT - time`, so the
//!   store keeps the minimum by itself.
//! - **Traits** are one cell per `(identifier, name)` written with the write
//!   timestamp `event time - SHIFT`; on a tie the larger value wins, and the
//!   value starts with the `messageId`, which is the domain's tie-break.
//! - **Counts and seen times** are read, folded and written back by the one
//!   projector that owns the identifier's log partition (an event's primary
//!   identifier is its partition key). The row remembers, per partition, the
//!   position after the last event it includes, so a replay skips what it
//!   already counted. Its write timestamp is the sum of those positions, so
//!   a projector that lost the partition during a long stall and writes late
//!   cannot overwrite the newer row; checkpoints are fenced by their
//!   position the same way. Counts are written after the other effects.
//! - Write timestamps of the min/max cells are negative (far in the past),
//!   never in the future, which ScyllaDB refuses.
//! - **De-duplication** rows (`workspace, messageId → receivedAt`) are written
//!   after the effects, so a row means "fully applied"; a TTL of twice the
//!   window cleans them up.
//!
//! Writes are prepared statements, issued concurrently; the only batch is the
//! checkpoint's, which stays inside one partition. The consistency level is
//! configurable and defaults to `LOCAL_QUORUM`.
//!
//! Known limit: de-duplication is exact within a partition. A `messageId`
//! sent again under a *different* user (so to another partition) and applied
//! by two projectors at the same moment can count twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::unprepared::Statement;
use serde_json::value::RawValue;
use trailmark_domain::profile::{Fact, Seen, TraitValue, is_duplicate, merge_trait, project};
use trailmark_domain::{IdKind, Identifier};
use trailmark_store::{
    ApplyBatch, ApplyOutcome, CreatedWorkspace, LoggedEvent, MAX_PROFILE_IDENTIFIERS,
    ProfileMetadata, ProfileReader, ProfileRef, ProfileWriter, ReadGrant, Result, StoreError,
    TimelineEntry, TimelinePage, TimelineQuery, Workspace, WorkspaceDirectory, WriteGrant,
    token_digest,
};

pub mod schema;

/// The width of a timeline bucket: seven days, in microseconds. A partition
/// holds one identifier's events of one week.
pub const BUCKET_MICROS: i64 = 7 * 24 * 3_600 * 1_000_000;

/// Write timestamps of the min/max cells sit far *below* wall-clock time
/// (negative: Cassandra and ScyllaDB accept them), never in the future, which
/// ScyllaDB refuses (`restrict_future_timestamp`) and Cassandra can guard.
/// Only those cells use them.
const TIMESTAMP_SHIFT: i64 = 1 << 61;

/// The write timestamp of a trait cell: later events win.
fn trait_timestamp(time: i64) -> i64 {
    time - TIMESTAMP_SHIFT
}

/// The write timestamp of a first-seen cell: earlier events win.
fn first_seen_timestamp(time: i64) -> i64 {
    -TIMESTAMP_SHIFT - time
}

/// Requests in flight per apply or read.
const CONCURRENCY: usize = 256;

/// How the store reaches its cluster, from a `scylla://` URI:
/// `scylla://host:9042[,host:9042...][/keyspace][?replication_factor=1&dc=NAME&consistency=local_quorum]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub hosts: Vec<String>,
    /// The keyspace (default `trailmark`).
    pub keyspace: String,
    /// Replicas per data centre, used when `migrate` creates the keyspace.
    pub replication_factor: u32,
    /// With a data centre name, the keyspace uses `NetworkTopologyStrategy`
    /// there; without, `SimpleStrategy` (for one-DC test clusters).
    pub datacenter: Option<String>,
    /// The consistency of reads and writes.
    pub consistency: Consistency,
}

impl ScyllaConfig {
    /// Parses a `scylla://` URI.
    pub fn from_uri(uri: &str) -> Result<Self> {
        let bad = |why: &str| StoreError::Invalid(format!("bad store uri {uri:?}: {why}"));
        let rest = uri
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("expected scylla://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, keyspace) = rest.split_once('/').unwrap_or((rest, ""));
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:9042")
                }
            })
            .collect();
        if hosts.is_empty() {
            return Err(bad("no host"));
        }
        let keyspace = if keyspace.is_empty() {
            "trailmark".to_owned()
        } else {
            keyspace.to_owned()
        };
        if !keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || keyspace.len() > 48
        {
            return Err(bad("keyspace must be letters, digits and _ (at most 48)"));
        }
        let mut config = ScyllaConfig {
            hosts,
            keyspace,
            replication_factor: 1,
            datacenter: None,
            consistency: Consistency::LocalQuorum,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| bad("query is k=v"))?;
            match k {
                "replication_factor" => {
                    config.replication_factor = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("replication_factor is a positive number"))?
                }
                "dc" => config.datacenter = Some(v.to_owned()),
                "consistency" => {
                    config.consistency = match v.to_ascii_lowercase().as_str() {
                        "one" => Consistency::One,
                        "quorum" => Consistency::Quorum,
                        "local_quorum" => Consistency::LocalQuorum,
                        "local_one" => Consistency::LocalOne,
                        "each_quorum" => Consistency::EachQuorum,
                        "all" => Consistency::All,
                        _ => return Err(bad("unknown consistency")),
                    }
                }
                _ => return Err(bad(&format!("unknown option {k}"))),
            }
        }
        Ok(config)
    }

    fn replication(&self) -> String {
        match &self.datacenter {
            Some(dc) => format!(
                "{{'class': 'NetworkTopologyStrategy', '{}': {}}}",
                dc.replace('\'', ""),
                self.replication_factor
            ),
            None => format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                self.replication_factor
            ),
        }
    }
}

fn classify(e: impl Into<ScyllaFailure>) -> StoreError {
    match e.into() {
        ScyllaFailure::Permanent(m) => StoreError::Invalid(m),
        ScyllaFailure::Transient(m) => StoreError::Unavailable(m),
    }
}

/// A driver error sorted into retryable or not.
enum ScyllaFailure {
    Permanent(String),
    Transient(String),
}

impl From<ExecutionError> for ScyllaFailure {
    fn from(e: ExecutionError) -> Self {
        let permanent = match &e {
            ExecutionError::BadQuery(_) => true,
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => matches!(
                db,
                DbError::SyntaxError
                    | DbError::Invalid
                    | DbError::Unauthorized
                    | DbError::ConfigError
                    | DbError::AlreadyExists { .. }
            ),
            _ => false,
        };
        if permanent {
            ScyllaFailure::Permanent(e.to_string())
        } else {
            ScyllaFailure::Transient(e.to_string())
        }
    }
}

impl From<scylla::errors::PrepareError> for ScyllaFailure {
    fn from(e: scylla::errors::PrepareError) -> Self {
        ScyllaFailure::Transient(e.to_string())
    }
}

impl From<scylla::errors::PagerExecutionError> for ScyllaFailure {
    fn from(e: scylla::errors::PagerExecutionError) -> Self {
        ScyllaFailure::Transient(e.to_string())
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// An identifier as stored: `kind NUL value`.
fn id_text(id: &Identifier) -> String {
    format!("{}\0{}", id.kind.as_str(), id.value)
}

fn parse_id(s: &str) -> Result<Identifier> {
    let (kind, value) = s
        .split_once('\0')
        .ok_or_else(|| corrupt("identifier without a kind"))?;
    Ok(Identifier::new(IdKind::parse(kind), value))
}

/// The bucket of an event time.
pub fn bucket_of(time: i64) -> i64 {
    time.div_euclid(BUCKET_MICROS)
}

/// A trait cell: `messageId NUL json ‖ json length (u32 BE)`. It starts with
/// the `messageId` so that on equal write timestamps (equal event times) the
/// larger `messageId` wins, as [`TraitValue::supersedes`] says.
fn encode_trait(v: &TraitValue) -> Vec<u8> {
    let json = serde_json::to_vec(v).expect("plain data serialises");
    let mut out = Vec::with_capacity(v.message_id.len() + json.len() + 5);
    out.extend_from_slice(v.message_id.as_bytes());
    out.push(0);
    out.extend_from_slice(&json);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out
}

fn decode_trait(b: &[u8]) -> Result<TraitValue> {
    let n = b.len();
    if n < 5 {
        return Err(corrupt("trait cell"));
    }
    let len = u32::from_be_bytes(b[n - 4..].try_into().expect("4 bytes")) as usize;
    let json = b
        .get(n.saturating_sub(4 + len)..n - 4)
        .filter(|_| len + 4 <= n)
        .ok_or_else(|| corrupt("trait cell"))?;
    serde_json::from_slice(json).map_err(|_| corrupt("trait cell json"))
}

/// The prepared statements, each with the configured consistency.
struct Statements {
    insert_link: PreparedStatement,
    first_seen: PreparedStatement,
    upsert_trait: PreparedStatement,
    insert_timeline: PreparedStatement,
    insert_bucket: PreparedStatement,
    select_stats: PreparedStatement,
    upsert_stats: PreparedStatement,
    select_dedup: PreparedStatement,
    insert_dedup: PreparedStatement,
    upsert_checkpoint: PreparedStatement,
    select_checkpoints: PreparedStatement,
    select_links: PreparedStatement,
    select_traits: PreparedStatement,
    buckets_asc: PreparedStatement,
    buckets_desc: PreparedStatement,
    timeline_asc_from: PreparedStatement,
    timeline_asc_after: PreparedStatement,
    timeline_desc_from: PreparedStatement,
    timeline_desc_before: PreparedStatement,
    insert_workspace: PreparedStatement,
    select_workspaces: PreparedStatement,
    insert_credential: PreparedStatement,
    select_credential: PreparedStatement,
    ready: PreparedStatement,
}

const TIMELINE_COLUMNS: &str = "SELECT time, message_id, counter, body FROM timeline WHERE workspace = ? AND id = ? AND bucket = ?";

impl Statements {
    async fn prepare(session: &Session, keyspace: &str) -> Result<Self> {
        // Table names are qualified: prepared statements under `USE` are
        // ambiguous, and Cassandra warns on every one.
        let p = |cql: String| async move {
            let cql = qualify(&cql, keyspace);
            let mut s = session.prepare(cql).await.map_err(classify)?;
            s.set_is_idempotent(true);
            Ok::<_, StoreError>(s)
        };
        let tl = |rest: &str| format!("{TIMELINE_COLUMNS} {rest}");
        Ok(Self {
            insert_link: p("INSERT INTO identity_links (workspace, id, linked) VALUES (?, ?, ?)".into()).await?,
            first_seen: p("UPDATE identity_links USING TIMESTAMP ? SET first_seen = ? WHERE workspace = ? AND id = ?".into()).await?,
            upsert_trait: p("UPDATE traits USING TIMESTAMP ? SET value = ? WHERE workspace = ? AND id = ? AND name = ?".into()).await?,
            insert_timeline: p("INSERT INTO timeline (workspace, id, bucket, time, message_id, counter, body) VALUES (?, ?, ?, ?, ?, ?, ?)".into()).await?,
            insert_bucket: p("INSERT INTO timeline_buckets (workspace, id, bucket) VALUES (?, ?, ?)".into()).await?,
            select_stats: p("SELECT first_seen, last_seen, counts, applied FROM stats WHERE workspace = ? AND id = ?".into()).await?,
            upsert_stats: p("INSERT INTO stats (workspace, id, first_seen, last_seen, counts, applied) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?".into()).await?,
            select_dedup: p("SELECT received_at FROM dedup WHERE workspace = ? AND message_id = ?".into()).await?,
            insert_dedup: p("INSERT INTO dedup (workspace, message_id, received_at) VALUES (?, ?, ?) USING TTL ?".into()).await?,
            upsert_checkpoint: p("INSERT INTO checkpoints (consumer, partition, position) VALUES (?, ?, ?) USING TIMESTAMP ?".into()).await?,
            select_checkpoints: p("SELECT partition, position FROM checkpoints WHERE consumer = ?".into()).await?,
            // One more than a profile may hold tells it is too many.
            select_links: p(format!("SELECT linked, first_seen FROM identity_links WHERE workspace = ? AND id = ? LIMIT {}", MAX_PROFILE_IDENTIFIERS + 1)).await?,
            select_traits: p("SELECT name, value FROM traits WHERE workspace = ? AND id = ?".into()).await?,
            buckets_asc: p("SELECT bucket FROM timeline_buckets WHERE workspace = ? AND id = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket ASC".into()).await?,
            buckets_desc: p("SELECT bucket FROM timeline_buckets WHERE workspace = ? AND id = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket DESC".into()).await?,
            timeline_asc_from: p(tl("AND time >= ? AND time < ? ORDER BY time ASC, message_id ASC LIMIT ?")).await?,
            timeline_asc_after: p(tl("AND (time, message_id) > (?, ?) AND (time, message_id) < (?, '') ORDER BY time ASC, message_id ASC LIMIT ?")).await?,
            timeline_desc_from: p(tl("AND time >= ? AND time < ? ORDER BY time DESC, message_id DESC LIMIT ?")).await?,
            timeline_desc_before: p(tl("AND (time, message_id) >= (?, '') AND (time, message_id) < (?, ?) ORDER BY time DESC, message_id DESC LIMIT ?")).await?,
            insert_workspace: p("INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)".into()).await?,
            select_workspaces: p("SELECT id, name, created_at FROM workspaces".into()).await?,
            insert_credential: p("INSERT INTO credentials (credential, workspace_id, source_id) VALUES (?, ?, ?)".into()).await?,
            select_credential: p("SELECT workspace_id, source_id FROM credentials WHERE credential = ?".into()).await?,
            ready: p("SELECT version FROM schema_migrations WHERE version = ?".into()).await?,
        })
    }
}

/// The ScyllaDB/Cassandra [`ProfileStore`] and [`WorkspaceDirectory`].
#[derive(Clone)]
pub struct ScyllaStore {
    session: Arc<Session>,
    st: Arc<Statements>,
    keyspace: Arc<str>,
}

async fn open_session(config: &ScyllaConfig, keyspace: Option<&str>) -> Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .request_timeout(Some(Duration::from_secs(10)))
        .build()
        .into_handle();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.hosts)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile);
    if let Some(ks) = keyspace {
        builder = builder.use_keyspace(ks, false);
    }
    builder.build().await.map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot reach the store at {}: {e}",
            config.hosts.join(",")
        ))
    })
}

/// Qualifies the table of a DML statement with the keyspace.
fn qualify(cql: &str, keyspace: &str) -> String {
    let mut out = cql.to_owned();
    for verb in ["INSERT INTO ", " FROM ", "UPDATE ", "TRUNCATE "] {
        if let Some(at) = out.find(verb) {
            out.insert_str(at + verb.len(), &format!("{keyspace}."));
        }
    }
    out
}

/// The schema version recorded in the keyspace (0: none).
async fn schema_version(session: &Session, keyspace: &str) -> Result<i32> {
    let rows = session
        .query_unpaged(
            qualify("SELECT version FROM schema_migrations", keyspace),
            (),
        )
        .await;
    let rows = match rows {
        Ok(r) => r,
        // No table yet: nothing was migrated.
        Err(ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Invalid,
            _,
        ))) => {
            return Ok(0);
        }
        Err(e) => return Err(classify(e)),
    };
    let rows = rows.into_rows_result().map_err(corrupt)?;
    let mut max = 0;
    for r in rows.rows::<(i32,)>().map_err(corrupt)? {
        max = max.max(r.map_err(corrupt)?.0);
    }
    Ok(max)
}

impl ScyllaStore {
    /// Connects to the keyspace and checks that its schema is the one this
    /// build expects (`trailmark migrate` brings it there).
    pub async fn connect(config: &ScyllaConfig) -> Result<Self> {
        let session = open_session(config, None).await?;
        let keyspaces = session
            .query_unpaged(
                "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
                (config.keyspace.as_str(),),
            )
            .await
            .map_err(classify)?
            .into_rows_result()
            .map_err(corrupt)?
            .rows_num();
        if keyspaces == 0 {
            return Err(StoreError::Invalid(format!(
                "keyspace {} does not exist: run `trailmark migrate` first",
                config.keyspace
            )));
        }
        let found = schema_version(&session, &config.keyspace).await?;
        let want = schema::current_version();
        if found != want {
            let advice = if found < want {
                "run `trailmark migrate`"
            } else {
                "this build is older than the schema; upgrade it"
            };
            return Err(StoreError::Invalid(format!(
                "store schema of keyspace {} is at version {found}, this build needs {want}: {advice}",
                config.keyspace
            )));
        }
        let st = Statements::prepare(&session, &config.keyspace).await?;
        Ok(Self {
            session: Arc::new(session),
            st: Arc::new(st),
            keyspace: config.keyspace.as_str().into(),
        })
    }

    /// Creates the keyspace if needed and applies every missing migration, in
    /// order. Returns the versions it applied (none when already current).
    pub async fn migrate(config: &ScyllaConfig) -> Result<Vec<i32>> {
        let session = open_session(config, None).await?;
        let run = |cql: String| {
            let session = &session;
            async move {
                let mut st = Statement::new(cql);
                // Schema changes need every replica; a timeout is fatal here.
                st.set_consistency(Consistency::All);
                session.query_unpaged(st, ()).await.map_err(classify)?;
                session
                    .await_schema_agreement()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Ok::<_, StoreError>(())
            }
        };
        run(format!(
            "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
            config.keyspace,
            config.replication()
        ))
        .await?;
        session
            .use_keyspace(&config.keyspace, false)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        run(schema::MIGRATIONS_TABLE.to_owned()).await?;
        let found = schema_version(&session, &config.keyspace).await?;
        let mut applied = Vec::new();
        for m in schema::MIGRATIONS.iter().filter(|m| m.version > found) {
            tracing::info!(
                version = m.version,
                description = m.description,
                "applying store migration"
            );
            for s in m.statements {
                run((*s).to_owned()).await?;
            }
            session
                .query_unpaged(
                    qualify("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, toTimestamp(now()))", &config.keyspace),
                    (m.version, m.description),
                )
                .await
                .map_err(classify)?;
            applied.push(m.version);
        }
        Ok(applied)
    }

    async fn rows<'a, R>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<R>>
    where
        R: for<'f> scylla::deserialize::row::DeserializeRow<'f, 'f>,
    {
        let result = self
            .session
            .execute_unpaged(st, values)
            .await
            .map_err(classify)?;
        let rows = result.into_rows_result().map_err(corrupt)?;
        rows.rows::<R>()
            .map_err(corrupt)?
            .map(|r| r.map_err(corrupt))
            .collect()
    }

    async fn write(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<()> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

/// Runs futures with at most [`CONCURRENCY`] in flight; the first error wins.
/// (Built from a list, not a closure over borrowed items, so that the future
/// stays `Send` for every lifetime `async_trait` asks of it.)
async fn concurrently<T, F>(futures: Vec<F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T>>,
{
    stream::iter(futures)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// A write of the fold, issued concurrently with the others.
enum Write {
    Link {
        ws: String,
        id: String,
        linked: String,
    },
    FirstSeen {
        ws: String,
        id: String,
        time: i64,
    },
    Trait {
        ws: String,
        id: String,
        name: String,
        value: TraitValue,
    },
    Timeline {
        ws: String,
        id: String,
        time: i64,
        message_id: String,
        counter: String,
        body: String,
    },
    Bucket {
        ws: String,
        id: String,
        bucket: i64,
    },
    Stats {
        ws: String,
        id: String,
        row: StatsRow,
    },
}

/// A `stats` row: seen times, counts, and how far each partition is included.
#[derive(Debug, Clone, Default)]
struct StatsRow {
    seen: Option<Seen>,
    counts: BTreeMap<String, i64>,
    applied: BTreeMap<i32, i64>,
}

impl StatsRow {
    /// Folds in the event at `position` of `partition`, unless the row
    /// already includes it (counted before a crash cut a batch short).
    /// Returns whether the row changed.
    fn count(&mut self, partition: u32, position: u64, counter: String, time: i64) -> bool {
        let (partition, position) = (partition as i32, position as i64);
        if self
            .applied
            .get(&partition)
            .is_some_and(|next| *next > position)
        {
            return false;
        }
        self.seen = Some(match self.seen {
            Some(s) => s.include(time),
            None => Seen {
                first: time,
                last: time,
            },
        });
        *self.counts.entry(counter).or_default() += 1;
        self.applied.insert(partition, position + 1);
        true
    }

    /// The row's write timestamp: the sum of its partitions' positions, which
    /// grows with every event folded in. A projector that lost its partition
    /// (evicted during a long stall) but still writes folds fewer events than
    /// the one that took over, so its late write loses instead of erasing
    /// counts; and coordinators' clocks never order these writes.
    fn fence(&self) -> i64 {
        self.applied
            .values()
            .fold(0i64, |a, p| a.saturating_add(*p))
    }
}

impl ScyllaStore {
    async fn run(&self, w: Write) -> Result<()> {
        let st = &self.st;
        match w {
            Write::Link { ws, id, linked } => self.write(&st.insert_link, (ws, id, linked)).await,
            Write::FirstSeen { ws, id, time } => {
                self.write(&st.first_seen, (first_seen_timestamp(time), time, ws, id))
                    .await
            }
            Write::Trait {
                ws,
                id,
                name,
                value,
            } => {
                let ts = trait_timestamp(value.updated_at);
                self.write(&st.upsert_trait, (ts, encode_trait(&value), ws, id, name))
                    .await
            }
            Write::Timeline {
                ws,
                id,
                time,
                message_id,
                counter,
                body,
            } => {
                self.write(
                    &st.insert_timeline,
                    (ws, id, bucket_of(time), time, message_id, counter, body),
                )
                .await
            }
            Write::Bucket { ws, id, bucket } => {
                self.write(&st.insert_bucket, (ws, id, bucket)).await
            }
            Write::Stats { ws, id, row } => {
                let seen = row.seen.unwrap_or(Seen { first: 0, last: 0 });
                let fence = row.fence();
                self.write(
                    &st.upsert_stats,
                    (
                        ws,
                        id,
                        seen.first,
                        seen.last,
                        row.counts,
                        row.applied,
                        fence,
                    ),
                )
                .await
            }
        }
    }

    async fn run_all(&self, writes: Vec<Write>) -> Result<()> {
        let mut futures = Vec::with_capacity(writes.len());
        for w in writes {
            futures.push(self.run(w));
        }
        concurrently(futures).await?;
        Ok(())
    }

    async fn read_stats(&self, ws: &str, id: &str) -> Result<StatsRow> {
        type Row = (
            Option<i64>,
            Option<i64>,
            Option<BTreeMap<String, i64>>,
            Option<BTreeMap<i32, i64>>,
        );
        let rows: Vec<Row> = self.rows(&self.st.select_stats, (ws, id)).await?;
        Ok(match rows.into_iter().next() {
            None => StatsRow::default(),
            Some((first, last, counts, applied)) => StatsRow {
                seen: first.zip(last).map(|(first, last)| Seen { first, last }),
                counts: counts.unwrap_or_default(),
                applied: applied.unwrap_or_default(),
            },
        })
    }

    /// The `(workspace, messageId) → receivedAt` rows of the batch's messages.
    async fn read_dedup(
        &self,
        keys: HashSet<(String, String)>,
    ) -> Result<HashMap<(String, String), i64>> {
        let mut reads = Vec::with_capacity(keys.len());
        for (ws, mid) in keys {
            reads.push(async move {
                let rows: Vec<(i64,)> = self.rows(&self.st.select_dedup, (&ws, &mid)).await?;
                Ok::<_, StoreError>(rows.first().map(|r| ((ws, mid), r.0)))
            });
        }
        let found = concurrently(reads).await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Forgets which messages were applied, as if the process had died after
    /// writing a batch's effects but before its de-duplication rows. Only for
    /// tests of the replay path.
    #[doc(hidden)]
    pub async fn forget_applied_messages_for_test(&self) -> Result<()> {
        self.session
            .query_unpaged(qualify("TRUNCATE dedup", &self.keyspace), ())
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// The links of one identifier, and its earliest time.
    async fn links(&self, ws: &str, id: &str) -> Result<Option<(i64, Vec<String>)>> {
        let rows: Vec<(Option<String>, Option<i64>)> =
            self.rows(&self.st.select_links, (ws, id)).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let first = rows.iter().find_map(|r| r.1).unwrap_or(0);
        Ok(Some((
            first,
            rows.into_iter().filter_map(|r| r.0).collect(),
        )))
    }
}

/// One identifier's timeline rows, as read.
struct Row {
    time: i64,
    message_id: String,
    counter: String,
    body: String,
}

impl ScyllaStore {
    /// Reads rows of one bucket after `cursor` in the query's direction.
    async fn scan_bucket(
        &self,
        ws: &str,
        id: &str,
        bucket: i64,
        q: &TimelineQuery,
        cursor: Option<&(i64, String)>,
        limit: usize,
    ) -> Result<Vec<Row>> {
        let st = &self.st;
        let lo = q.start.unwrap_or(i64::MIN);
        let hi = q.end.unwrap_or(i64::MAX);
        let n = limit.min(i32::MAX as usize) as i32;
        type R = (i64, String, String, String);
        let rows: Vec<R> = match (q.descending, cursor) {
            (false, Some((t, m))) if *t >= lo => {
                self.rows(&st.timeline_asc_after, (ws, id, bucket, *t, m, hi, n))
                    .await?
            }
            (false, _) => {
                self.rows(&st.timeline_asc_from, (ws, id, bucket, lo, hi, n))
                    .await?
            }
            (true, Some((t, m))) if *t < hi => {
                self.rows(&st.timeline_desc_before, (ws, id, bucket, lo, *t, m, n))
                    .await?
            }
            (true, _) => {
                self.rows(&st.timeline_desc_from, (ws, id, bucket, lo, hi, n))
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(time, message_id, counter, body)| Row {
                time,
                message_id,
                counter,
                body,
            })
            .collect())
    }

    /// The first `want` matching rows of one identifier's timeline, in the
    /// query's order, walking its buckets.
    async fn identifier_timeline(
        &self,
        ws: &str,
        id: &str,
        q: &TimelineQuery,
        want: usize,
    ) -> Result<Vec<Row>> {
        let mut lo = bucket_of(q.start.unwrap_or(i64::MIN));
        let mut hi = bucket_of(q.end.map(|e| e.saturating_sub(1)).unwrap_or(i64::MAX));
        if let Some((t, _)) = &q.after {
            if q.descending {
                hi = hi.min(bucket_of(*t));
            } else {
                lo = lo.max(bucket_of(*t));
            }
        }
        if lo > hi {
            return Ok(Vec::new());
        }
        let st = if q.descending {
            &self.st.buckets_desc
        } else {
            &self.st.buckets_asc
        };
        let buckets: Vec<(i64,)> = self.rows(st, (ws, id, lo, hi)).await?;
        let mut out = Vec::new();
        let mut cursor = q.after.clone();
        for (bucket,) in buckets {
            loop {
                let need = want - out.len();
                // A filter is applied here, so read more per round trip.
                let fetch = if q.event.is_some() {
                    need.max(500)
                } else {
                    need
                };
                let rows = self
                    .scan_bucket(ws, id, bucket, q, cursor.as_ref(), fetch)
                    .await?;
                let got = rows.len();
                for r in rows {
                    cursor = Some((r.time, r.message_id.clone()));
                    if q.event.as_deref().is_none_or(|e| e == r.counter) {
                        out.push(r);
                        if out.len() == want {
                            return Ok(out);
                        }
                    }
                }
                if got < fetch {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// The writes of a batch's new events, coalesced: within a batch each
/// identifier's earliest time, each link, each trait's winner and each bucket
/// are written once (they are idempotent, so once is as good as many), and
/// each event's timeline row once. Counts are left to the caller, per primary
/// identifier: `(partition, position, counter, time)` in log order.
struct Plan {
    writes: Vec<Write>,
    by_primary: CountsByPrimary,
}

/// Per `(workspace, primary identifier)`: `(partition, position, counter,
/// time)` of each new event, in log order.
type CountsByPrimary = BTreeMap<(String, String), Vec<(u32, u64, String, i64)>>;

fn plan(events: &[&LoggedEvent]) -> Result<Plan> {
    let mut writes = Vec::with_capacity(events.len() * 2);
    let mut by_primary = CountsByPrimary::new();
    let mut first_seen: HashMap<(String, String), i64> = HashMap::new();
    let mut links: HashSet<(String, String, String)> = HashSet::new();
    let mut traits: HashMap<(String, String, String), TraitValue> = HashMap::new();
    let mut buckets: HashSet<(String, String, i64)> = HashSet::new();
    for le in events {
        let ev = &le.event;
        let ws = &ev.workspace_id;
        for fact in project(ev)?.facts {
            match fact {
                Fact::Named { id, time } => {
                    first_seen
                        .entry((ws.clone(), id_text(&id)))
                        .and_modify(|t| *t = (*t).min(time))
                        .or_insert(time);
                }
                Fact::Linked {
                    id,
                    other,
                    // Not kept yet; the merge explanation will store it.
                    evidence: _,
                } => {
                    let (id, other) = (id_text(&id), id_text(&other));
                    links.insert((ws.clone(), id.clone(), other.clone()));
                    links.insert((ws.clone(), other, id));
                }
                Fact::Trait { id, name, value } => {
                    match traits.entry((ws.clone(), id_text(&id), name)) {
                        std::collections::hash_map::Entry::Occupied(mut o) => {
                            if value.supersedes(o.get()) {
                                o.insert(value);
                            }
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(value);
                        }
                    }
                }
                Fact::Counted { id, counter, time } => {
                    by_primary
                        .entry((ws.clone(), id_text(&id)))
                        .or_default()
                        .push((le.partition, le.position, counter, time));
                }
                Fact::Timeline {
                    id,
                    time,
                    message_id,
                    counter,
                } => {
                    let id = id_text(&id);
                    buckets.insert((ws.clone(), id.clone(), bucket_of(time)));
                    let mut body = Vec::with_capacity(512);
                    ev.write_api_json(&mut body);
                    writes.push(Write::Timeline {
                        ws: ws.clone(),
                        id,
                        time,
                        message_id,
                        counter,
                        body: String::from_utf8(body).map_err(corrupt)?,
                    });
                }
            }
        }
    }
    writes.extend(
        first_seen
            .into_iter()
            .map(|((ws, id), time)| Write::FirstSeen { ws, id, time }),
    );
    writes.extend(
        links
            .into_iter()
            .map(|(ws, id, linked)| Write::Link { ws, id, linked }),
    );
    writes.extend(
        traits
            .into_iter()
            .map(|((ws, id, name), value)| Write::Trait {
                ws,
                id,
                name,
                value,
            }),
    );
    writes.extend(
        buckets
            .into_iter()
            .map(|(ws, id, bucket)| Write::Bucket { ws, id, bucket }),
    );
    Ok(Plan { writes, by_primary })
}

impl ScyllaStore {
    /// Writes the rows `apply` would write for `events` (stats rows from the
    /// batch alone, de-duplication rows), blind: no reads, no decisions, no
    /// checkpoint. Only for the benchmark baseline, "a plain write loop of
    /// the same rows"; it does not keep the store's guarantees.
    #[doc(hidden)]
    pub async fn write_rows_blind_for_baseline(&self, events: &[LoggedEvent]) -> Result<()> {
        let refs: Vec<&LoggedEvent> = events.iter().collect();
        let Plan {
            mut writes,
            by_primary,
        } = plan(&refs)?;
        for ((ws, id), evs) in by_primary {
            let mut row = StatsRow::default();
            for (partition, position, counter, time) in evs {
                row.count(partition, position, counter, time);
            }
            writes.push(Write::Stats { ws, id, row });
        }
        self.run_all(writes).await?;
        let mut marks = Vec::with_capacity(events.len());
        for le in events {
            let ev = &le.event;
            marks.push(self.write(
                &self.st.insert_dedup,
                (&ev.workspace_id, &ev.message_id, ev.received_at, 176_400),
            ));
        }
        concurrently(marks).await?;
        Ok(())
    }
}

#[async_trait]
impl ProfileWriter for ScyllaStore {
    async fn apply(&self, batch: ApplyBatch) -> Result<ApplyOutcome> {
        let window = batch.dedup_window_micros;
        // 1. Which events are new: the stored rows, then the batch itself.
        let keys: HashSet<(String, String)> = batch
            .events
            .iter()
            .map(|e| (e.event.workspace_id.clone(), e.event.message_id.clone()))
            .collect();
        let mut latest = self.read_dedup(keys).await?;
        let mut outcome = ApplyOutcome::default();
        let mut fresh: Vec<&LoggedEvent> = Vec::with_capacity(batch.events.len());
        let mut dedup_rows: HashMap<(String, String), i64> = HashMap::new();
        for le in &batch.events {
            let ev = &le.event;
            let key = (ev.workspace_id.clone(), ev.message_id.clone());
            if is_duplicate(latest.get(&key).copied(), ev.received_at, window) {
                outcome.duplicates += 1;
                continue;
            }
            latest.insert(key.clone(), ev.received_at);
            dedup_rows.insert(key, ev.received_at);
            fresh.push(le);
        }
        outcome.applied = fresh.len();

        // 2. Their effects: blind writes, and counts folded per identifier.
        let Plan { writes, by_primary } = plan(&fresh)?;
        let mut folds = Vec::with_capacity(by_primary.len());
        for ((ws, id), events) in by_primary {
            folds.push(async move {
                let mut row = self.read_stats(&ws, &id).await?;
                let mut changed = false;
                for (partition, position, counter, time) in events {
                    changed |= row.count(partition, position, counter, time);
                }
                Ok::<_, StoreError>(changed.then_some(Write::Stats { ws, id, row }))
            });
        }
        let stats = concurrently(folds).await?;
        self.run_all(writes).await?;
        // Counts last: if another write fails for good (and the event ends up
        // a dead letter), it has not been counted.
        self.run_all(stats.into_iter().flatten().collect()).await?;

        // 3. Only now: "this message is applied".
        let ttl = (window / 1_000_000)
            .saturating_mul(2)
            .saturating_add(3_600)
            .clamp(1, 630_720_000) as i32;
        let mut marks = Vec::with_capacity(dedup_rows.len());
        for ((ws, mid), received) in dedup_rows {
            marks.push(async move {
                self.write(&self.st.insert_dedup, (ws, mid, received, ttl))
                    .await
            });
        }
        concurrently(marks).await?;

        // 4. The checkpoints: one partition, so one unlogged batch.
        if !batch.positions.is_empty() {
            let mut b = Batch::new(BatchType::Unlogged);
            let mut values = Vec::new();
            for (partition, position) in &batch.positions {
                b.append_statement(self.st.upsert_checkpoint.clone());
                // Fenced by the position: a late write from a projector that
                // lost the partition never moves the checkpoint back.
                values.push((
                    batch.consumer.as_str(),
                    *partition as i32,
                    *position as i64,
                    *position as i64,
                ));
            }
            b.set_is_idempotent(true);
            self.session.batch(&b, values).await.map_err(classify)?;
        }
        Ok(outcome)
    }

    async fn checkpoints(&self, consumer: &str) -> Result<BTreeMap<u32, u64>> {
        let rows: Vec<(i32, i64)> = self.rows(&self.st.select_checkpoints, (consumer,)).await?;
        Ok(rows
            .into_iter()
            .map(|(p, pos)| (p as u32, pos as u64))
            .collect())
    }

    async fn reset_projections(&self) -> Result<()> {
        for table in schema::PROJECTION_TABLES {
            let mut st = Statement::new(qualify(&format!("TRUNCATE {table}"), &self.keyspace));
            st.set_request_timeout(Some(Duration::from_secs(60)));
            self.session.query_unpaged(st, ()).await.map_err(classify)?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProfileReader for ScyllaStore {
    async fn resolve(&self, workspace: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        // The component is walked breadth-first, but only until it is known
        // to hold more than a profile may: then, whatever order the reads
        // completed in, the identifier stands alone (the domain's rule).
        let start = id_text(id);
        let mut found: BTreeMap<String, i64> = BTreeMap::new();
        let mut queued: HashSet<String> = HashSet::from([start.clone()]);
        let mut frontier = vec![start.clone()];
        while !frontier.is_empty() && queued.len() <= MAX_PROFILE_IDENTIFIERS {
            let mut reads = Vec::new();
            for node in frontier.drain(..) {
                reads.push(async move {
                    let links = self.links(workspace, &node).await?;
                    Ok::<_, StoreError>((node, links))
                });
            }
            let results = concurrently(reads).await?;
            for (node, links) in results {
                let Some((first, linked)) = links else {
                    continue;
                };
                found.insert(node, first);
                for l in linked {
                    if queued.insert(l.clone()) {
                        frontier.push(l);
                    }
                }
            }
        }
        let Some(&first) = found.get(&start) else {
            return Ok(None);
        };
        if queued.len() > MAX_PROFILE_IDENTIFIERS {
            tracing::debug!(
                workspace,
                "identifier in an oversized component stands alone"
            );
            found = BTreeMap::from([(start, first)]);
        }
        let mut identifiers = BTreeMap::new();
        for (text, first) in found {
            identifiers.insert(parse_id(&text)?, first);
        }
        let root = identifiers.keys().next().expect("not empty").clone();
        Ok(Some(ProfileRef { root, identifiers }))
    }

    async fn traits(
        &self,
        workspace: &str,
        profile: &ProfileRef,
    ) -> Result<BTreeMap<String, TraitValue>> {
        let mut reads = Vec::new();
        for id in profile.identifiers.keys() {
            let id = id_text(id);
            reads.push(async move {
                self.rows::<(String, Vec<u8>)>(&self.st.select_traits, (workspace, id))
                    .await
            });
        }
        let per_id = concurrently(reads).await?;
        let mut out = BTreeMap::new();
        for (name, cell) in per_id.into_iter().flatten() {
            merge_trait(&mut out, name, decode_trait(&cell)?);
        }
        Ok(out)
    }

    async fn metadata(&self, workspace: &str, profile: &ProfileRef) -> Result<ProfileMetadata> {
        let mut reads = Vec::new();
        for id in profile.identifiers.keys() {
            let id = id_text(id);
            reads.push(async move { self.read_stats(workspace, &id).await });
        }
        let rows = concurrently(reads).await?;
        let mut meta = ProfileMetadata {
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            counts: BTreeMap::new(),
        };
        for row in rows {
            if let Some(seen) = row.seen {
                meta.first_seen = meta.first_seen.min(seen.first);
                meta.last_seen = meta.last_seen.max(seen.last);
            }
            for (name, n) in row.counts {
                *meta.counts.entry(name).or_default() += n.max(0) as u64;
            }
        }
        if meta.first_seen == i64::MAX {
            meta.first_seen = 0;
            meta.last_seen = 0;
        }
        Ok(meta)
    }

    async fn timeline(
        &self,
        workspace: &str,
        profile: &ProfileRef,
        query: &TimelineQuery,
    ) -> Result<TimelinePage> {
        let limit = query.limit.max(1);
        let mut reads = Vec::new();
        for id in profile.identifiers.keys() {
            let id = id_text(id);
            reads.push(async move {
                self.identifier_timeline(workspace, &id, query, limit + 1)
                    .await
            });
        }
        let per_id = concurrently(reads).await?;
        let mut rows: Vec<Row> = per_id.into_iter().flatten().collect();
        rows.sort_by(|a, b| (a.time, &a.message_id).cmp(&(b.time, &b.message_id)));
        if query.descending {
            rows.reverse();
        }
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let entries = rows
            .into_iter()
            .map(|r| {
                Ok(TimelineEntry {
                    time: r.time,
                    message_id: r.message_id,
                    json: RawValue::from_string(r.body).map_err(|_| corrupt("timeline json"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(TimelinePage { entries, has_more })
    }

    async fn check_ready(&self) -> Result<()> {
        let rows: Vec<(i32,)> = self
            .rows(&self.st.ready, (schema::current_version(),))
            .await?;
        if rows.is_empty() {
            return Err(StoreError::Unavailable("store schema is missing".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl WorkspaceDirectory for ScyllaStore {
    async fn create_workspace(
        &self,
        name: &str,
        write_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<CreatedWorkspace> {
        let created = CreatedWorkspace::new(name, write_key, token)?;
        let (id, source_id) = (&created.workspace.id, &created.source_id);
        // The name and credentials are checked, then written. Not a lightweight transaction:
        // ScyllaDB keyspaces with tablets do not support them, and generated
        // credentials are random; only a supplied one can collide, and the
        // commands that supply one run alone.
        let credentials = [
            format!("w:{}", created.write_key),
            format!("t:{}", token_digest(&created.token)),
        ];
        if self.workspaces().await?.iter().any(|w| w.name == name) {
            return Err(StoreError::Conflict(format!("a workspace named {name:?}")));
        }
        for (credential, what) in credentials.iter().zip(["write key", "token"]) {
            let taken: Vec<(String, String)> =
                self.rows(&self.st.select_credential, (credential,)).await?;
            if !taken.is_empty() {
                return Err(StoreError::Conflict(what.into()));
            }
        }
        let created_at = created.workspace.created_at;
        self.write(&self.st.insert_workspace, (id, name, created_at))
            .await?;
        for credential in &credentials {
            self.write(&self.st.insert_credential, (credential, id, source_id))
                .await?;
        }
        Ok(created)
    }

    async fn workspaces(&self) -> Result<Vec<Workspace>> {
        let pager = self
            .session
            .execute_iter(self.st.select_workspaces.clone(), ())
            .await
            .map_err(classify)?;
        let rows: Vec<(String, Option<String>, Option<i64>)> = pager
            .rows_stream::<(String, Option<String>, Option<i64>)>()
            .map_err(corrupt)?
            .try_collect()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut out: Vec<Workspace> = rows
            .into_iter()
            .map(|(id, name, created_at)| Workspace {
                id,
                name: name.unwrap_or_default(),
                created_at: created_at.unwrap_or(0),
            })
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn resolve_write_key(&self, write_key: &str) -> Result<Option<WriteGrant>> {
        let rows: Vec<(String, String)> = self
            .rows(&self.st.select_credential, (format!("w:{write_key}"),))
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(workspace_id, source_id)| WriteGrant {
                workspace_id,
                source_id,
            }))
    }

    async fn resolve_token(&self, token: &str) -> Result<Option<ReadGrant>> {
        let rows: Vec<(String, String)> = self
            .rows(
                &self.st.select_credential,
                (format!("t:{}", token_digest(token)),),
            )
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(workspace_id, _)| ReadGrant { workspace_id }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let c = ScyllaConfig::from_uri("scylla://127.0.0.1:9042").unwrap();
        assert_eq!(c.hosts, vec!["127.0.0.1:9042"]);
        assert_eq!(c.keyspace, "trailmark");
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        let c = ScyllaConfig::from_uri(
            "scylla://a,b:9043/prod_ks?replication_factor=3&dc=eu1&consistency=quorum",
        )
        .unwrap();
        assert_eq!(c.hosts, vec!["a:9042", "b:9043"]);
        assert_eq!(c.keyspace, "prod_ks");
        assert_eq!(c.replication_factor, 3);
        assert!(c.replication().contains("NetworkTopologyStrategy"));
        assert_eq!(c.consistency, Consistency::Quorum);
        for bad in [
            "cassandra://x",
            "scylla://",
            "scylla://h/bad-name",
            "scylla://h?consistency=some",
            "scylla://h?replication_factor=0",
            "scylla://h?what=1",
        ] {
            assert!(ScyllaConfig::from_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statements_name_their_keyspace() {
        assert_eq!(
            qualify("SELECT a FROM t WHERE x = ?", "ks"),
            "SELECT a FROM ks.t WHERE x = ?"
        );
        assert_eq!(
            qualify("INSERT INTO t (a) VALUES (?)", "ks"),
            "INSERT INTO ks.t (a) VALUES (?)"
        );
        assert_eq!(
            qualify("UPDATE t USING TIMESTAMP ? SET a = ?", "ks"),
            "UPDATE ks.t USING TIMESTAMP ? SET a = ?"
        );
        assert_eq!(qualify("TRUNCATE t", "ks"), "TRUNCATE ks.t");
    }

    #[test]
    fn trait_cells_round_trip_and_order_by_message_id() {
        let v = |m: &str| TraitValue {
            value: serde_json::json!({"plan": m}),
            updated_at: 7,
            message_id: m.into(),
        };
        for m in ["", "m1", "a-much-longer-message-id"] {
            assert_eq!(decode_trait(&encode_trait(&v(m))).unwrap(), v(m));
        }
        // On a timestamp tie the larger cell wins: it must be the larger id.
        for (small, large) in [("m1", "m2"), ("m", "m0"), ("abc", "abd"), ("", "a")] {
            assert!(
                encode_trait(&v(large)) > encode_trait(&v(small)),
                "{small} < {large}"
            );
            assert!(v(large).supersedes(&v(small)));
        }
        assert!(decode_trait(b"x").is_err());
        assert!(decode_trait(&[0, 0, 0, 0, 200]).is_err());
    }

    const T_2026: i64 = 1_780_000_000_000_000;

    #[test]
    fn buckets_are_weeks_and_floor_negative_times() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(BUCKET_MICROS - 1), 0);
        assert_eq!(bucket_of(BUCKET_MICROS), 1);
        assert_eq!(bucket_of(-1), -1);
        const LAST: i64 = 253_402_300_799_000_000; // 9999-12-31T23:59:59Z
        const FIRST: i64 = -62_135_596_800_000_000; // 0001-01-01T00:00:00Z
        // Every event time of years 1..9999 maps to a negative write
        // timestamp (never in the future), without overflow, in order.
        for (a, b) in [(FIRST, 0), (0, T_2026), (T_2026, LAST)] {
            assert!(trait_timestamp(a) < trait_timestamp(b));
            assert!(first_seen_timestamp(a) > first_seen_timestamp(b));
        }
        for t in [FIRST, LAST] {
            assert!(trait_timestamp(t) < 0 && first_seen_timestamp(t) < 0);
            assert!(first_seen_timestamp(t) > i64::MIN + 1);
        }
    }
}
