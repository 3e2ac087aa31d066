//! Fuzzes the text form of audience definitions
//! (`trailmark_domain::audience::query`) with arbitrary UTF-8.
//!
//! Definitions arrive from API clients, so `parse_query` must never panic
//! nor recurse without bound, whatever the text. Besides that, it asserts:
//!
//! - an error names the path `query` and points at a character boundary
//!   inside the text, and its message ends with the line and column;
//! - an accepted definition is within the limits (`check_limits`), and its
//!   canonical text (`to_query`) reads back to the same tree. The canonical
//!   text can be longer than the input (spaces around operators, escapes for
//!   control characters), so the round trip is checked when it fits in
//!   `MAX_QUERY_BYTES`.
//!
//! Run it from `fuzz/` (see `fuzz/README.md`):
//! `cargo +nightly fuzz run audience_query corpus/audience_query`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trailmark_domain::audience::check_limits;
use trailmark_domain::audience::query::{MAX_QUERY_BYTES, parse_query, to_query};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_query(text) {
        Ok(c) => {
            assert!(
                check_limits(&c, "query").is_ok(),
                "accepted past the limits: {c:?}"
            );
            let written = to_query(&c);
            if written.len() <= MAX_QUERY_BYTES {
                assert_eq!(parse_query(&written), Ok(c), "written as {written:?}");
            }
        }
        Err(e) => {
            assert_eq!(e.path, "query");
            let at = e.position.expect("a text error has a position");
            assert!(at <= text.len() && text.is_char_boundary(at), "{e:?}");
            assert!(e.message.contains(" at "), "{e:?}");
        }
    }
});
