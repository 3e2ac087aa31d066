// The end-to-end HTTP cases of audiences and computed traits, shared by
// `tests/http.rs` (one process) and `tests/distributed_http.rs` (role
// processes on Kafka and Cassandra, the evaluator among them). Included with
// `include!` after `cases/http.rs`, whose imports it uses.

mod audience_cases {
    use super::*;
    use std::time::Duration;

    /// Polls `path` until `check` holds on its body (or patience runs out),
    /// and returns the last body.
    async fn until(s: &TestServer, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..TestServer::patience() * 2 {
            let (status, body) = s.get(path).await;
            if status == 200 && check(&body) {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path} never satisfied the check; last: {last}")
    }

    async fn define(s: &TestServer, path: &str, body: Value) -> Value {
        let (status, created) = s.admin(reqwest::Method::POST, path, &body).await;
        assert_eq!(status, 201, "{created}");
        created
    }

    /// Previews a query, which must succeed.
    async fn preview(s: &TestServer, query: &str) -> Value {
        let (status, p) = s
            .admin(
                reqwest::Method::POST,
                "/v1/audiences/preview",
                &json!({ "query": query }),
            )
            .await;
        assert_eq!(status, 200, "{p}");
        p
    }

    /// Waits until the definition's newest version is live.
    async fn live(s: &TestServer, path: &str) -> Value {
        until(s, path, |b| b["status"] == "live").await
    }

    fn rfc3339(t: chrono_like::Micros) -> String {
        chrono_like::format(t)
    }

    /// Time formatting without another dependency: the domain's.
    mod chrono_like {
        pub type Micros = i64;
        pub fn now() -> Micros {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_micros() as i64
        }
        pub fn format(t: Micros) -> String {
            trailmark_domain::time::format_micros(t)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_audience_is_entered_on_events_and_exited_when_its_window_passes() {
        let s = TestServer::start().await;
        let user = format!("u-{}", uid());
        let created = define(
            &s,
            "/v1/audiences",
            json!({
                "key": "pricing_fans",
                "name": "Pricing fans",
                "query": "event('Viewed Pricing').within(1 minutes).count() >= 2 && trait('plan') != 'enterprise'",
            }),
        )
        .await;
        let id = created["id"].as_str().unwrap().to_owned();
        assert_eq!(created["version"], 1);
        live(&s, &format!("/v1/audiences/{id}")).await;
        // Two views, the first 50 s ago: in the window for about 10 s more.
        let now = chrono_like::now();
        for (i, ago) in [50_000_000i64, 1_000_000].iter().enumerate() {
            let (status, _) = s
                .post(
                    "/v1/track",
                    &json!({
                        "userId": user,
                        "event": "Viewed Pricing",
                        "messageId": format!("view-{user}-{i}"),
                        "timestamp": rfc3339(now - ago),
                    }),
                )
                .await;
            assert_eq!(status, 200);
        }
        let path = format!("/v1/profiles/user_id:{user}/audiences?include=history");
        let entered = until(&s, &path, |b| b["data"][0]["member"] == true).await;
        assert_eq!(entered["data"][0]["key"], "pricing_fans");
        assert_eq!(
            entered["data"][0]["history"][0]["cause"]["message_id"],
            format!("view-{user}-1")
        );
        // No new event: the sweep takes it out once the first view is a
        // minute old.
        let exited = until(&s, &path, |b| b["data"][0]["member"] == false).await;
        let history = exited["data"][0]["history"].as_array().unwrap().clone();
        assert_eq!(history.len(), 2, "{exited}");
        assert_eq!(history[1]["change"], "exited");
        assert_eq!(history[1]["cause"]["type"], "deadline");
        // The exit happened at the boundary: a minute after the first view.
        let boundary = rfc3339(now - 50_000_000 + 60_000_000);
        assert_eq!(history[1]["at"], boundary);
        let periods = exited["data"][0]["periods"].as_array().unwrap();
        assert_eq!(periods.len(), 1);
        assert_eq!(periods[0]["exited_at"], boundary);
        // Both changes are events in the profile's timeline, once each.
        let events = s.wait_for_events(&format!("user_id:{user}"), 4).await;
        let names: Vec<&str> = events
            .iter()
            .filter_map(|e| e["event"].as_str())
            .collect();
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("Audience"))
                .copied()
                .collect::<Vec<_>>(),
            vec!["Audience Entered", "Audience Exited"]
        );
        let exit = events
            .iter()
            .find(|e| e["event"] == "Audience Exited")
            .unwrap();
        assert_eq!(exit["properties"]["audience_key"], "pricing_fans");
        assert_eq!(exit["properties"]["audience_id"], id.as_str());
        assert_eq!(exit["properties"]["audience_version"], 1);
        assert_eq!(exit["properties"]["cause"]["type"], "deadline");
        // And they are not activity: the profile's counts hold the views only.
        let (_, meta) = s.get(&format!("/v1/profiles/user_id:{user}/metadata")).await;
        assert_eq!(meta["metadata"]["total_events"], 2, "{meta}");
        s.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_audience_route_works_and_bad_definitions_name_their_path() {
        let s = TestServer::start().await;
        // Bad definitions: 400 naming the path.
        let bad = |body: Value| {
            let s = &s;
            async move {
                let (status, b) = s.admin(reqwest::Method::POST, "/v1/audiences", &body).await;
                assert_eq!(status, 400, "{b}");
                (
                    b["error"]["field"].as_str().unwrap_or_default().to_owned(),
                    b,
                )
            }
        };
        let (field, _) = bad(json!({"key": "a", "definition": {"and": [{"trait": "x", "op": "~=", "value": 1}]}})).await;
        assert_eq!(field, "definition.and[0].op");
        let mut deep = json!({"trait": "x", "op": "exists"});
        for _ in 0..6 {
            deep = json!({"not": deep});
        }
        let (field, b) = bad(json!({"key": "a", "definition": deep})).await;
        assert!(field.starts_with("definition.not"), "{b}");
        assert!(b["error"]["message"].as_str().unwrap().contains("at most 6"), "{b}");
        let (field, b) = bad(json!({"key": "a", "query": "trait('plan') = 'x' && event('Signed Up'.count() >= 1"})).await;
        assert_eq!(field, "query");
        assert_eq!(b["error"]["position"], 40, "{b}");
        let (field, _) = bad(json!({"key": "Not A Key", "query": "trait('x').exists()"})).await;
        assert_eq!(field, "key");
        let (field, b) = bad(json!({"key": "a", "definition": {"event": "Audience Entered"}})).await;
        assert_eq!(field, "definition");
        assert!(b["error"]["message"].as_str().unwrap().contains("evaluator"), "{b}");

        // A cycle: a refers to b, then b to a.
        let a = define(&s, "/v1/audiences", json!({"key": "a", "query": "trait('x').exists()"})).await;
        let b = define(&s, "/v1/audiences", json!({"key": "b", "query": "audience('a') && trait('y') = 1"})).await;
        let a_id = a["id"].as_str().unwrap();
        let b_id = b["id"].as_str().unwrap();
        let (status, body) = s
            .admin(
                reqwest::Method::PUT,
                &format!("/v1/audiences/{a_id}"),
                &json!({"query": "audience('b')"}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("a -> b -> a"), "{body}");
        // A key is taken once.
        let (status, body) = s
            .admin(reqwest::Method::POST, "/v1/audiences", &json!({"key": "a", "query": "trait('z').exists()"}))
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        assert_eq!(body["error"]["field"], "key", "{body}");
        // An audience referred to cannot go.
        let (status, body) = s
            .admin(reqwest::Method::DELETE, &format!("/v1/audiences/{a_id}"), &json!({}))
            .await;
        assert_eq!(status, 400, "{body}");

        // Reading needs a token; defining needs an admin one.
        let (status, _) = read(
            s.client
                .get(s.url("/v1/audiences"))
                .basic_auth(WRITE_KEY, Some(""))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 403, "a write key cannot read");
        let (_, token) = s
            .admin(reqwest::Method::POST, "/v1/admin/tokens", &json!({"scope": "read"}))
            .await;
        let read_token = token["token"].as_str().unwrap().to_owned();
        let (status, _) = read(
            s.client
                .post(s.url("/v1/audiences"))
                .bearer_auth(&read_token)
                .json(&json!({"key": "c", "query": "trait('x').exists()"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 403);
        let (status, listed) = read(
            s.client
                .get(s.url("/v1/audiences?limit=1"))
                .bearer_auth(&read_token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(listed["data"].as_array().unwrap().len(), 1);
        assert_eq!(listed["cursor"]["has_more"], true);
        let next = listed["cursor"]["next"].as_str().unwrap();
        let (_, rest) = s.get(&format!("/v1/audiences?limit=1&next={next}")).await;
        assert_eq!(rest["data"].as_array().unwrap().len(), 1);
        assert_eq!(rest["cursor"]["has_more"], false);
        assert_ne!(listed["data"][0]["id"], rest["data"][0]["id"]);

        // Members: three people with x, two of them with y = 1.
        for (i, y) in [1, 1, 2].iter().enumerate() {
            s.post(
                "/v1/identify",
                &json!({"userId": format!("m{i}"), "traits": {"x": true, "y": y}}),
            )
            .await;
        }
        let a_live = live(&s, &format!("/v1/audiences/{a_id}")).await;
        assert_eq!(a_live["version"], 1);
        let b_path = format!("/v1/audiences/{b_id}");
        let sized = until(&s, &b_path, |v| v["size"] == 2).await;
        assert!(sized["size_as_of"].is_string(), "{sized}");
        assert!(sized["eval_lag_ms"].is_u64(), "{sized}");
        let (_, page1) = s.get(&format!("/v1/audiences/{b_id}/members?limit=1")).await;
        let next = page1["cursor"]["next"].as_str().unwrap();
        let (_, page2) = s
            .get(&format!("/v1/audiences/{b_id}/members?limit=1&cursor={next}"))
            .await;
        let mut members: Vec<String> = [&page1, &page2]
            .iter()
            .map(|p| p["data"][0]["identifier"].as_str().unwrap().to_owned())
            .collect();
        members.sort();
        assert_eq!(members, vec!["user_id:m0", "user_id:m1"]);
        assert_eq!(page2["cursor"]["has_more"], false);

        // A new version: y = 2 instead. It is backfilling, then live, and
        // the members change with it.
        let (status, v2) = s
            .admin(
                reqwest::Method::PUT,
                &b_path,
                &json!({"query": "audience('a') && trait('y') = 2", "name": "Bees"}),
            )
            .await;
        assert_eq!(status, 200, "{v2}");
        assert_eq!(v2["version"], 2);
        assert_eq!(v2["name"], "Bees");
        let v2_live = until(&s, &b_path, |v| v["live_version"] == 2 && v["size"] == 1).await;
        assert_eq!(v2_live["status"], "live");
        let (_, m2) = s.get("/v1/profiles/user_id:m2/audiences").await;
        let keys: Vec<&str> = m2["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, vec!["a", "b"]);
        let (_, m0) = s.get("/v1/profiles/user_id:m0/audiences?include=history").await;
        let b_hist = m0["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "b")
            .unwrap();
        assert_eq!(b_hist["member"], false);
        assert_eq!(b_hist["history"][1]["version"], 2);
        assert_eq!(b_hist["history"][1]["cause"]["type"], "definition");
        // Segment's class filter: memberships as traits.
        let (_, t) = s.get("/v1/profiles/user_id:m2/traits?class=audience").await;
        assert_eq!(t["traits"], json!({"a": true, "b": true}));

        // Preview, synchronously.
        let p = preview(&s, "trait('y') = 1").await;
        assert_eq!(p["count"], 2);
        assert_eq!(p["complete"], true);
        assert_eq!(p["sample"].as_array().unwrap().len(), 2);
        // Through the audiences it names (b names a): only m2 has y = 2.
        let p = preview(&s, "audience('b') && trait('x').exists()").await;
        assert_eq!(p["count"], 1, "{p}");
        assert_eq!(p["sample"], json!(["user_id:m2"]), "{p}");
        assert_eq!(p["evaluated"], 3, "{p}");

        // Delete b, then a.
        let (status, _) = s
            .admin(reqwest::Method::DELETE, &b_path, &json!({}))
            .await;
        assert_eq!(status, 204);
        let (status, _) = s.get(&b_path).await;
        assert_eq!(status, 404);
        let (status, _) = s
            .admin(reqwest::Method::DELETE, &format!("/v1/audiences/{a_id}"), &json!({}))
            .await;
        assert_eq!(status, 204);
        s.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn computed_traits_are_served_as_traits_and_change_only_when_they_change() {
        let s = TestServer::start().await;
        let spent = define(
            &s,
            "/v1/computed-traits",
            json!({
                "key": "spent",
                "definition": {"reducer": "sum", "event": "Order Completed",
                               "property": "total", "round": 1},
            }),
        )
        .await;
        let top = define(
            &s,
            "/v1/computed-traits",
            json!({
                "key": "top_sku",
                "definition": {"reducer": "most_frequent", "event": "Order Completed",
                               "property": "sku"},
            }),
        )
        .await;
        // An audience over a computed trait.
        define(
            &s,
            "/v1/audiences",
            json!({"key": "big_spenders", "query": "computed_trait('spent') >= 100"}),
        )
        .await;
        let (status, bad) = s
            .admin(
                reqwest::Method::POST,
                "/v1/computed-traits",
                &json!({"key": "x", "definition": {"reducer": "sum", "event": "E"}}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(bad["error"]["field"], "definition.property");
        for id in [&spent["id"], &top["id"]] {
            live(&s, &format!("/v1/computed-traits/{}", id.as_str().unwrap())).await;
        }
        let user = format!("buyer-{}", uid());
        let path = format!("/v1/profiles/user_id:{user}/traits?class=computed_trait");
        // Each order waits for the one before to be evaluated, so that each
        // change is seen (changes are decided per step of the evaluator: a
        // value that changes twice within one step changes once).
        let orders = [(60.04, "hat", 60.0), (40.0, "mug", 100.0), (0.06, "hat", 100.1), (0.01, "mug", 100.1)];
        for (i, (total, sku, spent_after)) in orders.iter().enumerate() {
            s.post(
                "/v1/track",
                &json!({"userId": user, "event": "Order Completed", "messageId": format!("o-{user}-{i}"),
                        "properties": {"total": total, "sku": sku}}),
            )
            .await;
            s.wait_for_events(&format!("user_id:{user}"), i + 1).await;
            until(&s, &path, |b| b["traits"]["spent"].as_f64() == Some(*spent_after)).await;
        }
        let t = until(&s, &path, |b| b["traits"]["top_sku"] == "hat").await;
        assert_eq!(t["traits"]["spent"], json!(100.1));
        let (_, meta) = s.get(&format!("/v1/profiles/user_id:{user}/metadata")).await;
        assert_eq!(meta["metadata"]["computed_traits"], json!(["spent", "top_sku"]));
        until(&s, &format!("/v1/profiles/user_id:{user}/audiences"), |b| {
            b["data"][0]["key"] == "big_spenders"
        })
        .await;
        // One change event per change of the rounded value: spent 60 →
        // 100 → 100.1 (the last order, +0.01, rounds to no change); top_sku
        // is "hat" from the first order on (a tie goes to the smaller value).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, page) = s
            .get(&format!("/v1/profiles/user_id:{user}/events?limit=200&event=Computed%20Trait%20Changed"))
            .await;
        let events = page["data"].as_array().unwrap().clone();
        let changes = |key: &str| {
            events
                .iter()
                .filter(|e| e["properties"]["trait_key"] == key)
                .count()
        };
        assert_eq!(changes("spent"), 3, "{page}");
        assert_eq!(changes("top_sku"), 1, "{page}");
        s.stop().await;
    }
}
