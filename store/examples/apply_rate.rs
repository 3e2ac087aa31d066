//! Measures how fast the embedded store applies projector batches: 200,000
//! track events over 10,000 people in batches of 2,000, as the projector
//! sends them. Run: `cargo run --release -p trailmark-store --example apply_rate`.

use std::time::Instant;

use serde_json::json;
use trailmark_store::embedded::EmbeddedStore;
use trailmark_store::{ApplyBatch, LoggedEvent, ProfileWriter};
use trailmark_testkit::EventBuilder;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let total = 200_000;
    let batch = 2_000;
    let start = Instant::now();
    let mut n = 0;
    while n < total {
        let events = (n..n + batch)
            .map(|i| {
                EventBuilder::track("Product Viewed")
                    .user(&format!("user-{:05}", i % 10_000))
                    .anon(&format!("anon-{:05}", i % 10_000))
                    .properties(json!({"sku": "abc-123", "price": 12.5, "currency": "EUR"}))
                    .context(json!({"library": {"name": "analytics.js"}, "page": {"url": "https://shop.example/p/1"}}))
                    .at(i as i64)
                    // Received as a live stream would be: within the window.
                    .received(i as i64 / 1_000)
                    .build()
            })
            .enumerate()
            .map(|(j, event)| LoggedEvent {
                partition: 0,
                position: (n + j) as u64,
                event,
            })
            .collect();
        store
            .apply(std::sync::Arc::new(ApplyBatch {
                consumer: "bench".into(),
                positions: vec![(0, (n + batch) as u64)],
                events,
                dedup_window_micros: 86_400_000_000,
            }))
            .await
            .expect("apply");
        n += batch;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{total} events in {secs:.2} s: {:.0} events/s, {:.1} µs/event",
        total as f64 / secs,
        secs * 1e6 / total as f64
    );
}
