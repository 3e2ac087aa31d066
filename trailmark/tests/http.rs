//! End-to-end HTTP tests: a real server on port 0 with the embedded log and
//! store, spoken to over HTTP like a Segment library and a Profile API client.
//! The cases live in `cases/http.rs`; `distributed_http.rs` runs them again on
//! Kafka and Cassandra.

mod common;

/// One in-process server on the embedded backends.
const DISTRIBUTED: bool = false;

include!("cases/http.rs");

use std::time::Duration;

// Embedded only: it closes the in-process log under the server. The Kafka
// outage is `distributed.rs`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_take_events_gets_503_with_retry_after() {
    let s = TestServer::start().await;
    s.running.as_ref().unwrap().backends.close();
    let r = s
        .client
        .post(s.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&segment::track("u", "Lost?"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let (status, body) = read(s.client.get(s.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["log"]["status"], "down");
}

/// Issue 9, item 5: a write-key holder linking thousands of identifiers into
/// one component does not hold up another workspace. Each event may carry at
/// most 25 externalIds, a component past 1,000 identifiers stops merging,
/// and a link moves the smaller side, so no event costs the projector more
/// than a bounded number of rows. The bound asserted, 5 s from 200 to
/// readable, leaves room for a noisy CI machine: the worst measured was
/// 2.1 s in this debug build on 2 cores (the attack's own batches of 2,500
/// identifiers being applied ahead of it); on 87401a9, where every smaller
/// anonymousId rewrote the whole component, it took minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_workspace_cannot_delay_another() {
    let s = TestServer::start().await;
    let other = s.create_workspace("bystander").await;
    let hostile = async {
        for b in 0..12 {
            let batch: Vec<serde_json::Value> = (0..100)
                .map(|i| {
                    // 24 new device ids, and the previous event's first one:
                    // all of it grows one component.
                    let previous = if i > 0 { format!("d{b}-{}-0", i - 1) } else { "hub-device".into() };
                    let ids: Vec<_> = (0..24)
                        .map(|j| format!("d{b}-{i}-{j}"))
                        .chain(std::iter::once(previous))
                        .map(|id| json!({"type": "device_id", "id": id}))
                        .collect();
                    // A new, smaller anonymousId joins the big component each time.
                    json!({"type": "track", "event": "Link", "anonymousId": format!("a{:05}", 99_999 - b * 100 - i),
                           "context": {"externalIds": ids, "traits": {"blob": "x".repeat(500)}}})
                })
                .chain(std::iter::once(json!({"type": "track", "event": "Join", "anonymousId": "hub",
                    "context": {"externalIds": [{"type": "device_id", "id": "hub-device"}]}})))
                .collect();
            let (status, body) = s.post("/v1/batch", &json!({ "batch": batch })).await;
            assert_eq!(status, 200, "{body}");
        }
    };
    let bystander = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut worst = Duration::ZERO;
        for n in 0..5 {
            let u = format!("calm-{n}");
            let r = s
                .client
                .post(s.url("/v1/track"))
                .basic_auth(&other.write_key, Some(""))
                .json(&segment::track(&u, "Visit"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let acked = std::time::Instant::now();
            loop {
                let r = s
                    .client
                    .get(s.url(&format!("/v1/profiles/user_id:{u}/events")))
                    .bearer_auth(&other.token)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    break;
                }
                assert!(acked.elapsed() < Duration::from_secs(30), "never visible");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            worst = worst.max(acked.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        worst
    };
    let ((), worst) = tokio::join!(hostile, bystander);
    println!("bystander visibility under attack: worst {worst:?}");
    assert!(worst < Duration::from_secs(5), "took {worst:?}");
    // The hostile component stopped merging at the limit.
    let (_, ids) = s
        .get("/v1/profiles/anonymous_id:hub/external_ids?limit=200")
        .await;
    assert_eq!(ids["data"].as_array().unwrap().len(), 1, "{ids}");
    s.stop().await;
}
include!("cases/audiences.rs");
