//! `sluice`: run your code on every record of a stream or data set.
//!
//! This binary is CLI wiring only; the work happens in the crates
//! (`sluice-executor`, `sluice-pipeline`, ...). See ARCHITECTURE.md.

#[macro_use]
mod logs;
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
    /// How logs are written to stderr: text, or json (one object per line:
    /// sluice's events, the functions' output and REPORT lines).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SLUICE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: logs::LogFormat,
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
        /// Do not print the function's log lines and REPORT line.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Create a function folder from a template and declare it in a
    /// pipeline file (created if missing), ready for `sluice invoke`.
    New {
        /// Function name: 1 to 64 letters, digits, '_' or '-'.
        name: String,
        /// python: `handler.py` with `def handler(event, context)`, run by
        /// a Runtime API loop in Python's standard library (needs python3);
        /// node: `index.mjs` with an async `handler`, run by a Runtime API
        /// loop in Node's standard library (needs node); shell: a bash
        /// `bootstrap` using curl; rust: a cargo project on `lambda_runtime`.
        #[arg(long, value_enum, default_value = "python")]
        template: commands::new::Template,
        /// The folder to create (default: functions/NAME next to the
        /// pipeline file).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The pipeline file to declare it in.
        #[arg(long, short, default_value = "pipeline.toml")]
        pipeline: PathBuf,
    },
    /// Run the pipeline's Kafka and object-store triggers until SIGINT/SIGTERM.
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
        /// Object-store triggers: call again the objects that failed for
        /// good in earlier runs (they stay in the dead-letter file too).
        #[arg(long)]
        retry_failed: bool,
        /// Run only this trigger (its `name`), even one with `enabled =
        /// false`. Repeatable. Default: every enabled trigger. For example,
        /// more nodes that share a Kafka trigger's partitions while one node
        /// runs the object-store trigger.
        #[arg(long = "trigger", value_name = "NAME")]
        triggers: Vec<String>,
    },
    /// What this machine can run: KVM, namespaces, cgroups, seccomp,
    /// landlock, guest kernel, Kafka.
    Doctor {
        /// Also check that a Kafka broker answers at HOST:PORT.
        #[arg(long)]
        kafka: Option<String>,
    },
    /// Call a function on every item of existing data sets (Parquet, CSV,
    /// JSON lines, text, Avro), at least once, resumable.
    Backfill {
        /// The pipeline file (also accepted as --pipeline).
        #[arg(value_name = "PIPELINE", required_unless_present = "pipeline")]
        pipeline_file: Option<PathBuf>,
        /// A `[job.NAME]` of the pipeline; the flags below override its
        /// settings. Without a job, --function and --source are required.
        #[arg(value_name = "JOB")]
        job: Option<String>,
        /// The pipeline file.
        #[arg(long, short, conflicts_with = "pipeline_file")]
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        options: Box<commands::backfill::BackfillOptions>,
    },
    /// Run a MapReduce job (`[job.NAME]` with `kind = "mapreduce"`): map
    /// calls, a Kafka topic as the shuffle, reduce calls, part files.
    Mapreduce {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The job's name.
        job: String,
        /// The shuffle's Kafka cluster (default: the job's `bootstrap_servers`).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// An existing topic with `reduce_partitions` partitions to shuffle
        /// through, for clusters where sluice may not create topics
        /// (default: a new `sluice-mr-JOB-RUN` topic per run).
        #[arg(long)]
        shuffle_topic: Option<String>,
        /// Map only the first N items (file then row order): a sample, to
        /// try the job (1 to 100,000,000; default: the job's `max_items`,
        /// else every item). Its output replaces the folder's.
        #[arg(long, value_name = "N", value_parser = commands::backfill::max_items)]
        max_items: Option<u64>,
        /// Print the plan (files, items, map tasks, reduce partitions and
        /// where the output goes); call nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not print the functions' log lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Process the tasks of distributed backfills (`sluice backfill
    /// --distributed`) until SIGINT/SIGTERM; run any number of workers.
    Worker(commands::worker::WorkerArgs),
    /// Serve Lambda's Invoke API over HTTP until SIGINT/SIGTERM, for AWS
    /// SDKs and `aws lambda invoke --endpoint-url` (as `sam local
    /// start-lambda` does)
    Serve(commands::serve::ServeArgs),
    /// State carried by stateful triggers and jobs (`state = {...}`).
    #[command(subcommand)]
    State(StateCommand),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The microVM guest image.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build (or find cached) the guest kernel from Debian's linux-source
    /// and an initramfs with the static agent as /init, under $SLUICE_HOME.
    Build(commands::image::BuildArgs),
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Print the checkpointed state, one JSON line per key: trigger or job,
    /// source (GROUP/TOPIC/PARTITION), key, state, open window, last folded
    /// offset.
    Show {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
        /// Only this trigger or job.
        #[arg(long)]
        trigger: Option<String>,
        /// The Kafka cluster of `store = "kafka"` states, when the pipeline
        /// says "embedded" (whose data lives only as long as its process).
        #[arg(long)]
        bootstrap_servers: Option<String>,
    },
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
    /// TPC-H Q1 as a MapReduce job over generated lineitem Parquet files,
    /// next to one process computing it with Arrow (and DuckDB if its Python
    /// package is installed).
    Mapreduce {
        /// The pipeline file with the Q1 job and functions.
        #[arg(long, short, default_value = "examples/tpch/pipeline.toml")]
        pipeline: PathBuf,
        /// The MapReduce job (its sources are replaced by the generated files).
        #[arg(long, default_value = "q1")]
        job: String,
        /// TPC-H scale factor.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Parquet files to generate.
        #[arg(long, default_value_t = 8)]
        parts: i32,
    },
    /// The VMM on /dev/kvm with tiny guests: VM create-to-first-exit, port
    /// exit round trip, pause/resume, virtqueue throughput, and the microVM
    /// sandbox (scripted agent) restoring a function snapshot vs booting.
    Vm {
        /// VMs to create for the create-to-first-exit figure.
        #[arg(long, default_value_t = 20)]
        vms: usize,
        /// Port exits to time.
        #[arg(long, default_value_t = 2000)]
        exits: u32,
        /// MiB to push through the virtqueue.
        #[arg(long, default_value_t = 256)]
        mib: u64,
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
        /// Records to push through each configuration. Enough for about a
        /// hundred batches of 1,000, so that a run measures the steady state
        /// rather than its start; within what the embedded broker retains
        /// (about 140,000 of these records over the 3 partitions).
        #[arg(long, short = 'n', default_value_t = 100_000)]
        records: usize,
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
        batch_sizes: Vec<u32>,
        /// A librdkafka property for the trigger's consumer, as `KEY=VALUE`
        /// (repeatable), as a trigger's `properties` table would set it: to
        /// measure a tuning before putting it in a pipeline.
        #[arg(long = "property", value_name = "KEY=VALUE", value_parser = key_value)]
        properties: Vec<(String, String)>,
        /// Sets the function's `pin_cpu` for this run (`true` or `false`),
        /// to compare pinned and unpinned sandboxes.
        #[arg(long, value_name = "BOOL")]
        pin_cpu: Option<bool>,
    },
    /// Rows/s and calls/s of `sluice backfill` over a generated Parquet
    /// file through a no-op function at 1, 100 and 1,000 rows per call,
    /// next to reading the file with arrow alone.
    Backfill {
        /// The pipeline file declaring the function.
        #[arg(long, short, default_value = "examples/pipeline.toml")]
        pipeline: PathBuf,
        /// The no-op function (`noop` answers null whatever the event; an
        /// echo function would also send every row back).
        #[arg(long, short, default_value = "noop")]
        function: String,
        /// Rows in the generated file (1 row per call uses at most 5,000).
        #[arg(long, short = 'n', default_value_t = 1_000_000)]
        rows: usize,
        /// Sets the functions' `pin_cpu` for this run (`true` or `false`),
        /// to compare pinned and unpinned sandboxes.
        #[arg(long, value_name = "BOOL")]
        pin_cpu: Option<bool>,
    },
    /// Objects/s through an object-store trigger and a no-op function,
    /// next to calling the function directly once per object (the
    /// ceiling) and to listing and reading the objects alone.
    Objects {
        /// The pipeline file declaring the function.
        #[arg(long, short, default_value = "examples/pipeline.toml")]
        pipeline: PathBuf,
        /// The no-op function (`noop` answers null whatever the event).
        #[arg(long, short, default_value = "noop")]
        function: String,
        /// Objects to write and process.
        #[arg(long, short = 'n', default_value_t = 2000)]
        objects: usize,
        /// Bytes per object.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// A prefix of a real store (`s3://bucket/prefix`, credentials from
        /// the environment) instead of a local folder; the bench writes its
        /// objects below it and deletes them afterwards.
        #[arg(long)]
        url: Option<String>,
        /// Rounds of direct calls and the trigger, alternated.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Stateful calls (1 KiB and 100 KiB state, checkpoint per call) next
    /// to stateless calls of the same function; checkpoint cost; recovery
    /// time by state size.
    State {
        /// The pipeline file declaring the function.
        #[arg(long, short, default_value = "examples/state/pipeline.toml")]
        pipeline: PathBuf,
        /// A function that answers {"state": ...} carrying unknown fields
        /// (the running-sum example).
        #[arg(long, short, default_value = "running-sum")]
        function: String,
        /// Calls per figure.
        #[arg(long, short = 'n', default_value_t = 500)]
        calls: usize,
    },
}

/// `KEY=VALUE` as a pair (the value may itself hold `=`).
fn key_value(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{arg:?} is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logs::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::log_error!("cannot start the async runtime: {e}");
            return ExitCode::from(exit::INVOKE_FAILED);
        }
    };
    // The command runs as a task on the worker threads rather than as
    // `block_on`'s future on this thread: a task woken by I/O then runs on
    // the worker that saw the I/O, instead of each wake-up crossing to this
    // thread (a context switch per step of every invocation).
    let code = runtime.block_on(async move {
        match tokio::spawn(dispatch(cli.command)).await {
            Ok(code) => code,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    });
    ExitCode::from(code)
}

/// Runs one command; its exit code.
async fn dispatch(command: Command) -> u8 {
    {
        match command {
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
            Command::New {
                name,
                template,
                dir,
                pipeline,
            } => commands::new::run(&name, template, dir, pipeline),
            Command::Run {
                pipeline,
                produce,
                key_field,
                metrics_addr,
                stop_when_idle,
                quiet,
                retry_failed,
                triggers,
            } => {
                commands::run::run(commands::run::RunArgs {
                    pipeline,
                    produce,
                    key_field,
                    metrics_addr,
                    stop_when_idle,
                    quiet,
                    retry_failed,
                    triggers,
                })
                .await
            }
            Command::Backfill {
                pipeline_file,
                job,
                pipeline,
                options,
            } => {
                let pipeline = pipeline
                    .or(pipeline_file)
                    .expect("clap requires PIPELINE or --pipeline");
                commands::backfill::run(pipeline, job, *options).await
            }
            Command::Worker(args) => commands::worker::run(args).await,
            Command::Serve(args) => commands::serve::run(args).await,
            Command::Mapreduce {
                pipeline,
                job,
                bootstrap_servers,
                shuffle_topic,
                max_items,
                dry_run,
                quiet,
            } => {
                let run = commands::mapreduce::Run {
                    bootstrap: bootstrap_servers,
                    shuffle_topic,
                    max_items,
                    dry_run,
                    quiet,
                };
                commands::mapreduce::run(&pipeline, &job, run).await
            }
            Command::Doctor { kafka } => commands::doctor::run(kafka.as_deref()).await,
            Command::State(StateCommand::Show {
                pipeline,
                key,
                trigger,
                bootstrap_servers,
            }) => {
                commands::state::show(
                    &pipeline,
                    key.as_deref(),
                    trigger.as_deref(),
                    bootstrap_servers.as_deref(),
                )
                .await
            }
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
                properties,
                pin_cpu,
            }) => {
                commands::bench::kafka(
                    &pipeline,
                    &function,
                    records,
                    &batch_sizes,
                    &properties,
                    pin_cpu,
                )
                .await
            }
            Command::Bench(BenchCommand::Mapreduce {
                pipeline,
                job,
                scale,
                parts,
            }) => commands::bench::mapreduce(&pipeline, &job, scale, parts).await,
            Command::Image(ImageCommand::Build(args)) => commands::image::build(args),
            Command::Bench(BenchCommand::Vm { vms, exits, mib }) => {
                commands::bench::vm(vms, exits, mib).await
            }
            Command::Bench(BenchCommand::Backfill {
                pipeline,
                function,
                rows,
                pin_cpu,
            }) => commands::bench::backfill(&pipeline, &function, rows, pin_cpu).await,
            Command::Bench(BenchCommand::Objects {
                pipeline,
                function,
                objects,
                size,
                url,
                rounds,
            }) => {
                commands::bench_objects::run(
                    &pipeline,
                    &function,
                    objects,
                    size,
                    url.as_deref(),
                    rounds,
                )
                .await
            }
            Command::Bench(BenchCommand::State {
                pipeline,
                function,
                calls,
            }) => commands::bench_state::run(&pipeline, &function, calls).await,
        }
    }
}
