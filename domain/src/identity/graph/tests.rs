//! Scenarios of the identity decision, and property tests: any arrival
//! order, with duplicates, gives the same profiles; limits, blocked values
//! and splits hold whatever the evidence.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::identity::RuleSettings;

fn id(s: &str) -> Identifier {
    Identifier::parse(s).unwrap()
}

fn ev(t: i64, action: Action, ids: &[&str]) -> Evidence {
    Evidence {
        key: Key {
            received_at: t,
            message_id: format!("m{t}"),
        },
        action,
        ids: ids.iter().map(|s| id(s)).collect(),
    }
}

fn seen(t: i64, ids: &[&str]) -> Evidence {
    ev(t, Action::Event, ids)
}

fn refusals(g: &Graph) -> Vec<(String, String)> {
    g.decisions()
        .iter()
        .filter_map(|d| match &d.outcome {
            Outcome::Refused(i, rule) => Some((i.to_string(), rule.to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn anonymous_browsing_then_sign_up_is_one_person() {
    let rules = Rules::default();
    let g = Graph::replay(
        &rules,
        [
            seen(1, &["anonymous_id:a1"]),
            seen(2, &["anonymous_id:a1"]),
            seen(3, &["anonymous_id:a1", "user_id:u1", "email:ann@x.io"]),
        ],
    );
    assert!(g.same(&id("anonymous_id:a1"), &id("user_id:u1")));
    assert!(g.same(&id("email:ann@x.io"), &id("user_id:u1")));
    assert!(refusals(&g).is_empty());
}

#[test]
fn one_person_on_two_devices() {
    let rules = Rules::default();
    let g = Graph::replay(
        &rules,
        [
            seen(1, &["anonymous_id:laptop", "user_id:u1"]),
            seen(2, &["anonymous_id:phone", "user_id:u1"]),
        ],
    );
    assert!(g.same(&id("anonymous_id:laptop"), &id("anonymous_id:phone")));
}

#[test]
fn two_people_on_one_device_stay_two() {
    let rules = Rules::default();
    let first = seen(1, &["anonymous_id:shared", "user_id:u1"]);
    let second = seen(2, &["anonymous_id:shared", "user_id:u2"]);
    let g = Graph::replay(&rules, [second.clone(), first.clone()]);
    assert!(g.same(&id("anonymous_id:shared"), &id("user_id:u1")));
    assert!(!g.same(&id("user_id:u2"), &id("user_id:u1")));
    assert_eq!(
        refusals(&g),
        [(
            "anonymous_id:shared".to_owned(),
            "limit user_id 1 ever".to_owned()
        )],
        "the device, of lower priority, is demoted; u2 keeps its own profile"
    );
    // Whoever ingest received first keeps the device, whatever the event
    // times say: the canonical order is receivedAt.
    let mut early = second;
    early.key.received_at = 0;
    let g = Graph::replay(&rules, [first, early]);
    assert!(g.same(&id("anonymous_id:shared"), &id("user_id:u2")));
}

#[test]
fn a_shared_email_does_not_fuse_two_users() {
    let rules = Rules::default();
    let g = Graph::replay(
        &rules,
        [
            seen(1, &["user_id:u1", "email:team@x.io"]),
            seen(2, &["user_id:u2", "email:team@x.io"]),
        ],
    );
    assert!(!g.same(&id("user_id:u1"), &id("user_id:u2")));
    assert_eq!(refusals(&g)[0].0, "email:team@x.io");
}

#[test]
fn alias_chains_join_every_former_id_despite_the_user_id_limit() {
    let rules = Rules::default();
    let g = Graph::replay(
        &rules,
        [
            ev(
                1,
                Action::Alias,
                &["user_id:u2", "user_id:u1", "anonymous_id:u1"],
            ),
            ev(
                2,
                Action::Alias,
                &["user_id:u3", "user_id:u2", "anonymous_id:u2"],
            ),
        ],
    );
    assert!(g.same(&id("user_id:u1"), &id("user_id:u3")));
    let path = g.path(&id("user_id:u1"), &id("user_id:u3")).unwrap();
    assert_eq!(path.len(), 2, "{path:?}");
}

#[test]
fn a_blocked_user_id_links_nothing() {
    let rules = Rules::default();
    let g = Graph::replay(
        &rules,
        [
            seen(1, &["anonymous_id:a1", "user_id:null"]),
            seen(2, &["anonymous_id:a2", "user_id:NULL"]),
        ],
    );
    assert!(!g.same(&id("anonymous_id:a1"), &id("anonymous_id:a2")));
    assert!(!g.same(&id("anonymous_id:a1"), &id("user_id:null")));
    assert_eq!(refusals(&g)[0].1, "blocked value");
}

#[test]
fn an_admin_merge_ignores_limits_and_a_split_undoes_it_for_good() {
    let rules = Rules::default();
    let mut evidence = vec![
        seen(1, &["anonymous_id:a1", "user_id:u1"]),
        seen(2, &["anonymous_id:a2", "user_id:u2"]),
        ev(3, Action::Merge, &["user_id:u1", "user_id:u2"]),
    ];
    let g = Graph::replay(&rules, evidence.clone());
    assert!(g.same(&id("anonymous_id:a1"), &id("anonymous_id:a2")));
    let path = g
        .path(&id("anonymous_id:a1"), &id("anonymous_id:a2"))
        .unwrap();
    let keys: Vec<i64> = path.iter().map(|d| d.key.received_at).collect();
    assert_eq!(keys, [1, 3, 2], "the path names each link's evidence");

    evidence.push(ev(4, Action::Split, &["user_id:u2"]));
    // u2's device identifies again with both: u2 may not rejoin.
    evidence.push(seen(
        5,
        &["anonymous_id:a2", "user_id:u2", "anonymous_id:a1"],
    ));
    let g = Graph::replay(&rules, evidence);
    assert!(!g.same(&id("user_id:u1"), &id("user_id:u2")));
    assert!(g.same(&id("user_id:u1"), &id("anonymous_id:a2")));
    assert!(
        refusals(&g).iter().any(|(_, r)| r == "split by an admin"),
        "{:?}",
        refusals(&g)
    );
}

#[test]
fn a_windowed_limit_lets_a_long_lived_customer_gain_devices() {
    const DAY: i64 = 86_400_000_000;
    let mut s = RuleSettings::default();
    s.limits.insert("anonymous_id".into(), "2 weekly".into());
    let rules = Rules::from_settings(&s).unwrap();
    let device = |t: i64, n: u32| seen(t, &["user_id:u1", &format!("anonymous_id:d{n}")]);
    let g = Graph::replay(
        &rules,
        [device(1, 1), device(2, 2), device(3, 3), device(8 * DAY, 4)],
    );
    assert!(g.same(&id("user_id:u1"), &id("anonymous_id:d2")));
    assert!(
        !g.same(&id("user_id:u1"), &id("anonymous_id:d3")),
        "third in a week"
    );
    assert!(
        g.same(&id("user_id:u1"), &id("anonymous_id:d4")),
        "a week later"
    );
}

#[test]
fn a_merge_may_not_exceed_the_profile_cap() {
    let mut s = RuleSettings::default();
    s.limits.insert("*".into(), "1000 ever".into());
    let rules = Rules::from_settings(&s).unwrap();
    let evidence: Vec<Evidence> = (0..MAX_PROFILE_IDENTIFIERS as i64 + 5)
        .map(|i| seen(i, &["user_id:hub", &format!("anonymous_id:a{i}")]))
        .collect();
    let g = Graph::replay(&rules, evidence);
    let size = g.members(&id("user_id:hub")).unwrap().count();
    assert_eq!(size, MAX_PROFILE_IDENTIFIERS);
    assert!(refusals(&g).iter().all(|(_, r)| r.contains("at most")));
}

// ---- properties ----

const POOL: [&str; 10] = [
    "user_id:u1",
    "user_id:u2",
    "user_id:null",
    "anonymous_id:a1",
    "anonymous_id:a2",
    "anonymous_id:a3",
    "anonymous_id:a4",
    "email:ann@x.io",
    "email:bob@x.io",
    "ga:g1",
];

fn evidence() -> impl Strategy<Value = Evidence> {
    (
        0i64..40,
        0u8..3,
        prop::sample::subsequence(POOL.to_vec(), 1..4),
        0u8..20,
    )
        .prop_map(|(t, m, ids, action)| {
            let action = match action {
                0..16 => Action::Event,
                16..18 => Action::Alias,
                18 => Action::Merge,
                _ => Action::Split,
            };
            let ids: Vec<&str> = if action == Action::Split {
                ids[..1].to_vec()
            } else {
                ids
            };
            let mut e = ev(t * 3_600_000_000, action, &ids);
            e.key.message_id = format!("m{t}-{m}");
            e
        })
}

/// Three rule sets: the defaults, a strict one, and one with a window.
fn rules() -> impl Strategy<Value = Rules> {
    (0usize..3).prop_map(|i| {
        let mut s = RuleSettings::default();
        match i {
            0 => {}
            1 => {
                s.limits.insert("*".into(), "2 ever".into());
                s.priority = vec!["email".into(), "user_id".into()];
            }
            _ => {
                s.limits.insert("anonymous_id".into(), "2 daily".into());
                s.blocked_values.push("a4".into());
            }
        }
        Rules::from_settings(&s).unwrap()
    })
}

/// The profiles, as sets of identifier names, and every decision.
fn outcome(g: &Graph) -> (BTreeSet<Vec<String>>, Vec<Decision>) {
    let profiles = g
        .profiles()
        .map(|m| m.into_iter().map(ToString::to_string).collect())
        .collect();
    (profiles, g.decisions().to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_order_with_duplicates_decides_the_same(
        rules in rules(),
        stream in prop::collection::vec(evidence(), 0..24),
        seed in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let canonical = Graph::replay(&rules, stream.clone());
        let mut shuffled = stream.clone();
        for d in &dups {
            if !stream.is_empty() {
                shuffled.push(d.get(&stream).clone());
            }
        }
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let replayed = Graph::replay(&rules, shuffled);
        prop_assert_eq!(outcome(&canonical), outcome(&replayed));

        // Deciding incrementally in canonical order is the same as a replay.
        let sorted: BTreeSet<Evidence> = stream.into_iter().collect();
        let mut incremental = Graph::new(&rules);
        for e in &sorted {
            incremental.decide(e);
        }
        prop_assert_eq!(outcome(&canonical), outcome(&incremental));
    }

    #[test]
    fn limits_blocked_values_and_splits_hold(
        rules in rules(),
        stream in prop::collection::vec(evidence(), 0..24),
    ) {
        let g = Graph::replay(&rules, stream.clone());
        let forced = stream.iter().any(|e| matches!(e.action, Action::Merge | Action::Alias));
        for members in g.profiles() {
            for m in &members {
                prop_assert!(!rules.is_blocked(m), "{} is blocked but linked", m);
            }
            // Without exempt evidence, no profile exceeds an all-time limit.
            if !forced {
                let mut per_kind: std::collections::BTreeMap<&str, u32> = Default::default();
                for m in &members {
                    *per_kind.entry(m.kind.as_str()).or_default() += 1;
                }
                for (kind, n) in per_kind {
                    let limit = rules.limit(&crate::event::IdKind::parse(kind));
                    if limit.window.is_none() {
                        prop_assert!(n <= limit.max, "{} {} > {}", kind, n, limit);
                    }
                }
            }
        }
        // Every link on a path is an accepted decision between members.
        for members in g.profiles() {
            let (a, b) = (members[0], members[members.len() - 1]);
            if let Some(path) = g.path(a, b) {
                for d in path {
                    prop_assert!(matches!(d.outcome, Outcome::Linked(_)));
                }
            }
        }
    }
}
