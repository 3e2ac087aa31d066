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
use crate::json::last_wins;
use crate::time::parse_micros;

mod scan;

pub use crate::event::{MAX_EXTERNAL_IDS, MAX_ID_CHARS, MAX_ID_TYPE_CHARS};
pub use scan::MAX_DEPTH;
#[cfg(test)]
use scan::unreadable;
use scan::{Scanned, scan};

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

/// One message, every field still raw JSON borrowed from the body. A
/// repeated key keeps its last value, as `JSON.parse` does.
#[derive(Debug, Default)]
pub struct RawMessage<'a> {
    kind: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    anonymous_id: Option<&'a RawValue>,
    message_id: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    original_timestamp: Option<&'a RawValue>,
    sent_at: Option<&'a RawValue>,
    context: Option<&'a RawValue>,
    integrations: Option<&'a RawValue>,
    event: Option<&'a RawValue>,
    properties: Option<&'a RawValue>,
    traits: Option<&'a RawValue>,
    name: Option<&'a RawValue>,
    category: Option<&'a RawValue>,
    group_id: Option<&'a RawValue>,
    previous_id: Option<&'a RawValue>,
    write_key: Option<&'a RawValue>,
}

last_wins!(RawMessage {
    "type" => kind,
    "userId" => user_id,
    "anonymousId" => anonymous_id,
    "messageId" => message_id,
    "timestamp" => timestamp,
    "originalTimestamp" => original_timestamp,
    "sentAt" => sent_at,
    "context" => context,
    "integrations" => integrations,
    "event" => event,
    "properties" => properties,
    "traits" => traits,
    "name" => name,
    "category" => category,
    "groupId" => group_id,
    "previousId" => previous_id,
    "writeKey" => write_key,
});

/// A batch envelope, items still unparsed: one pass over the body splits it
/// into the shared fields and the raw items.
#[derive(Debug, Default)]
struct RawBatchEnvelope<'a> {
    batch: Option<Vec<&'a RawValue>>,
    context: Option<&'a RawValue>,
    integrations: Option<&'a RawValue>,
    sent_at: Option<&'a RawValue>,
    write_key: Option<&'a RawValue>,
}

last_wins!(RawBatchEnvelope {
    "batch" => batch,
    "context" => context,
    "integrations" => integrations,
    "sentAt" => sent_at,
    "writeKey" => write_key,
});

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
                    message: format!("batch item cannot be read: {e}"),
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
            // `from_wire` never yields it; refused all the same.
            EventType::Control => {
                return Err(ValidationError::field(
                    "invalid_field",
                    "type",
                    "control records are not sent by clients",
                ));
            }
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
        let context = merge_object(self.context, batch_context, "context")?.map(
            |(text, may_name_external_ids)| -> Result<String, ValidationError> {
                if may_name_external_ids {
                    check_external_ids(&text)?;
                }
                Ok(text)
            },
        );
        let context = context.transpose()?;
        let integrations = merge_object(self.integrations, batch_integrations, "integrations")?
            .map(|(text, _)| text);

        let explicit_ts = opt_time(self.timestamp, "timestamp")?;
        let original = opt_time(self.original_timestamp, "originalTimestamp")?;
        let sent_at = opt_time(self.sent_at, "sentAt")?;
        let received_at = meta.received_at;
        // Clock-skew correction, as Segment does: the client's clocks may be
        // wrong, but the gap between calling and sending is right, so the event
        // happened that long before we received it. An explicit `timestamp`
        // without `sentAt` is a server-side or historical import, kept as is.
        let original_timestamp = original.or(if sent_at.is_some() { explicit_ts } else { None });
        let claimed = match (original_timestamp, sent_at, explicit_ts) {
            (Some(orig), Some(sent), _) => received_at - (sent - orig).max(0),
            (_, None, Some(ts)) => ts,
            (Some(orig), None, None) => orig,
            _ => received_at,
        };
        // A time no clock can have read (see `plausible_time`) would pin
        // last-writer-wins traits and `last_seen` for good: it is replaced
        // by the time of receipt, and the client's reading kept beside it.
        let (timestamp, original_timestamp) = if plausible_time(claimed, received_at) {
            (claimed, original_timestamp)
        } else {
            (received_at, original_timestamp.or(Some(claimed)))
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
            blocked_ids: Vec::new(),
            control: None,
        })
    }
}

/// The earliest event time taken as given: 2000-01-01T00:00:00Z. Earlier
/// times are a client's unset clock (1970) or a broken skew correction.
pub const EARLIEST_EVENT_TIME: i64 = 946_684_800_000_000;
/// How far past its receipt an event time may lie: 24 hours, for clients
/// whose clock runs fast and send no `sentAt` to correct it.
pub const MAX_FUTURE_MICROS: i64 = 24 * 3_600 * 1_000_000;

/// Whether an event time is kept: from [`EARLIEST_EVENT_TIME`] to
/// [`MAX_FUTURE_MICROS`] after receipt. Imports of historical data keep
/// their times; anything else is replaced by `receivedAt`.
pub fn plausible_time(time: i64, received_at: i64) -> bool {
    (EARLIEST_EVENT_TIME..=received_at.saturating_add(MAX_FUTURE_MICROS)).contains(&time)
}

/// Refuses a `context.externalIds` the fold could not use: not a list, more
/// than [`MAX_EXTERNAL_IDS`] entries, or an entry without a valid `type` and
/// `id`. Most contexts carry none, so it is called only when the scan of the
/// text found the key, or a `\\u` escape that could spell it.
fn check_external_ids(context: &str) -> Result<(), ValidationError> {
    crate::profile::ContextView::read(context)
        .and_then(|view| view.external_ids())
        .map(|_| ())
        .map_err(|e| ValidationError::field("invalid_field", &e.field, e.message))
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

/// Refuses object text that the rest of Trailmark could not read back (see
/// [`scan`]), naming the field.
/// Scans `text` (see [`scan`]), naming `field` in a refusal.
fn readable(text: &str, field: &str) -> Result<Scanned, ValidationError> {
    scan(text)
        .map_err(|why| ValidationError::field(why.code(), field, format!("{field} holds {why}")))
}

/// The JSON text of an optional object field, verbatim from the body.
fn object_text(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, ValidationError> {
    Ok(scanned_object_text(raw, field)?.map(|(text, _)| text))
}

/// The text of an object field, kept verbatim once [`readable`], and
/// whether it may name `externalIds`.
fn scanned_object_text(
    raw: Option<&RawValue>,
    field: &str,
) -> Result<Option<(String, bool)>, ValidationError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        Some(r) if r.get().starts_with('{') => {
            let scanned = readable(r.get(), field)?;
            Ok(Some((r.get().to_owned(), scanned.may_name_external_ids)))
        }
        Some(_) => Err(not_object(field)),
    }
}

/// An optional object field, decoded (for merging batch-level fields).
fn opt_object(
    raw: Option<&RawValue>,
    field: &str,
) -> Result<Option<Map<String, Value>>, ValidationError> {
    match raw {
        None => Ok(None),
        Some(r) if is_null(r) => Ok(None),
        Some(r) if r.get().starts_with('{') => {
            // Decoding alone would let nesting up to serde_json's own limit
            // through, so the scan runs first.
            readable(r.get(), field)?;
            serde_json::from_str::<Map<String, Value>>(r.get())
                .map(Some)
                .map_err(|_| not_object(field))
        }
        Some(_) => Err(not_object(field)),
    }
}

/// An object field with the batch-level object merged under it; the item's own
/// keys win. Without a batch-level object the item's text is kept verbatim.
fn merge_object(
    raw: Option<&RawValue>,
    shared: Option<&Map<String, Value>>,
    field: &str,
) -> Result<Option<(String, bool)>, ValidationError> {
    let Some(shared) = shared.filter(|m| !m.is_empty()) else {
        return scanned_object_text(raw, field);
    };
    let mut merged = shared.clone();
    if let Some(own) = opt_object(raw, field)? {
        merged.extend(own);
    }
    // Decoded keys: an escaped spelling of the key is found too.
    let may_name_external_ids = merged.contains_key("externalIds");
    Ok(Some((
        Value::Object(merged).to_string(),
        may_name_external_ids,
    )))
}

#[cfg(test)]
mod tests;
