//! The executor and the process sandbox against real functions: the official
//! `lambda_runtime` echo, a function that misbehaves on request, and shell
//! scripts. Every test starts real sandboxes (namespaces, cgroups, seccomp).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{
    Backend, Executor, FunctionSpec, Invocation, InvokeError, InvokeOptions, LogSink, SandboxError,
};
use sluice_test_support::{FunctionFixture, agent_binary, function_fixture, script_fixture};

fn executor() -> Executor {
    let backend = ProcessBackend::new(ProcessConfig::detect(agent_binary()));
    Executor::new(Arc::new(backend))
}

fn spec(name: &str, f: &FunctionFixture) -> FunctionSpec {
    let mut s = FunctionSpec::new(name, &f.dir);
    s.timeout = Duration::from_secs(5);
    s
}

async fn call(ex: &Executor, f: &str, v: Value) -> Result<Value, InvokeError> {
    let r = ex.invoke(f, v.to_string()).await?;
    Ok(serde_json::from_slice(&r.payload).expect("response is JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_1000_times_through_the_warm_pool() {
    let f = function_fixture("echo");
    let ex = executor();
    let mut s = spec("echo", &f);
    s.concurrency = 4;
    ex.register(s);
    let mut tasks = Vec::new();
    for w in 0..4 {
        let ex = ex.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let payload = json!({"worker": w, "i": i, "pad": "x".repeat(i)});
                let got = call(&ex, "echo", payload.clone())
                    .await
                    .expect("echo works");
                assert_eq!(got, payload);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let st = ex.stats("echo").unwrap();
    assert_eq!(st.invocations, 1000);
    assert_eq!(st.errors, 0);
    assert!(st.cold_starts <= 4, "{st:?}");
    assert_eq!(st.warm_starts, 1000 - st.cold_starts);
    assert!(st.peak_busy <= 4);
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds_under_50_parallel_callers() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("slow", &f);
    s.concurrency = 3;
    s.max_queue = 100;
    ex.register(s);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let ex = ex.clone();
        tasks.push(tokio::spawn(async move {
            call(&ex, "slow", json!({"action": "sleep", "ms": 20, "i": i})).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), json!({"slept_ms": 20}));
    }
    let st = ex.stats("slow").unwrap();
    assert_eq!(st.invocations, 50);
    assert_eq!(st.peak_busy, 3, "{st:?}");
    assert!(st.cold_starts <= 3, "{st:?}");
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_queue_bound_are_throttled() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("one", &f);
    s.concurrency = 1;
    s.max_queue = 0;
    ex.register(s);
    // Warm it up so that the slow call holds the only slot.
    call(&ex, "one", json!({})).await.unwrap();
    let ex2 = ex.clone();
    let slow =
        tokio::spawn(
            async move { call(&ex2, "one", json!({"action": "sleep", "ms": 1500})).await },
        );
    // Wait until the slow call holds the slot (observed, not slept).
    let start = Instant::now();
    while ex.stats("one").unwrap().busy == 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::task::yield_now().await;
    }
    let err = call(&ex, "one", json!({})).await.unwrap_err();
    assert!(
        matches!(
            err,
            InvokeError::Throttled {
                concurrency: 1,
                max_queue: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.retryable());
    assert_eq!(slow.await.unwrap().unwrap(), json!({"slept_ms": 1500}));
    assert_eq!(ex.stats("one").unwrap().throttles, 1);
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_killed_at_its_timeout_and_the_next_call_works() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("loop", &f);
    s.timeout = Duration::from_millis(1500);
    ex.register(s);
    let t0 = Instant::now();
    let err = call(&ex, "loop", json!({"action": "loop"}))
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::Timeout { .. }), "{err}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let r = ex
        .invoke("loop", json!({"action": "echo", "n": 1}).to_string())
        .await
        .unwrap();
    assert!(r.cold_start, "a timed-out sandbox is never reused");
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_gets_out_of_memory() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("hog", &f);
    s.memory_mb = 128;
    ex.register(s);
    let err = call(&ex, "hog", json!({"action": "alloc", "mb": 400}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InvokeError::OutOfMemory { limit_mb: 128, .. }),
        "{err}"
    );
    // Within the limit it works, in a fresh sandbox.
    assert_eq!(
        call(&ex, "hog", json!({"action": "alloc", "mb": 32}))
            .await
            .unwrap(),
        json!({"allocated_mb": 32})
    );
    ex.shutdown().await;
}

/// Lambda's REPORT of each call: the sandbox's peak memory grows with what
/// the function touched and never goes down while it stays warm, a cold
/// start says how long its initialisation took, and an out-of-memory kill
/// is reported with its error type at about the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_reports_its_duration_and_the_sandboxs_peak_memory() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("hog", &f);
    s.memory_mb = 128;
    ex.register(s);
    const MB: u64 = 1 << 20;
    let reported = |v: Value| {
        let ex = ex.clone();
        async move {
            let (r, report) = ex
                .invoke_reported("hog", v.to_string(), InvokeOptions::default())
                .await;
            let report = report.and_then(sluice_executor::Reported::invocation);
            (r, report.expect("the call reached a sandbox"))
        }
    };
    let (r, first) = reported(json!({"action": "echo"})).await;
    assert!(r.unwrap().cold_start);
    assert!(first.init_duration.is_some(), "{first}");
    assert_eq!(first.memory_mb, 128);
    let base = first.max_memory_used.expect("cgroups keep the peak");
    assert!(base < 32 * MB, "{first}");
    assert!(
        first.to_string().starts_with("REPORT RequestId: "),
        "{first}"
    );

    let (r, grown) = reported(json!({"action": "alloc", "mb": 48})).await;
    assert!(!r.unwrap().cold_start);
    assert_eq!(grown.init_duration, None, "{grown}");
    let peak = grown.max_memory_used.unwrap();
    // At least the 48 MiB touched; not necessarily on top of all of the
    // first figure (part of it was page cache, which can go).
    assert!(
        peak > base && (48 * MB..128 * MB).contains(&peak),
        "{grown}"
    );
    let (_, after) = reported(json!({"action": "echo"})).await;
    assert!(after.max_memory_used.unwrap() >= peak, "{after}");
    assert!(ex.stats("hog").unwrap().max_memory_used.unwrap() >= peak);

    let (r, killed) = reported(json!({"action": "alloc", "mb": 400})).await;
    assert!(matches!(r, Err(InvokeError::OutOfMemory { .. })));
    assert!(
        killed
            .to_string()
            .ends_with("\tStatus: error\tError Type: Runtime.OutOfMemory"),
        "{killed}"
    );
    assert!(killed.max_memory_used.unwrap() >= 120 * MB, "{killed}");
    ex.shutdown().await;
}

/// Without cgroups (a laptop where sluice is not root), Max Memory Used is
/// estimated from the sandbox's processes' own peaks (`VmHWM`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_the_peak_memory_comes_from_the_processes() {
    use sluice_executor::process::CgroupSupport;
    let f = function_fixture("misbehave");
    let cfg = ProcessConfig {
        cgroups: CgroupSupport::None {
            reason: "the test asks for none".into(),
        },
        ..ProcessConfig::detect(agent_binary())
    };
    let ex = Executor::new(Arc::new(ProcessBackend::new(cfg)));
    let mut s = spec("hog", &f);
    s.memory_mb = 1024;
    ex.register(s);
    const MB: u64 = 1 << 20;
    let (r, before) = ex
        .invoke_reported(
            "hog",
            json!({"action": "echo"}).to_string(),
            InvokeOptions::default(),
        )
        .await;
    r.unwrap();
    let base = before
        .and_then(sluice_executor::Reported::invocation)
        .unwrap()
        .max_memory_used
        .expect("an estimate");
    let (r, after) = ex
        .invoke_reported(
            "hog",
            json!({"action": "alloc", "mb": 48}).to_string(),
            InvokeOptions::default(),
        )
        .await;
    r.unwrap();
    let peak = after
        .and_then(sluice_executor::Reported::invocation)
        .unwrap()
        .max_memory_used
        .unwrap();
    assert!(base > 0 && base < 64 * MB, "{base}");
    assert!(
        peak > base && (48 * MB..512 * MB).contains(&peak),
        "{base} then {peak}"
    );
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_contained() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("bomb", &f);
    s.max_processes = 64;
    s.timeout = Duration::from_secs(3);
    ex.register(s);
    let err = call(&ex, "bomb", json!({"action": "fork_bomb"}))
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::Timeout { .. }), "{err}");
    // The host is fine and the function works again in a new sandbox.
    assert_eq!(
        call(&ex, "bomb", json!({"x": 1})).await.unwrap(),
        json!({"x": 1})
    );
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_exits_during_init_reports_an_init_error() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("badinit", &f);
    s.env.push(("MISBEHAVE_INIT".into(), "exit".into()));
    ex.register(s);
    let err = call(&ex, "badinit", json!({})).await.unwrap_err();
    match &err {
        InvokeError::InitFailed {
            error_type,
            message,
            ..
        } => {
            assert_eq!(error_type, "Runtime.ExitError");
            assert!(message.contains("status 3"), "{message}");
        }
        other => panic!("expected InitFailed, got {other}"),
    }
    assert!(!err.retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_timeout_is_enforced() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("slowinit", &f);
    s.env.push(("MISBEHAVE_INIT".into(), "sleep".into()));
    s.init_timeout = Duration::from_millis(1500);
    ex.register(s);
    let err = call(&ex, "slowinit", json!({})).await.unwrap_err();
    assert!(
        matches!(&err, InvokeError::InitFailed { error_type, .. } if error_type == "Runtime.InitTimeout"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_are_out_of_reach() {
    let f = function_fixture("misbehave");
    let ex = executor();
    ex.register(spec("reader", &f));
    // /etc/passwd exists in the sandbox, but it is not the host's.
    let host = std::fs::read_to_string("/etc/passwd").unwrap();
    let got = call(
        &ex,
        "reader",
        json!({"action": "read_file", "path": "/etc/passwd"}),
    )
    .await
    .unwrap();
    let inside = got["content"].as_str().unwrap();
    assert_ne!(inside, host);
    assert!(!inside.contains("/root:"), "{inside}");
    // A host file outside the function folder, by absolute path.
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret, "top secret").unwrap();
    let path = secret.path().to_str().unwrap().to_owned();
    let err = call(&ex, "reader", json!({"action": "read_file", "path": path}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InvokeError::Function { error_type, .. } if error_type == "ReadFailed"),
        "{err}"
    );
    for p in [
        "/root/.bashrc",
        "/proc/1/root/etc/shadow",
        "/etc/shadow",
        "/sys/kernel/notes",
    ] {
        let err = call(&ex, "reader", json!({"action": "read_file", "path": p}))
            .await
            .unwrap_err();
        assert!(matches!(&err, InvokeError::Function { .. }), "{p}: {err}");
    }
    // The sandbox's own files are readable.
    let own = call(
        &ex,
        "reader",
        json!({"action": "read_file", "path": "/etc/hostname"}),
    )
    .await;
    assert_eq!(own.unwrap()["content"], "sandbox\n");
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachment_is_a_read_only_file_for_its_invocation_only() {
    let f = function_fixture("misbehave");
    let ex = executor();
    ex.register(spec("reader", &f));
    let path = sluice_protocol::ATTACHMENT_PATH;
    let with = |data: Vec<u8>| InvokeOptions {
        attachment: Some(data.into()),
        ..Default::default()
    };
    let answer =
        |r: sluice_executor::Response| -> Value { serde_json::from_slice(&r.payload).unwrap() };

    // Larger than an event may be (6 MB), with every byte value.
    let big: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = big.iter().map(|&b| u64::from(b)).sum();
    let digest = json!({"action": "file_digest", "path": path}).to_string();
    let r = ex
        .invoke_with("reader", digest.clone(), with(big))
        .await
        .unwrap();
    assert_eq!(answer(r), json!({"len": 20_000_000, "sum": sum}));

    // Each invocation sees its own; the sandbox is reused.
    let read = json!({"action": "read_file", "path": path}).to_string();
    let r = ex
        .invoke_with("reader", read.clone(), with(b"second".to_vec()))
        .await
        .unwrap();
    assert!(!r.cold_start);
    assert_eq!(answer(r)["content"], "second");

    // The function cannot change it.
    let write = json!({"action": "write_file", "path": path, "content": "mine"}).to_string();
    let err = ex
        .invoke_with("reader", write, with(b"third".to_vec()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InvokeError::Function { error_type, .. } if error_type == "WriteFailed"),
        "{err}"
    );

    // An invocation without one finds nothing left behind.
    let err = ex.invoke("reader", read).await.unwrap_err();
    assert!(
        matches!(&err, InvokeError::Function { error_type, .. } if error_type == "ReadFailed"),
        "{err}"
    );
    let st = ex.stats("reader").unwrap();
    assert_eq!((st.cold_starts, st.invocations), (1, 4), "{st:?}");

    // Over the attachment limit: refused before any sandbox sees it.
    let huge = vec![0u8; sluice_protocol::MAX_ATTACHMENT + 1];
    let err = ex
        .invoke_with("reader", digest, with(huge))
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::PayloadTooLarge { .. }), "{err}");
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_connections_even_to_host_loopback() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let f = function_fixture("misbehave");
    let ex = executor();
    ex.register(spec("net", &f));
    let err = call(&ex, "net", json!({"action": "connect", "addr": addr}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InvokeError::Function { error_type, .. } if error_type == "ConnectFailed"),
        "{err}"
    );
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "nothing reached the host listener"
    );
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lambda_environment_is_set() {
    let f = function_fixture("misbehave");
    let ex = executor();
    let mut s = spec("envfn", &f);
    s.memory_mb = 256;
    s.handler = "my.handler".into();
    s.env.push(("GREETING".into(), "hi".into()));
    ex.register(s);
    let env = call(&ex, "envfn", json!({"action": "env"})).await.unwrap();
    assert_eq!(env["AWS_LAMBDA_FUNCTION_NAME"], "envfn");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "256");
    assert_eq!(env["_HANDLER"], "my.handler");
    assert_eq!(env["LAMBDA_TASK_ROOT"], "/var/task");
    assert_eq!(env["GREETING"], "hi");
    // What SDK clients made at init need, and Lambda's initialization type.
    assert_eq!(env["AWS_REGION"], "sluice-local");
    assert_eq!(env["AWS_DEFAULT_REGION"], "sluice-local");
    assert_eq!(env["AWS_LAMBDA_INITIALIZATION_TYPE"], "on-demand");
    for k in [
        "AWS_LAMBDA_RUNTIME_API",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
    ] {
        assert!(env[k].is_string(), "{k} missing: {env}");
    }
    ex.shutdown().await;
}

/// A bash runtime: for each invocation, `body` runs with the event in
/// `/tmp/event` and sets `BODY` to the JSON response.
fn shell_runtime(body: &str) -> String {
    format!(
        r#"#!/bin/bash
API="http://${{AWS_LAMBDA_RUNTIME_API}}/2018-06-01/runtime"
while true; do
  H=$(mktemp)
  curl -sS -D "$H" -o /tmp/event "$API/invocation/next"
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$H" | cut -d: -f2 | tr -d '[:space:]')
{body}
  curl -sS -X POST "$API/invocation/$ID/response" -d "$BODY" >/dev/null
done
"#
    )
}

/// Counts its invocations in /tmp: shows whether a sandbox was reused.
fn counter() -> String {
    shell_runtime(
        r#"  N=$(( $(cat /tmp/count 2>/dev/null || echo 0) + 1 ))
  echo "$N" > /tmp/count
  BODY="{\"count\": $N}""#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reuse_is_per_tenant_and_per_version() {
    let f = script_fixture(&counter());
    let ex = executor();
    let mut s = spec("counter", &f);
    s.concurrency = 4;
    ex.register(s.clone());
    let as_tenant = |t: &'static str| InvokeOptions {
        tenant: Some(t.into()),
        ..Default::default()
    };
    let count = |r: sluice_executor::Response| -> u64 {
        serde_json::from_slice::<Value>(&r.payload).unwrap()["count"]
            .as_u64()
            .unwrap()
    };
    let a1 = ex
        .invoke_with("counter", "{}", as_tenant("a"))
        .await
        .unwrap();
    assert!(a1.cold_start);
    assert_eq!(count(a1), 1);
    let a2 = ex
        .invoke_with("counter", "{}", as_tenant("a"))
        .await
        .unwrap();
    assert!(!a2.cold_start);
    assert_eq!(count(a2), 2);
    // Tenant b never sees tenant a's sandbox.
    let b1 = ex
        .invoke_with("counter", "{}", as_tenant("b"))
        .await
        .unwrap();
    assert!(b1.cold_start);
    assert_eq!(count(b1), 1);
    // Another function on the same folder never shares either.
    let mut other = s.clone();
    other.name = "counter2".into();
    ex.register(other);
    assert_eq!(
        count(
            ex.invoke_with("counter2", "{}", as_tenant("a"))
                .await
                .unwrap()
        ),
        1
    );
    // A new version (changed settings) does not reuse the old sandboxes.
    s.env.push(("V".into(), "2".into()));
    ex.register(s);
    let a3 = ex
        .invoke_with("counter", "{}", as_tenant("a"))
        .await
        .unwrap();
    assert!(a3.cold_start);
    assert_eq!(count(a3), 1);
    ex.shutdown().await;
}

/// Reports what the function sees of its layers at `/opt`.
fn layer_probe() -> String {
    shell_runtime(
        r#"  GREET=$(greet 2>&1)
  SHARED=$(cat /opt/shared.txt)
  ONLY1=$(cat /opt/only1.txt 2>/dev/null || echo missing)
  MOUNT=$(grep ' /opt ' /proc/mounts | cut -d' ' -f3,4 | cut -d, -f1)
  if touch /opt/new 2>/dev/null; then WROTE=true; else WROTE=false; fi
  BODY="{\"greet\": \"$GREET\", \"shared\": \"$SHARED\", \"only1\": \"$ONLY1\", \"mount\": \"$MOUNT\", \"wrote\": $WROTE, \"ld\": \"$LD_LIBRARY_PATH\", \"path\": \"$PATH\"}""#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_are_merged_read_only_at_opt_a_later_ones_files_winning() {
    use std::os::unix::fs::PermissionsExt;
    let f = script_fixture(&layer_probe());
    let base = f.dir.parent().expect("the fixture's folder");
    let layer = |name: &str, files: &[(&str, &str)]| {
        let dir = base.join(name);
        for (path, text) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, text).unwrap();
            let mode = if path.starts_with("bin/") {
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    };
    let one = layer(
        "layer-one",
        &[
            ("bin/greet", "#!/bin/sh\necho hello from layer one\n"),
            ("shared.txt", "one"),
            ("only1.txt", "1"),
        ],
    );
    let two = layer(
        "layer-two",
        &[("shared.txt", "two"), ("lib/README", "libs")],
    );
    let ex = executor();
    let mut both = spec("layered", &f);
    both.layers = vec![one.clone(), two.clone()];
    ex.register(both.clone());
    let mut single = spec("one-layer", &f);
    single.layers = vec![two.clone()];
    ex.register(single);

    let seen = call(&ex, "layered", json!({})).await.unwrap();
    // A later layer's file over an earlier one's; the earlier one's other
    // files, its `bin` on PATH; all of it read-only.
    assert_eq!(seen["shared"], "two", "{seen}");
    assert_eq!(seen["only1"], "1", "{seen}");
    assert_eq!(seen["greet"], "hello from layer one", "{seen}");
    assert_eq!(seen["mount"], "overlay ro", "{seen}");
    assert_eq!(seen["wrote"], false, "{seen}");
    assert!(
        seen["path"].as_str().unwrap().ends_with(":/opt/bin"),
        "{seen}"
    );
    assert!(
        seen["ld"].as_str().unwrap().ends_with(":/opt/lib"),
        "{seen}"
    );
    // One layer is bound there as it is.
    let seen = call(&ex, "one-layer", json!({})).await.unwrap();
    assert_eq!(seen["shared"], "two", "{seen}");
    assert_eq!(seen["only1"], "missing", "{seen}");
    assert!(seen["mount"].as_str().unwrap().ends_with(" ro"), "{seen}");
    assert_eq!(seen["wrote"], false, "{seen}");

    // A changed layer is a new version of the function: its warm sandboxes
    // are not reused, and the next call sees the change.
    let before = both.version();
    std::fs::write(two.join("shared.txt"), "two, again").unwrap();
    assert_ne!(both.version(), before);
    ex.register(both);
    let r = ex.invoke("layered", "{}").await.unwrap();
    assert!(r.cold_start);
    let seen: Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(seen["shared"], "two, again", "{seen}");
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_shipped_as_a_layer_runs_a_function_folder_without_bootstrap() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(tmp.path(), 0o755);
    // The function: only what its runtime reads.
    let function = tmp.path().join("function");
    std::fs::create_dir(&function).unwrap();
    mode(&function, 0o755);
    std::fs::write(function.join("greeting.txt"), "hello from the function").unwrap();
    // The runtime: a layer whose `bootstrap` Lambda would run as
    // /opt/bootstrap.
    let runtime = tmp.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    mode(&runtime, 0o755);
    let bootstrap = runtime.join("bootstrap");
    std::fs::write(
        &bootstrap,
        shell_runtime(
            r#"  BODY="{\"greeting\": \"$(cat "$LAMBDA_TASK_ROOT/greeting.txt")\", \"runtime\": \"$0\", \"cwd\": \"$PWD\"}""#,
        ),
    )
    .unwrap();
    mode(&bootstrap, 0o755);
    let ex = executor();
    let mut s = FunctionSpec::new("layered-runtime", &function);
    s.layers = vec![runtime];
    ex.register(s);
    let seen = call(&ex, "layered-runtime", json!({})).await.unwrap();
    assert_eq!(
        seen,
        json!({"greeting": "hello from the function", "runtime": "/opt/bootstrap", "cwd": "/var/task"})
    );
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_are_reaped_after_their_idle_timeout() {
    let f = function_fixture("echo");
    let ex = executor();
    let mut s = spec("echo", &f);
    s.idle_timeout = Duration::from_secs(60);
    ex.register(s);
    call(&ex, "echo", json!(1)).await.unwrap();
    assert_eq!(ex.stats("echo").unwrap().idle, 1);
    // Injected time: not yet idle long enough, then long enough.
    assert_eq!(
        ex.reap_idle(Instant::now() + Duration::from_secs(30)).await,
        0
    );
    assert_eq!(
        ex.reap_idle(Instant::now() + Duration::from_secs(61)).await,
        1
    );
    let st = ex.stats("echo").unwrap();
    assert_eq!((st.idle, st.reaped), (0, 1));
    assert!(ex.invoke("echo", "2").await.unwrap().cold_start);
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_errors_crashes_and_size_limits_are_typed() {
    let fail = function_fixture("fail");
    let mis = function_fixture("misbehave");
    let ex = executor();
    ex.register(spec("fail", &fail));
    ex.register(spec("mis", &mis));

    let err = call(&ex, "fail", json!({"order": 7})).await.unwrap_err();
    match &err {
        InvokeError::Function {
            error_type,
            error_message,
            ..
        } => {
            assert!(!error_type.is_empty());
            assert!(!error_message.is_empty());
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        call(&ex, "fail", json!({"succeed": true})).await.unwrap(),
        json!({"ok": true})
    );

    let err = call(&ex, "mis", json!({"action": "exit", "code": 9}))
        .await
        .unwrap_err();
    assert!(matches!(err, InvokeError::SandboxCrashed { .. }), "{err}");
    assert_eq!(
        call(&ex, "mis", json!({"k": 1})).await.unwrap(),
        json!({"k": 1})
    );

    let err = call(&ex, "mis", json!({"action": "big_response", "mb": 7}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InvokeError::Function { error_type, .. } if error_type == "Function.ResponseSizeTooLarge"),
        "{err}"
    );

    let big = vec![b'x'; 6 * 1024 * 1024 + 1];
    let err = ex.invoke("mis", big).await.unwrap_err();
    assert!(matches!(err, InvokeError::PayloadTooLarge { .. }), "{err}");

    let err = ex.invoke("nope", "{}").await.unwrap_err();
    assert!(matches!(err, InvokeError::UnknownFunction { .. }), "{err}");
    ex.shutdown().await;
}

/// A fake agent that answers with garbage: the host kills it and records a
/// protocol error instead of trusting or buffering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_garbage_or_huge_frames_is_killed() {
    let f = function_fixture("echo");
    for (name, script) in [
        (
            "garbage",
            "#!/bin/sh\nhead -c 100 /dev/urandom | od -An -tx1\nexec sleep 30\n",
        ),
        (
            "huge",
            "#!/bin/sh\nprintf '\\377\\377\\377\\377\\001'\nexec sleep 30\n",
        ),
        (
            "bad-kind",
            "#!/bin/sh\nprintf '\\000\\000\\000\\001\\143'\nexec sleep 30\n",
        ),
    ] {
        let fake = script_fixture(script);
        let backend = ProcessBackend::new(ProcessConfig::detect(fake.dir.join("bootstrap")));
        let ex = Executor::new(Arc::new(backend));
        ex.register(spec("echo", &f));
        let t0 = Instant::now();
        let err = ex.invoke("echo", "{}").await.unwrap_err();
        assert!(
            matches!(
                &err,
                InvokeError::Sandbox {
                    source: SandboxError::Protocol { .. },
                    ..
                }
            ),
            "{name}: {err}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{name}: rejected promptly"
        );
    }
}

/// Answers the CPUs the sandbox's threads may run on: the distinct
/// `Cpus_allowed_list` values of every thread of every process in it.
fn cpus() -> String {
    shell_runtime(
        r#"  CPUS=$(cat /proc/[0-9]*/task/*/status 2>/dev/null | grep '^Cpus_allowed_list:' | cut -f2 | sort -u | tr '\n' ' ')
  BODY="{\"cpus\": \"${CPUS% }\"}""#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_sandboxes_run_on_one_cpu_each_spread_over_the_hosts() {
    let f = script_fixture(&cpus());
    let backend = ProcessBackend::new(ProcessConfig::detect(agent_binary()));
    let placer = backend.cpu_placer().expect("this process's CPUs").clone();
    let allowed: Vec<usize> = placer.load().iter().map(|(c, _)| *c).collect();
    let ours = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_owned())
        })
        .expect("Cpus_allowed_list");
    let logs: LogSink = Arc::new(|_| {});
    async fn cpus_of(sandbox: &mut Box<dyn sluice_executor::Sandbox>) -> String {
        let inv = Invocation {
            request_id: "req".into(),
            deadline_ms: 1_700_000_000_000,
            invoked_function_arn: "arn:aws:lambda:local:000000000000:function:cpus".into(),
            trace_id: String::new(),
            client_context: String::new(),
            payload: b"{}".to_vec(),
            attachment: None,
        };
        let r = sandbox
            .invoke(inv, Duration::from_secs(5))
            .await
            .expect("cpus answers");
        let v: Value = serde_json::from_slice(&r).expect("JSON");
        v["cpus"].as_str().expect("a string").to_owned()
    }

    // Unpinned: the sandbox may run wherever sluice may.
    let mut free = backend
        .start(&spec("cpus", &f), "default", logs.clone())
        .await
        .unwrap();
    assert_eq!(cpus_of(&mut free).await, ours);
    assert!(
        placer.load().iter().all(|(_, n)| *n == 0),
        "{:?}",
        placer.load()
    );

    // Pinned: every thread of each sandbox (agent, runtime, what it
    // starts) on one CPU, the least used first.
    let mut s = spec("cpus", &f);
    s.pin_cpu = true;
    let mut first = backend.start(&s, "default", logs.clone()).await.unwrap();
    let mut second = backend.start(&s, "default", logs.clone()).await.unwrap();
    assert_eq!(cpus_of(&mut first).await, allowed[0].to_string());
    assert_eq!(
        cpus_of(&mut second).await,
        allowed[1 % allowed.len()].to_string()
    );
    // A stopped sandbox gives its CPU back: the next one goes there.
    first.shutdown().await;
    let mut third = backend.start(&s, "default", logs).await.unwrap();
    assert_eq!(cpus_of(&mut third).await, allowed[0].to_string());
    for sandbox in [free, second, third] {
        sandbox.shutdown().await;
    }
    assert!(
        placer.load().iter().all(|(_, n)| *n == 0),
        "{:?}",
        placer.load()
    );
}

/// Lambda's `LogType=Tail`: a cold call's tail starts with the
/// initialisation's lines, a warm call's holds its own lines only, each
/// from `START` to `REPORT`; a failed start's tail ends with `INIT_REPORT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_can_have_the_tail_of_its_log_back() {
    let script = shell_runtime(
        r#"  echo "handling $(cat /tmp/event)"
  echo "to stderr too" >&2
  BODY='{"ok":true}'"#,
    )
    .replacen("while true; do", "echo 'init: loading'\nwhile true; do", 1);
    let f = script_fixture(&script);
    let broken = script_fixture("echo 'cannot read config.toml' >&2\nexit 3\n");
    let ex = executor();
    ex.register(spec("tailed", &f));
    ex.register(spec("broken", &broken));

    let (result, tail) = ex
        .invoke_tailed("tailed", r#"{"n":1}"#, InvokeOptions::default())
        .await;
    let r = result.unwrap();
    let tail = tail.expect("a tail");
    let id = &r.request_id;
    let start = tail.find(&format!("START RequestId: {id} Version: $LATEST\n"));
    let init = tail.find("init: loading\n");
    assert!(init.is_some() && init < start, "{tail}");
    let call = tail.find(r#"handling {"n":1}"#).expect(&tail);
    assert!(start.unwrap() < call, "{tail}");
    assert!(tail.contains("to stderr too\n"), "{tail}");
    assert!(
        tail.contains(&format!("END RequestId: {id}\nREPORT RequestId: {id}\t")),
        "{tail}"
    );
    assert!(tail.trim_end().contains("\tInit Duration: "), "{tail}");

    let (result, tail) = ex
        .invoke_tailed("tailed", r#"{"n":2}"#, InvokeOptions::default())
        .await;
    assert!(!result.unwrap().cold_start);
    let tail = tail.expect("a tail");
    assert!(tail.starts_with("START RequestId: "), "{tail}");
    assert!(tail.contains(r#"handling {"n":2}"#), "{tail}");
    assert!(
        !tail.contains("init: loading") && !tail.contains(r#"{"n":1}"#),
        "{tail}"
    );
    assert!(!tail.contains("Init Duration"), "{tail}");

    let (result, tail) = ex
        .invoke_tailed("broken", "{}", InvokeOptions::default())
        .await;
    assert!(matches!(result, Err(InvokeError::InitFailed { .. })));
    let tail = tail.expect("a tail");
    assert!(tail.contains("cannot read config.toml\n"), "{tail}");
    assert!(
        tail.trim_end()
            .ends_with("Phase: init\tStatus: error\tError Type: Runtime.ExitError"),
        "{tail}"
    );
    ex.shutdown().await;
}

/// A layer beside `f`'s folder with one extension, `extensions/NAME`,
/// written by `install`; everything readable and the extension executable.
fn extension_layer(
    f: &FunctionFixture,
    layer: &str,
    name: &str,
    install: impl FnOnce(&std::path::Path),
) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let layer = f.dir.parent().unwrap().join(layer);
    std::fs::create_dir_all(layer.join("extensions")).unwrap();
    let ext = layer.join("extensions").join(name);
    install(&ext);
    for path in [&layer, &layer.join("extensions"), &ext] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    layer
}

/// An executor on the process backend whose functions' log lines are kept.
fn collecting_executor() -> (Executor, Arc<std::sync::Mutex<Vec<String>>>) {
    let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink: LogSink = {
        let lines = lines.clone();
        Arc::new(move |l| lines.lock().unwrap().push(l.line))
    };
    let backend = ProcessBackend::new(ProcessConfig::detect(agent_binary()));
    (Executor::with_log_sink(Arc::new(backend), sink), lines)
}

/// An external extension in a layer (`/opt/extensions/`), as Lambda runs
/// one: registered before the runtime starts, given an `INVOKE` event for
/// every call (the call answers once the extension asked for its next
/// event) and a `SHUTDOWN` event when the sandbox stops. A registration
/// after initialisation is refused.
const EXTENSION: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension"
H=$(mktemp)
curl -sS -D "$H" -o /tmp/registered -X POST "$API/register" \
  -H 'Lambda-Extension-Name: watcher' -d '{"events": ["INVOKE", "SHUTDOWN"]}'
ID=$(grep -i '^Lambda-Extension-Identifier:' "$H" | cut -d: -f2 | tr -d '[:space:]')
echo "EXT registered for $(cat /tmp/registered)" >&2
while true; do
  EVENT=$(curl -sS -H "Lambda-Extension-Identifier: $ID" "$API/event/next")
  TYPE=$(echo "$EVENT" | sed -E 's/.*"eventType":"([A-Z]+)".*/\1/')
  if [ "$TYPE" = SHUTDOWN ]; then
    echo "EXT shutdown: $(echo "$EVENT" | sed -E 's/.*"shutdownReason":"([a-z]+)".*/\1/')" >&2
    exit 0
  fi
  REQ=$(echo "$EVENT" | sed -E 's/.*"requestId":"([^"]+)".*/\1/')
  # Slower than the function: its answer waits for this.
  sleep 0.3
  echo "EXT done with $REQ" >&2
done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_extension_follows_the_sandboxs_lifecycle() {
    use std::os::unix::fs::PermissionsExt;
    // The function tries to register an extension itself, too late.
    let f = script_fixture(&shell_runtime(
        r#"  LATE=$(curl -sS -o /dev/null -w '%{http_code}' -X POST \
    "http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension/register" \
    -H 'Lambda-Extension-Name: late' -d '{"events": ["INVOKE"]}')
  LISTEN=$(getent hosts sandbox.localdomain | cut -d' ' -f1)
  BODY="{\"late\": $LATE, \"sandbox\": \"$LISTEN\"}""#,
    ));
    let layer = extension_layer(&f, "extension-layer", "watcher", |ext| {
        std::fs::write(ext, EXTENSION).unwrap()
    });
    let (ex, lines) = collecting_executor();
    let mut s = spec("watched", &f);
    s.layers = vec![layer];
    ex.register(s);

    for _ in 0..3 {
        let (result, tail) = ex
            .invoke_tailed("watched", "{}", InvokeOptions::default())
            .await;
        let r = result.unwrap();
        let answer: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(answer["late"], 403, "{answer}");
        // Where extensions listen for telemetry, as in Lambda.
        assert_eq!(answer["sandbox"], "127.0.0.1", "{answer}");
        let tail = tail.unwrap();
        // The extension was done with the call before it answered.
        let done = tail
            .find(&format!("EXT done with {}", r.request_id))
            .unwrap_or_else(|| panic!("{tail}"));
        assert!(done < tail.find("END RequestId").unwrap(), "{tail}");
    }
    let registered = lines
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.starts_with("EXT registered for "))
        .cloned()
        .unwrap();
    assert!(
        registered.contains(r#""functionName":"watched""#),
        "{registered}"
    );
    ex.shutdown().await;
    {
        let lines = lines.lock().unwrap();
        assert!(
            lines.iter().any(|l| l == "EXT shutdown: spindown"),
            "{lines:?}"
        );
    }

    // An extension that cannot start fails the sandbox's start, as
    // Lambda's `Extension.LaunchError`.
    let broken = f.dir.parent().unwrap().join("broken-extension-layer");
    std::fs::create_dir_all(broken.join("extensions")).unwrap();
    std::fs::write(broken.join("extensions/stale"), "#!/bin/sh\n").unwrap();
    for (path, mode) in [
        (broken.clone(), 0o755),
        (broken.join("extensions"), 0o755),
        (broken.join("extensions/stale"), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let ex = executor();
    let mut s = spec("unlaunchable", &f);
    s.layers = vec![broken];
    ex.register(s);
    match ex.invoke("unlaunchable", "{}").await {
        Err(InvokeError::InitFailed {
            error_type,
            message,
            ..
        }) => {
            assert_eq!(error_type, "Extension.LaunchError");
            assert!(message.contains("/opt/extensions/stale"), "{message}");
        }
        other => panic!("expected Extension.LaunchError, got {other:?}"),
    }
    ex.shutdown().await;
}

/// An extension built with the official `lambda-extension` crate
/// (`examples/extensions/invocation-counter`), unchanged, beside the
/// Python example handler: it counts the calls from its `INVOKE` events
/// and the handler's log lines from the Telemetry API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_made_with_lambda_extension_counts_the_calls() {
    let f = function_fixture("python");
    let layer = extension_layer(&f, "counter-layer", "invocation-counter", |ext| {
        let built = sluice_test_support::workspace_binary("invocation-counter-ext");
        std::fs::copy(built, ext).unwrap();
    });
    let (ex, lines) = collecting_executor();
    let mut s = spec("counted", &f);
    s.layers = vec![layer];
    s.handler = "handler.handler".into();
    ex.register(s);
    let mut ids = Vec::new();
    for i in 0..3 {
        // The handler writes one line per call ("N words in 1 lines").
        let text = "word ".repeat(i + 1);
        let r = ex
            .invoke("counted", json!({"text": text}).to_string())
            .await
            .unwrap();
        ids.push(r.request_id);
    }
    ex.shutdown().await;
    let lines = lines.lock().unwrap();
    for (n, id) in ids.iter().enumerate() {
        let line = format!("invocation-counter: call {} ({id})", n + 1);
        assert!(lines.contains(&line), "{line} missing: {lines:?}");
    }
    assert!(
        lines.contains(
            &"invocation-counter: 3 calls, 3 function log lines; shutting down (spindown)"
                .to_owned()
        ),
        "{lines:?}"
    );
}
