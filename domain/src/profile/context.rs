//! Reading the parts of an event's `context` that the fold uses: its
//! `traits` and `externalIds`, as raw JSON, without building the rest.

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::FoldError;
use crate::event::{IdKind, Identifier, MAX_EXTERNAL_IDS};
use crate::json::last_wins;

/// The parts of `context` that the fold reads, as raw JSON; a repeated key
/// keeps its last value, as everywhere else.
#[derive(Debug, Default)]
pub(crate) struct ContextView<'a> {
    traits: Option<&'a RawValue>,
    external_ids: Option<&'a RawValue>,
}

last_wins!(ContextView {
    "traits" => traits,
    "externalIds" => external_ids,
});

/// One entry of `context.externalIds`.
#[derive(Debug, Default)]
struct ExternalIdView<'a> {
    id: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
}

last_wins!(ExternalIdView {
    "id" => id,
    "type" => kind,
});

impl<'a> ContextView<'a> {
    /// Reads the `context` object's text.
    pub(crate) fn read(text: &'a str) -> Result<Self, FoldError> {
        serde_json::from_str(text).map_err(|e| FoldError::new("context", format!("{e}")))
    }

    /// `context.traits`, when it is an object (anything else is not traits).
    pub(super) fn traits(&self) -> Result<Option<Map<String, Value>>, FoldError> {
        match self.traits {
            Some(t) if t.get().starts_with('{') => serde_json::from_str(t.get())
                .map(Some)
                .map_err(|e| FoldError::new("context.traits", format!("{e}"))),
            _ => Ok(None),
        }
    }

    /// The identifiers of `context.externalIds`: a list of at most
    /// [`MAX_EXTERNAL_IDS`] objects, each with a valid `type` (see
    /// [`IdKind::check`]) and an `id` string or number.
    pub(crate) fn external_ids(&self) -> Result<Vec<Identifier>, FoldError> {
        const FIELD: &str = "context.externalIds";
        let Some(raw) = self.external_ids.filter(|r| r.get() != "null") else {
            return Ok(Vec::new());
        };
        let items: Vec<&RawValue> = serde_json::from_str(raw.get())
            .map_err(|_| FoldError::new(FIELD, "must be a list of {id, type} objects"))?;
        if items.len() > MAX_EXTERNAL_IDS {
            return Err(FoldError::new(
                FIELD,
                format!(
                    "holds {} ids, more than the limit of {MAX_EXTERNAL_IDS}",
                    items.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let at = |part: &str| format!("{FIELD}[{i}]{part}");
            let x: ExternalIdView<'_> = serde_json::from_str(item.get())
                .map_err(|_| FoldError::new(at(""), "must be an {id, type} object"))?;
            let kind = match x
                .kind
                .map(|k| serde_json::from_str::<Cow<'_, str>>(k.get()))
            {
                Some(Ok(k)) => k,
                _ => return Err(FoldError::new(at(".type"), "must be a string")),
            };
            IdKind::check(&kind).map_err(|m| FoldError::new(at(".type"), m))?;
            let id = match x.id.map(|v| serde_json::from_str::<Value>(v.get())) {
                Some(Ok(Value::String(s))) => s,
                Some(Ok(Value::Number(n))) => n.to_string(),
                _ => {
                    return Err(FoldError::new(at(".id"), "must be a string or a number"));
                }
            };
            Identifier::check_value(&id).map_err(|m| FoldError::new(at(".id"), m))?;
            out.push(Identifier::new(IdKind::parse(&kind), id));
        }
        Ok(out)
    }
}

/// An email that links a profile: a trimmed string that is a valid
/// identifier value. A longer one stays a trait but links nothing.
pub(super) fn email_of(traits: &Map<String, Value>) -> Option<&str> {
    traits
        .get("email")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|e| Identifier::check_value(e).is_ok())
}
