//! Wiring: state, routes, roles and the bootstrap workspace.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use trailmark_http::client_ip::TrustedProxies;
use trailmark_http::{AppState, Metrics};
use trailmark_projector::Projector;
use trailmark_store::{CreatedWorkspace, WorkspaceDirectory};

use crate::backends::Backends;
use crate::config::Config;
use crate::server::{ServeOptions, serve};

/// Which services a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Ingest, projector and query API in one process.
    All,
    /// Only the Tracking API.
    Ingest,
    /// Only the projector (with health and metrics endpoints).
    Projector,
    /// Only the query API.
    QueryApi,
    /// Only the audience evaluator (with health and metrics endpoints).
    Evaluator,
}

impl Role {
    fn serves_ingest(self) -> bool {
        matches!(self, Role::All | Role::Ingest)
    }

    fn serves_queries(self) -> bool {
        matches!(self, Role::All | Role::QueryApi)
    }

    fn projects(self) -> bool {
        matches!(self, Role::All | Role::Projector)
    }

    fn evaluates(self, config: &Config) -> bool {
        match self {
            Role::All => config.evaluator.enabled,
            Role::Evaluator => true,
            _ => false,
        }
    }
}

/// What the listeners need from the configuration besides the routes.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Time for a request's body, from the end of its headers.
    pub body_timeout: Duration,
    /// The most bytes of a body as sent (before decompression).
    pub wire_limit: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Arc<TrustedProxies>,
    /// The connection limits of each listener.
    pub serve: ServeOptions,
    /// Whether `/metrics` and the detailed `/readyz` have a listener of
    /// their own.
    pub admin: bool,
}

impl HttpOptions {
    /// The options `config` sets.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let s = &config.server;
        Ok(Self {
            body_timeout: Duration::from_millis(s.body_timeout_ms),
            // Compressed, a body is no larger than decompressed; the handlers
            // cap the decompressed size per route.
            wire_limit: config.ingest.max_batch_bytes,
            trusted_proxies: Arc::new(config.trusted_proxies()?),
            serve: ServeOptions {
                header_timeout: Duration::from_millis(s.header_timeout_ms),
                idle_timeout: Duration::from_millis(s.idle_timeout_ms),
                max_connections: s.max_connections,
            },
            admin: s.admin_listen.is_some(),
        })
    }
}

/// The HTTP routes of `role` on the public listener, with health (and
/// `/metrics` unless an admin listener serves it) and the shared layers.
pub fn router(state: AppState, role: Role, options: &HttpOptions) -> Router {
    let mut router = Router::new().merge(trailmark_http::health::routes());
    if !options.admin {
        // Without an admin listener, where it always was.
        router = router.merge(trailmark_http::health::metrics_routes());
    }
    if role.serves_ingest() {
        router = router.merge(trailmark_ingest::routes());
    }
    if role.serves_queries() {
        router = router.merge(trailmark_query_api::routes());
    }
    layered(router, state, options)
}

/// The routes of the admin listener: `/metrics`, `/healthz` and the
/// detailed `/readyz`.
pub fn admin_router(state: AppState, options: &HttpOptions) -> Router {
    layered(trailmark_http::health::admin_routes(), state, options)
}

/// The layers every listener shares, innermost first: the client address,
/// the body cap as sent and its deadline, request timing, panics as 500,
/// the request id with JSON for every error, tracing.
fn layered(router: Router<AppState>, state: AppState, options: &HttpOptions) -> Router {
    use axum::middleware::{from_fn, from_fn_with_state};
    use trailmark_http::middleware;
    router
        .fallback(|| async { trailmark_http::ApiError::NotFound("no such route".into()) })
        .layer(from_fn_with_state(
            options.trusted_proxies.clone(),
            trailmark_http::client_ip::resolve_client_ip,
        ))
        .layer(from_fn_with_state(
            options.wire_limit,
            middleware::wire_limit,
        ))
        .layer(from_fn_with_state(
            options.body_timeout,
            middleware::body_deadline,
        ))
        .layer(from_fn_with_state(
            state.clone(),
            trailmark_http::metrics::track_requests,
        ))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(from_fn(middleware::request_context))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Builds the state from opened backends.
pub fn state(
    config: &Config,
    backends: &Backends,
    metrics: Arc<Metrics>,
    role: Role,
) -> anyhow::Result<AppState> {
    let readiness = trailmark_http::Readiness {
        log: role.serves_ingest() || role.projects() || role == Role::Evaluator,
        store: role.serves_queries() || role.projects() || role == Role::Evaluator,
    };
    Ok(AppState::builder(
        backends.log.clone(),
        backends.store.clone(),
        backends.store.clone(),
        backends.directory.clone(),
    )
    .metrics(metrics)
    .limits(config.limits())
    .append_timeout(config.append_timeout())
    .readiness(readiness)
    .build()?)
}

/// Creates the default workspace on first start (no workspace yet), with the
/// configured credentials if any. Returns it when it was created now.
pub async fn bootstrap(
    directory: &dyn WorkspaceDirectory,
    config: &Config,
) -> anyhow::Result<Option<CreatedWorkspace>> {
    if !directory.workspaces().await?.is_empty() {
        return Ok(None);
    }
    let created = directory
        .create_workspace(
            &config.bootstrap.workspace_name,
            config.bootstrap.write_key.as_deref(),
            config.bootstrap.token.as_deref(),
        )
        .await?;
    Ok(Some(created))
}

/// A running Trailmark process: its address, backends, and tasks.
pub struct Running {
    /// Where HTTP listens.
    pub addr: SocketAddr,
    /// Where the admin listener (`/metrics`, detailed `/readyz`) listens,
    /// when configured.
    pub admin_addr: Option<SocketAddr>,
    /// The backends, shared with the services.
    pub backends: Arc<Backends>,
    /// The workspace created at this start, if this was the first.
    pub created: Option<CreatedWorkspace>,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    admin: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    projector: Option<tokio::task::JoinHandle<trailmark_projector::Result<()>>>,
    evaluator: Option<tokio::task::JoinHandle<trailmark_audiences::Result<()>>>,
}

/// Opens the backends and starts `role` on `listener` (and the admin
/// listener, when configured).
pub async fn start(config: Config, role: Role, listener: TcpListener) -> anyhow::Result<Running> {
    let options = HttpOptions::from_config(&config)?;
    let admin_listener = match config.server.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin listener {addr}"))?,
        ),
        None => None,
    };
    let backends = Arc::new(Backends::open(&config).await?);
    let metrics = Arc::new(Metrics::new());
    let state = state(&config, &backends, metrics.clone(), role)?;
    let addr = listener.local_addr()?;
    // Distributed roles start many at once; `trailmark migrate` bootstraps
    // for them instead.
    let created = if role.serves_ingest() && backends.is_embedded() {
        bootstrap(&*backends.directory, &config).await?
    } else {
        None
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let projector = role.projects().then(|| {
        let projector = Projector::new(
            backends.log.clone(),
            backends.store.clone(),
            state.codec.clone(),
            metrics.clone(),
            config.projector(),
        );
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            projector
                .run(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    });
    let evaluator = role.evaluates(&config).then(|| {
        let evaluator = trailmark_audiences::Evaluator::new(
            backends.log.clone(),
            backends.store.clone(),
            backends.directory.clone(),
            state.codec.clone(),
            state.clock.clone(),
            metrics.clone(),
            config.evaluator(),
        );
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            evaluator
                .run(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_addr = admin_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let admin = admin_listener.map(|l| {
        let app = admin_router(state.clone(), &options);
        tokio::spawn(serve(l, app, options.serve, stopped(stop_rx.clone())))
    });
    let app = router(state, role, &options);
    let server = tokio::spawn(serve(listener, app, options.serve, stopped(stop_rx)));
    Ok(Running {
        addr,
        admin_addr,
        backends,
        created,
        stop,
        server,
        admin,
        projector,
        evaluator,
    })
}

impl Running {
    /// Runs until `shutdown` resolves or the projector or the evaluator
    /// fails, then stops: HTTP stops accepting and drains, the projector
    /// and the evaluator finish their step, and the backends are flushed
    /// and closed.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let projector = async {
            match self.projector.as_mut() {
                Some(h) => Some(h.await),
                None => std::future::pending().await,
            }
        };
        let evaluator = async {
            match self.evaluator.as_mut() {
                Some(h) => Some(h.await),
                None => std::future::pending().await,
            }
        };
        // Which one ended: its handle is spent and must not be awaited again.
        let failed: Option<(&str, anyhow::Result<()>)> = tokio::select! {
            _ = shutdown => None,
            Some(r) = projector => Some(("projector", flatten(r))),
            Some(r) = evaluator => Some(("evaluator", flatten(r))),
        };
        match failed {
            Some((which, result)) => {
                let result = result.and_then(|()| Err(anyhow::anyhow!("stopped unexpectedly")));
                if let Err(e) = &result {
                    tracing::error!(error = %e, "the {which} failed; stopping");
                }
                match which {
                    "projector" => self.projector = None,
                    _ => self.evaluator = None,
                }
                let _ = self.stop.send(true);
                let _ = (&mut self.server).await;
                if let Some(admin) = self.admin.take() {
                    let _ = admin.await;
                }
                // The one that did not fail finishes its step.
                if let Some(h) = self.projector.take() {
                    let _ = h.await;
                }
                if let Some(h) = self.evaluator.take() {
                    let _ = h.await;
                }
                self.backends.close();
                result.with_context(|| format!("the {which} failed"))
            }
            None => self.stop().await,
        }
    }

    /// Stops everything and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.server.await??;
        if let Some(admin) = self.admin {
            admin.await??;
        }
        let projected = match self.projector {
            Some(handle) => handle.await.map_err(anyhow::Error::from),
            None => Ok(Ok(())),
        };
        let evaluated = match self.evaluator {
            Some(handle) => handle.await.map_err(anyhow::Error::from),
            None => Ok(Ok(())),
        };
        self.backends.close();
        projected??;
        evaluated??;
        Ok(())
    }
}

/// A task's outcome as one result.
fn flatten<E: Into<anyhow::Error>>(
    r: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match r {
        Ok(inner) => inner.map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}

/// Runs `role` on `listener` until `shutdown` resolves, printing where it
/// listens and, on first start, the default workspace's credentials.
pub async fn run(
    config: Config,
    role: Role,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(config, role, listener).await?;
    if let Some(created) = &running.created {
        println!(
            "created workspace {:?} ({})\n  write key: {}\n  secret token: {}",
            created.workspace.name, created.workspace.id, created.write_key, created.token
        );
    }
    println!("trailmark listening on http://{}", running.addr);
    if let Some(admin) = running.admin_addr {
        println!("admin (metrics, readiness detail) listening on http://{admin}");
    }
    running.run_until(shutdown).await
}

/// Clears every projection and replays the whole log into the store.
pub async fn rebuild(config: &Config) -> anyhow::Result<u64> {
    let backends = Backends::open_for_rebuild(config).await?;
    backends.store.reset_projections().await?;
    let projector = Projector::new(
        backends.log.clone(),
        backends.store.clone(),
        Arc::new(trailmark_schemas::EventCodec::new()?),
        Arc::new(Metrics::new()),
        config.projector(),
    );
    let applied = projector.catch_up().await?;
    backends.close();
    Ok(applied)
}

/// Appends the dead letters from position `from` on to the log again, keyed
/// as ingest keys them. Returns how many, and the position after the last.
pub async fn replay_dead_letters(backends: &Backends, from: u64) -> anyhow::Result<(u64, u64)> {
    let codec = trailmark_schemas::EventCodec::new()?;
    // Read up to the end as it is now, then append: letters that fail again
    // while this runs are not replayed in a loop.
    let mut letters = Vec::new();
    let mut next = from;
    loop {
        let page = backends.log.dead_letters(next, 500).await?;
        let Some((last, _)) = page.last() else { break };
        next = last + 1;
        letters.extend(page);
    }
    for chunk in letters.chunks(500) {
        let records = chunk
            .iter()
            .map(|(_, l)| trailmark_log::Record {
                // A record this build still cannot decode keeps no key; its
                // order does not matter, it will be set aside again.
                key: codec
                    .decode(&l.payload)
                    .map(|ev| ev.partition_key())
                    .unwrap_or_default(),
                payload: l.payload.to_vec(),
            })
            .collect();
        backends.log.append(records).await?;
    }
    Ok((letters.len() as u64, next))
}
