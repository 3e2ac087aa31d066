//! The fold, persisted: how one batch of events becomes one atomic fjall
//! `WriteBatch`, and the identity index it maintains.
//!
//! # Identities
//! Each identifier's `identity` row says where it stands:
//!
//! - **root** of a profile, with the profile's size: its `members` rows
//!   (`ws root member → created`) list the profile, itself included;
//! - **member** of a profile, naming the root;
//! - **alone**: its linked component grew past
//!   [`MAX_PROFILE_IDENTIFIERS`], so, by the domain's rule, none of it is
//!   merged. That is absorbing: components only grow.
//!
//! Linking two profiles moves the **smaller** one's members under the larger
//! one's root (union by size), so joining a new identifier to a profile of
//! any size costs a few rows, and an identifier moves at most
//! log2([`MAX_PROFILE_IDENTIFIERS`]) times before it is settled. A link that
//! would make a profile too large marks the identifiers of both sides alone,
//! once each. No link ever costs more than `2 × MAX_PROFILE_IDENTIFIERS` row
//! writes, however large a hostile component grows. The physical root is a
//! storage detail; the profile's name is its smallest identifier, as in the
//! model.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use trailmark_domain::profile::{
    Fact, MAX_PROFILE_IDENTIFIERS, Seen, TraitValue, is_duplicate, project,
};
use trailmark_domain::{Event, Identifier};

use super::keys::{
    checkpoint_key, push_component, push_id, take_id, time_bytes, time_from, ws_id_key,
};
use super::{
    DEDUP_PURGE_SLACK_MICROS, Inner, Ks, WriterState, corrupt, decode_stats, encode_stats,
    encode_timeline_value, from_json, json, unavailable,
};
use crate::{ApplyBatch, ApplyOutcome, Result};

/// What an `identity` row says; see the module's doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Standing {
    /// The root of a profile of `size` identifiers.
    Root { size: u32 },
    /// A member of the profile rooted at the identifier.
    Member(Identifier),
    /// In a component too large to merge: a profile of its own.
    Alone,
}

/// An `identity` row: when the identifier was first seen, then its standing
/// (`0` size, `1` root id, or `2`).
pub(super) fn encode_identity(created: i64, standing: &Standing) -> Vec<u8> {
    let mut v = time_bytes(created).to_vec();
    match standing {
        Standing::Root { size } => {
            v.push(0);
            v.extend_from_slice(&size.to_be_bytes());
        }
        Standing::Member(root) => {
            v.push(1);
            push_id(&mut v, root);
        }
        Standing::Alone => v.push(2),
    }
    v
}

pub(super) fn decode_identity(v: &[u8]) -> Result<(i64, Standing)> {
    let bad = || corrupt("identity row");
    let created = time_from(v.get(..8).ok_or_else(bad)?)?;
    let standing = match v.get(8).ok_or_else(bad)? {
        0 => Standing::Root {
            size: u32::from_be_bytes(
                v.get(9..13)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            ),
        },
        1 => Standing::Member(take_id(&v[9..])?.0),
        2 => Standing::Alone,
        _ => return Err(bad()),
    };
    Ok((created, standing))
}

/// The writes of one batch, applied to the database in one atomic
/// `WriteBatch` at the end. Reads see the batch's own writes first (and are
/// cached), so a batch touching one person many times reads each row once.
pub(super) struct Overlay<'a> {
    inner: &'a Inner,
    state: &'a mut WriterState,
    rows: HashMap<(Ks, Vec<u8>), Row>,
    /// The keys of `members` rows this batch wrote, in order, so that a
    /// prefix read ranges over them instead of walking every pending row.
    members_written: BTreeSet<Vec<u8>>,
    /// Writes never read back in a batch (timeline entries): no need to hash
    /// their keys.
    blind: Vec<(Ks, Vec<u8>, Vec<u8>)>,
}

struct Row {
    value: Option<Vec<u8>>,
    dirty: bool,
}

impl<'a> Overlay<'a> {
    pub(super) fn new(inner: &'a Inner, state: &'a mut WriterState) -> Self {
        Self {
            inner,
            state,
            rows: HashMap::new(),
            members_written: BTreeSet::new(),
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

    fn set(&mut self, ks: Ks, key: Vec<u8>, value: Option<Vec<u8>>) {
        if ks == Ks::Members {
            self.members_written.insert(key.clone());
        }
        self.rows.insert((ks, key), Row { value, dirty: true });
    }

    fn put(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.set(ks, key, Some(value));
    }

    fn delete(&mut self, ks: Ks, key: Vec<u8>) {
        self.set(ks, key, None);
    }

    fn put_blind(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.blind.push((ks, key, value));
    }

    /// The `members` rows under `prefix` as this batch would leave them.
    fn members(&self, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for kv in self.inner.ks.members.prefix(prefix) {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for key in self
            .members_written
            .range(prefix.to_vec()..)
            .take_while(|k| k.starts_with(prefix))
        {
            match &self.rows[&(Ks::Members, key.clone())].value {
                Some(v) => out.insert(key.clone(), v.clone()),
                None => out.remove(key),
            };
        }
        Ok(out)
    }

    pub(super) fn commit(self) -> Result<()> {
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
            self.state.clear_cache();
            return Err(unavailable(e));
        }
        for ((k, key), row) in self.rows {
            if k.cached() {
                self.state.cache_row(k, key, row.value);
            }
        }
        Ok(())
    }
}

impl Inner {
    pub(super) fn apply(&self, batch: &ApplyBatch) -> Result<ApplyOutcome> {
        let mut state = self.writer.lock().expect("writer lock");
        let mut w = Overlay::new(self, &mut state);
        let mut outcome = ApplyOutcome::default();
        let mut max_received = i64::MIN;
        for ev in batch.events.iter().map(|e| &e.event) {
            let mut dkey = Vec::with_capacity(ev.workspace_id.len() + ev.message_id.len() + 2);
            push_component(&mut dkey, ev.workspace_id.as_bytes());
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

/// Folds one event: its facts, each by its rule, with an exhaustive match.
fn fold(w: &mut Overlay<'_>, ev: &Event) -> Result<()> {
    let ws = ev.workspace_id.as_str();
    for fact in project(ev)?.facts {
        match fact {
            Fact::Named { id, time } => name(w, ws, &id, time)?,
            Fact::Linked {
                id,
                other,
                // Not kept yet; the merge explanation will store it.
                evidence: _,
            } => link(w, ws, &id, &other)?,
            Fact::Trait { id, name, value } => {
                // The latest event time wins, per trait.
                let mut key = ws_id_key(ws, &id);
                key.extend_from_slice(name.as_bytes());
                let wins = match w.get(Ks::Traits, &key)? {
                    None => true,
                    Some(v) => value.supersedes(&from_json::<TraitValue>(&v, "trait row")?),
                };
                if wins {
                    w.put(Ks::Traits, key, json(&value));
                }
            }
            Fact::Counted { id, counter, time } => {
                // Seen times and counts: one row per identifier.
                let key = ws_id_key(ws, &id);
                let (seen, mut counts) = match w.get(Ks::Stats, &key)? {
                    Some(v) => {
                        let (seen, counts) = decode_stats(&v)?;
                        (seen.include(time), counts)
                    }
                    None => (
                        Seen {
                            first: time,
                            last: time,
                        },
                        BTreeMap::new(),
                    ),
                };
                *counts.entry(counter).or_default() += 1;
                w.put(Ks::Stats, key, encode_stats(seen, &counts));
            }
            Fact::Timeline {
                id,
                time,
                message_id,
                counter,
            } => {
                let mut key = ws_id_key(ws, &id);
                key.extend_from_slice(&time_bytes(time));
                key.extend_from_slice(message_id.as_bytes());
                w.put_blind(Ks::Timeline, key, encode_timeline_value(&counter, ev));
            }
        }
    }
    Ok(())
}

/// Where an identifier's profile stands, for linking.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    Profile { root: Identifier, size: u32 },
    Alone,
}

/// Notes that `id` was seen at `time`: a new identifier becomes a profile of
/// its own; a known one keeps the earliest time.
fn name(w: &mut Overlay<'_>, ws: &str, id: &Identifier, time: i64) -> Result<()> {
    let key = ws_id_key(ws, id);
    match w.get(Ks::Identity, &key)? {
        None => {
            w.put(
                Ks::Identity,
                key,
                encode_identity(time, &Standing::Root { size: 1 }),
            );
            put_member(w, ws, id, id, time);
        }
        Some(v) => {
            let (created, standing) = decode_identity(&v)?;
            if time < created {
                w.put(Ks::Identity, key, encode_identity(time, &standing));
                match &standing {
                    Standing::Root { .. } => put_member(w, ws, id, id, time),
                    Standing::Member(root) => put_member(w, ws, root, id, time),
                    Standing::Alone => {}
                }
            }
        }
    }
    Ok(())
}

fn side(w: &mut Overlay<'_>, ws: &str, id: &Identifier) -> Result<Side> {
    let v = w
        .get(Ks::Identity, &ws_id_key(ws, id))?
        .ok_or_else(|| corrupt("a link to an identifier never named"))?;
    Ok(match decode_identity(&v)?.1 {
        Standing::Root { size } => Side::Profile {
            root: id.clone(),
            size,
        },
        Standing::Member(root) => {
            let size = root_size(w, ws, &root)?;
            Side::Profile { root, size }
        }
        Standing::Alone => Side::Alone,
    })
}

/// Links the profiles of `a` and `b` (both already named).
fn link(w: &mut Overlay<'_>, ws: &str, a: &Identifier, b: &Identifier) -> Result<()> {
    let (sa, sb) = (side(w, ws, a)?, side(w, ws, b)?);
    if sa == sb {
        return Ok(());
    }
    match (sa, sb) {
        (Side::Profile { root: ra, size: na }, Side::Profile { root: rb, size: nb })
            if (na as usize) + (nb as usize) <= MAX_PROFILE_IDENTIFIERS =>
        {
            // Union by size; ties go to the smaller root, so the choice is
            // the same whatever order the two were met in.
            let ((keep, _), (gone, _)) = if (nb, &ra) > (na, &rb) {
                ((rb, nb), (ra, na))
            } else {
                ((ra, na), (rb, nb))
            };
            move_members(w, ws, &gone, &keep)?;
            let created = identity_created(w, ws, &keep)?;
            w.put(
                Ks::Identity,
                ws_id_key(ws, &keep),
                encode_identity(created, &Standing::Root { size: na + nb }),
            );
        }
        // Too large, or one side already alone: neither side is merged.
        (sa, sb) => {
            for side in [sa, sb] {
                if let Side::Profile { root, .. } = side {
                    dissolve(w, ws, &root)?;
                }
            }
        }
    }
    Ok(())
}

fn identity_created(w: &mut Overlay<'_>, ws: &str, id: &Identifier) -> Result<i64> {
    let v = w
        .get(Ks::Identity, &ws_id_key(ws, id))?
        .ok_or_else(|| corrupt("a root without an identity row"))?;
    Ok(decode_identity(&v)?.0)
}

fn root_size(w: &mut Overlay<'_>, ws: &str, root: &Identifier) -> Result<u32> {
    let v = w
        .get(Ks::Identity, &ws_id_key(ws, root))?
        .ok_or_else(|| corrupt("a member whose root is unknown"))?;
    match decode_identity(&v)?.1 {
        Standing::Root { size } => Ok(size),
        _ => Err(corrupt("a member whose root is not a root")),
    }
}

fn put_member(w: &mut Overlay<'_>, ws: &str, root: &Identifier, id: &Identifier, created: i64) {
    let mut key = ws_id_key(ws, root);
    push_id(&mut key, id);
    w.put(Ks::Members, key, time_bytes(created).to_vec());
}

/// Re-points every member of the profile rooted at `gone` to `keep`.
fn move_members(w: &mut Overlay<'_>, ws: &str, gone: &Identifier, keep: &Identifier) -> Result<()> {
    let prefix = ws_id_key(ws, gone);
    for (key, created) in w.members(&prefix)? {
        let (member, _) = take_id(&key[prefix.len()..])?;
        let created_at = time_from(&created)?;
        w.delete(Ks::Members, key);
        put_member(w, ws, keep, &member, created_at);
        w.put(
            Ks::Identity,
            ws_id_key(ws, &member),
            encode_identity(created_at, &Standing::Member(keep.clone())),
        );
    }
    Ok(())
}

/// Marks every member of the profile rooted at `root` alone.
fn dissolve(w: &mut Overlay<'_>, ws: &str, root: &Identifier) -> Result<()> {
    let prefix = ws_id_key(ws, root);
    for (key, created) in w.members(&prefix)? {
        let (member, _) = take_id(&key[prefix.len()..])?;
        w.delete(Ks::Members, key);
        w.put(
            Ks::Identity,
            ws_id_key(ws, &member),
            encode_identity(time_from(&created)?, &Standing::Alone),
        );
    }
    Ok(())
}
