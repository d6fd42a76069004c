//! `[[trigger.kafka]]` tables as serde sees them, and their validation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_spanned::Spanned;

use super::{DURATION, Fields, INTEGER, STRING, is_lambda_name};
use crate::OnFailure;
use crate::error::PipelineError;
use crate::filter::{self, Pattern};
use crate::span::{self, Locator};
use crate::{
    BATCH_SIZE_RANGE, BATCH_WINDOW_RANGE, BootstrapServers, DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_WINDOW, DEFAULT_GROUP_ID_PREFIX, DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_PARALLELIZATION_FACTOR, DEFAULT_PARTITIONS, DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_BACKOFF_MAX, EMBEDDED_BOOTSTRAP_SERVERS, KafkaTrigger, MANAGED_KAFKA_PROPERTIES,
    MAX_BATCH_BYTES_RANGE, MAX_RECORD_AGE_RANGE, MAX_RETRY_ATTEMPTS_RANGE,
    PARALLELIZATION_FACTOR_RANGE, PARTITIONS_RANGE, RETRY_BACKOFF_MAX_LIMIT, RETRY_BACKOFF_RANGE,
    StartingPosition,
};

/// The `[trigger]` table: one array per kind of trigger.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTriggers {
    /// `[[trigger.kafka]]` tables. Default: none.
    #[serde(default)]
    pub kafka: Vec<Spanned<RawKafka>>,
    /// `[[trigger.object_store]]` tables. Default: none.
    #[serde(default)]
    pub object_store: Vec<Spanned<super::objects::RawObjects>>,
}

/// Keys of [`RawTriggers`], for unknown-field messages.
pub(super) const TRIGGER_KINDS: &[&str] = &["kafka", "object_store"];

/// One `[[trigger.kafka]]` table. As in [`super::RawFunction`], every field
/// is optional here; `None` means "use the default" (see the constants in the
/// crate root), except for `function` and `topics`, which are required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKafka {
    /// Default `FUNCTION-N`.
    name: Option<Spanned<String>>,
    /// Required.
    function: Option<Spanned<String>>,
    /// Required, non-empty.
    topics: Option<Spanned<Vec<Spanned<String>>>>,
    /// Default `"embedded"`.
    bootstrap_servers: Option<Spanned<String>>,
    /// Default `sluice-FUNCTION`.
    group_id: Option<Spanned<String>>,
    /// Default `"latest"`.
    starting_position: Option<Spanned<String>>,
    /// Default [`DEFAULT_BATCH_SIZE`].
    batch_size: Option<Spanned<i64>>,
    /// Default [`DEFAULT_BATCH_WINDOW`].
    batch_window: Option<Spanned<String>>,
    /// Default [`DEFAULT_MAX_BATCH_BYTES`].
    max_batch_bytes: Option<Spanned<i64>>,
    /// Default none. A table; any value is accepted here (a datetime would
    /// pass as a table) and checked in validation.
    filter: Option<Spanned<toml::Value>>,
    /// Default -1 (no limit).
    max_retry_attempts: Option<Spanned<i64>>,
    /// Default none (no limit).
    max_record_age: Option<Spanned<String>>,
    /// Default `false`.
    bisect_batch_on_error: Option<bool>,
    /// Default `false`.
    report_batch_item_failures: Option<bool>,
    /// Default none.
    on_failure: Option<Spanned<String>>,
    /// Default none.
    output_topic: Option<Spanned<String>>,
    /// Default [`DEFAULT_PARALLELIZATION_FACTOR`].
    parallelization_factor: Option<Spanned<i64>>,
    /// Default `false`.
    exactly_once: Option<Spanned<bool>>,
    /// Default [`DEFAULT_RETRY_BACKOFF`].
    retry_backoff: Option<Spanned<String>>,
    /// Default [`DEFAULT_RETRY_BACKOFF_MAX`].
    retry_backoff_max: Option<Spanned<String>>,
    /// Default [`DEFAULT_PARTITIONS`].
    partitions: Option<Spanned<i64>>,
    /// Default empty.
    properties: Option<BTreeMap<Spanned<String>, Spanned<PropertyValue>>>,
    /// Default none (stateless).
    state: Option<Spanned<super::state::RawState>>,
    /// Default `true`.
    enabled: Option<bool>,
}

const FILTER_TYPE: &str = "a table (a filter pattern), e.g. { value = { type = [\"order\"] } }, \
                           or an array of them (any may match)";
const BOOLEAN: &str = "a boolean (true or false)";
const TOPIC: &str = "a topic name (a string)";

const ON_FAILURE_RULE: &str = "a topic, or a folder or object store prefix as a URL: \
                               file:///FOLDER, s3://BUCKET/PREFIX, gs://, az://";
/// What a `properties` value must be, for messages.
pub(super) const PROPERTY_VALUE: &str = "a string, integer or boolean";

/// Keys of [`RawKafka`] and the TOML type each needs, for messages.
pub(super) const KAFKA_FIELDS: &[(&str, &str)] = &[
    ("name", STRING),
    ("function", STRING),
    ("topics", "an array of topic names, e.g. [\"orders\"]"),
    (
        "bootstrap_servers",
        "a string: \"embedded\" or \"host:port[,host:port...]\"",
    ),
    ("group_id", STRING),
    (
        "starting_position",
        "a string: \"earliest\", \"latest\" or a quoted timestamp such as \
         \"2024-05-01T00:00:00Z\"",
    ),
    ("batch_size", INTEGER),
    ("batch_window", DURATION),
    ("max_batch_bytes", INTEGER),
    ("filter", FILTER_TYPE),
    ("max_retry_attempts", INTEGER),
    ("max_record_age", DURATION),
    ("bisect_batch_on_error", BOOLEAN),
    ("report_batch_item_failures", BOOLEAN),
    (
        "on_failure",
        "a topic name, or a URL (file:///FOLDER, s3://BUCKET/PREFIX) (a string)",
    ),
    ("output_topic", TOPIC),
    ("parallelization_factor", INTEGER),
    ("exactly_once", BOOLEAN),
    ("retry_backoff", DURATION),
    ("retry_backoff_max", DURATION),
    ("partitions", INTEGER),
    (
        "properties",
        "a table of librdkafka properties, e.g. { \"security.protocol\" = \"SASL_SSL\" }",
    ),
    ("state", super::state::STATE_TYPE),
    ("enabled", BOOLEAN),
];

/// A `properties` value: a string, or an integer or boolean written as one.
#[derive(Debug)]
pub(super) struct PropertyValue(pub(super) String);

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PropertyVisitor;

        impl Visitor<'_> for PropertyVisitor {
            type Value = PropertyValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(PROPERTY_VALUE)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PropertyValue, E> {
                Ok(PropertyValue(v.to_string()))
            }
        }

        deserializer.deserialize_any(PropertyVisitor)
    }
}

const NAME_RULE: &str = "1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`";

impl RawKafka {
    /// Validates the table at position `index` of `[[trigger.kafka]]`, whose
    /// header (or inline table) is at `header`. `declared` are the declared
    /// function names; `names` maps the names of the triggers validated so
    /// far to their dotted paths, and gets this trigger's name.
    pub(super) fn validate(
        self,
        loc: &Locator<'_>,
        index: usize,
        header: Range<usize>,
        declared: &[String],
        names: &mut BTreeMap<String, String>,
    ) -> Result<KafkaTrigger, PipelineError> {
        let f = Fields {
            loc,
            table: format!("trigger.kafka{}", span::index(index)),
        };
        let missing = |field: &'static str, hint: &'static str| PipelineError::MissingField {
            at: loc.at(header.clone()),
            table: f.table.clone(),
            field,
            hint,
        };

        let (name, function) = trigger_identity(
            &f,
            header.clone(),
            self.name,
            self.function,
            "the declared function invoked with each batch, e.g. function = \"echo\"",
            |function| format!("{function}-{}", index + 1),
            declared,
            names,
        )?;

        let Some(topics) = self.topics else {
            return Err(missing(
                "topics",
                "the topics to consume, e.g. topics = [\"orders\"]",
            ));
        };
        let topics = validate_topics(&f, topics)?;
        let bootstrap_servers = validate_bootstrap_servers(&f, self.bootstrap_servers)?;
        let group_id = f.string(
            "group_id",
            self.group_id,
            &format!("{DEFAULT_GROUP_ID_PREFIX}{function}"),
            is_group_id,
            "1 to 255 characters without control characters",
        )?;
        let starting_position = validate_starting_position(&f, self.starting_position)?;
        let batch_size = f.integer(
            "batch_size",
            self.batch_size,
            DEFAULT_BATCH_SIZE,
            BATCH_SIZE_RANGE,
            " (records)",
        )?;
        let batch_window = f.duration(
            "batch_window",
            self.batch_window,
            DEFAULT_BATCH_WINDOW,
            BATCH_WINDOW_RANGE,
        )?;
        let max_batch_bytes = f.ranged(
            "max_batch_bytes",
            self.max_batch_bytes,
            DEFAULT_MAX_BATCH_BYTES,
            MAX_BATCH_BYTES_RANGE,
            " (bytes)",
        )?;
        let filter = self
            .filter
            .map(|value| validate_filter(&f, value))
            .transpose()?;
        let max_retry_attempts = match &self.max_retry_attempts {
            None => None,
            Some(n) if *n.get_ref() == -1 => None,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(attempts) if MAX_RETRY_ATTEMPTS_RANGE.contains(&attempts) => Some(attempts),
                _ => {
                    return Err(PipelineError::RetryAttemptsOutOfRange {
                        at: loc.at(n.span()),
                        field: f.field("max_retry_attempts"),
                        value: *n.get_ref(),
                        min: *MAX_RETRY_ATTEMPTS_RANGE.start(),
                        max: *MAX_RETRY_ATTEMPTS_RANGE.end(),
                    });
                }
            },
        };
        let max_record_age_at = self
            .max_record_age
            .as_ref()
            .map(|age| (age.span(), format!("{:?}", age.get_ref())));
        let max_record_age =
            f.optional_duration("max_record_age", self.max_record_age, MAX_RECORD_AGE_RANGE)?;
        let base = loc.file.parent().unwrap_or(std::path::Path::new(""));
        let on_failure = match self.on_failure {
            Some(v) if super::job::is_url(v.get_ref()) => Some(OnFailure::Objects(
                super::objects::validate_url(&f, "on_failure", ON_FAILURE_RULE, v, base)?,
            )),
            v => sink_topic(&f, "on_failure", v, &topics)?.map(OnFailure::Topic),
        };
        let output_topic = sink_topic(&f, "output_topic", self.output_topic, &topics)?;
        let parallelization_factor = f.integer(
            "parallelization_factor",
            self.parallelization_factor,
            DEFAULT_PARALLELIZATION_FACTOR,
            PARALLELIZATION_FACTOR_RANGE,
            "",
        )?;
        let (retry_backoff, retry_backoff_max) = retry_backoffs(
            &f,
            header.clone(),
            self.retry_backoff,
            self.retry_backoff_max,
        )?;
        let partitions = f.ranged(
            "partitions",
            self.partitions,
            DEFAULT_PARTITIONS,
            PARTITIONS_RANGE,
            "",
        )?;
        let properties = validate_properties(&f, self.properties.unwrap_or_default())?;
        let state_at = self.state.as_ref().map(Spanned::span);
        let state = self
            .state
            .map(|s| s.into_inner().validate(&f, &name, base))
            .transpose()?;

        // Rules between fields.
        if on_failure.is_none() {
            const LOST: &str = "otherwise records that exhaust their retries would be lost";
            if let (Some(n), Some(attempts)) = (&self.max_retry_attempts, max_retry_attempts) {
                return Err(PipelineError::Requires {
                    at: loc.at(n.span()),
                    field: f.field("max_retry_attempts"),
                    value: attempts.to_string(),
                    required: f.field("on_failure"),
                    reason: LOST,
                });
            }
            if let Some((span, written)) = max_record_age_at {
                return Err(PipelineError::Requires {
                    at: loc.at(span),
                    field: f.field("max_record_age"),
                    value: written,
                    required: f.field("on_failure"),
                    reason: "otherwise records that exhaust their retries would be lost \
                             (records older than max_record_age are not retried)",
                });
            }
        }
        let exactly_once = match self.exactly_once {
            Some(flag) if *flag.get_ref() && output_topic.is_none() => {
                return Err(PipelineError::Requires {
                    at: loc.at(flag.span()),
                    field: f.field("exactly_once"),
                    value: "true".to_owned(),
                    required: f.field("output_topic"),
                    reason: "exactly-once processing produces the function's responses to \
                             the output topic and commits the consumed offsets in one \
                             Kafka transaction",
                });
            }
            Some(flag) => flag.into_inner(),
            None => false,
        };
        if let (Some(at), Some(state)) = (&state_at, &state) {
            let conflict = |message: String| PipelineError::Invalid {
                at: loc.at(at.clone()),
                field: f.field("state"),
                message,
            };
            if exactly_once {
                return Err(conflict(
                    "a stateful trigger cannot also be `exactly_once`: its state is \
                     checkpointed outside the Kafka transaction"
                        .into(),
                ));
            }
            if self.bisect_batch_on_error == Some(true)
                || self.report_batch_item_failures == Some(true)
            {
                return Err(conflict(
                    "a stateful trigger folds whole batches in order: \
                     `bisect_batch_on_error` and `report_batch_item_failures` do not apply"
                        .into(),
                ));
            }
            if state.scope == crate::StateScope::Partition && parallelization_factor > 1 {
                return Err(conflict(format!(
                    "state scope \"partition\" needs parallelization_factor = 1 (it is {parallelization_factor}): \
                     one state per partition is folded in offset order; use scope = \"key\" for concurrency"
                )));
            }
        }
        Ok(KafkaTrigger {
            name,
            function,
            topics,
            bootstrap_servers,
            group_id,
            starting_position,
            batch_size,
            batch_window,
            max_batch_bytes,
            filter,
            max_retry_attempts,
            max_record_age,
            bisect_batch_on_error: self.bisect_batch_on_error.unwrap_or(false),
            report_batch_item_failures: self.report_batch_item_failures.unwrap_or(false),
            on_failure,
            output_topic,
            parallelization_factor,
            exactly_once,
            retry_backoff,
            retry_backoff_max,
            partitions,
            properties,
            state,
            enabled: self.enabled.unwrap_or(true),
        })
    }
}

/// Why `name` is not a valid Kafka topic name, if it is not.
fn topic_problem(name: &str) -> Option<String> {
    let count = name.chars().count();
    if name.is_empty() {
        Some("it is empty".to_owned())
    } else if name == "." || name == ".." {
        Some("Kafka reserves it".to_owned())
    } else if count > 249 {
        Some(format!("it is {count} characters long"))
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| format!("it contains {c:?}"))
    }
}

pub(super) fn topic(
    f: &Fields<'_>,
    field: String,
    value: Spanned<String>,
) -> Result<String, PipelineError> {
    match topic_problem(value.get_ref()) {
        None => Ok(value.into_inner()),
        Some(reason) => Err(PipelineError::BadTopic {
            at: f.loc.at(value.span()),
            field,
            value: value.into_inner(),
            reason,
        }),
    }
}

fn validate_topics(
    f: &Fields<'_>,
    topics: Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<String>, PipelineError> {
    let field = f.field("topics");
    if topics.get_ref().is_empty() {
        return Err(PipelineError::NoTopics {
            at: f.loc.at(topics.span()),
            field,
        });
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, value) in topics.into_inner().into_iter().enumerate() {
        let span = value.span();
        let name = topic(f, format!("{field}{}", span::index(i)), value)?;
        if !seen.insert(name.clone()) {
            return Err(PipelineError::DuplicateTopic {
                at: f.loc.at(span),
                field,
                topic: name,
            });
        }
        out.push(name);
    }
    Ok(out)
}

/// `on_failure` or `output_topic`: a valid topic that the trigger does not
/// consume.
fn sink_topic(
    f: &Fields<'_>,
    key: &str,
    value: Option<Spanned<String>>,
    sources: &[String],
) -> Result<Option<String>, PipelineError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let span = value.span();
    let name = topic(f, f.field(key), value)?;
    if sources.contains(&name) {
        return Err(PipelineError::SourceTopicReused {
            at: f.loc.at(span),
            field: f.field(key),
            topic: name,
        });
    }
    Ok(Some(name))
}

pub(super) fn validate_bootstrap_servers(
    f: &Fields<'_>,
    value: Option<Spanned<String>>,
) -> Result<BootstrapServers, PipelineError> {
    let Some(value) = value else {
        return Ok(BootstrapServers::Embedded);
    };
    if value.get_ref() == EMBEDDED_BOOTSTRAP_SERVERS {
        return Ok(BootstrapServers::Embedded);
    }
    match server_list(value.get_ref()) {
        Ok(servers) => Ok(BootstrapServers::Servers(servers)),
        Err(reason) => Err(PipelineError::BadBootstrapServers {
            at: f.loc.at(value.span()),
            field: f.field("bootstrap_servers"),
            value: value.into_inner(),
            reason,
        }),
    }
}

/// Checks `host:port[,host:port...]` (each optionally `protocol://host:port`,
/// IPv6 hosts in brackets) and returns it without whitespace around entries.
fn server_list(list: &str) -> Result<String, String> {
    if list.trim().is_empty() {
        return Err("it is empty".to_owned());
    }
    let mut servers = Vec::new();
    for (i, entry) in list.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            return Err(format!("server {} is empty", i + 1));
        }
        let address = entry.split_once("://").map_or(entry, |(_, rest)| rest);
        let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
            let Some((host, rest)) = bracketed.split_once(']') else {
                return Err(format!("{entry:?} has no closing `]`"));
            };
            (host, rest.strip_prefix(':'))
        } else {
            match address.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (address, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{entry:?} has no host"));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
            || (!address.starts_with('[') && host.contains(':'))
        {
            return Err(format!("{entry:?} has an invalid host"));
        }
        let Some(port) = port else {
            return Err(format!("{entry:?} has no port"));
        };
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!(
                "the port of {entry:?} is {port:?}, not a number from 1 to 65535"
            ));
        }
        servers.push(entry);
    }
    Ok(servers.join(","))
}

fn is_group_id(s: &str) -> bool {
    (1..=255).contains(&s.chars().count()) && !s.chars().any(char::is_control)
}

/// The `name` and `function` of the trigger table `f` (whose header is at
/// `header`): the name checked first, so that a bad explicit name is
/// reported before anything else (the default, `default_name(function)`,
/// needs the function); the function must be declared; the name must be
/// unique among all triggers (`names`, which gets it).
#[allow(clippy::too_many_arguments)]
pub(super) fn trigger_identity(
    f: &Fields<'_>,
    header: Range<usize>,
    name: Option<Spanned<String>>,
    function: Option<Spanned<String>>,
    function_hint: &'static str,
    default_name: impl FnOnce(&str) -> String,
    declared: &[String],
    names: &mut BTreeMap<String, String>,
) -> Result<(String, String), PipelineError> {
    let loc = f.loc;
    if let Some(name) = &name
        && !is_lambda_name(name.get_ref())
    {
        return Err(PipelineError::InvalidValue {
            at: loc.at(name.span()),
            field: f.field("name"),
            value: name.get_ref().clone(),
            expected: NAME_RULE,
        });
    }
    let Some(function) = function else {
        return Err(PipelineError::MissingField {
            at: loc.at(header),
            table: f.table.clone(),
            field: "function",
            hint: function_hint,
        });
    };
    if !declared.contains(function.get_ref()) {
        return Err(PipelineError::UndeclaredFunction {
            at: loc.at(function.span()),
            field: f.field("function"),
            name: function.into_inner(),
            declared: declared.to_vec(),
        });
    }
    let function = function.into_inner();
    let (name, name_at, defaulted) = match name {
        Some(name) => (name.get_ref().clone(), name.span(), false),
        None => (default_name(&function), header, true),
    };
    if let Some(other) = names.get(&name) {
        return Err(PipelineError::DuplicateTriggerName {
            at: loc.at(name_at),
            name,
            defaulted,
            other: other.clone(),
        });
    }
    names.insert(name.clone(), f.table.clone());
    Ok((name, function))
}

/// `retry_backoff` and `retry_backoff_max` of a trigger table, the second
/// at least the first.
pub(super) fn retry_backoffs(
    f: &Fields<'_>,
    header: Range<usize>,
    backoff: Option<Spanned<String>>,
    max: Option<Spanned<String>>,
) -> Result<(Duration, Duration), PipelineError> {
    let retry_backoff_at = backoff.as_ref().map(Spanned::span);
    let retry_backoff = f.duration(
        "retry_backoff",
        backoff,
        DEFAULT_RETRY_BACKOFF,
        RETRY_BACKOFF_RANGE,
    )?;
    let retry_backoff_max_at = max.as_ref().map(Spanned::span);
    let retry_backoff_max = f.duration(
        "retry_backoff_max",
        max,
        DEFAULT_RETRY_BACKOFF_MAX,
        *RETRY_BACKOFF_RANGE.start()..=RETRY_BACKOFF_MAX_LIMIT,
    )?;
    if retry_backoff_max < retry_backoff {
        let max_is_default = retry_backoff_max_at.is_none();
        let at = retry_backoff_max_at.or(retry_backoff_at).unwrap_or(header);
        return Err(PipelineError::BackoffOrder {
            at: f.loc.at(at),
            initial_field: f.field("retry_backoff"),
            initial: retry_backoff,
            max_field: f.field("retry_backoff_max"),
            max: retry_backoff_max,
            max_is_default,
        });
    }
    Ok((retry_backoff, retry_backoff_max))
}

pub(super) fn validate_starting_position(
    f: &Fields<'_>,
    value: Option<Spanned<String>>,
) -> Result<StartingPosition, PipelineError> {
    let Some(value) = value else {
        return Ok(StartingPosition::default());
    };
    // Lambda's own names (`StartingPosition` of an event source mapping)
    // are taken as they are written there, so a mapping's settings can be
    // copied over.
    let position = match value.get_ref().as_str() {
        "earliest" | "TRIM_HORIZON" => Some(StartingPosition::Earliest),
        "latest" | "LATEST" => Some(StartingPosition::Latest),
        other => humantime::parse_rfc3339_weak(other)
            .ok()
            .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
            .and_then(|since| i64::try_from(since.as_millis()).ok())
            .map(StartingPosition::Timestamp),
    };
    position.ok_or_else(|| PipelineError::InvalidValue {
        at: f.loc.at(value.span()),
        field: f.field("starting_position"),
        expected: if value.get_ref() == "AT_TIMESTAMP" {
            "the timestamp itself for Lambda's AT_TIMESTAMP (its \
             StartingPositionTimestamp), in RFC 3339 form, e.g. \"2024-05-01T00:00:00Z\""
        } else {
            "\"earliest\", \"latest\" or a UTC timestamp in RFC 3339 form, \
             e.g. \"2024-05-01T00:00:00Z\" (Lambda's TRIM_HORIZON and LATEST too)"
        },
        value: value.into_inner(),
    })
}

fn validate_filter(f: &Fields<'_>, value: Spanned<toml::Value>) -> Result<Pattern, PipelineError> {
    let span = value.span();
    if !matches!(
        value.get_ref(),
        toml::Value::Table(_) | toml::Value::Array(_)
    ) {
        let written = f.loc.text.get(span.clone()).unwrap_or("").trim();
        return Err(PipelineError::WrongType {
            at: f.loc.at(span),
            field: f.field("filter"),
            expected: FILTER_TYPE.to_owned(),
            found: format!("{} {written}", value.get_ref().type_str()),
        });
    }
    filter::from_toml(value.get_ref())
        .and_then(|pattern| Pattern::compile(&pattern))
        .map_err(|source| PipelineError::BadFilter {
            at: f.loc.at(span),
            field: f.field("filter"),
            source: Box::new(source),
        })
}

pub(super) fn validate_properties(
    f: &Fields<'_>,
    properties: BTreeMap<Spanned<String>, Spanned<PropertyValue>>,
) -> Result<BTreeMap<String, String>, PipelineError> {
    let mut entries: Vec<_> = properties.into_iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let field = f.field("properties");
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        let valid_key = !key.get_ref().is_empty()
            && !key
                .get_ref()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control());
        if !valid_key {
            return Err(PipelineError::InvalidValue {
                at: f.loc.at(key.span()),
                field,
                value: key.into_inner(),
                expected: "a librdkafka property name such as \"security.protocol\"",
            });
        }
        if let Some((_, advice)) = MANAGED_KAFKA_PROPERTIES
            .iter()
            .find(|(managed, _)| managed == key.get_ref())
        {
            return Err(PipelineError::ManagedProperty {
                at: f.loc.at(key.span()),
                field,
                key: key.into_inner(),
                advice,
            });
        }
        if value.get_ref().0.contains('\0') {
            return Err(PipelineError::InvalidValue {
                at: f.loc.at(value.span()),
                field: format!("{field}.{}", span::toml_key(key.get_ref())),
                value: value.into_inner().0,
                expected: "a string without NUL characters",
            });
        }
        if let Err(problem) = librdkafka_accepts(key.get_ref(), &value.get_ref().0) {
            let at = match problem {
                Refused::UnknownProperty => key.span(),
                Refused::InvalidValue(_) => value.span(),
            };
            return Err(PipelineError::KafkaProperty {
                at: f.loc.at(at),
                field,
                key: key.into_inner(),
                value: value.into_inner().0.into(),
                problem: problem.to_string().into(),
            });
        }
        out.insert(key.into_inner(), value.into_inner().0);
    }
    Ok(out)
}

/// Why librdkafka refuses a property.
#[derive(Debug)]
enum Refused {
    UnknownProperty,
    InvalidValue(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::UnknownProperty => f.write_str(
                "no such property (a misspelling? librdkafka's CONFIGURATION.md lists them)",
            ),
            Refused::InvalidValue(desc) => f.write_str(desc),
        }
    }
}

/// Asks librdkafka itself whether it accepts `key = value`, the way a
/// client would set it (no client is created, nothing is contacted), so a
/// misspelt property fails here with its line, not later when a trigger
/// starts.
fn librdkafka_accepts(key: &str, value: &str) -> Result<(), Refused> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaConfRes;
    match rdkafka::ClientConfig::new()
        .set(key, value)
        .create_native_config()
    {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => {
            Err(Refused::UnknownProperty)
        }
        Err(KafkaError::ClientConfig(_, desc, ..)) => Err(Refused::InvalidValue(desc)),
        Err(other) => Err(Refused::InvalidValue(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kafka_field_is_accepted() {
        // Any value fits `filter` at this stage; `state` is a table, which
        // serde sees a datetime as (reported as an unknown field instead).
        for (name, _) in KAFKA_FIELDS
            .iter()
            .filter(|(name, _)| !matches!(*name, "filter" | "state"))
        {
            // A datetime fits no field.
            let text = format!("[[trigger.kafka]]\n{name} = 1979-05-27T07:32:00Z\n");
            let err = toml::from_str::<super::super::RawPipeline>(&text)
                .expect_err("datetimes fit no field");
            assert!(
                err.message().starts_with("invalid type"),
                "{name}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn topic_names() {
        for good in ["orders", "a", "A.b_c-9", &"x".repeat(249)] {
            assert_eq!(topic_problem(good), None, "{good}");
        }
        assert_eq!(topic_problem("").as_deref(), Some("it is empty"));
        assert_eq!(topic_problem(".").as_deref(), Some("Kafka reserves it"));
        assert_eq!(topic_problem("..").as_deref(), Some("Kafka reserves it"));
        assert_eq!(
            topic_problem(&"x".repeat(250)).as_deref(),
            Some("it is 250 characters long")
        );
        assert_eq!(topic_problem("a b").as_deref(), Some("it contains ' '"));
        assert_eq!(topic_problem("é").as_deref(), Some("it contains 'é'"));
    }

    #[test]
    fn server_lists() {
        assert_eq!(
            server_list("localhost:9092").as_deref(),
            Ok("localhost:9092")
        );
        assert_eq!(
            server_list(" k1:9092 , k2:9093,SASL_SSL://k3:9094,[::1]:9095").as_deref(),
            Ok("k1:9092,k2:9093,SASL_SSL://k3:9094,[::1]:9095")
        );
        assert_eq!(server_list("").unwrap_err(), "it is empty");
        assert_eq!(server_list("k1:9092,").unwrap_err(), "server 2 is empty");
        assert_eq!(server_list("k1").unwrap_err(), "\"k1\" has no port");
        assert_eq!(server_list(":9092").unwrap_err(), "\":9092\" has no host");
        assert_eq!(
            server_list("k1:http").unwrap_err(),
            "the port of \"k1:http\" is \"http\", not a number from 1 to 65535"
        );
        assert_eq!(
            server_list("k1:0").unwrap_err(),
            "the port of \"k1:0\" is \"0\", not a number from 1 to 65535"
        );
        assert_eq!(
            server_list("k1:65536").unwrap_err(),
            "the port of \"k1:65536\" is \"65536\", not a number from 1 to 65535"
        );
        assert_eq!(
            server_list("::1:9092").unwrap_err(),
            "\"::1:9092\" has an invalid host"
        );
        assert_eq!(server_list("[::1]").unwrap_err(), "\"[::1]\" has no port");
        assert_eq!(
            server_list("[::1:9092").unwrap_err(),
            "\"[::1:9092\" has no closing `]`"
        );
        assert_eq!(
            server_list("a b:1").unwrap_err(),
            "\"a b:1\" has an invalid host"
        );
    }
}
