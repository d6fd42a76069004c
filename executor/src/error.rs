//! Errors of an invocation, classified by who is at fault and whether a retry
//! can help (the caller's retry policy reads [`InvokeError::retryable`]).

use std::time::Duration;

use thiserror::Error;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The function's code or configuration, or the caller's input.
    User,
    /// Something outside sluice (the OS refused a resource, the host is out
    /// of memory).
    External,
    /// A bug or broken invariant in sluice.
    Internal,
}

/// Why an invocation did not produce a response.
#[derive(Debug, Error)]
pub enum InvokeError {
    /// The function reported an error (`/invocation/{id}/error`).
    #[error("function {function} failed: {error_type}: {error_message}")]
    Function {
        /// Function name.
        function: String,
        /// `errorType` (or the `Lambda-Runtime-Function-Error-Type` header).
        error_type: String,
        /// `errorMessage`.
        error_message: String,
        /// The raw error body the function posted.
        body: Vec<u8>,
    },
    /// The invocation ran past the function's timeout; the sandbox was killed.
    #[error("function {function} timed out after {timeout:?}")]
    Timeout {
        /// Function name.
        function: String,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The function failed during initialisation (before its first `next`).
    #[error("function {function} failed to initialise: {error_type}: {message}")]
    InitFailed {
        /// Function name.
        function: String,
        /// `Runtime.ExitError`, `Runtime.InitTimeout`, or the type the
        /// function posted to `/init/error`.
        error_type: String,
        /// What happened.
        message: String,
    },
    /// The sandbox hit its memory limit.
    #[error("function {function} ran out of memory (limit {limit_mb} MiB)")]
    OutOfMemory {
        /// Function name.
        function: String,
        /// The limit.
        limit_mb: u32,
    },
    /// The function's process ended in the middle of an invocation.
    #[error("sandbox of function {function} crashed: {detail}")]
    SandboxCrashed {
        /// Function name.
        function: String,
        /// Exit status and context.
        detail: String,
    },
    /// The request payload exceeds the synchronous limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// All `concurrency` slots are busy and `max_queue` callers already wait.
    #[error(
        "function {function} is throttled: {concurrency} invocations running and {max_queue} waiting"
    )]
    Throttled {
        /// Function name.
        function: String,
        /// Concurrency limit.
        concurrency: u32,
        /// Queue bound.
        max_queue: u32,
    },
    /// No function of that name is registered.
    #[error("unknown function {name:?} (known: {known})")]
    UnknownFunction {
        /// The name asked for.
        name: String,
        /// Comma-separated registered names.
        known: String,
    },
    /// The sandbox could not be created or broke the agent protocol.
    #[error("sandbox of function {function}: {source}")]
    Sandbox {
        /// Function name.
        function: String,
        /// The cause.
        #[source]
        source: SandboxError,
    },
    /// The executor is shutting down.
    #[error("the executor is shutting down")]
    ShuttingDown,
}

impl InvokeError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            InvokeError::Function { .. }
            | InvokeError::Timeout { .. }
            | InvokeError::InitFailed { .. }
            | InvokeError::OutOfMemory { .. }
            | InvokeError::SandboxCrashed { .. }
            | InvokeError::PayloadTooLarge { .. }
            | InvokeError::UnknownFunction { .. } => Fault::User,
            InvokeError::Throttled { .. } | InvokeError::ShuttingDown => Fault::External,
            InvokeError::Sandbox { source, .. } => source.fault(),
        }
    }

    /// Whether the same call may succeed if tried again.
    pub fn retryable(&self) -> bool {
        match self {
            InvokeError::Function { .. }
            | InvokeError::Timeout { .. }
            | InvokeError::SandboxCrashed { .. }
            | InvokeError::OutOfMemory { .. }
            | InvokeError::Throttled { .. } => true,
            InvokeError::InitFailed { .. }
            | InvokeError::PayloadTooLarge { .. }
            | InvokeError::UnknownFunction { .. }
            | InvokeError::ShuttingDown => false,
            InvokeError::Sandbox { source, .. } => source.retryable(),
        }
    }

    /// Lambda-style error type, for event records and exit messages.
    pub fn error_type(&self) -> &str {
        match self {
            InvokeError::Function { error_type, .. } => error_type,
            InvokeError::Timeout { .. } => "Sandbox.Timedout",
            InvokeError::InitFailed { error_type, .. } => error_type,
            InvokeError::OutOfMemory { .. } => "Runtime.OutOfMemory",
            InvokeError::SandboxCrashed { .. } => "Runtime.ExitError",
            InvokeError::PayloadTooLarge { .. } => "RequestEntityTooLargeException",
            InvokeError::Throttled { .. } => "TooManyRequestsException",
            InvokeError::UnknownFunction { .. } => "ResourceNotFoundException",
            InvokeError::Sandbox { .. } => "Sluice.SandboxError",
            InvokeError::ShuttingDown => "Sluice.ShuttingDown",
        }
    }
}

/// A failure of the sandbox machinery itself (not of the function's code).
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The agent binary could not be started.
    #[error("cannot start the agent {agent}: {source}")]
    Spawn {
        /// Agent path.
        agent: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent could not build the sandbox (namespaces, mounts...).
    #[error("sandbox set-up failed: {message}")]
    Setup {
        /// The agent's message.
        message: String,
    },
    /// The host could not prepare resources (cgroups, uid maps, folders).
    #[error("{what}: {source}")]
    Host {
        /// What the host was doing.
        what: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent sent a malformed or oversized frame, or an unexpected one;
    /// the sandbox was killed.
    #[error("agent protocol violation: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The channel to the agent closed unexpectedly.
    #[error("agent channel closed")]
    ChannelClosed,
    /// The microVM could not be prepared or built (guest image, KVM).
    #[error("{what}: {message}")]
    Vm {
        /// What the host was doing.
        what: String,
        /// The VMM's error.
        message: String,
    },
}

impl SandboxError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            SandboxError::Spawn { .. } | SandboxError::Host { .. } | SandboxError::Vm { .. } => {
                Fault::External
            }
            SandboxError::Setup { .. } => Fault::External,
            // The agent runs next to untrusted code; a broken channel is
            // treated as the function's doing.
            SandboxError::Protocol { .. } | SandboxError::ChannelClosed => Fault::User,
        }
    }

    /// Whether a new sandbox may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SandboxError::Protocol { .. }
                | SandboxError::ChannelClosed
                | SandboxError::Host { .. }
                | SandboxError::Vm { .. }
        )
    }
}
