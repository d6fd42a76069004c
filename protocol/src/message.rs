use serde::{Deserialize, Serialize};

/// Configuration the host sends to a freshly started agent as its first frame.
///
/// It carries everything the agent needs to build the sandbox and start the
/// function's `bootstrap` with the Lambda custom-runtime environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartConfig {
    /// `AWS_LAMBDA_FUNCTION_NAME`.
    pub function_name: String,
    /// `AWS_LAMBDA_FUNCTION_VERSION`.
    pub function_version: String,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, in MiB.
    pub memory_mb: u32,
    /// `_HANDLER`.
    pub handler: String,
    /// `AWS_LAMBDA_LOG_GROUP_NAME`.
    pub log_group: String,
    /// `AWS_LAMBDA_LOG_STREAM_NAME`.
    pub log_stream: String,
    /// Host path of the function folder; it is mounted read-only at
    /// `task_root` inside the sandbox.
    pub function_dir: String,
    /// `LAMBDA_TASK_ROOT` inside the sandbox (`/var/task`).
    pub task_root: String,
    /// Host directory (empty, owned by the host) used as the mount point of
    /// the sandbox's private root.
    pub root_dir: String,
    /// Host paths mounted read-only at the same place inside the sandbox to
    /// provide a runtime base (shared libraries, `/bin/sh`): Lambda's
    /// `provided` base image, here taken from the host.
    pub runtime_layers: Vec<String>,
    /// Host paths of the function's layers (Lambda layers), in order:
    /// merged read-only at `/opt` inside the sandbox, a later layer's files
    /// over an earlier one's. A microVM has them in its initramfs instead.
    pub layers: Vec<String>,
    /// Size of the writable `/tmp`, in MiB.
    pub tmp_mb: u32,
    /// `RLIMIT_NPROC` to apply inside the sandbox (0: none). The host sets it
    /// only when it could not put the sandbox in a pids cgroup.
    pub rlimit_nproc: u32,
    /// Address-space limit in bytes applied as an rlimit when the host has no
    /// memory cgroup (0: none).
    pub rlimit_as_bytes: u64,
    /// TCP port of the Runtime API inside the sandbox's own network namespace.
    pub runtime_api_port: u16,
    /// Extra environment variables of the function (user-defined).
    pub env: Vec<(String, String)>,
    /// uid and gid (inside the sandbox) that `bootstrap` runs as; `None`: as
    /// the agent (sandbox root). Lambda runs functions as `sbx_user1051`
    /// (993:990), without capabilities.
    pub run_as: Option<(u32, u32)>,
    /// Whether the agent must build the namespaces itself (process sandbox).
    /// In a microVM the VM is the sandbox and this is false.
    pub isolate: bool,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The function's standard output.
    Stdout,
    /// The function's standard error.
    Stderr,
    /// The agent itself.
    Agent,
}

/// How the function's `bootstrap` process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Bytes of entropy in a [`Message::Restored`] frame.
pub const SEED_LEN: usize = 32;

/// One message on the agent channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // ---- host to agent ----
    /// First frame: build the sandbox and start the function.
    Start(Box<StartConfig>),
    /// Deliver one invocation to the next `GET /invocation/next`.
    Invoke {
        /// `Lambda-Runtime-Aws-Request-Id`.
        request_id: String,
        /// `Lambda-Runtime-Deadline-Ms` (Unix epoch milliseconds).
        deadline_ms: u64,
        /// `Lambda-Runtime-Invoked-Function-Arn`.
        invoked_function_arn: String,
        /// `Lambda-Runtime-Trace-Id`.
        trace_id: String,
        /// `Lambda-Runtime-Client-Context` (empty: header omitted).
        client_context: String,
        /// The event (shared bytes: a decoded frame's payload is a slice of
        /// the frame, not a copy).
        payload: bytes::Bytes,
    },
    /// The next [`Message::Invoke`]'s attachment: the agent writes `data`
    /// to [`crate::ATTACHMENT_PATH`] (read-only for the function) before it
    /// hands that invocation to the runtime. An `Invoke` without one
    /// removes the previous invocation's file.
    Attachment {
        /// The file's contents (a slice of the frame, not a copy).
        data: bytes::Bytes,
    },
    /// Ask the agent to stop the function and exit.
    Shutdown,
    /// The host has written the uid/gid maps and cgroup membership that
    /// [`Message::Unshared`] asked for: stage 0 may go on.
    Proceed,
    /// The sandbox is a clone restored from a function snapshot taken
    /// while `bootstrap` waited at `/invocation/next`: every clone of one
    /// snapshot starts with the same memory, so the agent mixes `seed`
    /// into the kernel's entropy pool and takes on this clone's own
    /// identity before it answers [`Message::Ready`] (Lambda SnapStart's
    /// uniqueness caveat: two clones must never produce the same random
    /// values or names).
    Restored {
        /// Fresh random bytes from the host, for the guest's entropy pool.
        seed: [u8; SEED_LEN],
        /// This clone's sandbox id (unique per clone).
        sandbox_id: String,
        /// `AWS_LAMBDA_LOG_STREAM_NAME` of this clone.
        log_stream: String,
        /// The host's wall clock (ns since the Unix epoch) when the frame
        /// was sent: a clone's clock starts at the snapshot's time, and a
        /// function computes its remaining time from its deadline with it,
        /// so the guest agent sets the guest's clock to this.
        unix_time_ns: u64,
    },

    // ---- agent to host ----
    /// Stage 0 of the process sandbox created its user namespace and waits
    /// for the host to write its uid/gid maps and cgroup membership.
    Unshared,
    /// The runtime asked for its first invocation: initialisation is over.
    Ready {
        /// Time from spawning `bootstrap` to its first `next`, in microseconds.
        init_us: u64,
    },
    /// `POST /invocation/{id}/response`.
    Response {
        /// The invocation answered.
        request_id: String,
        /// The response body.
        body: Vec<u8>,
    },
    /// `POST /invocation/{id}/error`.
    Error {
        /// The invocation that failed.
        request_id: String,
        /// `Lambda-Runtime-Function-Error-Type` header (may be empty).
        error_type: String,
        /// The error body (normally `{"errorType","errorMessage"}`).
        body: Vec<u8>,
    },
    /// `POST /init/error`.
    InitError {
        /// `Lambda-Runtime-Function-Error-Type` header (may be empty).
        error_type: String,
        /// The error body.
        body: Vec<u8>,
    },
    /// One line the function (or the agent) wrote.
    Log {
        /// Where it came from.
        stream: LogStream,
        /// The line, without its newline; truncated by the agent.
        line: Vec<u8>,
    },
    /// The `bootstrap` process ended.
    Exited(ExitStatus),
    /// The agent could not build the sandbox or serve the API.
    Fatal {
        /// What went wrong.
        message: String,
    },
}

impl Message {
    /// Short name of the message kind, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Start(_) => "start",
            Message::Invoke { .. } => "invoke",
            Message::Attachment { .. } => "attachment",
            Message::Shutdown => "shutdown",
            Message::Proceed => "proceed",
            Message::Restored { .. } => "restored",
            Message::Unshared => "unshared",
            Message::Ready { .. } => "ready",
            Message::Response { .. } => "response",
            Message::Error { .. } => "error",
            Message::InitError { .. } => "init-error",
            Message::Log { .. } => "log",
            Message::Exited(_) => "exited",
            Message::Fatal { .. } => "fatal",
        }
    }
}
