//! The JSON form of definitions: read with an error naming the path at
//! fault (`definition.and[2].op`), and written back the same way. Every
//! object is closed: an unknown key is an error, not ignored.

use serde_json::{Map, Value, json};

use super::DefinitionError;
use super::ast::*;
use crate::time::parse_micros;

/// Reads a condition from its JSON form; `path` names where it sits in the
/// request (`definition`).
pub fn condition_from_json(v: &Value, path: &str) -> Result<Condition, DefinitionError> {
    let c = read_condition(v, path)?;
    super::check_limits(&c, path)?;
    Ok(c)
}

/// Reads a computed trait's definition from its JSON form.
pub fn computed_trait_from_json(v: &Value, path: &str) -> Result<ComputedTrait, DefinitionError> {
    let obj = object(v, path)?;
    closed(
        obj,
        path,
        &["reducer", "event", "where", "property", "within", "round"],
    )?;
    let reducer_path = format!("{path}.reducer");
    let reducer = Reducer::parse(string(required(obj, "reducer", path)?, &reducer_path)?)
        .ok_or_else(|| {
            DefinitionError::new(
                &reducer_path,
                format!(
                    "unknown reducer; one of {}",
                    Reducer::ALL.map(Reducer::as_str).join(", ")
                ),
            )
        })?;
    let filter = event_filter(obj, path)?;
    let property = match obj.get("property") {
        Some(p) => Some(name(p, &format!("{path}.property"))?),
        None => None,
    };
    let window = match obj.get("within") {
        Some(w) => window(w, &format!("{path}.within"))?,
        None => Window::Ever,
    };
    let round = match obj.get("round") {
        Some(r) => {
            let rp = format!("{path}.round");
            let n = r
                .as_u64()
                .filter(|n| *n <= 6)
                .ok_or_else(|| DefinitionError::new(&rp, "a whole number from 0 to 6"))?;
            Some(n as u8)
        }
        None => None,
    };
    let ct = ComputedTrait {
        reducer,
        filter,
        property,
        window,
        round,
    };
    super::check_computed_trait(&ct, path)?;
    Ok(ct)
}

fn read_condition(v: &Value, path: &str) -> Result<Condition, DefinitionError> {
    let obj = object(v, path)?;
    const KINDS: [&str; 8] = [
        "and",
        "or",
        "not",
        "trait",
        "event",
        "seen",
        "computed_trait",
        "audience",
    ];
    let kinds: Vec<&str> = KINDS.into_iter().filter(|k| obj.contains_key(*k)).collect();
    let kind = match kinds.as_slice() {
        [k] => *k,
        [] => {
            return Err(DefinitionError::new(
                path,
                format!("a condition needs one of {}", KINDS.join(", ")),
            ));
        }
        _ => {
            return Err(DefinitionError::new(
                path,
                format!("a condition has one kind; found {}", kinds.join(" and ")),
            ));
        }
    };
    match kind {
        "and" | "or" => {
            closed(obj, path, &[kind])?;
            let p = format!("{path}.{kind}");
            let items = obj[kind]
                .as_array()
                .ok_or_else(|| DefinitionError::new(&p, "an array of conditions"))?;
            let cs = items
                .iter()
                .enumerate()
                .map(|(i, c)| read_condition(c, &format!("{p}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if kind == "and" {
                Condition::And(cs)
            } else {
                Condition::Or(cs)
            })
        }
        "not" => {
            closed(obj, path, &["not"])?;
            Ok(Condition::Not(Box::new(read_condition(
                &obj["not"],
                &format!("{path}.not"),
            )?)))
        }
        "trait" | "computed_trait" => {
            closed(obj, path, &[kind, "op", "value"])?;
            let p = predicate(obj, kind, path)?;
            Ok(if kind == "trait" {
                Condition::Trait(p)
            } else {
                Condition::ComputedTrait(p)
            })
        }
        "event" => {
            closed(obj, path, &["event", "where", "count", "within"])?;
            let filter = event_filter(obj, path)?;
            let (count_op, count) = match obj.get("count") {
                Some(c) => count(c, &format!("{path}.count"))?,
                None => (CountOp::AtLeast, 1),
            };
            let window = match obj.get("within") {
                Some(w) => window(w, &format!("{path}.within"))?,
                None => Window::Ever,
            };
            Ok(Condition::Event(EventCondition {
                filter,
                count_op,
                count,
                window,
            }))
        }
        "seen" => {
            closed(obj, path, &["seen", "within"])?;
            let sp = format!("{path}.seen");
            let end = match string(&obj["seen"], &sp)? {
                "first" => SeenEnd::First,
                "last" => SeenEnd::Last,
                _ => return Err(DefinitionError::new(&sp, "\"first\" or \"last\"")),
            };
            let wp = format!("{path}.within");
            let window = window(required(obj, "within", path)?, &wp)?;
            Ok(Condition::Seen(SeenCondition { end, window }))
        }
        _ => {
            closed(obj, path, &["audience"])?;
            Ok(Condition::Audience(key(
                &obj["audience"],
                &format!("{path}.audience"),
            )?))
        }
    }
}

fn predicate(
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Predicate, DefinitionError> {
    let name = if field == "computed_trait" {
        key(&obj[field], &format!("{path}.{field}"))?
    } else {
        self::name(&obj[field], &format!("{path}.{field}"))?
    };
    let (op, value) = op_value(obj, path)?;
    Ok(Predicate { name, op, value })
}

/// Reads `op` and `value`, checking that they go together.
fn op_value(obj: &Map<String, Value>, path: &str) -> Result<(Op, Option<Value>), DefinitionError> {
    let op_path = format!("{path}.op");
    let op_text = string(required(obj, "op", path)?, &op_path)?;
    let op = Op::parse(op_text).ok_or_else(|| {
        DefinitionError::new(
            &op_path,
            format!(
                "unknown operator {op_text:?}; one of {}",
                Op::ALL.map(Op::as_str).join(" ")
            ),
        )
    })?;
    let value_path = format!("{path}.value");
    let value = match (op, obj.get("value")) {
        (Op::Exists, None) => None,
        (Op::Exists, Some(_)) => {
            return Err(DefinitionError::new(&value_path, "exists takes no value"));
        }
        (_, None) => return Err(DefinitionError::new(&value_path, "required")),
        (op, Some(v)) => {
            super::value::check_operand(op, v).map_err(|m| DefinitionError::new(&value_path, m))?;
            Some(v.clone())
        }
    };
    Ok((op, value))
}

fn event_filter(obj: &Map<String, Value>, path: &str) -> Result<EventFilter, DefinitionError> {
    let event = name(required(obj, "event", path)?, &format!("{path}.event"))?;
    let mut filters = Vec::new();
    if let Some(w) = obj.get("where") {
        let wp = format!("{path}.where");
        let items = w
            .as_array()
            .ok_or_else(|| DefinitionError::new(&wp, "an array of property filters"))?;
        if items.len() > MAX_FILTERS {
            return Err(DefinitionError::new(
                &wp,
                format!("at most {MAX_FILTERS} property filters"),
            ));
        }
        for (i, f) in items.iter().enumerate() {
            let fp = format!("{wp}[{i}]");
            let fo = object(f, &fp)?;
            closed(fo, &fp, &["property", "op", "value"])?;
            let property = name(required(fo, "property", &fp)?, &format!("{fp}.property"))?;
            let (op, value) = op_value(fo, &fp)?;
            filters.push(PropertyFilter {
                property,
                op,
                value: value.map(|v| v.to_string()),
            });
        }
    }
    Ok(EventFilter { event, filters })
}

fn count(v: &Value, path: &str) -> Result<(CountOp, u32), DefinitionError> {
    let obj = object(v, path)?;
    closed(obj, path, &["op", "value"])?;
    let op_path = format!("{path}.op");
    let op = CountOp::parse(string(required(obj, "op", path)?, &op_path)?)
        .ok_or_else(|| DefinitionError::new(&op_path, "a count compares with >=, <= or ="))?;
    let vp = format!("{path}.value");
    let n = required(obj, "value", path)?
        .as_u64()
        .filter(|n| *n <= u64::from(MAX_COUNT))
        .ok_or_else(|| {
            DefinitionError::new(&vp, format!("a whole number from 0 to {MAX_COUNT}"))
        })?;
    Ok((op, n as u32))
}

fn window(v: &Value, path: &str) -> Result<Window, DefinitionError> {
    if v.as_str() == Some("ever") {
        return Ok(Window::Ever);
    }
    let obj = object(v, path)
        .map_err(|_| DefinitionError::new(path, "\"ever\", {last, unit} or {between}"))?;
    if let Some(b) = obj.get("between") {
        closed(obj, path, &["between"])?;
        let bp = format!("{path}.between");
        let pair = b
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| DefinitionError::new(&bp, "two timestamps, [from, to]"))?;
        let at = |i: usize| {
            let p = format!("{bp}[{i}]");
            pair[i]
                .as_str()
                .and_then(parse_micros)
                .ok_or_else(|| DefinitionError::new(&p, "an ISO 8601 timestamp"))
        };
        let (from, to) = (at(0)?, at(1)?);
        if from >= to {
            return Err(DefinitionError::new(&bp, "from must be before to"));
        }
        return Ok(Window::Between { from, to });
    }
    closed(obj, path, &["last", "unit"])?;
    let lp = format!("{path}.last");
    let amount = required(obj, "last", path)?
        .as_i64()
        .filter(|n| *n > 0)
        .ok_or_else(|| DefinitionError::new(&lp, "a positive whole number"))?;
    let up = format!("{path}.unit");
    let unit = Unit::parse(string(required(obj, "unit", path)?, &up)?)
        .ok_or_else(|| DefinitionError::new(&up, "minutes, hours or days"))?;
    let w = Window::last(amount, unit);
    super::check_window(&w, path, MAX_WINDOW_MICROS)?;
    Ok(w)
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, DefinitionError> {
    v.as_object()
        .ok_or_else(|| DefinitionError::new(path, "a json object"))
}

fn required<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<&'a Value, DefinitionError> {
    obj.get(field)
        .ok_or_else(|| DefinitionError::new(&format!("{path}.{field}"), "required"))
}

fn closed(obj: &Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), DefinitionError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(DefinitionError::new(
            &format!("{path}.{k}"),
            format!("unknown field; expected {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str, DefinitionError> {
    v.as_str()
        .ok_or_else(|| DefinitionError::new(path, "a string"))
}

/// A trait, property or event name: 1 to [`MAX_STRING`] bytes.
fn name(v: &Value, path: &str) -> Result<String, DefinitionError> {
    let s = string(v, path)?;
    super::check_name(s).map_err(|m| DefinitionError::new(path, m))?;
    Ok(s.to_owned())
}

/// A definition's key.
fn key(v: &Value, path: &str) -> Result<String, DefinitionError> {
    let s = string(v, path)?;
    super::check_key(s).map_err(|m| DefinitionError::new(path, m))?;
    Ok(s.to_owned())
}

/// Writes a condition in its JSON form; [`condition_from_json`] reads it back
/// to the same tree.
pub fn condition_to_json(c: &Condition) -> Value {
    match c {
        Condition::And(cs) => json!({"and": cs.iter().map(condition_to_json).collect::<Vec<_>>()}),
        Condition::Or(cs) => json!({"or": cs.iter().map(condition_to_json).collect::<Vec<_>>()}),
        Condition::Not(c) => json!({"not": condition_to_json(c)}),
        Condition::Trait(p) => predicate_to_json("trait", p),
        Condition::ComputedTrait(p) => predicate_to_json("computed_trait", p),
        Condition::Event(e) => {
            let mut o = Map::new();
            o.insert("event".into(), json!(e.filter.event));
            if !e.filter.filters.is_empty() {
                o.insert("where".into(), filters_to_json(&e.filter.filters));
            }
            o.insert(
                "count".into(),
                json!({"op": e.count_op.as_str(), "value": e.count}),
            );
            o.insert("within".into(), window_to_json(&e.window));
            Value::Object(o)
        }
        Condition::Seen(s) => json!({
            "seen": match s.end { SeenEnd::First => "first", SeenEnd::Last => "last" },
            "within": window_to_json(&s.window),
        }),
        Condition::Audience(k) => json!({"audience": k}),
    }
}

/// Writes a computed trait's definition in its JSON form.
pub fn computed_trait_to_json(ct: &ComputedTrait) -> Value {
    let mut o = Map::new();
    o.insert("reducer".into(), json!(ct.reducer.as_str()));
    o.insert("event".into(), json!(ct.filter.event));
    if !ct.filter.filters.is_empty() {
        o.insert("where".into(), filters_to_json(&ct.filter.filters));
    }
    if let Some(p) = &ct.property {
        o.insert("property".into(), json!(p));
    }
    o.insert("within".into(), window_to_json(&ct.window));
    if let Some(r) = ct.round {
        o.insert("round".into(), json!(r));
    }
    Value::Object(o)
}

fn predicate_to_json(kind: &str, p: &Predicate) -> Value {
    let mut o = Map::new();
    o.insert(kind.into(), json!(p.name));
    o.insert("op".into(), json!(p.op.as_str()));
    if let Some(v) = &p.value {
        o.insert("value".into(), v.clone());
    }
    Value::Object(o)
}

fn filters_to_json(filters: &[PropertyFilter]) -> Value {
    Value::Array(
        filters
            .iter()
            .map(|f| {
                let mut o = Map::new();
                o.insert("property".into(), json!(f.property));
                o.insert("op".into(), json!(f.op.as_str()));
                if let Some(v) = f.value() {
                    o.insert("value".into(), v);
                }
                Value::Object(o)
            })
            .collect(),
    )
}

fn window_to_json(w: &Window) -> Value {
    match *w {
        Window::Ever => json!("ever"),
        Window::Between { from, to } => json!({"between": [exact_time(from), exact_time(to)]}),
        Window::Last { micros, unit } => {
            json!({"last": micros / unit.micros(), "unit": unit.as_str()})
        }
    }
}

/// RFC 3339 with as many fraction digits as the time needs, so a window
/// reads back to the same microsecond.
fn exact_time(micros: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}
