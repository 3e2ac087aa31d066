//! The evaluator's rows in CQL: one table, `evaluator_rows`, partitioned by
//! `(table code, part)` and clustered by the sort key.
//!
//! A commit writes each group as one logged batch (all or nothing), groups
//! in order, then the de-duplication rows, then the checkpoint, so a step
//! cut short leaves at worst whole groups written and is written again,
//! identically, when the evaluator replays it. Cells carry a timestamp from
//! this process's monotonic clock, so a later commit's write wins over an
//! earlier one whichever coordinator takes it (one evaluator writes at a
//! time).

use std::sync::atomic::{AtomicI64, Ordering};

use scylla::value::CqlValue;
use trailmark_store::evaluator::{
    EvalCommit, EvalKey, EvalTable, EvalWrite, EvaluatorReader, EvaluatorStore,
};

use super::*;

/// Write timestamps for the evaluator's cells: the wall clock in
/// microseconds, never repeating or going back within this process.
static LAST_TIMESTAMP: AtomicI64 = AtomicI64::new(0);

fn next_timestamp() -> i64 {
    let now = trailmark_domain::Clock::now_micros(&trailmark_domain::SystemClock);
    let mut last = LAST_TIMESTAMP.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST_TIMESTAMP.compare_exchange_weak(last, next, Ordering::SeqCst, Ordering::Relaxed)
        {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

fn code(table: EvalTable) -> i32 {
    i32::from(table.code())
}

#[async_trait]
impl EvaluatorReader for ScyllaStore {
    async fn eval_get(
        &self,
        table: EvalTable,
        keys: Vec<EvalKey>,
    ) -> Result<Vec<(EvalKey, Vec<u8>)>> {
        let mut reads = Vec::with_capacity(keys.len());
        for key in keys {
            reads.push(async move {
                let rows: Vec<(Vec<u8>,)> = self
                    .rows(&self.st.eval.get, (code(table), &key.part, &key.sort))
                    .await?;
                Ok::<_, StoreError>(rows.into_iter().next().map(|(v,)| (key, v)))
            });
        }
        Ok(concurrently(reads).await?.into_iter().flatten().collect())
    }

    async fn eval_parts(
        &self,
        table: EvalTable,
        parts: Vec<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<Vec<(Vec<u8>, Vec<u8>)>>> {
        let limit = limit.min(i32::MAX as usize) as i32;
        let all = &self.st.eval.scan[0];
        let t = code(table);
        // In the order of `parts`, which `concurrently` does not keep.
        stream::iter(parts)
            .map(|part| async move { self.rows(all, (t, part, limit)).await })
            .buffered(CONCURRENCY)
            .try_collect()
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
        let limit = limit.min(i32::MAX as usize) as i32;
        let [all, from, to, between] = &self.st.eval.scan;
        let t = code(table);
        match (after, before) {
            (None, None) => self.rows(all, (t, part, limit)).await,
            (Some(a), None) => self.rows(from, (t, part, a, limit)).await,
            (None, Some(b)) => self.rows(to, (t, part, b, limit)).await,
            (Some(a), Some(b)) => self.rows(between, (t, part, a, b, limit)).await,
        }
    }
}

#[async_trait]
impl EvaluatorStore for ScyllaStore {
    async fn eval_seen(
        &self,
        consumer: &str,
        messages: Vec<(String, String)>,
    ) -> Result<BTreeMap<(String, String), i64>> {
        let keys: HashSet<(String, String)> = messages.into_iter().collect();
        Ok(self.read_dedup(consumer, keys).await?.into_iter().collect())
    }

    async fn eval_commit(&self, commit: Arc<EvalCommit>) -> Result<()> {
        let mut singles = Vec::with_capacity(commit.rows.len());
        for write in &commit.rows {
            singles.push(async move {
                match write {
                    EvalWrite::Put(table, key, value) => {
                        self.write(
                            &self.st.eval.put,
                            (code(*table), &key.part, &key.sort, value, next_timestamp()),
                        )
                        .await
                    }
                    EvalWrite::Delete(table, key) => {
                        self.write(
                            &self.st.eval.delete,
                            (next_timestamp(), code(*table), &key.part, &key.sort),
                        )
                        .await
                    }
                }
            });
        }
        concurrently(singles).await?;
        for group in &commit.groups {
            if group.is_empty() {
                continue;
            }
            // One logged batch per group: all of it or none. Rows are
            // dynamic values, since puts and deletes differ in shape.
            let mut b = Batch::new(BatchType::Logged);
            let mut values: Vec<Vec<CqlValue>> = Vec::with_capacity(group.len());
            for write in group {
                match write {
                    EvalWrite::Put(table, key, value) => {
                        b.append_statement(self.st.eval.put.clone());
                        values.push(vec![
                            CqlValue::Int(code(*table)),
                            CqlValue::Blob(key.part.clone()),
                            CqlValue::Blob(key.sort.clone()),
                            CqlValue::Blob(value.clone()),
                            CqlValue::BigInt(next_timestamp()),
                        ]);
                    }
                    EvalWrite::Delete(table, key) => {
                        b.append_statement(self.st.eval.delete.clone());
                        values.push(vec![
                            CqlValue::BigInt(next_timestamp()),
                            CqlValue::Int(code(*table)),
                            CqlValue::Blob(key.part.clone()),
                            CqlValue::Blob(key.sort.clone()),
                        ]);
                    }
                }
            }
            b.set_is_idempotent(true);
            self.session.batch(&b, values).await.map_err(classify)?;
        }
        let ttl = (commit.dedup_window_micros / 1_000_000)
            .saturating_mul(2)
            .saturating_add(3_600)
            .clamp(1, 630_720_000) as i32;
        let mut marks = Vec::with_capacity(commit.seen.len());
        for (_, ws, mid, received) in &commit.seen {
            marks.push(self.write(
                &self.st.insert_dedup,
                (commit.consumer.as_str(), ws, mid, *received, ttl),
            ));
        }
        concurrently(marks).await?;
        if !commit.positions.is_empty() {
            let mut b = Batch::new(BatchType::Unlogged);
            let mut values = Vec::new();
            for (partition, position) in &commit.positions {
                b.append_statement(self.st.upsert_checkpoint.clone());
                values.push((
                    commit.consumer.as_str(),
                    *partition as i32,
                    *position as i64,
                    *position as i64,
                ));
            }
            b.set_is_idempotent(true);
            self.session.batch(&b, values).await.map_err(classify)?;
        }
        Ok(())
    }
}
