//! `sluice run PIPELINE`: run every enabled Kafka and object-store trigger
//! (or those named with `--trigger`) until SIGINT/SIGTERM (or, with
//! `--stop-when-idle`, until nothing happened for that long), then stop
//! polling, drain in-flight batches, commit and exit 0.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_ingest::kafka::{self, Activity, EmbeddedBroker, TriggerEnv};
use sluice_ingest::metrics::Metrics;
use sluice_ingest::objects::{self, ObjectEnv};
use sluice_pipeline::{BootstrapServers, Pipeline};
use tokio::sync::watch;

use crate::exit;

/// Options of `sluice run`.
#[derive(Debug)]
pub struct RunArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// `TOPIC=FILE.jsonl` pairs to load before starting.
    pub produce: Vec<String>,
    /// JSON field whose value becomes the key of `--produce` records.
    pub key_field: Option<String>,
    /// Where to serve `/metrics`.
    pub metrics_addr: Option<String>,
    /// Stop after this long without records arriving or finishing.
    pub stop_when_idle: Option<Duration>,
    /// Don't print function output.
    pub quiet: bool,
    /// Object-store triggers call again the objects recorded as failed.
    pub retry_failed: bool,
    /// Run only these triggers (by name); empty: every enabled one.
    pub triggers: Vec<String>,
}

/// Keep the triggers this run is for: those named (`--trigger`, enabled or
/// not), else the enabled ones. The error names an unknown trigger and the
/// known ones, or says that every trigger is disabled.
fn select_triggers(p: &mut Pipeline, file: &Path, named: &[String]) -> Result<(), String> {
    let all: Vec<&str> = p
        .kafka_triggers
        .iter()
        .map(|t| t.name.as_str())
        .chain(p.object_triggers.iter().map(|t| t.name.as_str()))
        .collect();
    if let Some(unknown) = named.iter().find(|n| !all.contains(&n.as_str())) {
        return Err(format!(
            "--trigger {unknown}: {} has no trigger of that name (its triggers: {})",
            file.display(),
            all.join(", ")
        ));
    }
    if named.is_empty() {
        if !all.is_empty()
            && !p.kafka_triggers.iter().any(|t| t.enabled)
            && !p.object_triggers.iter().any(|t| t.enabled)
        {
            return Err(format!(
                "{}: every trigger has enabled = false: nothing to run (name one with --trigger to run it anyway: {})",
                file.display(),
                all.join(", ")
            ));
        }
        p.kafka_triggers.retain(|t| t.enabled);
        p.object_triggers.retain(|t| t.enabled);
    } else {
        p.kafka_triggers.retain(|t| named.contains(&t.name));
        p.object_triggers.retain(|t| named.contains(&t.name));
    }
    Ok(())
}

/// Run the pipeline's triggers.
pub async fn run(args: RunArgs) -> u8 {
    let mut p = match super::load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Err(e) = select_triggers(&mut p, &args.pipeline, &args.triggers) {
        crate::log_error!("{e}");
        return exit::USAGE;
    }
    if p.kafka_triggers.is_empty() && p.object_triggers.is_empty() {
        crate::log_error!(
            "{}: no [[trigger.kafka]] or [[trigger.object_store]] declared: nothing to run (use `sluice invoke` to call a function once)",
            args.pipeline.display()
        );
        return exit::USAGE;
    }
    if p.kafka_triggers.is_empty() && !args.produce.is_empty() {
        crate::log_error!(
            "--produce: no Kafka trigger of {} runs here (none declared, disabled or not named with --trigger), so there is no Kafka cluster to load records into",
            args.pipeline.display()
        );
        return exit::USAGE;
    }
    let mut loads = Vec::new();
    for spec in &args.produce {
        let Some((topic, file)) = spec.split_once('=') else {
            crate::log_error!("--produce {spec:?}: expected TOPIC=FILE.jsonl");
            return exit::USAGE;
        };
        // Checked before any broker starts: a typo costs nothing.
        if let Err(e) = std::fs::metadata(file) {
            crate::log_error!("--produce {topic}={file}: {e}");
            return exit::USAGE;
        }
        if !p
            .kafka_triggers
            .iter()
            .any(|t| t.topics.iter().any(|t| t == topic))
        {
            let read: std::collections::BTreeSet<&str> = p
                .kafka_triggers
                .iter()
                .flat_map(|t| t.topics.iter().map(String::as_str))
                .collect();
            let read: Vec<&str> = read.into_iter().collect();
            crate::log_warn!(
                "--produce {topic}={file}: no trigger of {} reads topic {topic:?} (they read: {}), so nothing here will process these records",
                args.pipeline.display(),
                read.join(", ")
            );
        }
        loads.push((topic.to_owned(), PathBuf::from(file)));
    }

    // The embedded broker, if any trigger asks for it. It is not Send: it
    // stays on this task for the whole run.
    let needs_embedded = p
        .kafka_triggers
        .iter()
        .any(|t| matches!(t.bootstrap_servers, BootstrapServers::Embedded));
    let embedded = if needs_embedded {
        match EmbeddedBroker::start(1) {
            Ok(b) => {
                crate::log_note!(
                    "embedded Kafka broker at {} (in this process; its data is temporary and lost on exit)",
                    b.bootstrap_servers()
                );
                Some(b)
            }
            Err(e) => {
                crate::log_error!("{e}");
                return exit::INVOKE_FAILED;
            }
        }
    } else {
        None
    };
    if let Some(b) = &embedded {
        let mut topics: BTreeSet<(String, i32)> = BTreeSet::new();
        for t in &p.kafka_triggers {
            if matches!(t.bootstrap_servers, BootstrapServers::Embedded) {
                let on_failure = t.on_failure.as_ref().and_then(|o| o.topic());
                let outputs = t.output_topic.as_deref();
                for topic in t
                    .topics
                    .iter()
                    .map(String::as_str)
                    .chain(on_failure)
                    .chain(outputs)
                {
                    topics.insert((topic.to_owned(), t.partitions));
                }
                if let Some(sluice_pipeline::StateConfig {
                    store: sluice_pipeline::StateStore::Changelog(topic),
                    ..
                }) = &t.state
                {
                    topics.insert((topic.clone(), 1));
                }
            }
        }
        for (topic, _) in &loads {
            if !topics.iter().any(|(t, _)| t == topic) {
                topics.insert((topic.clone(), 3));
            }
        }
        for (topic, parts) in topics {
            if let Err(e) = b.create_topic(&topic, parts) {
                crate::log_error!("{e}");
                return exit::INVOKE_FAILED;
            }
        }
    }
    let servers_of = |t: &sluice_pipeline::KafkaTrigger| match (&t.bootstrap_servers, &embedded) {
        (BootstrapServers::Servers(s), _) => s.clone(),
        (BootstrapServers::Embedded, Some(b)) => b.bootstrap_servers().to_owned(),
        (BootstrapServers::Embedded, None) => unreachable!("embedded broker started above"),
    };

    for (topic, file) in &loads {
        let servers = p
            .kafka_triggers
            .iter()
            .find(|t| t.topics.contains(topic))
            .map(servers_of)
            .unwrap_or_else(|| servers_of(&p.kafka_triggers[0]));
        match kafka::produce_file(&servers, topic, file, args.key_field.as_deref()).await {
            Ok(loaded) => {
                let n = loaded.records;
                crate::log_note!("loaded {n} records from {} into {topic}", file.display());
                if let (Some(field), Some((line, why))) =
                    (args.key_field.as_deref(), loaded.first_unkeyed)
                {
                    let hint = if loaded.unkeyed == n {
                        " (a misspelt field?)"
                    } else {
                        ""
                    };
                    crate::log_warn!(
                        "--key-field {field}: {} of {n} records were loaded without a key{hint}, so their partition, and their order relative to records of the same key, is arbitrary; the first is {}:{line}: {why}",
                        loaded.unkeyed,
                        file.display()
                    );
                }
                // A trigger that starts at the latest offset skips what was
                // just loaded: with nothing printed, that looks like a hang.
                for t in p.kafka_triggers.iter().filter(|t| {
                    t.topics.contains(topic)
                        && t.starting_position == sluice_pipeline::StartingPosition::Latest
                        && servers_of(t) == servers
                }) {
                    let unless = if embedded.is_some()
                        && matches!(t.bootstrap_servers, BootstrapServers::Embedded)
                    {
                        String::new()
                    } else {
                        format!(" (unless its group {:?} has committed offsets)", t.group_id)
                    };
                    crate::log_warn!(
                        "trigger {} reads {topic} from its latest offset (`starting_position` defaults to \"latest\", as in Lambda), so the {n} records just loaded will not reach it{unless}; set `starting_position = \"earliest\"` on the trigger to process them",
                        t.name
                    );
                }
            }
            Err(e) => {
                crate::log_error!("{e}");
                return exit::USAGE;
            }
        }
        // The embedded broker drops a partition's oldest records past its
        // retention: say so now rather than lose them.
        if let Some(b) = embedded
            .as_ref()
            .filter(|b| servers == b.bootstrap_servers())
        {
            match b.dropped(topic) {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    let lost: i64 = d.iter().map(|(_, n)| n).sum();
                    let parts: Vec<String> = d.iter().map(|(p, _)| p.to_string()).collect();
                    crate::log_error!(
                        "--produce {topic}={}: the embedded broker keeps at most {} MiB per partition and dropped the oldest {lost} records of partition(s) {} before any was processed (nothing was run); give the topic more partitions (`partitions` on its trigger), load a smaller file, or use a real cluster (`bootstrap_servers`)",
                        file.display(),
                        kafka::RETAINED_BYTES_PER_PARTITION >> 20,
                        parts.join(", ")
                    );
                    return exit::USAGE;
                }
                Err(e) => {
                    crate::log_error!("{e}");
                    return exit::INVOKE_FAILED;
                }
            }
        }
    }

    let executor = match super::executor_for(&p, crate::logs::function_log_sink(args.quiet)) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let maintenance = executor.spawn_maintenance(shutdown_rx.clone());
    let registry = Metrics::new();
    registry.watch_executor(executor.clone());
    if let Some(addr) = &args.metrics_addr
        && let Err(code) = super::serve_metrics(addr, registry.clone(), shutdown_rx.clone()).await
    {
        return code;
    }
    let activity = Arc::new(Activity::default());
    let mut tasks = tokio::task::JoinSet::new();
    for t in p.kafka_triggers.clone() {
        let env = TriggerEnv {
            executor: executor.clone(),
            metrics: registry.clone(),
            servers: servers_of(&t),
            activity: activity.clone(),
            max_buffered_records: kafka::DEFAULT_MAX_BUFFERED_RECORDS,
        };
        tasks.spawn(kafka::run_trigger(t, env, shutdown_rx.clone()));
    }
    for t in p.object_triggers.clone() {
        crate::log_note!("{}", objects::describe(&t));
        let env = ObjectEnv {
            executor: executor.clone(),
            metrics: registry.clone(),
            activity: activity.clone(),
            max_concurrency: p
                .functions
                .get(&t.function)
                .map_or(1, |f| f.concurrency as usize),
            retry_failed: args.retry_failed,
        };
        tasks.spawn(objects::run_object_trigger(t, env, shutdown_rx.clone()));
    }

    let triggers = (p.kafka_triggers.len() + p.object_triggers.len()) as u64;
    let (reason, mut code) =
        wait_for_stop(&activity, triggers, args.stop_when_idle, &mut tasks).await;
    crate::log_note!("{reason}: draining in-flight calls and committing");
    let _ = shutdown_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        code = code.max(trigger_exit(r));
    }
    let _ = maintenance.await;
    executor.shutdown().await;
    let n = activity.records.load(std::sync::atomic::Ordering::Relaxed);
    let what = match (p.kafka_triggers.is_empty(), p.object_triggers.is_empty(), n) {
        (false, true, 1) => "record",
        (false, true, _) => "records",
        (true, false, 1) => "object",
        (true, false, _) => "objects",
        _ => "records and objects",
    };
    crate::log_note!("stopped after {n} {what}");
    // What each Kafka trigger did, failures first in mind.
    for t in &p.kafka_triggers {
        let totals = registry.trigger_totals(&t.name);
        let failed = match &t.on_failure {
            Some(destination) => format!(
                "{} to the on-failure destination {destination}",
                totals.dead_lettered
            ),
            None => "no on-failure destination".to_owned(),
        };
        crate::log_note!(
            "trigger {}: {} records, {} filtered out, retries {}, {failed}",
            t.name,
            totals.records,
            totals.filtered,
            totals.retries
        );
    }
    // What each function cost, as a Lambda console would show it.
    for (name, st) in executor.all_stats() {
        if st.invocations == 0 {
            continue;
        }
        let memory = p
            .functions
            .get(&name)
            .and_then(|f| super::MemoryUse::of(&st, f.memory_mb))
            .map(|m| format!("; {m}"))
            .unwrap_or_default();
        crate::log_note!(
            "function {name}: {} invocations, {} errors, {} cold starts{memory}",
            st.invocations,
            st.errors,
            st.cold_starts
        );
    }
    drop(embedded);
    code
}

async fn wait_for_stop(
    activity: &Activity,
    triggers: u64,
    idle: Option<Duration>,
    tasks: &mut tokio::task::JoinSet<Result<(), sluice_ingest::IngestError>>,
) -> (&'static str, u8) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ("cannot listen for SIGTERM", exit::INVOKE_FAILED),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ("SIGINT received", exit::OK),
            _ = term.recv() => return ("SIGTERM received", exit::OK),
            _ = tick.tick() => {
                if let Some(d) = idle {
                    let backlog = activity.backlog.load(std::sync::atomic::Ordering::SeqCst);
                    let joined = activity.triggers_assigned.load(std::sync::atomic::Ordering::SeqCst) >= triggers;
                    if joined && backlog <= 0 && activity.idle_for() >= d {
                        return ("idle", exit::OK);
                    }
                }
                if tasks.is_empty() {
                    return ("no trigger left running", exit::OK);
                }
            }
            Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                return ("a trigger stopped", trigger_exit(r));
            }
        }
    }
}

/// The exit code a finished trigger task asks for, its error printed: 0
/// when it ended cleanly, 2 for a pipeline mistake found at run time, 3
/// otherwise (a run whose trigger failed never exits 0).
fn trigger_exit(r: Result<Result<(), sluice_ingest::IngestError>, tokio::task::JoinError>) -> u8 {
    match r {
        Ok(Ok(())) => exit::OK,
        Ok(Err(e)) => {
            crate::log_error!("{e}");
            if matches!(e, sluice_ingest::IngestError::Config { .. }) {
                exit::USAGE
            } else {
                exit::INVOKE_FAILED
            }
        }
        Err(e) => {
            crate::log_error!("trigger task failed: {e}");
            exit::INVOKE_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline of one function, two Kafka triggers (the second disabled)
    /// and an object-store trigger.
    fn pipeline(dir: &Path) -> (Pipeline, PathBuf) {
        let f = dir.join("f");
        std::fs::create_dir(&f).unwrap();
        let bootstrap = f.join("bootstrap");
        std::fs::write(&bootstrap, "#!/bin/sh\n").unwrap();
        let mut perms = std::fs::metadata(&bootstrap).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&bootstrap, perms).unwrap();
        let file = dir.join("pipeline.toml");
        let text = "[functions.f]\npath = \"f\"\n\n\
            [[trigger.kafka]]\nname = \"orders\"\nfunction = \"f\"\ntopics = [\"orders\"]\n\n\
            [[trigger.kafka]]\nname = \"audit\"\nfunction = \"f\"\ntopics = [\"audit\"]\nenabled = false\n\n\
            [[trigger.object_store]]\nname = \"landing\"\nfunction = \"f\"\nurl = \"in\"\n";
        std::fs::write(&file, text).unwrap();
        (Pipeline::load(&file).unwrap(), file)
    }

    fn names(p: &Pipeline) -> Vec<&str> {
        p.kafka_triggers
            .iter()
            .map(|t| t.name.as_str())
            .chain(p.object_triggers.iter().map(|t| t.name.as_str()))
            .collect()
    }

    #[test]
    fn enabled_triggers_run_unless_others_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, file) = pipeline(dir.path());
        assert!(!p.kafka_triggers[1].enabled);
        let mut all = p.clone();
        select_triggers(&mut all, &file, &[]).unwrap();
        assert_eq!(names(&all), ["orders", "landing"]);

        // A node that only shares the Kafka partitions; a disabled one named.
        let mut named = p.clone();
        select_triggers(&mut named, &file, &["orders".into(), "audit".into()]).unwrap();
        assert_eq!(names(&named), ["orders", "audit"]);

        let e = select_triggers(&mut p.clone(), &file, &["order".into()]).unwrap_err();
        assert!(
            e.starts_with("--trigger order: ")
                && e.ends_with("(its triggers: orders, audit, landing)"),
            "{e}"
        );

        for t in &mut p.kafka_triggers {
            t.enabled = false;
        }
        p.object_triggers[0].enabled = false;
        let e = select_triggers(&mut p, &file, &[]).unwrap_err();
        assert!(e.contains("every trigger has enabled = false"), "{e}");
    }
}
