//! Errors of the pollers.

use thiserror::Error;

/// Why a trigger could not run.
#[derive(Debug, Error)]
pub enum IngestError {
    /// The Kafka client refused a setting or an operation (external: the
    /// cluster or the client library).
    #[error("trigger {trigger}: {what}: {source}")]
    Kafka {
        /// Trigger name.
        trigger: String,
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// The embedded broker could not be started or configured.
    #[error("embedded Kafka broker: {what}: {source}")]
    Embedded {
        /// What was being done.
        what: String,
        /// The client's error (or the system's, starting its thread).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `--produce` file could not be loaded.
    #[error("{file}{}: {message}", if *line > 0 { format!(":{line}") } else { String::new() })]
    Load {
        /// The file.
        file: String,
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The state store of a stateful trigger could not be opened.
    #[error("trigger {trigger}: state: {source}")]
    State {
        /// Trigger name.
        trigger: String,
        /// Why.
        #[source]
        source: sluice_state_carrier::StateError,
    },
    /// The progress store of an object-store trigger could not be read or
    /// written (external: the disk).
    #[error("trigger {trigger}: progress store: {message}")]
    Progress {
        /// Trigger name.
        trigger: String,
        /// What failed.
        message: String,
    },
    /// The dead-letter file of an object-store trigger could not be
    /// written (external: the disk); the object stays unrecorded.
    #[error("trigger {trigger}: dead-letter file {}: {source}", file.display())]
    DeadLetter {
        /// Trigger name.
        trigger: String,
        /// The file.
        file: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A pipeline-level problem found at run time (user error).
    #[error("trigger {trigger}: {message}")]
    Config {
        /// Trigger name.
        trigger: String,
        /// What is wrong.
        message: String,
    },
}

impl IngestError {
    /// Whether retrying (e.g. after the cluster comes back) can help.
    pub fn retryable(&self) -> bool {
        match self {
            IngestError::Kafka { .. }
            | IngestError::Progress { .. }
            | IngestError::DeadLetter { .. } => true,
            IngestError::State { source, .. } => source.retryable(),
            _ => false,
        }
    }
}
