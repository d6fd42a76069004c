//! Stage 0 and stage 1 of the agent, and the supervision of `bootstrap`:
//! relaying invocations, results and log lines, and reaping processes.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, geteuid};
use sluice_protocol::{
    DEFAULT_MAX_FRAME, ExitStatus, LogStream, MAX_HOST_FRAME, Message, StartConfig, read_message,
    write_message,
};

use crate::attachment::Stage;

use crate::isolate;
use crate::logs::LogRelays;
use crate::runtime_api::{Invocation, RuntimeApi};

const CONFIG_ENV: &str = "SLUICE_AGENT_STAGE1_CONFIG";
/// Where a clone's seed is written by default: the kernel's entropy pool.
pub const ENTROPY_SINK: &str = "/dev/urandom";

/// The transport of the agent channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// Standard input (host to agent) and standard output (agent to host).
    Stdio,
    /// A Unix stream socket to connect to.
    Unix(PathBuf),
    /// A character device or FIFO opened read-write (a virtio console port).
    File(PathBuf),
}

impl Channel {
    /// Parse `stdio`, `unix:PATH` or `file:PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "stdio" {
            Ok(Channel::Stdio)
        } else if let Some(p) = s.strip_prefix("unix:") {
            Ok(Channel::Unix(p.into()))
        } else if let Some(p) = s.strip_prefix("file:") {
            Ok(Channel::File(p.into()))
        } else {
            Err(format!(
                "bad channel {s:?}: expected stdio, unix:PATH or file:PATH"
            ))
        }
    }

    fn open(&self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        match self {
            Channel::Stdio => {
                // Unbuffered handles on fd 0 and 1: stage 0 must read exactly
                // its frames and leave the rest of the stream to stage 1.
                let rd = std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?);
                let wr = std::fs::File::from(io::stdout().as_fd().try_clone_to_owned()?);
                Ok((Box::new(rd), Box::new(wr)))
            }
            Channel::Unix(p) => {
                let s = UnixStream::connect(p)?;
                Ok((Box::new(s.try_clone()?), Box::new(s)))
            }
            Channel::File(p) => {
                let f = std::fs::OpenOptions::new().read(true).write(true).open(p)?;
                Ok((Box::new(f.try_clone()?), Box::new(f)))
            }
        }
    }
}

/// `AWS_REGION` inside sandboxes: the region of the ARNs sluice gives
/// functions (`arn:aws:lambda:sluice-local:...`).
const SLUICE_REGION: &str = "sluice-local";

fn fatal<W: Write + ?Sized>(wr: &mut W, message: String) -> u8 {
    eprintln!("sluice-agent: {message}");
    let _ = write_message(wr, &Message::Fatal { message });
    1
}

/// Stage 0: read the configuration, build the sandbox (when asked to), and
/// either serve directly (no isolation) or hand over to stage 1.
///
/// `entropy` is where the seed of a [`Message::Restored`] frame is written
/// ([`ENTROPY_SINK`] but in tests).
///
/// `set_clock`: whether a `Restored` frame also sets the system clock to the
/// host's time (in a microVM guest, where the agent is `/init`; never in
/// the process sandbox, which shares the host's clock).
pub fn run_stage0(channel: Channel, entropy: &Path, set_clock: bool) -> u8 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let (mut rd, mut wr) = match channel.open() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sluice-agent: cannot open channel {channel:?}: {e}");
            return 1;
        }
    };
    let cfg = match read_message(&mut rd, DEFAULT_MAX_FRAME) {
        Ok(Some(Message::Start(cfg))) => *cfg,
        Ok(Some(other)) => {
            return fatal(
                &mut wr,
                format!("expected a start frame, got {}", other.kind_name()),
            );
        }
        Ok(None) => return 0,
        Err(e) => return fatal(&mut wr, format!("reading the start frame: {e}")),
    };
    if !cfg.isolate {
        let task_root = PathBuf::from(&cfg.function_dir);
        return serve(cfg, rd, wr, &task_root, false, entropy, set_clock);
    }
    if channel != Channel::Stdio {
        return fatal(
            &mut wr,
            "the process sandbox needs the stdio channel".into(),
        );
    }
    let host_root = geteuid().is_root();
    if host_root && let Err(e) = isolate::build_root_as_host_root(&cfg) {
        return fatal(&mut wr, e.to_string());
    }
    if let Err(e) = isolate::unshare_all() {
        return fatal(&mut wr, e.to_string());
    }
    if let Err(e) = write_message(&mut wr, &Message::Unshared) {
        eprintln!("sluice-agent: channel write failed: {e}");
        return 1;
    }
    match read_message(&mut rd, DEFAULT_MAX_FRAME) {
        Ok(Some(Message::Proceed)) => {}
        Ok(Some(Message::Shutdown)) | Ok(None) => return 0,
        Ok(Some(other)) => {
            return fatal(
                &mut wr,
                format!("expected proceed, got {}", other.kind_name()),
            );
        }
        Err(e) => return fatal(&mut wr, format!("reading proceed: {e}")),
    }
    if let Err(e) = isolate::become_sandbox_root(host_root) {
        return fatal(&mut wr, e.to_string());
    }
    if !host_root && let Err(e) = isolate::build_root(&cfg, None) {
        return fatal(&mut wr, e.to_string());
    }
    let json = serde_json::to_string(&cfg).expect("config serializes");
    let status = Command::new("/proc/self/exe")
        .arg("--stage1")
        .env_clear()
        .env(CONFIG_ENV, json)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status();
    match status {
        Ok(s) => s.code().unwrap_or(1).clamp(0, 255) as u8,
        Err(e) => fatal(&mut wr, format!("spawning stage 1: {e}")),
    }
}

/// Stage 1: PID 1 of the sandbox.
pub fn run_stage1() -> u8 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let (rd, mut wr) = match Channel::Stdio.open() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sluice-agent: cannot open channel: {e}");
            return 1;
        }
    };
    let cfg: StartConfig = match std::env::var(CONFIG_ENV)
        .map_err(|e| e.to_string())
        .and_then(|j| serde_json::from_str(&j).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return fatal(&mut wr, format!("stage 1 configuration: {e}")),
    };
    if let Err(e) = isolate::enter_root(&cfg) {
        return fatal(&mut wr, e.to_string());
    }
    let task_root = PathBuf::from(&cfg.task_root);
    serve(
        cfg,
        rd,
        wr,
        &task_root,
        true,
        Path::new(ENTROPY_SINK),
        false,
    )
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// The runtime's entry point, where Lambda looks for it: `bootstrap` in the
/// function's folder, else in its layers (`/opt/bootstrap`: a custom
/// runtime shipped as a layer).
fn entry_point(task_root: &Path) -> PathBuf {
    let own = task_root.join("bootstrap");
    let layered = Path::new("/opt/bootstrap");
    if own.symlink_metadata().is_err() && layered.is_file() {
        layered.to_path_buf()
    } else {
        own
    }
}

/// Lambda's `LD_LIBRARY_PATH` for custom runtimes: the system's folders,
/// the runtime's, the function's own `lib`, then the layers' (`/opt/lib`).
fn lambda_library_path(task_root: &Path) -> String {
    let task = task_root.display();
    format!("/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:{task}:{task}/lib:/opt/lib")
}

fn send(w: &SharedWriter, msg: &Message) {
    let mut guard = match w.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if write_message(&mut *guard, msg).is_err() {
        // The host is gone: nothing left to serve.
        std::process::exit(0);
    }
}

fn serve(
    cfg: StartConfig,
    rd: Box<dyn Read + Send>,
    wr: Box<dyn Write + Send>,
    task_root: &Path,
    isolated: bool,
    entropy: &Path,
    set_clock: bool,
) -> u8 {
    let writer: SharedWriter = Arc::new(Mutex::new(wr));
    let fail = |message: String| -> u8 {
        eprintln!("sluice-agent: {message}");
        send(&writer, &Message::Fatal { message });
        1
    };
    let listener = match TcpListener::bind(("127.0.0.1", cfg.runtime_api_port)) {
        Ok(l) => l,
        Err(e) => return fail(format!("binding the Runtime API port: {e}")),
    };
    let api_addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return fail(format!("Runtime API address: {e}")),
    };
    if isolated {
        if let Err(e) = isolate::apply_rlimits(&cfg) {
            return fail(e.to_string());
        }
        match isolate::apply_landlock(&cfg) {
            Ok(status) => send(
                &writer,
                &Message::Log {
                    stream: LogStream::Agent,
                    line: status.as_bytes().to_vec(),
                },
            ),
            Err(e) => return fail(e.to_string()),
        }
        if let Err(e) = isolate::apply_seccomp() {
            return fail(e.to_string());
        }
    }

    // The Lambda environment of the runtime and of external extensions.
    let lambda_command = |program: &Path| {
        let mut cmd = Command::new(program);
        cmd.current_dir(task_root)
            .env_clear()
            // Lambda's: the layers' `bin` and `lib` folders at the end.
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/opt/bin")
            .env("LD_LIBRARY_PATH", lambda_library_path(task_root))
            .env("LANG", "C.UTF-8")
            .env("TZ", ":UTC")
            .env("AWS_LAMBDA_RUNTIME_API", api_addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &cfg.function_name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", &cfg.function_version)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", cfg.memory_mb.to_string())
            .env("AWS_LAMBDA_LOG_GROUP_NAME", &cfg.log_group)
            .env("AWS_LAMBDA_LOG_STREAM_NAME", &cfg.log_stream)
            .env("AWS_EXECUTION_ENV", "sluice")
            // The region of the function's ARN. SDK clients made at init (say
            // boto3.client("s3") at module level) need one, even if the code
            // path under test never calls them; the pipeline's `env` may set
            // another.
            .env("AWS_REGION", SLUICE_REGION)
            .env("AWS_DEFAULT_REGION", SLUICE_REGION)
            // "snap-start" (from the host's `env`) when restored from a
            // function snapshot.
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
            .env("LAMBDA_TASK_ROOT", task_root)
            .env("LAMBDA_RUNTIME_DIR", "/var/runtime")
            .env("_HANDLER", &cfg.handler)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = cfg.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    };
    let relays = LogRelays::default();
    let started = Instant::now();

    let stage = Stage::default();
    let api = {
        let w = writer.clone();
        let stage = stage.clone();
        let relays = relays.clone();
        RuntimeApi::new(
            move |m: Message| {
                // An answered invocation's attachment is freed at once.
                if matches!(m, Message::Response { .. } | Message::Error { .. }) {
                    stage.clear();
                }
                // What the function wrote before it answered goes first.
                if matches!(
                    m,
                    Message::Ready { .. }
                        | Message::Response { .. }
                        | Message::Error { .. }
                        | Message::InitError { .. }
                ) {
                    relays.settle();
                }
                send(&w, &m)
            },
            started,
        )
    };
    api.set_function(&cfg.function_name, &cfg.function_version, &cfg.handler);
    if let Err(e) = api.serve(listener) {
        return fail(format!("starting the Runtime API: {e}"));
    }
    // The function's lines go to the host and to telemetry subscribers.
    let relay_to = |w: &SharedWriter| {
        let w = w.clone();
        let telemetry = api.telemetry();
        move |stream, line: Vec<u8>| {
            telemetry.function_line(&line);
            send(&w, &Message::Log { stream, line })
        }
    };

    // External extensions first, as in Lambda: the runtime starts once
    // they have registered (or ended).
    let extensions = match start_extensions(&lambda_command, &api, &relays, &writer) {
        Ok(x) => x,
        Err(message) => {
            // Lambda's `Extension.LaunchError`: the sandbox never starts.
            send(
                &writer,
                &Message::InitError {
                    error_type: "Extension.LaunchError".into(),
                    body: serde_json::json!({
                        "errorType": "Extension.LaunchError",
                        "errorMessage": message,
                    })
                    .to_string()
                    .into_bytes(),
                },
            );
            send(&writer, &Message::Exited(ExitStatus::Code(127)));
            return 1;
        }
    };

    let bootstrap = entry_point(task_root);
    let mut child = match lambda_command(&bootstrap).spawn() {
        Ok(c) => c,
        Err(e) => {
            send(
                &writer,
                &Message::InitError {
                    error_type: "Runtime.InvalidEntrypoint".into(),
                    body: serde_json::json!({
                        "errorType": "Runtime.InvalidEntrypoint",
                        "errorMessage": format!("cannot start {}: {e}", bootstrap.display()),
                    })
                    .to_string()
                    .into_bytes(),
                },
            );
            send(&writer, &Message::Exited(ExitStatus::Code(127)));
            return 1;
        }
    };
    let child_pid = Pid::from_raw(child.id() as i32);

    let (log_done_tx, log_done_rx) = mpsc::channel::<()>();
    let relayed = [
        child.stdout.take().map(|out| {
            relays.relay(
                out,
                LogStream::Stdout,
                relay_to(&writer),
                log_done_tx.clone(),
            )
        }),
        child.stderr.take().map(|err| {
            relays.relay(
                err,
                LogStream::Stderr,
                relay_to(&writer),
                log_done_tx.clone(),
            )
        }),
    ];
    drop(log_done_tx);
    if let Some(Err(e)) = relayed.into_iter().flatten().find(Result::is_err) {
        let _ = kill(child_pid, Signal::SIGKILL);
        return fail(format!("relaying the function's output: {e}"));
    }

    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let api = api.clone();
        let restore = Restore {
            writer: writer.clone(),
            entropy: entropy.to_path_buf(),
            set_clock,
        };
        let stopping = stopping.clone();
        let spawned = thread::Builder::new()
            .name("agent-channel".into())
            .spawn(move || read_channel(rd, api, child_pid, restore, stage, stopping));
        if let Err(e) = spawned {
            return fail(format!("starting the channel reader: {e}"));
        }
    }

    // Reap every process (we may be PID 1) until bootstrap ends.
    let mut extensions = extensions;
    loop {
        let ended = match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) => Some((pid, ExitStatus::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => Some((pid, ExitStatus::Signal(sig as i32))),
            Ok(_) => None,
            Err(nix::errno::Errno::EINTR) => None,
            Err(e) => return fail(format!("waitpid: {e}")),
        };
        let Some((pid, status)) = ended else { continue };
        if pid == child_pid {
            if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                // Extensions told to shut down get their grace to end, and
                // what they wrote is relayed.
                wait_for_extensions(&mut extensions);
                relays.settle();
            }
            finish(&writer, &api, &log_done_rx, status);
            return 0;
        }
        if let Some(name) = extensions.remove(&pid) {
            if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                send(
                    &writer,
                    &Message::Log {
                        stream: LogStream::Agent,
                        line: format!("extension {name} ended ({status:?})").into_bytes(),
                    },
                );
            }
            api.extension_gone(&name);
        }
    }
}

/// Where Lambda finds external extensions: executables in the layers'
/// `extensions` folder, started in name order.
const EXTENSIONS_DIR: &str = "/opt/extensions";

/// How long the runtime's start waits for external extensions to register.
const EXTENSION_REGISTRATION: Duration = Duration::from_secs(10);
/// How often that wait looks for extensions that ended without registering.
const EXIT_CHECK: Duration = Duration::from_millis(20);

/// Start the external extensions (`/opt/extensions/*`) with `command`, their
/// output relayed, and wait until each has registered or ended. The process
/// ids and names of those still running; the error of one that could not
/// start.
fn start_extensions(
    command: &dyn Fn(&Path) -> Command,
    api: &RuntimeApi,
    relays: &LogRelays,
    writer: &SharedWriter,
) -> Result<std::collections::HashMap<Pid, String>, String> {
    // Every file: one that cannot be started fails the start, as in Lambda.
    let mut found: Vec<PathBuf> = match std::fs::read_dir(EXTENSIONS_DIR) {
        Ok(dir) => dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.metadata().is_ok_and(|m| m.is_file()))
            .collect(),
        Err(_) => return Ok(Default::default()),
    };
    found.sort();
    let mut started = Vec::new();
    let (done_tx, _done_rx) = mpsc::channel::<()>();
    for path in &found {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = command(path)
            .spawn()
            .map_err(|e| format!("starting extension {}: {e}", path.display()))?;
        for (pipe, stream) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn PipeRead>),
                LogStream::Stdout,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn PipeRead>),
                LogStream::Stderr,
            ),
        ] {
            if let Some(pipe) = pipe {
                let w = writer.clone();
                let telemetry = api.telemetry();
                relays
                    .relay(
                        pipe,
                        stream,
                        move |stream, line: Vec<u8>| {
                            telemetry.extension_line(&line);
                            send(&w, &Message::Log { stream, line })
                        },
                        done_tx.clone(),
                    )
                    .map_err(|e| format!("relaying extension {name}'s output: {e}"))?;
            }
        }
        started.push((child, name));
    }
    // Registration: each extension registers, or ends (it is then not
    // waited for), within the limit.
    let deadline = Instant::now() + EXTENSION_REGISTRATION;
    let mut registered = api.extensions_registered();
    loop {
        let mut alive = 0;
        for (c, _) in started.iter_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                alive += 1;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if registered >= alive || left.is_zero() {
            break;
        }
        // Woken by a registration; now and then to see which ended.
        registered = api.extensions_registered_after(registered, left.min(EXIT_CHECK));
    }
    // Those that ended are reaped already (`try_wait`).
    Ok(started
        .into_iter()
        .filter_map(|(mut c, name)| {
            matches!(c.try_wait(), Ok(None)).then(|| (Pid::from_raw(c.id() as i32), name))
        })
        .collect())
}

/// A pipe the log relay reads.
trait PipeRead: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> PipeRead for T {}

/// After the runtime stopped: the extensions that got a `SHUTDOWN` event
/// have [`SHUTDOWN_GRACE_MS`](crate::extensions::SHUTDOWN_GRACE_MS) to end;
/// those still running then are killed.
fn wait_for_extensions(extensions: &mut std::collections::HashMap<Pid, String>) {
    if extensions.is_empty() {
        return;
    }
    let pids: Vec<Pid> = extensions.keys().copied().collect();
    let (done, ended) = mpsc::channel::<()>();
    let grace = Duration::from_millis(crate::extensions::SHUTDOWN_GRACE_MS);
    let killer = thread::Builder::new()
        .name("agent-ext-grace".into())
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(grace) {
                for pid in pids {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
        });
    while !extensions.is_empty() {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => {
                extensions.remove(&pid);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    drop(done);
    if let Ok(killer) = killer {
        let _ = killer.join();
    }
}

fn finish(writer: &SharedWriter, api: &RuntimeApi, logs: &mpsc::Receiver<()>, status: ExitStatus) {
    api.close();
    // Give the log relays a moment to forward the last lines.
    let deadline = Instant::now() + Duration::from_millis(200);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if logs.recv_timeout(left).is_err() {
            break;
        }
    }
    send(writer, &Message::Exited(status));
}

/// The fields of a [`Message::Restored`] frame.
struct Restored<'a> {
    seed: &'a [u8],
    sandbox_id: &'a str,
    log_stream: &'a str,
    unix_time_ns: u64,
}

/// What a [`Message::Restored`] frame needs.
struct Restore {
    writer: SharedWriter,
    entropy: PathBuf,
    set_clock: bool,
}

impl Restore {
    /// This sandbox is a clone of a function snapshot: mix the host's seed
    /// into the kernel's entropy pool, take on the clone's identity, and
    /// answer `Ready`. A seed that cannot be written is fatal (the
    /// function is killed and the agent exits): a clone must never run
    /// with its siblings' randomness.
    fn apply(&self, api: &RuntimeApi, child: Pid, restored: Restored<'_>) {
        let Restored {
            seed,
            sandbox_id,
            log_stream,
            unix_time_ns,
        } = restored;
        let t = Instant::now();
        let mixed = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.entropy)
            .and_then(|mut f| f.write_all(seed));
        if let Err(e) = mixed {
            let message = format!(
                "cannot mix the clone's seed into {}: {e}",
                self.entropy.display()
            );
            eprintln!("sluice-agent: {message}");
            send(&self.writer, &Message::Fatal { message });
            let _ = kill(child, Signal::SIGKILL);
            std::process::exit(1);
        }
        // The clone's clock is the snapshot's: deadlines would look far
        // away. A clock that cannot be set is fatal too.
        let clock = if self.set_clock {
            let now = nix::sys::time::TimeSpec::from(std::time::Duration::from_nanos(unix_time_ns));
            if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now) {
                let message = format!("cannot set the clone's clock to the host's time: {e}");
                eprintln!("sluice-agent: {message}");
                send(&self.writer, &Message::Fatal { message });
                let _ = kill(child, Signal::SIGKILL);
                std::process::exit(1);
            }
            "; clock set to the host's time"
        } else {
            ""
        };
        api.set_identity(sandbox_id, log_stream);
        let line = format!(
            "restored from a function snapshot as sandbox {sandbox_id} (log stream {log_stream}); {} seed bytes mixed into {}{clock}",
            seed.len(),
            self.entropy.display()
        );
        send(
            &self.writer,
            &Message::Log {
                stream: LogStream::Agent,
                line: line.into_bytes(),
            },
        );
        let init_us = t.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
        send(&self.writer, &Message::Ready { init_us });
    }
}

fn read_channel(
    rd: Box<dyn Read + Send>,
    api: RuntimeApi,
    child: Pid,
    restore: Restore,
    stage: Stage,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut r = BufReader::with_capacity(64 * 1024, rd);
    // Set by an `Attachment` frame for the `Invoke` that follows it: Ok
    // when staged, the error when the file could not be written.
    let mut attached: Option<Result<(), String>> = None;
    loop {
        match read_message(&mut r, MAX_HOST_FRAME) {
            Ok(Some(Message::Attachment { data })) => {
                attached = Some(stage.put(&data).map_err(|e| {
                    format!(
                        "cannot stage the invocation's attachment ({} bytes) at {}: {e}",
                        data.len(),
                        stage.path().display()
                    )
                }));
            }
            Ok(Some(Message::Invoke {
                request_id,
                deadline_ms,
                invoked_function_arn,
                trace_id,
                client_context,
                payload,
            })) => match attached.take() {
                Some(Err(message)) => {
                    // The function never sees an invocation whose data is missing.
                    stage.clear();
                    send(
                        &restore.writer,
                        &Message::Error {
                            request_id,
                            error_type: "Sluice.AttachmentFailed".into(),
                            body: serde_json::json!({
                                "errorType": "Sluice.AttachmentFailed",
                                "errorMessage": message,
                            })
                            .to_string()
                            .into_bytes(),
                        },
                    );
                }
                staged => {
                    if staged.is_none() {
                        stage.clear();
                    }
                    api.push_invoke(Invocation {
                        request_id,
                        deadline_ms,
                        invoked_function_arn,
                        trace_id,
                        client_context,
                        payload,
                    })
                }
            },
            Ok(Some(Message::Restored {
                seed,
                sandbox_id,
                log_stream,
                unix_time_ns,
            })) => restore.apply(
                &api,
                child,
                Restored {
                    seed: &seed,
                    sandbox_id: &sandbox_id,
                    log_stream: &log_stream,
                    unix_time_ns,
                },
            ),
            Ok(Some(Message::Shutdown)) | Ok(None) => {
                // Extensions that take `SHUTDOWN` events get one, and the
                // reaper gives them their grace once the runtime ended.
                if api.shutdown_extensions() {
                    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                // The reaper sees bootstrap end and exits after the log
                // relays forwarded what the function wrote before (its
                // last lines may still be in the pipes; `finish`).
                let _ = kill(child, Signal::SIGKILL);
                return;
            }
            Ok(Some(other)) => {
                eprintln!(
                    "sluice-agent: unexpected {} frame from the host",
                    other.kind_name()
                );
                let _ = kill(child, Signal::SIGKILL);
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("sluice-agent: bad frame from the host: {e}");
                let _ = kill(child, Signal::SIGKILL);
                std::process::exit(1);
            }
        }
    }
}
