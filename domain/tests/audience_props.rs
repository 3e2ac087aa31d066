//! Property tests of audience evaluation ([`AudienceModel`]).
//!
//! The evaluator keeps small, bounded state per identifier (the newest
//! `N + 1` matching events, or bucketed aggregates) and evaluates from it.
//! These tests generate event streams over a few people who merge through
//! `identify` and `alias`, and check three promises:
//!
//! 1. **Exact state.** At any `now`, evaluating from the kept state equals a
//!    brute-force evaluation written here from the profile's whole
//!    de-duplicated timeline.
//! 2. **Complete deadlines.** Between `now` and the deadline an evaluation
//!    reports, no evaluation differs, so a sweeper that re-evaluates at
//!    deadlines never misses a change.
//! 3. **Order independence.** Interleaving the partitions (one per primary
//!    identifier) differently gives the same evaluations.
//!
//! Run with `cargo test -p trailmark-domain --test audience_props`.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use trailmark_domain::audience::ast::{Condition, HOUR_MICROS, MINUTE_MICROS, Reducer, Window};
use trailmark_domain::audience::json::{computed_trait_from_json, condition_from_json};
use trailmark_domain::audience::leaf::{Sliding, event_properties, matches};
use trailmark_domain::audience::{
    AudienceDef, AudienceModel, Catalog, Changed, Evaluation, TraitDef,
};
use trailmark_domain::profile::{ProfileModel, may_set_traits};
use trailmark_domain::{Event, EventType, Identifier};

const USERS: [&str; 3] = ["u1", "u2", "u3"];
const ANONS: [&str; 3] = ["a1", "a2", "a3"];
const SKUS: [&str; 3] = ["hat", "mug", "tee"];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
const BASE: i64 = 1_800_000_000_000_000;

fn catalog() -> Catalog {
    let a = |key: &str, v: Value| AudienceDef {
        id: format!("aud_{key}"),
        key: key.into(),
        version: 1,
        condition: condition_from_json(&v, "definition").unwrap(),
    };
    let t = |key: &str, v: Value| TraitDef {
        id: format!("ct_{key}"),
        key: key.into(),
        version: 1,
        definition: computed_trait_from_json(&v, "definition").unwrap(),
    };
    let from = "2027-01-15T00:00:00Z";
    let to = "2027-01-16T12:00:00Z";
    Catalog::new(
        vec![
            a(
                "pricing",
                json!({"event": "Viewed Pricing", "count": {"op": ">=", "value": 2},
                       "within": {"last": 1, "unit": "days"}}),
            ),
            a(
                "buyer",
                json!({"and": [
                    {"trait": "plan", "op": "!=", "value": "enterprise"},
                    {"event": "Order Completed", "where": [{"property": "total", "op": ">=", "value": 50}],
                     "within": {"last": 12, "unit": "hours"}}]}),
            ),
            a(
                "mixed",
                json!({"or": [
                    {"and": [{"seen": "first", "within": {"last": 2, "unit": "days"}},
                             {"not": {"audience": "pricing"}}]},
                    {"audience": "buyer"},
                    {"seen": "last", "within": {"last": 90, "unit": "minutes"}}]}),
            ),
            a(
                "counts",
                json!({"or": [
                    {"event": "Order Completed", "count": {"op": "<=", "value": 1}},
                    {"event": "Order Completed", "count": {"op": "=", "value": 2},
                     "within": {"between": [from, to]}},
                    {"event": "$identify", "where": [{"property": "plan", "op": "in", "value": ["pro", "free"]}],
                     "count": {"op": "=", "value": 1}, "within": {"last": 3, "unit": "hours"}}]}),
            ),
            // Reads only other audiences, so it changes only through them.
            a(
                "quiet_buyer",
                json!({"and": [{"audience": "buyer"}, {"not": {"audience": "pricing"}}]}),
            ),
            a(
                "spender",
                json!({"computed_trait": "spent_2d", "op": ">=", "value": 100}),
            ),
        ],
        vec![
            t(
                "spent_2d",
                json!({"reducer": "sum", "event": "Order Completed", "property": "total",
                       "within": {"last": 2, "unit": "days"}}),
            ),
            t(
                "orders",
                json!({"reducer": "count", "event": "Order Completed"}),
            ),
            t(
                "avg_total",
                json!({"reducer": "avg", "event": "Order Completed", "property": "total", "round": 2}),
            ),
            t(
                "min_total",
                json!({"reducer": "min", "event": "Order Completed", "property": "total",
                       "within": {"last": 6, "unit": "hours"}}),
            ),
            t(
                "max_total",
                json!({"reducer": "max", "event": "Order Completed", "property": "total"}),
            ),
            t(
                "first_sku",
                json!({"reducer": "first", "event": "Order Completed", "property": "sku"}),
            ),
            t(
                "last_sku",
                json!({"reducer": "last", "event": "Order Completed", "property": "sku",
                       "within": {"last": 1, "unit": "days"}}),
            ),
            t(
                "top_sku",
                json!({"reducer": "most_frequent", "event": "Order Completed", "property": "sku"}),
            ),
            t(
                "skus",
                json!({"reducer": "unique_list", "event": "Order Completed", "property": "sku"}),
            ),
            t(
                "sku_count",
                json!({"reducer": "unique_count", "event": "Order Completed", "property": "sku",
                       "within": {"last": 40, "unit": "days"}}),
            ),
        ],
    )
}

/// One generated event, before it gets its ids.
#[derive(Debug, Clone)]
struct Gen {
    kind: u8,
    user: Option<usize>,
    anon: usize,
    value: u8,
    /// Minutes from [`BASE`], over about three days.
    minute: u16,
    /// Seconds between the event and its reception.
    delay: u16,
    /// Sent twice (a client retry, same partition, a second apart).
    retried: bool,
}

fn gen_event() -> impl Strategy<Value = Gen> {
    (
        0u8..6,
        prop::option::weighted(0.4, 0..USERS.len()),
        0..ANONS.len(),
        any::<u8>(),
        0u16..4_300,
        0u16..600,
        prop::bool::weighted(0.1),
    )
        .prop_map(|(kind, user, anon, value, minute, delay, retried)| Gen {
            kind,
            user,
            anon,
            value,
            minute,
            delay,
            retried,
        })
}

fn build(g: &Gen, i: usize) -> Vec<Event> {
    let time = BASE + i64::from(g.minute) * MINUTE_MICROS;
    let (kind, event, properties, traits) = match g.kind {
        0 | 1 => (
            EventType::Track,
            Some("Viewed Pricing".to_owned()),
            Some(json!({"plan": PLANS[usize::from(g.value) % 3]})),
            None,
        ),
        2 | 3 => (
            EventType::Track,
            Some("Order Completed".to_owned()),
            Some(json!({
                "total": f64::from(g.value) / 2.0,
                "sku": SKUS[usize::from(g.value) % 3],
            })),
            None,
        ),
        4 => (
            EventType::Identify,
            None,
            None,
            Some(json!({"plan": PLANS[usize::from(g.value) % 3]})),
        ),
        _ => (EventType::Alias, None, None, None),
    };
    let user = g.user.map(|u| USERS[u].to_owned());
    let ev = Event {
        workspace_id: "ws".into(),
        source_id: "src".into(),
        message_id: format!("m{i:04}"),
        kind,
        user_id: if kind == EventType::Alias {
            Some(user.unwrap_or_else(|| USERS[usize::from(g.value) % 3].to_owned()))
        } else {
            user
        },
        anonymous_id: (kind != EventType::Alias).then(|| ANONS[g.anon].to_owned()),
        event,
        name: None,
        category: None,
        group_id: None,
        previous_id: (kind == EventType::Alias).then(|| ANONS[g.anon].to_owned()),
        timestamp: time,
        original_timestamp: None,
        sent_at: None,
        received_at: time + i64::from(g.delay) * 1_000_000,
        properties: properties.map(|p| p.to_string()),
        traits: traits.map(|t| t.to_string()),
        context: None,
        integrations: None,
        request_ip: None,
        blocked_ids: vec![],
        control: None,
    };
    let mut out = vec![ev.clone()];
    if g.retried {
        let mut again = ev;
        again.received_at += 1_000_000;
        out.push(again);
    }
    out
}

/// The stream in log order: events by partition (primary identifier),
/// interleaved by `order` (a permutation seed per event).
fn log(gens: &[Gen], order: &[u16]) -> Vec<Event> {
    let mut partitions: BTreeMap<Identifier, Vec<Event>> = BTreeMap::new();
    for (i, g) in gens.iter().enumerate() {
        for ev in build(g, i) {
            partitions
                .entry(ev.primary_identifier())
                .or_default()
                .push(ev);
        }
    }
    let mut queues: Vec<std::collections::VecDeque<Event>> =
        partitions.into_values().map(Into::into).collect();
    let mut out = Vec::new();
    let mut k = 0;
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len())
            .filter(|i| !queues[*i].is_empty())
            .collect();
        let pick = live[usize::from(order.get(k).copied().unwrap_or(0)) % live.len()];
        out.push(queues[pick].pop_front().unwrap());
        k += 1;
    }
    out
}

fn model(events: &[Event]) -> AudienceModel {
    let mut m = AudienceModel::new(ProfileModel::new(10_000_000), catalog());
    for ev in events {
        m.apply(ev).unwrap();
    }
    m
}

/// The brute-force evaluation of one profile from its whole timeline.
fn brute(m: &AudienceModel, id: &Identifier, now: i64) -> Evaluation {
    let view = m.profiles().profile(id).unwrap();
    let events: Vec<&Event> = m.profiles().timeline(id);
    let cat = m.catalog();
    let mut out = Evaluation::default();
    for t in cat.traits() {
        let d = &t.definition;
        let included: Vec<(&Event, Option<Value>)> = events
            .iter()
            .filter(|e| matches(&d.filter, e, &event_properties(e)))
            .filter_map(|e| {
                let value = match &d.property {
                    Some(p) => {
                        let v = event_properties(e).get(p).cloned()?;
                        if d.reducer.numeric() && !v.is_number() {
                            return None;
                        }
                        Some(v)
                    }
                    None => None,
                };
                Some((*e, value))
            })
            .collect();
        if included.is_empty() {
            continue;
        }
        let in_window: Vec<&(&Event, Option<Value>)> = included
            .iter()
            .filter(|(e, _)| match d.window {
                Window::Last { micros, .. } => {
                    let b = Sliding::of(micros).bucket;
                    e.timestamp.div_euclid(b) * b + b > now - micros
                }
                _ => true,
            })
            .collect();
        let nums: Vec<f64> = in_window
            .iter()
            .filter_map(|(_, v)| v.as_ref()?.as_f64())
            .collect();
        let texts: Vec<String> = in_window
            .iter()
            .filter_map(|(_, v)| Some(v.as_ref()?.to_string()))
            .collect();
        let sum: f64 = nums.iter().sum();
        let by_key = |newest: bool| {
            let mut v: Vec<&(&Event, Option<Value>)> = in_window.clone();
            v.sort_by(|a, b| {
                (a.0.timestamp, &a.0.message_id).cmp(&(b.0.timestamp, &b.0.message_id))
            });
            let pick = if newest { v.last() } else { v.first() };
            pick.and_then(|(_, v)| v.clone()).unwrap_or(Value::Null)
        };
        let value = match d.reducer {
            Reducer::Count => json!(in_window.len()),
            Reducer::Sum => number(sum),
            Reducer::Avg if nums.is_empty() => Value::Null,
            Reducer::Avg => {
                let avg = sum / nums.len() as f64;
                number((avg * 100.0).round() / 100.0)
            }
            Reducer::Min => nums
                .iter()
                .copied()
                .reduce(f64::min)
                .map_or(Value::Null, number),
            Reducer::Max => nums
                .iter()
                .copied()
                .reduce(f64::max)
                .map_or(Value::Null, number),
            Reducer::First => by_key(false),
            Reducer::Last => by_key(true),
            Reducer::MostFrequent => {
                let mut freq: BTreeMap<&String, usize> = BTreeMap::new();
                for t in &texts {
                    *freq.entry(t).or_default() += 1;
                }
                let best = freq.values().copied().max();
                freq.iter()
                    .find(|(_, n)| Some(**n) == best)
                    .map_or(Value::Null, |(t, _)| serde_json::from_str(t).unwrap())
            }
            Reducer::UniqueList => {
                let set: BTreeSet<&String> = texts.iter().collect();
                Value::Array(
                    set.into_iter()
                        .map(|t| serde_json::from_str(t).unwrap())
                        .collect(),
                )
            }
            Reducer::UniqueCount => json!(texts.iter().collect::<BTreeSet<_>>().len()),
        };
        // `null` (nothing in the window) reads as absent.
        if !value.is_null() {
            out.traits.insert(t.key.clone(), value);
        }
    }
    for a in cat.audiences() {
        let holds = holds(&a.condition, &view, &events, &out, now);
        out.audiences.insert(a.key.clone(), holds);
    }
    out
}

fn holds(
    c: &Condition,
    view: &trailmark_domain::profile::ProfileView,
    events: &[&Event],
    done: &Evaluation,
    now: i64,
) -> bool {
    match c {
        Condition::And(cs) => cs.iter().all(|c| holds(c, view, events, done, now)),
        Condition::Or(cs) => cs.iter().any(|c| holds(c, view, events, done, now)),
        Condition::Not(c) => !holds(c, view, events, done, now),
        Condition::Trait(p) => {
            p.op.test(view.traits.get(&p.name).map(|t| &t.value), p.value.as_ref())
        }
        Condition::ComputedTrait(p) => p.op.test(done.traits.get(&p.name), p.value.as_ref()),
        Condition::Audience(k) => done.audiences[k],
        Condition::Seen(s) => {
            if view.counts.is_empty() {
                return false;
            }
            let at = match s.end {
                trailmark_domain::audience::ast::SeenEnd::First => view.first_seen,
                trailmark_domain::audience::ast::SeenEnd::Last => view.last_seen,
            };
            s.window.contains(at, now)
        }
        Condition::Event(e) => {
            let n = events
                .iter()
                .filter(|ev| matches(&e.filter, ev, &event_properties(ev)))
                .filter(|ev| e.window.contains(ev.timestamp, now))
                .count();
            e.count_op.test(n.min(u32::MAX as usize) as u32, e.count)
        }
    }
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

fn last_received(events: &[Event]) -> i64 {
    events.iter().map(|e| e.received_at).max().unwrap_or(BASE)
}

fn streams() -> impl Strategy<Value = (Vec<Gen>, Vec<u16>, u32)> {
    (
        prop::collection::vec(gen_event(), 1..60),
        prop::collection::vec(any::<u16>(), 0..140),
        0u32..5_000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn kept_state_evaluates_as_the_whole_history((gens, order, later) in streams()) {
        let events = log(&gens, &order);
        let m = model(&events);
        let now = last_received(&events) + i64::from(later) * MINUTE_MICROS;
        for members in m.profiles().profiles() {
            let id = &members[0];
            let streamed = m.evaluate_profile(id, now).unwrap();
            let mut expected = brute(&m, id, now);
            expected.deadline = streamed.deadline;
            expected.audience_deadlines = streamed.audience_deadlines.clone();
            expected.at = now;
            expected.trait_deadlines = streamed.trait_deadlines.clone();
            prop_assert_eq!(streamed, expected, "profile of {}", id);
        }
    }

    #[test]
    fn nothing_changes_before_the_deadline((gens, order, later) in streams(), steps in prop::collection::vec(0u32..1_000_000, 1..6)) {
        let events = log(&gens, &order);
        let m = model(&events);
        let now = last_received(&events) + i64::from(later) * MINUTE_MICROS;
        for (holder, at_now) in m.evaluate(now) {
            let horizon = at_now.deadline.unwrap_or(now + 400 * 24 * HOUR_MICROS);
            // Random points, and the last microsecond before the deadline.
            let points = steps
                .iter()
                .map(|s| now + (i128::from(horizon - now) * i128::from(*s) / 1_000_000) as i64)
                .chain([horizon - 1]);
            for t in points {
                let mut then = m.evaluate_profile(&holder, t).unwrap();
                then.deadline = at_now.deadline;
                then.audience_deadlines = at_now.audience_deadlines.clone();
                then.trait_deadlines = at_now.trait_deadlines.clone();
                then.at = at_now.at;
                prop_assert_eq!(&then, &at_now, "profile of {} at +{}µs", holder, t - now);
            }
        }
    }

    #[test]
    fn partition_interleaving_does_not_matter((gens, order, later) in streams(), other in prop::collection::vec(any::<u16>(), 0..140)) {
        let a = log(&gens, &order);
        let b = log(&gens, &other);
        let now = last_received(&a) + i64::from(later) * MINUTE_MICROS;
        prop_assert_eq!(model(&a).evaluate(now), model(&b).evaluate(now));
    }
}

/// A fixed stream of 120 events over every kind, person and device, over
/// about 14 hours; every eleventh retried if `retries`.
fn fixed_stream(retries: bool) -> Vec<Gen> {
    (0..120)
        .map(|i| Gen {
            kind: (i % 6) as u8,
            user: (i % 4 != 0).then_some(i % 3),
            anon: i % 3,
            value: (i * 37 % 256) as u8,
            minute: (i * 7) as u16,
            delay: 5,
            retried: retries && i % 11 == 0,
        })
        .collect()
}

#[test]
fn generated_streams_reach_every_definition() {
    // A fixed stream that makes each audience true for someone at some
    // time, so the properties above are not vacuous.
    let events = log(&fixed_stream(true), &[]);
    let m = model(&events);
    let mut seen: BTreeMap<String, bool> = BTreeMap::new();
    let start = last_received(&events) - 2 * 24 * HOUR_MICROS;
    for step in 0..200 {
        let now = start + step * 20 * MINUTE_MICROS;
        for e in m.evaluate(now).values() {
            for (k, v) in &e.audiences {
                *seen.entry(k.clone()).or_default() |= *v;
            }
        }
    }
    for a in m.catalog().audiences() {
        assert!(
            seen.get(&a.key).copied().unwrap_or(false),
            "{} never held",
            a.key
        );
    }
    let _ = Map::<String, Value>::new();
}

/// One step of the evaluator's bookkeeping over the model: every profile is
/// evaluated from its last evaluation when it has the same members (with
/// `changed` for the profile holding `touched`, nothing for the others), in
/// full otherwise, and must equal a full evaluation. A profile that no
/// longer stands (merged into another) loses its last evaluation, as the
/// evaluator retires its record: should the same members stand alone again,
/// what was folded meanwhile was evaluated under another profile. Returns
/// how many audiences the plans left out.
fn evaluate_incrementally(
    m: &AudienceModel,
    last: &mut BTreeMap<Vec<Identifier>, Evaluation>,
    now: i64,
    touched: Option<(&Identifier, &Changed)>,
) -> Result<usize, TestCaseError> {
    let nothing = Changed::default();
    let mut skipped = 0;
    let standing: BTreeSet<Vec<Identifier>> = m.profiles().profiles().into_iter().collect();
    last.retain(|members, _| standing.contains(members));
    for members in standing {
        let id = &members[0];
        let changed = match touched {
            Some((t, c)) if members.contains(t) => c,
            _ => &nothing,
        };
        let prior = last.get(&members);
        if let Some(p) = prior {
            let plan = m.catalog().plan(Some((p, changed)), now);
            skipped += m.catalog().audiences().len() - plan.audiences();
        }
        let got = m
            .reevaluate_profile(id, now, prior.map(|p| (p, changed)))
            .unwrap();
        let full = m.evaluate_profile(id, now).unwrap();
        prop_assert_eq!(&got, &full, "profile of {} at {}", id, now);
        last.insert(members, got);
    }
    Ok(skipped)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// Evaluating only the audiences a change can reach (with the last
    /// verdict for the others) equals evaluating all of them, after every
    /// event and after pauses in which only time passes (or the clock goes
    /// back).
    #[test]
    fn evaluating_only_what_changed_equals_evaluating_everything(
        (gens, order, _later) in streams(),
        pauses in prop::collection::vec(prop::option::weighted(0.3, -600i32..3_000), 0..60),
    ) {
        let events = log(&gens, &order);
        let mut m = AudienceModel::new(ProfileModel::new(10_000_000), catalog());
        let mut last = BTreeMap::new();
        let mut now = BASE;
        for (i, ev) in events.iter().enumerate() {
            now = now.max(ev.received_at);
            m.apply(ev).unwrap();
            let changed = Changed {
                specs: m.catalog().contributions(ev).into_iter().map(|(s, _)| s).collect(),
                traits: may_set_traits(ev),
                seen: true,
            };
            let primary = ev.primary_identifier();
            evaluate_incrementally(&m, &mut last, now, Some((&primary, &changed)))?;
            if let Some(Some(minutes)) = pauses.get(i) {
                now += i64::from(*minutes) * MINUTE_MICROS;
                evaluate_incrementally(&m, &mut last, now, None)?;
            }
        }
    }
}

#[test]
fn incremental_evaluation_leaves_audiences_out() {
    // The property above is not vacuous: on a fixed stream, plans leave
    // most audiences out.
    let events = log(&fixed_stream(false), &[]);
    let mut m = AudienceModel::new(ProfileModel::new(10_000_000), catalog());
    let mut last = BTreeMap::new();
    let (mut skipped, mut total, mut now) = (0, 0, 0);
    for ev in &events {
        now = ev.received_at.max(now);
        m.apply(ev).unwrap();
        let changed = Changed {
            specs: m
                .catalog()
                .contributions(ev)
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            traits: may_set_traits(ev),
            seen: true,
        };
        let primary = ev.primary_identifier();
        skipped += evaluate_incrementally(&m, &mut last, now, Some((&primary, &changed))).unwrap();
        total += m.profiles().profiles().len() * m.catalog().audiences().len();
    }
    assert!(skipped * 2 > total, "{skipped} of {total} left out");
}
