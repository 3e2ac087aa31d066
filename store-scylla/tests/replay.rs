//! The replay path the conformance suite cannot reach: a projector that died
//! after writing a batch's effects but before marking its messages applied.
//! Replaying the batch must re-write the same facts and count nothing twice.
//! Needs Cassandra (`deploy/local/engines up`).

use trailmark_store::conformance::scenario;
use trailmark_store::{ApplyBatch, LoggedEvent, ProfileReader, ProfileWriter, TimelineQuery};
use trailmark_store_scylla::{ScyllaConfig, ScyllaStore};
use trailmark_testkit::WORKSPACE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_short_is_replayed_without_double_counting() {
    let host =
        std::env::var("TRAILMARK_TEST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let config = ScyllaConfig::from_uri(&format!("scylla://{host}/tm_test_replay")).unwrap();
    ScyllaStore::migrate(&config).await.expect("migrate");
    let store = ScyllaStore::connect(&config).await.expect("connect");
    store.reset_projections().await.expect("reset");
    let events: Vec<LoggedEvent> = scenario()
        .into_iter()
        .enumerate()
        .map(|(i, event)| LoggedEvent {
            partition: 0,
            position: 100 + i as u64,
            event,
        })
        .collect();
    let batch = std::sync::Arc::new(ApplyBatch {
        consumer: "projector".into(),
        positions: vec![(0, 100 + events.len() as u64)],
        events,
        dedup_window_micros: 86_400_000_000,
    });
    let first = store.apply(batch.clone()).await.expect("apply");
    assert!(first.applied > 0);
    let view = |store: ScyllaStore| async move {
        let mut out = Vec::new();
        for id in ["u1", "u2"] {
            let id = trailmark_domain::Identifier::new(trailmark_domain::IdKind::UserId, id);
            let p = store.resolve(WORKSPACE, &id).await.unwrap().unwrap();
            out.push(format!(
                "{:?}",
                store.metadata(WORKSPACE, &p).await.unwrap()
            ));
            out.push(format!("{:?}", store.traits(WORKSPACE, &p).await.unwrap()));
            let page = store
                .timeline(
                    WORKSPACE,
                    &p,
                    &TimelineQuery {
                        limit: 100,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            out.push(format!("{}", page.entries.len()));
        }
        out
    };
    let before = view(store.clone()).await;
    store.forget_applied_messages_for_test().await.unwrap();
    let again = store.apply(batch).await.expect("replay");
    assert_eq!(
        again.applied, first.applied,
        "the messages look new, so their facts are written again"
    );
    assert_eq!(
        view(store.clone()).await,
        before,
        "and nothing counts twice"
    );
}
