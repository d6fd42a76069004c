//! Encoding a batch of records as Lambda's Kafka event (the lanes' share of
//! the per-record cost in `sluice bench kafka`): 1,000 records of the
//! benchmark's shape (a 2-3 byte key, a 90-byte JSON value, no headers).
//! Prints time per batch; criterion compares with the previous run.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_ingest::event::{EventSource, kafka_event};
use sluice_ingest::record::{Record, TimestampType};

fn records(n: usize) -> Vec<Record> {
    let value = br#"{"order":1,"customer":"c1","amount":12.5,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    (0..n)
        .map(|i| Record {
            topic: "bench".into(),
            partition: 1,
            offset: 1_000_000 + i as i64,
            timestamp_ms: 1_764_691_200_000 + i as i64,
            timestamp_type: TimestampType::CreateTime,
            key: Some(format!("k{}", i % 64).into_bytes().into()),
            value: Some(value.to_vec().into()),
            headers: Vec::new(),
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let batch = records(1000);
    let source = EventSource {
        event_source: "SelfManagedKafka",
        event_source_arn: None,
        bootstrap_servers: "127.0.0.1:9092",
    };
    let mut g = c.benchmark_group("kafka_event");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("1000 records", |b| {
        b.iter(|| kafka_event(black_box(&source), black_box(&batch)))
    });
    g.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
