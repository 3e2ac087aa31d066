//! A workspace's merge protection: [`Rules`] (limits, blocked values and
//! priority), their defaults, and how they read from and write to JSON for
//! the admin API.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::{IdKind, Identifier};

/// How many identifiers of one kind a profile may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The most identifiers of the kind.
    pub max: u32,
    /// Counted over all time (`None`), or only those that joined the profile
    /// within a trailing window, so that a long-lived customer can still gain
    /// new devices.
    pub window: Option<Window>,
}

impl Limit {
    /// `max` over all time.
    pub const fn ever(max: u32) -> Self {
        Self { max, window: None }
    }
}

/// A trailing window for a [`Limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Window {
    /// 24 hours.
    Daily,
    /// 7 days.
    Weekly,
    /// 30 days.
    Monthly,
}

impl Window {
    /// The window's length in microseconds.
    pub const fn micros(self) -> i64 {
        const DAY: i64 = 86_400_000_000;
        match self {
            Window::Daily => DAY,
            Window::Weekly => 7 * DAY,
            Window::Monthly => 30 * DAY,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Window::Daily => "daily",
            Window::Weekly => "weekly",
            Window::Monthly => "monthly",
        }
    }
}

impl fmt::Display for Limit {
    /// `1 ever`, `5 weekly`: the form the admin API reads and writes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = self.window.map_or("ever", Window::as_str);
        write!(f, "{} {window}", self.max)
    }
}

impl std::str::FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut words = s.split_whitespace();
        let (Some(max), Some(window), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{s:?} is not a limit like \"1 ever\" or \"5 weekly\""
            ));
        };
        let max: u32 = max
            .parse()
            .ok()
            .filter(|m| (1..=MAX_LIMIT).contains(m))
            .ok_or_else(|| format!("the most identifiers must be 1 to {MAX_LIMIT}, not {max:?}"))?;
        let window = match window {
            "ever" => None,
            "daily" => Some(Window::Daily),
            "weekly" => Some(Window::Weekly),
            "monthly" => Some(Window::Monthly),
            other => {
                return Err(format!(
                    "{other:?} is not a window: ever, daily, weekly or monthly"
                ));
            }
        };
        Ok(Limit { max, window })
    }
}

/// The highest limit a rule may set; a profile is bounded by
/// [`crate::profile::MAX_PROFILE_IDENTIFIERS`] whatever the rules say.
pub const MAX_LIMIT: u32 = 1_000;
/// The most blocked values and patterns a workspace may configure, each.
pub const MAX_BLOCKED: usize = 100;
/// The longest blocked value or pattern, in bytes.
pub const MAX_BLOCKED_CHARS: usize = 256;

/// Values that never link anything unless a workspace removes them:
/// compared case-insensitively with an identifier's value.
pub const DEFAULT_BLOCKED_VALUES: [&str; 5] =
    ["null", "anonymous", "-1", "undefined", "[object Object]"];
/// Patterns blocked by default: a value of only zeros and dashes (`0`,
/// `00000000-0000-0000-0000-000000000000`, the empty string).
pub const DEFAULT_BLOCKED_PATTERNS: [&str; 1] = ["^[0-]*$"];

/// A workspace's merge protection. Every identity decision is a pure
/// function of these rules and the evidence (see [`super::Graph`]).
#[derive(Debug, Clone)]
pub struct Rules {
    limits: BTreeMap<String, Limit>,
    default_limit: Limit,
    blocked_values: BTreeSet<String>,
    blocked_patterns: Vec<regex::Regex>,
    priority: Vec<String>,
}

impl Default for Rules {
    /// Segment's defaults: `user_id` 1 ever and every other kind 5 ever;
    /// [`DEFAULT_BLOCKED_VALUES`] and [`DEFAULT_BLOCKED_PATTERNS`]; priority
    /// `user_id`, `email`, then the rest alphabetically.
    fn default() -> Self {
        Self::from_settings(&RuleSettings::default()).expect("the defaults are valid")
    }
}

impl PartialEq for Rules {
    fn eq(&self, other: &Self) -> bool {
        self.settings() == other.settings()
    }
}

impl Rules {
    /// The default rules, built once.
    pub fn defaults() -> &'static Rules {
        static DEFAULT: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
        DEFAULT.get_or_init(Rules::default)
    }

    /// Records on `ev` which of its `userId` and `anonymousId` are blocked
    /// ([`crate::Event::blocked_ids`]), so its primary identifier skips them.
    /// Ingest calls this before the event gets its partition key.
    pub fn mark_blocked(&self, ev: &mut crate::Event) {
        ev.blocked_ids.clear();
        if let Some(u) = &ev.user_id
            && self.is_blocked_value(u)
        {
            ev.blocked_ids.push(format!("user_id:{u}"));
        }
        if let Some(a) = &ev.anonymous_id
            && self.is_blocked_value(a)
        {
            ev.blocked_ids.push(format!("anonymous_id:{a}"));
        }
    }

    /// The limit for identifiers of `kind`.
    pub fn limit(&self, kind: &IdKind) -> Limit {
        self.limits
            .get(kind.as_str())
            .copied()
            .unwrap_or(self.default_limit)
    }

    /// Whether `id`'s value is blocked: it never links anything, though it
    /// stays in the event's payload.
    pub fn is_blocked(&self, id: &Identifier) -> bool {
        self.is_blocked_value(&id.value)
    }

    /// Whether a value is blocked, whatever its kind.
    pub fn is_blocked_value(&self, value: &str) -> bool {
        // Values are compared lower-cased; an allocation only when needed.
        let blocked = if value.bytes().any(|b| b.is_ascii_uppercase()) || !value.is_ascii() {
            self.blocked_values.contains(&value.to_lowercase())
        } else {
            self.blocked_values.contains(value)
        };
        blocked || self.blocked_patterns.iter().any(|p| p.is_match(value))
    }

    /// The rank of `kind` in the priority order: lower is more important.
    /// Kinds the rules list come first, in their order; the rest follow
    /// alphabetically (their rank is past the listed ones, and [`Self::demote_order`]
    /// breaks the tie by name).
    pub fn rank(&self, kind: &IdKind) -> usize {
        self.priority
            .iter()
            .position(|k| k == kind.as_str())
            .unwrap_or(self.priority.len())
    }

    /// The order in which identifiers of an event are demoted when a link
    /// breaks a limit: the lowest priority first; within a kind (or among
    /// unlisted kinds), the largest identifier first.
    pub fn demote_order(&self, a: &Identifier, b: &Identifier) -> std::cmp::Ordering {
        let importance = |i: &Identifier| {
            (
                self.rank(&i.kind),
                i.kind.as_str().to_owned(),
                i.value.clone(),
            )
        };
        importance(b).cmp(&importance(a))
    }

    /// The rules as the admin API shows them.
    pub fn settings(&self) -> RuleSettings {
        let mut limits: BTreeMap<String, String> = self
            .limits
            .iter()
            .map(|(k, l)| (k.clone(), l.to_string()))
            .collect();
        limits.insert("*".into(), self.default_limit.to_string());
        RuleSettings {
            limits,
            blocked_values: self.blocked_values.iter().cloned().collect(),
            blocked_patterns: self
                .blocked_patterns
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            priority: self.priority.clone(),
        }
    }

    /// Checks settings and builds rules from them. The error names the field
    /// at fault, as the admin API reports it.
    pub fn from_settings(s: &RuleSettings) -> Result<Self, RuleError> {
        let mut limits = BTreeMap::new();
        let mut default_limit = None;
        for (kind, limit) in &s.limits {
            let field = format!("limits.{kind}");
            let parsed: Limit = limit.parse().map_err(|m| RuleError::new(&field, m))?;
            if kind == "*" {
                default_limit = Some(parsed);
            } else {
                check_kind(kind).map_err(|m| RuleError::new(&field, m))?;
                limits.insert(kind.clone(), parsed);
            }
        }
        if s.blocked_values.len() > MAX_BLOCKED {
            return Err(RuleError::new(
                "blocked_values",
                format!("at most {MAX_BLOCKED} values"),
            ));
        }
        let mut blocked_values = BTreeSet::new();
        for (i, v) in s.blocked_values.iter().enumerate() {
            if v.len() > MAX_BLOCKED_CHARS {
                return Err(RuleError::new(
                    format!("blocked_values[{i}]"),
                    format!("longer than {MAX_BLOCKED_CHARS} bytes"),
                ));
            }
            blocked_values.insert(v.to_lowercase());
        }
        if s.blocked_patterns.len() > MAX_BLOCKED {
            return Err(RuleError::new(
                "blocked_patterns",
                format!("at most {MAX_BLOCKED} patterns"),
            ));
        }
        let mut blocked_patterns = Vec::new();
        for (i, p) in s.blocked_patterns.iter().enumerate() {
            let field = format!("blocked_patterns[{i}]");
            if p.len() > MAX_BLOCKED_CHARS {
                return Err(RuleError::new(
                    field,
                    format!("longer than {MAX_BLOCKED_CHARS} bytes"),
                ));
            }
            // The regex crate matches in linear time, and the size limit
            // keeps a compiled pattern small.
            let re = regex::RegexBuilder::new(p)
                .size_limit(1 << 16)
                .build()
                .map_err(|e| RuleError::new(&field, format!("not a pattern: {e}")))?;
            blocked_patterns.push(re);
        }
        let mut seen = BTreeSet::new();
        for (i, kind) in s.priority.iter().enumerate() {
            let field = format!("priority[{i}]");
            check_kind(kind).map_err(|m| RuleError::new(&field, m))?;
            if !seen.insert(kind) {
                return Err(RuleError::new(field, format!("{kind:?} is listed twice")));
            }
        }
        Ok(Self {
            limits,
            default_limit: default_limit.unwrap_or(Limit::ever(5)),
            blocked_values,
            blocked_patterns,
            priority: s.priority.clone(),
        })
    }

    /// The shortest window any limit uses, if any: the granularity at which
    /// repeated evidence is kept (see [`super::Evidence::bucket`]).
    pub fn shortest_window(&self) -> Option<Window> {
        self.limits
            .values()
            .chain([&self.default_limit])
            .filter_map(|l| l.window)
            .min()
    }
}

/// A kind of person identifier a workspace may name in its rules: any valid
/// id type (a workspace declares its own kinds, such as `phone` or
/// `stripe_id`, by naming them), except `group_id`, which names accounts.
fn check_kind(kind: &str) -> Result<(), String> {
    IdKind::check(kind)?;
    if IdKind::parse(kind) == IdKind::GroupId {
        return Err("group_id names accounts, which are never linked to people".into());
    }
    Ok(())
}

/// [`Rules`] as JSON, for the admin API and the store. Every field may be
/// left out, taking its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleSettings {
    /// Limits by identifier kind, as `"<max> <ever|daily|weekly|monthly>"`;
    /// `"*"` is every kind not listed.
    pub limits: BTreeMap<String, String>,
    /// Values that never link, compared case-insensitively.
    pub blocked_values: Vec<String>,
    /// Patterns (Rust `regex` syntax) a value that never links matches.
    pub blocked_patterns: Vec<String>,
    /// Identifier kinds from most to least important; kinds not listed come
    /// after, alphabetically.
    pub priority: Vec<String>,
}

impl Default for RuleSettings {
    fn default() -> Self {
        Self {
            limits: BTreeMap::from([
                ("user_id".to_owned(), "1 ever".to_owned()),
                ("*".to_owned(), "5 ever".to_owned()),
            ]),
            blocked_values: DEFAULT_BLOCKED_VALUES.map(str::to_owned).to_vec(),
            blocked_patterns: DEFAULT_BLOCKED_PATTERNS.map(str::to_owned).to_vec(),
            priority: vec!["user_id".to_owned(), "email".to_owned()],
        }
    }
}

/// Settings that cannot be rules: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    /// The field, such as `limits.email` or `blocked_patterns[2]`.
    pub field: String,
    /// Why, lowercase.
    pub message: String,
}

impl RuleError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identifier {
        Identifier::parse(s).unwrap()
    }

    #[test]
    fn defaults_block_the_values_qa_hard_codes() {
        let r = Rules::default();
        for v in [
            "null",
            "NULL",
            "Anonymous",
            "-1",
            "undefined",
            "[object Object]",
            "0",
            "00000000-0000-0000-0000-000000000000",
            "",
        ] {
            assert!(r.is_blocked_value(v), "{v:?} is blocked");
        }
        for v in ["alice", "nullable", "10", "0-1"] {
            assert!(!r.is_blocked_value(v), "{v:?} links");
        }
    }

    #[test]
    fn defaults_are_segments_limits_and_priority() {
        let r = Rules::default();
        assert_eq!(r.limit(&IdKind::UserId), Limit::ever(1));
        assert_eq!(r.limit(&IdKind::AnonymousId), Limit::ever(5));
        assert_eq!(r.limit(&IdKind::External("ga".into())), Limit::ever(5));
        let mut ids = [
            id("anonymous_id:a"),
            id("zeta:z"),
            id("email:e@x.io"),
            id("user_id:u"),
            id("alpha:b"),
            id("alpha:a"),
        ];
        ids.sort_by(|a, b| r.demote_order(a, b));
        let order: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(
            order,
            [
                "zeta:z",
                "anonymous_id:a",
                "alpha:b",
                "alpha:a",
                "email:e@x.io",
                "user_id:u"
            ],
            "demoted first: unlisted kinds from the end of the alphabet, then by value"
        );
    }

    #[test]
    fn settings_round_trip_and_name_the_bad_field() {
        let mut s = RuleSettings::default();
        s.limits.insert("anonymous_id".into(), "5 weekly".into());
        s.blocked_values.push("Test-User".into());
        let r = Rules::from_settings(&s).unwrap();
        assert_eq!(
            r.limit(&IdKind::AnonymousId),
            Limit {
                max: 5,
                window: Some(Window::Weekly)
            }
        );
        assert!(r.is_blocked_value("test-user"));
        assert_eq!(Rules::from_settings(&r.settings()).unwrap(), r);
        assert_eq!(r.shortest_window(), Some(Window::Weekly));

        let bad = |f: &dyn Fn(&mut RuleSettings)| {
            let mut s = RuleSettings::default();
            f(&mut s);
            Rules::from_settings(&s).unwrap_err().field
        };
        assert_eq!(
            bad(&|s| {
                s.limits.insert("email".into(), "five weekly".into());
            }),
            "limits.email"
        );
        assert_eq!(
            bad(&|s| {
                s.limits.insert("email".into(), "0 ever".into());
            }),
            "limits.email"
        );
        assert_eq!(
            bad(&|s| {
                s.limits.insert("bad kind".into(), "1 ever".into());
            }),
            "limits.bad kind"
        );
        assert_eq!(
            bad(&|s| {
                s.limits.insert("group_id".into(), "1 ever".into());
            }),
            "limits.group_id",
            "accounts are not people's identifiers"
        );
        // A workspace declares its own kinds by naming them.
        let mut phone = RuleSettings::default();
        phone.limits.insert("phone".into(), "2 monthly".into());
        let r = Rules::from_settings(&phone).unwrap();
        assert_eq!(r.limit(&IdKind::parse("phone")).max, 2);
        assert_eq!(
            bad(&|s| s.blocked_patterns.push("(".into())),
            "blocked_patterns[1]"
        );
        assert_eq!(bad(&|s| s.priority.push("user_id".into())), "priority[2]");
    }

    #[test]
    fn unknown_settings_fields_are_refused() {
        let e = serde_json::from_str::<RuleSettings>(r#"{"limit":{}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let partial: RuleSettings = serde_json::from_str(r#"{"priority":["email"]}"#).unwrap();
        assert_eq!(partial.limits, RuleSettings::default().limits);
    }
}
