//! Tests of definitions: reading, limits, references, evaluation.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::ast::*;
use super::eval::ProfileData;
use super::json::{
    computed_trait_from_json, computed_trait_to_json, condition_from_json, condition_to_json,
};
use super::leaf::{LeafState, Spec};
use super::*;
use crate::profile::TraitValue;

fn read(v: Value) -> Result<Condition, DefinitionError> {
    condition_from_json(&v, "definition")
}

fn path_of(v: Value) -> String {
    read(v).unwrap_err().path
}

#[test]
fn reads_the_typical_audience() {
    let c = read(json!({"and": [
        {"seen": "first", "within": {"last": 7, "unit": "days"}},
        {"event": "Viewed Pricing", "count": {"op": ">=", "value": 3}, "within": {"last": 7, "unit": "days"}},
        {"trait": "plan", "op": "!=", "value": "enterprise"}
    ]}))
    .unwrap();
    let Condition::And(cs) = &c else {
        panic!("not an and: {c:?}")
    };
    assert_eq!(cs.len(), 3);
    assert_eq!(
        cs[1],
        Condition::Event(EventCondition {
            filter: EventFilter {
                event: "Viewed Pricing".into(),
                filters: vec![],
            },
            count_op: CountOp::AtLeast,
            count: 3,
            window: Window::last(7, Unit::Days),
        })
    );
    // Written back and read again, it is the same tree.
    assert_eq!(read(condition_to_json(&c)).unwrap(), c);
}

#[test]
fn errors_name_the_path() {
    assert_eq!(
        path_of(json!({"and": [{"trait": "a", "op": "~", "value": 1}]})),
        "definition.and[0].op"
    );
    assert_eq!(
        path_of(json!({"or": [{"trait": "a", "op": "=", "value": 1, "extra": 2}]})),
        "definition.or[0].extra"
    );
    assert_eq!(
        path_of(json!({"event": "x", "count": {"op": ">", "value": 1}})),
        "definition.event.count.op".replace("event.", "")
    );
    assert_eq!(
        path_of(json!({"event": "x", "within": {"last": 0, "unit": "days"}})),
        "definition.within.last"
    );
    assert_eq!(
        path_of(json!({"event": "x", "within": {"last": 5, "unit": "weeks"}})),
        "definition.within.unit"
    );
    assert_eq!(
        path_of(json!({"trait": "a", "op": "in", "value": "x"})),
        "definition.value"
    );
    assert_eq!(
        path_of(json!({"trait": "a", "op": "exists", "value": 1})),
        "definition.value"
    );
    assert_eq!(path_of(json!({"not": {}})), "definition.not");
    assert_eq!(
        path_of(json!({"audience": "Bad Key"})),
        "definition.audience"
    );
    assert_eq!(
        path_of(json!({"event": "x", "count": {"op": ">=", "value": MAX_COUNT + 1}})),
        "definition.count.value"
    );
    let two_kinds = read(json!({"trait": "a", "event": "b"})).unwrap_err();
    assert!(two_kinds.message.contains("one kind"), "{two_kinds}");
}

#[test]
fn limits_depth_and_leaves() {
    let leaf = json!({"trait": "a", "op": "exists"});
    let mut deep = leaf.clone();
    for _ in 0..MAX_DEPTH - 1 {
        deep = json!({"and": [leaf.clone(), deep]});
    }
    assert!(read(deep.clone()).is_ok());
    let too_deep = json!({"or": [deep]});
    let e = read(too_deep).unwrap_err();
    assert!(e.message.contains("at most 6"), "{e}");
    // The path leads to the deepest leaf.
    assert!(
        e.path.starts_with("definition.or[0].and[1].and[1]"),
        "{}",
        e.path
    );

    let many = json!({"or": vec![leaf.clone(); MAX_LEAVES]});
    assert!(read(many).is_ok());
    let too_many = json!({"or": vec![leaf; MAX_LEAVES + 1]});
    assert!(read(too_many).unwrap_err().message.contains("at most 50"));
}

#[test]
fn references_are_checked() {
    let a = |v: Value| read(v).unwrap();
    let mut audiences = BTreeMap::new();
    audiences.insert("a".to_owned(), a(json!({"audience": "b"})));
    audiences.insert("b".to_owned(), a(json!({"and": [{"audience": "c"}]})));
    audiences.insert("c".to_owned(), a(json!({"trait": "x", "op": "exists"})));
    let traits = BTreeSet::new();
    assert!(check_references(&audiences, &traits, "a", "definition").is_ok());
    assert_eq!(
        evaluation_order(&audiences),
        vec!["c".to_owned(), "b".into(), "a".into()]
    );

    audiences.insert("c".to_owned(), a(json!({"not": {"audience": "a"}})));
    let e = check_references(&audiences, &traits, "c", "definition").unwrap_err();
    assert!(e.message.contains("c -> a -> b -> c"), "{e}");

    audiences.insert("c".to_owned(), a(json!({"audience": "nobody"})));
    let e = check_references(&audiences, &traits, "c", "definition").unwrap_err();
    assert!(e.message.contains("nobody"), "{e}");

    audiences.insert(
        "c".to_owned(),
        a(json!({"computed_trait": "ltv", "op": ">", "value": 1})),
    );
    assert!(check_references(&audiences, &traits, "c", "definition").is_err());
    let traits = BTreeSet::from(["ltv".to_owned()]);
    assert!(check_references(&audiences, &traits, "c", "definition").is_ok());

    audiences.insert("c".to_owned(), a(json!({"event": "Audience Entered"})));
    let e = check_references(&audiences, &traits, "c", "definition").unwrap_err();
    assert!(e.message.contains("emitted by the evaluator"), "{e}");
}

#[test]
fn computed_traits_read_and_check() {
    let ct = computed_trait_from_json(
        &json!({"reducer": "sum", "event": "Order Completed", "property": "total",
                "within": {"last": 30, "unit": "days"}, "round": 2}),
        "definition",
    )
    .unwrap();
    assert_eq!(ct.reducer, Reducer::Sum);
    assert_eq!(
        computed_trait_from_json(&computed_trait_to_json(&ct), "definition").unwrap(),
        ct
    );
    let err = |v: Value| computed_trait_from_json(&v, "definition").unwrap_err().path;
    assert_eq!(
        err(json!({"reducer": "sum", "event": "x"})),
        "definition.property"
    );
    assert_eq!(
        err(json!({"reducer": "count", "event": "x", "property": "y"})),
        "definition.property"
    );
    assert_eq!(
        err(json!({"reducer": "median", "event": "x"})),
        "definition.reducer"
    );
    assert_eq!(
        err(json!({"reducer": "count", "event": "x", "within": {"last": 400, "unit": "days"}})),
        "definition.within"
    );
    assert_eq!(
        err(json!({"reducer": "count", "event": "x", "round": 9})),
        "definition.round"
    );
}

#[test]
fn windows_expire_exactly_and_say_when() {
    let c = read(
        json!({"event": "Viewed Pricing", "count": {"op": ">=", "value": 2},
                        "within": {"last": 1, "unit": "hours"}}),
    )
    .unwrap();
    let Condition::Event(e) = &c else { panic!() };
    let spec = Spec::of_condition(e);
    let mut state = spec.empty();
    let hour = HOUR_MICROS;
    for (t, m) in [
        (10 * hour, "m1"),
        (4 * hour, "m_"),
        (10 * hour + 600_000_000, "m2"),
        (5 * hour, "m0"),
    ] {
        state.fold(
            &spec,
            &leaf::Contribution {
                time: t,
                received_at: t,
                message_id: m.into(),
                value: None,
            },
        );
    }
    // keep = count + 1: the oldest of four is gone.
    assert_eq!(
        state,
        LeafState::Recent(vec![
            (10 * hour + 600_000_000, "m2".into()),
            (10 * hour, "m1".into()),
            (5 * hour, "m0".into())
        ])
    );
    let leaves = BTreeMap::from([(spec.id(), state)]);
    let traits = BTreeMap::new();
    let data = ProfileData {
        traits: &traits,
        seen: None,
        leaves: &leaves,
    };
    let ids = eval::SpecIds::default();
    let at = |now| eval::evaluate(&c, &data, &BTreeMap::new(), &BTreeMap::new(), &ids, now);
    let v = at(10 * hour + 700_000_000);
    assert!(v.holds);
    // The first event leaves the window one hour after it happened.
    assert_eq!(v.deadline, Some(11 * hour));
    assert!(at(11 * hour - 1).holds);
    assert!(!at(11 * hour).holds);
}

#[test]
fn missing_traits_fail_all_but_not_equal() {
    let traits: BTreeMap<String, TraitValue> = BTreeMap::new();
    let leaves = BTreeMap::new();
    let data = ProfileData {
        traits: &traits,
        seen: None,
        leaves: &leaves,
    };
    let holds = |v: Value| {
        eval::evaluate(
            &read(v).unwrap(),
            &data,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &eval::SpecIds::default(),
            0,
        )
        .holds
    };
    assert!(holds(
        json!({"trait": "plan", "op": "!=", "value": "enterprise"})
    ));
    assert!(!holds(
        json!({"trait": "plan", "op": "=", "value": "enterprise"})
    ));
    assert!(!holds(json!({"trait": "plan", "op": "exists"})));
    assert!(holds(json!({"not": {"trait": "plan", "op": "exists"}})));
    assert!(holds(json!({"and": []})));
    assert!(!holds(json!({"or": []})));
}

#[test]
fn the_evaluators_own_events_are_not_activity() {
    let mut ev = crate::Event {
        workspace_id: "ws".into(),
        source_id: EVALUATOR_SOURCE.into(),
        message_id: "m".into(),
        kind: crate::EventType::Track,
        user_id: Some("u".into()),
        anonymous_id: None,
        event: Some("Audience Entered".into()),
        name: None,
        category: None,
        group_id: None,
        previous_id: None,
        timestamp: 1,
        original_timestamp: None,
        sent_at: None,
        received_at: 1,
        properties: None,
        traits: None,
        context: None,
        integrations: None,
        request_ip: None,
        blocked_ids: vec![],
        control: None,
    };
    let facts = |ev: &crate::Event| crate::profile::project(ev).unwrap().facts;
    // History only: a timeline entry, and nothing that names, links,
    // counts or sets a trait.
    assert!(matches!(
        facts(&ev).as_slice(),
        [crate::profile::Fact::Timeline { .. }]
    ));
    ev.source_id = "src_1".into();
    assert!(
        facts(&ev)
            .iter()
            .any(|f| matches!(f, crate::profile::Fact::Counted { .. }))
    );
    assert!(
        facts(&ev)
            .iter()
            .any(|f| matches!(f, crate::profile::Fact::Named { .. }))
    );
}
