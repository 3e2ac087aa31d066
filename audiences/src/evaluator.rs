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
use trailmark_domain::audience::leaf::SpecId;
use trailmark_domain::audience::{Catalog, EVALUATOR_SOURCE};
use trailmark_domain::profile::is_duplicate;
use trailmark_domain::{Clock, Event, EventType, IdKind, Identifier};
use trailmark_http::Metrics;
use trailmark_log::{EventLog, Record, StartPositions, Subscription};
use trailmark_schemas::EventCodec;
use trailmark_store::evaluator::{EvalCommit, EvalKey, EvalTable, EvalWrite};
use trailmark_store::{LoggedEvent, ProfileStore, WorkspaceDirectory};
use uuid::Uuid;

use crate::definitions::{DefinitionRecord, Definitions, Kind, StatusRecord, compile};
use crate::profile::{self, Outcome, Overlay};
use crate::rows::{self, Cause, LeafRow, MemberRow, MemberState, ProfileRecord};
use crate::{EvaluatorError, Result};

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

/// How many leaf rows the evaluator keeps in memory between steps (it is
/// their only writer, so the copies stay exact).
const LEAF_CACHE_ROWS: usize = 200_000;
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
    leaf_cache: Overlay,
    positions: BTreeMap<u32, u64>,
    catching_up: Option<Vec<u64>>,
    sweep_cursor: Option<i64>,
    swept_to: i64,
    passes: Vec<Pass>,
    backfill: Option<Backfill>,
    outbox_seq: u64,
    dirty_left: bool,
    /// Identifiers of workspaces with nothing defined, already noted.
    known: std::collections::HashSet<EvalKey>,
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
        // Changes decided but not yet appended.
        self.publish(&mut run).await?;
        Ok(run)
    }

    async fn read_definitions(
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

    async fn stats_row(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .store
            .eval_get(EvalTable::Stats, vec![rows::stats_key(name)])
            .await?
            .into_iter()
            .next()
            .map(|(_, v)| v))
    }

    async fn put_stats<T: serde::Serialize>(&self, name: &str, v: &T) -> Result<()> {
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

    async fn write_progress(&self, p: &Progress) -> Result<()> {
        self.put_stats(PROGRESS, p).await
    }

    fn window(&self) -> i64 {
        self.config.dedup_window.as_micros() as i64
    }

    fn decode(
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
    async fn follow_projector(&self, positions: &[(u32, u64)]) -> Result<()> {
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

    /// One step over a batch of the log.
    async fn step(
        &self,
        run: &mut Run,
        events: &[LoggedEvent],
        positions: &[(u32, u64)],
    ) -> Result<()> {
        self.follow_projector(positions).await?;
        let now = self.clock.now_micros();
        let mut commit = EvalCommit {
            consumer: self.config.group.clone(),
            dedup_window_micros: self.window(),
            positions: positions.to_vec(),
            ..EvalCommit::default()
        };
        let fresh = self
            .fresh_events(&self.config.group, &run.positions, events, &mut commit)
            .await?;
        let catalogs: HashMap<String, Arc<Catalog>> = run
            .workspaces
            .iter()
            .map(|(ws, r)| (ws.clone(), r.catalog.clone()))
            .collect();
        let mut overlay = std::mem::take(&mut run.leaf_cache);
        let mut touched: Vec<(String, Identifier, Cause)> = Vec::new();
        let mut own: Vec<&Event> = Vec::new();
        self.fold(&fresh, &catalogs, &mut overlay, &mut commit, |le| {
            let ev = &le.event;
            if ev.source_id == EVALUATOR_SOURCE {
                own.push(ev);
                return;
            }
            let cause = Cause::Event {
                message_id: ev.message_id.clone(),
                received_at: ev.received_at,
            };
            for id in touched_ids(ev) {
                touched.push((ev.workspace_id.clone(), id, cause.clone()));
            }
        })
        .await?;
        let mut restored = self.restore(&own).await?;
        // A workspace with nothing defined needs no evaluation: its
        // identifiers are only noted, so that a first definition's pass
        // finds every profile.
        touched.retain(|(ws, id, _)| {
            if catalogs.contains_key(ws) {
                return true;
            }
            let key = rows::id_profile_key(ws, id);
            if run.known.insert(key.clone()) {
                commit.rows.push(EvalWrite::Put(
                    EvalTable::IdProfiles,
                    key,
                    Uuid::nil().as_bytes().to_vec(),
                ));
            }
            false
        });
        if run.known.len() > KNOWN_ROWS {
            run.known.clear();
        }
        if run.catching_up.is_some() {
            for (ws, id, _) in &touched {
                commit.rows.push(EvalWrite::Put(
                    EvalTable::Dirty,
                    rows::dirty_key(ws, id),
                    Vec::new(),
                ));
            }
            commit.groups.append(&mut restored);
        } else {
            commit.groups.append(&mut restored);
            let outcomes = self
                .evaluate_all(run, &catalogs, touched, now, &overlay)
                .await?;
            self.add_outcomes(run, &mut commit, outcomes, now)?;
        }
        self.store.eval_commit(Arc::new(commit)).await?;
        for (p, next) in positions {
            run.positions.insert(*p, *next);
        }
        if let Some(last) = fresh.last() {
            let lag = (now - last.event.received_at).max(0);
            self.metrics.evaluator_lag_seconds.set(lag as f64 / 1e6);
        }
        if overlay.len() > LEAF_CACHE_ROWS {
            overlay.clear();
        }
        run.leaf_cache = overlay;
        self.publish(run).await
    }

    /// The events of a batch to fold: not before the checkpoint, and not a
    /// retry of a message this consumer saw within the window (recorded in
    /// `commit`).
    async fn fresh_events<'e>(
        &self,
        consumer: &str,
        checkpoints: &BTreeMap<u32, u64>,
        events: &'e [LoggedEvent],
        commit: &mut EvalCommit,
    ) -> Result<Vec<&'e LoggedEvent>> {
        let keys: Vec<(String, String)> = events
            .iter()
            .map(|le| (le.event.workspace_id.clone(), le.event.message_id.clone()))
            .collect();
        let mut seen = self.store.eval_seen(consumer, keys).await?;
        let mut fresh = Vec::with_capacity(events.len());
        for le in events {
            if checkpoints
                .get(&le.partition)
                .is_some_and(|next| le.position < *next)
            {
                continue;
            }
            let ev = &le.event;
            let key = (ev.workspace_id.clone(), ev.message_id.clone());
            if is_duplicate(seen.get(&key).copied(), ev.received_at, self.window()) {
                continue;
            }
            seen.insert(key, ev.received_at);
            commit.seen.push((
                le.partition,
                ev.workspace_id.clone(),
                ev.message_id.clone(),
                ev.received_at,
            ));
            fresh.push(le);
        }
        Ok(fresh)
    }

    /// Folds events' contributions into leaf rows (in `overlay`, and as
    /// standalone writes of `commit`), calling `each` for every event.
    async fn fold<'e>(
        &self,
        events: &[&'e LoggedEvent],
        catalogs: &HashMap<String, Arc<Catalog>>,
        overlay: &mut Overlay,
        commit: &mut EvalCommit,
        mut each: impl FnMut(&'e LoggedEvent),
    ) -> Result<()> {
        let mut contributions = Vec::new();
        let mut wanted = Vec::new();
        for le in events {
            each(le);
            let ev = &le.event;
            if ev.source_id == EVALUATOR_SOURCE || ev.kind == EventType::Control {
                continue;
            }
            let Some(catalog) = catalogs.get(&ev.workspace_id) else {
                continue;
            };
            let primary = ev.primary_identifier();
            for (spec, c) in catalog.contributions(ev) {
                let key = rows::leaf_key(&ev.workspace_id, &primary, &spec);
                if !overlay.contains_key(&key) {
                    wanted.push(key.clone());
                }
                contributions.push((le, catalog.clone(), spec, key, c));
            }
        }
        if !wanted.is_empty() {
            wanted.sort();
            wanted.dedup();
            let found: HashMap<EvalKey, Vec<u8>> = self
                .store
                .eval_get(EvalTable::Leaves, wanted)
                .await?
                .into_iter()
                .collect();
            for (_, catalog, spec, key, _) in &contributions {
                if overlay.contains_key(key) {
                    continue;
                }
                let row = found
                    .get(key)
                    .and_then(|v| rows::decode::<LeafRow>(v))
                    .unwrap_or_else(|| LeafRow {
                        state: catalog.specs()[spec].empty(),
                        applied: None,
                    });
                overlay.insert(key.clone(), row);
            }
        }
        let mut changed = BTreeSet::new();
        for (le, catalog, spec, key, c) in contributions {
            let Some(row) = overlay.get_mut(&key) else {
                continue;
            };
            if let Some((p, next)) = row.applied
                && p == le.partition
                && le.position < next
            {
                continue;
            }
            row.state.fold(&catalog.specs()[&spec], &c);
            row.applied = Some((le.partition, le.position + 1));
            changed.insert(key);
        }
        for key in changed {
            let row = &overlay[&key];
            commit
                .rows
                .push(EvalWrite::Put(EvalTable::Leaves, key, rows::encode(row)));
        }
        Ok(())
    }

    /// Restores memberships from the evaluator's own events: after a
    /// rebuild, the log is the only record of the changes it emitted.
    async fn restore(&self, own: &[&Event]) -> Result<Vec<Vec<EvalWrite>>> {
        let mut records: BTreeMap<(String, Uuid), ProfileRecord> = BTreeMap::new();
        let mut changed = BTreeSet::new();
        let mut groups = Vec::new();
        for ev in own {
            let Some((def, pid, n, member, version)) = crate::emit::read_membership(ev) else {
                continue;
            };
            let ws = ev.workspace_id.clone();
            let key = (ws.clone(), pid);
            if !records.contains_key(&key) {
                let r = profile::record(&*self.store, &ws, pid).await?;
                records.insert(key.clone(), r.unwrap_or_default());
            }
            let record = records.get_mut(&key).expect("just read");
            let behind = record.audiences.get(&def).is_none_or(|s| s.n < n);
            if !behind {
                continue;
            }
            if record.holder.is_empty() {
                record.holder = ev
                    .user_id
                    .as_ref()
                    .map(|u| format!("user_id:{u}"))
                    .or_else(|| {
                        ev.anonymous_id
                            .as_ref()
                            .map(|a| format!("anonymous_id:{a}"))
                    })
                    .unwrap_or_default();
            }
            record.audiences.insert(
                def.clone(),
                MemberState {
                    member,
                    n,
                    version,
                    since: ev.timestamp,
                },
            );
            let mkey = rows::member_key(&ws, &def, pid);
            groups.push(vec![if member {
                EvalWrite::Put(
                    EvalTable::Members,
                    mkey,
                    rows::encode(&MemberRow {
                        holder: record.holder.clone(),
                        since: ev.timestamp,
                        version,
                    }),
                )
            } else {
                EvalWrite::Delete(EvalTable::Members, mkey)
            }]);
            changed.insert(key);
        }
        for key in changed {
            groups.push(vec![EvalWrite::Put(
                EvalTable::Profiles,
                rows::profile_key(&key.0, key.1),
                rows::encode(&records[&key]),
            )]);
        }
        Ok(groups)
    }

    /// Evaluates the profiles of touched identifiers, and those identity
    /// changes among them reach (merged-away and split-off profiles).
    async fn evaluate_all(
        &self,
        run: &Run,
        catalogs: &HashMap<String, Arc<Catalog>>,
        touched: Vec<(String, Identifier, Cause)>,
        now: i64,
        overlay: &Overlay,
    ) -> Result<Vec<(String, Outcome)>> {
        let empty = Arc::new(Catalog::default());
        let mut done: BTreeSet<(String, Uuid)> = BTreeSet::new();
        let mut queue: std::collections::VecDeque<(String, Identifier, Cause)> = touched.into();
        let mut formers: Vec<(String, Uuid, Uuid)> = Vec::new();
        let mut outcomes = Vec::new();
        let mut followed = 0;
        let _ = run;
        while let Some((ws, id, cause)) = queue.pop_front() {
            let Some(profile) = self.store.resolve(&ws, &id).await? else {
                continue;
            };
            if !done.insert((ws.clone(), profile.profile_id)) {
                continue;
            }
            let catalog = catalogs.get(&ws).unwrap_or(&empty);
            let out = profile::evaluate(&*self.store, &ws, catalog, &profile, &cause, now, overlay)
                .await?;
            for d in &out.departed {
                if followed < MAX_FOLLOW {
                    followed += 1;
                    queue.push_back((ws.clone(), d.clone(), cause.clone()));
                }
            }
            for f in &out.former {
                if *f != profile.profile_id {
                    formers.push((ws.clone(), *f, profile.profile_id));
                }
            }
            outcomes.push((ws.clone(), out));
        }
        // Profiles its members were last evaluated under: still standing
        // (a split gave them back), or retired.
        for (ws, former, into) in formers {
            if done.contains(&(ws.clone(), former)) {
                continue;
            }
            let Some(before) = profile::record(&*self.store, &ws, former).await? else {
                continue;
            };
            let catalog = catalogs.get(&ws).unwrap_or(&empty);
            let standing = match Identifier::parse(&before.holder) {
                Some(h) => self
                    .store
                    .resolve(&ws, &h)
                    .await?
                    .filter(|p| p.profile_id == former),
                None => None,
            };
            done.insert((ws.clone(), former));
            match standing {
                Some(p) => {
                    let cause = Cause::Merged { into };
                    let out =
                        profile::evaluate(&*self.store, &ws, catalog, &p, &cause, now, overlay)
                            .await?;
                    outcomes.push((ws, out));
                }
                None => {
                    if before.audiences.values().any(|s| s.member) || before.deadline.is_some() {
                        outcomes.push((
                            ws.clone(),
                            profile::retire(&ws, former, &before, catalog, into, now),
                        ));
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// Adds evaluation outcomes to a commit: each profile's writes with its
    /// events' outbox rows, as one group.
    fn add_outcomes(
        &self,
        run: &mut Run,
        commit: &mut EvalCommit,
        outcomes: Vec<(String, Outcome)>,
        now: i64,
    ) -> Result<()> {
        for (_, out) in outcomes {
            let mut group = out.group;
            for ev in &out.events {
                let payload = self
                    .codec
                    .encode(ev)
                    .map_err(|e| EvaluatorError::Encode(e.to_string()))?;
                run.outbox_seq += 1;
                group.push(EvalWrite::Put(
                    EvalTable::Outbox,
                    rows::outbox_key(now, run.outbox_seq),
                    rows::outbox_value(&ev.partition_key(), &payload),
                ));
            }
            for cause in &out.changes {
                match cause {
                    Cause::Event { received_at, .. } => self
                        .metrics
                        .evaluator_change_delay_seconds
                        .with_label_values(&["event"])
                        .observe((now - received_at).max(0) as f64 / 1e6),
                    Cause::Deadline { at } => self
                        .metrics
                        .evaluator_change_delay_seconds
                        .with_label_values(&["deadline"])
                        .observe((now - at).max(0) as f64 / 1e6),
                    _ => {}
                }
            }
            self.metrics
                .evaluator_changes
                .inc_by(out.events.len() as u64);
            if !group.is_empty() {
                commit.groups.push(group);
            }
        }
        Ok(())
    }

    /// Appends the outbox to the log, then clears what was appended.
    async fn publish(&self, _run: &mut Run) -> Result<()> {
        loop {
            let rows_found = self
                .store
                .eval_scan(EvalTable::Outbox, &[], None, None, 500)
                .await?;
            if rows_found.is_empty() {
                return Ok(());
            }
            let mut records = Vec::with_capacity(rows_found.len());
            let mut deletes = Vec::with_capacity(rows_found.len());
            for (sort, v) in rows_found {
                if let Some((key, payload)) = rows::read_outbox(&v) {
                    records.push(Record { key, payload });
                }
                deletes.push(EvalWrite::Delete(
                    EvalTable::Outbox,
                    EvalKey::new(Vec::new(), sort),
                ));
            }
            self.log.append(records).await?;
            self.store
                .eval_commit(Arc::new(EvalCommit {
                    consumer: self.config.group.clone(),
                    rows: deletes,
                    dedup_window_micros: self.window(),
                    ..EvalCommit::default()
                }))
                .await?;
        }
    }

    /// Evaluates the profiles whose deadline has passed.
    async fn sweep(&self, run: &mut Run) -> Result<()> {
        let now = self.clock.now_micros();
        let now_hour = now.div_euclid(rows::HOUR);
        let mut hour = run.sweep_cursor.unwrap_or(now_hour - 1);
        let catalogs: HashMap<String, Arc<Catalog>> = run
            .workspaces
            .iter()
            .map(|(ws, r)| (ws.clone(), r.catalog.clone()))
            .collect();
        let before = rows::time_bytes(now + 1).to_vec();
        while hour <= now_hour {
            let part = hour.to_be_bytes().to_vec();
            loop {
                let due = self
                    .store
                    .eval_scan(EvalTable::Deadlines, &part, None, Some(&before), SLICE)
                    .await?;
                if due.is_empty() {
                    break;
                }
                let mut commit = EvalCommit {
                    consumer: self.config.group.clone(),
                    dedup_window_micros: self.window(),
                    ..EvalCommit::default()
                };
                let mut outcomes = Vec::new();
                for (sort, _) in &due {
                    // Whatever happens below, this row is done with.
                    commit.rows.push(EvalWrite::Delete(
                        EvalTable::Deadlines,
                        EvalKey::new(part.clone(), sort.clone()),
                    ));
                    let Some((deadline, pid, ws)) = rows::read_deadline(sort) else {
                        continue;
                    };
                    let Some(record) = profile::record(&*self.store, &ws, pid).await? else {
                        continue;
                    };
                    let Some(holder) = Identifier::parse(&record.holder) else {
                        continue;
                    };
                    let Some(p) = self.store.resolve(&ws, &holder).await? else {
                        continue;
                    };
                    let empty = Arc::new(Catalog::default());
                    let catalog = catalogs.get(&ws).unwrap_or(&empty);
                    let cause = Cause::Deadline { at: deadline };
                    let mut out = profile::evaluate(
                        &*self.store,
                        &ws,
                        catalog,
                        &p,
                        &cause,
                        now,
                        &run.leaf_cache,
                    )
                    .await?;
                    // The old row is deleted above; keep the new one.
                    out.group.retain(|w| {
                        !matches!(w, EvalWrite::Delete(EvalTable::Deadlines, k) if k.sort == *sort)
                    });
                    outcomes.push((ws, out));
                }
                self.add_outcomes(run, &mut commit, outcomes, now)?;
                self.store.eval_commit(Arc::new(commit)).await?;
                self.publish(run).await?;
            }
            if hour < now_hour {
                hour += 1;
                run.sweep_cursor = Some(hour);
                self.put_stats("sweep", &hour).await?;
            } else {
                break;
            }
        }
        run.swept_to = now;
        Ok(())
    }

    /// Evaluates the profiles marked while catching up, a slice at a time.
    async fn drain_dirty(&self, run: &mut Run) -> Result<()> {
        let now = self.clock.now_micros();
        let catalogs: HashMap<String, Arc<Catalog>> = run
            .workspaces
            .iter()
            .map(|(ws, r)| (ws.clone(), r.catalog.clone()))
            .collect();
        for ws in self.directory.workspaces().await? {
            loop {
                let marked = self
                    .store
                    .eval_scan(EvalTable::Dirty, ws.id.as_bytes(), None, None, SLICE)
                    .await?;
                if marked.is_empty() {
                    break;
                }
                let mut commit = EvalCommit {
                    consumer: self.config.group.clone(),
                    dedup_window_micros: self.window(),
                    ..EvalCommit::default()
                };
                let mut touched = Vec::new();
                for (sort, _) in &marked {
                    commit.rows.push(EvalWrite::Delete(
                        EvalTable::Dirty,
                        EvalKey::new(ws.id.as_bytes().to_vec(), sort.clone()),
                    ));
                    if let Some(id) = std::str::from_utf8(sort).ok().and_then(Identifier::parse) {
                        touched.push((ws.id.clone(), id, Cause::Definition { version: 0 }));
                    }
                }
                let outcomes = self
                    .evaluate_all(run, &catalogs, touched, now, &run.leaf_cache)
                    .await?;
                self.add_outcomes(run, &mut commit, outcomes, now)?;
                self.store.eval_commit(Arc::new(commit)).await?;
                self.publish(run).await?;
            }
        }
        run.dirty_left = false;
        Ok(())
    }

    /// Re-reads definitions; starts a backfill for new leaf states, or a
    /// pass when new versions need no new state.
    async fn refresh(&self, run: &mut Run) -> Result<()> {
        if run.backfill.is_some() {
            return Ok(());
        }
        let mut new_specs: BTreeSet<SpecId> = BTreeSet::new();
        let mut targets: HashMap<String, Running> = HashMap::new();
        for ws in self.directory.workspaces().await? {
            let (audiences, traits, _) = self.read_definitions(&ws.id).await?;
            let desired = running(&audiences, &traits, |r| Some(r.latest().version));
            let current = run.workspaces.get(&ws.id).map(|r| &r.versions);
            if Some(&desired.versions) == current
                || (current.is_none() && desired.versions.is_empty())
            {
                continue;
            }
            if run
                .passes
                .iter()
                .any(|p| p.ws == ws.id && p.versions == desired.versions)
            {
                continue;
            }
            new_specs.extend(
                desired
                    .catalog
                    .specs()
                    .keys()
                    .filter(|s| !run.folded.contains(*s))
                    .cloned(),
            );
            targets.insert(ws.id.clone(), desired);
        }
        if targets.is_empty() {
            return Ok(());
        }
        for (ws, target) in &targets {
            for (id, v) in &target.versions {
                let mut st = self.definitions.status(ws, id).await?;
                if st.live_version != Some(*v) && st.backfilling_version != Some(*v) {
                    st.backfilling_version = Some(*v);
                    self.definitions.set_status(ws, id, &st).await?;
                }
            }
        }
        if new_specs.is_empty() {
            for (ws, target) in targets {
                self.switch(run, ws, target);
            }
            return Ok(());
        }
        // Fold the new specs from the start of the log with a reader of
        // their own, under a consumer name of their own.
        let consumer = format!("{}-backfill-{}", self.config.group, Uuid::now_v7().simple());
        let sub = self
            .log
            .subscribe(&consumer, Arc::new(trailmark_log::FromEarliest))
            .await?;
        let catalogs = targets
            .iter()
            .map(|(ws, t)| (ws.clone(), Arc::new(t.catalog.only(&new_specs))))
            .collect();
        tracing::info!(
            specs = new_specs.len(),
            "backfilling new leaf states from the start of the log"
        );
        run.backfill = Some(Backfill {
            sub: tokio::sync::Mutex::new(sub),
            consumer,
            catalogs,
            target: targets,
            specs: new_specs,
            positions: BTreeMap::new(),
        });
        Ok(())
    }

    /// Runs new versions from now on, and evaluates every profile under
    /// them (a pass) before they count as live.
    fn switch(&self, run: &mut Run, ws: String, target: Running) {
        run.passes.retain(|p| p.ws != ws);
        run.passes.push(Pass {
            ws: ws.clone(),
            after: None,
            versions: target.versions.clone(),
        });
        if target.catalog.is_empty() {
            run.workspaces.remove(&ws);
        } else {
            run.workspaces.insert(ws, target);
        }
    }

    /// One slice of the backfill: fold a batch of the log for the new
    /// specs; once it has met the live reader on every partition, the new
    /// specs join and the new versions run.
    async fn backfill_slice(&self, run: &mut Run) -> Result<()> {
        let Some(mut bf) = run.backfill.take() else {
            return Ok(());
        };
        match self.backfill_step(run, &mut bf).await {
            Ok(true) => {
                tracing::info!(
                    specs = bf.specs.len(),
                    "backfill met the live reader; new versions run"
                );
                run.folded.extend(bf.specs.iter().cloned());
                self.put_stats("specs", &run.folded).await?;
                for (ws, target) in bf.target {
                    self.switch(run, ws, target);
                }
                Ok(())
            }
            Ok(false) => {
                run.backfill = Some(bf);
                Ok(())
            }
            Err(e) => {
                // Kept for the retry: its positions only move with its commits.
                run.backfill = Some(bf);
                Err(e)
            }
        }
    }

    /// Folds one batch for a backfill; true once it has met the live reader.
    async fn backfill_step(&self, run: &mut Run, bf: &mut Backfill) -> Result<bool> {
        let ends = self.log.end_positions().await?;
        let met = |bf: &Backfill, run: &Run| {
            ends.iter().enumerate().all(|(p, end)| {
                let p = p as u32;
                let mine = bf.positions.get(&p).copied().unwrap_or(0);
                let live = run.positions.get(&p).copied().unwrap_or(0);
                *end == 0 || mine >= live
            })
        };
        if !met(bf, run) {
            let deliveries = bf
                .sub
                .get_mut()
                .poll(self.config.batch_size, Duration::from_millis(10))
                .await?;
            if !deliveries.is_empty() {
                let (events, positions) = self.decode(deliveries);
                self.follow_projector(&positions).await?;
                let mut commit = EvalCommit {
                    consumer: bf.consumer.clone(),
                    dedup_window_micros: self.window(),
                    ..EvalCommit::default()
                };
                let fresh = self
                    .fresh_events(&bf.consumer, &bf.positions, &events, &mut commit)
                    .await?;
                let mut overlay = std::mem::take(&mut run.leaf_cache);
                self.fold(&fresh, &bf.catalogs, &mut overlay, &mut commit, |_| {})
                    .await?;
                self.store.eval_commit(Arc::new(commit)).await?;
                run.leaf_cache = overlay;
                for (p, next) in positions {
                    bf.positions.insert(p, next);
                }
            }
        }
        Ok(met(bf, run))
    }

    /// One slice of a pass: every profile of the workspace is evaluated
    /// once (through its holder); at the end its versions are live.
    async fn pass_slice(&self, run: &mut Run) -> Result<()> {
        let Some(mut pass) = run.passes.pop() else {
            return Ok(());
        };
        let at = pass.after.clone();
        match self.pass_step(run, &mut pass).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                run.passes.push(pass);
                Ok(())
            }
            Err(e) => {
                pass.after = at;
                run.passes.push(pass);
                Err(e)
            }
        }
    }

    /// Evaluates one slice of a pass; true once the pass is over.
    async fn pass_step(&self, run: &mut Run, pass: &mut Pass) -> Result<bool> {
        let now = self.clock.now_micros();
        let found = self
            .store
            .eval_scan(
                EvalTable::IdProfiles,
                pass.ws.as_bytes(),
                pass.after.as_deref(),
                None,
                SLICE,
            )
            .await?;
        let catalogs: HashMap<String, Arc<Catalog>> = run
            .workspaces
            .iter()
            .map(|(ws, r)| (ws.clone(), r.catalog.clone()))
            .collect();
        if let Some((last, _)) = found.last() {
            pass.after = Some(last.clone());
        }
        let mut touched = Vec::new();
        for (sort, _) in &found {
            if let Some(id) = std::str::from_utf8(sort).ok().and_then(Identifier::parse) {
                let version = pass.versions.values().copied().max().unwrap_or(0);
                touched.push((pass.ws.clone(), id, Cause::Definition { version }));
            }
        }
        let mut commit = EvalCommit {
            consumer: self.config.group.clone(),
            dedup_window_micros: self.window(),
            ..EvalCommit::default()
        };
        let outcomes = self
            .evaluate_all(run, &catalogs, touched, now, &run.leaf_cache)
            .await?;
        self.add_outcomes(run, &mut commit, outcomes, now)?;
        self.store.eval_commit(Arc::new(commit)).await?;
        self.publish(run).await?;
        if found.len() < SLICE {
            for (id, v) in &pass.versions {
                let mut st = self.definitions.status(&pass.ws, id).await?;
                st.live_version = Some(*v);
                if st.backfilling_version == Some(*v) {
                    st.backfilling_version = None;
                }
                self.definitions.set_status(&pass.ws, id, &st).await?;
            }
            tracing::info!(workspace = %pass.ws, "new versions are live");
            return Ok(true);
        }
        Ok(false)
    }

    /// Counts each running audience's members into its status.
    async fn count_sizes(&self, run: &Run) -> Result<()> {
        let now = self.clock.now_micros();
        for (ws, r) in &run.workspaces {
            for a in r.catalog.audiences() {
                let part = rows::members_part(ws, &a.id);
                let mut after: Option<Vec<u8>> = None;
                let mut size = 0u64;
                loop {
                    let page = self
                        .store
                        .eval_scan(EvalTable::Members, &part, after.as_deref(), None, 10_000)
                        .await?;
                    size += page.len() as u64;
                    match page.last() {
                        Some((k, _)) if page.len() == 10_000 => after = Some(k.clone()),
                        _ => break,
                    }
                }
                let mut st = self.definitions.status(ws, &a.id).await?;
                st.size = size;
                st.size_as_of = now;
                self.definitions.set_status(ws, &a.id, &st).await?;
            }
        }
        Ok(())
    }
}

/// The identifiers whose profiles an event may change: its primary, its
/// `userId` and `anonymousId`, an alias's `previousId`, and a control
/// record's identifiers.
fn touched_ids(ev: &Event) -> Vec<Identifier> {
    if let Some(c) = &ev.control {
        return c
            .identifiers
            .iter()
            .filter_map(|i| Identifier::parse(i))
            .collect();
    }
    let mut out = vec![ev.primary_identifier()];
    if let Some(u) = &ev.user_id {
        out.push(Identifier::new(IdKind::UserId, u.clone()));
    }
    if let Some(a) = &ev.anonymous_id {
        out.push(Identifier::new(IdKind::AnonymousId, a.clone()));
    }
    if let Some(p) = ev
        .previous_id
        .as_ref()
        .filter(|_| ev.kind == EventType::Alias)
    {
        out.push(Identifier::new(IdKind::UserId, p.clone()));
        out.push(Identifier::new(IdKind::AnonymousId, p.clone()));
    }
    out.sort();
    out.dedup();
    out
}

/// Compiles a workspace's definitions at the versions `pick` chooses.
fn running(
    audiences: &[DefinitionRecord],
    traits: &[DefinitionRecord],
    pick: impl Fn(&DefinitionRecord) -> Option<u32>,
) -> Running {
    let chosen = |rs: &[DefinitionRecord]| -> Vec<(DefinitionRecord, u32)> {
        rs.iter()
            .filter_map(|r| Some((r.clone(), pick(r)?)))
            .collect()
    };
    let a = chosen(audiences);
    let t = chosen(traits);
    let catalog = compile(&a, &t);
    let versions = catalog
        .audiences()
        .iter()
        .map(|d| (d.id.clone(), d.version))
        .chain(catalog.traits().iter().map(|d| (d.id.clone(), d.version)))
        .collect();
    Running {
        catalog: Arc::new(catalog),
        versions,
    }
}
