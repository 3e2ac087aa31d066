//! What every store keeps for identity, spelled once: how a piece of
//! [`Evidence`] and an identifier's [`Named`] record are encoded, the digest
//! that names an evidence slot, and how a walk's members become a
//! [`ProfileRef`]. The decisions themselves are the domain's
//! ([`trailmark_domain::identity`]); a store only reads and writes these
//! rows.
//!
//! # Encodings
//! Both start with the part a CQL store must compare on a write-timestamp
//! tie: the `messageId` of the first key, **inverted** (each byte `255 - b`)
//! and terminated by `0xff`. On equal timestamps Cassandra keeps the larger
//! cell, so the inverted spelling keeps the smaller `messageId`, which is
//! the domain's rule (the smallest key wins).

use std::collections::{BTreeMap, BTreeSet};

use trailmark_domain::identity::{Action, Evidence, Key, Resolved, holder, profile_id};
use trailmark_domain::profile::Named;
use trailmark_domain::{IdKind, Identifier};

use crate::{ProfileRef, Result, StoreError};

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// The 16-byte digest of [`Evidence::slot`]: the slot's name in a key.
pub fn slot_digest(slot: &[u8]) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(slot);
    d[..16].try_into().expect("16 of 32 bytes")
}

fn push_inverted(out: &mut Vec<u8>, s: &str) {
    out.extend(s.bytes().map(|b| 255 - b));
    out.push(0xff);
}

fn take_inverted(b: &[u8]) -> Result<(String, &[u8])> {
    // The terminator is the first 0xff that is not an inverted NUL: message
    // ids hold no NUL (ingest refuses control characters in ids).
    let end = b
        .iter()
        .position(|&x| x == 0xff)
        .ok_or_else(|| corrupt("unterminated message id"))?;
    let s = String::from_utf8(b[..end].iter().map(|x| 255 - x).collect())
        .map_err(|_| corrupt("message id"))?;
    Ok((s, &b[end + 1..]))
}

fn push_str16(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn take_str16(b: &[u8]) -> Result<(String, &[u8])> {
    let n = u16::from_be_bytes(
        b.get(..2)
            .ok_or_else(|| corrupt("string length"))?
            .try_into()
            .expect("2 bytes"),
    ) as usize;
    let s = b.get(2..2 + n).ok_or_else(|| corrupt("string"))?;
    Ok((
        String::from_utf8(s.to_vec()).map_err(|_| corrupt("string"))?,
        &b[2 + n..],
    ))
}

fn take_i64(b: &[u8]) -> Result<(i64, &[u8])> {
    let v = b.get(..8).ok_or_else(|| corrupt("integer"))?;
    Ok((i64::from_be_bytes(v.try_into().expect("8")), &b[8..]))
}

fn action_byte(a: Action) -> u8 {
    match a {
        Action::Event => 0,
        Action::Alias => 1,
        Action::Merge => 2,
        Action::Split => 3,
    }
}

/// A piece of evidence: `inverted messageId 0xff ‖ receivedAt ‖ action ‖
/// count u16 ‖ (kind, value) as u16-prefixed strings`.
pub fn encode_evidence(e: &Evidence) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + e.ids.len() * 32);
    push_inverted(&mut out, &e.key.message_id);
    out.extend_from_slice(&e.key.received_at.to_be_bytes());
    out.push(action_byte(e.action));
    out.extend_from_slice(&(e.ids.len() as u16).to_be_bytes());
    for id in &e.ids {
        push_str16(&mut out, id.kind.as_str());
        push_str16(&mut out, &id.value);
    }
    out
}

/// Reads only the key of an [`encode_evidence`] value, to compare it with
/// another without decoding the identifiers.
pub fn evidence_key(b: &[u8]) -> Result<Key> {
    let (message_id, rest) = take_inverted(b)?;
    let (received_at, _) = take_i64(rest)?;
    Ok(Key {
        received_at,
        message_id,
    })
}

/// Reads back [`encode_evidence`].
pub fn decode_evidence(b: &[u8]) -> Result<Evidence> {
    let (message_id, rest) = take_inverted(b)?;
    let (received_at, rest) = take_i64(rest)?;
    let action = match rest.first() {
        Some(0) => Action::Event,
        Some(1) => Action::Alias,
        Some(2) => Action::Merge,
        Some(3) => Action::Split,
        _ => return Err(corrupt("evidence action")),
    };
    let n = u16::from_be_bytes(
        rest.get(1..3)
            .ok_or_else(|| corrupt("evidence"))?
            .try_into()
            .expect("2"),
    );
    let mut rest = &rest[3..];
    let mut ids = BTreeSet::new();
    for _ in 0..n {
        let (kind, r) = take_str16(rest)?;
        let (value, r) = take_str16(r)?;
        rest = r;
        ids.insert(Identifier {
            kind: IdKind::parse(&kind),
            value,
        });
    }
    Ok(Evidence {
        key: Key {
            received_at,
            message_id,
        },
        action,
        ids,
    })
}

/// The first-key part of a [`Named`] record: `inverted messageId 0xff ‖
/// source id`. A CQL store keeps it as one cell written at the timestamp
/// of the key's `receivedAt`.
pub fn encode_first(n: &Named) -> Vec<u8> {
    let mut out = Vec::with_capacity(n.first.message_id.len() + n.source_id.len() + 1);
    push_inverted(&mut out, &n.first.message_id);
    out.extend_from_slice(n.source_id.as_bytes());
    out
}

/// Reads back [`encode_first`]: the first `messageId` and source.
pub fn decode_first(b: &[u8]) -> Result<(String, String)> {
    let (message_id, rest) = take_inverted(b)?;
    let source = String::from_utf8(rest.to_vec()).map_err(|_| corrupt("source id"))?;
    Ok((message_id, source))
}

/// A whole [`Named`] record, as the embedded store keeps it: `created ‖
/// last seen ‖ first receivedAt ‖` [`encode_first`].
pub fn encode_named(n: &Named) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + n.first.message_id.len() + n.source_id.len() + 1);
    out.extend_from_slice(&n.created.to_be_bytes());
    out.extend_from_slice(&n.last_seen.to_be_bytes());
    out.extend_from_slice(&n.first.received_at.to_be_bytes());
    out.extend_from_slice(&encode_first(n));
    out
}

/// Reads back [`encode_named`].
pub fn decode_named(b: &[u8]) -> Result<Named> {
    let (created, rest) = take_i64(b)?;
    let (last_seen, rest) = take_i64(rest)?;
    let (received_at, rest) = take_i64(rest)?;
    let (message_id, source_id) = decode_first(rest)?;
    Ok(Named {
        created,
        last_seen,
        first: Key {
            received_at,
            message_id,
        },
        source_id,
    })
}

/// The profile a walk found: its holder and `profile_id`, each member's
/// record, and the decisions about them. A member without a record (one
/// only an admin's instruction named, whose events are not folded yet) is
/// left out until one comes.
pub fn profile_ref(
    workspace: &str,
    resolved: Resolved<'_>,
    mut named: BTreeMap<Identifier, Named>,
) -> Result<ProfileRef> {
    let settled = resolved.settled.clone();
    let members: BTreeSet<Identifier> = resolved.members.iter().cloned().collect();
    let decisions = resolved.graph.decisions_about(&members).cloned().collect();
    let mut identifiers = BTreeMap::new();
    for m in members {
        if let Some(n) = named.remove(&m) {
            identifiers.insert(m, n);
        }
    }
    let holder = holder(identifiers.iter().map(|(id, n)| (id, &n.first)))
        .ok_or_else(|| corrupt("a profile without members"))?
        .clone();
    Ok(ProfileRef {
        profile_id: profile_id(workspace, &holder),
        holder,
        identifiers,
        decisions,
        settled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> Identifier {
        Identifier::parse(s).unwrap()
    }

    #[test]
    fn evidence_and_records_round_trip() {
        let e = Evidence {
            key: Key {
                received_at: -5,
                message_id: "m-ü".into(),
            },
            action: Action::Alias,
            ids: [id("user_id:u"), id("anonymous_id:a"), id("ga:x:y")]
                .into_iter()
                .collect(),
        };
        assert_eq!(decode_evidence(&encode_evidence(&e)).unwrap(), e);
        assert_eq!(evidence_key(&encode_evidence(&e)).unwrap(), e.key);
        let n = Named {
            created: 1,
            last_seen: 9,
            first: e.key.clone(),
            source_id: "src_1".into(),
        };
        assert_eq!(decode_named(&encode_named(&n)).unwrap(), n);
    }

    proptest! {
        /// On a timestamp tie the larger cell wins; it must be the smaller
        /// messageId's.
        #[test]
        fn the_larger_first_cell_is_the_smaller_message_id(a in "[ -~]{0,12}", b in "[ -~]{0,12}", s in "[a-z]{0,4}") {
            let cell = |m: &str| encode_first(&Named {
                created: 0,
                last_seen: 0,
                first: Key { received_at: 0, message_id: m.to_owned() },
                source_id: s.clone(),
            });
            if a < b {
                prop_assert!(cell(&a) > cell(&b));
            }
        }
    }
}
