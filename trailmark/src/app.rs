//! Wiring: state, routes, roles and the bootstrap workspace.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;
use trailmark_http::{AppState, Metrics};
use trailmark_projector::Projector;
use trailmark_store::{CreatedWorkspace, WorkspaceDirectory};

use crate::backends::Backends;
use crate::config::Config;

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
}

/// The HTTP routes of `role`, with health, metrics and request timing.
pub fn router(state: AppState, role: Role) -> Router {
    let mut router = Router::new().merge(trailmark_http::health::routes());
    if role.serves_ingest() {
        router = router.merge(trailmark_ingest::routes());
    }
    if role.serves_queries() {
        router = router.merge(trailmark_query_api::routes());
    }
    router
        .fallback(|| async { trailmark_http::ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            trailmark_http::metrics::track_requests,
        ))
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
        log: role.serves_ingest() || role.projects(),
        store: role.serves_queries() || role.projects(),
    };
    Ok(AppState::builder(
        backends.log.clone(),
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
    /// The backends, shared with the services.
    pub backends: Arc<Backends>,
    /// The workspace created at this start, if this was the first.
    pub created: Option<CreatedWorkspace>,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    projector: Option<tokio::task::JoinHandle<trailmark_projector::Result<()>>>,
}

/// Opens the backends and starts `role` on `listener`.
pub async fn start(config: Config, role: Role, listener: TcpListener) -> anyhow::Result<Running> {
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
    let app = router(state, role);
    let mut http_stop = stop_rx;
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = http_stop.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });
    Ok(Running {
        addr,
        backends,
        created,
        stop,
        server,
        projector,
    })
}

impl Running {
    /// Runs until `shutdown` resolves or the projector fails, then stops:
    /// HTTP stops accepting and drains, the projector finishes its batch,
    /// and the backends are flushed and closed.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let failed = match self.projector.as_mut() {
            Some(handle) => tokio::select! {
                _ = shutdown => None,
                r = handle => Some(r),
            },
            None => {
                shutdown.await;
                None
            }
        };
        match failed {
            Some(result) => {
                self.projector = None;
                let _ = self.stop.send(true);
                let _ = (&mut self.server).await;
                self.backends.close();
                result??;
                anyhow::bail!("the projector stopped unexpectedly")
            }
            None => self.stop().await,
        }
    }

    /// Stops everything and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.server.await??;
        let projected = match self.projector {
            Some(handle) => handle.await.map_err(anyhow::Error::from),
            None => Ok(Ok(())),
        };
        self.backends.close();
        projected??;
        Ok(())
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
    running.run_until(shutdown).await
}

/// Clears every projection and replays the whole log into the store.
pub async fn rebuild(config: &Config) -> anyhow::Result<u64> {
    let backends = Backends::open(config).await?;
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
