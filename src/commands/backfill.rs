//! `sluice backfill`: call a function on every item of existing data sets.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_executor::{Fault, LogLine, LogStream};
use sluice_taskgen::{BackfillConfig, BackfillError, Format, Hooks, OrderConfig, Summary};

use crate::exit;

/// The command line of `sluice backfill`.
#[derive(Debug)]
pub struct BackfillArgs {
    pub pipeline: PathBuf,
    pub function: String,
    pub source: Vec<String>,
    pub format: Format,
    pub max_items_per_call: usize,
    pub max_concurrency: Option<usize>,
    pub progress: Option<PathBuf>,
    pub dead_letter: Option<PathBuf>,
    pub max_attempts: u32,
    pub tolerated_failure_count: Option<u64>,
    pub order: OrderConfig,
    pub dry_run: bool,
    pub quiet: bool,
}

fn print_log(line: LogLine) {
    match line.stream {
        LogStream::Agent => {
            tracing::debug!(target: "sluice::agent", function = %line.function, "{}", line.line)
        }
        _ => eprintln!("[{}] {}", line.function, line.line),
    }
}

fn print_summary(s: &Summary) {
    println!(
        "calls: {} total, {} succeeded, {} failed, {} retries, {} skipped (already done)",
        s.calls_total, s.calls_succeeded, s.calls_failed, s.calls_retried, s.calls_skipped
    );
    println!(
        "items: {} total, {} succeeded, {} failed, {} skipped",
        s.items_total, s.items_succeeded, s.items_failed, s.items_skipped
    );
    println!(
        "duration: {:.2?}, {:.1} items/s{}",
        s.duration,
        s.items_per_second(),
        if s.interrupted { " (interrupted)" } else { "" }
    );
}

fn error_code(e: &BackfillError) -> u8 {
    match e {
        BackfillError::TooManyFailures { .. } => exit::INVOKE_FAILED,
        e if e.fault() == Fault::User => exit::USAGE,
        _ => exit::INVOKE_FAILED,
    }
}

/// Runs the backfill; exit 0 when every call succeeded, 1 when some failed
/// within the tolerated count, 3 when the job stopped on failures.
pub async fn run(args: BackfillArgs) -> u8 {
    let p = match super::load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let fconf = match p.function(&args.function) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let sources = match sluice_taskgen::resolve_sources(&args.source) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return error_code(&e);
        }
    };
    let per_call = args.max_items_per_call.max(1);
    if args.dry_run {
        return match sluice_taskgen::plan(&sources, args.format, per_call) {
            Ok(plans) => {
                let (mut items, mut calls, mut bad) = (0, 0, 0);
                for f in &plans {
                    let groups = f.row_groups.as_ref().map_or(String::new(), |g| {
                        format!(
                            ", {} row groups ({})",
                            g.len(),
                            g.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                        )
                    });
                    // With ordering options, calls are formed across files (below).
                    let file_calls = if args.order.is_active() {
                        String::new()
                    } else {
                        format!(", {} calls", f.calls)
                    };
                    println!(
                        "{}: {} items, {} unreadable{file_calls}{groups}",
                        f.file.display(),
                        f.items,
                        f.bad_items,
                    );
                    items += f.items;
                    calls += f.calls;
                    bad += f.bad_items;
                }
                if !args.order.is_active() {
                    println!(
                        "total: {} files, {items} items, {bad} unreadable, {calls} calls of up to {per_call} items",
                        plans.len()
                    );
                    return exit::OK;
                }
                println!(
                    "total: {} files, {items} items, {bad} unreadable",
                    plans.len()
                );
                match sluice_taskgen::plan_levels(&sources, args.format, per_call, &args.order)
                    .await
                {
                    Ok(levels) => {
                        let calls: u64 = levels.iter().map(|l| l.calls).sum();
                        for l in &levels {
                            let keys = if args.order.order_key.is_some() {
                                format!(", {} keys", l.keys)
                            } else {
                                String::new()
                            };
                            println!(
                                "level {}: {} items, {} calls{keys}",
                                l.level, l.items, l.calls
                            );
                        }
                        println!(
                            "{} dependency levels, {calls} calls of up to {per_call} items",
                            levels.len()
                        );
                        exit::OK
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        error_code(&e)
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                error_code(&e)
            }
        };
    }
    let progress = args.progress.unwrap_or_else(|| {
        sluice_taskgen::default_progress_path(&sources, args.format, &args.function, per_call)
    });
    let dead_letter = args
        .dead_letter
        .unwrap_or_else(|| sluice_taskgen::default_dead_letter_path(&progress));
    let cfg = BackfillConfig {
        function: args.function.clone(),
        sources,
        format: args.format,
        max_items_per_call: per_call,
        max_concurrency: args
            .max_concurrency
            .unwrap_or(fconf.concurrency as usize)
            .max(1),
        progress,
        dead_letter: dead_letter.clone(),
        max_attempts: args.max_attempts.max(1),
        tolerated_failure_count: args.tolerated_failure_count,
        order: args.order,
    };
    let logs: sluice_executor::LogSink = if args.quiet {
        Arc::new(|_l: LogLine| {})
    } else {
        Arc::new(print_log)
    };
    let ex = match super::executor_for(&p, logs) {
        Ok(ex) => ex,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let mut hooks = Hooks::default();
    if !std::io::stderr().is_terminal() {
        hooks.on_tick = Some((
            Duration::from_secs(2),
            Arc::new(|s: &Summary| {
                eprintln!(
                    "backfill: {} calls done ({} failed, {} skipped), {} items, {:.1} items/s",
                    s.calls_succeeded,
                    s.calls_failed,
                    s.calls_skipped,
                    s.items_succeeded,
                    s.items_per_second()
                );
            }),
        ));
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = sluice_taskgen::run(&ex, cfg, hooks, shutdown).await;
    ex.shutdown().await;
    match result {
        Ok(s) => {
            print_summary(&s);
            if s.items_failed > 0 {
                eprintln!("failed items are in {}", dead_letter.display());
                exit::FUNCTION_ERROR
            } else if s.interrupted {
                exit::INVOKE_FAILED
            } else {
                exit::OK
            }
        }
        Err(e) => {
            if let BackfillError::TooManyFailures { summary, .. } = &e {
                print_summary(summary);
            }
            eprintln!("error: {e}");
            error_code(&e)
        }
    }
}
