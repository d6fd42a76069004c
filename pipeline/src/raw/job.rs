//! `[job.NAME]` tables as serde sees them, and their validation.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

use super::kafka::{validate_bootstrap_servers, validate_properties};
use super::{Fields, INTEGER, Job, STRING, is_lambda_name};
use crate::OutputFormat;
use crate::error::PipelineError;
use crate::span::{self, Locator};
use crate::{
    ArrowCompression, BackfillJob, CONCURRENCY_RANGE, DEFAULT_GROUPS_PER_CALL,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BUFFERED_ITEMS, DEFAULT_MAX_BYTES_PER_CALL,
    DEFAULT_MAX_ITEMS_PER_CALL, DEFAULT_MAX_OBJECT_BYTES, DEFAULT_REDUCE_MEMORY_MB,
    DEFAULT_REDUCE_PARTITIONS, DataFormat, MAX_ATTEMPTS_RANGE, MAX_BATCH_INPUT_BYTES,
    MAX_BUFFERED_ITEMS_RANGE, MAX_BYTES_PER_CALL_RANGE, MAX_ITEMS_PER_CALL_RANGE, MAX_ITEMS_RANGE,
    MAX_OBJECT_BYTES_RANGE, MapReduceJob, PayloadFormat, REDUCE_MEMORY_MB_RANGE,
    REDUCE_PARTITIONS_RANGE,
};

/// One `[job.NAME]` table. As elsewhere every field is optional here and
/// `None` means "use the default", except `function` and `source`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    /// Default `"backfill"`.
    kind: Option<Spanned<String>>,
    /// Required.
    function: Option<Spanned<String>>,
    /// Required: one path, glob or URL, or an array of them.
    source: Option<Spanned<Sources>>,
    /// Default: from the first source's extension.
    format: Option<Spanned<String>>,
    /// Default: every column.
    columns: Option<Spanned<Vec<Spanned<String>>>>,
    /// Default `","`.
    csv_delimiter: Option<Spanned<String>>,
    /// Default none: the first line of each CSV file is its header.
    csv_headers: Option<Spanned<Vec<Spanned<String>>>>,
    /// Default [`DEFAULT_MAX_ITEMS_PER_CALL`].
    max_items_per_call: Option<Spanned<i64>>,
    /// Default [`DEFAULT_MAX_BYTES_PER_CALL`].
    max_bytes_per_call: Option<Spanned<i64>>,
    /// Default: the function's `concurrency`.
    max_concurrency: Option<Spanned<i64>>,
    /// Default [`DEFAULT_MAX_ATTEMPTS`].
    max_attempts: Option<Spanned<i64>>,
    /// Default none (no limit).
    tolerated_failure_count: Option<Spanned<i64>>,
    /// Default none (no limit).
    tolerated_failure_percentage: Option<Spanned<f64>>,
    /// Default none.
    order_key: Option<Spanned<String>>,
    /// Default none.
    id_column: Option<Spanned<String>>,
    /// Default none.
    depends_on_column: Option<Spanned<String>>,
    /// Default [`DEFAULT_MAX_BUFFERED_ITEMS`].
    max_buffered_items: Option<Spanned<i64>>,
    /// Default: next to the first local source.
    progress: Option<Spanned<String>>,
    /// Default: the progress path with `.dead.jsonl`.
    dead_letter: Option<Spanned<String>>,
    /// Default none: responses are not kept.
    results: Option<Spanned<String>>,
    /// Default `"embedded"`.
    bootstrap_servers: Option<Spanned<String>>,
    /// Default none: extra librdkafka properties for an external cluster.
    properties: Option<BTreeMap<Spanned<String>, Spanned<super::kafka::PropertyValue>>>,
    /// Default `"json"`.
    payload: Option<Spanned<String>>,
    /// Default `"none"`; only with `payload = "arrow"`.
    arrow_compression: Option<Spanned<String>>,
    /// Default false; only with a columnar payload.
    payload_file: Option<Spanned<bool>>,
    /// Default none: glob of files → globs of the files they wait for.
    depends_on_files: Option<BTreeMap<Spanned<String>, SpannedGlobs>>,
    /// Default none (stateless).
    state: Option<Spanned<super::state::RawState>>,
    /// Default none.
    batch_input: Option<Spanned<toml::Value>>,
    /// Default none: every item.
    max_items: Option<Spanned<i64>>,
    /// Default [`DEFAULT_MAX_OBJECT_BYTES`]; only with `format = "objects"`.
    max_object_bytes: Option<Spanned<i64>>,
    /// Default none (the top level); only with `format = "json"`.
    items_pointer: Option<Spanned<String>>,
    /// MapReduce: required.
    map: Option<Spanned<String>>,
    /// MapReduce: default none.
    combine: Option<Spanned<String>>,
    /// MapReduce: required.
    reduce: Option<Spanned<String>>,
    /// MapReduce: default [`DEFAULT_REDUCE_PARTITIONS`].
    reduce_partitions: Option<Spanned<i64>>,
    /// MapReduce: required, a folder.
    output: Option<Spanned<String>>,
    /// MapReduce: default [`DEFAULT_GROUPS_PER_CALL`].
    groups_per_call: Option<Spanned<i64>>,
    /// MapReduce: default [`DEFAULT_REDUCE_MEMORY_MB`].
    reduce_memory_mb: Option<Spanned<i64>>,
    /// MapReduce: default `"jsonl"`.
    output_format: Option<Spanned<String>>,
}

/// An array of glob patterns, with positions.
type SpannedGlobs = Spanned<Vec<Spanned<String>>>;

/// `source = "x"` or `source = ["x", "y"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Sources {
    One(String),
    Many(Vec<String>),
}

const FLOAT: &str = "a number";

/// Keys of [`RawJob`] and the TOML type each needs, for messages.
pub(super) const JOB_FIELDS: &[(&str, &str)] = &[
    ("kind", "a string: \"backfill\" or \"mapreduce\""),
    ("function", STRING),
    (
        "source",
        "a path, glob or URL, or an array of them, e.g. [\"data/*.parquet\"]",
    ),
    (
        "format",
        "a string: \"parquet\", \"csv\", \"jsonl\", \"json\", \"text\" or \"objects\"",
    ),
    (
        "columns",
        "an array of column names, e.g. [\"id\", \"amount\"]",
    ),
    ("csv_delimiter", "a one-character string, e.g. \";\""),
    (
        "csv_headers",
        "an array of column names, e.g. [\"id\", \"amount\"]",
    ),
    ("max_items_per_call", INTEGER),
    ("max_bytes_per_call", INTEGER),
    ("max_concurrency", INTEGER),
    ("max_attempts", INTEGER),
    ("tolerated_failure_count", INTEGER),
    ("tolerated_failure_percentage", FLOAT),
    ("order_key", STRING),
    ("id_column", STRING),
    ("depends_on_column", STRING),
    ("max_buffered_items", INTEGER),
    ("progress", STRING),
    ("dead_letter", STRING),
    ("results", STRING),
    (
        "bootstrap_servers",
        "a string: \"embedded\" or \"host:port[,host:port...]\"",
    ),
    (
        "properties",
        "a table of librdkafka properties, e.g. { \"security.protocol\" = \"SASL_SSL\" }",
    ),
    ("payload", "a string: \"json\", \"arrow\" or \"parquet\""),
    ("payload_file", "a boolean (true or false)"),
    (
        "arrow_compression",
        "a string: \"none\", \"lz4\" or \"zstd\"",
    ),
    (
        "depends_on_files",
        "a table of file globs to arrays of globs, e.g. { \"b.csv\" = [\"a.csv\"] }",
    ),
    ("state", super::state::STATE_TYPE),
    ("batch_input", "a table, e.g. { run_date = \"2026-12-01\" }"),
    ("max_items", INTEGER),
    ("max_object_bytes", INTEGER),
    (
        "items_pointer",
        "a JSON pointer to the array of items, e.g. \"/data/orders\"",
    ),
    ("map", STRING),
    ("combine", STRING),
    ("reduce", STRING),
    ("reduce_partitions", INTEGER),
    ("output", STRING),
    ("groups_per_call", INTEGER),
    ("reduce_memory_mb", INTEGER),
    ("output_format", "a string: \"jsonl\" or \"parquet\""),
];

/// What a MapReduce job's `output` URL must be.
const OUTPUT_URL_RULE: &str = "a folder, or an object-store prefix (s3://BUCKET/PREFIX/, gs://, \
                               az://) the part files go to when the job succeeds";

/// What an object-store `results` must be.
const RESULTS_URL_RULE: &str = "a path, or the URL of an object (s3://BUCKET/KEY, gs://, az://, \
                                file:///PATH) the responses are uploaded to when the job ends";

/// Fields only a backfill job has.
const BACKFILL_ONLY: &[&str] = &[
    "function",
    "max_bytes_per_call",
    "tolerated_failure_count",
    "tolerated_failure_percentage",
    "order_key",
    "id_column",
    "depends_on_column",
    "max_buffered_items",
    "progress",
    "dead_letter",
    "results",
    "depends_on_files",
    "state",
    "batch_input",
    "max_object_bytes",
];
/// Fields only a MapReduce job has.
const MAPREDUCE_ONLY: &[&str] = &[
    "map",
    "combine",
    "reduce",
    "reduce_partitions",
    "output",
    "groups_per_call",
    "reduce_memory_mb",
    "output_format",
];

const NAME_RULE: &str = "1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`";

/// Why `s` is not a glob pattern, if it is not (an unclosed `[`).
fn glob_problem(s: &str) -> Option<&'static str> {
    let mut open = false;
    for c in s.chars() {
        match c {
            '[' if !open => open = true,
            ']' if open => open = false,
            _ => {}
        }
    }
    open.then_some("an unclosed `[`")
}

/// Whether `s` is a URL (`scheme://...`) rather than a local path.
pub(super) fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

/// A local path relative to the pipeline file's folder; absolute paths and
/// URLs unchanged.
pub(super) fn resolve(base: &Path, s: &str) -> String {
    if is_url(s) || Path::new(s).is_absolute() {
        s.to_owned()
    } else {
        base.join(s).display().to_string()
    }
}

impl RawJob {
    /// The fields present that belong to one kind of job, with their spans.
    fn spans(&self) -> Vec<(&'static str, Range<usize>)> {
        let s = |key: &'static str, span: Option<Range<usize>>| span.map(|sp| (key, sp));
        [
            s("function", self.function.as_ref().map(Spanned::span)),
            s(
                "max_bytes_per_call",
                self.max_bytes_per_call.as_ref().map(Spanned::span),
            ),
            s(
                "tolerated_failure_count",
                self.tolerated_failure_count.as_ref().map(Spanned::span),
            ),
            s(
                "tolerated_failure_percentage",
                self.tolerated_failure_percentage
                    .as_ref()
                    .map(Spanned::span),
            ),
            s("order_key", self.order_key.as_ref().map(Spanned::span)),
            s("id_column", self.id_column.as_ref().map(Spanned::span)),
            s(
                "depends_on_column",
                self.depends_on_column.as_ref().map(Spanned::span),
            ),
            s(
                "max_buffered_items",
                self.max_buffered_items.as_ref().map(Spanned::span),
            ),
            s("progress", self.progress.as_ref().map(Spanned::span)),
            s("dead_letter", self.dead_letter.as_ref().map(Spanned::span)),
            s("results", self.results.as_ref().map(Spanned::span)),
            s(
                "depends_on_files",
                self.depends_on_files
                    .as_ref()
                    .and_then(|m| m.keys().next().map(Spanned::span)),
            ),
            s("state", self.state.as_ref().map(Spanned::span)),
            s("batch_input", self.batch_input.as_ref().map(Spanned::span)),
            s("max_items", self.max_items.as_ref().map(Spanned::span)),
            s("map", self.map.as_ref().map(Spanned::span)),
            s("combine", self.combine.as_ref().map(Spanned::span)),
            s("reduce", self.reduce.as_ref().map(Spanned::span)),
            s(
                "reduce_partitions",
                self.reduce_partitions.as_ref().map(Spanned::span),
            ),
            s("output", self.output.as_ref().map(Spanned::span)),
            s(
                "groups_per_call",
                self.groups_per_call.as_ref().map(Spanned::span),
            ),
            s(
                "reduce_memory_mb",
                self.reduce_memory_mb.as_ref().map(Spanned::span),
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Validates `[job.NAME]`, whose header is at `header`.
    pub(super) fn validate(
        self,
        loc: &Locator<'_>,
        name: Spanned<String>,
        header: Range<usize>,
        declared: &[String],
        base: &Path,
    ) -> Result<Job, PipelineError> {
        let f = Fields {
            loc,
            table: format!("job.{}", span::toml_key(name.get_ref())),
        };
        if !is_lambda_name(name.get_ref()) {
            return Err(PipelineError::InvalidValue {
                at: loc.at(name.span()),
                field: f.table.clone(),
                value: name.into_inner(),
                expected: NAME_RULE,
            });
        }
        let missing = |field: &'static str, hint: &'static str| PipelineError::MissingField {
            at: loc.at(header.clone()),
            table: f.table.clone(),
            field,
            hint,
        };
        let mapreduce = match &self.kind {
            None => false,
            Some(kind) => match kind.get_ref().as_str() {
                "backfill" => false,
                "mapreduce" => true,
                _ => {
                    return Err(PipelineError::InvalidValue {
                        at: loc.at(kind.span()),
                        field: f.field("kind"),
                        value: kind.get_ref().clone(),
                        expected: "\"backfill\" or \"mapreduce\"",
                    });
                }
            },
        };
        // A field of the other kind of job is a mistake worth naming.
        let (foreign, kind) = if mapreduce {
            (BACKFILL_ONLY, "mapreduce")
        } else {
            (MAPREDUCE_ONLY, "backfill")
        };
        if let Some((key, at)) = self.spans().into_iter().find(|(k, _)| foreign.contains(k)) {
            return Err(PipelineError::Invalid {
                at: loc.at(at),
                field: f.field(key),
                message: if kind == "mapreduce" {
                    "not a setting of a job of kind = \"mapreduce\" (which calls `map`, \
                     `combine` and `reduce`)"
                        .to_owned()
                } else {
                    "a setting of MapReduce jobs: add kind = \"mapreduce\"".to_owned()
                },
            });
        }
        let declared_function = |key: &str, v: Spanned<String>| {
            if declared.contains(v.get_ref()) {
                Ok(v.into_inner())
            } else {
                Err(PipelineError::UndeclaredFunction {
                    at: loc.at(v.span()),
                    field: f.field(key),
                    name: v.into_inner(),
                    declared: declared.to_vec(),
                })
            }
        };
        self.check_objects(&f, loc, mapreduce)?;
        let function = if mapreduce {
            String::new()
        } else {
            let Some(function) = self.function else {
                return Err(missing(
                    "function",
                    "the declared function called with the items, e.g. function = \"echo\"",
                ));
            };
            declared_function("function", function)?
        };
        let Some(source) = self.source else {
            return Err(missing(
                "source",
                "the files to read, e.g. source = \"data/*.parquet\"",
            ));
        };
        let source_at = source.span();
        let sources: Vec<String> = match source.into_inner() {
            Sources::One(s) => vec![s],
            Sources::Many(v) => v,
        };
        if sources.is_empty() || sources.iter().any(|s| s.trim().is_empty()) {
            return Err(PipelineError::InvalidValue {
                at: loc.at(source_at),
                field: f.field("source"),
                value: format!("{sources:?}"),
                expected: "one or more non-empty paths, globs or URLs",
            });
        }
        let sources: Vec<String> = sources.iter().map(|s| resolve(base, s)).collect();
        let format = match self.format {
            Some(v) => match v.get_ref().parse::<DataFormat>() {
                Ok(fmt) => Some(fmt),
                Err(_) => {
                    return Err(PipelineError::InvalidValue {
                        at: loc.at(v.span()),
                        field: f.field("format"),
                        value: v.into_inner(),
                        expected: "\"parquet\", \"csv\", \"jsonl\", \"json\", \"text\" or \"objects\"",
                    });
                }
            },
            None => None,
        };
        // A list of column names: non-empty names, and with `distinct`, each
        // once; otherwise an error saying what `expected` is.
        let names = |field: &str,
                     v: Spanned<Vec<Spanned<String>>>,
                     distinct: bool,
                     expected: &'static str|
         -> Result<(Vec<String>, Range<usize>), PipelineError> {
            let at = v.span();
            let names: Vec<String> = v
                .into_inner()
                .into_iter()
                .map(Spanned::into_inner)
                .collect();
            let twice = distinct
                && names
                    .iter()
                    .enumerate()
                    .any(|(i, n)| names[..i].contains(n));
            if names.is_empty() || names.iter().any(String::is_empty) || twice {
                return Err(PipelineError::InvalidValue {
                    at: loc.at(at),
                    field: f.field(field),
                    value: format!("{names:?}"),
                    expected,
                });
            }
            Ok((names, at))
        };
        let columns = self
            .columns
            .map(|v| {
                names(
                    "columns",
                    v,
                    false,
                    "a non-empty array of non-empty column names",
                )
            })
            .transpose()?
            .map(|(names, _)| names);
        let csv_headers = match self.csv_headers {
            None => None,
            Some(v) => {
                let (names, at) = names(
                    "csv_headers",
                    v,
                    true,
                    "a non-empty array of distinct, non-empty column names, one per \
                     field of the CSV files (which then have no header line)",
                )?;
                if let Some(other) = format.filter(|f| *f != DataFormat::Csv) {
                    return Err(PipelineError::Invalid {
                        at: loc.at(at),
                        field: f.field("csv_headers"),
                        message: format!(
                            "names the columns of CSV files without a header line, but format \
                             is \"{}\"",
                            other.name()
                        ),
                    });
                }
                Some(names)
            }
        };
        let csv_delimiter = match self.csv_delimiter {
            None => b',',
            Some(d) => match d.get_ref().as_bytes() {
                [b] if b.is_ascii() && *b != b'"' && *b != b'\n' && *b != b'\r' => *b,
                _ => {
                    return Err(PipelineError::InvalidValue {
                        at: loc.at(d.span()),
                        field: f.field("csv_delimiter"),
                        value: d.into_inner(),
                        expected: "one ASCII character other than a quote or a line break",
                    });
                }
            },
        };
        let items_pointer = match self.items_pointer {
            None => None,
            Some(v) if !v.get_ref().starts_with('/') => {
                return Err(PipelineError::InvalidValue {
                    at: loc.at(v.span()),
                    field: f.field("items_pointer"),
                    value: v.into_inner(),
                    expected: "a JSON pointer starting with `/`, e.g. \"/data/orders\"",
                });
            }
            Some(v) if format.is_some_and(|fmt| fmt != DataFormat::Json) => {
                return Err(PipelineError::Invalid {
                    at: loc.at(v.span()),
                    field: f.field("items_pointer"),
                    message: "points into a JSON document: it needs format = \"json\"".to_owned(),
                });
            }
            Some(v) => Some(v.into_inner()),
        };
        let objects = format == Some(DataFormat::Objects);
        let max_items_per_call = f.integer(
            "max_items_per_call",
            self.max_items_per_call,
            // Objects are called one at a time.
            if objects {
                1
            } else {
                DEFAULT_MAX_ITEMS_PER_CALL
            },
            MAX_ITEMS_PER_CALL_RANGE,
            " (items)",
        )?;
        let max_bytes_per_call = f.ranged(
            "max_bytes_per_call",
            self.max_bytes_per_call,
            DEFAULT_MAX_BYTES_PER_CALL,
            MAX_BYTES_PER_CALL_RANGE,
            " (bytes)",
        )?;
        let max_buffered_items = f.ranged(
            "max_buffered_items",
            self.max_buffered_items,
            DEFAULT_MAX_BUFFERED_ITEMS,
            MAX_BUFFERED_ITEMS_RANGE,
            " (items)",
        )?;
        let max_concurrency = match self.max_concurrency {
            None => None,
            v => Some(f.integer("max_concurrency", v, 1, CONCURRENCY_RANGE, "")?),
        };
        let max_attempts = f.integer(
            "max_attempts",
            self.max_attempts,
            DEFAULT_MAX_ATTEMPTS,
            MAX_ATTEMPTS_RANGE,
            "",
        )?;
        let tolerated_failure_count = match self.tolerated_failure_count {
            None => None,
            v => Some(u64::from(f.integer(
                "tolerated_failure_count",
                v,
                0,
                0..=u32::MAX,
                " (failed calls)",
            )?)),
        };
        let tolerated_failure_percentage = match self.tolerated_failure_percentage {
            None => None,
            Some(p) if (0.0..=100.0).contains(p.get_ref()) => Some(*p.get_ref()),
            Some(p) => {
                return Err(PipelineError::InvalidValue {
                    at: loc.at(p.span()),
                    field: f.field("tolerated_failure_percentage"),
                    value: p.get_ref().to_string(),
                    expected: "a percentage from 0 to 100",
                });
            }
        };
        let column =
            |key: &str, v: Option<Spanned<String>>| -> Result<Option<String>, PipelineError> {
                match v {
                    Some(v) if v.get_ref().is_empty() => Err(PipelineError::InvalidValue {
                        at: loc.at(v.span()),
                        field: f.field(key),
                        value: String::new(),
                        expected: "a field name",
                    }),
                    v => Ok(v.map(Spanned::into_inner)),
                }
            };
        let order_key = column("order_key", self.order_key)?;
        let id_at = self.id_column.as_ref().map(Spanned::span);
        let deps_at = self.depends_on_column.as_ref().map(Spanned::span);
        let id_column = column("id_column", self.id_column)?;
        let depends_on_column = column("depends_on_column", self.depends_on_column)?;
        match (&id_column, &depends_on_column) {
            (Some(id), None) => {
                return Err(PipelineError::Requires {
                    at: loc.at(id_at.unwrap_or(header)),
                    field: f.field("id_column"),
                    value: format!("{id:?}"),
                    required: f.field("depends_on_column"),
                    reason: "ids are only needed to name what an item depends on",
                });
            }
            (None, Some(deps)) => {
                return Err(PipelineError::Requires {
                    at: loc.at(deps_at.unwrap_or(header)),
                    field: f.field("depends_on_column"),
                    value: format!("{deps:?}"),
                    required: f.field("id_column"),
                    reason: "dependencies name the ids of other items",
                });
            }
            _ => {}
        }
        let payload = match self.payload {
            None => PayloadFormat::Json,
            Some(v) => match v.get_ref().parse::<PayloadFormat>() {
                Ok(p) => p,
                Err(_) => {
                    return Err(PipelineError::InvalidValue {
                        at: loc.at(v.span()),
                        field: f.field("payload"),
                        value: v.into_inner(),
                        expected: "\"json\", \"arrow\" or \"parquet\"",
                    });
                }
            },
        };
        let arrow_compression = match self.arrow_compression {
            None => ArrowCompression::None,
            Some(v) => {
                let at = loc.at(v.span());
                let parsed = v.get_ref().parse::<ArrowCompression>();
                match parsed {
                    Ok(c) if payload == PayloadFormat::Arrow || c == ArrowCompression::None => c,
                    Ok(_) => {
                        return Err(PipelineError::Invalid {
                            at,
                            field: f.field("arrow_compression"),
                            message: "compresses Arrow payloads: set payload = \"arrow\" too"
                                .to_owned(),
                        });
                    }
                    Err(_) => {
                        return Err(PipelineError::InvalidValue {
                            at,
                            field: f.field("arrow_compression"),
                            value: v.into_inner(),
                            expected: "\"none\", \"lz4\" or \"zstd\"",
                        });
                    }
                }
            }
        };
        let payload_file = match self.payload_file {
            Some(flag) if *flag.get_ref() && !payload.is_columnar() => {
                return Err(PipelineError::Requires {
                    at: loc.at(flag.span()),
                    field: f.field("payload_file"),
                    value: "true".to_owned(),
                    required: f.field("payload"),
                    reason: "it stages a columnar payload (payload = \"parquet\" or \"arrow\") \
                             as a file in the sandbox",
                });
            }
            Some(flag) => flag.into_inner(),
            None => false,
        };
        // Globs with a `/` are paths (relative to the pipeline file), the
        // others match file names.
        let glob = |v: Spanned<String>, field: String| -> Result<String, PipelineError> {
            if v.get_ref().is_empty() || glob_problem(v.get_ref()).is_some() {
                return Err(PipelineError::InvalidValue {
                    at: loc.at(v.span()),
                    field,
                    value: v.into_inner(),
                    expected: "a non-empty glob pattern",
                });
            }
            Ok(if v.get_ref().contains('/') {
                resolve(base, v.get_ref())
            } else {
                v.into_inner()
            })
        };
        let mut file_dependencies = Vec::new();
        for (files, after) in self.depends_on_files.unwrap_or_default() {
            let field = format!(
                "{}.{}",
                f.field("depends_on_files"),
                span::toml_key(files.get_ref())
            );
            let at = after.span();
            let after = after.into_inner();
            if after.is_empty() {
                return Err(PipelineError::InvalidValue {
                    at: loc.at(at),
                    field,
                    value: "[]".into(),
                    expected: "one or more glob patterns of the files to wait for",
                });
            }
            let files = glob(files, field.clone())?;
            let after = after
                .into_iter()
                .map(|a| glob(a, field.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            file_dependencies.push((files, after));
        }
        let path = |v: Option<Spanned<String>>| v.map(|v| base.join(v.into_inner()));
        let bootstrap_servers = validate_bootstrap_servers(&f, self.bootstrap_servers)?;
        let properties = validate_properties(&f, self.properties.unwrap_or_default())?;
        if mapreduce {
            let Some(map) = self.map else {
                return Err(missing(
                    "map",
                    "the declared function called on each split, e.g. map = \"wc-map\"",
                ));
            };
            let Some(reduce) = self.reduce else {
                return Err(missing(
                    "reduce",
                    "the declared function called on each key's values, e.g. reduce = \"wc-reduce\"",
                ));
            };
            let Some(output) = self.output else {
                return Err(missing(
                    "output",
                    "the folder the reducers write to, e.g. output = \"out/wordcount\"",
                ));
            };
            // A prefix of an object store: staged locally, uploaded when
            // the job succeeds.
            let (output, output_url) = if is_url(output.get_ref()) {
                let url =
                    super::objects::validate_url(&f, "output", OUTPUT_URL_RULE, output, base)?;
                if !is_url(&url) {
                    (PathBuf::from(url), None)
                } else {
                    let staged = base
                        .join(".sluice-state")
                        .join(format!("mapreduce-{}", name.get_ref()));
                    (staged, Some(url.trim_end_matches('/').to_owned()))
                }
            } else {
                (base.join(output.into_inner()), None)
            };
            let output_format = match self.output_format {
                None => OutputFormat::Jsonl,
                Some(v) => match v.get_ref().as_str() {
                    "jsonl" => OutputFormat::Jsonl,
                    "parquet" => OutputFormat::Parquet,
                    _ => {
                        return Err(PipelineError::InvalidValue {
                            at: loc.at(v.span()),
                            field: f.field("output_format"),
                            value: v.into_inner(),
                            expected: "\"jsonl\" or \"parquet\"",
                        });
                    }
                },
            };
            let max_items = self
                .max_items
                .map(|v| max_items(&f, loc, v, None, payload))
                .transpose()?;
            return Ok(Job::MapReduce(Box::new(MapReduceJob {
                name: name.into_inner(),
                sources,
                format,
                columns,
                csv_delimiter,
                csv_headers,
                map: declared_function("map", map)?,
                combine: self
                    .combine
                    .map(|c| declared_function("combine", c))
                    .transpose()?,
                reduce: declared_function("reduce", reduce)?,
                reduce_partitions: f.integer(
                    "reduce_partitions",
                    self.reduce_partitions,
                    DEFAULT_REDUCE_PARTITIONS,
                    REDUCE_PARTITIONS_RANGE,
                    " (partitions)",
                )?,
                groups_per_call: f.integer(
                    "groups_per_call",
                    self.groups_per_call,
                    DEFAULT_GROUPS_PER_CALL,
                    MAX_ITEMS_PER_CALL_RANGE,
                    " (key groups)",
                )?,
                reduce_memory_mb: f.integer(
                    "reduce_memory_mb",
                    self.reduce_memory_mb,
                    DEFAULT_REDUCE_MEMORY_MB,
                    REDUCE_MEMORY_MB_RANGE,
                    " (MiB)",
                )?,
                max_items_per_call,
                max_concurrency,
                max_attempts,
                output,
                output_url,
                bootstrap_servers,
                properties,
                payload,
                payload_file,
                arrow_compression,
                output_format,
                max_items,
                items_pointer,
            })));
        }
        let state_at = self.state.as_ref().map(Spanned::span);
        let state = self
            .state
            .map(|s| s.into_inner().validate(&f, name.get_ref(), base))
            .transpose()?;
        if let (Some(at), Some(st)) = (state_at, &state) {
            let conflict = |message: &str| PipelineError::Invalid {
                at: loc.at(at.clone()),
                field: f.field("state"),
                message: message.to_owned(),
            };
            if st.scope == crate::StateScope::Key && order_key.is_none() {
                return Err(conflict(
                    "state scope \"key\" needs `order_key`: the field whose value is the key",
                ));
            }
            if id_column.is_some() || !file_dependencies.is_empty() {
                return Err(conflict(
                    "a stateful job folds its items in input order: `id_column`, \
                     `depends_on_column` and `depends_on_files` do not apply",
                ));
            }
            if matches!(st.window, Some(crate::StateWindow::Time(_))) {
                return Err(conflict(
                    "a backfill has no event time: use a count window (window = 100) or none",
                ));
            }
        }
        if let (Some(r), Some(_)) = (&self.results, &state) {
            return Err(PipelineError::Invalid {
                at: loc.at(r.span()),
                field: f.field("results"),
                message: "a stateful job's output is its state (`sluice state`), not each \
                          call's response: leave `results` out"
                    .to_owned(),
            });
        }
        if let Some(r) = &self.results
            && r.get_ref().is_empty()
        {
            return Err(PipelineError::InvalidValue {
                at: loc.at(r.span()),
                field: f.field("results"),
                value: String::new(),
                expected: "a path for the JSON-lines file of responses, e.g. \"out/results.jsonl\"",
            });
        }
        let results = match self.results {
            Some(v) if is_url(v.get_ref()) => {
                let at = v.span();
                let url = super::objects::validate_url(&f, "results", RESULTS_URL_RULE, v, base)?;
                if url.ends_with('/') {
                    return Err(PipelineError::InvalidValue {
                        at: loc.at(at),
                        field: f.field("results"),
                        value: url,
                        expected: RESULTS_URL_RULE,
                    });
                }
                Some(PathBuf::from(url))
            }
            v => path(v),
        };
        let batch_input = self
            .batch_input
            .map(|v| validate_batch_input(&f, v))
            .transpose()?;
        let reorders = if id_column.is_some() {
            Some("id_column")
        } else if !file_dependencies.is_empty() {
            Some("depends_on_files")
        } else {
            None
        };
        let max_items = self
            .max_items
            .map(|v| max_items(&f, loc, v, reorders, payload))
            .transpose()?;
        Ok(Job::Backfill(Box::new(BackfillJob {
            name: name.into_inner(),
            function,
            sources,
            format,
            columns,
            csv_delimiter,
            csv_headers,
            max_items_per_call,
            max_bytes_per_call,
            max_concurrency,
            max_attempts,
            tolerated_failure_count,
            tolerated_failure_percentage,
            order_key,
            id_column,
            depends_on_column,
            max_buffered_items,
            progress: path(self.progress),
            dead_letter: path(self.dead_letter),
            results,
            bootstrap_servers,
            properties,
            payload,
            payload_file,
            arrow_compression,
            file_dependencies,
            state,
            batch_input,
            max_items,
            max_object_bytes: f.ranged(
                "max_object_bytes",
                self.max_object_bytes,
                DEFAULT_MAX_OBJECT_BYTES,
                MAX_OBJECT_BYTES_RANGE,
                " (bytes)",
            )?,
            items_pointer,
        })))
    }

    /// `format = "objects"` calls a function once per object, its bytes
    /// staged as a file: settings about rows, columns, batches of items or
    /// their order do not apply, and `max_object_bytes` needs it.
    fn check_objects(
        &self,
        f: &Fields<'_>,
        loc: &Locator<'_>,
        mapreduce: bool,
    ) -> Result<(), PipelineError> {
        let objects = self
            .format
            .as_ref()
            .is_some_and(|v| v.get_ref().parse() == Ok(DataFormat::Objects));
        if !objects {
            if let Some(v) = &self.max_object_bytes {
                return Err(PipelineError::Invalid {
                    at: loc.at(v.span()),
                    field: f.field("max_object_bytes"),
                    message: "limits the objects of format = \"objects\": set that format, \
                              or leave this out"
                        .to_owned(),
                });
            }
            return Ok(());
        }
        let conflict = |at: Range<usize>, field: &str, why: &str| PipelineError::Invalid {
            at: loc.at(at),
            field: f.field(field),
            message: format!("does not apply to format = \"objects\" ({why})"),
        };
        if mapreduce {
            let at = self.format.as_ref().map(Spanned::span).unwrap_or_default();
            return Err(conflict(
                at,
                "format",
                "a MapReduce job splits rows; call a function on each object with a backfill job",
            ));
        }
        const WHOLE: &str = "each object is one item, passed whole";
        const UNORDERED: &str = "objects are called in name order, in parallel";
        let spans = [
            ("columns", self.columns.as_ref().map(Spanned::span), WHOLE),
            (
                "csv_delimiter",
                self.csv_delimiter.as_ref().map(Spanned::span),
                WHOLE,
            ),
            (
                "csv_headers",
                self.csv_headers.as_ref().map(Spanned::span),
                WHOLE,
            ),
            (
                "order_key",
                self.order_key.as_ref().map(Spanned::span),
                UNORDERED,
            ),
            (
                "id_column",
                self.id_column.as_ref().map(Spanned::span),
                UNORDERED,
            ),
            (
                "depends_on_column",
                self.depends_on_column.as_ref().map(Spanned::span),
                UNORDERED,
            ),
            (
                "state",
                self.state.as_ref().map(Spanned::span),
                "a stateful job folds items in order",
            ),
            (
                "payload",
                self.payload
                    .as_ref()
                    .filter(|p| p.get_ref() != "json")
                    .map(Spanned::span),
                "the object's bytes are staged as a file",
            ),
            (
                "payload_file",
                self.payload_file.as_ref().map(Spanned::span),
                "the object's bytes are always staged as a file",
            ),
            (
                "arrow_compression",
                self.arrow_compression.as_ref().map(Spanned::span),
                WHOLE,
            ),
        ];
        if let Some((field, Some(at), why)) = spans.into_iter().find(|(_, at, _)| at.is_some()) {
            return Err(conflict(at, field, why));
        }
        if let Some(v) = self
            .max_items_per_call
            .as_ref()
            .filter(|v| *v.get_ref() != 1)
        {
            return Err(conflict(
                v.span(),
                "max_items_per_call",
                "a call stages one object: leave it out or set 1",
            ));
        }
        Ok(())
    }
}

/// `max_items` (Distributed Map's `MaxItems`): within its range, and not
/// where the first items in file order are not what runs first (`reorders`
/// names the setting that reorders them) or may end inside a row group
/// that `payload = "parquet"` sends whole.
fn max_items(
    f: &Fields<'_>,
    loc: &Locator<'_>,
    v: Spanned<i64>,
    reorders: Option<&str>,
    payload: PayloadFormat,
) -> Result<u64, PipelineError> {
    let at = loc.at(v.span());
    let n = f.integer("max_items", Some(v), 1, MAX_ITEMS_RANGE, " (items)")?;
    if let Some(other) = reorders {
        return Err(PipelineError::Invalid {
            at,
            field: f.field("max_items"),
            message: format!(
                "takes the first items in file order, which `{other}` reorders: \
                 leave out one of them"
            ),
        });
    }
    if payload == PayloadFormat::Parquet {
        return Err(PipelineError::Invalid {
            at,
            field: f.field("max_items"),
            message: "may end inside a row group, and payload = \"parquet\" sends \
                      whole row groups: use payload = \"arrow\" or \"json\""
                .to_owned(),
        });
    }
    Ok(u64::from(n))
}

/// `batch_input`: a table, as a JSON object of at most
/// [`MAX_BATCH_INPUT_BYTES`].
fn validate_batch_input(
    f: &Fields<'_>,
    value: Spanned<toml::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, PipelineError> {
    let span = value.span();
    let at = f.loc.at(span.clone());
    let toml::Value::Table(_) = value.get_ref() else {
        let written = f.loc.text.get(span).unwrap_or("").trim();
        return Err(PipelineError::WrongType {
            at,
            field: f.field("batch_input"),
            expected: "a table, e.g. { run_date = \"2026-12-01\" }".to_owned(),
            found: format!("{} {written}", value.get_ref().type_str()),
        });
    };
    let invalid = |message: String| PipelineError::Invalid {
        at: at.clone(),
        field: f.field("batch_input"),
        message,
    };
    let json = crate::filter::from_toml(value.get_ref()).map_err(|e| invalid(e.to_string()))?;
    let serde_json::Value::Object(object) = json else {
        return Err(invalid("expected a table".to_owned()));
    };
    let size = serde_json::Value::Object(object.clone()).to_string().len();
    if size > MAX_BATCH_INPUT_BYTES {
        return Err(invalid(format!(
            "{size} bytes as JSON: at most {MAX_BATCH_INPUT_BYTES} (it goes into every call)"
        )));
    }
    Ok(object)
}
