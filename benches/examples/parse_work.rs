//! A fixed amount of ingest parsing, for counting instructions with
//! `perf stat -e instructions:u`: on a shared, noisy machine the count of
//! retired instructions compares two builds where wall-clock times cannot.
//!
//! `cargo run --release --example parse_work -- single|external_ids|batch N`
//! parses and normalises the `ingest_parse` fixture N times.

use std::hint::black_box;

use trailmark_benches::{bench_meta, sample_batch_body, sample_track_body};
use trailmark_domain::parse::{parse_batch, parse_single};
use trailmark_domain::{EventType, Limits};

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "single".into());
    let n: usize = args.next().map_or(100_000, |n| n.parse().expect("a count"));
    let limits = Limits::default();
    let meta = bench_meta();
    let mut id = || String::from("generated");
    match which.as_str() {
        "single" | "external_ids" => {
            let mut body = sample_track_body();
            if which == "external_ids" {
                body = String::from_utf8(body)
                    .unwrap()
                    .replacen(
                        r#""context":{"#,
                        r#""context":{"externalIds":[{"id":"0031N00001abcdEQAQ","type":"salesforce_id","collection":"users","encoding":"none"},{"id":"51","type":"hubspot_id","collection":"users","encoding":"none"},{"id":"cus_Q1w2e3r4t5","type":"stripe_customer_id","collection":"users","encoding":"none"}],"#,
                        1,
                    )
                    .into_bytes();
            }
            for _ in 0..n {
                let raw = parse_single(black_box(&body), &limits).unwrap();
                black_box(raw.normalise(EventType::Track, &meta, &mut id).unwrap());
            }
        }
        "batch" => {
            let body = sample_batch_body(100, 1_000, 42);
            for _ in 0..n {
                let raw = parse_batch(black_box(&body), &limits).unwrap();
                black_box(raw.normalise(&meta, &limits, &mut id));
            }
        }
        other => panic!("unknown workload {other}"),
    }
}
