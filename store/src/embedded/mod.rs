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
//! | `dedup`      | ws messageId                          | receivedAt (BE)            |
//! | `dedup_time` | receivedAt (BE) ws messageId          | empty (purge index)        |
//! | `identity`   | ws id                                 | [`Named`] record ([`fold`])|
//! | `evidence`   | ws id slot digest (16)                | identity evidence ([`fold`])|
//! | `profile_ids`| ws profile id (16)                    | id                         |
//! | `traits`     | ws id trait-name                      | [`TraitValue`] JSON        |
//! | `stats`      | ws id                                 | first, last, counts by name|
//! | `timeline`   | ws id time (BE) messageId             | counter len, counter, JSON |
//!
//! A store whose projections were written with another layout version is
//! emptied of them when opened; the projector then rebuilds them from the
//! log, as `trailmark rebuild` would.
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

mod fold;
pub mod keys;

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
}

/// The keyspaces a rebuild keeps: the layout version, and tenants with their
/// credentials. Every other keyspace is one of [`Ks::PROJECTIONS`] (a test
/// checks the database holds no other).
const KEPT_KEYSPACES: [&str; 4] = ["meta", "workspaces", "credentials", "settings"];

impl Ks {
    const PROJECTIONS: [Ks; 9] = [
        Ks::Checkpoints,
        Ks::Dedup,
        Ks::DedupTime,
        Ks::Identity,
        Ks::Evidence,
        Ks::ProfileIds,
        Ks::Traits,
        Ks::Stats,
        Ks::Timeline,
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
        }
    }

    /// Rows the fold reads again and again, worth caching across batches.
    fn cached(self) -> bool {
        matches!(self, Ks::Identity | Ks::Evidence | Ks::Stats | Ks::Traits)
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
    /// Each workspace's identity rules, read once from `settings` (only this
    /// process writes them, so the copy is exact).
    rules: std::sync::RwLock<HashMap<String, Arc<Rules>>>,
}

/// Settings of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// The most bytes the fold's row cache holds before it is emptied.
    pub cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 128 << 20,
        }
    }
}

/// What one cached row costs beyond its key and value: the map entry, two
/// vector headers and the allocator's rounding.
const CACHE_ROW_OVERHEAD: usize = 96;

/// What the single writer keeps between batches.
#[derive(Default)]
struct WriterState {
    /// Committed rows of [`Ks::cached`] keyspaces (`None`: known absent).
    cache: HashMap<(Ks, Vec<u8>), Option<Vec<u8>>>,
    /// What `cache` holds, in bytes as [`CACHE_ROW_OVERHEAD`] counts them.
    cache_bytes: usize,
    /// The bound on `cache_bytes`.
    cache_limit: usize,
    /// Where the last dedup purge stopped: rows before it are gone, and
    /// starting there skips their tombstones.
    purge_from: Vec<u8>,
}

impl WriterState {
    fn clear_cache(&mut self) {
        self.cache = HashMap::new();
        self.cache_bytes = 0;
    }

    /// Caches a committed row, emptying the cache first when it would go
    /// past its bound. A row larger than the whole bound is not cached.
    fn cache_row(&mut self, ks: Ks, key: Vec<u8>, value: Option<Vec<u8>>) {
        let cost = key.len() + value.as_ref().map_or(0, Vec::len) + CACHE_ROW_OVERHEAD;
        if cost > self.cache_limit {
            if let Some(old) = self.cache.remove(&(ks, key)) {
                self.cache_bytes -= old.map_or(0, |v| v.len()) + CACHE_ROW_OVERHEAD;
            }
            return;
        }
        if self.cache_bytes + cost > self.cache_limit {
            self.clear_cache();
        }
        let key_len = key.len();
        if let Some(old) = self.cache.insert((ks, key), value) {
            self.cache_bytes -= key_len + old.map_or(0, |v| v.len()) + CACHE_ROW_OVERHEAD;
        }
        self.cache_bytes += cost;
    }
}

/// The embedded [`ProfileStore`] and [`WorkspaceDirectory`].
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
            .open()
            .map_err(unavailable)?;
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(unavailable)
        };
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
        };
        let inner = Inner {
            db,
            ks,
            writer: Mutex::new(WriterState {
                cache_limit: options.cache_bytes,
                ..WriterState::default()
            }),
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
    // ---- reads ----------------------------------------------------------

    /// The identity rules of a workspace: its settings, else the defaults.
    fn rules(&self, ws: &str) -> Result<Arc<Rules>> {
        if let Some(r) = self.rules.read().expect("rules lock").get(ws) {
            return Ok(r.clone());
        }
        let rules = match self.stored_rules(ws)? {
            Some(s) => {
                Rules::from_settings(&s).map_err(|e| corrupt(&format!("identity rules: {e}")))?
            }
            None => Rules::default(),
        };
        let rules = Arc::new(rules);
        self.rules
            .write()
            .expect("rules lock")
            .insert(ws.to_owned(), rules.clone());
        Ok(rules)
    }

    fn stored_rules(&self, ws: &str) -> Result<Option<RuleSettings>> {
        match self
            .ks
            .settings
            .get(settings_key(ws, "identity_rules"))
            .map_err(unavailable)?
        {
            Some(v) => Ok(Some(from_json(&v, "identity rules")?)),
            None => Ok(None),
        }
    }

    fn resolve(&self, ws: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        let ks = &self.ks;
        let snap = self.db.snapshot();
        let named = |id: &Identifier| -> Result<Option<Named>> {
            snap.get(&ks.identity, ws_id_key(ws, id))
                .map_err(unavailable)?
                .map(|v| decode_named(&v))
                .transpose()
        };
        if named(id)?.is_none() {
            return Ok(None);
        }
        let rules = self.rules(ws)?;
        let mut walk = Walk::new(&rules, id.clone());
        loop {
            let next = walk.wanted();
            if next.is_empty() {
                break;
            }
            for i in next {
                let evidence = snap
                    .prefix(&ks.evidence, ws_id_key(ws, &i))
                    .take(MAX_ID_EVIDENCE + 1)
                    .map(|kv| decode_evidence(&kv.value().map_err(unavailable)?))
                    .collect::<Result<Vec<_>>>()?;
                walk.add(evidence);
            }
        }
        let resolved = walk.finish();
        let mut records = BTreeMap::new();
        for m in &resolved.members {
            if let Some(n) = named(m)? {
                records.insert(m.clone(), n);
            }
        }
        profile_ref(ws, resolved, records).map(Some)
    }

    fn identifier_of(&self, ws: &str, profile_id: uuid::Uuid) -> Result<Option<Identifier>> {
        let mut key = ws_key(ws);
        key.extend_from_slice(profile_id.as_bytes());
        match self.ks.profile_ids.get(key).map_err(unavailable)? {
            Some(v) => Ok(Some(take_id(&v)?.0)),
            None => Ok(None),
        }
    }

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
        state.clear_cache();
        state.purge_from.clear();
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

    fn traits(&self, ws: &str, profile: &ProfileRef) -> Result<BTreeMap<String, TraitValue>> {
        let snap = self.db.snapshot();
        let mut out = BTreeMap::new();
        for id in profile.identifiers.keys() {
            let prefix = ws_id_key(ws, id);
            for kv in snap.prefix(&self.ks.traits, &prefix) {
                let (k, v) = kv.into_inner().map_err(unavailable)?;
                let name = String::from_utf8(k[prefix.len()..].to_vec())
                    .map_err(|_| corrupt("trait name"))?;
                merge_trait(&mut out, name, from_json(&v, "trait row")?);
            }
        }
        Ok(out)
    }

    fn metadata(&self, ws: &str, profile: &ProfileRef) -> Result<ProfileMetadata> {
        let snap = self.db.snapshot();
        let mut meta = ProfileMetadata {
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            counts: BTreeMap::new(),
        };
        for id in profile.identifiers.keys() {
            if let Some(v) = snap
                .get(&self.ks.stats, ws_id_key(ws, id))
                .map_err(unavailable)?
            {
                let (seen, counts) = decode_stats(&v)?;
                meta.first_seen = meta.first_seen.min(seen.first);
                meta.last_seen = meta.last_seen.max(seen.last);
                for (name, n) in counts {
                    *meta.counts.entry(name).or_default() += n;
                }
            }
        }
        if meta.first_seen == i64::MAX {
            meta.first_seen = 0;
            meta.last_seen = 0;
        }
        Ok(meta)
    }

    fn timeline(&self, ws: &str, profile: &ProfileRef, q: &TimelineQuery) -> Result<TimelinePage> {
        let snap = self.db.snapshot();
        let limit = q.limit.max(1);
        // One ordered stream per identifier, merged by (time, messageId).
        let mut streams = Vec::new();
        for id in profile.identifiers.keys() {
            let prefix = ws_id_key(ws, id);
            let mut lo = prefix.clone();
            lo.extend_from_slice(&time_bytes(q.start.unwrap_or(i64::MIN)));
            let mut hi = prefix.clone();
            match q.end {
                Some(end) => hi.extend_from_slice(&time_bytes(end)),
                None => hi.extend_from_slice(&[0xff; 9]),
            }
            if let Some((t, m)) = &q.after {
                let mut cursor = prefix.clone();
                cursor.extend_from_slice(&time_bytes(*t));
                cursor.extend_from_slice(m.as_bytes());
                if q.descending {
                    if cursor < hi {
                        hi = cursor;
                    }
                } else {
                    // Exclusive of the cursor itself: the next possible key.
                    cursor.push(0);
                    if cursor > lo {
                        lo = cursor;
                    }
                }
            }
            if lo >= hi {
                continue;
            }
            let iter = snap.range(&self.ks.timeline, lo..hi);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = if q.descending {
                Box::new(iter.rev())
            } else {
                Box::new(iter)
            };
            streams.push((prefix.len(), iter.peekable_rows()));
        }
        let mut entries = Vec::new();
        let mut has_more = false;
        loop {
            // Pick the stream whose head comes first in the asked order.
            for s in streams.iter_mut() {
                s.1.peek()?;
            }
            let mut best: Option<usize> = None;
            for (i, s) in streams.iter().enumerate() {
                let Some(head) = s.1.head.as_ref() else {
                    continue;
                };
                best = match best {
                    None => Some(i),
                    Some(b) => {
                        let a = &head.0[s.0..];
                        let c = &streams[b].1.head.as_ref().expect("filled").0[streams[b].0..];
                        let first = if q.descending { a > c } else { a < c };
                        Some(if first { i } else { b })
                    }
                };
            }
            let Some(b) = best else { break };
            let plen = streams[b].0;
            let (key, value) = streams[b].1.next_row()?.expect("peeked");
            let (counter, body) = split_timeline_value(&value)?;
            if let Some(want) = &q.event
                && counter != want.as_bytes()
            {
                continue;
            }
            if entries.len() == limit {
                has_more = true;
                break;
            }
            let suffix = &key[plen..];
            let (time, message_id) = suffix
                .split_at_checked(8)
                .ok_or_else(|| corrupt("timeline key"))?;
            let time = time_from(time)?;
            let message_id =
                String::from_utf8(message_id.to_vec()).map_err(|_| corrupt("message id"))?;
            let text = String::from_utf8(body.to_vec()).map_err(|_| corrupt("timeline json"))?;
            let json = RawValue::from_string(text).map_err(|_| corrupt("timeline json"))?;
            entries.push(TimelineEntry {
                time,
                message_id,
                json,
            });
        }
        Ok(TimelinePage { entries, has_more })
    }
}

/// A one-row look-ahead over a fjall iterator whose rows may fail to read.
struct PeekableRows<I: Iterator<Item = fjall::Guard>> {
    inner: I,
    head: Option<(Vec<u8>, Vec<u8>)>,
}

trait PeekableRowsExt: Iterator<Item = fjall::Guard> + Sized {
    fn peekable_rows(self) -> PeekableRows<Self> {
        PeekableRows {
            inner: self,
            head: None,
        }
    }
}

impl<I: Iterator<Item = fjall::Guard>> PeekableRowsExt for I {}

impl<I: Iterator<Item = fjall::Guard>> PeekableRows<I> {
    fn peek(&mut self) -> Result<Option<&(Vec<u8>, Vec<u8>)>> {
        if self.head.is_none()
            && let Some(g) = self.inner.next()
        {
            let (k, v) = g.into_inner().map_err(unavailable)?;
            self.head = Some((k.to_vec(), v.to_vec()));
        }
        Ok(self.head.as_ref())
    }

    fn next_row(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.peek()?;
        Ok(self.head.take())
    }
}

// ---- trait impls --------------------------------------------------------

#[async_trait]
impl ProfileWriter for EmbeddedStore {
    async fn apply(&self, batch: ApplyBatch) -> Result<ApplyOutcome> {
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

#[async_trait]
impl ProfileReader for EmbeddedStore {
    async fn resolve(&self, workspace: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        self.inner.resolve(workspace, id)
    }

    async fn identifier_of(
        &self,
        workspace: &str,
        profile_id: uuid::Uuid,
    ) -> Result<Option<Identifier>> {
        self.inner.identifier_of(workspace, profile_id)
    }

    async fn traits(
        &self,
        workspace: &str,
        profile: &ProfileRef,
    ) -> Result<BTreeMap<String, TraitValue>> {
        self.inner.traits(workspace, profile)
    }

    async fn metadata(&self, workspace: &str, profile: &ProfileRef) -> Result<ProfileMetadata> {
        self.inner.metadata(workspace, profile)
    }

    async fn timeline(
        &self,
        workspace: &str,
        profile: &ProfileRef,
        query: &TimelineQuery,
    ) -> Result<TimelinePage> {
        let (ws, profile, query) = (workspace.to_owned(), profile.clone(), query.clone());
        self.blocking(move |inner| inner.timeline(&ws, &profile, &query))
            .await
    }

    async fn check_ready(&self) -> Result<()> {
        // A read through the journal-backed keyspaces fails once fjall has
        // poisoned itself after a fatal IO error.
        self.inner
            .ks
            .workspaces
            .contains_key(b"readyz")
            .map(|_| ())
            .map_err(unavailable)
    }
}

#[async_trait]
impl WorkspaceDirectory for EmbeddedStore {
    async fn create_workspace(
        &self,
        name: &str,
        write_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<CreatedWorkspace> {
        let ks = &self.inner.ks;
        let created = CreatedWorkspace::new(name, write_key, token)?;
        let (workspace, source_id) = (&created.workspace, &created.source_id);
        let (write_key, token) = (&created.write_key, &created.token);
        let wkey = [b"w\0".as_slice(), write_key.as_bytes()].concat();
        let tkey = token_row(Scope::Admin, token);
        let _writer = self.inner.writer.lock().expect("writer lock");
        for kv in ks.workspaces.iter() {
            let (_, v) = kv.into_inner().map_err(unavailable)?;
            if from_json::<Workspace>(&v, "workspace row")?.name == name {
                return Err(StoreError::Conflict(format!("a workspace named {name:?}")));
            }
        }
        if ks.credentials.contains_key(&wkey).map_err(unavailable)? {
            return Err(StoreError::Conflict("write key".into()));
        }
        if ks.credentials.contains_key(&tkey).map_err(unavailable)? {
            return Err(StoreError::Conflict("token".into()));
        }
        let mut tx = self.inner.db.batch();
        tx.insert(&ks.workspaces, workspace.id.as_bytes(), json(workspace));
        tx.insert(
            &ks.credentials,
            wkey,
            json(&WriteGrant {
                workspace_id: workspace.id.clone(),
                source_id: source_id.clone(),
            }),
        );
        tx.insert(
            &ks.credentials,
            tkey,
            json(&ReadGrant {
                workspace_id: workspace.id.clone(),
                scope: Scope::Admin,
            }),
        );
        tx.commit().map_err(unavailable)?;
        self.persist()?;
        Ok(created)
    }

    async fn workspaces(&self) -> Result<Vec<Workspace>> {
        let snap = self.inner.db.snapshot();
        snap.iter(&self.inner.ks.workspaces)
            .map(|kv| {
                let (_, v) = kv.into_inner().map_err(unavailable)?;
                from_json(&v, "workspace row")
            })
            .collect()
    }

    async fn resolve_write_key(&self, write_key: &str) -> Result<Option<WriteGrant>> {
        let key = [b"w\0".as_slice(), write_key.as_bytes()].concat();
        match self.inner.ks.credentials.get(key).map_err(unavailable)? {
            Some(v) => Ok(Some(from_json(&v, "write grant")?)),
            None => Ok(None),
        }
    }

    async fn resolve_token(&self, token: &str) -> Result<Option<ReadGrant>> {
        for scope in [Scope::Admin, Scope::Read] {
            let key = token_row(scope, token);
            if let Some(v) = self.inner.ks.credentials.get(key).map_err(unavailable)? {
                let mut grant: ReadGrant = from_json(&v, "read grant")?;
                grant.scope = scope;
                return Ok(Some(grant));
            }
        }
        Ok(None)
    }

    async fn create_read_token(&self, workspace_id: &str) -> Result<String> {
        let token = new_secret("tmr_");
        let grant = ReadGrant {
            workspace_id: workspace_id.to_owned(),
            scope: Scope::Read,
        };
        self.inner
            .ks
            .credentials
            .insert(token_row(Scope::Read, &token), json(&grant))
            .map_err(unavailable)?;
        self.persist()?;
        Ok(token)
    }

    async fn identity_rules(&self, workspace_id: &str) -> Result<Option<RuleSettings>> {
        self.inner.stored_rules(workspace_id)
    }

    async fn set_identity_rules(&self, workspace_id: &str, rules: &RuleSettings) -> Result<()> {
        let checked =
            Rules::from_settings(rules).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.inner
            .ks
            .settings
            .insert(settings_key(workspace_id, "identity_rules"), json(rules))
            .map_err(unavailable)?;
        self.persist()?;
        self.inner
            .rules
            .write()
            .expect("rules lock")
            .insert(workspace_id.to_owned(), Arc::new(checked));
        Ok(())
    }
}

/// A token's `credentials` key: `t` (admin, as since the first layout) or
/// `r` (read only), NUL, its digest.
fn token_row(scope: Scope, token: &str) -> Vec<u8> {
    let prefix: &[u8] = match scope {
        Scope::Admin => b"t\0",
        Scope::Read => b"r\0",
    };
    [prefix, token_digest(token).as_bytes()].concat()
}

fn settings_key(workspace_id: &str, name: &str) -> Vec<u8> {
    let mut key = ws_key(workspace_id);
    key.extend_from_slice(name.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rebuild empties every projection: each keyspace in the database is
    /// either kept or listed in `Ks::PROJECTIONS`, so a new keyspace cannot
    /// be left out of `reset_projections` unnoticed.
    #[test]
    fn every_keyspace_is_kept_or_a_projection() {
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
    #[test]
    fn the_fold_cache_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 2 << 20;
        let store =
            EmbeddedStore::open_with(dir.path(), EmbeddedOptions { cache_bytes: limit }).unwrap();
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
                .map(|((_, k), v)| k.len() + v.as_ref().map_or(0, Vec::len) + CACHE_ROW_OVERHEAD)
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
