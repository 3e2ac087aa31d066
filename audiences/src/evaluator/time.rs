//! Work driven by time and by catching up: the sweep of due deadlines, and
//! the profiles marked while catching up.

use trailmark_domain::Identifier;
use trailmark_store::evaluator::{EvalKey, EvalTable, EvalWrite};

use super::*;
use crate::Result;
use crate::rows::{self, Cause};

impl Evaluator {
    /// Evaluates the profiles whose deadline has passed.
    pub(super) async fn sweep(&self, run: &mut Run) -> Result<()> {
        let now = self.clock.now_micros();
        let now_hour = now.div_euclid(rows::HOUR);
        let mut hour = run.sweep_cursor.unwrap_or(now_hour - 1);
        let catalogs = run.catalogs();
        let before = rows::time_bytes(now + 1).to_vec();
        while hour <= now_hour {
            let part = hour.to_be_bytes().to_vec();
            loop {
                let due = self
                    .store
                    .eval_scan(EvalTable::Deadlines, &part, None, Some(&before), SLICE)
                    .await?;
                if due.is_empty() {
                    break;
                }
                let mut commit = self.commit();
                // Whatever happens below, these rows are done with; the
                // evaluation writes each profile's next deadline.
                let mut entries = Vec::with_capacity(due.len());
                for (sort, _) in &due {
                    commit.rows.push(EvalWrite::Delete(
                        EvalTable::Deadlines,
                        EvalKey::new(part.clone(), sort.clone()),
                    ));
                    if let Some(entry) = rows::read_deadline(sort) {
                        entries.push(entry);
                    }
                }
                let records = {
                    let keys: Vec<(&str, uuid::Uuid)> = entries
                        .iter()
                        .map(|(_, pid, ws)| (ws.as_str(), *pid))
                        .collect();
                    run.caches.records.records(&*self.store, &keys).await?
                };
                let touched: Vec<Touch> = entries
                    .into_iter()
                    .zip(records)
                    .filter_map(|((deadline, _, ws), record)| {
                        let holder = Identifier::parse(&record?.holder)?;
                        // Only time passed: what is due.
                        Some(Touch {
                            ws,
                            ids: vec![holder],
                            cause: Cause::Deadline { at: deadline },
                            changed: Some(Changed::default()),
                        })
                    })
                    .collect();
                self.evaluate_into(run, &catalogs, touched, now, &mut commit)
                    .await?;
                self.commit_run(run, commit).await?;
                self.publish(run).await?;
            }
            if hour < now_hour {
                hour += 1;
                run.sweep_cursor = Some(hour);
                self.put_stats("sweep", &hour).await?;
            } else {
                break;
            }
        }
        run.swept_to = now;
        Ok(())
    }

    /// Evaluates the profiles marked while catching up, a slice at a time.
    pub(super) async fn drain_dirty(&self, run: &mut Run) -> Result<()> {
        let now = self.clock.now_micros();
        let catalogs = run.catalogs();
        for ws in self.directory.workspaces().await? {
            loop {
                let marked = self
                    .store
                    .eval_scan(EvalTable::Dirty, ws.id.as_bytes(), None, None, SLICE)
                    .await?;
                if marked.is_empty() {
                    break;
                }
                let mut commit = self.commit();
                let mut touched = Vec::new();
                for (sort, _) in &marked {
                    commit.rows.push(EvalWrite::Delete(
                        EvalTable::Dirty,
                        EvalKey::new(ws.id.as_bytes().to_vec(), sort.clone()),
                    ));
                    if let Some(id) = std::str::from_utf8(sort).ok().and_then(Identifier::parse) {
                        touched.push(Touch::full(
                            ws.id.clone(),
                            vec![id],
                            Cause::Definition { version: 0 },
                        ));
                    }
                }
                self.evaluate_into(run, &catalogs, touched, now, &mut commit)
                    .await?;
                self.commit_run(run, commit).await?;
                self.publish(run).await?;
            }
        }
        run.dirty_left = false;
        Ok(())
    }
}
