//! The Segment HTTP Tracking API parser and normaliser.
//!
//! Parsing happens in two steps so that a `writeKey` carried in the body (the
//! `navigator.sendBeacon` case, which cannot set headers) can authenticate the
//! request before any event is built:
//!
//! 1. [`parse_single`] / [`parse_batch`] read the envelope, borrowing from the
//!    request body. Every field is captured as raw JSON so that a wrong type is
//!    reported against the field that has it.
//! 2. [`RawMessage::normalise`] validates one message and builds an [`Event`]:
//!    it assigns a `messageId` when missing, stamps `receivedAt` and corrects
//!    client clock skew.
//!
//! A batch is split into items first; one bad item is reported by index and
//! `messageId` and never sinks the others.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::{Event, EventType};
use crate::time::parse_micros;

/// Size limits, applied to the decompressed body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest single event, in bytes (Segment: 32 KB).
    pub max_event_bytes: usize,
    /// The largest batch body, in bytes (Segment: 500 KB).
    pub max_batch_bytes: usize,
    /// The most events in one batch.
    pub max_batch_events: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 32 * 1024,
            max_batch_bytes: 500 * 1024,
            max_batch_events: 2_500,
        }
    }
}

/// The longest `messageId` accepted.
pub const MAX_MESSAGE_ID_CHARS: usize = 100;
/// The longest identifier (`userId`, `anonymousId`, `groupId`, `previousId`) accepted.
pub const MAX_ID_CHARS: usize = 1_024;

/// Why a request or one item of it was refused. `field` names the offending
/// field in the request's own camelCase spelling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// A stable machine-readable code, such as `invalid_field`.
    pub code: &'static str,
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// A human-readable reason, lowercase.
    pub message: String,
    /// Whether the fault is size (HTTP 413) rather than shape (HTTP 400).
    pub too_large: bool,
}

impl ValidationError {
    fn field(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            field: Some(field.to_owned()),
            message: message.into(),
            too_large: false,
        }
    }

    fn invalid_json(err: &serde_json::Error) -> Self {
        Self {
            code: "invalid_json",
            field: None,
            message: format!("body is not valid json: {err}"),
            too_large: false,
        }
    }

    fn too_large(field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            code: "too_large",
            field: field.map(str::to_owned),
            message: message.into(),
            too_large: true,
        }
    }
}

/// What the server knows about a request, independent of its body.
#[derive(Debug, Clone)]
pub struct RequestMeta<'a> {
    /// The workspace the write key belongs to.
    pub workspace_id: &'a str,
    /// The source the write key belongs to.
    pub source_id: &'a str,
    /// When the request arrived, microseconds since the epoch.
    pub received_at: i64,
    /// The client address, if known.
    pub request_ip: Option<&'a str>,
}

/// One message, every field still raw JSON borrowed from the body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawMessage<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    original_timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    category: Option<&'a RawValue>,
    #[serde(borrow)]
    group_id: Option<&'a RawValue>,
    #[serde(borrow)]
    previous_id: Option<&'a RawValue>,
    #[serde(borrow)]
    write_key: Option<&'a RawValue>,
}

/// A batch envelope, items still unparsed: one pass over the body splits it
/// into the shared fields and the raw items.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBatchEnvelope<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
    #[serde(borrow)]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow)]
    write_key: Option<&'a RawValue>,
}

/// A parsed batch body: the shared fields and the raw items.
#[derive(Debug)]
pub struct RawBatch<'a> {
    /// The `writeKey` found in the body, if any.
    pub write_key: Option<String>,
    items: Vec<&'a RawValue>,
    context: Option<Map<String, Value>>,
    integrations: Option<Map<String, Value>>,
    sent_at: Option<&'a RawValue>,
}

/// One refused batch item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedItem {
    /// The item's position in the batch.
    pub index: usize,
    /// The item's `messageId`, when it had a readable one.
    pub message_id: Option<String>,
    /// Why it was refused.
    pub error: ValidationError,
}

/// The outcome of normalising a batch.
#[derive(Debug, Default)]
pub struct ParsedBatch {
    /// The items that passed, in batch order.
    pub events: Vec<Event>,
    /// The items that did not.
    pub rejected: Vec<RejectedItem>,
}

/// Parses the body of a single-event call (`/v1/track` and friends).
pub fn parse_single<'a>(
    body: &'a [u8],
    limits: &Limits,
) -> Result<RawMessage<'a>, ValidationError> {
    if body.len() > limits.max_event_bytes {
        return Err(ValidationError::too_large(
            None,
            format!(
                "event is {} bytes, more than the limit of {}",
                body.len(),
                limits.max_event_bytes
            ),
        ));
    }
    if !starts_object(body) {
        return Err(not_an_object("body"));
    }
    serde_json::from_slice(body).map_err(|e| ValidationError::invalid_json(&e))
}

/// Whether JSON text opens an object. Serde would also read an array into a
/// struct, field by position; Segment's API takes objects only.
fn starts_object(text: &[u8]) -> bool {
    text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn not_an_object(what: &str) -> ValidationError {
    ValidationError {
        code: if what == "body" {
            "invalid_json"
        } else {
            "invalid_event"
        },
        field: None,
        message: format!("{what} must be a json object"),
        too_large: false,
    }
}

/// Parses the body of `/v1/batch` (or `/v1/import`).
pub fn parse_batch<'a>(body: &'a [u8], limits: &Limits) -> Result<RawBatch<'a>, ValidationError> {
    if body.len() > limits.max_batch_bytes {
        return Err(ValidationError::too_large(
            None,
            format!(
                "batch is {} bytes, more than the limit of {}",
                body.len(),
                limits.max_batch_bytes
            ),
        ));
    }
    if !starts_object(body) {
        return Err(not_an_object("body"));
    }
    let env: RawBatchEnvelope<'a> = match serde_json::from_slice(body) {
        Ok(env) => env,
        Err(e) => {
            // Slow path, only for bad requests: tell "not json" apart from
            // "batch is not an array".
            #[derive(Deserialize)]
            struct Loose<'b> {
                #[serde(borrow)]
                #[allow(dead_code)]
                batch: Option<&'b RawValue>,
            }
            return Err(match serde_json::from_slice::<Loose<'_>>(body) {
                Ok(_) => ValidationError::field(
                    "invalid_field",
                    "batch",
                    "batch must be an array of events",
                ),
                Err(_) => ValidationError::invalid_json(&e),
            });
        }
    };
    let items = env
        .batch
        .ok_or_else(|| ValidationError::field("missing_field", "batch", "batch is required"))?;
    if items.is_empty() {
        return Err(ValidationError::field(
            "invalid_field",
            "batch",
            "batch must hold at least one event",
        ));
    }
    if items.len() > limits.max_batch_events {
        return Err(ValidationError::too_large(
            Some("batch"),
            format!(
                "batch holds {} events, more than the limit of {}",
                items.len(),
                limits.max_batch_events
            ),
        ));
    }
    Ok(RawBatch {
        write_key: opt_string(env.write_key, "writeKey")?.map(Cow::into_owned),
        items,
        context: opt_object(env.context, "context")?,
        integrations: opt_object(env.integrations, "integrations")?,
        sent_at: env.sent_at,
    })
}

impl RawBatch<'_> {
    /// How many items the batch holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no items (never true after [`parse_batch`]).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Validates and normalises every item, merging the batch-level `context`
    /// and `integrations` into each (the item's own keys win).
    pub fn normalise(
        &self,
        meta: &RequestMeta<'_>,
        limits: &Limits,
        new_message_id: &mut dyn FnMut() -> String,
    ) -> ParsedBatch {
        let mut out = ParsedBatch {
            events: Vec::with_capacity(self.items.len()),
            rejected: Vec::new(),
        };
        for (index, item) in self.items.iter().enumerate() {
            match self.normalise_item(item, meta, limits, new_message_id) {
                Ok(ev) => out.events.push(ev),
                Err((message_id, error)) => out.rejected.push(RejectedItem {
                    index,
                    message_id,
                    error,
                }),
            }
        }
        out
    }

    fn normalise_item(
        &self,
        item: &RawValue,
        meta: &RequestMeta<'_>,
        limits: &Limits,
        new_message_id: &mut dyn FnMut() -> String,
    ) -> Result<Event, (Option<String>, ValidationError)> {
        let text = item.get();
        if !starts_object(text.as_bytes()) {
            return Err((None, not_an_object("batch item")));
        }
        let mut msg: RawMessage<'_> = serde_json::from_str(text).map_err(|e| {
            (
                None,
                ValidationError {
                    code: "invalid_event",
                    field: None,
                    message: format!("batch item is not a json object: {e}"),
                    too_large: false,
                },
            )
        })?;
        let message_id = msg
            .message_id
            .and_then(|m| serde_json::from_str::<Cow<'_, str>>(m.get()).ok())
            .map(Cow::into_owned);
        if text.len() > limits.max_event_bytes {
            return Err((
                message_id,
                ValidationError::too_large(
                    None,
                    format!(
                        "event is {} bytes, more than the limit of {}",
                        text.len(),
                        limits.max_event_bytes
                    ),
                ),
            ));
        }
        let kind = match opt_string(msg.kind, "type") {
            Ok(Some(t)) => match EventType::from_wire(&t) {
                Some(k) => k,
                None => {
                    return Err((
                        message_id,
                        ValidationError::field(
                            "invalid_field",
                            "type",
                            format!(
                                "type {t:?} is not one of track, identify, page, screen, group, alias"
                            ),
                        ),
                    ));
                }
            },
            Ok(None) => {
                return Err((
                    message_id,
                    ValidationError::field("missing_field", "type", "type is required in a batch"),
                ));
            }
            Err(e) => return Err((message_id, e)),
        };
        if msg.sent_at.is_none() {
            msg.sent_at = self.sent_at;
        }
        msg.normalise_with(
            kind,
            meta,
            self.context.as_ref(),
            self.integrations.as_ref(),
            new_message_id,
        )
        .map_err(|e| (message_id, e))
    }
}

impl<'a> RawMessage<'a> {
    /// The `writeKey` found in the body, if any.
    pub fn write_key(&self) -> Result<Option<Cow<'a, str>>, ValidationError> {
        opt_string(self.write_key, "writeKey")
    }

    /// Validates this message as a call of type `kind` and builds the event.
    pub fn normalise(
        self,
        kind: EventType,
        meta: &RequestMeta<'_>,
        new_message_id: &mut dyn FnMut() -> String,
    ) -> Result<Event, ValidationError> {
        self.normalise_with(kind, meta, None, None, new_message_id)
    }

    fn normalise_with(
        self,
        kind: EventType,
        meta: &RequestMeta<'_>,
        batch_context: Option<&Map<String, Value>>,
        batch_integrations: Option<&Map<String, Value>>,
        new_message_id: &mut dyn FnMut() -> String,
    ) -> Result<Event, ValidationError> {
        let user_id = opt_id(self.user_id, "userId")?;
        let anonymous_id = opt_id(self.anonymous_id, "anonymousId")?;
        if user_id.is_none() && anonymous_id.is_none() {
            return Err(ValidationError::field(
                "missing_identity",
                "userId",
                "userId or anonymousId is required",
            ));
        }
        let message_id = match opt_string(self.message_id, "messageId")? {
            Some(m) if m.chars().count() > MAX_MESSAGE_ID_CHARS => {
                return Err(ValidationError::field(
                    "invalid_field",
                    "messageId",
                    format!("messageId is longer than {MAX_MESSAGE_ID_CHARS} characters"),
                ));
            }
            Some(m) if !m.is_empty() => m.into_owned(),
            _ => new_message_id(),
        };

        let mut event = None;
        let mut name = None;
        let mut category = None;
        let mut group_id = None;
        let mut previous_id = None;
        match kind {
            EventType::Track => {
                let e = opt_string(self.event, "event")?.filter(|e| !e.trim().is_empty());
                event = Some(
                    e.ok_or_else(|| {
                        ValidationError::field("missing_field", "event", "event is required")
                    })?
                    .into_owned(),
                );
            }
            EventType::Page | EventType::Screen => {
                name = opt_string(self.name, "name")?.map(Cow::into_owned);
                category = opt_string(self.category, "category")?.map(Cow::into_owned);
            }
            EventType::Group => {
                group_id = Some(opt_id(self.group_id, "groupId")?.ok_or_else(|| {
                    ValidationError::field("missing_field", "groupId", "groupId is required")
                })?);
            }
            EventType::Alias => {
                previous_id = Some(opt_id(self.previous_id, "previousId")?.ok_or_else(|| {
                    ValidationError::field("missing_field", "previousId", "previousId is required")
                })?);
                if user_id.is_none() {
                    return Err(ValidationError::field(
                        "missing_field",
                        "userId",
                        "userId is required for alias",
                    ));
                }
            }
            EventType::Identify => {}
        }
        let properties = match kind {
            EventType::Track | EventType::Page | EventType::Screen => {
                object_text(self.properties, "properties")?
            }
            _ => None,
        };
        let traits = match kind {
            EventType::Identify | EventType::Group => object_text(self.traits, "traits")?,
            _ => None,
        };
        let context = merge_object(self.context, batch_context, "context")?;
        let integrations = merge_object(self.integrations, batch_integrations, "integrations")?;

        let explicit_ts = opt_time(self.timestamp, "timestamp")?;
        let original = opt_time(self.original_timestamp, "originalTimestamp")?;
        let sent_at = opt_time(self.sent_at, "sentAt")?;
        let received_at = meta.received_at;
        // Clock-skew correction, as Segment does: the client's clocks may be
        // wrong, but the gap between calling and sending is right, so the event
        // happened that long before we received it. An explicit `timestamp`
        // without `sentAt` is a server-side or historical import, kept as is.
        let original_timestamp = original.or(if sent_at.is_some() { explicit_ts } else { None });
        let timestamp = match (original_timestamp, sent_at, explicit_ts) {
            (Some(orig), Some(sent), _) => received_at - (sent - orig).max(0),
            (_, None, Some(ts)) => ts,
            (Some(orig), None, None) => orig,
            _ => received_at,
        };

        Ok(Event {
            workspace_id: meta.workspace_id.to_owned(),
            source_id: meta.source_id.to_owned(),
            message_id,
            kind,
            user_id,
            anonymous_id,
            event,
            name,
            category,
            group_id,
            previous_id,
            timestamp,
            original_timestamp,
            sent_at,
            received_at,
            properties,
            traits,
            context,
            integrations,
            request_ip: meta.request_ip.map(str::to_owned),
        })
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

fn opt_string<'a>(
    raw: Option<&'a RawValue>,
    field: &str,
) -> Result<Option<Cow<'a, str>>, ValidationError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        Some(r) => serde_json::from_str::<Cow<'a, str>>(r.get())
            .map(Some)
            .map_err(|_| {
                ValidationError::field("invalid_field", field, format!("{field} must be a string"))
            }),
    }
}

/// An identifier field: a string, or a number (which Segment's libraries
/// coerce to a string). Empty strings count as absent.
fn opt_id(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, ValidationError> {
    let Some(r) = raw else { return Ok(None) };
    if is_null(r) {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(r.get())
        .map_err(|e| ValidationError::field("invalid_field", field, format!("{field}: {e}")))?;
    let s = match value {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ValidationError::field(
                "invalid_field",
                field,
                format!("{field} must be a string or a number"),
            ));
        }
    };
    if s.is_empty() {
        return Ok(None);
    }
    if s.chars().count() > MAX_ID_CHARS {
        return Err(ValidationError::field(
            "invalid_field",
            field,
            format!("{field} is longer than {MAX_ID_CHARS} characters"),
        ));
    }
    if s.contains('\0') {
        return Err(ValidationError::field(
            "invalid_field",
            field,
            format!("{field} must not contain a nul character"),
        ));
    }
    Ok(Some(s))
}

fn opt_time(raw: Option<&RawValue>, field: &str) -> Result<Option<i64>, ValidationError> {
    match opt_string(raw, field)? {
        None => Ok(None),
        Some(s) => parse_micros(&s).map(Some).ok_or_else(|| {
            ValidationError::field(
                "invalid_field",
                field,
                format!("{field} is not an iso 8601 timestamp: {s:?}"),
            )
        }),
    }
}

fn not_object(field: &str) -> ValidationError {
    ValidationError::field("invalid_field", field, format!("{field} must be an object"))
}

/// The JSON text of an optional object field, verbatim from the body.
fn object_text(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, ValidationError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        Some(r) if r.get().starts_with('{') => {
            readable(r.get(), field)?;
            Ok(Some(r.get().to_owned()))
        }
        Some(_) => Err(not_object(field)),
    }
}

/// Rejects object text that `RawValue` accepts but that would not decode
/// later, when a projector or the query API reads it back into a `Value`:
/// a lone UTF-16 surrogate escape (`RawValue` checks structure but does not
/// decode escapes), or a number beyond the range of a double, such as
/// `1e999`. Stored as is, either would make the projector drop every trait
/// of the event, not just the bad one, after the event was acknowledged.
fn readable(text: &str, field: &str) -> Result<(), ValidationError> {
    match unreadable(text) {
        None => Ok(()),
        Some(why) => Err(ValidationError::field(
            "invalid_field",
            field,
            format!("{field} holds {why}"),
        )),
    }
}

/// Why well-formed JSON text would not decode into a `Value`, if it would
/// not. One pass over the bytes, skipping string runs with `memchr`; a number
/// is handed to serde_json only when it has an exponent or more than 300
/// characters, the only ones that can fall outside a double's range, so the
/// verdict is serde_json's own.
fn unreadable(text: &str) -> Option<&'static str> {
    fn hex4(b: &[u8]) -> Option<u16> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    }
    const SURROGATE: &str = "an unpaired utf-16 surrogate escape";
    let b = text.as_bytes();
    let mut i = 0;
    let mut in_string = false;
    while i < b.len() {
        if in_string {
            // Skip the plain run of the string at memchr's speed.
            match memchr::memchr2(b'"', b'\\', &b[i..]) {
                Some(n) => i += n,
                None => break,
            }
            if b[i] == b'"' {
                in_string = false;
                i += 1;
                continue;
            }
            match b.get(i + 1) {
                Some(b'u') => {
                    let Some(unit) = hex4(&b[i + 2..]) else {
                        return Some(SURROGATE);
                    };
                    i += 6;
                    match unit {
                        0xD800..=0xDBFF => {
                            let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                                .then(|| hex4(&b[i + 2..]))
                                .flatten();
                            match low {
                                Some(0xDC00..=0xDFFF) => i += 6,
                                _ => return Some(SURROGATE),
                            }
                        }
                        0xDC00..=0xDFFF => return Some(SURROGATE),
                        _ => {}
                    }
                }
                // Any other escape is two bytes; skipping both keeps `\\u` right.
                _ => i += 2,
            }
            continue;
        }
        match b[i] {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut exponent = false;
                while let Some(&c) = b.get(i) {
                    match c {
                        b'e' | b'E' => exponent = true,
                        b'0'..=b'9' | b'-' | b'+' | b'.' => {}
                        _ => break,
                    }
                    i += 1;
                }
                let number = &text[start..i];
                if (exponent || number.len() > 300) && serde_json::from_str::<f64>(number).is_err()
                {
                    return Some("a number outside the range of a double");
                }
            }
            _ => i += 1,
        }
    }
    None
}

fn opt_object(
    raw: Option<&RawValue>,
    field: &str,
) -> Result<Option<Map<String, Value>>, ValidationError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        // Decoding already refuses what `readable` looks for; the scan runs
        // only on failure, to say why.
        Some(r) if r.get().starts_with('{') => serde_json::from_str::<Map<String, Value>>(r.get())
            .map(Some)
            .map_err(|_| {
                readable(r.get(), field)
                    .err()
                    .unwrap_or_else(|| not_object(field))
            }),
        Some(_) => Err(not_object(field)),
    }
}

/// An object field with the batch-level object merged under it; the item's own
/// keys win. Without a batch-level object the item's text is kept verbatim.
fn merge_object(
    raw: Option<&RawValue>,
    shared: Option<&Map<String, Value>>,
    field: &str,
) -> Result<Option<String>, ValidationError> {
    let Some(shared) = shared.filter(|m| !m.is_empty()) else {
        return object_text(raw, field);
    };
    let mut merged = shared.clone();
    if let Some(own) = opt_object(raw, field)? {
        merged.extend(own);
    }
    Ok(Some(Value::Object(merged).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> RequestMeta<'static> {
        RequestMeta {
            workspace_id: "ws",
            source_id: "src",
            received_at: 1_000_000_000_000,
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
        let ctx: Value =
            serde_json::from_str(parsed.events[0].context.as_deref().unwrap()).unwrap();
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
}
