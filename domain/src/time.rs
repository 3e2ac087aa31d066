//! Timestamps: Trailmark keeps every time as microseconds since the Unix epoch
//! (UTC) and renders them as RFC 3339 with millisecond precision, as Segment does.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

/// Parses an ISO 8601 / RFC 3339 timestamp into microseconds since the epoch.
///
/// A timestamp without an offset is taken as UTC, as Segment's libraries do.
/// Only years 1 to 9999 are accepted, so that differences of two timestamps
/// (clock-skew correction) always fit in an `i64`.
pub fn parse_micros(s: &str) -> Option<i64> {
    parse_unbounded(s).filter(|t| (MIN_MICROS..=MAX_MICROS).contains(t))
}

/// 0001-01-01T00:00:00Z.
const MIN_MICROS: i64 = -62_135_596_800_000_000;
/// 9999-12-31T23:59:59.999999Z.
const MAX_MICROS: i64 = 253_402_300_799_999_999;

fn parse_unbounded(s: &str) -> Option<i64> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_micros());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(dt.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|dt| dt.and_utc().timestamp_micros());
    }
    None
}

/// Renders microseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_micros(micros: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(micros) {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => String::from("1970-01-01T00:00:00.000Z"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_rfc3339() {
        let m = parse_micros("2024-05-01T12:30:45.123Z").unwrap();
        assert_eq!(format_micros(m), "2024-05-01T12:30:45.123Z");
        assert_eq!(parse_micros("2024-05-01T14:30:45.123+02:00"), Some(m));
        assert_eq!(parse_micros("2024-05-01T12:30:45.123"), Some(m));
    }

    #[test]
    fn bounds_the_year() {
        assert!(parse_micros("0001-01-01T00:00:00Z").is_some());
        assert!(parse_micros("9999-12-31T23:59:59Z").is_some());
        assert_eq!(parse_micros("+262142-12-31T00:00:00"), None);
        assert_eq!(parse_micros("-262143-01-01T00:00:00"), None);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_micros("yesterday"), None);
        assert_eq!(parse_micros(""), None);
    }
}
