//! A real Trailmark server on port 0 for integration tests, and an HTTP client
//! that speaks to it.
//!
//! A test crate that includes this module defines `const DISTRIBUTED: bool`.
//! When false, the server is one in-process `serve` on the embedded backends.
//! When true, it is four separate processes of the built binary (`ingest`,
//! `projector`, `query-api`, `evaluator`) on a real Kafka and Cassandra
//! (`deploy/local/engines up`; `TRAILMARK_TEST_KAFKA` and
//! `TRAILMARK_TEST_CASSANDRA` point elsewhere), with a topic and keyspace of
//! their own, named from the test's data directory.

#![allow(dead_code)]

pub mod faults;

use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use trailmark::app::{self, Running};
use trailmark::config::Config;

pub const WRITE_KEY: &str = "wk_integration";
pub const TOKEN: &str = "tmk_integration";

pub struct TestServer {
    /// The ingest role (and health) address.
    pub base: String,
    /// The query API's address (the same as `base` in one process).
    pub query_base: String,
    pub running: Option<Running>,
    /// The role processes, in distributed mode.
    pub procs: Vec<Role>,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
}

/// A workspace's credentials.
pub struct Credentials {
    pub workspace_id: String,
    pub write_key: String,
    pub token: String,
}

/// A role running as its own process of the `trailmark` binary.
pub struct Role {
    pub name: String,
    pub base: String,
    pub child: tokio::process::Child,
    /// Where the role's stderr goes; its tail is printed if a test fails.
    pub log: std::path::PathBuf,
}

impl Drop for Role {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        eprintln!(
            "---- last {} lines of {} ----\n{}",
            tail.len(),
            self.name,
            tail.join("\n")
        );
    }
}

impl Role {
    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => assert!(
                status.expect("wait").success(),
                "{} exited uncleanly",
                self.name
            ),
            Err(_) => panic!("{} did not stop within 30 s", self.name),
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

/// Schema changes from parallel tests would race for schema agreement.
static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn kafka_brokers() -> String {
    std::env::var("TRAILMARK_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn cassandra_host() -> String {
    std::env::var("TRAILMARK_TEST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

/// The configuration file the distributed roles of `dir` share.
pub fn config_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("trailmark.toml")
}

/// Writes the distributed configuration for `dir`, then runs `migrate`.
pub async fn prepare_distributed(dir: &std::path::Path, config: Config) {
    let n = trailmark_testkit::name_for_path(dir);
    prepare_distributed_on(
        dir,
        config,
        format!("kafka://{}/tm-e2e-{n}?partitions=4", kafka_brokers()),
        format!("scylla://{}/tm_e2e_{n}", cassandra_host()),
    )
    .await
}

/// Writes a distributed configuration on the given log and store for `dir`,
/// then runs `migrate`.
pub async fn prepare_distributed_on(
    dir: &std::path::Path,
    mut config: Config,
    log_uri: String,
    store_uri: String,
) {
    config.log_uri = Some(log_uri);
    config.store_uri = Some(store_uri);
    std::fs::write(
        config_path(dir),
        toml::to_string(&config).expect("config as toml"),
    )
    .expect("write config");
    let _one = MIGRATING.lock().await;
    run_command(
        dir,
        &["migrate"],
        "are the engines up? `deploy/local/engines up`",
    )
    .await;
}

/// Runs a one-shot `trailmark` command on the configuration of `dir`, which
/// must succeed; returns what it printed.
async fn run_command(dir: &std::path::Path, args: &[&str], hint: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trailmark"))
        .arg("--config")
        .arg(config_path(dir))
        .args(args)
        .output()
        .await
        .expect("run trailmark");
    assert!(
        out.status.success(),
        "trailmark {args:?} failed ({hint}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Starts one role of the binary on the configuration of `dir`; returns once
/// it says where it listens and answers `/readyz` with 200.
pub async fn spawn_role(dir: &std::path::Path, role: &str, label: &str) -> Role {
    use tokio::io::AsyncBufReadExt;
    let log_path = dir.join(format!("{label}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trailmark"))
        .arg("--config")
        .arg(config_path(dir))
        .args(["--listen", "127.0.0.1:0", role])
        .env("TRAILMARK_LOG", "info,trailmark_log_kafka=info")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn role");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix("trailmark listening on ") {
                return url.trim().to_owned();
            }
        }
        panic!(
            "{label} exited before listening; see {}",
            dir.join(format!("{label}.log")).display()
        )
    })
    .await
    .unwrap_or_else(|_| panic!("{label} did not start within 60 s"));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return Role {
                name: label.to_owned(),
                base,
                child,
                log: log_path,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{label} never became ready")
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_test(dir.path());
        config.bootstrap.write_key = Some(WRITE_KEY.into());
        config.bootstrap.token = Some(TOKEN.into());
        // Audiences' windows expire, and sizes are counted, within a test's
        // patience.
        config.evaluator.sweep_interval_ms = 200;
        config.evaluator.size_interval_ms = 500;
        tweak(&mut config);
        if crate::DISTRIBUTED {
            prepare_distributed(dir.path(), config).await;
            let ingest = spawn_role(dir.path(), "ingest", "ingest").await;
            let projector = spawn_role(dir.path(), "projector", "projector").await;
            let query = spawn_role(dir.path(), "query-api", "query-api").await;
            let evaluator = spawn_role(dir.path(), "evaluator", "evaluator").await;
            return Self {
                base: ingest.base.clone(),
                query_base: query.base.clone(),
                running: None,
                procs: vec![ingest, projector, query, evaluator],
                client: reqwest::Client::new(),
                dir,
            };
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind");
        let running = app::start(config, app::Role::All, listener)
            .await
            .expect("start");
        Self {
            base: format!("http://{}", running.addr),
            query_base: format!("http://{}", running.addr),
            running: Some(running),
            procs: Vec::new(),
            client: reqwest::Client::new(),
            dir,
        }
    }

    /// How long to wait for projections: separate processes on real engines
    /// are slower to see an event than one process.
    pub fn patience() -> usize {
        if crate::DISTRIBUTED { 600 } else { 200 }
    }

    /// Stops the server and returns its data directory, for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean stop");
        }
        for role in self.procs.drain(..) {
            role.terminate().await;
        }
        self.dir
    }

    /// Creates another workspace: through the backends in one process, with
    /// `trailmark create-workspace` against the distributed ones.
    pub async fn create_workspace(&self, name: &str) -> Credentials {
        if let Some(running) = &self.running {
            let c = running
                .backends
                .directory
                .create_workspace(name, None, None)
                .await
                .expect("create workspace");
            return Credentials {
                workspace_id: c.workspace.id,
                write_key: c.write_key,
                token: c.token,
            };
        }
        let text = run_command(
            self.dir.path(),
            &["create-workspace", "--name", name],
            "creating a workspace",
        )
        .await;
        let field = |label: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(label))
                .unwrap_or_else(|| panic!("no {label} in {text}"))
                .trim()
                .to_owned()
        };
        let workspace_id = text
            .lines()
            .find_map(|l| l.strip_prefix("created workspace "))
            .and_then(|l| l.rsplit_once('(').map(|(_, id)| id.trim_end_matches(')')))
            .unwrap_or_else(|| panic!("no workspace id in {text}"))
            .to_owned();
        Credentials {
            workspace_id,
            write_key: field("write key:"),
            token: field("secret token:"),
        }
    }

    /// The URL of `path`: the query API's routes go to the query role.
    pub fn url(&self, path: &str) -> String {
        if [
            "/v1/profiles",
            "/v1/spaces",
            "/v1/admin",
            "/v1/accounts",
            "/v1/audiences",
            "/v1/computed-traits",
        ]
        .iter()
        .any(|p| path.starts_with(p))
        {
            format!("{}{path}", self.query_base)
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// POSTs JSON with the write key as Basic auth.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// POSTs `body` as it is (no content type) with the write key as Basic
    /// auth, for bodies that a `Value` cannot express.
    pub async fn post_text(&self, path: &str, body: impl Into<String>) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .basic_auth(WRITE_KEY, Some(""))
            .body(body.into())
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// Sends `body` with `method` and the secret token as a Bearer token:
    /// the admin API.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .request(method, self.url(path))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// GETs with the secret token as a Bearer token.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// Polls a profile's timeline until it holds `n` events (or 10 s pass).
    pub async fn wait_for_events(&self, id: &str, n: usize) -> Vec<Value> {
        let mut last = Vec::new();
        for _ in 0..Self::patience() {
            let (status, body) = self
                .get(&format!("/v1/profiles/{id}/events?limit=200&sort=asc"))
                .await;
            if status == 200 {
                last = body["data"].as_array().cloned().unwrap_or_default();
                if last.len() >= n {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    }
}

pub async fn read(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

pub fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

/// Rebuilds the projections of a stopped server's data directory from its
/// log, in this process; returns the records replayed.
pub async fn rebuild(dir: &tempfile::TempDir) -> u64 {
    let config = if crate::DISTRIBUTED {
        Config::load(Some(&config_path(dir.path()))).expect("config")
    } else {
        Config::for_test(dir.path())
    };
    trailmark::app::rebuild(&config).await.expect("rebuild")
}
