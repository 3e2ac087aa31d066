//! One step over a batch of the log: skip what was seen, fold leaf
//! states, restore memberships from the evaluator's own events, evaluate
//! the touched profiles, commit, and append the outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use trailmark_domain::audience::{Catalog, EVALUATOR_SOURCE};
use trailmark_domain::profile::is_duplicate;
use trailmark_domain::{Event, EventType, IdKind, Identifier};
use trailmark_log::Record;
use trailmark_store::LoggedEvent;
use trailmark_store::evaluator::{EvalCommit, EvalKey, EvalTable, EvalWrite};
use uuid::Uuid;

use super::*;
use crate::profile::{self, Outcome, Overlay};
use crate::rows::{self, Cause, LeafRow, MemberRow, MemberState, ProfileRecord};
use crate::{EvaluatorError, Result};

impl Evaluator {
    /// One step over a batch of the log.
    pub(super) async fn step(
        &self,
        run: &mut Run,
        events: &[LoggedEvent],
        positions: &[(u32, u64)],
    ) -> Result<()> {
        self.follow_projector(positions).await?;
        let now = self.clock.now_micros();
        let mut commit = EvalCommit {
            consumer: self.config.group.clone(),
            dedup_window_micros: self.window(),
            positions: positions.to_vec(),
            ..EvalCommit::default()
        };
        let catalogs: HashMap<String, Arc<Catalog>> = run
            .workspaces
            .iter()
            .map(|(ws, r)| (ws.clone(), r.catalog.clone()))
            .collect();
        let events: Vec<&LoggedEvent> = events
            .iter()
            .filter(|le| {
                run.positions
                    .get(&le.partition)
                    .is_none_or(|next| le.position >= *next)
            })
            .collect();
        let joined = run.joined.clone();
        let contributions = self
            .contributions(&self.config.group, &events, &catalogs, &joined, &mut commit)
            .await?;
        let mut overlay = std::mem::take(&mut run.leaf_cache);
        self.fold(contributions, &mut overlay, &mut commit).await?;
        let mut touched: Vec<(String, Identifier, Cause)> = Vec::new();
        let mut own: Vec<&Event> = Vec::new();
        for le in &events {
            let ev = &le.event;
            if ev.source_id == EVALUATOR_SOURCE {
                own.push(ev);
                continue;
            }
            let cause = Cause::Event {
                message_id: ev.message_id.clone(),
                received_at: ev.received_at,
            };
            for id in touched_ids(ev) {
                touched.push((ev.workspace_id.clone(), id, cause.clone()));
            }
        }
        let mut restored = self.restore(&own).await?;
        // A workspace with nothing defined needs no evaluation: its
        // identifiers are only noted, so that a first definition's pass
        // finds every profile.
        touched.retain(|(ws, id, _)| {
            if catalogs.contains_key(ws) {
                return true;
            }
            if run.known.insert((ws.clone(), id.clone())) {
                commit.rows.push(EvalWrite::Put(
                    EvalTable::IdProfiles,
                    rows::id_profile_key(ws, id),
                    Uuid::nil().as_bytes().to_vec(),
                ));
            }
            false
        });
        if run.known.len() > KNOWN_ROWS {
            run.known.clear();
        }
        if run.catching_up.is_some() {
            for (ws, id, _) in &touched {
                commit.rows.push(EvalWrite::Put(
                    EvalTable::Dirty,
                    rows::dirty_key(ws, id),
                    Vec::new(),
                ));
            }
            commit.groups.append(&mut restored);
        } else {
            commit.groups.append(&mut restored);
            let outcomes = self
                .evaluate_all(run, &catalogs, touched, now, &overlay)
                .await?;
            self.add_outcomes(run, &mut commit, outcomes, now)?;
        }
        self.store.eval_commit(Arc::new(commit)).await?;
        for (p, next) in positions {
            run.positions.insert(*p, *next);
        }
        if let Some(last) = events.last() {
            let lag = (now - last.event.received_at).max(0);
            self.metrics.evaluator_lag_seconds.set(lag as f64 / 1e6);
        }
        if overlay.len() > LEAF_CACHE_ROWS {
            overlay.clear();
        }
        run.leaf_cache = overlay;
        self.publish(run).await
    }

    /// What a batch's events contribute to leaf states, with each client
    /// retry of a message `consumer` saw within the window left out (as the
    /// projector leaves it out), and the decisions recorded in `commit`.
    ///
    /// Only events that contribute are de-duplicated: the others fold
    /// nothing, and evaluating a profile twice changes nothing. Within a
    /// window after a backfill met this reader (`joined`), an event that
    /// contributes to the backfilled specs is also checked against what the
    /// backfill saw, so a retry on either side of the meeting point counts
    /// once.
    pub(super) async fn contributions<'e>(
        &self,
        consumer: &str,
        events: &[&'e LoggedEvent],
        catalogs: &HashMap<String, Arc<Catalog>>,
        joined: &[Joined],
        commit: &mut EvalCommit,
    ) -> Result<Vec<Folding<'e>>> {
        let mut candidates = Vec::new();
        for le in events {
            let ev = &le.event;
            if ev.source_id == EVALUATOR_SOURCE || ev.kind == EventType::Control {
                continue;
            }
            let Some(catalog) = catalogs.get(&ev.workspace_id) else {
                continue;
            };
            let found = catalog.contributions(ev);
            if !found.is_empty() {
                candidates.push((*le, catalog.clone(), found));
            }
        }
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<(String, String)> = candidates
            .iter()
            .map(|(le, _, _)| (le.event.workspace_id.clone(), le.event.message_id.clone()))
            .collect();
        let mut seen = self.store.eval_seen(consumer, keys.clone()).await?;
        let window = self.window();
        for j in joined {
            let theirs = self.store.eval_seen(&j.consumer, keys.clone()).await?;
            for (key, at) in theirs {
                let e = seen.entry(key).or_insert(at);
                *e = (*e).max(at);
            }
        }
        let mut out = Vec::new();
        for (le, catalog, found) in candidates {
            let ev = &le.event;
            let key = (ev.workspace_id.clone(), ev.message_id.clone());
            if is_duplicate(seen.get(&key).copied(), ev.received_at, window) {
                continue;
            }
            seen.insert(key, ev.received_at);
            commit.seen.push((
                le.partition,
                ev.workspace_id.clone(),
                ev.message_id.clone(),
                ev.received_at,
            ));
            let primary = ev.primary_identifier();
            for (spec, c) in found {
                let key = rows::leaf_key(&ev.workspace_id, &primary, &spec);
                out.push(Folding {
                    event: le,
                    catalog: catalog.clone(),
                    spec,
                    key,
                    contribution: c,
                });
            }
        }
        Ok(out)
    }

    /// Folds contributions into leaf rows (in `overlay`, and as standalone
    /// writes of `commit`), each row fenced by its partition's position.
    pub(super) async fn fold(
        &self,
        contributions: Vec<Folding<'_>>,
        overlay: &mut Overlay,
        commit: &mut EvalCommit,
    ) -> Result<()> {
        let mut wanted: Vec<EvalKey> = contributions
            .iter()
            .filter(|c| !overlay.contains_key(&c.key))
            .map(|c| c.key.clone())
            .collect();
        if !wanted.is_empty() {
            wanted.sort();
            wanted.dedup();
            let found: HashMap<EvalKey, Vec<u8>> = self
                .store
                .eval_get(EvalTable::Leaves, wanted)
                .await?
                .into_iter()
                .collect();
            for c in &contributions {
                if overlay.contains_key(&c.key) {
                    continue;
                }
                let row = found
                    .get(&c.key)
                    .and_then(|v| rows::decode::<LeafRow>(v))
                    .unwrap_or_else(|| LeafRow {
                        state: c.catalog.specs()[&c.spec].empty(),
                        applied: None,
                    });
                overlay.insert(c.key.clone(), row);
            }
        }
        let mut changed = BTreeSet::new();
        for c in contributions {
            let Some(row) = overlay.get_mut(&c.key) else {
                continue;
            };
            let le = c.event;
            if let Some((p, next)) = row.applied
                && p == le.partition
                && le.position < next
            {
                continue;
            }
            row.state.fold(&c.catalog.specs()[&c.spec], &c.contribution);
            row.applied = Some((le.partition, le.position + 1));
            changed.insert(c.key);
        }
        for key in changed {
            let row = &overlay[&key];
            commit
                .rows
                .push(EvalWrite::Put(EvalTable::Leaves, key, rows::encode(row)));
        }
        Ok(())
    }

    /// Restores memberships from the evaluator's own events: after a
    /// rebuild, the log is the only record of the changes it emitted.
    pub(super) async fn restore(&self, own: &[&Event]) -> Result<Vec<Vec<EvalWrite>>> {
        let mut records: BTreeMap<(String, Uuid), ProfileRecord> = BTreeMap::new();
        let mut changed = BTreeSet::new();
        let mut groups = Vec::new();
        for ev in own {
            let Some((def, pid, n, member, version)) = crate::emit::read_membership(ev) else {
                continue;
            };
            let ws = ev.workspace_id.clone();
            let key = (ws.clone(), pid);
            if !records.contains_key(&key) {
                let r = profile::record(&*self.store, &ws, pid).await?;
                records.insert(key.clone(), r.unwrap_or_default());
            }
            let record = records.get_mut(&key).expect("just read");
            let behind = record.audiences.get(&def).is_none_or(|s| s.n < n);
            if !behind {
                continue;
            }
            if record.holder.is_empty() {
                record.holder = ev
                    .user_id
                    .as_ref()
                    .map(|u| format!("user_id:{u}"))
                    .or_else(|| {
                        ev.anonymous_id
                            .as_ref()
                            .map(|a| format!("anonymous_id:{a}"))
                    })
                    .unwrap_or_default();
            }
            record.audiences.insert(
                def.clone(),
                MemberState {
                    member,
                    n,
                    version,
                    since: ev.timestamp,
                },
            );
            let mkey = rows::member_key(&ws, &def, pid);
            groups.push(vec![if member {
                EvalWrite::Put(
                    EvalTable::Members,
                    mkey,
                    rows::encode(&MemberRow {
                        holder: record.holder.clone(),
                        since: ev.timestamp,
                        version,
                    }),
                )
            } else {
                EvalWrite::Delete(EvalTable::Members, mkey)
            }]);
            changed.insert(key);
        }
        for key in changed {
            groups.push(vec![EvalWrite::Put(
                EvalTable::Profiles,
                rows::profile_key(&key.0, key.1),
                rows::encode(&records[&key]),
            )]);
        }
        Ok(groups)
    }

    /// Evaluates the profiles of touched identifiers, and those identity
    /// changes among them reach (merged-away and split-off profiles).
    pub(super) async fn evaluate_all(
        &self,
        run: &Run,
        catalogs: &HashMap<String, Arc<Catalog>>,
        touched: Vec<(String, Identifier, Cause)>,
        now: i64,
        overlay: &Overlay,
    ) -> Result<Vec<(String, Outcome)>> {
        let empty = Arc::new(Catalog::default());
        // The newest event that touched a profile is its cause: evaluated
        // newest first, each profile once.
        let mut touched = touched;
        touched.reverse();
        let mut done: BTreeSet<(String, Uuid)> = BTreeSet::new();
        let mut formers: Vec<(String, Uuid, Uuid)> = Vec::new();
        let mut outcomes = Vec::new();
        let mut followed = 0;
        let _ = run;
        // Rounds: the touched identifiers, then those that left the
        // profiles evaluated (splits). Within a round, profiles are resolved
        // and evaluated concurrently: each reads and writes only its own
        // rows, and their writes are committed together after.
        let mut round = touched;
        while !round.is_empty() {
            let resolved: Vec<_> = stream::iter(round)
                .map(|(ws, id, cause)| async move {
                    let p = self.store.resolve(&ws, &id).await?;
                    Ok::<_, EvaluatorError>(p.map(|p| (ws, cause, p)))
                })
                .buffered(CONCURRENCY)
                .try_collect()
                .await?;
            let mut distinct = Vec::new();
            for (ws, cause, profile) in resolved.into_iter().flatten() {
                if done.insert((ws.clone(), profile.profile_id)) {
                    distinct.push((ws, cause, profile));
                }
            }
            let evaluated: Vec<_> = stream::iter(distinct)
                .map(|(ws, cause, profile)| {
                    let catalog = catalogs.get(&ws).unwrap_or(&empty).clone();
                    async move {
                        let out = profile::evaluate(
                            &*self.store,
                            &ws,
                            &catalog,
                            &profile,
                            &cause,
                            now,
                            overlay,
                        )
                        .await?;
                        Ok::<_, EvaluatorError>((ws, cause, profile.profile_id, out))
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await?;
            round = Vec::new();
            for (ws, cause, pid, out) in evaluated {
                for d in &out.departed {
                    if followed < MAX_FOLLOW {
                        followed += 1;
                        round.push((ws.clone(), d.clone(), cause.clone()));
                    }
                }
                for f in &out.former {
                    if *f != pid {
                        formers.push((ws.clone(), *f, pid));
                    }
                }
                outcomes.push((ws, out));
            }
        }
        // Profiles its members were last evaluated under: still standing
        // (a split gave them back), or retired.
        for (ws, former, into) in formers {
            if done.contains(&(ws.clone(), former)) {
                continue;
            }
            let Some(before) = profile::record(&*self.store, &ws, former).await? else {
                continue;
            };
            let catalog = catalogs.get(&ws).unwrap_or(&empty);
            let standing = match Identifier::parse(&before.holder) {
                Some(h) => self
                    .store
                    .resolve(&ws, &h)
                    .await?
                    .filter(|p| p.profile_id == former),
                None => None,
            };
            done.insert((ws.clone(), former));
            match standing {
                Some(p) => {
                    let cause = Cause::Merged { into };
                    let out =
                        profile::evaluate(&*self.store, &ws, catalog, &p, &cause, now, overlay)
                            .await?;
                    outcomes.push((ws, out));
                }
                None => {
                    if before.audiences.values().any(|s| s.member) || before.deadline.is_some() {
                        outcomes.push((
                            ws.clone(),
                            profile::retire(&ws, former, &before, catalog, into, now),
                        ));
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// Adds evaluation outcomes to a commit: each profile's writes with its
    /// events' outbox rows, as one group.
    pub(super) fn add_outcomes(
        &self,
        run: &mut Run,
        commit: &mut EvalCommit,
        outcomes: Vec<(String, Outcome)>,
        now: i64,
    ) -> Result<()> {
        for (_, out) in outcomes {
            let mut group = out.group;
            for ev in &out.events {
                let payload = self
                    .codec
                    .encode(ev)
                    .map_err(|e| EvaluatorError::Encode(e.to_string()))?;
                run.outbox_seq += 1;
                group.push(EvalWrite::Put(
                    EvalTable::Outbox,
                    rows::outbox_key(now, run.outbox_seq),
                    rows::outbox_value(&ev.partition_key(), &payload),
                ));
            }
            for cause in &out.changes {
                match cause {
                    Cause::Event { received_at, .. } => self
                        .metrics
                        .evaluator_change_delay_seconds
                        .with_label_values(&["event"])
                        .observe((now - received_at).max(0) as f64 / 1e6),
                    Cause::Deadline { at } => self
                        .metrics
                        .evaluator_change_delay_seconds
                        .with_label_values(&["deadline"])
                        .observe((now - at).max(0) as f64 / 1e6),
                    _ => {}
                }
            }
            self.metrics
                .evaluator_changes
                .inc_by(out.events.len() as u64);
            if !group.is_empty() {
                commit.groups.push(group);
            }
        }
        Ok(())
    }

    /// Appends the outbox to the log, then clears what was appended.
    pub(super) async fn publish(&self, _run: &mut Run) -> Result<()> {
        loop {
            let rows_found = self
                .store
                .eval_scan(EvalTable::Outbox, &[], None, None, 500)
                .await?;
            if rows_found.is_empty() {
                return Ok(());
            }
            let mut records = Vec::with_capacity(rows_found.len());
            let mut deletes = Vec::with_capacity(rows_found.len());
            for (sort, v) in rows_found {
                if let Some((key, payload)) = rows::read_outbox(&v) {
                    records.push(Record { key, payload });
                }
                deletes.push(EvalWrite::Delete(
                    EvalTable::Outbox,
                    EvalKey::new(Vec::new(), sort),
                ));
            }
            self.log.append(records).await?;
            self.store
                .eval_commit(Arc::new(EvalCommit {
                    consumer: self.config.group.clone(),
                    rows: deletes,
                    dedup_window_micros: self.window(),
                    ..EvalCommit::default()
                }))
                .await?;
        }
    }
}

/// The identifiers whose profiles an event may change: its primary, its
/// `userId` and `anonymousId`, an alias's `previousId`, and a control
/// record's identifiers.
pub(super) fn touched_ids(ev: &Event) -> Vec<Identifier> {
    if let Some(c) = &ev.control {
        return c
            .identifiers
            .iter()
            .filter_map(|i| Identifier::parse(i))
            .collect();
    }
    let mut out = vec![ev.primary_identifier()];
    if let Some(u) = &ev.user_id {
        out.push(Identifier::new(IdKind::UserId, u.clone()));
    }
    if let Some(a) = &ev.anonymous_id {
        out.push(Identifier::new(IdKind::AnonymousId, a.clone()));
    }
    if let Some(p) = ev
        .previous_id
        .as_ref()
        .filter(|_| ev.kind == EventType::Alias)
    {
        out.push(Identifier::new(IdKind::UserId, p.clone()));
        out.push(Identifier::new(IdKind::AnonymousId, p.clone()));
    }
    out.sort();
    out.dedup();
    out
}
