//! The text form of definitions: a subset of Segment's query language.
//! (Being written; see the `query` helper's brief.)

use super::DefinitionError;
use super::ast::Condition;

/// Parses the text form into the same tree as the JSON form.
pub fn parse_query(text: &str) -> Result<Condition, DefinitionError> {
    let _ = text;
    Err(DefinitionError::new(
        "query",
        "the text form is not available yet",
    ))
}
