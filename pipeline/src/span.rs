//! Byte spans to positions, and spans back to the TOML keys they belong to.

use std::ops::Range;
use std::path::Path;

use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::Location;

/// Converts a byte offset in `text` to a 1-based (line, column), counting
/// columns in characters. Offsets past the end or inside a character are
/// clamped to the previous character boundary.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Turns byte spans of one file into [`Location`]s.
pub(crate) struct Locator<'a> {
    pub text: &'a str,
    pub file: &'a Path,
}

impl Locator<'_> {
    pub fn at(&self, span: Range<usize>) -> Location {
        let (line, column) = line_col(self.text, span.start);
        Location {
            file: self.file.to_path_buf(),
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        }
    }
}

/// Writes keys as a dotted TOML path, quoting keys that are not bare.
/// Array positions (see [`index`]) are written as `[I]` after their array:
/// `trigger.kafka[0].topics`.
pub(crate) fn dotted<S: AsRef<str>>(keys: &[S]) -> String {
    let mut out = String::new();
    for (i, key) in keys.iter().enumerate() {
        let key = key.as_ref();
        if is_index(key) {
            out.push_str(key);
            continue;
        }
        if i > 0 {
            out.push('.');
        }
        out.push_str(&toml_key(key));
    }
    out
}

/// The path segment for position `i` of an array: `[I]`.
pub(crate) fn index(i: usize) -> String {
    format!("[{i}]")
}

/// Whether a path segment is an array position made by [`index`]. (A key
/// written `"[0]"` would be shown as a position too; such keys only appear
/// in messages about tables with free-form keys.)
fn is_index(segment: &str) -> bool {
    segment
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// A key as it can be written in TOML: bare if possible, else quoted.
pub(crate) fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// What sits at an error's span in the document.
pub(crate) struct Found<'d, 'i> {
    /// Keys from the top level down to the key or value at the span; array
    /// positions are written as [`index`] makes them.
    pub path: Vec<String>,
    /// The value, when the span is a value's (not a key's).
    pub value: Option<&'d Spanned<DeValue<'i>>>,
}

/// Finds the deepest key or value whose span is exactly `span`.
pub(crate) fn find<'d, 'i>(doc: &'d DeTable<'i>, span: &Range<usize>) -> Option<Found<'d, 'i>> {
    let mut best = None;
    let mut path = Vec::new();
    walk_table(doc, span, &mut path, &mut best);
    best
}

fn walk_table<'d, 'i>(
    table: &'d DeTable<'i>,
    span: &Range<usize>,
    path: &mut Vec<String>,
    best: &mut Option<Found<'d, 'i>>,
) {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        if key.span() == *span {
            consider(best, path, None);
        }
        walk_value(value, span, path, best);
        path.pop();
    }
}

fn walk_value<'d, 'i>(
    value: &'d Spanned<DeValue<'i>>,
    span: &Range<usize>,
    path: &mut Vec<String>,
    best: &mut Option<Found<'d, 'i>>,
) {
    if value.span() == *span {
        consider(best, path, Some(value));
    }
    match value.get_ref() {
        DeValue::Table(table) => walk_table(table, span, path, best),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                path.push(index(i));
                walk_value(item, span, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn consider<'d, 'i>(
    best: &mut Option<Found<'d, 'i>>,
    path: &[String],
    value: Option<&'d Spanned<DeValue<'i>>>,
) {
    if best.as_ref().is_none_or(|b| path.len() > b.path.len()) {
        *best = Some(Found {
            path: path.to_vec(),
            value,
        });
    }
}

/// Describes a value for messages: `string "big"`, `integer 5`, `a table`.
pub(crate) fn describe(text: &str, value: &Spanned<DeValue<'_>>) -> String {
    match value.get_ref() {
        DeValue::Table(_) => "a table".to_owned(),
        DeValue::Array(_) => "an array".to_owned(),
        other => {
            let written = text.get(value.span()).unwrap_or("").trim();
            let first_line = written.lines().next().unwrap_or("");
            let shown: String = first_line.chars().take(60).collect();
            let cut = if shown.len() < written.len() {
                "…"
            } else {
                ""
            };
            format!("{} {shown}{cut}", other.type_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_in_characters() {
        let text = "ab\ncé d\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        // 'é' is two bytes; the space after it (byte 6) is the third character.
        assert_eq!(line_col(text, 6), (2, 3));
        assert_eq!(line_col(text, 7), (2, 4));
        // Inside 'é' clamps back to its start; past the end clamps to the end.
        assert_eq!(line_col(text, 5), (2, 2));
        assert_eq!(line_col(text, 100), (3, 1));
    }

    #[test]
    fn dotted_quotes_only_non_bare_keys() {
        assert_eq!(dotted(&["functions", "echo"]), "functions.echo");
        assert_eq!(dotted(&["functions", "a b"]), "functions.\"a b\"");
        assert_eq!(
            dotted(&[
                "trigger",
                "kafka",
                index(0).as_str(),
                "topics",
                index(12).as_str()
            ]),
            "trigger.kafka[0].topics[12]"
        );
        assert_eq!(dotted(&["[x]", "[]"]), "\"[x]\".\"[]\"");
    }
}
