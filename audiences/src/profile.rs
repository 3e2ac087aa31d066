//! Evaluating one profile: read what it is now (identity, traits, seen
//! times, its members' leaf states), evaluate the workspace's catalog at
//! `now`, and turn every difference from the profile's record into writes
//! and events, in one group (written all or nothing).
//!
//! Identity changes are found here too: a member last evaluated under
//! another profile id means profiles merged (that profile is checked, and
//! retired if it no longer stands alone), and a member that left means a
//! split (its new profile is evaluated as well).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use trailmark_domain::audience::eval::{ProfileData, Verdict};
use trailmark_domain::audience::leaf::{LeafState, SpecId};
use trailmark_domain::audience::{Catalog, Changed, Plan, Verdicts};
use trailmark_domain::{Event, Identifier};
use trailmark_store::evaluator::{EvalCommit, EvalKey, EvalTable, EvalWrite};
use trailmark_store::{ProfileRef, ProfileStore};
use uuid::Uuid;

use crate::Result;
use crate::emit::{self, Change};
use crate::rows::{
    self, Cause, HistoryRow, LeafRow, MemberRow, MemberState, ProfileRecord, TraitState,
};

/// What evaluating one profile produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The writes, as one group.
    pub group: Vec<EvalWrite>,
    /// Events to append to the log (through the outbox, in the same group).
    pub events: Vec<Event>,
    /// Identifiers that left the profile: their profiles are evaluated too.
    pub departed: Vec<Identifier>,
    /// Profile ids its members were last evaluated under: each is checked,
    /// and retired if it no longer stands alone.
    pub former: Vec<Uuid>,
    /// For changes caused by an event, when that event was received; for
    /// changes caused by a deadline, the deadline (metrics).
    pub changes: Vec<Cause>,
    /// Audiences evaluated, and carried over unchanged (metrics).
    pub audiences: (u64, u64),
}

/// Every leaf row of one member (an identifier of a workspace), by spec.
pub type MemberLeaves = HashMap<SpecId, LeafRow>;

/// The most rows read for one member: more specs than any catalog holds.
const MEMBER_ROWS: usize = 100_000;

/// What holding one member costs besides its key and rows: the map entry
/// and the empty map of its rows.
const MEMBER_OVERHEAD: usize = 96;

/// Leaf rows the evaluator has read or written, a whole member at a time:
/// an entry holds every row its member has (those of specs no longer
/// defined too), so a member's absent spec is an empty state, not a miss.
/// The evaluator is the only writer of leaf rows and writes them through
/// here, so an entry is never stale.
#[derive(Debug, Default)]
pub struct LeafCache {
    members: HashMap<Vec<u8>, MemberLeaves>,
    /// Encoded bytes read or written since it started empty: at least
    /// what it holds.
    bytes: usize,
}

impl LeafCache {
    /// Reads the members of `parts` not held yet, in one store call.
    pub async fn load(&mut self, store: &dyn ProfileStore, parts: Vec<Vec<u8>>) -> Result<()> {
        let mut wanted: Vec<Vec<u8>> = parts
            .into_iter()
            .filter(|p| !self.members.contains_key(p))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        wanted.sort_unstable();
        wanted.dedup();
        let found = store
            .eval_parts(EvalTable::Leaves, wanted.clone(), MEMBER_ROWS)
            .await?;
        for (part, found) in wanted.into_iter().zip(found) {
            self.bytes += part.len() + MEMBER_OVERHEAD;
            let mut rows = MemberLeaves::with_capacity(found.len());
            for (sort, v) in found {
                self.bytes += sort.len() + v.len();
                if let (Ok(spec), Some(row)) =
                    (String::from_utf8(sort), rows::decode::<LeafRow>(&v))
                {
                    rows.insert(spec, row);
                }
            }
            self.members.insert(part, rows);
        }
        Ok(())
    }

    /// A member's rows, if held.
    pub fn member(&self, part: &[u8]) -> Option<&MemberLeaves> {
        self.members.get(part)
    }

    /// A held member's rows, to fold into.
    pub fn member_mut(&mut self, part: &[u8]) -> Option<&mut MemberLeaves> {
        self.members.get_mut(part)
    }

    /// Counts a row of `n` bytes written into it.
    pub fn grew(&mut self, n: usize) {
        self.bytes += n;
    }

    /// Encoded bytes read or written since it started empty.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many members are held.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Forgets every member (to bound memory).
    pub fn clear(&mut self) {
        self.members.clear();
        self.bytes = 0;
    }
}

/// The parts of a profile's members' leaf rows, to load.
pub fn leaf_parts(ws: &str, profile: &ProfileRef) -> Vec<Vec<u8>> {
    profile
        .identifiers
        .keys()
        .map(|m| rows::leaf_part(ws, m))
        .collect()
}

/// A profile's members' leaf states for the catalog's specs that `plan`
/// reads, merged in member order, from `cache`, which must hold the members
/// ([`LeafCache::load`]).
pub fn leaves(
    ws: &str,
    members: &[Identifier],
    catalog: &Catalog,
    plan: &Plan,
    cache: &LeafCache,
) -> BTreeMap<SpecId, LeafState> {
    let mut out: BTreeMap<SpecId, LeafState> = BTreeMap::new();
    for m in members {
        let Some(rows) = cache.member(&rows::leaf_part(ws, m)) else {
            continue;
        };
        for (spec_id, row) in rows {
            if !plan.reads_spec(spec_id) {
                continue;
            }
            let Some(spec) = catalog.specs().get(spec_id) else {
                continue;
            };
            match out.get_mut(spec_id) {
                Some(mine) => mine.merge(spec, &row.state),
                None => {
                    out.insert(spec_id.clone(), row.state.clone());
                }
            }
        }
    }
    out
}

/// A record's verdicts as the [`Verdicts`] they came from, by position in
/// the catalog (the record keys them by definition id).
fn last_verdicts(catalog: &Catalog, record: &ProfileRecord) -> Verdicts {
    Verdicts {
        audiences: catalog
            .audiences()
            .iter()
            .map(|a| Verdict {
                holds: record.audiences.get(&a.id).is_some_and(|s| s.member),
                deadline: record.deadlines.get(&a.id).copied(),
            })
            .collect(),
        traits: catalog
            .traits()
            .iter()
            .map(|t| {
                (
                    record
                        .traits
                        .get(&t.id)
                        .map(|s| s.value.clone())
                        .filter(|v| !v.is_null()),
                    record.deadlines.get(&t.id).copied(),
                )
            })
            .collect(),
        deadline: record.deadline,
        at: record.at,
    }
}

/// Profile records the evaluator has read or committed, as the store holds
/// them (encoded; absent ones too). The evaluator is their only writer, and
/// a commit's records go in only once it is written ([`Self::committed`]),
/// so a copy is never stale; after a failed commit the loop forgets them all
/// ([`Self::clear`]), since a store may have written part of it.
#[derive(Debug, Default)]
pub struct RecordCache {
    rows: HashMap<EvalKey, Option<Vec<u8>>>,
    /// Bytes held: keys, values and a per-entry overhead.
    bytes: usize,
}

/// What holding one record costs besides its key and value.
const RECORD_OVERHEAD: usize = 64;

impl RecordCache {
    /// Profiles' records, in the order asked: those not held in one store
    /// call, remembered.
    pub async fn records(
        &mut self,
        store: &dyn ProfileStore,
        profiles: &[(&str, Uuid)],
    ) -> Result<Vec<Option<ProfileRecord>>> {
        let keys: Vec<EvalKey> = profiles
            .iter()
            .map(|(ws, pid)| rows::profile_key(ws, *pid))
            .collect();
        let mut missing: Vec<EvalKey> = keys
            .iter()
            .filter(|k| !self.rows.contains_key(*k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            let mut got: HashMap<EvalKey, Vec<u8>> = store
                .eval_get(EvalTable::Profiles, missing.clone())
                .await?
                .into_iter()
                .collect();
            for k in missing {
                let v = got.remove(&k);
                self.hold(k, v);
            }
        }
        Ok(keys
            .iter()
            .map(|k| {
                self.rows
                    .get(k)
                    .and_then(|v| v.as_deref())
                    .and_then(rows::decode)
            })
            .collect())
    }

    /// Takes in the records of a commit that was written.
    pub fn committed(&mut self, commit: &EvalCommit) {
        for w in commit.rows.iter().chain(commit.groups.iter().flatten()) {
            match w {
                EvalWrite::Put(EvalTable::Profiles, k, v) => self.hold(k.clone(), Some(v.clone())),
                EvalWrite::Delete(EvalTable::Profiles, k) => self.hold(k.clone(), None),
                _ => {}
            }
        }
    }

    fn hold(&mut self, key: EvalKey, value: Option<Vec<u8>>) {
        let key_cost = key.part.len() + key.sort.len() + RECORD_OVERHEAD;
        let value_len = value.as_ref().map_or(0, Vec::len);
        match self.rows.insert(key, value) {
            Some(old) => self.bytes = self.bytes - old.map_or(0, |v| v.len()) + value_len,
            None => self.bytes += key_cost + value_len,
        }
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets every record.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.bytes = 0;
    }
}

/// What a round of evaluations shares: the store, the leaf rows read for
/// the round's profiles, and the time they are evaluated at.
#[derive(Clone, Copy)]
pub struct Round<'a> {
    /// Where traits, seen times and identity rows are read.
    pub store: &'a dyn ProfileStore,
    /// The leaf rows of the round's profiles' members.
    pub cache: &'a LeafCache,
    /// The time evaluated at.
    pub now: i64,
}

/// Evaluates `profile` at the round's time against `catalog` and its
/// record (`before`): only what `changed` can reach when the record was
/// made under this catalog for the same members, everything otherwise (or
/// when `changed` is `None`). See [`Catalog::plan`].
pub async fn evaluate(
    round: Round<'_>,
    ws: &str,
    catalog: &Catalog,
    profile: &ProfileRef,
    before: ProfileRecord,
    cause: &Cause,
    changed: Option<&Changed>,
) -> Result<Outcome> {
    let Round { store, cache, now } = round;
    let pid = profile.profile_id;
    let members: Vec<Identifier> = profile.identifiers.keys().cloned().collect();
    let member_texts: Vec<String> = members.iter().map(rows::id_text).collect();
    let prior = changed
        .filter(|_| before.catalog == catalog.fingerprint() && before.members == member_texts)
        .map(|c| (last_verdicts(catalog, &before), c));
    let mut audiences = (0, 0);
    let evaluation = if catalog.is_empty() {
        Verdicts::default()
    } else {
        let plan = catalog.plan_verdicts(prior.as_ref().map(|(e, c)| (e, *c)), now);
        let evaluated = plan.audiences();
        audiences = (
            evaluated as u64,
            (catalog.audiences().len() - evaluated) as u64,
        );
        // Only what the planned definitions read.
        let traits = if plan.reads_traits {
            store.traits(ws, profile).await?
        } else {
            BTreeMap::new()
        };
        let seen = if plan.reads_seen {
            let meta = store.metadata(ws, profile).await?;
            (!meta.counts.is_empty()).then_some((meta.first_seen, meta.last_seen))
        } else {
            None
        };
        let leaves = leaves(ws, &members, catalog, &plan, cache);
        let data = ProfileData {
            traits: &traits,
            seen,
            leaves: &leaves,
        };
        catalog.evaluate_verdicts(&data, now, prior.as_ref().map(|(e, _)| e), &plan)
    };
    let mut out = Outcome {
        audiences,
        ..Outcome::default()
    };
    let mut deadlines = BTreeMap::new();
    for (a, v) in catalog.audiences().iter().zip(&evaluation.audiences) {
        if let Some(d) = v.deadline {
            deadlines.insert(a.id.clone(), d);
        }
    }
    for (t, (_, deadline)) in catalog.traits().iter().zip(&evaluation.traits) {
        if let Some(d) = deadline {
            deadlines.insert(t.id.clone(), *d);
        }
    }
    let mut after = ProfileRecord {
        holder: rows::id_text(&profile.holder),
        members: member_texts,
        audiences: BTreeMap::new(),
        traits: BTreeMap::new(),
        deadline: evaluation.deadline,
        catalog: catalog.fingerprint(),
        deadlines,
        at: before.at,
    };
    // A change caused by time happened at the boundary that passed, not
    // when the sweep noticed it.
    let at = match cause {
        Cause::Deadline { at } => *at,
        _ => now,
    };
    macro_rules! change {
        ($definition:expr, $n:expr) => {
            Change {
                ws,
                holder: &profile.holder,
                members: &members,
                profile_id: pid,
                definition: $definition,
                n: $n,
                at,
                now,
                cause,
            }
        };
    }
    for (i, a) in catalog.audiences().iter().enumerate() {
        let member = evaluation.audiences.get(i).is_some_and(|v| v.holds);
        let prev = before.audiences.get(&a.id);
        let was = prev.is_some_and(|p| p.member);
        if member == was {
            if let Some(p) = prev {
                after.audiences.insert(
                    a.id.clone(),
                    MemberState {
                        version: a.version,
                        ..p.clone()
                    },
                );
            }
            continue;
        }
        let n = prev.map_or(0, |p| p.n) + 1;
        out.events.push(emit::membership(
            &change!((&a.id, &a.key, a.version), n),
            member,
        ));
        out.group.push(EvalWrite::Put(
            EvalTable::History,
            rows::history_key(ws, pid, &a.id, n),
            rows::encode(&HistoryRow {
                member,
                value: None,
                version: a.version,
                at,
                cause: cause.clone(),
            }),
        ));
        let mkey = rows::member_key(ws, &a.id, pid);
        out.group.push(if member {
            EvalWrite::Put(
                EvalTable::Members,
                mkey,
                rows::encode(&MemberRow {
                    holder: after.holder.clone(),
                    since: at,
                    version: a.version,
                }),
            )
        } else {
            EvalWrite::Delete(EvalTable::Members, mkey)
        });
        out.changes.push(cause.clone());
        after.audiences.insert(
            a.id.clone(),
            MemberState {
                member,
                n,
                version: a.version,
                since: at,
            },
        );
    }
    // Audiences no longer defined: their member rows go, without events.
    let defined: BTreeSet<&str> = catalog.audiences().iter().map(|a| a.id.as_str()).collect();
    for (id, state) in &before.audiences {
        if !defined.contains(id.as_str()) && state.member {
            out.group.push(EvalWrite::Delete(
                EvalTable::Members,
                rows::member_key(ws, id, pid),
            ));
        }
    }
    for (i, t) in catalog.traits().iter().enumerate() {
        let value = evaluation.traits.get(i).and_then(|(v, _)| v.as_ref());
        let prev = before.traits.get(&t.id);
        let previous = prev.map_or(&Value::Null, |p| &p.value);
        let current = value.unwrap_or(&Value::Null);
        if current == previous {
            if let Some(p) = prev {
                after.traits.insert(
                    t.id.clone(),
                    TraitState {
                        version: t.version,
                        ..p.clone()
                    },
                );
            }
            continue;
        }
        let n = prev.map_or(0, |p| p.n) + 1;
        out.events.push(emit::trait_changed(
            &change!((&t.id, &t.key, t.version), n),
            current,
            previous,
        ));
        out.group.push(EvalWrite::Put(
            EvalTable::History,
            rows::history_key(ws, pid, &t.id, n),
            rows::encode(&HistoryRow {
                member: !current.is_null(),
                value: Some(current.clone()),
                version: t.version,
                at,
                cause: cause.clone(),
            }),
        ));
        out.changes.push(cause.clone());
        after.traits.insert(
            t.id.clone(),
            TraitState {
                value: current.clone(),
                n,
                version: t.version,
                since: at,
            },
        );
    }
    if before.deadline != after.deadline {
        if let Some(d) = before.deadline {
            out.group.push(EvalWrite::Delete(
                EvalTable::Deadlines,
                rows::deadline_key(d, ws, pid),
            ));
        }
        if let Some(d) = after.deadline {
            out.group.push(EvalWrite::Put(
                EvalTable::Deadlines,
                rows::deadline_key(d, ws, pid),
                Vec::new(),
            ));
        }
    }
    // Identity: where each member was last evaluated. The same members as
    // last time means none came from another profile.
    let keys: Vec<EvalKey> = if before.members == after.members {
        Vec::new()
    } else {
        members
            .iter()
            .map(|m| rows::id_profile_key(ws, m))
            .collect()
    };
    let last: HashMap<EvalKey, Vec<u8>> = if keys.is_empty() {
        HashMap::new()
    } else {
        store
            .eval_get(EvalTable::IdProfiles, keys.clone())
            .await?
            .into_iter()
            .collect()
    };
    for key in keys {
        match last.get(&key) {
            Some(v) if v.as_slice() == pid.as_bytes() => {}
            other => {
                if let Some(former) = other.and_then(|v| Uuid::from_slice(v).ok())
                    && !former.is_nil()
                {
                    out.former.push(former);
                }
                out.group.push(EvalWrite::Put(
                    EvalTable::IdProfiles,
                    key,
                    pid.as_bytes().to_vec(),
                ));
            }
        }
    }
    let now_members: BTreeSet<&String> = after.members.iter().collect();
    for m in &before.members {
        if !now_members.contains(m)
            && let Some(id) = Identifier::parse(m)
        {
            out.departed.push(id);
        }
    }
    out.former.sort_unstable();
    out.former.dedup();
    if after != before {
        // Its verdicts were made now (unchanged ones were made earlier and
        // still hold, so an older time is also right: see `at`).
        after.at = now;
        out.group.push(EvalWrite::Put(
            EvalTable::Profiles,
            rows::profile_key(ws, pid),
            rows::encode(&after),
        ));
    }
    Ok(out)
}

/// Retires a profile that no longer stands alone (its members merged into
/// `into`): it exits every audience and needs no more evaluation, and its
/// record is marked so that nothing of it is carried over.
pub fn retire(
    ws: &str,
    pid: Uuid,
    before: &ProfileRecord,
    catalog: &Catalog,
    into: Uuid,
    now: i64,
) -> Outcome {
    let mut out = Outcome::default();
    let mut after = before.clone();
    after.deadline = None;
    after.deadlines.clear();
    // Should its members stand alone again, what was folded meanwhile was
    // evaluated under another profile: nothing here carries over.
    after.catalog = 0;
    let cause = Cause::Merged { into };
    let holder = Identifier::parse(&before.holder).unwrap_or_else(|| {
        Identifier::new(trailmark_domain::IdKind::AnonymousId, before.holder.clone())
    });
    let members: Vec<Identifier> = before
        .members
        .iter()
        .filter_map(|m| Identifier::parse(m))
        .collect();
    for (id, state) in &before.audiences {
        if !state.member {
            continue;
        }
        let key = catalog
            .audiences()
            .iter()
            .find(|a| &a.id == id)
            .map_or_else(|| id.clone(), |a| a.key.clone());
        let n = state.n + 1;
        let change = Change {
            ws,
            holder: &holder,
            members: &members,
            profile_id: pid,
            definition: (id, &key, state.version),
            n,
            at: now,
            now,
            cause: &cause,
        };
        out.events.push(emit::membership(&change, false));
        out.group.push(EvalWrite::Put(
            EvalTable::History,
            rows::history_key(ws, pid, id, n),
            rows::encode(&HistoryRow {
                member: false,
                value: None,
                version: state.version,
                at: now,
                cause: cause.clone(),
            }),
        ));
        out.group.push(EvalWrite::Delete(
            EvalTable::Members,
            rows::member_key(ws, id, pid),
        ));
        out.changes.push(cause.clone());
        after.audiences.insert(
            id.clone(),
            MemberState {
                member: false,
                n,
                version: state.version,
                since: now,
            },
        );
    }
    if let Some(d) = before.deadline {
        out.group.push(EvalWrite::Delete(
            EvalTable::Deadlines,
            rows::deadline_key(d, ws, pid),
        ));
    }
    // The record stays, with every change counted, so the profile's change
    // numbers (and so its events' ids) continue should it stand alone again.
    out.group.push(EvalWrite::Put(
        EvalTable::Profiles,
        rows::profile_key(ws, pid),
        rows::encode(&after),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str) -> ProfileRecord {
        ProfileRecord {
            holder: holder.into(),
            members: vec![holder.into()],
            ..ProfileRecord::default()
        }
    }

    fn put(ws: &str, pid: Uuid, r: &ProfileRecord) -> EvalCommit {
        EvalCommit {
            consumer: "evaluator".into(),
            groups: vec![vec![EvalWrite::Put(
                EvalTable::Profiles,
                rows::profile_key(ws, pid),
                rows::encode(r),
            )]],
            ..EvalCommit::default()
        }
    }

    #[tokio::test]
    async fn the_record_cache_holds_what_was_read_and_committed() {
        use trailmark_store::evaluator::EvaluatorStore;
        let dir = tempfile::tempdir().unwrap();
        let store = trailmark_store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first = record("user_id:a");
        store
            .eval_commit(std::sync::Arc::new(put("ws", a, &first)))
            .await
            .unwrap();
        let mut cache = RecordCache::default();
        let got = cache
            .records(&store, &[("ws", a), ("ws", b), ("ws", a)])
            .await
            .unwrap();
        assert_eq!(got, vec![Some(first.clone()), None, Some(first.clone())]);
        assert_eq!(cache.len(), 2, "read once each, the absent one too");

        // Held copies are served without the store: a write that did not
        // go through the cache is not seen...
        let behind = record("user_id:behind");
        store
            .eval_commit(std::sync::Arc::new(put("ws", a, &behind)))
            .await
            .unwrap();
        let got = cache.records(&store, &[("ws", a)]).await.unwrap();
        assert_eq!(got, vec![Some(first)]);
        // ...and a committed one is, the absent record's too.
        let second = record("user_id:b");
        let mut commit = put("ws", b, &second);
        commit.groups.push(vec![EvalWrite::Delete(
            EvalTable::Profiles,
            rows::profile_key("ws", a),
        )]);
        cache.committed(&commit);
        let got = cache
            .records(&store, &[("ws", a), ("ws", b)])
            .await
            .unwrap();
        assert_eq!(got, vec![None, Some(second)]);

        // Its bytes are what it holds, however often a row was replaced.
        let held: usize = [
            ("ws", a, None),
            ("ws", b, Some(rows::encode(&record("user_id:b")))),
        ]
        .iter()
        .map(|(ws, pid, v)| {
            let k = rows::profile_key(ws, *pid);
            k.part.len() + k.sort.len() + RECORD_OVERHEAD + v.as_ref().map_or(0, Vec::len)
        })
        .sum();
        assert_eq!(cache.bytes(), held);
        cache.clear();
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn a_retired_record_carries_nothing_over() {
        let before = ProfileRecord {
            holder: "user_id:u1".into(),
            members: vec!["user_id:u1".into()],
            audiences: BTreeMap::from([(
                "aud_1".to_owned(),
                MemberState {
                    member: true,
                    n: 1,
                    version: 1,
                    since: 5,
                },
            )]),
            deadline: Some(100),
            catalog: 42,
            deadlines: BTreeMap::from([("aud_1".to_owned(), 100)]),
            at: 5,
            ..ProfileRecord::default()
        };
        let out = retire(
            "ws",
            Uuid::nil(),
            &before,
            &Catalog::default(),
            Uuid::max(),
            10,
        );
        let after: ProfileRecord = out
            .group
            .iter()
            .find_map(|w| match w {
                EvalWrite::Put(EvalTable::Profiles, _, v) => rows::decode(v),
                _ => None,
            })
            .expect("the record is written");
        assert_eq!(after.catalog, 0, "an evaluation under no catalog");
        assert!(after.deadlines.is_empty() && after.deadline.is_none());
        assert!(!after.audiences["aud_1"].member);
        assert_eq!(out.events.len(), 1, "one exit");
    }
}
