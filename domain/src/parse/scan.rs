//! One pass over JSON object text that ingest keeps verbatim, to refuse what
//! `RawValue` accepts but the rest of Trailmark could not read back.
//!
//! `RawValue` checks structure only. Stored as is, three things would break
//! a later reader after the event was acknowledged: a lone UTF-16 surrogate
//! escape and a number beyond the range of a double (neither decodes into a
//! `serde_json::Value`, so the projector would drop every trait of the
//! event), and nesting deeper than a reader's recursion limit (serde_json
//! stops at 128 levels; a timeline read of such an event failed). The scan
//! refuses all three, with [`MAX_DEPTH`] well below any reader's limit.

/// The deepest nesting of objects and arrays accepted in `properties`,
/// `traits`, `context` and `integrations`: `{}` is depth 1, `{"a":[{}]}` 3.
pub const MAX_DEPTH: usize = 64;

/// Why well-formed JSON text could not be read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unreadable {
    /// A lone UTF-16 surrogate escape.
    Surrogate,
    /// A number beyond the range of a double.
    Number,
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep,
}

impl Unreadable {
    /// The error code ingest answers with.
    pub(super) fn code(self) -> &'static str {
        match self {
            Unreadable::TooDeep => "too_deep",
            Unreadable::Surrogate | Unreadable::Number => "invalid_field",
        }
    }
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Surrogate => f.write_str("an unpaired utf-16 surrogate escape"),
            Unreadable::Number => f.write_str("a number outside the range of a double"),
            Unreadable::TooDeep => write!(f, "more than {MAX_DEPTH} levels of nesting"),
        }
    }
}

/// What a successful [`scan`] noticed on the way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Scanned {
    /// Whether the text holds the string `"externalIds"` directly inside the
    /// outer object, or any `\u` escape (which could spell it): only then
    /// can it be an object with an `externalIds` key, which ingest must check.
    pub(super) may_name_external_ids: bool,
}

/// Why well-formed JSON text could not be read back, if it could not.
#[cfg(test)]
pub(super) fn unreadable(text: &str) -> Option<Unreadable> {
    scan(text).err()
}

/// Scans well-formed JSON text: refuses what could not be read back, and
/// notes what ingest must look at more closely.
///
/// Strings are skipped at `memchr`'s speed; a number is handed to serde_json
/// only when it has an exponent or more than 300 characters, the only ones
/// that can fall outside a double's range, so that verdict is serde_json's.
pub(super) fn scan(text: &str) -> Result<Scanned, Unreadable> {
    fn hex4(b: &[u8]) -> Option<u16> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    }
    const KEY: &[u8] = b"externalIds\"";
    let surrogate = || Err(Unreadable::Surrogate);
    let mut seen = Scanned::default();
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut in_string = false;
    while i < b.len() {
        if in_string {
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
                    seen.may_name_external_ids = true;
                    let Some(unit) = hex4(&b[i + 2..]) else {
                        return surrogate();
                    };
                    i += 6;
                    match unit {
                        0xD800..=0xDBFF => {
                            let low = (b.get(i) == Some(&b'\\') && b.get(i + 1) == Some(&b'u'))
                                .then(|| hex4(&b[i + 2..]))
                                .flatten();
                            match low {
                                Some(0xDC00..=0xDFFF) => i += 6,
                                _ => return surrogate(),
                            }
                        }
                        0xDC00..=0xDFFF => return surrogate(),
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
                // Only a key of the object itself matters, and its first
                // byte alone rules out almost every string.
                if depth == 1 && b.get(i) == Some(&b'e') && b[i..].starts_with(KEY) {
                    seen.may_name_external_ids = true;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Unreadable::TooDeep);
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
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
                if (exponent || i - start > 300)
                    && serde_json::from_str::<f64>(&text[start..i]).is_err()
                {
                    return Err(Unreadable::Number);
                }
            }
            _ => i += 1,
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "{\"a\":".repeat(depth - 1) + "{", "}".repeat(depth))
    }

    #[test]
    fn depth_counts_objects_and_arrays_outside_strings() {
        assert_eq!(unreadable(&nested(MAX_DEPTH)), None);
        assert_eq!(
            unreadable(&nested(MAX_DEPTH + 1)),
            Some(Unreadable::TooDeep)
        );
        let arrays = format!(
            "{{\"a\":{}{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(unreadable(&arrays).is_some());
        let in_string = format!("{{\"a\":\"{}\"}}", "{[".repeat(500));
        assert_eq!(unreadable(&in_string), None);
        // Siblings do not add up.
        let inner = nested(MAX_DEPTH - 1);
        let wide = format!("{{\"a\":{inner},\"b\":{inner}}}");
        assert_eq!(unreadable(&wide), None);
    }

    #[test]
    fn notes_what_may_name_external_ids() {
        let may = |t: &str| scan(t).unwrap().may_name_external_ids;
        assert!(may(r#"{"externalIds":[]}"#));
        assert!(may(r#"{"a":1,"externalIds":null}"#));
        assert!(may(r#"{"\u0065xternalIds":[]}"#));
        assert!(may(r#"{"a":"\u00e9"}"#));
        assert!(!may(
            r#"{"library":{"name":"analytics.js"},"ip":"1.2.3.4"}"#
        ));
        assert!(!may(r#"{"externalIdsX":[]}"#));
        assert!(!may(r#"{"a":{"externalIds":[]}}"#));
        assert!(!may(r#"{"a":"\\u"}"#));
    }
}
