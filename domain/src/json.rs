//! Reading JSON objects the way browsers do.
//!
//! Segment's API, and `JSON.parse`, accept an object that repeats a key and
//! keep the last value; real SDKs send such objects (the Rust `segment` crate
//! repeats `userId`, `rudderanalytics` repeats `type`). serde's derive
//! refuses them with "duplicate field", so the structs that read Segment
//! objects implement `Deserialize` with [`last_wins!`] instead: one pass,
//! no allocation per key, unknown keys skipped, a repeated key overwriting.

/// Implements `Deserialize<'de>` for `$name<'de>`, a `Default` struct whose
/// fields are `Option`s, reading a JSON object in which the last of a
/// repeated key wins and unknown keys are skipped.
macro_rules! last_wins {
    ($name:ident { $($key:literal => $field:ident),* $(,)? }) => {
        impl<'de> serde::Deserialize<'de> for $name<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[allow(non_camel_case_types)]
                enum Key {
                    $($field,)*
                    Other,
                }
                impl<'de> serde::Deserialize<'de> for Key {
                    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                        struct KeyVisitor;
                        impl serde::de::Visitor<'_> for KeyVisitor {
                            type Value = Key;
                            fn expecting(
                                &self,
                                f: &mut std::fmt::Formatter<'_>,
                            ) -> std::fmt::Result {
                                f.write_str("a key")
                            }
                            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key, E> {
                                Ok(match s {
                                    $($key => Key::$field,)*
                                    _ => Key::Other,
                                })
                            }
                        }
                        d.deserialize_identifier(KeyVisitor)
                    }
                }
                struct ObjectVisitor;
                impl<'de> serde::de::Visitor<'de> for ObjectVisitor {
                    type Value = $name<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a json object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Self::Value, A::Error> {
                        let mut out = $name::default();
                        while let Some(key) = map.next_key::<Key>()? {
                            match key {
                                $(Key::$field => out.$field = map.next_value()?,)*
                                Key::Other => {
                                    map.next_value::<serde::de::IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(ObjectVisitor)
            }
        }
    };
}

pub(crate) use last_wins;
