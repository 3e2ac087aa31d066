//! Event builders and fixtures shared by Trailmark's tests: one place to make
//! a realistic event, so tests read as what they check.
//!
//! [`EventBuilder`] makes normalised [`Event`]s for the fold, store and log
//! tests; [`segment`] makes Segment Tracking API JSON bodies for HTTP tests.

use serde_json::{Value, json};
use trailmark_domain::{Event, EventType};

/// The workspace the builders use unless told otherwise.
pub const WORKSPACE: &str = "ws_test";

/// 2024-01-01T00:00:00Z in microseconds; builders' times are offsets from it.
pub const T0: i64 = 1_704_067_200_000_000;

/// A short name that is the same for the same path and differs between
/// paths (64-bit FNV-1a, hex): tests name their Kafka topic or Cassandra
/// keyspace after their temporary directory, so "reopen" finds the same one.
pub fn name_for_path(path: &std::path::Path) -> String {
    let digest = path
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{digest:016x}")
}

/// Builds a normalised [`Event`].
#[derive(Debug, Clone)]
pub struct EventBuilder {
    event: Event,
}

impl EventBuilder {
    /// An event of `kind` with a fresh `messageId`, at [`T0`].
    pub fn new(kind: EventType) -> Self {
        Self {
            event: Event {
                workspace_id: WORKSPACE.into(),
                source_id: "src_test".into(),
                message_id: uuid::Uuid::now_v7().to_string(),
                kind,
                user_id: None,
                anonymous_id: None,
                event: None,
                name: None,
                category: None,
                group_id: None,
                previous_id: None,
                timestamp: T0,
                original_timestamp: None,
                sent_at: None,
                received_at: T0,
                properties: None,
                traits: None,
                context: None,
                integrations: None,
                request_ip: None,
                blocked_ids: Vec::new(),
                control: None,
            },
        }
    }

    /// A `track` of `name`.
    pub fn track(name: &str) -> Self {
        let mut b = Self::new(EventType::Track);
        b.event.event = Some(name.into());
        b.event.properties = Some("{}".into());
        b
    }

    /// An `identify` with `traits`.
    pub fn identify(traits: Value) -> Self {
        let mut b = Self::new(EventType::Identify);
        b.event.traits = Some(traits.to_string());
        b
    }

    /// A `page` view of `name`.
    pub fn page(name: &str) -> Self {
        let mut b = Self::new(EventType::Page);
        b.event.name = Some(name.into());
        b
    }

    /// A `group` call joining account `group_id`, with its `traits`.
    pub fn group(group_id: &str, traits: Value) -> Self {
        let mut b = Self::new(EventType::Group);
        b.event.group_id = Some(group_id.into());
        b.event.traits = Some(traits.to_string());
        b
    }

    /// An `alias` of `previous_id` to `user_id`.
    pub fn alias(user_id: &str, previous_id: &str) -> Self {
        let mut b = Self::new(EventType::Alias);
        b.event.user_id = Some(user_id.into());
        b.event.previous_id = Some(previous_id.into());
        b
    }

    /// Sets `userId`.
    pub fn user(mut self, id: &str) -> Self {
        self.event.user_id = Some(id.into());
        self
    }

    /// Sets `anonymousId`.
    pub fn anon(mut self, id: &str) -> Self {
        self.event.anonymous_id = Some(id.into());
        self
    }

    /// Sets the `messageId`.
    pub fn message_id(mut self, id: &str) -> Self {
        self.event.message_id = id.into();
        self
    }

    /// Sets the event time to [`T0`] plus `seconds`, and `receivedAt` to match.
    pub fn at(mut self, seconds: i64) -> Self {
        self.event.timestamp = T0 + seconds * 1_000_000;
        self.event.received_at = self.event.timestamp;
        self
    }

    /// Sets `receivedAt` to [`T0`] plus `seconds`.
    pub fn received(mut self, seconds: i64) -> Self {
        self.event.received_at = T0 + seconds * 1_000_000;
        self
    }

    /// Sets the workspace.
    pub fn workspace(mut self, ws: &str) -> Self {
        self.event.workspace_id = ws.into();
        self
    }

    /// Sets `properties`.
    pub fn properties(mut self, p: Value) -> Self {
        self.event.properties = Some(p.to_string());
        self
    }

    /// Sets `context`.
    pub fn context(mut self, c: Value) -> Self {
        self.event.context = Some(c.to_string());
        self
    }

    /// The event.
    pub fn build(self) -> Event {
        self.event
    }
}

/// Segment Tracking API request bodies, as a Segment library would send them.
pub mod segment {
    use super::*;

    /// A `track` body with a fresh `messageId`.
    pub fn track(user_id: &str, event: &str) -> Value {
        json!({
            "userId": user_id,
            "event": event,
            "messageId": uuid::Uuid::now_v7().to_string(),
            "properties": {"plan": "pro", "amount": 12.5},
            "context": {"library": {"name": "analytics-node", "version": "6.0.0"}},
        })
    }

    /// An `identify` body with a fresh `messageId`.
    pub fn identify(user_id: &str, traits: Value) -> Value {
        json!({
            "userId": user_id,
            "traits": traits,
            "messageId": uuid::Uuid::now_v7().to_string(),
        })
    }

    /// A batch item: `body` with its `type` set.
    pub fn item(kind: &str, mut body: Value) -> Value {
        body["type"] = json!(kind);
        body
    }
}
