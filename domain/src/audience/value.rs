//! What the operators mean on JSON values. One function, [`Op::test`], used
//! by trait predicates, property filters and computed-trait predicates alike.
//!
//! - A missing value (or `null`) fails every operator except `!=`, which it
//!   passes, and `exists`, which it fails.
//! - `=` and `!=` compare JSON values, numbers by value (`1` equals `1.0`).
//! - `<`, `<=`, `>`, `>=` compare two numbers, or two strings in byte order
//!   (so ISO 8601 times in one format compare as times); any other pair fails.
//! - `contains`: a string contains the text, or an array holds an equal value.
//! - `starts_with`: a string starts with the text.
//! - `in`: the value equals one of the list.

use std::cmp::Ordering;

use serde_json::Value;

use super::ast::{MAX_IN_VALUES, MAX_STRING, Op};

impl Op {
    /// Whether `actual` (absent: `None`) satisfies `self expected`.
    pub fn test(self, actual: Option<&Value>, expected: Option<&Value>) -> bool {
        let actual = actual.filter(|v| !v.is_null());
        let Some(a) = actual else {
            return self == Op::Ne;
        };
        match self {
            Op::Exists => true,
            Op::Eq => expected.is_some_and(|e| equal(a, e)),
            Op::Ne => !expected.is_some_and(|e| equal(a, e)),
            Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                let Some(ord) = expected.and_then(|e| order(a, e)) else {
                    return false;
                };
                match self {
                    Op::Lt => ord == Ordering::Less,
                    Op::Le => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    _ => ord != Ordering::Less,
                }
            }
            Op::Contains => match (a, expected) {
                (Value::String(s), Some(Value::String(t))) => s.contains(t.as_str()),
                (Value::Array(items), Some(e)) => items.iter().any(|i| equal(i, e)),
                _ => false,
            },
            Op::StartsWith => match (a, expected) {
                (Value::String(s), Some(Value::String(t))) => s.starts_with(t.as_str()),
                _ => false,
            },
            Op::In => match expected {
                Some(Value::Array(items)) => items.iter().any(|i| equal(a, i)),
                _ => false,
            },
        }
    }
}

/// JSON equality with numbers compared by value.
pub fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => Some(i.cmp(&j)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

/// Whether `v` is an operand `op` accepts, with the reason if not: scalars
/// for comparisons, text for `contains`/`starts_with` (or any scalar for
/// `contains`, to look into arrays), a short list of scalars for `in`.
pub fn check_operand(op: Op, v: &Value) -> Result<(), String> {
    let scalar = |v: &Value| match v {
        Value::String(s) if s.len() > MAX_STRING => {
            Err(format!("a string of at most {MAX_STRING} bytes"))
        }
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
        _ => Err("a string, number or boolean".to_owned()),
    };
    match op {
        Op::Exists => Err("exists takes no value".into()),
        Op::Eq | Op::Ne | Op::Contains => scalar(v),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => match v {
            Value::Number(_) | Value::String(_) => scalar(v),
            _ => Err("a number or a string to compare with".into()),
        },
        Op::StartsWith => match v {
            Value::String(_) => scalar(v),
            _ => Err("a string".into()),
        },
        Op::In => match v {
            Value::Array(items) if items.len() <= MAX_IN_VALUES => {
                items.iter().try_for_each(scalar)
            }
            Value::Array(_) => Err(format!("a list of at most {MAX_IN_VALUES} values")),
            _ => Err("a list of values".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn missing_passes_only_not_equal() {
        for op in Op::ALL {
            let expected = (op != Op::Exists).then(|| json!(1));
            assert_eq!(op.test(None, expected.as_ref()), op == Op::Ne, "{op:?}");
            assert_eq!(
                op.test(Some(&Value::Null), expected.as_ref()),
                op == Op::Ne,
                "{op:?} null"
            );
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(Op::Eq.test(Some(&json!(1)), Some(&json!(1.0))));
        assert!(Op::Ge.test(Some(&json!(100)), Some(&json!(99.5))));
        assert!(!Op::Lt.test(Some(&json!("5")), Some(&json!(9))));
        assert!(Op::Lt.test(Some(&json!("2024-01-01")), Some(&json!("2024-02-01"))));
    }

    #[test]
    fn contains_looks_into_strings_and_arrays() {
        assert!(Op::Contains.test(Some(&json!("enterprise")), Some(&json!("prise"))));
        assert!(Op::Contains.test(Some(&json!(["a", 2])), Some(&json!(2.0))));
        assert!(!Op::Contains.test(Some(&json!(5)), Some(&json!(5))));
        assert!(Op::StartsWith.test(Some(&json!("pro-plan")), Some(&json!("pro"))));
        assert!(Op::In.test(Some(&json!("b")), Some(&json!(["a", "b"]))));
        assert!(!Op::In.test(Some(&json!("c")), Some(&json!(["a", "b"]))));
    }

    #[test]
    fn operands_are_checked() {
        assert!(check_operand(Op::In, &json!("a")).is_err());
        assert!(check_operand(Op::StartsWith, &json!(1)).is_err());
        assert!(check_operand(Op::Eq, &json!({"a": 1})).is_err());
        assert!(check_operand(Op::Eq, &json!("x".repeat(300))).is_err());
        assert!(check_operand(Op::In, &json!([1, "a", true])).is_ok());
    }
}
