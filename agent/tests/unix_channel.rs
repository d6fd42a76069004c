//! The agent over a pluggable transport: a Unix socket instead of pipes, and
//! no isolation (as inside a microVM, where the VM is the sandbox). A bash
//! function answers through the real Runtime API.

use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use sluice_protocol::{DEFAULT_MAX_FRAME, Message, StartConfig, read_message, write_message};

const FUNCTION: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
echo "starting $_HANDLER"
while true; do
  H=$(mktemp)
  EVENT=$(curl -sS -D "$H" "$API/invocation/next")
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$H" | cut -d: -f2 | tr -d '[:space:]')
  if [ "$EVENT" = '"fail"' ]; then
    curl -sS -X POST -H 'Lambda-Runtime-Function-Error-Type: Bad.Input' "$API/invocation/$ID/error" \
      -d '{"errorType":"Bad.Input","errorMessage":"asked to fail"}' >/dev/null
  else
    curl -sS -X POST "$API/invocation/$ID/response" -d "{\"echo\": $EVENT}" >/dev/null
  fi
  rm -f "$H"
done
"#;

fn config(dir: &std::path::Path) -> StartConfig {
    StartConfig {
        function_name: "unix".into(),
        function_version: "1".into(),
        memory_mb: 128,
        handler: "h.main".into(),
        log_group: "g".into(),
        log_stream: "s".into(),
        function_dir: dir.to_string_lossy().into_owned(),
        task_root: "/var/task".into(),
        root_dir: String::new(),
        runtime_layers: vec![],
        tmp_mb: 16,
        rlimit_nproc: 0,
        rlimit_as_bytes: 0,
        runtime_api_port: 0,
        env: vec![],
        run_as: None,
        isolate: false,
    }
}

#[test]
fn serves_a_function_over_a_unix_socket_channel() {
    let tmp = tempfile::tempdir().unwrap();
    let fdir = tmp.path().join("fn");
    std::fs::create_dir(&fdir).unwrap();
    let bootstrap = fdir.join("bootstrap");
    std::fs::write(&bootstrap, FUNCTION).unwrap();
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = tmp.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();

    let mut agent = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
        .arg("--channel")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    write_message(&mut w, &Message::Start(Box::new(config(&fdir)))).unwrap();

    let mut next = || loop {
        match read_message(&mut r, DEFAULT_MAX_FRAME)
            .unwrap()
            .expect("frame")
        {
            Message::Log { line, .. } => {
                let line = String::from_utf8_lossy(&line).into_owned();
                assert!(!line.contains("error"), "{line}");
            }
            m => return m,
        }
    };
    assert!(matches!(next(), Message::Ready { .. }));
    for (i, event) in ["{\"n\":1}", "[1,2,3]", "\"fail\""].iter().enumerate() {
        let id = format!("req-{i}");
        write_message(
            &mut w,
            &Message::Invoke {
                request_id: id.clone(),
                deadline_ms: 0,
                invoked_function_arn: "arn".into(),
                trace_id: "t".into(),
                client_context: String::new(),
                payload: event.as_bytes().to_vec().into(),
            },
        )
        .unwrap();
        match next() {
            Message::Response { request_id, body } => {
                assert_eq!(request_id, id);
                assert_eq!(
                    String::from_utf8(body).unwrap(),
                    format!("{{\"echo\": {event}}}")
                );
            }
            Message::Error {
                request_id,
                error_type,
                body,
            } => {
                assert_eq!(
                    (request_id.as_str(), error_type.as_str()),
                    ("req-2", "Bad.Input")
                );
                assert!(String::from_utf8(body).unwrap().contains("asked to fail"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    write_message(&mut w, &Message::Shutdown).unwrap();
    let status = agent.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_missing_bootstrap_is_an_init_error() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
        .args(["--channel", &format!("unix:{}", sock.display())])
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    write_message(&mut w, &Message::Start(Box::new(config(tmp.path())))).unwrap();
    match read_message(&mut r, DEFAULT_MAX_FRAME).unwrap().unwrap() {
        Message::InitError { error_type, .. } => {
            assert_eq!(error_type, "Runtime.InvalidEntrypoint")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        read_message(&mut r, DEFAULT_MAX_FRAME).unwrap().unwrap(),
        Message::Exited(_)
    ));
    let _ = agent.wait();
}
