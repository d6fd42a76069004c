//! One Kafka record as sluice carries it: owned, detached from the client.

use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;

/// A topic name, interned for the life of the process: copying one is
/// copying a pointer, with no reference count for the poll thread and the
/// lanes to contend on (every record carries one). Names are few (the
/// topics a trigger reads), so the interned set stays small.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(&'static str);

impl Topic {
    /// The interned name `name`.
    pub fn new(name: &str) -> Self {
        static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut names = NAMES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match names.get(name) {
            Some(&interned) => Topic(interned),
            None => {
                let interned: &'static str = Box::leak(name.to_owned().into_boxed_str());
                names.insert(interned);
                Topic(interned)
            }
        }
    }
}

impl From<&str> for Topic {
    fn from(name: &str) -> Self {
        Topic::new(name)
    }
}

impl Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// How the record's timestamp was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    /// Set by the producer.
    CreateTime,
    /// Set by the broker.
    LogAppendTime,
    /// No timestamp.
    NotAvailable,
}

impl TimestampType {
    /// The name Lambda's Kafka event uses (`CREATE_TIME`, `LOG_APPEND_TIME`).
    pub fn as_lambda_str(self) -> &'static str {
        match self {
            TimestampType::CreateTime => "CREATE_TIME",
            TimestampType::LogAppendTime => "LOG_APPEND_TIME",
            TimestampType::NotAvailable => "NO_TIMESTAMP_TYPE",
        }
    }
}

/// An owned Kafka record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic (interned: no allocation or reference count per record).
    pub topic: Topic,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Timestamp, milliseconds since the Unix epoch (0 if none).
    pub timestamp_ms: i64,
    /// Timestamp kind.
    pub timestamp_type: TimestampType,
    /// Key bytes (a slice of the poll burst's shared buffer: no allocation
    /// per record).
    pub key: Option<Bytes>,
    /// Value bytes (as the key).
    pub value: Option<Bytes>,
    /// Headers in order (a key may repeat).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    /// Bytes this record adds to a batch (key, value and headers).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}
