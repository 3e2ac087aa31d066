//! A workspace's live definitions, compiled for evaluation: the specs they
//! need, an index of specs by event name, and the audiences in reference
//! order.

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
}

/// A profile evaluated at one time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Membership of each audience, by key.
    pub audiences: BTreeMap<String, bool>,
    /// Each computed trait's value, by key; absent when no event ever
    /// matched it.
    pub traits: BTreeMap<String, Value>,
    /// The earliest time any of them may change with no new data.
    pub deadline: Option<i64>,
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
        let leaves = || audiences.iter().flat_map(|a| a.condition.leaves());
        let reads_traits = leaves().any(|l| matches!(l, Condition::Trait(_)));
        let reads_seen = leaves().any(|l| matches!(l, Condition::Seen(_)));
        Catalog {
            audiences,
            traits,
            specs,
            by_event,
            reads_traits,
            reads_seen,
            ids,
            trait_specs,
        }
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
        let mut out = Evaluation::default();
        for (t, spec) in self.traits.iter().zip(&self.trait_specs) {
            let (value, deadline) = compute(&t.definition, data.leaves.get(spec), now);
            if let Some(v) = value {
                out.traits.insert(t.key.clone(), v);
            }
            out.deadline = earliest(out.deadline, deadline);
        }
        let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
        for a in &self.audiences {
            let v = evaluate(&a.condition, data, &out.traits, &verdicts, &self.ids, now);
            out.deadline = earliest(out.deadline, v.deadline);
            out.audiences.insert(a.key.clone(), v.holds);
            verdicts.insert(a.key.clone(), v);
        }
        out
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
