//! The oracle test of the audience evaluator: under a simulated clock,
//! generated event streams (people who merge, late events, windows that
//! expire with no new event) go into the log minute by minute, and after
//! every simulated minute the streaming memberships and computed traits
//! must equal a batch recomputation from the log ([`AudienceModel`]).
//!
//! The projector and the evaluator run in this process on the backends of
//! each mode: the embedded log and store, and Kafka with Cassandra
//! (`deploy/local/engines up`). Midway, a new audience is defined: it is
//! backfilled from the start of the log and checked from when it is live.

mod common;

/// `common` asks; these tests open their backends themselves.
const DISTRIBUTED: bool = false;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trailmark::backends::Backends;
use trailmark::config::Config;
use trailmark_audiences::definitions::DefinitionInput;
use trailmark_audiences::{Definitions, Evaluator, EvaluatorConfig, Kind, read};
use trailmark_domain::audience::{AudienceModel, Evaluation};
use trailmark_domain::identity::profile_id;
use trailmark_domain::profile::ProfileModel;
use trailmark_domain::{Event, EventType, ManualClock};
use trailmark_http::Metrics;
use trailmark_log::Record;
use trailmark_projector::{Projector, ProjectorConfig};
use trailmark_schemas::EventCodec;

const MINUTE: i64 = 60_000_000;
/// 2027-01-15T00:00:00Z.
const T0: i64 = 1_800_000_000_000_000;
const MINUTES: i64 = 150;

/// A small deterministic generator (xorshift), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn audiences() -> Vec<(&'static str, Value)> {
    let at = |m: i64| trailmark_domain::time::format_micros(T0 + m * MINUTE);
    vec![
        (
            "pricing",
            json!({"event": "Viewed Pricing", "count": {"op": ">=", "value": 2},
                   "within": {"last": 30, "unit": "minutes"}}),
        ),
        (
            "buyer",
            json!({"and": [
                {"trait": "plan", "op": "!=", "value": "enterprise"},
                {"event": "Order Completed", "where": [{"property": "total", "op": ">=", "value": 50}],
                 "within": {"last": 45, "unit": "minutes"}}]}),
        ),
        (
            "mixed",
            json!({"or": [
                {"and": [{"seen": "first", "within": {"last": 60, "unit": "minutes"}},
                         {"not": {"audience": "pricing"}}]},
                {"audience": "buyer"},
                {"seen": "last", "within": {"last": 20, "unit": "minutes"}}]}),
        ),
        (
            "counts",
            json!({"or": [
                {"event": "Order Completed", "count": {"op": "<=", "value": 1}},
                {"event": "Order Completed", "count": {"op": "=", "value": 2},
                 "within": {"between": [at(30), at(90)]}},
                {"event": "$identify", "where": [{"property": "plan", "op": "in", "value": ["pro", "free"]}],
                 "count": {"op": "=", "value": 1}, "within": {"last": 40, "unit": "minutes"}}]}),
        ),
        (
            "spender",
            json!({"computed_trait": "spent_1h", "op": ">=", "value": 100}),
        ),
    ]
}

fn computed_traits() -> Vec<(&'static str, Value)> {
    vec![
        (
            "spent_1h",
            json!({"reducer": "sum", "event": "Order Completed", "property": "total",
                   "within": {"last": 1, "unit": "hours"}}),
        ),
        (
            "orders",
            json!({"reducer": "count", "event": "Order Completed"}),
        ),
        (
            "top_sku",
            json!({"reducer": "most_frequent", "event": "Order Completed", "property": "sku"}),
        ),
        (
            "skus",
            json!({"reducer": "unique_list", "event": "Order Completed", "property": "sku"}),
        ),
        (
            "last_plan",
            json!({"reducer": "last", "event": "Viewed Pricing", "property": "plan",
                   "within": {"last": 30, "unit": "minutes"}}),
        ),
    ]
}

/// Defined at minute 60: it needs new leaf states, so a backfill.
fn late_audience() -> (&'static str, Value) {
    (
        "pro_lookers",
        json!({"event": "Viewed Pricing", "where": [{"property": "plan", "op": "=", "value": "pro"}],
               "within": {"last": 90, "unit": "minutes"}}),
    )
}

/// This minute's events.
fn events_at(rng: &mut Rng, ws: &str, minute: i64, seq: &mut u64) -> Vec<Event> {
    const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
    const SKUS: [&str; 3] = ["hat", "mug", "tee"];
    let now = T0 + minute * MINUTE;
    // Quiet spells: windows expire with no new event.
    let n = if matches!(minute, 40..80 | 115..150) {
        0
    } else {
        rng.below(4)
    };
    let mut out = Vec::new();
    for _ in 0..n {
        *seq += 1;
        let anon = format!("a{}", rng.below(6));
        let user = rng.chance(35).then(|| format!("u{}", rng.below(4)));
        let late = rng.chance(20);
        let timestamp = if late {
            now - (rng.below(90) as i64 + 1) * MINUTE
        } else {
            now - rng.below(50) as i64 * 1_000_000
        };
        let v = rng.below(256);
        let (kind, event, properties, traits) = match rng.below(10) {
            0..=2 => (
                EventType::Track,
                Some("Viewed Pricing"),
                Some(json!({"plan": PLANS[(v % 3) as usize]})),
                None,
            ),
            3..=5 => (
                EventType::Track,
                Some("Order Completed"),
                Some(json!({"total": v as f64 / 2.0, "sku": SKUS[(v % 3) as usize]})),
                None,
            ),
            6 | 7 => (
                EventType::Identify,
                None,
                None,
                Some(json!({"plan": PLANS[(v % 3) as usize]})),
            ),
            8 => (EventType::Page, None, Some(json!({"path": "/"})), None),
            _ => (EventType::Alias, None, None, None),
        };
        let (user_id, anonymous_id, previous_id) = if kind == EventType::Alias {
            (
                Some(user.unwrap_or_else(|| format!("u{}", v % 4))),
                None,
                Some(anon),
            )
        } else {
            (user, Some(anon), None)
        };
        let ev = Event {
            workspace_id: ws.to_owned(),
            source_id: "src_oracle".into(),
            message_id: format!("m{seq:05}"),
            kind,
            user_id,
            anonymous_id,
            event: event.map(str::to_owned),
            name: (kind == EventType::Page).then(|| "Home".to_owned()),
            category: None,
            group_id: None,
            previous_id,
            timestamp,
            original_timestamp: None,
            sent_at: None,
            received_at: now,
            properties: properties.map(|p| p.to_string()),
            traits: traits.map(|t| t.to_string()),
            context: None,
            integrations: None,
            request_ip: None,
            blocked_ids: vec![],
            control: None,
        };
        // Now and then a client retry: the same message, a second later.
        if rng.chance(5) {
            let mut again = ev.clone();
            again.received_at += 1_000_000;
            out.push(ev);
            out.push(again);
        } else {
            out.push(ev);
        }
    }
    out
}

struct Harness {
    backends: Arc<Backends>,
    clock: Arc<ManualClock>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    codec: Arc<EventCodec>,
    metrics: Arc<Metrics>,
}

impl Harness {
    async fn start(backends: Arc<Backends>, clock: Arc<ManualClock>) -> Self {
        let codec = Arc::new(EventCodec::new().expect("codec"));
        let metrics = Arc::new(Metrics::new());
        let (stop, rx) = tokio::sync::watch::channel(false);
        let projector = Projector::new(
            backends.log.clone(),
            backends.store.clone(),
            codec.clone(),
            metrics.clone(),
            ProjectorConfig {
                poll_wait: Duration::from_millis(20),
                ..ProjectorConfig::default()
            },
        );
        let evaluator = Evaluator::new(
            backends.log.clone(),
            backends.store.clone(),
            backends.directory.clone(),
            codec.clone(),
            clock.clone(),
            metrics.clone(),
            EvaluatorConfig {
                poll_wait: Duration::from_millis(20),
                sweep_interval: Duration::from_millis(20),
                refresh_interval: Duration::from_millis(50),
                size_interval: Duration::from_secs(3_600),
                ..EvaluatorConfig::default()
            },
        );
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let p = tokio::spawn({
            let rx = rx.clone();
            async move { projector.run(stopped(rx)).await.expect("projector") }
        });
        let e = tokio::spawn(async move { evaluator.run(stopped(rx)).await.expect("evaluator") });
        Self {
            backends,
            clock,
            stop,
            tasks: vec![p, e],
            codec,
            metrics,
        }
    }

    async fn append(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let records = events
            .iter()
            .map(|e| Record {
                key: e.partition_key(),
                payload: self.codec.encode(e).expect("encode"),
            })
            .collect();
        self.backends.log.append(records).await.expect("append");
    }

    /// Waits until the evaluator has read the whole log, swept to the
    /// clock's time, and has nothing in hand.
    async fn settle(&self) {
        let started = Instant::now();
        loop {
            let ends = self.backends.log.end_positions().await.expect("ends");
            let p = read::progress(&*self.backends.store)
                .await
                .expect("progress");
            let read_all = ends
                .iter()
                .enumerate()
                .all(|(i, end)| p.positions.get(&(i as u32)).copied().unwrap_or(0) >= *end);
            if read_all && p.swept_to >= self.clock_now() && !p.busy {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the evaluator did not settle: {p:?}, log ends {ends:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn clock_now(&self) -> i64 {
        trailmark_domain::Clock::now_micros(&*self.clock)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.expect("task");
        }
        self.backends.close();
    }
}

/// The streaming answer for every profile the model knows, in the model's
/// shape: memberships and computed traits by key.
async fn streamed(
    backends: &Backends,
    ws: &str,
    model: &BTreeMap<trailmark_domain::Identifier, Evaluation>,
    ids: &BTreeMap<String, String>,
) -> BTreeMap<trailmark_domain::Identifier, Evaluation> {
    let mut out = BTreeMap::new();
    for (holder, expected) in model {
        let pid = profile_id(ws, holder);
        let record = read::profile_record(&*backends.store, ws, pid)
            .await
            .expect("record")
            .unwrap_or_default();
        let mut e = Evaluation::default();
        for key in expected.audiences.keys() {
            let id = &ids[key];
            e.audiences.insert(
                key.clone(),
                record.audiences.get(id).is_some_and(|s| s.member),
            );
        }
        for (id, s) in &record.traits {
            if let Some((key, _)) = ids.iter().find(|(_, v)| *v == id)
                && !s.value.is_null()
            {
                e.traits.insert(key.clone(), s.value.clone());
            }
        }
        out.insert(holder.clone(), e);
    }
    out
}

async fn oracle(config: Config, seed: u64) {
    // The definitions come first: a fresh evaluator runs them from the start.
    let backends = Arc::new(Backends::open(&config).await.expect("open"));
    let ws = backends
        .directory
        .create_workspace("oracle", None, None)
        .await
        .expect("workspace")
        .workspace
        .id;
    let clock = Arc::new(ManualClock::new(T0));
    let defs = Definitions::with_clock(backends.directory.clone(), clock.clone());
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for (key, d) in computed_traits() {
        let r = defs
            .create(&ws, Kind::ComputedTrait, input(key, d))
            .await
            .expect("computed trait");
        ids.insert(key.into(), r.id);
    }
    for (key, d) in audiences() {
        let r = defs
            .create(&ws, Kind::Audience, input(key, d))
            .await
            .expect("audience");
        ids.insert(key.into(), r.id);
    }
    drop(defs);
    let h = Harness::start(backends, clock).await;
    let mut rng = Rng(seed);
    let mut seq = 0u64;
    let mut log: Vec<Event> = Vec::new();
    let mut late_id: Option<String> = None;
    let mut checked = 0;
    // Changes of the expected memberships, and those in quiet minutes (no
    // event arrived): the test is only as good as what changes in it.
    let mut previous: BTreeMap<(trailmark_domain::Identifier, String), bool> = BTreeMap::new();
    let (mut changes, mut quiet_changes) = (0, 0);
    for minute in 0..MINUTES {
        h.clock.set(T0 + minute * MINUTE);
        let batch = events_at(&mut rng, &ws, minute, &mut seq);
        let quiet = batch.is_empty();
        h.append(&batch).await;
        log.extend(batch);
        if minute == 60 {
            let (key, d) = late_audience();
            let defs = Definitions::with_clock(h.backends.directory.clone(), h.clock.clone());
            let r = defs
                .create(&ws, Kind::Audience, input(key, d))
                .await
                .expect("late audience");
            ids.insert(key.into(), r.id.clone());
            late_id = Some(r.id);
        }
        h.settle().await;
        // The late audience counts once it is live.
        let late_live = match &late_id {
            Some(id) => {
                let defs = Definitions::new(h.backends.directory.clone());
                let st = defs.status(&ws, id).await.expect("status");
                st.live_version == Some(1)
            }
            None => false,
        };
        let mut catalog_defs: Vec<(String, Value)> = audiences()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        if late_live {
            let (k, v) = late_audience();
            catalog_defs.push((k.to_owned(), v));
        }
        let model = batch_model(&ws, &ids, &catalog_defs, &log);
        let expected = model.evaluate(T0 + minute * MINUTE);
        let got = streamed(&h.backends, &ws, &expected, &ids).await;
        let want = expected_without_deadlines(&expected);
        if got != want {
            for (holder, e) in &want {
                if got.get(holder) == Some(e) {
                    continue;
                }
                let pid = profile_id(&ws, holder);
                let record = read::profile_record(&*h.backends.store, &ws, pid)
                    .await
                    .unwrap();
                let resolved = h.backends.store.resolve(&ws, holder).await.unwrap();
                if let Some(r) = h.backends.store.resolve(&ws, holder).await.unwrap() {
                    let view = model.profiles().profile(holder).unwrap();
                    for (id, named) in &r.identifiers {
                        eprintln!(
                            "  store {id}: {:?} | model {:?}",
                            named.first,
                            view.identifiers.get(id).map(|n| &n.first)
                        );
                    }
                }
                eprintln!(
                    "{holder}: model members {:?}\n  store resolves {:?}\n  record {:?}",
                    model.profiles().members(holder),
                    resolved.map(|r| (r.holder, r.identifiers.keys().cloned().collect::<Vec<_>>())),
                    record
                );
            }
        }
        assert_eq!(
            got,
            expected_without_deadlines(&expected),
            "seed {seed}, minute {minute}: streaming differs from the batch recomputation"
        );
        checked += expected.len();
        for (holder, e) in &expected {
            for (key, member) in &e.audiences {
                let was = previous.insert((holder.clone(), key.clone()), *member);
                if was.unwrap_or(false) != *member {
                    changes += 1;
                    if quiet {
                        quiet_changes += 1;
                    }
                }
            }
        }
    }
    assert!(
        changes >= 30 && quiet_changes >= 5,
        "seed {seed}: too little happened ({changes} changes, {quiet_changes} in quiet minutes)"
    );
    assert!(late_id.is_some());
    assert!(checked > 100, "too few profiles checked: {checked}");
    // Profiles were carried over events, not only resolved afresh, and
    // streaming still equalled the batch recomputation.
    let resolutions = |outcome| {
        h.metrics
            .evaluator_resolutions
            .with_label_values(&[outcome])
            .get()
    };
    let (carried, read) = (resolutions("carried"), resolutions("read"));
    eprintln!("seed {seed}: profiles carried {carried}, read {read}");
    assert!(carried > 0 && read > 0, "carried {carried}, read {read}");
    h.stop().await;
}

fn expected_without_deadlines(
    e: &BTreeMap<trailmark_domain::Identifier, Evaluation>,
) -> BTreeMap<trailmark_domain::Identifier, Evaluation> {
    e.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            v.deadline = None;
            v.at = 0;
            v.audience_deadlines.clear();
            v.trait_deadlines.clear();
            // A computed trait with nothing in its window reads as absent.
            v.traits.retain(|_, t| !t.is_null());
            (k.clone(), v)
        })
        .collect()
}

/// The batch recomputation: the model folds the log in its order.
fn batch_model(
    ws: &str,
    ids: &BTreeMap<String, String>,
    audiences: &[(String, Value)],
    log: &[Event],
) -> AudienceModel {
    use trailmark_domain::audience::json::{computed_trait_from_json, condition_from_json};
    use trailmark_domain::audience::{AudienceDef, Catalog, TraitDef};
    let _ = ws;
    let catalog = Catalog::new(
        audiences
            .iter()
            .map(|(k, v)| AudienceDef {
                id: ids[k].clone(),
                key: k.clone(),
                version: 1,
                condition: condition_from_json(v, "definition").expect("audience"),
            })
            .collect(),
        computed_traits()
            .into_iter()
            .map(|(k, v)| TraitDef {
                id: ids[k].clone(),
                key: k.to_owned(),
                version: 1,
                definition: computed_trait_from_json(&v, "definition").expect("trait"),
            })
            .collect(),
    );
    let mut m = AudienceModel::new(ProfileModel::new(24 * 3_600 * 1_000_000), catalog);
    for ev in log {
        m.apply(ev).expect("fold");
    }
    m
}

fn input(key: &str, definition: Value) -> DefinitionInput {
    DefinitionInput {
        key: Some(key.to_owned()),
        name: Some(key.to_owned()),
        description: None,
        definition: Some(definition),
        query: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_batch_every_minute_embedded() {
    for seed in [
        0x9E37_79B9_7F4A_7C15,
        0xD1B5_4A32_D192_ED03,
        0x2545_F491_4F6C_DD1D,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        oracle(Config::for_test(dir.path()), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_batch_every_minute_on_kafka_and_cassandra() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = trailmark_testkit::name_for_path(dir.path());
    let mut config = Config::for_test(dir.path());
    config.log_uri = Some(format!(
        "kafka://{}/tm-oracle-{n}?partitions=4",
        common::kafka_brokers()
    ));
    config.store_uri = Some(format!(
        "scylla://{}/tm_oracle_{n}",
        common::cassandra_host()
    ));
    trailmark::backends::migrate(&config)
        .await
        .expect("migrate (are the engines up? `deploy/local/engines up`)");
    oracle(config, 0x2545_F491_4F6C_DD1D).await;
}
