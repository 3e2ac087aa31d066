//! Measures the audience evaluator's pure hot path, with the 100 audiences
//! `benches/run-audiences` defines (trait conditions and windowed event
//! conditions, some with property filters) and 5 computed traits:
//!
//! - `audiences/contributions`: what one `track` contributes to the leaf
//!   states (the spec index by event name, then property filters);
//! - `audiences/fold`: folding one contribution into a leaf state;
//! - `audiences/evaluate`: evaluating one profile against every definition,
//!   from merged leaf states (computed traits first, then audiences in
//!   reference order, with deadlines).
//!
//! Run: `cargo bench -p trailmark-benches --bench audiences` (add `--
//! --quick` for a rougher run). Results: `benches/RESULTS.md`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use trailmark_benches::event_stream;
use trailmark_domain::audience::eval::ProfileData;
use trailmark_domain::audience::json::computed_trait_from_json;
use trailmark_domain::audience::leaf::{Contribution, LeafState, SpecId};
use trailmark_domain::audience::query::parse_query;
use trailmark_domain::audience::{AudienceDef, Catalog, Changed, TraitDef};
use trailmark_domain::profile::TraitValue;

/// The definitions `benches/run-audiences` makes, written the same way.
fn catalog(n: usize) -> Catalog {
    let events = [
        "Order Completed",
        "Product Viewed",
        "Product Added",
        "Checkout Started",
        "Signed Up",
    ];
    let audiences = (0..n)
        .map(|i| {
            let q = match i % 4 {
                0 => format!("trait('plan') = '{}'", ["free", "pro", "enterprise"][i % 3]),
                1 => format!(
                    "event('{}').within({} minutes).count() >= {}",
                    events[i % 5],
                    1 + i % 30,
                    1 + i % 5
                ),
                2 => format!(
                    "event('Order Completed').where(property('total') >= {}).within({} minutes).count() >= 1 && trait('plan') != 'enterprise'",
                    10 * (1 + i % 20),
                    1 + i % 10
                ),
                _ => format!(
                    "event('$page').where(property('path') = '/pricing').within({} minutes).count() >= {}",
                    1 + i % 15,
                    1 + i % 3
                ),
            };
            AudienceDef {
                id: format!("aud_{i}"),
                key: format!("a{i:03}"),
                version: 1,
                condition: parse_query(&q).expect("query"),
            }
        })
        .collect();
    let traits = [
        json!({"reducer": "sum", "event": "Order Completed", "property": "total", "within": {"last": 30, "unit": "days"}}),
        json!({"reducer": "count", "event": "Product Viewed"}),
        json!({"reducer": "most_frequent", "event": "$page", "property": "path"}),
        json!({"reducer": "unique_count", "event": "Product Added", "property": "order_id"}),
        json!({"reducer": "last", "event": "Order Completed", "property": "total"}),
    ]
    .iter()
    .enumerate()
    .map(|(i, d)| TraitDef {
        id: format!("ct_{i}"),
        key: format!("t{i}"),
        version: 1,
        definition: computed_trait_from_json(d, "definition").expect("trait"),
    })
    .collect();
    Catalog::new(audiences, traits)
}

/// Every contribution folded into one identifier's leaf states.
fn fold_all(
    catalog: &Catalog,
    contributions: &[(SpecId, Contribution)],
) -> BTreeMap<SpecId, LeafState> {
    let mut states = BTreeMap::new();
    for (id, c) in contributions {
        let spec = &catalog.specs()[id];
        states
            .entry(id.clone())
            .or_insert_with(|| spec.empty())
            .fold(spec, c);
    }
    states
}

fn bench(c: &mut Criterion) {
    let catalog = catalog(100);
    let stream = event_stream(2_000, 50, 3);
    let mut g = c.benchmark_group("audiences");
    g.throughput(Throughput::Elements(stream.len() as u64));
    g.bench_function("contributions", |b| {
        b.iter(|| {
            let mut n = 0;
            for ev in &stream {
                n += catalog.contributions(black_box(ev)).len();
            }
            black_box(n)
        })
    });
    // Every contribution of the stream folded into one identifier's states.
    let contributions: Vec<_> = stream
        .iter()
        .flat_map(|ev| catalog.contributions(ev))
        .collect();
    g.throughput(Throughput::Elements(contributions.len() as u64));
    g.bench_function("fold", |b| {
        b.iter(|| black_box(fold_all(&catalog, &contributions).len()))
    });
    let leaves = fold_all(&catalog, &contributions);
    let traits: BTreeMap<String, TraitValue> = [(
        "plan".to_owned(),
        TraitValue {
            value: json!("pro"),
            updated_at: 0,
            message_id: "m".into(),
        },
    )]
    .into();
    let now = stream.iter().map(|e| e.received_at).max().unwrap_or(0);
    let data = ProfileData {
        traits: &traits,
        seen: Some((now - 1_000_000_000, now)),
        leaves: &leaves,
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("evaluate", |b| {
        b.iter(|| black_box(catalog.evaluate(black_box(&data), now)))
    });
    // The same profile a second later, after one event that contributed to
    // the specs of one event name (what the evaluator does per event): the
    // plan, and the audiences it picks.
    let last = catalog.evaluate(&data, now);
    let one = stream
        .iter()
        .map(|ev| catalog.contributions(ev))
        .find(|c| !c.is_empty())
        .unwrap_or_default();
    let changed = Changed {
        specs: one.into_iter().map(|(s, _)| s).collect(),
        traits: false,
        seen: true,
    };
    let later = now + 1_000_000;
    eprintln!(
        "evaluate_changed: {} of {} audiences planned",
        catalog.plan(Some((&last, &changed)), later).audiences(),
        catalog.audiences().len()
    );
    g.bench_function("evaluate_changed", |b| {
        b.iter(|| {
            let plan = catalog.plan(Some((&last, black_box(&changed))), later);
            black_box(catalog.evaluate_planned(&data, later, Some(&last), &plan))
        })
    });
    g.finish();
}

// In a private module, so the `pub fn` that `criterion_group!` generates
// needs no documentation.
mod group {
    use super::*;
    criterion_group!(benches, bench);
}
criterion_main!(group::benches);
