//! The embedded store, on fjall (an LSM tree): the default for one process.
//!
//! # Layout
//! One fjall database, one keyspace per kind of fact. Key components are
//! joined by a NUL byte (ingest refuses identifiers that contain one); an
//! identifier is `kind NUL value`; times are 8 big-endian bytes with the sign
//! bit flipped, so byte order is time order.
//!
//! | keyspace     | key                                   | value                      |
//! |--------------|---------------------------------------|----------------------------|
//! | `workspaces` | workspace id                          | [`Workspace`] JSON         |
//! | `credentials`| `w` NUL write key / `t` NUL digest     | grant JSON                 |
//! | `checkpoints`| consumer NUL partition (BE u32)       | position (BE u64)          |
//! | `dedup`      | ws NUL messageId                      | receivedAt (BE)            |
//! | `dedup_time` | receivedAt (BE) ws NUL messageId      | empty (purge index)        |
//! | `identity`   | ws NUL id                             | root id NUL created (BE)   |
//! | `members`    | ws NUL root id NUL id                 | created (BE)               |
//! | `traits`     | ws NUL id NUL trait name              | [`TraitValue`] JSON        |
//! | `stats`      | ws NUL id                             | first, last, counts by name|
//! | `timeline`   | ws NUL id NUL time (BE) messageId      | counter len, counter, JSON |
//!
//! Facts are kept per identifier and merged on read (see the domain's
//! profile module), so linking two profiles only rewrites the small
//! `identity`/`members` index, never traits or timelines.
//!
//! # Atomicity
//! [`ProfileStore::apply`] gathers a batch's writes in an overlay and commits
//! them with the checkpoint in one fjall `WriteBatch`, which is atomic across
//! keyspaces. fjall's journal recovers a prefix of committed batches, so after
//! a crash the checkpoint and the state it describes always agree.
//!
//! # Speed
//! Every memtable lookup is a skiplist walk of cache misses, so the fold keeps
//! them few: one `stats` row per identifier holds its seen times and counts,
//! and rows the fold reads often (identities, stats, traits) are cached in
//! memory across batches. Only the projector writes them, under the writer
//! lock, so the cache is exact; it is emptied when full and on reset.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use serde_json::value::RawValue;
use trailmark_domain::profile::{
    Seen, TraitValue, counter_name, is_duplicate, merge_trait, project,
};
use trailmark_domain::{Event, IdKind, Identifier};

use crate::{
    ApplyBatch, ApplyOutcome, CreatedWorkspace, ProfileMetadata, ProfileRef, ProfileStore,
    ReadGrant, Result, StoreError, TimelineEntry, TimelinePage, TimelineQuery, Workspace,
    WorkspaceDirectory, WriteGrant, token_digest,
};

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
    Members,
    Traits,
    Stats,
    Timeline,
}

impl Ks {
    const PROJECTIONS: [Ks; 8] = [
        Ks::Checkpoints,
        Ks::Dedup,
        Ks::DedupTime,
        Ks::Identity,
        Ks::Members,
        Ks::Traits,
        Ks::Stats,
        Ks::Timeline,
    ];

    /// Rows the fold reads again and again, worth caching across batches.
    fn cached(self) -> bool {
        matches!(self, Ks::Identity | Ks::Stats | Ks::Traits)
    }
}

struct Keyspaces {
    workspaces: Keyspace,
    credentials: Keyspace,
    checkpoints: Keyspace,
    dedup: Keyspace,
    dedup_time: Keyspace,
    identity: Keyspace,
    members: Keyspace,
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
            Ks::Members => &self.members,
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
}

/// The most rows the fold's cache holds before it is emptied.
const CACHE_ROWS: usize = 400_000;

/// What the single writer keeps between batches.
#[derive(Default)]
struct WriterState {
    /// Committed rows of [`Ks::cached`] keyspaces (`None`: known absent).
    cache: HashMap<(Ks, Vec<u8>), Option<Vec<u8>>>,
    /// Where the last dedup purge stopped: rows before it are gone, and
    /// starting there skips their tombstones.
    purge_from: Vec<u8>,
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

// ---- key encoding -------------------------------------------------------

fn time_bytes(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from(b: &[u8]) -> Result<i64> {
    let arr: [u8; 8] = b.try_into().map_err(|_| corrupt("time field"))?;
    Ok((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
}

fn push_id(key: &mut Vec<u8>, id: &Identifier) {
    key.extend_from_slice(id.kind.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(id.value.as_bytes());
}

fn ws_id_key(ws: &str, id: &Identifier) -> Vec<u8> {
    let mut k = Vec::with_capacity(ws.len() + id.value.len() + 16);
    k.extend_from_slice(ws.as_bytes());
    k.push(0);
    push_id(&mut k, id);
    k
}

/// `ws NUL id NUL`: the prefix of an identifier's rows.
fn ws_id_prefix(ws: &str, id: &Identifier) -> Vec<u8> {
    let mut k = ws_id_key(ws, id);
    k.push(0);
    k
}

fn parse_id(b: &[u8]) -> Result<Identifier> {
    let s = std::str::from_utf8(b).map_err(|_| corrupt("identifier is not utf-8"))?;
    let (kind, value) = s.split_once('\0').ok_or_else(|| corrupt("identifier"))?;
    Ok(Identifier::new(IdKind::parse(kind), value))
}

fn id_bytes(id: &Identifier) -> Vec<u8> {
    let mut k = Vec::new();
    push_id(&mut k, id);
    k
}

fn encode_identity(root: &Identifier, created: i64) -> Vec<u8> {
    let mut v = id_bytes(root);
    v.push(0);
    v.extend_from_slice(&time_bytes(created));
    v
}

fn decode_identity(v: &[u8]) -> Result<(Identifier, i64)> {
    if v.len() < 9 {
        return Err(corrupt("identity row"));
    }
    let (id, t) = v.split_at(v.len() - 8);
    Ok((parse_id(&id[..id.len() - 1])?, time_from(t)?))
}

fn checkpoint_key(consumer: &str, partition: u32) -> Vec<u8> {
    let mut k = consumer.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

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

fn encode_timeline_value(ev: &Event) -> Vec<u8> {
    let counter = counter_name(ev);
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
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let db = Database::builder(dir.as_ref())
            .open()
            .map_err(unavailable)?;
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(unavailable)
        };
        let ks = Keyspaces {
            workspaces: open("workspaces")?,
            credentials: open("credentials")?,
            checkpoints: open("checkpoints")?,
            dedup: open("dedup")?,
            dedup_time: open("dedup_time")?,
            identity: open("identity")?,
            members: open("members")?,
            traits: open("traits")?,
            stats: open("stats")?,
            timeline: open("timeline")?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                ks,
                writer: Mutex::new(WriterState::default()),
            }),
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

// ---- the fold, persisted ------------------------------------------------

/// The writes of one batch, applied to the database in one atomic
/// `WriteBatch` at the end. Reads see the batch's own writes first (and are
/// cached), so a batch touching one person many times reads each row once.
struct Overlay<'a> {
    inner: &'a Inner,
    state: &'a mut WriterState,
    rows: HashMap<(Ks, Vec<u8>), Row>,
    /// Writes never read back in a batch (timeline entries): no need to hash
    /// their keys.
    blind: Vec<(Ks, Vec<u8>, Vec<u8>)>,
}

struct Row {
    value: Option<Vec<u8>>,
    dirty: bool,
}

impl<'a> Overlay<'a> {
    fn new(inner: &'a Inner, state: &'a mut WriterState) -> Self {
        Self {
            inner,
            state,
            rows: HashMap::new(),
            blind: Vec::new(),
        }
    }

    fn get(&mut self, ks: Ks, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let id = (ks, key.to_vec());
        if let Some(row) = self.rows.get(&id) {
            return Ok(row.value.clone());
        }
        if let Some(value) = self.state.cache.get(&id) {
            return Ok(value.clone());
        }
        let value = self
            .inner
            .ks
            .get(ks)
            .get(key)
            .map_err(unavailable)?
            .map(|v| v.to_vec());
        self.rows.insert(
            id,
            Row {
                value: value.clone(),
                dirty: false,
            },
        );
        Ok(value)
    }

    fn put(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.rows.insert(
            (ks, key),
            Row {
                value: Some(value),
                dirty: true,
            },
        );
    }

    fn delete(&mut self, ks: Ks, key: Vec<u8>) {
        self.rows.insert(
            (ks, key),
            Row {
                value: None,
                dirty: true,
            },
        );
    }

    fn put_blind(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.blind.push((ks, key, value));
    }

    /// The rows under `prefix` as this batch would leave them.
    fn prefix(&self, ks: Ks, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for kv in self.inner.ks.get(ks).prefix(prefix) {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for ((row_ks, key), row) in &self.rows {
            if *row_ks == ks && row.dirty && key.starts_with(prefix) {
                match &row.value {
                    Some(v) => out.insert(key.clone(), v.clone()),
                    None => out.remove(key),
                };
            }
        }
        Ok(out)
    }

    fn commit(self) -> Result<()> {
        let ks = &self.inner.ks;
        let mut batch = self.inner.db.batch();
        for ((k, key), row) in &self.rows {
            if !row.dirty {
                continue;
            }
            match &row.value {
                Some(v) => batch.insert(ks.get(*k), key.clone(), v.clone()),
                None => batch.remove(ks.get(*k), key.clone()),
            }
        }
        for (k, key, value) in self.blind {
            batch.insert(ks.get(k), key, value);
        }
        if let Err(e) = batch.commit() {
            // What the cache holds may no longer match the database.
            self.state.cache.clear();
            return Err(unavailable(e));
        }
        if self.state.cache.len() + self.rows.len() > CACHE_ROWS {
            self.state.cache.clear();
        }
        for ((k, key), row) in self.rows {
            if k.cached() {
                self.state.cache.insert((k, key), row.value);
            }
        }
        Ok(())
    }
}

impl Inner {
    fn apply(&self, batch: &ApplyBatch) -> Result<ApplyOutcome> {
        let mut state = self.writer.lock().expect("writer lock");
        let mut w = Overlay::new(self, &mut state);
        let mut outcome = ApplyOutcome::default();
        let mut max_received = i64::MIN;
        for ev in batch.events.iter().map(|e| &e.event) {
            let ws = ev.workspace_id.as_str();
            let mut dkey = ws.as_bytes().to_vec();
            dkey.push(0);
            dkey.extend_from_slice(ev.message_id.as_bytes());
            let previous = match w.get(Ks::Dedup, &dkey)? {
                Some(v) => Some(time_from(&v)?),
                None => None,
            };
            if is_duplicate(previous, ev.received_at, batch.dedup_window_micros) {
                outcome.duplicates += 1;
                continue;
            }
            if let Some(prev) = previous {
                let mut old = time_bytes(prev).to_vec();
                old.extend_from_slice(&dkey);
                w.delete(Ks::DedupTime, old);
            }
            let mut tkey = time_bytes(ev.received_at).to_vec();
            tkey.extend_from_slice(&dkey);
            w.put(Ks::Dedup, dkey, time_bytes(ev.received_at).to_vec());
            w.put(Ks::DedupTime, tkey, Vec::new());
            max_received = max_received.max(ev.received_at);

            fold(&mut w, ev)?;
            outcome.applied += 1;
        }
        for (partition, position) in &batch.positions {
            w.put(
                Ks::Checkpoints,
                checkpoint_key(&batch.consumer, *partition),
                position.to_be_bytes().to_vec(),
            );
        }
        if max_received > i64::MIN {
            let horizon = max_received
                .saturating_sub(batch.dedup_window_micros)
                .saturating_sub(DEDUP_PURGE_SLACK_MICROS);
            self.purge_dedup(&mut w, horizon)?;
        }
        w.commit()?;
        Ok(outcome)
    }

    fn purge_dedup(&self, w: &mut Overlay<'_>, horizon: i64) -> Result<()> {
        let end = time_bytes(horizon).to_vec();
        if w.state.purge_from >= end {
            return Ok(());
        }
        let old: Vec<Vec<u8>> = self
            .ks
            .dedup_time
            .range(w.state.purge_from.clone()..end)
            .take(10_000)
            .map(|kv| kv.key().map(|k| k.to_vec()).map_err(unavailable))
            .collect::<Result<_>>()?;
        if let Some(last) = old.last() {
            w.state.purge_from = last.clone();
        }
        for k in old {
            let dkey = k[8..].to_vec();
            // Only forget the message if this index row is still its latest.
            if w.get(Ks::Dedup, &dkey)?.as_deref() == Some(&k[..8]) {
                w.delete(Ks::Dedup, dkey);
            }
            w.delete(Ks::DedupTime, k);
        }
        Ok(())
    }
}

fn fold(w: &mut Overlay<'_>, ev: &Event) -> Result<()> {
    let ws = ev.workspace_id.as_str();
    let p = project(ev);

    // Identities: note each, keep the earliest time, then link them all.
    let mut roots = Vec::with_capacity(p.identifiers.len());
    for id in &p.identifiers {
        let key = ws_id_key(ws, id);
        match w.get(Ks::Identity, &key)? {
            None => {
                w.put(Ks::Identity, key, encode_identity(id, p.time));
                put_member(w, ws, id, id, p.time);
                roots.push(id.clone());
            }
            Some(v) => {
                let (root, created) = decode_identity(&v)?;
                if p.time < created {
                    w.put(Ks::Identity, key, encode_identity(&root, p.time));
                    put_member(w, ws, &root, id, p.time);
                }
                roots.push(root);
            }
        }
    }
    roots.sort();
    roots.dedup();
    if roots.len() > 1 {
        let keep = roots[0].clone();
        for gone in &roots[1..] {
            move_members(w, ws, gone, &keep)?;
        }
    }

    // Traits: the latest event time wins, per trait.
    let prefix = ws_id_prefix(ws, &p.primary);
    for (name, value) in p.traits {
        let mut key = prefix.clone();
        key.extend_from_slice(name.as_bytes());
        let candidate = TraitValue {
            value,
            updated_at: p.time,
            message_id: p.message_id.clone(),
        };
        let wins = match w.get(Ks::Traits, &key)? {
            None => true,
            Some(v) => candidate.supersedes(&from_json::<TraitValue>(&v, "trait row")?),
        };
        if wins {
            w.put(Ks::Traits, key, json(&candidate));
        }
    }

    // Seen times and counts: one row per identifier.
    let skey = ws_id_key(ws, &p.primary);
    let (seen, mut counts) = match w.get(Ks::Stats, &skey)? {
        Some(v) => {
            let (seen, counts) = decode_stats(&v)?;
            (seen.include(p.time), counts)
        }
        None => (
            Seen {
                first: p.time,
                last: p.time,
            },
            BTreeMap::new(),
        ),
    };
    *counts.entry(p.counter).or_default() += 1;
    w.put(Ks::Stats, skey, encode_stats(seen, &counts));

    // The timeline entry.
    let mut lkey = prefix;
    lkey.extend_from_slice(&time_bytes(p.time));
    lkey.extend_from_slice(p.message_id.as_bytes());
    w.put_blind(Ks::Timeline, lkey, encode_timeline_value(ev));
    Ok(())
}

fn put_member(w: &mut Overlay<'_>, ws: &str, root: &Identifier, id: &Identifier, created: i64) {
    let mut key = ws_id_prefix(ws, root);
    push_id(&mut key, id);
    w.put(Ks::Members, key, time_bytes(created).to_vec());
}

/// Re-points every member of the profile rooted at `gone` to `keep`.
fn move_members(w: &mut Overlay<'_>, ws: &str, gone: &Identifier, keep: &Identifier) -> Result<()> {
    let prefix = ws_id_prefix(ws, gone);
    let rows = w.prefix(Ks::Members, &prefix)?;
    for (key, created) in rows {
        let member = parse_id(&key[prefix.len()..])?;
        let created_at = time_from(&created)?;
        w.delete(Ks::Members, key);
        put_member(w, ws, keep, &member, created_at);
        w.put(
            Ks::Identity,
            ws_id_key(ws, &member),
            encode_identity(keep, created_at),
        );
    }
    Ok(())
}

impl Inner {
    // ---- reads ----------------------------------------------------------

    fn resolve(&self, ws: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        let ks = &self.ks;
        let snap = self.db.snapshot();
        let Some(v) = snap
            .get(&ks.identity, ws_id_key(ws, id))
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let (root, _) = decode_identity(&v)?;
        let prefix = ws_id_prefix(ws, &root);
        let mut identifiers = BTreeMap::new();
        for kv in snap.prefix(&ks.members, &prefix) {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            identifiers.insert(parse_id(&k[prefix.len()..])?, time_from(&v)?);
        }
        if identifiers.is_empty() {
            return Err(corrupt("a profile root without members"));
        }
        Ok(Some(ProfileRef { root, identifiers }))
    }

    fn traits(&self, ws: &str, profile: &ProfileRef) -> Result<BTreeMap<String, TraitValue>> {
        let snap = self.db.snapshot();
        let mut out = BTreeMap::new();
        for id in profile.identifiers.keys() {
            let prefix = ws_id_prefix(ws, id);
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
            let prefix = ws_id_prefix(ws, id);
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
            let time = time_from(&suffix[..8])?;
            let message_id =
                String::from_utf8(suffix[8..].to_vec()).map_err(|_| corrupt("message id"))?;
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
impl ProfileStore for EmbeddedStore {
    async fn apply(&self, batch: ApplyBatch) -> Result<ApplyOutcome> {
        self.blocking(move |inner| inner.apply(&batch)).await
    }

    async fn checkpoints(&self, consumer: &str) -> Result<BTreeMap<u32, u64>> {
        let mut prefix = consumer.as_bytes().to_vec();
        prefix.push(0);
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
        self.blocking(|inner| {
            let mut state = inner.writer.lock().expect("writer lock");
            state.cache.clear();
            state.purge_from.clear();
            for ks in Ks::PROJECTIONS {
                let handle = inner.ks.get(ks);
                loop {
                    let keys: Vec<Vec<u8>> = handle
                        .iter()
                        .take(10_000)
                        .map(|kv| kv.key().map(|k| k.to_vec()).map_err(unavailable))
                        .collect::<Result<_>>()?;
                    if keys.is_empty() {
                        break;
                    }
                    let mut batch = inner.db.batch();
                    for k in keys {
                        batch.remove(handle, k);
                    }
                    batch.commit().map_err(unavailable)?;
                }
            }
            inner.db.persist(PersistMode::SyncAll).map_err(unavailable)
        })
        .await
    }

    async fn resolve(&self, workspace: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        self.inner.resolve(workspace, id)
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
        let tkey = [b"t\0".as_slice(), token_digest(token).as_bytes()].concat();
        let _writer = self.inner.writer.lock().expect("writer lock");
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
        let key = [b"t\0".as_slice(), token_digest(token).as_bytes()].concat();
        match self.inner.ks.credentials.get(key).map_err(unavailable)? {
            Some(v) => Ok(Some(from_json(&v, "read grant")?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store_conformance!(|dir: &std::path::Path| {
        let store = EmbeddedStore::open(dir).expect("open store");
        (
            std::sync::Arc::new(store.clone()) as std::sync::Arc<dyn crate::ProfileStore>,
            std::sync::Arc::new(store) as std::sync::Arc<dyn crate::WorkspaceDirectory>,
        )
    });

    #[test]
    fn time_encoding_orders_like_time() {
        let ts = [i64::MIN, -5, -1, 0, 1, 1_700_000_000_000_000, i64::MAX];
        for w in ts.windows(2) {
            assert!(time_bytes(w[0]) < time_bytes(w[1]));
            assert_eq!(time_from(&time_bytes(w[0])).unwrap(), w[0]);
        }
    }
}
