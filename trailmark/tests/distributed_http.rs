//! The end-to-end HTTP cases of `cases/http.rs`, run against `trailmark
//! ingest`, `trailmark projector` and `trailmark query-api` as separate
//! processes on a real Kafka and Cassandra (`deploy/local/engines up`).

mod common;

/// Three role processes on Kafka and Cassandra.
const DISTRIBUTED: bool = true;

include!("cases/http.rs");
include!("cases/audiences.rs");
