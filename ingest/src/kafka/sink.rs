//! Producing records: on-failure topics, output topics, and `--produce`.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::client_log::LoggedContext;
use crate::IngestError;

/// One record to produce.
#[derive(Debug, Clone, Default)]
pub struct OutRecord {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A producer whose sends are awaited until the broker acknowledged them.
#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer<LoggedContext>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").finish_non_exhaustive()
    }
}

impl Sink {
    /// An idempotent producer for `servers` with extra client properties;
    /// `trigger` names it in errors and logs.
    pub fn new(
        trigger: &str,
        servers: &str,
        properties: &[(String, String)],
    ) -> Result<Self, IngestError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", servers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let context = LoggedContext::new(format!("{trigger} producer"), servers);
        let producer = cfg
            .create_with_context(context)
            .map_err(|source| IngestError::Kafka {
                trigger: trigger.to_owned(),
                what: "creating the producer".into(),
                source: Box::new(source),
            })?;
        Ok(Self { producer })
    }

    /// Produce all records to `topic` and wait for every acknowledgement.
    pub async fn send_all(&self, topic: &str, records: &[OutRecord]) -> Result<(), KafkaError> {
        let mut futures = std::collections::VecDeque::with_capacity(records.len());
        for r in records {
            let mut rec = future_record(topic, r);
            // Enqueue now (the delivery is awaited below); on a full local
            // queue, wait for the oldest deliveries and try again.
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        futures.push_back(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        match futures.pop_front() {
                            Some(f) => check(f.await)?,
                            None => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        for f in futures {
            check(f.await)?;
        }
        Ok(())
    }
}

/// The rdkafka record for `r`, borrowing its bytes.
pub(super) fn future_record<'a>(topic: &'a str, r: &'a OutRecord) -> FutureRecord<'a, [u8], [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &r.value {
        rec = rec.payload(v.as_slice());
    }
    rec
}

pub(super) fn check<E>(
    delivery: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> Result<(), KafkaError> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Load a JSON-lines file into `topic`: every non-empty line is one record
/// value, verbatim (so malformed lines can be loaded on purpose). With
/// `key_field`, a line that is a JSON object with that field gets it as key
/// (strings as-is, other values as JSON text). Returns the number of records.
pub async fn produce_file(
    servers: &str,
    topic: &str,
    path: &std::path::Path,
    key_field: Option<&str>,
) -> Result<usize, IngestError> {
    let text = std::fs::read_to_string(path).map_err(|e| IngestError::Load {
        file: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })?;
    let sink = Sink::new("--produce", servers, &[])?;
    let mut records = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let key = key_field.and_then(|f| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let k = v.get(f)?;
            Some(match k {
                serde_json::Value::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            })
        });
        records.push(OutRecord {
            key,
            value: Some(line.as_bytes().to_vec()),
            headers: vec![],
        });
    }
    for chunk in records.chunks(10_000) {
        sink.send_all(topic, chunk)
            .await
            .map_err(|e| IngestError::Load {
                file: path.display().to_string(),
                line: 0,
                message: format!("producing to {topic}: {e}"),
            })?;
    }
    Ok(records.len())
}
