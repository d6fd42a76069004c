//! `sluice-agent --init`, the `/init` of a microVM guest, run for real as
//! PID 1 of new user, mount and PID namespaces (`unshare`): it mounts the
//! guest file systems it is allowed to there (`/proc`, `/tmp`, `/run`; a
//! user namespace may not mount devtmpfs or sysfs, which the guest kernel
//! allows), then serves a function over the channel it was given. The
//! function sees the agent as PID 1 and the mounts in its mount table.

use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_protocol::{DEFAULT_MAX_FRAME, Message, StartConfig, read_message, write_message};

const FUNCTION: &str = r#"#!/bin/bash
echo "pid1=$(cat /proc/1/comm) mounts=$(awk '$9 == "proc" || $9 == "tmpfs" {printf "%s:%s ", $5, $9}' /proc/self/mountinfo)"
exec sleep 600
"#;

fn unshare_works() -> bool {
    Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--pid",
            "--fork",
            "true",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn init_mode_mounts_and_serves_as_pid_1() {
    if !unshare_works() {
        eprintln!("\n*** SKIPPED: unshare --user --mount --pid does not work here ***\n");
        return;
    }
    // Not under /tmp or /run: the agent mounts fresh tmpfs there, which
    // would hide the socket and the function (the checkout itself may live
    // under /tmp).
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if base.starts_with("/tmp") || base.starts_with("/run") {
        Path::new("/var/tmp")
    } else {
        base
    };
    let tmp = tempfile::tempdir_in(base).unwrap();
    let fdir = tmp.path().join("fn");
    std::fs::create_dir(&fdir).unwrap();
    let bootstrap = fdir.join("bootstrap");
    std::fs::write(&bootstrap, FUNCTION).unwrap();
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = tmp.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut agent = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--pid", "--fork"])
        .arg(env!("CARGO_BIN_EXE_sluice-agent"))
        .args(["--init", "--channel", &format!("unix:{}", sock.display())])
        .spawn()
        .unwrap();
    // Accept on a thread, so that an agent that never connects fails the
    // test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept());
    });
    let stream = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok((stream, _))) => stream,
        other => {
            let _ = agent.kill();
            let status = agent.wait();
            panic!(
                "the agent never connected to {}: {other:?} (agent: {status:?})",
                sock.display()
            );
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let config = StartConfig {
        function_name: "init".into(),
        function_version: "1".into(),
        memory_mb: 128,
        handler: "h.main".into(),
        log_group: "g".into(),
        log_stream: "s".into(),
        function_dir: fdir.to_string_lossy().into_owned(),
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
    };
    write_message(&mut w, &Message::Start(Box::new(config))).unwrap();
    let line = loop {
        match read_message(&mut r, DEFAULT_MAX_FRAME)
            .unwrap()
            .expect("frame")
        {
            Message::Log { line, .. } => {
                let line = String::from_utf8_lossy(&line).into_owned();
                if line.contains("pid1=") {
                    break line;
                }
            }
            Message::Ready { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(line.contains("pid1=sluice-agent"), "{line}");
    for m in ["/proc:proc", "/tmp:tmpfs", "/run:tmpfs"] {
        assert!(line.contains(m), "{m} not mounted: {line}");
    }
    write_message(&mut w, &Message::Shutdown).unwrap();
    // The reboot that ends a guest ends this PID namespace instead.
    let _ = agent.wait().unwrap();
}
