//! The Avro schemas of the Trailmark log and the codec that writes and reads
//! log records.
//!
//! Every record in the log is an [`Event`] in Avro *single-object encoding*:
//! the two marker bytes `C3 01`, the 8-byte little-endian CRC-64-AVRO (Rabin)
//! fingerprint of the writer schema, then the Avro binary datum. The
//! fingerprint tells a reader which writer schema it faces, so a log written by
//! an older Trailmark stays readable.
//!
//! The schemas live as `.avsc` files beside this crate (`schemas/`), one per
//! version; the newest is the one written. On the hot path nothing is resolved
//! per record: [`EventCodec`] parses and resolves the schemas once, encodes
//! with a reused schema-aware serializer and decodes records of the current
//! schema straight into [`Event`] without a generic `Value`. Records of an
//! older schema take the slow path through Avro schema resolution, which is
//! correct for any compatible change (new fields with defaults).

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::writer::datum::GenericDatumWriter;
use trailmark_domain::Event;

/// The schema files, oldest first. The last one is written.
pub const EVENT_SCHEMAS: [&str; 3] = [
    include_str!("../event.v1.avsc"),
    include_str!("../event.v2.avsc"),
    include_str!("../event.v3.avsc"),
];

/// The two marker bytes that open an Avro single-object encoded record.
pub const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// Codec failures. Both are permanent: retrying the same bytes gives the same
/// answer.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record is not single-object encoded, or names a schema this build
    /// does not know.
    #[error("unknown record format: {0}")]
    UnknownFormat(String),
    /// Avro refused to write or read the datum.
    #[error("avro: {0}")]
    Avro(#[from] apache_avro::Error),
}

/// The codec's result type.
pub type Result<T> = std::result::Result<T, CodecError>;

struct Schemas {
    all: Vec<Schema>,
    fingerprints: Vec<[u8; 8]>,
}

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| {
    let all: Vec<Schema> = EVENT_SCHEMAS
        .iter()
        .map(|s| Schema::parse_str(s).expect("bundled event schema parses"))
        .collect();
    let fingerprints = all.iter().map(fingerprint).collect();
    Schemas { all, fingerprints }
});

/// The CRC-64-AVRO fingerprint of a schema, as single-object encoding writes it.
pub fn fingerprint(schema: &Schema) -> [u8; 8] {
    let fp = schema.fingerprint::<Rabin>();
    let mut out = [0u8; 8];
    out.copy_from_slice(&fp.bytes[..8]);
    out
}

/// The schema that new records are written with.
pub fn current_schema() -> &'static Schema {
    SCHEMAS.all.last().expect("at least one schema")
}

/// Writes and reads log records. Build one and share it; it is immutable.
pub struct EventCodec {
    writer: GenericDatumWriter<'static>,
    current: GenericDatumReader<'static>,
    header: [u8; HEADER_LEN],
    /// Resolving readers for every older schema, by fingerprint.
    older: HashMap<[u8; 8], GenericDatumReader<'static>>,
}

impl EventCodec {
    /// Builds the codec, resolving every schema once.
    pub fn new() -> Result<Self> {
        let schemas = &*SCHEMAS;
        let current = current_schema();
        let current_fp = *schemas.fingerprints.last().expect("at least one schema");
        let writer = GenericDatumWriter::builder(current)
            .resolved_schemata(ResolvedSchema::try_from(current)?)
            // The serializer follows the schema; validation would walk it twice.
            .validate(false)
            .human_readable(false)
            .build()?;
        let reader = GenericDatumReader::builder(current)
            .human_readable(false)
            .build()?;
        let mut older = HashMap::new();
        for (schema, fp) in schemas.all.iter().zip(&schemas.fingerprints) {
            if *fp == current_fp {
                continue;
            }
            let r = GenericDatumReader::builder(schema)
                .reader_schema(current)
                .human_readable(false)
                .build()?;
            older.insert(*fp, r);
        }
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&SINGLE_OBJECT_MARKER);
        header[2..].copy_from_slice(&current_fp);
        Ok(Self {
            writer,
            current: reader,
            header,
            older,
        })
    }

    /// Appends the single-object encoding of `event` to `out`.
    pub fn encode_into(&self, event: &Event, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&self.header);
        self.writer.write_ser(out, event)?;
        Ok(())
    }

    /// The single-object encoding of `event`.
    pub fn encode(&self, event: &Event) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(384);
        self.encode_into(event, &mut out)?;
        Ok(out)
    }

    /// Reads a record written with the current schema or any older one.
    pub fn decode(&self, record: &[u8]) -> Result<Event> {
        if record.len() < HEADER_LEN || record[..2] != SINGLE_OBJECT_MARKER {
            return Err(CodecError::UnknownFormat(
                "missing the avro single-object marker".into(),
            ));
        }
        let mut body = &record[HEADER_LEN..];
        if record[..HEADER_LEN] == self.header {
            return Ok(self.current.read_deser(&mut body)?);
        }
        let fp: [u8; 8] = record[2..HEADER_LEN].try_into().expect("8 bytes");
        let reader = self.older.get(&fp).ok_or_else(|| {
            CodecError::UnknownFormat(format!("unknown writer schema fingerprint {fp:02x?}"))
        })?;
        let value = reader.read_value(&mut body)?;
        Ok(apache_avro::from_value(&value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::GenericSingleObjectWriter;
    use apache_avro::schema_compatibility::SchemaCompatibility;
    use apache_avro::types::Value;
    use proptest::prelude::*;
    use trailmark_domain::EventType;

    fn sample() -> Event {
        Event {
            workspace_id: "ws_1".into(),
            source_id: "src_1".into(),
            message_id: "msg-1".into(),
            kind: EventType::Track,
            user_id: Some("u1".into()),
            anonymous_id: Some("a1".into()),
            event: Some("Order Completed".into()),
            name: None,
            category: None,
            group_id: None,
            previous_id: None,
            timestamp: 1_700_000_000_000_000,
            original_timestamp: Some(1_700_000_000_000_001),
            sent_at: None,
            received_at: 1_700_000_000_100_000,
            properties: Some(r#"{"total":12.5}"#.into()),
            traits: None,
            context: Some(r#"{"ip":"1.2.3.4"}"#.into()),
            integrations: None,
            request_ip: Some("127.0.0.1".into()),
            blocked_ids: vec!["user_id:null".into()],
            control: None,
        }
    }

    /// Writes `record` as an older Trailmark would have, with schema
    /// `version` (1-based), dropping the fields it did not have.
    fn written_by(version: usize, record: &Event, newer: &[&str]) -> Vec<u8> {
        let schema = &SCHEMAS.all[version - 1];
        let value = apache_avro::to_value(record).unwrap();
        let Value::Record(mut fields) = value else {
            panic!("record")
        };
        fields.retain(|(name, _)| !newer.contains(&name.as_str()));
        let value = Value::Record(fields).resolve(schema).unwrap();
        let mut bytes = Vec::new();
        GenericSingleObjectWriter::new_with_capacity(schema, 512)
            .unwrap()
            .write_value_ref(&value, &mut bytes)
            .unwrap();
        assert_eq!(&bytes[2..10], &SCHEMAS.fingerprints[version - 1]);
        bytes
    }

    #[test]
    fn a_v2_record_is_read_by_the_current_reader() {
        let mut record = sample();
        record.blocked_ids.clear();
        let bytes = written_by(2, &record, &["blocked_ids", "control"]);
        let decoded = EventCodec::new().unwrap().decode(&bytes).unwrap();
        assert_eq!(decoded, record);
        assert!(decoded.blocked_ids.is_empty() && decoded.control.is_none());
    }

    #[test]
    fn a_control_record_round_trips() {
        let mut record = sample();
        record.kind = EventType::Control;
        record.control = Some(trailmark_domain::event::Control {
            action: trailmark_domain::event::ControlAction::Split,
            identifiers: vec!["user_id:u1".into()],
        });
        let codec = EventCodec::new().unwrap();
        assert_eq!(
            codec.decode(&codec.encode(&record).unwrap()).unwrap(),
            record
        );
    }

    #[test]
    fn round_trips_the_current_schema() {
        let codec = EventCodec::new().unwrap();
        let bytes = codec.encode(&sample()).unwrap();
        assert_eq!(codec.decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn header_matches_apache_avro_single_object_writer() {
        let codec = EventCodec::new().unwrap();
        let ours = codec.encode(&sample()).unwrap();
        let value = apache_avro::to_value(sample()).unwrap();
        let value = value.resolve(current_schema()).unwrap();
        let mut theirs = Vec::new();
        GenericSingleObjectWriter::new_with_capacity(current_schema(), 512)
            .unwrap()
            .write_value_ref(&value, &mut theirs)
            .unwrap();
        assert_eq!(
            ours, theirs,
            "our encoding is byte-identical to apache-avro's"
        );
    }

    #[test]
    fn schemas_evolve_compatibly() {
        let schemas = &SCHEMAS.all;
        for w in schemas {
            SchemaCompatibility::can_read(w, current_schema())
                .expect("the current schema reads every older one");
        }
    }

    #[test]
    fn a_v1_record_is_read_by_the_current_reader() {
        // Write a record exactly as a v1 Trailmark would have, with v1's schema.
        let mut record = sample();
        record.request_ip = None;
        record.blocked_ids.clear();
        let bytes = written_by(1, &record, &["request_ip", "blocked_ids", "control"]);
        let codec = EventCodec::new().unwrap();
        let decoded = codec.decode(&bytes).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(decoded.request_ip, None, "the new field takes its default");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let codec = EventCodec::new().unwrap();
        assert!(codec.decode(b"").is_err());
        assert!(codec.decode(b"\xC3\x01\0\0\0\0\0\0\0\0").is_err());
        let mut bytes = codec.encode(&sample()).unwrap();
        bytes.truncate(bytes.len() - 5);
        assert!(codec.decode(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn any_event_round_trips(
            msg in "[a-zA-Z0-9-]{1,100}",
            user in proptest::option::of(".{0,40}"),
            anon in proptest::option::of(".{1,40}"),
            ts in any::<i64>(),
            props in proptest::option::of("\\{.{0,60}\\}"),
            kind in 0usize..6,
        ) {
            let codec = EventCodec::new().unwrap();
            let mut ev = sample();
            ev.message_id = msg;
            ev.user_id = user;
            ev.anonymous_id = anon;
            ev.timestamp = ts;
            ev.properties = props;
            ev.kind = EventType::ALL[kind];
            let bytes = codec.encode(&ev).unwrap();
            prop_assert_eq!(codec.decode(&bytes).unwrap(), ev);
        }
    }
}
