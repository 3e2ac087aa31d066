//! Measures ingest's CPU cost per request body: parsing, validating and
//! normalising a realistic ~600-byte Segment `track` call (`/v1/track`) and a
//! 100-event `/v1/batch` body into [`trailmark_domain::Event`]s, next to a
//! baseline of `serde_json::from_slice::<serde_json::Value>` on the same bytes
//! (the cost of merely reading the JSON into a generic tree). A third case
//! adds `context.externalIds`, whose identifiers ingest validates.
//!
//! Run: `cargo bench -p trailmark-benches --bench ingest_parse`
//! (add `-- --quick` for a fast, rougher run). Results: `benches/RESULTS.md`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trailmark_benches::{bench_meta, sample_batch_body, sample_track_body};
use trailmark_domain::parse::{parse_batch, parse_single};
use trailmark_domain::{EventType, Limits};

fn new_message_id() -> String {
    // Every fixture carries a messageId; this is never called.
    String::from("generated")
}

fn single(c: &mut Criterion) {
    let body = sample_track_body();
    let limits = Limits::default();
    let meta = bench_meta();
    let mut g = c.benchmark_group("ingest_parse/single_track");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("trailmark_parse_normalise", |b| {
        b.iter(|| {
            let raw = parse_single(black_box(&body), &limits).unwrap();
            let key = raw.write_key().unwrap().is_some();
            let ev = raw
                .normalise(EventType::Track, &meta, &mut new_message_id)
                .unwrap();
            black_box((key, ev))
        })
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    g.finish();
}

/// The sample `track` call with three `context.externalIds`, as a CRM-synced
/// source sends them: the one shape whose context ingest decodes to check the
/// identifiers it carries.
fn single_external_ids(c: &mut Criterion) {
    let body = String::from_utf8(sample_track_body())
        .unwrap()
        .replacen(
            r#""context":{"#,
            r#""context":{"externalIds":[{"id":"0031N00001abcdEQAQ","type":"salesforce_id","collection":"users","encoding":"none"},{"id":"51","type":"hubspot_id","collection":"users","encoding":"none"},{"id":"cus_Q1w2e3r4t5","type":"stripe_customer_id","collection":"users","encoding":"none"}],"#,
            1,
        )
        .into_bytes();
    let limits = Limits::default();
    let meta = bench_meta();
    let mut g = c.benchmark_group("ingest_parse/single_track_external_ids");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("trailmark_parse_normalise", |b| {
        b.iter(|| {
            let raw = parse_single(black_box(&body), &limits).unwrap();
            let ev = raw
                .normalise(EventType::Track, &meta, &mut new_message_id)
                .unwrap();
            black_box(ev)
        })
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    g.finish();
}

fn batch(c: &mut Criterion) {
    let body = sample_batch_body(100, 1_000, 42);
    let limits = Limits::default();
    let meta = bench_meta();
    let mut g = c.benchmark_group("ingest_parse/batch_100");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("trailmark_parse_normalise", |b| {
        b.iter(|| {
            let raw = parse_batch(black_box(&body), &limits).unwrap();
            let parsed = raw.normalise(&meta, &limits, &mut new_message_id);
            assert_eq!(parsed.events.len(), 100);
            black_box(parsed)
        })
    });
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    g.finish();
}

// In a private module, so the `pub fn` that `criterion_group!` generates is
// not public API (which `missing_docs` would ask to document).
mod group {
    use super::*;
    criterion_group!(benches, single, single_external_ids, batch);
}
criterion_main!(group::benches);
