//! Fuzzes the Segment HTTP API parser with arbitrary request bodies.
//!
//! Each input is fed, as ingest would, to `parse_single` + `normalise` for
//! every event type and to `parse_batch` + `normalise`, under the default
//! limits and under small ones (so that the size checks are reached). Besides
//! "never panics", it asserts what the rest of Trailmark relies on:
//!
//! - every accepted event names a person (`userId` or `anonymousId`), has a
//!   non-empty `messageId` of at most 100 characters, identifiers without NUL
//!   and within 1,024 characters, the per-type required fields, and JSON
//!   object text in `properties`/`traits`/`context`/`integrations`;
//! - a batch accounts for every item exactly once, rejections by increasing
//!   index;
//! - batch items are judged independently: each item, sent alone in the same
//!   envelope, gets the same verdict (same event, or same error) as inside the
//!   batch, so one bad item never sinks or changes another.
//!
//! Run it from `fuzz/` (see `fuzz/README.md`):
//! `cargo +nightly fuzz run ingest_parser corpus/ingest_parser seeds/ingest_parser`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use trailmark_domain::parse::{
    MAX_ID_CHARS, MAX_MESSAGE_ID_CHARS, RequestMeta, parse_batch, parse_single,
};
use trailmark_domain::profile::Fact;
use trailmark_domain::{Event, EventType, Limits};

const RECEIVED_AT: i64 = 1_700_000_000_000_000;

fn meta() -> RequestMeta<'static> {
    RequestMeta {
        workspace_id: "ws_1",
        source_id: "src_1",
        received_at: RECEIVED_AT,
        request_ip: Some("127.0.0.1"),
    }
}

/// A constant id, so that an item normalised alone and inside a batch compare equal.
fn generated_id() -> String {
    "generated".to_owned()
}

fn is_object_text(text: &Option<String>) -> bool {
    text.as_deref()
        .is_none_or(|t| serde_json::from_str::<Map<String, Value>>(t).is_ok())
}

fn check_id(id: &Option<String>) {
    if let Some(s) = id {
        assert!(!s.is_empty(), "empty identifier");
        assert!(!s.contains('\0'), "identifier with nul: {s:?}");
        assert!(s.chars().count() <= MAX_ID_CHARS, "identifier too long");
    }
}

fn check_event(ev: &Event, kind: EventType) {
    assert_eq!(ev.kind, kind);
    assert!(
        ev.user_id.is_some() || ev.anonymous_id.is_some(),
        "accepted an event without identity: {ev:?}"
    );
    for id in [&ev.user_id, &ev.anonymous_id, &ev.group_id, &ev.previous_id] {
        check_id(id);
    }
    assert!(!ev.message_id.is_empty(), "empty messageId");
    assert!(
        ev.message_id.chars().count() <= MAX_MESSAGE_ID_CHARS,
        "messageId of {} chars",
        ev.message_id.chars().count()
    );
    assert_eq!(ev.workspace_id, "ws_1");
    // The evaluator re-reads traits only when this says they may change.
    if let Ok(p) = trailmark_domain::profile::project(ev) {
        let sets = p.facts.iter().any(|f| matches!(f, Fact::Trait { .. }));
        assert!(
            !sets || trailmark_domain::profile::may_set_traits(ev),
            "may_set_traits said no to an event with traits: {ev:?}"
        );
    }
    assert_eq!(ev.source_id, "src_1");
    assert_eq!(ev.received_at, RECEIVED_AT);
    assert_eq!(ev.event.is_some(), kind == EventType::Track);
    if let Some(name) = &ev.event {
        assert!(!name.trim().is_empty(), "blank track event name");
    }
    assert_eq!(ev.group_id.is_some(), kind == EventType::Group);
    assert_eq!(ev.previous_id.is_some(), kind == EventType::Alias);
    if kind == EventType::Alias {
        assert!(ev.user_id.is_some(), "alias without userId");
    }
    for (field, text) in [
        ("properties", &ev.properties),
        ("traits", &ev.traits),
        ("context", &ev.context),
        ("integrations", &ev.integrations),
    ] {
        assert!(is_object_text(text), "{field} is not an object: {text:?}");
    }
    if ev.original_timestamp.is_some() && ev.sent_at.is_some() {
        assert!(
            ev.timestamp <= ev.received_at,
            "skew correction moved the event forward"
        );
    }
    let api = ev.to_api_json();
    assert_eq!(api["message_id"].as_str(), Some(ev.message_id.as_str()));
}

/// The batch envelope's shared fields, kept verbatim, to rebuild one-item
/// batches that differ from the original only in their item list. Read the
/// way the parser reads it: the last of a repeated key wins, and unknown keys
/// are skipped unread (so their content need not be valid text).
#[derive(Default)]
struct Envelope<'a> {
    batch: Option<&'a RawValue>,
    context: Option<&'a RawValue>,
    integrations: Option<&'a RawValue>,
    sent_at: Option<&'a RawValue>,
    write_key: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;
        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a batch envelope")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
                let mut env = Envelope::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "batch" => env.batch = map.next_value()?,
                        "context" => env.context = map.next_value()?,
                        "integrations" => env.integrations = map.next_value()?,
                        "sentAt" => env.sent_at = map.next_value()?,
                        "writeKey" => env.write_key = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(env)
            }
        }
        d.deserialize_map(EnvelopeVisitor)
    }
}

/// The body of a batch holding only `item`, with `env`'s shared fields.
fn alone(env: &Envelope<'_>, item: &RawValue) -> String {
    let mut body = format!(r#"{{"batch":[{}]"#, item.get());
    for (key, raw) in [
        ("context", env.context),
        ("integrations", env.integrations),
        ("sentAt", env.sent_at),
        ("writeKey", env.write_key),
    ] {
        if let Some(raw) = raw {
            body.push_str(&format!(r#","{key}":{}"#, raw.get()));
        }
    }
    body.push('}');
    body
}

fn check(data: &[u8], limits: &Limits) {
    for kind in EventType::ALL {
        match parse_single(data, limits) {
            Ok(raw) => {
                let _ = raw.write_key();
                if let Ok(ev) = raw.normalise(kind, &meta(), &mut generated_id) {
                    check_event(&ev, kind);
                }
            }
            Err(e) => assert_eq!(e.too_large, data.len() > limits.max_event_bytes),
        }
    }

    let Ok(batch) = parse_batch(data, limits) else {
        return;
    };
    assert!(!batch.is_empty() && batch.len() <= limits.max_batch_events);
    let parsed = batch.normalise(&meta(), limits, &mut generated_id);
    assert_eq!(parsed.events.len() + parsed.rejected.len(), batch.len());
    assert!(parsed.rejected.windows(2).all(|w| w[0].index < w[1].index));
    assert!(parsed.rejected.iter().all(|r| r.index < batch.len()));
    for ev in &parsed.events {
        check_event(ev, ev.kind);
    }

    // Independence: the verdict on item i alone equals its verdict in the batch.
    let env: Envelope<'_> = serde_json::from_slice(data).expect("parse_batch read this envelope");
    let items: Vec<&RawValue> =
        serde_json::from_str(env.batch.expect("parse_batch found a batch").get())
            .expect("parse_batch read this item list");
    assert_eq!(items.len(), batch.len());
    // The rebuilt body can outgrow the original (an item list shared by
    // repeated `batch` keys); the batch byte limit is not under test here.
    let alone_limits = Limits {
        max_batch_bytes: usize::MAX,
        ..*limits
    };
    let mut accepted = parsed.events.iter();
    let mut rejected = parsed.rejected.iter().peekable();
    for (i, item) in items.iter().enumerate() {
        let body = alone(&env, item);
        let one = parse_batch(body.as_bytes(), &alone_limits)
            .expect("a one-item batch from an accepted envelope parses")
            .normalise(&meta(), limits, &mut generated_id);
        match rejected.next_if(|r| r.index == i) {
            Some(r) => {
                assert!(
                    one.events.is_empty(),
                    "item {i} was rejected in the batch only"
                );
                assert_eq!(one.rejected[0].error, r.error, "item {i}");
                assert_eq!(one.rejected[0].message_id, r.message_id, "item {i}");
            }
            None => {
                let ev = accepted.next().expect("every item accounted for");
                assert_eq!(one.events.first(), Some(ev), "item {i}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &Limits::default());
    check(
        data,
        &Limits {
            max_event_bytes: 160,
            max_batch_bytes: 1_200,
            max_batch_events: 4,
        },
    );
});
