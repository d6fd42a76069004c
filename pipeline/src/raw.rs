//! The file as serde sees it, and the validation that turns it into a
//! [`FunctionConfig`] per function and a [`crate::KafkaTrigger`] per
//! `[[trigger.kafka]]` table.

mod job;
mod kafka;
mod objects;
mod state;

use std::collections::BTreeMap;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;
use toml::de::DeTable;

use crate::error::{PathProblem, PipelineError};
use crate::package::Bootstrap;
use crate::span::{self, Locator, dotted, toml_key};
use crate::{
    Backend, BackfillJob, CONCURRENCY_RANGE, DEFAULT_CONCURRENCY, DEFAULT_HANDLER,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_INIT_TIMEOUT, DEFAULT_MAX_PROCESSES, DEFAULT_MAX_QUEUE,
    DEFAULT_MEMORY_MB, DEFAULT_TENANT, DEFAULT_TIMEOUT, DEFAULT_TMP_MB, FunctionConfig,
    IDLE_TIMEOUT_RANGE, KafkaTrigger, MAX_PROCESSES_RANGE, MAX_QUEUE_RANGE, MEMORY_MB_RANGE,
    MapReduceJob, ObjectTrigger, RESERVED_ENV_KEYS, TIMEOUT_RANGE, TMP_MB_RANGE,
};
use crate::{DEFAULT_MIN_WARM, DEFAULT_PREWARM, WARM_RANGE};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    /// `[functions.NAME]` tables. Default: none, which validation rejects.
    #[serde(default)]
    functions: BTreeMap<Spanned<String>, Spanned<RawFunction>>,
    /// `[[trigger.KIND]]` tables. Default: none.
    #[serde(default)]
    trigger: kafka::RawTriggers,
    /// `[job.NAME]` tables. Default: none.
    #[serde(default)]
    job: BTreeMap<Spanned<String>, Spanned<job::RawJob>>,
}

/// Keys allowed at the top level, for unknown-field messages.
const TOP_LEVEL_FIELDS: &[&str] = &["functions", "trigger", "job"];

/// One `[functions.NAME]` table. Every field is optional here so that
/// validation can point at the right place; `None` means "use the default"
/// (see the `DEFAULT_*` constants), except for `path`, which is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    /// Required: the function folder, relative to the pipeline file's folder.
    path: Option<Spanned<String>>,
    /// Default [`DEFAULT_MEMORY_MB`].
    memory_mb: Option<Spanned<i64>>,
    /// Default [`DEFAULT_TIMEOUT`].
    timeout: Option<Spanned<String>>,
    /// Default [`DEFAULT_INIT_TIMEOUT`].
    init_timeout: Option<Spanned<String>>,
    /// Default [`DEFAULT_CONCURRENCY`].
    concurrency: Option<Spanned<i64>>,
    /// Default [`DEFAULT_MAX_QUEUE`].
    max_queue: Option<Spanned<i64>>,
    /// Default [`DEFAULT_IDLE_TIMEOUT`].
    idle_timeout: Option<Spanned<String>>,
    /// Default empty.
    env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    /// Default [`DEFAULT_TENANT`].
    tenant: Option<Spanned<String>>,
    /// Default `"auto"`.
    backend: Option<Spanned<String>>,
    /// Default [`DEFAULT_HANDLER`].
    handler: Option<Spanned<String>>,
    /// Default [`DEFAULT_MAX_PROCESSES`].
    max_processes: Option<Spanned<i64>>,
    /// Default [`DEFAULT_TMP_MB`].
    tmp_mb: Option<Spanned<i64>>,
    /// Default [`crate::DEFAULT_VCPUS`].
    vcpus: Option<Spanned<i64>>,
    /// Default [`DEFAULT_MIN_WARM`].
    min_warm: Option<Spanned<i64>>,
    /// Default: `concurrency`.
    max_warm: Option<Spanned<i64>>,
    /// Default [`DEFAULT_PREWARM`].
    prewarm: Option<Spanned<bool>>,
    /// Default [`crate::DEFAULT_SNAPSHOT`].
    snapshot: Option<Spanned<bool>>,
    /// Default [`crate::DEFAULT_PIN_CPU`].
    pin_cpu: Option<Spanned<bool>>,
    /// Default none.
    layers: Option<Spanned<Vec<Spanned<String>>>>,
}

const INTEGER: &str = "an integer";
const STRING: &str = "a string";
const DURATION: &str = "a duration string such as \"3s\"";

/// Keys of [`RawFunction`] and the TOML type each needs, for messages.
const FUNCTION_FIELDS: &[(&str, &str)] = &[
    ("path", STRING),
    ("memory_mb", INTEGER),
    ("timeout", DURATION),
    ("init_timeout", DURATION),
    ("concurrency", INTEGER),
    ("max_queue", INTEGER),
    ("idle_timeout", DURATION),
    ("env", "a table of strings, e.g. { GREETING = \"hi\" }"),
    ("tenant", STRING),
    ("backend", "a string: \"auto\", \"process\" or \"microvm\""),
    ("handler", STRING),
    ("max_processes", INTEGER),
    ("tmp_mb", INTEGER),
    ("min_warm", INTEGER),
    ("max_warm", INTEGER),
    ("prewarm", "a boolean (true or false)"),
    ("vcpus", INTEGER),
    ("snapshot", "a boolean (true or false)"),
    ("pin_cpu", "a boolean (true or false)"),
    (
        "layers",
        "an array of paths of folders or .zip archives, e.g. [\"layers/common\"]",
    ),
];

/// What a valid file declares: the functions and jobs by name, the
/// triggers in file order.
pub(crate) struct Declared {
    pub functions: BTreeMap<String, FunctionConfig>,
    pub kafka_triggers: Vec<KafkaTrigger>,
    pub object_triggers: Vec<ObjectTrigger>,
    pub jobs: BTreeMap<String, BackfillJob>,
    pub mapreduce_jobs: BTreeMap<String, MapReduceJob>,
}

/// A validated `[job.NAME]`, of either kind.
pub(crate) enum Job {
    Backfill(Box<BackfillJob>),
    MapReduce(Box<MapReduceJob>),
}

/// Parses and validates `text`.
pub(crate) fn parse(text: &str, file: &Path) -> Result<Declared, PipelineError> {
    let loc = Locator { text, file };
    let doc = DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let mut message = e.message().to_owned();
        // Name the key: "duplicate key" alone is hard to act on.
        if let Some(key) = text.get(span.clone()).filter(|k| !k.is_empty())
            && message == "duplicate key"
        {
            message = format!("duplicate key `{key}`");
        }
        PipelineError::Syntax {
            at: loc.at(span),
            message,
        }
    })?;
    let raw: RawPipeline =
        toml::from_str(text).map_err(|e| serde_error(&loc, doc.get_ref(), &e))?;
    raw.validate(&loc)
}

/// Turns a deserialization error into a located error naming the field.
fn serde_error(loc: &Locator<'_>, doc: &DeTable<'_>, err: &toml::de::Error) -> PipelineError {
    let span = err.span().unwrap_or(0..0);
    let message = err.message();
    let found = span::find(doc, &span);
    let path = found.as_ref().map(|f| f.path.clone()).unwrap_or_default();
    let at = loc.at(span);

    if message.starts_with("unknown field")
        && let Some((field, table)) = path.split_last()
    {
        let allowed: Option<Vec<&'static str>> = match table {
            [] => Some(TOP_LEVEL_FIELDS.to_vec()),
            [functions, _] if functions == "functions" => {
                Some(FUNCTION_FIELDS.iter().map(|(name, _)| *name).collect())
            }
            [trigger] if trigger == "trigger" => Some(kafka::TRIGGER_KINDS.to_vec()),
            [trigger, kind, _] if trigger == "trigger" && kind == "kafka" => {
                Some(kafka::KAFKA_FIELDS.iter().map(|(name, _)| *name).collect())
            }
            [trigger, kind, _] if trigger == "trigger" && kind == "object_store" => Some(
                objects::OBJECT_FIELDS
                    .iter()
                    .map(|(name, _)| *name)
                    .collect(),
            ),
            [job, _] if job == "job" => {
                Some(job::JOB_FIELDS.iter().map(|(name, _)| *name).collect())
            }
            [trigger, kind, _, st] if trigger == "trigger" && kind == "kafka" && st == "state" => {
                Some(state::STATE_FIELDS.to_vec())
            }
            [job, _, st] if job == "job" && st == "state" => Some(state::STATE_FIELDS.to_vec()),
            _ => None,
        };
        if let Some(expected) = allowed {
            return PipelineError::UnknownField {
                at,
                table: dotted(table),
                field: field.clone(),
                suggestion: closest(field, &expected),
                expected,
            };
        }
    }

    if let Some(value) = found.as_ref().and_then(|f| f.value)
        && message.starts_with("invalid type")
    {
        let expected = expected_type(&path).map_or_else(
            || {
                message
                    .rsplit_once(", expected ")
                    .map_or("another type", |(_, e)| e)
                    .to_owned()
            },
            str::to_owned,
        );
        return PipelineError::WrongType {
            at,
            field: dotted(&path),
            expected,
            found: span::describe(loc.text, value),
        };
    }

    PipelineError::Invalid {
        at,
        field: if path.is_empty() {
            "<top level>".to_owned()
        } else {
            dotted(&path)
        },
        message: message.to_owned(),
    }
}

/// The TOML type the key at `path` needs, if it is one the format knows.
fn expected_type(path: &[String]) -> Option<&'static str> {
    let strs: Vec<&str> = path.iter().map(String::as_str).collect();
    match strs.as_slice() {
        ["functions"] => Some("a table of functions, e.g. [functions.echo]"),
        ["functions", _] => Some("a table of function settings"),
        ["functions", _, "env", _] => Some(STRING),
        ["functions", _, field] => FUNCTION_FIELDS
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, ty)| *ty),
        ["trigger"] => Some("a table of triggers, e.g. [[trigger.kafka]]"),
        ["trigger", "kafka"] => {
            Some("an array of tables, written [[trigger.kafka]] (with double brackets)")
        }
        ["trigger", "kafka", _] => Some("a table of Kafka trigger settings"),
        ["trigger", "object_store"] => {
            Some("an array of tables, written [[trigger.object_store]] (with double brackets)")
        }
        ["trigger", "object_store", _] => Some("a table of object-store trigger settings"),
        ["trigger", "object_store", _, field] => objects::OBJECT_FIELDS
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, ty)| *ty),
        ["trigger", "kafka", _, "topics", _] => Some(STRING),
        ["trigger", "kafka", _, "properties", _] => Some(kafka::PROPERTY_VALUE),
        ["job"] => Some("a table of jobs, e.g. [job.backfill-orders]"),
        ["job", _] => Some("a table of job settings"),
        ["job", _, "source", _] | ["job", _, "columns", _] => Some(STRING),
        ["job", _, field] => job::JOB_FIELDS
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, ty)| *ty),
        ["trigger", "kafka", _, field] => kafka::KAFKA_FIELDS
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, ty)| *ty),
        _ => None,
    }
}

/// The allowed name closest to a misspelt one, if it is plausibly a typo.
fn closest(field: &str, allowed: &[&'static str]) -> Option<&'static str> {
    allowed
        .iter()
        .map(|name| (edit_distance(field, name), *name))
        .filter(|(d, name)| *d <= 2 && *d < name.len().max(field.len()) / 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// A table to validate: a function or a trigger.
/// (Boxed: the raw tables are large.)
enum Item {
    Function(Spanned<String>, Box<RawFunction>),
    /// A `[[trigger.kafka]]` table and its position in the array.
    Kafka(usize, Box<Spanned<kafka::RawKafka>>),
    /// A `[[trigger.object_store]]` table and its position in the array.
    Objects(usize, Box<Spanned<objects::RawObjects>>),
    /// A `[job.NAME]` table.
    Job(Spanned<String>, Box<Spanned<job::RawJob>>),
}

impl RawPipeline {
    fn validate(self, loc: &Locator<'_>) -> Result<Declared, PipelineError> {
        if self.functions.is_empty() {
            return Err(PipelineError::NoFunctions {
                file: loc.file.to_path_buf(),
            });
        }
        let declared: Vec<String> = self
            .functions
            .keys()
            .map(|name| name.get_ref().clone())
            .collect();
        // Validate in file order so the first error reported is the first one
        // in the file.
        let mut items: Vec<(usize, Item)> = self
            .functions
            .into_iter()
            .map(|(name, function)| {
                (
                    name.span().start,
                    Item::Function(name, Box::new(function.into_inner())),
                )
            })
            .chain(
                self.trigger
                    .kafka
                    .into_iter()
                    .enumerate()
                    .map(|(i, trigger)| (trigger.span().start, Item::Kafka(i, Box::new(trigger)))),
            )
            .chain(
                self.trigger
                    .object_store
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| (t.span().start, Item::Objects(i, Box::new(t)))),
            )
            .chain(
                self.job
                    .into_iter()
                    .map(|(name, job)| (name.span().start, Item::Job(name, Box::new(job)))),
            )
            .collect();
        items.sort_by_key(|(start, _)| *start);
        let base = loc.file.parent().unwrap_or(Path::new(""));
        let mut functions = BTreeMap::new();
        let mut triggers = Vec::new();
        let mut object_triggers = Vec::new();
        let mut trigger_names = BTreeMap::new();
        let mut jobs = BTreeMap::new();
        let mut mapreduce_jobs = BTreeMap::new();
        // Files a trigger or job writes, and whose field named them first:
        // two writers of one progress store, dead-letter or results file
        // would corrupt it (a results file is cut back to the length its
        // own store committed).
        let mut written: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut claim = |files: Vec<(&str, Option<&Path>)>,
                         table: String,
                         header: Range<usize>|
         -> Result<(), PipelineError> {
            for (field, path) in files {
                let Some(path) = path else { continue };
                let this = format!("{table}.{field}");
                if let Some(first) = written.get(path) {
                    return Err(PipelineError::Invalid {
                        at: loc.at(header),
                        field: this,
                        message: format!(
                            "writes {}, as `{first}` does: two writers would corrupt it; \
                             give each its own file",
                            path.display()
                        ),
                    });
                }
                written.insert(path.to_path_buf(), this);
            }
            Ok(())
        };
        for (_, item) in items {
            match item {
                Item::Function(name, function) => {
                    let config = function.validate(loc, name, base)?;
                    functions.insert(config.name.clone(), config);
                }
                Item::Kafka(index, trigger) => {
                    let header = trigger.span();
                    let trigger = trigger.into_inner().validate(
                        loc,
                        index,
                        header,
                        &declared,
                        &mut trigger_names,
                    )?;
                    triggers.push((index, trigger));
                }
                Item::Objects(index, trigger) => {
                    let header = trigger.span();
                    let trigger = trigger.into_inner().validate(
                        loc,
                        index,
                        header.clone(),
                        &declared,
                        &mut trigger_names,
                    )?;
                    claim(
                        vec![
                            ("progress", Some(trigger.progress.as_path())),
                            ("dead_letter", Some(trigger.dead_letter.as_path())),
                            ("results", trigger.results.as_deref()),
                        ],
                        format!("trigger.object_store[{index}]"),
                        header,
                    )?;
                    object_triggers.push((index, trigger));
                }
                Item::Job(name, job) => {
                    let header = job.span();
                    match job
                        .into_inner()
                        .validate(loc, name, header.clone(), &declared, base)?
                    {
                        Job::Backfill(job) => {
                            claim(
                                vec![
                                    ("progress", job.progress.as_deref()),
                                    ("dead_letter", job.dead_letter.as_deref()),
                                    ("results", job.results.as_deref()),
                                ],
                                format!("job.{}", span::toml_key(&job.name)),
                                header,
                            )?;
                            jobs.insert(job.name.clone(), *job);
                        }
                        Job::MapReduce(job) => {
                            mapreduce_jobs.insert(job.name.clone(), *job);
                        }
                    }
                }
            }
        }
        triggers.sort_by_key(|(index, _)| *index);
        object_triggers.sort_by_key(|(index, _)| *index);
        Ok(Declared {
            functions,
            kafka_triggers: triggers.into_iter().map(|(_, t)| t).collect(),
            object_triggers: object_triggers.into_iter().map(|(_, t)| t).collect(),
            jobs,
            mapreduce_jobs,
        })
    }
}

/// Validation helpers for the fields of one table.
struct Fields<'a> {
    loc: &'a Locator<'a>,
    /// Dotted path of the table, e.g. `functions.echo` or `trigger.kafka[0]`.
    table: String,
}

impl Fields<'_> {
    fn field(&self, key: &str) -> String {
        format!("{}.{}", self.table, toml_key(key))
    }

    fn integer(
        &self,
        key: &str,
        value: Option<Spanned<i64>>,
        default: u32,
        range: RangeInclusive<u32>,
        unit: &'static str,
    ) -> Result<u32, PipelineError> {
        self.ranged(key, value, default, range, unit)
    }

    /// An integer of any type, in a range whose bounds fit in `u32`.
    fn ranged<T>(
        &self,
        key: &str,
        value: Option<Spanned<i64>>,
        default: T,
        range: RangeInclusive<T>,
        unit: &'static str,
    ) -> Result<T, PipelineError>
    where
        T: Copy + PartialOrd + TryFrom<i64> + TryInto<u32>,
    {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = *value.get_ref();
        match T::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(PipelineError::OutOfRange {
                at: self.loc.at(value.span()),
                field: self.field(key),
                value: n,
                min: (*range.start()).try_into().unwrap_or(0),
                max: (*range.end()).try_into().unwrap_or(u32::MAX),
                unit,
            }),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<Spanned<String>>,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Result<Duration, PipelineError> {
        Ok(self
            .optional_duration(key, value, range)?
            .unwrap_or(default))
    }

    /// A duration that has no default: `None` when absent.
    fn optional_duration(
        &self,
        key: &str,
        value: Option<Spanned<String>>,
        range: RangeInclusive<Duration>,
    ) -> Result<Option<Duration>, PipelineError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let span = value.span();
        let written = value.into_inner();
        let parsed =
            humantime::parse_duration(&written).map_err(|e| PipelineError::BadDuration {
                at: self.loc.at(span.clone()),
                field: self.field(key),
                value: written.clone(),
                reason: duration_reason(&written, &e),
            })?;
        if range.contains(&parsed) {
            Ok(Some(parsed))
        } else {
            Err(PipelineError::DurationOutOfRange {
                at: self.loc.at(span),
                field: self.field(key),
                value: written,
                min: *range.start(),
                max: *range.end(),
            })
        }
    }

    fn string(
        &self,
        key: &str,
        value: Option<Spanned<String>>,
        default: &str,
        valid: fn(&str) -> bool,
        expected: &'static str,
    ) -> Result<String, PipelineError> {
        let Some(value) = value else {
            return Ok(default.to_owned());
        };
        if valid(value.get_ref()) {
            Ok(value.into_inner())
        } else {
            Err(PipelineError::InvalidValue {
                at: self.loc.at(value.span()),
                field: self.field(key),
                value: value.into_inner(),
                expected,
            })
        }
    }
}

fn duration_reason(written: &str, err: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    let char_at = |offset: usize| written.get(offset..).and_then(|s| s.chars().next());
    match err {
        E::Empty => "it is empty".to_owned(),
        E::UnknownUnit { unit, .. } if unit.is_empty() => "the unit is missing".to_owned(),
        E::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
        E::InvalidCharacter(offset) => match char_at(*offset) {
            Some(c) => format!("unexpected character {c:?}"),
            None => "unexpected character".to_owned(),
        },
        E::NumberExpected(_) => "a number is missing".to_owned(),
        E::NumberOverflow => "the number is too large or too precise".to_owned(),
    }
}

/// Check a function (or trigger, job, tenant) name against Lambda's rule,
/// `[A-Za-z0-9_-]{1,64}`: the error says what is wrong with it.
pub fn check_name(name: &str) -> Result<(), String> {
    if is_lambda_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name ({}): use 1 to 64 letters, digits, '_' or '-'",
            bad_name_reason(name)
        ))
    }
}

fn is_lambda_name(s: &str) -> bool {
    (1..=64).contains(&s.chars().count())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_env_key(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_handler(s: &str) -> bool {
    (1..=128).contains(&s.chars().count()) && !s.chars().any(|c| c.is_whitespace() || c == '\0')
}

fn bad_name_reason(name: &str) -> String {
    let count = name.chars().count();
    if count == 0 {
        "it is empty".to_owned()
    } else if count > 64 {
        format!("it is {count} characters long")
    } else {
        let bad = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
            .unwrap_or(' ');
        format!("it contains {bad:?}")
    }
}

impl RawFunction {
    fn validate(
        self,
        loc: &Locator<'_>,
        name: Spanned<String>,
        base: &Path,
    ) -> Result<FunctionConfig, PipelineError> {
        let name_span = name.span();
        let name = name.into_inner();
        if !is_lambda_name(&name) {
            return Err(PipelineError::BadFunctionName {
                at: loc.at(name_span),
                reason: bad_name_reason(&name),
                name,
            });
        }
        let f = Fields {
            loc,
            table: dotted(&["functions", name.as_str()]),
        };
        let Some(path) = self.path else {
            return Err(PipelineError::MissingField {
                at: loc.at(table_span(loc.text, name_span)),
                table: f.table,
                field: "path",
                hint: "the function folder holding `bootstrap`, e.g. path = \"functions/echo\"",
            });
        };

        let memory_mb = f.integer(
            "memory_mb",
            self.memory_mb,
            DEFAULT_MEMORY_MB,
            MEMORY_MB_RANGE,
            " (megabytes)",
        )?;
        let timeout = f.duration("timeout", self.timeout, DEFAULT_TIMEOUT, TIMEOUT_RANGE)?;
        let init_timeout = f.duration(
            "init_timeout",
            self.init_timeout,
            DEFAULT_INIT_TIMEOUT,
            TIMEOUT_RANGE,
        )?;
        let concurrency_is_default = self.concurrency.is_none();
        let concurrency = f.integer(
            "concurrency",
            self.concurrency,
            DEFAULT_CONCURRENCY,
            CONCURRENCY_RANGE,
            "",
        )?;
        let max_queue = f.integer(
            "max_queue",
            self.max_queue,
            DEFAULT_MAX_QUEUE,
            MAX_QUEUE_RANGE,
            "",
        )?;
        let idle_timeout = f.duration(
            "idle_timeout",
            self.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            IDLE_TIMEOUT_RANGE,
        )?;
        let env = validate_env(&f, self.env.unwrap_or_default())?;
        let tenant = f.string(
            "tenant",
            self.tenant,
            DEFAULT_TENANT,
            is_lambda_name,
            "1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`",
        )?;
        let backend = validate_backend(&f, self.backend)?;
        let handler = f.string(
            "handler",
            self.handler,
            DEFAULT_HANDLER,
            is_handler,
            "1 to 128 characters without whitespace",
        )?;
        let max_processes = f.integer(
            "max_processes",
            self.max_processes,
            DEFAULT_MAX_PROCESSES,
            MAX_PROCESSES_RANGE,
            "",
        )?;
        let tmp_mb = f.integer(
            "tmp_mb",
            self.tmp_mb,
            DEFAULT_TMP_MB,
            TMP_MB_RANGE,
            " (megabytes)",
        )?;
        let vcpus = f.integer(
            "vcpus",
            self.vcpus,
            crate::DEFAULT_VCPUS,
            crate::VCPUS_RANGE,
            "",
        )?;
        let (min_warm, max_warm) = validate_warm(
            &f,
            self.min_warm,
            self.max_warm,
            concurrency,
            concurrency_is_default,
        )?;
        let prewarm = self.prewarm.map_or(DEFAULT_PREWARM, Spanned::into_inner);
        let snapshot = backend_flag(
            &f,
            ("snapshot", self.snapshot, crate::DEFAULT_SNAPSHOT),
            (backend, Backend::Process, "\"microvm\" or \"auto\""),
            "function snapshots are VM snapshots; the process backend has none",
        )?;
        let pin_cpu = backend_flag(
            &f,
            ("pin_cpu", self.pin_cpu, crate::DEFAULT_PIN_CPU),
            (backend, Backend::Microvm, "\"process\" or \"auto\""),
            "it pins process sandboxes; a microVM's vCPU threads are not pinned",
        )?;
        let layers = validate_layers(&f, self.layers, base)?;
        let path = validate_path(&f, path, base, &layers)?;

        Ok(FunctionConfig {
            name,
            path,
            memory_mb,
            timeout,
            init_timeout,
            concurrency,
            max_queue,
            idle_timeout,
            env,
            tenant,
            backend,
            handler,
            max_processes,
            tmp_mb,
            vcpus,
            min_warm,
            max_warm,
            prewarm,
            snapshot,
            pin_cpu,
            layers,
        })
    }
}

/// A boolean setting of one backend: `(name, value, default)`, refused as
/// `true` when `backend` is `refused` (the error requires `allowed`).
fn backend_flag(
    f: &Fields<'_>,
    (name, value, default): (&str, Option<Spanned<bool>>, bool),
    (backend, refused, allowed): (Backend, Backend, &str),
    reason: &'static str,
) -> Result<bool, PipelineError> {
    match value {
        Some(v) if *v.get_ref() && backend == refused => Err(PipelineError::Requires {
            at: f.loc.at(v.span()),
            field: f.field(name),
            value: "true".into(),
            required: format!("{} = {allowed}", f.field("backend")),
            reason,
        }),
        Some(v) => Ok(v.into_inner()),
        None => Ok(default),
    }
}

/// `min_warm` ≤ `max_warm` ≤ `concurrency`; `max_warm` defaults to
/// `concurrency`.
fn validate_warm(
    f: &Fields<'_>,
    min_warm: Option<Spanned<i64>>,
    max_warm: Option<Spanned<i64>>,
    concurrency: u32,
    concurrency_is_default: bool,
) -> Result<(u32, u32), PipelineError> {
    let min_at = min_warm.as_ref().map(Spanned::span);
    let max_at = max_warm.as_ref().map(Spanned::span);
    let min = f.integer("min_warm", min_warm, DEFAULT_MIN_WARM, WARM_RANGE, "")?;
    let max = f.integer("max_warm", max_warm, concurrency, WARM_RANGE, "")?;
    if let Some(at) = max_at.clone().filter(|_| max > concurrency) {
        return Err(PipelineError::ExceedsLimit {
            at: f.loc.at(at),
            field: f.field("max_warm"),
            value: max,
            limit_field: f.field("concurrency"),
            limit: concurrency,
            limit_is_default: concurrency_is_default,
            reason: "a function never has more sandboxes than its concurrency",
        });
    }
    if let Some(at) = min_at.filter(|_| min > max) {
        let (limit_field, reason) = if max_at.is_some() {
            (
                "max_warm",
                "at most max_warm sandboxes are kept idle, so min_warm cannot be more",
            )
        } else {
            (
                "concurrency",
                "max_warm defaults to the concurrency, and min_warm cannot be more than max_warm",
            )
        };
        return Err(PipelineError::ExceedsLimit {
            at: f.loc.at(at),
            field: f.field("min_warm"),
            value: min,
            limit_field: f.field(limit_field),
            limit: max,
            limit_is_default: max_at.is_none() && concurrency_is_default,
            reason,
        });
    }
    Ok((min, max))
}

/// Where to point for a problem with a whole function table: its
/// `[functions.NAME]` header when it has one, else the name's key.
fn table_span(text: &str, name_span: Range<usize>) -> Range<usize> {
    let line_start = text[..name_span.start].rfind('\n').map_or(0, |i| i + 1);
    let before = &text[line_start..name_span.start];
    match before.find('[') {
        Some(bracket) if before.trim_start().starts_with('[') => {
            line_start + bracket..name_span.end
        }
        _ => name_span,
    }
}

fn validate_env(
    f: &Fields<'_>,
    env: BTreeMap<Spanned<String>, Spanned<String>>,
) -> Result<BTreeMap<String, String>, PipelineError> {
    let mut entries: Vec<_> = env.into_iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let field = f.field("env");
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        if !is_env_key(key.get_ref()) {
            return Err(PipelineError::BadEnvKey {
                at: f.loc.at(key.span()),
                field,
                key: key.into_inner(),
            });
        }
        if RESERVED_ENV_KEYS.contains(&key.get_ref().as_str()) {
            return Err(PipelineError::ReservedEnvKey {
                at: f.loc.at(key.span()),
                field,
                key: key.into_inner(),
            });
        }
        if value.get_ref().contains('\0') {
            return Err(PipelineError::InvalidValue {
                at: f.loc.at(value.span()),
                field: format!("{field}.{}", key.get_ref()),
                value: value.into_inner(),
                expected: "a string without NUL characters",
            });
        }
        out.insert(key.into_inner(), value.into_inner());
    }
    Ok(out)
}

fn validate_backend(
    f: &Fields<'_>,
    backend: Option<Spanned<String>>,
) -> Result<Backend, PipelineError> {
    let Some(backend) = backend else {
        return Ok(Backend::default());
    };
    match backend.get_ref().as_str() {
        "auto" => Ok(Backend::Auto),
        "process" => Ok(Backend::Process),
        "microvm" => Ok(Backend::Microvm),
        _ => Err(PipelineError::InvalidValue {
            at: f.loc.at(backend.span()),
            field: f.field("backend"),
            value: backend.into_inner(),
            expected: "one of \"auto\", \"process\" or \"microvm\"",
        }),
    }
}

/// Resolves `path` against `base` and checks it is a package (a folder or
/// a `.zip` archive) with an executable `bootstrap`, or whose `layers` have
/// one (a custom runtime shipped as a layer: Lambda looks for
/// `/opt/bootstrap` when the function has none); returns its canonical
/// absolute path.
fn validate_path(
    f: &Fields<'_>,
    path: Spanned<String>,
    base: &Path,
    layers: &[PathBuf],
) -> Result<PathBuf, PipelineError> {
    let span = path.span();
    let written = path.into_inner();
    let resolved = base.join(&written);
    let checked = match check_function_package(&resolved) {
        Err(PathProblem::NoBootstrap) if layered_bootstrap(layers) => Ok(()),
        checked => checked,
    };
    let problem = match checked {
        Ok(()) => match resolved.canonicalize() {
            Ok(canonical) => return Ok(canonical),
            Err(e) => PathProblem::Inaccessible(e),
        },
        Err(problem) => problem,
    };
    Err(PipelineError::BadFunctionPath {
        at: f.loc.at(span),
        field: f.field("path"),
        value: written,
        resolved,
        problem,
    })
}

/// `layers`: at most [`crate::MAX_LAYERS`] packages (folders or `.zip`
/// archives), each once, resolved against the pipeline file's folder.
fn validate_layers(
    f: &Fields<'_>,
    layers: Option<Spanned<Vec<Spanned<String>>>>,
    base: &Path,
) -> Result<Vec<PathBuf>, PipelineError> {
    let Some(layers) = layers else {
        return Ok(Vec::new());
    };
    let span = layers.span();
    let layers = layers.into_inner();
    if layers.len() > crate::MAX_LAYERS {
        return Err(PipelineError::Invalid {
            at: f.loc.at(span),
            field: f.field("layers"),
            message: format!(
                "{} layers; a function may have at most {} (Lambda's limit)",
                layers.len(),
                crate::MAX_LAYERS
            ),
        });
    }
    let mut resolved: Vec<PathBuf> = Vec::with_capacity(layers.len());
    for (i, layer) in layers.into_iter().enumerate() {
        let span = layer.span();
        let written = layer.into_inner();
        let field = format!("{}[{i}]", f.field("layers"));
        let joined = base.join(&written);
        let checked = package_problem(&joined).or_else(|| {
            // An archive's listing is checked now, as a function's is.
            package_bootstrap(&joined).err()
        });
        let problem = match checked {
            Some(problem) => problem,
            None => match joined.canonicalize() {
                Ok(canonical) => {
                    if let Some(name) = unrunnable_extension(&canonical) {
                        return Err(PipelineError::Invalid {
                            at: f.loc.at(span),
                            field,
                            message: format!(
                                "{} is not executable: the sandbox starts every file of a \
                                 layer's `extensions` folder as a Lambda extension (run \
                                 `chmod +x` on it)",
                                Path::new(&written).join("extensions").join(name).display()
                            ),
                        });
                    }
                    if let Some(j) = resolved.iter().position(|r| *r == canonical) {
                        return Err(PipelineError::Invalid {
                            at: f.loc.at(span),
                            field,
                            message: format!(
                                "{written:?} is `layers[{j}]` again; a layer is given once"
                            ),
                        });
                    }
                    resolved.push(canonical);
                    continue;
                }
                Err(e) => PathProblem::Inaccessible(e),
            },
        };
        return Err(PipelineError::BadFunctionPath {
            at: f.loc.at(span),
            field,
            value: written,
            resolved: joined,
            problem,
        });
    }
    Ok(resolved)
}

/// A file of a folder layer's `extensions/` that could not be started as an
/// extension (no execute permission); `None` if there is none (or the
/// layer is an archive, whose modes are checked when it starts).
fn unrunnable_extension(layer: &Path) -> Option<String> {
    let dir = std::fs::read_dir(layer.join("extensions")).ok()?;
    let mut bad: Vec<String> = dir
        .filter_map(Result::ok)
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file() && !is_executable(&m)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    bad.sort();
    bad.into_iter().next()
}

/// Whether the merged layers have an executable `bootstrap` at their root:
/// the topmost layer with one decides, as it hides the others'.
fn layered_bootstrap(layers: &[PathBuf]) -> bool {
    layers
        .iter()
        .rev()
        .map(|layer| package_bootstrap(layer).unwrap_or(Bootstrap::Missing))
        .find(|b| *b != Bootstrap::Missing)
        == Some(Bootstrap::File { executable: true })
}

/// What a package (a folder, or an archive) holds as `bootstrap`.
fn package_bootstrap(package: &Path) -> Result<Bootstrap, PathProblem> {
    use std::io::ErrorKind;
    if crate::package::is_archive(package) && package.is_file() {
        return crate::package::check_archive(package)
            .map_err(|why| PathProblem::BadArchive(Box::new(why)));
    }
    match std::fs::metadata(package.join("bootstrap")) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Bootstrap::Missing),
        Err(e) => Err(PathProblem::Inaccessible(e)),
        Ok(meta) if !meta.is_file() => Ok(Bootstrap::Other),
        Ok(meta) => Ok(Bootstrap::File {
            executable: is_executable(&meta),
        }),
    }
}

/// What is wrong with where a package (a folder, or a `.zip` archive)
/// should be: nothing there, or neither; `None` if it is one.
fn package_problem(package: &Path) -> Option<PathProblem> {
    use std::io::ErrorKind;
    match std::fs::metadata(package) {
        Err(e) if e.kind() == ErrorKind::NotFound => Some(PathProblem::NotFound),
        Err(e) => Some(PathProblem::Inaccessible(e)),
        Ok(meta) if meta.is_file() && crate::package::is_archive(package) => None,
        Ok(meta) if !meta.is_dir() => Some(PathProblem::NotAFolder),
        Ok(_) => None,
    }
}

fn check_function_package(package: &Path) -> Result<(), PathProblem> {
    if let Some(problem) = package_problem(package) {
        return Err(problem);
    }
    match package_bootstrap(package)? {
        Bootstrap::Missing => Err(PathProblem::NoBootstrap),
        Bootstrap::Other => Err(PathProblem::BootstrapNotAFile),
        Bootstrap::File { executable: false } => Err(PathProblem::BootstrapNotExecutable),
        Bootstrap::File { executable: true } => Ok(()),
    }
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &std::fs::Metadata) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_function_field_is_accepted() {
        for (name, _) in FUNCTION_FIELDS {
            // A value of no field's type: a table of tables of tables.
            let text = format!("[functions.f]\n{name} = {{ a = {{ b = {{}} }} }}\n");
            let err = toml::from_str::<RawPipeline>(&text).expect_err("fits no field");
            assert!(
                err.message().starts_with("invalid type"),
                "{name}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn typo_suggestions() {
        let fields: Vec<&'static str> = FUNCTION_FIELDS.iter().map(|(n, _)| *n).collect();
        assert_eq!(closest("memry_mb", &fields), Some("memory_mb"));
        assert_eq!(closest("timout", &fields), Some("timeout"));
        assert_eq!(closest("function", TOP_LEVEL_FIELDS), Some("functions"));
        assert_eq!(closest("triggers", TOP_LEVEL_FIELDS), Some("trigger"));
        assert_eq!(closest("jobs", TOP_LEVEL_FIELDS), Some("job"));
        assert_eq!(closest("tasks", TOP_LEVEL_FIELDS), None);
        assert_eq!(closest("x", &fields), None);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
