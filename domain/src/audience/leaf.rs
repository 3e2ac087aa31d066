//! What an evaluator keeps per identifier, and how it merges.
//!
//! A [`Spec`] is what one leaf or computed trait needs from the events:
//! which events, and what to keep of them. Specs are identified by their
//! content ([`Spec::id`]), so two audiences counting the same events share
//! state, and an edit that only changes a trait predicate needs no backfill.
//!
//! [`LeafState`] is that state for one identifier. It is folded from the
//! identifier's own events, in log order ([`LeafState::fold`]), and the states
//! of a profile's identifiers are merged on read ([`LeafState::merge`],
//! commutative), like every other fact of a profile. Both are bounded:
//! - [`Spec::Recent`] keeps the newest `keep` matching events, which is all an
//!   exact count up to `keep - 1` over any sliding window needs (events in a
//!   window at `now` are always the newest ones);
//! - [`Spec::Reduce`] keeps one aggregate for a lifetime trait, or one per
//!   bucket (an hour for windows up to 30 days, a day beyond) for a sliding
//!   one, dropping buckets that can no longer be in the window.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ast::*;
use crate::event::{Event, EventType};
use crate::profile::counter_name;

/// A spec's identity: a hash of its canonical form (see [`Spec::id`]).
pub type SpecId = String;

/// What a leaf or computed trait needs from the events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Spec {
    /// The newest `keep` events matching `filter` (with a time in `range`,
    /// if given): for event conditions.
    Recent {
        /// Which events.
        filter: EventFilter,
        /// How many of the newest to keep: the count compared with, plus one.
        keep: u32,
        /// For a `between` window: only events with `from <= time < to`.
        range: Option<(i64, i64)>,
    },
    /// A reducer's aggregate over the events matching `filter`.
    Reduce {
        /// Which events.
        filter: EventFilter,
        /// How they reduce.
        reducer: Reducer,
        /// The property reduced (none for `count`).
        property: Option<String>,
        /// For a sliding window: its length and the bucket size.
        sliding: Option<Sliding>,
    },
}

/// A sliding window's shape in state: its length and its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sliding {
    /// The window's length, microseconds.
    pub window: i64,
    /// The bucket's length: an hour up to 30 days, a day beyond.
    pub bucket: i64,
}

impl Sliding {
    /// The buckets a window of `window` microseconds keeps.
    pub fn of(window: i64) -> Sliding {
        let bucket = if window <= 30 * DAY_MICROS {
            HOUR_MICROS
        } else {
            DAY_MICROS
        };
        Sliding { window, bucket }
    }

    /// The most buckets kept: those the window can span, and one more.
    fn max_buckets(&self) -> usize {
        (self.window / self.bucket) as usize + 2
    }
}

impl Spec {
    /// The spec an event condition needs.
    pub fn of_condition(c: &EventCondition) -> Spec {
        Spec::Recent {
            filter: c.filter.clone(),
            keep: c.count + 1,
            range: match c.window {
                Window::Between { from, to } => Some((from, to)),
                _ => None,
            },
        }
    }

    /// The spec a computed trait needs.
    pub fn of_trait(t: &ComputedTrait) -> Spec {
        Spec::Reduce {
            filter: t.filter.clone(),
            reducer: t.reducer,
            property: t.property.clone(),
            sliding: match t.window {
                Window::Last { micros, .. } => Some(Sliding::of(micros)),
                _ => None,
            },
        }
    }

    /// Its identity: 16 hex digits of a 64-bit FNV-1a hash of its canonical
    /// form, stable across builds (it names stored state).
    pub fn id(&self) -> SpecId {
        format!("{:016x}", fnv1a(self.canonical().as_bytes()))
    }

    /// A canonical text of the spec: the same spec always gives the same
    /// text, whatever build wrote it.
    fn canonical(&self) -> String {
        let filter = |f: &EventFilter| {
            let mut filters: Vec<Value> = f
                .filters
                .iter()
                .map(|p| serde_json::json!([p.property, p.op.as_str(), p.value]))
                .collect();
            filters.sort_by_key(|v| v.to_string());
            serde_json::json!([f.event, filters])
        };
        match self {
            Spec::Recent {
                filter: f,
                keep,
                range,
            } => serde_json::json!(["recent", filter(f), keep, range]).to_string(),
            Spec::Reduce {
                filter: f,
                reducer,
                property,
                sliding,
            } => serde_json::json!([
                "reduce",
                filter(f),
                reducer.as_str(),
                property,
                sliding.map(|s| [s.window, s.bucket])
            ])
            .to_string(),
        }
    }

    /// The event filter.
    pub fn filter(&self) -> &EventFilter {
        match self {
            Spec::Recent { filter, .. } | Spec::Reduce { filter, .. } => filter,
        }
    }

    /// What `ev` contributes to this spec, if it matches. `props` is the
    /// event's properties (traits for `identify` and `group`), read once per
    /// event by the caller ([`event_properties`]).
    pub fn contribution(&self, ev: &Event, props: &Map<String, Value>) -> Option<Contribution> {
        if !matches(self.filter(), ev, props) {
            return None;
        }
        match self {
            Spec::Recent { range, .. } => {
                if let Some((from, to)) = range
                    && !(*from <= ev.timestamp && ev.timestamp < *to)
                {
                    return None;
                }
                Some(Contribution {
                    time: ev.timestamp,
                    received_at: ev.received_at,
                    message_id: ev.message_id.clone(),
                    value: None,
                })
            }
            Spec::Reduce {
                reducer, property, ..
            } => {
                let value = match property {
                    Some(p) => {
                        let v = props.get(p).filter(|v| !v.is_null())?;
                        if reducer.numeric() && !v.is_number() {
                            return None;
                        }
                        Some(v.clone())
                    }
                    None => None,
                };
                Some(Contribution {
                    time: ev.timestamp,
                    received_at: ev.received_at,
                    message_id: ev.message_id.clone(),
                    value,
                })
            }
        }
    }

    /// A fresh, empty state for this spec.
    pub fn empty(&self) -> LeafState {
        match self {
            Spec::Recent { .. } => LeafState::Recent(Vec::new()),
            Spec::Reduce { .. } => LeafState::Reduced {
                newest_received: i64::MIN,
                buckets: BTreeMap::new(),
            },
        }
    }
}

/// An event's properties as the filters read them: `properties` for
/// `track`, `page` and `screen`, `traits` for `identify` and `group`.
/// Unreadable or absent text reads as no properties.
pub fn event_properties(ev: &Event) -> Map<String, Value> {
    let text = match ev.kind {
        EventType::Identify | EventType::Group => ev.traits.as_deref(),
        _ => ev.properties.as_deref(),
    };
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

/// Whether `ev` matches a filter: its counted name, then every property
/// filter.
pub fn matches(f: &EventFilter, ev: &Event, props: &Map<String, Value>) -> bool {
    let name_matches = match ev.kind {
        EventType::Track => ev.event.as_deref() == Some(f.event.as_str()),
        EventType::Control => false,
        _ => counter_name(ev) == f.event,
    };
    name_matches
        && f.filters.iter().all(|p| {
            let expected = p.value();
            p.op.test(props.get(&p.property), expected.as_ref())
        })
}

/// What one matching event gives a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// The event time.
    pub time: i64,
    /// When it was received (bounds what a sliding window still needs).
    pub received_at: i64,
    /// Its `messageId`.
    pub message_id: String,
    /// The property's value, for reducers that read one.
    pub value: Option<Value>,
}

/// The state one identifier keeps for one spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LeafState {
    /// The newest events, newest first: `(time, messageId)`.
    Recent(Vec<(i64, String)>),
    /// Aggregates by bucket start (`i64::MIN` for a lifetime trait).
    Reduced {
        /// The latest `receivedAt` folded: buckets that ended a window
        /// before it can never be in the window again (evaluation happens
        /// after reception), so they are dropped.
        newest_received: i64,
        /// The aggregates.
        buckets: BTreeMap<i64, Aggregate>,
    },
}

/// One bucket's aggregate. Which fields are used depends on the reducer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Events folded.
    pub count: u64,
    /// Sum of the values, in millionths (exact, so the order of addition
    /// never changes it).
    pub sum_micros: i128,
    /// The least value.
    pub min: Option<f64>,
    /// The greatest value.
    pub max: Option<f64>,
    /// The value of the earliest event: `(time, messageId, value as JSON text)`.
    pub first: Option<(i64, String, String)>,
    /// The value of the latest event.
    pub last: Option<(i64, String, String)>,
    /// Occurrences by value (JSON text), for `most_frequent`.
    pub frequency: BTreeMap<String, u64>,
    /// Distinct values (JSON text): the smallest ones, up to a cap.
    pub distinct: BTreeSet<String>,
}

impl LeafState {
    /// Folds one contribution of one of this identifier's events. `spec`
    /// is the state's spec. Each event is folded at most once (the
    /// evaluator de-duplicates as the profile fold does).
    pub fn fold(&mut self, spec: &Spec, c: &Contribution) {
        match (self, spec) {
            (LeafState::Recent(entries), Spec::Recent { keep, .. }) => {
                let entry = (c.time, c.message_id.clone());
                let at = entries.partition_point(|e| newer(e, &entry));
                if entries.get(at) != Some(&entry) {
                    entries.insert(at, entry);
                }
                entries.truncate(*keep as usize);
            }
            (
                LeafState::Reduced {
                    newest_received,
                    buckets,
                },
                Spec::Reduce {
                    reducer, sliding, ..
                },
            ) => {
                let mut one = Aggregate::default();
                one.include(*reducer, c);
                let at = sliding.map_or(i64::MIN, |s| c.time.div_euclid(s.bucket) * s.bucket);
                buckets.entry(at).or_default().merge(*reducer, &one);
                *newest_received = (*newest_received).max(c.received_at);
                if let Some(s) = sliding {
                    prune(buckets, *newest_received, s);
                }
            }
            // A state of another kind than its spec: a spec id collision
            // or a corrupt row. Start over from this event.
            (state, spec) => {
                *state = spec.empty();
                state.fold(spec, c);
            }
        }
    }

    /// Merges another identifier's state for the same spec into this one.
    pub fn merge(&mut self, spec: &Spec, other: &LeafState) {
        match (self, spec, other) {
            (LeafState::Recent(mine), Spec::Recent { keep, .. }, LeafState::Recent(theirs)) => {
                let mut all: Vec<(i64, String)> = mine.iter().chain(theirs).cloned().collect();
                all.sort_by(|a, b| b.cmp(a));
                all.dedup();
                all.truncate(*keep as usize);
                *mine = all;
            }
            (
                LeafState::Reduced {
                    newest_received,
                    buckets,
                },
                Spec::Reduce {
                    reducer, sliding, ..
                },
                LeafState::Reduced {
                    newest_received: theirs_received,
                    buckets: theirs,
                },
            ) => {
                for (at, agg) in theirs {
                    buckets.entry(*at).or_default().merge(*reducer, agg);
                }
                *newest_received = (*newest_received).max(*theirs_received);
                if let Some(s) = sliding {
                    prune(buckets, *newest_received, s);
                }
            }
            _ => {}
        }
    }
}

/// Whether `a` is newer than `b` (newest first: later time, then larger
/// `messageId`).
fn newer(a: &(i64, String), b: &(i64, String)) -> bool {
    a > b
}

/// Drops the buckets that ended a window before `newest_received`, then
/// all but the newest [`Sliding::max_buckets`] (so events dated far in the
/// future cannot grow the state).
fn prune(buckets: &mut BTreeMap<i64, Aggregate>, newest_received: i64, s: &Sliding) {
    let horizon = newest_received.saturating_sub(s.window);
    buckets.retain(|at, _| at.saturating_add(s.bucket) > horizon);
    while buckets.len() > s.max_buckets() {
        buckets.pop_first();
    }
}

impl Aggregate {
    /// Includes one event.
    fn include(&mut self, reducer: Reducer, c: &Contribution) {
        self.count = 1;
        let Some(v) = &c.value else {
            return;
        };
        match reducer {
            Reducer::Count => {}
            Reducer::Sum | Reducer::Avg => self.sum_micros = to_micros(v),
            Reducer::Min | Reducer::Max => {
                let x = v.as_f64();
                self.min = x;
                self.max = x;
            }
            Reducer::First | Reducer::Last => {
                let e = (c.time, c.message_id.clone(), v.to_string());
                self.first = Some(e.clone());
                self.last = Some(e);
            }
            Reducer::MostFrequent => {
                self.frequency.insert(v.to_string(), 1);
            }
            Reducer::UniqueList | Reducer::UniqueCount => {
                self.distinct.insert(v.to_string());
            }
        }
    }

    /// Merges another aggregate of the same reducer. Commutative.
    pub fn merge(&mut self, reducer: Reducer, other: &Aggregate) {
        self.count += other.count;
        match reducer {
            Reducer::Count => {}
            Reducer::Sum | Reducer::Avg => {
                self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
            }
            Reducer::Min | Reducer::Max => {
                self.min = pick(self.min, other.min, f64::min);
                self.max = pick(self.max, other.max, f64::max);
            }
            Reducer::First | Reducer::Last => {
                self.first = pick(self.first.take(), other.first.clone(), |a, b| {
                    if (b.0, &b.1) < (a.0, &a.1) { b } else { a }
                });
                self.last = pick(self.last.take(), other.last.clone(), |a, b| {
                    if (b.0, &b.1) > (a.0, &a.1) { b } else { a }
                });
            }
            Reducer::MostFrequent => {
                for (v, n) in &other.frequency {
                    if let Some(mine) = self.frequency.get_mut(v) {
                        *mine += n;
                    } else if self.frequency.len() < MAX_UNIQUE_COUNT {
                        self.frequency.insert(v.clone(), *n);
                    }
                }
            }
            Reducer::UniqueList | Reducer::UniqueCount => {
                let cap = if reducer == Reducer::UniqueList {
                    MAX_UNIQUE_LIST
                } else {
                    MAX_UNIQUE_COUNT
                };
                self.distinct.extend(other.distinct.iter().cloned());
                while self.distinct.len() > cap {
                    self.distinct.pop_last();
                }
            }
        }
    }
}

fn pick<T>(a: Option<T>, b: Option<T>, f: impl FnOnce(T, T) -> T) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(f(a, b)),
        (a, b) => a.or(b),
    }
}

/// A number in millionths, saturating.
fn to_micros(v: &Value) -> i128 {
    if let Some(i) = v.as_i64() {
        return i128::from(i) * 1_000_000;
    }
    let x = v.as_f64().unwrap_or(0.0) * 1e6;
    if x >= i128::MAX as f64 {
        i128::MAX
    } else if x <= i128::MIN as f64 {
        i128::MIN
    } else {
        x.round() as i128
    }
}

/// The 64-bit FNV-1a hash of `bytes`: small, and the same in every build
/// (spec ids and catalog fingerprints are stored).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
