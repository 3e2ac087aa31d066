//! The distributed store: [`trailmark_store::ProfileStore`] and [`WorkspaceDirectory`] on
//! ScyllaDB, or on Apache Cassandra, which speaks the same CQL (`scylla://`
//! URIs). The binary wires it in; the services only see the traits. Tests run
//! it against a real Cassandra 5 with the same conformance suite as the
//! embedded store.
//!
//! # Delivery guarantee
//! CQL has no atomic write across partitions, so [`ProfileWriter::apply`] makes
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
//! - **Identity** is kept as the domain defines it, as evidence, and decided
//!   on read ([`trailmark_domain::identity::Walk`]): `identity_evidence`
//!   holds one piece per slot under each identifier of it that is not
//!   blocked, the smallest key winning by write timestamp `-SHIFT -
//!   receivedAt` (on a tie, by the larger value, which starts with the
//!   inverted `messageId`: see [`trailmark_store::identity`]). Evidence only
//!   accumulates, so projectors of different partitions can link the same
//!   person at once without a race. An identifier's record in `identities`
//!   keeps its earliest time, latest time and first key the same way, cell
//!   by cell; `profile_ids` maps each profile id back to its identifier.
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
//! checkpoint's, which stays inside one partition.
//!
//! # Consistency
//! Every read and write runs at `LOCAL_QUORUM` by default (`QUORUM`,
//! `EACH_QUORUM` and `ALL` are accepted too); `ONE`, `LOCAL_ONE`, `TWO`,
//! `THREE` and `ANY` are refused when the URI is parsed. The fold above
//! depends on it:
//! - **Read-your-writes across projectors.** Counts and seen times are read,
//!   folded and written back, and a projector that takes over a partition
//!   reads the checkpoint and the per-partition positions its predecessor
//!   wrote. With replication factor 3, a quorum write reaches 2 replicas and
//!   a quorum read asks 2, so every read meets at least one replica holding
//!   the last acknowledged write, and the newest cell wins.
//! - **At `ONE` that breaks.** A read can be answered by the replica that
//!   missed the last write (it was down, or its hint is not yet delivered).
//!   The projector then folds the batch onto a stale count row, and writes
//!   it back with a *higher* write timestamp (the sum of positions), so it
//!   beats the correct row: the events between the stale and the true row
//!   are lost from the counts. A stale checkpoint sends it back into the log,
//!   and a stale de-duplication read lets a retried `messageId` through
//!   again, so counts double. Timelines and evidence, which are upserts and
//!   accumulations, would converge; counts would not.
//! - **Failures.** With one replica of three down, `LOCAL_QUORUM` reads and
//!   writes still succeed and the node catches up from hints (or repair).
//!   With two down, they fail: the projector retries with backoff and applies
//!   nothing, rather than apply at a level that cannot keep its promise.
//!   A write that timed out may have reached some replicas; it is retried as
//!   the idempotent write it is. Because every statement is idempotent, a
//!   request a node has not answered within 500 ms is also sent to the next
//!   node (speculative execution), so a node that hangs while it stops or
//!   starts costs that long, not the 10 s request timeout.
//!
//! `trailmark migrate` changes the schema at `ALL`, so it needs every node.
//!
//! # Layout
//! - `config`: [`ScyllaConfig`], from a `scylla://` URI;
//! - [`schema`]: the CQL migrations and which tables a rebuild empties;
//! - `statements`: the prepared statements;
//! - `fold`: the writer side, [`ProfileWriter`]: facts to idempotent writes;
//! - `read`: the reader side, [`ProfileReader`];
//! - `directory`: [`WorkspaceDirectory`];
//! - this file: the session, errors, and the encodings the others share.
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
use scylla::policies::speculative_execution::SimpleSpeculativeExecutionPolicy;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::unprepared::Statement;
use serde_json::value::RawValue;
use trailmark_domain::identity::{
    Evidence, Key, MAX_ID_EVIDENCE, RuleSettings, Rules, Walk, profile_id,
};
use trailmark_domain::profile::{
    Fact, Named, Seen, TraitValue, is_duplicate, merge_trait, project,
};
use trailmark_domain::{IdKind, Identifier};
use trailmark_store::identity::{
    decode_evidence, decode_first, encode_evidence, encode_first, profile_ref, slot_digest,
};
use trailmark_store::{
    ApplyBatch, ApplyOutcome, CreatedWorkspace, LoggedEvent, ProfileMetadata, ProfileReader,
    ProfileRef, ProfileWriter, ReadGrant, Result, Scope, StoreError, TimelineEntry, TimelinePage,
    TimelineQuery, Workspace, WorkspaceDirectory, WriteGrant, new_secret, token_key,
};

mod config;
mod directory;
mod evaluator;
mod fold;
mod read;
pub mod schema;
mod statements;

pub use config::ScyllaConfig;
use statements::{Membership, Statements};

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

/// The ScyllaDB/Cassandra [`trailmark_store::ProfileStore`] and [`WorkspaceDirectory`].
#[derive(Clone)]
pub struct ScyllaStore {
    session: Arc<Session>,
    st: Arc<Statements>,
    keyspace: Arc<str>,
    /// Workspaces' identity rules, each read at most every
    /// [`RULES_TTL`]: another process may change them.
    rules: Arc<std::sync::Mutex<RulesCache>>,
}

/// Identity rules by workspace, with when each was read.
type RulesCache = HashMap<String, (std::time::Instant, Arc<Rules>)>;

/// How long a process trusts the identity rules it read: a change made
/// through another process applies to new data within this long.
pub const RULES_TTL: Duration = Duration::from_secs(10);

/// How long a request waits for a node before it is sent to the next one too.
const SPECULATE_AFTER: Duration = Duration::from_millis(500);

async fn open_session(config: &ScyllaConfig, keyspace: Option<&str>) -> Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .request_timeout(Some(Duration::from_secs(10)))
        // Every statement is idempotent, so a request that a node has not
        // answered within SPECULATE_AFTER is sent to the next node as well,
        // and the first answer wins: a node that hangs (shutting down,
        // restarting with a cold JVM) costs a projector that long, not the
        // request timeout.
        .speculative_execution_policy(Some(Arc::new(SimpleSpeculativeExecutionPolicy {
            max_retry_count: 2,
            retry_interval: SPECULATE_AFTER,
        })))
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
    /// A workspace's identity rules: its settings, else the defaults.
    pub(crate) async fn rules(&self, workspace: &str) -> Result<Arc<Rules>> {
        if let Some((at, r)) = self.rules.lock().expect("rules lock").get(workspace)
            && at.elapsed() < RULES_TTL
        {
            return Ok(r.clone());
        }
        let rules = match self.stored_rules(workspace).await? {
            Some(s) => Rules::from_settings(&s)
                .map_err(|e| StoreError::Corrupt(format!("identity rules: {e}")))?,
            None => Rules::default(),
        };
        let rules = Arc::new(rules);
        self.rules.lock().expect("rules lock").insert(
            workspace.to_owned(),
            (std::time::Instant::now(), rules.clone()),
        );
        Ok(rules)
    }

    pub(crate) async fn stored_rules(&self, workspace: &str) -> Result<Option<RuleSettings>> {
        let rows: Vec<(String,)> = self
            .rows(&self.st.select_setting, (workspace, "identity_rules"))
            .await?;
        rows.into_iter()
            .next()
            .map(|(v,)| serde_json::from_str(&v).map_err(|_| corrupt("identity rules")))
            .transpose()
    }

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
            rules: Default::default(),
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
            "scylla://h?consistency=one",
            "scylla://h?consistency=LOCAL_ONE",
            "scylla://h?consistency=any",
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
