//! `exactly_once = true`: the function's output records and the input
//! offsets they consume are produced and committed in one Kafka transaction
//! (a consume-transform-produce loop with `send_offsets_to_transaction`), so
//! `read_committed` readers of the output topic see each input's output once,
//! even across crashes and rebalances (fencing by the consumer group's
//! metadata, KIP-447).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::client_log::LoggedContext;
use super::sink::{OutRecord, check, future_record};
use crate::IngestError;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional producer of one trigger; one transaction at a time.
pub(super) struct Transactional {
    producer: FutureProducer<LoggedContext>,
    turn: Arc<tokio::sync::Mutex<()>>,
    group: Arc<Mutex<Option<ConsumerGroupMetadata>>>,
}

impl Transactional {
    /// Create and initialise the producer (`init_transactions`).
    pub async fn start(
        trigger: &str,
        group_id: &str,
        servers: &str,
        properties: &[(String, String)],
    ) -> Result<Self, IngestError> {
        let err = |what: &str| {
            let trigger = trigger.to_owned();
            let what = what.to_owned();
            move |source: KafkaError| IngestError::Kafka {
                trigger: trigger.clone(),
                what: what.clone(),
                source: Box::new(source),
            }
        };
        let id = format!(
            "sluice-{group_id}-{trigger}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", servers)
            .set("transactional.id", &id)
            .set("enable.idempotence", "true");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let context = LoggedContext::new(format!("{trigger} transactional producer"), servers);
        let producer: FutureProducer<LoggedContext> = cfg
            .create_with_context(context)
            .map_err(err("creating the transactional producer"))?;
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(TIMEOUT))
            .await
            .map_err(|e| IngestError::Config {
                trigger: trigger.to_owned(),
                message: format!("init_transactions task: {e}"),
            })?
            .map_err(err("init_transactions"))?;
        Ok(Self {
            producer,
            turn: Arc::new(tokio::sync::Mutex::new(())),
            group: Arc::new(Mutex::new(None)),
        })
    }

    /// The consumer group's metadata, refreshed on every assignment.
    pub fn set_group(&self, g: ConsumerGroupMetadata) {
        *self.group.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
    }

    /// Produce `records` to `topic` (if any) and commit `offset` (if any) as
    /// the next offset of `topic_in`/`partition`, atomically. Aborts on
    /// failure.
    pub async fn commit(
        &self,
        topic: Option<&str>,
        records: &[OutRecord],
        topic_in: &str,
        partition: i32,
        offset: Option<i64>,
    ) -> Result<(), KafkaError> {
        let _turn = self.turn.clone().lock_owned().await;
        let p = self.producer.clone();
        let group = self.group.clone();
        let topic = topic.map(str::to_owned);
        let records = records.to_vec();
        let topic_in = topic_in.to_owned();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            p.begin_transaction()?;
            let result = (|| {
                if let Some(topic) = &topic {
                    let mut deliveries = Vec::with_capacity(records.len());
                    for r in &records {
                        let f = p.send_result(future_record(topic, r)).map_err(|(e, _)| e)?;
                        deliveries.push(f);
                    }
                    for d in deliveries {
                        check(rt.block_on(d))?;
                    }
                }
                if let Some(offset) = offset {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&topic_in, partition, Offset::Offset(offset))?;
                    let guard = group.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(cgm) = guard.as_ref() else {
                        // No assignment yet: nothing can be committed; retried.
                        return Err(KafkaError::ConsumerCommit(
                            rdkafka::error::RDKafkaErrorCode::State,
                        ));
                    };
                    p.send_offsets_to_transaction(&tpl, cgm, TIMEOUT)?;
                }
                p.commit_transaction(TIMEOUT)
            })();
            if result.is_err() {
                let _ = p.abort_transaction(TIMEOUT);
            }
            result
        })
        .await
        .map_err(|_| KafkaError::Canceled)?
    }
}
