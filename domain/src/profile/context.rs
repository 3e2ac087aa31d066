//! Reading the parts of an event's `context` that the fold uses: its
//! `traits`, `externalIds` and `groupId`, as raw JSON, without building the
//! rest.

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
    group_id: Option<&'a RawValue>,
}

last_wins!(ContextView {
    "traits" => traits,
    "externalIds" => external_ids,
    "groupId" => group_id,
});

/// One entry of `context.externalIds`.
#[derive(Debug, Default)]
struct ExternalIdView<'a> {
    id: Option<&'a RawValue>,
    kind: Option<&'a RawValue>,
    collection: Option<&'a RawValue>,
}

last_wins!(ExternalIdView {
    "id" => id,
    "type" => kind,
    "collection" => collection,
});

/// The identifiers `context.externalIds` names, by collection.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ExternalIds {
    /// Of people (`collection` absent or `users`, and any type but
    /// `group_id`).
    pub(crate) users: Vec<Identifier>,
    /// The accounts: the ids of type `group_id`, whatever their collection.
    /// Other ids of the `accounts` collection are accepted and dropped:
    /// accounts are keyed by `group_id` only.
    pub(crate) accounts: Vec<String>,
}

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

    /// `context.groupId`, when it is a string or a number that is a valid
    /// identifier value: the account a `track` (or any call) is made for, as
    /// Segment's accounts collection reads it. Anything else names no account
    /// and stays in the payload, since `context` is free-form.
    pub(crate) fn group_id(&self) -> Option<String> {
        let id = match serde_json::from_str::<Value>(self.group_id?.get()).ok()? {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Identifier::check_value(&id).is_ok().then_some(id)
    }

    /// The identifiers of `context.externalIds`: a list of at most
    /// [`MAX_EXTERNAL_IDS`] objects, each with a valid `type` (see
    /// [`IdKind::check`]), an `id` string or number, and an optional
    /// `collection` string.
    pub(crate) fn external_ids(&self) -> Result<ExternalIds, FoldError> {
        const FIELD: &str = "context.externalIds";
        let mut out = ExternalIds::default();
        let Some(raw) = self.external_ids.filter(|r| r.get() != "null") else {
            return Ok(out);
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
            let collection = match x
                .collection
                .map(|c| serde_json::from_str::<Option<Cow<'_, str>>>(c.get()))
            {
                None | Some(Ok(None)) => None,
                Some(Ok(Some(c))) => Some(c),
                Some(Err(_)) => {
                    return Err(FoldError::new(at(".collection"), "must be a string"));
                }
            };
            match (IdKind::parse(&kind), collection.as_deref()) {
                (IdKind::GroupId, _) => out.accounts.push(id),
                (_, Some("accounts")) => {}
                (kind, _) => out.users.push(Identifier::new(kind, id)),
            }
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
