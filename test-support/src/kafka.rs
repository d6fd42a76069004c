//! The Kafka-protocol broker tests run against: a `MockCluster` the test
//! starts, or an external cluster when `SLUICE_TEST_KAFKA` is set.
//!
//! * `SLUICE_TEST_KAFKA=host:port[,host:port]`: the bootstrap servers of an
//!   existing cluster. Tests then name their topics and consumer groups
//!   uniquely ([`TestKafka::name`]: `<name>-<pid>-<n>-<nanos>`), so that they
//!   can run in parallel, and twice, against one cluster; topics are created
//!   with the admin API.
//! * `SLUICE_TEST_KAFKA_CONTROL=host:port` (with `SLUICE_TEST_KAFKA`): create
//!   topics through the control port of `sluice-test-broker` (this crate's
//!   binary) instead: it serves a mock cluster in its own process, and the
//!   mock does not implement the CreateTopics request. It exists to check the
//!   external path without a real cluster.
//! * Neither: a fresh in-process `MockCluster` (one broker) per
//!   [`TestKafka`], names used as they are.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// Environment variable naming an external cluster's bootstrap servers.
pub const ENV_SERVERS: &str = "SLUICE_TEST_KAFKA";
/// Environment variable naming a `sluice-test-broker` control port.
pub const ENV_CONTROL: &str = "SLUICE_TEST_KAFKA_CONTROL";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The broker of one test.
pub struct TestKafka {
    servers: String,
    /// Unique suffix of topic and group names (external cluster only).
    suffix: Option<String>,
    control: Option<String>,
    cluster: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl std::fmt::Debug for TestKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKafka")
            .field("servers", &self.servers)
            .field("suffix", &self.suffix)
            .finish_non_exhaustive()
    }
}

impl TestKafka {
    /// The external cluster of `SLUICE_TEST_KAFKA`, or a fresh mock cluster.
    ///
    /// # Panics
    /// If the mock cluster cannot start.
    pub fn start() -> Self {
        match std::env::var(ENV_SERVERS) {
            Ok(servers) if !servers.trim().is_empty() => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                Self {
                    servers: servers.trim().to_owned(),
                    suffix: Some(format!("{}-{n}-{nanos}", std::process::id())),
                    control: std::env::var(ENV_CONTROL).ok().filter(|c| !c.is_empty()),
                    cluster: None,
                }
            }
            _ => {
                let cluster = MockCluster::new(1).expect("starting a mock cluster");
                Self {
                    servers: cluster.bootstrap_servers(),
                    suffix: None,
                    control: None,
                    cluster: Some(cluster),
                }
            }
        }
    }

    /// `bootstrap.servers`.
    pub fn servers(&self) -> &str {
        &self.servers
    }

    /// Whether this is an external cluster (`SLUICE_TEST_KAFKA`).
    pub fn is_external(&self) -> bool {
        self.cluster.is_none()
    }

    /// The name to use for the test's topic or group `name`: unique on an
    /// external cluster, `name` itself on a mock cluster.
    pub fn name(&self, name: &str) -> String {
        match &self.suffix {
            Some(s) => format!("{name}-{s}"),
            None => name.to_owned(),
        }
    }

    /// Create topic `topic` (a name from [`TestKafka::name`]) with
    /// `partitions` partitions and wait until its metadata shows them.
    ///
    /// # Panics
    /// If the topic cannot be created.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        if let Some(cluster) = &self.cluster {
            cluster
                .create_topic(topic, partitions, 1)
                .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
            return;
        }
        match &self.control {
            Some(addr) => control_create(addr, topic, partitions),
            None => admin_create(&self.servers, topic, partitions),
        }
        self.wait_for_partitions(topic, partitions);
    }

    fn wait_for_partitions(&self, topic: &str, partitions: i32) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("allow.auto.create.topics", "false")
            .create()
            .expect("metadata client");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = c
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                });
            if got == Some(partitions as usize) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "topic {topic} does not show {partitions} partitions (metadata: {got:?})"
            );
        }
    }
}

/// CreateTopics through the admin API (replication: the broker's default),
/// on a thread of its own: callers may be inside a tokio runtime, where a
/// runtime of its own cannot block.
fn admin_create(servers: &str, topic: &str, partitions: i32) {
    let (servers, topic) = (servers.to_owned(), topic.to_owned());
    let created =
        std::thread::spawn(move || admin_create_blocking(&servers, &topic, partitions)).join();
    if let Err(panic) = created {
        std::panic::resume_unwind(panic);
    }
}

fn admin_create_blocking(servers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = rt
        .block_on(admin.create_topics([&new], &opts))
        .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
    for r in results {
        if let Err((t, e)) = r {
            panic!("creating topic {t}: {e}");
        }
    }
}

/// `create <topic> <partitions>` on a `sluice-test-broker` control port.
fn control_create(addr: &str, topic: &str, partitions: i32) {
    let mut s = TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connecting to the broker control port {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    writeln!(s, "create {topic} {partitions}").expect("writing to the control port");
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .expect("reading from the control port");
    assert_eq!(line.trim(), "ok", "creating topic {topic} through {addr}");
}
