//! The microVM backend on this host, for real.
//!
//! * Where Linux guests cannot boot (here: `kvm_pvm`, no vmx/svm), the
//!   backend refuses to start, with the host probe's reasons.
//! * The sandbox's host side (boot, `Start`/`Ready`, invocations, errors,
//!   logs, timeout kill, crash reports) runs against real KVM VMs of
//!   `sluice-vmm` whose guest is a tiny hand-written program standing in for
//!   the agent: it drives the virtio-console agent channel by polling its
//!   receive ring, and for each frame the host sends it transmits the next
//!   frame of a script prepared in guest memory (a transmit chain may also
//!   point at the receive buffer, so the host gets back, byte for byte, the
//!   invocation frame the guest received). After the script it spins,
//!   resets the machine or triple-faults, as the test asks.
//!   The guest is `sluice_vmm::scripted`.
//! * Function snapshots with the same guest: the first start boots and
//!   stores a snapshot; later starts restore clones (no boot banner), each
//!   gets a `Restored` frame with its own seed and sandbox id (echoed back
//!   from guest memory) and runs an invocation; a new function version and
//!   a corrupt entry boot afresh.
//! * The Linux tier (the built guest image with the real agent, the echo
//!   function) runs only with hardware KVM and an image; elsewhere it is
//!   skipped loudly, and `SLUICE_REQUIRE_HW_KVM=1` turns the skip into a
//!   failure.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_executor::microvm::{
    MicrovmBackend, MicrovmConfig, MicrovmError, MicrovmSandbox, Origin, SandboxSetup, SnapshotPlan,
};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::snapshots::{SnapshotCache, SnapshotKey};
use sluice_executor::{
    Backend, Executor, FunctionSpec, Invocation, InvokeError, LogLine, LogSink, LogStream, Routed,
    Sandbox,
};
use sluice_protocol::{Message, encode, invoke_head};
use sluice_vmm::host::HostSupport;
use sluice_vmm::image::GuestImage;

// ---- the host's refusal -------------------------------------------------

fn pvm_host() -> HostSupport {
    HostSupport {
        kvm: Ok(()),
        hardware_virtualization: false,
        kvm_module: Some("kvm_pvm".into()),
        missing_caps: vec![],
    }
}

fn config(host: HostSupport, image: Option<GuestImage>) -> MicrovmConfig {
    MicrovmConfig {
        host,
        image,
        images_dir: "/nonexistent/images".into(),
        log_lines_per_sec: 100,
        snapshots_dir: "/nonexistent/snapshots".into(),
    }
}

#[test]
fn this_host_gets_the_probes_reasons_or_a_missing_image() {
    let home = tempfile::tempdir().unwrap();
    let cfg = MicrovmConfig::detect(home.path());
    let err = MicrovmBackend::new(cfg.clone()).expect_err("an empty home has no guest image");
    let text = err.to_string();
    if cfg.host.can_boot_linux() {
        assert!(matches!(err, MicrovmError::NoGuestImage { .. }), "{err}");
        assert!(text.contains("sluice image build"), "{text}");
    } else {
        assert!(
            matches!(err, MicrovmError::HostCannotBootLinux { .. }),
            "{err}"
        );
        for why in cfg.host.linux_blockers() {
            assert!(text.contains(&why), "{text} lacks {why}");
        }
        eprintln!("microvm refused here, as it must be: {text}");
    }
    assert!(!err.retryable());
}

#[test]
fn only_a_linux_capable_host_with_an_image_gets_the_backend() {
    let image = GuestImage {
        kernel: "/img/kernel".into(),
        initramfs: "/img/initramfs.cpio".into(),
        cached: true,
    };
    // PVM, even with an image: refused, and the message says why.
    let err = MicrovmBackend::new(config(pvm_host(), Some(image.clone()))).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("kvm_pvm") && text.contains("vmx/svm"),
        "{text}"
    );
    assert!(text.contains("backend = \"process\""), "{text}");
    // Hardware KVM without an image: the user is told to build one.
    let hw = HostSupport {
        hardware_virtualization: true,
        kvm_module: Some("kvm_intel".into()),
        ..pvm_host()
    };
    let err = MicrovmBackend::new(config(hw.clone(), None)).unwrap_err();
    assert!(matches!(err, MicrovmError::NoGuestImage { .. }), "{err}");
    // Both: the backend, on that image.
    let b = MicrovmBackend::new(config(hw, Some(image.clone()))).unwrap();
    assert_eq!(b.name(), "microvm");
    assert_eq!(b.config().check().unwrap(), &image);
}

// ---- the scripted tiny guest ----------------------------------------------

/// Whether /dev/kvm can run tiny guests; loud skip otherwise
/// (`SLUICE_REQUIRE_KVM=1` fails instead).
fn kvm_available() -> bool {
    let host = sluice_vmm::host::probe();
    if host.can_run_tiny_guests() {
        return true;
    }
    if std::env::var("SLUICE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("SLUICE_REQUIRE_KVM=1 but /dev/kvm cannot run guests: {host:?}");
    }
    eprintln!(
        "\n*** SKIPPED: /dev/kvm cannot run guests ({host:?}); microVM tests did not run ***\n"
    );
    false
}

use sluice_vmm::scripted::{Part, Then, scripted_vm};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<LogLine>>>);

impl Logs {
    fn sink(&self) -> LogSink {
        let lines = self.0.clone();
        Arc::new(move |l: LogLine| lines.lock().unwrap().push(l))
    }

    fn lines(&self) -> Vec<(LogStream, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|l| (l.stream, l.line.clone()))
            .collect()
    }
}

fn spec(dir: &Path) -> FunctionSpec {
    let mut s = FunctionSpec::new("scripted", dir);
    s.memory_mb = 16;
    s
}

fn invocation(id: &str, payload: &[u8]) -> Invocation {
    Invocation {
        request_id: id.into(),
        deadline_ms: 1_700_000_000_000,
        invoked_function_arn: "arn:aws:lambda:local:000000000000:function:scripted".into(),
        trace_id: "Root=1-trace".into(),
        client_context: String::new(),
        payload: payload.to_vec(),
        attachment: None,
    }
}

fn invoke_frame(inv: &Invocation) -> Vec<u8> {
    let mut f = invoke_head(
        &inv.request_id,
        inv.deadline_ms,
        &inv.invoked_function_arn,
        &inv.trace_id,
        &inv.client_context,
        inv.payload.len(),
    );
    f.extend_from_slice(&inv.payload);
    f
}

/// The head of a `Log` frame whose line is the `len` bytes that follow.
fn log_head(stream: LogStream, len: usize) -> Vec<u8> {
    let mut f = encode(&Message::Log {
        stream,
        line: vec![0; len],
    });
    f.truncate(f.len() - len);
    f
}

fn frame(m: Message) -> Part {
    Part::Bytes(encode(&m))
}

const BANNER: &[u8] = b"scripted guest up\n";

async fn boot(
    dir: &Path,
    script: Vec<Vec<Part>>,
    then: Then,
    logs: &Logs,
) -> Result<MicrovmSandbox, InvokeError> {
    let spec = spec(dir);
    let setup = SandboxSetup::new(&spec, "tenant-a", logs.sink(), 1, 1000);
    MicrovmSandbox::boot(setup, move |config| {
        Ok(scripted_vm(config, &script, then, BANNER))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_run_end_to_end_over_the_virtio_console_of_a_real_vm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = invocation("req-1", br#"{"hello":"guest"}"#);
    let first_frame = invoke_frame(&first);
    let logs = Logs::default();
    let script = vec![
        // After Start: a log line and Ready, in one transmit.
        vec![
            frame(Message::Log {
                stream: LogStream::Stdout,
                line: b"hello from the guest".to_vec(),
            }),
            frame(Message::Ready { init_us: 42 }),
        ],
        // After the first invocation: the received frame back as a log
        // line (proof of what crossed into the guest), then the response.
        vec![
            Part::Bytes(log_head(LogStream::Stderr, first_frame.len())),
            Part::Received {
                n: 1,
                len: first_frame.len() as u32,
            },
            frame(Message::Response {
                request_id: "req-1".into(),
                body: b"pong".to_vec(),
            }),
        ],
        // The second one fails in the function.
        vec![frame(Message::Error {
            request_id: "req-2".into(),
            error_type: String::new(),
            body: br#"{"errorType":"Boom","errorMessage":"no luck"}"#.to_vec(),
        })],
        // The third only logs: it runs into its timeout.
        vec![frame(Message::Log {
            stream: LogStream::Stdout,
            line: b"still thinking".to_vec(),
        })],
    ];
    let mut sb = boot(dir.path(), script, Then::Spin, &logs).await.unwrap();
    assert!(sb.is_reusable());
    assert!(sb.init_duration() > Duration::ZERO);
    // Max Memory Used: the guest RAM the tiny guest and its loading
    // touched, some pages of its 16 MiB.
    let touched = sb.max_memory_used().expect("pagemap is readable");
    assert!((4096..16 << 20).contains(&touched), "{touched}");
    // The serial console's line, then the agent's log frame.
    assert_eq!(
        logs.lines(),
        [
            (LogStream::Agent, "scripted guest up".to_owned()),
            (LogStream::Stdout, "hello from the guest".to_owned())
        ]
    );

    let sent = std::time::Instant::now();
    let body = sb.invoke(first, Duration::from_secs(60)).await.unwrap();
    // For the record only (no timed assertions): orders of magnitude.
    eprintln!(
        "scripted tiny guest: build + boot to Ready {:?}, one invocation round trip {:?}",
        sb.init_duration(),
        sent.elapsed()
    );
    assert_eq!(body, b"pong");
    assert_eq!(
        logs.lines()[2],
        (
            LogStream::Stderr,
            String::from_utf8_lossy(&first_frame).into_owned()
        ),
        "the guest received the invocation frame intact"
    );
    assert!(sb.is_reusable());

    match sb
        .invoke(invocation("req-2", b"{}"), Duration::from_secs(60))
        .await
    {
        Err(InvokeError::Function {
            error_type,
            error_message,
            ..
        }) => assert_eq!(
            (error_type.as_str(), error_message.as_str()),
            ("Boom", "no luck")
        ),
        other => panic!("expected the function's error, got {other:?}"),
    }
    assert!(sb.is_reusable());

    let timeout = Duration::from_millis(300);
    match sb.invoke(invocation("req-3", b"{}"), timeout).await {
        Err(InvokeError::Timeout { timeout: t, .. }) => assert_eq!(t, timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(!sb.is_reusable(), "a timed-out VM is killed");
    assert_eq!(
        logs.lines().last().unwrap(),
        &(LogStream::Stdout, "still thinking".to_owned())
    );
    // The VM really was stopped: a dead sandbox says how it ended.
    match sb.invoke(invocation("req-4", b"{}"), timeout).await {
        Err(InvokeError::SandboxCrashed { detail, .. }) => {
            assert!(detail.contains("stopped by the host"), "{detail}")
        }
        other => panic!("expected a dead sandbox, got {other:?}"),
    }
    Box::new(sb).shutdown().await;
}

async fn crash_after_ready(then: Then) -> String {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::default();
    let script = vec![vec![frame(Message::Ready { init_us: 1 })]];
    let mut sb = boot(dir.path(), script, then, &logs).await.unwrap();
    let err = sb
        .invoke(invocation("req-1", b"{}"), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(!sb.is_reusable(), "a crashed VM is not reused");
    assert_eq!(err.error_type(), "Runtime.ExitError");
    assert!(err.retryable(), "a new sandbox may succeed");
    Box::new(sb).shutdown().await;
    match err {
        InvokeError::SandboxCrashed { detail, .. } => detail,
        other => panic!("expected a crash, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_reboots_mid_invocation_is_a_crash() {
    if !kvm_available() {
        return;
    }
    let detail = crash_after_ready(Then::Reset).await;
    assert!(detail.contains("rebooted"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triple_fault_mid_invocation_is_a_crash_that_says_so() {
    if !kvm_available() {
        return;
    }
    let detail = crash_after_ready(Then::TripleFault).await;
    assert!(detail.contains("triple-faulted"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_start_fails_init_within_its_timeout() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(dir.path());
    spec.init_timeout = Duration::from_millis(300);
    let logs = Logs::default();
    let setup = SandboxSetup::new(&spec, "t", logs.sink(), 1, 1000);
    let err = MicrovmSandbox::boot(setup, |config| {
        Ok(scripted_vm(config, &[], Then::Spin, BANNER))
    })
    .await
    .unwrap_err();
    match err {
        InvokeError::InitFailed { error_type, .. } => {
            assert_eq!(error_type, "Runtime.InitTimeout")
        }
        other => panic!("expected an init timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_frame_kills_the_vm_as_a_protocol_violation() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::default();
    // A frame announcing 4 GiB: rejected before its body is read.
    let script = vec![
        vec![frame(Message::Ready { init_us: 1 })],
        vec![Part::Bytes(vec![0xff, 0xff, 0xff, 0xff, 7])],
    ];
    let mut sb = boot(dir.path(), script, Then::Spin, &logs).await.unwrap();
    let err = sb
        .invoke(invocation("req-1", b"{}"), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            InvokeError::Sandbox {
                source: sluice_executor::SandboxError::Protocol { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!sb.is_reusable());
    Box::new(sb).shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_guest_console_is_rate_limited_into_the_log_sink() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::default();
    let spam: Vec<u8> = (0..30)
        .flat_map(|i| format!("spam {i}\n").into_bytes())
        .collect();
    let script = vec![vec![frame(Message::Ready { init_us: 1 })]];
    // One line per second, bursts of ten.
    let setup = SandboxSetup::new(&spec(dir.path()), "t", logs.sink(), 1, 1);
    let sb = MicrovmSandbox::boot(setup, move |config| {
        Ok(scripted_vm(config, &script, Then::Spin, &spam))
    })
    .await
    .unwrap();
    let lines = logs.lines();
    // A token may come back while the guest prints.
    assert!((10..=11).contains(&lines.len()), "{lines:?}");
    for (i, (stream, line)) in lines.iter().take(10).enumerate() {
        assert_eq!(
            (*stream, line.as_str()),
            (LogStream::Agent, format!("spam {i}").as_str())
        );
    }
    Box::new(sb).shutdown().await;
}

/// The pool over a backend of scripted VMs: a crashed VM is replaced by a
/// fresh one for the next invocation.
struct ScriptedBackend;

#[async_trait::async_trait]
impl Backend for ScriptedBackend {
    fn name(&self) -> &'static str {
        "scripted-microvm"
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
    ) -> Result<Box<dyn Sandbox>, InvokeError> {
        let setup = SandboxSetup::new(spec, tenant, logs, 1, 1000);
        // The pool picks the request ids, so the script cannot answer:
        // Ready, then a reset on the first invocation.
        let script = vec![vec![frame(Message::Ready { init_us: 1 })]];
        let sb = MicrovmSandbox::boot(setup, move |config| {
            Ok(scripted_vm(config, &script, Then::Reset, BANNER))
        })
        .await?;
        Ok(Box::new(sb))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_replaces_a_crashed_vm_and_routes_other_functions_to_processes() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let echo = sluice_test_support::function_fixture("echo");
    let process = ProcessBackend::new(ProcessConfig::detect(sluice_test_support::agent_binary()));
    let routed = Routed::new(Arc::new(process)).route("scripted", Arc::new(ScriptedBackend));
    assert_eq!(routed.backend_for("scripted").name(), "scripted-microvm");
    assert_eq!(routed.backend_for("echo").name(), "process");
    let ex = Executor::with_log_sink(Arc::new(routed), Logs::default().sink());
    ex.register(spec(dir.path()));
    ex.register(FunctionSpec::new("echo", &echo.dir));
    for _ in 0..2 {
        let err = ex.invoke("scripted", b"{}".to_vec()).await.unwrap_err();
        assert!(
            matches!(&err, InvokeError::SandboxCrashed { detail, .. } if detail.contains("rebooted")),
            "{err:?}"
        );
    }
    let stats = ex.stats("scripted").unwrap();
    assert_eq!(
        stats.cold_starts, 2,
        "each invocation got a fresh VM: {stats:?}"
    );
    let resp = ex.invoke("echo", br#"{"p":1}"#.to_vec()).await.unwrap();
    assert_eq!(resp.payload, br#"{"p":1}"#);
    ex.shutdown().await;
}

// ---- function snapshots -------------------------------------------------

const TENANT: &str = "tenant-a";

/// The length of every `Restored` frame for [`TENANT`]: a 32-byte seed, a
/// 32-hex-digit sandbox id and `<tenant>/[$LATEST]<id>`.
fn restored_len() -> usize {
    let id = "0".repeat(32);
    encode(&Message::Restored {
        seed: [0; sluice_protocol::SEED_LEN],
        log_stream: format!("{TENANT}/[$LATEST]{id}"),
        sandbox_id: id,
        unix_time_ns: 0,
    })
    .len()
}

/// The invocation every clone runs (a payload long enough that its frame
/// is longer than a `Restored` frame).
fn clone_invocation() -> Invocation {
    invocation("req-1", &[b'x'; 64])
}

/// The snapshot guest's script: `Ready` after `Start` (then the VM is
/// snapshotted); in a clone, the `Restored` frame it received echoed back
/// as a log line and `Ready`; then the invocation frame echoed and a
/// response.
fn snapshot_script() -> Vec<Vec<Part>> {
    let inv = invoke_frame(&clone_invocation());
    let l = restored_len();
    vec![
        vec![frame(Message::Ready { init_us: 1 })],
        vec![
            Part::Bytes(log_head(LogStream::Stderr, l)),
            Part::Received {
                n: 1,
                len: l as u32,
            },
            frame(Message::Ready { init_us: 2 }),
        ],
        vec![
            Part::Bytes(log_head(LogStream::Stderr, inv.len())),
            Part::Received {
                n: 2,
                len: inv.len() as u32,
            },
            frame(Message::Response {
                request_id: "req-1".into(),
                body: b"pong".to_vec(),
            }),
        ],
    ]
}

/// Starts a sandbox of the scripted function in `dir` with the snapshot
/// cache `cache` (key: the function's real version).
async fn start_with_snapshots(
    dir: &Path,
    cache: &SnapshotCache,
    logs: &Logs,
) -> Result<MicrovmSandbox, InvokeError> {
    start_scripted(dir, cache, logs, snapshot_script(), spec(dir).init_timeout).await
}

/// [`start_with_snapshots`] with another script and init timeout.
async fn start_scripted(
    dir: &Path,
    cache: &SnapshotCache,
    logs: &Logs,
    script: Vec<Vec<Part>>,
    init_timeout: Duration,
) -> Result<MicrovmSandbox, InvokeError> {
    let mut spec = spec(dir);
    spec.init_timeout = init_timeout;
    let setup = SandboxSetup::new(&spec, TENANT, logs.sink(), 1, 1000);
    let key = SnapshotKey::new(
        &spec.name,
        &spec.version(),
        "scripted-guest",
        setup.vm_config().mem_size,
        setup.vcpus,
    );
    let plan = SnapshotPlan {
        cache: cache.clone(),
        key,
    };
    MicrovmSandbox::start(
        setup,
        move |config| Ok(scripted_vm(config, &script, Then::Spin, BANNER)),
        Some(plan),
    )
    .await
}

fn entries(cache: &SnapshotCache) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn banner_seen(logs: &Logs) -> bool {
    logs.lines()
        .iter()
        .any(|(s, l)| *s == LogStream::Agent && l == "scripted guest up")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_snapshots_and_later_starts_restore_clones_with_their_own_identity() {
    if !kvm_available() {
        return;
    }
    let function = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(home.path().join("snapshots"));

    // First start: a boot (banner on the serial console), then the
    // snapshot, written into place.
    let logs = Logs::default();
    let mut first = start_with_snapshots(function.path(), &cache, &logs)
        .await
        .unwrap();
    assert_eq!(first.origin(), Origin::BootedAndSnapshotted);
    assert!(first.identity().is_none());
    assert!(banner_seen(&logs), "{:?}", logs.lines());
    let names = entries(&cache);
    assert_eq!(names.len(), 1, "one entry, no temporary left: {names:?}");
    assert!(names[0].starts_with("scripted-"), "{names:?}");
    let entry = cache.root().join(&names[0]);
    sluice_vmm::Snapshot::load(&entry).expect("the entry is a loadable snapshot");

    // The snapshotted VM was resumed and still talks: it receives the next
    // frame and answers with the script's next step (the echo of what it
    // received; it has no answer to an invocation, so the call times out).
    let inv = invoke_frame(&clone_invocation());
    let timeout = Duration::from_secs(1);
    match first.invoke(clone_invocation(), timeout).await {
        Err(InvokeError::Timeout { .. }) => {}
        other => panic!("expected the script to run out, got {other:?}"),
    }
    assert!(
        logs.lines()
            .contains(&(LogStream::Stderr, lossy(&inv[..restored_len()]))),
        "the resumed VM received the frame: {:?}",
        logs.lines()
    );
    drop(first);

    // Later starts: clones, no boot, each with its own identity, each
    // running an invocation end to end.
    let mut identities = Vec::new();
    for _ in 0..2 {
        let logs = Logs::default();
        let mut sb = start_with_snapshots(function.path(), &cache, &logs)
            .await
            .unwrap();
        assert_eq!(sb.origin(), Origin::Restored);
        assert!(
            !banner_seen(&logs),
            "a clone does not boot: {:?}",
            logs.lines()
        );
        let id = sb.identity().expect("a clone has an identity").clone();
        assert_eq!(id.sandbox_id.len(), 32);
        assert_eq!(
            id.log_stream,
            format!("{TENANT}/[$LATEST]{}", id.sandbox_id)
        );
        // What the guest found in its receive buffer is the Restored frame
        // with this identity, byte for byte.
        assert_eq!(
            logs.lines(),
            [(LogStream::Stderr, lossy(&encode(&id.message())))]
        );
        let body = sb
            .invoke(clone_invocation(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(body, b"pong");
        assert_eq!(logs.lines()[1], (LogStream::Stderr, lossy(&inv)));
        assert!(sb.is_reusable());
        eprintln!(
            "scripted guest: restore from the function snapshot to Ready {:?}",
            sb.init_duration()
        );
        identities.push(id);
        drop(sb);
    }
    assert_ne!(identities[0].seed, identities[1].seed);
    assert_ne!(identities[0].sandbox_id, identities[1].sandbox_id);
    assert_eq!(entries(&cache), names, "restores leave the entry alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_function_version_boots_afresh_and_replaces_the_old_snapshot() {
    if !kvm_available() {
        return;
    }
    let function = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(home.path().join("snapshots"));
    let logs = Logs::default();
    let sb = start_with_snapshots(function.path(), &cache, &logs)
        .await
        .unwrap();
    assert_eq!(sb.origin(), Origin::BootedAndSnapshotted);
    drop(sb);
    let old = entries(&cache);
    assert_eq!(old.len(), 1);

    // The function's folder changes: a new version.
    std::fs::write(function.path().join("handler.txt"), b"v2").unwrap();
    let logs = Logs::default();
    let sb = start_with_snapshots(function.path(), &cache, &logs)
        .await
        .unwrap();
    assert_eq!(sb.origin(), Origin::BootedAndSnapshotted);
    assert!(banner_seen(&logs), "a fresh boot");
    drop(sb);
    let new = entries(&cache);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new, old, "the old version's entry was removed");

    // And the new entry serves the next start.
    let logs = Logs::default();
    let sb = start_with_snapshots(function.path(), &cache, &logs)
        .await
        .unwrap();
    assert_eq!(sb.origin(), Origin::Restored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_never_restored_the_start_boots_afresh() {
    if !kvm_available() {
        return;
    }
    let function = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(home.path().join("snapshots"));
    let sb = start_with_snapshots(function.path(), &cache, &Logs::default())
        .await
        .unwrap();
    drop(sb);
    let names = entries(&cache);
    let state = cache
        .root()
        .join(&names[0])
        .join(sluice_vmm::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();

    let logs = Logs::default();
    let sb = start_with_snapshots(function.path(), &cache, &logs)
        .await
        .unwrap();
    assert_eq!(
        sb.origin(),
        Origin::BootedAndSnapshotted,
        "booted, and a good snapshot taken again"
    );
    assert!(banner_seen(&logs));
    assert!(sb.identity().is_none());
    let fresh = cache.root().join(&entries(&cache)[0]);
    sluice_vmm::Snapshot::load(&fresh).expect("the rewritten entry loads");
    assert!(sb.is_reusable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_does_not_answer_fails_its_start_and_its_snapshot_is_dropped() {
    if !kvm_available() {
        return;
    }
    let function = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(home.path().join("snapshots"));
    // Ready after Start, then nothing: a clone never answers Restored.
    let mute = || vec![vec![frame(Message::Ready { init_us: 1 })]];
    let timeout = Duration::from_secs(1);
    let sb = start_scripted(function.path(), &cache, &Logs::default(), mute(), timeout)
        .await
        .unwrap();
    assert_eq!(sb.origin(), Origin::BootedAndSnapshotted);
    drop(sb);
    assert_eq!(entries(&cache).len(), 1);
    let err = start_scripted(function.path(), &cache, &Logs::default(), mute(), timeout)
        .await
        .unwrap_err();
    match &err {
        InvokeError::InitFailed {
            error_type,
            message,
            ..
        } => {
            assert_eq!(error_type, "Runtime.InitTimeout");
            assert!(message.contains("Restored"), "{message}");
        }
        other => panic!("expected an init timeout, got {other:?}"),
    }
    assert!(entries(&cache).is_empty(), "the snapshot was dropped");
    // The next start boots afresh.
    let logs = Logs::default();
    let sb = start_scripted(function.path(), &cache, &logs, mute(), timeout)
        .await
        .unwrap();
    assert_eq!(sb.origin(), Origin::BootedAndSnapshotted);
    assert!(banner_seen(&logs));
}

// ---- the Linux tier -----------------------------------------------------

/// Skips loudly unless this host can boot Linux guests and has an image;
/// with `SLUICE_REQUIRE_HW_KVM=1` the skip is a failure.
fn linux_tier(cfg: &MicrovmConfig) -> bool {
    match cfg.check() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("SLUICE_REQUIRE_HW_KVM").as_deref() == Ok("1") {
                panic!("SLUICE_REQUIRE_HW_KVM=1 but the microVM backend cannot run: {e}");
            }
            eprintln!("\n*** SKIPPED: Linux-guest tier of the microVM backend: {e} ***\n");
            false
        }
    }
}

/// A function folder whose `bootstrap` is the echo function built as a
/// static executable (`+crt-static`, in its own target folder so the
/// workspace's build is left alone).
fn static_echo() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("static-guest");
    let triple = "x86_64-unknown-linux-gnu";
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .current_dir(root)
        .args([
            "build",
            "-p",
            "echo-function",
            "--bin",
            "echo-fn",
            "--target",
            triple,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success(), "building the static echo function failed");
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("bootstrap");
    std::fs::copy(target.join(triple).join("debug/echo-fn"), &bootstrap).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn the_static_echo_function_for_guests_builds_static() {
    // Only where the Linux tier can run: the build takes minutes.
    if !MicrovmConfig::detect(Path::new("/nonexistent"))
        .host
        .can_boot_linux()
        && std::env::var("SLUICE_BUILD_STATIC_ECHO").as_deref() != Ok("1")
    {
        eprintln!(
            "*** SKIPPED: static echo build (only with hardware KVM or SLUICE_BUILD_STATIC_ECHO=1) ***"
        );
        return;
    }
    let dir = static_echo();
    sluice_vmm::image::check_static_agent(&dir.path().join("bootstrap")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_tier_the_echo_function_answers_through_the_microvm_backend() {
    let home = std::env::var_os("SLUICE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".sluice")))
        .unwrap_or_else(|| ".sluice".into());
    let cfg = MicrovmConfig::detect(&home);
    if !linux_tier(&cfg) {
        return;
    }
    // The guest has no libc: the function must be a static binary.
    let echo = static_echo();
    sluice_vmm::image::check_static_agent(&echo.path().join("bootstrap")).unwrap();
    let ex = Executor::with_log_sink(
        Arc::new(MicrovmBackend::new(cfg).unwrap()),
        Logs::default().sink(),
    );
    let mut spec = FunctionSpec::new("echo", echo.path());
    spec.init_timeout = Duration::from_secs(30);
    ex.register(spec);
    let payload = br#"{"hello":"microvm"}"#.to_vec();
    let resp = ex.invoke("echo", payload.clone()).await.unwrap();
    assert_eq!(resp.payload, payload);
    // Warm: the same VM answers again.
    ex.invoke("echo", payload.clone()).await.unwrap();
    assert_eq!(ex.stats("echo").unwrap().cold_starts, 1);
}

/// A function restored from snapshots is told so, as Lambda's SnapStart
/// tells its functions (`AWS_LAMBDA_INITIALIZATION_TYPE`); the pipeline's
/// `env` follows.
#[test]
fn a_snapshotted_function_is_told_it_is_snap_started() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path());
    s.env = vec![("GREETING".into(), "hi".into())];
    let logs = Logs::default();
    for (snapshot, expected) in [
        (
            true,
            vec![
                ("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start"),
                ("GREETING", "hi"),
            ],
        ),
        (false, vec![("GREETING", "hi")]),
    ] {
        s.snapshot = snapshot;
        let env = SandboxSetup::new(&s, "t", logs.sink(), 1, 1000)
            .start_config()
            .env;
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(env, expected, "snapshot = {snapshot}");
    }
}
