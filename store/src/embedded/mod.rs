//! The embedded store, on fjall (an LSM tree): the default for one process.
//!
//! # Layout
//! One fjall database, one keyspace per kind of fact. Keys are built from
//! terminated, escaped components (see [`keys`]): no workspace, id type or
//! id value can spell another's key prefix. `id` below is `type value`;
//! times are 8 big-endian bytes with the sign bit flipped, so byte order is
//! time order.
//!
//! | keyspace     | key                                   | value                      |
//! |--------------|---------------------------------------|----------------------------|
//! | `meta`       | `projection_layout`                   | layout version (BE u32)    |
//! | `workspaces` | workspace id                          | [`Workspace`] JSON         |
//! | `credentials`| `w`/`t`/`r` NUL write key or digest    | grant JSON                 |
//! | `settings`   | ws name (`identity_rules`)            | settings JSON              |
//! | `checkpoints`| consumer partition (BE u32)           | position (BE u64)          |
//! | `dedup`      | consumer ws messageId                 | receivedAt (BE)            |
//! | `dedup_time` | consumer partition (BE u32) receivedAt (BE) dedup key | empty (purge index) |
//! | `identity`   | ws id                                 | [`Named`] record (`fold`)  |
//! | `evidence`   | ws id slot digest (16)                | identity evidence (`fold`)  |
//! | `profile_ids`| ws profile id (16)                    | id                         |
//! | `traits`     | ws id trait-name                      | [`TraitValue`] JSON        |
//! | `stats`      | ws id                                 | first, last, counts by name|
//! | `timeline`   | ws id time (BE) messageId             | counter len, counter, JSON |
//! | `account_members` | ws account member                | [`Named`] of the membership|
//! | `member_accounts` | ws member account                | [`Named`] of the membership|
//! | `evaluator`  | table code, part, sort (`evaluator`)   | the evaluator's row        |
//!
//! A store whose projections were written with another layout version is
//! emptied of them when opened; the projector then rebuilds them from the
//! log, as `trailmark rebuild` would.
//!
//! An account is an identifier of kind `group_id`: its record, traits and
//! timeline are kept like anyone's, and its memberships in both directions.
//!
//! Facts are kept per identifier and merged on read (see the domain's
//! profile module); which identifiers form a profile is decided on read from
//! the evidence ([`trailmark_domain::identity::Walk`]), so linking two
//! profiles rewrites nothing.
//!
//! # Atomicity
//! [`ProfileWriter::apply`] gathers a batch's writes in an overlay and commits
//! them with the checkpoint in one fjall `WriteBatch`, which is atomic across
//! keyspaces. fjall's journal recovers a prefix of committed batches, so after
//! a crash the checkpoint and the state it describes always agree.
//!
//! # Speed
//! Every memtable lookup is a skiplist walk of cache misses, so the fold keeps
//! them few: one `stats` row per identifier holds its seen times and counts,
//! and rows the fold reads often (identities, stats, traits) are cached in
//! memory across batches. Only the projector writes them, under the writer
//! lock, so the cache is exact. It is bounded in bytes
//! ([`EmbeddedOptions::cache_bytes`], counting keys, values and a per-row
//! overhead), not rows, since one trait may be 32 KB; it is emptied when
//! full and on reset.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use serde_json::value::RawValue;
use trailmark_domain::identity::{MAX_ID_EVIDENCE, RuleSettings, Rules, Walk};
use trailmark_domain::profile::{Named, Seen, TraitValue, merge_trait};
use trailmark_domain::{Event, Identifier};

use crate::identity::{decode_evidence, decode_named, profile_ref};
use crate::{
    ApplyBatch, ApplyOutcome, CreatedWorkspace, ProfileMetadata, ProfileReader, ProfileRef,
    ProfileWriter, ReadGrant, Result, Scope, StoreError, TimelineEntry, TimelinePage,
    TimelineQuery, Workspace, WorkspaceDirectory, WriteGrant, new_secret, token_digest,
};

mod directory;
mod evaluator;
mod fold;
pub mod keys;
mod read;

use keys::{LAYOUT_VERSION, take_id, time_bytes, time_from, ws_id_key, ws_key};

/// How far past the de-duplication window an entry is kept before it is
/// purged, so that small reorderings of `receivedAt` within a partition never
/// change a decision.
const DEDUP_PURGE_SLACK_MICROS: i64 = 3_600 * 1_000_000;

/// The keyspaces the fold writes, as a closed set, so a batch overlay can key
/// its pending writes by keyspace cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ks {
    Checkpoints,
    Dedup,
    DedupTime,
    Identity,
    Evidence,
    ProfileIds,
    Traits,
    Stats,
    Timeline,
    AccountMembers,
    MemberAccounts,
    Evaluator,
}

/// The keyspaces a rebuild keeps: the layout version, and tenants with their
/// credentials. Every other keyspace is one of [`Ks::PROJECTIONS`] (a test
/// checks the database holds no other).
const KEPT_KEYSPACES: [&str; 4] = ["meta", "workspaces", "credentials", "settings"];

impl Ks {
    const PROJECTIONS: [Ks; 12] = [
        Ks::Checkpoints,
        Ks::Dedup,
        Ks::DedupTime,
        Ks::Identity,
        Ks::Evidence,
        Ks::ProfileIds,
        Ks::Traits,
        Ks::Stats,
        Ks::Timeline,
        Ks::AccountMembers,
        Ks::MemberAccounts,
        Ks::Evaluator,
    ];

    /// The keyspace's name on disk.
    fn name(self) -> &'static str {
        match self {
            Ks::Checkpoints => "checkpoints",
            Ks::Dedup => "dedup",
            Ks::DedupTime => "dedup_time",
            Ks::Identity => "identity",
            Ks::Evidence => "evidence",
            Ks::ProfileIds => "profile_ids",
            Ks::Traits => "traits",
            Ks::Stats => "stats",
            Ks::Timeline => "timeline",
            Ks::AccountMembers => "account_members",
            Ks::MemberAccounts => "member_accounts",
            Ks::Evaluator => "evaluator",
        }
    }

    /// How many keyspaces the fold writes.
    const COUNT: usize = Self::PROJECTIONS.len();

    /// The keyspace's place in [`Ks::PROJECTIONS`].
    fn index(self) -> usize {
        self as usize
    }

    /// Rows the fold reads again and again, worth caching across batches.
    fn cached(self) -> bool {
        matches!(
            self,
            Ks::Identity | Ks::Evidence | Ks::Stats | Ks::Traits | Ks::AccountMembers
        )
    }
}

struct Keyspaces {
    meta: Keyspace,
    workspaces: Keyspace,
    credentials: Keyspace,
    settings: Keyspace,
    checkpoints: Keyspace,
    dedup: Keyspace,
    dedup_time: Keyspace,
    identity: Keyspace,
    evidence: Keyspace,
    profile_ids: Keyspace,
    traits: Keyspace,
    stats: Keyspace,
    timeline: Keyspace,
    account_members: Keyspace,
    member_accounts: Keyspace,
    evaluator: Keyspace,
}

impl Keyspaces {
    fn get(&self, ks: Ks) -> &Keyspace {
        match ks {
            Ks::Checkpoints => &self.checkpoints,
            Ks::Dedup => &self.dedup,
            Ks::DedupTime => &self.dedup_time,
            Ks::Identity => &self.identity,
            Ks::Evidence => &self.evidence,
            Ks::ProfileIds => &self.profile_ids,
            Ks::Traits => &self.traits,
            Ks::Stats => &self.stats,
            Ks::Timeline => &self.timeline,
            Ks::AccountMembers => &self.account_members,
            Ks::MemberAccounts => &self.member_accounts,
            Ks::Evaluator => &self.evaluator,
        }
    }
}

struct Inner {
    db: Database,
    ks: Keyspaces,
    /// Serialises writers: the fold reads, then writes what it read, so two
    /// writers must not interleave. (A std mutex: it is only held inside
    /// blocking tasks, never across an await.)
    writer: Mutex<WriterState>,
    /// Serialises the evaluator's writers ([`crate::evaluator`] commits)
    /// apart from the fold's: they read and write only rows the fold never
    /// touches (the evaluator's tables, and their own consumers'
    /// de-duplication rows and checkpoints), none of them cached, so the two
    /// may commit at once and neither waits for the other's batch.
    eval_writer: Mutex<WriterState>,
    /// Each workspace's identity rules, read once from `settings` (only this
    /// process writes them, so the copy is exact).
    rules: std::sync::RwLock<HashMap<String, Arc<Rules>>>,
}

/// Settings of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// The most bytes the fold's row cache holds before it is emptied.
    pub cache_bytes: usize,
    /// The LSM engine's block cache, in bytes: decoded blocks of every
    /// keyspace, shared by the projector, the evaluator and the API.
    pub block_cache_bytes: u64,
    /// Open with every projection dropped, as `trailmark rebuild` wants:
    /// the keyspaces are deleted whole and created empty, which costs
    /// nothing like deleting their rows one by one (a tombstone each).
    pub drop_projections: bool,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 128 << 20,
            block_cache_bytes: 256 << 20,
            drop_projections: false,
        }
    }
}

/// What one cached row costs beyond its key and value: the map entry, two
/// vector headers and the allocator's rounding.
const CACHE_ROW_OVERHEAD: usize = 96;

/// Rows by key, for the fold's overlay and cache. foldhash, seeded per
/// map, instead of SipHash: keys are long and hashed several times per
/// event, and a client cannot see a hash or an iteration order to collide
/// keys on purpose (foldhash is "minimally DoS-resistant"; a collision
/// flood would cost this one writer time, never correctness).
type RowMap<V> = HashMap<Vec<u8>, V, foldhash::fast::RandomState>;

/// What the single writer keeps between batches.
#[derive(Default)]
struct WriterState {
    /// Committed rows of [`Ks::cached`] keyspaces (`None`: known absent),
    /// by keyspace.
    cache: [RowMap<Option<Vec<u8>>>; Ks::COUNT],
    /// What `cache` holds, in bytes as [`CACHE_ROW_OVERHEAD`] counts them.
    cache_bytes: usize,
    /// The bound on `cache_bytes`.
    cache_limit: usize,
    /// Where the last dedup purge of each partition stopped: rows before it
    /// are gone, and starting there skips their tombstones.
    purge_from: HashMap<(Vec<u8>, u32), Vec<u8>>,
}

impl WriterState {
    fn clear_cache(&mut self) {
        self.cache = std::array::from_fn(|_| RowMap::default());
        self.cache_bytes = 0;
    }

    /// Caches a committed row, emptying the cache first when it would go
    /// past its bound. A row larger than the whole bound is not cached.
    fn cache_row(&mut self, ks: Ks, key: Vec<u8>, value: Option<Vec<u8>>) {
        let cost = key.len() + value.as_ref().map_or(0, Vec::len) + CACHE_ROW_OVERHEAD;
        if cost > self.cache_limit {
            if let Some(old) = self.cache[ks.index()].remove(&key) {
                self.cache_bytes -= old.map_or(0, |v| v.len()) + CACHE_ROW_OVERHEAD;
            }
            return;
        }
        if self.cache_bytes + cost > self.cache_limit {
            self.clear_cache();
        }
        let key_len = key.len();
        if let Some(old) = self.cache[ks.index()].insert(key, value) {
            self.cache_bytes -= key_len + old.map_or(0, |v| v.len()) + CACHE_ROW_OVERHEAD;
        }
        self.cache_bytes += cost;
    }
}

/// The embedded [`ProfileStore`](crate::ProfileStore) and [`WorkspaceDirectory`].
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

// ---- rows ---------------------------------------------------------------

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serialises")
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|_| corrupt(what))
}

fn u64_from(b: &[u8], what: &str) -> Result<u64> {
    Ok(u64::from_be_bytes(b.try_into().map_err(|_| corrupt(what))?))
}

/// A `stats` row: first and last seen, then `(name length u16, name, count
/// u64)` per counter, in name order.
fn encode_stats(seen: Seen, counts: &BTreeMap<String, u64>) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + counts.len() * 24);
    v.extend_from_slice(&time_bytes(seen.first));
    v.extend_from_slice(&time_bytes(seen.last));
    for (name, n) in counts {
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&n.to_be_bytes());
    }
    v
}

fn decode_stats(b: &[u8]) -> Result<(Seen, BTreeMap<String, u64>)> {
    if b.len() < 16 {
        return Err(corrupt("stats row"));
    }
    let seen = Seen {
        first: time_from(&b[..8])?,
        last: time_from(&b[8..16])?,
    };
    let mut counts = BTreeMap::new();
    let mut at = 16;
    while at < b.len() {
        let len = u16::from_be_bytes(
            b.get(at..at + 2)
                .ok_or_else(|| corrupt("stats row"))?
                .try_into()
                .expect("2 bytes"),
        ) as usize;
        at += 2;
        let name = b.get(at..at + len).ok_or_else(|| corrupt("stats row"))?;
        at += len;
        let n = u64_from(
            b.get(at..at + 8).ok_or_else(|| corrupt("stats row"))?,
            "stats row",
        )?;
        at += 8;
        counts.insert(
            String::from_utf8(name.to_vec()).map_err(|_| corrupt("counter name"))?,
            n,
        );
    }
    Ok((seen, counts))
}

fn encode_timeline_value(counter: &str, ev: &Event) -> Vec<u8> {
    let mut v = Vec::with_capacity(counter.len() + 512);
    v.extend_from_slice(&(counter.len() as u32).to_be_bytes());
    v.extend_from_slice(counter.as_bytes());
    ev.write_api_json(&mut v);
    v
}

fn split_timeline_value(v: &[u8]) -> Result<(&[u8], &[u8])> {
    if v.len() < 4 {
        return Err(corrupt("timeline row"));
    }
    let n = u32::from_be_bytes(v[..4].try_into().expect("4")) as usize;
    if v.len() < 4 + n {
        return Err(corrupt("timeline row"));
    }
    Ok((&v[4..4 + n], &v[4 + n..]))
}

// ---- opening ------------------------------------------------------------

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir` with default settings.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// Opens (or creates) the store in `dir`. Projections written with
    /// another key layout are dropped, for the projector to rebuild.
    pub fn open_with(dir: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self> {
        let db = Database::builder(dir.as_ref())
            .cache_size(options.block_cache_bytes)
            .open()
            .map_err(unavailable)?;
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(unavailable)
        };
        if options.drop_projections {
            for k in Ks::PROJECTIONS {
                if db.keyspace_exists(k.name()) {
                    db.delete_keyspace(open(k.name())?).map_err(unavailable)?;
                }
            }
        }
        let ks = Keyspaces {
            meta: open(KEPT_KEYSPACES[0])?,
            workspaces: open(KEPT_KEYSPACES[1])?,
            credentials: open(KEPT_KEYSPACES[2])?,
            settings: open(KEPT_KEYSPACES[3])?,
            checkpoints: open(Ks::Checkpoints.name())?,
            dedup: open(Ks::Dedup.name())?,
            dedup_time: open(Ks::DedupTime.name())?,
            identity: open(Ks::Identity.name())?,
            evidence: open(Ks::Evidence.name())?,
            profile_ids: open(Ks::ProfileIds.name())?,
            traits: open(Ks::Traits.name())?,
            stats: open(Ks::Stats.name())?,
            timeline: open(Ks::Timeline.name())?,
            account_members: open(Ks::AccountMembers.name())?,
            member_accounts: open(Ks::MemberAccounts.name())?,
            evaluator: open(Ks::Evaluator.name())?,
        };
        let inner = Inner {
            db,
            ks,
            writer: Mutex::new(WriterState {
                cache_limit: options.cache_bytes,
                ..WriterState::default()
            }),
            eval_writer: Mutex::new(WriterState::default()),
            rules: Default::default(),
        };
        inner.upgrade_layout()?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Flushes the journal to disk.
    pub fn persist(&self) -> Result<()> {
        self.inner
            .db
            .persist(PersistMode::SyncAll)
            .map_err(unavailable)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

impl Inner {
    /// Drops projections written with another key layout, so that the
    /// projector rebuilds them from the log, and records this layout.
    fn upgrade_layout(&self) -> Result<()> {
        const KEY: &[u8] = b"projection_layout";
        let current = self.ks.meta.get(KEY).map_err(unavailable)?;
        if current.as_deref() == Some(&LAYOUT_VERSION.to_be_bytes()[..]) {
            return Ok(());
        }
        let written = self.ks.checkpoints.first_key_value().is_some()
            || self.ks.identity.first_key_value().is_some();
        if written {
            tracing::warn!(
                layout = LAYOUT_VERSION,
                "the store's projections use an older key layout; dropping them to rebuild from the log"
            );
            self.reset_projections()?;
        }
        self.ks
            .meta
            .insert(KEY, LAYOUT_VERSION.to_be_bytes())
            .map_err(unavailable)?;
        self.db.persist(PersistMode::SyncAll).map_err(unavailable)
    }

    /// Deletes every projection and checkpoint, keeping workspaces.
    fn reset_projections(&self) -> Result<()> {
        let mut state = self.writer.lock().expect("writer lock");
        let mut eval_state = self.eval_writer.lock().expect("evaluator writer lock");
        state.clear_cache();
        state.purge_from.clear();
        eval_state.purge_from.clear();
        for ks in Ks::PROJECTIONS {
            let handle = self.ks.get(ks);
            loop {
                let keys: Vec<Vec<u8>> = handle
                    .iter()
                    .take(10_000)
                    .map(|kv| kv.key().map(|k| k.to_vec()).map_err(unavailable))
                    .collect::<Result<_>>()?;
                if keys.is_empty() {
                    break;
                }
                let mut batch = self.db.batch();
                for k in keys {
                    batch.remove(handle, k);
                }
                batch.commit().map_err(unavailable)?;
            }
        }
        self.db.persist(PersistMode::SyncAll).map_err(unavailable)
    }
}

// ---- trait impls --------------------------------------------------------

#[async_trait]
impl ProfileWriter for EmbeddedStore {
    async fn apply(&self, batch: Arc<ApplyBatch>) -> Result<ApplyOutcome> {
        self.blocking(move |inner| inner.apply(&batch)).await
    }

    async fn checkpoints(&self, consumer: &str) -> Result<BTreeMap<u32, u64>> {
        let prefix = ws_key(consumer);
        let snap = self.inner.db.snapshot();
        let mut out = BTreeMap::new();
        for kv in snap.prefix(&self.inner.ks.checkpoints, &prefix) {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            let p: [u8; 4] = k[prefix.len()..]
                .try_into()
                .map_err(|_| corrupt("checkpoint key"))?;
            out.insert(u32::from_be_bytes(p), u64_from(&v, "checkpoint")?);
        }
        Ok(out)
    }

    async fn reset_projections(&self) -> Result<()> {
        self.blocking(Inner::reset_projections).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rebuild empties every projection: each keyspace in the database is
    /// either kept or listed in `Ks::PROJECTIONS`, so a new keyspace cannot
    /// be left out of `reset_projections` unnoticed.
    #[test]
    fn every_keyspace_is_kept_or_a_projection() {
        for (i, k) in Ks::PROJECTIONS.iter().enumerate() {
            assert_eq!(k.index(), i, "PROJECTIONS is in declaration order");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let on_disk: std::collections::BTreeSet<String> = store
            .inner
            .db
            .list_keyspace_names()
            .iter()
            .map(|k| String::from_utf8_lossy(k.as_bytes()).into_owned())
            .collect();
        let mut listed: std::collections::BTreeSet<String> =
            KEPT_KEYSPACES.iter().map(|k| (*k).to_owned()).collect();
        listed.extend(Ks::PROJECTIONS.iter().map(|k| k.name().to_owned()));
        assert_eq!(on_disk, listed);
        assert_eq!(
            listed.len(),
            KEPT_KEYSPACES.len() + Ks::PROJECTIONS.len(),
            "no name twice"
        );
    }

    /// Issue 9, item 6: 16,000 identifies with a 30 KB trait each once
    /// grew the row-bounded cache past a gigabyte. It is bounded in bytes.
    #[tokio::test]
    async fn opening_for_a_rebuild_drops_projections_whole_and_keeps_tenants() {
        use crate::{ProfileReader, ProfileWriter, WorkspaceDirectory};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let created = store.create_workspace("keep", None, None).await.unwrap();
        let ws = created.workspace.id.clone();
        let ev = trailmark_testkit::EventBuilder::track("Opened")
            .workspace(&ws)
            .user("u")
            .build();
        let batch = Arc::new(ApplyBatch {
            consumer: "p".into(),
            positions: vec![(0, 1)],
            events: vec![crate::LoggedEvent {
                partition: 0,
                position: 0,
                event: ev.clone(),
            }],
            dedup_window_micros: 1_000_000,
        });
        store.apply(batch.clone()).await.unwrap();
        let id = Identifier::parse("user_id:u").unwrap();
        assert!(store.resolve(&ws, &id).await.unwrap().is_some());
        drop(store);
        let options = EmbeddedOptions {
            drop_projections: true,
            ..EmbeddedOptions::default()
        };
        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        assert!(store.resolve(&ws, &id).await.unwrap().is_none());
        assert!(store.checkpoints("p").await.unwrap().is_empty());
        assert!(
            store
                .resolve_write_key(&created.write_key)
                .await
                .unwrap()
                .is_some()
        );
        // The fresh keyspaces take the same batch again, as a replay would.
        assert_eq!(store.apply(batch).await.unwrap().applied, 1);
        assert!(store.resolve(&ws, &id).await.unwrap().is_some());
    }

    #[test]
    fn the_fold_cache_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 2 << 20;
        let store = EmbeddedStore::open_with(
            dir.path(),
            EmbeddedOptions {
                cache_bytes: limit,
                ..EmbeddedOptions::default()
            },
        )
        .unwrap();
        let blob = "x".repeat(30 * 1024);
        for chunk in 0..20 {
            let events = (0..50)
                .map(|i| {
                    let n = chunk * 50 + i;
                    let event = trailmark_testkit::EventBuilder::identify(
                        serde_json::json!({"blob": blob}),
                    )
                    .user(&format!("u{n}"))
                    .at(n as i64)
                    .build();
                    crate::LoggedEvent {
                        partition: 0,
                        position: n as u64,
                        event,
                    }
                })
                .collect();
            store
                .inner
                .apply(&ApplyBatch {
                    consumer: "p".into(),
                    positions: vec![],
                    events,
                    dedup_window_micros: 1,
                })
                .unwrap();
            let state = store.inner.writer.lock().unwrap();
            let counted: usize = state
                .cache
                .iter()
                .flatten()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + CACHE_ROW_OVERHEAD)
                .sum();
            assert_eq!(state.cache_bytes, counted);
            assert!(
                state.cache_bytes <= limit,
                "{} > {limit}",
                state.cache_bytes
            );
        }
    }

    crate::store_conformance!(|dir: &std::path::Path| {
        let store = EmbeddedStore::open(dir).expect("open store");
        (
            std::sync::Arc::new(store.clone()) as std::sync::Arc<dyn crate::ProfileStore>,
            std::sync::Arc::new(store) as std::sync::Arc<dyn crate::WorkspaceDirectory>,
        )
    });
}
