//! The projector: consumes the log and folds it into the stores.
//!
//! **Delivery guarantee: every record in the log is reflected in the
//! projections exactly once**: the log delivers at least once, the position
//! after each batch lives in the store with (embedded: atomically) or after
//! (Cassandra/ScyllaDB: idempotently) the batch's writes, and a partition
//! resumes from the store's position whenever it is assigned (the log's own
//! consumer offsets are never trusted). A crash at any point makes the
//! projector read some events again, and applying them again changes nothing.
//!
//! Batches are applied one at a time, in log order; reading and decoding the
//! next batch overlaps applying the current one, and a batch is shared with
//! its retries, never copied.
//!
//! The projector knows only the [`EventLog`] and [`ProfileWriter`] traits.
//! Retryable store errors are retried with capped exponential backoff, so an
//! outage of the store delays projections but loses nothing. A record that
//! cannot be decoded, or an event the store refuses for good after a few
//! attempts, is set aside in the log's dead-letter queue (with where it came
//! from and why) and the projector moves on; `trailmark dead-letters replay`
//! appends them to the log again.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use trailmark_http::Metrics;
use trailmark_log::{DeadLetter, Delivery, EventLog, LogError, StartPositions};
use trailmark_schemas::EventCodec;
use trailmark_store::{ApplyBatch, LoggedEvent, ProfileWriter, StoreError};

/// Projector failures.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// The log failed permanently.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The store failed permanently.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The projector's result type.
pub type Result<T> = std::result::Result<T, ProjectorError>;

/// Tuning of the projector.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// The consumer group; checkpoints are kept under this name.
    pub group: String,
    /// The most records read and applied in one step.
    pub batch_size: usize,
    /// How long one poll waits for new records.
    pub poll_wait: Duration,
    /// The de-duplication window.
    pub dedup_window: Duration,
    /// The longest pause between retries of a failing store.
    pub max_backoff: Duration,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            group: "projector".into(),
            batch_size: 2_000,
            poll_wait: Duration::from_millis(250),
            dedup_window: Duration::from_secs(24 * 3_600),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// How often the projector mirrors its positions into the log.
const POSITION_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How often the projector measures its lag while busy (always when idle).
const LAG_REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// Reads start positions from the store's checkpoints when the log assigns a
/// partition, which may be long after start: with several projectors, a
/// partition comes back after another projector moved it on.
struct StoreCheckpoints {
    store: Arc<dyn ProfileWriter>,
    group: String,
    /// Where each assigned partition started, for the lag of partitions
    /// not yet applied to.
    started: std::sync::Mutex<BTreeMap<u32, u64>>,
}

#[async_trait]
impl StartPositions for StoreCheckpoints {
    async fn start_position(&self, partition: u32) -> trailmark_log::Result<Option<u64>> {
        let checkpoints = self
            .store
            .checkpoints(&self.group)
            .await
            .map_err(|e| LogError::Unavailable(format!("reading checkpoints: {e}")))?;
        let at = checkpoints.get(&partition).copied();
        self.started
            .lock()
            .expect("started lock")
            .insert(partition, at.unwrap_or(0));
        Ok(at)
    }
}

/// How often an event that fails to apply permanently is tried before it is
/// set aside as a dead letter.
const MAX_ATTEMPTS: usize = 3;

/// Folds the log into the store.
pub struct Projector {
    log: Arc<dyn EventLog>,
    store: Arc<dyn ProfileWriter>,
    codec: Arc<EventCodec>,
    metrics: Arc<Metrics>,
    config: ProjectorConfig,
}

impl Projector {
    /// A projector over `log` and `store`.
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn ProfileWriter>,
        codec: Arc<EventCodec>,
        metrics: Arc<Metrics>,
        config: ProjectorConfig,
    ) -> Self {
        Self {
            log,
            store,
            codec,
            metrics,
            config,
        }
    }

    /// Runs until `shutdown` resolves, then returns after finishing the batch
    /// in hand.
    ///
    /// Reading and decoding the next batch overlaps applying the current one
    /// (the store applies on a blocking thread), so on two cores the log and
    /// the codec cost no projector time. Batches are still applied one at a
    /// time, in log order, each with its positions.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let (mut sub, starts) = self.subscribe().await?;
        let mut positions = BTreeMap::new();
        let mut last_commit = Instant::now();
        let mut last_lag = Instant::now();
        let mut in_hand: Option<Decoded> = None;
        loop {
            if last_commit.elapsed() >= POSITION_COMMIT_INTERVAL {
                self.commit_positions(&positions).await;
                last_commit = Instant::now();
            }
            let current = in_hand.take();
            let idle = current.is_none();
            let apply = async {
                match current {
                    Some(decoded) => self.apply_decoded(decoded).await,
                    None => Ok(Vec::new()),
                }
            };
            let poll = async {
                tokio::select! {
                    _ = &mut shutdown => None,
                    polled = sub.poll(self.config.batch_size, self.config.poll_wait) => Some(polled),
                }
            };
            let (applied, polled) = tokio::join!(apply, poll);
            for (partition, next) in applied? {
                positions.insert(partition, next);
            }
            match polled {
                None => {
                    // Shut down: the batch in hand was applied above.
                    self.commit_positions(&positions).await;
                    return Ok(());
                }
                Some(Ok(deliveries)) => {
                    if !deliveries.is_empty() {
                        in_hand = Some(self.decode(deliveries));
                    }
                }
                Some(Err(e)) if e.is_retryable() => {
                    tracing::warn!(error = %e, "log poll failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The batch polled before was applied above; nothing is in
                // hand, so this error ends the run with nothing half done.
                Some(Err(e)) => return Err(e.into()),
            }
            // Partitions another projector took over are no longer ours to
            // report or commit.
            let assigned = sub.assigned();
            positions.retain(|p, _| assigned.contains(p));
            if (idle && in_hand.is_none()) || last_lag.elapsed() >= LAG_REPORT_INTERVAL {
                let started = starts.started.lock().expect("started lock").clone();
                let current: BTreeMap<u32, u64> = assigned
                    .iter()
                    .map(|p| {
                        let at = positions.get(p).or(started.get(p)).copied();
                        (*p, at.unwrap_or(0))
                    })
                    .collect();
                self.report_lag(&current).await;
                last_lag = Instant::now();
            }
        }
    }

    /// Applies everything in the log up to its end at the time of the call,
    /// then returns; used by `trailmark rebuild`. Reading the next batch
    /// overlaps applying the current one, as in [`Projector::run`].
    pub async fn catch_up(&self) -> Result<u64> {
        let ends = self.log.end_positions().await?;
        let (mut sub, _) = self.subscribe().await?;
        let mut positions = self.store.checkpoints(&self.config.group).await?;
        let mut applied = 0u64;
        let done = |positions: &BTreeMap<u32, u64>| {
            ends.iter().enumerate().all(|(p, end)| {
                *end == 0 || positions.get(&(p as u32)).copied().unwrap_or(0) >= *end
            })
        };
        let mut in_hand: Option<Decoded> = None;
        while in_hand.is_some() || !done(&positions) {
            let current = in_hand.take();
            // Polled only while the positions so far leave something to read.
            let more = !done(&positions);
            let apply = async {
                match current {
                    Some(decoded) => self.apply_decoded(decoded).await,
                    None => Ok(Vec::new()),
                }
            };
            let poll = async {
                if more {
                    Some(
                        sub.poll(self.config.batch_size, self.config.poll_wait)
                            .await,
                    )
                } else {
                    None
                }
            };
            let (done_batch, polled) = tokio::join!(apply, poll);
            for (partition, next) in done_batch? {
                positions.insert(partition, next);
            }
            if let Some(polled) = polled {
                let deliveries = polled?;
                applied += deliveries.len() as u64;
                if !deliveries.is_empty() {
                    in_hand = Some(self.decode(deliveries));
                }
            }
        }
        Ok(applied)
    }

    /// Joins the group, each partition starting at the store's checkpoint
    /// when it is assigned; returns the subscription and where each assigned
    /// partition started.
    async fn subscribe(
        &self,
    ) -> Result<(Box<dyn trailmark_log::Subscription>, Arc<StoreCheckpoints>)> {
        let starts = Arc::new(StoreCheckpoints {
            store: self.store.clone(),
            group: self.config.group.clone(),
            started: Default::default(),
        });
        let sub = self
            .log
            .subscribe(&self.config.group, starts.clone())
            .await?;
        Ok((sub, starts))
    }

    /// Mirrors the store's checkpoints into the log's consumer positions, for
    /// operators; best effort, since the store's copy is the one resumed from.
    async fn commit_positions(&self, positions: &BTreeMap<u32, u64>) {
        if positions.is_empty() {
            return;
        }
        let list: Vec<(u32, u64)> = positions.iter().map(|(p, o)| (*p, *o)).collect();
        if let Err(e) = self.log.commit_positions(&self.config.group, &list).await {
            tracing::warn!(error = %e, "committing consumer positions to the log failed");
        }
    }

    /// Records how far behind the log's end the given partitions are.
    async fn report_lag(&self, positions: &BTreeMap<u32, u64>) {
        if let Ok(ends) = self.log.end_positions().await {
            let lag: u64 = positions
                .iter()
                .map(|(p, at)| {
                    ends.get(*p as usize)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(*at)
                })
                .sum();
            self.metrics.projector_lag.set(lag as i64);
        }
    }

    /// Decodes deliveries into one batch with the new position of every
    /// partition they came from. Records that cannot be decoded become dead
    /// letters (sent when the batch is applied); the log keeps them too.
    fn decode(&self, deliveries: Vec<Delivery>) -> Decoded {
        let mut positions: BTreeMap<u32, u64> = BTreeMap::new();
        let mut events = Vec::with_capacity(deliveries.len());
        let mut payloads = Vec::with_capacity(deliveries.len());
        let mut letters = Vec::new();
        for d in deliveries {
            positions.insert(d.partition, d.next_position);
            match self.codec.decode(&d.payload) {
                Ok(event) => {
                    events.push(LoggedEvent {
                        partition: d.partition,
                        position: d.position,
                        event,
                    });
                    payloads.push(d.payload);
                }
                Err(e) => {
                    tracing::error!(
                        partition = d.partition,
                        position = d.position,
                        error = %e,
                        "a log record cannot be decoded; dead-lettering it"
                    );
                    self.metrics
                        .projector_events
                        .with_label_values(&["undecodable"])
                        .inc();
                    letters.push(dead_letter(&d, format!("cannot decode: {e}")));
                }
            }
        }
        let positions: Vec<(u32, u64)> = positions.into_iter().collect();
        Decoded {
            batch: Arc::new(ApplyBatch {
                consumer: self.config.group.clone(),
                positions,
                events,
                dedup_window_micros: self.config.dedup_window.as_micros() as i64,
            }),
            payloads,
            letters,
        }
    }

    /// Applies a decoded batch in one store write, dead letters first.
    /// Returns the positions it moved. Events the store refuses for good
    /// become dead letters.
    async fn apply_decoded(&self, decoded: Decoded) -> Result<Vec<(u32, u64)>> {
        let Decoded {
            batch,
            payloads,
            letters,
        } = decoded;
        self.send_dead_letters(letters).await?;
        let positions = batch.positions.clone();
        let outcome = match self.apply_with_retry(&batch).await {
            Ok(outcome) => outcome,
            Err(ProjectorError::Store(e)) => {
                tracing::warn!(error = %e, "the store refused a batch; applying its events one by one");
                self.apply_one_by_one(&batch, payloads).await?
            }
            Err(e) => return Err(e),
        };
        self.metrics
            .projector_events
            .with_label_values(&["applied"])
            .inc_by(outcome.applied as u64);
        self.metrics
            .projector_events
            .with_label_values(&["duplicate"])
            .inc_by(outcome.duplicates as u64);
        Ok(positions)
    }

    /// Applies a refused batch event by event: the ones the store still
    /// refuses after [`MAX_ATTEMPTS`] become dead letters, the rest apply,
    /// and then the checkpoints move past them all.
    async fn apply_one_by_one(
        &self,
        batch: &ApplyBatch,
        payloads: Vec<bytes::Bytes>,
    ) -> Result<trailmark_store::ApplyOutcome> {
        let mut total = trailmark_store::ApplyOutcome::default();
        let count = batch.events.len();
        let mut refused = Vec::new();
        for (event, payload) in batch.events.iter().zip(payloads) {
            let single = Arc::new(ApplyBatch {
                consumer: batch.consumer.clone(),
                positions: Vec::new(),
                events: vec![event.clone()],
                dedup_window_micros: batch.dedup_window_micros,
            });
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.apply_with_retry(&single).await {
                    Ok(o) => {
                        total.applied += o.applied;
                        total.duplicates += o.duplicates;
                        break;
                    }
                    Err(ProjectorError::Store(e)) if attempt >= MAX_ATTEMPTS => {
                        refused.push((event, payload, e));
                        break;
                    }
                    Err(ProjectorError::Store(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        // When every event of a batch is refused, the fault is the store's
        // (a dropped table, revoked rights), not the events': stop rather
        // than set the whole stream aside.
        if count > 1 && refused.len() == count {
            let (_, _, e) = refused.pop().expect("refused events");
            return Err(e.into());
        }
        for (event, payload, e) in refused {
            tracing::error!(
                partition = event.partition,
                position = event.position,
                error = %e,
                "the store refuses an event; dead-lettering it"
            );
            self.metrics
                .projector_events
                .with_label_values(&["dead_lettered"])
                .inc();
            let d = Delivery {
                partition: event.partition,
                position: event.position,
                next_position: event.position + 1,
                payload,
            };
            self.send_dead_letters(vec![dead_letter(&d, format!("cannot apply: {e}"))])
                .await?;
        }
        self.apply_with_retry(&Arc::new(ApplyBatch {
            consumer: batch.consumer.clone(),
            positions: batch.positions.clone(),
            events: Vec::new(),
            dedup_window_micros: batch.dedup_window_micros,
        }))
        .await?;
        Ok(total)
    }

    /// Sets records aside, retrying while the log is unavailable: a record
    /// must never be skipped without being kept.
    async fn send_dead_letters(&self, letters: Vec<DeadLetter>) -> Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.log.dead_letter(letters.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "cannot write dead letters; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn apply_with_retry(
        &self,
        batch: &Arc<ApplyBatch>,
    ) -> Result<trailmark_store::ApplyOutcome> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let start = Instant::now();
            match self.store.apply(batch.clone()).await {
                Ok(outcome) => {
                    self.metrics
                        .projector_batch_duration
                        .observe(start.elapsed().as_secs_f64());
                    return Ok(outcome);
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, ?backoff, "store write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A polled batch, decoded and ready to apply.
struct Decoded {
    batch: Arc<ApplyBatch>,
    /// The records of `batch.events`, in order, for dead letters.
    payloads: Vec<bytes::Bytes>,
    /// Records that could not be decoded.
    letters: Vec<DeadLetter>,
}

/// A dead letter for a delivery; the log names its source.
fn dead_letter(d: &Delivery, error: String) -> DeadLetter {
    DeadLetter {
        source: String::new(),
        partition: d.partition,
        position: d.position,
        error,
        payload: d.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use trailmark_domain::{IdKind, Identifier};
    use trailmark_log::Record;
    use trailmark_log::file::{FileLog, FileLogOptions};
    use trailmark_store::ProfileReader;
    use trailmark_store::embedded::EmbeddedStore;
    use trailmark_testkit::{EventBuilder, WORKSPACE};

    async fn setup(dir: &std::path::Path) -> (Arc<FileLog>, Arc<EmbeddedStore>, Arc<EventCodec>) {
        let log = Arc::new(FileLog::open(dir.join("log"), FileLogOptions::default()).unwrap());
        let store = Arc::new(EmbeddedStore::open(dir.join("store")).unwrap());
        (log, store, Arc::new(EventCodec::new().unwrap()))
    }

    fn projector(
        log: &Arc<FileLog>,
        store: &Arc<EmbeddedStore>,
        codec: &Arc<EventCodec>,
    ) -> Projector {
        Projector::new(
            log.clone(),
            store.clone(),
            codec.clone(),
            Arc::new(Metrics::new()),
            ProjectorConfig::default(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn catches_up_and_resumes_without_double_counting() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store, codec) = setup(dir.path()).await;
        let append = |n: usize| {
            let log = log.clone();
            let codec = codec.clone();
            async move {
                let records = (0..n)
                    .map(|_| {
                        let ev = EventBuilder::track("Ping").user("p1").build();
                        Record {
                            key: ev.partition_key(),
                            payload: codec.encode(&ev).unwrap(),
                        }
                    })
                    .collect();
                log.append(records).await.unwrap();
            }
        };
        append(30).await;
        assert_eq!(
            projector(&log, &store, &codec).catch_up().await.unwrap(),
            30
        );
        append(12).await;
        // A new projector resumes from the stored checkpoint: only the 12 new.
        assert_eq!(
            projector(&log, &store, &codec).catch_up().await.unwrap(),
            12
        );
        let p = store
            .resolve(WORKSPACE, &Identifier::new(IdKind::UserId, "p1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.metadata(WORKSPACE, &p).await.unwrap().counts["Ping"],
            42
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_applies_live_events_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store, codec) = setup(dir.path()).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let proj = projector(&log, &store, &codec);
        let task = tokio::spawn(async move {
            proj.run(async {
                let _ = stopped.await;
            })
            .await
        });
        let ev = EventBuilder::identify(json!({"plan": "pro"}))
            .user("live")
            .build();
        log.append(vec![Record {
            key: ev.partition_key(),
            payload: codec.encode(&ev).unwrap(),
        }])
        .await
        .unwrap();
        let id = Identifier::new(IdKind::UserId, "live");
        let mut found = false;
        for _ in 0..100 {
            if store.resolve(WORKSPACE, &id).await.unwrap().is_some() {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(found, "the live event was projected");
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecodable_records_become_dead_letters_and_the_rest_applies() {
        let dir = tempfile::tempdir().unwrap();
        let (log, store, codec) = setup(dir.path()).await;
        let good = EventBuilder::track("Ping").user("dl").build();
        let appended = log
            .append(vec![
                Record {
                    key: b"x".to_vec(),
                    payload: b"not avro at all".to_vec(),
                },
                Record {
                    key: good.partition_key(),
                    payload: codec.encode(&good).unwrap(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(projector(&log, &store, &codec).catch_up().await.unwrap(), 2);
        let letters = log.dead_letters(0, 10).await.unwrap();
        assert_eq!(letters.len(), 1);
        let (_, letter) = &letters[0];
        assert_eq!(letter.payload.as_ref(), b"not avro at all");
        assert_eq!(
            (letter.partition, letter.position),
            (appended[0].partition, appended[0].position)
        );
        assert!(letter.error.contains("cannot decode"), "{}", letter.error);
        let id = Identifier::new(IdKind::UserId, "dl");
        assert!(store.resolve(WORKSPACE, &id).await.unwrap().is_some());
        // The checkpoint moved past the dead letter: a restart reads nothing.
        assert_eq!(projector(&log, &store, &codec).catch_up().await.unwrap(), 0);
    }
}
