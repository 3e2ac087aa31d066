//! Exactly-once audience changes across SIGKILLs of the evaluator.
//!
//! People flip a trait on and off while an audience on it is defined, and
//! the evaluator is killed (SIGKILL, no chance to finish anything) several
//! times under that load and restarted. Afterwards, for every person, the
//! `Audience Entered` and `Audience Exited` events in the timeline must be
//! numbered 1, 2, 3, … with no gap and no repeat, alternate, agree with the
//! evaluator's history, and end in the membership the last trait decides.
//!
//! Embedded: the whole `trailmark serve` process is killed. Distributed:
//! only the `trailmark evaluator` process, among ingest, projector and query
//! API processes on Kafka and Cassandra (`deploy/local/engines up`).

mod common;

/// Roles spawn themselves here; `common` asks.
const DISTRIBUTED: bool = false;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TOKEN, WRITE_KEY};
use serde_json::{Value, json};

const PEOPLE: usize = 8;

/// Starts `trailmark serve` on port 0 over `dir`.
fn serve(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trailmark"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("TRAILMARK_BOOTSTRAP_WRITE_KEY", WRITE_KEY)
        .env("TRAILMARK_BOOTSTRAP_TOKEN", TOKEN)
        .env("TRAILMARK_SWEEP_INTERVAL_MS", "100")
        .env("TRAILMARK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn trailmark");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines.next().expect("an address").expect("line");
        if let Some(url) = line.strip_prefix("trailmark listening on ") {
            break url.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

/// Flips each person's `mode` on and off, a person per request, until told
/// to stop; returns each person's last acknowledged mode. Requests that
/// fail (the server is down) are retried with the same messageId.
async fn flip(
    ingest: Arc<std::sync::Mutex<String>>,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, bool> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let mut last = BTreeMap::new();
    let mut round = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let person = format!("p{}", round % PEOPLE);
        let on = (round / PEOPLE).is_multiple_of(2);
        let body = json!({"userId": person, "traits": {"mode": if on { "on" } else { "off" }},
                          "messageId": format!("flip-{round}")});
        loop {
            let url = ingest.lock().unwrap().clone();
            let ok = client
                .post(format!("{url}/v1/identify"))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last.insert(person, on);
        round += 1;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    last
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    let r = client
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("request");
    r.json().await.expect("json")
}

/// The checks, once the evaluator has caught up: see the module's doc.
async fn check(query: &str, last: &BTreeMap<String, bool>) {
    let client = reqwest::Client::new();
    let mut changes = 0;
    for (person, on) in last {
        // Caught up: the membership the last flip decides.
        let audiences_url =
            format!("{query}/v1/profiles/user_id:{person}/audiences?include=history");
        let started = Instant::now();
        let history = loop {
            let body = get(&client, &audiences_url).await;
            let member = body["data"][0]["member"].as_bool().unwrap_or(false);
            if member == *on && (body["data"][0]["history"].is_array() || !on) {
                break body;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{person} never reached member={on}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let recorded = history["data"][0]["history"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // The timeline, once the outbox is appended and projected.
        let events_url =
            format!("{query}/v1/profiles/user_id:{person}/events?limit=200&sort=asc&event=");
        let started = Instant::now();
        let (entered, exited) = loop {
            let e = get(&client, &format!("{events_url}Audience%20Entered")).await;
            let x = get(&client, &format!("{events_url}Audience%20Exited")).await;
            let e = e["data"].as_array().cloned().unwrap_or_default();
            let x = x["data"].as_array().cloned().unwrap_or_default();
            if e.len() + x.len() >= recorded.len() {
                break (e, x);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{person}: {} changes recorded, {} in the timeline",
                recorded.len(),
                e.len() + x.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut numbered: Vec<(u64, bool)> = entered
            .iter()
            .map(|e| (e["properties"]["transition"].as_u64().unwrap(), true))
            .chain(
                exited
                    .iter()
                    .map(|e| (e["properties"]["transition"].as_u64().unwrap(), false)),
            )
            .collect();
        numbered.sort();
        let expected: Vec<(u64, bool)> = (1..=numbered.len() as u64)
            .map(|n| (n, n % 2 == 1))
            .collect();
        assert_eq!(
            numbered, expected,
            "{person}: changes must be numbered 1.. with no gap or repeat, entering first"
        );
        assert_eq!(
            numbered.len(),
            recorded.len(),
            "{person}: the timeline and the evaluator's history disagree"
        );
        assert_eq!(
            numbered.last().map(|(_, m)| *m).unwrap_or(false),
            *on,
            "{person}"
        );
        changes += numbered.len();
    }
    assert!(
        changes >= PEOPLE * 2,
        "too few changes to test anything: {changes}"
    );
}

async fn define(query: &str) {
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{query}/v1/audiences"))
        .bearer_auth(TOKEN)
        .json(&json!({"key": "on", "query": "trait('mode') = 'on'"}))
        .send()
        .await
        .expect("define");
    assert_eq!(r.status(), 201);
}

fn sigkill(child: &mut Child) {
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_serve_neither_loses_nor_doubles_a_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, url) = serve(dir.path());
    define(&url).await;
    let ingest = Arc::new(std::sync::Mutex::new(url));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(flip(ingest.clone(), stop.clone()));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        sigkill(&mut child);
        let (c, u) = serve(dir.path());
        child = c;
        *ingest.lock().unwrap() = u;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::SeqCst);
    let last = load.await.expect("load");
    let url = ingest.lock().unwrap().clone();
    check(&url, &last).await;
    sigkill(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_evaluator_process_neither_loses_nor_doubles_a_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = trailmark::config::Config::for_test(dir.path());
    config.bootstrap.write_key = Some(WRITE_KEY.into());
    config.bootstrap.token = Some(TOKEN.into());
    config.evaluator.sweep_interval_ms = 100;
    common::prepare_distributed(dir.path(), config).await;
    let ingest = common::spawn_role(dir.path(), "ingest", "ingest").await;
    let projector = common::spawn_role(dir.path(), "projector", "projector").await;
    let query = common::spawn_role(dir.path(), "query-api", "query-api").await;
    let mut evaluator = common::spawn_role(dir.path(), "evaluator", "evaluator").await;
    define(&query.base).await;
    let url = Arc::new(std::sync::Mutex::new(ingest.base.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(flip(url, stop.clone()));
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        evaluator.kill().await;
        evaluator = common::spawn_role(dir.path(), "evaluator", &format!("evaluator-{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::SeqCst);
    let last = load.await.expect("load");
    check(&query.base, &last).await;
    for r in [evaluator, ingest, projector, query] {
        r.terminate().await;
    }
}
