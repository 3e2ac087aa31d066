//! Fault injection for the distributed tests: driving `deploy/local/engines`,
//! loading ingest as an SDK would (retrying until acknowledged), checking that
//! every acknowledged event is projected exactly once, and measuring stalls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Role, TOKEN, WRITE_KEY, read};

/// Runs `deploy/local/engines ARGS`, which must succeed.
pub fn engines(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/engines");
    let status = std::process::Command::new(script)
        .args(args)
        .status()
        .expect("run deploy/local/engines");
    assert!(status.success(), "engines {args:?} failed");
}

/// Runs `deploy/local/engines ARGS` and returns what it printed.
pub fn engines_output(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/engines");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .expect("run deploy/local/engines");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `engines ARGS` off the async runtime.
pub async fn engines_async(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        engines(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("engines task");
}

/// Starts an engine (or a cluster node) again when dropped, even if the test
/// failed, so that later tests find it running; [`Restart::now`] starts it
/// at a chosen moment.
pub struct Restart(Option<Vec<String>>);

impl Restart {
    /// Will run `engines ARGS` (a `start`).
    pub fn new(args: &[&str]) -> Self {
        Self(Some(args.iter().map(|a| a.to_string()).collect()))
    }

    /// Starts it now, off the async runtime.
    pub async fn now(mut self) {
        let args = self.0.take().expect("armed");
        engines_async(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    }
}

impl Drop for Restart {
    fn drop(&mut self) {
        if let Some(args) = self.0.take() {
            engines(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

/// Sends batches of `Load` events for `users` users, retrying a batch (same
/// messageIds, as an SDK would) until it is acknowledged; returns the
/// acknowledged count per user. Stops after `batches` batches.
pub async fn load(
    ingest: String,
    tag: String,
    users: usize,
    batches: usize,
    per_batch: usize,
) -> BTreeMap<String, usize> {
    let client = reqwest::Client::new();
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    for b in 0..batches {
        let body = batch(&tag, b, per_batch, |i| {
            format!("{tag}-u{}", (b * per_batch + i) % users)
        });
        send_until_acked(&client, &ingest, &body, |_| {}).await;
        count_acked(&mut acked, &body);
    }
    acked
}

/// A batch of `n` `Load` events with messageIds `{tag}-{b}-{i}`.
fn batch(tag: &str, b: usize, n: usize, user: impl Fn(usize) -> String) -> Value {
    let items: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "type": "track",
                "event": "Load",
                "userId": user(i),
                "messageId": format!("{tag}-{b}-{i}"),
            })
        })
        .collect();
    json!({ "batch": items })
}

fn count_acked(acked: &mut BTreeMap<String, usize>, body: &Value) {
    for item in body["batch"].as_array().expect("batch") {
        *acked
            .entry(item["userId"].as_str().expect("userId").to_owned())
            .or_default() += 1;
    }
}

/// Posts `body` to `/v1/batch` until ingest answers 200, as an SDK retries:
/// 503 and transport errors are retried after 200 ms, anything else fails
/// the test. Reports every attempt's start, latency and status (0 for a
/// transport error) to `attempt`.
async fn send_until_acked(
    client: &reqwest::Client,
    ingest: &str,
    body: &Value,
    mut attempt: impl FnMut(Attempt),
) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let started = Instant::now();
        let sent = client
            .post(format!("{ingest}/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        let status = match &sent {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        attempt(Attempt {
            started,
            latency: started.elapsed(),
            status,
        });
        match status {
            200 => return,
            503 | 0 => {}
            other => panic!("unexpected status {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "a batch was not acknowledged within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn merge(into: &mut BTreeMap<String, usize>, from: BTreeMap<String, usize>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Waits until every user's count matches what was acknowledged, then checks
/// that the timeline holds each acknowledged event exactly once.
pub async fn assert_exactly_once(query: &str, acked: &BTreeMap<String, usize>, patience: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + patience;
    for (user, want) in acked {
        loop {
            let sent = client
                .get(format!("{query}/v1/profiles/user_id:{user}/metadata"))
                .bearer_auth(TOKEN)
                .send()
                .await;
            let (status, meta) = match sent {
                Ok(r) => read(r).await,
                Err(e) => (0, Value::String(e.to_string())),
            };
            let have = meta["metadata"]["event_counts"]["Load"]
                .as_u64()
                .unwrap_or(0) as usize;
            if status == 200 && have == *want {
                break;
            }
            assert!(
                have <= *want,
                "{user}: {have} counted, only {want} acknowledged"
            );
            assert!(
                Instant::now() < deadline,
                "{user}: {have} of {want} acknowledged events projected in time ({meta})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut events: Vec<Value> = Vec::new();
        let mut url = format!("{query}/v1/profiles/user_id:{user}/events?limit=200");
        loop {
            let (status, page) = read(
                client
                    .get(&url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .expect("events"),
            )
            .await;
            assert_eq!(status, 200, "{page}");
            events.extend(page["data"].as_array().expect("events").iter().cloned());
            if page["cursor"]["has_more"] != true {
                break;
            }
            let next = page["cursor"]["next"].as_str().expect("next");
            url = format!("{query}/v1/profiles/user_id:{user}/events?limit=200&next={next}");
        }
        let ids: BTreeSet<&str> = events
            .iter()
            .map(|e| e["message_id"].as_str().expect("message_id"))
            .collect();
        assert_eq!(ids.len(), *want, "{user}: each acknowledged event is there");
        assert_eq!(events.len(), *want, "{user}: and there once");
    }
}

/// The events a role's projector has applied, from its `/metrics`; `None`
/// while the role does not answer.
pub async fn applied_by(role: &Role) -> Option<u64> {
    applied_at(&reqwest::Client::new(), &role.base).await
}

/// Loads until both projectors have applied something: they split the
/// partitions between them. Returns the acknowledged count per user.
pub async fn warm_up(ingest: &Role, first: &Role, second: &Role) -> BTreeMap<String, usize> {
    let mut acked = load(ingest.base.clone(), "warm".into(), 40, 10, 20).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    while applied_by(first).await.unwrap_or(0) == 0 || applied_by(second).await.unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "both projectors get partitions");
        round += 1;
        let tag = format!("warm{round}");
        merge(&mut acked, load(ingest.base.clone(), tag, 40, 1, 20).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acked
}

/// One request to ingest.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub started: Instant,
    pub latency: Duration,
    /// The HTTP status, or 0 when the request failed in transport.
    pub status: u16,
}

/// What a [`PacedLoad`] sent and had acknowledged.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Acknowledged events per user.
    pub acked: BTreeMap<String, usize>,
    /// Every acknowledged messageId, with when ingest acknowledged it.
    pub ids: BTreeMap<String, Instant>,
    /// Every attempt, acknowledged or not.
    pub attempts: Vec<Attempt>,
}

/// A steady load on ingest from `clients` concurrent clients, each sending a
/// batch of `per_batch` events every `every` (retrying a batch until it is
/// acknowledged, so a stall slows it down as it would an SDK). Each client
/// has `users` users of its own.
pub struct PacedLoad {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl PacedLoad {
    pub fn start(
        ingest: &str,
        tag: &str,
        clients: usize,
        users: usize,
        per_batch: usize,
        every: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, ingest, tag) = (stop.clone(), ingest.to_owned(), format!("{tag}-c{c}"));
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut report = LoadReport::default();
                    let mut next = Instant::now();
                    let mut b = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let body = batch(&tag, b, per_batch, |i| {
                            format!("{tag}-u{}", (b * per_batch + i) % users)
                        });
                        send_until_acked(&client, &ingest, &body, |a| report.attempts.push(a))
                            .await;
                        count_acked(&mut report.acked, &body);
                        let at = Instant::now();
                        for item in body["batch"].as_array().expect("batch") {
                            let id = item["messageId"].as_str().expect("id");
                            report.ids.insert(id.to_owned(), at);
                        }
                        b += 1;
                        next = (next + every).max(Instant::now());
                        tokio::time::sleep_until(next.into()).await;
                    }
                    report
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the clients after their current batch is acknowledged.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for task in self.tasks {
            let r = task.await.expect("load client");
            merge(&mut all.acked, r.acked);
            all.ids.extend(r.ids);
            all.attempts.extend(r.attempts);
        }
        all.attempts.sort_by_key(|a| a.started);
        all
    }
}

/// Samples the total applied by some projectors every 250 ms, to find how
/// long projection paused.
pub struct ProgressWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, u64)>>,
}

impl ProgressWatch {
    pub fn start(projectors: &[&Role]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<String> = projectors.iter().map(|r| r.base.clone()).collect();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut last: BTreeMap<usize, u64> = BTreeMap::new();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for (i, url) in urls.iter().enumerate() {
                        if let Some(n) = applied_at(&client, url).await {
                            last.insert(i, n);
                        }
                    }
                    samples.push((Instant::now(), last.values().sum()));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                samples
            })
        };
        Self { stop, task }
    }

    pub async fn finish(self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("progress watch")
    }
}

async fn applied_at(client: &reqwest::Client, base: &str) -> Option<u64> {
    let text = client
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| {
            l.starts_with("trailmark_projector_events_total") && l.contains("outcome=\"applied\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .map(|n| n as u64)
}

/// A stretch of a fault test, for the stall report.
pub struct Window {
    pub name: String,
    pub from: Instant,
    pub to: Instant,
}

impl Window {
    pub fn new(name: &str, from: Instant, to: Instant) -> Self {
        Self {
            name: name.to_owned(),
            from,
            to,
        }
    }
}

/// Formats one line per window: ingest attempts, failed attempts, latency
/// p50/p99/max of attempts started in it, the longest time without an
/// acknowledgement, and the longest time projection made no progress.
pub fn stall_report(
    title: &str,
    windows: &[Window],
    attempts: &[Attempt],
    progress: &[(Instant, u64)],
) -> String {
    let mut out = format!(
        "{title}\n| window | s | requests | not 200 | p50 ms | p99 ms | max ms | longest without an ack, s | longest projector pause, s |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for w in windows {
        let inside: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.started >= w.from && a.started < w.to)
            .collect();
        let mut ms: Vec<f64> = inside
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if ms.is_empty() {
                0.0
            } else {
                ms[((ms.len() - 1) as f64 * p).round() as usize]
            }
        };
        let failed = inside.iter().filter(|a| a.status != 200).count();
        // Acknowledgements land at start + latency.
        let mut acks: Vec<Instant> = inside
            .iter()
            .filter(|a| a.status == 200)
            .map(|a| a.started + a.latency)
            .collect();
        acks.sort();
        let mut marks = vec![w.from];
        marks.extend(acks);
        marks.push(w.to);
        let no_ack = longest_gap(&marks);
        // Projection is paused from a sample until the next one that shows
        // progress.
        let mut moved = vec![w.from];
        let mut prev: Option<u64> = None;
        for (at, n) in progress
            .iter()
            .filter(|(at, _)| *at >= w.from && *at < w.to)
        {
            if prev.is_some_and(|p| *n > p) {
                moved.push(*at);
            }
            prev = Some(*n);
        }
        moved.push(w.to);
        let pause = longest_gap(&moved);
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            w.name,
            (w.to - w.from).as_secs_f64(),
            inside.len(),
            failed,
            q(0.5),
            q(0.99),
            q(1.0),
            no_ack.as_secs_f64(),
            pause.as_secs_f64(),
        ));
    }
    out
}

fn longest_gap(marks: &[Instant]) -> Duration {
    marks
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default()
}
