//! The sandbox backend interface: the process sandbox today, the microVM
//! later. A backend starts initialised sandboxes; a sandbox runs one
//! invocation at a time.

use std::time::Duration;

use async_trait::async_trait;

use crate::{FunctionSpec, InvokeError, LogLine};

/// One invocation as the sandbox delivers it to the runtime.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `Lambda-Runtime-Aws-Request-Id`.
    pub request_id: String,
    /// `Lambda-Runtime-Deadline-Ms`.
    pub deadline_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`.
    pub invoked_function_arn: String,
    /// `Lambda-Runtime-Trace-Id`.
    pub trace_id: String,
    /// `Lambda-Runtime-Client-Context`.
    pub client_context: String,
    /// The event.
    pub payload: Vec<u8>,
    /// Delivered as a file at `sluice_protocol::ATTACHMENT_PATH` before the
    /// event (see `InvokeOptions::attachment`).
    pub attachment: Option<bytes::Bytes>,
}

/// Receives the function's log lines.
pub type LogSink = std::sync::Arc<dyn Fn(LogLine) + Send + Sync>;

/// Starts sandboxes for functions.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name (`process`, `microvm`).
    fn name(&self) -> &'static str;

    /// Start a sandbox for `spec`, for `tenant`, and wait until the
    /// function's runtime is initialised (its first `next`).
    async fn start(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
    ) -> Result<Box<dyn Sandbox>, InvokeError>;
}

/// An initialised sandbox running one function for one tenant.
#[async_trait]
pub trait Sandbox: Send + 'static {
    /// Run one invocation, bounded by `timeout`. On timeout or crash the
    /// sandbox kills itself and [`Sandbox::is_reusable`] turns false.
    async fn invoke(&mut self, inv: Invocation, timeout: Duration) -> Result<Vec<u8>, InvokeError>;

    /// Whether it can take another invocation.
    fn is_reusable(&self) -> bool;

    /// How long initialisation took.
    fn init_duration(&self) -> Duration;

    /// The most memory the sandbox has used at once since it started, in
    /// bytes (Lambda's "Max Memory Used"), where the backend can tell.
    /// Reading it costs a system call or more: it is asked for only when a
    /// report wants it.
    fn max_memory_used(&self) -> Option<u64> {
        None
    }

    /// The tap that keeps its log lines for a call that wants a tail
    /// (Lambda's `LogType=Tail`): set by the pool, which wraps every
    /// sandbox it starts; backends leave it alone.
    #[doc(hidden)]
    fn log_tap(&self) -> Option<&crate::tail::LogTap> {
        None
    }

    /// Stop it and release its resources.
    async fn shutdown(self: Box<Self>);
}

/// A backend that starts each function's sandboxes on the backend chosen
/// for it, and the others on a default one (a pipeline whose functions ask
/// for different backends).
pub struct Routed {
    default: std::sync::Arc<dyn Backend>,
    routes: std::collections::HashMap<String, std::sync::Arc<dyn Backend>>,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut routes: Vec<_> = self
            .routes
            .iter()
            .map(|(k, v)| (k.as_str(), v.name()))
            .collect();
        routes.sort();
        f.debug_struct("Routed")
            .field("default", &self.default.name())
            .field("routes", &routes)
            .finish()
    }
}

impl Routed {
    /// Every function on `default` until routed elsewhere.
    pub fn new(default: std::sync::Arc<dyn Backend>) -> Self {
        Self {
            default,
            routes: Default::default(),
        }
    }

    /// Starts `function`'s sandboxes on `backend`.
    pub fn route(mut self, function: &str, backend: std::sync::Arc<dyn Backend>) -> Self {
        self.routes.insert(function.to_owned(), backend);
        self
    }

    /// The backend `function` runs on.
    pub fn backend_for(&self, function: &str) -> &dyn Backend {
        self.routes.get(function).unwrap_or(&self.default).as_ref()
    }
}

#[async_trait]
impl Backend for Routed {
    fn name(&self) -> &'static str {
        "routed"
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
    ) -> Result<Box<dyn Sandbox>, InvokeError> {
        self.backend_for(&spec.name).start(spec, tenant, logs).await
    }
}
