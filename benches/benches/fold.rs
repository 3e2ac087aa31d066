//! Measures the profile fold: [`profile::project`] of one event (the facts an
//! event contributes: identifiers, traits, counter, timeline entry) for a
//! `track` and an `identify`, and [`ProfileModel::apply`] over a 10,000-event
//! stream of 1,000 people with identity merges (identify and alias calls).
//! `ProfileModel` is the in-memory executable specification the stores are
//! checked against, not the production store, so its number is the cost of
//! the rules, not of persistence.
//!
//! Run: `cargo bench -p trailmark-benches --bench fold`
//! (add `-- --quick` for a fast, rougher run). Results: `benches/RESULTS.md`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use trailmark_benches::{event_stream, sample_track_event};
use trailmark_domain::EventType;
use trailmark_domain::profile::{self, ProfileModel};

/// The de-duplication window: 24 hours, in microseconds.
const WINDOW: i64 = 24 * 3_600 * 1_000_000;

fn project(c: &mut Criterion) {
    let track = sample_track_event();
    let identify = event_stream(200, 50, 1)
        .into_iter()
        .find(|e| e.kind == EventType::Identify)
        .expect("the stream holds an identify");
    let mut g = c.benchmark_group("fold/project");
    g.throughput(Throughput::Elements(1));
    g.bench_function("track", |b| {
        b.iter(|| black_box(profile::project(black_box(&track)).unwrap()))
    });
    g.bench_function("identify", |b| {
        b.iter(|| black_box(profile::project(black_box(&identify)).unwrap()))
    });
    g.finish();
}

fn apply(c: &mut Criterion) {
    let stream = event_stream(10_000, 1_000, 7);
    let mut g = c.benchmark_group("fold/apply");
    g.throughput(Throughput::Elements(stream.len() as u64));
    g.sample_size(10);
    g.bench_function("profile_model_10k_events_1k_people", |b| {
        b.iter_batched(
            || ProfileModel::new(WINDOW),
            |mut model| {
                for ev in &stream {
                    model.apply(black_box(ev)).unwrap();
                }
                model
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

// In a private module, so the `pub fn` that `criterion_group!` generates is
// not public API (which `missing_docs` would ask to document).
mod group {
    use super::*;
    criterion_group!(benches, project, apply);
}
criterion_main!(group::benches);
