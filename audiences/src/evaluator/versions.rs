//! New definitions and versions: picking them up, backfilling new leaf
//! states until the backfill meets the live reader, evaluating every
//! profile under them (a pass), and counting audience sizes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use trailmark_domain::Identifier;
use trailmark_store::evaluator::{EvalCommit, EvalTable};
use uuid::Uuid;

use super::*;
use crate::Result;
use crate::rows::{self, Cause};

impl Evaluator {
    /// Re-reads definitions; starts a backfill for new leaf states, or a
    /// pass when new versions need no new state.
    pub(super) async fn refresh(&self, run: &mut Run) -> Result<()> {
        // Identity rules are settings, not records of the log: profiles
        // carried over under other rules are dropped.
        for ws in run.workspaces.keys() {
            let rules = self.directory.identity_rules(ws).await?;
            let text = serde_json::to_string(&rules).unwrap_or_default();
            run.caches.resolutions.rules_read(ws, text);
        }
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
        tracing::info!(
            workspaces = targets.len(),
            new_specs = new_specs.len(),
            "new definitions or versions"
        );
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
    pub(super) fn switch(&self, run: &mut Run, ws: String, target: Running) {
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
    pub(super) async fn backfill_slice(&self, run: &mut Run) -> Result<()> {
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
                // For a window, the live reader also asks what the
                // backfill saw (see `contributions`).
                let now = self.clock.now_micros();
                run.joined.retain(|j| j.until > now);
                run.joined.push(Joined {
                    consumer: bf.consumer.clone(),
                    until: now
                        .saturating_add(self.window())
                        .saturating_add(2 * rows::HOUR),
                });
                self.put_stats("joined", &run.joined).await?;
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
    pub(super) async fn backfill_step(&self, run: &mut Run, bf: &mut Backfill) -> Result<bool> {
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
                let events: Vec<&LoggedEvent> = events
                    .iter()
                    .filter(|le| {
                        bf.positions
                            .get(&le.partition)
                            .is_none_or(|next| le.position >= *next)
                    })
                    .collect();
                let (contributions, _) = self
                    .contributions(&bf.consumer, &events, &bf.catalogs, &[], &mut commit)
                    .await?;
                self.fold(contributions, &mut run.caches.leaves, &mut commit)
                    .await?;
                self.commit_run(run, commit).await?;
                for (p, next) in positions {
                    bf.positions.insert(p, next);
                }
            }
        }
        Ok(met(bf, run))
    }

    /// One slice of a pass: every profile of the workspace is evaluated
    /// once (through its holder); at the end its versions are live.
    pub(super) async fn pass_slice(&self, run: &mut Run) -> Result<()> {
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
    pub(super) async fn pass_step(&self, run: &mut Run, pass: &mut Pass) -> Result<bool> {
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
        let catalogs = run.catalogs();
        if let Some((last, _)) = found.last() {
            pass.after = Some(last.clone());
        }
        let mut touched = Vec::new();
        for (sort, _) in &found {
            if let Some(id) = std::str::from_utf8(sort).ok().and_then(Identifier::parse) {
                let version = pass.versions.values().copied().max().unwrap_or(0);
                touched.push(Touch::full(
                    pass.ws.clone(),
                    vec![id],
                    Cause::Definition { version },
                ));
            }
        }
        let mut commit = self.commit();
        self.evaluate_into(run, &catalogs, touched, now, &mut commit)
            .await?;
        self.commit_run(run, commit).await?;
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
    pub(super) async fn count_sizes(&self, run: &Run) -> Result<()> {
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

/// Compiles a workspace's definitions at the versions `pick` chooses.
pub(super) fn running(
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
