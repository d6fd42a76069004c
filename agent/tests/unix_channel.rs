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
        layers: vec![],
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

/// Answers every event with the identity headers of its `next`.
const IDENTITY_FUNCTION: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  H=$(mktemp)
  curl -sS -D "$H" "$API/invocation/next" >/dev/null
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$H" | cut -d: -f2 | tr -d '[:space:]')
  SB=$(grep -i '^Sluice-Sandbox-Id:' "$H" | cut -d: -f2- | tr -d '[:space:]')
  LS=$(grep -i '^Sluice-Log-Stream:' "$H" | cut -d: -f2- | tr -d '[:space:]')
  curl -sS -X POST "$API/invocation/$ID/response" -d "{\"sandbox\":\"$SB\",\"stream\":\"$LS\"}" >/dev/null
  rm -f "$H"
done
"#;

struct Agent {
    child: std::process::Child,
    w: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
}

impl Agent {
    fn start(tmp: &std::path::Path, entropy: &std::path::Path) -> Self {
        let fdir = tmp.join("fn");
        std::fs::create_dir(&fdir).unwrap();
        let bootstrap = fdir.join("bootstrap");
        std::fs::write(&bootstrap, IDENTITY_FUNCTION).unwrap();
        std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = tmp.join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
            .args(["--channel", &format!("unix:{}", sock.display())])
            .arg("--entropy")
            .arg(entropy)
            .spawn()
            .unwrap();
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut w = stream.try_clone().unwrap();
        write_message(&mut w, &Message::Start(Box::new(config(&fdir)))).unwrap();
        let mut a = Agent {
            child,
            w,
            r: BufReader::new(stream),
        };
        assert!(matches!(a.next(), Message::Ready { .. }));
        a
    }

    fn next(&mut self) -> Message {
        read_message(&mut self.r, DEFAULT_MAX_FRAME)
            .unwrap()
            .expect("frame")
    }

    fn invoke(&mut self, id: &str) -> String {
        write_message(
            &mut self.w,
            &Message::Invoke {
                request_id: id.into(),
                deadline_ms: 0,
                invoked_function_arn: "arn".into(),
                trace_id: "t".into(),
                client_context: String::new(),
                payload: b"{}".to_vec().into(),
            },
        )
        .unwrap();
        match self.next() {
            Message::Response { request_id, body } if request_id == id => {
                String::from_utf8(body).unwrap()
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn restored(seed: u8, id: &str) -> Message {
    Message::Restored {
        seed: [seed; sluice_protocol::SEED_LEN],
        sandbox_id: id.into(),
        log_stream: format!("t/[$LATEST]{id}"),
        unix_time_ns: 1_764_000_000_000_000_000,
    }
}

#[test]
fn a_restored_clone_mixes_its_seed_and_takes_its_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let entropy = tmp.path().join("entropy");
    std::fs::write(&entropy, b"").unwrap();
    let mut a = Agent::start(tmp.path(), &entropy);
    // Before any restore: no identity headers.
    assert_eq!(a.invoke("req-0"), r#"{"sandbox":"","stream":""}"#);

    for (seed, id) in [(7u8, "0123abcd"), (9, "ffff0000")] {
        write_message(&mut a.w, &restored(seed, id)).unwrap();
        match a.next() {
            Message::Log {
                stream: sluice_protocol::LogStream::Agent,
                line,
            } => {
                let line = String::from_utf8(line).unwrap();
                assert!(line.contains(id) && line.contains("restored"), "{line}");
            }
            other => panic!("expected the agent's log line, got {other:?}"),
        }
        assert!(matches!(a.next(), Message::Ready { .. }));
        assert_eq!(
            std::fs::read(&entropy).unwrap(),
            [seed; sluice_protocol::SEED_LEN],
            "the seed went to the entropy sink"
        );
        // The function sees the clone's identity in its next invocation.
        assert_eq!(
            a.invoke(&format!("req-{id}")),
            format!(r#"{{"sandbox":"{id}","stream":"t/[$LATEST]{id}"}}"#)
        );
    }
    write_message(&mut a.w, &Message::Shutdown).unwrap();
    assert!(a.child.wait().unwrap().success());
}

#[test]
fn a_clone_whose_seed_cannot_be_mixed_stops_with_a_fatal_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Agent::start(tmp.path(), &tmp.path().join("no/such/entropy"));
    write_message(&mut a.w, &restored(1, "abcd")).unwrap();
    match a.next() {
        Message::Fatal { message } => assert!(message.contains("seed"), "{message}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    assert!(!a.child.wait().unwrap().success());
}
