//! The conformance suite every [`EventLog`] backend must pass.
//!
//! Each check takes a factory that opens the backend at a location (a
//! directory for the file log; a Kafka backend derives its topic from it), so
//! that "reopen" means "open the same log again". Generate the tests for a
//! backend with [`event_log_conformance!`](crate::event_log_conformance).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::{DeadLetter, Delivery, EventLog, FromEarliest, Record, Result, StartPositions};

/// Opens a log at a location.
pub trait LogFactory: Fn(&Path) -> Result<Arc<dyn EventLog>> {}
impl<F: Fn(&Path) -> Result<Arc<dyn EventLog>>> LogFactory for F {}

fn record(key: &str, n: usize) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        payload: format!("{key}:{n}").into_bytes(),
    }
}

/// Reads until `expected` records arrived or `patience` ran out.
pub async fn drain(
    log: &dyn EventLog,
    start: Arc<dyn StartPositions>,
    expected: usize,
    patience: Duration,
) -> Vec<Delivery> {
    let mut sub = log
        .subscribe("conformance", start)
        .await
        .expect("subscribe");
    let deadline = tokio::time::Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < expected && tokio::time::Instant::now() < deadline {
        out.extend(
            sub.poll(500, Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    out
}

fn by_key(deliveries: &[Delivery]) -> BTreeMap<String, Vec<usize>> {
    let mut map: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for d in deliveries {
        let text = String::from_utf8(d.payload.to_vec()).expect("utf8 payload");
        let (key, n) = text.rsplit_once(':').expect("key:n");
        map.entry(key.to_owned())
            .or_default()
            .push(n.parse().expect("n"));
    }
    map
}

/// Records of one key come back in append order, each exactly once.
pub async fn appends_are_read_back_in_key_order(factory: &impl LogFactory, at: &Path) {
    let log = factory(at).expect("open");
    let keys = ["alice", "bob", "carol", "dave", "erin"];
    for round in 0..20 {
        let batch = keys.iter().map(|k| record(k, round)).collect();
        let appended = log.append(batch).await.expect("append");
        assert_eq!(appended.len(), keys.len());
    }
    let got = drain(&*log, Arc::new(FromEarliest), 100, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 100, "every record is read once");
    for (key, ns) in by_key(&got) {
        assert_eq!(
            ns,
            (0..20).collect::<Vec<_>>(),
            "records of {key} keep their order"
        );
    }
}

/// A consumer that starts from the positions after what it applied sees only
/// the rest.
pub async fn resumes_from_a_position(factory: &impl LogFactory, at: &Path) {
    struct After(BTreeMap<u32, u64>);
    #[async_trait::async_trait]
    impl StartPositions for After {
        async fn start_position(&self, partition: u32) -> Result<Option<u64>> {
            Ok(self.0.get(&partition).copied())
        }
    }
    let log = factory(at).expect("open");
    for n in 0..10 {
        log.append(vec![record("k1", n), record("k2", n)])
            .await
            .expect("append");
    }
    let first = drain(&*log, Arc::new(FromEarliest), 20, Duration::from_secs(20)).await;
    assert_eq!(first.len(), 20);
    let mut checkpoint = BTreeMap::new();
    for d in &first {
        checkpoint.insert(d.partition, d.next_position);
    }
    for n in 10..15 {
        log.append(vec![record("k1", n), record("k2", n)])
            .await
            .expect("append");
    }
    let rest = drain(
        &*log,
        Arc::new(After(checkpoint)),
        10,
        Duration::from_secs(20),
    )
    .await;
    let rest = by_key(&rest);
    assert_eq!(rest["k1"], (10..15).collect::<Vec<_>>());
    assert_eq!(rest["k2"], (10..15).collect::<Vec<_>>());
}

/// Many concurrent appenders: every acknowledged record is there exactly once.
pub async fn concurrent_appends_all_land_once(factory: &impl LogFactory, at: &Path) {
    let log = factory(at).expect("open");
    let mut tasks = Vec::new();
    for t in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..25 {
                log.append(vec![record(&format!("writer-{t}"), n)])
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender");
    }
    let got = drain(&*log, Arc::new(FromEarliest), 400, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 400);
    let positions: HashSet<_> = got.iter().map(|d| (d.partition, d.position)).collect();
    assert_eq!(positions.len(), 400, "positions are unique");
    for (_, ns) in by_key(&got) {
        assert_eq!(ns, (0..25).collect::<Vec<_>>());
    }
}

/// What was acknowledged survives reopening the log.
pub async fn reopen_keeps_everything(factory: &impl LogFactory, at: &Path) {
    {
        let log = factory(at).expect("open");
        log.append((0..50).map(|n| record("durable", n)).collect())
            .await
            .expect("append");
    }
    let log = factory(at).expect("reopen");
    let got = drain(&*log, Arc::new(FromEarliest), 50, Duration::from_secs(20)).await;
    assert_eq!(by_key(&got)["durable"], (0..50).collect::<Vec<_>>());
}

/// End positions move past appended records, and a poll with nothing new
/// returns empty after waiting.
pub async fn end_positions_track_appends(factory: &impl LogFactory, at: &Path) {
    let log = factory(at).expect("open");
    let before = log.end_positions().await.expect("ends");
    assert_eq!(before.len(), log.partitions() as usize);
    let appended = log.append(vec![record("x", 0)]).await.expect("append");
    let after = log.end_positions().await.expect("ends");
    let p = appended[0].partition as usize;
    assert!(after[p] > appended[0].position);
    log.check_ready().await.expect("ready");
    let mut sub = log
        .subscribe("conformance-idle", Arc::new(FromEarliest))
        .await
        .expect("subscribe");
    let mut seen = 0;
    for _ in 0..50 {
        seen += sub
            .poll(10, Duration::from_millis(100))
            .await
            .expect("poll")
            .len();
        if seen == 1 {
            break;
        }
    }
    assert_eq!(seen, 1);
    let idle = sub.poll(10, Duration::from_millis(50)).await.expect("poll");
    assert!(idle.is_empty());
}

/// Committed consumer positions are kept per group, merged per partition,
/// and survive reopening.
pub async fn consumer_positions_are_kept(factory: &impl LogFactory, at: &Path) {
    {
        let log = factory(at).expect("open");
        let appended = log
            .append(vec![record("a", 0), record("b", 0)])
            .await
            .expect("append");
        assert!(
            log.committed_positions("g1")
                .await
                .expect("committed")
                .is_empty()
        );
        let first = (appended[0].partition, appended[0].position);
        log.commit_positions("g1", &[first]).await.expect("commit");
        log.commit_positions("g2", &[(first.0, 0)])
            .await
            .expect("commit");
        let second = (appended[1].partition, appended[1].position);
        log.commit_positions("g1", &[second]).await.expect("commit");
    }
    let log = factory(at).expect("reopen");
    let g1 = log.committed_positions("g1").await.expect("committed");
    assert!(!g1.is_empty());
    assert!(g1.len() <= 2);
    let g2 = log.committed_positions("g2").await.expect("committed");
    assert_eq!(
        g2.values().copied().collect::<Vec<_>>(),
        vec![0],
        "groups are separate"
    );
}

/// Dead letters keep their origin and error, and are read back in order from
/// any position.
pub async fn dead_letters_keep_their_origin(factory: &impl LogFactory, at: &Path) {
    let log = factory(at).expect("open");
    let letter = |n: u64| DeadLetter {
        source: "events".into(),
        partition: 2,
        position: 40 + n,
        error: format!("cannot decode record {n}"),
        payload: bytes::Bytes::from(format!("payload-{n}")),
    };
    assert!(log.dead_letters(0, 10).await.expect("read").is_empty());
    log.dead_letter(vec![letter(0), letter(1)])
        .await
        .expect("dead letter");
    log.dead_letter(vec![letter(2)]).await.expect("dead letter");
    let all = log.dead_letters(0, 10).await.expect("read");
    assert_eq!(
        all.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>(),
        vec![letter(0), letter(1), letter(2)]
    );
    let from_second = log.dead_letters(all[1].0, 10).await.expect("read");
    assert_eq!(from_second.len(), 2);
    assert_eq!(from_second[0].1, letter(1));
    assert_eq!(log.dead_letters(all[0].0, 1).await.expect("read").len(), 1);
}

/// Generates the conformance tests for a backend, given a factory expression
/// of type `Fn(&Path) -> Result<Arc<dyn EventLog>>`.
#[macro_export]
macro_rules! event_log_conformance {
    ($factory:expr) => {
        mod event_log_conformance {
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
            case!(appends_are_read_back_in_key_order);
            case!(resumes_from_a_position);
            case!(concurrent_appends_all_land_once);
            case!(reopen_keeps_everything);
            case!(end_positions_track_appends);
            case!(consumer_positions_are_kept);
            case!(dead_letters_keep_their_origin);
        }
    };
}
