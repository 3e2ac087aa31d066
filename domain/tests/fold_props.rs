//! Property tests of the profile fold ([`ProfileModel`]).
//!
//! The fold promises that a profile does not depend on the order in which
//! events arrive, that a retried message counts once, and that the root of a
//! profile is its smallest identifier. These tests generate event streams over
//! small pools of `userId`s, `anonymousId`s, emails and external ids (so that
//! profiles merge often), with traits whose keys overlap and timestamps drawn
//! from a narrow range (so that ties happen), and check each promise against a
//! second fold of the same events or against an oracle computed here, without
//! [`trailmark_domain::profile::project`].
//!
//! Run with `cargo test -p trailmark-domain --test fold_props`; raise the case
//! count with `PROPTEST_CASES=5000`.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use trailmark_domain::identity::{Key, RuleSettings, Rules, Settled};
use trailmark_domain::profile::{Named, ProfileModel, ProfileView, project};
use trailmark_domain::{Event, EventType, IdKind, Identifier};

const USERS: [&str; 4] = ["u1", "u2", "u3", "u4"];
const ANONS: [&str; 4] = ["a1", "a2", "a3", "a4"];
const EMAILS: [&str; 3] = ["ann@example.com", "bob@example.com", "cy@example.com"];
/// `previousId`s of `alias` calls: former user ids and anonymous ids alike.
const PREVIOUS: [&str; 5] = ["u1", "u3", "a2", "a4", "legacy-7"];
const EXTERNAL: [&str; 2] = ["cus_1", "cus_2"];
const EXTERNAL_TYPE: &str = "stripe_customer_id";
const TRAIT_KEYS: [&str; 4] = ["plan", "name", "age", "company"];
/// The de-duplication window of every model here: one second.
const WINDOW: i64 = 1_000_000;
const BASE_TIME: i64 = 1_700_000_000_000_000;

/// The shape of one generated event, before it gets a `messageId`.
#[derive(Debug, Clone)]
struct Spec {
    kind: EventType,
    user: Option<usize>,
    anon: Option<usize>,
    previous: usize,
    /// An email in `traits` (identify and group) or `context.traits`.
    email: Option<usize>,
    email_in_context: bool,
    traits: Vec<(usize, u8)>,
    context_traits: Vec<(usize, u8)>,
    external: Option<usize>,
    /// Event time, in ticks of one millisecond from [`BASE_TIME`].
    time: u8,
    /// How long after the event time ingest received it, in milliseconds.
    delay: u16,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(EventType::ALL.to_vec()),
        prop::option::weighted(0.7, 0..USERS.len()),
        prop::option::weighted(0.6, 0..ANONS.len()),
        0..PREVIOUS.len(),
        prop::option::weighted(0.3, 0..EMAILS.len()),
        any::<bool>(),
        prop::collection::vec((0..TRAIT_KEYS.len(), 0u8..4), 0..4),
        prop::collection::vec((0..TRAIT_KEYS.len(), 0u8..4), 0..3),
        prop::option::weighted(0.15, 0..EXTERNAL.len()),
        0u8..40,
        0u16..5_000,
    )
        .prop_map(
            |(
                kind,
                mut user,
                anon,
                previous,
                email,
                email_in_context,
                traits,
                ctx,
                ext,
                time,
                delay,
            )| {
                // Ingest refuses an event with neither id, and an alias without
                // a userId; the generated streams hold only accepted events.
                if user.is_none() && (anon.is_none() || kind == EventType::Alias) {
                    user = Some(time as usize % USERS.len());
                }
                Spec {
                    kind,
                    user,
                    anon,
                    previous,
                    email,
                    email_in_context,
                    traits,
                    context_traits: ctx,
                    external: ext,
                    time,
                    delay,
                }
            },
        )
}

fn trait_object(pairs: &[(usize, u8)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|&(k, v)| {
            // Values of mixed JSON types, so a wrong winner shows as a wrong type too.
            let value = match v {
                0 => json!(null),
                1 => json!(k * 10 + 1),
                2 => json!(format!("v{k}")),
                _ => json!({ "nested": [k, v] }),
            };
            (TRAIT_KEYS[k].to_owned(), value)
        })
        .collect()
}

/// Builds the event the way ingest would have normalised it.
fn build(i: usize, s: &Spec) -> Event {
    let timestamp = BASE_TIME + i64::from(s.time) * 1_000;
    let mut traits = trait_object(&s.traits);
    let mut ctx_traits = trait_object(&s.context_traits);
    if let Some(e) = s.email {
        if s.email_in_context {
            ctx_traits.insert("email".into(), json!(EMAILS[e]));
        } else {
            traits.insert("email".into(), json!(EMAILS[e]));
        }
    }
    let mut context = Map::new();
    context.insert("library".into(), json!({"name": "analytics.js"}));
    if !ctx_traits.is_empty() {
        context.insert("traits".into(), Value::Object(ctx_traits));
    }
    if let Some(x) = s.external {
        context.insert(
            "externalIds".into(),
            json!([{"id": EXTERNAL[x], "type": EXTERNAL_TYPE, "collection": "users", "encoding": "none"}]),
        );
    }
    let object = |m: Map<String, Value>| Some(Value::Object(m).to_string());
    let carries_traits = matches!(s.kind, EventType::Identify | EventType::Group);
    let carries_props = matches!(
        s.kind,
        EventType::Track | EventType::Page | EventType::Screen
    );
    Event {
        workspace_id: "ws".into(),
        source_id: "src".into(),
        message_id: format!("m{i:04}"),
        kind: s.kind,
        user_id: s.user.map(|u| USERS[u].to_owned()),
        anonymous_id: s.anon.map(|a| ANONS[a].to_owned()),
        event: (s.kind == EventType::Track).then(|| "Order Completed".to_owned()),
        name: matches!(s.kind, EventType::Page | EventType::Screen).then(|| "Home".to_owned()),
        category: None,
        group_id: (s.kind == EventType::Group).then(|| "g1".to_owned()),
        previous_id: (s.kind == EventType::Alias).then(|| PREVIOUS[s.previous].to_owned()),
        timestamp,
        original_timestamp: None,
        sent_at: None,
        received_at: timestamp + i64::from(s.delay) * 1_000,
        properties: if carries_props {
            object(trait_object(&s.traits))
        } else {
            None
        },
        traits: if carries_traits { object(traits) } else { None },
        context: object(context),
        integrations: None,
        request_ip: None,
        blocked_ids: Vec::new(),
        control: None,
    }
}

fn stream() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec(spec(), 0..40)
        .prop_map(|specs| specs.iter().enumerate().map(|(i, s)| build(i, s)).collect())
}

/// The identifiers the spec says an event links, derived from the generator's
/// own knowledge rather than from `project`.
fn expected_identifiers(s: &Spec) -> BTreeSet<Identifier> {
    let mut ids = BTreeSet::new();
    if let Some(u) = s.user {
        ids.insert(Identifier::new(IdKind::UserId, USERS[u]));
    }
    if let Some(a) = s.anon {
        ids.insert(Identifier::new(IdKind::AnonymousId, ANONS[a]));
    }
    if let Some(e) = s.email {
        // `traits` only names the person on identify: group traits describe the group.
        if s.email_in_context || s.kind == EventType::Identify {
            ids.insert(Identifier::new(IdKind::Email, EMAILS[e]));
        }
    }
    if let Some(x) = s.external {
        ids.insert(Identifier::new(
            IdKind::External(EXTERNAL_TYPE.into()),
            EXTERNAL[x],
        ));
    }
    if s.kind == EventType::Alias {
        ids.insert(Identifier::new(IdKind::UserId, PREVIOUS[s.previous]));
        ids.insert(Identifier::new(IdKind::AnonymousId, PREVIOUS[s.previous]));
    }
    ids
}

/// Connected components of the identifier graph: each identifier mapped to the
/// set of identifiers it is linked with, transitively.
fn components(links: &[BTreeSet<Identifier>]) -> BTreeMap<Identifier, BTreeSet<Identifier>> {
    let mut comp: BTreeMap<Identifier, BTreeSet<Identifier>> = BTreeMap::new();
    for set in links {
        let mut merged: BTreeSet<Identifier> = set.clone();
        for id in set {
            if let Some(existing) = comp.get(id) {
                merged.extend(existing.iter().cloned());
            }
        }
        for id in &merged {
            comp.insert(id.clone(), merged.clone());
        }
    }
    comp
}

fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> ProfileModel {
    fold_with(ProfileModel::new(WINDOW), events)
}

/// Rules under which every piece of evidence links: no limit binds and
/// nothing is blocked, so profiles are exactly the linked components.
fn permissive() -> ProfileModel {
    let settings: RuleSettings = serde_json::from_value(json!({
        "limits": {"*": "1000 ever"},
        "blocked_values": [],
        "blocked_patterns": [],
    }))
    .expect("settings");
    ProfileModel::with_rules(WINDOW, Rules::from_settings(&settings).expect("rules"))
}

fn fold_with<'a>(mut m: ProfileModel, events: impl IntoIterator<Item = &'a Event>) -> ProfileModel {
    for ev in events {
        m.apply(ev).expect("generated events fold");
    }
    m
}

/// Every identifier any of the events could name, so each is compared.
fn universe(events: &[Event]) -> BTreeSet<Identifier> {
    let mut ids: BTreeSet<Identifier> = USERS
        .iter()
        .chain(PREVIOUS.iter())
        .map(|u| Identifier::new(IdKind::UserId, *u))
        .chain(
            ANONS
                .iter()
                .chain(PREVIOUS.iter())
                .map(|a| Identifier::new(IdKind::AnonymousId, *a)),
        )
        .chain(EMAILS.iter().map(|e| Identifier::new(IdKind::Email, *e)))
        .chain(
            EXTERNAL
                .iter()
                .map(|x| Identifier::new(IdKind::External(EXTERNAL_TYPE.into()), *x)),
        )
        .collect();
    ids.extend(events.iter().map(Event::primary_identifier));
    ids
}

/// Asserts that two models agree on every profile and every timeline.
fn assert_same_profiles(
    a: &ProfileModel,
    b: &ProfileModel,
    ids: &BTreeSet<Identifier>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.profiles(), b.profiles());
    for id in ids {
        prop_assert_eq!(a.holder_of(id), b.holder_of(id), "holder of {}", id);
        prop_assert_eq!(a.profile(id), b.profile(id), "profile of {}", id);
        prop_assert_eq!(a.timeline(id), b.timeline(id), "timeline of {}", id);
    }
    Ok(())
}

/// A stream, and a permutation of it.
fn stream_and_order() -> impl Strategy<Value = (Vec<Spec>, Vec<usize>)> {
    prop::collection::vec(spec(), 0..40).prop_flat_map(|specs| {
        let order: Vec<usize> = (0..specs.len()).collect();
        (Just(specs), Just(order).prop_shuffle())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Folding the events in any order gives the same profiles and timelines.
    #[test]
    fn shuffled_stream_folds_to_the_same_profiles((specs, order) in stream_and_order()) {
        let events: Vec<Event> = specs.iter().enumerate().map(|(i, s)| build(i, s)).collect();
        let in_order = fold(&events);
        let shuffled = fold(order.iter().map(|&i| &events[i]));
        assert_same_profiles(&in_order, &shuffled, &universe(&events))?;
    }

    /// With rules that never refuse, a profile is its linked component, its
    /// holder is the member named first (by `(receivedAt, messageId)`), and
    /// its members, counts, seen times and trait winners are the ones an
    /// independent computation gives, whatever the order.
    #[test]
    fn without_limits_a_profile_is_its_component((specs, order) in stream_and_order()) {
        let events: Vec<Event> = specs.iter().enumerate().map(|(i, s)| build(i, s)).collect();
        let links: Vec<BTreeSet<Identifier>> = specs.iter().map(expected_identifiers).collect();
        let comp = components(&links);
        let model = fold_with(permissive(), order.iter().map(|&i| &events[i]));

        let mut first: BTreeMap<&Identifier, (i64, &str)> = BTreeMap::new();
        for (e, ids) in events.iter().zip(&links) {
            for id in ids {
                let k = first.entry(id).or_insert((e.received_at, &e.message_id));
                *k = (*k).min((e.received_at, &e.message_id));
            }
        }
        let expected: BTreeSet<Vec<Identifier>> =
            comp.values().map(|c| c.iter().cloned().collect()).collect();
        prop_assert_eq!(model.profiles(), expected);
        for (id, members) in &comp {
            let holder = members.iter().min_by_key(|m| (first[m], *m)).expect("non-empty component");
            prop_assert_eq!(model.holder_of(id), Some(holder.clone()), "holder of {}", id);

            let view = model.profile(id).expect("a linked identifier has a profile");
            let got: BTreeSet<&Identifier> = view.identifiers.keys().collect();
            prop_assert_eq!(got, members.iter().collect::<BTreeSet<_>>());

            let mine: Vec<&Event> = events
                .iter()
                .filter(|e| members.contains(&e.primary_identifier()))
                .collect();
            prop_assert_eq!(view.total_events(), mine.len() as u64);
            prop_assert_eq!(model.timeline(id).len(), mine.len());
            prop_assert_eq!(view.first_seen, mine.iter().map(|e| e.timestamp).min().unwrap());
            prop_assert_eq!(view.last_seen, mine.iter().map(|e| e.timestamp).max().unwrap());

            // The winner of each trait is the latest assignment (ties on messageId).
            let mut winners: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
            for (i, e) in events.iter().enumerate() {
                if !members.contains(&e.primary_identifier()) {
                    continue;
                }
                let s = &specs[i];
                let mut keys: Vec<&str> = s.context_traits.iter().map(|&(k, _)| TRAIT_KEYS[k]).collect();
                if s.kind == EventType::Identify {
                    keys.extend(s.traits.iter().map(|&(k, _)| TRAIT_KEYS[k]));
                }
                if s.email.is_some() && (s.email_in_context || s.kind == EventType::Identify) {
                    keys.push("email");
                }
                for k in keys {
                    let cand = (e.timestamp, e.message_id.as_str());
                    let w = winners.entry(k).or_insert(cand);
                    *w = (*w).max(cand);
                }
            }
            let got: BTreeMap<&str, (i64, &str)> = view
                .traits
                .iter()
                .map(|(k, t)| (k.as_str(), (t.updated_at, t.message_id.as_str())))
                .collect();
            prop_assert_eq!(got, winners);
        }
    }

    /// Retries of a message, received within the de-duplication window after
    /// the original, change nothing: not the profiles and not the timelines.
    #[test]
    fn retries_after_the_original_change_nothing(
        events in stream(),
        retries in prop::collection::vec((any::<prop::sample::Index>(), 0..=WINDOW, any::<prop::sample::Index>()), 0..20),
    ) {
        prop_assume!(!events.is_empty());
        let mut with_retries: Vec<(Event, bool)> = events.iter().map(|e| (e.clone(), true)).collect();
        for (which, offset, at) in &retries {
            let original = which.get(&events);
            let pos = with_retries
                .iter()
                .position(|(e, fresh)| *fresh && e.message_id == original.message_id)
                .expect("original is in the stream");
            let mut retry = original.clone();
            retry.received_at += offset;
            // Anywhere after the original, up to the end of the stream.
            let slot = pos + 1 + at.index(with_retries.len() - pos);
            with_retries.insert(slot, (retry, false));
        }

        let mut model = ProfileModel::new(WINDOW);
        for (ev, fresh) in &with_retries {
            prop_assert_eq!(model.apply(ev).expect("generated events fold"), *fresh, "apply({}) at {}", ev.message_id, ev.received_at);
        }
        assert_same_profiles(&fold(&events), &model, &universe(&events))?;
    }

    /// Retries received within the window count once even when the log holds a
    /// retry before the original (two ingest nodes racing): profiles are the
    /// same, and the timelines hold the same events, whichever copy's
    /// `receivedAt` was kept.
    #[test]
    fn retries_anywhere_within_the_window_count_once(
        events in stream(),
        retries in prop::collection::vec((any::<prop::sample::Index>(), 0..=WINDOW / 2, any::<prop::sample::Index>()), 1..20),
    ) {
        prop_assume!(!events.is_empty());
        let mut with_retries = events.clone();
        for (which, offset, at) in &retries {
            let mut retry = which.get(&events).clone();
            // Offsets within half a window of the original are within a window
            // of each other too, so every copy duplicates every other.
            retry.received_at += offset;
            let slot = at.index(with_retries.len() + 1);
            with_retries.insert(slot, retry);
        }
        // Which copy's receivedAt is kept moves identity evidence in the
        // canonical order; with rules that never refuse, that changes no
        // profile.
        let model = fold_with(permissive(), &with_retries);
        let reference = fold_with(permissive(), &events);
        let ids = universe(&events);
        prop_assert_eq!(reference.profiles(), model.profiles());
        for id in &ids {
            // Which copy's receivedAt was kept may move an identifier's first
            // key, and so the holder: compare the rest.
            let strip = |p: Option<ProfileView>| p.map(|mut p| {
                p.holder = Identifier::new(IdKind::UserId, "-");
                for n in p.identifiers.values_mut() {
                    n.first.received_at = 0;
                    n.first.message_id.clear();
                }
                p
            });
            prop_assert_eq!(strip(reference.profile(id)), strip(model.profile(id)), "profile of {}", id);
            let strip = |t: Vec<&Event>| -> Vec<Event> {
                t.into_iter().map(|e| Event { received_at: 0, ..e.clone() }).collect()
            };
            prop_assert_eq!(strip(reference.timeline(id)), strip(model.timeline(id)), "timeline of {}", id);
        }
    }

    /// A reader that carries a resolved profile over each event that names
    /// none of its members or that [`Settled::carry`] allows, and resolves
    /// it again after any other,
    /// always holds what resolving afresh gives: under the default rules
    /// (which refuse links) and rules that refuse none, with events arriving
    /// out of canonical order, and retries.
    #[test]
    fn a_carried_profile_is_the_profile_resolved_afresh(
        (specs, order) in stream_and_order(),
        refusing in any::<bool>(),
    ) {
        let events: Vec<Event> = specs.iter().enumerate().map(|(i, s)| build(i, s)).collect();
        let mut model = if refusing { ProfileModel::new(WINDOW) } else { permissive() };
        let mut carried: BTreeMap<Identifier, Carried> = BTreeMap::new();
        // Every event in arrival order, and a retry of every third.
        let arrivals = order.iter().flat_map(|&i| {
            std::iter::once(&events[i]).chain((i % 3 == 0).then_some(&events[i]))
        });
        for ev in arrivals {
            let projection = project(ev).expect("generated events project");
            // As a reader finds them: only the profiles of the identifiers
            // the event names are checked.
            let named: BTreeSet<&Identifier> = projection.identifiers().collect();
            for c in carried.values_mut() {
                if !c.members.keys().any(|m| named.contains(m)) {
                    continue;
                }
                let kept = c.settled.as_mut().is_some_and(|s| s.carry(&c.members, &projection));
                if !kept {
                    c.stale = true;
                }
            }
            model.apply(ev).expect("generated events fold");
            carried.retain(|_, c| !c.stale);
            // Those carried are checked; those the event named and not
            // carried (new, or just dropped) are read again.
            let read: BTreeSet<Identifier> = carried
                .keys()
                .cloned()
                .chain(named.into_iter().cloned())
                .collect();
            for id in &read {
                let fresh = resolve(&model, id);
                match (carried.get(id), fresh) {
                    (Some(c), Some(f)) => {
                        // Who the members are and their first keys (which
                        // make the holder); their times move with every event.
                        let firsts = |m: &BTreeMap<Identifier, Named>| -> Vec<(Identifier, Key)> {
                            m.iter().map(|(i, n)| (i.clone(), n.first.clone())).collect()
                        };
                        prop_assert_eq!(firsts(&c.members), firsts(&f.members), "members of {}", id);
                        prop_assert_eq!(&c.holder, &f.holder, "holder of {}", id);
                    }
                    (Some(_), None) => prop_assert!(false, "{} was carried but is not named", id),
                    (None, Some(f)) => {
                        if f.settled.is_some() {
                            carried.insert(id.clone(), f);
                        }
                    }
                    (None, None) => {}
                }
            }
        }
    }
}

/// A profile as a reader carries it.
struct Carried {
    /// Its named members, with their first keys as read.
    members: BTreeMap<Identifier, Named>,
    holder: Identifier,
    settled: Option<Settled>,
    stale: bool,
}

/// `id`'s profile resolved afresh, holder and all, if any event named it.
fn resolve(model: &ProfileModel, id: &Identifier) -> Option<Carried> {
    let view = model.profile(id)?;
    // What a store reads: the named members; the first keys only matter
    // for the holder, so the rest of `Named` is left as read.
    let members: BTreeMap<Identifier, Named> = view.identifiers;
    let settled = model.resolve(id)?.settled;
    Some(Carried {
        members,
        holder: view.holder,
        settled,
        stale: false,
    })
}

/// Every event that repeats the link of a settled profile, in order, is
/// carried; a new identifier, or a link that sorts before the profile's
/// evidence, is not.
#[test]
fn repeated_links_are_carried_and_new_ones_are_not() {
    let mut model = ProfileModel::new(WINDOW);
    let spec = |kind, user, anon, time, delay| Spec {
        kind,
        user,
        anon,
        previous: 0,
        email: None,
        email_in_context: false,
        traits: Vec::new(),
        context_traits: Vec::new(),
        external: None,
        time,
        delay,
    };
    let first = build(0, &spec(EventType::Identify, Some(0), Some(0), 10, 100));
    model.apply(&first).unwrap();
    let u1 = Identifier::new(IdKind::UserId, USERS[0]);
    let c = resolve(&model, &u1).expect("named");
    let members = c.members;
    let mut settled = c.settled.expect("a profile of its whole component");
    assert!(
        settled.latest.is_some(),
        "the link is the component's evidence"
    );
    for i in 1..20 {
        let again = build(
            i,
            &spec(EventType::Track, Some(0), Some(0), 10 + i as u8, 100),
        );
        assert!(
            settled.carry(&members, &project(&again).unwrap()),
            "a repeat of the link, later, changes nothing"
        );
    }
    let only_user = build(20, &spec(EventType::Track, Some(0), None, 35, 100));
    assert!(settled.carry(&members, &project(&only_user).unwrap()));
    let new_anon = build(21, &spec(EventType::Track, Some(0), Some(1), 36, 100));
    assert!(!settled.carry(&members, &project(&new_anon).unwrap()));
    // The same link, received before the evidence the profile was read
    // with: a replay of the component might decide otherwise.
    let late = build(22, &spec(EventType::Track, Some(0), Some(0), 0, 0));
    assert!(!settled.carry(&members, &project(&late).unwrap()));
    // Room runs out: one piece of evidence per carried link.
    settled.room = 1;
    let again = build(23, &spec(EventType::Track, Some(0), Some(0), 39, 100));
    assert!(settled.carry(&members, &project(&again).unwrap()));
    assert!(!settled.carry(&members, &project(&again).unwrap()));
}
