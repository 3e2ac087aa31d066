use super::*;

fn meta() -> RequestMeta<'static> {
    RequestMeta {
        workspace_id: "ws",
        source_id: "src",
        received_at: 1_700_000_000_000_000,
        request_ip: None,
    }
}

fn ids() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("gen-{n}")
    }
}

fn single(kind: EventType, body: &str) -> Result<Event, ValidationError> {
    let raw = parse_single(body.as_bytes(), &Limits::default())?;
    raw.normalise(kind, &meta(), &mut ids())
}

#[test]
fn track_is_normalised() {
    let ev = single(
        EventType::Track,
        r#"{"userId":"u1","event":"Signed Up","properties":{"plan":"pro"},"messageId":"m1"}"#,
    )
    .unwrap();
    assert_eq!(ev.user_id.as_deref(), Some("u1"));
    assert_eq!(ev.event.as_deref(), Some("Signed Up"));
    assert_eq!(ev.properties.as_deref(), Some(r#"{"plan":"pro"}"#));
    assert_eq!(ev.message_id, "m1");
    assert_eq!(ev.timestamp, meta().received_at);
}

#[test]
fn numeric_user_id_is_coerced() {
    let ev = single(EventType::Identify, r#"{"userId":42}"#).unwrap();
    assert_eq!(ev.user_id.as_deref(), Some("42"));
    assert_eq!(ev.message_id, "gen-1");
}

#[test]
fn missing_identity_names_user_id() {
    let err = single(EventType::Track, r#"{"event":"x"}"#).unwrap_err();
    assert_eq!(err.code, "missing_identity");
    assert_eq!(err.field.as_deref(), Some("userId"));
}

#[test]
fn wrong_types_name_their_field() {
    let err = single(
        EventType::Track,
        r#"{"userId":"u","event":"x","properties":[1]}"#,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("properties"));
    let err = single(EventType::Track, r#"{"userId":"u","event":7}"#).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("event"));
    let err = single(EventType::Track, r#"{"userId":{},"event":"e"}"#).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("userId"));
    let err = single(
        EventType::Track,
        r#"{"userId":"u","event":"e","timestamp":"nope"}"#,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("timestamp"));
}

#[test]
fn message_id_is_limited() {
    let long = "m".repeat(101);
    let err = single(
        EventType::Track,
        &format!(r#"{{"userId":"u","event":"e","messageId":"{long}"}}"#),
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("messageId"));
}

#[test]
fn per_type_requirements() {
    assert_eq!(
        single(EventType::Group, r#"{"userId":"u"}"#)
            .unwrap_err()
            .field
            .as_deref(),
        Some("groupId")
    );
    assert_eq!(
        single(EventType::Alias, r#"{"userId":"u"}"#)
            .unwrap_err()
            .field
            .as_deref(),
        Some("previousId")
    );
    assert_eq!(
        single(EventType::Alias, r#"{"anonymousId":"a","previousId":"p"}"#)
            .unwrap_err()
            .field
            .as_deref(),
        Some("userId")
    );
    assert!(single(EventType::Page, r#"{"anonymousId":"a","name":"Home"}"#).is_ok());
}

#[test]
fn clock_skew_is_corrected() {
    // The client clock is an hour fast; the call was made 2 s before sending.
    let ev = single(
        EventType::Track,
        r#"{"userId":"u","event":"e","originalTimestamp":"2030-01-01T01:00:00Z","sentAt":"2030-01-01T01:00:02Z"}"#,
    )
    .unwrap();
    assert_eq!(ev.timestamp, meta().received_at - 2_000_000);
    // An explicit timestamp without sentAt is an import and kept.
    let ev = single(
        EventType::Track,
        r#"{"userId":"u","event":"e","timestamp":"2020-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(ev.timestamp, parse_micros("2020-01-01T00:00:00Z").unwrap());
}

#[test]
fn batch_merges_context_and_isolates_bad_items() {
    let body = r#"{
        "context": {"library": {"name": "x"}, "ip": "1.2.3.4"},
        "integrations": {"All": true},
        "batch": [
            {"type":"track","userId":"u","event":"ok","context":{"ip":"5.6.7.8"}},
            {"type":"track","event":"no identity","messageId":"bad-1"},
            {"type":"nope","userId":"u"},
            "not an object",
            {"type":"identify","anonymousId":"a","traits":{"email":"a@b.c"}}
        ]}"#;
    let raw = parse_batch(body.as_bytes(), &Limits::default()).unwrap();
    let parsed = raw.normalise(&meta(), &Limits::default(), &mut ids());
    assert_eq!(parsed.events.len(), 2);
    let ctx: Value = serde_json::from_str(parsed.events[0].context.as_deref().unwrap()).unwrap();
    assert_eq!(ctx["ip"], "5.6.7.8");
    assert_eq!(ctx["library"]["name"], "x");
    assert_eq!(
        parsed.events[1].integrations.as_deref(),
        Some(r#"{"All":true}"#)
    );
    let rejected: Vec<_> = parsed.rejected.iter().map(|r| r.index).collect();
    assert_eq!(rejected, vec![1, 2, 3]);
    assert_eq!(parsed.rejected[0].message_id.as_deref(), Some("bad-1"));
    assert_eq!(parsed.rejected[1].error.field.as_deref(), Some("type"));
}

#[test]
fn lone_surrogates_are_found() {
    let lone = |t: &str| unreadable(t).is_some();
    assert!(!lone(r#"{"a":"\ud83d\ude00 ok \\ud800 \n"}"#));
    assert!(lone(r#"{"a":"\ud800"}"#));
    assert!(lone(r#"{"a":"\udc00\ud800"}"#));
    assert!(lone(r#"{"a":"\ud800\u0041"}"#));
    assert!(
        single(
            EventType::Track,
            r#"{"userId":"u","event":"e","properties":{"v":"\udfff"}}"#
        )
        .is_err()
    );
}

/// Found by `cargo fuzz` (ingest_parser): `{"employees":3291e999}` passed
/// as object text, then failed to decode in the projector, which dropped
/// every trait of an acknowledged event.
#[test]
fn numbers_beyond_a_double_are_rejected_with_the_field() {
    let cases = [
        (
            EventType::Identify,
            "traits",
            r#""traits":{"name":"Initech","employees":3291e999}"#,
        ),
        (
            EventType::Track,
            "properties",
            r#""properties":{"a":[1,{"b":-1E+400}]}"#,
        ),
        (EventType::Group, "context", r#""context":{"n":1e309}"#),
        (
            EventType::Track,
            "integrations",
            r#""integrations":{"x":-2.5e99999}"#,
        ),
    ];
    for (kind, field, part) in cases {
        let body = format!(r#"{{"userId":"u","event":"e","groupId":"g",{part}}}"#);
        let err = single(kind, &body).unwrap_err();
        assert_eq!(err.field.as_deref(), Some(field), "{body}");
        assert!(err.message.contains("outside the range"), "{}", err.message);
    }
    let long = format!(
        r#"{{"userId":"u","event":"e","properties":{{"n":{}}}}}"#,
        "9".repeat(310)
    );
    assert!(single(EventType::Track, &long).is_err());
    // In range, underflowing to zero, or only looking like a number: kept.
    let fine = format!(
        r#"{{"userId":"u","event":"e","properties":{{"a":1.7e308,"b":1e-999,"c":0e99999,"d":"1e999","e":{}}}}}"#,
        "9".repeat(300)
    );
    let ev = single(EventType::Track, &fine).unwrap();
    let props: Map<String, Value> =
        serde_json::from_str(ev.properties.as_deref().unwrap()).unwrap();
    assert_eq!(props["d"], "1e999");
    // The batch-level context is held to the same rule, and named.
    let raw = br#"{"batch":[{"type":"track","userId":"u","event":"e"}],"context":{"n":1e999}}"#;
    let err = parse_batch(raw, &Limits::default()).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("context"));
    assert!(err.message.contains("outside the range"));
}

#[test]
fn arrays_are_not_messages() {
    let limits = Limits::default();
    assert!(parse_single(br#"["track","u"]"#, &limits).is_err());
    assert!(parse_batch(br#"[[{"type":"track"}]]"#, &limits).is_err());
    let raw = parse_batch(br#"{"batch":[["track","u1"]]}"#, &limits).unwrap();
    assert_eq!(
        raw.normalise(&meta(), &limits, &mut ids()).rejected.len(),
        1
    );
}

#[test]
fn batch_limits() {
    let limits = Limits {
        max_event_bytes: 100,
        max_batch_bytes: 1_000,
        max_batch_events: 2,
    };
    let three = r#"{"batch":[{"type":"track"},{"type":"track"},{"type":"track"}]}"#;
    assert!(
        parse_batch(three.as_bytes(), &limits)
            .unwrap_err()
            .too_large
    );
    let big = format!(
        r#"{{"batch":[{{"type":"track","userId":"u","event":"{}"}}]}}"#,
        "x".repeat(200)
    );
    let raw = parse_batch(big.as_bytes(), &limits).unwrap();
    let parsed = raw.normalise(&meta(), &limits, &mut ids());
    assert!(parsed.rejected[0].error.too_large);
    assert!(
        parse_batch("x".repeat(1_001).as_bytes(), &limits)
            .unwrap_err()
            .too_large
    );
    assert_eq!(
        parse_batch(br#"{"batch":[]}"#, &limits)
            .unwrap_err()
            .field
            .as_deref(),
        Some("batch")
    );
}

/// Real SDKs repeat keys (the Rust `segment` crate repeats `userId`,
/// `rudderanalytics` repeats `type`): the last one wins, as in `JSON.parse`.
#[test]
fn repeated_keys_keep_the_last_value() {
    let ev = single(
        EventType::Track,
        r#"{"anonymousId":"x1","event":"E","anonymousId":"x2","userId":null,"userId":"u"}"#,
    )
    .unwrap();
    assert_eq!(ev.anonymous_id.as_deref(), Some("x2"));
    assert_eq!(ev.user_id.as_deref(), Some("u"));
    let body = br#"{"batch":[{"type":"nope","userId":"u","event":"E","type":"track"}],
        "batch":[{"type":"page","type":"track","anonymousId":"a","event":"E","type":"identify"}],
        "sentAt":"nope","sentAt":null}"#;
    let raw = parse_batch(body, &Limits::default()).unwrap();
    let parsed = raw.normalise(&meta(), &Limits::default(), &mut ids());
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    assert_eq!(parsed.events.len(), 1);
    assert_eq!(parsed.events[0].kind, EventType::Identify);
    // Nested objects are kept verbatim; a reader of the JSON takes the last.
    let ev = single(
        EventType::Track,
        r#"{"userId":"u","event":"E","properties":{"a":1,"a":2}}"#,
    )
    .unwrap();
    let props: Map<String, Value> =
        serde_json::from_str(ev.properties.as_deref().unwrap()).unwrap();
    assert_eq!(props["a"], 2);
}

/// A refused item says why, never "not a json object" for an object.
#[test]
fn a_refused_item_names_the_real_reason() {
    let body = format!(
        r#"{{"batch":[{{"type":"track","userId":"u","event":"E","event":"F","properties":{}}},{{"type":"track","userId":"u","event":"E","unknown":{}1{}}}]}}"#,
        nested(MAX_DEPTH + 1),
        "[".repeat(200),
        "]".repeat(200)
    );
    let raw = parse_batch(body.as_bytes(), &Limits::default()).unwrap();
    let parsed = raw.normalise(&meta(), &Limits::default(), &mut ids());
    let error = &parsed.rejected[0].error;
    assert_eq!(error.field.as_deref(), Some("properties"));
    assert!(error.message.contains("nesting"), "{}", error.message);
    // Unknown fields are skipped, however deep: nothing stores them.
    assert_eq!(parsed.events.len(), 1);
    assert_eq!(parsed.events[0].event.as_deref(), Some("E"));
}

fn nested(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

#[test]
fn nesting_deeper_than_the_limit_is_refused_naming_the_field() {
    assert!(
        single(
            EventType::Track,
            &format!(
                r#"{{"userId":"u","event":"E","properties":{}}}"#,
                nested(MAX_DEPTH)
            )
        )
        .is_ok()
    );
    for (kind, field) in [
        (EventType::Track, "properties"),
        (EventType::Identify, "traits"),
        (EventType::Track, "context"),
        (EventType::Track, "integrations"),
    ] {
        let body = format!(
            r#"{{"userId":"u","event":"E","{field}":{}}}"#,
            nested(MAX_DEPTH + 1)
        );
        let err = single(kind, &body).unwrap_err();
        assert_eq!(err.code, "too_deep");
        assert_eq!(err.field.as_deref(), Some(field), "{body}");
        assert!(err.message.contains("64 levels"), "{}", err.message);
    }
    // Traits 200 deep, once silently dropped by the fold, are refused.
    let body = format!(r#"{{"userId":"u","traits":{}}}"#, nested(200));
    assert_eq!(
        single(EventType::Identify, &body)
            .unwrap_err()
            .field
            .as_deref(),
        Some("traits")
    );
    // The batch-level context too, and an item's own merged with it.
    let body = format!(
        r#"{{"batch":[{{"type":"track","userId":"u","event":"E","context":{}}}],"context":{{"ip":"1"}}}}"#,
        nested(MAX_DEPTH + 1)
    );
    let raw = parse_batch(body.as_bytes(), &Limits::default()).unwrap();
    let parsed = raw.normalise(&meta(), &Limits::default(), &mut ids());
    assert_eq!(parsed.rejected[0].error.field.as_deref(), Some("context"));
    let body = format!(
        r#"{{"batch":[{{"type":"track","userId":"u","event":"E"}}],"context":{}}}"#,
        nested(MAX_DEPTH + 1)
    );
    assert_eq!(
        parse_batch(body.as_bytes(), &Limits::default())
            .unwrap_err()
            .field
            .as_deref(),
        Some("context")
    );
}

fn with_external_ids(ids: &str) -> Result<Event, ValidationError> {
    single(
        EventType::Track,
        &format!(r#"{{"userId":"u","event":"E","context":{{"externalIds":{ids}}}}}"#),
    )
}

#[test]
fn external_ids_are_checked_at_ingest() {
    assert!(with_external_ids(r#"[{"type":"ga_client_id","id":"1.2"},{"type":"ios.idfa","id":7,"collection":"users"}]"#).is_ok());
    let field = |ids: &str| with_external_ids(ids).unwrap_err().field.unwrap();
    assert_eq!(
        field(r#"[{"type":"user_id\u0000alice","id":"X"}]"#),
        "context.externalIds[0].type"
    );
    assert_eq!(
        field(r#"[{"type":"ok","id":"X"},{"type":"Stripe","id":"X"}]"#),
        "context.externalIds[1].type"
    );
    assert_eq!(
        field(r#"[{"type":"a:b","id":"X"}]"#),
        "context.externalIds[0].type"
    );
    assert_eq!(
        field(&format!(r#"[{{"type":"{}","id":"X"}}]"#, "t".repeat(65))),
        "context.externalIds[0].type"
    );
    assert_eq!(
        field(r#"[{"type":"t","id":""}]"#),
        "context.externalIds[0].id"
    );
    assert_eq!(
        field(r#"[{"type":"t","id":"a\u0000b"}]"#),
        "context.externalIds[0].id"
    );
    assert_eq!(field(r#"[{"type":"t"}]"#), "context.externalIds[0].id");
    assert_eq!(field(r#"{"type":"t","id":"x"}"#), "context.externalIds");
    let many: Vec<String> = (0..=MAX_EXTERNAL_IDS)
        .map(|i| format!(r#"{{"type":"t","id":"{i}"}}"#))
        .collect();
    assert_eq!(
        field(&format!("[{}]", many.join(","))),
        "context.externalIds"
    );
    // A key spelled with an escape is the same key.
    let err = single(
        EventType::Track,
        r#"{"userId":"u","event":"E","context":{"external\u0049ds":[{"type":"A","id":"X"}]}}"#,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("context.externalIds[0].type"));
}

#[test]
fn implausible_times_are_replaced_by_the_time_of_receipt() {
    let received = meta().received_at;
    // Pinned in the far future without sentAt: replaced, the claim kept.
    let ev = single(
        EventType::Identify,
        r#"{"userId":"u","timestamp":"9999-12-31T23:59:59Z"}"#,
    )
    .unwrap();
    assert_eq!(ev.timestamp, received);
    assert_eq!(ev.original_timestamp, parse_micros("9999-12-31T23:59:59Z"));
    // A sentAt far ahead of originalTimestamp would correct into year -7973.
    let ev = single(
        EventType::Track,
        r#"{"userId":"u","event":"E","originalTimestamp":"0001-01-01T00:00:00Z","sentAt":"9999-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(ev.timestamp, received);
    assert_eq!(ev.original_timestamp, parse_micros("0001-01-01T00:00:00Z"));
    // Before 2000: a clock never set.
    let ev = single(
        EventType::Track,
        r#"{"userId":"u","event":"E","timestamp":"1970-01-01T00:00:01Z"}"#,
    )
    .unwrap();
    assert_eq!(ev.timestamp, received);
    // Within a day ahead: a fast clock, kept.
    let soon = received + 23 * 3_600 * 1_000_000;
    let body = format!(
        r#"{{"userId":"u","event":"E","timestamp":"{}"}}"#,
        crate::time::format_micros(soon)
    );
    assert_eq!(single(EventType::Track, &body).unwrap().timestamp, soon);
    // Historical imports keep their times.
    for t in ["2000-01-01T00:00:00Z", "2015-06-01T12:00:00Z"] {
        let body = format!(
            r#"{{"batch":[{{"type":"track","userId":"u","event":"E","timestamp":"{t}"}}]}}"#
        );
        let raw = parse_batch(body.as_bytes(), &Limits::default()).unwrap();
        let parsed = raw.normalise(&meta(), &Limits::default(), &mut ids());
        assert_eq!(parsed.events[0].timestamp, parse_micros(t).unwrap());
        assert_eq!(parsed.events[0].original_timestamp, None);
    }
}
