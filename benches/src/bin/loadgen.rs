//! The end-to-end load generator: drives a running Trailmark over HTTP and
//! reports throughput and latency, as a human summary and one JSON line.
//!
//! - `ingest`: `POST {url}/v1/batch` with `{"batch":[...]}` bodies of ~600-byte
//!   `track`/`page`/`identify` calls (the fixtures of `trailmark_benches`),
//!   authenticated with `Authorization: Basic base64(writeKey + ":")`. A 200
//!   means the server accepted the batch (its body says how many items);
//!   anything else counts as an error by status. Reports accepted events/s and
//!   request latency (p50/p99/p99.9/max, HdrHistogram).
//! - `visibility`: the same load, and for a sample of batches, the time from
//!   the batch's 200 to the moment one of its events' `messageId` shows in
//!   `GET {url}/v1/profiles/user_id:{userId}/events?limit=200&sort=desc&start=…`
//!   (the last minute; `Authorization: Bearer {token}`): how stale reads are
//!   under load.
//! - `lookup`: `GET {url}/v1/profiles/user_id:{id}/traits` at a fixed rate
//!   against people that exist (run `ingest` with the same `--users` first, or
//!   pass `--populate`), reporting p50/p99/p99.9 and the rate achieved.
//!
//! Every loop stops at `--duration` seconds or `--max-requests` requests,
//! whichever comes first, and every request has a timeout. Only `--url` is
//! ever contacted, and it must be a loopback address unless `--allow-remote`
//! is given, so a typo cannot point load at someone else's server.
//!
//! With `--rate`, requests are sent on a fixed schedule; when the server falls
//! behind, latency is also reported from each request's *intended* send time
//! (correcting for coordinated omission, as wrk2 does), and the achieved rate
//! shows the shortfall.
//!
//! Example (server on the default port):
//! `cargo run --release -p trailmark-benches --bin loadgen -- ingest --write-key wk_dev --concurrency 8 --duration 30`

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use trailmark_benches::{EventParams, Mix, Rng, UserPool, batch_body, call_json, identify_json};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for a running Trailmark server"
)]
struct Cli {
    /// The server's base URL; nothing else is contacted.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The query API's base URL when it is a separate process (the
    /// distributed mode); default: `--url`.
    #[arg(long, global = true)]
    query_url: Option<String>,
    /// Allow a --url that is not a loopback address.
    #[arg(long, global = true)]
    allow_remote: bool,
    /// Per-request timeout, in seconds.
    #[arg(long, global = true, default_value_t = 10)]
    request_timeout: u64,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Send batches and report accepted events/s and request latency.
    Ingest(LoadArgs),
    /// Send batches and measure how long accepted events take to be readable.
    Visibility(VisibilityArgs),
    /// Read profiles' traits at a fixed rate and report latency.
    Lookup(LookupArgs),
}

#[derive(Debug, Clone, Args)]
struct LoadArgs {
    /// The source's write key.
    #[arg(long, env = "TRAILMARK_WRITE_KEY")]
    write_key: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Target events per second across all connections; 0 sends as fast as
    /// the server answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Distinct people (userIds) the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The most batch requests to send.
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: u64,
    /// Gzip request bodies (`Content-Encoding: gzip`).
    #[arg(long)]
    gzip: bool,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which calls: `web` (track, page and identify, each with a userId and
    /// an anonymousId), `track` (tracks naming only a userId: no identity
    /// work) or `identity` (those tracks, with 5% identify from a new
    /// device and 5% alias).
    #[arg(long, default_value = "web", value_parser = ["web", "track", "identity"])]
    mix: String,
}

#[derive(Debug, Clone, Args)]
struct VisibilityArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// A secret token of the workspace, to read profiles.
    #[arg(long, env = "TRAILMARK_TOKEN")]
    token: String,
    /// Probe one event of every Nth accepted batch.
    #[arg(long, default_value_t = 10)]
    sample_every: u64,
    /// The most probes polling at once; samples beyond it are skipped (and
    /// counted), never queued, so a probe's clock starts at its batch's 200.
    #[arg(long, default_value_t = 16)]
    max_probes: usize,
    /// Pause between two reads of one probe, in milliseconds: the resolution.
    #[arg(long, default_value_t = 5)]
    poll_interval_ms: u64,
    /// Give up on an event that is not visible after this many seconds.
    #[arg(long, default_value_t = 30)]
    visibility_timeout: u64,
}

#[derive(Debug, Clone, Args)]
struct LookupArgs {
    /// A secret token of the workspace, to read profiles.
    #[arg(long, env = "TRAILMARK_TOKEN")]
    token: String,
    /// Lookups per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// People to look up: `user-00000000` up to this many, as `ingest` names them.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The most lookups to send.
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: u64,
    /// First identify every person (needs --write-key) and wait until each
    /// is readable.
    #[arg(long)]
    populate: bool,
    /// The source's write key, for --populate.
    #[arg(long, env = "TRAILMARK_WRITE_KEY")]
    write_key: Option<String>,
    /// Seed of the choice of people.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Name each profile by `user_id`, by `email` (as --populate's identify
    /// sets it) or by `profile_id` (read from each profile's metadata first).
    #[arg(long, default_value = "user_id", value_parser = ["user_id", "email", "profile_id"])]
    by: String,
}

/// Latency histograms in microseconds, from 1 µs to 5 minutes.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 300_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What one worker saw; workers keep their own and they are merged at the end,
/// so recording takes no lock.
#[derive(Debug)]
struct Stats {
    /// From sending the request to reading the whole response.
    latency: Histogram<u64>,
    /// From the request's scheduled send time (only with a rate).
    from_schedule: Histogram<u64>,
    requests: u64,
    ok: u64,
    accepted_events: u64,
    rejected_events: u64,
    request_bytes: u64,
    errors: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency: histogram(),
            from_schedule: histogram(),
            requests: 0,
            ok: 0,
            accepted_events: 0,
            rejected_events: 0,
            request_bytes: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Stats) {
        self.latency.add(&other.latency).expect("same bounds");
        self.from_schedule
            .add(&other.from_schedule)
            .expect("same bounds");
        self.requests += other.requests;
        self.ok += other.ok;
        self.accepted_events += other.accepted_events;
        self.rejected_events += other.rejected_events;
        self.request_bytes += other.request_bytes;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// Names a failed request for the error table: its status, or the transport failure.
fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else if e.is_body() || e.is_decode() {
        "body".into()
    } else {
        "transport".into()
    }
}

/// Hands out request slots: each worker asks for the next one, which is due
/// at `start + n / rate` (or now, without a rate), until the deadline or the
/// request budget runs out.
struct Pace {
    start: Instant,
    deadline: Instant,
    per_second: f64,
    issued: AtomicU64,
    max: u64,
}

impl Pace {
    fn new(per_second: f64, duration: Duration, max: u64) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: start + duration,
            per_second,
            issued: AtomicU64::new(0),
            max,
        }
    }

    /// The next slot's number and due time, after sleeping until it is due;
    /// `None` when the run is over.
    async fn next(&self) -> Option<(u64, Instant)> {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        if n >= self.max {
            return None;
        }
        let due = if self.per_second > 0.0 {
            self.start + Duration::from_secs_f64(n as f64 / self.per_second)
        } else {
            Instant::now()
        };
        if due >= self.deadline {
            return None;
        }
        // A slot due before the deadline is sent even if the timer wakes a
        // little after it (timers have millisecond granularity).
        tokio::time::sleep_until(due).await;
        Some((n, due))
    }
}

fn percentiles_ms(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1_000.0;
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "count": h.len(),
    })
}

fn describe_latency(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    let ms = |v: u64| v as f64 / 1_000.0;
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (n={})",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

fn describe_errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The base URL, checked to be a loopback address unless allowed otherwise.
fn base_url(raw: &str, allow_remote: bool) -> Result<String> {
    let url = Url::parse(raw).with_context(|| format!("--url {raw:?} is not a url"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("--url must be http or https");
    }
    let host = url.host_str().context("--url has no host")?;
    // IPv6 hosts come bracketed ("[::1]").
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        bail!("--url {raw} is not a loopback address; pass --allow-remote to load it anyway");
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

fn client(concurrency: usize, timeout: Duration) -> Result<Client> {
    Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(timeout)
        .build()
        .context("building the http client")
}

fn basic_auth(write_key: &str) -> Result<HeaderValue> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
    HeaderValue::from_str(&format!("Basic {encoded}")).context("write key is not a header value")
}

fn bearer(token: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(&format!("Bearer {token}")).context("token is not a header value")
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One event of an accepted batch, to look for in its person's timeline.
#[derive(Debug)]
struct Probe {
    user_id: String,
    message_id: String,
    acked: Instant,
}

/// What the visibility probes saw, shared by the probe tasks.
#[derive(Debug)]
struct ProbeStats {
    visible: Histogram<u64>,
    timed_out: u64,
    skipped: u64,
    read_errors: BTreeMap<String, u64>,
}

/// Everything the ingest workers share.
struct Ingest {
    client: Client,
    batch_url: String,
    auth: HeaderValue,
    args: LoadArgs,
    pace: Pace,
    probes: Option<Probing>,
}

/// The visibility side of an ingest run.
struct Probing {
    events_url: String,
    auth: HeaderValue,
    every: u64,
    poll: Duration,
    timeout: Duration,
    permits: Arc<Semaphore>,
    max: usize,
    stats: Arc<Mutex<ProbeStats>>,
}

/// The JSON body of a 200 from `/v1/batch`.
fn accepted_counts(body: &[u8]) -> Option<(u64, Vec<u64>)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("success")? != &Value::Bool(true) {
        return None;
    }
    let accepted = v.get("accepted")?.as_u64()?;
    let rejected = v
        .get("rejected")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|item| item.get("index").and_then(Value::as_u64))
                .collect()
        })
        .unwrap_or_default();
    Some((accepted, rejected))
}

async fn ingest_worker(ctx: Arc<Ingest>, worker: u64) -> Stats {
    let mut stats = Stats::new();
    let pool = UserPool::new(ctx.args.users);
    let mut rng = Rng::new(ctx.args.seed.wrapping_mul(0x9E37_79B9).wrapping_add(worker));
    let mix = match ctx.args.mix.as_str() {
        "track" => Mix::TrackOnly,
        "identity" => Mix::Identity,
        _ => Mix::Web,
    };
    while let Some((n, due)) = ctx.pace.next().await {
        let now = now_rfc3339();
        let mut first: Option<(String, String)> = None;
        let items: Vec<String> = (0..ctx.args.batch_size)
            .map(|_| {
                let user = pool.any(&mut rng);
                let message_id = uuid::Uuid::new_v4().to_string();
                let json = call_json(
                    mix,
                    &pool,
                    &EventParams {
                        user,
                        message_id: &message_id,
                        time: &now,
                    },
                    &mut rng,
                );
                first.get_or_insert_with(|| (pool.user_id(user), message_id));
                json
            })
            .collect();
        let body = batch_body(&items, &now).into_bytes();
        let body = if ctx.args.gzip { gzip(&body) } else { body };
        stats.request_bytes += body.len() as u64;
        let mut req = ctx
            .client
            .post(&ctx.batch_url)
            .header(AUTHORIZATION, ctx.auth.clone())
            .header(CONTENT_TYPE, "application/json");
        if ctx.args.gzip {
            req = req.header(CONTENT_ENCODING, "gzip");
        }
        stats.requests += 1;
        let sent = Instant::now();
        let outcome = match req.body(body).send().await {
            Ok(resp) => {
                let status = resp.status();
                resp.bytes().await.map(|b| (status, b))
            }
            Err(e) => Err(e),
        };
        let done = Instant::now();
        stats.latency.saturating_record(micros(done - sent));
        if ctx.pace.per_second > 0.0 {
            stats.from_schedule.saturating_record(micros(done - due));
        }
        let (status, body) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                stats.error(transport_error(&e));
                continue;
            }
        };
        if status != StatusCode::OK {
            stats.error(status.as_u16().to_string());
            continue;
        }
        let Some((accepted, rejected)) = accepted_counts(&body) else {
            stats.error("200 with unexpected body".into());
            continue;
        };
        stats.ok += 1;
        stats.accepted_events += accepted;
        stats.rejected_events += rejected.len() as u64;
        if let (Some(probing), Some((user_id, message_id))) = (&ctx.probes, first)
            && n % probing.every == 0
            && !rejected.contains(&0)
        {
            start_probe(probing, &ctx.client, user_id, message_id, done);
        }
    }
    stats
}

fn start_probe(p: &Probing, client: &Client, user_id: String, message_id: String, acked: Instant) {
    let Ok(permit) = p.permits.clone().try_acquire_owned() else {
        p.stats.lock().expect("probe stats lock").skipped += 1;
        return;
    };
    let probe = Probe {
        user_id,
        message_id,
        acked,
    };
    let client = client.clone();
    // Only the last minute of the timeline: the probe asks what a reader of
    // recent activity asks, and does not re-read a person's whole history
    // every few milliseconds (which measured the read, not the staleness).
    let since = (chrono::Utc::now() - chrono::Duration::seconds(60))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let url = format!(
        "{}&start={since}",
        p.events_url.replace("{user_id}", &probe.user_id)
    );
    let auth = p.auth.clone();
    let (poll, timeout, stats) = (p.poll, p.timeout, p.stats.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let deadline = probe.acked + timeout;
        loop {
            let seen = match client
                .get(&url)
                .header(AUTHORIZATION, auth.clone())
                .send()
                .await
            {
                Ok(resp) if resp.status() == StatusCode::OK => match resp.bytes().await {
                    Ok(body) => Ok(timeline_holds(&body, &probe.message_id)),
                    Err(e) => Err(transport_error(&e)),
                },
                // 404: the profile is not projected yet, which is what we wait for.
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND => Ok(false),
                Ok(resp) => Err(resp.status().as_u16().to_string()),
                Err(e) => Err(transport_error(&e)),
            };
            let now = Instant::now();
            {
                // A std mutex: held only to record, never across an await.
                let mut s = stats.lock().expect("probe stats lock");
                match seen {
                    Ok(true) => {
                        s.visible.saturating_record(micros(now - probe.acked));
                        return;
                    }
                    Ok(false) => {}
                    Err(kind) => *s.read_errors.entry(kind).or_default() += 1,
                }
                if now >= deadline {
                    s.timed_out += 1;
                    return;
                }
            }
            tokio::time::sleep(poll).await;
        }
    });
}

/// Whether an events page (`{"data":[{"message_id":...},...]}`) lists `message_id`.
fn timeline_holds(body: &[u8], message_id: &str) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("data")?.as_array().map(|d| {
                d.iter()
                    .any(|e| e.get("message_id").and_then(Value::as_str) == Some(message_id))
            })
        })
        .unwrap_or(false)
}

async fn run_ingest(
    cli: &Cli,
    args: LoadArgs,
    visibility: Option<&VisibilityArgs>,
) -> Result<Value> {
    if args.batch_size == 0 || args.concurrency == 0 {
        bail!("--batch-size and --concurrency must be at least 1");
    }
    let base = base_url(&cli.url, cli.allow_remote)?;
    let client = client(
        args.concurrency + visibility.map_or(0, |v| v.max_probes),
        Duration::from_secs(cli.request_timeout),
    )?;
    let query_base = base_url(
        cli.query_url.as_deref().unwrap_or(&cli.url),
        cli.allow_remote,
    )?;
    let probes = visibility
        .map(|v| -> Result<Probing> {
            Ok(Probing {
                events_url: format!(
                    "{query_base}/v1/profiles/user_id:{{user_id}}/events?limit=200&sort=desc"
                ),
                auth: bearer(&v.token)?,
                every: v.sample_every.max(1),
                poll: Duration::from_millis(v.poll_interval_ms),
                timeout: Duration::from_secs(v.visibility_timeout),
                permits: Arc::new(Semaphore::new(v.max_probes.max(1))),
                max: v.max_probes.max(1),
                stats: Arc::new(Mutex::new(ProbeStats {
                    visible: histogram(),
                    timed_out: 0,
                    skipped: 0,
                    read_errors: BTreeMap::new(),
                })),
            })
        })
        .transpose()?;
    let batches_per_second = args.rate as f64 / args.batch_size as f64;
    let ctx = Arc::new(Ingest {
        client,
        batch_url: format!("{base}/v1/batch"),
        auth: basic_auth(&args.write_key)?,
        pace: Pace::new(
            batches_per_second,
            Duration::from_secs(args.duration),
            args.max_requests,
        ),
        args: args.clone(),
        probes,
    });
    let workers: Vec<_> = (0..args.concurrency as u64)
        .map(|w| tokio::spawn(ingest_worker(ctx.clone(), w)))
        .collect();
    let mut stats = Stats::new();
    for w in workers {
        stats.merge(w.await.context("ingest worker panicked")?);
    }
    let elapsed = ctx.pace.start.elapsed().as_secs_f64();

    let mode = if visibility.is_some() {
        "visibility"
    } else {
        "ingest"
    };
    println!(
        "{mode}: {} for {elapsed:.1} s, concurrency {}, batch {} events, rate {}, {} people, gzip {}",
        ctx.batch_url,
        args.concurrency,
        args.batch_size,
        if args.rate == 0 {
            "unlimited".to_owned()
        } else {
            format!("{} events/s", args.rate)
        },
        args.users,
        args.gzip
    );
    let eps = stats.accepted_events as f64 / elapsed;
    println!(
        "  requests   {} sent, {} ok ({:.1}/s), {:.1} MB sent",
        stats.requests,
        stats.ok,
        stats.ok as f64 / elapsed,
        stats.request_bytes as f64 / 1e6
    );
    println!(
        "  events     {} accepted ({eps:.0}/s), {} rejected",
        stats.accepted_events, stats.rejected_events
    );
    println!("  errors     {}", describe_errors(&stats.errors));
    println!("  latency    {}", describe_latency(&stats.latency));
    if args.rate > 0 {
        println!("  from schedule {}", describe_latency(&stats.from_schedule));
    }
    let mut summary = json!({
        "mode": mode,
        "url": ctx.batch_url,
        "elapsed_s": elapsed,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "target_events_per_s": args.rate,
        "users": args.users,
        "gzip": args.gzip,
        "requests": stats.requests,
        "ok_requests": stats.ok,
        "accepted_events": stats.accepted_events,
        "accepted_events_per_s": eps,
        "rejected_events": stats.rejected_events,
        "errors": stats.errors,
        "latency_ms": percentiles_ms(&stats.latency),
        "latency_from_schedule_ms": if args.rate > 0 { percentiles_ms(&stats.from_schedule) } else { Value::Null },
    });

    if let Some(p) = &ctx.probes {
        // Wait for the probes still polling; each ends by its own timeout.
        let all = u32::try_from(p.max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(
            p.timeout + Duration::from_secs(cli.request_timeout),
            p.permits.acquire_many(all),
        )
        .await;
        let s = p.stats.lock().expect("probe stats lock");
        println!(
            "  visibility {} (from the batch's 200 to the read that first shows the event; poll every {} ms)",
            describe_latency(&s.visible),
            p.poll.as_millis()
        );
        println!(
            "             {} timed out after {} s, {} samples skipped (all probes busy), read errors: {}",
            s.timed_out,
            p.timeout.as_secs(),
            s.skipped,
            describe_errors(&s.read_errors)
        );
        summary["visibility_ms"] = percentiles_ms(&s.visible);
        summary["visibility_timed_out"] = json!(s.timed_out);
        summary["visibility_skipped"] = json!(s.skipped);
        summary["visibility_read_errors"] = json!(s.read_errors);
    }
    if stats.ok == 0 {
        println!("{summary}");
        bail!("no request succeeded");
    }
    Ok(summary)
}

/// Identifies every person of the pool, so lookups find them, then waits
/// until every one of them is readable (projection is asynchronous, and
/// partitions are projected in no particular order).
async fn populate(base: &str, client: &Client, args: &LookupArgs, timeout: Duration) -> Result<()> {
    let write_key = args
        .write_key
        .as_deref()
        .context("--populate needs --write-key (or TRAILMARK_WRITE_KEY)")?;
    let auth = basic_auth(write_key)?;
    let pool = UserPool::new(args.users);
    let mut rng = Rng::new(args.seed);
    let now = now_rfc3339();
    let ids: Vec<u64> = (0..pool.len()).collect();
    for chunk in ids.chunks(100) {
        let items: Vec<String> = chunk
            .iter()
            .map(|&user| {
                let message_id = uuid::Uuid::new_v4().to_string();
                identify_json(
                    &pool,
                    &EventParams {
                        user,
                        message_id: &message_id,
                        time: &now,
                    },
                    &mut rng,
                )
            })
            .collect();
        let resp = client
            .post(format!("{base}/v1/batch"))
            .header(AUTHORIZATION, auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(batch_body(&items, &now))
            .send()
            .await
            .context("populate: sending identify batch")?;
        if resp.status() != StatusCode::OK {
            bail!("populate: /v1/batch answered {}", resp.status());
        }
    }
    let token = bearer(&args.token)?;
    let deadline = Instant::now() + timeout;
    for user in 0..pool.len() {
        let url = format!("{base}/v1/profiles/user_id:{}/traits", pool.user_id(user));
        loop {
            let status = client
                .get(&url)
                .header(AUTHORIZATION, token.clone())
                .send()
                .await
                .map(|r| r.status());
            if matches!(status, Ok(StatusCode::OK)) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "populate: {} not readable after {timeout:?} ({status:?})",
                    pool.user_id(user)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("populated {} people", pool.len());
    Ok(())
}

async fn run_lookup(cli: &Cli, args: LookupArgs) -> Result<Value> {
    if args.rate == 0 || args.concurrency == 0 {
        bail!("--rate and --concurrency must be at least 1");
    }
    let base = base_url(&cli.url, cli.allow_remote)?;
    let timeout = Duration::from_secs(cli.request_timeout);
    let client = client(args.concurrency, timeout)?;
    if args.populate {
        populate(&base, &client, &args, Duration::from_secs(60)).await?;
    }
    let auth = bearer(&args.token)?;
    let pool = UserPool::new(args.users);
    let mut names = Vec::with_capacity(args.users as usize);
    for i in 0..args.users {
        let user = pool.user_id(i);
        names.push(match args.by.as_str() {
            "email" => format!("email:{user}@example.com"),
            "profile_id" => {
                let url = format!("{base}/v1/profiles/user_id:{user}/metadata");
                let meta: Value = client
                    .get(&url)
                    .header(AUTHORIZATION, auth.clone())
                    .send()
                    .await
                    .context("reading a profile id")?
                    .json()
                    .await
                    .context("reading a profile id")?;
                let pid = meta["metadata"]["profile_id"]
                    .as_str()
                    .with_context(|| format!("no profile id for {user}: {meta}"))?;
                format!("profile_id:{pid}")
            }
            _ => format!("user_id:{user}"),
        });
    }
    let names = Arc::new(names);
    let pace = Arc::new(Pace::new(
        args.rate as f64,
        Duration::from_secs(args.duration),
        args.max_requests,
    ));
    let workers: Vec<_> = (0..args.concurrency as u64)
        .map(|w| {
            let (client, auth, pace, base, names) = (
                client.clone(),
                auth.clone(),
                pace.clone(),
                base.clone(),
                names.clone(),
            );
            let pool = UserPool::new(args.users);
            let mut rng = Rng::new(args.seed.wrapping_mul(0x85EB_CA6B).wrapping_add(w));
            tokio::spawn(async move {
                let mut stats = Stats::new();
                while let Some((_, due)) = pace.next().await {
                    let name = &names[pool.any(&mut rng) as usize];
                    let url = format!("{base}/v1/profiles/{name}/traits");
                    stats.requests += 1;
                    let sent = Instant::now();
                    let outcome = match client
                        .get(&url)
                        .header(AUTHORIZATION, auth.clone())
                        .send()
                        .await
                    {
                        Ok(resp) => {
                            let status = resp.status();
                            resp.bytes().await.map(|_| status)
                        }
                        Err(e) => Err(e),
                    };
                    let done = Instant::now();
                    stats.latency.saturating_record(micros(done - sent));
                    stats.from_schedule.saturating_record(micros(done - due));
                    match outcome {
                        Ok(StatusCode::OK) => stats.ok += 1,
                        Ok(status) => stats.error(status.as_u16().to_string()),
                        Err(e) => stats.error(transport_error(&e)),
                    }
                }
                stats
            })
        })
        .collect();
    let mut stats = Stats::new();
    for w in workers {
        stats.merge(w.await.context("lookup worker panicked")?);
    }
    let elapsed = pace.start.elapsed().as_secs_f64();
    let achieved = stats.ok as f64 / elapsed;
    println!(
        "lookup: {base}/v1/profiles/{}:{{id}}/traits for {elapsed:.1} s, target {} /s, concurrency {}, {} people",
        args.by, args.rate, args.concurrency, args.users
    );
    println!(
        "  requests   {} sent, {} ok, achieved {achieved:.0}/s of {} /s",
        stats.requests, stats.ok, args.rate
    );
    println!("  errors     {}", describe_errors(&stats.errors));
    println!("  latency    {}", describe_latency(&stats.latency));
    println!("  from schedule {}", describe_latency(&stats.from_schedule));
    let summary = json!({
        "mode": "lookup",
        "url": format!("{base}/v1/profiles/{}:{{id}}/traits", args.by),
        "elapsed_s": elapsed,
        "target_per_s": args.rate,
        "achieved_per_s": achieved,
        "concurrency": args.concurrency,
        "users": args.users,
        "requests": stats.requests,
        "ok_requests": stats.ok,
        "errors": stats.errors,
        "latency_ms": percentiles_ms(&stats.latency),
        "latency_from_schedule_ms": percentiles_ms(&stats.from_schedule),
    });
    if stats.ok == 0 {
        println!("{summary}");
        bail!("no request succeeded");
    }
    Ok(summary)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let summary = match &cli.mode {
        Mode::Ingest(args) => run_ingest(&cli, args.clone(), None).await?,
        Mode::Visibility(v) => run_ingest(&cli, v.load.clone(), Some(v)).await?,
        Mode::Lookup(args) => run_lookup(&cli, args.clone()).await?,
    };
    // The last line is the machine-readable summary.
    println!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_without_allow_remote() {
        assert!(base_url("http://127.0.0.1:8080/", false).is_ok());
        assert_eq!(
            base_url("http://localhost:1/", false).unwrap(),
            "http://localhost:1"
        );
        assert!(base_url("http://[::1]:8080", false).is_ok());
        assert!(base_url("http://10.0.0.5:8080", false).is_err());
        assert!(base_url("http://example.com", false).is_err());
        assert!(base_url("http://example.com", true).is_ok());
        assert!(base_url("ftp://127.0.0.1", false).is_err());
    }

    #[test]
    fn reads_the_batch_response_contract() {
        let (n, rejected) = accepted_counts(
            br#"{"success":true,"accepted":98,"rejected":[{"index":3},{"index":7}]}"#,
        )
        .unwrap();
        assert_eq!((n, rejected), (98, vec![3, 7]));
        assert_eq!(
            accepted_counts(br#"{"success":true,"accepted":5}"#),
            Some((5, vec![]))
        );
        assert_eq!(accepted_counts(br#"{"success":false,"accepted":5}"#), None);
        assert_eq!(accepted_counts(b"not json"), None);
    }

    #[test]
    fn finds_a_message_in_an_events_page() {
        let page =
            br#"{"data":[{"message_id":"a"},{"message_id":"b"}],"cursor":{"has_more":false}}"#;
        assert!(timeline_holds(page, "b"));
        assert!(!timeline_holds(page, "c"));
        assert!(!timeline_holds(br#"{"data":{}}"#, "a"));
    }

    #[test]
    fn basic_auth_is_write_key_and_empty_password() {
        assert_eq!(basic_auth("wk_123").unwrap(), "Basic d2tfMTIzOg==");
    }

    #[tokio::test]
    async fn pace_spaces_slots_and_stops() {
        tokio::time::pause();
        let pace = Pace::new(1_000.0, Duration::from_millis(10), 1_000);
        let mut slots = Vec::new();
        while let Some((n, due)) = pace.next().await {
            slots.push((n, due - pace.start));
        }
        assert_eq!(slots.len(), 10);
        assert_eq!(slots[3], (3, Duration::from_millis(3)));
        let capped = Pace::new(0.0, Duration::from_secs(60), 5);
        let mut n = 0;
        while capped.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 5);
    }
}
