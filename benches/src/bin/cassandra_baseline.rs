//! The projector baseline of the distributed benchmark: a plain write loop of
//! the rows the Cassandra/ScyllaDB store writes for each batch of events
//! (timeline rows and buckets, identifier links and first-seen cells,
//! traits, stats rows, de-duplication rows), through the same prepared
//! statements with the same number in flight, in batches of the projector's
//! size, into the same schema on the same Cassandra. No log, no decoding, no
//! reads, no de-duplication or replay decisions, no checkpoints: the rate
//! the projector is compared with in `benches/RESULTS.md`.
//!
//! `cargo run --release -p trailmark-benches --bin cassandra_baseline -- --host 127.0.0.1:9042 --keyspace tm_bench_baseline --events 200000`

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use trailmark_store::LoggedEvent;
use trailmark_store_scylla::{ScyllaConfig, ScyllaStore};

#[derive(Debug, Parser)]
struct Args {
    /// A contact point.
    #[arg(long, default_value = "127.0.0.1:9042")]
    host: String,
    /// The keyspace to create (if missing) and fill.
    #[arg(long, default_value = "tm_bench_baseline")]
    keyspace: String,
    /// Events to write.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Distinct people in the fixtures.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Events per batch (the projector's default).
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let config = ScyllaConfig::from_uri(&format!("scylla://{}/{}", args.host, args.keyspace))?;
    ScyllaStore::migrate(&config).await?;
    let store = ScyllaStore::connect(&config).await?;
    let events: Vec<LoggedEvent> = trailmark_benches::event_stream(args.events, args.users, 7)
        .into_iter()
        .enumerate()
        .map(|(i, event)| LoggedEvent {
            partition: 0,
            position: i as u64,
            event,
        })
        .collect();
    let start = Instant::now();
    for chunk in events.chunks(args.batch.max(1)) {
        store.write_rows_blind_for_baseline(chunk).await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = args.events as f64 / secs;
    println!(
        "cassandra baseline: the rows of {} events written in {secs:.1} s: {rate:.0} events/s",
        args.events
    );
    println!(
        "{}",
        serde_json::json!({"mode": "cassandra_baseline", "events": args.events, "seconds": secs, "events_per_s": rate})
    );
    Ok(())
}
