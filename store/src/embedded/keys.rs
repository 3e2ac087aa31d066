//! How the embedded store spells its keys and rows.
//!
//! Every variable-length key component (a workspace, an id type, an id
//! value, a consumer) is written as a **terminated, escaped** byte string:
//! a NUL inside it becomes `00 02`, and it ends with `00 01`. That is a
//! prefix code: no component's spelling is a prefix of another's, so the
//! rows of one `(workspace, identifier)` can never be a prefix of, or fall
//! inside the range of, another's, whatever bytes a client put in an id
//! (ingest refuses NULs, but the layout does not rely on it). It also keeps
//! byte order equal to the components' order, so range scans still work.
//! Only the last component of a key (a trait name, a `messageId`) is written
//! bare, since nothing follows it.

use trailmark_domain::{IdKind, Identifier};

use crate::{Result, StoreError};

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// The version of this layout. A store written with another is emptied of
/// projections on open and rebuilt from the log (see `EmbeddedStore::open`).
/// Version 3: emails are stored trimmed and lower-cased (issue 10).
/// Version 4: identity kept as evidence, decided on read (issue 10).
/// Version 5: accounts and memberships; the de-duplication purge index is
/// per partition (issue 10).
/// Version 6: de-duplication rows are per consumer (issue 11).
pub const LAYOUT_VERSION: u32 = 6;

/// Appends one terminated, escaped component.
pub fn push_component(key: &mut Vec<u8>, part: &[u8]) {
    let mut rest = part;
    while let Some(i) = memchr::memchr(0, rest) {
        key.extend_from_slice(&rest[..i]);
        key.extend_from_slice(&[0, 2]);
        rest = &rest[i + 1..];
    }
    key.extend_from_slice(rest);
    key.extend_from_slice(&[0, 1]);
}

/// Reads one component from the front of `b`; returns it and the rest.
pub fn take_component(b: &[u8]) -> Result<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut rest = b;
    loop {
        let i = memchr::memchr(0, rest).ok_or_else(|| corrupt("unterminated key component"))?;
        out.extend_from_slice(&rest[..i]);
        match rest.get(i + 1) {
            Some(1) => return Ok((out, &rest[i + 2..])),
            Some(2) => {
                out.push(0);
                rest = &rest[i + 2..];
            }
            _ => return Err(corrupt("bad key escape")),
        }
    }
}

/// Appends an identifier: its type, then its value.
pub fn push_id(key: &mut Vec<u8>, id: &Identifier) {
    push_component(key, id.kind.as_str().as_bytes());
    push_component(key, id.value.as_bytes());
}

/// Reads an identifier from the front of `b`; returns it and the rest.
pub fn take_id(b: &[u8]) -> Result<(Identifier, &[u8])> {
    let (kind, rest) = take_component(b)?;
    let (value, rest) = take_component(rest)?;
    let text = |v: Vec<u8>| String::from_utf8(v).map_err(|_| corrupt("identifier is not utf-8"));
    Ok((
        Identifier::new(IdKind::parse(&text(kind)?), text(value)?),
        rest,
    ))
}

/// `ws id`: the key of an identifier's one-row facts, and the prefix of its
/// many-row facts (traits, timeline, members).
pub fn ws_id_key(ws: &str, id: &Identifier) -> Vec<u8> {
    let mut k = Vec::with_capacity(ws.len() + id.value.len() + 24);
    push_component(&mut k, ws.as_bytes());
    push_id(&mut k, id);
    k
}

/// `ws`: the prefix of a workspace's rows.
pub fn ws_key(ws: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ws.len() + 2);
    push_component(&mut k, ws.as_bytes());
    k
}

/// `consumer partition`.
pub fn checkpoint_key(consumer: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(consumer.len() + 6);
    push_component(&mut k, consumer.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Times as 8 big-endian bytes with the sign bit flipped: byte order is time
/// order.
pub fn time_bytes(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

/// Reads a time written by [`time_bytes`].
pub fn time_from(b: &[u8]) -> Result<i64> {
    let arr: [u8; 8] = b.try_into().map_err(|_| corrupt("time field"))?;
    Ok((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        // Small alphabets make shared prefixes, NULs and escapes likely.
        proptest::string::string_regex("[a\\x00\\x01\\x02:_]{0,6}").unwrap()
    }

    fn id() -> impl Strategy<Value = Identifier> {
        (text(), text()).prop_map(|(k, v)| Identifier::new(IdKind::parse(&k), v))
    }

    proptest! {
        /// No (workspace, identifier) key is a prefix of another's, so a
        /// prefix or range scan of one never reads another's rows.
        #[test]
        fn identifier_keys_are_prefix_free(a in (text(), id()), b in (text(), id())) {
            let ka = ws_id_key(&a.0, &a.1);
            let kb = ws_id_key(&b.0, &b.1);
            prop_assert_eq!(kb.starts_with(&ka), a == b);
            prop_assert_eq!(ka.starts_with(&kb), a == b);
        }

        /// Components read back as written, and order as their bytes do.
        #[test]
        fn components_round_trip_and_keep_order(a in text(), b in text(), tail in text()) {
            let mut ka = Vec::new();
            push_component(&mut ka, a.as_bytes());
            let mut kb = Vec::new();
            push_component(&mut kb, b.as_bytes());
            prop_assert_eq!(ka.cmp(&kb), a.as_bytes().cmp(b.as_bytes()));
            ka.extend_from_slice(tail.as_bytes());
            let (back, rest) = take_component(&ka).unwrap();
            prop_assert_eq!(back, a.as_bytes().to_vec());
            prop_assert_eq!(rest, tail.as_bytes());
        }

        #[test]
        fn identifiers_round_trip(ws in text(), i in id()) {
            let key = ws_id_key(&ws, &i);
            let (w, rest) = take_component(&key).unwrap();
            prop_assert_eq!(w, ws.as_bytes().to_vec());
            let (back, rest) = take_id(rest).unwrap();
            prop_assert_eq!(back, i);
            prop_assert!(rest.is_empty());
        }
    }

    #[test]
    fn time_encoding_orders_like_time() {
        let ts = [i64::MIN, -5, -1, 0, 1, 1_700_000_000_000_000, i64::MAX];
        for w in ts.windows(2) {
            assert!(time_bytes(w[0]) < time_bytes(w[1]));
            assert_eq!(time_from(&time_bytes(w[0])).unwrap(), w[0]);
        }
    }
}
