//! Generated event streams, delivered as the log delivers them, folded by a
//! store and compared with the model.
//!
//! Each case is a random stream over a small pool of people (so that links,
//! merges, trait conflicts and time ties are common): `track`, `page`,
//! `identify` with an email (in two spellings), `alias`, `context.externalIds`,
//! a blocked `userId`, accounts (`group` calls with traits, `context.groupId`,
//! a blocked `groupId`), admins' forced merges and splits (control records),
//! and exact duplicates of earlier messages. Half the cases run under
//! windowed limits (`anonymous_id` "2 daily", `email` "1 weekly"), so
//! decisions depend on the time between links. It is then delivered the way the log
//! would: split into 1–3 partitions by primary identifier (a partition keeps
//! its order), cut into batches of random sizes, with some batches delivered
//! twice (a projector that crashed before its checkpoint), and the
//! partitions applied one after another in a random interleaving or all at
//! once from concurrent tasks. Whatever the delivery, every profile the
//! model knows must read back from the store exactly as the model has it.
//!
//! Cases run in their own workspaces of one store, so a slow store (CQL)
//! pays for one keyspace, not one per case. `TRAILMARK_STORE_CASES` sets the
//! number of cases (default 24); `TRAILMARK_STORE_SEED` replays a run (each
//! run prints its seed).

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::json;
use trailmark_domain::identity::{RuleSettings, Rules};
use trailmark_domain::profile::ProfileModel;
use trailmark_domain::{Event, Identifier};
use trailmark_testkit::EventBuilder;

use super::{DAY, StoreFactory, assert_matches_model_in};
use crate::{ApplyBatch, LoggedEvent, ProfileStore};

/// One step of a generated stream.
#[derive(Debug, Clone)]
enum Op {
    /// A new message.
    Event {
        kind: u8,
        user: Option<u8>,
        anon: u8,
        email: Option<u8>,
        external: Option<u8>,
        account: Option<u8>,
        plan: u8,
        second: u32,
    },
    /// A copy of an earlier message (by index, modulo), received later.
    Duplicate(usize),
    /// An admin's control record: a forced merge of an anonymous id and a
    /// user id, or a split of the anonymous id.
    Control { merge: bool, anon: u8, user: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            0u8..5,
            proptest::option::weighted(0.5, 0u8..3),
            0u8..5,
            proptest::option::weighted(0.3, 0u8..3),
            proptest::option::weighted(0.15, 0u8..2),
            proptest::option::weighted(0.3, 0u8..3),
            0u8..3,
            // Event times: ties are common, and some are days apart.
            prop_oneof![0u32..30, 0u32..259_200],
        )
            .prop_map(
                |(kind, user, anon, email, external, account, plan, second)| Op::Event {
                    kind,
                    user,
                    anon,
                    email,
                    external,
                    account,
                    plan,
                    second,
                },
            ),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => (any::<bool>(), 0u8..5, 1u8..3)
            .prop_map(|(merge, anon, user)| Op::Control { merge, anon, user }),
    ]
}

/// How a stream is delivered.
#[derive(Debug, Clone)]
struct Delivery {
    partitions: u32,
    batch_sizes: Vec<usize>,
    replays: Vec<bool>,
    concurrent: bool,
    interleaving: Vec<u32>,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        1u32..=3,
        proptest::collection::vec(1usize..=5, 1..8),
        proptest::collection::vec(proptest::bool::weighted(0.2), 1..8),
        any::<bool>(),
        proptest::collection::vec(0u32..3, 1..40),
    )
        .prop_map(
            |(partitions, batch_sizes, replays, concurrent, interleaving)| Delivery {
                partitions,
                batch_sizes,
                replays,
                concurrent,
                interleaving,
            },
        )
}

/// The events of a stream, in the order they were sent.
fn events(ws: &str, ops: &[Op]) -> Vec<Event> {
    // Ingest's clock: two hours and a microsecond per message, so a stream
    // spans days (windowed limits see links fall out of them) and no two
    // messages tie.
    let received = |i: usize| trailmark_testkit::T0 + i as i64 * (2 * 3_600 * 1_000_000 + 1);
    let mut out: Vec<Event> = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let ev = match op {
            Op::Duplicate(of) if !out.is_empty() => {
                let mut copy = out[of % out.len()].clone();
                // A retry: the same message, received again now (more than
                // the window later, it is a new event, in the model too).
                copy.received_at = received(i);
                copy
            }
            Op::Duplicate(_) => continue,
            Op::Control { merge, anon, user } => {
                use trailmark_domain::event::{Control, ControlAction};
                let mut ev = EventBuilder::track("Control")
                    .workspace(ws)
                    .message_id(&format!("m{i}"))
                    .anon(&format!("a{anon}"))
                    .build();
                ev.kind = trailmark_domain::EventType::Control;
                ev.event = None;
                ev.anonymous_id = None;
                ev.received_at = received(i);
                let mut identifiers = vec![format!("anonymous_id:a{anon}")];
                if *merge {
                    identifiers.push(format!("user_id:u{user}"));
                }
                ev.control = Some(Control {
                    action: if *merge {
                        ControlAction::Merge
                    } else {
                        ControlAction::Split
                    },
                    identifiers,
                });
                ev
            }
            Op::Event {
                kind,
                user,
                anon,
                email,
                external,
                account,
                plan,
                second,
            } => {
                let anon = format!("a{anon}");
                // `null` is blocked by default: it names no account.
                let account = account.map(|g| match g {
                    0 => "null".to_owned(),
                    g => format!("g{g}"),
                });
                // `null` is blocked by default: it must link nothing.
                let user = user.map(|u| match u {
                    0 => "null".to_owned(),
                    u => format!("u{u}"),
                });
                let plan = ["free", "pro", "team"][*plan as usize];
                let mut b = match (kind, &user) {
                    (0, _) => EventBuilder::track("Clicked"),
                    (1, _) => EventBuilder::page("Home"),
                    (2, _) => {
                        let mut traits = json!({ "plan": plan });
                        if let Some(e) = email {
                            // Spelled two ways: one person by email.
                            traits["email"] = json!(if second % 2 == 0 {
                                format!("p{e}@example.com")
                            } else {
                                format!(" P{e}@Example.COM")
                            });
                        }
                        EventBuilder::identify(traits)
                    }
                    (4, _) => EventBuilder::group(
                        account.as_deref().unwrap_or("g1"),
                        json!({ "tier": plan, "name": format!("Account {i}") }),
                    ),
                    (_, Some(u)) => EventBuilder::alias(u, &anon),
                    (_, None) => EventBuilder::track("Signed Up"),
                }
                .workspace(ws)
                .message_id(&format!("m{i}"))
                .at(i64::from(*second))
                .anon(&anon);
                if let Some(u) = &user {
                    b = b.user(u);
                }
                let mut context = json!({ "traits": { "seen": plan } });
                if let Some(x) = external {
                    context["externalIds"] =
                        json!([{ "type": "crm_id", "id": format!("c{x}"), "collection": "users" }]);
                }
                if let (Some(g), true) = (&account, *kind != 4) {
                    // Half by `context.groupId`, half by an account external id.
                    if second % 2 == 0 {
                        context["groupId"] = json!(g);
                    } else {
                        context["externalIds"] = json!([
                            { "type": "group_id", "id": g, "collection": "accounts" },
                            { "type": "sfdc_account", "id": g, "collection": "accounts" }
                        ]);
                    }
                }
                let mut ev = b.context(context).build();
                ev.received_at = received(i);
                // As ingest does: a blocked userId does not name the event.
                trailmark_domain::identity::Rules::defaults().mark_blocked(&mut ev);
                ev
            }
        };
        out.push(ev);
    }
    out
}

/// The partition an event's record lands in: its primary identifier decides.
fn partition_of(ev: &Event, partitions: u32) -> u32 {
    let key = ev.primary_identifier().to_string();
    key.bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % partitions
}

/// The batches of each partition, in position order, replays included.
/// Each case's projector has its own consumer name: its positions start
/// at 0, in a store other cases' projectors also write.
fn batches(consumer: &str, events: &[Event], d: &Delivery) -> Vec<Vec<Arc<ApplyBatch>>> {
    let mut per: Vec<Vec<Event>> = vec![Vec::new(); d.partitions as usize];
    for ev in events {
        per[partition_of(ev, d.partitions) as usize].push(ev.clone());
    }
    let mut k = 0;
    per.into_iter()
        .enumerate()
        .map(|(p, evs)| {
            let mut out = Vec::new();
            let mut position = 0u64;
            let mut rest = &evs[..];
            while !rest.is_empty() {
                let n = d.batch_sizes[k % d.batch_sizes.len()].min(rest.len());
                let batch = Arc::new(ApplyBatch {
                    consumer: consumer.into(),
                    positions: vec![(p as u32, position + n as u64)],
                    events: rest[..n]
                        .iter()
                        .enumerate()
                        .map(|(i, ev)| LoggedEvent {
                            partition: p as u32,
                            position: position + i as u64,
                            event: ev.clone(),
                        })
                        .collect(),
                    dedup_window_micros: DAY,
                });
                if d.replays[k % d.replays.len()] {
                    out.push(batch.clone());
                }
                out.push(batch);
                position += n as u64;
                rest = &rest[n..];
                k += 1;
            }
            out
        })
        .collect()
}

async fn deliver(store: &Arc<dyn ProfileStore>, per: Vec<Vec<Arc<ApplyBatch>>>, d: &Delivery) {
    if d.concurrent {
        let tasks: Vec<_> = per
            .into_iter()
            .map(|batches| {
                let store = Arc::clone(store);
                tokio::spawn(async move {
                    for b in batches {
                        store.apply(b).await.expect("apply");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("delivery task");
        }
        return;
    }
    let mut queues: Vec<std::collections::VecDeque<Arc<ApplyBatch>>> =
        per.into_iter().map(Into::into).collect();
    let mut turn = d.interleaving.iter().cycle();
    while queues.iter().any(|q| !q.is_empty()) {
        let pick = *turn.next().expect("cycle") as usize % queues.len();
        let q = (0..queues.len())
            .map(|i| (pick + i) % queues.len())
            .find(|i| !queues[*i].is_empty())
            .expect("a queue with batches");
        let b = queues[q].pop_front().expect("non-empty");
        store.apply(b).await.expect("apply");
    }
}

/// Generated streams, delivered in any order, with replays, duplicates and
/// concurrent partitions, fold to what the model folds.
pub async fn generated_streams_fold_like_the_model(factory: &impl StoreFactory, at: &Path) {
    let (store, directory) = factory(at);
    let cases: usize = std::env::var("TRAILMARK_STORE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let seed: u64 = std::env::var("TRAILMARK_STORE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| u64::from(uuid::Uuid::new_v4().as_fields().0));
    eprintln!("generated streams: {cases} cases, TRAILMARK_STORE_SEED={seed}");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = (proptest::collection::vec(op(), 1..40), delivery());
    for case in 0..cases {
        let (ops, d) = strategy
            .new_tree(&mut runner)
            .expect("a generated case")
            .current();
        let ws = format!("ws_streams_{case}");
        let events = events(&ws, &ops);
        if events.is_empty() {
            // Only copies of messages never sent.
            continue;
        }
        let rules = if case % 2 == 1 {
            let settings: RuleSettings = serde_json::from_value(json!({
                "limits": { "user_id": "1 ever", "anonymous_id": "2 daily", "email": "1 weekly" }
            }))
            .expect("rule settings");
            directory
                .set_identity_rules(&ws, &settings)
                .await
                .expect("set rules");
            Rules::from_settings(&settings).expect("valid rules")
        } else {
            Rules::default()
        };
        let mut model = ProfileModel::with_rules(DAY, rules);
        for ev in &events {
            model.apply(ev).expect("generated events fold");
        }
        deliver(&store, batches(&ws, &events, &d), &d).await;
        let ids: Vec<Identifier> = model.identifiers().cloned().collect();
        if ids.is_empty() {
            // Only admins' instructions about people no event named.
            continue;
        }
        eprintln!(
            "case {case}: {} events, {} identifiers, {:?}",
            events.len(),
            ids.len(),
            d
        );
        assert_matches_model_in(&*store, &model, &ws, &ids).await;
    }
}
