//! Measures the log record codec on a realistic `track` event (the ~600-byte
//! fixture, normalised by the real parser): [`EventCodec::encode_into`] into a
//! reused buffer and [`EventCodec::decode`], against a baseline that goes
//! through apache-avro's generic `Value` (`to_value` + `to_avro_datum`, and
//! `from_avro_datum` + `from_value`). The baseline is what the straightforward
//! use of apache-avro costs: it builds a `Value` tree per record and resolves
//! the schema on every call, which is why the codec doesn't.
//!
//! Run: `cargo bench -p trailmark-benches --bench avro_codec`
//! (add `-- --quick` for a fast, rougher run). Results: `benches/RESULTS.md`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trailmark_benches::sample_track_event;
use trailmark_domain::Event;
use trailmark_schemas::{EventCodec, current_schema};

/// Single-object header: two marker bytes and an 8-byte fingerprint.
const HEADER_LEN: usize = 10;

fn encode(c: &mut Criterion) {
    let codec = EventCodec::new().unwrap();
    let event = sample_track_event();
    let schema = current_schema();
    let mut buf = Vec::with_capacity(1024);
    codec.encode_into(&event, &mut buf).unwrap();
    let mut g = c.benchmark_group("avro_codec/encode");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("event_codec_encode_into_reused_buf", |b| {
        b.iter(|| {
            buf.clear();
            codec.encode_into(black_box(&event), &mut buf).unwrap();
            black_box(buf.len())
        })
    });
    g.bench_function("baseline_to_value_to_avro_datum", |b| {
        b.iter(|| {
            let value = apache_avro::to_value(black_box(&event)).unwrap();
            // The deprecated one-shot API is the baseline on purpose: it is the
            // obvious way to write a datum, and it builds a writer per call.
            #[allow(deprecated)]
            let datum = apache_avro::to_avro_datum(schema, value).unwrap();
            black_box(datum)
        })
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let codec = EventCodec::new().unwrap();
    let event = sample_track_event();
    let schema = current_schema();
    let record = codec.encode(&event).unwrap();
    assert_eq!(codec.decode(&record).unwrap(), event);
    let datum = &record[HEADER_LEN..];
    let mut g = c.benchmark_group("avro_codec/decode");
    g.throughput(Throughput::Bytes(record.len() as u64));
    g.bench_function("event_codec_decode", |b| {
        b.iter(|| black_box(codec.decode(black_box(&record)).unwrap()))
    });
    g.bench_function("baseline_from_avro_datum_from_value", |b| {
        b.iter(|| {
            let mut body = black_box(datum);
            #[allow(deprecated)]
            let value = apache_avro::from_avro_datum(schema, &mut body, None).unwrap();
            black_box(apache_avro::from_value::<Event>(&value).unwrap())
        })
    });
    g.finish();
}

// In a private module, so the `pub fn` that `criterion_group!` generates is
// not public API (which `missing_docs` would ask to document).
mod group {
    use super::*;
    criterion_group!(benches, encode, decode);
}
criterion_main!(group::benches);
