//! One Kafka record as sluice carries it: owned, detached from the client.

use std::sync::Arc;

use bytes::Bytes;

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
    /// Topic (shared by the records of a partition: no allocation per
    /// record).
    pub topic: Arc<str>,
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
