//! The definition language: a closed, typed tree. Nothing in it is ever
//! evaluated as code; the JSON form ([`super::json`]) and the text form
//! ([`super::query`]) both parse into these types, and the limits are
//! checked on them.

use serde_json::Value;

/// The most leaves one definition holds.
pub const MAX_LEAVES: usize = 50;
/// The deepest a definition nests: a lone leaf has depth 1, `and` of leaves 2.
pub const MAX_DEPTH: usize = 6;
/// The largest count an event condition compares with. The evaluator keeps
/// the newest `N + 1` matching events per identifier and condition, so this
/// bounds its state.
pub const MAX_COUNT: u32 = 1_000;
/// The most values an `in` list holds.
pub const MAX_IN_VALUES: usize = 100;
/// The most property filters one event condition or computed trait holds.
pub const MAX_FILTERS: usize = 10;
/// The longest a sliding window may be: ten years.
pub const MAX_WINDOW_MICROS: i64 = 3_650 * DAY_MICROS;
/// The longest sliding window of a computed trait (its state keeps one
/// bucket per hour or day of the window): a year.
pub const MAX_TRAIT_WINDOW_MICROS: i64 = 366 * DAY_MICROS;
/// The longest a string in a definition (a name, a key, a value) may be.
pub const MAX_STRING: usize = 256;

/// A minute in microseconds.
pub const MINUTE_MICROS: i64 = 60_000_000;
/// An hour in microseconds.
pub const HOUR_MICROS: i64 = 60 * MINUTE_MICROS;
/// A day in microseconds.
pub const DAY_MICROS: i64 = 24 * HOUR_MICROS;

/// A condition on a profile: a combinator or a leaf.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Every one holds (an empty `and` holds).
    And(Vec<Condition>),
    /// At least one holds (an empty `or` does not).
    Or(Vec<Condition>),
    /// It does not hold.
    Not(Box<Condition>),
    /// A trait of the profile compares with a value.
    Trait(Predicate),
    /// The profile's events that match a filter, within a window, number so
    /// many.
    Event(EventCondition),
    /// The profile was first or last seen within a window.
    Seen(SeenCondition),
    /// A computed trait of the profile compares with a value.
    ComputedTrait(Predicate),
    /// The profile is a member of another audience (by key).
    Audience(String),
}

/// A comparison of a named value (a trait, a property, a computed trait).
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    /// The name compared: a trait name, a top-level property name, or a
    /// computed trait's key.
    pub name: String,
    /// How.
    pub op: Op,
    /// With what; `None` only for [`Op::Exists`]. For [`Op::In`], an array.
    pub value: Option<Value>,
}

/// The comparison operators. Their meaning on JSON values is
/// [`Op::test`] ([`super::value`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Equal (numbers by value, so `1` equals `1.0`).
    Eq,
    /// Not equal; holds when the value is missing.
    Ne,
    /// Less than (numbers, or strings in byte order).
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
    /// A string contains the text, or an array contains the value.
    Contains,
    /// A string starts with the text.
    StartsWith,
    /// The value is present and not `null`.
    Exists,
    /// The value equals one of a list.
    In,
}

impl Op {
    /// Every operator, in a fixed order.
    pub const ALL: [Op; 10] = [
        Op::Eq,
        Op::Ne,
        Op::Lt,
        Op::Le,
        Op::Gt,
        Op::Ge,
        Op::Contains,
        Op::StartsWith,
        Op::Exists,
        Op::In,
    ];

    /// Its spelling in the JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Contains => "contains",
            Op::StartsWith => "starts_with",
            Op::Exists => "exists",
            Op::In => "in",
        }
    }

    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == s)
    }
}

/// How an event condition compares its count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CountOp {
    /// At least.
    AtLeast,
    /// At most.
    AtMost,
    /// Exactly.
    Exactly,
}

impl CountOp {
    /// Its spelling: `>=`, `<=` or `=`.
    pub fn as_str(self) -> &'static str {
        match self {
            CountOp::AtLeast => ">=",
            CountOp::AtMost => "<=",
            CountOp::Exactly => "=",
        }
    }

    /// Parses its spelling (`==` is taken as `=`).
    pub fn parse(s: &str) -> Option<CountOp> {
        match s {
            ">=" => Some(CountOp::AtLeast),
            "<=" => Some(CountOp::AtMost),
            "=" | "==" => Some(CountOp::Exactly),
            _ => None,
        }
    }

    /// Whether `count` satisfies `self n`.
    pub fn test(self, count: u32, n: u32) -> bool {
        match self {
            CountOp::AtLeast => count >= n,
            CountOp::AtMost => count <= n,
            CountOp::Exactly => count == n,
        }
    }
}

/// Which events count: a name and property filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventFilter {
    /// The event's name: a `track` event's name, or `$page`, `$screen`,
    /// `$identify`, `$group`, `$alias` for the other calls (as counted in
    /// `/metadata`).
    pub event: String,
    /// Every one must hold on the event's `properties` (on an `identify`
    /// or `group`, its `traits`).
    pub filters: Vec<PropertyFilter>,
}

/// A predicate on one top-level property of an event. Kept as text so the
/// filter is hashable and ordered (its spec identity, see
/// [`super::leaf::Spec`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PropertyFilter {
    /// The property's name.
    pub property: String,
    /// How it compares.
    pub op: Op,
    /// The value, as canonical JSON text; `None` for `exists`.
    pub value: Option<String>,
}

impl PropertyFilter {
    /// The value, parsed.
    pub fn value(&self) -> Option<Value> {
        self.value
            .as_deref()
            .map(|t| serde_json::from_str(t).unwrap_or(Value::Null))
    }
}

/// Over which event times something counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// Events whose time is after `now - micros`: the last so many minutes,
    /// hours or days, sliding.
    Last {
        /// The length, in microseconds.
        micros: i64,
        /// The unit it was written in, to render it back.
        unit: Unit,
    },
    /// Events with `from <= time < to` (microseconds).
    Between {
        /// The first time included.
        from: i64,
        /// The first time excluded.
        to: i64,
    },
    /// Every event.
    Ever,
}

impl Window {
    /// `amount` units back from now.
    pub fn last(amount: i64, unit: Unit) -> Window {
        Window::Last {
            micros: amount.saturating_mul(unit.micros()),
            unit,
        }
    }

    /// Whether an event at `time` is in the window at `now`.
    pub fn contains(&self, time: i64, now: i64) -> bool {
        match *self {
            Window::Last { micros, .. } => time > now.saturating_sub(micros),
            Window::Between { from, to } => from <= time && time < to,
            Window::Ever => true,
        }
    }
}

/// The unit a sliding window is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// Minutes.
    Minutes,
    /// Hours.
    Hours,
    /// Days.
    Days,
}

impl Unit {
    /// Its length in microseconds.
    pub fn micros(self) -> i64 {
        match self {
            Unit::Minutes => MINUTE_MICROS,
            Unit::Hours => HOUR_MICROS,
            Unit::Days => DAY_MICROS,
        }
    }

    /// Its plural name, as written: `minutes`, `hours`, `days`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Minutes => "minutes",
            Unit::Hours => "hours",
            Unit::Days => "days",
        }
    }

    /// Parses a unit, singular or plural.
    pub fn parse(s: &str) -> Option<Unit> {
        match s {
            "minute" | "minutes" => Some(Unit::Minutes),
            "hour" | "hours" => Some(Unit::Hours),
            "day" | "days" => Some(Unit::Days),
            _ => None,
        }
    }
}

/// "The profile did this at least / at most / exactly N times in a window."
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventCondition {
    /// Which events.
    pub filter: EventFilter,
    /// How the count compares.
    pub count_op: CountOp,
    /// With what.
    pub count: u32,
    /// Over which times.
    pub window: Window,
}

/// Which end of a profile's activity a seen condition looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeenEnd {
    /// Its earliest event.
    First,
    /// Its latest event.
    Last,
}

/// "The profile was first (or last) seen within a window."
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenCondition {
    /// Which end.
    pub end: SeenEnd,
    /// The window.
    pub window: Window,
}

/// How a computed trait reduces the events it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reducer {
    /// How many.
    Count,
    /// The sum of a numeric property.
    Sum,
    /// The mean of a numeric property.
    Avg,
    /// The least value of a numeric property.
    Min,
    /// The greatest value of a numeric property.
    Max,
    /// The property's value on the earliest event.
    First,
    /// The property's value on the latest event.
    Last,
    /// The value seen most often; ties go to the smallest value.
    MostFrequent,
    /// The distinct values, sorted, at most [`MAX_UNIQUE_LIST`].
    UniqueList,
    /// How many distinct values, counted up to [`MAX_UNIQUE_COUNT`].
    UniqueCount,
}

/// The most values a `unique_list` trait lists.
pub const MAX_UNIQUE_LIST: usize = 100;
/// The most distinct values a `unique_count` or `most_frequent` trait tracks
/// per identifier; past it, new values are not tracked.
pub const MAX_UNIQUE_COUNT: usize = 1_000;

impl Reducer {
    /// Every reducer, in a fixed order.
    pub const ALL: [Reducer; 10] = [
        Reducer::Count,
        Reducer::Sum,
        Reducer::Avg,
        Reducer::Min,
        Reducer::Max,
        Reducer::First,
        Reducer::Last,
        Reducer::MostFrequent,
        Reducer::UniqueList,
        Reducer::UniqueCount,
    ];

    /// Its name in the JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            Reducer::Count => "count",
            Reducer::Sum => "sum",
            Reducer::Avg => "avg",
            Reducer::Min => "min",
            Reducer::Max => "max",
            Reducer::First => "first",
            Reducer::Last => "last",
            Reducer::MostFrequent => "most_frequent",
            Reducer::UniqueList => "unique_list",
            Reducer::UniqueCount => "unique_count",
        }
    }

    /// Parses its name.
    pub fn parse(s: &str) -> Option<Reducer> {
        Reducer::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether it reads a property of each event (all but `count`).
    pub fn needs_property(self) -> bool {
        self != Reducer::Count
    }

    /// Whether it reads the property as a number.
    pub fn numeric(self) -> bool {
        matches!(
            self,
            Reducer::Sum | Reducer::Avg | Reducer::Min | Reducer::Max
        )
    }
}

/// A computed trait: a reducer over the events a filter matches, lifetime
/// or over a sliding window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ComputedTrait {
    /// How the events reduce.
    pub reducer: Reducer,
    /// Which events.
    pub filter: EventFilter,
    /// The property reduced; `None` only for `count`.
    pub property: Option<String>,
    /// [`Window::Ever`] (lifetime) or [`Window::Last`] (sliding, at most
    /// [`MAX_TRAIT_WINDOW_MICROS`]).
    pub window: Window,
    /// Decimal places numeric values are rounded to (0 to 6); a change is
    /// emitted only when the rounded value changes.
    pub round: Option<u8>,
}

impl Condition {
    /// The leaves, depth first.
    pub fn leaves(&self) -> Vec<&Condition> {
        let mut out = Vec::new();
        self.walk(&mut |c| {
            if !c.is_combinator() {
                out.push(c);
            }
        });
        out
    }

    fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Condition)) {
        f(self);
        match self {
            Condition::And(cs) | Condition::Or(cs) => cs.iter().for_each(|c| c.walk(f)),
            Condition::Not(c) => c.walk(f),
            _ => {}
        }
    }

    /// Whether it is `and`, `or` or `not`.
    pub fn is_combinator(&self) -> bool {
        matches!(
            self,
            Condition::And(_) | Condition::Or(_) | Condition::Not(_)
        )
    }

    /// How deep it nests: a leaf is 1.
    pub fn depth(&self) -> usize {
        match self {
            Condition::And(cs) | Condition::Or(cs) => {
                1 + cs.iter().map(Condition::depth).max().unwrap_or(0)
            }
            Condition::Not(c) => 1 + c.depth(),
            _ => 1,
        }
    }

    /// The keys of the audiences it refers to.
    pub fn audiences(&self) -> Vec<&str> {
        self.leaves()
            .into_iter()
            .filter_map(|c| match c {
                Condition::Audience(k) => Some(k.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The keys of the computed traits it refers to.
    pub fn computed_traits(&self) -> Vec<&str> {
        self.leaves()
            .into_iter()
            .filter_map(|c| match c {
                Condition::ComputedTrait(p) => Some(p.name.as_str()),
                _ => None,
            })
            .collect()
    }
}
