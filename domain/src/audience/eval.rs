//! Evaluation: whether a profile is a member at `now`, and when that may
//! next change without a new event.

use std::collections::BTreeMap;

use serde_json::Value;

use super::ast::*;
use super::leaf::{Aggregate, LeafState, Sliding, Spec, SpecId};
use crate::profile::TraitValue;

/// What evaluation reads of one profile. Leaf states are already merged
/// over the profile's identifiers.
#[derive(Debug, Clone, Copy)]
pub struct ProfileData<'a> {
    /// The profile's traits.
    pub traits: &'a BTreeMap<String, TraitValue>,
    /// The earliest and latest event times, if it has events.
    pub seen: Option<(i64, i64)>,
    /// Leaf states by spec; a spec without state matched no event.
    pub leaves: &'a BTreeMap<SpecId, LeafState>,
}

/// Spec ids of event conditions, worked out once (a spec's id is a hash of
/// its canonical text, too dear to compute per evaluation); a condition not
/// in it is worked out on the spot.
#[derive(Debug, Clone, Default)]
pub struct SpecIds(std::collections::HashMap<EventCondition, SpecId>);

impl SpecIds {
    /// Remembers the id of `e`'s spec.
    pub fn insert(&mut self, e: &EventCondition) {
        self.0
            .entry(e.clone())
            .or_insert_with(|| Spec::of_condition(e).id());
    }

    /// The id of `e`'s spec.
    pub fn get(&self, e: &EventCondition) -> std::borrow::Cow<'_, SpecId> {
        match self.0.get(e) {
            Some(id) => std::borrow::Cow::Borrowed(id),
            None => std::borrow::Cow::Owned(Spec::of_condition(e).id()),
        }
    }
}

/// The result of evaluating something at `now`: a value, and the earliest
/// time after `now` at which it may change with no new data (none if only
/// new data can change it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the condition holds.
    pub holds: bool,
    /// When it may next change on its own.
    pub deadline: Option<i64>,
}

/// The earlier of two optional deadlines.
pub fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Evaluates a condition. `computed` holds the profile's computed traits
/// (already computed at `now`), `audiences` its memberships of the
/// audiences this one refers to (already evaluated, with their deadlines).
/// Every leaf is evaluated, with no short-circuit, so the deadline covers
/// every leaf that could flip the result.
pub fn evaluate(
    c: &Condition,
    data: &ProfileData<'_>,
    computed: &BTreeMap<String, Value>,
    audiences: &BTreeMap<String, Verdict>,
    ids: &SpecIds,
    now: i64,
) -> Verdict {
    match c {
        Condition::And(cs) | Condition::Or(cs) => {
            let all = matches!(c, Condition::And(_));
            let mut holds = all;
            let mut deadline = None;
            for child in cs {
                let v = evaluate(child, data, computed, audiences, ids, now);
                holds = if all {
                    holds && v.holds
                } else {
                    holds || v.holds
                };
                deadline = earliest(deadline, v.deadline);
            }
            Verdict { holds, deadline }
        }
        Condition::Not(child) => {
            let v = evaluate(child, data, computed, audiences, ids, now);
            Verdict {
                holds: !v.holds,
                deadline: v.deadline,
            }
        }
        Condition::Trait(p) => Verdict {
            holds: p
                .op
                .test(data.traits.get(&p.name).map(|t| &t.value), p.value.as_ref()),
            deadline: None,
        },
        Condition::ComputedTrait(p) => Verdict {
            holds: p.op.test(computed.get(&p.name), p.value.as_ref()),
            deadline: None,
        },
        Condition::Audience(key) => audiences.get(key).copied().unwrap_or(Verdict {
            holds: false,
            deadline: None,
        }),
        Condition::Seen(s) => {
            let Some((first, last)) = data.seen else {
                return Verdict {
                    holds: false,
                    deadline: None,
                };
            };
            let at = match s.end {
                SeenEnd::First => first,
                SeenEnd::Last => last,
            };
            let holds = s.window.contains(at, now);
            Verdict {
                holds,
                deadline: leaves_window(&s.window, at, now),
            }
        }
        Condition::Event(e) => {
            let spec = ids.get(e);
            let entries: &[(i64, String)] = match data.leaves.get(spec.as_ref()) {
                Some(LeafState::Recent(entries)) => entries,
                _ => &[],
            };
            // Newest first: the events in the window at `now` are a prefix.
            let in_window: Vec<i64> = entries
                .iter()
                .map(|(t, _)| *t)
                .filter(|t| e.window.contains(*t, now))
                .collect();
            let count = in_window.len() as u32;
            let holds = e.count_op.test(count, e.count);
            // Time only lowers the count, one event at a time as each
            // leaves the window: the result flips when the count crosses
            // the threshold, when the N-th newest (count falls below N) or
            // the (N+1)-th newest (count falls to N) leaves. Only that
            // event's exit is a deadline; the others change nothing.
            let n = e.count as usize;
            let flips_at = match (e.count_op, holds) {
                (CountOp::AtLeast, true) | (CountOp::Exactly, true) => n.checked_sub(1),
                (CountOp::AtMost, false) | (CountOp::Exactly, false) if count as usize > n => {
                    Some(n)
                }
                _ => None,
            };
            let deadline = flips_at
                .and_then(|i| in_window.get(i))
                .and_then(|t| leaves_window(&e.window, *t, now));
            Verdict { holds, deadline }
        }
    }
}

/// When an event at `time`, in `window` at `now`, leaves it: only a
/// sliding window moves.
fn leaves_window(window: &Window, time: i64, now: i64) -> Option<i64> {
    match *window {
        Window::Last { micros, .. } if window.contains(time, now) => {
            Some(time.saturating_add(micros))
        }
        _ => None,
    }
}

/// A computed trait's value at `now` from its (merged) state, and when it
/// may next change with no new event. `None` when the profile has no state
/// for it (no event ever matched).
pub fn compute(
    t: &ComputedTrait,
    state: Option<&LeafState>,
    now: i64,
) -> (Option<Value>, Option<i64>) {
    let Some(LeafState::Reduced { buckets, .. }) = state else {
        return (None, None);
    };
    let mut total = Aggregate::default();
    let mut deadline = None;
    match t.window {
        Window::Last { micros, .. } => {
            let s = Sliding::of(micros);
            let horizon = now.saturating_sub(micros);
            for (at, agg) in buckets {
                let end = at.saturating_add(s.bucket);
                if end > horizon {
                    total.merge(t.reducer, agg);
                    deadline = earliest(deadline, Some(end.saturating_add(micros)));
                }
            }
        }
        _ => {
            for agg in buckets.values() {
                total.merge(t.reducer, agg);
            }
        }
    }
    (Some(round(reduce(t.reducer, &total), t.round)), deadline)
}

fn reduce(reducer: Reducer, a: &Aggregate) -> Value {
    let text = |s: &str| serde_json::from_str(s).unwrap_or(Value::Null);
    match reducer {
        Reducer::Count => Value::from(a.count),
        Reducer::Sum => number(a.sum_micros as f64 / 1e6),
        Reducer::Avg if a.count == 0 => Value::Null,
        Reducer::Avg => number(a.sum_micros as f64 / 1e6 / a.count as f64),
        Reducer::Min => a.min.map_or(Value::Null, number),
        Reducer::Max => a.max.map_or(Value::Null, number),
        Reducer::First => a.first.as_ref().map_or(Value::Null, |f| text(&f.2)),
        Reducer::Last => a.last.as_ref().map_or(Value::Null, |l| text(&l.2)),
        Reducer::MostFrequent => a
            .frequency
            .iter()
            // The most occurrences; on a tie, the smallest value (the
            // first in the map's order), so the choice never depends on
            // arrival order.
            .fold(None::<(&String, u64)>, |best, (v, n)| match best {
                Some((_, m)) if m >= *n => best,
                _ => Some((v, *n)),
            })
            .map_or(Value::Null, |(v, _)| text(v)),
        Reducer::UniqueList => Value::Array(a.distinct.iter().map(|v| text(v)).collect()),
        Reducer::UniqueCount => Value::from(a.distinct.len()),
    }
}

/// A JSON number: whole numbers as integers, others as they are; a value
/// JSON cannot hold (infinite) as `null`.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// Rounds a numeric value to `places` decimals.
fn round(v: Value, places: Option<u8>) -> Value {
    match (places, v.as_f64()) {
        (Some(p), Some(x)) if !v.is_i64() && !v.is_u64() => {
            let f = 10f64.powi(i32::from(p));
            number((x * f).round() / f)
        }
        _ => v,
    }
}
