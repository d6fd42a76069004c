//! One module per subcommand, plus the glue from pipeline files to executor
//! settings.

pub mod backfill;
pub mod bench;
pub mod bench_state;
pub mod doctor;
pub mod image;
pub mod invoke;
pub mod mapreduce;
pub mod run;
pub mod state;
pub mod validate;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, LogSink, locate_agent};
use sluice_pipeline::{Backend, Pipeline};

/// The process backend with the agent found next to this binary.
pub fn process_backend() -> Result<ProcessBackend> {
    let agent = locate_agent().context(
        "cannot find the sluice-agent binary next to sluice (build it with `cargo build --workspace`, or set SLUICE_AGENT)",
    )?;
    Ok(ProcessBackend::new(ProcessConfig::detect(agent)))
}

/// An executor with every function of `pipeline` registered.
pub fn executor_for(pipeline: &Pipeline, logs: LogSink) -> Result<Executor> {
    for f in pipeline.functions.values() {
        if matches!(f.backend, Backend::Microvm) {
            bail!("function {}: the microVM backend is not built yet", f.name);
        }
    }
    let ex = Executor::with_log_sink(Arc::new(process_backend()?), logs);
    for f in pipeline.functions.values() {
        ex.register(sluice_ingest::function_spec(f));
    }
    Ok(ex)
}

/// Load a pipeline, printing its located error and returning the usage exit
/// code on failure.
pub fn load_pipeline(path: &Path) -> Result<Pipeline, u8> {
    Pipeline::load(path).map_err(|e| {
        eprintln!("error: {e}");
        crate::exit::USAGE
    })
}
