//! The embedded broker: rdkafka's `MockCluster`, which serves the real Kafka
//! protocol on a local port from inside this process. Its data lives in
//! memory only and is gone when the process exits.
//!
//! Retention: librdkafka's mock broker keeps at most the newest
//! [`RETAINED_BYTES_PER_PARTITION`] bytes (or 100,000 produce requests) of
//! each partition and silently drops older records, whether or not anyone
//! read them. [`EmbeddedBroker::dropped`] tells whether that happened, so
//! that loading a file (`sluice run --produce`) fails loudly instead of
//! losing records.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::IngestError;

/// What librdkafka's mock broker keeps of each partition (a fixed limit of
/// its `rdkafka_mock.c`): older records are dropped.
pub const RETAINED_BYTES_PER_PARTITION: u64 = 5 * 1024 * 1024;

/// An in-process Kafka-protocol broker.
///
/// The `MockCluster` handle is not `Send`, so a thread of its own
/// (`embedded-kafka`) owns it and carries out what is asked of it; this
/// handle can then live in any task, and the command futures that hold it
/// run on tokio's worker threads.
pub struct EmbeddedBroker {
    servers: String,
    ops: mpsc::Sender<Op>,
    owner: Option<JoinHandle<()>>,
}

/// What the owner thread does with the cluster.
enum Op {
    CreateTopic {
        topic: String,
        partitions: i32,
        done: mpsc::Sender<Result<(), KafkaError>>,
    },
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("servers", &self.servers)
            .finish()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Closing the channel ends the owner thread, which drops the
        // cluster (stopping its broker threads) before this returns.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.ops, closed));
        if let Some(owner) = self.owner.take() {
            let _ = owner.join();
        }
    }
}

impl EmbeddedBroker {
    /// Start a broker with `brokers` nodes on local ephemeral ports.
    pub fn start(brokers: i32) -> Result<Self, IngestError> {
        let failed = |source: KafkaError| IngestError::Embedded {
            what: "starting the mock cluster".into(),
            source: Box::new(source),
        };
        let (started_tx, started) = mpsc::channel();
        let (ops, rx) = mpsc::channel::<Op>();
        let owner = std::thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::<DefaultProducerContext>::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(cluster.bootstrap_servers()));
                for op in rx {
                    match op {
                        Op::CreateTopic {
                            topic,
                            partitions,
                            done,
                        } => {
                            let _ = done.send(cluster.create_topic(&topic, partitions, 1));
                        }
                    }
                }
            })
            .map_err(|e| IngestError::Embedded {
                what: "starting the mock cluster's thread".into(),
                source: Box::new(e),
            })?;
        let servers = match started.recv() {
            Ok(Ok(servers)) => servers,
            Ok(Err(e)) => {
                let _ = owner.join();
                return Err(failed(e));
            }
            Err(_) => {
                let _ = owner.join();
                return Err(failed(KafkaError::Canceled));
            }
        };
        Ok(Self {
            servers,
            ops,
            owner: Some(owner),
        })
    }

    /// Its `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.servers
    }

    /// Partitions of `topic` whose oldest records the broker has already
    /// dropped to stay within its retention, with the number dropped (the
    /// partition's low watermark). Empty when every record produced is still
    /// there.
    pub fn dropped(&self, topic: &str) -> Result<Vec<(i32, i64)>, IngestError> {
        let err = |what: String| {
            move |source: rdkafka::error::KafkaError| IngestError::Embedded {
                what,
                source: Box::new(source),
            }
        };
        let timeout = Duration::from_secs(10);
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .create()
            .map_err(err("creating a client to read watermarks".into()))?;
        let meta = client
            .fetch_metadata(Some(topic), timeout)
            .map_err(err(format!("reading the metadata of {topic}")))?;
        let mut dropped = Vec::new();
        for t in meta.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let (low, _high) = client
                    .fetch_watermarks(topic, p.id(), timeout)
                    .map_err(err(format!("reading the watermarks of {topic}-{}", p.id())))?;
                if low > 0 {
                    dropped.push((p.id(), low));
                }
            }
        }
        Ok(dropped)
    }

    /// Create a topic (replication 1).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), IngestError> {
        let failed = |source: KafkaError| IngestError::Embedded {
            what: format!("creating topic {topic} with {partitions} partitions"),
            source: Box::new(source),
        };
        let (done, result) = mpsc::channel();
        self.ops
            .send(Op::CreateTopic {
                topic: topic.to_owned(),
                partitions,
                done,
            })
            .map_err(|_| failed(KafkaError::Canceled))?;
        result
            .recv()
            .unwrap_or(Err(KafkaError::Canceled))
            .map_err(failed)
    }
}
