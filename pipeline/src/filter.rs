//! Event filtering patterns for Kafka records, as in AWS Lambda.
//!
//! A trigger's `filter` decides which records reach the function, with the
//! semantics of Lambda event filtering (the EventBridge pattern language).
//! A pattern is a JSON object (a TOML table in `pipeline.toml`):
//!
//! ```json
//! { "value": { "type": ["order"], "amount": [{ "numeric": [">", 0, "<=", 100] }] } }
//! ```
//!
//! * Keys name fields of the event. An object value descends into the field;
//!   an array value is a *leaf*: the list of matchers the field's value may
//!   satisfy (any of them).
//! * Every key of an object must match (and).
//! * Matchers are literals (`"order"`, `5`, `true`, `null`: equality, numbers
//!   compared numerically) or one-key objects:
//!   * `{"prefix": "s"}`, `{"suffix": "s"}`: string starts / ends with `s`;
//!   * `{"equals-ignore-case": "s"}`: string equal to `s` ignoring case;
//!   * `{"anything-but": ...}`: a present value that is none of a literal or
//!     list of literals, or a string that does not match
//!     `{"prefix": "s"}`, `{"suffix": "s"}` or `{"equals-ignore-case": "s"}`;
//!   * `{"numeric": [">", 0, "<=", 5]}`: a number within one or two
//!     comparisons (`=`, `<`, `<=`, `>`, `>=`); two comparisons are a lower and
//!     an upper bound;
//!   * `{"exists": true}` / `{"exists": false}`: the field is present / absent.
//! * When the event holds an array where the pattern expects a value, the
//!   pattern matches if any element matches. Nested patterns are matched
//!   element by element, so all fields of one nested pattern must match in the
//!   same element.
//! * `"$or": [pattern, pattern, ...]` in an object: besides the object's other
//!   keys, at least one of the listed patterns must match at that level (the
//!   EventBridge and Lambda spelling of *or* across fields), e.g.
//!   `{"value": {"$or": [{"type": ["refund"]}, {"amount": [{"numeric": [">", 100]}]}]}}`.
//!   At the top level the alternatives are record patterns themselves.
//! * A list of patterns (`filter = [{...}, {...}]`, Lambda's
//!   `FilterCriteria.Filters`) lets a record through when any of them
//!   matches: it is the top-level `$or`.
//! * Only `exists: false` matches an absent field, and every other matcher
//!   needs the field present. A field below a value that is not an object is
//!   absent. A field holding `null` is present: `[null]` and
//!   `{"exists": true}` match it, `{"exists": false}` does not.
//!
//! For Kafka records the top-level keys are the record's fields: `value` (the
//! record value parsed as JSON), `key` (a string), `topic`, `partition`,
//! `offset` and `timestamp` (milliseconds since the epoch). The caller builds
//! that object for each record and calls [`Pattern::matches`]. Leave out
//! `key` and `value` when the record has none if `{"exists": false}` should
//! match such records; set them to `null` if `[null]` should. A value that is
//! not JSON is put in as a string and matched with
//! [`Pattern::matches_plain_text`], as Lambda filters plain-string Kafka
//! messages: `{"value": [{"anything-but": ["error"]}]}` works on text.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// The top-level keys of a Kafka record pattern, and whether each may hold a
/// nested pattern (only `value`, which is JSON).
const RECORD_FIELDS: &[(&str, bool)] = &[
    ("value", true),
    ("key", false),
    ("topic", false),
    ("partition", false),
    ("offset", false),
    ("timestamp", false),
];

/// A compiled filter pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    fields: Fields,
}

/// The key of an object that lists alternative patterns.
const OR: &str = "$or";

/// An object pattern: every named field must match, and one of the `$or`
/// alternatives if there are any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Fields {
    named: BTreeMap<String, Node>,
    any_of: Vec<Fields>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// A nested pattern: every field must match.
    Object(Fields),
    /// A list of matchers: any may match.
    Leaf(Vec<Matcher>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    Equals(Literal),
    Prefix(String),
    Suffix(String),
    /// The expected string, lowercased.
    EqualsIgnoreCase(String),
    AnythingBut(AnythingBut),
    /// One or two comparisons, all of which must hold.
    Numeric(Vec<(Op, Number)>),
    Exists(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AnythingBut {
    Literals(Vec<Literal>),
    Prefix(String),
    Suffix(String),
    /// The strings, lowercased.
    EqualsIgnoreCase(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Literal {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
}

/// A JSON number as `f64`. JSON numbers are finite, so equality is total.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Number(f64);

impl Eq for Number {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "=" => Op::Eq,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            _ => return None,
        })
    }

    fn holds(self, value: f64, bound: f64) -> bool {
        match self {
            Op::Eq => value == bound,
            Op::Lt => value < bound,
            Op::Le => value <= bound,
            Op::Gt => value > bound,
            Op::Ge => value >= bound,
        }
    }

    fn is_lower(self) -> bool {
        matches!(self, Op::Gt | Op::Ge)
    }

    fn is_upper(self) -> bool {
        matches!(self, Op::Lt | Op::Le)
    }
}

/// A pattern that does not compile: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", shown_path(path))]
pub struct FilterError {
    /// Where in the pattern, as a path such as `value.amount` or
    /// `value.amount[1]` (the second matcher); empty for the whole pattern.
    pub path: String,
    /// What is wrong there.
    pub problem: FilterProblem,
}

fn shown_path(path: &str) -> String {
    if path.is_empty() {
        "the pattern".to_owned()
    } else {
        format!("at `{path}`")
    }
}

/// What is wrong with a filter pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterProblem {
    /// The pattern is not an object (or, at the top, a list of objects).
    #[error("expected an object of field names, found {found}")]
    NotAnObject {
        /// The value found, e.g. `an array`.
        found: String,
    },
    /// An object with no keys.
    #[error("an empty object matches nothing; name at least one field")]
    EmptyObject,
    /// A top-level key that is not a field of a Kafka record.
    #[error(
        "unknown Kafka record field `{field}`; expected one of `value`, `key`, `topic`, \
         `partition`, `offset` or `timestamp`"
    )]
    UnknownRecordField {
        /// The key as written.
        field: String,
    },
    /// A nested pattern under a record field that is not JSON.
    #[error(
        "`{field}` is not JSON, so it has no fields to match: write an array of \
         matchers, e.g. [{{\"prefix\": \"a\"}}]"
    )]
    NotNestable {
        /// The record field.
        field: String,
    },
    /// A leaf that is not an array of matchers.
    #[error(
        "expected an array of matchers such as [\"order\"], or an object of nested \
         fields, found {found}"
    )]
    LeafNotArray {
        /// The value found, e.g. `string "order"`.
        found: String,
    },
    /// `$or` with something other than a non-empty array of patterns.
    #[error(
        "`$or` needs a non-empty array of patterns, e.g. [{{\"type\": [\"refund\"]}}, \
         {{\"amount\": [{{\"numeric\": [\">\", 100]}}]}}], found {found}"
    )]
    BadOr {
        /// The value found, e.g. `an object`.
        found: String,
    },
    /// A list of filters with none in it.
    #[error("an empty list of patterns matches nothing; give at least one pattern")]
    EmptyList,
    /// An empty array of matchers.
    #[error("an empty array of matchers matches nothing; list at least one value or matcher")]
    EmptyArray,
    /// An array inside an array of matchers.
    #[error("a matcher cannot be an array; list the values directly in the field's array")]
    NestedArray,
    /// A matcher object without exactly one key.
    #[error("a matcher object needs exactly one key (the operator), found {count}")]
    NotOneOperator {
        /// How many keys the object has.
        count: usize,
    },
    /// A matcher object whose key is not an operator.
    #[error(
        "unknown matcher `{operator}`; expected one of `prefix`, `suffix`, \
         `equals-ignore-case`, `anything-but`, `numeric` or `exists`"
    )]
    UnknownOperator {
        /// The key as written.
        operator: String,
    },
    /// An operator applied to the wrong kind of operand.
    #[error("`{operator}` needs {expected}, found {found}")]
    BadOperand {
        /// The operator, e.g. `prefix`.
        operator: &'static str,
        /// What it needs, e.g. `a string`.
        expected: &'static str,
        /// The operand found.
        found: String,
    },
    /// `numeric` with other than one or two operator-number pairs.
    #[error(
        "`numeric` takes one or two comparisons, each an operator and a number, \
         e.g. [\">\", 0] or [\">\", 0, \"<=\", 5]; found {count} item{}",
        if *count == 1 { "" } else { "s" }
    )]
    NumericArity {
        /// How many items the array has.
        count: usize,
    },
    /// A `numeric` operator that is not a comparison.
    #[error(
        "unknown numeric operator {operator}; expected one of \"=\", \"<\", \"<=\", \">\" or \">=\""
    )]
    NumericOperator {
        /// The operator as written (JSON).
        operator: String,
    },
    /// A `numeric` comparison against something other than a number.
    #[error("numeric operator \"{operator}\" needs a number, found {found}")]
    NumericValue {
        /// The operator.
        operator: String,
        /// The operand found.
        found: String,
    },
    /// Two `numeric` comparisons that are not a lower and an upper bound.
    #[error(
        "two numeric comparisons must be a lower bound (\">\" or \">=\") and an upper \
         bound (\"<\" or \"<=\"), found \"{first}\" and \"{second}\""
    )]
    NumericBounds {
        /// The first operator.
        first: String,
        /// The second operator.
        second: String,
    },
    /// A number that JSON cannot hold (`nan` or `inf` in TOML).
    #[error("numbers must be finite, found {value}")]
    NonFiniteNumber {
        /// The number.
        value: String,
    },
    /// A `numeric` range that no number satisfies.
    #[error("the numeric range is empty: no number is {lower} and {upper}")]
    NumericEmpty {
        /// The lower bound, e.g. `> 5`.
        lower: String,
        /// The upper bound, e.g. `< 1`.
        upper: String,
    },
}

impl Pattern {
    /// Compiles a Kafka record pattern, or a list of them (a record matches
    /// the list when it matches any). Top-level keys must be record fields
    /// (`value`, `key`, `topic`, `partition`, `offset`, `timestamp`) or
    /// `$or`, and only `value` may hold nested fields.
    pub fn compile(v: &Value) -> Result<Pattern, FilterError> {
        let root = Path::root();
        let fields = match v {
            Value::Array(list) if list.is_empty() => {
                return Err(root.error(FilterProblem::EmptyList));
            }
            Value::Array(list) => Fields {
                named: BTreeMap::new(),
                any_of: list
                    .iter()
                    .enumerate()
                    .map(|(i, p)| compile_record(p, &root.index(i)))
                    .collect::<Result<_, _>>()?,
            },
            v => compile_record(v, &root)?,
        };
        Ok(Pattern { fields })
    }

    /// Whether `event` matches the pattern. For Kafka records, `event` is an
    /// object of the record's fields (see the module documentation).
    pub fn matches(&self, event: &Value) -> bool {
        match_record(&self.fields, event, false)
    }

    /// Whether `event` matches when its `value` is a plain string, not
    /// JSON (Lambda's plain-string Kafka messages): matchers on `value`
    /// test the string, and a pattern with fields inside `value` does not
    /// match it, since a plain string has no fields.
    pub fn matches_plain_text(&self, event: &Value) -> bool {
        match_record(&self.fields, event, true)
    }

    /// Whether some pattern names fields inside the record's `value`, so
    /// that a value that is not JSON is not what the filter expects.
    pub fn looks_inside_value(&self) -> bool {
        self.fields
            .any(&|key, node| key == "value" && matches!(node, Node::Object(_)))
    }

    /// Whether some pattern tests the record's whole `value` (more than
    /// whether it exists), as a plain string would be tested.
    pub fn reads_value_as_text(&self) -> bool {
        self.fields.any(&|key, node| {
            key == "value"
                && matches!(node, Node::Leaf(matchers)
                    if !matchers.iter().all(|m| matches!(m, Matcher::Exists(_))))
        })
    }

    /// Whether some pattern tests the record's `value` (more than whether
    /// it exists), so that a value that cannot be read as text is not what
    /// the filter expects.
    pub fn reads_value(&self) -> bool {
        self.looks_inside_value() || self.reads_value_as_text()
    }
}

impl Fields {
    /// Whether `test` holds for a named field here or in an alternative.
    fn any(&self, test: &dyn Fn(&str, &Node) -> bool) -> bool {
        self.named.iter().any(|(key, node)| test(key, node))
            || self.any_of.iter().any(|alt| alt.any(test))
    }
}

/// Compiles a pattern over a Kafka record's fields.
fn compile_record(v: &Value, path: &Path) -> Result<Fields, FilterError> {
    let object = v
        .as_object()
        .ok_or_else(|| path.error(FilterProblem::NotAnObject { found: describe(v) }))?;
    compile_object(object, path, &|key, value, path| {
        let Some(&(_, nestable)) = RECORD_FIELDS.iter().find(|(name, _)| *name == key) else {
            return Err(path.error(FilterProblem::UnknownRecordField {
                field: key.to_owned(),
            }));
        };
        if value.is_object() && !nestable {
            return Err(path.error(FilterProblem::NotNestable {
                field: key.to_owned(),
            }));
        }
        compile_node(value, path)
    })
}

/// Compiles an object pattern whose named fields `field` compiles; `$or`
/// alternatives are objects of the same kind.
fn compile_object(
    object: &serde_json::Map<String, Value>,
    path: &Path,
    field: &dyn Fn(&str, &Value, &Path) -> Result<Node, FilterError>,
) -> Result<Fields, FilterError> {
    if object.is_empty() {
        return Err(path.error(FilterProblem::EmptyObject));
    }
    let mut fields = Fields::default();
    for (key, value) in object {
        let at = path.key(key);
        if key != OR {
            fields.named.insert(key.clone(), field(key, value, &at)?);
            continue;
        }
        let alternatives = match value {
            Value::Array(list) if !list.is_empty() => list,
            other => {
                return Err(at.error(FilterProblem::BadOr {
                    found: describe(other),
                }));
            }
        };
        for (i, alternative) in alternatives.iter().enumerate() {
            let at = at.index(i);
            let Value::Object(alternative) = alternative else {
                return Err(at.error(FilterProblem::NotAnObject {
                    found: describe(alternative),
                }));
            };
            fields.any_of.push(compile_object(alternative, &at, field)?);
        }
    }
    Ok(fields)
}

/// Converts a pattern written in TOML to JSON. Datetimes become strings.
pub(crate) fn from_toml(value: &toml::Value) -> Result<Value, FilterError> {
    fn convert(v: &toml::Value, path: &Path) -> Result<Value, FilterError> {
        Ok(match v {
            toml::Value::String(s) => Value::String(s.clone()),
            toml::Value::Integer(i) => Value::from(*i),
            toml::Value::Float(x) => serde_json::Number::from_f64(*x)
                .map(Value::Number)
                .ok_or_else(|| {
                    path.error(FilterProblem::NonFiniteNumber {
                        value: x.to_string(),
                    })
                })?,
            toml::Value::Boolean(b) => Value::Bool(*b),
            toml::Value::Datetime(d) => Value::String(d.to_string()),
            toml::Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| convert(item, &path.index(i)))
                    .collect::<Result<_, _>>()?,
            ),
            toml::Value::Table(table) => convert_table(table, path)?,
        })
    }
    fn convert_table(table: &toml::Table, path: &Path) -> Result<Value, FilterError> {
        table
            .iter()
            .map(|(key, v)| Ok((key.clone(), convert(v, &path.key(key))?)))
            .collect::<Result<serde_json::Map<_, _>, _>>()
            .map(Value::Object)
    }
    convert(value, &Path::root())
}

/// A position in the pattern, for errors.
struct Path(String);

impl Path {
    fn root() -> Path {
        Path(String::new())
    }

    fn key(&self, key: &str) -> Path {
        let bare = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '$');
        let key = if bare {
            key.to_owned()
        } else {
            Value::String(key.to_owned()).to_string()
        };
        if self.0.is_empty() {
            Path(key)
        } else {
            Path(format!("{}.{key}", self.0))
        }
    }

    fn index(&self, i: usize) -> Path {
        Path(format!("{}[{i}]", self.0))
    }

    fn error(&self, problem: FilterProblem) -> FilterError {
        FilterError {
            path: self.0.clone(),
            problem,
        }
    }
}

/// Describes a JSON value for messages: `string "a"`, `number 5`, `an array`.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {}", Value::String(s.clone())),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

fn compile_node(v: &Value, path: &Path) -> Result<Node, FilterError> {
    match v {
        Value::Object(object) => {
            compile_object(object, path, &|_, value, path| compile_node(value, path))
                .map(Node::Object)
        }
        Value::Array(items) => {
            if items.is_empty() {
                return Err(path.error(FilterProblem::EmptyArray));
            }
            let matchers = items
                .iter()
                .enumerate()
                .map(|(i, item)| compile_matcher(item, &path.index(i)))
                .collect::<Result<_, _>>()?;
            Ok(Node::Leaf(matchers))
        }
        other => Err(path.error(FilterProblem::LeafNotArray {
            found: describe(other),
        })),
    }
}

fn literal(v: &Value) -> Option<Literal> {
    Some(match v {
        Value::Null => Literal::Null,
        Value::Bool(b) => Literal::Bool(*b),
        Value::Number(n) => Literal::Number(Number(n.as_f64()?)),
        Value::String(s) => Literal::String(s.clone()),
        Value::Array(_) | Value::Object(_) => return None,
    })
}

fn compile_matcher(v: &Value, path: &Path) -> Result<Matcher, FilterError> {
    let object = match v {
        Value::Array(_) => return Err(path.error(FilterProblem::NestedArray)),
        Value::Object(object) => object,
        scalar => {
            return literal(scalar).map(Matcher::Equals).ok_or_else(|| {
                path.error(FilterProblem::BadOperand {
                    operator: "a literal",
                    expected: "a finite number",
                    found: describe(scalar),
                })
            });
        }
    };
    let mut entries = object.iter();
    let (Some((operator, operand)), None) = (entries.next(), entries.next()) else {
        return Err(path.error(FilterProblem::NotOneOperator {
            count: object.len(),
        }));
    };
    let bad = |operator: &'static str, expected: &'static str| {
        path.error(FilterProblem::BadOperand {
            operator,
            expected,
            found: describe(operand),
        })
    };
    let string = |operator: &'static str| {
        operand
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| bad(operator, "a string"))
    };
    match operator.as_str() {
        "prefix" => string("prefix").map(Matcher::Prefix),
        "suffix" => string("suffix").map(Matcher::Suffix),
        "equals-ignore-case" => {
            string("equals-ignore-case").map(|s| Matcher::EqualsIgnoreCase(s.to_lowercase()))
        }
        "exists" => operand
            .as_bool()
            .map(Matcher::Exists)
            .ok_or_else(|| bad("exists", "true or false")),
        "numeric" => compile_numeric(operand, path).map(Matcher::Numeric),
        "anything-but" => compile_anything_but(operand, path).map(Matcher::AnythingBut),
        _ => Err(path.error(FilterProblem::UnknownOperator {
            operator: operator.clone(),
        })),
    }
}

fn compile_anything_but(operand: &Value, path: &Path) -> Result<AnythingBut, FilterError> {
    const EXPECTED: &str = "a value, a non-empty array of values, or an object with \
                            `prefix`, `suffix` or `equals-ignore-case`";
    let bad = || {
        path.error(FilterProblem::BadOperand {
            operator: "anything-but",
            expected: EXPECTED,
            found: describe(operand),
        })
    };
    match operand {
        Value::Array(items) if items.is_empty() => Err(bad()),
        Value::Array(items) => items
            .iter()
            .map(|item| literal(item).ok_or_else(bad))
            .collect::<Result<_, _>>()
            .map(AnythingBut::Literals),
        Value::Object(object) => {
            let mut entries = object.iter();
            let (Some((operator, inner)), None) = (entries.next(), entries.next()) else {
                return Err(bad());
            };
            let inner_bad = |expected: &'static str| {
                path.error(FilterProblem::BadOperand {
                    operator: "anything-but",
                    expected,
                    found: describe(inner),
                })
            };
            let string = |expected| {
                inner
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| inner_bad(expected))
            };
            match operator.as_str() {
                "prefix" => string("a string after `prefix`").map(AnythingBut::Prefix),
                "suffix" => string("a string after `suffix`").map(AnythingBut::Suffix),
                "equals-ignore-case" => {
                    const EXPECTED: &str =
                        "a string or a non-empty array of strings after `equals-ignore-case`";
                    let strings: Vec<String> = match inner {
                        Value::String(s) => vec![s.to_lowercase()],
                        Value::Array(items) if !items.is_empty() => items
                            .iter()
                            .map(|i| {
                                i.as_str()
                                    .map(str::to_lowercase)
                                    .ok_or_else(|| inner_bad(EXPECTED))
                            })
                            .collect::<Result<_, _>>()?,
                        _ => return Err(inner_bad(EXPECTED)),
                    };
                    Ok(AnythingBut::EqualsIgnoreCase(strings))
                }
                _ => Err(bad()),
            }
        }
        scalar => literal(scalar)
            .map(|l| AnythingBut::Literals(vec![l]))
            .ok_or_else(bad),
    }
}

fn compile_numeric(operand: &Value, path: &Path) -> Result<Vec<(Op, Number)>, FilterError> {
    let Some(items) = operand.as_array() else {
        return Err(path.error(FilterProblem::BadOperand {
            operator: "numeric",
            expected: "an array such as [\">\", 0, \"<=\", 5]",
            found: describe(operand),
        }));
    };
    if !matches!(items.len(), 2 | 4) {
        return Err(path.error(FilterProblem::NumericArity { count: items.len() }));
    }
    let mut comparisons = Vec::with_capacity(2);
    for pair in items.chunks_exact(2) {
        let (operator, bound) = (&pair[0], &pair[1]);
        let op = operator.as_str().and_then(Op::parse).ok_or_else(|| {
            path.error(FilterProblem::NumericOperator {
                operator: operator.to_string(),
            })
        })?;
        let bound = bound.as_f64().ok_or_else(|| {
            path.error(FilterProblem::NumericValue {
                operator: operator.as_str().unwrap_or_default().to_owned(),
                found: describe(bound),
            })
        })?;
        comparisons.push((op, Number(bound)));
    }
    if let [(first, low), (second, high)] = comparisons.as_slice() {
        let (lower, upper) = if first.is_lower() && second.is_upper() {
            ((first, low), (second, high))
        } else if first.is_upper() && second.is_lower() {
            ((second, high), (first, low))
        } else {
            let name = |i: usize| items[i].as_str().unwrap_or_default().to_owned();
            return Err(path.error(FilterProblem::NumericBounds {
                first: name(0),
                second: name(2),
            }));
        };
        let empty = lower.1.0 > upper.1.0
            || (lower.1.0 == upper.1.0 && (*lower.0 == Op::Gt || *upper.0 == Op::Lt));
        if empty {
            let show = |(op, n): (&Op, &Number)| format!("{op} {}", n.0);
            return Err(path.error(FilterProblem::NumericEmpty {
                lower: show(lower),
                upper: show(upper),
            }));
        }
    }
    Ok(comparisons)
}

/// Matches a pattern over a record's fields; with `plain_text`, nested
/// fields under `value` never match.
fn match_record(fields: &Fields, event: &Value, plain_text: bool) -> bool {
    let object = event.as_object();
    fields.named.iter().all(|(key, node)| {
        if plain_text && key == "value" && matches!(node, Node::Object(_)) {
            return false;
        }
        match_node(node, object.and_then(|o| o.get(key)))
    }) && (fields.any_of.is_empty()
        || fields
            .any_of
            .iter()
            .any(|alt| match_record(alt, event, plain_text)))
}

fn match_fields(fields: &Fields, v: Option<&Value>) -> bool {
    match v {
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().any(|item| match_fields(fields, Some(item)))
        }
        _ => {
            let named = match v {
                Some(Value::Object(object)) => fields
                    .named
                    .iter()
                    .all(|(key, node)| match_node(node, object.get(key))),
                // Below a scalar (or an empty array) every field is absent.
                _ => fields.named.values().all(|node| match_node(node, None)),
            };
            named
                && (fields.any_of.is_empty()
                    || fields.any_of.iter().any(|alt| match_fields(alt, v)))
        }
    }
}

fn match_node(node: &Node, v: Option<&Value>) -> bool {
    match node {
        Node::Object(fields) => match_fields(fields, v),
        Node::Leaf(matchers) => matchers.iter().any(|m| m.matches(v)),
    }
}

impl Matcher {
    fn matches(&self, v: Option<&Value>) -> bool {
        match (self, v) {
            (Matcher::Exists(exists), v) => v.is_some() == *exists,
            (_, None) => false,
            (_, Some(v)) => self.matches_value(v),
        }
    }

    /// Matches a present value; arrays match if any element does.
    fn matches_value(&self, v: &Value) -> bool {
        match v {
            Value::Array(items) => items.iter().any(|item| self.matches_value(item)),
            Value::Object(_) => false,
            scalar => self.matches_scalar(scalar),
        }
    }

    fn matches_scalar(&self, v: &Value) -> bool {
        match self {
            Matcher::Equals(literal) => literal.equals(v),
            Matcher::Prefix(prefix) => v.as_str().is_some_and(|s| s.starts_with(prefix.as_str())),
            Matcher::Suffix(suffix) => v.as_str().is_some_and(|s| s.ends_with(suffix.as_str())),
            Matcher::EqualsIgnoreCase(lower) => {
                v.as_str().is_some_and(|s| s.to_lowercase() == *lower)
            }
            Matcher::AnythingBut(but) => match but {
                AnythingBut::Literals(literals) => !literals.iter().any(|l| l.equals(v)),
                AnythingBut::Prefix(prefix) => {
                    v.as_str().is_some_and(|s| !s.starts_with(prefix.as_str()))
                }
                AnythingBut::Suffix(suffix) => {
                    v.as_str().is_some_and(|s| !s.ends_with(suffix.as_str()))
                }
                AnythingBut::EqualsIgnoreCase(lowers) => v
                    .as_str()
                    .is_some_and(|s| !lowers.contains(&s.to_lowercase())),
            },
            Matcher::Numeric(comparisons) => v
                .as_f64()
                .is_some_and(|n| comparisons.iter().all(|(op, bound)| op.holds(n, bound.0))),
            Matcher::Exists(exists) => *exists,
        }
    }
}

impl Literal {
    fn equals(&self, v: &Value) -> bool {
        match (self, v) {
            (Literal::Null, Value::Null) => true,
            (Literal::Bool(a), Value::Bool(b)) => a == b,
            (Literal::Number(a), Value::Number(b)) => b.as_f64() == Some(a.0),
            (Literal::String(a), Value::String(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Eq => "=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pattern(v: Value) -> Pattern {
        Pattern::compile(&v).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    /// A record whose value is `value`, with fixed metadata.
    fn record(value: Value) -> Value {
        json!({
            "topic": "orders",
            "partition": 2,
            "offset": 41,
            "timestamp": 1_714_521_600_000_i64,
            "key": "customer-7",
            "value": value,
        })
    }

    /// Whether a pattern on `value.f` with matchers `leaf` matches `f = field`.
    fn leaf_matches(leaf: Value, field: Value) -> bool {
        pattern(json!({ "value": { "f": leaf } })).matches(&record(json!({ "f": field })))
    }

    fn error(v: Value) -> FilterError {
        match Pattern::compile(&v) {
            Ok(p) => panic!("{v} compiled: {p:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn literals_match_by_equality() {
        assert!(leaf_matches(json!(["order"]), json!("order")));
        assert!(!leaf_matches(json!(["order"]), json!("Order")));
        assert!(!leaf_matches(json!(["5"]), json!(5)));
        assert!(leaf_matches(json!([true]), json!(true)));
        assert!(!leaf_matches(json!([true]), json!(false)));
        assert!(!leaf_matches(json!([true]), json!("true")));
        assert!(leaf_matches(json!([null]), json!(null)));
        assert!(!leaf_matches(json!([null]), json!("")));
        assert!(leaf_matches(json!([""]), json!("")));
        // Any of the listed values.
        assert!(leaf_matches(json!(["a", "b", 3]), json!(3)));
        assert!(!leaf_matches(json!(["a", "b", 3]), json!("c")));
        // An object is not a value a literal can equal.
        assert!(!leaf_matches(json!(["a"]), json!({ "a": 1 })));
    }

    #[test]
    fn numbers_compare_numerically() {
        assert!(leaf_matches(json!([5]), json!(5.0)));
        assert!(leaf_matches(json!([5.0]), json!(5)));
        assert!(leaf_matches(json!([-0.5]), json!(-5e-1)));
        assert!(!leaf_matches(json!([5]), json!(5.01)));
    }

    #[test]
    fn prefix_suffix_and_ignore_case() {
        assert!(leaf_matches(json!([{ "prefix": "ord" }]), json!("order")));
        assert!(!leaf_matches(
            json!([{ "prefix": "ord" }]),
            json!("reorder")
        ));
        assert!(!leaf_matches(json!([{ "prefix": "1" }]), json!(12)));
        assert!(leaf_matches(json!([{ "suffix": ".png" }]), json!("a.png")));
        assert!(!leaf_matches(
            json!([{ "suffix": ".png" }]),
            json!("a.png.txt")
        ));
        assert!(leaf_matches(
            json!([{ "equals-ignore-case": "ÉTé" }]),
            json!("été")
        ));
        assert!(leaf_matches(
            json!([{ "equals-ignore-case": "order" }]),
            json!("ORDER")
        ));
        assert!(!leaf_matches(
            json!([{ "equals-ignore-case": "order" }]),
            json!("orders")
        ));
        assert!(!leaf_matches(
            json!([{ "equals-ignore-case": "1" }]),
            json!(1)
        ));
    }

    #[test]
    fn anything_but() {
        let but = |operand: Value, field: Value| {
            leaf_matches(json!([{ "anything-but": operand }]), field)
        };
        assert!(but(json!(["a", "b"]), json!("c")));
        assert!(!but(json!(["a", "b"]), json!("b")));
        assert!(but(json!(["a"]), json!(5)));
        assert!(but(json!("a"), json!("b")));
        assert!(!but(json!("a"), json!("a")));
        assert!(!but(json!([1, 2]), json!(2.0)));
        assert!(but(json!(null), json!("x")));
        assert!(!but(json!(null), json!(null)));
        // Prefix, suffix and ignore-case forms need strings.
        assert!(but(json!({ "prefix": "test-" }), json!("prod-1")));
        assert!(!but(json!({ "prefix": "test-" }), json!("test-1")));
        assert!(!but(json!({ "prefix": "test-" }), json!(5)));
        assert!(but(json!({ "suffix": ".tmp" }), json!("a.txt")));
        assert!(!but(json!({ "suffix": ".tmp" }), json!("a.tmp")));
        assert!(but(json!({ "equals-ignore-case": ["A", "b"] }), json!("c")));
        assert!(!but(
            json!({ "equals-ignore-case": ["A", "b"] }),
            json!("B")
        ));
        // An absent field is not "anything".
        let p = pattern(json!({ "value": { "f": [{ "anything-but": ["a"] }] } }));
        assert!(!p.matches(&record(json!({ "g": 1 }))));
    }

    #[test]
    fn numeric_ranges() {
        let numeric = |cmp: Value, field: Value| leaf_matches(json!([{ "numeric": cmp }]), field);
        assert!(numeric(json!([">", 0]), json!(0.1)));
        assert!(!numeric(json!([">", 0]), json!(0)));
        assert!(numeric(json!([">=", 0]), json!(0)));
        assert!(numeric(json!(["<", 10]), json!(-3)));
        assert!(!numeric(json!(["<", 10]), json!(10)));
        assert!(numeric(json!(["<=", 10]), json!(10)));
        assert!(numeric(json!(["=", 7]), json!(7.0)));
        assert!(!numeric(json!(["=", 7]), json!(7.5)));
        let range = json!([">", 0, "<=", 5]);
        assert!(!numeric(range.clone(), json!(0)));
        assert!(numeric(range.clone(), json!(0.5)));
        assert!(numeric(range.clone(), json!(5)));
        assert!(!numeric(range.clone(), json!(5.5)));
        // Upper bound first is the same range.
        assert!(numeric(json!(["<=", 5, ">", 0]), json!(5)));
        // Numbers only: a numeric string does not match.
        assert!(!numeric(range, json!("3")));
        assert!(numeric(json!([">=", 3, "<=", 3]), json!(3)));
    }

    #[test]
    fn exists() {
        let p = pattern(json!({ "value": { "f": [{ "exists": true }] } }));
        assert!(p.matches(&record(json!({ "f": 1 }))));
        assert!(p.matches(&record(json!({ "f": null }))));
        assert!(p.matches(&record(json!({ "f": { "g": 1 } }))));
        assert!(!p.matches(&record(json!({ "g": 1 }))));

        let p = pattern(json!({ "value": { "f": [{ "exists": false }] } }));
        assert!(p.matches(&record(json!({ "g": 1 }))));
        assert!(!p.matches(&record(json!({ "f": null }))));
        // Below a value that is not an object, every field is absent.
        assert!(p.matches(&record(json!("plain"))));
        assert!(p.matches(&record(json!(null))));
        // So is anything below an absent field.
        let deep = pattern(json!({ "value": { "a": { "b": [{ "exists": false }] } } }));
        assert!(deep.matches(&record(json!({}))));
        assert!(deep.matches(&record(json!({ "a": 5 }))));
        assert!(!deep.matches(&record(json!({ "a": { "b": 0 } }))));
        // Or with other matchers: absent, or equal to "x".
        let either = pattern(json!({ "value": { "f": [{ "exists": false }, "x"] } }));
        assert!(either.matches(&record(json!({}))));
        assert!(either.matches(&record(json!({ "f": "x" }))));
        assert!(!either.matches(&record(json!({ "f": "y" }))));
    }

    #[test]
    fn nesting_and_all_keys() {
        let p = pattern(json!({
            "topic": ["orders"],
            "value": {
                "type": ["order"],
                "customer": { "tier": ["gold", "platinum"], "id": [{ "prefix": "c-" }] },
            },
        }));
        let good = json!({ "type": "order", "customer": { "tier": "gold", "id": "c-1" } });
        assert!(p.matches(&record(good)));
        let wrong_tier = json!({ "type": "order", "customer": { "tier": "tin", "id": "c-1" } });
        assert!(!p.matches(&record(wrong_tier)));
        let no_customer = json!({ "type": "order" });
        assert!(!p.matches(&record(no_customer)));
        let flat = json!({ "type": "order", "customer": "c-1" });
        assert!(!p.matches(&record(flat)));
        let mut other_topic =
            record(json!({ "type": "order", "customer": { "tier": "gold", "id": "c-1" } }));
        other_topic["topic"] = json!("refunds");
        assert!(!p.matches(&other_topic));
    }

    #[test]
    fn record_metadata() {
        let r = record(json!(null));
        assert!(pattern(json!({ "partition": [2] })).matches(&r));
        assert!(pattern(json!({ "offset": [{ "numeric": [">", 40] }] })).matches(&r));
        assert!(pattern(json!({ "key": [{ "prefix": "customer-" }] })).matches(&r));
        assert!(
            pattern(json!({ "timestamp": [{ "numeric": [">=", 1_714_521_600_000_i64] }] }))
                .matches(&r)
        );
        assert!(!pattern(json!({ "topic": ["other"] })).matches(&r));
        // A record without a key.
        let keyless = json!({ "topic": "t", "partition": 0, "offset": 0, "timestamp": 0 });
        assert!(pattern(json!({ "key": [{ "exists": false }] })).matches(&keyless));
        assert!(!pattern(json!({ "key": [{ "prefix": "" }] })).matches(&keyless));
    }

    #[test]
    fn arrays_in_the_event_match_any_element() {
        assert!(leaf_matches(json!(["b"]), json!(["a", "b"])));
        assert!(!leaf_matches(json!(["c"]), json!(["a", "b"])));
        assert!(!leaf_matches(json!(["c"]), json!([])));
        assert!(leaf_matches(
            json!([{ "numeric": [">", 10] }]),
            json!([1, 20])
        ));
        assert!(leaf_matches(
            json!([{ "anything-but": ["a"] }]),
            json!(["a", "b"])
        ));
        assert!(!leaf_matches(
            json!([{ "anything-but": ["a"] }]),
            json!(["a", "a"])
        ));
        assert!(leaf_matches(json!(["x"]), json!([["y", "x"]])));

        // Nested patterns match element by element.
        let p = pattern(
            json!({ "value": { "items": { "sku": ["A"], "qty": [{ "numeric": [">", 1] }] } } }),
        );
        let same = json!({ "items": [{ "sku": "B", "qty": 5 }, { "sku": "A", "qty": 2 }] });
        assert!(p.matches(&record(same)));
        let split = json!({ "items": [{ "sku": "A", "qty": 1 }, { "sku": "B", "qty": 2 }] });
        assert!(!p.matches(&record(split)));
    }

    #[test]
    fn what_the_pattern_reads_of_value() {
        // (reads the value, looks inside it, reads it as text)
        let reads = |v: Value| {
            let p = pattern(v);
            (
                p.reads_value(),
                p.looks_inside_value(),
                p.reads_value_as_text(),
            )
        };
        let cases = [
            (json!({ "value": { "a": ["b"] } }), (true, true, false)),
            (json!({ "value": ["b"] }), (true, false, true)),
            (
                json!({ "value": [{ "exists": true }, "b"] }),
                (true, false, true),
            ),
            (
                json!({ "value": [{ "exists": true }] }),
                (false, false, false),
            ),
            (
                json!({ "key": ["k"], "topic": ["t"] }),
                (false, false, false),
            ),
            (
                json!([{ "key": ["k"] }, { "$or": [{ "value": { "a": [1] } }] }]),
                (true, true, false),
            ),
            (
                json!([{ "value": { "a": [1] } }, { "value": [{ "prefix": "a" }] }]),
                (true, true, true),
            ),
        ];
        for (v, want) in cases {
            assert_eq!(reads(v.clone()), want, "{v}");
        }
    }

    /// Lambda's plain-string Kafka messages: a value that is not JSON is
    /// matched as a string; a pattern with fields inside `value` never
    /// matches it (even `exists: false`, which an absent field would match).
    #[test]
    fn plain_text_values() {
        let text = |s: &str| record(json!(s));
        let not_error = pattern(json!({ "value": [{ "anything-but": ["error"] }] }));
        assert!(not_error.matches_plain_text(&text("all good")));
        assert!(!not_error.matches_plain_text(&text("error")));
        let nested = pattern(json!({ "value": { "deleted": [{ "exists": false }] } }));
        assert!(nested.matches(&record(json!({ "id": 1 }))));
        assert!(!nested.matches_plain_text(&text("id=1")));
        let either = pattern(json!([
            { "value": { "type": ["order"] } },
            { "value": [{ "prefix": "order " }] }
        ]));
        assert!(either.matches_plain_text(&text("order 17")));
        assert!(!either.matches_plain_text(&text("refund 3")));
        assert!(either.matches(&record(json!({ "type": "order" }))));
    }

    #[test]
    fn bad_patterns_name_their_path() {
        let cases = [
            (
                json!("value"),
                "the pattern: expected an object of field names, found string \"value\"",
            ),
            (
                json!({}),
                "the pattern: an empty object matches nothing; name at least one field",
            ),
            (
                json!({ "value": { "amount": 5 } }),
                "at `value.amount`: expected an array of matchers such as [\"order\"], or an \
                 object of nested fields, found number 5",
            ),
            (
                json!({ "value": { "type": "order" } }),
                "at `value.type`: expected an array of matchers such as [\"order\"], or an \
                 object of nested fields, found string \"order\"",
            ),
            (
                json!({ "value": { "a": { "b": [] } } }),
                "at `value.a.b`: an empty array of matchers matches nothing; list at least \
                 one value or matcher",
            ),
            (
                json!({ "value": { "a": {} } }),
                "at `value.a`: an empty object matches nothing; name at least one field",
            ),
            (
                json!({ "value": { "a": ["x", { "contains": "y" }] } }),
                "at `value.a[1]`: unknown matcher `contains`; expected one of `prefix`, \
                 `suffix`, `equals-ignore-case`, `anything-but`, `numeric` or `exists`",
            ),
            (
                json!({ "value": { "n": [{ "numeric": [">", 0, "<", 5, "<", 9] }] } }),
                "at `value.n[0]`: `numeric` takes one or two comparisons, each an operator \
                 and a number, e.g. [\">\", 0] or [\">\", 0, \"<=\", 5]; found 6 items",
            ),
            (
                json!({ "value": { "n": [{ "numeric": [">"] }] } }),
                "at `value.n[0]`: `numeric` takes one or two comparisons, each an operator \
                 and a number, e.g. [\">\", 0] or [\">\", 0, \"<=\", 5]; found 1 item",
            ),
            (
                json!({ "value": { "n": [{ "numeric": ["!=", 0] }] } }),
                "at `value.n[0]`: unknown numeric operator \"!=\"; expected one of \"=\", \
                 \"<\", \"<=\", \">\" or \">=\"",
            ),
            (
                json!({ "value": { "n": [{ "numeric": [">", "0"] }] } }),
                "at `value.n[0]`: numeric operator \">\" needs a number, found string \"0\"",
            ),
            (
                json!({ "value": { "n": [{ "numeric": [">", 0, ">", 5] }] } }),
                "at `value.n[0]`: two numeric comparisons must be a lower bound (\">\" or \
                 \">=\") and an upper bound (\"<\" or \"<=\"), found \">\" and \">\"",
            ),
            (
                json!({ "value": { "n": [{ "numeric": [">", 5, "<", 1] }] } }),
                "at `value.n[0]`: the numeric range is empty: no number is > 5 and < 1",
            ),
            (
                json!({ "value": { "n": [{ "numeric": [">=", 5, "<", 5] }] } }),
                "at `value.n[0]`: the numeric range is empty: no number is >= 5 and < 5",
            ),
            (
                json!({ "value": { "n": [{ "numeric": 5 }] } }),
                "at `value.n[0]`: `numeric` needs an array such as [\">\", 0, \"<=\", 5], \
                 found number 5",
            ),
            (
                json!({ "value": { "s": [{ "prefix": 1 }] } }),
                "at `value.s[0]`: `prefix` needs a string, found number 1",
            ),
            (
                json!({ "value": { "s": [{ "exists": "yes" }] } }),
                "at `value.s[0]`: `exists` needs true or false, found string \"yes\"",
            ),
            (
                json!({ "value": { "s": [{ "prefix": "a", "suffix": "b" }] } }),
                "at `value.s[0]`: a matcher object needs exactly one key (the operator), found 2",
            ),
            (
                json!({ "value": { "s": [["a"]] } }),
                "at `value.s[0]`: a matcher cannot be an array; list the values directly in \
                 the field's array",
            ),
            (
                json!({ "value": { "s": [{ "anything-but": [] }] } }),
                "at `value.s[0]`: `anything-but` needs a value, a non-empty array of values, \
                 or an object with `prefix`, `suffix` or `equals-ignore-case`, found an array",
            ),
            (
                json!({ "value": { "s": [{ "anything-but": { "numeric": [">", 1] } }] } }),
                "at `value.s[0]`: `anything-but` needs a value, a non-empty array of values, \
                 or an object with `prefix`, `suffix` or `equals-ignore-case`, found an object",
            ),
            (
                json!({ "value": { "s": [{ "anything-but": { "prefix": 1 } }] } }),
                "at `value.s[0]`: `anything-but` needs a string after `prefix`, found number 1",
            ),
            (
                json!({ "data": { "a": ["b"] } }),
                "at `data`: unknown Kafka record field `data`; expected one of `value`, `key`, \
                 `topic`, `partition`, `offset` or `timestamp`",
            ),
            (
                json!({ "key": { "a": ["b"] } }),
                "at `key`: `key` is not JSON, so it has no fields to match: write an array of \
                 matchers, e.g. [{\"prefix\": \"a\"}]",
            ),
            (
                json!({ "value": { "a.b": { "c d": 1 } } }),
                "at `value.\"a.b\".\"c d\"`: expected an array of matchers such as [\"order\"], \
                 or an object of nested fields, found number 1",
            ),
        ];
        for (v, expected) in cases {
            assert_eq!(error(v.clone()).to_string(), expected, "{v}");
        }
        let e = error(json!({ "value": { "amount": 5 } }));
        assert_eq!(e.path, "value.amount");
        assert!(matches!(e.problem, FilterProblem::LeafNotArray { .. }));
    }

    #[test]
    fn toml_patterns_convert_to_json() {
        let table: toml::Table = toml::from_str(
            "value = { at = [2024-05-01T00:00:00Z], n = [{ numeric = [\">\", 1.5] }], i = [3] }",
        )
        .expect("toml");
        assert_eq!(
            from_toml(&toml::Value::Table(table)).expect("convert"),
            json!({ "value": { "at": ["2024-05-01T00:00:00Z"], "n": [{ "numeric": [">", 1.5] }], "i": [3] } })
        );
        let table: toml::Table = toml::from_str("value = { n = [nan] }").expect("toml");
        assert_eq!(
            from_toml(&toml::Value::Table(table))
                .expect_err("nan")
                .to_string(),
            "at `value.n[0]`: numbers must be finite, found NaN"
        );
    }

    #[test]
    fn or_across_fields() {
        let p = pattern(json!({ "value": {
            "$or": [{ "type": ["refund"] }, { "amount": [{ "numeric": [">", 100] }] }]
        } }));
        let m = |v: Value| p.matches(&record(v));
        assert!(m(json!({ "type": "refund", "amount": 5 })));
        assert!(m(json!({ "type": "order", "amount": 150 })));
        assert!(!m(json!({ "type": "order", "amount": 50 })));
        assert!(!m(json!({ "amount": "150" })));
        assert!(!m(json!("refund")));

        // The object's other keys must match too.
        let p = pattern(json!({ "value": {
            "region": ["eu"],
            "$or": [{ "type": ["refund"] }, { "vip": [true] }]
        } }));
        let m = |v: Value| p.matches(&record(v));
        assert!(m(json!({ "region": "eu", "vip": true })));
        assert!(!m(json!({ "region": "us", "vip": true })));
        assert!(!m(json!({ "region": "eu", "type": "order" })));

        // Alternatives nest, and may hold `$or` themselves.
        let p = pattern(json!({ "value": { "$or": [
            { "a": { "$or": [{ "b": [1] }, { "c": [2] }] } },
            { "d": [{ "exists": true }] }
        ] } }));
        let m = |v: Value| p.matches(&record(v));
        assert!(m(json!({ "a": { "c": 2 } })));
        assert!(m(json!({ "d": null })));
        assert!(!m(json!({ "a": { "b": 2 } })));
    }

    #[test]
    fn or_in_array_elements_matches_one_element() {
        let p = pattern(json!({ "value": { "items": {
            "sku": ["x"],
            "$or": [{ "qty": [{ "numeric": [">", 5] }] }, { "gift": [true] }]
        } } }));
        let m = |v: Value| p.matches(&record(v));
        assert!(m(
            json!({ "items": [{ "sku": "y", "qty": 9 }, { "sku": "x", "gift": true }] })
        ));
        // sku and qty are in different elements.
        assert!(!m(
            json!({ "items": [{ "sku": "y", "qty": 9 }, { "sku": "x", "qty": 1 }] })
        ));
    }

    #[test]
    fn top_level_or_and_lists_of_patterns() {
        let vip_or_order = [
            json!({ "$or": [{ "key": ["vip"] }, { "value": { "type": ["order"] } }] }),
            json!([{ "key": ["vip"] }, { "value": { "type": ["order"] } }]),
        ];
        for v in vip_or_order {
            let p = pattern(v.clone());
            let mut vip = record(json!({ "type": "refund" }));
            vip["key"] = json!("vip");
            assert!(p.matches(&vip), "{v}");
            assert!(p.matches(&record(json!({ "type": "order" }))), "{v}");
            assert!(!p.matches(&record(json!({ "type": "refund" }))), "{v}");
            assert!(p.reads_value() && p.looks_inside_value(), "{v}");
        }
        // Both spellings compile to the same pattern.
        assert_eq!(
            pattern(json!({ "$or": [{ "key": ["a"] }, { "topic": ["b"] }] })),
            pattern(json!([{ "key": ["a"] }, { "topic": ["b"] }]))
        );
        let p = pattern(json!([{ "key": ["a"] }, { "value": [{ "exists": false }] }]));
        assert!(!p.reads_value());
        let one = pattern(json!([{ "topic": ["orders"] }]));
        assert!(one.matches(&record(json!(1))));
        assert!(!one.reads_value());
    }

    #[test]
    fn bad_or_and_lists_name_their_path() {
        let cases = [
            (
                json!({ "value": { "$or": { "a": [1] } } }),
                "at `value.$or`: `$or` needs a non-empty array of patterns",
            ),
            (
                json!({ "value": { "$or": [] } }),
                "at `value.$or`: `$or` needs a non-empty array of patterns",
            ),
            (
                json!({ "value": { "$or": [{ "a": [1] }, ["b"]] } }),
                "at `value.$or[1]`: expected an object of field names, found an array",
            ),
            (
                json!({ "value": { "$or": [{ "a": "b" }] } }),
                "at `value.$or[0].a`: expected an array of matchers",
            ),
            (
                json!({ "$or": [{ "key": ["a"] }, { "vlue": { "a": [1] } }] }),
                "at `$or[1].vlue`: unknown Kafka record field `vlue`",
            ),
            (
                json!({ "$or": [{ "key": { "a": [1] } }] }),
                "at `$or[0].key`: `key` is not JSON",
            ),
            (
                json!([]),
                "the pattern: an empty list of patterns matches nothing",
            ),
            (
                json!([{ "key": ["a"] }, "value"]),
                "at `[1]`: expected an object of field names, found string \"value\"",
            ),
            (
                json!([{ "key": ["a"] }, { "value": { "$or": [{}] } }]),
                "at `[1].value.$or[0]`: an empty object matches nothing",
            ),
        ];
        for (v, want) in cases {
            let got = error(v.clone()).to_string();
            assert!(got.starts_with(want), "{v}: {got}");
        }
    }

    #[test]
    fn compiled_patterns_compare() {
        let a = pattern(json!({ "value": { "x": [1, { "prefix": "a" }] } }));
        let b = pattern(json!({ "value": { "x": [1.0, { "prefix": "a" }] } }));
        let c = pattern(json!({ "value": { "x": [2, { "prefix": "a" }] } }));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.clone(), a);
    }
}
