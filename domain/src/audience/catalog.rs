//! A workspace's live definitions, compiled for evaluation: the specs they
//! need, an index of specs by event name, the audiences in reference order,
//! and what each audience reads.
//!
//! # Evaluating only what changed
//! An evaluation is a pure function of a profile's data and `now`, and each
//! definition's verdict holds until its deadline unless what it reads
//! changes. So given a profile's last evaluation under the same catalog
//! (its [`Evaluation`], with every definition's deadline) and what changed
//! since ([`Changed`]), [`Catalog::plan`] picks the audiences whose verdict
//! may differ: those whose deadline passed, that read a changed spec, the
//! traits or seen times when those changed, a computed trait that may have
//! changed, or an audience picked before them. The others keep their last
//! verdict. Likewise a computed trait is computed again only when its state
//! changed or its deadline passed. [`Catalog::evaluate_planned`] then gives
//! exactly what a full [`Catalog::evaluate`] gives (a property test holds it
//! to that). Both are keyed forms of [`Catalog::plan_verdicts`] and
//! [`Catalog::evaluate_verdicts`], which work by position ([`Verdicts`]),
//! as the evaluator runs them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::ast::{ComputedTrait, Condition};
use super::eval::{ProfileData, SpecIds, Verdict, compute, earliest, evaluate};
use super::leaf::{Contribution, Spec, SpecId, event_properties};
use crate::event::Event;

/// One audience, as the evaluator runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AudienceDef {
    /// Its id (stable across versions).
    pub id: String,
    /// Its key, which other audiences refer to and events carry.
    pub key: String,
    /// The version that serves.
    pub version: u32,
    /// Its condition.
    pub condition: Condition,
}

/// One computed trait, as the evaluator runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitDef {
    /// Its id.
    pub id: String,
    /// Its key: the trait's name.
    pub key: String,
    /// The version that serves.
    pub version: u32,
    /// Its definition.
    pub definition: ComputedTrait,
}

/// The definitions of one workspace, ready to fold events and evaluate
/// profiles.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Audiences, each after the audiences it refers to.
    audiences: Vec<AudienceDef>,
    traits: Vec<TraitDef>,
    specs: BTreeMap<SpecId, Spec>,
    /// Specs by the event name they match.
    by_event: BTreeMap<String, Vec<SpecId>>,
    /// Whether any audience reads traits, and seen times.
    reads_traits: bool,
    reads_seen: bool,
    /// Each event condition's spec id, and each computed trait's.
    ids: SpecIds,
    trait_specs: Vec<SpecId>,
    /// What each audience reads, in `audiences`' order.
    reads: Vec<Reads>,
    /// Keys of the audiences other audiences read.
    referenced: BTreeSet<String>,
    /// A hash of what is defined (ids, keys, versions).
    fingerprint: u64,
}

/// What one audience's condition reads.
#[derive(Debug, Clone, Default)]
struct Reads {
    specs: Vec<SpecId>,
    traits: bool,
    seen: bool,
    computed: Vec<String>,
    audiences: Vec<String>,
}

/// What may have changed for a profile since its last evaluation. Saying
/// more than changed is safe (more is evaluated); saying less is not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed {
    /// Specs whose state a member's event was folded into.
    pub specs: BTreeSet<SpecId>,
    /// Whether its traits may have changed.
    pub traits: bool,
    /// Whether its first or last seen time may have changed.
    pub seen: bool,
}

/// Which audiences and computed traits an evaluation computes (the others
/// keep their last verdict or value), and what it must read for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    evaluate: Vec<bool>,
    compute: Vec<bool>,
    /// Whether the planned audiences read the profile's traits.
    pub reads_traits: bool,
    /// Whether they read its first and last seen times.
    pub reads_seen: bool,
    /// The leaf states the planned audiences and computed traits read
    /// (`None`: all of them).
    reads_specs: Option<BTreeSet<SpecId>>,
}

impl Plan {
    /// How many audiences it computes.
    pub fn audiences(&self) -> usize {
        self.evaluate.iter().filter(|e| **e).count()
    }

    /// Whether what it computes reads the leaf state of `spec` (the data
    /// given to the evaluation needs only those).
    pub fn reads_spec(&self, spec: &SpecId) -> bool {
        self.reads_specs.as_ref().is_none_or(|s| s.contains(spec))
    }
}

/// A profile evaluated at one time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Membership of each audience, by key.
    pub audiences: BTreeMap<String, bool>,
    /// Each computed trait's value, by key; absent when no event ever
    /// matched it, or when it is `null` (no value in its window: every
    /// condition reads `null` as absent).
    pub traits: BTreeMap<String, Value>,
    /// The earliest time any of them may change with no new data.
    pub deadline: Option<i64>,
    /// The time it was evaluated at.
    pub at: i64,
    /// Each audience's own deadline, by key (those that have one).
    pub audience_deadlines: BTreeMap<String, i64>,
    /// Each computed trait's own deadline, by key (those that have one).
    pub trait_deadlines: BTreeMap<String, i64>,
}

/// An [`Evaluation`] by position instead of key: audiences in the
/// catalog's reference order ([`Catalog::audiences`]), computed traits in
/// its order ([`Catalog::traits`]). It is what the evaluator keeps per
/// profile and evaluates, with no key copied; it means the same as the
/// [`Evaluation`] [`Catalog::evaluation_of`] makes of it, under the catalog
/// it was made with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdicts {
    /// Each audience's verdict and own deadline.
    pub audiences: Vec<Verdict>,
    /// Each computed trait's value (`None`: absent, or `null`) and own
    /// deadline.
    pub traits: Vec<(Option<Value>, Option<i64>)>,
    /// The earliest time any of them may change with no new data.
    pub deadline: Option<i64>,
    /// The time it was evaluated at.
    pub at: i64,
}

impl Catalog {
    /// Compiles definitions whose references were checked
    /// ([`super::check_references`]).
    pub fn new(audiences: Vec<AudienceDef>, traits: Vec<TraitDef>) -> Catalog {
        let by_key: BTreeMap<String, Condition> = audiences
            .iter()
            .map(|a| (a.key.clone(), a.condition.clone()))
            .collect();
        let order = super::evaluation_order(&by_key);
        let mut defs: BTreeMap<String, AudienceDef> =
            audiences.into_iter().map(|a| (a.key.clone(), a)).collect();
        let audiences: Vec<AudienceDef> = order.iter().filter_map(|k| defs.remove(k)).collect();
        let mut specs = BTreeMap::new();
        let mut ids = SpecIds::default();
        for a in &audiences {
            for leaf in a.condition.leaves() {
                if let Condition::Event(e) = leaf {
                    let s = Spec::of_condition(e);
                    specs.insert(s.id(), s);
                    ids.insert(e);
                }
            }
        }
        let trait_specs = traits
            .iter()
            .map(|t| Spec::of_trait(&t.definition).id())
            .collect();
        for t in &traits {
            let s = Spec::of_trait(&t.definition);
            specs.insert(s.id(), s);
        }
        let mut by_event: BTreeMap<String, Vec<SpecId>> = BTreeMap::new();
        for (id, s) in &specs {
            by_event
                .entry(s.filter().event.clone())
                .or_default()
                .push(id.clone());
        }
        let reads: Vec<Reads> = audiences
            .iter()
            .map(|a| {
                let mut r = Reads::default();
                for leaf in a.condition.leaves() {
                    match leaf {
                        Condition::Event(e) => r.specs.push(ids.get(e).into_owned()),
                        Condition::Trait(_) => r.traits = true,
                        Condition::Seen(_) => r.seen = true,
                        Condition::ComputedTrait(p) => r.computed.push(p.name.clone()),
                        Condition::Audience(k) => r.audiences.push(k.clone()),
                        Condition::And(_) | Condition::Or(_) | Condition::Not(_) => {}
                    }
                }
                r
            })
            .collect();
        let referenced = reads
            .iter()
            .flat_map(|r| r.audiences.iter().cloned())
            .collect();
        let reads_traits = reads.iter().any(|r| r.traits);
        let reads_seen = reads.iter().any(|r| r.seen);
        let mut text = String::new();
        for a in &audiences {
            text.push_str(&format!(
                "a\u{1f}{}\u{1f}{}\u{1f}{}\u{1e}",
                a.id, a.key, a.version
            ));
        }
        for t in &traits {
            text.push_str(&format!(
                "t\u{1f}{}\u{1f}{}\u{1f}{}\u{1e}",
                t.id, t.key, t.version
            ));
        }
        Catalog {
            audiences,
            traits,
            specs,
            by_event,
            reads_traits,
            reads_seen,
            ids,
            trait_specs,
            reads,
            referenced,
            fingerprint: super::leaf::fnv1a(text.as_bytes()),
        }
    }

    /// A hash of what is defined (every audience's and computed trait's
    /// id, key and version), the same in every build: an evaluation made
    /// under another fingerprint cannot be carried over.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The same definitions, folding only `specs` (a backfill of new leaf
    /// states folds only those).
    pub fn only(&self, specs: &BTreeSet<SpecId>) -> Catalog {
        let mut c = self.clone();
        c.specs.retain(|id, _| specs.contains(id));
        for ids in c.by_event.values_mut() {
            ids.retain(|id| specs.contains(id));
        }
        c.by_event.retain(|_, ids| !ids.is_empty());
        c
    }

    /// Whether evaluating needs the profile's traits.
    pub fn reads_traits(&self) -> bool {
        self.reads_traits
    }

    /// Whether evaluating needs the profile's first and last seen times.
    pub fn reads_seen(&self) -> bool {
        self.reads_seen
    }

    /// The audiences, in evaluation order.
    pub fn audiences(&self) -> &[AudienceDef] {
        &self.audiences
    }

    /// The computed traits.
    pub fn traits(&self) -> &[TraitDef] {
        &self.traits
    }

    /// Every spec the definitions need.
    pub fn specs(&self) -> &BTreeMap<SpecId, Spec> {
        &self.specs
    }

    /// Whether nothing is defined.
    pub fn is_empty(&self) -> bool {
        self.audiences.is_empty() && self.traits.is_empty()
    }

    /// What one event contributes, spec by spec. Its properties are read
    /// only when some spec matches its name.
    pub fn contributions(&self, ev: &Event) -> Vec<(SpecId, Contribution)> {
        let name = crate::profile::counter_name(ev);
        let Some(ids) = self.by_event.get(&name) else {
            return Vec::new();
        };
        let props = event_properties(ev);
        ids.iter()
            .filter_map(|id| {
                let c = self.specs[id].contribution(ev, &props)?;
                Some((id.clone(), c))
            })
            .collect()
    }

    /// Evaluates every definition for one profile at `now`: computed traits
    /// first, then audiences in reference order.
    pub fn evaluate(&self, data: &ProfileData<'_>, now: i64) -> Evaluation {
        self.evaluate_planned(data, now, None, &self.plan(None, now))
    }

    /// Which audiences to evaluate at `now`, given the profile's last
    /// evaluation under this catalog and what changed since (`prior`), or
    /// all of them (`None`). See the module's documentation.
    pub fn plan(&self, prior: Option<(&Evaluation, &Changed)>, now: i64) -> Plan {
        let prior = prior.map(|(e, c)| (self.verdicts_of(e), c));
        self.plan_verdicts(prior.as_ref().map(|(v, c)| (v, *c)), now)
    }

    /// [`Catalog::plan`], from the last evaluation by position.
    pub fn plan_verdicts(&self, prior: Option<(&Verdicts, &Changed)>, now: i64) -> Plan {
        // A verdict holds from when it was made until its deadline: not
        // before (the clock went back).
        let Some((last, changed)) = prior.filter(|(last, _)| now >= last.at) else {
            return Plan {
                evaluate: vec![true; self.audiences.len()],
                compute: vec![true; self.traits.len()],
                reads_traits: self.reads_traits,
                reads_seen: self.reads_seen,
                reads_specs: None,
            };
        };
        let due = |deadline: Option<i64>| deadline.is_some_and(|d| now >= d);
        // Computed traits that may have changed: their state did, or time
        // moved a boundary.
        let compute: Vec<bool> = self
            .traits
            .iter()
            .zip(&self.trait_specs)
            .enumerate()
            .map(|(i, (_, spec))| {
                changed.specs.contains(spec) || due(last.traits.get(i).and_then(|t| t.1))
            })
            .collect();
        let moved: BTreeSet<&str> = self
            .traits
            .iter()
            .zip(&compute)
            .filter(|(_, c)| **c)
            .map(|(t, _)| t.key.as_str())
            .collect();
        let mut planned: BTreeSet<&str> = BTreeSet::new();
        let mut reads_specs: BTreeSet<SpecId> = self
            .trait_specs
            .iter()
            .zip(&compute)
            .filter(|(_, c)| **c)
            .map(|(s, _)| s.clone())
            .collect();
        let mut plan = Plan {
            evaluate: Vec::with_capacity(self.audiences.len()),
            compute,
            reads_traits: false,
            reads_seen: false,
            reads_specs: None,
        };
        for (i, (a, r)) in self.audiences.iter().zip(&self.reads).enumerate() {
            let dirty = due(last.audiences.get(i).and_then(|v| v.deadline))
                || (r.traits && changed.traits)
                || (r.seen && changed.seen)
                || r.specs.iter().any(|s| changed.specs.contains(s))
                || r.computed.iter().any(|k| moved.contains(k.as_str()))
                || r.audiences.iter().any(|k| planned.contains(k.as_str()));
            if dirty {
                planned.insert(&a.key);
                plan.reads_traits |= r.traits;
                plan.reads_seen |= r.seen;
                reads_specs.extend(r.specs.iter().cloned());
            }
            plan.evaluate.push(dirty);
        }
        plan.reads_specs = Some(reads_specs);
        plan
    }

    /// Evaluates one profile at `now` as `plan` says: the planned computed
    /// traits and audiences (in reference order), and for the others their
    /// value or verdict in `prior` (the evaluation `plan` was made from).
    /// The data must hold what the plan reads.
    pub fn evaluate_planned(
        &self,
        data: &ProfileData<'_>,
        now: i64,
        prior: Option<&Evaluation>,
        plan: &Plan,
    ) -> Evaluation {
        let prior = prior.map(|e| self.verdicts_of(e));
        self.evaluation_of(self.evaluate_verdicts(data, now, prior.as_ref(), plan))
    }

    /// [`Catalog::evaluate_planned`], by position.
    pub fn evaluate_verdicts(
        &self,
        data: &ProfileData<'_>,
        now: i64,
        prior: Option<&Verdicts>,
        plan: &Plan,
    ) -> Verdicts {
        let prior = prior.filter(|last| now >= last.at);
        let mut out = Verdicts {
            at: now,
            audiences: Vec::with_capacity(self.audiences.len()),
            traits: Vec::with_capacity(self.traits.len()),
            deadline: None,
        };
        // Computed trait values, by key, for the conditions that read them.
        let mut values: BTreeMap<String, Value> = BTreeMap::new();
        for (i, (t, spec)) in self.traits.iter().zip(&self.trait_specs).enumerate() {
            let (value, deadline) = match prior {
                Some(last) if !plan.compute.get(i).copied().unwrap_or(true) => {
                    last.traits.get(i).cloned().unwrap_or_default()
                }
                _ => compute(&t.definition, data.leaves.get(spec), now),
            };
            let value = value.filter(|v| !v.is_null());
            if let Some(v) = &value {
                values.insert(t.key.clone(), v.clone());
            }
            out.deadline = earliest(out.deadline, deadline);
            out.traits.push((value, deadline));
        }
        // Verdicts other audiences read.
        let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
        for (i, a) in self.audiences.iter().enumerate() {
            let v = match prior {
                Some(last) if !plan.evaluate.get(i).copied().unwrap_or(true) => {
                    last.audiences.get(i).copied().unwrap_or(Verdict {
                        holds: false,
                        deadline: None,
                    })
                }
                _ => evaluate(&a.condition, data, &values, &verdicts, &self.ids, now),
            };
            out.deadline = earliest(out.deadline, v.deadline);
            if self.referenced.contains(&a.key) {
                verdicts.insert(a.key.clone(), v);
            }
            out.audiences.push(v);
        }
        out
    }

    /// The keyed [`Evaluation`] of verdicts made under this catalog.
    pub fn evaluation_of(&self, v: Verdicts) -> Evaluation {
        let mut e = Evaluation {
            deadline: v.deadline,
            at: v.at,
            ..Evaluation::default()
        };
        for (a, verdict) in self.audiences.iter().zip(v.audiences) {
            e.audiences.insert(a.key.clone(), verdict.holds);
            if let Some(d) = verdict.deadline {
                e.audience_deadlines.insert(a.key.clone(), d);
            }
        }
        for (t, (value, deadline)) in self.traits.iter().zip(v.traits) {
            if let Some(value) = value {
                e.traits.insert(t.key.clone(), value);
            }
            if let Some(d) = deadline {
                e.trait_deadlines.insert(t.key.clone(), d);
            }
        }
        e
    }

    /// An [`Evaluation`] by position in this catalog (a key it does not
    /// define is left out; one it defines and the evaluation lacks is not a
    /// member, with no value and no deadline).
    pub fn verdicts_of(&self, e: &Evaluation) -> Verdicts {
        Verdicts {
            audiences: self
                .audiences
                .iter()
                .map(|a| Verdict {
                    holds: e.audiences.get(&a.key).copied().unwrap_or(false),
                    deadline: e.audience_deadlines.get(&a.key).copied(),
                })
                .collect(),
            traits: self
                .traits
                .iter()
                .map(|t| {
                    (
                        e.traits.get(&t.key).filter(|v| !v.is_null()).cloned(),
                        e.trait_deadlines.get(&t.key).copied(),
                    )
                })
                .collect(),
            deadline: e.deadline,
            at: e.at,
        }
    }

    /// The specs one audience or computed trait reads (for loading only
    /// what an evaluation needs).
    pub fn specs_of(&self, condition: &Condition) -> BTreeSet<SpecId> {
        condition
            .leaves()
            .into_iter()
            .filter_map(|l| match l {
                Condition::Event(e) => Some(Spec::of_condition(e).id()),
                _ => None,
            })
            .collect()
    }
}
