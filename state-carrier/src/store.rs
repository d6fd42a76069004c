//! Where checkpoints live: local files (the default) or a compacted Kafka
//! changelog topic (for scale-out).
//!
//! Both stores are blocking (call them from `spawn_blocking`) and durable
//! when [`Store::save`] returns: the file is written to a temporary name,
//! synced and renamed over the old one (and the folder synced); the
//! changelog record is acknowledged by the cluster (`acks=all`). Readers
//! never see a half-written checkpoint, and every checkpoint is checked
//! ([`Checkpoint::decode`]) before it is used.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

use crate::StateError;
use crate::checkpoint::Checkpoint;

/// A place for checkpoints, keyed by [`Checkpoint::source`].
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The latest checkpoint of `source`, if any.
    fn load(&self, source: &str) -> Result<Option<Checkpoint>, StateError>;
    /// Replace the checkpoint of `cp.source`; durable on return.
    fn save(&self, cp: &Checkpoint) -> Result<(), StateError>;
    /// Every checkpoint (for `sluice state show`).
    fn list(&self) -> Result<Vec<Checkpoint>, StateError>;
}

/// Checkpoint files in one folder: `<folder>/<source, escaped>.state`.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The file of `source`.
    pub fn path(&self, source: &str) -> PathBuf {
        self.dir.join(format!("{}.state", escape(source)))
    }
}

/// A file name for any source string: `[A-Za-z0-9._-]` kept, everything
/// else as `%XX`.
fn escape(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for b in source.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Store for FileStore {
    fn load(&self, source: &str) -> Result<Option<Checkpoint>, StateError> {
        let path = self.path(source);
        match std::fs::read(&path) {
            Ok(bytes) => Checkpoint::decode(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    fn save(&self, cp: &Checkpoint) -> Result<(), StateError> {
        let path = self.path(&cp.source);
        let tmp = path.with_extension("state.tmp");
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StateError::Io { path: p, source }
        };
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&cp.encode()).map_err(io(&tmp))?;
        f.sync_data().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<Checkpoint>, StateError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "state"))
            .collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
            out.push(Checkpoint::decode(&bytes, &path.display().to_string())?);
        }
        Ok(out)
    }
}

/// Whether the cluster has `topic` (without creating it).
fn topic_exists(cfg: &ClientConfig, topic: &str) -> Result<bool, StateError> {
    let kerr = |source| StateError::Kafka {
        topic: topic.to_owned(),
        what: "reading the cluster's metadata",
        source: Box::new(source),
    };
    let mut cfg = cfg.clone();
    cfg.set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = cfg.create().map_err(kerr)?;
    let meta = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(kerr)?;
    Ok(meta
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
}

/// Create `topic`: compacted, one partition, the cluster's default
/// replication (or 1 where the cluster wants an explicit factor). A cluster
/// that does not answer CreateTopics (rdkafka's mock cluster) gets a
/// warning: the topic is then created on first write, uncompacted.
async fn create_topic(cfg: &ClientConfig, topic: &str) -> Result<(), StateError> {
    let kerr = |what: &'static str| {
        move |source: KafkaError| StateError::Kafka {
            topic: topic.to_owned(),
            what,
            source: Box::new(source),
        }
    };
    let admin: AdminClient<DefaultClientContext> =
        cfg.create().map_err(kerr("creating the admin client"))?;
    let options = AdminOptions::new()
        .request_timeout(Some(CREATE_TIMEOUT))
        .operation_timeout(Some(CREATE_TIMEOUT));
    for replication in [-1, 1] {
        let new = NewTopic::new(topic, 1, TopicReplication::Fixed(replication))
            .set("cleanup.policy", "compact");
        let results = match admin.create_topics([&new], &options).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    topic,
                    "creating the state changelog topic failed ({e}); it will be created on first write, without compaction"
                );
                return Ok(());
            }
        };
        let mut retry = false;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, RDKafkaErrorCode::InvalidReplicationFactor)) if replication < 0 => {
                    retry = true;
                }
                Err((
                    _,
                    RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut,
                )) => {
                    tracing::warn!(
                        topic,
                        "the cluster did not create the state changelog topic in time; it will be created on first write, without compaction"
                    );
                    return Ok(());
                }
                Err((_, code)) => {
                    return Err(kerr("creating the topic")(KafkaError::AdminOp(code)));
                }
            }
        }
        if !retry {
            break;
        }
    }
    Ok(())
}

/// Delivery reports of the changelog producer.
struct Deliveries {
    last_error: Mutex<Option<KafkaError>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        }
    }
}

/// Checkpoints as records of a compacted Kafka topic, keyed by source: the
/// latest record of a key is its checkpoint. A node that is assigned a
/// partition reads the topic to its end before it processes anything.
pub struct ChangelogStore {
    topic: String,
    servers: String,
    properties: Vec<(String, String)>,
    producer: Mutex<ThreadedProducer<Deliveries>>,
}

impl std::fmt::Debug for ChangelogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogStore")
            .field("topic", &self.topic)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
const CREATE_TIMEOUT: Duration = Duration::from_secs(5);

impl ChangelogStore {
    /// Open the changelog `topic` on `servers` (with extra client
    /// `properties`), creating it compacted with one partition if missing.
    pub async fn open(
        servers: &str,
        topic: &str,
        properties: &[(String, String)],
    ) -> Result<Self, StateError> {
        let kerr = |what: &'static str| {
            let topic = topic.to_owned();
            move |source: rdkafka::error::KafkaError| StateError::Kafka {
                topic: topic.clone(),
                what,
                source: Box::new(source),
            }
        };
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", servers);
        for (k, v) in properties {
            cfg.set(k, v);
        }
        if !topic_exists(&cfg, topic)? {
            create_topic(&cfg, topic).await?;
        }
        let mut pcfg = cfg.clone();
        pcfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "30000");
        let producer = pcfg
            .create_with_context(Deliveries {
                last_error: Mutex::new(None),
            })
            .map_err(kerr("creating the producer"))?;
        Ok(Self {
            topic: topic.to_owned(),
            servers: servers.to_owned(),
            properties: properties.to_vec(),
            producer: Mutex::new(producer),
        })
    }

    fn kerr(&self, what: &'static str) -> impl Fn(rdkafka::error::KafkaError) -> StateError + '_ {
        move |source| StateError::Kafka {
            topic: self.topic.clone(),
            what,
            source: Box::new(source),
        }
    }

    /// Read the whole topic: the latest checkpoint of every source.
    fn read_all(&self) -> Result<BTreeMap<String, Checkpoint>, StateError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.servers)
            .set("group.id", "sluice-state-restore")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed");
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer = cfg.create().map_err(self.kerr("creating the reader"))?;
        let meta = consumer
            .fetch_metadata(Some(&self.topic), KAFKA_TIMEOUT)
            .map_err(self.kerr("reading the topic's metadata"))?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for t in meta.topics() {
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(&self.topic, p.id(), KAFKA_TIMEOUT)
                    .map_err(self.kerr("reading the topic's end"))?;
                if high > low {
                    tpl.add_partition_offset(&self.topic, p.id(), Offset::Offset(low))
                        .map_err(self.kerr("assigning the topic"))?;
                    ends.insert(p.id(), high);
                }
            }
        }
        let mut latest: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        if !ends.is_empty() {
            consumer
                .assign(&tpl)
                .map_err(self.kerr("assigning the topic"))?;
            let deadline = std::time::Instant::now() + KAFKA_TIMEOUT;
            while !ends.is_empty() {
                if std::time::Instant::now() > deadline {
                    return Err(StateError::Kafka {
                        topic: self.topic.clone(),
                        what: "reading the topic to its end (timed out)",
                        source: Box::new(KafkaError::Canceled),
                    });
                }
                let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let m = m.map_err(self.kerr("reading the topic"))?;
                if let Some(key) = m.key() {
                    let key = String::from_utf8_lossy(key).into_owned();
                    origin.insert(
                        key.clone(),
                        format!("{}/{}@{}", self.topic, m.partition(), m.offset()),
                    );
                    latest.insert(key, m.payload().map(<[u8]>::to_vec));
                }
                if let Some(end) = ends.get(&m.partition())
                    && m.offset() + 1 >= *end
                {
                    ends.remove(&m.partition());
                }
            }
        }
        let mut out = BTreeMap::new();
        for (source, bytes) in latest {
            // An empty value is a tombstone (the state was deleted).
            if let Some(bytes) = bytes.filter(|b| !b.is_empty()) {
                let cp = Checkpoint::decode(&bytes, &origin[&source])?;
                out.insert(source, cp);
            }
        }
        Ok(out)
    }
}

impl Store for ChangelogStore {
    fn load(&self, source: &str) -> Result<Option<Checkpoint>, StateError> {
        Ok(self.read_all()?.remove(source))
    }

    fn save(&self, cp: &Checkpoint) -> Result<(), StateError> {
        let producer = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        let value = cp.encode();
        let record = BaseRecord::to(&self.topic)
            .key(cp.source.as_bytes())
            .payload(&value);
        producer
            .send(record)
            .map_err(|(e, _)| self.kerr("writing a checkpoint")(e))?;
        producer
            .flush(KAFKA_TIMEOUT)
            .map_err(self.kerr("waiting for the checkpoint's acknowledgement"))?;
        let failed = producer
            .context()
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(e) = failed {
            return Err(self.kerr("writing a checkpoint")(e));
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<Checkpoint>, StateError> {
        Ok(self.read_all()?.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trip_and_rejects_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert!(store.load("g/t/0").unwrap().is_none());
        let mut cp = Checkpoint::new("g/t/0");
        cp.seq = 3;
        store.save(&cp).unwrap();
        assert_eq!(store.load("g/t/0").unwrap(), Some(cp.clone()));
        assert_eq!(store.list().unwrap(), vec![cp]);
        let path = store.path("g/t/0");
        assert!(
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("g%2Ft%2F0")
        );
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 2);
        std::fs::write(&path, bytes).unwrap();
        let err = store.load("g/t/0").unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("g%2Ft%2F0"),
            "{err}"
        );
    }
}
