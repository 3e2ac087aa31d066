//! [`AudienceModel`]: audiences and computed traits computed in batch from
//! a workspace's events, in memory. It is the oracle the streaming
//! evaluator is tested against: at any `now`, the evaluator's memberships
//! must equal [`AudienceModel::evaluate`].

use std::collections::BTreeMap;

use super::catalog::{Catalog, Changed, Evaluation};
use super::eval::ProfileData;
use super::leaf::{LeafState, SpecId};
use crate::event::{Event, Identifier};
use crate::profile::{FoldError, ProfileModel};

/// The profile fold plus the state each identifier keeps for a catalog's
/// specs.
#[derive(Debug, Clone)]
pub struct AudienceModel {
    profiles: ProfileModel,
    catalog: Catalog,
    leaves: BTreeMap<Identifier, BTreeMap<SpecId, LeafState>>,
}

impl AudienceModel {
    /// A model folding into `profiles` (empty, with its rules and window)
    /// for `catalog`'s definitions.
    pub fn new(profiles: ProfileModel, catalog: Catalog) -> Self {
        Self {
            profiles,
            catalog,
            leaves: BTreeMap::new(),
        }
    }

    /// The profile fold.
    pub fn profiles(&self) -> &ProfileModel {
        &self.profiles
    }

    /// The definitions.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Folds one event, in log order. Returns false for a duplicate, which
    /// contributes nothing (as in the profile fold).
    pub fn apply(&mut self, ev: &Event) -> Result<bool, FoldError> {
        if !self.profiles.apply(ev)? {
            return Ok(false);
        }
        let contributions = self.catalog.contributions(ev);
        if !contributions.is_empty() {
            let states = self.leaves.entry(ev.primary_identifier()).or_default();
            for (id, c) in contributions {
                let spec = &self.catalog.specs()[&id];
                states
                    .entry(id.clone())
                    .or_insert_with(|| spec.empty())
                    .fold(spec, &c);
            }
        }
        Ok(true)
    }

    /// The state of one identifier, by spec.
    pub fn leaves_of(&self, id: &Identifier) -> Option<&BTreeMap<SpecId, LeafState>> {
        self.leaves.get(id)
    }

    /// The states of a profile's members merged, in member order.
    pub fn merged(&self, members: &[Identifier]) -> BTreeMap<SpecId, LeafState> {
        let mut out: BTreeMap<SpecId, LeafState> = BTreeMap::new();
        for m in members {
            for (id, state) in self.leaves.get(m).into_iter().flatten() {
                let spec = &self.catalog.specs()[id];
                match out.get_mut(id) {
                    Some(mine) => mine.merge(spec, state),
                    None => {
                        out.insert(id.clone(), state.clone());
                    }
                }
            }
        }
        out
    }

    /// Evaluates the profile `id` belongs to at `now`.
    pub fn evaluate_profile(&self, id: &Identifier, now: i64) -> Option<Evaluation> {
        self.reevaluate_profile(id, now, None)
    }

    /// Evaluates the profile `id` belongs to at `now` as the evaluator does:
    /// from its last evaluation and what changed since (`prior`), through
    /// [`Catalog::plan`], reading its traits, seen times and leaf states
    /// only if the plan says so; or fully (`None`).
    pub fn reevaluate_profile(
        &self,
        id: &Identifier,
        now: i64,
        prior: Option<(&Evaluation, &Changed)>,
    ) -> Option<Evaluation> {
        let view = self.profiles.profile(id)?;
        let members: Vec<Identifier> = view.identifiers.keys().cloned().collect();
        let plan = self.catalog.plan(prior, now);
        let mut leaves = self.merged(&members);
        leaves.retain(|spec, _| plan.reads_spec(spec));
        let none = BTreeMap::new();
        let data = ProfileData {
            traits: if plan.reads_traits {
                &view.traits
            } else {
                &none
            },
            seen: (plan.reads_seen && !view.counts.is_empty())
                .then_some((view.first_seen, view.last_seen)),
            leaves: &leaves,
        };
        Some(
            self.catalog
                .evaluate_planned(&data, now, prior.map(|(e, _)| e), &plan),
        )
    }

    /// Every person's profile evaluated at `now`, by holder.
    pub fn evaluate(&self, now: i64) -> BTreeMap<Identifier, Evaluation> {
        self.profiles
            .profiles()
            .into_iter()
            .filter_map(|members| {
                let first = members.first()?;
                let holder = self.profiles.holder_of(first)?;
                Some((holder, self.evaluate_profile(first, now)?))
            })
            .collect()
    }
}
