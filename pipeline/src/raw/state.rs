//! `state = { ... }` tables (Kafka triggers and backfill jobs) as serde sees
//! them, and their validation.

use std::path::Path;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Fields;
use crate::error::PipelineError;
use crate::{
    DEFAULT_STATE_DIR, DEFAULT_STATE_MAX_BYTES, STATE_MAX_BYTES_RANGE, STATE_WINDOW_COUNT_RANGE,
    STATE_WINDOW_RANGE, StateConfig, StateScope, StateStore, StateWindow,
};

/// One `state` table; every field optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    /// Default `"partition"`.
    scope: Option<Spanned<String>>,
    /// Default none: a duration string or a count.
    window: Option<Spanned<toml::Value>>,
    /// Default [`DEFAULT_STATE_MAX_BYTES`].
    max_bytes: Option<Spanned<i64>>,
    /// Default `"local"`.
    store: Option<Spanned<String>>,
    /// Default `.sluice-state/NAME` next to the pipeline file.
    dir: Option<Spanned<String>>,
    /// Default `sluice-state-NAME`.
    changelog_topic: Option<Spanned<String>>,
}

/// What the `state` table's value must be, for messages.
pub(super) const STATE_TYPE: &str =
    "a table, e.g. { scope = \"key\", window = \"30s\", max_bytes = 1048576 }";

/// Keys of [`RawState`], for messages.
pub(super) const STATE_FIELDS: &[&str] = &[
    "scope",
    "window",
    "max_bytes",
    "store",
    "dir",
    "changelog_topic",
];

impl RawState {
    /// Validate the `state` table of the trigger or job whose fields `f`
    /// names; `name` (the trigger's or job's) gives the default folder and
    /// changelog topic.
    pub(super) fn validate(
        self,
        f: &Fields<'_>,
        name: &str,
        base: &Path,
    ) -> Result<StateConfig, PipelineError> {
        let field = |k: &str| format!("{}.state.{k}", f.table);
        let scope = match &self.scope {
            None => StateScope::Partition,
            Some(s) => match s.get_ref().as_str() {
                "partition" => StateScope::Partition,
                "key" => StateScope::Key,
                _ => {
                    return Err(PipelineError::InvalidValue {
                        at: f.loc.at(s.span()),
                        field: field("scope"),
                        value: s.get_ref().clone(),
                        expected: "\"partition\" or \"key\"",
                    });
                }
            },
        };
        let window = match self.window {
            None => None,
            Some(w) => {
                let span = w.span();
                match w.into_inner() {
                    toml::Value::String(text) => {
                        let d = humantime::parse_duration(&text).map_err(|e| {
                            PipelineError::BadDuration {
                                at: f.loc.at(span.clone()),
                                field: field("window"),
                                value: text.clone(),
                                reason: super::duration_reason(&text, &e),
                            }
                        })?;
                        if !STATE_WINDOW_RANGE.contains(&d) {
                            return Err(PipelineError::DurationOutOfRange {
                                at: f.loc.at(span),
                                field: field("window"),
                                value: text,
                                min: *STATE_WINDOW_RANGE.start(),
                                max: *STATE_WINDOW_RANGE.end(),
                            });
                        }
                        Some(StateWindow::Time(d))
                    }
                    toml::Value::Integer(n) => match u64::try_from(n) {
                        Ok(c) if STATE_WINDOW_COUNT_RANGE.contains(&c) => {
                            Some(StateWindow::Count(c))
                        }
                        _ => {
                            return Err(PipelineError::OutOfRange {
                                at: f.loc.at(span),
                                field: field("window"),
                                value: n,
                                min: *STATE_WINDOW_COUNT_RANGE.start() as u32,
                                max: *STATE_WINDOW_COUNT_RANGE.end() as u32,
                                unit: " (items per window)",
                            });
                        }
                    },
                    other => {
                        return Err(PipelineError::InvalidValue {
                            at: f.loc.at(span),
                            field: field("window"),
                            value: other.to_string(),
                            expected: "a duration string such as \"30s\" (event-time window) \
                                       or an integer (items per window)",
                        });
                    }
                }
            }
        };
        let max_bytes = match &self.max_bytes {
            None => DEFAULT_STATE_MAX_BYTES,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(b) if STATE_MAX_BYTES_RANGE.contains(&b) => b,
                _ => {
                    return Err(PipelineError::OutOfRange {
                        at: f.loc.at(n.span()),
                        field: field("max_bytes"),
                        value: *n.get_ref(),
                        min: *STATE_MAX_BYTES_RANGE.start() as u32,
                        max: *STATE_MAX_BYTES_RANGE.end() as u32,
                        unit: " (bytes)",
                    });
                }
            },
        };
        let kind = match &self.store {
            None => "local",
            Some(s) => match s.get_ref().as_str() {
                k @ ("local" | "kafka") => k,
                _ => {
                    return Err(PipelineError::InvalidValue {
                        at: f.loc.at(s.span()),
                        field: field("store"),
                        value: s.get_ref().clone(),
                        expected: "\"local\" (checkpoint files) or \"kafka\" (a compacted \
                                   changelog topic, for scale-out)",
                    });
                }
            },
        };
        let store = if kind == "local" {
            if let Some(t) = &self.changelog_topic {
                return Err(PipelineError::Requires {
                    at: f.loc.at(t.span()),
                    field: field("changelog_topic"),
                    value: format!("{:?}", t.get_ref()),
                    required: format!("{} = \"kafka\"", field("store")),
                    reason: "local checkpoints do not use a changelog topic",
                });
            }
            let dir = match self.dir {
                Some(d) if d.get_ref().is_empty() => {
                    return Err(PipelineError::InvalidValue {
                        at: f.loc.at(d.span()),
                        field: field("dir"),
                        value: String::new(),
                        expected: "a folder path",
                    });
                }
                Some(d) => base.join(d.into_inner()),
                None => base.join(DEFAULT_STATE_DIR).join(name),
            };
            StateStore::Local(dir)
        } else {
            if let Some(d) = &self.dir {
                return Err(PipelineError::Requires {
                    at: f.loc.at(d.span()),
                    field: field("dir"),
                    value: format!("{:?}", d.get_ref()),
                    required: format!("{} = \"local\"", field("store")),
                    reason: "the kafka store keeps checkpoints in the changelog topic",
                });
            }
            let topic = match self.changelog_topic {
                Some(t) => super::kafka::topic(f, field("changelog_topic"), t)?,
                None => format!("sluice-state-{name}"),
            };
            StateStore::Changelog(topic)
        };
        Ok(StateConfig {
            scope,
            window,
            max_bytes,
            store,
        })
    }
}
