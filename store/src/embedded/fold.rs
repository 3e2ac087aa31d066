//! The fold, persisted: how one batch of events becomes one atomic fjall
//! `WriteBatch`.
//!
//! # Identities
//! Identity is kept as the domain defines it, as evidence, and decided on
//! read ([`trailmark_domain::identity::Walk`]):
//!
//! - `identity` (`ws id`): the identifier's [`Named`] record (earliest and
//!   latest event time, first key and source), merged by
//!   [`Named::include`];
//! - `evidence` (`ws id slot`): each piece of evidence the identifier takes
//!   part in, one per slot ([`trailmark_domain::identity::Evidence::slot`], digested), the one with the
//!   smallest key; kept under every identifier of it that is not blocked;
//! - `profile_ids` (`ws uuid`): the identifier whose [`profile_id`] it is,
//!   written when the identifier is first named, so an absorbed profile's id
//!   keeps resolving.
//!
//! Every write is a merge by a commutative rule, so linking never rewrites
//! earlier rows, and no decision is taken in arrival order.
//!
//! # Replays
//! A batch is committed with its checkpoints, so an event at a position
//! before its partition's checkpoint (for the batch's consumer) was applied
//! and is skipped by position; de-duplication by `messageId` then only sees
//! client retries, each once.

use std::collections::BTreeMap;

use trailmark_domain::identity::profile_id;
use trailmark_domain::profile::{Fact, Named, Seen, TraitValue, is_duplicate, project};
use trailmark_domain::{Event, Identifier};

use super::keys::{
    checkpoint_key, push_component, push_id, time_bytes, time_from, ws_id_key, ws_key,
};
use super::{
    DEDUP_PURGE_SLACK_MICROS, Inner, Ks, RowMap, WriterState, decode_stats, encode_stats,
    encode_timeline_value, from_json, json, u64_from, unavailable,
};
use crate::identity::{decode_named, encode_evidence, encode_named, evidence_key, slot_digest};
use crate::{ApplyBatch, ApplyOutcome, Result};

/// The writes of one batch, applied to the database in one atomic
/// `WriteBatch` at the end. Reads see the batch's own writes first (and are
/// cached), so a batch touching one person many times reads each row once.
/// Rows are kept per keyspace, so a read looks its key up by reference
/// without building a key of its own.
pub(super) struct Overlay<'a> {
    inner: &'a Inner,
    state: &'a mut WriterState,
    rows: [RowMap<Row>; Ks::COUNT],
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
            rows: std::array::from_fn(|_| RowMap::default()),
            blind: Vec::new(),
        }
    }

    /// The row's value: the batch's own write, else the cache's copy, else
    /// the database's (remembered for the rest of the batch).
    pub(super) fn get(&mut self, ks: Ks, key: &[u8]) -> Result<Option<&[u8]>> {
        let rows = &mut self.rows[ks.index()];
        if !rows.contains_key(key) {
            let value = match self.state.cache[ks.index()].get(key) {
                Some(cached) => cached.clone(),
                None => self
                    .inner
                    .ks
                    .get(ks)
                    .get(key)
                    .map_err(unavailable)?
                    .map(|v| v.to_vec()),
            };
            rows.insert(
                key.to_vec(),
                Row {
                    value,
                    dirty: false,
                },
            );
        }
        Ok(rows.get(key).and_then(|r| r.value.as_deref()))
    }

    fn set(&mut self, ks: Ks, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.rows[ks.index()].insert(key, Row { value, dirty: true });
    }

    pub(super) fn put(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.set(ks, key, Some(value));
    }

    pub(super) fn delete(&mut self, ks: Ks, key: Vec<u8>) {
        self.set(ks, key, None);
    }

    fn put_blind(&mut self, ks: Ks, key: Vec<u8>, value: Vec<u8>) {
        self.blind.push((ks, key, value));
    }

    pub(super) fn commit(self) -> Result<()> {
        let handles = &self.inner.ks;
        let mut batch = self.inner.db.batch();
        for (k, rows) in Ks::PROJECTIONS.iter().zip(&self.rows) {
            let handle = handles.get(*k);
            for (key, row) in rows {
                if !row.dirty {
                    continue;
                }
                // Slices: the batch copies them once into its own buffers.
                match &row.value {
                    Some(v) => batch.insert(handle, key.as_slice(), v.as_slice()),
                    None => batch.remove(handle, key.as_slice()),
                }
            }
        }
        for (k, key, value) in self.blind {
            batch.insert(handles.get(k), key, value);
        }
        if let Err(e) = batch.commit() {
            // What the cache holds may no longer match the database.
            self.state.clear_cache();
            return Err(unavailable(e));
        }
        for (k, rows) in Ks::PROJECTIONS.into_iter().zip(self.rows) {
            if k.cached() {
                for (key, row) in rows {
                    self.state.cache_row(k, key, row.value);
                }
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
        // The latest `receivedAt` of each partition in the batch: the
        // de-duplication rows of a partition are purged by its own
        // progress, since every copy of a message is in one partition.
        let mut max_received: BTreeMap<u32, i64> = BTreeMap::new();
        // Where each partition's checkpoint stands: events before it were
        // applied with it, atomically, so a batch delivered again (a
        // projector that re-read without the store's checkpoint) skips them
        // by position, before de-duplication is even asked. (By messageId
        // alone, a replay would count again the first of two copies of a
        // message received more than a window apart.)
        let mut applied_to: BTreeMap<u32, u64> = BTreeMap::new();
        // De-duplication is per consumer: each consumer of the log decides
        // for itself which copies of a message it has seen.
        let consumer = consumer_component(&batch.consumer);
        for le in &batch.events {
            let next = match applied_to.get(&le.partition) {
                Some(n) => *n,
                None => {
                    let key = checkpoint_key(&batch.consumer, le.partition);
                    let n = match w.get(Ks::Checkpoints, &key)? {
                        Some(v) => u64_from(v, "checkpoint")?,
                        None => 0,
                    };
                    applied_to.insert(le.partition, n);
                    n
                }
            };
            if le.position < next {
                outcome.duplicates += 1;
                continue;
            }
            let ev = &le.event;
            let dkey = dedup_key(&consumer, &ev.workspace_id, &ev.message_id);
            let previous = match w.get(Ks::Dedup, &dkey)? {
                Some(v) => Some(time_from(v)?),
                None => None,
            };
            if is_duplicate(previous, ev.received_at, batch.dedup_window_micros) {
                outcome.duplicates += 1;
                continue;
            }
            record_seen(
                &mut w,
                &consumer,
                le.partition,
                dkey,
                previous,
                ev.received_at,
                &mut max_received,
            );

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
        self.purge_seen(&mut w, &consumer, max_received, batch.dedup_window_micros)?;
        w.commit()?;
        Ok(outcome)
    }

    /// Purges the de-duplication rows of each partition older than its
    /// latest `receivedAt` in a step, less the window and a slack.
    pub(super) fn purge_seen(
        &self,
        w: &mut Overlay<'_>,
        consumer: &[u8],
        max_received: BTreeMap<u32, i64>,
        window: i64,
    ) -> Result<()> {
        for (partition, max) in max_received {
            let horizon = max
                .saturating_sub(window)
                .saturating_sub(DEDUP_PURGE_SLACK_MICROS);
            self.purge_dedup(w, consumer, partition, horizon)?;
        }
        Ok(())
    }

    /// Forgets the messages `consumer` saw in `partition` received before
    /// `horizon`, at most 10,000 a batch.
    fn purge_dedup(
        &self,
        w: &mut Overlay<'_>,
        consumer: &[u8],
        partition: u32,
        horizon: i64,
    ) -> Result<()> {
        let end = dedup_time_key(consumer, partition, horizon, &[]);
        let start = dedup_time_key(consumer, partition, i64::MIN, &[]);
        let from = w
            .state
            .purge_from
            .get(&(consumer.to_vec(), partition))
            .cloned()
            .unwrap_or(start);
        if from >= end {
            return Ok(());
        }
        let old: Vec<Vec<u8>> = self
            .ks
            .dedup_time
            .range(from..end)
            .take(10_000)
            .map(|kv| kv.key().map(|k| k.to_vec()).map_err(unavailable))
            .collect::<Result<_>>()?;
        if let Some(last) = old.last() {
            w.state
                .purge_from
                .insert((consumer.to_vec(), partition), last.clone());
        }
        let head = consumer.len() + 12;
        for k in old {
            let dkey = k[head..].to_vec();
            // Only forget the message if this index row is still its latest.
            if w.get(Ks::Dedup, &dkey)? == Some(&k[consumer.len() + 4..head]) {
                w.delete(Ks::Dedup, dkey);
            }
            w.delete(Ks::DedupTime, k);
        }
        Ok(())
    }
}

/// Records that `consumer` saw a message (its row `dkey`, last seen at
/// `previous`) at `received_at` in `partition`, and tracks the partition's
/// latest `receivedAt` for the purge.
pub(super) fn record_seen(
    w: &mut Overlay<'_>,
    consumer: &[u8],
    partition: u32,
    dkey: Vec<u8>,
    previous: Option<i64>,
    received_at: i64,
    max_received: &mut BTreeMap<u32, i64>,
) {
    if let Some(prev) = previous {
        w.delete(
            Ks::DedupTime,
            dedup_time_key(consumer, partition, prev, &dkey),
        );
    }
    let tkey = dedup_time_key(consumer, partition, received_at, &dkey);
    w.put(Ks::Dedup, dkey, time_bytes(received_at).to_vec());
    w.put(Ks::DedupTime, tkey, Vec::new());
    let max = max_received.entry(partition).or_insert(i64::MIN);
    *max = (*max).max(received_at);
}

/// A consumer's name as the first component of its de-duplication keys.
pub(super) fn consumer_component(consumer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(consumer.len() + 2);
    push_component(&mut k, consumer.as_bytes());
    k
}

/// `consumer ws messageId`: the key of a message's de-duplication row.
pub(super) fn dedup_key(consumer: &[u8], ws: &str, message_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(consumer.len() + ws.len() + message_id.len() + 2);
    k.extend_from_slice(consumer);
    push_component(&mut k, ws.as_bytes());
    k.extend_from_slice(message_id.as_bytes());
    k
}

/// `consumer partition receivedAt dedup-key`: the purge index of the
/// de-duplication rows, in each consumer's and partition's time order.
fn dedup_time_key(consumer: &[u8], partition: u32, received_at: i64, dkey: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(consumer.len() + 12 + dkey.len());
    k.extend_from_slice(consumer);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&time_bytes(received_at));
    k.extend_from_slice(dkey);
    k
}

/// Folds one event: its facts, each by its rule, with an exhaustive match.
fn fold(w: &mut Overlay<'_>, ev: &Event) -> Result<()> {
    let ws = ev.workspace_id.as_str();
    for fact in project(ev)?.facts {
        match fact {
            Fact::Named { id, named } => name(w, ws, &id, &named)?,
            Fact::Linked(evidence) => {
                let rules = w.inner.rules(ws)?;
                let digest = slot_digest(&evidence.slot(&rules));
                let value = encode_evidence(&evidence);
                for id in evidence.ids.iter().filter(|i| !rules.is_blocked(i)) {
                    let mut key = ws_id_key(ws, id);
                    key.extend_from_slice(&digest);
                    // One piece per slot: the smallest key.
                    let kept = match w.get(Ks::Evidence, &key)? {
                        Some(v) => evidence_key(v)? <= evidence.key,
                        None => false,
                    };
                    if !kept {
                        w.put(Ks::Evidence, key, value.clone());
                    }
                }
            }
            Fact::Trait { id, name, value } => {
                // The latest event time wins, per trait.
                let mut key = ws_id_key(ws, &id);
                key.extend_from_slice(name.as_bytes());
                let wins = match w.get(Ks::Traits, &key)? {
                    None => true,
                    Some(v) => value.supersedes(&from_json::<TraitValue>(v, "trait row")?),
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
                        let (seen, counts) = decode_stats(v)?;
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
            Fact::Member {
                account,
                member,
                named,
            } => {
                // Read one direction, write both with the same record.
                let mut key = ws_id_key(ws, &account);
                push_id(&mut key, &member);
                let value = match merge_named(w, Ks::AccountMembers, &key, &named)? {
                    Merged::Unchanged => continue,
                    Merged::Changed(value) | Merged::New(value) => value,
                };
                let mut reverse = ws_id_key(ws, &member);
                push_id(&mut reverse, &account);
                w.put(Ks::AccountMembers, key, value.clone());
                w.put(Ks::MemberAccounts, reverse, value);
            }
        }
    }
    Ok(())
}

/// Merges what an event says of `id` into its record; a new identifier
/// also gets its `profile_ids` row.
fn name(w: &mut Overlay<'_>, ws: &str, id: &Identifier, named: &Named) -> Result<()> {
    let key = ws_id_key(ws, id);
    match merge_named(w, Ks::Identity, &key, named)? {
        Merged::Unchanged => {}
        Merged::Changed(value) => w.put(Ks::Identity, key, value),
        Merged::New(value) => {
            w.put(Ks::Identity, key, value);
            let mut pkey = ws_key(ws);
            pkey.extend_from_slice(profile_id(ws, id).as_bytes());
            let mut value = Vec::new();
            push_id(&mut value, id);
            w.put_blind(Ks::ProfileIds, pkey, value);
        }
    }
    Ok(())
}

/// What merging a [`Named`] into a stored record gives.
enum Merged {
    /// The record includes it already: nothing to write.
    Unchanged,
    /// The record, changed, to write.
    Changed(Vec<u8>),
    /// There was no record: the new one, to write.
    New(Vec<u8>),
}

/// Merges `named` into the record at `key` of `ks` by [`Named::include`].
fn merge_named(w: &mut Overlay<'_>, ks: Ks, key: &[u8], named: &Named) -> Result<Merged> {
    Ok(match w.get(ks, key)? {
        None => Merged::New(encode_named(named)),
        Some(v) => {
            let mut record = decode_named(v)?;
            let before = record.clone();
            record.include(named);
            if record == before {
                Merged::Unchanged
            } else {
                Merged::Changed(encode_named(&record))
            }
        }
    })
}
