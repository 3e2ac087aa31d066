//! The normalised event: what ingest appends to the log and projectors fold.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::time::format_micros;

/// The six Segment call types, and the log's control records. A closed set:
/// every `match` on it is exhaustive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// An action the user performed (`event` + `properties`).
    Track,
    /// Who the user is (`traits`).
    Identify,
    /// A web page view (`name`, `category`, `properties`).
    Page,
    /// A mobile screen view (`name`, `category`, `properties`).
    Screen,
    /// Membership of a group or account (`groupId`, `traits`).
    Group,
    /// Two user identities are the same person (`previousId` → `userId`).
    Alias,
    /// An admin's identity instruction ([`Event::control`]): appended to the
    /// log by the admin API, never sent by a client ([`EventType::from_wire`]
    /// does not know it).
    Control,
}

impl EventType {
    /// Every type a client may send, in a fixed order.
    pub const ALL: [EventType; 6] = [
        EventType::Track,
        EventType::Identify,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    /// The lowercase wire name (`track`, `identify`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Identify => "identify",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
            EventType::Control => "control",
        }
    }

    /// Parses a wire name.
    pub fn from_wire(s: &str) -> Option<Self> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of an identifier. The first three are Segment's built-in id types
/// of people; `group_id` names an account, never a person; any other
/// `context.externalIds[].type` is an external id type of people.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdKind {
    /// Segment's `anonymous_id`.
    AnonymousId,
    /// An email address, from `traits.email`.
    Email,
    /// Segment's `user_id`.
    UserId,
    /// An account's `groupId`: the key of the accounts collection. It is
    /// never linked to a person's identifiers (see
    /// [`crate::profile::Fact::Member`]).
    GroupId,
    /// Any other id type, such as `ga_client_id` or `stripe_customer_id`.
    External(String),
}

impl IdKind {
    /// The id type as used in `{id_type}:{id}` lookups.
    pub fn as_str(&self) -> &str {
        match self {
            IdKind::AnonymousId => "anonymous_id",
            IdKind::Email => "email",
            IdKind::UserId => "user_id",
            IdKind::GroupId => "group_id",
            IdKind::External(s) => s,
        }
    }

    /// Parses an id type; anything that is not built in is external.
    pub fn parse(s: &str) -> Self {
        match s {
            "anonymous_id" => IdKind::AnonymousId,
            "email" => IdKind::Email,
            "user_id" => IdKind::UserId,
            "group_id" => IdKind::GroupId,
            other => IdKind::External(other.to_owned()),
        }
    }
}

/// The longest identifier value (`userId`, `anonymousId`, an external id,
/// an email that links a profile), in characters.
pub const MAX_ID_CHARS: usize = 1_024;
/// The longest id type of `context.externalIds[].type`, in bytes.
pub const MAX_ID_TYPE_CHARS: usize = 64;
/// The most `context.externalIds` one event may carry.
pub const MAX_EXTERNAL_IDS: usize = 25;

impl IdKind {
    /// Checks an id type named by a client: 1 to [`MAX_ID_TYPE_CHARS`] of
    /// `a-z`, `0-9`, `_`, `.` and `-`, starting with a letter or a digit
    /// (`user_id`, `ga_client_id`, `ios.idfa`). Lower case only, so that one
    /// kind has one spelling; no `:` (it separates `{id_type}:{id}`) and no
    /// control byte (the embedded store's keys are built from it). The kind
    /// `profile_id` is reserved for lookups by a profile's stable id.
    pub fn check(s: &str) -> Result<(), String> {
        let ok_char = |c: u8| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-');
        match s.as_bytes() {
            [] => Err("must not be empty".into()),
            b if b.len() > MAX_ID_TYPE_CHARS => {
                Err(format!("is longer than {MAX_ID_TYPE_CHARS} characters"))
            }
            [first, ..] if !first.is_ascii_lowercase() && !first.is_ascii_digit() => {
                Err("must start with a-z or 0-9".into())
            }
            b if !b.iter().all(|&c| ok_char(c)) => {
                Err("may hold only a-z, 0-9, '_', '.' and '-'".into())
            }
            b"profile_id" => {
                Err("profile_id is reserved: it names a profile by its stable id".into())
            }
            _ => Ok(()),
        }
    }
}

impl Identifier {
    /// Checks an identifier value: not empty, at most [`MAX_ID_CHARS`]
    /// characters, no NUL.
    pub fn check_value(s: &str) -> Result<(), String> {
        if s.is_empty() {
            Err("must not be empty".into())
        } else if s.len() > MAX_ID_CHARS && s.chars().count() > MAX_ID_CHARS {
            Err(format!("is longer than {MAX_ID_CHARS} characters"))
        } else if s.contains('\0') {
            Err("must not contain a nul character".into())
        } else {
            Ok(())
        }
    }
}

/// Trims and lower-cases an email in place, allocating only when it changes.
fn normalise_email(value: &mut String) {
    let trimmed = value.trim();
    let unchanged = trimmed.len() == value.len()
        && if trimmed.is_ascii() {
            !trimmed.bytes().any(|b| b.is_ascii_uppercase())
        } else {
            trimmed.to_lowercase() == trimmed
        };
    if !unchanged {
        *value = trimmed.to_lowercase();
    }
}

/// One identifier of a person: an id type and a value.
///
/// Identifiers order by type then value; the smallest identifier of a linked
/// set names the set, so the choice never depends on arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier {
    /// The id type.
    pub kind: IdKind,
    /// The id value.
    pub value: String,
}

impl Identifier {
    /// An identifier of `kind` with `value`. An email is normalised here,
    /// the one place every identifier is made (the fold, lookups, stored
    /// keys): trimmed and lower-cased, so `Ann@Example.com ` and
    /// `ann@example.com` are one person and either finds them.
    pub fn new(kind: IdKind, value: impl Into<String>) -> Self {
        let mut value = value.into();
        if kind == IdKind::Email {
            normalise_email(&mut value);
        }
        Self { kind, value }
    }

    /// Parses `{id_type}:{id}`, splitting at the first colon.
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, value) = s.split_once(':')?;
        if kind.is_empty() || value.is_empty() {
            return None;
        }
        Some(Self::new(IdKind::parse(kind), value))
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.value)
    }
}

/// A validated, normalised event as it stands in the log.
///
/// Nested JSON objects (`properties`, `traits`, `context`, `integrations`) are
/// kept as their JSON text: ingest never needs to look inside most of them, and
/// the log stores them verbatim. Times are microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The workspace (tenant), decided by the write key, never by the payload.
    pub workspace_id: String,
    /// The source within the workspace, decided by the write key.
    pub source_id: String,
    /// The de-duplication key within the workspace.
    pub message_id: String,
    /// The call type.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Segment `userId`.
    pub user_id: Option<String>,
    /// Segment `anonymousId`.
    pub anonymous_id: Option<String>,
    /// The `track` event name.
    pub event: Option<String>,
    /// The `page`/`screen` name.
    pub name: Option<String>,
    /// The `page`/`screen` category.
    pub category: Option<String>,
    /// The `group` call's group id.
    pub group_id: Option<String>,
    /// The `alias` call's previous id.
    pub previous_id: Option<String>,
    /// When the event happened, corrected for client clock skew.
    pub timestamp: i64,
    /// The client's own clock reading when the call was made.
    pub original_timestamp: Option<i64>,
    /// The client's clock reading when the request was sent.
    pub sent_at: Option<i64>,
    /// When ingest received the request.
    pub received_at: i64,
    /// `properties` as JSON text.
    pub properties: Option<String>,
    /// `traits` as JSON text.
    pub traits: Option<String>,
    /// `context` as JSON text.
    pub context: Option<String>,
    /// `integrations` as JSON text.
    pub integrations: Option<String>,
    /// The client address ingest saw (schema v2; `None` in v1 records).
    #[serde(default)]
    pub request_ip: Option<String>,
    /// The identifiers of `userId` and `anonymousId` that ingest found
    /// blocked by the workspace's identity rules, as `{id_type}:{id}`
    /// (schema v3). They stay in the payload but never name the event's
    /// profile: [`Event::primary_identifier`] skips them, so the events of
    /// `userId: "null"` stay with their anonymous profile. Recorded at
    /// ingest, so the partition key and the fold agree whatever the rules
    /// say later.
    #[serde(default)]
    pub blocked_ids: Vec<String>,
    /// For a [`EventType::Control`] record: the admin's instruction (schema
    /// v3).
    #[serde(default)]
    pub control: Option<Control>,
}

/// An admin's identity instruction, carried by a control record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// What to do.
    pub action: ControlAction,
    /// The identifiers, as `{id_type}:{id}`: merged into one profile, or
    /// each detached from its profile.
    pub identifiers: Vec<String>,
}

/// What a control record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlAction {
    /// Force the identifiers into one profile, exempt from limits.
    Merge,
    /// Detach each identifier from its profile, for good.
    Split,
}

impl Event {
    /// The identifier under which this event's timeline entry, traits and
    /// counts are stored: `userId` when present and not blocked, else
    /// `anonymousId` (a blocked `userId` is used only when there is nothing
    /// else). A control record's is its first identifier.
    pub fn primary_identifier(&self) -> Identifier {
        if let Some(c) = &self.control {
            return c
                .identifiers
                .first()
                .and_then(|i| Identifier::parse(i))
                .unwrap_or_else(|| Identifier::new(IdKind::AnonymousId, String::new()));
        }
        let (kind, value) = self.primary_value();
        Identifier::new(kind, value)
    }

    /// The kind and value of [`Event::primary_identifier`] of an event that
    /// is not a control record, without allocating.
    fn primary_value(&self) -> (IdKind, &str) {
        let blocked = |kind: &str, value: &str| {
            self.blocked_ids.iter().any(|b| {
                b.strip_prefix(kind)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .is_some_and(|v| v == value)
            })
        };
        match (self.user_id.as_deref(), self.anonymous_id.as_deref()) {
            (Some(u), Some(a))
                if !self.blocked_ids.is_empty()
                    && blocked("user_id", u)
                    && !blocked("anonymous_id", a) =>
            {
                (IdKind::AnonymousId, a)
            }
            (Some(u), _) => (IdKind::UserId, u),
            (None, Some(a)) => (IdKind::AnonymousId, a),
            // Ingest rejects events with neither; keep the fold total anyway.
            (None, None) => (IdKind::AnonymousId, ""),
        }
    }

    /// The log partition key: workspace plus the primary identifier's value,
    /// so that one person's events stay in order within a partition.
    pub fn partition_key(&self) -> Vec<u8> {
        let id = match &self.control {
            Some(c) => c
                .identifiers
                .first()
                .and_then(|i| i.split_once(':'))
                .map_or("", |(_, v)| v),
            None => self.primary_value().1,
        };
        let mut key = Vec::with_capacity(self.workspace_id.len() + id.len() + 1);
        key.extend_from_slice(self.workspace_id.as_bytes());
        key.push(0);
        key.extend_from_slice(id.as_bytes());
        key
    }

    /// The event as the query API returns it in a timeline, in the snake_case
    /// shape of Segment's Profile API.
    pub fn to_api_json(&self) -> Value {
        let mut out = Vec::with_capacity(1024);
        self.write_api_json(&mut out);
        serde_json::from_slice(&out).expect("write_api_json writes json")
    }

    /// Writes [`Event::to_api_json`]'s JSON straight to `out`, copying the
    /// nested objects' JSON text instead of parsing and re-serialising it:
    /// the projector renders every event once, so this is on its hot path.
    pub fn write_api_json(&self, out: &mut Vec<u8>) {
        fn key(out: &mut Vec<u8>, first: &mut bool, k: &str) {
            out.push(if *first { b'{' } else { b',' });
            *first = false;
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
        }
        fn string(out: &mut Vec<u8>, v: Option<&str>) {
            match v {
                Some(s) => serde_json::to_writer(&mut *out, s).expect("string serialises"),
                None => out.extend_from_slice(b"null"),
            }
        }
        fn object(out: &mut Vec<u8>, v: Option<&str>) {
            match v.map(str::trim) {
                Some(text) if text.starts_with('{') => out.extend_from_slice(text.as_bytes()),
                _ => out.extend_from_slice(b"{}"),
            }
        }
        fn time(out: &mut Vec<u8>, t: Option<i64>) {
            string(out, t.map(format_micros).as_deref());
        }
        let mut first = true;
        let f = &mut first;
        key(out, f, "message_id");
        string(out, Some(&self.message_id));
        key(out, f, "type");
        string(out, Some(self.kind.as_str()));
        key(out, f, "source_id");
        string(out, Some(&self.source_id));
        key(out, f, "user_id");
        string(out, self.user_id.as_deref());
        key(out, f, "anonymous_id");
        string(out, self.anonymous_id.as_deref());
        match self.kind {
            EventType::Track => {
                key(out, f, "event");
                string(out, self.event.as_deref());
            }
            EventType::Page | EventType::Screen => {
                key(out, f, "name");
                string(out, self.name.as_deref());
                key(out, f, "category");
                string(out, self.category.as_deref());
            }
            EventType::Group => {
                key(out, f, "group_id");
                string(out, self.group_id.as_deref());
            }
            EventType::Alias => {
                key(out, f, "previous_id");
                string(out, self.previous_id.as_deref());
            }
            EventType::Identify => {}
            EventType::Control => {
                if let Some(c) = &self.control {
                    key(out, f, "action");
                    string(
                        out,
                        Some(match c.action {
                            ControlAction::Merge => "merge",
                            ControlAction::Split => "split",
                        }),
                    );
                }
            }
        }
        match self.kind {
            EventType::Track | EventType::Page | EventType::Screen => {
                key(out, f, "properties");
                object(out, self.properties.as_deref());
            }
            EventType::Identify | EventType::Group => {
                key(out, f, "traits");
                object(out, self.traits.as_deref());
            }
            EventType::Alias | EventType::Control => {}
        }
        key(out, f, "context");
        object(out, self.context.as_deref());
        key(out, f, "timestamp");
        time(out, Some(self.timestamp));
        key(out, f, "original_timestamp");
        time(out, self.original_timestamp);
        key(out, f, "sent_at");
        time(out, self.sent_at);
        key(out, f, "received_at");
        time(out, Some(self.received_at));
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_json_renders_every_type() {
        for kind in EventType::ALL {
            let ev = Event {
                workspace_id: "ws".into(),
                source_id: "src".into(),
                message_id: "m\"1".into(),
                kind,
                user_id: Some("u".into()),
                anonymous_id: None,
                event: Some("Clicked \u{1F600}".into()),
                name: Some("Home".into()),
                category: None,
                group_id: Some("g".into()),
                previous_id: Some("p".into()),
                timestamp: 1_000,
                original_timestamp: None,
                sent_at: Some(2_000),
                received_at: 3_000,
                properties: Some(" {\"a\": [1, {\"b\": null}]}".into()),
                traits: Some("{\"email\":\"x@y\"}".into()),
                context: None,
                integrations: None,
                request_ip: None,
                blocked_ids: Vec::new(),
                control: None,
            };
            let v = ev.to_api_json();
            assert_eq!(v["message_id"], "m\"1");
            assert_eq!(v["type"], kind.as_str());
            assert_eq!(v["anonymous_id"], Value::Null);
            assert_eq!(v["context"], serde_json::json!({}));
            assert_eq!(v["sent_at"], "1970-01-01T00:00:00.002Z");
            match kind {
                EventType::Track => {
                    assert_eq!(v["event"], "Clicked \u{1F600}");
                    assert_eq!(v["properties"]["a"][1]["b"], Value::Null);
                }
                EventType::Identify | EventType::Group => assert_eq!(v["traits"]["email"], "x@y"),
                EventType::Page | EventType::Screen => assert_eq!(v["name"], "Home"),
                EventType::Alias => assert_eq!(v["previous_id"], "p"),
                EventType::Control => unreachable!("not a client type"),
            }
        }
    }

    #[test]
    fn a_blocked_user_id_leaves_the_event_with_its_anonymous_id() {
        let mut ev = Event {
            workspace_id: "ws".into(),
            source_id: "src".into(),
            message_id: "m1".into(),
            kind: EventType::Track,
            user_id: Some("null".into()),
            anonymous_id: Some("a1".into()),
            event: Some("Opened".into()),
            name: None,
            category: None,
            group_id: None,
            previous_id: None,
            timestamp: 1,
            original_timestamp: None,
            sent_at: None,
            received_at: 1,
            properties: None,
            traits: None,
            context: None,
            integrations: None,
            request_ip: None,
            blocked_ids: Vec::new(),
            control: None,
        };
        assert_eq!(ev.primary_identifier().to_string(), "user_id:null");
        ev.blocked_ids = vec!["user_id:null".into()];
        assert_eq!(ev.primary_identifier().to_string(), "anonymous_id:a1");
        assert_eq!(ev.partition_key(), b"ws\0a1");
        // With nothing else to name it, a blocked userId still does.
        ev.anonymous_id = None;
        assert_eq!(ev.primary_identifier().to_string(), "user_id:null");
        ev.control = Some(Control {
            action: ControlAction::Merge,
            identifiers: vec!["email:a@b.c".into(), "user_id:u".into()],
        });
        assert_eq!(ev.primary_identifier().to_string(), "email:a@b.c");
        assert_eq!(ev.partition_key(), b"ws\0a@b.c");
    }

    #[test]
    fn all_lists_types_in_declaration_order() {
        // Ingest indexes per-type counters by `kind as usize`.
        for (i, t) in EventType::ALL.iter().enumerate() {
            assert_eq!(*t as usize, i);
            assert_eq!(EventType::from_wire(t.as_str()), Some(*t));
        }
    }

    #[test]
    fn identifiers_parse_and_order() {
        let a = Identifier::parse("user_id:42").unwrap();
        assert_eq!(a.kind, IdKind::UserId);
        assert_eq!(a.value, "42");
        let mixed = Identifier::parse("email: Ann.Lee@Example.COM ").unwrap();
        assert_eq!(mixed, Identifier::new(IdKind::Email, "ann.lee@example.com"));
        assert_eq!(mixed.value, "ann.lee@example.com");
        assert_eq!(
            Identifier::new(IdKind::Email, "ÉLODIE@Exemple.fr").value,
            "élodie@exemple.fr"
        );
        // Other kinds are case-sensitive, as clients send them.
        assert_eq!(Identifier::new(IdKind::UserId, " U1").value, " U1");
        let e = Identifier::parse("email:a:b@c").unwrap();
        assert_eq!(e.value, "a:b@c");
        let x = Identifier::parse("stripe_id:cus_1").unwrap();
        assert_eq!(x.kind, IdKind::External("stripe_id".into()));
        assert!(Identifier::parse("nocolon").is_none());
        assert!(Identifier::parse("user_id:").is_none());
        assert!(Identifier::new(IdKind::AnonymousId, "z") < Identifier::new(IdKind::UserId, "a"));
    }
}
