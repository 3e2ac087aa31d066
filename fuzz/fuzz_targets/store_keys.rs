//! Fuzzes the embedded store's key layout (`trailmark_store::embedded::keys`).
//!
//! The input is split at its first two `0xFF` bytes into a workspace, an id
//! type and an id value for identifier A, and the rest likewise for B (any
//! bytes, NULs and escapes included: the layout must not rely on ingest's
//! checks). It asserts that A's key is a prefix of B's exactly when A and B
//! are the same, so that no identifier's prefix or range scan can read
//! another's rows, and that every key reads back as written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trailmark_domain::{IdKind, Identifier};
use trailmark_store::embedded::keys::{take_component, take_id, ws_id_key};

fn three(b: &[u8]) -> (String, Identifier, &[u8]) {
    let mut parts = b.splitn(4, |&c| c == 0xFF);
    let mut text = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let ws = text();
    let kind = text();
    let value = text();
    let rest = parts.next().unwrap_or_default();
    (ws, Identifier::new(IdKind::parse(&kind), value), rest)
}

fuzz_target!(|data: &[u8]| {
    let (ws_a, a, rest) = three(data);
    let (ws_b, b, _) = three(rest);
    let ka = ws_id_key(&ws_a, &a);
    let kb = ws_id_key(&ws_b, &b);
    let same = ws_a == ws_b && a == b;
    assert_eq!(
        kb.starts_with(&ka),
        same,
        "{ws_a:?} {a:?} vs {ws_b:?} {b:?}"
    );
    assert_eq!(ka.cmp(&kb) == std::cmp::Ordering::Equal, same);
    let (ws, tail) = take_component(&ka).expect("a key reads back");
    assert_eq!(ws, ws_a.as_bytes());
    let (id, tail) = take_id(tail).expect("an identifier reads back");
    assert_eq!(id.kind.as_str(), a.kind.as_str());
    assert_eq!(id.value, a.value);
    assert!(tail.is_empty());
});
