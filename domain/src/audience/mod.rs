//! Audiences and computed traits: the definition language and what a
//! definition means, with no IO.
//!
//! # Definitions
//! A definition is a closed, typed tree ([`ast`]): `and`, `or` and `not` over
//! leaves (trait predicates, event conditions, first/last seen, computed-trait
//! predicates, membership of another audience). It is read from JSON
//! ([`json`]) or from a subset of Segment's query language ([`query`]), and
//! nothing in it is ever run as code. Limits ([`ast::MAX_LEAVES`] leaves,
//! [`ast::MAX_DEPTH`] levels, counts up to [`ast::MAX_COUNT`], ...) are
//! checked when it is read; an error names the path at fault.
//!
//! # Meaning
//! Whether a profile is a member at time `now` is a pure function of the
//! profile's data and `now` ([`eval`]):
//! - traits are the profile's merged traits; values compare by
//!   [`ast::Op::test`];
//! - an event condition counts the profile's events (each identifier's own
//!   events, de-duplicated as the profile fold does) that match the filter
//!   with an event time in the window: `time > now - W` for "the last W",
//!   `from <= time < to` for "between", and every event for "ever";
//! - first and last seen are the profile's earliest and latest event times;
//! - computed traits are computed first, and audiences a definition refers
//!   to are evaluated before it (references never form a cycle).
//!
//! Every leaf that depends on `now` also says when it may next change (its
//! deadline): an event condition when its oldest event in the window leaves
//! it, a seen condition when the time leaves its window. A profile's deadline
//! is the earliest of its leaves', so an evaluator that re-evaluates each
//! profile at its deadline, and whenever its data changes, always holds the
//! membership a batch evaluation at the same `now` would give.
//!
//! # State
//! What an evaluator keeps per identifier and leaf ([`leaf`]) is small and
//! bounded: for an event condition counting to `N`, the newest `N + 1`
//! matching events; for a computed trait, one aggregate (lifetime) or one per
//! hour (sliding windows up to 30 days) or day (longer). State is kept per
//! identifier and merged on read, like every other fact of a profile, so a
//! merge or a split of profiles needs no rewrite.

pub mod ast;
mod catalog;
pub mod eval;
pub mod json;
pub mod leaf;
mod model;
pub mod query;
pub mod value;

pub use catalog::{AudienceDef, Catalog, Changed, Evaluation, Plan, TraitDef, Verdicts};
pub use model::AudienceModel;

use std::collections::{BTreeMap, BTreeSet};

use ast::*;

/// A definition that cannot be accepted: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DefinitionError {
    /// The path at fault, such as `definition.and[2].op`, or `query` for the
    /// text form.
    pub path: String,
    /// Why, lowercase.
    pub message: String,
    /// For the text form, the byte offset in the text where the error is.
    pub position: Option<usize>,
}

impl DefinitionError {
    /// An error at `path`.
    pub fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            message: message.into(),
            position: None,
        }
    }
}

/// Checks the limits of a whole condition: leaves, depth, and the limits of
/// each leaf.
pub fn check_limits(c: &Condition, path: &str) -> Result<(), DefinitionError> {
    let depth = c.depth();
    if depth > MAX_DEPTH {
        return Err(DefinitionError::new(
            &deepest_path(c, path),
            format!("nested {depth} deep; at most {MAX_DEPTH}"),
        ));
    }
    let leaves = c.leaves().len();
    if leaves > MAX_LEAVES {
        return Err(DefinitionError::new(
            path,
            format!("{leaves} conditions; at most {MAX_LEAVES}"),
        ));
    }
    Ok(())
}

/// The path to the deepest leaf, which a too-deep definition names.
fn deepest_path(c: &Condition, path: &str) -> String {
    match c {
        Condition::And(cs) | Condition::Or(cs) => {
            let kind = if matches!(c, Condition::And(_)) {
                "and"
            } else {
                "or"
            };
            match cs
                .iter()
                .enumerate()
                .max_by_key(|(i, c)| (c.depth(), usize::MAX - i))
            {
                Some((i, child)) => deepest_path(child, &format!("{path}.{kind}[{i}]")),
                None => path.to_owned(),
            }
        }
        Condition::Not(child) => deepest_path(child, &format!("{path}.not")),
        _ => path.to_owned(),
    }
}

/// Checks a sliding window's length.
pub(crate) fn check_window(w: &Window, path: &str, max: i64) -> Result<(), DefinitionError> {
    if let Window::Last { micros, .. } = *w
        && !(MINUTE_MICROS..=max).contains(&micros)
    {
        return Err(DefinitionError::new(
            path,
            format!("a window from 1 minute to {} days", max / DAY_MICROS),
        ));
    }
    Ok(())
}

/// Checks a computed trait: the property its reducer needs, and a window it
/// can keep.
pub(crate) fn check_computed_trait(ct: &ComputedTrait, path: &str) -> Result<(), DefinitionError> {
    match (&ct.property, ct.reducer.needs_property()) {
        (None, true) => {
            return Err(DefinitionError::new(
                &format!("{path}.property"),
                format!("{} needs a property", ct.reducer.as_str()),
            ));
        }
        (Some(_), false) => {
            return Err(DefinitionError::new(
                &format!("{path}.property"),
                "count takes no property",
            ));
        }
        _ => {}
    }
    match ct.window {
        Window::Between { .. } => Err(DefinitionError::new(
            &format!("{path}.within"),
            "a computed trait is lifetime (\"ever\") or over the last minutes, hours or days",
        )),
        w => check_window(&w, &format!("{path}.within"), MAX_TRAIT_WINDOW_MICROS),
    }
}

/// Checks a trait, property or event name.
pub(crate) fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_STRING {
        return Err(format!("1 to {MAX_STRING} bytes"));
    }
    Ok(())
}

/// Checks a definition key: 1 to 64 of `a-z`, `0-9`, `_` and `-`, starting
/// with a letter. Keys name properties of the events the evaluator emits
/// (`audience_key`) and traits, so they stay plain.
pub fn check_key(s: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err("1 to 64 of a-z, 0-9, _ and -, starting with a letter".into())
    }
}

/// The source of the events the evaluator appends to the log. The profile
/// fold keeps them in timelines only (they name, link, set and count
/// nothing, so they never move a profile's seen times or decide its holder),
/// and the evaluator skips them, so it never feeds on its own output.
pub const EVALUATOR_SOURCE: &str = "trailmark-evaluator";

/// The events the evaluator itself appends. Definitions may not count them,
/// so the evaluator never feeds on its own output.
pub const GENERATED_EVENTS: [&str; 3] = [
    "Audience Entered",
    "Audience Exited",
    "Computed Trait Changed",
];

/// Checks how a workspace's definitions refer to each other: every audience
/// and computed trait referred to exists, no audience refers to itself
/// through others, and nothing counts the events the evaluator emits.
/// `audiences` maps each audience key to its condition; `path_of` names the
/// definition being checked in errors.
pub fn check_references(
    audiences: &BTreeMap<String, Condition>,
    computed_traits: &BTreeSet<String>,
    checking: &str,
    path: &str,
) -> Result<(), DefinitionError> {
    let Some(c) = audiences.get(checking) else {
        return Ok(());
    };
    for leaf in c.leaves() {
        match leaf {
            Condition::ComputedTrait(p) if !computed_traits.contains(&p.name) => {
                return Err(DefinitionError::new(
                    path,
                    format!("no computed trait has the key {:?}", p.name),
                ));
            }
            Condition::Audience(k) if !audiences.contains_key(k) => {
                return Err(DefinitionError::new(
                    path,
                    format!("no audience has the key {k:?}"),
                ));
            }
            Condition::Event(e) if GENERATED_EVENTS.contains(&e.filter.event.as_str()) => {
                return Err(DefinitionError::new(
                    path,
                    format!(
                        "{:?} is emitted by the evaluator and cannot be counted; refer to the audience instead",
                        e.filter.event
                    ),
                ));
            }
            _ => {}
        }
    }
    // Depth-first search from `checking` for a path back to it.
    let mut stack = vec![(checking, vec![checking])];
    let mut seen = BTreeSet::new();
    while let Some((key, trail)) = stack.pop() {
        let Some(cond) = audiences.get(key) else {
            continue;
        };
        for next in cond.audiences() {
            if next == checking {
                let mut cycle = trail.clone();
                cycle.push(next);
                return Err(DefinitionError::new(
                    path,
                    format!(
                        "audiences refer to each other in a cycle: {}",
                        cycle.join(" -> ")
                    ),
                ));
            }
            if seen.insert(next) {
                let mut t = trail.clone();
                t.push(next);
                stack.push((next, t));
            }
        }
    }
    Ok(())
}

/// The audiences of a workspace in an order where each comes after every
/// audience it refers to (references must already be checked acyclic).
pub fn evaluation_order(audiences: &BTreeMap<String, Condition>) -> Vec<String> {
    fn visit(
        key: &str,
        audiences: &BTreeMap<String, Condition>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
        depth: usize,
    ) {
        if done.contains(key) || depth > audiences.len() {
            return;
        }
        if let Some(c) = audiences.get(key) {
            for dep in c.audiences() {
                visit(dep, audiences, done, out, depth + 1);
            }
            done.insert(key.to_owned());
            out.push(key.to_owned());
        }
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for key in audiences.keys() {
        visit(key, audiences, &mut done, &mut out, 0);
    }
    out
}

#[cfg(test)]
mod tests;
