//! Property tests of the Segment HTTP API parser ([`parse_single`],
//! [`parse_batch`] and their `normalise`).
//!
//! Ingest hands the parser whatever bytes a client sent, so it must never
//! panic, and everything it accepts must be an event the rest of Trailmark can
//! rely on: it names a person (`userId` or `anonymousId`), its `messageId` fits
//! the log schema's 100 characters, and its JSON fields are objects. In a batch
//! one bad item must never sink the others: exactly the bad items are rejected,
//! by index. The fuzz target `fuzz/fuzz_targets/ingest_parser.rs` checks the
//! same invariants with coverage guidance.
//!
//! Run with `cargo test -p trailmark-domain --test parse_props`; raise the case
//! count with `PROPTEST_CASES=5000`.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use trailmark_domain::parse::{
    MAX_ID_CHARS, MAX_MESSAGE_ID_CHARS, RequestMeta, parse_batch, parse_single,
};
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

/// Generates `messageId`s the way ingest does, distinct from any in a body.
fn new_ids() -> impl FnMut() -> String {
    let mut n = 0u32;
    move || {
        n += 1;
        format!("generated-{n}")
    }
}

fn is_object_text(text: &Option<String>) -> bool {
    text.as_deref()
        .is_none_or(|t| serde_json::from_str::<Map<String, Value>>(t).is_ok())
}

fn valid_id(id: &Option<String>) -> bool {
    id.as_deref()
        .is_none_or(|s| !s.is_empty() && !s.contains('\0') && s.chars().count() <= MAX_ID_CHARS)
}

/// The invariants every accepted event holds, whatever the body was.
fn check_event(ev: &Event, kind: EventType) -> Result<(), TestCaseError> {
    prop_assert_eq!(ev.kind, kind);
    prop_assert!(
        ev.user_id.is_some() || ev.anonymous_id.is_some(),
        "no identity: {:?}",
        ev
    );
    for id in [&ev.user_id, &ev.anonymous_id, &ev.group_id, &ev.previous_id] {
        prop_assert!(valid_id(id), "bad identifier {:?}", id);
    }
    prop_assert!(!ev.message_id.is_empty());
    prop_assert!(
        ev.message_id.chars().count() <= MAX_MESSAGE_ID_CHARS,
        "messageId of {} chars",
        ev.message_id.chars().count()
    );
    prop_assert_eq!(&ev.workspace_id, "ws_1");
    prop_assert_eq!(&ev.source_id, "src_1");
    prop_assert_eq!(ev.received_at, RECEIVED_AT);
    prop_assert_eq!(ev.request_ip.as_deref(), Some("127.0.0.1"));

    prop_assert_eq!(ev.event.is_some(), kind == EventType::Track);
    if let Some(e) = &ev.event {
        prop_assert!(!e.trim().is_empty(), "blank track event name");
    }
    prop_assert_eq!(ev.group_id.is_some(), kind == EventType::Group);
    prop_assert_eq!(ev.previous_id.is_some(), kind == EventType::Alias);
    if kind == EventType::Alias {
        prop_assert!(ev.user_id.is_some(), "alias without userId");
    }
    if !matches!(kind, EventType::Page | EventType::Screen) {
        prop_assert!(ev.name.is_none() && ev.category.is_none());
    }
    if !matches!(kind, EventType::Track | EventType::Page | EventType::Screen) {
        prop_assert!(ev.properties.is_none());
    }
    if !matches!(kind, EventType::Identify | EventType::Group) {
        prop_assert!(ev.traits.is_none());
    }
    for (field, text) in [
        ("properties", &ev.properties),
        ("traits", &ev.traits),
        ("context", &ev.context),
        ("integrations", &ev.integrations),
    ] {
        prop_assert!(
            is_object_text(text),
            "{} is not an object: {:?}",
            field,
            text
        );
    }
    if let (Some(_), Some(_)) = (ev.original_timestamp, ev.sent_at) {
        // Skew correction moves the event back from receipt, never forward.
        prop_assert!(ev.timestamp <= ev.received_at);
    }
    let api = ev.to_api_json();
    prop_assert_eq!(api["message_id"].as_str(), Some(ev.message_id.as_str()));
    Ok(())
}

/// Feeds `body` to every parser entry point, checking what comes out.
fn exercise(body: &[u8], limits: &Limits) -> Result<(), TestCaseError> {
    for kind in EventType::ALL {
        match parse_single(body, limits) {
            Ok(raw) => {
                let _ = raw.write_key();
                if let Ok(ev) = raw.normalise(kind, &meta(), &mut new_ids()) {
                    check_event(&ev, kind)?;
                }
            }
            Err(e) => prop_assert_eq!(e.too_large, body.len() > limits.max_event_bytes),
        }
    }
    match parse_batch(body, limits) {
        Ok(batch) => {
            prop_assert!(!batch.is_empty());
            prop_assert!(batch.len() <= limits.max_batch_events);
            let parsed = batch.normalise(&meta(), limits, &mut new_ids());
            prop_assert_eq!(parsed.events.len() + parsed.rejected.len(), batch.len());
            let indices: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
            prop_assert!(
                indices.windows(2).all(|w| w[0] < w[1]),
                "indices {:?}",
                indices
            );
            prop_assert!(indices.iter().all(|&i| i < batch.len()));
            for ev in &parsed.events {
                check_event(ev, ev.kind)?;
            }
        }
        Err(e) => {
            if body.len() > limits.max_batch_bytes {
                prop_assert!(e.too_large);
            }
        }
    }
    Ok(())
}

/// Limits small enough that generated bodies cross them.
fn small_limits() -> Limits {
    Limits {
        max_event_bytes: 160,
        max_batch_bytes: 1_200,
        max_batch_events: 4,
    }
}

const FIELDS: [&str; 18] = [
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "context",
    "integrations",
    "event",
    "properties",
    "traits",
    "name",
    "category",
    "groupId",
    "previousId",
    "writeKey",
    "batch",
];

/// Timestamps of the shapes clients send, valid and not. Years stay within
/// four digits: see `extended_year_timestamps_do_not_overflow_skew_correction`.
fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            1970i32..2100,
            1u32..13,
            1u32..29,
            0u32..24,
            0u32..60,
            0u32..1000
        )
            .prop_map(|(y, mo, d, h, mi, ms)| format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:00.{ms:03}Z"
            )),
        (0i32..10_000, 1u32..13, 1u32..29).prop_map(|(y, mo, d)| format!("{y:04}-{mo:02}-{d:02}")),
        (1970i32..2100, -12i32..13)
            .prop_map(|(y, off)| format!("{y:04}-06-01T12:00:00{off:+03}:00")),
        Just("2024-02-30T00:00:00Z".to_owned()),
        Just("yesterday".to_owned()),
        "[0-9:TZ.+-]{0,24}",
    ]
}

fn string_leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9 ]{0,12}",
        2 => timestamp(),
        2 => prop::sample::select(EventType::ALL.map(EventType::as_str).to_vec()).prop_map(str::to_owned),
        1 => ".{0,16}",
        1 => Just(String::new()),
        1 => Just("a\0b".to_owned()),
        1 => (99usize..103).prop_map(|n| "m".repeat(n)),
        1 => (1023usize..1026).prop_map(|n| "é".repeat(n)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        4 => string_leaf().prop_map(Value::from),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
        1 => "[a-zA-Z_]{0,8}",
    ]
}

/// Any JSON value, with object keys biased towards Segment's field names so
/// that the generated values reach past the envelope.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A message-shaped object: Segment fields with arbitrary values.
fn message() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (
            prop::sample::select(FIELDS[..17].to_vec()),
            prop_oneof![3 => leaf(), 1 => json()],
        ),
        0..10,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// A batch-shaped object: an array of messages and arbitrary shared fields.
fn batch() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(prop_oneof![4 => message(), 1 => json()], 0..6),
        prop::option::of(json()),
        prop::option::of(json()),
        prop::option::of(leaf()),
    )
        .prop_map(|(items, context, integrations, sent_at)| {
            let mut m = Map::new();
            m.insert("batch".into(), Value::Array(items));
            for (k, v) in [
                ("context", context),
                ("integrations", integrations),
                ("sentAt", sent_at),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

/// Valid JSON bytes with a few bytes overwritten, to reach the error paths of
/// the JSON reader from inside a realistic body.
fn damaged() -> impl Strategy<Value = Vec<u8>> {
    (
        batch(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    )
        .prop_map(|(v, edits)| {
            let mut bytes = serde_json::to_vec(&v).unwrap();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            bytes
        })
}

/// The ways a batch item can be bad, each with the field its error must name.
#[derive(Debug, Clone, Copy)]
enum Bad {
    NoIdentity,
    UnknownType,
    NoType,
    TypeNotString,
    NotAnObject,
    TrackWithoutEvent,
    BlankEvent,
    LongMessageId,
    UserIdObject,
    UserIdWithNul,
    UserIdTooLong,
    PropertiesArray,
    UnparsableTimestamp,
    SentAtNumber,
    ContextString,
    AliasWithoutUserId,
    GroupWithoutGroupId,
    TooLarge,
}

const BAD: [Bad; 18] = [
    Bad::NoIdentity,
    Bad::UnknownType,
    Bad::NoType,
    Bad::TypeNotString,
    Bad::NotAnObject,
    Bad::TrackWithoutEvent,
    Bad::BlankEvent,
    Bad::LongMessageId,
    Bad::UserIdObject,
    Bad::UserIdWithNul,
    Bad::UserIdTooLong,
    Bad::PropertiesArray,
    Bad::UnparsableTimestamp,
    Bad::SentAtNumber,
    Bad::ContextString,
    Bad::AliasWithoutUserId,
    Bad::GroupWithoutGroupId,
    Bad::TooLarge,
];

impl Bad {
    /// The item, and the field its error must name (`None`: no field).
    fn item(self, message_id: &str) -> (Value, Option<&'static str>) {
        let mut v =
            json!({"type": "track", "userId": "u1", "event": "Clicked", "messageId": message_id});
        let field = match self {
            Bad::NoIdentity => {
                v.as_object_mut().unwrap().remove("userId");
                Some("userId")
            }
            Bad::UnknownType => {
                v["type"] = json!("purchase");
                Some("type")
            }
            Bad::NoType => {
                v.as_object_mut().unwrap().remove("type");
                Some("type")
            }
            Bad::TypeNotString => {
                v["type"] = json!(1);
                Some("type")
            }
            Bad::NotAnObject => return (json!(["track", message_id]), None),
            Bad::TrackWithoutEvent => {
                v.as_object_mut().unwrap().remove("event");
                Some("event")
            }
            Bad::BlankEvent => {
                v["event"] = json!("  ");
                Some("event")
            }
            Bad::LongMessageId => {
                v["messageId"] = json!("x".repeat(MAX_MESSAGE_ID_CHARS + 1));
                Some("messageId")
            }
            Bad::UserIdObject => {
                v["userId"] = json!({"id": 1});
                Some("userId")
            }
            Bad::UserIdWithNul => {
                v["userId"] = json!("u\u{0}1");
                Some("userId")
            }
            Bad::UserIdTooLong => {
                v["userId"] = json!("u".repeat(MAX_ID_CHARS + 1));
                Some("userId")
            }
            Bad::PropertiesArray => {
                v["properties"] = json!([1, 2]);
                Some("properties")
            }
            Bad::UnparsableTimestamp => {
                v["timestamp"] = json!("last tuesday");
                Some("timestamp")
            }
            Bad::SentAtNumber => {
                v["sentAt"] = json!(1_700_000_000);
                Some("sentAt")
            }
            Bad::ContextString => {
                v["context"] = json!("ctx");
                Some("context")
            }
            Bad::AliasWithoutUserId => {
                v = json!({"type": "alias", "anonymousId": "a1", "previousId": "p", "messageId": message_id});
                Some("userId")
            }
            Bad::GroupWithoutGroupId => {
                v = json!({"type": "group", "userId": "u1", "traits": {"plan": "x"}, "messageId": message_id});
                Some("groupId")
            }
            Bad::TooLarge => {
                v["properties"] = json!({"blob": "b".repeat(Limits::default().max_event_bytes)});
                None
            }
        };
        (v, field)
    }
}

/// A bad item's kind, and the field its error must name.
type BadItem = (Bad, Option<&'static str>);

/// A valid item of each call type, with varied optional fields.
fn good_item() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(EventType::ALL.to_vec()),
        prop::option::of("[a-z0-9]{1,12}"),
        prop::option::of("[a-f0-9-]{1,36}"),
        prop::option::of(timestamp().prop_filter("parses", |t| {
            trailmark_domain::time::parse_micros(t).is_some()
        })),
        prop::option::of(Just(json!({"plan": "pro", "seats": 3}))),
        any::<bool>(),
        prop::option::of(1_i64..1_000_000_000),
    )
        .prop_map(|(kind, user, anon, ts, obj, numeric_user, n)| {
            let mut m = Map::new();
            m.insert("type".into(), json!(kind.as_str()));
            // Every good item names a person; alias needs a userId.
            let user = match (user, &anon, kind) {
                (None, Some(_), k) if k != EventType::Alias => None,
                (Some(u), ..) => Some(u),
                (None, ..) => Some("fallback-user".to_owned()),
            };
            if let Some(u) = user {
                let v = match (numeric_user, n) {
                    (true, Some(n)) => json!(n),
                    _ => json!(u),
                };
                m.insert("userId".into(), v);
            }
            if let Some(a) = anon {
                m.insert("anonymousId".into(), json!(a));
            }
            match kind {
                EventType::Track => {
                    m.insert("event".into(), json!("Order Completed"));
                }
                EventType::Page | EventType::Screen => {
                    m.insert("name".into(), json!("Home"));
                }
                EventType::Group => {
                    m.insert("groupId".into(), json!(n.unwrap_or(7)));
                }
                EventType::Alias => {
                    m.insert("previousId".into(), json!("old-id"));
                }
                EventType::Identify => {}
                EventType::Control => unreachable!("not a client type"),
            }
            if let Some(t) = ts {
                m.insert("timestamp".into(), json!(t));
            }
            if let Some(o) = obj {
                m.insert("properties".into(), o.clone());
                m.insert("traits".into(), o.clone());
                m.insert("context".into(), json!({"traits": o}));
            }
            Value::Object(m)
        })
}

/// A JSON number as a client might write it: ordinary, with an exponent,
/// or long; some beyond a double's range (`1e999`, 400 digits), some
/// underflowing to zero. Serialising a `Value` never produces these, so the
/// generators above cannot reach them.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,4})?",
        "-?[1-9]\\.[0-9]{1,20}[eE]\\+?30[0-9]",
        (290usize..320).prop_map(|n| format!("9{}", "0".repeat(n))),
    ]
}

/// A JSON string with `\u` escapes, some of them lone surrogates.
fn string_text() -> impl Strategy<Value = String> {
    "([a-z ]|\\\\u[dD][89a-fA-F][0-9a-f]{2}|\\\\u00[4-7][0-9a-f]|\\\\\\\\|\\\\\")*"
        .prop_map(|s| format!("\"{s}\""))
}

/// Object text built from those tokens, with one level of nesting.
fn object_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![number_text(), string_text()];
    prop::collection::vec((string_text(), leaf, any::<bool>()), 0..5).prop_map(|fields| {
        let body: Vec<String> = fields
            .into_iter()
            .map(|(k, v, nest)| {
                if nest {
                    format!("{k}:[{v},{{\"n\":{v}}}]")
                } else {
                    format!("{k}:{v}")
                }
            })
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Object text is accepted exactly when it reads back as a JSON object, so
    /// what ingest acknowledges the projector can always fold; a refusal
    /// names the field. Covers what `RawValue` accepts but a `Value` does not.
    #[test]
    fn object_fields_are_accepted_iff_they_read_back(text in object_text()) {
        let readable = serde_json::from_str::<Map<String, Value>>(&text).is_ok();
        let body = format!(r#"{{"userId":"u","event":"e","properties":{text}}}"#);
        let raw = parse_single(body.as_bytes(), &Limits::default())
            .map_err(|e| TestCaseError::fail(format!("{body}: {e:?}")))?;
        match raw.normalise(EventType::Track, &meta(), &mut new_ids()) {
            Ok(ev) => {
                prop_assert!(readable, "accepted {}", text);
                prop_assert_eq!(ev.properties.as_deref(), Some(text.as_str()));
            }
            Err(e) => {
                prop_assert!(!readable, "refused readable {}: {:?}", text, e);
                prop_assert_eq!(e.field.as_deref(), Some("properties"));
            }
        }
        // The same text as a batch-level context, which is merged, not copied.
        let batch = format!(r#"{{"batch":[{{"type":"track","userId":"u","event":"e"}}],"context":{text}}}"#);
        match parse_batch(batch.as_bytes(), &Limits::default()) {
            Ok(_) => prop_assert!(readable, "accepted context {}", text),
            Err(e) => {
                prop_assert!(!readable, "refused readable context {}: {:?}", text, e);
                prop_assert_eq!(e.field.as_deref(), Some("context"));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&body, &Limits::default())?;
        exercise(&body, &small_limits())?;
    }

    #[test]
    fn damaged_json_never_panics(body in damaged()) {
        exercise(&body, &Limits::default())?;
        exercise(&body, &small_limits())?;
    }

    #[test]
    fn arbitrary_json_never_panics(v in prop_oneof![json(), message(), batch()]) {
        let body = serde_json::to_vec(&v).unwrap();
        exercise(&body, &Limits::default())?;
        exercise(&body, &small_limits())?;
        // The same value as one batch item.
        let wrapped = serde_json::to_vec(&json!({"batch": [v]})).unwrap();
        exercise(&wrapped, &Limits::default())?;
    }

    /// A valid batch with k bad items yields exactly those k rejections, by
    /// index, each naming its `messageId` and field; the good items all pass,
    /// in order.
    #[test]
    fn exactly_the_bad_items_are_rejected(
        good in prop::collection::vec(good_item(), 1..12),
        bad in prop::collection::vec((prop::sample::select(BAD.to_vec()), any::<prop::sample::Index>()), 0..6),
        shared_context in any::<bool>(),
        shared_sent_at in any::<bool>(),
    ) {
        let mut items: Vec<(Value, Option<BadItem>)> = good
            .into_iter()
            .enumerate()
            .map(|(i, mut v)| {
                v["messageId"] = json!(format!("good-{i}"));
                (v, None)
            })
            .collect();
        for (j, (kind, at)) in bad.iter().enumerate() {
            let (v, field) = kind.item(&format!("bad-{j}"));
            let slot = at.index(items.len() + 1);
            items.insert(slot, (v, Some((*kind, field))));
        }
        let mut body = Map::new();
        body.insert("batch".into(), Value::Array(items.iter().map(|(v, _)| v.clone()).collect()));
        if shared_context {
            body.insert("context".into(), json!({"library": {"name": "analytics-node"}}));
            body.insert("integrations".into(), json!({"All": true}));
        }
        if shared_sent_at {
            body.insert("sentAt".into(), json!("2024-05-01T12:00:00.000Z"));
        }
        let body = serde_json::to_vec(&Value::Object(body)).unwrap();

        let limits = Limits::default();
        let raw = parse_batch(&body, &limits).expect("a valid batch envelope parses");
        prop_assert_eq!(raw.len(), items.len());
        let parsed = raw.normalise(&meta(), &limits, &mut new_ids());

        let expected_bad: Vec<usize> =
            items.iter().enumerate().filter(|(_, (_, b))| b.is_some()).map(|(i, _)| i).collect();
        let got_bad: Vec<usize> = parsed.rejected.iter().map(|r| r.index).collect();
        prop_assert_eq!(got_bad, expected_bad);

        let expected_good: Vec<&str> = items
            .iter()
            .filter(|(_, b)| b.is_none())
            .map(|(v, _)| v["messageId"].as_str().unwrap())
            .collect();
        let got_good: Vec<&str> = parsed.events.iter().map(|e| e.message_id.as_str()).collect();
        prop_assert_eq!(got_good, expected_good);
        for ev in &parsed.events {
            check_event(ev, ev.kind)?;
            if shared_context {
                let ctx: Value = serde_json::from_str(ev.context.as_deref().unwrap()).unwrap();
                prop_assert_eq!(&ctx["library"]["name"], "analytics-node");
            }
        }

        for r in &parsed.rejected {
            let (v, bad) = &items[r.index];
            let (kind, field) = bad.expect("rejected items are bad ones");
            prop_assert_eq!(r.error.field.as_deref(), field, "{:?}: {}", kind, r.error);
            prop_assert_eq!(r.error.too_large, matches!(kind, Bad::TooLarge), "{:?}", kind);
            let readable_id = v.get("messageId").and_then(Value::as_str);
            prop_assert_eq!(r.message_id.as_deref(), readable_id, "{:?}", kind);
        }
    }
}

/// Clock-skew correction subtracts `sentAt - originalTimestamp` from
/// `receivedAt`. `time::parse_micros` accepts chrono's signed extended years
/// (`+262142-12-31T00:00:00`) when the timestamp has no offset, and the
/// difference of two such times does not fit in an `i64`: the subtraction in
/// `RawMessage::normalise_with` panics in debug builds and wraps in release.
/// The parser bounds timestamps to years 1 to 9999.
#[test]
fn extended_year_timestamps_do_not_overflow_skew_correction() {
    let body = br#"{"userId":"u","event":"e","originalTimestamp":"-262143-01-01T00:00:00","sentAt":"+262142-12-31T00:00:00"}"#;
    let raw = parse_single(body, &Limits::default()).unwrap();
    let outcome =
        std::panic::catch_unwind(|| raw.normalise(EventType::Track, &meta(), &mut new_ids()));
    let result = outcome.expect("normalise must not panic");
    if let Ok(ev) = result {
        assert!(ev.timestamp <= ev.received_at);
    }
}

/// `RawMessage` and the batch envelope derive `Deserialize`, and serde's
/// derived structs also accept a JSON array, read positionally. So a
/// 17-element array is accepted as a track event, and a 5-element array as a
/// batch envelope, although Segment's API (and this parser's docs) accept only
/// objects. The parser now refuses non-objects up front.
#[test]
fn arrays_are_not_messages() {
    let item = r#"["track","u1",null,"m1",null,null,null,null,null,"Clicked",null,null,null,null,null,null,null]"#;
    let limits = Limits::default();
    if let Ok(raw) = parse_single(item.as_bytes(), &limits) {
        let single = raw.normalise(EventType::Track, &meta(), &mut new_ids());
        assert!(single.is_err(), "an array body was accepted: {single:?}");
    }
    let batch = format!(r#"{{"batch":[{item}]}}"#);
    let parsed =
        parse_batch(batch.as_bytes(), &limits)
            .unwrap()
            .normalise(&meta(), &limits, &mut new_ids());
    assert!(parsed.events.is_empty(), "an array item was accepted");
    let envelope = format!(r#"[[{item}],null,null,null,null]"#);
    assert!(
        parse_batch(envelope.as_bytes(), &limits).is_err(),
        "an array envelope was accepted"
    );
}

/// `properties`, `traits`, `context` and `integrations` are kept as their raw
/// JSON text when there is no batch-level object to merge, and serde_json's
/// `RawValue` does not decode string escapes, so a lone UTF-16 surrogate
/// escape (`"\ud800"`) inside them is accepted. The stored text then fails to
/// parse as a JSON object anywhere downstream: `profile::project` silently
/// drops that event's `context.traits` and `context.externalIds` (losing
/// identity links), and `Event::to_api_json` shows `{}`. With a batch-level
/// `context` the same item is rejected, because the merge parses it. Found by
/// the `ingest_parser` fuzz target. The parser now refuses unpaired surrogate
/// escapes in these objects.
#[test]
fn accepted_objects_parse_as_json_objects() {
    for body in [
        r#"{"userId":"u","event":"e","context":{"traits":{"email":"a@b.c"},"k\ud800":1}}"#,
        r#"{"userId":"u","event":"e","properties":{"v":"\udfff"}}"#,
    ] {
        let raw = parse_single(body.as_bytes(), &Limits::default()).unwrap();
        if let Ok(ev) = raw.normalise(EventType::Track, &meta(), &mut new_ids()) {
            assert!(is_object_text(&ev.context), "context {:?}", ev.context);
            assert!(
                is_object_text(&ev.properties),
                "properties {:?}",
                ev.properties
            );
        }
    }
}
