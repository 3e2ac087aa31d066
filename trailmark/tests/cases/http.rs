// The end-to-end HTTP cases, shared by `tests/http.rs` (one process, embedded
// backends) and `tests/distributed_http.rs` (separate role processes on Kafka and
// Cassandra). Included with `include!`, so it has no module header.

use common::{TOKEN, TestServer, WRITE_KEY, basic, gzip, read};
use serde_json::{Value, json};
use trailmark_testkit::segment;

fn uid() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_type_lands_in_the_timeline() {
    let s = TestServer::start().await;
    let u = uid();
    let calls = [
        (
            "/v1/identify",
            json!({"userId": u, "traits": {"name": "Ann"}}),
        ),
        (
            "/v1/track",
            json!({"userId": u, "event": "Signed Up", "properties": {"plan": "pro"}}),
        ),
        (
            "/v1/page",
            json!({"userId": u, "name": "Pricing", "category": "Docs"}),
        ),
        ("/v1/screen", json!({"userId": u, "name": "Home"})),
        (
            "/v1/group",
            json!({"userId": u, "groupId": "acme", "traits": {"seats": 5}}),
        ),
        (
            "/v1/alias",
            json!({"userId": u, "previousId": format!("old-{u}")}),
        ),
    ];
    for (path, body) in &calls {
        let (status, resp) = s.post(path, body).await;
        assert_eq!(status, 200, "{path}: {resp}");
        assert_eq!(resp["success"], true);
    }
    let events = s.wait_for_events(&format!("user_id:{u}"), 6).await;
    let mut types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    types.sort();
    assert_eq!(
        types,
        ["alias", "group", "identify", "page", "screen", "track"]
    );
    let track = events.iter().find(|e| e["type"] == "track").unwrap();
    assert_eq!(track["event"], "Signed Up");
    assert_eq!(track["properties"]["plan"], "pro");
    let page = events.iter().find(|e| e["type"] == "page").unwrap();
    assert_eq!(page["category"], "Docs");
    // The alias linked the previous id to the profile.
    let (status, ids) = s
        .get(&format!("/v1/profiles/user_id:old-{u}/external_ids"))
        .await;
    assert_eq!(status, 200);
    assert!(
        ids["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == u.as_str())
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_paths_and_import_work() {
    let s = TestServer::start().await;
    let u = uid();
    assert_eq!(s.post("/v1/t", &segment::track(&u, "Short")).await.0, 200);
    let (status, _) = s
        .post(
            "/v1/import",
            &json!({"batch": [segment::item("track", segment::track(&u, "Imported"))]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.wait_for_events(&format!("user_id:{u}"), 2).await.len(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_form_is_accepted_and_bad_keys_get_401() {
    let s = TestServer::start().await;
    let u = uid();
    let body = segment::track(&u, "Auth");
    // Basic auth header.
    let r = s
        .client
        .post(s.url("/v1/track"))
        .header("authorization", basic(WRITE_KEY))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Query parameter.
    let r = s
        .client
        .post(s.url(&format!("/v1/track?writeKey={WRITE_KEY}")))
        .json(&segment::track(&u, "Auth"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Body field, sent as text/plain the way navigator.sendBeacon does.
    let mut beacon = segment::track(&u, "Auth");
    beacon["writeKey"] = json!(WRITE_KEY);
    let r = s
        .client
        .post(s.url("/v1/track"))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(beacon.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Batch with the key in the body.
    let r = s
        .client
        .post(s.url("/v1/batch"))
        .header("content-type", "text/plain")
        .body(json!({"writeKey": WRITE_KEY, "batch": [segment::item("track", segment::track(&u, "Auth"))]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Unknown key, missing key, and a token used as a write key.
    for auth in [Some(basic("wk_wrong")), None, Some(basic(TOKEN))] {
        let mut req = s
            .client
            .post(s.url("/v1/track"))
            .json(&segment::track(&u, "Auth"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (status, body) = read(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    assert_eq!(s.wait_for_events(&format!("user_id:{u}"), 4).await.len(), 4);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_auth_needs_the_secret_token() {
    let s = TestServer::start().await;
    let u = uid();
    s.post("/v1/identify", &segment::identify(&u, json!({"a": 1})))
        .await;
    s.wait_for_events(&format!("user_id:{u}"), 1).await;
    let path = s.url(&format!("/v1/profiles/user_id:{u}/traits"));
    let ok = s
        .client
        .get(&path)
        .header("authorization", basic(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "basic auth with the token as user name");
    let ok = s.client.get(&path).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let (status, body) = read(
        s.client
            .get(&path)
            .bearer_auth(WRITE_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403, "a write key cannot read: {body}");
    let (status, _) = read(
        s.client
            .get(&path)
            .bearer_auth("tmk_wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = read(s.client.get(&path).send().await.unwrap()).await;
    assert_eq!(status, 401);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_accepted_and_limited_after_decompression() {
    let s = TestServer::start().await;
    let u = uid();
    let body = json!({"batch": [segment::item("track", segment::track(&u, "Zipped"))]}).to_string();
    let r = s
        .client
        .post(s.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-encoding", "gzip")
        .header("content-type", "application/json")
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A gzip bomb: a small compressed body that inflates past the limit.
    let padding = "x".repeat(2_000_000);
    let bomb = gzip(
        json!({"batch": [{"type": "track", "userId": u, "event": padding}]})
            .to_string()
            .as_bytes(),
    );
    assert!(
        bomb.len() < 32 * 1024,
        "the compressed body is small ({})",
        bomb.len()
    );
    let (status, body) = read(
        s.client
            .post(s.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-encoding", "gzip")
            .body(bomb)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "too_large");
    // Garbage that claims to be gzip.
    let r = s
        .client
        .post(s.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-encoding", "gzip")
        .body("not gzip at all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.wait_for_events(&format!("user_id:{u}"), 1).await.len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_is_enforced() {
    let s = TestServer::start().await;
    let u = uid();
    // One event over 32 KB.
    let big = json!({"userId": u, "event": "Big", "properties": {"blob": "x".repeat(33 * 1024)}});
    let (status, body) = s.post("/v1/track", &big).await;
    assert_eq!(status, 413, "{body}");
    // A batch over 500 KB.
    let items: Vec<Value> = (0..20)
        .map(|_| json!({"type": "track", "userId": u, "event": "Big", "properties": {"blob": "x".repeat(30 * 1024)}}))
        .collect();
    let (status, _) = s.post("/v1/batch", &json!({"batch": items})).await;
    assert_eq!(status, 413);
    // More than 2,500 events.
    let items: Vec<Value> = (0..2_501)
        .map(|_| json!({"type": "track", "userId": "x", "event": "e"}))
        .collect();
    let (status, body) = s.post("/v1/batch", &json!({"batch": items})).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["field"], "batch");
    // A batch item over 32 KB is rejected alone.
    let items = json!([
        {"type": "track", "userId": u, "event": "Small"},
        {"type": "track", "userId": u, "event": "Big", "properties": {"blob": "x".repeat(33 * 1024)}},
    ]);
    let (status, body) = s.post("/v1/batch", &json!({"batch": items})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(body["rejected"][0]["error"]["code"], "too_large");
    // messageId over 100 characters.
    let (status, body) = s
        .post(
            "/v1/track",
            &json!({"userId": u, "event": "e", "messageId": "m".repeat(101)}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "messageId");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_name_the_problem() {
    let s = TestServer::start().await;
    let cases = [
        ("/v1/track", json!({"event": "no identity"}), "userId"),
        ("/v1/track", json!({"userId": "u"}), "event"),
        (
            "/v1/track",
            json!({"userId": "u", "event": "e", "properties": "str"}),
            "properties",
        ),
        (
            "/v1/identify",
            json!({"userId": "u", "timestamp": "last tuesday"}),
            "timestamp",
        ),
        ("/v1/group", json!({"userId": "u"}), "groupId"),
        ("/v1/alias", json!({"userId": "u"}), "previousId"),
        ("/v1/batch", json!({"nope": []}), "batch"),
    ];
    for (path, body, field) in cases {
        let (status, resp) = s.post(path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {resp}");
        assert_eq!(resp["error"]["field"], field, "{resp}");
        assert!(resp["error"]["message"].as_str().unwrap().len() > 5);
    }
    let (status, body) = s.post_text("/v1/track", "{not json").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_json");
    // Well-formed JSON that no projector could read back (found by the fuzzer):
    // refused before it is acknowledged, naming the field.
    let (status, body) = s
        .post_text(
            "/v1/identify",
            r#"{"userId":"u","traits":{"name":"Initech","employees":3291e999}}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], "traits", "{body}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_bad_items_keeps_the_good_ones() {
    let s = TestServer::start().await;
    let u = uid();
    let body = json!({
        "context": {"library": {"name": "analytics-python"}},
        "batch": [
            {"type": "track", "userId": u, "event": "Good 1", "messageId": format!("{u}-1")},
            {"type": "track", "event": "No identity", "messageId": format!("{u}-bad")},
            {"type": "shout", "userId": u},
            {"type": "identify", "userId": u, "traits": {"plan": "pro"}, "messageId": format!("{u}-2")},
        ]
    });
    let (status, resp) = s.post("/v1/batch", &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["accepted"], 2);
    let rejected = resp["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["index"], 1);
    assert_eq!(rejected[0]["messageId"], format!("{u}-bad"));
    assert_eq!(rejected[1]["error"]["field"], "type");
    let events = s.wait_for_events(&format!("user_id:{u}"), 2).await;
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| e["context"]["library"]["name"] == "analytics-python"),
        "batch context merged"
    );
    // All bad: 400 with the list.
    let (status, resp) = s
        .post("/v1/batch", &json!({"batch": [{"type": "track"}]}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(resp["error"]["rejected"][0]["index"], 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_appear_and_count_once() {
    let s = TestServer::start().await;
    let u = uid();
    let mut ev = segment::track(&u, "Purchased");
    ev["messageId"] = json!(format!("dup-{u}"));
    for _ in 0..3 {
        assert_eq!(s.post("/v1/track", &ev).await.0, 200);
    }
    let batch = json!({"batch": [segment::item("track", ev.clone()), segment::item("track", segment::track(&u, "Other"))]});
    assert_eq!(s.post("/v1/batch", &batch).await.0, 200);
    let events = s.wait_for_events(&format!("user_id:{u}"), 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let events_after = s.wait_for_events(&format!("user_id:{u}"), 2).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events_after.len(), 2);
    let (_, meta) = s.get(&format!("/v1/profiles/user_id:{u}/metadata")).await;
    assert_eq!(meta["metadata"]["event_counts"]["Purchased"], 1);
    assert_eq!(meta["metadata"]["total_events"], 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_order_identify_does_not_overwrite_newer_traits() {
    let s = TestServer::start().await;
    let u = uid();
    let newer = json!({"userId": u, "traits": {"plan": "enterprise", "email": format!("{u}@example.com")}, "timestamp": "2024-06-01T00:00:00Z", "messageId": format!("{u}-new")});
    let older = json!({"userId": u, "traits": {"plan": "free", "company": "Acme"}, "timestamp": "2024-01-01T00:00:00Z", "messageId": format!("{u}-old")});
    assert_eq!(s.post("/v1/identify", &newer).await.0, 200);
    assert_eq!(s.post("/v1/identify", &older).await.0, 200);
    s.wait_for_events(&format!("user_id:{u}"), 2).await;
    let (status, body) = s
        .get(&format!(
            "/v1/profiles/email:{u}@example.com/traits?verbose=true"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["traits"]["plan"]["value"], "enterprise");
    assert_eq!(body["traits"]["plan"]["message_id"], format!("{u}-new"));
    assert_eq!(
        body["traits"]["plan"]["updated_at"],
        "2024-06-01T00:00:00.000Z"
    );
    assert_eq!(body["traits"]["company"]["value"], "Acme");
    s.stop().await;
}

/// Issue 10: an email is one identifier whatever its case and surrounding
/// spaces, when it links (two devices, two spellings) and when it is looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_in_another_case_is_the_same_person() {
    let s = TestServer::start().await;
    let (a1, a2, u) = (uid(), uid(), uid());
    let first = json!({"anonymousId": a1, "traits": {"email": format!("{u}@Example.COM")}});
    let second = json!({"anonymousId": a2, "traits": {"email": format!("  {u}@example.com ")}});
    assert_eq!(s.post("/v1/identify", &first).await.0, 200);
    assert_eq!(s.post("/v1/identify", &second).await.0, 200);
    s.wait_for_events(&format!("anonymous_id:{a1}"), 2).await;
    let upper = u.to_uppercase();
    let (status, body) = s
        .get(&format!("/v1/profiles/email:{upper}@EXAMPLE.com/external_ids"))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|x| format!("{}:{}", x["type"].as_str().unwrap(), x["id"].as_str().unwrap()))
        .collect();
    ids.sort();
    let mut want = vec![
        format!("anonymous_id:{a1}"),
        format!("anonymous_id:{a2}"),
        format!("email:{u}@example.com"),
    ];
    want.sort();
    assert_eq!(ids, want);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_stitches_anonymous_history_and_queries_page() {
    let s = TestServer::start().await;
    let (u, a) = (uid(), uid());
    for i in 0..5 {
        let body = json!({"anonymousId": a, "event": "Browse", "properties": {"i": i}, "timestamp": format!("2024-01-0{}T00:00:00Z", i + 1)});
        assert_eq!(s.post("/v1/track", &body).await.0, 200);
    }
    let id = json!({"anonymousId": a, "userId": u, "traits": {"name": "Bo"}, "timestamp": "2024-01-07T00:00:00Z"});
    assert_eq!(s.post("/v1/identify", &id).await.0, 200);
    let all = s.wait_for_events(&format!("user_id:{u}"), 6).await;
    assert_eq!(all.len(), 6, "the anonymous history belongs to the user");
    // Pages of 2, newest first, by cursor.
    let mut seen = Vec::new();
    let mut next = String::new();
    loop {
        let q = if next.is_empty() {
            String::new()
        } else {
            format!("&next={next}")
        };
        let (status, body) = s
            .get(&format!("/v1/profiles/anonymous_id:{a}/events?limit=2{q}"))
            .await;
        assert_eq!(status, 200, "{body}");
        seen.extend(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["timestamp"].as_str().unwrap().to_owned()),
        );
        if body["cursor"]["has_more"] != true {
            break;
        }
        next = body["cursor"]["next"].as_str().unwrap().to_owned();
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted);
    assert_eq!(seen.len(), 6);
    // Range and name filter.
    let (_, body) = s
        .get(&format!("/v1/profiles/user_id:{u}/events?sort=asc&event=Browse&start=2024-01-02T00:00:00Z&end=2024-01-04T00:00:00Z"))
        .await;
    let days: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["timestamp"].as_str().unwrap())
        .collect();
    assert_eq!(
        days,
        ["2024-01-02T00:00:00.000Z", "2024-01-03T00:00:00.000Z"]
    );
    let (status, body) = s
        .get(&format!("/v1/profiles/user_id:{u}/events?limit=500"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "limit");
    let (status, _) = s
        .get(&format!("/v1/profiles/user_id:{u}/events?next=garbage"))
        .await;
    assert_eq!(status, 400);
    let (_, meta) = s.get(&format!("/v1/profiles/user_id:{u}/metadata")).await;
    assert_eq!(meta["metadata"]["first_seen"], "2024-01-01T00:00:00.000Z");
    assert_eq!(meta["metadata"]["event_counts"]["Browse"], 5);
    let (status, body) = s.get("/v1/profiles/user_id:nobody-at-all/traits").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = s.get("/v1/profiles/nocolon/traits").await;
    assert_eq!(status, 400);
    let (status, body) = s
        .get(&format!("/v1/profiles/user_id:{u}/events?limit=lots"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_query");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("limit"),
        "{body}"
    );
    let (status, body) = s.get("/v1/nowhere").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traits_page_and_filter() {
    let s = TestServer::start().await;
    let u = uid();
    let traits: serde_json::Map<String, Value> =
        (0..15).map(|i| (format!("t{i:02}"), json!(i))).collect();
    s.post("/v1/identify", &json!({"userId": u, "traits": traits}))
        .await;
    s.wait_for_events(&format!("user_id:{u}"), 1).await;
    let (_, first) = s.get(&format!("/v1/profiles/user_id:{u}/traits")).await;
    assert_eq!(first["traits"].as_object().unwrap().len(), 10);
    assert_eq!(first["cursor"]["has_more"], true);
    let next = first["cursor"]["next"].as_str().unwrap();
    let (_, second) = s
        .get(&format!("/v1/profiles/user_id:{u}/traits?next={next}"))
        .await;
    assert_eq!(second["traits"].as_object().unwrap().len(), 5);
    assert_eq!(second["cursor"]["has_more"], false);
    let (_, some) = s
        .get(&format!("/v1/profiles/user_id:{u}/traits?include=t01,t03"))
        .await;
    assert_eq!(some["traits"], json!({"t01": 1, "t03": 3}));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_never_see_each_other() {
    let s = TestServer::start().await;
    let other = s.create_workspace("other").await;
    let u = uid();
    s.post(
        "/v1/identify",
        &segment::identify(&u, json!({"secret": "mine"})),
    )
    .await;
    s.wait_for_events(&format!("user_id:{u}"), 1).await;
    let (status, _) = read(
        s.client
            .get(s.url(&format!("/v1/profiles/user_id:{u}/traits")))
            .bearer_auth(&other.token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status, 404,
        "another workspace's token does not see the profile"
    );
    // The same user id written through the other workspace's key stays apart.
    let r = s
        .client
        .post(s.url("/v1/identify"))
        .basic_auth(&other.write_key, Some(""))
        .json(&segment::identify(&u, json!({"secret": "theirs"})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, mine) = s.get(&format!("/v1/profiles/user_id:{u}/traits")).await;
    assert_eq!(mine["traits"]["secret"], "mine");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_cors() {
    let s = TestServer::start().await;
    let (status, _) = read(s.client.get(s.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, body) = read(s.client.get(s.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    s.post("/v1/track", &segment::track("m", "Metric")).await;
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("trailmark_ingest_events_total{outcome=\"accepted\",type=\"track\"} 1"),
        "{text}"
    );
    assert!(text.contains("trailmark_http_request_duration_seconds_bucket"));
    assert!(text.contains("trailmark_log_append_duration_seconds_count"));
    let pre = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/batch"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_and_rebuild_is_identical() {
    let s = TestServer::start().await;
    let u = uid();
    for i in 0..20 {
        let ev = if i % 5 == 0 {
            json!({"userId": u, "anonymousId": format!("{u}-a"), "traits": {"n": i}, "type": "identify"})
        } else {
            json!({"anonymousId": format!("{u}-a"), "event": format!("E{}", i % 3), "type": "track"})
        };
        assert_eq!(s.post("/v1/batch", &json!({"batch": [ev]})).await.0, 200);
    }
    s.wait_for_events(&format!("user_id:{u}"), 20).await;
    let before = snapshot(&s, &u).await;
    let dir = s.stop().await;
    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(snapshot(&s, &u).await, before, "a restart changes nothing");
    let dir = s.stop().await;
    let replayed = common::rebuild(&dir).await;
    assert_eq!(replayed, 20);
    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(
        snapshot(&s, &u).await,
        before,
        "a rebuild from the log gives identical results"
    );
    s.stop().await;
}

async fn snapshot(s: &TestServer, u: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for route in [
        "traits?limit=200",
        "events?limit=200",
        "external_ids",
        "metadata",
    ] {
        out.push(s.get(&format!("/v1/profiles/user_id:{u}/{route}")).await.1);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_sdk_is_served_with_long_lived_caching() {
    let s = TestServer::start().await;
    let r = s
        .client
        .get(s.url("/sdk/v1/trailmark.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/javascript")
    );
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age=86400")
    );
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let etag = r.headers()["etag"].clone();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.as_ref(), trailmark_ingest::sdk::SDK_BUNDLE);
    // Revalidation: unchanged, so 304 with no body.
    let again = s
        .client
        .get(s.url("/sdk/v1/trailmark.min.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    // The exact version never changes: cached for a year.
    let pinned = s
        .client
        .get(s.url(&format!(
            "/sdk/{}/trailmark.min.js",
            trailmark_ingest::sdk::SDK_VERSION
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(pinned.status(), 200);
    assert!(
        pinned.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    s.stop().await;
}

/// `{"a":{"a":…1…}}`, `depth` objects deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// Issue 9, items 1-4: what one hostile or sloppy event could do to reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_event_can_break_a_read() {
    let s = TestServer::start().await;
    let u = uid();
    // Repeated keys, as the Rust `segment` crate and rudderanalytics send
    // them: accepted, the last one winning everywhere.
    let (status, body) = s
        .post_text(
            "/v1/identify",
            format!(
                r#"{{"userId":"x","userId":"{u}","traits":{{"plan":"free","plan":"pro"}},"context":{{"traits":{{"n":1}},"traits":{{"n":2}}}}}}"#
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s
        .post_text(
            "/v1/batch",
            format!(
                r#"{{"batch":[{{"type":"page","userId":"{u}","type":"track","event":"Deep","properties":{}}}]}}"#,
                nested(64)
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    // Too deep, or a crafted id type: refused, naming the field.
    for (route, text, field) in [
        (
            "/v1/track",
            format!(r#"{{"userId":"{u}","event":"E","properties":{}}}"#, nested(126)),
            "properties",
        ),
        (
            "/v1/identify",
            format!(r#"{{"userId":"{u}","traits":{}}}"#, nested(200)),
            "traits",
        ),
        (
            "/v1/track",
            format!(
                r#"{{"userId":"{u}","event":"E","context":{{"externalIds":[{{"type":"user_id\u0000alice","id":"X"}}]}}}}"#
            ),
            "context.externalIds[0].type",
        ),
    ] {
        let (status, body) = s.post_text(route, text).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    // A time no clock can read does not pin traits: a later identify wins.
    let (status, _) = s
        .post(
            "/v1/identify",
            &json!({"userId": u, "timestamp": "9999-12-31T23:59:59Z", "traits": {"tier": "pinned"}}),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.post("/v1/identify", &json!({"userId": u, "traits": {"tier": "latest"}}))
        .await;
    let events = s.wait_for_events(&format!("user_id:{u}"), 4).await;
    assert_eq!(events.len(), 4);
    let deep = events.iter().find(|e| e["event"] == "Deep").expect("deep event");
    let mut v = &deep["properties"];
    for _ in 0..63 {
        v = &v["a"];
    }
    assert_eq!(v["a"], 1, "read back whole, 64 levels deep");
    let (status, traits) = s.get(&format!("/v1/profiles/user_id:{u}/traits")).await;
    assert_eq!(status, 200);
    assert_eq!(traits["traits"]["plan"], "pro");
    assert_eq!(traits["traits"]["n"], 2);
    assert_eq!(traits["traits"]["tier"], "latest");
    let (_, meta) = s.get(&format!("/v1/profiles/user_id:{u}/metadata")).await;
    assert!(meta["metadata"]["last_seen"].as_str().unwrap() < "2100", "{meta}");
    // Historical imports keep their times.
    s.post(
        "/v1/import",
        &json!({"batch": [{"type": "track", "userId": u, "event": "Old", "timestamp": "2015-06-01T12:00:00Z"}]}),
    )
    .await;
    let events = s.wait_for_events(&format!("user_id:{u}"), 5).await;
    let old = events.iter().find(|e| e["event"] == "Old").expect("import");
    assert_eq!(old["timestamp"], "2015-06-01T12:00:00.000Z");
    s.stop().await;
}

/// Issue 9, items 12 and 18: a cursor's URL is the next page, whatever the
/// identifier holds, and keeps every parameter of the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_urls_lead_to_the_next_page() {
    let s = TestServer::start().await;
    let u = format!("a/b?c&d#{}", uid());
    let enc = u
        .replace('/', "%2F")
        .replace('?', "%3F")
        .replace('&', "%26")
        .replace('#', "%23");
    for i in 0..3 {
        s.post("/v1/track", &segment::track(&u, &format!("E{i}"))).await;
    }
    let traits: serde_json::Map<String, Value> =
        (0..5).map(|i| (format!("t{i}"), json!(i))).collect();
    s.post("/v1/identify", &json!({"userId": u, "traits": traits}))
        .await;
    assert_eq!(s.wait_for_events(&format!("user_id:{enc}"), 4).await.len(), 4);
    let (status, first) = s
        .get(&format!("/v1/profiles/user_id:{enc}/events?limit=2&event=E1"))
        .await;
    assert_eq!(status, 200, "{first}");
    let (status, first) = s
        .get(&format!("/v1/profiles/user_id:{enc}/events?limit=2"))
        .await;
    assert_eq!(status, 200);
    let url = first["cursor"]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("/v1/profiles/user_id:{enc}/events?")), "{url}");
    let (status, second) = s.get(url).await;
    assert_eq!(status, 200, "{url}: {second}");
    assert_eq!(second["data"].as_array().unwrap().len(), 2);
    let (_, page) = s
        .get(&format!(
            "/v1/profiles/user_id:{enc}/traits?limit=2&include=t0,t1,t2&verbose=true"
        ))
        .await;
    let url = page["cursor"]["url"].as_str().unwrap();
    for part in ["limit=2", "include=t0%2Ct1%2Ct2", "verbose=true", "next="] {
        assert!(url.contains(part), "{url} lacks {part}");
    }
    let (status, next) = s.get(url).await;
    assert_eq!(status, 200, "{url}: {next}");
    assert_eq!(next["traits"].as_object().unwrap().len(), 1);
    assert!(next["traits"]["t2"]["updated_at"].is_string(), "verbose kept");
    let (_, ids) = s
        .get(&format!("/v1/profiles/user_id:{enc}/external_ids?limit=1"))
        .await;
    let url = ids["cursor"]["url"].as_str().unwrap();
    assert!(url.contains("limit=1"), "{url}");
    assert_eq!(ids["cursor"]["has_more"], false);
    s.stop().await;
}

/// The identifiers of a profile, as `type:id`, sorted.
async fn identifiers_of(s: &TestServer, id: &str) -> Vec<String> {
    let (status, body) = s.get(&format!("/v1/profiles/{id}/external_ids")).await;
    assert_eq!(status, 200, "{id}: {body}");
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|x| format!("{}:{}", x["type"].as_str().unwrap(), x["id"].as_str().unwrap()))
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Issue 10: two people on one laptop stay two people. The second `userId`
/// is refused the device (a profile holds one `user_id`), and `/merges`
/// names the rule. Whoever ingest received first keeps the device, whatever
/// the event times say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_on_one_device_stay_two() {
    let s = TestServer::start().await;
    for second_sent_first in [false, true] {
        let (a, ann, bob) = (uid(), uid(), uid());
        let ann_id = json!({"userId": ann, "anonymousId": a, "timestamp": "2024-01-01T00:00:00Z"});
        // Bob's identify carries a later time; in the variant it arrives first.
        let bob_id = json!({"userId": bob, "anonymousId": a, "timestamp": "2024-01-02T00:00:00Z"});
        let (first, second) = if second_sent_first {
            (&bob_id, &ann_id)
        } else {
            (&ann_id, &bob_id)
        };
        assert_eq!(s.post("/v1/identify", first).await.0, 200);
        assert_eq!(s.post("/v1/identify", second).await.0, 200);
        s.wait_for_events(&format!("user_id:{ann}"), 1).await;
        s.wait_for_events(&format!("user_id:{bob}"), 1).await;
        let (keeper, other) = if second_sent_first {
            (&bob, &ann)
        } else {
            (&ann, &bob)
        };
        assert_eq!(
            identifiers_of(&s, &format!("user_id:{keeper}")).await,
            sorted(vec![format!("anonymous_id:{a}"), format!("user_id:{keeper}")]),
            "the first received keeps the device"
        );
        assert_eq!(
            identifiers_of(&s, &format!("user_id:{other}")).await,
            [format!("user_id:{other}")]
        );
        let (status, why) = s.get(&format!("/v1/profiles/user_id:{other}/merges")).await;
        assert_eq!(status, 200, "{why}");
        let refused = &why["refused"][0];
        assert_eq!(refused["refused"], format!("anonymous_id:{a}"), "{why}");
        assert_eq!(refused["rule"], "limit user_id 1 ever", "{why}");
    }
    s.stop().await;
}

/// Issue 10: anonymous browsing, then sign-up on a second device, then an
/// identify that arrives after later tracks: one person, whose profile id
/// is that of the identifier named first, and whose absorbed ids resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_person_across_devices_keeps_one_stable_profile_id() {
    let s = TestServer::start().await;
    let (laptop, phone, u) = (uid(), uid(), uid());
    let track = |anon: &str, t: &str| {
        json!({"anonymousId": anon, "event": "Viewed", "timestamp": t})
    };
    assert_eq!(s.post("/v1/track", &track(&laptop, "2024-03-05T00:00:00Z")).await.0, 200);
    s.wait_for_events(&format!("anonymous_id:{laptop}"), 1).await;
    let (_, before) = s.get(&format!("/v1/profiles/anonymous_id:{laptop}/metadata")).await;
    let laptop_pid = before["metadata"]["profile_id"].as_str().expect("profile id").to_owned();
    assert_eq!(s.post("/v1/track", &track(&phone, "2024-03-06T00:00:00Z")).await.0, 200);
    s.wait_for_events(&format!("anonymous_id:{phone}"), 1).await;
    let (_, phone_meta) = s.get(&format!("/v1/profiles/anonymous_id:{phone}/metadata")).await;
    let phone_pid = phone_meta["metadata"]["profile_id"].as_str().expect("profile id").to_owned();
    assert_ne!(laptop_pid, phone_pid);
    // The identifies carry times before the tracks: identity does not care.
    for anon in [&laptop, &phone] {
        let id = json!({"userId": u, "anonymousId": anon, "traits": {"plan": "pro"}, "timestamp": "2024-03-01T00:00:00Z"});
        assert_eq!(s.post("/v1/identify", &id).await.0, 200);
    }
    let all = s.wait_for_events(&format!("user_id:{u}"), 4).await;
    assert_eq!(all.len(), 4);
    let (status, meta) = s.get(&format!("/v1/profiles/profile_id:{phone_pid}/metadata")).await;
    assert_eq!(status, 200, "an absorbed profile id still resolves: {meta}");
    let m = &meta["metadata"];
    assert_eq!(m["profile_id"], laptop_pid.as_str(), "the earliest side's id: {meta}");
    assert_eq!(m["holder"], format!("anonymous_id:{laptop}"));
    assert_eq!(m["identifiers"], 3);
    assert_eq!(m["created_at"], "2024-03-01T00:00:00.000Z");
    assert!(m["first_message_id"].is_string() && m["last_message_id"].is_string(), "{meta}");
    // Explain: the path from the phone to the laptop goes through the user.
    let (status, why) = s
        .get(&format!("/v1/profiles/anonymous_id:{phone}/merges?to=anonymous_id:{laptop}"))
        .await;
    assert_eq!(status, 200, "{why}");
    assert_eq!(why["path"].as_array().map(Vec::len), Some(2), "{why}");
    // external_ids says how each identifier joined.
    let (_, ext) = s.get(&format!("/v1/profiles/user_id:{u}/external_ids")).await;
    for x in ext["data"].as_array().expect("list") {
        assert_eq!(x["linked"]["rule"], "event", "{x}");
        assert!(x["first_message_id"].is_string() && x["last_seen"].is_string(), "{x}");
    }
    let (status, body) = s.get("/v1/profiles/profile_id:not-a-uuid/metadata").await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("id")));
    s.stop().await;
}

/// Issue 10: an email shared in different case, and an alias chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_email_does_not_fuse_users_and_alias_chains_join() {
    let s = TestServer::start().await;
    let (u1, u2, team) = (uid(), uid(), uid());
    let id1 = json!({"userId": u1, "traits": {"email": format!("{team}@Shop.io")}});
    let id2 = json!({"userId": u2, "traits": {"email": format!("{team}@shop.IO")}});
    assert_eq!(s.post("/v1/identify", &id1).await.0, 200);
    assert_eq!(s.post("/v1/identify", &id2).await.0, 200);
    s.wait_for_events(&format!("user_id:{u2}"), 1).await;
    assert_eq!(
        identifiers_of(&s, &format!("email:{team}@shop.io")).await,
        sorted(vec![format!("email:{team}@shop.io"), format!("user_id:{u1}")]),
    );
    assert_eq!(identifiers_of(&s, &format!("user_id:{u2}")).await, [format!("user_id:{u2}")]);

    // A user renamed twice: u1 → n1 → n2.
    let (n1, n2) = (uid(), uid());
    assert_eq!(s.post("/v1/alias", &json!({"userId": n1, "previousId": u1})).await.0, 200);
    assert_eq!(s.post("/v1/alias", &json!({"userId": n2, "previousId": n1})).await.0, 200);
    let events = s.wait_for_events(&format!("user_id:{n2}"), 3).await;
    assert_eq!(events.len(), 3, "u1's identify and both aliases");
    let ids = identifiers_of(&s, &format!("user_id:{u1}")).await;
    for want in [&u1, &n1, &n2] {
        assert!(ids.contains(&format!("user_id:{want}")), "{ids:?}");
    }
    s.stop().await;
}

/// Issue 10: `null` and the like are blocked values: devices that sent
/// `userId: "null"` are not fused through it, and their events stay with
/// their anonymous profiles. The value stays in the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_user_id_links_nothing() {
    let s = TestServer::start().await;
    let (a1, a2) = (uid(), uid());
    for a in [&a1, &a2] {
        let body = json!({"userId": "null", "anonymousId": a, "event": "Opened"});
        assert_eq!(s.post("/v1/track", &body).await.0, 200);
    }
    for a in [&a1, &a2] {
        let events = s.wait_for_events(&format!("anonymous_id:{a}"), 1).await;
        assert_eq!(events.len(), 1, "the event stays with {a}");
        assert_eq!(events[0]["user_id"], "null", "the value stays in the payload");
        assert_eq!(identifiers_of(&s, &format!("anonymous_id:{a}")).await, [format!("anonymous_id:{a}")]);
    }
    let (status, body) = s.get("/v1/profiles/user_id:null/events").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!([]), "nothing is kept under the blocked value");
    s.stop().await;
}

/// Issue 10: Segment's Profile API paths answer like Trailmark's; the space
/// is the workspace, and only the users collection exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_profile_api_paths_work_by_changing_the_host() {
    let s = TestServer::start().await;
    let other = s.create_workspace("segment-paths").await;
    let u = uid();
    let client = reqwest::Client::new();
    let send = client
        .post(s.url("/v1/identify"))
        .basic_auth(&other.write_key, Some(""))
        .json(&json!({"userId": u, "traits": {"plan": "pro"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(send.status(), 200);
    let get = |path: String| {
        let client = client.clone();
        let url = s.url(&path);
        let token = other.token.clone();
        async move { read(client.get(url).bearer_auth(token).send().await.expect("get")).await }
    };
    let ours = format!("/v1/profiles/user_id:{u}/traits");
    let theirs = format!(
        "/v1/spaces/{}/collections/users/profiles/user_id:{u}/traits",
        other.workspace_id
    );
    let mut body = json!(null);
    for _ in 0..200 {
        let (status, b) = get(theirs.clone()).await;
        if status == 200 {
            body = b;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(body["traits"]["plan"], "pro", "{body}");
    assert_eq!(get(ours).await.1["traits"], body["traits"]);
    assert!(
        body["cursor"]["url"].as_str().unwrap().starts_with("/v1/spaces/"),
        "{body}"
    );
    let wrong_space = format!("/v1/spaces/ws_other/collections/users/profiles/user_id:{u}/traits");
    assert_eq!(get(wrong_space).await.0, 404);
    let accounts = format!(
        "/v1/spaces/{}/collections/accounts/profiles/user_id:{u}/traits",
        other.workspace_id
    );
    assert_eq!(get(accounts).await.0, 404);
    s.stop().await;
}

/// Issue 10: identity rules are a workspace's to set, with its admin token
/// only; a change applies to new data at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_rules_are_set_by_admins_and_apply_to_new_data() {
    use reqwest::Method;
    let s = TestServer::start().await;
    let (status, body) = s.admin(Method::GET, "/v1/admin/identity-rules", &json!(null)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rules"]["limits"]["user_id"], "1 ever");
    assert_eq!(body["rules"]["priority"], json!(["user_id", "email"]));

    // A read token and a write key may not administer.
    let (status, body) = s
        .admin(Method::POST, "/v1/admin/tokens", &json!({"scope": "read"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let read_token = body["token"].as_str().expect("token").to_owned();
    let client = reqwest::Client::new();
    let rules_url = s.url("/v1/admin/identity-rules");
    let with_read = client
        .put(&rules_url)
        .bearer_auth(&read_token)
        .json(&json!({}))
        .send()
        .await
        .expect("put");
    assert_eq!(with_read.status(), 403);
    let with_key = client
        .put(&rules_url)
        .bearer_auth(WRITE_KEY)
        .json(&json!({}))
        .send()
        .await
        .expect("put");
    assert_eq!(with_key.status(), 403);
    // ...but the read token reads profiles.
    let (status, _) = read(
        client
            .get(s.url("/v1/profiles/user_id:nobody/traits"))
            .bearer_auth(&read_token)
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, 404, "authorised, and no such profile");

    // Bad rules name the field.
    let (status, body) = s
        .admin(Method::PUT, "/v1/admin/identity-rules", &json!({"limits": {"email": "five weekly"}}))
        .await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("limits.email")), "{body}");
    let (status, body) = s
        .admin(Method::PUT, "/v1/admin/identity-rules", &json!({"limit": {}}))
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    // A family laptop: two user ids may share a profile, and "guest" is blocked.
    let (status, body) = s
        .admin(
            Method::PUT,
            "/v1/admin/identity-rules",
            &json!({"limits": {"user_id": "2 ever"}, "blocked_values": ["guest"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rules"]["limits"]["user_id"], "2 ever");
    let (a, u1, u2) = (uid(), uid(), uid());
    for u in [&u1, &u2] {
        let id = json!({"userId": u, "anonymousId": a});
        assert_eq!(s.post("/v1/identify", &id).await.0, 200);
    }
    let guest = json!({"userId": "Guest", "anonymousId": a, "event": "Opened"});
    assert_eq!(s.post("/v1/track", &guest).await.0, 200);
    s.wait_for_events(&format!("anonymous_id:{a}"), 3).await;
    assert_eq!(
        identifiers_of(&s, &format!("user_id:{u1}")).await,
        sorted(vec![
            format!("anonymous_id:{a}"),
            format!("user_id:{u1}"),
            format!("user_id:{u2}")
        ]),
        "two user ids are allowed now; the blocked guest is not linked"
    );
    s.stop().await;
}

/// Issue 10: an admin forces a merge the rules refused, then splits one
/// identifier off again; both are control records in the log, so a rebuild
/// would reproduce them, and a retried request counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_merge_then_a_split() {
    use reqwest::Method;
    let s = TestServer::start().await;
    let (u1, u2) = (uid(), uid());
    for u in [&u1, &u2] {
        assert_eq!(s.post("/v1/track", &json!({"userId": u, "event": "Paid"})).await.0, 200);
    }
    s.wait_for_events(&format!("user_id:{u2}"), 1).await;
    s.wait_for_events(&format!("user_id:{u1}"), 1).await;

    let unknown = json!({"identifiers": [format!("user_id:{u1}"), "user_id:nobody-ever"]});
    assert_eq!(s.admin(Method::POST, "/v1/profiles/merge", &unknown).await.0, 404);
    let blocked = json!({"identifiers": [format!("user_id:{u1}"), "user_id:null"]});
    let (status, body) = s.admin(Method::POST, "/v1/profiles/merge", &blocked).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("identifiers[1]")), "{body}");

    let merge = json!({"identifiers": [format!("user_id:{u1}"), format!("user_id:{u2}")], "messageId": format!("merge-{u1}")});
    let (status, body) = s.admin(Method::POST, "/v1/profiles/merge", &merge).await;
    assert_eq!(status, 202, "{body}");
    // A retry of the same request changes nothing.
    assert_eq!(s.admin(Method::POST, "/v1/profiles/merge", &merge).await.0, 202);
    let both = s.wait_for_events(&format!("user_id:{u1}"), 2).await;
    assert_eq!(both.len(), 2, "the forced merge joins two user ids");
    let (_, why) = s.get(&format!("/v1/profiles/user_id:{u1}/merges")).await;
    let accepted = why["accepted"].as_array().expect("accepted");
    assert_eq!(accepted.len(), 1, "{why}");
    assert_eq!(accepted[0]["action"], "admin_merge");

    let (status, body) = s
        .admin(Method::POST, &format!("/v1/profiles/user_id:{u2}/split"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let mut apart = false;
    for _ in 0..200 {
        if identifiers_of(&s, &format!("user_id:{u1}")).await == [format!("user_id:{u1}")] {
            apart = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(apart, "the split detaches u2");
    assert_eq!(s.wait_for_events(&format!("user_id:{u2}"), 1).await.len(), 1, "with its events");
    assert_eq!(s.wait_for_events(&format!("user_id:{u1}"), 1).await.len(), 1);
    let (_, why) = s.get(&format!("/v1/profiles/user_id:{u1}/merges")).await;
    let refused = why["refused"].as_array().expect("refused");
    assert!(
        refused.iter().any(|d| d["detached"] == format!("user_id:{u2}") && d["action"] == "admin_split"),
        "{why}"
    );
    s.stop().await;
}

/// Issue 10: accounts. `group` traits describe the account, `context.groupId`
/// files a track under it, members of one account stay separate people, and
/// both Trailmark's and Segment's paths read the collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_collect_group_traits_members_and_events() {
    let s = TestServer::start().await;
    let (acme, ann, bob, visitor) = (uid(), uid(), uid(), uid());
    let group = |user: &str, traits: Value, t: &str| {
        json!({"userId": user, "groupId": acme, "traits": traits, "timestamp": t})
    };
    let sends = [
        ("/v1/group", group(&ann, json!({"name": "Acme", "plan": "team"}), "2024-05-01T00:00:00Z")),
        ("/v1/group", group(&bob, json!({"plan": "enterprise", "email": "billing@acme.test"}), "2024-05-02T00:00:00Z")),
        (
            "/v1/track",
            json!({"anonymousId": visitor, "event": "Viewed Pricing", "context": {"groupId": acme}, "timestamp": "2024-05-03T00:00:00Z"}),
        ),
        (
            "/v1/track",
            json!({"userId": ann, "event": "Invited", "context": {"externalIds": [{"type": "group_id", "id": acme, "collection": "accounts"}]}, "timestamp": "2024-05-04T00:00:00Z"}),
        ),
        ("/v1/group", json!({"userId": ann, "groupId": "null", "traits": {"name": "nobody"}})),
    ];
    for (path, body) in &sends {
        assert_eq!(s.post(path, body).await.0, 200, "{path} {body}");
    }
    // The account's events: every call that named it, newest first.
    let mut events = json!(null);
    for _ in 0..TestServer::patience() {
        let (status, body) = s.get(&format!("/v1/accounts/{acme}/events?limit=10")).await;
        if status == 200 && body["data"].as_array().map(Vec::len) == Some(4) {
            events = body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let kinds: Vec<&str> = events["data"]
        .as_array()
        .expect("four events")
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["track", "track", "group", "group"], "{events}");
    s.wait_for_events(&format!("user_id:{ann}"), 3).await;

    // Traits: the latest group call wins per trait; none leak to people.
    let (status, traits) = s.get(&format!("/v1/accounts/{acme}/traits")).await;
    assert_eq!(status, 200, "{traits}");
    assert_eq!(traits["traits"], json!({"name": "Acme", "plan": "enterprise", "email": "billing@acme.test"}));
    let (_, ann_traits) = s.get(&format!("/v1/profiles/user_id:{ann}/traits")).await;
    assert_eq!(ann_traits["traits"], json!({}), "group traits are the account's");
    // Members of one account are not one person, and the account's email
    // names no one.
    assert_eq!(identifiers_of(&s, &format!("user_id:{ann}")).await, [format!("user_id:{ann}")]);
    assert_eq!(s.get("/v1/profiles/email:billing@acme.test/traits").await.0, 404);

    // Users, paged two at a time, each with its profile.
    let (status, page1) = s.get(&format!("/v1/accounts/{acme}/users?limit=2")).await;
    assert_eq!(status, 200, "{page1}");
    assert_eq!(page1["cursor"]["has_more"], true, "{page1}");
    let next = page1["cursor"]["url"].as_str().expect("next url").to_owned();
    let (status, page2) = s.get(&next).await;
    assert_eq!(status, 200, "{page2}");
    let mut members: Vec<String> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["data"].as_array().unwrap())
        .map(|m| {
            assert!(m["profile_id"].is_string() && m["created_at"].is_string(), "{m}");
            format!("{}:{}", m["type"].as_str().unwrap(), m["id"].as_str().unwrap())
        })
        .collect();
    members.sort();
    assert_eq!(
        members,
        sorted(vec![format!("user_id:{ann}"), format!("user_id:{bob}"), format!("anonymous_id:{visitor}")])
    );

    // Metadata: the account's first and last seen, from its record.
    let (status, meta) = s.get(&format!("/v1/accounts/{acme}/metadata")).await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["metadata"]["created_at"], "2024-05-01T00:00:00.000Z", "{meta}");
    assert_eq!(meta["metadata"]["holder"], format!("group_id:{acme}"));

    // Links, both ways.
    let (status, links) = s.get(&format!("/v1/profiles/user_id:{ann}/links")).await;
    assert_eq!(status, 200, "{links}");
    assert_eq!(links["data"].as_array().map(Vec::len), Some(1), "the blocked groupId names no account: {links}");
    assert_eq!(links["data"][0]["to_collection"], "accounts");
    assert_eq!(links["data"][0]["external_ids"][0]["id"], acme.as_str());
    let (status, back) = s.get(&format!("/v1/accounts/{acme}/links")).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["data"].as_array().map(Vec::len), Some(3), "{back}");

    // Segment's paths serve the accounts collection too.
    let other = s.create_workspace("segment-accounts").await;
    let client = reqwest::Client::new();
    let send = client
        .post(s.url("/v1/group"))
        .basic_auth(&other.write_key, Some(""))
        .json(&group(&ann, json!({"name": "Acme"}), "2024-05-01T00:00:00Z"))
        .send()
        .await
        .expect("send");
    assert_eq!(send.status(), 200);
    let seg = |collection: &str, r: &str, route: &str| {
        s.url(&format!(
            "/v1/spaces/{}/collections/{collection}/profiles/{r}/{route}",
            other.workspace_id
        ))
    };
    let get = |url: String| {
        let client = client.clone();
        let token = other.token.clone();
        async move { read(client.get(url).bearer_auth(token).send().await.expect("get")).await }
    };
    let mut seg_traits = json!(null);
    for _ in 0..TestServer::patience() {
        let (status, b) = get(seg("accounts", &format!("group_id:{acme}"), "traits")).await;
        if status == 200 {
            seg_traits = b;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seg_traits["traits"], json!({"name": "Acme"}), "{seg_traits}");
    let (status, links) = get(seg("users", &format!("user_id:{ann}"), "links")).await;
    assert_eq!(status, 200, "{links}");
    assert_eq!(links["data"][0]["external_ids"][0]["type"], "group_id", "{links}");
    assert_eq!(get(seg("accounts", &format!("user_id:{ann}"), "traits")).await.0, 404);

    // An account is not a person, and a person is not an account.
    assert_eq!(s.get(&format!("/v1/profiles/group_id:{acme}/traits")).await.0, 404);
    assert_eq!(s.get(&format!("/v1/accounts/{}/traits", uid())).await.0, 404);
    let (status, body) = s
        .admin(reqwest::Method::POST, "/v1/profiles/merge", &json!({"identifiers": [format!("user_id:{ann}"), format!("group_id:{acme}")]}))
        .await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("identifiers[1]")), "{body}");
    s.stop().await;
}
