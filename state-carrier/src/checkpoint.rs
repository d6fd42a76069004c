//! Checkpoints: the state of every key of one ordered source, with the input
//! position folded into it, in a versioned, checksummed record.
//!
//! On disk and in the changelog topic a checkpoint is:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `SLST` |
//! | 2 | format version, little endian ([`FORMAT_VERSION`]) |
//! | 2 | reserved, zero |
//! | 4 | body length, little endian |
//! | 4 | CRC-32 (IEEE) of the body, little endian |
//! | n | body: the [`Checkpoint`] as JSON |
//!
//! A record with another magic, another version, a length that does not
//! match, or a checksum that does not match is rejected with
//! [`StateError::Corrupt`] and never restored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::StateError;

/// First bytes of every checkpoint.
pub const MAGIC: &[u8; 4] = b"SLST";
/// The format version written, and the only one read.
pub const FORMAT_VERSION: u16 = 1;
const HEADER: usize = 16;

/// The durable unit: every key of one source (a Kafka partition of a
/// consumer group, or one backfill job), saved atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Which source: `GROUP/TOPIC/PARTITION` for Kafka, `backfill/JOB` for
    /// a backfill job.
    pub source: String,
    /// Saves so far (1 for the first save).
    pub seq: u64,
    /// The Kafka cluster whose offsets the checkpoint's positions are
    /// (its cluster id, or `embedded-…` for one run's embedded broker);
    /// empty for backfills or when unknown.
    #[serde(default)]
    pub cluster: String,
    /// State per key; the partition scope uses the key `""`.
    pub keys: BTreeMap<String, KeyState>,
}

impl Checkpoint {
    /// An empty checkpoint of `source`.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            seq: 0,
            cluster: String::new(),
            keys: BTreeMap::new(),
        }
    }

    /// The record written to a file or a changelog topic.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Check and read a record; `origin` names it in errors.
    pub fn decode(bytes: &[u8], origin: &str) -> Result<Self, StateError> {
        let corrupt = |reason: String| StateError::Corrupt {
            origin: origin.to_owned(),
            reason,
        };
        if bytes.len() < HEADER {
            return Err(corrupt(format!(
                "truncated: {} bytes, shorter than the {HEADER}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..4] != MAGIC {
            return Err(corrupt(format!(
                "not a sluice checkpoint (magic {:02x?}, expected {:02x?})",
                &bytes[..4],
                MAGIC
            )));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {version}, this sluice reads version {FORMAT_VERSION}"
            )));
        }
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        let body = &bytes[HEADER..];
        if body.len() != len {
            return Err(corrupt(format!(
                "truncated or padded: the header announces {len} bytes of body, {} follow",
                body.len()
            )));
        }
        let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        let actual = crc32fast::hash(body);
        if crc != actual {
            return Err(corrupt(format!(
                "checksum mismatch (stored {crc:08x}, computed {actual:08x})"
            )));
        }
        serde_json::from_slice(body).map_err(|e| corrupt(format!("unreadable body: {e}")))
    }
}

/// What is carried for one key (or one partition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyState {
    /// The state the last successful call returned (`{}` at the start of a
    /// window).
    pub state: serde_json::Value,
    /// The open window, if any.
    pub window: Option<Window>,
    /// Offset (Kafka) or item index (backfill) of the last item folded into
    /// `state`; `-1` if none. Items at or below it are never folded again.
    pub last_offset: i64,
    /// The window must close (a final invoke) before anything else.
    pub close_pending: Option<CloseReason>,
    /// Windows closed so far.
    pub windows_closed: u64,
    /// The answer of the last final invoke (the last closed window's
    /// result), if any.
    #[serde(default)]
    pub last_result: Option<serde_json::Value>,
}

impl Default for KeyState {
    fn default() -> Self {
        Self {
            state: serde_json::Value::Object(Default::default()),
            window: None,
            last_offset: -1,
            close_pending: None,
            windows_closed: 0,
            last_result: None,
        }
    }
}

/// An open window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start, ms since the Unix epoch: the interval's start for time
    /// windows, the first item's timestamp otherwise.
    pub start_ms: i64,
    /// End (exclusive), ms since the Unix epoch: the interval's end for time
    /// windows, the last item's timestamp otherwise.
    pub end_ms: i64,
    /// Items folded into the window so far.
    pub items: u64,
}

/// Why a window closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The window's time or count is over.
    Complete,
    /// The state grew over `max_bytes` (`isWindowTerminatedEarly`).
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut cp = Checkpoint::new("g/t/0");
        cp.seq = 7;
        cp.keys.insert(
            "alice".into(),
            KeyState {
                state: serde_json::json!({"sum": 12}),
                window: Some(Window {
                    start_ms: 0,
                    end_ms: 1000,
                    items: 3,
                }),
                last_offset: 41,
                close_pending: None,
                windows_closed: 2,
                last_result: None,
            },
        );
        cp
    }

    #[test]
    fn round_trip() {
        let cp = sample();
        assert_eq!(Checkpoint::decode(&cp.encode(), "x").unwrap(), cp);
    }

    #[test]
    fn rejects_corruption_truncation_and_other_versions() {
        let good = sample().encode();
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x20;
        let err = Checkpoint::decode(&flipped, "f").unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");

        let err = Checkpoint::decode(&good[..good.len() - 1], "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        let err = Checkpoint::decode(&good[..10], "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("header"), "{err}");

        let mut v2 = good.clone();
        v2[4] = 2;
        let err = Checkpoint::decode(&v2, "f").unwrap_err().to_string();
        assert!(err.contains("format version 2"), "{err}");

        let mut other = good;
        other[0] = b'X';
        let err = Checkpoint::decode(&other, "f").unwrap_err().to_string();
        assert!(err.contains("not a sluice checkpoint"), "{err}");
    }
}
