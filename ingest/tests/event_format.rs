//! Lambda's Kafka event format: the event deserializes into the official
//! Rust event type with every field intact; partial batch responses, the
//! event-filtering view and on-failure headers.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::kafka::KafkaEvent;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sluice_ingest::event::{
    EventError, EventSource, FailedRecord, FailureInfo, FilterView, ValueForm, failure_headers,
    filter_view, item_identifier, kafka_event, parse_batch_item_failures,
};
use sluice_ingest::record::{Record, TimestampType};

fn rec(topic: &str, partition: i32, offset: i64) -> Record {
    Record {
        topic: topic.into(),
        partition,
        offset,
        timestamp_ms: 1_545_084_650_987 + offset,
        timestamp_type: TimestampType::CreateTime,
        key: Some(format!("k{offset}").into_bytes().into()),
        value: Some(format!("{{\"n\":{offset}}}").into_bytes().into()),
        headers: Vec::new(),
    }
}

const SMK: EventSource<'static> = EventSource {
    event_source: "SelfManagedKafka",
    event_source_arn: None,
    bootstrap_servers: "b1:9092,b2:9092",
};

/// Check that the event (`bytes`) deserializes into a `KafkaEvent` holding
/// exactly `records`, grouped by partition in order; returns it.
fn assert_event_matches(bytes: &[u8], records: &[Record]) -> KafkaEvent {
    let event: KafkaEvent = serde_json::from_slice(bytes).expect("KafkaEvent");
    let raw: Value = serde_json::from_slice(bytes).expect("JSON");
    let mut expected: HashMap<String, Vec<&Record>> = HashMap::new();
    for r in records {
        expected
            .entry(format!("{}-{}", r.topic, r.partition))
            .or_default()
            .push(r);
    }
    let mut keys: Vec<_> = event.records.keys().cloned().collect();
    let mut want: Vec<_> = expected.keys().cloned().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    for (key, want) in &expected {
        let got = &event.records[key];
        assert_eq!(got.len(), want.len(), "{key}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.topic.as_deref(), Some(&*w.topic));
            assert_eq!(g.partition, i64::from(w.partition));
            assert_eq!(g.offset, w.offset);
            // aws_lambda_events goes through f64 seconds and may lose the
            // last millisecond (…987 reads as …986); the JSON is exact.
            assert_eq!(raw["records"][key][i]["timestamp"], json!(w.timestamp_ms));
            assert!((g.timestamp.0.timestamp_millis() - w.timestamp_ms).abs() <= 1);
            assert_eq!(
                g.timestamp_type.as_deref(),
                Some(w.timestamp_type.as_lambda_str())
            );
            let decode = |s: &Option<String>| {
                s.as_ref()
                    .map(|s| STANDARD.decode(s).expect("base64 key/value"))
            };
            assert_eq!(
                decode(&g.key),
                w.key.as_deref().map(<[u8]>::to_vec),
                "key of {key} offset {}",
                w.offset
            );
            assert_eq!(
                decode(&g.value),
                w.value.as_deref().map(<[u8]>::to_vec),
                "value of {key} offset {}",
                w.offset
            );
            let headers: Vec<(String, Vec<u8>)> = g
                .headers
                .iter()
                .map(|h| {
                    assert_eq!(h.len(), 1, "one key per header object");
                    let (k, v) = h.iter().next().expect("one entry");
                    (
                        k.clone(),
                        v.iter().map(|&b| b.to_ne_bytes()[0]).collect::<Vec<u8>>(),
                    )
                })
                .collect();
            let want_headers: Vec<(String, Vec<u8>)> = w
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect();
            assert_eq!(headers, want_headers);
        }
    }
    event
}

fn mixed_batch() -> Vec<Record> {
    let all_bytes: Vec<u8> = (0..=255).collect();
    let mut r0 = rec("orders", 0, 15);
    r0.headers = vec![
        ("headerKey".into(), Some(b"headerValue".to_vec())),
        ("dup".into(), Some(b"one".to_vec())),
        ("dup".into(), Some(b"two".to_vec())),
        (
            "utf8".into(),
            Some("hello-world-\u{eb}".as_bytes().to_vec()),
        ),
        ("binary".into(), Some(all_bytes.clone())),
        ("null".into(), None),
        ("empty".into(), Some(Vec::new())),
        ("we\"ird\\key\n".into(), Some(vec![0x80, 0xff, 0x7f])),
    ];
    let mut r1 = rec("my-topic-2", 3, 7);
    r1.key = None;
    let mut r2 = rec("orders", 1, 100);
    r2.value = None;
    r2.timestamp_type = TimestampType::LogAppendTime;
    let r3 = rec("orders", 0, 16);
    let mut r4 = rec("my-topic-2", 3, 8);
    r4.key = Some(all_bytes.clone().into());
    r4.value = Some(all_bytes.iter().rev().copied().collect::<Vec<u8>>().into());
    let mut r5 = rec("my-topic", 23, 1);
    r5.key = Some(Vec::new().into());
    r5.value = Some(Vec::new().into());
    r5.timestamp_ms = 0;
    r5.timestamp_type = TimestampType::NotAvailable;
    let mut r6 = rec("orders", 1, 101);
    r6.key = None;
    r6.value = None;
    let r7 = rec("orders", 0, 17);
    vec![r0, r1, r2, r3, r4, r5, r6, r7]
}

#[test]
fn event_deserializes_into_aws_lambda_events_with_every_field() {
    let records = mixed_batch();
    let bytes = kafka_event(&SMK, &records);
    let event = assert_event_matches(&bytes, &records);
    assert_eq!(event.event_source.as_deref(), Some("SelfManagedKafka"));
    assert_eq!(event.event_source_arn, None);
    assert_eq!(event.bootstrap_servers.as_deref(), Some("b1:9092,b2:9092"));
    assert_eq!(event.records.len(), 4);

    // Raw JSON: no eventSourceArn; absent key/value are omitted, not null;
    // header bytes are signed; partitions in first-appearance order.
    let raw: Value = serde_json::from_slice(&bytes).expect("json");
    assert!(raw.get("eventSourceArn").is_none());
    let r1 = &raw["records"]["my-topic-2-3"][0];
    assert!(r1.get("key").is_none());
    assert_eq!(r1["value"], json!(STANDARD.encode(b"{\"n\":7}")));
    let r6 = &raw["records"]["orders-1"][1];
    assert!(r6.get("key").is_none() && r6.get("value").is_none());
    assert_eq!(
        raw["records"]["orders-1"][0]["timestampType"],
        "LOG_APPEND_TIME"
    );
    assert_eq!(
        raw["records"]["my-topic-23"][0]["timestampType"],
        "NO_TIMESTAMP_TYPE"
    );
    assert_eq!(raw["records"]["my-topic-23"][0]["key"], "");
    let headers = &raw["records"]["orders-0"][0]["headers"];
    assert_eq!(
        headers[3]["utf8"],
        json!([
            104, 101, 108, 108, 111, 45, 119, 111, 114, 108, 100, 45, -61, -85
        ])
    );
    assert_eq!(headers[5], json!({"null": []}));
    assert_eq!(headers[7], json!({"we\"ird\\key\n": [-128, -1, 127]}));
    let text = std::str::from_utf8(&bytes).expect("utf-8");
    let pos = |k: &str| text.find(&format!("\"{k}\":[")).expect(k);
    assert!(pos("orders-0") < pos("my-topic-2-3"));
    assert!(pos("my-topic-2-3") < pos("orders-1"));
    assert!(pos("orders-1") < pos("my-topic-23"));
}

#[test]
fn msk_event_has_arn() {
    let source = EventSource {
        event_source: "aws:kafka",
        event_source_arn: Some("arn:aws:kafka:us-east-1:123456789012:cluster/vpc-2/abc-1"),
        bootstrap_servers: "b-1.example:9098",
    };
    let records = vec![rec("AWSKafkaTopic", 0, 0), rec("AWSKafkaTopic", 0, 1)];
    let event = assert_event_matches(&kafka_event(&source, &records), &records);
    assert_eq!(event.event_source.as_deref(), Some("aws:kafka"));
    assert_eq!(
        event.event_source_arn.as_deref(),
        Some("arn:aws:kafka:us-east-1:123456789012:cluster/vpc-2/abc-1")
    );
    assert_eq!(event.bootstrap_servers.as_deref(), Some("b-1.example:9098"));
}

#[test]
fn event_is_byte_for_byte_the_documented_format() {
    let r = Record {
        topic: "mytopic".into(),
        partition: 0,
        offset: 15,
        timestamp_ms: 1_545_084_650_987,
        timestamp_type: TimestampType::CreateTime,
        key: Some(b"abcDEF123==".to_vec().into()),
        value: Some(b"{\"key\":\"value\"}".to_vec().into()),
        headers: vec![("headerKey".into(), Some(b"headerValue".to_vec()))],
    };
    let got = String::from_utf8(kafka_event(&SMK, &[r])).expect("utf-8");
    let want = concat!(
        r#"{"eventSource":"SelfManagedKafka","bootstrapServers":"b1:9092,b2:9092","#,
        r#""records":{"mytopic-0":[{"topic":"mytopic","partition":0,"offset":15,"#,
        r#""timestamp":1545084650987,"timestampType":"CREATE_TIME","#,
        r#""key":"YWJjREVGMTIzPT0=","value":"eyJrZXkiOiJ2YWx1ZSJ9","#,
        r#""headers":[{"headerKey":[104,101,97,100,101,114,86,97,108,117,101]}]}]}}"#
    );
    assert_eq!(got, want);

    let msk = EventSource {
        event_source: "aws:kafka",
        event_source_arn: Some("arn:x"),
        bootstrap_servers: "b",
    };
    let got = String::from_utf8(kafka_event(&msk, &[])).expect("utf-8");
    assert_eq!(
        got,
        r#"{"eventSource":"aws:kafka","eventSourceArn":"arn:x","bootstrapServers":"b","records":{}}"#
    );
}

#[test]
fn large_batch_round_trips() {
    let records: Vec<Record> = (0..10_000)
        .map(|i| {
            let mut r = rec(if i % 3 == 0 { "a" } else { "b" }, i % 4, i64::from(i));
            r.value = Some(vec![u8::try_from(i % 251).expect("byte"); 100].into());
            r.headers = vec![("h".into(), Some(vec![1, 2, 3]))];
            r
        })
        .collect();
    let event = assert_event_matches(&kafka_event(&SMK, &records), &records);
    assert_eq!(event.records.len(), 8);
}

fn failures(response: &str, batch: &[Record]) -> Result<Option<Vec<FailedRecord>>, EventError> {
    parse_batch_item_failures(response.as_bytes(), batch)
}

#[test]
fn item_identifier_form() {
    assert_eq!(item_identifier(&rec("my-topic", 3, 42)), "my-topic-3@42");
}

#[test]
fn partial_batch_response_topic_partition_offset() {
    let batch = vec![
        rec("my-topic", 0, 10),
        rec("my-topic", 0, 11),
        rec("my-topic", 1, 10),
        rec("other", 0, 5),
    ];
    let ids: Vec<String> = [&batch[1], &batch[2], &batch[3]]
        .iter()
        .map(|r| item_identifier(r))
        .collect();
    let response = json!({"batchItemFailures": [
        {"itemIdentifier": ids[0]},
        {"itemIdentifier": ids[1]},
        {"itemIdentifier": ids[0]},
        {"itemIdentifier": ids[2]},
    ]})
    .to_string();
    assert_eq!(
        failures(&response, &batch).expect("valid"),
        Some(vec![
            ("my-topic".into(), 0, 11),
            ("my-topic".into(), 1, 10),
            ("other".into(), 0, 5),
        ])
    );
}

#[test]
fn partial_batch_response_bare_offsets_on_one_partition() {
    let batch = vec![rec("t", 2, 7), rec("t", 2, 8), rec("t", 2, 9)];
    let got = failures(
        r#"{"batchItemFailures":[{"itemIdentifier":9},{"itemIdentifier":"7"},{"itemIdentifier":"t-2@8"}]}"#,
        &batch,
    )
    .expect("valid");
    assert_eq!(
        got,
        Some(vec![
            ("t".into(), 2, 9),
            ("t".into(), 2, 7),
            ("t".into(), 2, 8)
        ])
    );

    // Not in the batch.
    let err = failures(r#"{"batchItemFailures":[{"itemIdentifier":"10"}]}"#, &batch)
        .expect_err("unknown offset");
    assert!(
        matches!(err, EventError::UnknownItemIdentifier { ref identifier } if identifier == "10")
    );
    // Not a plain offset.
    for id in [r#""+8""#, r#""8.0""#, "8.5", "-1", r#"" 8""#] {
        let response = format!(r#"{{"batchItemFailures":[{{"itemIdentifier":{id}}}]}}"#);
        let err = failures(&response, &batch).expect_err(id);
        assert!(
            matches!(err, EventError::UnknownItemIdentifier { .. }),
            "{id}: {err}"
        );
    }
}

#[test]
fn partial_batch_response_bare_offset_needs_one_partition() {
    let batch = vec![rec("t", 0, 1), rec("t", 1, 1)];
    let err =
        failures(r#"{"batchItemFailures":[{"itemIdentifier":1}]}"#, &batch).expect_err("ambiguous");
    assert!(
        matches!(err, EventError::AmbiguousOffset { partitions: 2, .. }),
        "{err}"
    );
}

#[test]
fn partial_batch_response_unknown_identifiers_fail() {
    let batch = vec![rec("my-topic", 0, 10), rec("my-topic", 1, 11)];
    for id in [
        "my-topic-0@11", // offset of another partition
        "my-topic-2@10", // partition not in the batch
        "other-0@10",    // topic not in the batch
        "my-topic-0-10", // not a documented form
        "my-topic@10",   // no partition
        "my-topic-0@",   // no offset
        "",
        "0@10",
    ] {
        let response = json!({"batchItemFailures": [{"itemIdentifier": id}]}).to_string();
        match failures(&response, &batch) {
            Err(EventError::UnknownItemIdentifier { identifier }) => assert_eq!(identifier, id),
            other => panic!("{id:?}: {other:?}"),
        }
    }
    for response in [
        r#"{"batchItemFailures":[{}]}"#,
        r#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
        r#"{"batchItemFailures":["my-topic-0@10"]}"#,
    ] {
        assert!(
            matches!(
                failures(response, &batch),
                Err(EventError::MissingItemIdentifier { index: 0 })
            ),
            "{response}"
        );
    }
    assert!(matches!(
        failures(r#"{"batchItemFailures":"my-topic-0@10"}"#, &batch),
        Err(EventError::MalformedBatchItemFailures { found: "a string" })
    ));
}

#[test]
fn responses_that_are_not_partial_batch_responses() {
    let batch = vec![rec("t", 0, 1)];
    for response in [
        "",
        "not json",
        "{\"batchItemFailures\":[",
        "null",
        "42",
        "\"ok\"",
        "[]",
        "{}",
        r#"{"statusCode":200,"body":"batchItemFailures"}"#,
    ] {
        assert_eq!(
            failures(response, &batch).expect(response),
            None,
            "{response:?}"
        );
    }
    assert_eq!(
        failures(r#"{"batchItemFailures":[]}"#, &batch).expect("empty"),
        Some(Vec::new())
    );
    assert_eq!(
        failures(r#"{"batchItemFailures":null}"#, &batch).expect("null"),
        Some(Vec::new())
    );
    assert_eq!(
        failures(r#"{"batchItemFailures":[]}"#, &[]).expect("empty batch"),
        Some(Vec::new())
    );
}

#[test]
fn filter_view_of_json_value() {
    let mut r = rec("orders", 2, 9);
    r.key = Some(b"customer-1".to_vec().into());
    r.value = Some(br#"{"kind":"refund","amount":12.5,"tags":["a"]}"#.to_vec().into());
    let FilterView { view, value } = filter_view(&r);
    assert!(matches!(value, ValueForm::Json), "{value:?}");
    assert_eq!(
        view,
        json!({
            "topic": "orders",
            "partition": 2,
            "offset": 9,
            "timestamp": 1_545_084_650_996_i64,
            "key": "customer-1",
            "value": {"kind": "refund", "amount": 12.5, "tags": ["a"]},
        })
    );

    // Non-UTF-8 or absent key: null. Scalar JSON values are JSON too;
    // no value (tombstone): null.
    r.key = Some(vec![0xff, 0xfe].into());
    r.value = Some(b"  42 ".to_vec().into());
    let FilterView { view, value } = filter_view(&r);
    assert!(matches!(value, ValueForm::Json), "{value:?}");
    assert_eq!(view["key"], Value::Null);
    assert_eq!(view["value"], json!(42));
    r.key = None;
    r.value = None;
    let FilterView { view, value } = filter_view(&r);
    assert!(matches!(value, ValueForm::Json), "{value:?}");
    assert_eq!(view["key"], Value::Null);
    assert_eq!(view["value"], Value::Null);
}

/// A value that is not JSON is in the view as text (Lambda's plain-string
/// messages); the error names the record.
#[test]
fn filter_view_of_non_json_value_is_text() {
    let cases: [(&[u8], &str, bool); 4] = [
        (b"plain text", "plain text", true),
        (b"{\"a\":", "{\"a\":", true),
        (b"", "", true),
        (&[0xff, b'a'], "\u{fffd}a", false),
    ];
    for (bytes, text, utf8) in cases {
        let mut r = rec("orders", 1, 3);
        r.value = Some(bytes.to_vec().into());
        let FilterView { view, value } = filter_view(&r);
        assert_eq!(view["value"], json!(text), "{bytes:?}");
        let e = match (value, utf8) {
            (ValueForm::Text(e), true) | (ValueForm::Binary(e), false) => e,
            (other, _) => panic!("{bytes:?}: {other:?}"),
        };
        match e {
            EventError::ValueNotJson {
                topic,
                partition,
                offset,
                ..
            } => assert_eq!((topic.as_str(), partition, offset), ("orders", 1, 3)),
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn parse_rfc3339_ms(s: &str) -> i64 {
    let b = s.as_bytes();
    assert_eq!(b.len(), 24, "{s}");
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        assert_eq!(b[i], c, "{s}");
    }
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().expect("digits") };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60_000 + n(17..19) * 1000 + n(20..23)
}

#[test]
fn failure_headers_carry_coordinates_then_original_headers() {
    let mut r = rec("orders", 4, 1234);
    r.headers = vec![
        ("trace".into(), Some(b"abc".to_vec())),
        ("trace".into(), Some(b"def".to_vec())),
        ("gone".into(), None),
    ];
    let info = FailureInfo {
        function: "refunds",
        error_type: "Runtime.ExitError",
        error_message: "exit status 2\nstack: \u{e9}",
        attempts: 3,
    };
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let headers = failure_headers(&r, &info);
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis();

    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "sluice.source.topic",
            "sluice.source.partition",
            "sluice.source.offset",
            "sluice.source.timestamp",
            "sluice.function",
            "sluice.error.type",
            "sluice.error.message",
            "sluice.attempts",
            "sluice.failed.at",
            "trace",
            "trace",
            "gone",
        ]
    );
    let value = |i: usize| std::str::from_utf8(&headers[i].1).expect("utf-8");
    assert_eq!(value(0), "orders");
    assert_eq!(value(1), "4");
    assert_eq!(value(2), "1234");
    assert_eq!(value(3), "1545084652221");
    assert_eq!(value(4), "refunds");
    assert_eq!(value(5), "Runtime.ExitError");
    assert_eq!(value(6), "exit status 2\nstack: \u{e9}");
    assert_eq!(value(7), "3");
    let at = i128::from(parse_rfc3339_ms(value(8)));
    // Millisecond precision: truncated, so within [before, after].
    assert!(
        (i128::try_from(before).expect("ms")..=i128::try_from(after).expect("ms")).contains(&at),
        "{} not within [{before}, {after}]",
        value(8)
    );
    assert_eq!(headers[9].1, b"abc");
    assert_eq!(headers[10].1, b"def");
    assert_eq!(headers[11].1, b"");
}
