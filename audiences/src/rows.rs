//! The evaluator's rows: how each
//! [`EvalTable`](trailmark_store::evaluator::EvalTable) is keyed, and what its
//! values hold. Every rule about them lives here and in the evaluator; the
//! stores only keep bytes.
//!
//! | table        | part                    | sort                        | value |
//! |--------------|-------------------------|-----------------------------|-------|
//! | `Leaves`     | ws, identifier          | spec id                     | [`LeafRow`] |
//! | `Profiles`   | ws                      | profile id (16)             | [`ProfileRecord`] |
//! | `IdProfiles` | ws                      | identifier                  | profile id (16; zeros: not yet evaluated) |
//! | `Members`    | ws, audience id         | profile id (16)             | [`MemberRow`] |
//! | `Deadlines`  | hour (BE i64)           | deadline (BE), profile id, ws | empty |
//! | `History`    | ws, profile id          | definition id, n (BE u32)   | [`HistoryRow`] |
//! | `Outbox`     | empty                   | sequence (BE u64 ×2)        | key length, key, payload |
//! | `Dirty`      | ws                      | identifier                  | empty |
//! | `Stats`      | empty                   | a name (`specs`, `sweep`)   | JSON |
//!
//! Parts made of several components are length-prefixed, so none can reach
//! another's rows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trailmark_domain::Identifier;
use trailmark_domain::audience::leaf::LeafState;
use trailmark_store::evaluator::EvalKey;
use uuid::Uuid;

/// An hour in microseconds: the part of the deadline index.
pub const HOUR: i64 = 3_600_000_000;

fn lp(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&s[..n]);
}

fn parts(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        lp(&mut out, i);
    }
    out
}

/// Byte order is time order.
pub fn time_bytes(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

/// Reads [`time_bytes`].
pub fn time_from(b: &[u8]) -> Option<i64> {
    Some((u64::from_be_bytes(b.get(..8)?.try_into().ok()?) ^ (1 << 63)) as i64)
}

/// An identifier as the evaluator's keys spell it: `type:value`.
pub fn id_text(id: &Identifier) -> String {
    id.to_string()
}

/// The part of a member's leaf states.
pub fn leaf_part(ws: &str, id: &Identifier) -> Vec<u8> {
    parts(&[ws.as_bytes(), id_text(id).as_bytes()])
}

/// A leaf state's key.
pub fn leaf_key(ws: &str, id: &Identifier, spec: &str) -> EvalKey {
    EvalKey::new(leaf_part(ws, id), spec.as_bytes())
}

/// A profile record's key.
pub fn profile_key(ws: &str, pid: Uuid) -> EvalKey {
    EvalKey::new(ws.as_bytes(), pid.as_bytes().to_vec())
}

/// The key of the profile an identifier was last evaluated under.
pub fn id_profile_key(ws: &str, id: &Identifier) -> EvalKey {
    EvalKey::new(ws.as_bytes(), id_text(id).into_bytes())
}

/// The part of an audience's members.
pub fn members_part(ws: &str, audience: &str) -> Vec<u8> {
    parts(&[ws.as_bytes(), audience.as_bytes()])
}

/// A member row's key.
pub fn member_key(ws: &str, audience: &str, pid: Uuid) -> EvalKey {
    EvalKey::new(members_part(ws, audience), pid.as_bytes().to_vec())
}

/// The part of the deadlines due in `deadline`'s hour.
pub fn deadline_part(deadline: i64) -> Vec<u8> {
    deadline.div_euclid(HOUR).to_be_bytes().to_vec()
}

/// A deadline row's key.
pub fn deadline_key(deadline: i64, ws: &str, pid: Uuid) -> EvalKey {
    let mut sort = time_bytes(deadline).to_vec();
    sort.extend_from_slice(pid.as_bytes());
    sort.extend_from_slice(ws.as_bytes());
    EvalKey::new(deadline_part(deadline), sort)
}

/// Reads a deadline row's sort key: `(deadline, profile id, ws)`.
pub fn read_deadline(sort: &[u8]) -> Option<(i64, Uuid, String)> {
    let deadline = time_from(sort)?;
    let pid = Uuid::from_slice(sort.get(8..24)?).ok()?;
    let ws = String::from_utf8(sort.get(24..)?.to_vec()).ok()?;
    Some((deadline, pid, ws))
}

/// The part of a profile's history.
pub fn history_part(ws: &str, pid: Uuid) -> Vec<u8> {
    parts(&[ws.as_bytes(), pid.as_bytes()])
}

/// A history row's key.
pub fn history_key(ws: &str, pid: Uuid, definition: &str, n: u32) -> EvalKey {
    let mut sort = Vec::new();
    lp(&mut sort, definition.as_bytes());
    sort.extend_from_slice(&n.to_be_bytes());
    EvalKey::new(history_part(ws, pid), sort)
}

/// Reads a history row's sort key: `(definition id, n)`.
pub fn read_history_sort(sort: &[u8]) -> Option<(String, u32)> {
    let n = u16::from_be_bytes(sort.get(..2)?.try_into().ok()?) as usize;
    let id = String::from_utf8(sort.get(2..2 + n)?.to_vec()).ok()?;
    let seq = u32::from_be_bytes(sort.get(2 + n..6 + n)?.try_into().ok()?);
    Some((id, seq))
}

/// A dirty marker's key.
pub fn dirty_key(ws: &str, id: &Identifier) -> EvalKey {
    EvalKey::new(ws.as_bytes(), id_text(id).into_bytes())
}

/// An outbox row's key: the time it was written, then a counter, so rows
/// are published in order.
pub fn outbox_key(at: i64, seq: u64) -> EvalKey {
    let mut sort = time_bytes(at).to_vec();
    sort.extend_from_slice(&seq.to_be_bytes());
    EvalKey::new(Vec::new(), sort)
}

/// A `Stats` row's key.
pub fn stats_key(name: &str) -> EvalKey {
    EvalKey::new(Vec::new(), name.as_bytes())
}

/// An outbox row's value: the log record's key and payload.
pub fn outbox_value(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + key.len() + payload.len());
    v.extend_from_slice(&(key.len() as u32).to_be_bytes());
    v.extend_from_slice(key);
    v.extend_from_slice(payload);
    v
}

/// Reads [`outbox_value`].
pub fn read_outbox(v: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let n = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
    Some((v.get(4..4 + n)?.to_vec(), v.get(4 + n..)?.to_vec()))
}

/// One identifier's state for one spec, with how far its partition was
/// folded into it: the evaluator skips an event at or before that position
/// (a replay, or a backfill that read ahead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeafRow {
    /// The state.
    pub state: LeafState,
    /// `(partition, next position)` after the last event folded.
    pub applied: Option<(u32, u64)>,
}

/// What the evaluator last decided for one profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileRecord {
    /// Its holder then (`type:value`).
    pub holder: String,
    /// Its members then.
    pub members: Vec<String>,
    /// Membership by audience id.
    pub audiences: BTreeMap<String, MemberState>,
    /// Computed traits by trait id.
    pub traits: BTreeMap<String, TraitState>,
    /// When it must be evaluated again with no new event.
    pub deadline: Option<i64>,
    /// The [`Catalog::fingerprint`](trailmark_domain::audience::Catalog::fingerprint)
    /// it was evaluated under; 0 when it cannot be carried over (none yet,
    /// or retired).
    #[serde(default)]
    pub catalog: u64,
    /// Each definition's own deadline, by id (those that have one).
    #[serde(default)]
    pub deadlines: BTreeMap<String, i64>,
    /// When its verdicts were made, at the latest: the time of the
    /// evaluation that last changed this record.
    #[serde(default)]
    pub at: i64,
}

/// A profile's membership of one audience.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    /// Whether it is a member.
    pub member: bool,
    /// How many changes were emitted (the last change's number).
    pub n: u32,
    /// The version that decided it.
    pub version: u32,
    /// Since when, microseconds.
    pub since: i64,
}

/// A profile's value of one computed trait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitState {
    /// The value.
    pub value: Value,
    /// How many changes were emitted.
    pub n: u32,
    /// The version that computed it.
    pub version: u32,
    /// Since when, microseconds.
    pub since: i64,
}

/// An audience member's row, for paging members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRow {
    /// The profile's holder (`type:value`).
    pub holder: String,
    /// Member since, microseconds.
    pub since: i64,
    /// The version that decided it.
    pub version: u32,
}

/// Why something changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cause {
    /// An event of the profile (or one that changed its identity).
    Event {
        /// Its `messageId`.
        message_id: String,
        /// When it was received, microseconds.
        received_at: i64,
    },
    /// Time passed a window's boundary.
    Deadline {
        /// The boundary, microseconds.
        at: i64,
    },
    /// A new version of the definition went live.
    Definition {
        /// The version.
        version: u32,
    },
    /// The profile merged into another, and no longer stands alone.
    Merged {
        /// The profile it is now part of.
        into: Uuid,
    },
}

impl Cause {
    /// Its JSON form, as events and the API show it.
    pub fn to_json(&self) -> Value {
        match self {
            Cause::Event { message_id, .. } => {
                serde_json::json!({"type": "event", "message_id": message_id})
            }
            Cause::Deadline { at } => serde_json::json!({
                "type": "deadline",
                "at": trailmark_domain::time::format_micros(*at),
            }),
            Cause::Definition { version } => {
                serde_json::json!({"type": "definition", "version": version})
            }
            Cause::Merged { into } => serde_json::json!({"type": "merged", "into": into}),
        }
    }
}

/// One change of a profile's membership or computed trait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    /// Entered (true) or exited (false); for a computed trait, whether it
    /// has a value.
    pub member: bool,
    /// A computed trait's new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The version that decided it.
    pub version: u32,
    /// When, microseconds.
    pub at: i64,
    /// Why.
    pub cause: Cause,
}

/// Encodes a row as JSON.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("rows serialise")
}

/// Decodes a row.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Option<T> {
    serde_json::from_slice(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back() {
        let pid = Uuid::now_v7();
        let k = deadline_key(-5 * HOUR + 7, "ws_1", pid);
        assert_eq!(
            read_deadline(&k.sort),
            Some((-5 * HOUR + 7, pid, "ws_1".into()))
        );
        assert_eq!(k.part, (-5i64).to_be_bytes().to_vec());
        let h = history_key("ws", pid, "aud_1", 9);
        assert_eq!(read_history_sort(&h.sort), Some(("aud_1".into(), 9)));
        let v = outbox_value(b"key", b"payload");
        assert_eq!(
            read_outbox(&v),
            Some((b"key".to_vec(), b"payload".to_vec()))
        );
        // Deadlines sort by time, negative ones first.
        assert!(deadline_key(-1, "w", pid).sort < deadline_key(1, "w", pid).sort);
    }

    #[test]
    fn parts_are_injective() {
        let a = leaf_key("ab", &Identifier::parse("user_id:c").unwrap(), "s");
        let b = leaf_key("a", &Identifier::parse("user_id:bc").unwrap(), "s");
        assert_ne!(a.part, b.part);
    }
}
