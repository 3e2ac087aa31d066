//! The ingest baseline of the distributed benchmark: a plain librdkafka
//! producer loop sending the same messages ingest would (Avro-encoded events
//! of the load generator's fixtures, keyed and partitioned as Trailmark does)
//! to the same Kafka, with the same producer settings (idempotent,
//! `acks=all`, lz4, `linger.ms=5`). No HTTP, no JSON, no validation: the rate
//! ingest is compared with in `benches/RESULTS.md`.
//!
//! Debian's `kcat` links librdkafka 2.0.2; this loop uses the librdkafka that
//! Trailmark itself builds, so both sides run the same client.
//!
//! `cargo run --release -p trailmark-benches --bin kafka_baseline -- --brokers 127.0.0.1:9092 --topic tm-bench-baseline --events 1000000`

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use trailmark_log::partition_for;
use trailmark_schemas::EventCodec;

#[derive(Debug, Parser)]
struct Args {
    /// Bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The topic to create (if missing) and fill.
    #[arg(long, default_value = "tm-bench-baseline")]
    topic: String,
    /// Partitions of a new topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Events to send.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Distinct people in the fixtures.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Encode up front: the loop measures producing, not encoding.
    let codec = EventCodec::new()?;
    let distinct = args.events.min(200_000);
    let messages: Vec<(Vec<u8>, Vec<u8>)> =
        trailmark_benches::event_stream(distinct, args.users, 7)
            .iter()
            .map(|ev| Ok((ev.partition_key(), codec.encode(ev)?)))
            .collect::<Result<_>>()?;
    let bytes: usize = messages.iter().map(|m| m.1.len()).sum();
    eprintln!(
        "{} distinct messages, {} bytes on average",
        messages.len(),
        bytes / messages.len()
    );

    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.brokers);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topic = NewTopic::new(
        &args.topic,
        args.partitions as i32,
        TopicReplication::Fixed(1),
    );
    for r in admin.create_topics([&topic], &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("creating {t}: {e}"),
        }
    }
    let mut producer_config = config.clone();
    for (k, v) in trailmark_log_kafka::PRODUCER_SETTINGS {
        producer_config.set(*k, *v);
    }
    let producer: FutureProducer = producer_config
        .set("message.timeout.ms", "30000")
        .create()
        .context("producer")?;

    let start = Instant::now();
    let mut pending = Vec::with_capacity(100_000);
    let mut acked = 0usize;
    for i in 0..args.events {
        let (key, payload) = &messages[i % messages.len()];
        let partition = partition_for(key, args.partitions) as i32;
        let mut record = FutureRecord::to(&args.topic)
            .key(key)
            .payload(payload)
            .partition(partition);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(std::time::Duration::from_millis(5));
                }
                Err((e, _)) => anyhow::bail!("enqueue: {e}"),
            }
        }
        // Await deliveries in large groups, never one at a time.
        if pending.len() == 100_000 {
            for d in futures_util::future::join_all(pending.drain(..)).await {
                d?.map_err(|(e, _)| e)?;
                acked += 1;
            }
        }
    }
    for d in futures_util::future::join_all(pending.drain(..)).await {
        d?.map_err(|(e, _)| e)?;
        acked += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = acked as f64 / secs;
    println!("kafka baseline: {acked} events acknowledged in {secs:.1} s: {rate:.0} events/s");
    println!(
        "{}",
        serde_json::json!({"mode": "kafka_baseline", "events": acked, "seconds": secs, "events_per_s": rate})
    );
    Ok(())
}
