//! `[[trigger.object_store]]` tables as serde sees them, and their
//! validation.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::job::{is_url, resolve};
use super::kafka::{retry_backoffs, trigger_identity, validate_starting_position};
use super::{DURATION, Fields, INTEGER, STRING};
use crate::error::PipelineError;
use crate::span::Locator;
use crate::{
    DEFAULT_MAX_OBJECT_BYTES, DEFAULT_OBJECT_RETRY_ATTEMPTS, DEFAULT_POLL_INTERVAL,
    DEFAULT_STATE_DIR, MAX_OBJECT_BYTES_RANGE, MAX_RETRY_ATTEMPTS_RANGE, OBJECT_URL_SCHEMES,
    ObjectEvents, ObjectTrigger, POLL_INTERVAL_RANGE,
};

/// One `[[trigger.object_store]]` table. Every field is optional here;
/// `None` means "use the default" (see the constants in the crate root),
/// except for `function` and `url`, which are required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawObjects {
    /// Default `FUNCTION-objects-N`.
    name: Option<Spanned<String>>,
    /// Required.
    function: Option<Spanned<String>>,
    /// Required: the watched prefix.
    url: Option<Spanned<String>>,
    /// Default none (every object).
    suffix: Option<Spanned<String>>,
    /// Default `["created"]`.
    events: Option<Spanned<Vec<Spanned<String>>>>,
    /// Default `"latest"`.
    starting_position: Option<Spanned<String>>,
    /// Default [`DEFAULT_POLL_INTERVAL`].
    poll_interval: Option<Spanned<String>>,
    /// Default [`DEFAULT_MAX_OBJECT_BYTES`].
    max_object_bytes: Option<Spanned<i64>>,
    /// Default [`DEFAULT_OBJECT_RETRY_ATTEMPTS`].
    max_retry_attempts: Option<Spanned<i64>>,
    /// Default [`DEFAULT_RETRY_BACKOFF`].
    retry_backoff: Option<Spanned<String>>,
    /// Default [`DEFAULT_RETRY_BACKOFF_MAX`].
    retry_backoff_max: Option<Spanned<String>>,
    /// Default `.sluice-state/NAME.objects.redb` next to the pipeline file.
    progress: Option<Spanned<String>>,
    /// Default `.sluice-state/NAME.dead-letter.jsonl` next to the pipeline
    /// file.
    dead_letter: Option<Spanned<String>>,
    /// Default none: responses are not kept.
    results: Option<Spanned<String>>,
    /// Default `true`.
    enabled: Option<bool>,
}

/// Keys of [`RawObjects`] and the TOML type each needs, for messages.
pub(super) const OBJECT_FIELDS: &[(&str, &str)] = &[
    ("name", STRING),
    ("function", STRING),
    (
        "url",
        "a string: a folder, or a URL such as \"s3://bucket/incoming/\"",
    ),
    ("suffix", STRING),
    (
        "events",
        "an array of event types: [\"created\"], [\"removed\"] or both",
    ),
    (
        "starting_position",
        "a string: \"earliest\", \"latest\" or a quoted timestamp such as \
         \"2024-05-01T00:00:00Z\"",
    ),
    ("poll_interval", DURATION),
    ("max_object_bytes", INTEGER),
    ("max_retry_attempts", INTEGER),
    ("retry_backoff", DURATION),
    ("retry_backoff_max", DURATION),
    ("progress", STRING),
    ("dead_letter", STRING),
    ("results", STRING),
    ("enabled", "a boolean (true or false)"),
];

const URL_RULE: &str = "a folder, or a URL: s3://BUCKET/PREFIX, gs://, az://, \
                        memory:// or file:///FOLDER";

impl RawObjects {
    /// Validates the table at position `index` of `[[trigger.object_store]]`,
    /// whose header is at `header`; as [`super::kafka::RawKafka::validate`].
    pub(super) fn validate(
        self,
        loc: &Locator<'_>,
        index: usize,
        header: Range<usize>,
        declared: &[String],
        names: &mut BTreeMap<String, String>,
    ) -> Result<ObjectTrigger, PipelineError> {
        let f = Fields {
            loc,
            table: format!("trigger.object_store{}", crate::span::index(index)),
        };
        let (name, function) = trigger_identity(
            &f,
            header.clone(),
            self.name,
            self.function,
            "the declared function invoked with each new object, e.g. function = \"echo\"",
            |function| format!("{function}-objects-{}", index + 1),
            declared,
            names,
        )?;

        let base = loc.file.parent().unwrap_or(Path::new(""));
        let Some(url) = self.url else {
            return Err(PipelineError::MissingField {
                at: loc.at(header),
                table: f.table.clone(),
                field: "url",
                hint: "the folder or object-store prefix to watch, e.g. url = \"s3://bucket/incoming/\"",
            });
        };
        let url = validate_url(&f, "url", URL_RULE, url, base)?;
        let suffix = match self.suffix {
            Some(s) if s.get_ref().is_empty() => {
                return Err(PipelineError::InvalidValue {
                    at: loc.at(s.span()),
                    field: f.field("suffix"),
                    value: s.into_inner(),
                    expected: "a non-empty name ending, e.g. \".csv\" (leave it out for every object)",
                });
            }
            s => s.map(Spanned::into_inner),
        };
        let events = validate_events(&f, self.events)?;
        let starting_position = validate_starting_position(&f, self.starting_position)?;
        let poll_interval = f.duration(
            "poll_interval",
            self.poll_interval,
            DEFAULT_POLL_INTERVAL,
            POLL_INTERVAL_RANGE,
        )?;
        let max_object_bytes = f.ranged(
            "max_object_bytes",
            self.max_object_bytes,
            DEFAULT_MAX_OBJECT_BYTES,
            MAX_OBJECT_BYTES_RANGE,
            " (bytes)",
        )?;
        let max_retry_attempts = f.integer(
            "max_retry_attempts",
            self.max_retry_attempts,
            DEFAULT_OBJECT_RETRY_ATTEMPTS,
            MAX_RETRY_ATTEMPTS_RANGE,
            "",
        )?;
        let (retry_backoff, retry_backoff_max) = retry_backoffs(
            &f,
            header.clone(),
            self.retry_backoff,
            self.retry_backoff_max,
        )?;
        let state_dir = base.join(DEFAULT_STATE_DIR);
        let path = |v: Option<Spanned<String>>, default: String| {
            v.map_or_else(|| state_dir.join(default), |v| base.join(v.into_inner()))
        };
        let progress = path(self.progress, format!("{name}.objects.redb"));
        let dead_letter = path(self.dead_letter, format!("{name}.dead-letter.jsonl"));
        let results = match self.results {
            Some(r) if r.get_ref().is_empty() => {
                return Err(PipelineError::InvalidValue {
                    at: f.loc.at(r.span()),
                    field: f.field("results"),
                    value: String::new(),
                    expected: "a path for the JSON-lines file of responses, e.g. \"out/landing.jsonl\"",
                });
            }
            Some(r) => Some(base.join(r.into_inner())),
            None => None,
        };
        Ok(ObjectTrigger {
            name,
            function,
            url,
            suffix,
            events,
            starting_position,
            poll_interval,
            max_object_bytes,
            max_retry_attempts,
            retry_backoff,
            retry_backoff_max,
            progress,
            dead_letter,
            results,
            enabled: self.enabled.unwrap_or(true),
        })
    }
}

const EVENTS_RULE: &str = "\"created\" (s3:ObjectCreated:*: every object written) or \
                           \"removed\" (s3:ObjectRemoved:*: every object deleted)";

/// `events`: which S3 event types invoke the function.
fn validate_events(
    f: &Fields<'_>,
    events: Option<Spanned<Vec<Spanned<String>>>>,
) -> Result<ObjectEvents, PipelineError> {
    let Some(events) = events else {
        return Ok(ObjectEvents::default());
    };
    if events.get_ref().is_empty() {
        return Err(PipelineError::InvalidValue {
            at: f.loc.at(events.span()),
            field: f.field("events"),
            value: "[]".into(),
            expected: "at least one event type: [\"created\"], [\"removed\"] or both",
        });
    }
    let mut out = ObjectEvents {
        created: false,
        removed: false,
    };
    for (i, value) in events.into_inner().into_iter().enumerate() {
        let span = value.span();
        match value.get_ref().as_str() {
            "created" | "s3:ObjectCreated:*" => out.created = true,
            "removed" | "s3:ObjectRemoved:*" => out.removed = true,
            _ => {
                return Err(PipelineError::InvalidValue {
                    at: f.loc.at(span),
                    field: format!("{}{}", f.field("events"), crate::span::index(i)),
                    value: value.into_inner(),
                    expected: EVENTS_RULE,
                });
            }
        }
    }
    Ok(out)
}

/// A URL of a known scheme, or a local folder (relative to `base`; made
/// absolute, and `file://` URLs turned into paths), as field `key`, which
/// must be `rule`.
pub(super) fn validate_url(
    f: &Fields<'_>,
    key: &str,
    rule: &'static str,
    url: Spanned<String>,
    base: &Path,
) -> Result<String, PipelineError> {
    let span = url.span();
    let written = url.into_inner();
    let bad = |written: String| PipelineError::InvalidValue {
        at: f.loc.at(span.clone()),
        field: f.field(key),
        value: written,
        expected: rule,
    };
    if written.trim().is_empty() {
        return Err(bad(written));
    }
    if written.contains(['*', '?', '[']) {
        return Err(PipelineError::InvalidValue {
            at: f.loc.at(span.clone()),
            field: f.field(key),
            value: written,
            expected: if key == "url" {
                "a folder or prefix without glob characters: watch the folder, and \
                 choose the objects by their ending with `suffix` (e.g. suffix = \".csv\")"
            } else {
                "a path or URL without glob characters (*, ?, [): it names one place"
            },
        });
    }
    if !is_url(&written) {
        let local = resolve(base, &written);
        let local = if Path::new(&local).is_absolute() {
            local
        } else {
            std::env::current_dir()
                .map(|d| d.join(&local).display().to_string())
                .unwrap_or(local)
        };
        return Ok(local);
    }
    let (scheme, rest) = written.split_once("://").unwrap_or_default();
    if scheme == "file" {
        return match rest.strip_prefix("localhost").unwrap_or(rest) {
            p if p.starts_with('/') => Ok(p.to_owned()),
            _ => Err(bad(written)),
        };
    }
    let bucket = rest.split('/').next().unwrap_or("");
    if !OBJECT_URL_SCHEMES.contains(&scheme) || (bucket.is_empty() && scheme != "memory") {
        return Err(bad(written));
    }
    Ok(written)
}
