//! Scale-out and faults on the distributed backends, with every role a
//! separate process of the built binary on a real Kafka and Cassandra
//! (`deploy/local/engines up`):
//!
//! - two projectors share the partitions, one is SIGKILLed under load, and
//!   the other takes over: every acknowledged event is there exactly once;
//! - Cassandra stops for 30 s under load: ingest keeps accepting, the query
//!   API's `/readyz` reports the outage, the projector catches up after;
//! - Kafka stops: ingest answers 503 (promptly, not 200) and recovers.
//!
//! These tests stop and start the shared engines, so they run one at a time
//! (cargo runs test binaries one after another, so no other suite sees it).

mod common;

/// Roles are separate processes on Kafka and Cassandra.
const DISTRIBUTED: bool = true;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::faults::{Restart, assert_exactly_once, engines, load, merge, warm_up};
use common::{Role, TOKEN, WRITE_KEY, prepare_distributed, read, spawn_role};
use serde_json::{Value, json};
use trailmark::config::Config;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Migrates a topic and keyspace of the test's own, then starts ingest, the
/// query API and one projector on them.
async fn three_roles(dir: &tempfile::TempDir) -> [Role; 3] {
    prepare_distributed(dir.path(), config(dir.path())).await;
    [
        spawn_role(dir.path(), "ingest", "ingest").await,
        spawn_role(dir.path(), "query-api", "query-api").await,
        spawn_role(dir.path(), "projector", "projector").await,
    ]
}

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::for_test(dir);
    config.bootstrap.write_key = Some(WRITE_KEY.into());
    config.bootstrap.token = Some(TOKEN.into());
    config
}

/// Posts one event to ingest with the write key.
async fn track(client: &reqwest::Client, ingest: &Role, event: &Value) -> reqwest::Response {
    client
        .post(format!("{}/v1/track", ingest.base))
        .basic_auth(WRITE_KEY, Some(""))
        .json(event)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_projectors_share_the_partitions_and_one_survives_a_kill() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    prepare_distributed(dir.path(), config(dir.path())).await;
    let ingest = spawn_role(dir.path(), "ingest", "ingest").await;
    let query = spawn_role(dir.path(), "query-api", "query-api").await;
    let first = spawn_role(dir.path(), "projector", "projector-1").await;
    let second = spawn_role(dir.path(), "projector", "projector-2").await;

    let mut acked = warm_up(&ingest, &first, &second).await;

    // Load from four clients; kill one projector a third of the way in.
    let mut clients = Vec::new();
    for c in 0..4 {
        clients.push(tokio::spawn(load(
            ingest.base.clone(),
            format!("c{c}"),
            10,
            30,
            20,
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.kill().await;
    for c in clients {
        merge(&mut acked, c.await.unwrap());
    }
    assert_exactly_once(&query.base, &acked, Duration::from_secs(120)).await;
    let total: usize = acked.values().sum();
    assert!(total >= 2_400 + 200, "{total} events acknowledged");
    for role in [ingest, query, first] {
        role.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cassandra_outage_delays_projections_and_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let [ingest, query, projector] = three_roles(&dir).await;
    let mut acked = load(ingest.base.clone(), "before".into(), 20, 5, 20).await;

    // Load throughout the outage, from a task that records every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (stop, base) = (stop.clone(), ingest.base.clone());
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                merge(
                    &mut acked,
                    load(base.clone(), format!("during{round}"), 20, 1, 20).await,
                );
                round += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            acked
        })
    };
    engines(&["stop", "cassandra"]);
    let restart = Restart::new(&["start", "cassandra"]);
    let client = reqwest::Client::new();
    let (status, body) = read(
        client
            .get(format!("{}/readyz", query.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503, "the query API reports the outage: {body}");
    assert_eq!(body["store"]["status"], "down");
    // Ingest stays ready: it needs only the log.
    let (status, body) = read(
        client
            .get(format!("{}/readyz", ingest.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let outage = Instant::now();
    // During the outage, every request is answered 200 promptly.
    while outage.elapsed() < Duration::from_secs(30) {
        let started = Instant::now();
        let event = json!({"type": "track", "event": "Load", "userId": "outage-u"});
        let r = track(&client, &ingest, &event).await;
        assert_eq!(
            r.status(),
            200,
            "ingest accepts into Kafka while the store is down"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        *acked.entry("outage-u".into()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(restart);
    stop.store(true, Ordering::Relaxed);
    merge(&mut acked, during.await.unwrap());
    // The projector retried with backoff and catches up.
    assert_exactly_once(&query.base, &acked, Duration::from_secs(180)).await;
    let (status, _) = read(
        client
            .get(format!("{}/readyz", query.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    for role in [ingest, query, projector] {
        role.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_outage_gets_503_not_200_and_recovers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let [ingest, query, projector] = three_roles(&dir).await;
    let mut acked = load(ingest.base.clone(), "before".into(), 5, 2, 10).await;
    let client = reqwest::Client::new();
    let event = json!({"type": "track", "event": "Load", "userId": "k-u", "messageId": "k-during"});

    engines(&["stop", "kafka"]);
    let restart = Restart::new(&["start", "kafka"]);
    let started = Instant::now();
    let r = track(&client, &ingest, &event).await;
    assert_eq!(r.status(), 503, "not acknowledged while Kafka is down");
    assert!(r.headers().get("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered promptly ({:?})",
        started.elapsed()
    );
    let (status, body) = read(
        client
            .get(format!("{}/readyz", ingest.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["log"]["status"], "down");

    drop(restart);
    // The same event, retried as an SDK would, is taken once Kafka is back.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = track(&client, &ingest, &event).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            Instant::now() < deadline,
            "ingest recovers when Kafka returns"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    *acked.entry("k-u".into()).or_default() += 1;
    merge(
        &mut acked,
        load(ingest.base.clone(), "after".into(), 5, 2, 10).await,
    );
    assert_exactly_once(&query.base, &acked, Duration::from_secs(120)).await;
    for role in [ingest, query, projector] {
        role.terminate().await;
    }
}

/// Issue 10: two projectors link the same people at the same moment. For
/// each person, three events race through different partitions (so, once
/// both projectors hold partitions, often through different projectors): a
/// device with a CRM id, the person's identify on that device, and a second
/// person's identify on the same device. Whatever projector applied what
/// first, each device ends with exactly one `user_id`, the one ingest
/// received first, and the other person stands alone with the refusal
/// explained; every identifier of a profile answers with one `profile_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_projectors_link_the_same_people_at_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    prepare_distributed(dir.path(), config(dir.path())).await;
    let ingest = spawn_role(dir.path(), "ingest", "ingest").await;
    let query = spawn_role(dir.path(), "query-api", "query-api").await;
    let first = spawn_role(dir.path(), "projector", "projector-1").await;
    let second = spawn_role(dir.path(), "projector", "projector-2").await;
    warm_up(&ingest, &first, &second).await;

    let client = reqwest::Client::new();
    let run = uuid::Uuid::now_v7().simple().to_string();
    let people = 24;
    let mut sends = Vec::new();
    for k in 0..people {
        let (device, ann, bob) = (
            format!("{run}-d{k}"),
            format!("{run}-ann{k}"),
            format!("{run}-bob{k}"),
        );
        for body in [
            json!({"anonymousId": device, "event": "Opened", "context": {"externalIds": [{"type": "crm_id", "id": format!("{run}-c{k}")}]}}),
            json!({"userId": ann, "anonymousId": device, "event": "Signed In"}),
            json!({"userId": bob, "anonymousId": device, "event": "Signed In"}),
        ] {
            let (client, base) = (client.clone(), ingest.base.clone());
            sends.push(tokio::spawn(async move {
                let r = client
                    .post(format!("{base}/v1/track"))
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200);
            }));
        }
    }
    for s in sends {
        s.await.unwrap();
    }

    let get = |path: String| {
        let (client, base) = (client.clone(), query.base.clone());
        async move {
            read(
                client
                    .get(format!("{base}{path}"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .expect("get"),
            )
            .await
        }
    };
    // The received time of a user's one event, to the millisecond.
    let received = |user: String| async move {
        let (_, body) = get(format!("/v1/profiles/user_id:{user}/events?limit=10")).await;
        body["data"]
            .as_array()
            .and_then(|events| {
                events
                    .iter()
                    .find(|e| e["user_id"] == user.as_str())
                    .map(|e| e["received_at"].as_str().unwrap_or_default().to_owned())
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    for k in 0..people {
        let (device, ann, bob) = (
            format!("{run}-d{k}"),
            format!("{run}-ann{k}"),
            format!("{run}-bob{k}"),
        );
        // Until all three events are projected and both links decided: the
        // device's profile holds three events whoever keeps it, or two and
        // three identifiers. Each projector commits its own partitions'
        // writes, so a read may meet one person's event before the other's
        // evidence (both Signed In events leave the device's profile with
        // two events and three identifiers then): the decision is asserted
        // once it is the first received's, or at the deadline.
        let (keeper, other, ids) = loop {
            let (status, body) =
                get(format!("/v1/profiles/anonymous_id:{device}/external_ids")).await;
            let (_, events) = get(format!(
                "/v1/profiles/anonymous_id:{device}/events?limit=10"
            ))
            .await;
            let (ann_s, _) = get(format!("/v1/profiles/user_id:{ann}/metadata")).await;
            let (bob_s, _) = get(format!("/v1/profiles/user_id:{bob}/metadata")).await;
            let late = Instant::now() >= deadline;
            if status == 200 && ann_s == 200 && bob_s == 200 {
                let n = events["data"].as_array().map_or(0, Vec::len);
                let ids: Vec<String> = body["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| {
                        format!(
                            "{}:{}",
                            x["type"].as_str().unwrap(),
                            x["id"].as_str().unwrap()
                        )
                    })
                    .collect();
                let users: Vec<&String> =
                    ids.iter().filter(|i| i.starts_with("user_id:")).collect();
                if (n == 3 || (n == 2 && ids.len() == 3)) && users.len() == 1 {
                    let (keeper, other) = if *users[0] == format!("user_id:{ann}") {
                        (ann.clone(), bob.clone())
                    } else {
                        (bob.clone(), ann.clone())
                    };
                    let (kt, ot) = (
                        received(keeper.clone()).await,
                        received(other.clone()).await,
                    );
                    if kt <= ot || late {
                        assert!(
                            kt <= ot,
                            "the first received keeps the device: {keeper} at {kt}, {other} at {ot}"
                        );
                        break (keeper, other, ids);
                    }
                } else if late {
                    assert_eq!(users.len(), 1, "one user keeps device {k}: {ids:?}");
                }
            }
            assert!(!late, "person {k} projected in time");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert!(ids.contains(&format!("crm_id:{run}-c{k}")), "{ids:?}");
        let (_, why) = get(format!("/v1/profiles/user_id:{other}/merges")).await;
        assert_eq!(
            why["identifiers"],
            json!([format!("user_id:{other}")]),
            "{why}"
        );
        assert_eq!(why["refused"][0]["rule"], "limit user_id 1 ever", "{why}");
        let mut pids = std::collections::BTreeSet::new();
        for id in [
            format!("anonymous_id:{device}"),
            format!("user_id:{keeper}"),
            format!("crm_id:{run}-c{k}"),
        ] {
            let (_, meta) = get(format!("/v1/profiles/{id}/metadata")).await;
            pids.insert(
                meta["metadata"]["profile_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        assert_eq!(pids.len(), 1, "one profile id for person {k}: {pids:?}");
    }
    for role in [ingest, query, first, second] {
        role.terminate().await;
    }
}
