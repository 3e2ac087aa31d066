//! The text form of definitions: a subset of Segment's query language, read
//! into the same tree ([`super::ast`]) as the JSON form ([`super::json`]),
//! with the same checks, and written back by [`to_query`].
//!
//! ```text
//! expr     := or
//! or       := and ( ('||' | 'or') and )*
//! and      := unary ( ('&&' | 'and') unary )*
//! unary    := ('!' | 'not') unary | '(' expr ')' | group | leaf
//! group    := ('all' | 'any') '(' ( expr ( ',' expr )* )? ')'
//! leaf     := event | trait | computed | seen | audience
//! event    := 'event(' STRING ')' ( '.where(' filter ( ('&&' | 'and') filter )* ')' )?
//!             window? '.count()' ('>=' | '<=' | '=' | '==') INT
//! window   := '.within(' INT UNIT ')' | '.between(' STRING ',' STRING ')' | '.ever()'
//! filter   := 'property(' STRING ')' cmp
//! trait    := 'trait(' STRING ')' cmp
//! computed := 'computed_trait(' STRING ')' cmp
//! seen     := ('first_seen()' | 'last_seen()') window
//! audience := 'audience(' STRING ')'
//! cmp      := ('=' | '==' | '!=' | '<' | '<=' | '>' | '>=') LITERAL | '.exists()'
//!           | '.contains(' LITERAL ')' | '.starts_with(' LITERAL ')'
//!           | '.in(' ( LITERAL ( ',' LITERAL )* )? ')'
//! LITERAL  := STRING | NUMBER | 'true' | 'false'
//! ```
//!
//! Whitespace between tokens is insignificant. A chain of `&&` (or of `||`)
//! is one `and` (one `or`); parentheses keep their group, so
//! `(a && b) && c` is an `and` inside an `and`, as the JSON form can say.
//! `all(...)` and `any(...)` write an `and` or `or` of zero or one
//! conditions, and `.ever()` a seen condition over all time: the JSON form
//! accepts both, and [`to_query`] must be able to write every tree.
//!
//! Errors have the path `query`, the byte offset of the token at fault, and
//! a message saying what was expected and what was found, ending with the
//! line and column (`at 1:37`, columns in characters).
//!
//! The lexer, parser, writer and their tests stay in one file: they are one
//! grammar and its inverse, and change together.

use std::fmt::Write as _;

use serde_json::value::RawValue;
use serde_json::{Number, Value};

use super::ast::*;
use super::value::check_operand;
use super::{DefinitionError, check_key, check_limits, check_name, check_window};
use crate::time::parse_micros;

/// The longest text [`parse_query`] reads, in bytes.
pub const MAX_QUERY_BYTES: usize = 10_000;

/// The path every error of the text form names.
const PATH: &str = "query";

const CONDITION: &str = "a condition (event(...), trait(...), computed_trait(...), first_seen(), \
                         last_seen(), audience(...), all(...), any(...), '!' or '(')";
const COMPARISON: &str = "an operator (=, !=, <, <=, >, >=, .exists(), .contains(...), \
                          .starts_with(...) or .in(...))";
const VALUE: &str = "a value (a string, a number, true or false)";

/// Parses the text form into the same tree as the JSON form, with the same
/// checks.
pub fn parse_query(text: &str) -> Result<Condition, DefinitionError> {
    if text.len() > MAX_QUERY_BYTES {
        let mut at = MAX_QUERY_BYTES;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        return Err(error_at(
            text,
            at,
            format!(
                "expected at most {MAX_QUERY_BYTES} bytes of text, found {}",
                text.len()
            ),
        ));
    }
    let mut p = Parser::new(text);
    let c = p.or()?;
    let t = p.peek()?;
    if t.kind != Kind::End {
        return Err(p.unexpected(&t, "'&&', '||' or the end of the text"));
    }
    let (depth, bottom) = deepest(&c);
    if depth > MAX_DEPTH {
        let at = p.bottoms.get(bottom).copied().unwrap_or(0);
        return Err(p.fail(
            at,
            format!(
                "expected conditions nested at most {MAX_DEPTH} deep, found one nested {depth} deep"
            ),
        ));
    }
    // The checks above already hold these limits; this keeps the text form
    // from drifting from the JSON form if the limits change.
    check_limits(&c, PATH).map_err(|e| p.fail(0, e.message))?;
    Ok(c)
}

/// Writes a condition in the text form; [`parse_query`] reads it back to the
/// same tree, as long as it fits in [`MAX_QUERY_BYTES`] (a tree at every
/// limit of the JSON form does not).
pub fn to_query(c: &Condition) -> String {
    let mut out = String::new();
    write_condition(&mut out, c, true);
    out
}

/// An error at byte `at` of `text`.
fn error_at(text: &str, at: usize, message: impl std::fmt::Display) -> DefinitionError {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count()
        + 1;
    DefinitionError {
        path: PATH.to_owned(),
        message: format!("{message} at {line}:{column}"),
        position: Some(at),
    }
}

/// Reads a number as `serde_json` does (so an integer stays an integer), but
/// a float correctly rounded: without its `float_roundtrip` feature,
/// `serde_json` can be one unit in the last place off, and a number written
/// back would not read to the same value.
fn number(text: &str) -> Option<Number> {
    let n: Number = serde_json::from_str(text).ok()?;
    if n.is_f64() {
        text.parse::<f64>().ok().and_then(Number::from_f64)
    } else {
        Some(n)
    }
}

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, PartialEq)]
enum Kind<'a> {
    Ident(&'a str),
    Str(String),
    Number(&'a str, Number),
    Punct(&'static str),
    End,
}

#[derive(Debug, Clone, PartialEq)]
struct Token<'a> {
    kind: Kind<'a>,
    /// Byte offsets of the token's text.
    start: usize,
    end: usize,
}

struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn token(&mut self) -> Result<Token<'a>, DefinitionError> {
        let rest = &self.text[self.pos..];
        let rest_trimmed = rest.trim_start();
        self.pos += rest.len() - rest_trimmed.len();
        let start = self.pos;
        let mut chars = rest_trimmed.chars();
        let Some(c) = chars.next() else {
            return Ok(Token {
                kind: Kind::End,
                start,
                end: start,
            });
        };
        let fail = |m: String| error_at(self.text, start, m);
        let kind = match c {
            'a'..='z' | 'A'..='Z' | '_' => {
                let len = rest_trimmed
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest_trimmed.len());
                self.pos += len;
                Kind::Ident(&rest_trimmed[..len])
            }
            '0'..='9' | '-' => {
                let len = rest_trimmed
                    .find(|c: char| {
                        !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
                    })
                    .unwrap_or(rest_trimmed.len());
                let s = &rest_trimmed[..len];
                let n = number(s).ok_or_else(|| {
                    fail(format!(
                        "expected a number such as 12, -3.5 or 1e6 (at most about 1.8e308), found '{s}'"
                    ))
                })?;
                self.pos += len;
                Kind::Number(s, n)
            }
            '\'' | '"' => Kind::Str(self.string(c)?),
            _ => {
                let (p, len) = match (c, chars.next()) {
                    ('&', Some('&')) => ("&&", 2),
                    ('|', Some('|')) => ("||", 2),
                    ('!', Some('=')) => ("!=", 2),
                    ('=', Some('=')) => ("==", 2),
                    ('<', Some('=')) => ("<=", 2),
                    ('>', Some('=')) => (">=", 2),
                    ('!', _) => ("!", 1),
                    ('=', _) => ("=", 1),
                    ('<', _) => ("<", 1),
                    ('>', _) => (">", 1),
                    ('(', _) => ("(", 1),
                    (')', _) => (")", 1),
                    (',', _) => (",", 1),
                    ('.', _) => (".", 1),
                    ('&', _) => return Err(fail("expected '&&', found '&'".into())),
                    ('|', _) => return Err(fail("expected '||', found '|'".into())),
                    _ => {
                        return Err(fail(format!(
                            "expected a name, a string, a number or an operator, found {c:?}"
                        )));
                    }
                };
                self.pos += len;
                Kind::Punct(p)
            }
        };
        Ok(Token {
            kind,
            start,
            end: self.pos,
        })
    }

    /// Reads a string opened by `quote` at `self.pos`.
    fn string(&mut self, quote: char) -> Result<String, DefinitionError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.text[self.pos..].chars().next() else {
                return Err(error_at(
                    self.text,
                    start,
                    format!(
                        "expected a closing {quote} to end the string, found the end of the text"
                    ),
                ));
            };
            if c == quote {
                self.pos += 1;
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                self.pos += c.len_utf8();
                continue;
            }
            let at = self.pos;
            self.pos += 1;
            let escaped = match self.text[self.pos..].chars().next() {
                Some('\\') => '\\',
                Some('\'') => '\'',
                Some('"') => '"',
                Some('n') => '\n',
                Some('t') => '\t',
                Some('u') => {
                    self.pos += 1;
                    out.push(self.unicode(at)?);
                    continue;
                }
                other => {
                    let found =
                        other.map_or("the end of the text".to_owned(), |e| format!("'\\{e}'"));
                    return Err(error_at(
                        self.text,
                        at,
                        format!(
                            "expected an escape (\\\\, \\', \\\", \\n, \\t or \\uXXXX), found {found}"
                        ),
                    ));
                }
            };
            out.push(escaped);
            self.pos += 1;
        }
    }

    /// Reads the `XXXX` of a `\uXXXX` escape starting at `at` (and the low
    /// half of a surrogate pair).
    fn unicode(&mut self, at: usize) -> Result<char, DefinitionError> {
        let high = self.hex4().ok_or_else(|| {
            error_at(
                self.text,
                at,
                "expected 4 hex digits after '\\u', found fewer",
            )
        })?;
        let code = match high {
            0xD800..=0xDBFF => {
                let low = match self.text[self.pos..].strip_prefix("\\u") {
                    Some(_) => {
                        self.pos += 2;
                        self.hex4().filter(|l| (0xDC00..=0xDFFF).contains(l))
                    }
                    None => None,
                };
                let low = low.ok_or_else(|| {
                    error_at(
                        self.text,
                        at,
                        format!("expected a low surrogate (\\udc00 to \\udfff) after '\\u{high:04x}', found none"),
                    )
                })?;
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            }
            0xDC00..=0xDFFF => {
                return Err(error_at(
                    self.text,
                    at,
                    format!("expected a character, found a lone low surrogate '\\u{high:04x}'"),
                ));
            }
            code => code,
        };
        // Every value left is a scalar value.
        Ok(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER))
    }

    fn hex4(&mut self) -> Option<u32> {
        let hex = self.text.get(self.pos..self.pos + 4)?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.pos += 4;
        u32::from_str_radix(hex, 16).ok()
    }
}

// ---------------------------------------------------------------- parser

struct Parser<'a> {
    text: &'a str,
    lexer: Lexer<'a>,
    /// The next token, lexed one ahead; a lexing error waits here until the
    /// parser reaches it, so errors come in the order of the text.
    next: Result<Token<'a>, DefinitionError>,
    /// How many `(`, `!`, `not`, `all(` and `any(` enclose the parser:
    /// bounded by [`MAX_DEPTH`], so the recursion is.
    nesting: usize,
    leaves: usize,
    /// Where each bottom of the tree (a leaf, an empty `all()` or `any()`)
    /// starts, in the order of the text, which is the tree's depth-first
    /// order: to point a too-deep error at the deepest.
    bottoms: Vec<usize>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        let mut lexer = Lexer { text, pos: 0 };
        let next = lexer.token();
        Self {
            text,
            lexer,
            next,
            nesting: 0,
            leaves: 0,
            bottoms: Vec::new(),
        }
    }

    fn peek(&self) -> Result<Token<'a>, DefinitionError> {
        self.next.clone()
    }

    fn bump(&mut self) -> Result<Token<'a>, DefinitionError> {
        if self.next.is_err() {
            return self.next.clone();
        }
        let after = self.lexer.token();
        std::mem::replace(&mut self.next, after)
    }

    fn fail(&self, at: usize, message: impl std::fmt::Display) -> DefinitionError {
        error_at(self.text, at, message)
    }

    /// How a token reads in an error: its text, quoted and shortened.
    fn found(&self, t: &Token<'_>) -> String {
        if t.kind == Kind::End {
            return "the end of the text".to_owned();
        }
        let source = &self.text[t.start..t.end];
        let mut shown: String = source.chars().take(40).collect();
        if shown.len() < source.len() {
            shown.push('…');
        }
        match t.kind {
            Kind::Str(_) => shown,
            _ => format!("'{shown}'"),
        }
    }

    fn unexpected(&self, t: &Token<'_>, expected: &str) -> DefinitionError {
        self.fail(
            t.start,
            format!("expected {expected}, found {}", self.found(t)),
        )
    }

    fn expect(&mut self, punct: &'static str, context: &str) -> Result<Token<'a>, DefinitionError> {
        let t = self.bump()?;
        if t.kind == Kind::Punct(punct) {
            Ok(t)
        } else {
            Err(self.unexpected(&t, &format!("'{punct}' {context}")))
        }
    }

    fn eat(&mut self, punct: &str) -> Result<bool, DefinitionError> {
        let hit = matches!(self.peek()?.kind, Kind::Punct(p) if p == punct);
        if hit {
            self.bump()?;
        }
        Ok(hit)
    }

    /// Takes `symbol` or its spelling as a `word` (`&&` or `and`).
    fn eat_either(&mut self, symbol: &str, word: &str) -> Result<bool, DefinitionError> {
        let hit = match self.peek()?.kind {
            Kind::Punct(p) => p == symbol,
            Kind::Ident(w) => w == word,
            _ => false,
        };
        if hit {
            self.bump()?;
        }
        Ok(hit)
    }

    /// Runs `f` one level deeper, refusing past [`MAX_DEPTH`] levels.
    fn nested(
        &mut self,
        at: &Token<'_>,
        f: impl FnOnce(&mut Self) -> Result<Condition, DefinitionError>,
    ) -> Result<Condition, DefinitionError> {
        if self.nesting >= MAX_DEPTH {
            return Err(self.fail(
                at.start,
                format!(
                    "expected at most {MAX_DEPTH} levels of '(', '!', 'not', all() and any(), found {} nested deeper",
                    self.found(at)
                ),
            ));
        }
        self.nesting += 1;
        let c = f(self);
        self.nesting -= 1;
        c
    }

    fn or(&mut self) -> Result<Condition, DefinitionError> {
        let mut items = vec![self.and()?];
        while self.eat_either("||", "or")? {
            items.push(self.and()?);
        }
        Ok(chain(items, Condition::Or))
    }

    fn and(&mut self) -> Result<Condition, DefinitionError> {
        let mut items = vec![self.unary()?];
        while self.eat_either("&&", "and")? {
            items.push(self.unary()?);
        }
        Ok(chain(items, Condition::And))
    }

    fn unary(&mut self) -> Result<Condition, DefinitionError> {
        let t = self.peek()?;
        match t.kind {
            Kind::Punct("!") | Kind::Ident("not") => {
                self.bump()?;
                self.nested(&t, |p| Ok(Condition::Not(Box::new(p.unary()?))))
            }
            Kind::Punct("(") => {
                self.bump()?;
                self.nested(&t, |p| {
                    let c = p.or()?;
                    let close = p.bump()?;
                    if close.kind != Kind::Punct(")") {
                        return Err(p.unexpected(&close, "'&&', '||' or ')'"));
                    }
                    Ok(c)
                })
            }
            Kind::Ident(word @ ("all" | "any")) => {
                self.bump()?;
                self.expect("(", &format!("after '{word}'"))?;
                self.nested(&t, |p| p.group(word == "all", t.start))
            }
            _ => self.leaf(),
        }
    }

    /// The conditions of `all(...)` or `any(...)`, after the `(`.
    fn group(&mut self, all: bool, start: usize) -> Result<Condition, DefinitionError> {
        let mut items = Vec::new();
        if !self.eat(")")? {
            loop {
                items.push(self.or()?);
                let t = self.bump()?;
                match t.kind {
                    Kind::Punct(",") => {}
                    Kind::Punct(")") => break,
                    _ => return Err(self.unexpected(&t, "'&&', '||', ',' or ')'")),
                }
            }
        }
        if items.is_empty() {
            self.bottoms.push(start);
        }
        Ok(if all {
            Condition::And(items)
        } else {
            Condition::Or(items)
        })
    }

    fn leaf(&mut self) -> Result<Condition, DefinitionError> {
        let t = self.bump()?;
        let word = match t.kind {
            Kind::Ident(
                w
                @ ("event" | "trait" | "computed_trait" | "first_seen" | "last_seen" | "audience"),
            ) => w,
            _ => return Err(self.unexpected(&t, CONDITION)),
        };
        self.leaves += 1;
        if self.leaves > MAX_LEAVES {
            return Err(self.fail(
                t.start,
                format!("expected at most {MAX_LEAVES} conditions, found more"),
            ));
        }
        self.bottoms.push(t.start);
        match word {
            "event" => self.event(),
            "trait" => {
                let name = self.argument("trait", "a trait name", check_name)?;
                let (op, value) = self.comparison()?;
                Ok(Condition::Trait(Predicate { name, op, value }))
            }
            "computed_trait" => {
                let name = self.argument("computed_trait", "a computed trait key", check_key)?;
                let (op, value) = self.comparison()?;
                Ok(Condition::ComputedTrait(Predicate { name, op, value }))
            }
            "audience" => Ok(Condition::Audience(self.argument(
                "audience",
                "an audience key",
                check_key,
            )?)),
            _ => {
                let end = if word == "first_seen" {
                    SeenEnd::First
                } else {
                    SeenEnd::Last
                };
                self.expect("(", &format!("after '{word}'"))?;
                self.expect(")", &format!("after '{word}(' (it takes no argument)"))?;
                let expected = format!(".within(...), .between(...) or .ever() after {word}()");
                let (method, _) = self.method(&["within", "between", "ever"], &expected)?;
                let window = self.window(method)?;
                Ok(Condition::Seen(SeenCondition { end, window }))
            }
        }
    }

    /// Reads `( STRING )` after a function's name, the string checked by
    /// `check`.
    fn argument(
        &mut self,
        function: &str,
        what: &str,
        check: fn(&str) -> Result<(), String>,
    ) -> Result<String, DefinitionError> {
        self.expect("(", &format!("after '{function}'"))?;
        let t = self.bump()?;
        let Kind::Str(s) = &t.kind else {
            return Err(self.unexpected(&t, &format!("{what} (a quoted string)")));
        };
        check(s).map_err(|reason| {
            self.fail(
                t.start,
                format!("expected {what} ({reason}), found {}", self.found(&t)),
            )
        })?;
        self.expect(")", &format!("after {what}"))?;
        Ok(s.clone())
    }

    /// Reads `.name(` for a `name` in `allowed`; `expected` says what may
    /// come, for the error.
    fn method(
        &mut self,
        allowed: &[&'static str],
        expected: &str,
    ) -> Result<(&'static str, Token<'a>), DefinitionError> {
        let dot = self.bump()?;
        if dot.kind != Kind::Punct(".") {
            return Err(self.unexpected(&dot, expected));
        }
        let t = self.bump()?;
        let name = match t.kind {
            Kind::Ident(w) => allowed.iter().find(|a| **a == w).copied(),
            _ => None,
        }
        .ok_or_else(|| self.unexpected(&t, expected))?;
        self.expect("(", &format!("after '.{name}'"))?;
        Ok((name, t))
    }

    fn event(&mut self) -> Result<Condition, DefinitionError> {
        let event = self.argument("event", "an event name", check_name)?;
        let mut filters = Vec::new();
        let mut window = Window::Ever;
        // The parts come in the grammar's order; each step narrows what may
        // follow.
        let steps: [(&[&'static str], &str); 3] = [
            (
                &["where", "within", "between", "ever", "count"],
                ".where(...), .within(...), .between(...), .ever() or .count() after event(...)",
            ),
            (
                &["within", "between", "ever", "count"],
                ".within(...), .between(...), .ever() or .count() after .where(...)",
            ),
            (&["count"], ".count() after the window"),
        ];
        let mut step = 0;
        loop {
            let (allowed, expected) = steps[step];
            match self.method(allowed, expected)?.0 {
                "where" => {
                    filters = self.filters()?;
                    step = 1;
                }
                "count" => break,
                window_kind => {
                    window = self.window(window_kind)?;
                    step = 2;
                }
            }
        }
        self.expect(")", "after '.count('")?;
        let t = self.bump()?;
        let count_op = match t.kind {
            Kind::Punct(p) => CountOp::parse(p),
            _ => None,
        }
        .ok_or_else(|| self.unexpected(&t, "a count comparison (>=, <= or =) after .count()"))?;
        let t = self.bump()?;
        let count = match t.kind {
            Kind::Number(s, _) if s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u32>().ok().filter(|n| *n <= MAX_COUNT)
            }
            _ => None,
        }
        .ok_or_else(|| self.unexpected(&t, &format!("a count from 0 to {MAX_COUNT}")))?;
        Ok(Condition::Event(EventCondition {
            filter: EventFilter { event, filters },
            count_op,
            count,
            window,
        }))
    }

    /// The property filters of `.where(...)`, after the `(`.
    fn filters(&mut self) -> Result<Vec<PropertyFilter>, DefinitionError> {
        let mut filters = Vec::new();
        loop {
            let t = self.bump()?;
            if t.kind != Kind::Ident("property") {
                return Err(self.unexpected(&t, "property(...) in .where(...)"));
            }
            if filters.len() == MAX_FILTERS {
                return Err(self.fail(
                    t.start,
                    format!("expected at most {MAX_FILTERS} property filters, found more"),
                ));
            }
            let property = self.argument("property", "a property name", check_name)?;
            let (op, value) = self.comparison()?;
            filters.push(PropertyFilter {
                property,
                op,
                value: value.map(|v| v.to_string()),
            });
            if self.eat_either("&&", "and")? {
                continue;
            }
            let t = self.bump()?;
            if t.kind == Kind::Punct(")") {
                return Ok(filters);
            }
            return Err(self.unexpected(&t, "'&&' or ')' after a property filter"));
        }
    }

    /// The arguments of `.within(`, `.between(` or `.ever(`, after the `(`.
    fn window(&mut self, method: &str) -> Result<Window, DefinitionError> {
        match method {
            "within" => {
                let t = self.bump()?;
                let amount = match t.kind {
                    Kind::Number(s, _) if s.bytes().all(|b| b.is_ascii_digit()) => {
                        s.parse::<i64>().ok().filter(|n| *n > 0)
                    }
                    _ => None,
                }
                .ok_or_else(|| self.unexpected(&t, "a positive whole number after '.within('"))?;
                let u = self.bump()?;
                let unit = match u.kind {
                    Kind::Ident(w) => Unit::parse(w),
                    _ => None,
                }
                .ok_or_else(|| self.unexpected(&u, "a unit (minutes, hours or days)"))?;
                let w = Window::last(amount, unit);
                check_window(&w, PATH, MAX_WINDOW_MICROS).map_err(|e| {
                    self.fail(
                        t.start,
                        format!(
                            "expected {}, found '{}'",
                            e.message,
                            &self.text[t.start..u.end]
                        ),
                    )
                })?;
                self.expect(")", "after the unit")?;
                Ok(w)
            }
            "between" => {
                let (from, first) = self.timestamp("after '.between('")?;
                self.expect(",", "between the two timestamps")?;
                let (to, second) = self.timestamp("after ','")?;
                if from >= to {
                    return Err(self.fail(
                        first.start,
                        format!(
                            "expected the first timestamp before the second, found {} and {}",
                            self.found(&first),
                            self.found(&second)
                        ),
                    ));
                }
                self.expect(")", "after the second timestamp")?;
                Ok(Window::Between { from, to })
            }
            _ => {
                self.expect(")", "after '.ever('")?;
                Ok(Window::Ever)
            }
        }
    }

    fn timestamp(&mut self, context: &str) -> Result<(i64, Token<'a>), DefinitionError> {
        let t = self.bump()?;
        match &t.kind {
            Kind::Str(s) => match parse_micros(s) {
                Some(micros) => Ok((micros, t)),
                None => Err(self.unexpected(
                    &t,
                    "an ISO 8601 timestamp (such as '2024-05-01' or '2024-05-01T12:00:00Z')",
                )),
            },
            _ => Err(self.unexpected(&t, &format!("a timestamp (a quoted string) {context}"))),
        }
    }

    fn comparison(&mut self) -> Result<(Op, Option<Value>), DefinitionError> {
        let t = self.peek()?;
        let op = match t.kind {
            Kind::Punct("=" | "==") => Op::Eq,
            Kind::Punct("!=") => Op::Ne,
            Kind::Punct("<") => Op::Lt,
            Kind::Punct("<=") => Op::Le,
            Kind::Punct(">") => Op::Gt,
            Kind::Punct(">=") => Op::Ge,
            Kind::Punct(".") => {
                let (method, at) =
                    self.method(&["exists", "contains", "starts_with", "in"], COMPARISON)?;
                return match method {
                    "exists" => {
                        self.expect(")", "after '.exists(' (it takes no value)")?;
                        Ok((Op::Exists, None))
                    }
                    "in" => Ok((Op::In, Some(self.in_list(&at)?))),
                    _ => {
                        let op = if method == "contains" {
                            Op::Contains
                        } else {
                            Op::StartsWith
                        };
                        let v = self.operand(op, &format!(".{method}(...)"))?;
                        self.expect(")", &format!("after the value of .{method}(...)"))?;
                        Ok((op, Some(v)))
                    }
                };
            }
            _ => return Err(self.unexpected(&t, COMPARISON)),
        };
        self.bump()?;
        let value = self.operand(op, &format!("'{}'", &self.text[t.start..t.end]))?;
        Ok((op, Some(value)))
    }

    /// A literal that `op` accepts.
    fn operand(&mut self, op: Op, after: &str) -> Result<Value, DefinitionError> {
        let t = self.bump()?;
        let v = literal(&t).ok_or_else(|| self.unexpected(&t, &format!("{VALUE} for {after}")))?;
        check_operand(op, &v).map_err(|reason| {
            self.fail(
                t.start,
                format!("expected {reason} for {after}, found {}", self.found(&t)),
            )
        })?;
        Ok(v)
    }

    /// The literals of `.in(...)`, after the `(`.
    fn in_list(&mut self, at: &Token<'_>) -> Result<Value, DefinitionError> {
        let mut items = Vec::new();
        if !self.eat(")")? {
            loop {
                let t = self.bump()?;
                if items.len() == MAX_IN_VALUES {
                    return Err(self.fail(
                        t.start,
                        format!("expected at most {MAX_IN_VALUES} values in .in(...), found more"),
                    ));
                }
                let v = literal(&t)
                    .ok_or_else(|| self.unexpected(&t, &format!("{VALUE} in .in(...)")))?;
                check_operand(Op::In, &Value::Array(vec![v.clone()])).map_err(|reason| {
                    self.fail(
                        t.start,
                        format!("expected {reason} in .in(...), found {}", self.found(&t)),
                    )
                })?;
                items.push(v);
                let t = self.bump()?;
                match t.kind {
                    Kind::Punct(",") => {}
                    Kind::Punct(")") => break,
                    _ => return Err(self.unexpected(&t, "',' or ')' in .in(...)")),
                }
            }
        }
        let list = Value::Array(items);
        check_operand(Op::In, &list)
            .map_err(|reason| self.fail(at.start, format!("expected {reason} for .in(...)")))?;
        Ok(list)
    }
}

/// One condition stands alone; a chain of several is an `and` or an `or`.
fn chain(mut items: Vec<Condition>, make: fn(Vec<Condition>) -> Condition) -> Condition {
    if items.len() == 1 {
        items.swap_remove(0)
    } else {
        make(items)
    }
}

fn literal(t: &Token<'_>) -> Option<Value> {
    match &t.kind {
        Kind::Str(s) => Some(Value::String(s.clone())),
        Kind::Number(_, n) => Some(Value::Number(n.clone())),
        Kind::Ident("true") => Some(Value::Bool(true)),
        Kind::Ident("false") => Some(Value::Bool(false)),
        _ => None,
    }
}

/// The depth of the first deepest bottom (a leaf, or an `and`/`or` of
/// nothing) and its index among the bottoms, depth first.
fn deepest(c: &Condition) -> (usize, usize) {
    fn walk(c: &Condition, level: usize, seen: &mut usize, best: &mut (usize, usize)) {
        match c {
            Condition::And(cs) | Condition::Or(cs) if !cs.is_empty() => {
                cs.iter().for_each(|x| walk(x, level + 1, seen, best));
            }
            Condition::Not(x) => walk(x, level + 1, seen, best),
            _ => {
                if level > best.0 {
                    *best = (level, *seen);
                }
                *seen += 1;
            }
        }
    }
    let mut best = (0, 0);
    walk(c, 1, &mut 0, &mut best);
    best
}

// ---------------------------------------------------------------- writer

/// Writes `c`; an `and` or `or` of two or more below the root is
/// parenthesised, which keeps its group and spares the reader precedence.
fn write_condition(out: &mut String, c: &Condition, root: bool) {
    match c {
        Condition::And(cs) | Condition::Or(cs) if cs.len() >= 2 => {
            let sep = if matches!(c, Condition::And(_)) {
                " && "
            } else {
                " || "
            };
            if !root {
                out.push('(');
            }
            for (i, child) in cs.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                write_condition(out, child, false);
            }
            if !root {
                out.push(')');
            }
        }
        Condition::And(cs) | Condition::Or(cs) => {
            out.push_str(if matches!(c, Condition::And(_)) {
                "all("
            } else {
                "any("
            });
            if let Some(child) = cs.first() {
                write_condition(out, child, true);
            }
            out.push(')');
        }
        Condition::Not(child) => {
            out.push('!');
            write_condition(out, child, false);
        }
        Condition::Trait(p) => write_predicate(out, "trait", p),
        Condition::ComputedTrait(p) => write_predicate(out, "computed_trait", p),
        Condition::Event(e) => {
            out.push_str("event(");
            write_string(out, &e.filter.event);
            out.push(')');
            if !e.filter.filters.is_empty() {
                out.push_str(".where(");
                for (i, f) in e.filter.filters.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" && ");
                    }
                    out.push_str("property(");
                    write_string(out, &f.property);
                    out.push(')');
                    let value = f.value.as_deref().map(value_from_text);
                    write_comparison(out, f.op, value.as_ref());
                }
                out.push(')');
            }
            write_window(out, &e.window, "");
            let _ = write!(out, ".count() {} {}", e.count_op.as_str(), e.count);
        }
        Condition::Seen(s) => {
            out.push_str(match s.end {
                SeenEnd::First => "first_seen()",
                SeenEnd::Last => "last_seen()",
            });
            write_window(out, &s.window, ".ever()");
        }
        Condition::Audience(k) => {
            out.push_str("audience(");
            write_string(out, k);
            out.push(')');
        }
    }
}

fn write_predicate(out: &mut String, function: &str, p: &Predicate) {
    out.push_str(function);
    out.push('(');
    write_string(out, &p.name);
    out.push(')');
    write_comparison(out, p.op, p.value.as_ref());
}

fn write_comparison(out: &mut String, op: Op, value: Option<&Value>) {
    let value = value.unwrap_or(&Value::Null);
    match op {
        Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let _ = write!(out, " {} ", op.as_str());
            write_literal(out, value);
        }
        Op::Exists => out.push_str(".exists()"),
        Op::Contains | Op::StartsWith | Op::In => {
            let _ = write!(out, ".{}(", op.as_str());
            match (op, value) {
                (Op::In, Value::Array(items)) => {
                    for (i, v) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        write_literal(out, v);
                    }
                }
                _ => write_literal(out, value),
            }
            out.push(')');
        }
    }
}

/// A property filter's value from its JSON text, numbers read as
/// [`number`] reads them so that they write back unchanged.
fn value_from_text(text: &str) -> Value {
    let text = text.trim();
    match text.as_bytes().first() {
        Some(b'[') => serde_json::from_str::<Vec<&RawValue>>(text).map_or(Value::Null, |items| {
            Value::Array(items.iter().map(|i| value_from_text(i.get())).collect())
        }),
        Some(b'-' | b'0'..=b'9') => number(text).map_or(Value::Null, Value::Number),
        _ => serde_json::from_str(text).unwrap_or(Value::Null),
    }
}

fn write_literal(out: &mut String, v: &Value) {
    match v {
        Value::String(s) => write_string(out, s),
        // Numbers and booleans are spelt as in JSON; anything else is not a
        // valid operand and has no literal.
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// Writes a window; `ever` is how [`Window::Ever`] is written (nothing for
/// an event condition, whose default it is).
fn write_window(out: &mut String, w: &Window, ever: &str) {
    match *w {
        Window::Ever => out.push_str(ever),
        Window::Last { micros, unit } => {
            let amount = micros / unit.micros();
            let unit = if amount == 1 {
                unit.as_str().trim_end_matches('s')
            } else {
                unit.as_str()
            };
            let _ = write!(out, ".within({amount} {unit})");
        }
        Window::Between { from, to } => {
            out.push_str(".between(");
            write_string(out, &exact_time(from));
            out.push_str(", ");
            write_string(out, &exact_time(to));
            out.push(')');
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::super::json::condition_from_json;
    use super::*;

    fn parse(text: &str) -> Condition {
        parse_query(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// Asserts that `text` fails at byte `at` with a message holding
    /// `needle` and the line and column, and returns the message.
    #[track_caller]
    fn fails_at(text: &str, at: usize, needle: &str) -> String {
        let e = parse_query(text).expect_err(text);
        assert_eq!(e.path, "query", "{e}");
        assert_eq!(e.position, Some(at), "{text}: {e}");
        assert!(e.message.contains(needle), "{text}: {e}");
        let column = text[..at].rsplit('\n').next().unwrap_or("").chars().count() + 1;
        let line = text[..at].matches('\n').count() + 1;
        assert!(
            e.message.ends_with(&format!(" at {line}:{column}")),
            "{text}: {e}"
        );
        e.message
    }

    fn audience(key: &str) -> Condition {
        Condition::Audience(key.into())
    }

    fn event(name: &str, filters: Vec<PropertyFilter>, window: Window) -> Condition {
        Condition::Event(EventCondition {
            filter: EventFilter {
                event: name.into(),
                filters,
            },
            count_op: CountOp::AtLeast,
            count: 1,
            window,
        })
    }

    fn filter(property: &str, op: Op, value: Option<&str>) -> PropertyFilter {
        PropertyFilter {
            property: property.into(),
            op,
            value: value.map(Into::into),
        }
    }

    fn predicate(name: &str, op: Op, value: Option<Value>) -> Predicate {
        Predicate {
            name: name.into(),
            op,
            value,
        }
    }

    #[test]
    fn parses_the_example() {
        let text = "event('Order Completed').where(property('total') >= 100).within(7 days).count() >= 1 && trait('plan') != 'enterprise'";
        let expected = Condition::And(vec![
            event(
                "Order Completed",
                vec![filter("total", Op::Ge, Some("100"))],
                Window::Last {
                    micros: 7 * DAY_MICROS,
                    unit: Unit::Days,
                },
            ),
            Condition::Trait(predicate("plan", Op::Ne, Some(json!("enterprise")))),
        ]);
        assert_eq!(parse(text), expected);
        assert_eq!(to_query(&expected), text);
    }

    #[test]
    fn parses_every_construct() {
        let a = || audience("a");
        let b = || audience("b");
        let t = |op, v: Option<Value>| Condition::Trait(predicate("t", op, v));
        let cases: Vec<(&str, Condition)> = vec![
            ("audience('a')", a()),
            ("audience(\"a\")", a()),
            ("  audience ( 'a' )\n", a()),
            (
                "audience('a') && audience('b') && audience('a')",
                Condition::And(vec![a(), b(), a()]),
            ),
            (
                "audience('a') and audience('b')",
                Condition::And(vec![a(), b()]),
            ),
            (
                "audience('a') || audience('b') or audience('a')",
                Condition::Or(vec![a(), b(), a()]),
            ),
            ("!audience('a')", Condition::Not(Box::new(a()))),
            ("not audience('a')", Condition::Not(Box::new(a()))),
            (
                "!!audience('a')",
                Condition::Not(Box::new(Condition::Not(Box::new(a())))),
            ),
            ("(audience('a'))", a()),
            // `&&` binds tighter than `||`.
            (
                "audience('a') || audience('b') && audience('a')",
                Condition::Or(vec![a(), Condition::And(vec![b(), a()])]),
            ),
            // Parentheses keep their group.
            (
                "(audience('a') && audience('b')) && audience('a')",
                Condition::And(vec![Condition::And(vec![a(), b()]), a()]),
            ),
            (
                "!(audience('a') || audience('b'))",
                Condition::Not(Box::new(Condition::Or(vec![a(), b()]))),
            ),
            ("all()", Condition::And(vec![])),
            ("any()", Condition::Or(vec![])),
            ("all(audience('a'))", Condition::And(vec![a()])),
            (
                "any(audience('a'), audience('b') && audience('a'))",
                Condition::Or(vec![a(), Condition::And(vec![b(), a()])]),
            ),
            ("trait('t') = 1", t(Op::Eq, Some(json!(1)))),
            ("trait('t') == 'x'", t(Op::Eq, Some(json!("x")))),
            ("trait('t') != true", t(Op::Ne, Some(json!(true)))),
            ("trait('t') < -2.5", t(Op::Lt, Some(json!(-2.5)))),
            ("trait('t') <= 1e3", t(Op::Le, Some(json!(1000.0)))),
            ("trait('t') > 'm'", t(Op::Gt, Some(json!("m")))),
            ("trait('t') >= 0", t(Op::Ge, Some(json!(0)))),
            ("trait('t').exists()", t(Op::Exists, None)),
            (
                "trait('t').contains(false)",
                t(Op::Contains, Some(json!(false))),
            ),
            (
                "trait('t').starts_with('pro')",
                t(Op::StartsWith, Some(json!("pro"))),
            ),
            (
                "trait('t').in('a', 2, true)",
                t(Op::In, Some(json!(["a", 2, true]))),
            ),
            ("trait('t').in()", t(Op::In, Some(json!([])))),
            (
                "computed_trait('ltv') > 99.5",
                Condition::ComputedTrait(predicate("ltv", Op::Gt, Some(json!(99.5)))),
            ),
            (
                "first_seen().within(1 minute)",
                Condition::Seen(SeenCondition {
                    end: SeenEnd::First,
                    window: Window::last(1, Unit::Minutes),
                }),
            ),
            (
                "last_seen().between('2024-01-01', '2024-02-01T00:00:00.5Z')",
                Condition::Seen(SeenCondition {
                    end: SeenEnd::Last,
                    window: Window::Between {
                        from: parse_micros("2024-01-01").unwrap(),
                        to: parse_micros("2024-02-01T00:00:00.5Z").unwrap(),
                    },
                }),
            ),
            (
                "last_seen().ever()",
                Condition::Seen(SeenCondition {
                    end: SeenEnd::Last,
                    window: Window::Ever,
                }),
            ),
            ("event('x').count() >= 1", event("x", vec![], Window::Ever)),
            (
                "event('x').ever().count() >= 1",
                event("x", vec![], Window::Ever),
            ),
            (
                "event('x').within(3 hours).count() >= 1",
                event("x", vec![], Window::last(3, Unit::Hours)),
            ),
            (
                "event('x').within(1 hour).count() >= 1",
                event("x", vec![], Window::last(1, Unit::Hours)),
            ),
            (
                "event('x').within(90 minutes).count() >= 1",
                event("x", vec![], Window::last(90, Unit::Minutes)),
            ),
            (
                "event('x').within(1 day).count() >= 1",
                event("x", vec![], Window::last(1, Unit::Days)),
            ),
            (
                "event('x').where(property('a').exists() && property('b').in('u', 'v') and property('c') = 1.50).count() >= 1",
                event(
                    "x",
                    vec![
                        filter("a", Op::Exists, None),
                        filter("b", Op::In, Some(r#"["u","v"]"#)),
                        filter("c", Op::Eq, Some("1.5")),
                    ],
                    Window::Ever,
                ),
            ),
        ];
        for (text, expected) in cases {
            let c = parse(text);
            assert_eq!(c, expected, "{text}");
            assert_eq!(parse(&to_query(&c)), c, "{text} -> {}", to_query(&c));
        }
        for (text, op, n) in [
            ("event('x').count() >= 3", CountOp::AtLeast, 3),
            ("event('x').count() <= 0", CountOp::AtMost, 0),
            ("event('x').count() = 1000", CountOp::Exactly, 1000),
            ("event('x').count() == 2", CountOp::Exactly, 2),
        ] {
            let Condition::Event(e) = parse(text) else {
                panic!("{text}")
            };
            assert_eq!((e.count_op, e.count), (op, n), "{text}");
        }
    }

    #[test]
    fn reads_strings_and_numbers_exactly() {
        let c = parse(r#"trait('it\'s "q" \\ \n\t\u00e9\ud83d\ude00') = "a\"b""#);
        assert_eq!(
            c,
            Condition::Trait(predicate(
                "it's \"q\" \\ \n\té😀",
                Op::Eq,
                Some(json!("a\"b"))
            ))
        );
        let value = |text: &str| match parse(text) {
            Condition::Trait(p) => p.value.unwrap(),
            other => panic!("{other:?}"),
        };
        assert!(value("trait('t') = 18446744073709551615").is_u64());
        assert!(value("trait('t') = -9223372036854775808").is_i64());
        assert!(value("trait('t') = 1.0").is_f64());
        assert!(value("trait('t') = 123456789012345678901234567890").is_f64());
        // A float serde_json alone reads one unit in the last place off.
        let f = value("trait('t') = 1.0715660391465826e-75");
        assert_eq!(f.as_f64(), Some(1.0715660391465826e-75));
        assert_eq!(
            value(&to_query(&parse("trait('t') = 1.0715660391465826e-75"))),
            f
        );
        // Control characters write as escapes and read back.
        let c = Condition::Trait(predicate("a\u{1}\r\u{7f}", Op::Eq, Some(json!("'"))));
        assert_eq!(to_query(&c), r"trait('a\u0001\u000d\u007f') = '\''");
        assert_eq!(parse(&to_query(&c)), c);
    }

    #[test]
    fn text_and_json_agree() {
        let cases = [
            (
                "event('Order Completed').where(property('total') >= 100).within(7 days).count() >= 1 && trait('plan') != 'enterprise'",
                json!({"and": [
                    {"event": "Order Completed", "where": [{"property": "total", "op": ">=", "value": 100}],
                     "within": {"last": 7, "unit": "days"}, "count": {"op": ">=", "value": 1}},
                    {"trait": "plan", "op": "!=", "value": "enterprise"}
                ]}),
            ),
            (
                "first_seen().between('2024-01-01', '2024-02-01T00:00:00Z') || last_seen().within(2 hours)",
                json!({"or": [
                    {"seen": "first", "within": {"between": ["2024-01-01", "2024-02-01T00:00:00Z"]}},
                    {"seen": "last", "within": {"last": 2, "unit": "hours"}}
                ]}),
            ),
            (
                "!(computed_trait('ltv') > 1.5 || audience('vip-1'))",
                json!({"not": {"or": [
                    {"computed_trait": "ltv", "op": ">", "value": 1.5},
                    {"audience": "vip-1"}
                ]}}),
            ),
            (
                "trait('tags').in('a', 1, true) && trait('email').exists() && trait('name').starts_with('Jo')",
                json!({"and": [
                    {"trait": "tags", "op": "in", "value": ["a", 1, true]},
                    {"trait": "email", "op": "exists"},
                    {"trait": "name", "op": "starts_with", "value": "Jo"}
                ]}),
            ),
            (
                "event('Viewed').where(property('plan').in('pro', 'team') && property('n').contains(-0.25) && property('u').exists()).count() = 0",
                json!({"event": "Viewed", "where": [
                    {"property": "plan", "op": "in", "value": ["pro", "team"]},
                    {"property": "n", "op": "contains", "value": -0.25},
                    {"property": "u", "op": "exists"}
                ], "count": {"op": "=", "value": 0}}),
            ),
            ("all()", json!({"and": []})),
            ("any(audience('a'))", json!({"or": [{"audience": "a"}]})),
            (
                "(audience('a') && audience('b')) && audience('c')",
                json!({"and": [{"and": [{"audience": "a"}, {"audience": "b"}]}, {"audience": "c"}]}),
            ),
            (
                "first_seen().ever()",
                json!({"seen": "first", "within": "ever"}),
            ),
        ];
        for (text, v) in cases {
            let from_json = condition_from_json(&v, "definition").unwrap();
            assert_eq!(parse(text), from_json, "{text}");
            assert_eq!(parse(&to_query(&from_json)), from_json, "{text}");
        }
    }

    #[test]
    fn errors_point_at_the_token() {
        // Unknown function.
        fails_at("evnt('x')", 0, "expected a condition");
        let m = fails_at("audience('a') && tr('b') = 1", 17, "found 'tr'");
        assert!(m.starts_with("expected a condition (event(...)"), "{m}");
        // Unterminated string, at its opening quote.
        fails_at(
            "trait('plan) = 1",
            6,
            "expected a closing ' to end the string, found the end of the text",
        );
        // Bad unit.
        fails_at(
            "event('x').within(7 weeks).count() >= 1",
            20,
            "expected a unit (minutes, hours or days), found 'weeks'",
        );
        // Missing `.count()`.
        fails_at(
            "event('x').within(7 days) >= 1",
            26,
            "expected .count() after the window, found '>='",
        );
        fails_at(
            "event('x') && audience('a')",
            11,
            "expected .where(...), .within(...), .between(...), .ever() or .count() after event(...), found '&&'",
        );
        fails_at(
            "event('x').count( >= 1",
            18,
            "expected ')' after '.count(', found '>='",
        );
        // Count over the limit, and a count operator counts do not have.
        fails_at(
            "event('x').count() >= 1001",
            22,
            "expected a count from 0 to 1000, found '1001'",
        );
        fails_at("event('x').count() >= -1", 22, "found '-1'");
        fails_at(
            "event('x').count() > 1",
            19,
            "expected a count comparison (>=, <= or =) after .count(), found '>'",
        );
        // Unknown operators.
        fails_at(
            "trait('a').like('x')",
            11,
            "expected an operator (=, !=, <, <=, >, >=, .exists()",
        );
        fails_at(
            "trait('a') ~ 1",
            11,
            "expected a name, a string, a number or an operator, found '~'",
        );
        fails_at("trait('a') 1", 11, "expected an operator");
        fails_at("trait('a') & 1", 11, "expected '&&', found '&'");
        // Trailing garbage.
        fails_at(
            "audience('a') audience('b')",
            14,
            "expected '&&', '||' or the end of the text, found 'audience'",
        );
        fails_at("audience('a'))", 13, "found ')'");
        fails_at(
            "(audience('a')",
            14,
            "expected '&&', '||' or ')', found the end of the text",
        );
        // Line and column.
        let m = fails_at("audience('a')\n  && évnt('x')", 19, "found 'é'");
        assert!(m.ends_with(" at 2:6"), "{m}");
    }

    #[test]
    fn errors_apply_the_json_checks() {
        fails_at(
            "trait('') = 1",
            6,
            "expected a trait name (1 to 256 bytes), found ''",
        );
        let long = format!("trait('{}') = 1", "x".repeat(MAX_STRING + 1));
        fails_at(&long, 6, "expected a trait name (1 to 256 bytes)");
        fails_at(
            "audience('VIP')",
            9,
            "expected an audience key (1 to 64 of a-z",
        );
        fails_at(
            "computed_trait('Ltv') > 1",
            15,
            "expected a computed trait key",
        );
        fails_at(
            "event(1).count() >= 1",
            6,
            "expected an event name (a quoted string), found '1'",
        );
        fails_at(
            "trait('a').starts_with(5)",
            23,
            "expected a string for .starts_with(...), found '5'",
        );
        fails_at(
            "trait('a') > true",
            13,
            "expected a number or a string to compare with for '>', found 'true'",
        );
        let long_value = format!("trait('a') = '{}'", "x".repeat(MAX_STRING + 1));
        fails_at(&long_value, 13, "expected a string of at most 256 bytes");
        fails_at(
            "trait('a') = null",
            13,
            "expected a value (a string, a number, true or false)",
        );
        let many = vec!["1"; MAX_IN_VALUES + 1].join(",");
        let text = format!("trait('a').in({many})");
        fails_at(
            &text,
            14 + 2 * MAX_IN_VALUES,
            "expected at most 100 values in .in(...), found more",
        );
        fails_at("trait('a').in(1,)", 16, "expected a value");
        fails_at("trait('a') = 1e400", 13, "expected a number such as 12");
        fails_at("trait('a') = 01", 13, "found '01'");
        fails_at("trait('a\\x') = 1", 8, "expected an escape");
        fails_at("trait('\\ud83d') = 1", 7, "expected a low surrogate");
        fails_at("trait('\\u12') = 1", 7, "expected 4 hex digits");
        fails_at(
            "event('x').within(0 days).count() >= 1",
            18,
            "expected a positive whole number",
        );
        fails_at(
            "event('x').within(3651 days).count() >= 1",
            18,
            "expected a window from 1 minute to 3650 days, found '3651 days'",
        );
        fails_at(
            "event('x').within(99999999999999999999 days).count() >= 1",
            18,
            "expected a positive whole number",
        );
        fails_at(
            "first_seen().between('2024-02-01', '2024-01-01')",
            21,
            "expected the first timestamp before the second, found '2024-02-01' and '2024-01-01'",
        );
        fails_at(
            "first_seen().between('yesterday', '2024-01-01')",
            21,
            "expected an ISO 8601 timestamp",
        );
        fails_at(
            "first_seen()",
            12,
            "expected .within(...), .between(...) or .ever() after first_seen()",
        );
        fails_at("first_seen().count()", 13, "found 'count'");
        fails_at(
            "event('x').within(1 day).where(property('a') = 1).count() >= 1",
            25,
            "expected .count() after the window, found 'where'",
        );
        fails_at(
            "event('x').where().count() >= 1",
            17,
            "expected property(...) in .where(...), found ')'",
        );
        let filters = ["property('p').exists()"; MAX_FILTERS + 1].join(" && ");
        let text = format!("event('x').where({filters}).count() >= 1");
        let eleventh = 17 + MAX_FILTERS * "property('p').exists() && ".len();
        fails_at(
            &text,
            eleventh,
            "expected at most 10 property filters, found more",
        );
        let big = "audience('a') || ".repeat(600) + "audience('a')";
        fails_at(
            &big,
            MAX_QUERY_BYTES,
            "expected at most 10000 bytes of text, found 10213",
        );
    }

    #[test]
    fn limits_depth_and_leaves() {
        // Seven nested levels of parentheses: refused at the seventh.
        let seven = format!("{}audience('a'){}", "(".repeat(7), ")".repeat(7));
        fails_at(
            &seven,
            6,
            "expected at most 6 levels of '(', '!', 'not', all() and any(), found '(' nested deeper",
        );
        assert_eq!(
            parse(&format!("{}audience('a'){}", "(".repeat(6), ")".repeat(6))),
            audience("a")
        );
        // A tree seven deep: refused at its deepest leaf.
        fails_at(
            "!!!!!!audience('a')",
            6,
            "expected conditions nested at most 6 deep, found one nested 7 deep",
        );
        let text = "audience('a') && (audience('b') || (audience('c') && (audience('d') || (audience('e') && (audience('f') || audience('g'))))))";
        let at = text.find("audience('f')").unwrap();
        fails_at(text, at, "found one nested 7 deep");
        fails_at("audience('a') && !!!!!all()", 22, "found one nested 7 deep");
        // Six deep is fine.
        assert_eq!(parse("!!!!!audience('a')").depth(), MAX_DEPTH);
        // Fifty leaves are fine; the fifty-first is refused where it starts.
        let fifty = vec!["audience('a')"; MAX_LEAVES].join(" || ");
        assert_eq!(parse(&fifty).leaves().len(), MAX_LEAVES);
        let text = format!("{fifty} || audience('b')");
        fails_at(
            &text,
            text.len() - "audience('b')".len(),
            "expected at most 50 conditions, found more",
        );
    }

    #[test]
    fn deep_nesting_cannot_overflow_the_stack() {
        // Too long to read at all.
        let e = parse_query(&"(".repeat(100_000)).unwrap_err();
        assert_eq!(e.position, Some(MAX_QUERY_BYTES));
        // Within the length limit, refused at the seventh level.
        for open in ["(", "!", "not ", "all("] {
            let text = open.repeat(MAX_QUERY_BYTES / open.len());
            let e = parse_query(&text).unwrap_err();
            assert_eq!(e.position, Some(6 * open.len()), "{open}: {e}");
        }
    }

    #[test]
    fn writes_degenerate_trees() {
        let cases = [
            (Condition::And(vec![]), "all()"),
            (Condition::Or(vec![audience("a")]), "any(audience('a'))"),
            (
                Condition::Not(Box::new(Condition::And(vec![audience("a"), audience("b")]))),
                "!(audience('a') && audience('b'))",
            ),
            (
                Condition::Or(vec![
                    Condition::And(vec![audience("a"), audience("b")]),
                    audience("c"),
                ]),
                "(audience('a') && audience('b')) || audience('c')",
            ),
            (
                Condition::Seen(SeenCondition {
                    end: SeenEnd::First,
                    window: Window::Ever,
                }),
                "first_seen().ever()",
            ),
        ];
        for (c, text) in cases {
            assert_eq!(to_query(&c), text);
            assert_eq!(parse(text), c);
        }
    }

    // ------------------------------------------------------------ properties

    /// Names with quotes, backslashes, control characters and any Unicode.
    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                3 => prop::char::range('a', 'z'),
                1 => prop::sample::select(vec!['\'', '"', '\\', '\n', '\t', '\r', '\u{0}', '\u{7f}', ' ', 'é']),
                1 => any::<char>(),
            ],
            1..8,
        )
        .prop_map(String::from_iter)
    }

    fn key() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_-]{0,12}"
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
        ]
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            name().prop_map(Value::from),
            number(),
            any::<bool>().prop_map(Value::from),
        ]
    }

    fn operand(op: Op) -> BoxedStrategy<Option<Value>> {
        match op {
            Op::Exists => Just(None).boxed(),
            Op::Eq | Op::Ne | Op::Contains => scalar().prop_map(Some).boxed(),
            Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                prop_oneof![name().prop_map(Value::from), number()]
                    .prop_map(Some)
                    .boxed()
            }
            Op::StartsWith => name().prop_map(|s| Some(Value::from(s))).boxed(),
            Op::In => prop::collection::vec(scalar(), 0..4)
                .prop_map(|v| Some(Value::Array(v)))
                .boxed(),
        }
    }

    fn predicate_of(names: BoxedStrategy<String>) -> impl Strategy<Value = Predicate> {
        (names, prop::sample::select(Op::ALL.to_vec())).prop_flat_map(|(name, op)| {
            operand(op).prop_map(move |value| Predicate {
                name: name.clone(),
                op,
                value,
            })
        })
    }

    /// The bounds of `parse_micros`.
    const FIRST: i64 = -62_135_596_800_000_000;
    const LAST: i64 = 253_402_300_799_999_999;

    fn window() -> impl Strategy<Value = Window> {
        prop_oneof![
            Just(Window::Ever),
            (1i64..=3_650 * 24 * 60).prop_map(|n| Window::last(n, Unit::Minutes)),
            (1i64..=3_650 * 24).prop_map(|n| Window::last(n, Unit::Hours)),
            (1i64..=3_650).prop_map(|n| Window::last(n, Unit::Days)),
            (FIRST..LAST)
                .prop_flat_map(|from| (Just(from), from + 1..=LAST))
                .prop_map(|(from, to)| Window::Between { from, to }),
            // Whole seconds, the common case.
            (0i64..4_000_000_000, 1i64..1_000_000).prop_map(|(s, d)| Window::Between {
                from: s * 1_000_000,
                to: (s + d) * 1_000_000
            }),
        ]
    }

    fn property_filter() -> impl Strategy<Value = PropertyFilter> {
        predicate_of(name().boxed()).prop_map(|p| PropertyFilter {
            property: p.name,
            op: p.op,
            value: p.value.map(|v| v.to_string()),
        })
    }

    fn leaf() -> impl Strategy<Value = Condition> {
        let count_op =
            prop::sample::select(vec![CountOp::AtLeast, CountOp::AtMost, CountOp::Exactly]);
        prop_oneof![
            predicate_of(name().boxed()).prop_map(Condition::Trait),
            predicate_of(key().boxed()).prop_map(Condition::ComputedTrait),
            (
                name(),
                prop::collection::vec(property_filter(), 0..3),
                count_op,
                0..=MAX_COUNT,
                window()
            )
                .prop_map(|(event, filters, count_op, count, window)| {
                    Condition::Event(EventCondition {
                        filter: EventFilter { event, filters },
                        count_op,
                        count,
                        window,
                    })
                }),
            (any::<bool>(), window()).prop_map(|(first, window)| Condition::Seen(SeenCondition {
                end: if first { SeenEnd::First } else { SeenEnd::Last },
                window,
            })),
            key().prop_map(Condition::Audience),
        ]
    }

    /// Valid trees at most 4 deep: leaves under up to three levels of
    /// `and`, `or` (of 0 to 3) and `not`.
    fn tree() -> impl Strategy<Value = Condition> {
        leaf().prop_recursive(3, 24, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..=3).prop_map(Condition::And),
                prop::collection::vec(inner.clone(), 0..=3).prop_map(Condition::Or),
                inner.prop_map(|c| Condition::Not(Box::new(c))),
            ]
        })
    }

    /// Random mixtures of the grammar's tokens, most of them wrong.
    fn token_soup() -> impl Strategy<Value = String> {
        let tokens = vec![
            "event(",
            "trait(",
            "computed_trait(",
            "first_seen()",
            "last_seen()",
            "audience(",
            "property(",
            "all(",
            "any(",
            "'x'",
            "\"y\"",
            "'",
            "\"",
            "\\",
            "(",
            ")",
            ",",
            ".",
            ".where(",
            ".within(",
            ".between(",
            ".ever()",
            ".count()",
            ".exists()",
            ".contains(",
            ".starts_with(",
            ".in(",
            "&&",
            "||",
            "!",
            "not ",
            " and ",
            " or ",
            "=",
            "==",
            "!=",
            "<",
            "<=",
            ">",
            ">=",
            "1",
            "-2.5e3",
            "7",
            " days",
            " hour",
            "true",
            "false",
            "'2024-01-01'",
            " ",
            "\n",
            "é",
            "'\\u00e9'",
            "'\\ud83d\\ude00'",
            "1e400",
            "01",
            "-",
            "'a'",
            "audience('a')",
            "trait('t') = 1",
            "event('e').count() >= 1",
        ];
        prop::collection::vec(prop::sample::select(tokens), 0..40).prop_map(|v| v.concat())
    }

    /// Whatever the text, an error is well formed and a success writes back
    /// to the same tree.
    fn check_any(text: &str) -> Result<(), TestCaseError> {
        match parse_query(text) {
            Ok(c) => {
                prop_assert!(check_limits(&c, "query").is_ok());
                let written = to_query(&c);
                if written.len() <= MAX_QUERY_BYTES {
                    prop_assert_eq!(parse_query(&written), Ok(c), "{}", written);
                }
            }
            Err(e) => {
                prop_assert_eq!(&e.path, "query");
                let at = e.position.unwrap_or(usize::MAX);
                prop_assert!(at <= text.len() && text.is_char_boundary(at), "{:?}", e);
                prop_assert!(e.message.contains(" at "), "{:?}", e);
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn written_trees_read_back(c in tree()) {
            prop_assert!(check_limits(&c, "query").is_ok());
            let text = to_query(&c);
            prop_assume!(text.len() <= MAX_QUERY_BYTES);
            prop_assert_eq!(parse_query(&text), Ok(c), "{}", text);
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            check_any(&text)?;
        }

        #[test]
        fn token_soup_never_panics(text in token_soup()) {
            check_any(&text)?;
        }
    }
}
