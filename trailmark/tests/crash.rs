//! Crash safety: `SIGKILL` a real `trailmark serve` process while a load runs,
//! restart it, and check that every acknowledged event is in its timeline
//! exactly once and that the counts are exact.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const WRITE_KEY: &str = "wk_crash";
const TOKEN: &str = "tmk_crash";
const USERS: usize = 6;

/// Starts `trailmark serve` on port 0 over `dir` and returns it with its URL.
fn spawn(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trailmark"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("TRAILMARK_BOOTSTRAP_WRITE_KEY", WRITE_KEY)
        .env("TRAILMARK_BOOTSTRAP_TOKEN", TOKEN)
        .env("TRAILMARK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn trailmark");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("trailmark printed its address")
            .expect("line");
        if let Some(url) = line.strip_prefix("trailmark listening on ") {
            break url.to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, BTreeSet<String>>,
    sent: usize,
}

async fn load(url: String, ledger: Arc<Mutex<Ledger>>, worker: usize) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    for round in 0.. {
        let user = format!("crash-user-{}", (worker + round) % USERS);
        let ids: Vec<String> = (0..20).map(|i| format!("w{worker}-r{round}-{i}")).collect();
        let batch: Vec<Value> = ids
            .iter()
            .map(|id| {
                json!({"type": "track", "userId": user, "event": "Crash Test", "messageId": id,
                       "properties": {"padding": "x".repeat(300)}})
            })
            .collect();
        ledger.lock().unwrap().sent += ids.len();
        let resp = client
            .post(format!("{url}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"batch": batch}))
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == 200 => {
                ledger
                    .lock()
                    .unwrap()
                    .acked
                    .entry(user)
                    .or_default()
                    .extend(ids);
            }
            // The process is gone: stop.
            _ => return,
        }
    }
}

async fn timeline(client: &reqwest::Client, url: &str, user: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut next = String::new();
    loop {
        let mut q = format!("{url}/v1/profiles/user_id:{user}/events?limit=200&sort=asc");
        if !next.is_empty() {
            q.push_str(&format!("&next={next}"));
        }
        let resp = client
            .get(q)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("events");
        if resp.status() == 404 {
            return ids;
        }
        let body: Value = resp.json().await.expect("json");
        ids.extend(
            body["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|e| e["message_id"].as_str().expect("message_id").to_owned()),
        );
        if body["cursor"]["has_more"] != true {
            return ids;
        }
        next = body["cursor"]["next"].as_str().expect("next").to_owned();
    }
}

async fn total_events(client: &reqwest::Client, url: &str, user: &str) -> u64 {
    let resp = client
        .get(format!("{url}/v1/profiles/user_id:{user}/metadata"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("metadata");
    if resp.status() != 200 {
        return 0;
    }
    let body: Value = resp.json().await.expect("json");
    body["metadata"]["total_events"].as_u64().expect("total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for crash in 0..2 {
        let (mut child, url) = spawn(dir.path());
        let workers: Vec<_> = (0..8)
            .map(|w| tokio::spawn(load(url.clone(), ledger.clone(), w + crash * 100)))
            .collect();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        for w in workers {
            w.await.expect("worker");
        }
    }
    let acked_total: usize = ledger
        .lock()
        .unwrap()
        .acked
        .values()
        .map(BTreeSet::len)
        .sum();
    let sent = ledger.lock().unwrap().sent;
    eprintln!("{acked_total} events acknowledged of {sent} sent across two SIGKILLs");
    assert!(
        acked_total > 100,
        "the load got going before the kills ({acked_total} acked)"
    );

    let (mut child, url) = spawn(dir.path());
    let client = reqwest::Client::new();
    let acked = std::mem::take(&mut ledger.lock().unwrap().acked);
    let deadline = Instant::now() + Duration::from_secs(60);
    for (user, ids) in &acked {
        // Wait for the projector to catch up with this user.
        let mut got = timeline(&client, &url, user).await;
        while got.len() < ids.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            got = timeline(&client, &url, user).await;
        }
        let unique: BTreeSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "{user}: no event appears twice");
        let missing: Vec<_> = ids.iter().filter(|id| !unique.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{user}: acknowledged events lost: {missing:?}"
        );
        // Counts are exact: one per distinct event in the timeline (events
        // that were in flight at a kill may be there too, never twice).
        assert_eq!(
            total_events(&client, &url, user).await,
            got.len() as u64,
            "{user}"
        );
    }
    child.kill().expect("kill");
    child.wait().expect("reaped");
}
