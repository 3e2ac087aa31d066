//! What Trailmark's HTTP services share.
//!
//! - [`AppState`]: the handles every handler needs (the log, the stores, the
//!   codec, the clock, metrics, limits), built by [`AppStateBuilder`].
//! - [`ApiError`]: the one place where errors become HTTP responses. Handlers
//!   return `Result<_, ApiError>`; its `IntoResponse` maps each kind to a
//!   status code and a JSON body `{"error":{"code","message","field"?}}`.
//! - [`auth`]: write keys (for ingest) and secret tokens (for reads).
//! - [`metrics`]: the Prometheus registry and the request-timing middleware.
//! - [`health`]: `/healthz`, `/readyz` and `/metrics`, for the public and the
//!   admin listener.
//! - [`middleware`]: what every listener runs around its routes: the request
//!   id, JSON for every error response, the body deadline, and
//!   case-insensitive `Content-Encoding`.
//! - [`request`]: the request id. [`client_ip`]: the client address, with
//!   `X-Forwarded-For` believed only from trusted proxies.
//!
//! `ingest` and `query-api` each expose `routes() -> Router<AppState>`; the
//! binary merges them.

use std::sync::Arc;
use std::time::Duration;

use trailmark_domain::{Clock, Limits, SystemClock};
use trailmark_log::EventLog;
use trailmark_schemas::EventCodec;
use trailmark_store::evaluator::EvaluatorReader;
use trailmark_store::{ProfileReader, WorkspaceDirectory};

pub mod auth;
pub mod client_ip;
pub mod error;
pub mod health;
pub mod metrics;
pub mod middleware;
pub mod request;

pub use error::ApiError;
pub use metrics::Metrics;

/// The handles shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The event log.
    pub log: Arc<dyn EventLog>,
    /// Projections, read only: the HTTP services never write them.
    pub store: Arc<dyn ProfileReader>,
    /// The audience evaluator's rows, read only.
    pub audiences: Arc<dyn EvaluatorReader>,
    /// Workspaces and credentials.
    pub directory: Arc<dyn WorkspaceDirectory>,
    /// The log record codec.
    pub codec: Arc<EventCodec>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Ingest size limits.
    pub limits: Limits,
    /// How long ingest waits for the log before answering 503.
    pub append_timeout: Duration,
    /// Recently resolved write keys and tokens.
    pub credentials: Arc<auth::CredentialCache>,
    /// Workspaces' identity rules, as ingest applies them.
    pub identity_rules: Arc<auth::RulesCache>,
    /// Which backends `/readyz` requires.
    pub readiness: Readiness,
}

/// Which backends a process needs to serve, so that `/readyz` fails only for
/// those: ingest keeps taking events into the log while the store is down
/// (known write keys are cached), and the query API does not use the log.
/// Both are always reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The log must answer.
    pub log: bool,
    /// The store must answer.
    pub store: bool,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            log: true,
            store: true,
        }
    }
}

impl AppState {
    /// Starts building the state from its backends: the log, the store's
    /// two read sides, and the directory.
    pub fn builder(
        log: Arc<dyn EventLog>,
        store: Arc<dyn ProfileReader>,
        audiences: Arc<dyn EvaluatorReader>,
        directory: Arc<dyn WorkspaceDirectory>,
    ) -> AppStateBuilder {
        AppStateBuilder {
            log,
            store,
            audiences,
            directory,
            clock: Arc::new(SystemClock),
            metrics: None,
            limits: Limits::default(),
            append_timeout: Duration::from_secs(10),
            readiness: Readiness::default(),
        }
    }
}

/// Builds an [`AppState`].
pub struct AppStateBuilder {
    log: Arc<dyn EventLog>,
    store: Arc<dyn ProfileReader>,
    audiences: Arc<dyn EvaluatorReader>,
    directory: Arc<dyn WorkspaceDirectory>,
    clock: Arc<dyn Clock>,
    metrics: Option<Arc<Metrics>>,
    limits: Limits,
    append_timeout: Duration,
    readiness: Readiness,
}

impl AppStateBuilder {
    /// Which backends `/readyz` requires.
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Uses `clock` instead of the wall clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Uses an existing metrics registry.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sets the ingest size limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets how long ingest waits for the log.
    pub fn append_timeout(mut self, timeout: Duration) -> Self {
        self.append_timeout = timeout;
        self
    }

    /// The state.
    pub fn build(self) -> Result<AppState, trailmark_schemas::CodecError> {
        Ok(AppState {
            log: self.log,
            store: self.store,
            audiences: self.audiences,
            directory: self.directory,
            codec: Arc::new(EventCodec::new()?),
            clock: self.clock,
            metrics: self.metrics.unwrap_or_else(|| Arc::new(Metrics::new())),
            limits: self.limits,
            append_timeout: self.append_timeout,
            credentials: Arc::new(auth::CredentialCache::default()),
            identity_rules: Arc::new(auth::RulesCache::default()),
            readiness: self.readiness,
        })
    }
}
