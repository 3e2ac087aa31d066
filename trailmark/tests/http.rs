//! End-to-end HTTP tests: a real server on port 0 with the embedded log and
//! store, spoken to over HTTP like a Segment library and a Profile API client.
//! The cases live in `cases/http.rs`; `distributed_http.rs` runs them again on
//! Kafka and Cassandra.

mod common;

/// One in-process server on the embedded backends.
const DISTRIBUTED: bool = false;

include!("cases/http.rs");

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
