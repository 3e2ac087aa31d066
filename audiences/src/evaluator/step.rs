//! One step over a batch of the log: skip what was seen, fold leaf
//! states, restore memberships from the evaluator's own events, evaluate
//! the touched profiles, commit, and append the outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use trailmark_domain::audience::leaf::SpecId;
use trailmark_domain::audience::{Catalog, Changed, EVALUATOR_SOURCE};
use trailmark_domain::profile::{is_duplicate, may_set_traits};
use trailmark_domain::{Event, EventType, IdKind, Identifier};
use trailmark_log::Record;
use trailmark_store::evaluator::{EvalCommit, EvalKey, EvalTable, EvalWrite};
use trailmark_store::{LoggedEvent, ProfileRef};
use uuid::Uuid;

use super::*;
use crate::profile::{self, LeafCache, Outcome, RecordCache};
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
        let catalogs = run.catalogs();
        let events: Vec<&LoggedEvent> = events
            .iter()
            .filter(|le| {
                run.positions
                    .get(&le.partition)
                    .is_none_or(|next| le.position >= *next)
            })
            .collect();
        // The projector has folded the whole batch: carried profiles its
        // events may have changed are dropped before anything is resolved.
        for le in &events {
            run.caches.resolutions.observe(&le.event);
        }
        let joined = run.joined.clone();
        let (contributions, mut specs) = self
            .contributions(&self.config.group, &events, &catalogs, &joined, &mut commit)
            .await?;
        self.fold(contributions, &mut run.caches.leaves, &mut commit)
            .await?;
        let mut touched: Vec<Touch> = Vec::new();
        let mut own: Vec<&Event> = Vec::new();
        for (le, specs) in events.iter().zip(specs.iter_mut()) {
            let ev = &le.event;
            if ev.source_id == EVALUATOR_SOURCE {
                own.push(ev);
                continue;
            }
            let cause = Cause::Event {
                message_id: ev.message_id.clone(),
                received_at: ev.received_at,
            };
            // What the event may have changed: the specs it contributes to
            // (a duplicate's too: after a crash between a fold and its
            // evaluation, the replay is a duplicate), traits, seen times.
            // A control record may change anything.
            let changed = ev.control.is_none().then(|| Changed {
                specs: std::mem::take(specs),
                traits: may_set_traits(ev),
                seen: true,
            });
            touched.push(Touch {
                ws: ev.workspace_id.clone(),
                ids: touched_ids(ev),
                cause,
                changed,
            });
        }
        let mut restored = self.restore(&own, &mut run.caches.records).await?;
        // A workspace with nothing defined needs no evaluation: its
        // identifiers are only noted, so that a first definition's pass
        // finds every profile.
        touched.retain(|Touch { ws, ids, .. }| {
            if catalogs.contains_key(ws) {
                return true;
            }
            for id in ids {
                if run.known.insert((ws.clone(), id.clone())) {
                    commit.rows.push(EvalWrite::Put(
                        EvalTable::IdProfiles,
                        rows::id_profile_key(ws, id),
                        Uuid::nil().as_bytes().to_vec(),
                    ));
                }
            }
            false
        });
        if run.known.len() > KNOWN_ROWS {
            run.known.clear();
        }
        commit.groups.append(&mut restored);
        if run.catching_up.is_some() {
            for Touch { ws, ids, .. } in &touched {
                for id in ids {
                    commit.rows.push(EvalWrite::Put(
                        EvalTable::Dirty,
                        rows::dirty_key(ws, id),
                        Vec::new(),
                    ));
                }
            }
        } else {
            self.evaluate_into(run, &catalogs, touched, now, &mut commit)
                .await?;
        }
        self.commit_run(run, commit).await?;
        for (p, next) in positions {
            run.positions.insert(*p, *next);
        }
        if let Some(last) = events.last() {
            let lag = (now - last.event.received_at).max(0);
            self.metrics.evaluator_lag_seconds.set(lag as f64 / 1e6);
        }
        self.publish(run).await
    }

    /// What a batch's events contribute to leaf states, with each client
    /// retry of a message `consumer` saw within the window left out (as the
    /// projector leaves it out), and the decisions recorded in `commit`;
    /// and, for each event in order, the specs it contributes to (retries
    /// too).
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
    ) -> Result<(Vec<Folding<'e>>, Vec<BTreeSet<SpecId>>)> {
        let mut candidates = Vec::new();
        let mut specs = vec![BTreeSet::new(); events.len()];
        for (le, specs) in events.iter().zip(specs.iter_mut()) {
            let ev = &le.event;
            if ev.source_id == EVALUATOR_SOURCE || ev.kind == EventType::Control {
                continue;
            }
            let Some(catalog) = catalogs.get(&ev.workspace_id) else {
                continue;
            };
            let found = catalog.contributions(ev);
            if !found.is_empty() {
                specs.extend(found.iter().map(|(s, _)| s.clone()));
                candidates.push((*le, catalog.clone(), found));
            }
        }
        if candidates.is_empty() {
            return Ok((Vec::new(), specs));
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
        Ok((out, specs))
    }

    /// Folds contributions into leaf rows (in `cache`, and as standalone
    /// writes of `commit`), each row fenced by its partition's position.
    pub(super) async fn fold(
        &self,
        contributions: Vec<Folding<'_>>,
        cache: &mut LeafCache,
        commit: &mut EvalCommit,
    ) -> Result<()> {
        if contributions.is_empty() {
            return Ok(());
        }
        cache
            .load(
                &*self.store,
                contributions.iter().map(|c| c.key.part.clone()).collect(),
            )
            .await?;
        let mut changed = BTreeSet::new();
        for c in contributions {
            let Some(member) = cache.member_mut(&c.key.part) else {
                continue;
            };
            let spec = &c.catalog.specs()[&c.spec];
            let row = member.entry(c.spec.clone()).or_insert_with(|| LeafRow {
                state: spec.empty(),
                applied: None,
            });
            let le = c.event;
            if let Some((p, next)) = row.applied
                && p == le.partition
                && le.position < next
            {
                continue;
            }
            row.state.fold(spec, &c.contribution);
            row.applied = Some((le.partition, le.position + 1));
            changed.insert((c.key, c.spec));
        }
        for (key, spec) in changed {
            let row = rows::encode(&cache.member(&key.part).expect("loaded")[&spec]);
            cache.grew(row.len());
            commit
                .rows
                .push(EvalWrite::Put(EvalTable::Leaves, key, row));
        }
        Ok(())
    }

    /// Restores memberships from the evaluator's own events: after a
    /// rebuild, the log is the only record of the changes it emitted.
    pub(super) async fn restore(
        &self,
        own: &[&Event],
        cache: &mut RecordCache,
    ) -> Result<Vec<Vec<EvalWrite>>> {
        let read: Vec<_> = own
            .iter()
            .filter_map(|ev| Some((*ev, crate::emit::read_membership(ev)?)))
            .collect();
        // Every record they concern, in one read.
        let mut records: BTreeMap<(String, Uuid), ProfileRecord> = {
            let keys: BTreeSet<(&str, Uuid)> = read
                .iter()
                .map(|(ev, (_, pid, ..))| (ev.workspace_id.as_str(), *pid))
                .collect();
            let keys: Vec<(&str, Uuid)> = keys.into_iter().collect();
            let found = cache.records(&*self.store, &keys).await?;
            keys.into_iter()
                .zip(found)
                .map(|((ws, pid), r)| ((ws.to_string(), pid), r.unwrap_or_default()))
                .collect()
        };
        let mut changed = BTreeSet::new();
        let mut groups = Vec::new();
        for (ev, (def, pid, n, member, version)) in read {
            let ws = ev.workspace_id.clone();
            let key = (ws.clone(), pid);
            let record = records.get_mut(&key).expect("read above");
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
    ///
    /// Each round reads what its profiles need together: their identities
    /// (an event's first identifier, then those of its others its profile
    /// does not hold), their records in one call, their members' leaf rows
    /// in one call; then evaluates them concurrently. Each profile reads
    /// and writes only its own rows, and their writes are committed together
    /// after.
    pub(super) async fn evaluate_all(
        &self,
        catalogs: &HashMap<String, Arc<Catalog>>,
        touched: Vec<Touch>,
        now: i64,
        caches: &mut Caches,
    ) -> Result<Vec<(String, Outcome)>> {
        let Caches {
            leaves: cache,
            resolutions: carried,
            records,
        } = caches;
        let empty = Arc::new(Catalog::default());
        // The newest event that touched a profile is its cause: evaluated
        // newest first, each profile once.
        let mut touched = touched;
        touched.reverse();
        let mut done: BTreeSet<(String, Uuid)> = BTreeSet::new();
        let mut formers: Vec<(String, Uuid, Uuid)> = Vec::new();
        let mut outcomes = Vec::new();
        let mut followed = 0;
        // Rounds: the touched identifiers, then those that left the
        // profiles evaluated (splits).
        let mut round = touched;
        while !round.is_empty() {
            let mut distinct = Vec::new();
            for r in self.resolve_round(round, carried).await? {
                if done.insert((r.ws.clone(), r.profile.profile_id)) {
                    distinct.push(r);
                }
            }
            let befores = {
                let keys: Vec<(&str, Uuid)> = distinct
                    .iter()
                    .map(|r| (r.ws.as_str(), r.profile.profile_id))
                    .collect();
                records.records(&*self.store, &keys).await?
            };
            cache
                .load(
                    &*self.store,
                    distinct
                        .iter()
                        .filter(|r| catalogs.get(&r.ws).is_some_and(|c| !c.is_empty()))
                        .flat_map(|r| profile::leaf_parts(&r.ws, &r.profile))
                        .collect(),
                )
                .await?;
            let cached = &*cache;
            let evaluated: Vec<_> = stream::iter(distinct.into_iter().zip(befores))
                .map(
                    |(
                        Reached {
                            ws,
                            cause,
                            profile,
                            changed,
                        },
                        before,
                    )| {
                        let catalog = catalogs.get(&ws).unwrap_or(&empty).clone();
                        async move {
                            let round = profile::Round {
                                store: &*self.store,
                                cache: cached,
                                now,
                            };
                            let out = profile::evaluate(
                                round,
                                &ws,
                                &catalog,
                                &profile,
                                before.unwrap_or_default(),
                                &cause,
                                changed.as_ref(),
                            )
                            .await?;
                            Ok::<_, EvaluatorError>((ws, cause, profile.profile_id, out))
                        }
                    },
                )
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await?;
            round = Vec::new();
            for (ws, cause, pid, out) in evaluated {
                for d in &out.departed {
                    if followed < MAX_FOLLOW {
                        followed += 1;
                        round.push(Touch::full(ws.clone(), vec![d.clone()], cause.clone()));
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
            let Some(before) = records
                .records(&*self.store, &[(&ws, former)])
                .await?
                .pop()
                .flatten()
            else {
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
                    cache
                        .load(&*self.store, profile::leaf_parts(&ws, &p))
                        .await?;
                    let round = profile::Round {
                        store: &*self.store,
                        cache,
                        now,
                    };
                    let out =
                        profile::evaluate(round, &ws, catalog, &p, before, &cause, None).await?;
                    outcomes.push((ws, out));
                }
                None => {
                    if before.audiences.values().any(|s| s.member)
                        || before.deadline.is_some()
                        || before.catalog != 0
                    {
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

    /// The profiles of a round's identifiers, each with the cause of the
    /// first (newest) touch that reached it, in that order, and what every
    /// touch that reached it may have changed. An event's first identifier
    /// is resolved first; its others only if that profile does not hold
    /// them (in a web event, `userId` and `anonymousId` are usually one
    /// profile: one walk, not three).
    async fn resolve_round(
        &self,
        round: Vec<Touch>,
        carried: &mut Resolutions,
    ) -> Result<Vec<Reached>> {
        let mut found: HashMap<(String, Identifier), Option<Arc<ProfileRef>>> = HashMap::new();
        let firsts: Vec<(String, Identifier)> = round
            .iter()
            .filter_map(|t| t.ids.first().map(|id| (t.ws.clone(), id.clone())))
            .collect();
        self.resolve_into(&mut found, firsts, carried).await?;
        let mut rest = Vec::new();
        for Touch { ws, ids, .. } in &round {
            let Some(first) = ids.first() else { continue };
            let holds = found
                .get(&(ws.clone(), first.clone()))
                .and_then(|p| p.clone());
            for id in &ids[1..] {
                match &holds {
                    Some(p) if p.identifiers.contains_key(id) => {
                        found
                            .entry((ws.clone(), id.clone()))
                            .or_insert_with(|| Some(p.clone()));
                    }
                    _ => rest.push((ws.clone(), id.clone())),
                }
            }
        }
        self.resolve_into(&mut found, rest, carried).await?;
        let mut out: Vec<Reached> = Vec::new();
        let mut given: HashMap<(String, Uuid), usize> = HashMap::new();
        for Touch {
            ws,
            ids,
            cause,
            changed,
        } in round
        {
            for id in ids {
                let Some(Some(p)) = found.get(&(ws.clone(), id)) else {
                    continue;
                };
                match given.entry((ws.clone(), p.profile_id)) {
                    std::collections::hash_map::Entry::Occupied(i) => {
                        union(&mut out[*i.get()].changed, &changed);
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(out.len());
                        out.push(Reached {
                            ws: ws.clone(),
                            cause: cause.clone(),
                            profile: (**p).clone(),
                            changed: changed.clone(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Resolves the identifiers `found` lacks: from the profiles carried
    /// over, else from the store, concurrently (and carried from then on).
    async fn resolve_into(
        &self,
        found: &mut HashMap<(String, Identifier), Option<Arc<ProfileRef>>>,
        ids: Vec<(String, Identifier)>,
        carried: &mut Resolutions,
    ) -> Result<()> {
        let mut wanted: Vec<(String, Identifier)> = Vec::new();
        for k in ids {
            if found.contains_key(&k) {
                continue;
            }
            match carried.get(&k.0, &k.1) {
                Some(p) => {
                    found.insert(k, Some(p));
                }
                None => wanted.push(k),
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let resolved: Vec<_> = stream::iter(wanted)
            .map(|(ws, id)| async move {
                let p = self.store.resolve(&ws, &id).await?;
                Ok::<_, EvaluatorError>(((ws, id), p.map(Arc::new)))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        for ((ws, _), p) in &resolved {
            if let Some(p) = p {
                carried.insert(ws, p);
            }
        }
        found.extend(resolved);
        let (hits, misses) = carried.take_counts();
        for (outcome, n) in [("carried", hits), ("read", misses)] {
            if n > 0 {
                self.metrics
                    .evaluator_resolutions
                    .with_label_values(&[outcome])
                    .inc_by(n);
            }
        }
        Ok(())
    }

    /// Evaluates the touched profiles with the run's leaf states and
    /// carried profiles ([`Self::evaluate_all`]), and adds the outcomes to
    /// `commit`.
    pub(super) async fn evaluate_into(
        &self,
        run: &mut Run,
        catalogs: &HashMap<String, Arc<Catalog>>,
        touched: Vec<Touch>,
        now: i64,
        commit: &mut EvalCommit,
    ) -> Result<()> {
        let outcomes = self
            .evaluate_all(catalogs, touched, now, &mut run.caches)
            .await?;
        self.add_outcomes(run, commit, outcomes, now)
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
        // Outbox keys never go back, even if the clock does: `publish`
        // reads on from the last key it published.
        run.outbox_at = run.outbox_at.max(now);
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
                    rows::outbox_key(run.outbox_at, run.outbox_seq),
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
            for (outcome, n) in [("evaluated", out.audiences.0), ("carried", out.audiences.1)] {
                if n > 0 {
                    self.metrics
                        .evaluator_audiences
                        .with_label_values(&[outcome])
                        .inc_by(n);
                }
            }
            if !group.is_empty() {
                commit.groups.push(group);
            }
        }
        Ok(())
    }

    /// Appends the outbox to the log, then clears what was appended.
    ///
    /// Outbox keys only grow, and this loop is the only reader, so each scan
    /// starts after the last row published: the deleted rows before it (a
    /// queue's tombstones) are never walked again.
    pub(super) async fn publish(&self, run: &mut Run) -> Result<()> {
        loop {
            let rows_found = self
                .store
                .eval_scan(
                    EvalTable::Outbox,
                    &[],
                    run.outbox_published.as_deref(),
                    None,
                    500,
                )
                .await?;
            let Some((last, _)) = rows_found.last() else {
                return Ok(());
            };
            let last = last.clone();
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
            let mut commit = self.commit();
            commit.rows = deletes;
            self.store.eval_commit(Arc::new(commit)).await?;
            run.outbox_published = Some(last);
        }
    }
}

/// A profile a round's touches reached.
pub(super) struct Reached {
    ws: String,
    /// The cause of the first (newest) touch that reached it.
    cause: Cause,
    profile: ProfileRef,
    /// What every touch that reached it may have changed.
    changed: Option<Changed>,
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
