//! The embedded broker: rdkafka's `MockCluster`, which serves the real Kafka
//! protocol on a local port from inside this process. Its data lives in
//! memory only and is gone when the process exits.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::IngestError;

/// An in-process Kafka-protocol broker.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    servers: String,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("servers", &self.servers)
            .finish()
    }
}

impl EmbeddedBroker {
    /// Start a broker with `brokers` nodes on local ephemeral ports.
    pub fn start(brokers: i32) -> Result<Self, IngestError> {
        let cluster = MockCluster::new(brokers).map_err(|source| IngestError::Embedded {
            what: "starting the mock cluster".into(),
            source: Box::new(source),
        })?;
        let servers = cluster.bootstrap_servers();
        Ok(Self { cluster, servers })
    }

    /// Its `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.servers
    }

    /// Create a topic (replication 1).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), IngestError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(|source| IngestError::Embedded {
                what: format!("creating topic {topic} with {partitions} partitions"),
                source: Box::new(source),
            })
    }
}
