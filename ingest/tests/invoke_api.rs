//! Lambda's Invoke API (`sluice serve`) against real sandboxes, spoken to
//! over one kept-alive HTTP connection as an SDK does: synchronous calls
//! (by name and by ARN), a function error, an asynchronous `Event` call
//! seen by the function, the client context, `LogType=Tail`,
//! `InvokeWithResponseStream`, `DryRun`, and the service's errors.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec, LogLine};
use sluice_test_support::{Lines, agent_binary, function_fixture, script_fixture};

/// Logs each event and the client context it came with, then answers.
const LOGGER: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  H=$(mktemp)
  curl -sS -D "$H" -o /tmp/event "$API/invocation/next"
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$H" | cut -d: -f2 | tr -d '[:space:]')
  CC=$(grep -i '^Lambda-Runtime-Client-Context:' "$H" | cut -d: -f2- | tr -d '\r')
  echo "EVENT $(cat /tmp/event) CONTEXT${CC}" >&2
  curl -sS -X POST "$API/invocation/$ID/response" -d '{"ok":true}' >/dev/null
done
"#;

/// An HTTP/1.1 answer.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
    raw: Vec<u8>,
}

/// One request on a kept-alive connection.
fn request(
    conn: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let stream = conn.get_mut();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut status_line = String::new();
    conn.read_line(&mut status_line).unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.insert(k.to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; len];
    conn.read_exact(&mut body).unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        raw: body,
    }
}

const INVOKE: &str = "/2015-03-31/functions";
const STREAM: &str = "/2021-11-15/functions";

/// The messages of an AWS event stream: each one's `:event-type` and
/// payload, every length and CRC checked.
fn event_stream(mut bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().unwrap());
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let total = be32(bytes) as usize;
        let headers_len = be32(&bytes[4..]) as usize;
        assert_eq!(
            be32(&bytes[8..]),
            crc32fast::hash(&bytes[..8]),
            "prelude CRC"
        );
        let message = &bytes[..total];
        assert_eq!(
            be32(&message[total - 4..]),
            crc32fast::hash(&message[..total - 4]),
            "message CRC"
        );
        let mut headers = &message[12..12 + headers_len];
        let mut event_type = String::new();
        while !headers.is_empty() {
            let name_len = headers[0] as usize;
            let name = std::str::from_utf8(&headers[1..1 + name_len]).unwrap();
            assert_eq!(headers[1 + name_len], 7, "string header");
            let at = 2 + name_len;
            let value_len = u16::from_be_bytes([headers[at], headers[at + 1]]) as usize;
            let value = std::str::from_utf8(&headers[at + 2..at + 2 + value_len]).unwrap();
            if name == ":event-type" {
                event_type = value.to_owned();
            }
            headers = &headers[at + 2 + value_len..];
        }
        events.push((event_type, message[12 + headers_len..total - 4].to_vec()));
        bytes = &bytes[total..];
    }
    events
}

#[test]
fn sdk_requests_invoke_functions_as_lambda_answers_them() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lines = Arc::new(Lines::default());
    let sink = {
        let lines = Arc::clone(&lines);
        Arc::new(move |l: LogLine| lines.push(format!("[{}] {}", l.function, l.line)))
    };
    let executor = Executor::with_log_sink(
        Arc::new(ProcessBackend::new(ProcessConfig::detect(agent_binary()))),
        sink,
    );
    let (echo, fail, logger) = (
        function_fixture("echo"),
        function_fixture("fail"),
        script_fixture(LOGGER),
    );
    for (name, f) in [("echo", &echo), ("fail", &fail), ("logger", &logger)] {
        executor.register(FunctionSpec::new(name, &f.dir));
    }
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let failures = tempfile::tempdir().unwrap();
    let failed = failures.path().join("failed.jsonl");
    let succeeded = failures.path().join("succeeded.jsonl");
    let server = rt.spawn(sluice_ingest::invoke_api::serve(
        listener,
        executor.clone(),
        sluice_ingest::invoke_api::AsyncConfig {
            max_retry_attempts: 0,
            on_failure: Some(failed.clone()),
            on_success: Some(succeeded.clone()),
            ..Default::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let mut conn = BufReader::new(TcpStream::connect(addr).unwrap());
    conn.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    // A synchronous call answers the function's response.
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/echo/invocations"),
        &[],
        r#"{"n":1}"#,
    );
    assert_eq!((a.status, a.body.as_str()), (200, r#"{"n":1}"#));
    assert_eq!(a.headers["x-amz-executed-version"], "$LATEST");
    assert!(!a.headers.contains_key("x-amz-function-error"));
    // By ARN (percent-encoded, as SDKs send it) with a qualifier, on the
    // same connection.
    let arn = "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Aecho";
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/{arn}/invocations?Qualifier=%24LATEST"),
        &[("X-Amz-Invocation-Type", "RequestResponse")],
        "[2]",
    );
    assert_eq!((a.status, a.body.as_str()), (200, "[2]"));
    // A function error: 200, flagged, with Lambda's error object.
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/fail/invocations"),
        &[],
        r#"{"order":7}"#,
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-amz-function-error"], "Unhandled");
    let error: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(error["errorType"], "OrderRejected", "{error}");

    // An asynchronous call is accepted at once and then runs.
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/logger/invocations"),
        &[("X-Amz-Invocation-Type", "Event")],
        r#"{"async":"yes"}"#,
    );
    assert_eq!(a.status, 202, "{}", a.body);
    assert!(a.headers.contains_key("x-amzn-requestid"));
    lines
        .wait_for(Duration::from_secs(30), |l| {
            l.iter()
                .find(|l| l.contains(r#"EVENT {"async":"yes"}"#))
                .cloned()
        })
        .unwrap_or_else(|| panic!("the Event call never ran: {:?}", lines.snapshot()));
    // The client context reaches the function as Lambda's.
    let context = base64::engine::general_purpose::STANDARD.encode(r#"{"custom":{"user":"ada"}}"#);
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/logger/invocations"),
        &[("X-Amz-Client-Context", &context)],
        "{}",
    );
    assert_eq!((a.status, a.body.as_str()), (200, r#"{"ok":true}"#));
    lines
        .wait_for(Duration::from_secs(30), |l| {
            l.iter()
                .find(|l| l.contains(r#"CONTEXT {"custom":{"user":"ada"}}"#))
                .cloned()
        })
        .unwrap_or_else(|| panic!("no client context: {:?}", lines.snapshot()));

    // LogType=Tail: the call's own log comes back, START to REPORT, with
    // what the function wrote before it answered, every time (the agent
    // relays a function's lines ahead of its answer).
    let decode = |a: &Answer| {
        let b64 = &a.headers["x-amz-log-result"];
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };
    for n in 0..20 {
        let a = request(
            &mut conn,
            "POST",
            &format!("{INVOKE}/logger/invocations"),
            &[("X-Amz-Log-Type", "Tail")],
            &format!(r#"{{"tail":{n}}}"#),
        );
        assert_eq!((a.status, a.body.as_str()), (200, r#"{"ok":true}"#));
        let (log, id) = (decode(&a), &a.headers["x-amzn-requestid"]);
        assert!(
            log.starts_with(&format!("START RequestId: {id} Version: $LATEST\n"))
                || log.contains(&format!("\nSTART RequestId: {id} Version: $LATEST\n")),
            "{log}"
        );
        assert!(
            log.contains(&format!(r#"EVENT {{"tail":{n}}} CONTEXT"#)),
            "call {n}: {log}"
        );
        assert!(
            log.contains(&format!(
                "END RequestId: {id}\nREPORT RequestId: {id}\tDuration: "
            )),
            "{log}"
        );
        assert!(log.ends_with(" MB\n") || log.ends_with(" ms\n"), "{log}");
        if n > 0 {
            let before = format!(r#"{{"tail":{}}}"#, n - 1);
            assert!(!log.contains(&before), "the previous call's lines: {log}");
        }
    }
    // A function error's tail, with its REPORT; no tail unless asked.
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/fail/invocations"),
        &[("X-Amz-Log-Type", "Tail")],
        "{}",
    );
    assert_eq!(a.headers["x-amz-function-error"], "Unhandled");
    assert!(decode(&a).contains("REPORT RequestId: "), "{}", decode(&a));
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/echo/invocations"),
        &[],
        "{}",
    );
    assert!(!a.headers.contains_key("x-amz-log-result"));

    // InvokeWithResponseStream: the response as a PayloadChunk, then
    // InvokeComplete (with the log tail asked for, or the function's error).
    let a = request(
        &mut conn,
        "POST",
        &format!("{STREAM}/logger/response-streaming-invocations"),
        &[("X-Amz-Log-Type", "Tail")],
        r#"{"streamed":1}"#,
    );
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers["content-type"],
        "application/vnd.amazon.eventstream"
    );
    let events = event_stream(&a.raw);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0],
        ("PayloadChunk".to_owned(), br#"{"ok":true}"#.to_vec())
    );
    assert_eq!(events[1].0, "InvokeComplete");
    let complete: serde_json::Value = serde_json::from_slice(&events[1].1).unwrap();
    let log = base64::engine::general_purpose::STANDARD
        .decode(complete["LogResult"].as_str().unwrap())
        .unwrap();
    assert!(
        String::from_utf8(log)
            .unwrap()
            .contains(r#"EVENT {"streamed":1}"#)
    );
    assert!(complete.get("ErrorCode").is_none(), "{complete}");
    let a = request(
        &mut conn,
        "POST",
        &format!("{STREAM}/fail/response-streaming-invocations"),
        &[],
        "{}",
    );
    let events = event_stream(&a.raw);
    assert_eq!(events.len(), 1, "no PayloadChunk for a failure: {events:?}");
    let complete: serde_json::Value = serde_json::from_slice(&events[0].1).unwrap();
    assert_eq!(complete["ErrorCode"], "OrderRejected", "{complete}");
    assert!(
        complete["ErrorDetails"]
            .as_str()
            .unwrap()
            .contains("order rejected")
    );
    let a = request(
        &mut conn,
        "POST",
        &format!("{STREAM}/echo/response-streaming-invocations"),
        &[("X-Amz-Invocation-Type", "Event")],
        "{}",
    );
    assert_eq!(a.status, 400, "no Event for a streamed call");
    let a = request(
        &mut conn,
        "POST",
        &format!("{STREAM}/nope/response-streaming-invocations"),
        &[],
        "{}",
    );
    assert_eq!(a.headers["x-amzn-errortype"], "ResourceNotFoundException");
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/echo/invocations"),
        &[("X-Amz-Log-Type", "Everything")],
        "{}",
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.headers["x-amzn-errortype"],
        "InvalidParameterValueException"
    );

    // DryRun, and the service's errors.
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/echo/invocations"),
        &[("X-Amz-Invocation-Type", "DryRun")],
        "",
    );
    assert_eq!(a.status, 204);
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/nope/invocations"),
        &[],
        "{}",
    );
    assert_eq!(a.status, 404);
    assert_eq!(a.headers["x-amzn-errortype"], "ResourceNotFoundException");
    assert!(a.body.contains("function:nope"), "{}", a.body);
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/echo/invocations"),
        &[],
        "not json",
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.headers["x-amzn-errortype"],
        "InvalidRequestContentException"
    );
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/echo/invocations"),
        &[("X-Amz-Client-Context", "not base64")],
        "{}",
    );
    assert_eq!(a.status, 400);
    let a = request(
        &mut conn,
        "GET",
        &format!("{INVOKE}/echo/invocations"),
        &[],
        "",
    );
    assert_eq!(a.status, 405);
    let a = request(&mut conn, "GET", "/2015-03-31/aliases", &[], "");
    assert_eq!(a.status, 404);
    assert_eq!(a.headers["x-amzn-errortype"], "UnknownOperationException");

    // ListFunctions, GetFunction, GetFunctionConfiguration.
    let a = request(&mut conn, "GET", "/2015-03-31/functions/", &[], "");
    let listed: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let names: Vec<&str> = listed["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["FunctionName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "fail", "logger"]);
    let a = request(
        &mut conn,
        "GET",
        &format!("{INVOKE}/echo/configuration"),
        &[],
        "",
    );
    let config: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(config["FunctionArn"], sluice_executor::function_arn("echo"));
    assert_eq!(
        (config["MemorySize"].as_u64(), config["Timeout"].as_u64()),
        (Some(128), Some(3))
    );
    assert_eq!(config["State"], "Active");
    assert!(config.get("Environment").is_none());
    let a = request(&mut conn, "GET", &format!("{INVOKE}/{arn}"), &[], "");
    let function: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(
        function["Configuration"]["FunctionName"], "echo",
        "{function}"
    );
    let a = request(&mut conn, "GET", &format!("{INVOKE}/nope"), &[], "");
    assert_eq!(a.headers["x-amzn-errortype"], "ResourceNotFoundException");

    // An asynchronous call that fails (no retries here) is recorded in
    // Lambda's on-failure destination format once the server stopped.
    let a = request(
        &mut conn,
        "POST",
        &format!("{INVOKE}/fail/invocations"),
        &[("X-Amz-Invocation-Type", "Event")],
        r#"{"order":9}"#,
    );
    assert_eq!(a.status, 202);
    let failed_id = a.headers["x-amzn-requestid"].clone();

    // A stop closes an idle kept-alive connection at once (an SDK's pool
    // keeps them open) rather than waiting for it.
    let _ = stop.send(());
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), server).await })
        .expect("the server stops with an idle connection open")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        conn.read_to_end(&mut rest).unwrap(),
        0,
        "closed by the server"
    );
    let records = std::fs::read_to_string(&failed).unwrap();
    let lines: Vec<serde_json::Value> = records
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{records}");
    let r = &lines[0];
    assert_eq!(r["requestContext"]["requestId"], failed_id.as_str());
    assert_eq!(r["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(r["requestPayload"], serde_json::json!({"order": 9}));
    assert_eq!(r["responsePayload"]["errorType"], "OrderRejected", "{r}");
    assert_eq!(r["responseContext"]["functionError"], "Unhandled", "{r}");
    // The Event calls that succeeded (the logger's), in the on-success file.
    let succeeded: Vec<serde_json::Value> = std::fs::read_to_string(&succeeded)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(succeeded.len(), 1, "{succeeded:?}");
    assert_eq!(succeeded[0]["requestContext"]["condition"], "Success");
    assert_eq!(
        succeeded[0]["requestPayload"],
        serde_json::json!({"async": "yes"})
    );
    assert_eq!(
        succeeded[0]["responsePayload"],
        serde_json::json!({"ok": true})
    );
    rt.block_on(executor.shutdown());
}
