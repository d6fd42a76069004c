//! One module per subcommand, plus the glue from pipeline files to executor
//! settings.

pub mod backfill;
pub mod bench;
pub mod bench_objects;
pub mod bench_state;
pub mod doctor;
pub mod image;
pub mod invoke;
pub mod mapreduce;
pub mod new;
pub mod run;
pub mod serve;
pub mod state;
pub mod validate;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sluice_executor::microvm::{MicrovmBackend, MicrovmConfig, MicrovmError};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, LogSink, Routed, locate_agent};
use sluice_pipeline::{Backend, Pipeline};

/// The process backend with the agent found next to this binary.
pub fn process_backend() -> Result<ProcessBackend> {
    let agent = locate_agent().context(
        "cannot find the sluice-agent binary next to sluice (build it with `cargo build --workspace`, or set SLUICE_AGENT)",
    )?;
    Ok(ProcessBackend::new(ProcessConfig::detect(agent)))
}

/// An executor with every function of `pipeline` registered, each on its
/// backend: `process`; `microvm` (refused here, with the host probe's
/// reasons, where Linux guests cannot boot or no guest image is built);
/// `auto`, the microVM where it can run, else the process sandbox.
pub fn executor_for(pipeline: &Pipeline, logs: LogSink) -> Result<Executor> {
    let mut microvm: Option<Result<Arc<MicrovmBackend>, MicrovmError>> = None;
    let mut microvm_backend = || {
        microvm
            .get_or_insert_with(|| {
                MicrovmBackend::new(MicrovmConfig::detect(&doctor::sluice_home())).map(Arc::new)
            })
            .as_ref()
            .map(|b| b.clone() as Arc<dyn sluice_executor::Backend>)
            .map_err(|e| e.to_string())
    };
    let mut routes = Vec::new();
    for f in pipeline.functions.values() {
        let backend = match f.backend {
            Backend::Process => None,
            Backend::Microvm => Some(
                microvm_backend()
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("function {}: backend = \"microvm\"", f.name))?,
            ),
            Backend::Auto => microvm_backend().ok(),
        };
        routes.push((f.name.clone(), backend));
    }
    let backend: Arc<dyn sluice_executor::Backend> = if routes.iter().all(|(_, b)| b.is_none()) {
        Arc::new(process_backend()?)
    } else if let Some((_, Some(vm))) = routes.first()
        && routes.iter().all(|(_, b)| b.is_some())
    {
        vm.clone()
    } else {
        let mut routed = Routed::new(Arc::new(process_backend()?));
        for (name, b) in routes {
            if let Some(b) = b {
                routed = routed.route(&name, b);
            }
        }
        Arc::new(routed)
    };
    let ex = Executor::with_log_sink(backend, logs);
    for f in pipeline.functions.values() {
        ex.register(sluice_ingest::function_spec(f));
    }
    Ok(ex)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what `kill`, systemd and
/// container runtimes send): commands that run until stopped finish their
/// calls in flight on either.
pub async fn stop_requested() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves `registry` at `http://ADDR/metrics` (`--metrics-addr`) in the
/// background until `stop` turns true or is dropped, after printing the
/// address; the usage exit code when the address cannot be bound.
pub async fn serve_metrics(
    addr: &str,
    registry: Arc<sluice_ingest::metrics::Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), u8> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            crate::log_error!("--metrics-addr {addr}: {e}");
            return Err(crate::exit::USAGE);
        }
    };
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    crate::log_note!("metrics at http://{bound}/metrics");
    tokio::spawn(async move {
        let stopped = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = sluice_ingest::metrics::serve(listener, registry, stopped).await {
            tracing::warn!("metrics server stopped: {e}");
        }
    });
    Ok(())
}

/// Load a pipeline, printing its located error and returning the usage exit
/// code on failure.
pub fn load_pipeline(path: &Path) -> Result<Pipeline, u8> {
    let mut p = load_pipeline_as_written(path)?;
    // Functions and layers given as .zip archives run from folders they
    // are unpacked to once, under $SLUICE_HOME/packages.
    p.unpack_packages(&doctor::sluice_home().join("packages"))
        .map_err(|e| {
            crate::log_error!("{e}");
            crate::exit::USAGE
        })?;
    Ok(p)
}

/// Load and validate a pipeline without unpacking its archives (what
/// `sluice validate` shows).
pub fn load_pipeline_as_written(path: &Path) -> Result<Pipeline, u8> {
    Pipeline::load(path).map_err(|e| {
        crate::log_error!("{e}");
        crate::exit::USAGE
    })
}

/// Load a pipeline and one of its functions (what a bench measures),
/// printing the error and returning the usage exit code on failure.
pub fn load_function(
    path: &Path,
    function: &str,
) -> Result<(Pipeline, sluice_pipeline::FunctionConfig), u8> {
    let p = load_pipeline(path)?;
    match p.function(function) {
        Ok(f) => {
            let f = f.clone();
            Ok((p, f))
        }
        Err(e) => {
            crate::log_error!("{e}");
            Err(crate::exit::USAGE)
        }
    }
}

/// The function's memory, for the summary: the most a sandbox used (as
/// Lambda's "Max Memory Used") against its `memory_mb`.
pub struct MemoryUse {
    /// Bytes, the most one sandbox used at once.
    pub max_used: u64,
    /// The function's limit.
    pub memory_mb: u32,
}

impl MemoryUse {
    /// The figures of a function from its stats, read once its executor
    /// has shut down (which reads the memory of every sandbox it stops),
    /// where the backend can tell.
    pub fn of(stats: &sluice_executor::FunctionStats, memory_mb: u32) -> Option<Self> {
        Some(Self {
            max_used: stats.max_memory_used?,
            memory_mb,
        })
    }
}

impl std::fmt::Display for MemoryUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory: a sandbox used at most {} MB of its {} MB",
            self.max_used.div_ceil(1 << 20),
            self.memory_mb
        )
    }
}
