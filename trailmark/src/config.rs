//! Configuration: one typed struct, loaded from an optional TOML file, then
//! overridden by `TRAILMARK_*` environment variables (declared in
//! [`ENV_OVERRIDES`], the one place that lists them), then by command-line
//! flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use trailmark_domain::Limits;
use trailmark_http::client_ip::TrustedProxies;
use trailmark_projector::ProjectorConfig;

/// Every setting of Trailmark.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where HTTP listens. In `serve`, one listener serves ingest and queries.
    pub listen: SocketAddr,
    /// Where the embedded log and store live unless their URIs say otherwise.
    pub data_dir: PathBuf,
    /// The log backend; default `file://<data_dir>/log`.
    pub log_uri: Option<String>,
    /// The store backend; default `embedded://<data_dir>/store`.
    pub store_uri: Option<String>,
    /// The embedded log.
    pub log: LogSection,
    /// Ingest.
    pub ingest: IngestSection,
    /// The projector.
    pub projector: ProjectorSection,
    /// The audience evaluator.
    pub evaluator: EvaluatorSection,
    /// The default workspace created on first start.
    pub bootstrap: BootstrapSection,
    /// The HTTP server: timeouts, connection limit, admin listener, proxies.
    pub server: ServerSection,
}

/// `[server]`: how every HTTP listener treats its connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Time allowed for a request's headers, counted from when the
    /// connection opens or its previous response was sent, in milliseconds.
    pub header_timeout_ms: u64,
    /// Time allowed for a request's body, from the end of its headers; later
    /// the request is answered 408, in milliseconds.
    pub body_timeout_ms: u64,
    /// A connection with no request in progress and no bytes moving for this
    /// long is closed, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Most connections open at once per listener; further ones wait in the
    /// operating system's accept queue until one closes.
    pub max_connections: usize,
    /// A second listener for `/metrics` and the detailed `/readyz`; when set,
    /// the main listener no longer serves `/metrics`.
    pub admin_listen: Option<SocketAddr>,
    /// Peers (addresses or CIDR networks) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 4_096,
            admin_listen: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Partitions of a new log (fixed once created).
    pub partitions: u32,
    /// Segment size of the file log, in bytes.
    pub segment_bytes: u64,
}

/// `[ingest]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// Largest event, decompressed.
    pub max_event_bytes: usize,
    /// Largest batch body, decompressed.
    pub max_batch_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// How long to wait for the log before answering 503, in milliseconds.
    pub append_timeout_ms: u64,
}

/// `[projector]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorSection {
    /// Consumer group name.
    pub group: String,
    /// Records per step.
    pub batch_size: usize,
    /// De-duplication window in hours (at least 24).
    pub dedup_window_hours: u64,
    /// The embedded store's fold cache, in MiB: rows the projector reads
    /// again and again, bounded in bytes.
    pub fold_cache_mb: usize,
    /// The embedded store's block cache, in MiB: decoded blocks of every
    /// keyspace, shared by the projector, the evaluator and the API.
    pub block_cache_mb: usize,
}

/// `[evaluator]`: the audience and computed-trait evaluator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluatorSection {
    /// Whether `serve` runs it in-process.
    pub enabled: bool,
    /// Its consumer group.
    pub group: String,
    /// How often profiles whose windows expired are evaluated, in
    /// milliseconds (exits are at most this late, plus a step).
    pub sweep_interval_ms: u64,
    /// How often audience sizes are counted, in milliseconds.
    pub size_interval_ms: u64,
}

impl Default for EvaluatorSection {
    fn default() -> Self {
        let e = trailmark_audiences::EvaluatorConfig::default();
        Self {
            enabled: true,
            group: e.group,
            sweep_interval_ms: e.sweep_interval.as_millis() as u64,
            size_interval_ms: e.size_interval.as_millis() as u64,
        }
    }
}

/// `[bootstrap]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapSection {
    /// Name of the default workspace.
    pub workspace_name: String,
    /// Its write key; generated when unset.
    pub write_key: Option<String>,
    /// Its secret token; generated when unset.
    pub token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            data_dir: PathBuf::from("./data"),
            log_uri: None,
            store_uri: None,
            log: LogSection::default(),
            ingest: IngestSection::default(),
            projector: ProjectorSection::default(),
            evaluator: EvaluatorSection::default(),
            bootstrap: BootstrapSection::default(),
            server: ServerSection::default(),
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            partitions: 4,
            segment_bytes: 256 << 20,
        }
    }
}

impl Default for IngestSection {
    fn default() -> Self {
        let l = Limits::default();
        Self {
            max_event_bytes: l.max_event_bytes,
            max_batch_bytes: l.max_batch_bytes,
            max_batch_events: l.max_batch_events,
            append_timeout_ms: 10_000,
        }
    }
}

impl Default for ProjectorSection {
    fn default() -> Self {
        let p = ProjectorConfig::default();
        Self {
            group: p.group,
            batch_size: p.batch_size,
            dedup_window_hours: 24,
            fold_cache_mb: trailmark_store::embedded::EmbeddedOptions::default().cache_bytes >> 20,
            block_cache_mb: (trailmark_store::embedded::EmbeddedOptions::default()
                .block_cache_bytes
                >> 20) as usize,
        }
    }
}

impl Default for BootstrapSection {
    fn default() -> Self {
        Self {
            workspace_name: "default".into(),
            write_key: None,
            token: None,
        }
    }
}

/// Every environment variable that overrides a setting, and what it sets.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("TRAILMARK_LISTEN", "listen"),
    ("TRAILMARK_DATA_DIR", "data_dir"),
    ("TRAILMARK_LOG_URI", "log_uri"),
    ("TRAILMARK_STORE_URI", "store_uri"),
    ("TRAILMARK_LOG_PARTITIONS", "log.partitions"),
    (
        "TRAILMARK_DEDUP_WINDOW_HOURS",
        "projector.dedup_window_hours",
    ),
    ("TRAILMARK_FOLD_CACHE_MB", "projector.fold_cache_mb"),
    ("TRAILMARK_BLOCK_CACHE_MB", "projector.block_cache_mb"),
    ("TRAILMARK_EVALUATOR", "evaluator.enabled"),
    ("TRAILMARK_SWEEP_INTERVAL_MS", "evaluator.sweep_interval_ms"),
    ("TRAILMARK_BOOTSTRAP_WRITE_KEY", "bootstrap.write_key"),
    ("TRAILMARK_BOOTSTRAP_TOKEN", "bootstrap.token"),
    ("TRAILMARK_HEADER_TIMEOUT_MS", "server.header_timeout_ms"),
    ("TRAILMARK_BODY_TIMEOUT_MS", "server.body_timeout_ms"),
    ("TRAILMARK_IDLE_TIMEOUT_MS", "server.idle_timeout_ms"),
    ("TRAILMARK_MAX_CONNECTIONS", "server.max_connections"),
    ("TRAILMARK_ADMIN_LISTEN", "server.admin_listen"),
    (
        "TRAILMARK_TRUSTED_PROXIES",
        "server.trusted_proxies (comma-separated)",
    ),
];

impl Config {
    /// Loads the file (if any), then applies the environment.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Applies overrides from `get` (the environment, or a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        for (var, _) in ENV_OVERRIDES {
            let Some(v) = get(var).filter(|v| !v.is_empty()) else {
                continue;
            };
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{var}={v:?}: {e}");
            match *var {
                "TRAILMARK_LISTEN" => self.listen = v.parse().map_err(|e| bad(&e))?,
                "TRAILMARK_DATA_DIR" => self.data_dir = PathBuf::from(&v),
                "TRAILMARK_LOG_URI" => self.log_uri = Some(v),
                "TRAILMARK_STORE_URI" => self.store_uri = Some(v),
                "TRAILMARK_LOG_PARTITIONS" => {
                    self.log.partitions = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_DEDUP_WINDOW_HOURS" => {
                    self.projector.dedup_window_hours = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_FOLD_CACHE_MB" => {
                    self.projector.fold_cache_mb = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_BLOCK_CACHE_MB" => {
                    self.projector.block_cache_mb = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_EVALUATOR" => self.evaluator.enabled = v.parse().map_err(|e| bad(&e))?,
                "TRAILMARK_SWEEP_INTERVAL_MS" => {
                    self.evaluator.sweep_interval_ms = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_BOOTSTRAP_WRITE_KEY" => self.bootstrap.write_key = Some(v),
                "TRAILMARK_BOOTSTRAP_TOKEN" => self.bootstrap.token = Some(v),
                "TRAILMARK_HEADER_TIMEOUT_MS" => {
                    self.server.header_timeout_ms = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_BODY_TIMEOUT_MS" => {
                    self.server.body_timeout_ms = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_IDLE_TIMEOUT_MS" => {
                    self.server.idle_timeout_ms = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_MAX_CONNECTIONS" => {
                    self.server.max_connections = v.parse().map_err(|e| bad(&e))?
                }
                "TRAILMARK_ADMIN_LISTEN" => {
                    self.server.admin_listen = Some(v.parse().map_err(|e| bad(&e))?)
                }
                "TRAILMARK_TRUSTED_PROXIES" => {
                    self.server.trusted_proxies = v
                        .split(',')
                        .map(|p| p.trim().to_owned())
                        .filter(|p| !p.is_empty())
                        .collect()
                }
                other => unreachable!("{other} is listed but not handled"),
            }
        }
        Ok(())
    }

    /// Checks settings that the types cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.projector.dedup_window_hours < 24 {
            bail!("projector.dedup_window_hours must be at least 24");
        }
        if !(1..=60_000).contains(&self.evaluator.sweep_interval_ms) {
            bail!(
                "evaluator.sweep_interval_ms must be between 1 and 60000 (exits are due within a minute)"
            );
        }
        if self.log.partitions == 0 {
            bail!("log.partitions must be at least 1");
        }
        if self.ingest.max_event_bytes > self.ingest.max_batch_bytes {
            bail!("ingest.max_event_bytes cannot exceed ingest.max_batch_bytes");
        }
        let s = &self.server;
        if s.header_timeout_ms == 0 || s.body_timeout_ms == 0 || s.idle_timeout_ms == 0 {
            bail!("server timeouts must be at least 1 ms");
        }
        if s.max_connections == 0 || s.max_connections > 1 << 24 {
            bail!("server.max_connections must be between 1 and 16777216");
        }
        self.trusted_proxies()?;
        Ok(())
    }

    /// A configuration for tests: port 0, everything under `dir`.
    pub fn for_test(dir: &std::path::Path) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir: dir.to_path_buf(),
            ..Self::default()
        }
    }

    /// The log URI in effect.
    pub fn log_uri(&self) -> String {
        self.log_uri
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("log").display()))
    }

    /// The store URI in effect.
    pub fn store_uri(&self) -> String {
        self.store_uri
            .clone()
            .unwrap_or_else(|| format!("embedded://{}", self.data_dir.join("store").display()))
    }

    /// Ingest limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_event_bytes: self.ingest.max_event_bytes,
            max_batch_bytes: self.ingest.max_batch_bytes,
            max_batch_events: self.ingest.max_batch_events,
        }
    }

    /// The projector's settings.
    pub fn projector(&self) -> ProjectorConfig {
        ProjectorConfig {
            group: self.projector.group.clone(),
            batch_size: self.projector.batch_size,
            dedup_window: Duration::from_secs(self.projector.dedup_window_hours * 3_600),
            ..ProjectorConfig::default()
        }
    }

    /// The evaluator's settings.
    pub fn evaluator(&self) -> trailmark_audiences::EvaluatorConfig {
        trailmark_audiences::EvaluatorConfig {
            group: self.evaluator.group.clone(),
            projector_group: self.projector.group.clone(),
            sweep_interval: Duration::from_millis(self.evaluator.sweep_interval_ms),
            size_interval: Duration::from_millis(self.evaluator.size_interval_ms.max(100)),
            dedup_window: Duration::from_secs(self.projector.dedup_window_hours * 3_600),
            ..trailmark_audiences::EvaluatorConfig::default()
        }
    }

    /// The peers whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies(&self) -> anyhow::Result<TrustedProxies> {
        TrustedProxies::parse(&self.server.trusted_proxies)
            .map_err(|e| anyhow::anyhow!("server.trusted_proxies: {e}"))
    }

    /// How long ingest waits for the log.
    pub fn append_timeout(&self) -> Duration {
        Duration::from_millis(self.ingest.append_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_defaults() {
        let mut c: Config =
            toml::from_str("listen = \"0.0.0.0:9000\"\n[log]\npartitions = 8\n").unwrap();
        assert_eq!(c.log.partitions, 8);
        c.apply_env(|k| match k {
            "TRAILMARK_LISTEN" => Some("127.0.0.1:7000".into()),
            "TRAILMARK_DATA_DIR" => Some("/tmp/x".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.log_uri(), "file:///tmp/x/log");
        assert_eq!(c.store_uri(), "embedded:///tmp/x/store");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err());
        let mut c = Config::default();
        assert!(
            c.apply_env(|k| (k == "TRAILMARK_LISTEN").then(|| "nope".into()))
                .is_err()
        );
        c.projector.dedup_window_hours = 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_example_file_parses_and_shows_the_server_defaults() {
        let text = include_str!("../../deploy/trailmark.toml");
        let c: Config = toml::from_str(text).expect("deploy/trailmark.toml parses");
        let d = ServerSection::default();
        assert_eq!(c.server.header_timeout_ms, d.header_timeout_ms);
        assert_eq!(c.server.body_timeout_ms, d.body_timeout_ms);
        assert_eq!(c.server.idle_timeout_ms, d.idle_timeout_ms);
        assert_eq!(c.server.max_connections, d.max_connections);
        c.validate().unwrap();
    }

    #[test]
    fn server_settings_come_from_the_file_and_the_environment() {
        let mut c: Config = toml::from_str(
            "[server]\nheader_timeout_ms = 500\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        assert_eq!(c.server.header_timeout_ms, 500);
        assert_eq!(c.server.body_timeout_ms, 30_000);
        c.apply_env(|k| match k {
            "TRAILMARK_ADMIN_LISTEN" => Some("127.0.0.1:9090".into()),
            "TRAILMARK_TRUSTED_PROXIES" => Some("10.0.0.1, 192.0.2.0/24".into()),
            "TRAILMARK_MAX_CONNECTIONS" => Some("8".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            c.server.admin_listen,
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(c.server.trusted_proxies, ["10.0.0.1", "192.0.2.0/24"]);
        assert_eq!(c.server.max_connections, 8);
        c.validate().unwrap();
        c.server.trusted_proxies = vec!["proxy.local".into()];
        assert!(c.validate().is_err());
    }
}
