//! The conformance suite every store must pass, checked against the domain's
//! in-memory [`ProfileModel`], the executable specification of the fold.
//!
//! Generate the tests for a backend with
//! [`store_conformance!`](crate::store_conformance), given a factory that
//! opens the store at a location (a directory for the embedded store; a
//! Cassandra backend derives its keyspace from it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use trailmark_domain::event::MAX_EXTERNAL_IDS;
use trailmark_domain::profile::{MAX_PROFILE_IDENTIFIERS, ProfileModel};
use trailmark_domain::{Event, IdKind, Identifier};
use trailmark_testkit::{EventBuilder, T0, WORKSPACE};

use crate::{
    ApplyBatch, ApplyOutcome, LoggedEvent, ProfileStore, StoreError, TimelineQuery,
    WorkspaceDirectory,
};

mod streams;
pub use streams::generated_streams_fold_like_the_model;

/// Opens a store at a location.
pub trait StoreFactory: Fn(&Path) -> (Arc<dyn ProfileStore>, Arc<dyn WorkspaceDirectory>) {}
impl<F: Fn(&Path) -> (Arc<dyn ProfileStore>, Arc<dyn WorkspaceDirectory>)> StoreFactory for F {}

const DAY: i64 = 24 * 3_600 * 1_000_000;

fn user(id: &str) -> Identifier {
    Identifier::new(IdKind::UserId, id)
}

fn anon(id: &str) -> Identifier {
    Identifier::new(IdKind::AnonymousId, id)
}

/// A batch of `events` at positions `first..` of `partition`, moving the
/// checkpoint past them. A partition's batches must come in position order,
/// as the projector delivers them.
fn batch(partition: u32, first: u64, events: Vec<Event>) -> Arc<ApplyBatch> {
    let next = first + events.len() as u64;
    Arc::new(ApplyBatch {
        consumer: "projector".into(),
        positions: vec![(partition, next)],
        events: events
            .into_iter()
            .enumerate()
            .map(|(i, event)| LoggedEvent {
                partition,
                position: first + i as u64,
                event,
            })
            .collect(),
        dedup_window_micros: DAY,
    })
}

/// A varied stream: anonymous browsing, identify with email, out-of-order
/// trait updates, an alias, a second user, a duplicate.
pub fn scenario() -> Vec<Event> {
    let dup = EventBuilder::track("Clicked")
        .anon("a1")
        .at(5)
        .message_id("dup-1")
        .build();
    vec![
        EventBuilder::page("Home").anon("a1").at(1).build(),
        EventBuilder::track("Viewed Product")
            .anon("a1")
            .at(2)
            .build(),
        dup.clone(),
        EventBuilder::identify(json!({"email": "ann@example.com", "plan": "pro"}))
            .user("u1")
            .anon("a1")
            .at(30)
            .build(),
        // Older news, arriving later: must not overwrite `plan`.
        EventBuilder::identify(json!({"plan": "free", "name": "Ann"}))
            .user("u1")
            .at(10)
            .received(40)
            .build(),
        EventBuilder::track("Order Completed")
            .user("u1")
            .at(50)
            .properties(json!({"total": 30}))
            .build(),
        EventBuilder::alias("u1", "legacy-7").at(60).build(),
        EventBuilder::track("Order Completed")
            .user("legacy-7")
            .at(3)
            .build(),
        EventBuilder::track("Clicked").user("u2").at(7).build(),
        dup,
    ]
}

/// The store agrees with the in-memory model on identities, traits, counts,
/// seen times and timelines.
pub async fn folds_like_the_model(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let events = scenario();
    let outcome = store
        .apply(batch(0, 100, events.clone()))
        .await
        .expect("apply");
    assert_eq!(outcome.duplicates, 1);
    assert_eq!(outcome.applied, events.len() - 1);
    let mut model = ProfileModel::new(DAY);
    for e in &events {
        model.apply(e).expect("foldable");
    }
    assert_matches_model(&*store, &model, &[user("u1"), anon("a1"), user("u2")]).await;
    let p = store
        .resolve(
            WORKSPACE,
            &Identifier::new(IdKind::Email, "ann@example.com"),
        )
        .await
        .expect("resolve")
        .expect("profile by email");
    let traits = store.traits(WORKSPACE, &p).await.expect("traits");
    assert_eq!(traits["plan"].value, "pro", "the later identify wins");
    assert_eq!(traits["name"].value, "Ann");
    let meta = store.metadata(WORKSPACE, &p).await.expect("metadata");
    assert_eq!(
        meta.counts["Order Completed"], 2,
        "alias merged legacy-7's order"
    );
    assert_eq!(meta.first_seen, T0 + 1_000_000);
}

/// Checks every profile reachable from `ids` against the model.
pub async fn assert_matches_model(
    store: &dyn ProfileStore,
    model: &ProfileModel,
    ids: &[Identifier],
) {
    assert_matches_model_in(store, model, WORKSPACE, ids).await;
}

/// Checks every profile reachable from `ids` in workspace `ws` against the
/// model of that workspace.
pub async fn assert_matches_model_in(
    store: &dyn ProfileStore,
    model: &ProfileModel,
    ws: &str,
    ids: &[Identifier],
) {
    for id in ids {
        let want = model.profile(id).expect("model knows the id");
        let got = store
            .resolve(ws, id)
            .await
            .expect("resolve")
            .expect("store knows the id");
        assert_eq!(got.holder, want.holder, "holder of {id}");
        assert_eq!(
            got.profile_id,
            trailmark_domain::identity::profile_id(ws, &want.holder),
            "profile id of {id}"
        );
        assert_eq!(
            store
                .identifier_of(ws, got.profile_id)
                .await
                .expect("identifier_of"),
            Some(got.holder.clone()),
            "the profile id of {id} finds its holder"
        );
        assert_eq!(got.identifiers, want.identifiers, "identifiers of {id}");
        assert_eq!(
            Some(got.decisions.clone()),
            model.decisions(id),
            "identity decisions about {id}"
        );
        let traits = store.traits(ws, &got).await.expect("traits");
        assert_eq!(traits, want.traits, "traits of {id}");
        let meta = store.metadata(ws, &got).await.expect("metadata");
        assert_eq!(meta.counts, want.counts, "counts of {id}");
        assert_eq!(
            (meta.first_seen, meta.last_seen),
            (want.first_seen, want.last_seen),
            "seen times of {id}"
        );
        let page = store
            .timeline(
                ws,
                &got,
                &TimelineQuery {
                    limit: 1_000,
                    ..TimelineQuery::default()
                },
            )
            .await
            .expect("timeline");
        let got_ids: Vec<_> = page.entries.iter().map(|e| e.message_id.clone()).collect();
        let want_ids: Vec<_> = model
            .timeline(id)
            .iter()
            .map(|e| e.message_id.clone())
            .collect();
        assert_eq!(got_ids, want_ids, "timeline of {id}");
        let (got, want) = if id.kind == IdKind::GroupId {
            (
                all_memberships(store, ws, id, true).await,
                model.account_members(id),
            )
        } else {
            (
                all_memberships(store, ws, id, false).await,
                model.member_accounts(id),
            )
        };
        assert_eq!(got, want, "memberships of {id}");
    }
}

/// Every membership of `id` (as an account, or as a member), read two at a
/// time so that paging is exercised.
async fn all_memberships(
    store: &dyn ProfileStore,
    ws: &str,
    id: &Identifier,
    account: bool,
) -> BTreeMap<Identifier, trailmark_domain::profile::Named> {
    let mut out = BTreeMap::new();
    let mut after: Option<Identifier> = None;
    loop {
        let page = if account {
            store.account_members(ws, id, after.as_ref(), 2).await
        } else {
            store.member_accounts(ws, id, after.as_ref(), 2).await
        }
        .expect("memberships");
        let n = page.len();
        after = page.last().map(|(i, _)| i.clone());
        for (other, named) in page {
            assert!(
                out.insert(other, named).is_none(),
                "a page repeats a membership"
            );
        }
        if n < 2 {
            return out;
        }
    }
}

/// Replaying a batch twice changes nothing, and the checkpoint is stored with it.
pub async fn replaying_a_batch_changes_nothing(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let events = scenario();
    store
        .apply(batch(3, 42 - events.len() as u64, events.clone()))
        .await
        .expect("apply");
    let before = snapshot(&*store).await;
    let again = store
        .apply(batch(3, 42 - events.len() as u64, events.clone()))
        .await
        .expect("apply again");
    assert_eq!(again.applied, 0);
    assert_eq!(again.duplicates, events.len());
    assert_eq!(snapshot(&*store).await, before);
    let cps = store.checkpoints("projector").await.expect("checkpoints");
    assert_eq!(cps.get(&3), Some(&42));
    assert!(
        store
            .checkpoints("other")
            .await
            .expect("checkpoints")
            .is_empty()
    );
}

async fn snapshot(store: &dyn ProfileStore) -> Vec<String> {
    let mut out = Vec::new();
    for id in [user("u1"), user("u2"), anon("a1")] {
        let p = store
            .resolve(WORKSPACE, &id)
            .await
            .expect("resolve")
            .expect("profile");
        out.push(format!("{p:?}"));
        out.push(format!(
            "{:?}",
            store.traits(WORKSPACE, &p).await.expect("traits")
        ));
        out.push(format!(
            "{:?}",
            store.metadata(WORKSPACE, &p).await.expect("meta")
        ));
        let page = store
            .timeline(
                WORKSPACE,
                &p,
                &TimelineQuery {
                    limit: 1_000,
                    ..Default::default()
                },
            )
            .await
            .expect("timeline");
        out.extend(
            page.entries
                .iter()
                .map(|e| format!("{} {} {}", e.time, e.message_id, e.json)),
        );
    }
    out
}

/// Applying the same events in another order, split in other batches, gives
/// the same projections.
pub async fn order_of_batches_does_not_matter(factory: &impl StoreFactory, at: &Path) {
    let (a, _) = factory(&at.join("a"));
    let (b, _) = factory(&at.join("b"));
    let events = scenario();
    a.apply(batch(0, 1, events.clone())).await.expect("apply");
    let mut reversed = events.clone();
    reversed.reverse();
    for (i, chunk) in reversed.chunks(3).enumerate() {
        b.apply(batch(i as u32 % 2, 3 * i as u64, chunk.to_vec()))
            .await
            .expect("apply");
    }
    assert_eq!(snapshot(&*a).await, snapshot(&*b).await);
}

/// Timelines page with a cursor in both directions, across identifiers,
/// within a time range and filtered by event name.
pub async fn timelines_page_across_identifiers(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let mut events = Vec::new();
    for i in 0..25 {
        // Alternate identifiers of one person, over many days.
        let b = if i % 2 == 0 {
            EventBuilder::track("Tick").user("pager")
        } else {
            EventBuilder::page("Page").anon("pager-anon")
        };
        events.push(b.at(i * 86_400).build());
    }
    events.push(
        EventBuilder::identify(json!({}))
            .user("pager")
            .anon("pager-anon")
            .at(1)
            .build(),
    );
    store.apply(batch(0, 1, events)).await.expect("apply");
    let p = store
        .resolve(WORKSPACE, &user("pager"))
        .await
        .expect("resolve")
        .expect("profile");
    for descending in [false, true] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .timeline(
                    WORKSPACE,
                    &p,
                    &TimelineQuery {
                        limit: 4,
                        descending,
                        after: after.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("timeline");
            assert!(page.entries.len() <= 4);
            seen.extend(page.entries.iter().map(|e| e.time));
            let last = page.entries.last().map(|e| (e.time, e.message_id.clone()));
            if !page.has_more {
                break;
            }
            after = last;
        }
        assert_eq!(
            seen.len(),
            26,
            "every event once (descending: {descending})"
        );
        let mut sorted = seen.clone();
        sorted.sort();
        if descending {
            sorted.reverse();
        }
        assert_eq!(seen, sorted);
    }
    let ranged = store
        .timeline(
            WORKSPACE,
            &p,
            &TimelineQuery {
                start: Some(T0 + 2 * 86_400 * 1_000_000),
                end: Some(T0 + 6 * 86_400 * 1_000_000),
                event: Some("Tick".into()),
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .expect("timeline");
    let days: Vec<i64> = ranged
        .entries
        .iter()
        .map(|e| (e.time - T0) / 86_400_000_000)
        .collect();
    assert_eq!(
        days,
        vec![2, 4],
        "start inclusive, end exclusive, only Tick"
    );
}

/// Timelines page across long, uneven stretches of time (stores that split
/// timelines into time buckets must page across the bucket boundaries):
/// dense days, empty months, two identifiers, both directions, and a time
/// range that starts and ends inside a busy stretch.
pub async fn timelines_page_across_time_buckets(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let hour = 3_600;
    let mut events = Vec::new();
    let mut offsets = Vec::new();
    // Busy days, quiet days, and two gaps of several months.
    for day in [0i64, 1, 2, 9, 10, 40, 41, 200, 201, 202, 420] {
        for h in 0..(1 + day % 4) {
            offsets.push(day * 24 * hour + h * hour);
        }
    }
    for (i, at) in offsets.iter().enumerate() {
        let b = if i % 3 == 0 {
            EventBuilder::track("Tick").anon("bucket-anon")
        } else {
            EventBuilder::track("Tick").user("bucket-user")
        };
        events.push(b.at(*at).build());
    }
    events.push(
        EventBuilder::alias("bucket-user", "bucket-anon")
            .at(5)
            .build(),
    );
    store.apply(batch(0, 0, events)).await.expect("apply");
    let p = store
        .resolve(WORKSPACE, &user("bucket-user"))
        .await
        .expect("resolve")
        .expect("profile");
    let total = offsets.len() + 1;
    let (start, end) = (T0 + 9 * 86_400_000_000, T0 + 201 * 86_400_000_000 + 1);
    for (range, limit) in [(None, 4usize), (None, 1), (Some((start, end)), 3)] {
        for descending in [false, true] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = store
                    .timeline(
                        WORKSPACE,
                        &p,
                        &TimelineQuery {
                            start: range.map(|r| r.0),
                            end: range.map(|r| r.1),
                            limit,
                            descending,
                            after: after.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("timeline");
                assert!(page.entries.len() <= limit);
                seen.extend(page.entries.iter().map(|e| (e.time, e.message_id.clone())));
                if !page.has_more {
                    break;
                }
                after = page.entries.last().map(|e| (e.time, e.message_id.clone()));
            }
            let mut expected = seen.clone();
            expected.sort();
            expected.dedup();
            if descending {
                expected.reverse();
            }
            assert_eq!(
                seen, expected,
                "ordered, each once ({range:?}, {descending})"
            );
            let want = match range {
                None => total,
                Some((s, e)) => offsets
                    .iter()
                    .filter(|o| (s..e).contains(&(T0 + **o * 1_000_000)))
                    .count(),
            };
            assert_eq!(seen.len(), want, "every event ({range:?}, {descending})");
        }
    }
}

/// Workspaces never see each other's data.
pub async fn workspaces_are_isolated(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let a = EventBuilder::identify(json!({"plan": "a"}))
        .user("same")
        .workspace("ws_a")
        .build();
    let b = EventBuilder::identify(json!({"plan": "b"}))
        .user("same")
        .workspace("ws_b")
        .build();
    store.apply(batch(0, 1, vec![a, b])).await.expect("apply");
    for (ws, plan) in [("ws_a", "a"), ("ws_b", "b")] {
        let p = store
            .resolve(ws, &user("same"))
            .await
            .expect("resolve")
            .expect("profile");
        let traits = store.traits(ws, &p).await.expect("traits");
        assert_eq!(traits["plan"].value, plan);
        let page = store
            .timeline(
                ws,
                &p,
                &TimelineQuery {
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .expect("timeline");
        assert_eq!(page.entries.len(), 1);
    }
    assert!(
        store
            .resolve("ws_c", &user("same"))
            .await
            .expect("resolve")
            .is_none()
    );
}

/// A duplicate outside the window counts again; inside, it does not.
pub async fn dedup_window_is_respected(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let first = EventBuilder::track("Ping")
        .user("w")
        .message_id("m-w")
        .at(0)
        .build();
    let mut retry = first.clone();
    retry.received_at += DAY / 2;
    let mut much_later = first.clone();
    much_later.received_at += 3 * DAY;
    store
        .apply(batch(0, 1, vec![first, retry]))
        .await
        .expect("apply");
    let p = store
        .resolve(WORKSPACE, &user("w"))
        .await
        .expect("resolve")
        .expect("profile");
    assert_eq!(
        store.metadata(WORKSPACE, &p).await.expect("meta").counts["Ping"],
        1
    );
    let out = store
        .apply(batch(0, 3, vec![much_later]))
        .await
        .expect("apply");
    assert_eq!(out.applied, 1);
    assert_eq!(
        store.metadata(WORKSPACE, &p).await.expect("meta").counts["Ping"],
        2
    );
}

/// De-duplication is per consumer: a second consumer of the log (the
/// audience evaluator) sees every message once itself, whatever the first
/// consumer saw or purged.
pub async fn dedup_is_per_consumer(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let first = EventBuilder::track("Ping")
        .user("c")
        .message_id("m-c")
        .at(0)
        .build();
    let mut retry = first.clone();
    retry.received_at += DAY / 2;
    let as_consumer = |consumer: &str, b: Arc<ApplyBatch>| {
        let mut b = (*b).clone();
        b.consumer = consumer.into();
        Arc::new(b)
    };
    let out = store
        .apply(batch(0, 0, vec![first.clone()]))
        .await
        .expect("apply");
    assert_eq!(out.applied, 1);
    // Another consumer applies the same message: new to it.
    let out = store
        .apply(as_consumer("evaluator", batch(0, 0, vec![first])))
        .await
        .expect("apply");
    assert_eq!(
        out,
        ApplyOutcome {
            applied: 1,
            duplicates: 0
        }
    );
    // The projector, far ahead, purges what it saw three days back.
    let mut later = EventBuilder::track("Ping")
        .user("c")
        .message_id("m-later")
        .at(0)
        .build();
    later.received_at += 3 * DAY;
    store.apply(batch(0, 1, vec![later])).await.expect("apply");
    // Its own retry, within its window, is a duplicate to it, although the
    // projector's row for the message is long purged.
    let out = store
        .apply(as_consumer("evaluator", batch(0, 1, vec![retry])))
        .await
        .expect("apply");
    assert_eq!(
        out,
        ApplyOutcome {
            applied: 0,
            duplicates: 1
        }
    );
}

/// The evaluator's rows: gets, scans bounded on either side and kept
/// within their part and table, deletes, and a commit's de-duplication rows
/// and checkpoint; a commit written twice ends the same.
pub async fn evaluator_rows(factory: &impl StoreFactory, at: &Path) {
    use crate::evaluator::{EvalCommit, EvalKey, EvalTable, EvalWrite};
    let (store, _) = factory(at);
    let key = |part: &str, sort: &str| EvalKey::new(part.as_bytes(), sort.as_bytes());
    let put = |t, part: &str, sort: &str, v: &str| {
        EvalWrite::Put(t, key(part, sort), v.as_bytes().to_vec())
    };
    let commit = Arc::new(EvalCommit {
        consumer: "evaluator".into(),
        rows: vec![put(EvalTable::Leaves, "ws/x", "s1", "leaf")],
        groups: vec![
            vec![
                put(EvalTable::Members, "ws/a", "p1", "1"),
                put(EvalTable::Members, "ws/a", "p2", "2"),
                put(EvalTable::Members, "ws/a", "p3", "3"),
                put(EvalTable::Members, "ws/a", "p4", "4"),
            ],
            vec![
                // Another part, and another table with the same part.
                put(EvalTable::Members, "ws/a2", "p0", "x"),
                put(EvalTable::Profiles, "ws/a", "p1", "y"),
                EvalWrite::Delete(EvalTable::Members, key("ws/a", "p4")),
            ],
        ],
        seen: vec![(3, WORKSPACE.into(), "m-e".into(), T0)],
        dedup_window_micros: DAY,
        positions: vec![(3, 17)],
    });
    for _ in 0..2 {
        store.eval_commit(commit.clone()).await.expect("commit");
    }
    let scan = |after: Option<&'static str>, before: Option<&'static str>, limit| {
        let store = store.clone();
        async move {
            store
                .eval_scan(
                    EvalTable::Members,
                    b"ws/a",
                    after.map(str::as_bytes),
                    before.map(str::as_bytes),
                    limit,
                )
                .await
                .expect("scan")
                .into_iter()
                .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
                .collect::<Vec<_>>()
        }
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    };
    assert_eq!(
        scan(None, None, 10).await,
        pairs(&[("p1", "1"), ("p2", "2"), ("p3", "3")])
    );
    assert_eq!(
        scan(Some("p1"), None, 10).await,
        pairs(&[("p2", "2"), ("p3", "3")])
    );
    assert_eq!(
        scan(None, Some("p3"), 10).await,
        pairs(&[("p1", "1"), ("p2", "2")])
    );
    assert_eq!(
        scan(Some("p1"), Some("p3"), 10).await,
        pairs(&[("p2", "2")])
    );
    assert_eq!(
        scan(None, None, 2).await,
        pairs(&[("p1", "1"), ("p2", "2")])
    );
    // Many parts at once, in the order asked, each within its own part
    // and table ("ws/a" is a prefix of "ws/a2", and a part of Profiles too).
    let parts = store
        .eval_parts(
            EvalTable::Members,
            vec![b"ws/a2".to_vec(), b"ws/none".to_vec(), b"ws/a".to_vec()],
            2,
        )
        .await
        .expect("parts");
    let text = |rows: &[(Vec<u8>, Vec<u8>)]| -> Vec<(String, String)> {
        rows.iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k.clone()).unwrap(),
                    String::from_utf8(v.clone()).unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        parts.iter().map(|p| text(p)).collect::<Vec<_>>(),
        vec![
            pairs(&[("p0", "x")]),
            vec![],
            pairs(&[("p1", "1"), ("p2", "2")])
        ]
    );
    let got = store
        .eval_get(
            EvalTable::Profiles,
            vec![key("ws/a", "p1"), key("ws/a", "p2")],
        )
        .await
        .expect("get");
    assert_eq!(got, vec![(key("ws/a", "p1"), b"y".to_vec())]);
    let leaf = store
        .eval_get(EvalTable::Leaves, vec![key("ws/x", "s1")])
        .await
        .expect("get");
    assert_eq!(leaf, vec![(key("ws/x", "s1"), b"leaf".to_vec())]);
    let seen = store
        .eval_seen(
            "evaluator",
            vec![
                (WORKSPACE.into(), "m-e".into()),
                (WORKSPACE.into(), "m-other".into()),
            ],
        )
        .await
        .expect("seen");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![((WORKSPACE.into(), "m-e".into()), T0)]
    );
    // Seen by the evaluator, not by the projector.
    assert!(
        store
            .eval_seen("projector", vec![(WORKSPACE.into(), "m-e".into())])
            .await
            .expect("seen")
            .is_empty()
    );
    assert_eq!(
        store.checkpoints("evaluator").await.expect("checkpoints"),
        BTreeMap::from([(3, 17)])
    );
    // A rebuild empties them.
    store.reset_projections().await.expect("reset");
    assert!(scan(None, None, 10).await.is_empty());
}

/// Settings read back by prefix, per workspace, and removed.
pub async fn settings_by_prefix(factory: &impl StoreFactory, at: &Path) {
    let (store, dir) = factory(at);
    let a = dir.create_workspace("a", None, None).await.expect("a");
    let b = dir.create_workspace("b", None, None).await.expect("b");
    let (a, b) = (a.workspace.id, b.workspace.id);
    for (ws, name, v) in [
        (&a, "audience/2", "two"),
        (&a, "audience/1", "one"),
        (&a, "audiencez", "not one"),
        (&a, "computed_trait/1", "ct"),
        (&b, "audience/9", "theirs"),
    ] {
        dir.put_setting(ws, name, Some(v)).await.expect("put");
    }
    let got = dir.settings(&a, "audience/").await.expect("settings");
    assert_eq!(
        got,
        vec![
            ("audience/1".to_owned(), "one".to_owned()),
            ("audience/2".to_owned(), "two".to_owned())
        ]
    );
    dir.put_setting(&a, "audience/1", None)
        .await
        .expect("delete");
    assert_eq!(
        dir.settings(&a, "audience/").await.expect("settings").len(),
        1
    );
    assert_eq!(
        dir.settings(&b, "audience/").await.expect("settings").len(),
        1
    );
    // Settings survive a rebuild.
    store.reset_projections().await.expect("reset");
    assert_eq!(dir.settings(&a, "").await.expect("settings").len(), 3);
}

/// Resetting projections empties them and keeps workspaces; re-applying gives
/// the same projections as before.
pub async fn reset_and_rebuild_is_identical(factory: &impl StoreFactory, at: &Path) {
    let (store, dir) = factory(at);
    let created = dir
        .create_workspace("keep me", None, None)
        .await
        .expect("create");
    let events = scenario();
    store
        .apply(batch(0, 9, events.clone()))
        .await
        .expect("apply");
    let before = snapshot(&*store).await;
    store.reset_projections().await.expect("reset");
    assert!(
        store
            .resolve(WORKSPACE, &user("u1"))
            .await
            .expect("resolve")
            .is_none()
    );
    assert!(
        store
            .checkpoints("projector")
            .await
            .expect("checkpoints")
            .is_empty()
    );
    assert!(
        dir.resolve_write_key(&created.write_key)
            .await
            .expect("key")
            .is_some()
    );
    store.apply(batch(0, 9, events)).await.expect("apply");
    assert_eq!(snapshot(&*store).await, before);
}

/// Workspaces and credentials: write keys and tokens resolve to their
/// workspace, and only to it; given credentials are kept.
pub async fn workspace_credentials(factory: &impl StoreFactory, at: &Path) {
    let (_, dir) = factory(at);
    let one = dir
        .create_workspace("one", None, None)
        .await
        .expect("create");
    let two = dir
        .create_workspace("two", Some("wk_scripted"), Some("tmk_scripted"))
        .await
        .expect("create");
    assert_eq!(two.write_key, "wk_scripted");
    let g = dir
        .resolve_write_key("wk_scripted")
        .await
        .expect("key")
        .expect("grant");
    assert_eq!(g.workspace_id, two.workspace.id);
    assert_eq!(g.source_id, two.source_id);
    let r = dir
        .resolve_token(&one.token)
        .await
        .expect("token")
        .expect("grant");
    assert_eq!(r.workspace_id, one.workspace.id);
    assert!(
        dir.resolve_token(&one.write_key)
            .await
            .expect("token")
            .is_none()
    );
    assert!(
        dir.resolve_write_key(&one.token)
            .await
            .expect("key")
            .is_none()
    );
    assert!(
        dir.resolve_token("tmk_nope")
            .await
            .expect("token")
            .is_none()
    );
    assert!(
        dir.create_workspace("dup", Some("wk_scripted"), None)
            .await
            .is_err()
    );
    // Names are unique too: two workspaces called alike would be told
    // apart by nobody.
    assert!(matches!(
        dir.create_workspace("one", None, None).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(dir.workspaces().await.expect("list").len(), 2);

    // The token a workspace comes with administers it; others only read.
    assert_eq!(r.scope, crate::Scope::Admin);
    let read = dir
        .create_read_token(&one.workspace.id)
        .await
        .expect("read token");
    let g = dir
        .resolve_token(&read)
        .await
        .expect("token")
        .expect("grant");
    assert_eq!(
        (g.workspace_id.as_str(), g.scope),
        (one.workspace.id.as_str(), crate::Scope::Read)
    );

    // Identity rules: none until set, then per workspace.
    assert_eq!(
        dir.identity_rules(&one.workspace.id).await.expect("rules"),
        None
    );
    let mut settings = trailmark_domain::identity::RuleSettings::default();
    settings.limits.insert("user_id".into(), "2 ever".into());
    dir.set_identity_rules(&one.workspace.id, &settings)
        .await
        .expect("set rules");
    assert_eq!(
        dir.identity_rules(&one.workspace.id).await.expect("rules"),
        Some(settings)
    );
    assert_eq!(
        dir.identity_rules(&two.workspace.id).await.expect("rules"),
        None
    );
}

/// `anon`'s event linking `n` new device ids named after `tag`.
fn linking(anon_id: &str, tag: &str, n: usize, at: i64) -> Event {
    let ids: Vec<_> = (0..n)
        .map(|j| json!({"type": "device_id", "id": format!("{tag}-{j}")}))
        .collect();
    EventBuilder::track("Linked")
        .anon(anon_id)
        .at(at)
        .context(json!({ "externalIds": ids }))
        .build()
}

/// The events that link `anon` with `total - 1` other identifiers.
fn component(anon_id: &str, total: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut left = total - 1;
    while left > 0 {
        let n = left.min(MAX_EXTERNAL_IDS);
        out.push(linking(
            anon_id,
            &format!("{anon_id}{}", out.len()),
            n,
            out.len() as i64,
        ));
        left -= n;
    }
    out
}

/// A component larger than [`MAX_PROFILE_IDENTIFIERS`] is not merged: each
/// of its identifiers stands alone, whatever order the links came in, and
/// one of exactly the limit is one profile. The store agrees with the model.
pub async fn oversized_profiles_stand_alone(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let fits = component("fits", MAX_PROFILE_IDENTIFIERS);
    let mut too_big = component("big", MAX_PROFILE_IDENTIFIERS + 1);
    // The link that crosses the limit is neither first nor last.
    let half = too_big.len() / 2;
    too_big.rotate_left(half);
    let mut model = ProfileModel::new(DAY);
    let mut position = 0;
    for chunk in fits.chunks(7).chain(too_big.chunks(7)) {
        for e in chunk {
            model.apply(e).expect("foldable");
        }
        store
            .apply(batch(0, position, chunk.to_vec()))
            .await
            .expect("apply");
        position += chunk.len() as u64;
    }
    let device = |s: &str| Identifier::new(IdKind::External("device_id".into()), s);
    let fit = store
        .resolve(WORKSPACE, &anon("fits"))
        .await
        .unwrap()
        .unwrap();
    // A component within the bound is decided by the rules (device ids are
    // limited to 5 by default), not left alone.
    let merged = model.members(&anon("fits")).expect("named");
    assert!(merged.len() > 1, "{merged:?}");
    assert_eq!(fit.identifiers.len(), merged.len());
    let big = store
        .resolve(WORKSPACE, &anon("big"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        big.identifiers.len(),
        1,
        "an oversized profile is not merged"
    );
    let one = store
        .resolve(WORKSPACE, &device("big0-3"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        one.identifiers.keys().collect::<Vec<_>>(),
        [&device("big0-3")]
    );
    assert_matches_model(
        &*store,
        &model,
        &[
            anon("fits"),
            device("fits3-7"),
            anon("big"),
            device("big5-1"),
        ],
    )
    .await;
}

/// An event the fold cannot read is refused whole, as a permanent error
/// the projector dead-letters, and changes nothing; the rest still apply.
pub async fn unfoldable_events_are_refused_whole(factory: &impl StoreFactory, at: &Path) {
    let (store, _) = factory(at);
    let good = EventBuilder::track("Fine").anon("ok").at(1).build();
    let crafted = EventBuilder::track("Crafted")
        .anon("bad")
        .at(2)
        .context(json!({"externalIds": [{"type": "user_id\u{0}alice", "id": "X"}]}))
        .build();
    let mut deep = EventBuilder::identify(json!({})).user("deep").at(3).build();
    deep.traits = Some(format!(
        "{}{}",
        "{\"a\":".repeat(200),
        "1".to_owned() + &"}".repeat(200)
    ));
    for bad in [crafted, deep] {
        let err = store
            .apply(batch(0, 0, vec![good.clone(), bad]))
            .await
            .expect_err("refused");
        assert!(matches!(err, StoreError::Unfoldable(_)), "{err}");
        assert!(!err.is_retryable());
    }
    for id in [anon("ok"), anon("bad"), user("deep"), user("alice")] {
        assert!(
            store.resolve(WORKSPACE, &id).await.unwrap().is_none(),
            "{id}"
        );
    }
    store.apply(batch(0, 0, vec![good])).await.expect("apply");
    assert!(
        store
            .resolve(WORKSPACE, &anon("ok"))
            .await
            .unwrap()
            .is_some()
    );
}

/// Generates the conformance tests for a store, given a factory expression of
/// type `Fn(&Path) -> (Arc<dyn ProfileStore>, Arc<dyn WorkspaceDirectory>)`.
#[macro_export]
macro_rules! store_conformance {
    ($factory:expr) => {
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;
            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let dir = tempfile::tempdir().expect("tempdir");
                        $crate::conformance::$name(&$factory, dir.path()).await;
                    }
                };
            }
            case!(folds_like_the_model);
            case!(replaying_a_batch_changes_nothing);
            case!(order_of_batches_does_not_matter);
            case!(timelines_page_across_identifiers);
            case!(timelines_page_across_time_buckets);
            case!(workspaces_are_isolated);
            case!(dedup_window_is_respected);
            case!(dedup_is_per_consumer);
            case!(evaluator_rows);
            case!(settings_by_prefix);
            case!(reset_and_rebuild_is_identical);
            case!(workspace_credentials);
            case!(oversized_profiles_stand_alone);
            case!(unfoldable_events_are_refused_whole);
            case!(generated_streams_fold_like_the_model);
        }
    };
}
