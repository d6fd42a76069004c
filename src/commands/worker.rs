//! `sluice worker`: process the tasks of distributed backfills.

use std::path::PathBuf;
use std::time::Duration;

use sluice_ingest::metrics::Metrics;
use sluice_taskgen::distributed::{self, WorkerConfig};

use super::backfill::kafka_for;
use crate::exit;

/// `sluice worker`'s command line.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The pipeline file declaring the jobs and functions.
    pub pipeline: PathBuf,
    /// Jobs to serve (default: every `[job.NAME]` of the pipeline).
    pub jobs: Vec<String>,
    /// The Kafka cluster (default: the first job's `bootstrap_servers`).
    #[arg(long)]
    pub bootstrap_servers: Option<String>,
    /// Calls in flight (default: the largest concurrency of the jobs;
    /// 1 to 1,000).
    #[arg(long, value_parser = super::backfill::concurrency)]
    pub concurrency: Option<usize>,
    /// Stop once no task arrived or finished for this long, e.g. `10s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stop_when_idle: Option<Duration>,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464):
    /// calls per job by outcome, retries, call durations, warm pools.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Do not print the functions' log lines.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Serves the jobs' tasks until SIGINT/SIGTERM (or idle for
/// `stop_when_idle`); exit 0, or 3 when the cluster cannot be used.
pub async fn run(args: WorkerArgs) -> u8 {
    let WorkerArgs {
        pipeline,
        jobs,
        bootstrap_servers,
        concurrency,
        stop_when_idle,
        metrics_addr,
        quiet,
    } = args;
    let pipeline = pipeline.as_path();
    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let jobs: Vec<String> = if jobs.is_empty() {
        p.jobs.keys().cloned().collect()
    } else {
        jobs
    };
    if jobs.is_empty() {
        crate::log_error!(
            "{} declares no [job.NAME]: a worker serves the tasks of backfill jobs",
            pipeline.display()
        );
        return exit::USAGE;
    }
    let mut first = None;
    let mut default_concurrency = 0usize;
    for name in &jobs {
        match p.job(name) {
            Ok(job) => {
                first.get_or_insert(job);
                let f = p
                    .function(&job.function)
                    .expect("validation checks that jobs name declared functions");
                default_concurrency =
                    default_concurrency.max(job.max_concurrency.unwrap_or(f.concurrency) as usize);
            }
            Err(e) => {
                crate::log_error!("{e}");
                return exit::USAGE;
            }
        }
    }
    let (kafka, embedded) = match kafka_for(bootstrap_servers.as_deref(), first) {
        Ok(k) => k,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::INVOKE_FAILED;
        }
    };
    if embedded.is_some() {
        crate::log_note!(
            "embedded Kafka broker at {} (in this process): only useful if the \
             coordinator runs here too; give --bootstrap-servers to join a coordinator's broker",
            kafka.servers
        );
    }
    let ex = match super::executor_for(&p, crate::logs::function_log_sink(quiet)) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    crate::log_note!(
        "worker serving {} on {}",
        jobs.iter()
            .map(|j| distributed::tasks_topic(j))
            .collect::<Vec<_>>()
            .join(", "),
        kafka.servers
    );
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    let metrics = match &metrics_addr {
        Some(addr) => {
            let registry = Metrics::new();
            registry.watch_executor(ex.clone());
            if let Err(code) = super::serve_metrics(addr, registry.clone(), metrics_stopped).await {
                ex.shutdown().await;
                return code;
            }
            Some(registry)
        }
        None => None,
    };
    let cfg = WorkerConfig {
        jobs,
        concurrency: concurrency.unwrap_or(default_concurrency).max(1),
        stop_when_idle,
        metrics,
    };
    let shutdown = super::stop_requested();
    let result = distributed::work(&ex, &kafka, cfg, shutdown).await;
    let _ = stop_metrics.send(true);
    ex.shutdown().await;
    drop(embedded);
    match result {
        Ok(s) => {
            println!(
                "worker: {} tasks succeeded, {} failed, {} malformed",
                s.succeeded, s.failed, s.malformed
            );
            exit::OK
        }
        Err(e) => {
            crate::log_error!("{e}");
            exit::INVOKE_FAILED
        }
    }
}
