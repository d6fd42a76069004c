//! Errors of the state carrier.

use std::path::PathBuf;

use thiserror::Error;

/// Who is at fault for a [`StateError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The function (user code) answered against the contract.
    User,
    /// The disk or the Kafka cluster.
    External,
    /// A checkpoint that cannot be trusted (corrupt, or from another
    /// version of sluice).
    Data,
}

/// Why carrying or storing state failed.
#[derive(Debug, Error)]
pub enum StateError {
    /// The function's response is not a JSON object with a `state` field
    /// (Lambda's tumbling-window contract makes that a failed call).
    #[error(
        "the response carries no `state` (a stateful function must answer {{\"state\": ...}}): {reason}"
    )]
    MissingState {
        /// What the response was instead.
        reason: String,
    },
    /// A checkpoint file or changelog record failed its checks; it is never
    /// restored.
    #[error("checkpoint {origin}: {reason}")]
    Corrupt {
        /// File path or `topic/partition@offset`.
        origin: String,
        /// What check failed.
        reason: String,
    },
    /// Reading or writing a checkpoint file failed.
    #[error("checkpoint file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The changelog topic could not be read or written.
    #[error("state changelog topic {topic}: {what}: {source}")]
    Kafka {
        /// The changelog topic.
        topic: String,
        /// What was being done.
        what: &'static str,
        /// The client's error.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
}

impl StateError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Self::MissingState { .. } => Fault::User,
            Self::Io { .. } | Self::Kafka { .. } => Fault::External,
            Self::Corrupt { .. } => Fault::Data,
        }
    }

    /// Whether trying again can help (a function may answer differently; a
    /// disk or broker may come back; a corrupt checkpoint stays corrupt).
    pub fn retryable(&self) -> bool {
        !matches!(self, Self::Corrupt { .. })
    }

    /// The `errorType` recorded with failed records.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::MissingState { .. } => "Sluice.MissingState",
            Self::Corrupt { .. } => "Sluice.CorruptCheckpoint",
            Self::Io { .. } | Self::Kafka { .. } => "Sluice.CheckpointFailed",
        }
    }
}
