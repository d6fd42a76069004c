//! `sluice`: run your code on every record of a stream or data set.
//!
//! This binary is CLI wiring only; the work happens in the crates
//! (`sluice-executor`, `sluice-pipeline`, ...). See ARCHITECTURE.md.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes, documented in `sluice --help` and the README.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The function returned an error (its error is printed on stderr).
    pub const FUNCTION_ERROR: u8 = 1;
    /// Bad command line or pipeline file.
    pub const USAGE: u8 = 2;
    /// The invocation failed in sluice: timeout, out of memory, init failure,
    /// crash, throttling, sandbox set-up.
    pub const INVOKE_FAILED: u8 = 3;
    /// `sluice doctor`: this machine cannot run functions.
    pub const UNSUPPORTED: u8 = 4;
}

const EXIT_CODES: &str = "Exit codes:
  0  success
  1  the function returned an error (printed on stderr as JSON)
  2  bad command line or pipeline file (file:line:col on stderr)
  3  the invocation failed in sluice: timeout, out of memory, init failure,
     sandbox crash, throttling, sandbox set-up
  4  doctor: this machine cannot run functions";

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Run Lambda-style functions on every record of a stream or data set", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a pipeline file and print what it declares.
    Validate {
        /// The pipeline file (pipeline.toml).
        pipeline: PathBuf,
    },
    /// Invoke a function once: the response goes to stdout, logs and errors
    /// to stderr.
    Invoke {
        /// The pipeline file declaring the function.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Function name.
        function: String,
        /// The event: JSON text, `@FILE` to read a file, or `-` for stdin.
        /// Default `{}`.
        #[arg(long)]
        payload: Option<String>,
        /// Run as this tenant instead of the function's.
        #[arg(long)]
        tenant: Option<String>,
        /// Do not print the function's log lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Run the pipeline's Kafka triggers until SIGINT/SIGTERM.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Load records before starting: TOPIC=FILE.jsonl (one record value
        /// per line). Repeatable.
        #[arg(long, value_name = "TOPIC=FILE")]
        produce: Vec<String>,
        /// With --produce: use this JSON field of each line as the key.
        #[arg(long)]
        key_field: Option<String>,
        /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Stop (drain, commit, exit 0) once nothing arrived or finished for
        /// this long, e.g. `2s`.
        #[arg(long, value_parser = humantime::parse_duration)]
        stop_when_idle: Option<std::time::Duration>,
        /// Do not print the functions' log lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// What this machine can run: KVM, namespaces, cgroups, seccomp,
    /// landlock, guest kernel, Kafka.
    Doctor {
        /// Also check that a Kafka broker answers at HOST:PORT.
        #[arg(long)]
        kafka: Option<String>,
    },
    /// Call a function on every item of existing data sets (Parquet, CSV,
    /// JSON lines, text), at least once, resumable.
    Backfill {
        /// The pipeline file declaring the function.
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Function name.
        #[arg(long, short)]
        function: String,
        /// Source file or glob pattern (sorted). Repeatable.
        #[arg(long, required = true)]
        source: Vec<String>,
        /// parquet, csv (with header), jsonl or text.
        #[arg(long)]
        format: sluice_taskgen::Format,
        /// Items per call.
        #[arg(long, default_value_t = 100)]
        max_items_per_call: usize,
        /// Calls in flight (default: the function's concurrency).
        #[arg(long)]
        max_concurrency: Option<usize>,
        /// Progress database (default: .sluice-backfill-<hash>.redb next to
        /// the first source file).
        #[arg(long)]
        progress: Option<PathBuf>,
        /// Dead-letter JSON lines file (default: the progress path with
        /// .dead.jsonl).
        #[arg(long)]
        dead_letter: Option<PathBuf>,
        /// Attempts per call for retryable errors.
        #[arg(long, default_value_t = 3)]
        max_attempts: u32,
        /// Stop with exit code 3 once more calls than this have failed.
        #[arg(long)]
        tolerated_failure_count: Option<u64>,
        /// Items with the same value of this field run one after another
        /// (file, then row order); different keys run in parallel.
        #[arg(long, value_name = "FIELD")]
        order_key: Option<String>,
        /// Field holding each item's id (with --depends-on-column).
        #[arg(long, value_name = "FIELD", requires = "depends_on_column")]
        id_column: Option<String>,
        /// Field naming the id (or JSON list of ids) an item depends on: it
        /// runs only after those succeeded. Reads all items first; cycles and
        /// missing ids are reported before anything runs.
        #[arg(long, value_name = "FIELD", requires = "id_column")]
        depends_on_column: Option<String>,
        /// Print files, row groups, item and call counts (and dependency
        /// levels with the ordering options); call nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not print the function's log lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Warm invoke round trip through the sandbox, next to spawning the
    /// same bootstrap for every call.
    Invoke {
        /// The pipeline file declaring the function.
        #[arg(long, short, default_value = "examples/pipeline.toml")]
        pipeline: PathBuf,
        /// Function to call (an echo function).
        #[arg(long, short, default_value = "echo")]
        function: String,
        /// Warm calls to measure.
        #[arg(long, short = 'n', default_value_t = 2000)]
        iterations: usize,
        /// Spawn-per-call calls to measure.
        #[arg(long, default_value_t = 100)]
        spawn_iterations: usize,
        /// The event: JSON text or `@FILE` (default: a small JSON object).
        #[arg(long)]
        payload: Option<String>,
    },
    /// Records/s through a no-op function at several batch sizes, next to a
    /// plain rdkafka consumer (the ceiling), on the embedded broker.
    Kafka {
        /// The pipeline file declaring the function.
        #[arg(long, short, default_value = "examples/pipeline.toml")]
        pipeline: PathBuf,
        /// The no-op function (`noop` answers null whatever the event).
        #[arg(long, short, default_value = "noop")]
        function: String,
        /// Records to push through each configuration.
        #[arg(long, short = 'n', default_value_t = 20_000)]
        records: usize,
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
        batch_sizes: Vec<u32>,
    },
    /// Rows/s and calls/s of `sluice backfill` over a generated Parquet
    /// file through a no-op function at 1, 100 and 1,000 rows per call,
    /// next to reading the file with arrow alone.
    Backfill {
        /// The pipeline file declaring the function.
        #[arg(long, short, default_value = "examples/pipeline.toml")]
        pipeline: PathBuf,
        /// The no-op function (an echo function).
        #[arg(long, short, default_value = "echo")]
        function: String,
        /// Rows in the generated file (1 row per call uses at most 5,000).
        #[arg(long, short = 'n', default_value_t = 200_000)]
        rows: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sluice_ingest=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INVOKE_FAILED);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Validate { pipeline } => commands::validate::run(&pipeline),
            Command::Invoke {
                pipeline,
                function,
                payload,
                tenant,
                quiet,
            } => {
                commands::invoke::run(&pipeline, &function, payload.as_deref(), tenant, quiet).await
            }
            Command::Run {
                pipeline,
                produce,
                key_field,
                metrics_addr,
                stop_when_idle,
                quiet,
            } => {
                commands::run::run(commands::run::RunArgs {
                    pipeline,
                    produce,
                    key_field,
                    metrics_addr,
                    stop_when_idle,
                    quiet,
                })
                .await
            }
            Command::Backfill {
                pipeline,
                function,
                source,
                format,
                max_items_per_call,
                max_concurrency,
                progress,
                dead_letter,
                max_attempts,
                tolerated_failure_count,
                order_key,
                id_column,
                depends_on_column,
                dry_run,
                quiet,
            } => {
                commands::backfill::run(commands::backfill::BackfillArgs {
                    pipeline,
                    function,
                    source,
                    format,
                    max_items_per_call,
                    max_concurrency,
                    progress,
                    dead_letter,
                    max_attempts,
                    tolerated_failure_count,
                    order: sluice_taskgen::OrderConfig {
                        order_key,
                        id_column,
                        depends_on_column,
                    },
                    dry_run,
                    quiet,
                })
                .await
            }
            Command::Doctor { kafka } => commands::doctor::run(kafka.as_deref()).await,
            Command::Bench(BenchCommand::Invoke {
                pipeline,
                function,
                iterations,
                spawn_iterations,
                payload,
            }) => {
                commands::bench::invoke(
                    &pipeline,
                    &function,
                    iterations,
                    spawn_iterations,
                    payload.as_deref(),
                )
                .await
            }
            Command::Bench(BenchCommand::Kafka {
                pipeline,
                function,
                records,
                batch_sizes,
            }) => commands::bench::kafka(&pipeline, &function, records, &batch_sizes).await,
            Command::Bench(BenchCommand::Backfill {
                pipeline,
                function,
                rows,
            }) => commands::bench::backfill(&pipeline, &function, rows).await,
        }
    });
    ExitCode::from(code)
}
