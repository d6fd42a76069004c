//! A Kafka-triggered function written exactly as for AWS Lambda's Kafka event
//! source: it receives `aws_lambda_events`' `KafkaEvent`, prices each order,
//! returns the priced orders as output records (sluice produces them to the
//! trigger's `output_topic`), and reports records it cannot parse through a
//! partial batch response (`batchItemFailures`), so that only those are
//! retried and, in the end, sent to the on-failure topic.

use aws_lambda_events::event::kafka::KafkaEvent;
use base64::Engine;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

async fn handler(event: LambdaEvent<KafkaEvent>) -> Result<Value, Error> {
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for (topic_partition, records) in &event.payload.records {
        for r in records {
            let raw = r
                .value
                .as_deref()
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                .unwrap_or_default();
            let order: Option<Value> = serde_json::from_slice(&raw).ok();
            match order
                .as_ref()
                .and_then(|o| o["amount"].as_f64().map(|a| (o, a)))
            {
                Some((o, amount)) => out.push(json!({
                    "key": o["customer"],
                    "value": {"order": o["order"], "customer": o["customer"], "amount": amount,
                              "total_with_tax": (amount * 1.2 * 100.0).round() / 100.0},
                })),
                None => failures.push(json!({
                    // sluice's item identifier: "<topic>-<partition>@<offset>"
                    "itemIdentifier": format!("{}-{}@{}",
                        r.topic.as_deref().unwrap_or_default(), r.partition, r.offset),
                })),
            }
        }
        eprintln!("{topic_partition}: {} record(s)", records.len());
    }
    eprintln!(
        "priced {} order(s), {} unreadable",
        out.len(),
        failures.len()
    );
    Ok(json!({ "records": out, "batchItemFailures": failures }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
