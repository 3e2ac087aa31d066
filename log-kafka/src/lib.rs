//! The distributed event log on Apache Kafka, through `rdkafka`
//! (`kafka://` URIs). The binary wires it in; the services only see the
//! [`EventLog`] trait. Tests run it against a real Kafka 4 (KRaft) with the
//! same conformance suite as the file log.
//!
//! # Producing
//! One idempotent producer (`enable.idempotence`, `acks=all`) batches records
//! for all callers (`linger.ms`, lz4). [`EventLog::append`] enqueues every
//! record of a request at once and then awaits all their delivery reports
//! together, never one delivery at a time; it returns once Kafka has written
//! every record to all in-sync replicas. When Kafka is unreachable, deliveries
//! fail after `message.timeout.ms` (5 s by default) and `append` returns a
//! retryable error, which ingest answers with 503.
//!
//! # Partitioning
//! A record's partition is [`partition_for`]: CRC-32 of its key modulo the
//! topic's partition count, the same rule as the file log. Trailmark's key is
//! `workspace NUL (userId or anonymousId)`, so one person's events keep their
//! order. The partition count is fixed when `trailmark migrate` creates the
//! topic; adding partitions later moves keys.
//!
//! # Consuming
//! All projectors join one consumer group and Kafka splits the partitions
//! between them. When partitions are assigned, each one starts at the position
//! the projector's [`StartPositions`] gives, which come from the store's
//! checkpoints; a partition with no checkpoint starts at the earliest offset.
//! Kafka's committed offsets only mirror progress for operators (lag tools).
//!
//! # Dead letters
//! Records the projector cannot decode or apply go to `<topic>.dead-letters`
//! (one partition), with the original topic, partition, offset and error as
//! headers, and the record unchanged as the value.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use trailmark_log::{
    Appended, DeadLetter, Delivery, EventLog, LogError, Record, Result, StartPositions,
    Subscription, partition_for,
};

/// How the log reaches Kafka, from a `kafka://` URI:
/// `kafka://host:9092[,host:9092...][/topic][?partitions=N&replication=R&<librdkafka option>=V...]`.
/// Options with a dot (such as `security.protocol=SASL_SSL`) go to librdkafka
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// The events topic (default `trailmark.events`).
    pub topic: String,
    /// Partitions of a topic `migrate` creates.
    pub partitions: u32,
    /// Replicas of a topic `migrate` creates.
    pub replication: i32,
    /// Extra librdkafka settings for every client.
    pub client: Vec<(String, String)>,
}

fn invalid(e: impl std::fmt::Display) -> LogError {
    LogError::Invalid(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

impl KafkaConfig {
    /// Parses a `kafka://` URI; `partitions` is the default partition count.
    pub fn from_uri(uri: &str, partitions: u32) -> Result<Self> {
        let bad = |why: &str| invalid(format!("bad log uri {uri:?}: {why}"));
        let rest = uri
            .strip_prefix("kafka://")
            .ok_or_else(|| bad("expected kafka://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (brokers, topic) = rest.split_once('/').unwrap_or((rest, ""));
        if brokers.is_empty() {
            return Err(bad("no broker"));
        }
        let topic = if topic.is_empty() {
            "trailmark.events"
        } else {
            topic
        };
        if !topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            || topic.len() > 200
        {
            return Err(bad("topic names are letters, digits, '.', '_' and '-'"));
        }
        let mut config = KafkaConfig {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            partitions: partitions.max(1),
            replication: 1,
            client: Vec::new(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| bad("query is k=v"))?;
            match k {
                "partitions" => {
                    config.partitions = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("partitions is a positive number"))?
                }
                "replication" => {
                    config.replication = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("replication is a positive number"))?
                }
                k if k.contains('.') => config.client.push((k.to_owned(), v.to_owned())),
                _ => return Err(bad(&format!("unknown option {k}"))),
            }
        }
        Ok(config)
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dead-letters", self.topic)
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("socket.timeout.ms", "10000")
            .set("log_level", "3");
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// Logs librdkafka's own errors through `tracing`, without repeating them.
#[derive(Clone, Default)]
struct Context;

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client");
    }
}

impl ConsumerContext for Context {}

/// The Kafka [`EventLog`].
pub struct KafkaLog {
    config: KafkaConfig,
    partitions: u32,
    producer: FutureProducer<Context>,
    /// For metadata, watermarks and committed offsets (no group).
    meta: Arc<BaseConsumer<Context>>,
    /// The live consumer of each group this process subscribed: offsets of an
    /// active group must be committed by one of its members.
    members: Mutex<BTreeMap<String, std::sync::Weak<BaseConsumer<Rebalancer>>>>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// The producer's settings: idempotent, every in-sync replica acknowledges,
/// batched and compressed. (The benchmark's baseline producer uses them too.)
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "5"),
    ("batch.num.messages", "10000"),
    ("compression.type", "lz4"),
    ("queue.buffering.max.messages", "1000000"),
];

/// The `min.insync.replicas` of a topic with `replication` copies: a
/// majority, so an acknowledged record (`acks=all`) is on more than half of
/// them and survives the loss of any minority. None for one copy, where the
/// broker's default of 1 is the only choice.
pub fn min_insync_replicas(replication: i32) -> Option<i32> {
    (replication > 1).then_some(replication / 2 + 1)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| unavailable(format!("kafka task failed: {e}")))?
}

impl KafkaLog {
    /// Creates the events topic and its dead-letter topic if they do not
    /// exist, with infinite retention: the log is the source of truth.
    pub async fn create_topics(config: &KafkaConfig) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(invalid)?;
        let dead = config.dead_letter_topic();
        let min_insync = min_insync_replicas(config.replication).map(|n| n.to_string());
        let topics = [
            NewTopic::new(
                &config.topic,
                config.partitions as i32,
                TopicReplication::Fixed(config.replication),
            ),
            NewTopic::new(&dead, 1, TopicReplication::Fixed(config.replication)),
        ]
        .map(|t| {
            let t = t
                .set("retention.ms", "-1")
                .set("retention.bytes", "-1")
                .set("cleanup.policy", "delete");
            match &min_insync {
                Some(n) => t.set("min.insync.replicas", n),
                None => t,
            }
        });
        let results = admin
            .create_topics(
                &topics,
                &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
            )
            .await
            .map_err(unavailable)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(unavailable(format!("cannot create topic {topic}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// Connects to the topic, which must exist (`trailmark migrate`).
    pub async fn open(config: KafkaConfig) -> Result<Self> {
        let mut client = config.client();
        for (k, v) in PRODUCER_SETTINGS {
            client.set(*k, *v);
        }
        let producer: FutureProducer<Context> = client
            .set("message.timeout.ms", "5000")
            .create_with_context(Context)
            .map_err(invalid)?;
        let meta: BaseConsumer<Context> = config
            .client()
            .set("group.id", "trailmark-metadata")
            .set("enable.auto.commit", "false")
            .create_with_context(Context)
            .map_err(invalid)?;
        let meta = Arc::new(meta);
        let partitions = {
            let meta = meta.clone();
            let topic = config.topic.clone();
            blocking(move || topic_partitions(&meta, &topic)).await?
        };
        Ok(Self {
            config,
            partitions,
            producer,
            meta,
            members: Mutex::new(BTreeMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Waits until queued records are delivered, up to `timeout`.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }

    fn group_client(&self, group: &str) -> Result<BaseConsumer<Context>> {
        self.config
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create_with_context(Context)
            .map_err(invalid)
    }
}

fn topic_partitions<C: ConsumerContext>(meta: &BaseConsumer<C>, topic: &str) -> Result<u32> {
    let md = meta
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(unavailable)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| invalid(format!("topic {topic} is missing")))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(invalid(format!(
            "topic {topic} does not exist: run `trailmark migrate` first"
        )));
    }
    Ok(t.partitions().len() as u32)
}

/// How often a partition's start position is asked for (0.5 s apart) before
/// falling back to the group's committed offset.
const START_POSITION_ATTEMPTS: usize = 10;

/// Starts assigned partitions at the positions the projector asks for.
struct Rebalancer {
    topic: String,
    start: Arc<dyn StartPositions>,
    runtime: tokio::runtime::Handle,
}

impl ClientContext for Rebalancer {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka consumer");
    }
}

impl Rebalancer {
    /// Asks where a partition starts, waiting for the answer. The callback
    /// usually runs on the blocking thread that polls, where waiting is
    /// fine; but librdkafka also serves it when a consumer is dropped, which
    /// may be on a runtime thread, where blocking on the runtime would panic:
    /// there it waits on a thread of its own.
    fn start_position(&self, p: u32) -> trailmark_log::Result<Option<u64>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.runtime.block_on(self.start.start_position(p));
        }
        std::thread::scope(|s| {
            s.spawn(|| self.runtime.block_on(self.start.start_position(p)))
                .join()
                .unwrap_or_else(|_| {
                    Err(trailmark_log::LogError::Unavailable(
                        "reading a start position panicked".into(),
                    ))
                })
        })
    }
}

impl ConsumerContext for Rebalancer {
    // Runs on the thread that polls the consumer (a blocking task), so it may
    // wait for the store's answer.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = TopicPartitionList::new();
                for e in tpl.elements_for_topic(&self.topic) {
                    let p = e.partition() as u32;
                    let mut attempts = 0;
                    let offset = loop {
                        attempts += 1;
                        match self.start_position(p) {
                            Ok(Some(pos)) => break Offset::Offset(pos as i64),
                            Ok(None) => break Offset::Beginning,
                            // The group's committed offset mirrors a position
                            // the store held, so it is never ahead of it: a
                            // safe place to start (a replay is harmless), and
                            // the callback must not block the consumer long.
                            Err(error) if attempts >= START_POSITION_ATTEMPTS => {
                                tracing::warn!(partition = p, %error, "cannot read start position; starting at the group's committed offset");
                                break Offset::Stored;
                            }
                            Err(error) => {
                                tracing::warn!(partition = p, %error, "cannot read start position; retrying");
                                std::thread::sleep(Duration::from_millis(500));
                            }
                        }
                    };
                    let _ = assigned.add_partition_offset(&self.topic, e.partition(), offset);
                }
                tracing::info!(partitions = ?assigned.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions assigned");
                if let Err(error) = consumer.assign(&assigned) {
                    tracing::error!(%error, "cannot take the assigned partitions");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!("partitions revoked");
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, "cannot release partitions");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
            }
        }
    }
}

/// A member of a consumer group.
struct KafkaSubscription {
    consumer: Arc<BaseConsumer<Rebalancer>>,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let consumer = self.consumer.clone();
        blocking(move || {
            let mut out = Vec::new();
            let deadline = std::time::Instant::now() + wait;
            while out.len() < max {
                // Wait only for the first record; then take what is ready.
                let timeout = if out.is_empty() {
                    deadline.saturating_duration_since(std::time::Instant::now())
                } else {
                    Duration::ZERO
                };
                match consumer.poll(timeout) {
                    None => break,
                    Some(Ok(m)) => out.push(Delivery {
                        partition: m.partition() as u32,
                        position: m.offset() as u64,
                        next_position: m.offset() as u64 + 1,
                        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                    }),
                    Some(Err(KafkaError::PartitionEOF(_))) => {}
                    Some(Err(e)) => {
                        if out.is_empty() {
                            return Err(unavailable(e));
                        }
                        break;
                    }
                }
                if out.is_empty() && std::time::Instant::now() >= deadline {
                    break;
                }
            }
            // A rebalance during the poll may have taken partitions away: their
            // records are now another projector's to apply.
            if let Ok(now) = consumer.assignment() {
                let mine: Vec<i32> = now.elements().iter().map(|e| e.partition()).collect();
                out.retain(|d| mine.contains(&(d.partition as i32)));
            }
            Ok(out)
        })
        .await
    }

    fn assigned(&self) -> Vec<u32> {
        self.consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| e.partition() as u32)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>> {
        // Enqueue all, then await all: the producer batches them together.
        let mut pending = Vec::with_capacity(records.len());
        for r in &records {
            let partition = partition_for(&r.key, self.partitions) as i32;
            let record = FutureRecord::to(&self.config.topic)
                .key(&r.key)
                .payload(&r.payload)
                .partition(partition);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => return Err(unavailable(format!("cannot enqueue: {e}"))),
            }
        }
        let reports = futures_util::future::join_all(pending).await;
        let mut out = Vec::with_capacity(reports.len());
        for report in reports {
            match report {
                Ok(Ok(d)) => out.push(Appended {
                    partition: d.partition as u32,
                    position: d.offset as u64,
                }),
                Ok(Err((e, _))) => return Err(unavailable(format!("delivery failed: {e}"))),
                Err(_) => return Err(LogError::Closed),
            }
        }
        Ok(out)
    }

    async fn subscribe(
        &self,
        group: &str,
        start: Arc<dyn StartPositions>,
    ) -> Result<Box<dyn Subscription>> {
        let context = Rebalancer {
            topic: self.config.topic.clone(),
            start,
            runtime: tokio::runtime::Handle::current(),
        };
        let consumer: BaseConsumer<Rebalancer> = self
            .config
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(context)
            .map_err(invalid)?;
        consumer
            .subscribe(&[&self.config.topic])
            .map_err(unavailable)?;
        let consumer = Arc::new(consumer);
        self.members
            .lock()
            .expect("members lock")
            .insert(group.to_owned(), Arc::downgrade(&consumer));
        Ok(Box::new(KafkaSubscription { consumer }))
    }

    async fn end_positions(&self) -> Result<Vec<u64>> {
        let meta = self.meta.clone();
        let topic = self.config.topic.clone();
        let n = self.partitions;
        blocking(move || {
            (0..n as i32)
                .map(|p| {
                    meta.fetch_watermarks(&topic, p, TIMEOUT)
                        .map(|(_, high)| high.max(0) as u64)
                        .map_err(unavailable)
                })
                .collect()
        })
        .await
    }

    async fn commit_positions(&self, group: &str, positions: &[(u32, u64)]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (p, pos) in positions {
            tpl.add_partition_offset(&self.config.topic, *p as i32, Offset::Offset(*pos as i64))
                .map_err(invalid)?;
        }
        let member = self
            .members
            .lock()
            .expect("members lock")
            .get(group)
            .and_then(|w| w.upgrade());
        match member {
            Some(consumer) => {
                blocking(move || consumer.commit(&tpl, CommitMode::Sync).map_err(unavailable)).await
            }
            None => {
                let client = self.group_client(group)?;
                blocking(move || client.commit(&tpl, CommitMode::Sync).map_err(unavailable)).await
            }
        }
    }

    async fn committed_positions(&self, group: &str) -> Result<BTreeMap<u32, u64>> {
        let client = self.group_client(group)?;
        let topic = self.config.topic.clone();
        let n = self.partitions;
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..n as i32 {
                tpl.add_partition(&topic, p);
            }
            let got = client
                .committed_offsets(tpl, TIMEOUT)
                .map_err(unavailable)?;
            Ok(got
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some((e.partition() as u32, o as u64)),
                    _ => None,
                })
                .collect())
        })
        .await
    }

    async fn check_ready(&self) -> Result<()> {
        let meta = self.meta.clone();
        let topic = self.config.topic.clone();
        blocking(move || {
            let md = meta
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map_err(unavailable)?;
            if md.brokers().is_empty() {
                return Err(unavailable("no kafka broker is reachable"));
            }
            Ok(())
        })
        .await
    }

    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> Result<()> {
        let topic = self.config.dead_letter_topic();
        let mut pending = Vec::with_capacity(letters.len());
        for l in &letters {
            let (partition, position) = (l.partition.to_string(), l.position.to_string());
            // Letters from the projector name no source: it is this topic.
            let source = if l.source.is_empty() {
                self.config.topic.as_str()
            } else {
                l.source.as_str()
            };
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "trailmark.source.topic",
                    value: Some(source),
                })
                .insert(Header {
                    key: "trailmark.source.partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "trailmark.source.offset",
                    value: Some(position.as_str()),
                })
                .insert(Header {
                    key: "trailmark.error",
                    value: Some(l.error.as_str()),
                });
            let key = format!("{source}/{}/{}", l.partition, l.position);
            let record = FutureRecord::to(&topic)
                .key(&key)
                .payload(l.payload.as_ref())
                .partition(0)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(d) => pending.push(d),
                Err((e, _)) => return Err(unavailable(format!("cannot enqueue: {e}"))),
            }
        }
        for report in futures_util::future::join_all(pending).await {
            match report {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(unavailable(format!("delivery failed: {e}"))),
                Err(_) => return Err(LogError::Closed),
            }
        }
        Ok(())
    }

    async fn dead_letters(&self, from: u64, max: usize) -> Result<Vec<(u64, DeadLetter)>> {
        let topic = self.config.dead_letter_topic();
        let reader: BaseConsumer<Context> = self
            .config
            .client()
            .set("group.id", "trailmark-dead-letter-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create_with_context(Context)
            .map_err(invalid)?;
        blocking(move || {
            let (_, high) = reader
                .fetch_watermarks(&topic, 0, TIMEOUT)
                .map_err(unavailable)?;
            if from as i64 >= high {
                return Ok(Vec::new());
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(from as i64))
                .map_err(invalid)?;
            reader.assign(&tpl).map_err(unavailable)?;
            let mut out = Vec::new();
            let deadline = std::time::Instant::now() + TIMEOUT;
            while out.len() < max && std::time::Instant::now() < deadline {
                match reader.poll(Duration::from_millis(200)) {
                    None => continue,
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(unavailable(e)),
                    Some(Ok(m)) => {
                        let header = |name: &str| {
                            m.headers()
                                .and_then(|h| h.iter().find(|x| x.key == name))
                                .and_then(|x| x.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default()
                        };
                        out.push((
                            m.offset() as u64,
                            DeadLetter {
                                source: header("trailmark.source.topic"),
                                partition: header("trailmark.source.partition")
                                    .parse()
                                    .unwrap_or(0),
                                position: header("trailmark.source.offset").parse().unwrap_or(0),
                                error: header("trailmark.error"),
                                payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                            },
                        ));
                        if m.offset() + 1 >= high {
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_topics_need_a_majority_in_sync() {
        let got: Vec<_> = (1..=5).map(min_insync_replicas).collect();
        assert_eq!(got, [None, Some(2), Some(2), Some(3), Some(3)]);
    }

    #[test]
    fn uris_parse() {
        let c = KafkaConfig::from_uri("kafka://127.0.0.1:9092", 4).unwrap();
        assert_eq!(c.brokers, "127.0.0.1:9092");
        assert_eq!(c.topic, "trailmark.events");
        assert_eq!(c.partitions, 4);
        assert_eq!(c.dead_letter_topic(), "trailmark.events.dead-letters");
        let c = KafkaConfig::from_uri(
            "kafka://a:9092,b:9092/prod.events?partitions=24&replication=3&security.protocol=SASL_SSL",
            4,
        )
        .unwrap();
        assert_eq!(c.brokers, "a:9092,b:9092");
        assert_eq!(c.topic, "prod.events");
        assert_eq!((c.partitions, c.replication), (24, 3));
        assert_eq!(
            c.client,
            vec![("security.protocol".into(), "SASL_SSL".into())]
        );
        for bad in [
            "file://x",
            "kafka://",
            "kafka://h/bad topic",
            "kafka://h?partitions=0",
            "kafka://h?what=1",
        ] {
            assert!(KafkaConfig::from_uri(bad, 4).is_err(), "{bad}");
        }
    }
}
