//! Prometheus metrics. Names follow Prometheus conventions: a `trailmark_`
//! prefix, base units, `_total` on counters. No label ever carries a user id.
//!
//! Every label value comes from a closed set the server chooses, so nothing
//! a client sends can add series: `route` is the matched route template or
//! `unmatched`, `method` one of the nine standard methods or `other`,
//! `status` the status the server answered, `type` an event type or
//! `batch_item`, and `outcome` a fixed word.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::AppState;

/// Latency buckets in seconds, from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Delay buckets in seconds, from 10 ms to 10 minutes (a window's exit is
/// due within a minute).
const DELAY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0,
];

/// Every metric Trailmark exports.
pub struct Metrics {
    registry: Registry,
    /// Events seen by ingest, by `type` and `outcome` (`accepted`, `rejected`,
    /// `failed`).
    pub ingest_events: IntCounterVec,
    /// HTTP request latency by `route`, `method` and `status`.
    pub http_request_duration: HistogramVec,
    /// Log append latency (one call, one group commit wait), by `outcome`.
    pub log_append_duration: HistogramVec,
    /// Events handled by the projector, by `outcome` (`applied`,
    /// `duplicate`, `undecodable`).
    pub projector_events: IntCounterVec,
    /// Time to apply one projector batch to the store.
    pub projector_batch_duration: Histogram,
    /// Records in the log the projector has not applied yet (file log: bytes).
    pub projector_lag: IntGauge,
    /// How long after its reception the evaluator folded the last event it
    /// read, in seconds.
    pub evaluator_lag_seconds: Gauge,
    /// From what caused a change (an event's reception, a window's
    /// boundary) to the change being decided, by `cause` (`event`,
    /// `deadline`).
    pub evaluator_change_delay_seconds: HistogramVec,
    /// Membership and computed-trait changes decided.
    pub evaluator_changes: IntCounter,
    /// Records in the log the evaluator has not read yet.
    pub evaluator_behind: IntGauge,
    /// Audiences per profile evaluation, by `outcome`: `evaluated`, or
    /// `carried` (nothing it reads changed, so its last verdict stands).
    pub evaluator_audiences: IntCounterVec,
    /// Profiles the evaluator needed, by `outcome`: `carried` (its copy
    /// still stood), or `read` (resolved from the store).
    pub evaluator_resolutions: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let ingest_events = IntCounterVec::new(
            Opts::new("trailmark_ingest_events_total", "Events seen by ingest"),
            &["type", "outcome"],
        )
        .expect("valid metric");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "trailmark_http_request_duration_seconds",
                "HTTP request latency",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let log_append_duration = HistogramVec::new(
            HistogramOpts::new(
                "trailmark_log_append_duration_seconds",
                "Time until appended records are durable",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )
        .expect("valid metric");
        let projector_events = IntCounterVec::new(
            Opts::new(
                "trailmark_projector_events_total",
                "Events handled by the projector",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let projector_batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "trailmark_projector_batch_duration_seconds",
                "Time to apply one batch to the store",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let projector_lag = IntGauge::new(
            "trailmark_projector_lag",
            "Log not yet applied by the projector (file log: bytes)",
        )
        .expect("valid metric");
        let evaluator_lag_seconds = Gauge::new(
            "trailmark_evaluator_lag_seconds",
            "Age of the last event the audience evaluator folded",
        )
        .expect("valid metric");
        let evaluator_change_delay_seconds = HistogramVec::new(
            HistogramOpts::new(
                "trailmark_evaluator_change_delay_seconds",
                "From a change's cause (an event received, a window's boundary) to its decision",
            )
            .buckets(DELAY_BUCKETS.to_vec()),
            &["cause"],
        )
        .expect("valid metric");
        let evaluator_behind = IntGauge::new(
            "trailmark_evaluator_behind",
            "Log not yet read by the audience evaluator (file log: bytes)",
        )
        .expect("valid metric");
        let evaluator_changes = IntCounter::new(
            "trailmark_evaluator_changes_total",
            "Membership and computed-trait changes decided",
        )
        .expect("valid metric");
        let evaluator_audiences = IntCounterVec::new(
            Opts::new(
                "trailmark_evaluator_audiences_total",
                "Audiences per profile evaluation: evaluated, or carried over unchanged",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let evaluator_resolutions = IntCounterVec::new(
            Opts::new(
                "trailmark_evaluator_resolutions_total",
                "Profiles the evaluator needed: carried over from its copy, or read from the store",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [
            Box::new(ingest_events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_request_duration.clone()),
            Box::new(log_append_duration.clone()),
            Box::new(projector_events.clone()),
            Box::new(projector_batch_duration.clone()),
            Box::new(projector_lag.clone()),
            Box::new(evaluator_lag_seconds.clone()),
            Box::new(evaluator_change_delay_seconds.clone()),
            Box::new(evaluator_changes.clone()),
            Box::new(evaluator_behind.clone()),
            Box::new(evaluator_audiences.clone()),
            Box::new(evaluator_resolutions.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            ingest_events,
            http_request_duration,
            log_append_duration,
            projector_events,
            projector_batch_duration,
            projector_lag,
            evaluator_lag_seconds,
            evaluator_change_delay_seconds,
            evaluator_changes,
            evaluator_behind,
            evaluator_audiences,
            evaluator_resolutions,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 exposition")
    }
}

/// The `method` label: a standard method, or `other` for any other token a
/// client invents (HTTP allows any).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Middleware: times every request by its route template.
pub async fn track_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .http_request_duration
        .with_label_values(&[route.as_str(), method, resp.status().as_str()])
        .observe(start.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&Method::POST), "POST");
        for m in ["FOO", "get", "X-1"] {
            assert_eq!(
                method_label(&Method::from_bytes(m.as_bytes()).unwrap()),
                "other"
            );
        }
    }
}
