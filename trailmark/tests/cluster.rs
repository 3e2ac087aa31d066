//! The distributed mode on replicated engines (issue 12): three KRaft nodes
//! and three Cassandra nodes on loopback (`deploy/local/engines cluster up`),
//! topics at replication 3 with `min.insync.replicas=2`, the store at
//! replication 3 and `LOCAL_QUORUM`, and ingest, two projectors and the
//! query API as separate processes of the built binary. Under a paced load
//! of about 300 events/s:
//!
//! - the leader broker of a busy partition is killed, and then the KRaft
//!   controller leader: ingest may answer 503 while it cannot reach the
//!   in-sync replicas, the client retries, and every acknowledged event is in
//!   its timeline exactly once, with exact counts;
//! - a Cassandra node is killed: the projectors keep applying; once it is
//!   back and its peers' hints are delivered, a read from that node alone
//!   finds every event acknowledged since the kill (what it was still
//!   applying when it died is counted and printed: repair's job, not hints');
//! - a broker and a Cassandra node are killed at the same moment, then all
//!   three Cassandra nodes are restarted one after another: nothing
//!   acknowledged is lost or doubled.
//!
//! Each test prints its stall report (ingest latency and the projectors'
//! pause before, during and after each fault), which `benches/RESULTS.md`
//! records. The tests are `#[ignore]`d: `scripts/test` runs them after the
//! other suites, on the cluster, with the test binary already built:
//! `cargo test --test cluster -- --ignored --test-threads=1 --nocapture`.

mod common;

/// Roles are separate processes on Kafka and Cassandra.
const DISTRIBUTED: bool = true;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{
    LoadReport, PacedLoad, ProgressWatch, Restart, Window, assert_exactly_once, engines_async,
    engines_output, merge, stall_report, warm_up,
};
use common::{Role, TOKEN, WRITE_KEY, prepare_distributed_on, spawn_role};
use futures_util::TryStreamExt;
use trailmark::config::Config;

const KAFKA: &str = "127.0.0.1:9092,127.0.0.2:9092,127.0.0.3:9092";
const CASSANDRA: &str = "127.0.0.1:9042,127.0.0.2:9042,127.0.0.3:9042";

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A topic and keyspace of the test's own on the cluster, with ingest, the
/// query API and two projectors running on them.
struct Deployment {
    /// The tests share the cluster's nodes: one at a time.
    _one: tokio::sync::MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    topic: String,
    keyspace: String,
    ingest: Role,
    query: Role,
    projectors: [Role; 2],
    /// What the warm-up had acknowledged.
    acked: BTreeMap<String, usize>,
}

impl Deployment {
    async fn start() -> Self {
        let one = ONE_AT_A_TIME.lock().await;
        healthy_cluster().await;
        let dir = tempfile::tempdir().unwrap();
        let n = trailmark_testkit::name_for_path(dir.path());
        let (topic, keyspace) = (format!("tm-cl-{n}"), format!("tm_cl_{n}"));
        let mut config = Config::for_test(dir.path());
        config.bootstrap.write_key = Some(WRITE_KEY.into());
        config.bootstrap.token = Some(TOKEN.into());
        prepare_distributed_on(
            dir.path(),
            config,
            format!("kafka://{KAFKA}/{topic}?partitions=6&replication=3"),
            format!("scylla://{CASSANDRA}/{keyspace}?replication_factor=3"),
        )
        .await;
        let ingest = spawn_role(dir.path(), "ingest", "ingest").await;
        let query = spawn_role(dir.path(), "query-api", "query-api").await;
        let first = spawn_role(dir.path(), "projector", "projector-1").await;
        let second = spawn_role(dir.path(), "projector", "projector-2").await;
        let acked = warm_up(&ingest, &first, &second).await;
        Self {
            _one: one,
            dir,
            topic,
            keyspace,
            ingest,
            query,
            projectors: [first, second],
            acked,
        }
    }

    /// Starts a deployment (one test at a time) and a load of about 300
    /// events/s on it: 4 clients, a batch of 15 every 200 ms each, 100 users
    /// per client, watching the projectors' progress. Returns after `settle`
    /// seconds of load, with when the load started.
    async fn under_load(tag: &str, settle: u64) -> (Self, PacedLoad, ProgressWatch, Instant) {
        let d = Self::start().await;
        let [first, second] = &d.projectors;
        let every = Duration::from_millis(200);
        let load = PacedLoad::start(&d.ingest.base, tag, 4, 100, 15, every);
        let watch = ProgressWatch::start(&[first, second]);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(settle)).await;
        (d, load, watch, t0)
    }

    /// Every acknowledged event, the warm-up's and `report`'s, is projected
    /// exactly once (read at `LOCAL_QUORUM` through the query API).
    async fn assert_exactly_once(&mut self, report: &LoadReport) {
        merge(&mut self.acked, report.acked.clone());
        assert_exactly_once(&self.query.base, &self.acked, Duration::from_secs(240)).await;
    }

    async fn stop(self) -> (tempfile::TempDir, String) {
        let [first, second] = self.projectors;
        for role in [self.ingest, self.query, first, second] {
            role.terminate().await;
        }
        (self.dir, self.keyspace)
    }
}

/// Waits until all six nodes answer and the ring has three nodes up.
async fn healthy_cluster() {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = tokio::task::spawn_blocking(|| engines_output(&["cluster", "status"]))
            .await
            .unwrap();
        let running = status.lines().filter(|l| l.contains(": running")).count();
        let up = status.lines().filter(|l| l.starts_with("UN ")).count();
        if running == 6 && up == 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster is not healthy (`deploy/local/engines cluster up`):\n{status}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until cassandra-`n` sees three nodes up and normal.
async fn ring_of_three(n: u8) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = n.to_string();
        let status = tokio::task::spawn_blocking(move || {
            engines_output(&["cluster", "nodetool", &n, "status"])
        })
        .await
        .unwrap();
        if status.lines().filter(|l| l.starts_with("UN ")).count() == 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the ring did not recover:\n{status}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The node id of the broker leading `partition` of `topic`.
async fn partition_leader(topic: &str, partition: i32) -> i32 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .create()
            .expect("metadata client");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        metadata.topics()[0]
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .expect("partition")
            .leader()
    })
    .await
    .unwrap()
}

/// The node id of the KRaft quorum's leader.
async fn controller_leader() -> String {
    let out = tokio::task::spawn_blocking(|| engines_output(&["cluster", "controller"]))
        .await
        .unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("controller: "))
        .unwrap_or_else(|| panic!("no controller in {out:?}"))
        .trim()
        .to_owned()
}

/// Kills `node` now; returns the guard that starts it again.
async fn kill(node: &str) -> Restart {
    engines_async(&["cluster", "kill", node]).await;
    Restart::new(&["cluster", "start", node])
}

/// Stops the load and the progress watch, and prints the stall report.
async fn finish(
    load: PacedLoad,
    watch: ProgressWatch,
    title: &str,
    windows: &[Window],
) -> (LoadReport, Vec<(Instant, u64)>) {
    let report = load.finish().await;
    let progress = watch.finish().await;
    println!(
        "{}",
        stall_report(title, windows, &report.attempts, &progress)
    );
    (report, progress)
}

/// Kills `node`, keeps it down for `down` seconds, starts it again (which
/// waits until it listens) and waits `after` seconds more; returns when it
/// was killed, when its restart began, and the end.
async fn outage(node: &str, down: u64, after: u64) -> [Instant; 3] {
    let killed = Instant::now();
    let restart = kill(node).await;
    tokio::time::sleep(Duration::from_secs(down)).await;
    let restarted = Instant::now();
    restart.now().await;
    tokio::time::sleep(Duration::from_secs(after)).await;
    [killed, restarted, Instant::now()]
}

/// How many events the projectors applied between two moments, from the
/// progress samples.
fn applied_between(progress: &[(Instant, u64)], from: Instant, to: Instant) -> u64 {
    let at = |t: Instant| {
        progress
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, n)| *n)
    };
    at(to).saturating_sub(at(from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs `deploy/local/engines cluster up`; scripts/test runs it"]
async fn killing_a_partition_leader_and_the_controller_loses_nothing() {
    let (mut d, load, watch, t0) = Deployment::under_load("kafka", 10).await;

    let leader = format!("kafka-{}", partition_leader(&d.topic, 0).await);
    // Long enough after the restart for the broker to rejoin the in-sync
    // replicas.
    let [k1, r1, _] = outage(&leader, 15, 15).await;
    let controller = controller_leader().await;
    let [k2, r2, end] = outage(&controller, 15, 10).await;

    let (report, _) = finish(
        load,
        watch,
        &format!("kafka: partition 0's leader {leader} killed, then the controller {controller}"),
        &[
            Window::new("before", t0, k1),
            Window::new(&format!("{leader} down"), k1, r1),
            Window::new("its restart, then 15 s", r1, k2),
            Window::new(&format!("controller {controller} down"), k2, r2),
            Window::new("its restart, then 10 s", r2, end),
        ],
    )
    .await;
    assert!(
        report.ids.len() >= 5_000,
        "{} acknowledged",
        report.ids.len()
    );
    d.assert_exactly_once(&report).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs `deploy/local/engines cluster up`; scripts/test runs it"]
async fn a_cassandra_node_down_keeps_projecting_and_catches_up_from_hints() {
    let (mut d, load, watch, t0) = Deployment::under_load("cassandra", 8).await;

    let [k, r, end] = outage("cassandra-3", 20, 10).await;

    let (report, progress) = finish(
        load,
        watch,
        "cassandra: cassandra-3 killed for 20 s",
        &[
            Window::new("before", t0, k),
            Window::new("cassandra-3 down", k, r),
            Window::new("its restart, then 10 s", r, end),
        ],
    )
    .await;
    let during = applied_between(&progress, k, r);
    println!("applied while cassandra-3 was down: {during} events in 20 s");
    // About 6,000 events were acknowledged while the node was down.
    assert!(
        during >= 1_500,
        "the projectors kept applying at LOCAL_QUORUM: {during} applied in 20 s"
    );
    d.assert_exactly_once(&report).await;
    let (_dir, keyspace) = d.stop().await;

    // Read from cassandra-3 alone: its peers' hints must have reached it.
    wait_for_hints().await;
    let stopped = [
        Restart::new(&["cluster", "start", "cassandra-1"]),
        Restart::new(&["cluster", "start", "cassandra-2"]),
    ];
    tokio::join!(
        engines_async(&["cluster", "stop", "cassandra-1"]),
        engines_async(&["cluster", "stop", "cassandra-2"])
    );
    let on_node = timeline_ids_on("127.0.0.3:9042", &keyspace).await;
    let [one, two] = stopped;
    one.now().await;
    two.now().await;
    ring_of_three(3).await;

    // Every event acknowledged after the kill was projected after it, so
    // its writes reached cassandra-3 directly (after its restart) or as a
    // hint. Writes that cassandra-3 was still applying when it was killed
    // are not hinted when it coordinated them itself: `nodetool repair`
    // brings those back (and quorum reads never miss them meanwhile).
    let (after, before): (Vec<&String>, Vec<&String>) = (
        report
            .ids
            .iter()
            .filter(|(_, at)| **at >= k)
            .map(|(id, _)| id)
            .collect(),
        report
            .ids
            .iter()
            .filter(|(_, at)| **at < k)
            .map(|(id, _)| id)
            .collect(),
    );
    let missing = |ids: &[&String]| -> Vec<String> {
        ids.iter()
            .filter(|id| !on_node.contains_key(**id))
            .map(|id| id.to_string())
            .collect()
    };
    println!(
        "cassandra-3 alone: {} of {} events acknowledged before the kill are missing (in flight when it died)",
        missing(&before).len(),
        before.len()
    );
    let missing = missing(&after);
    assert!(
        missing.is_empty(),
        "cassandra-3 alone lacks {} of the {} events acknowledged since its kill, {:?}...",
        missing.len(),
        after.len(),
        &missing[..missing.len().min(5)]
    );
    let doubled: Vec<(&String, &usize)> = on_node.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "timeline rows twice: {doubled:?}");
}

/// Waits until cassandra-1 and cassandra-2 hold no hints for anyone.
async fn wait_for_hints() {
    let deadline = Instant::now() + Duration::from_secs(180);
    for n in ["1", "2"] {
        loop {
            let out = tokio::task::spawn_blocking(move || {
                engines_output(&["cluster", "nodetool", n, "listpendinghints"])
            })
            .await
            .unwrap();
            if out.contains("does not have any pending hints") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cassandra-{n} still holds hints:\n{out}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Every timeline row's messageId, with how many rows carry it, read at
/// `ONE` through `node` alone (its peers are stopped, so no other replica
/// can answer).
async fn timeline_ids_on(node: &str, keyspace: &str) -> BTreeMap<String, usize> {
    use scylla::client::session_builder::SessionBuilder;
    use scylla::policies::host_filter::AllowListHostFilter;
    use scylla::statement::Consistency;
    use scylla::statement::unprepared::Statement;
    let session = SessionBuilder::new()
        .known_node(node)
        .host_filter(Arc::new(AllowListHostFilter::new([node]).unwrap()))
        .build()
        .await
        .expect("connect to one node");
    let mut st = Statement::new(format!("SELECT message_id FROM {keyspace}.timeline"));
    st.set_consistency(Consistency::One);
    st.set_page_size(5_000);
    st.set_request_timeout(Some(Duration::from_secs(60)));
    let rows: Vec<(String,)> = session
        .query_iter(st, ())
        .await
        .expect("scan the timeline")
        .rows_stream::<(String,)>()
        .expect("rows")
        .try_collect()
        .await
        .expect("scan the timeline");
    let mut ids = BTreeMap::new();
    for (id,) in rows {
        *ids.entry(id).or_default() += 1;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs `deploy/local/engines cluster up`; scripts/test runs it"]
async fn a_broker_and_a_cassandra_node_at_once_then_a_rolling_restart() {
    let (mut d, load, watch, t0) = Deployment::under_load("both", 8).await;

    let k = Instant::now();
    let (broker, node) = tokio::join!(kill("kafka-2"), kill("cassandra-2"));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let r = Instant::now();
    tokio::join!(broker.now(), node.now());
    ring_of_three(1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut windows = vec![
        Window::new("before", t0, k),
        Window::new("kafka-2 and cassandra-2 down", k, r),
        Window::new("their restart, then 5 s", r, Instant::now()),
    ];
    for n in 1..=3u8 {
        let node = format!("cassandra-{n}");
        let from = Instant::now();
        let restart = Restart::new(&["cluster", "start", &node]);
        engines_async(&["cluster", "stop", &node]).await;
        restart.now().await;
        ring_of_three(n % 3 + 1).await;
        windows.push(Window::new(
            &format!("{node} stopped and started"),
            from,
            Instant::now(),
        ));
    }
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    windows.push(Window::new("10 s after", from, Instant::now()));

    let (report, _) = finish(
        load,
        watch,
        "kafka-2 and cassandra-2 killed at once, then a rolling restart of Cassandra",
        &windows,
    )
    .await;
    d.assert_exactly_once(&report).await;
    d.stop().await;
}
