//! The evaluator: a consumer of the log that keeps memberships and computed
//! traits current.
//!
//! One step per batch of the log, after the projector has applied it:
//! 1. events before the checkpoint, and client retries (de-duplicated per
//!    consumer, as the projector does), are skipped;
//! 2. each event's contributions fold into its primary identifier's leaf
//!    states, each fenced by its partition's position;
//! 3. the profiles the batch touched are evaluated at `now`, and every
//!    change becomes writes and an event in the outbox, one group per
//!    profile;
//! 4. the step commits (groups, de-duplication rows, checkpoint), and the
//!    outbox is appended to the log.
//!
//! While far behind the log (starting over a long log, or after a rebuild)
//! it only folds, restoring memberships from its own past events, and marks
//! touched profiles dirty; once caught up it evaluates them, so a replay
//! never decides a change twice.
//!
//! Between steps: the sweep evaluates profiles whose deadline passed; new
//! definitions are picked up, their new leaf states backfilled from the
//! start of the log by a second reader until it meets the live one, and then
//! every profile is evaluated under them (a pass) before they are `live`.
//!
//! One evaluator writes at a time: its state is read, then written, with no
//! race. (Run one `trailmark evaluator` process in distributed mode.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use trailmark_domain::Clock;
use trailmark_domain::audience::leaf::SpecId;
use trailmark_domain::audience::{Catalog, Changed};
use trailmark_http::Metrics;
use trailmark_log::{EventLog, StartPositions, Subscription};
use trailmark_schemas::EventCodec;
use trailmark_store::evaluator::{EvalCommit, EvalKey, EvalTable, EvalWrite};
use trailmark_store::{LoggedEvent, ProfileStore, WorkspaceDirectory};

use crate::Result;
use crate::definitions::{DefinitionRecord, Definitions, Kind, StatusRecord, compile};
use crate::profile::{LeafCache, RecordCache};
use crate::rows::{self};

/// Tuning of the evaluator.
#[derive(Debug, Clone)]
pub struct EvaluatorConfig {
    /// Its consumer group (and checkpoint and de-duplication name).
    pub group: String,
    /// The projector's group, whose checkpoints it waits for.
    pub projector_group: String,
    /// The most records read in one step.
    pub batch_size: usize,
    /// How long one poll waits for records.
    pub poll_wait: Duration,
    /// How often due deadlines are swept.
    pub sweep_interval: Duration,
    /// How often definitions are re-read.
    pub refresh_interval: Duration,
    /// How often audience sizes are counted.
    pub size_interval: Duration,
    /// The de-duplication window (as the projector's).
    pub dedup_window: Duration,
    /// Behind the log by more than this many records (per partition) at
    /// start, it only folds until caught up.
    pub catch_up_threshold: u64,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        Self {
            group: "evaluator".into(),
            projector_group: "projector".into(),
            batch_size: 2_000,
            poll_wait: Duration::from_millis(100),
            sweep_interval: Duration::from_secs(5),
            refresh_interval: Duration::from_secs(1),
            size_interval: Duration::from_secs(30),
            dedup_window: Duration::from_secs(24 * 3_600),
            catch_up_threshold: 10_000,
        }
    }
}

/// How many members' leaf rows the evaluator keeps in memory between
/// steps (it is their only writer, so the copies stay exact); past it, it
/// starts again empty. A member with no rows yet is held too (so that its
/// next event reads nothing), and a site's active visitors number hundreds
/// of thousands: a smaller bound emptied it every few seconds under load.
const LEAF_CACHE_MEMBERS: usize = 1_000_000;
/// And how many bytes of them (encoded, counting each row read or written
/// since it last started empty, and each member's key and entry): a
/// member's rows grow with what its events match, so a count of members
/// alone would not bound memory.
const LEAF_CACHE_BYTES: usize = 256 << 20;
/// How many profile records it keeps in memory between steps (it is their
/// only writer), and how many bytes of them.
const RECORD_CACHE_ROWS: usize = 1_000_000;
const RECORD_CACHE_BYTES: usize = 128 << 20;
/// How many profiles one step resolves and evaluates at once: their reads
/// overlap (each a blocking task on the embedded store, a round trip on
/// CQL), and they use both cores.
const CONCURRENCY: usize = 16;
/// How many noted identifiers it remembers.
const KNOWN_ROWS: usize = 1_000_000;
/// Profiles evaluated per slice of a pass or of the dirty list.
const SLICE: usize = 200;
/// The most profiles one step evaluates because of identity changes
/// (merges and splits) found while evaluating others.
const MAX_FOLLOW: usize = 2_000;

/// Runs a step until it succeeds or fails for good, with a capped backoff
/// between attempts. (A step changes the loop's state only once its commit
/// is written, so running it again is safe.)
macro_rules! retry {
    ($step:expr) => {{
        let mut backoff = Duration::from_millis(50);
        loop {
            match $step.await {
                Ok(v) => break v,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "evaluator step failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }};
}

/// The evaluator.
pub struct Evaluator {
    log: Arc<dyn EventLog>,
    store: Arc<dyn ProfileStore>,
    directory: Arc<dyn WorkspaceDirectory>,
    definitions: Definitions,
    codec: Arc<EventCodec>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    config: EvaluatorConfig,
}

/// A workspace's definitions as the evaluator runs them.
#[derive(Clone)]
struct Running {
    catalog: Arc<Catalog>,
    /// The version running, by definition id.
    versions: BTreeMap<String, u32>,
}

/// Every profile of a workspace evaluated again, a slice at a time, after
/// new versions went in; they are `live` when it ends.
struct Pass {
    ws: String,
    after: Option<Vec<u8>>,
    versions: BTreeMap<String, u32>,
}

/// New leaf states folded from the start of the log by a second reader,
/// until it meets the live reader; then the new versions run.
struct Backfill {
    /// (In a mutex only so that the loop's state is `Sync`; it is reached
    /// through `&mut`, never locked.)
    sub: tokio::sync::Mutex<Box<dyn Subscription>>,
    consumer: String,
    /// The new specs' catalogs, by workspace (only the new specs).
    catalogs: HashMap<String, Arc<Catalog>>,
    /// The versions to run once it meets the live reader, by workspace.
    target: HashMap<String, Running>,
    specs: BTreeSet<SpecId>,
    positions: BTreeMap<u32, u64>,
}

/// What the loop keeps between steps.
#[derive(Default)]
struct Run {
    workspaces: HashMap<String, Running>,
    folded: BTreeSet<SpecId>,
    caches: Caches,
    positions: BTreeMap<u32, u64>,
    catching_up: Option<Vec<u64>>,
    sweep_cursor: Option<i64>,
    swept_to: i64,
    passes: Vec<Pass>,
    backfill: Option<Backfill>,
    outbox_seq: u64,
    /// The time part of outbox keys: the clock's, never going back.
    outbox_at: i64,
    /// The sort key of the last outbox row published.
    outbox_published: Option<Vec<u8>>,
    dirty_left: bool,
    /// Identifiers of workspaces with nothing defined, already noted.
    known: std::collections::HashSet<(String, trailmark_domain::Identifier)>,
    /// Backfills that met the live reader less than a window ago.
    joined: Vec<Joined>,
}

/// What the loop keeps in memory of the store: copies of rows only it
/// writes (leaf states, profile records) and profiles resolved, each exact
/// and bounded.
#[derive(Default)]
struct Caches {
    leaves: LeafCache,
    resolutions: Resolutions,
    records: RecordCache,
}

impl Caches {
    /// Forgets the copies of rows a failed commit may have left different
    /// from the store (a fold writes into its copy before it commits).
    fn forget_unsaved(&mut self) {
        self.leaves.clear();
        self.records.clear();
    }

    /// Empties whichever is past its bound.
    fn bound(&mut self) {
        if self.leaves.len() > LEAF_CACHE_MEMBERS || self.leaves.bytes() > LEAF_CACHE_BYTES {
            self.leaves.clear();
        }
        if self.records.len() > RECORD_CACHE_ROWS || self.records.bytes() > RECORD_CACHE_BYTES {
            self.records.clear();
        }
    }
}

impl Run {
    /// Each workspace's running catalog.
    fn catalogs(&self) -> HashMap<String, Arc<Catalog>> {
        self.workspaces
            .iter()
            .map(|(ws, r)| (ws.clone(), r.catalog.clone()))
            .collect()
    }
}

/// A backfill that met the live reader: until `until` (the clock's time,
/// a de-duplication window and some slack after), the live reader also
/// asks what it saw.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Joined {
    consumer: String,
    until: i64,
}

/// Identifiers an event (or a deadline, or a pass) touched, in the event's
/// order (its primary first), with the cause to record and what may have
/// changed for their profiles (`None`: anything, so evaluate everything).
struct Touch {
    ws: String,
    ids: Vec<trailmark_domain::Identifier>,
    cause: rows::Cause,
    changed: Option<Changed>,
}

impl Touch {
    /// A touch after which everything is evaluated.
    fn full(ws: String, ids: Vec<trailmark_domain::Identifier>, cause: rows::Cause) -> Touch {
        Touch {
            ws,
            ids,
            cause,
            changed: None,
        }
    }
}

/// What changed for a profile, over every touch that reached it.
fn union(into: &mut Option<Changed>, more: &Option<Changed>) {
    match (into.as_mut(), more) {
        (Some(c), Some(m)) => {
            c.specs.extend(m.specs.iter().cloned());
            c.traits |= m.traits;
            c.seen |= m.seen;
        }
        (Some(_), None) => *into = None,
        (None, _) => {}
    }
}

/// One contribution of one event to one leaf state, to fold.
struct Folding<'e> {
    event: &'e LoggedEvent,
    catalog: Arc<Catalog>,
    spec: SpecId,
    key: EvalKey,
    contribution: trailmark_domain::audience::leaf::Contribution,
}

/// Where the evaluator has got: for the API (`eval_lag_ms`) and for tests,
/// which wait until it has caught up and swept to a time.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Its positions.
    pub positions: BTreeMap<u32, u64>,
    /// The clock's time of its last complete sweep.
    pub swept_to: i64,
    /// The `receivedAt` of the last event it evaluated.
    pub last_received: i64,
    /// When it last wrote this, by its clock.
    pub at: i64,
    /// Whether work is left that the positions do not show (a backfill, a
    /// pass, dirty profiles, an outbox).
    pub busy: bool,
}

struct FromStore {
    store: Arc<dyn ProfileStore>,
    consumer: String,
}

#[async_trait]
impl StartPositions for FromStore {
    async fn start_position(&self, partition: u32) -> trailmark_log::Result<Option<u64>> {
        let cps = self
            .store
            .checkpoints(&self.consumer)
            .await
            .map_err(|e| trailmark_log::LogError::Unavailable(e.to_string()))?;
        Ok(cps.get(&partition).copied())
    }
}

/// The name of the progress row in `Stats`.
pub const PROGRESS: &str = "progress";

impl Evaluator {
    /// An evaluator over a log and a store.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn ProfileStore>,
        directory: Arc<dyn WorkspaceDirectory>,
        codec: Arc<EventCodec>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        config: EvaluatorConfig,
    ) -> Self {
        Self {
            definitions: Definitions::with_clock(directory.clone(), clock.clone()),
            log,
            store,
            directory,
            codec,
            clock,
            metrics,
            config,
        }
    }

    /// Runs until `shutdown` resolves; a step in hand is finished first.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut run = self.start().await?;
        let mut sub = self
            .log
            .subscribe(
                &self.config.group,
                Arc::new(FromStore {
                    store: self.store.clone(),
                    consumer: self.config.group.clone(),
                }),
            )
            .await?;
        let mut last_sweep = Instant::now();
        let mut last_refresh = Instant::now();
        let mut last_size: Option<Instant> = None;
        let mut last_behind = Instant::now();
        let mut last_progress = Progress::default();
        loop {
            let polled = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                polled = sub.poll(self.config.batch_size, self.config.poll_wait) => polled,
            };
            let deliveries = match polled {
                Ok(d) => d,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "evaluator poll failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !deliveries.is_empty() {
                let (events, positions) = self.decode(deliveries);
                retry!(self.step(&mut run, &events, &positions));
            }
            if let Some(ends) = &run.catching_up
                && ends
                    .iter()
                    .enumerate()
                    .all(|(p, end)| run.positions.get(&(p as u32)).copied().unwrap_or(0) >= *end)
            {
                tracing::info!("evaluator caught up with the log; evaluating marked profiles");
                run.catching_up = None;
                run.dirty_left = true;
            }
            if run.catching_up.is_none() {
                if run.dirty_left {
                    retry!(self.drain_dirty(&mut run));
                }
                if last_sweep.elapsed() >= self.config.sweep_interval {
                    retry!(self.sweep(&mut run));
                    last_sweep = Instant::now();
                }
                if run.backfill.is_some() {
                    retry!(self.backfill_slice(&mut run));
                } else if !run.passes.is_empty() {
                    retry!(self.pass_slice(&mut run));
                }
            }
            if last_refresh.elapsed() >= self.config.refresh_interval {
                retry!(self.refresh(&mut run));
                last_refresh = Instant::now();
            }
            if last_size.is_none_or(|t| t.elapsed() >= self.config.size_interval) {
                retry!(self.count_sizes(&run));
                last_size = Some(Instant::now());
            }
            if last_behind.elapsed() >= Duration::from_millis(500) {
                if let Ok(ends) = self.log.end_positions().await {
                    let behind: u64 = ends
                        .iter()
                        .enumerate()
                        .map(|(p, end)| {
                            end.saturating_sub(run.positions.get(&(p as u32)).copied().unwrap_or(0))
                        })
                        .sum();
                    self.metrics.evaluator_behind.set(behind as i64);
                }
                last_behind = Instant::now();
            }
            let progress = Progress {
                positions: run.positions.clone(),
                swept_to: run.swept_to,
                last_received: last_progress.last_received,
                at: self.clock.now_micros(),
                busy: run.backfill.is_some()
                    || !run.passes.is_empty()
                    || run.dirty_left
                    || run.catching_up.is_some(),
            };
            if (&progress.positions, progress.swept_to, progress.busy)
                != (
                    &last_progress.positions,
                    last_progress.swept_to,
                    last_progress.busy,
                )
            {
                self.write_progress(&progress).await?;
                last_progress = progress;
            }
        }
    }

    /// Reads where it stands: folded specs, running versions, checkpoints,
    /// and whether it must catch up first.
    async fn start(&self) -> Result<Run> {
        let mut run = Run {
            positions: self.store.checkpoints(&self.config.group).await?,
            ..Run::default()
        };
        let fresh = run.positions.is_empty();
        if let Some(v) = self.stats_row("specs").await? {
            run.folded = serde_json::from_slice(&v).unwrap_or_default();
        }
        if let Some(v) = self.stats_row("sweep").await? {
            run.sweep_cursor = serde_json::from_slice(&v).ok();
        }
        if let Some(v) = self.stats_row("joined").await? {
            let now = self.clock.now_micros();
            run.joined = serde_json::from_slice::<Vec<Joined>>(&v).unwrap_or_default();
            run.joined.retain(|j| j.until > now);
        }
        let ends = self.log.end_positions().await?;
        let behind = ends.iter().enumerate().any(|(p, end)| {
            end.saturating_sub(run.positions.get(&(p as u32)).copied().unwrap_or(0))
                > self.config.catch_up_threshold
        });
        if fresh || behind {
            run.catching_up = Some(ends);
        }
        // Running versions: those that were live; a fresh evaluator folds
        // from the start, so it runs the newest versions at once.
        for ws in self.directory.workspaces().await? {
            let (audiences, traits, statuses) = self.read_definitions(&ws.id).await?;
            let pick = |r: &DefinitionRecord| {
                if fresh {
                    Some(r.latest().version)
                } else {
                    statuses.get(&r.id).and_then(|s| s.live_version)
                }
            };
            let running = running(&audiences, &traits, pick);
            if !running.catalog.is_empty() {
                if fresh {
                    run.folded.extend(running.catalog.specs().keys().cloned());
                }
                // A running version whose leaf states are incomplete (a
                // crash mid-way through a backfill) waits for the next one.
                let complete = running
                    .catalog
                    .specs()
                    .keys()
                    .all(|s| run.folded.contains(s));
                if complete {
                    if fresh {
                        for (id, v) in &running.versions {
                            let mut st = self.definitions.status(&ws.id, id).await?;
                            st.live_version = Some(*v);
                            st.backfilling_version = None;
                            self.definitions.set_status(&ws.id, id, &st).await?;
                        }
                    }
                    run.workspaces.insert(ws.id.clone(), running);
                }
            }
        }
        if fresh {
            self.put_stats("specs", &run.folded).await?;
        }
        tracing::info!(
            fresh,
            catching_up = run.catching_up.is_some(),
            workspaces = run.workspaces.len(),
            specs = run.folded.len(),
            "evaluator starting"
        );
        // Changes decided but not yet appended.
        self.publish(&mut run).await?;
        Ok(run)
    }

    pub(super) async fn read_definitions(
        &self,
        ws: &str,
    ) -> Result<(
        Vec<DefinitionRecord>,
        Vec<DefinitionRecord>,
        BTreeMap<String, StatusRecord>,
    )> {
        let audiences = self.definitions.list(ws, Kind::Audience).await?;
        let traits = self.definitions.list(ws, Kind::ComputedTrait).await?;
        let mut statuses = BTreeMap::new();
        for r in audiences.iter().chain(&traits) {
            statuses.insert(r.id.clone(), self.definitions.status(ws, &r.id).await?);
        }
        Ok((audiences, traits, statuses))
    }

    pub(super) async fn stats_row(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .store
            .eval_get(EvalTable::Stats, vec![rows::stats_key(name)])
            .await?
            .into_iter()
            .next()
            .map(|(_, v)| v))
    }

    pub(super) async fn put_stats<T: serde::Serialize>(&self, name: &str, v: &T) -> Result<()> {
        self.store
            .eval_commit(Arc::new(EvalCommit {
                consumer: self.config.group.clone(),
                rows: vec![EvalWrite::Put(
                    EvalTable::Stats,
                    rows::stats_key(name),
                    rows::encode(v),
                )],
                dedup_window_micros: self.window(),
                ..EvalCommit::default()
            }))
            .await?;
        Ok(())
    }

    pub(super) async fn write_progress(&self, p: &Progress) -> Result<()> {
        self.put_stats(PROGRESS, p).await
    }

    /// Writes a commit of the loop's: its records are then held, and if it
    /// fails, every copy it may have made different from the store is
    /// forgotten.
    async fn commit_run(&self, run: &mut Run, commit: EvalCommit) -> Result<()> {
        let commit = Arc::new(commit);
        match self.store.eval_commit(commit.clone()).await {
            Ok(()) => {
                run.caches.records.committed(&commit);
                run.caches.bound();
                Ok(())
            }
            Err(e) => {
                run.caches.forget_unsaved();
                Err(e.into())
            }
        }
    }

    /// An empty commit of this evaluator's consumer: rows and groups only,
    /// no checkpoint.
    pub(super) fn commit(&self) -> EvalCommit {
        EvalCommit {
            consumer: self.config.group.clone(),
            dedup_window_micros: self.window(),
            ..EvalCommit::default()
        }
    }

    pub(super) fn window(&self) -> i64 {
        self.config.dedup_window.as_micros() as i64
    }

    pub(super) fn decode(
        &self,
        deliveries: Vec<trailmark_log::Delivery>,
    ) -> (Vec<LoggedEvent>, Vec<(u32, u64)>) {
        let mut positions = BTreeMap::new();
        let mut events = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            positions.insert(d.partition, d.next_position);
            match self.codec.decode(&d.payload) {
                Ok(event) => events.push(LoggedEvent {
                    partition: d.partition,
                    position: d.position,
                    event,
                }),
                // The projector dead-letters what cannot be decoded; the
                // evaluator has nothing to take from it.
                Err(e) => {
                    tracing::debug!(partition = d.partition, position = d.position, error = %e, "evaluator skips an undecodable record")
                }
            }
        }
        (events, positions.into_iter().collect())
    }

    /// Waits until the projector has applied everything before `positions`.
    pub(super) async fn follow_projector(&self, positions: &[(u32, u64)]) -> Result<()> {
        let started = Instant::now();
        loop {
            let done = self.store.checkpoints(&self.config.projector_group).await?;
            if positions
                .iter()
                .all(|(p, next)| done.get(p).copied().unwrap_or(0) >= *next)
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                tracing::warn!("the evaluator has waited 30 s for the projector");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

mod resolutions;
mod step;
mod time;
mod versions;

use resolutions::Resolutions;

use versions::running;
