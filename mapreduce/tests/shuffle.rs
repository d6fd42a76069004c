//! The reducer's side of the shuffle against a real Kafka-protocol broker:
//! a map task's records count once, for the first attempt whose end-of-map
//! marker arrived, however attempts interleave.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sluice_ingest::kafka::EmbeddedBroker;
use sluice_mapreduce::shuffle_record;
use sluice_taskgen::distributed::KafkaSettings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_and_duplicated_map_tasks_count_once() {
    let broker = EmbeddedBroker::start(1).unwrap();
    let topic = "sluice-mr-test-shuffle";
    broker.create_topic(topic, 1).unwrap();
    let kafka = KafkaSettings {
        servers: broker.bootstrap_servers().to_owned(),
        properties: Vec::new(),
    };
    let producer: FutureProducer = kafka.client().create().unwrap();
    // (task, attempt, key or marker, value), in publishing order.
    let records: &[(u64, u32, Option<&str>, Value)] = &[
        // Task 0's first attempt published a record, then failed before its
        // marker; the second attempt is complete; the first attempt's marker
        // arrives late (a retried send).
        (0, 1, Some("x"), json!(1)),
        (0, 2, Some("x"), json!(1)),
        (0, 2, None, Value::Null),
        (0, 1, None, Value::Null),
        // Task 1 succeeded, then was published again (a lost acknowledgement).
        (1, 1, Some("x"), json!(5)),
        (1, 1, Some("y"), json!(2)),
        (1, 1, None, Value::Null),
        (1, 2, Some("x"), json!(5)),
        (1, 2, Some("y"), json!(2)),
        (1, 2, None, Value::Null),
    ];
    for (t, a, k, v) in records {
        let body = shuffle_record(*t, *a, *k, v.clone());
        let mut r = FutureRecord::<str, [u8]>::to(topic)
            .partition(0)
            .payload(&body);
        if let Some(k) = k {
            r = r.key(k);
        }
        producer.send(r, Duration::from_secs(10)).await.unwrap();
    }
    let groups = tokio::time::timeout(
        Duration::from_secs(60),
        sluice_mapreduce::collect(&kafka, topic, 0, 2),
    )
    .await
    .expect("both tasks are marked")
    .unwrap();
    let mut x = groups["x"].clone();
    x.sort_by_key(|v| v.as_i64());
    assert_eq!(x, vec![json!(1), json!(5)]);
    assert_eq!(groups["y"], vec![json!(2)]);
    assert_eq!(groups.len(), 2);
}
