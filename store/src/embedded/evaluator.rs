//! The evaluator's rows in the embedded store: one keyspace, `evaluator`,
//! keyed `table code, part (a terminated component), sort`, so every part's
//! rows are one contiguous range and no part can reach another's. A commit
//! is one atomic batch: the groups, the de-duplication rows and the
//! checkpoint together.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use fjall::Readable;

use super::fold::{Overlay, consumer_component, dedup_key, record_seen};
use super::keys::{checkpoint_key, push_component, time_from};
use super::{EmbeddedStore, Inner, Ks, unavailable};
use crate::Result;
use crate::evaluator::{
    EvalCommit, EvalKey, EvalTable, EvalWrite, EvaluatorReader, EvaluatorStore,
};

/// The start of a part's range: `code part`.
fn part_prefix(table: EvalTable, part: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(part.len() + 3);
    k.push(table.code());
    push_component(&mut k, part);
    k
}

/// The first key after every key that starts with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Up to `limit` rows of `range` while they are under `prefix`, as
/// `(sort, value)`: a part's rows, the part stripped.
fn part_rows(
    range: impl Iterator<Item = fjall::Guard>,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for kv in range {
        if out.len() >= limit {
            break;
        }
        let (k, v) = kv.into_inner().map_err(unavailable)?;
        if !k.starts_with(prefix) {
            break;
        }
        out.push((k[prefix.len()..].to_vec(), v.to_vec()));
    }
    Ok(out)
}

fn row_key(table: EvalTable, key: &EvalKey) -> Vec<u8> {
    let mut k = part_prefix(table, &key.part);
    k.extend_from_slice(&key.sort);
    k
}

impl Inner {
    fn eval_commit(&self, commit: &EvalCommit) -> Result<()> {
        let mut state = self.eval_writer.lock().expect("evaluator writer lock");
        let mut w = Overlay::new(self, &mut state);
        for write in commit.rows.iter().chain(commit.groups.iter().flatten()) {
            match write {
                EvalWrite::Put(table, key, value) => {
                    w.put(Ks::Evaluator, row_key(*table, key), value.clone());
                }
                EvalWrite::Delete(table, key) => w.delete(Ks::Evaluator, row_key(*table, key)),
            }
        }
        let consumer = consumer_component(&commit.consumer);
        let mut max_received = BTreeMap::new();
        for (partition, ws, message_id, received_at) in &commit.seen {
            let dkey = dedup_key(&consumer, ws, message_id);
            let previous = match w.get(Ks::Dedup, &dkey)? {
                Some(v) => Some(time_from(v)?),
                None => None,
            };
            record_seen(
                &mut w,
                &consumer,
                *partition,
                dkey,
                previous,
                *received_at,
                &mut max_received,
            );
        }
        self.purge_seen(&mut w, &consumer, max_received, commit.dedup_window_micros)?;
        for (partition, position) in &commit.positions {
            w.put(
                Ks::Checkpoints,
                checkpoint_key(&commit.consumer, *partition),
                position.to_be_bytes().to_vec(),
            );
        }
        w.commit()
    }
}

#[async_trait]
impl EvaluatorReader for EmbeddedStore {
    async fn eval_get(
        &self,
        table: EvalTable,
        keys: Vec<EvalKey>,
    ) -> Result<Vec<(EvalKey, Vec<u8>)>> {
        self.blocking(move |inner| {
            let mut out = Vec::new();
            for key in keys {
                if let Some(v) = inner
                    .ks
                    .evaluator
                    .get(row_key(table, &key))
                    .map_err(unavailable)?
                {
                    out.push((key, v.to_vec()));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn eval_parts(
        &self,
        table: EvalTable,
        parts: Vec<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<Vec<(Vec<u8>, Vec<u8>)>>> {
        self.blocking(move |inner| {
            let snap = inner.db.snapshot();
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                let prefix = part_prefix(table, &part);
                out.push(part_rows(
                    snap.prefix(&inner.ks.evaluator, &prefix),
                    &prefix,
                    limit,
                )?);
            }
            Ok(out)
        })
        .await
    }

    async fn eval_scan(
        &self,
        table: EvalTable,
        part: &[u8],
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = part_prefix(table, part);
        let mut from = prefix.clone();
        if let Some(a) = after {
            from.extend_from_slice(a);
            // Exclusive: the first key after `a` and everything under it.
            from.push(0);
        }
        // Always bounded above, so a scan never walks the tombstones past
        // its part (a drained queue's, say) looking for a live key.
        let end = match before {
            Some(b) => {
                let mut e = prefix.clone();
                e.extend_from_slice(b);
                Some(e)
            }
            None => prefix_end(&prefix),
        };
        self.blocking(move |inner| {
            let snap = inner.db.snapshot();
            let range: Box<dyn Iterator<Item = _>> = match end {
                Some(e) => Box::new(snap.range(&inner.ks.evaluator, from..e)),
                None => Box::new(snap.range(&inner.ks.evaluator, from..)),
            };
            part_rows(range, &prefix, limit)
        })
        .await
    }
}

#[async_trait]
impl EvaluatorStore for EmbeddedStore {
    async fn eval_seen(
        &self,
        consumer: &str,
        messages: Vec<(String, String)>,
    ) -> Result<BTreeMap<(String, String), i64>> {
        let consumer = consumer_component(consumer);
        self.blocking(move |inner| {
            let mut out = BTreeMap::new();
            for (ws, mid) in messages {
                let key = dedup_key(&consumer, &ws, &mid);
                if let Some(v) = inner.ks.dedup.get(key).map_err(unavailable)? {
                    out.insert((ws, mid), time_from(&v)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn eval_commit(&self, commit: Arc<EvalCommit>) -> Result<()> {
        self.blocking(move |inner| inner.eval_commit(&commit)).await
    }
}
