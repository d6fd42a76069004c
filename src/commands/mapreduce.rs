//! `sluice mapreduce`: run a `kind = "mapreduce"` job of the pipeline.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_ingest::kafka::EmbeddedBroker;
use sluice_mapreduce::{MapReduceConfig, Progress, RunState};
use sluice_pipeline::BootstrapServers;
use sluice_taskgen::Input;
use sluice_taskgen::distributed::{KafkaSettings, ensure_topic};

use crate::exit;

/// One line of progress per phase.
fn progress_line(p: &Progress, partitions: u32) -> String {
    let splits = p.splits.load(Ordering::Relaxed);
    let total = if p.splits_final.load(Ordering::Relaxed) {
        splits.to_string()
    } else {
        format!("{splits}+")
    };
    format!(
        "map: {}/{total} splits · shuffle: {} records · reduce: {}/{partitions} partitions done · {} retries",
        p.maps_done.load(Ordering::Relaxed),
        p.shuffle_records.load(Ordering::Relaxed),
        p.reducers_done.load(Ordering::Relaxed),
        p.retries.load(Ordering::Relaxed),
    )
}

/// The options of `sluice mapreduce`.
#[derive(Debug)]
pub struct Run {
    /// The shuffle's cluster, over the job's `bootstrap_servers`.
    pub bootstrap: Option<String>,
    /// An existing shuffle topic.
    pub shuffle_topic: Option<String>,
    /// A sample: the first items only, over the job's `max_items`.
    pub max_items: Option<u64>,
    /// Print the plan only.
    pub dry_run: bool,
    /// No function log lines.
    pub quiet: bool,
}

/// Runs the job; exit 0, 2 on a bad job, 3 when it failed.
pub async fn run(pipeline: &Path, job: &str, opts: Run) -> u8 {
    let Run {
        bootstrap,
        shuffle_topic,
        max_items,
        dry_run,
        quiet,
    } = opts;
    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let Some(j) = p.mapreduce_jobs.get(job) else {
        let names: Vec<&String> = p.mapreduce_jobs.keys().collect();
        crate::log_error!(
            "{}: no job named {job:?} with kind = \"mapreduce\"; MapReduce jobs: {}",
            pipeline.display(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        return exit::USAGE;
    };
    let sources = match sluice_taskgen::resolve_sources(&j.sources) {
        Ok(s) => s,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::USAGE;
        }
    };
    let Some(format) = j
        .format
        .or_else(|| sluice_taskgen::format_of(&j.sources, &sources))
    else {
        let first = j.sources.first().map_or("", String::as_str);
        crate::log_error!("cannot tell the format of {first:?} from its extension; set `format`");
        return exit::USAGE;
    };
    let map_concurrency = p.functions.get(&j.map).map_or(4, |f| f.concurrency);
    let mut input = Input {
        format,
        columns: j.columns.clone(),
        csv_delimiter: j.csv_delimiter,
        csv_headers: j.csv_headers.clone(),
        arrow_compression: j.arrow_compression,
        cap: None,
        items_pointer: j.items_pointer.clone(),
    };
    let mut sources = sources;
    // A sample: the files the first items are in, the last one capped. The
    // run's fingerprint covers both, so a resumed run is the same sample.
    if let Some(n) = max_items.or(j.max_items) {
        let sample = sluice_taskgen::check_max_items(
            n,
            &sluice_taskgen::OrderConfig::default(),
            &[],
            j.payload,
        )
        .and_then(|()| sluice_taskgen::limit_items(&sources, &input, n));
        match sample {
            Ok(sample) => {
                crate::log_note!(
                    "a sample: the first {} items, in {} of {} files (max_items); its output replaces {}",
                    sample.items,
                    sample.sources.len(),
                    sources.len(),
                    j.output_url
                        .clone()
                        .unwrap_or_else(|| j.output.display().to_string())
                );
                sources = sample.sources;
                input.cap = sample.cap;
            }
            Err(e) => {
                crate::log_error!("{e}");
                return exit::USAGE;
            }
        }
    }
    if dry_run {
        // The map tasks are the splits a backfill of the same settings
        // would call.
        let limits = sluice_taskgen::Limits {
            items: j.max_items_per_call as usize,
            bytes: sluice_pipeline::DEFAULT_MAX_BYTES_PER_CALL,
        };
        let code = super::backfill::dry_run(
            &sources,
            &input,
            (limits, j.payload),
            (&sluice_taskgen::OrderConfig::default(), 0),
            &[],
        )
        .await;
        if code == exit::OK {
            println!(
                "map: the calls above are the map tasks ({}{}); reduce: {} partitions, up to {} keys per {} call; output: {}",
                j.map,
                j.combine
                    .as_deref()
                    .map(|c| format!(", combined by {c}"))
                    .unwrap_or_default(),
                j.reduce_partitions,
                j.groups_per_call,
                j.reduce,
                match &j.output_url {
                    Some(url) => format!("{url}/ (staged in {})", j.output.display()),
                    None => j.output.display().to_string(),
                }
            );
        }
        return code;
    }
    let cfg = MapReduceConfig {
        job: j.name.clone(),
        sources,
        input,
        items_per_split: j.max_items_per_call as usize,
        map: j.map.clone(),
        combine: j.combine.clone(),
        reduce: j.reduce.clone(),
        reduce_partitions: i32::try_from(j.reduce_partitions).unwrap_or(i32::MAX),
        groups_per_call: j.groups_per_call as usize,
        max_concurrency: j.max_concurrency.unwrap_or(map_concurrency).max(1) as usize,
        max_attempts: j.max_attempts,
        output: j.output.clone(),
        output_url: j.output_url.clone(),
        payload: j.payload,
        payload_file: j.payload_file,
        output_format: j.output_format,
        reduce_memory_bytes: (j.reduce_memory_mb as usize) << 20,
    };
    // The shuffle's cluster: the flag, the job's, or a broker in this process.
    let servers = match (bootstrap.as_deref(), &j.bootstrap_servers) {
        (Some("embedded"), _) | (None, BootstrapServers::Embedded) => None,
        (Some(s), _) => Some(s.to_owned()),
        (None, BootstrapServers::Servers(s)) => Some(s.clone()),
    };
    let mut embedded = None;
    let prepared = match servers {
        // A cluster outlives this process: a killed run of the same job is
        // resumed on its shuffle topic when that topic is still there.
        Some(servers) => {
            let kafka = KafkaSettings {
                servers,
                properties: j.properties.clone().into_iter().collect(),
            };
            prepare_external(&cfg, kafka, &j.name, shuffle_topic).await
        }
        None if shuffle_topic.is_some() => {
            Err("--shuffle-topic needs a Kafka cluster (bootstrap_servers)".to_owned())
        }
        // The embedded broker's shuffle dies with the process: always from
        // scratch.
        None => match EmbeddedBroker::start(1) {
            Ok(broker) => {
                let topic = sluice_mapreduce::shuffle_topic(&j.name, sluice_mapreduce::run_id());
                let kafka = KafkaSettings {
                    servers: broker.bootstrap_servers().to_owned(),
                    properties: Vec::new(),
                };
                let prepared = match broker.create_topic(&topic, cfg.reduce_partitions) {
                    Ok(()) => fresh(&cfg, &kafka, &topic, false)
                        .await
                        .map(|state| (kafka, state)),
                    Err(e) => Err(e.to_string()),
                };
                embedded = Some(broker);
                prepared
            }
            Err(e) => Err(e.to_string()),
        },
    };
    let (kafka, state) = match prepared {
        Ok(p) => p,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::INVOKE_FAILED;
        }
    };
    let topic = state.topic.clone();
    crate::log_note!(
        "mapreduce {}: shuffle topic {topic} ({} partitions) on {}{}",
        j.name,
        cfg.reduce_partitions,
        kafka.servers,
        if embedded.is_some() {
            " (embedded, temporary)"
        } else {
            ""
        }
    );
    if state.generation > 1 {
        crate::log_note!(
            "resuming an unfinished run ({} map tasks and {} reducers done; attempt generation {})",
            state.maps_done.len(),
            state.reducers_done.len(),
            state.generation
        );
    }
    let ex = match super::executor_for(&p, crate::logs::function_log_sink(quiet)) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let progress = Arc::new(Progress::default());
    let partitions = j.reduce_partitions;
    let terminal = std::io::stderr().is_terminal();
    let ticker = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let every = if terminal {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            };
            let mut interval = tokio::time::interval(every);
            interval.tick().await;
            loop {
                interval.tick().await;
                if terminal {
                    eprint!("\r\x1b[K{}", progress_line(&progress, partitions));
                } else {
                    crate::log_plain!("mapreduce: {}", progress_line(&progress, partitions));
                }
            }
        })
    };
    let result = sluice_mapreduce::run(&ex, &kafka, cfg, state, Arc::clone(&progress)).await;
    ticker.abort();
    if terminal {
        eprint!("\r\x1b[K");
    }
    ex.shutdown().await;
    // The job's Kafka clients close in the background; the embedded broker
    // outlives them.
    tokio::task::spawn_blocking(sluice_mapreduce::wait_for_closed_clients)
        .await
        .ok();
    drop(embedded);
    match result {
        Ok(s) => {
            println!(
                "map: {} tasks over {} items; shuffle: {} records; reduce: {} keys into {} records; {} retries",
                s.map_tasks, s.items, s.shuffle_records, s.keys, s.output_records, s.retries
            );
            if s.spills > 0 {
                println!(
                    "reducers spilled {} sorted runs to disk (reduce_memory_mb)",
                    s.spills
                );
            }
            if s.resumed != (0, 0) {
                println!(
                    "resumed: {} map tasks and {} reducers were done by an earlier run",
                    s.resumed.0, s.resumed.1
                );
            }
            if s.uploaded.is_empty() {
                for f in &s.output_files {
                    println!("output: {}", f.display());
                }
            } else {
                for url in &s.uploaded {
                    println!("output: {url}");
                }
                if let Some(dir) = s.output_files.first().and_then(|f| f.parent()) {
                    println!("(staged in {})", dir.display());
                }
            }
            println!("duration: {:.2?}", s.duration);
            exit::OK
        }
        Err(e) => {
            crate::log_error!("{e}");
            if e.fault() == sluice_executor::Fault::User {
                exit::FUNCTION_ERROR
            } else {
                exit::INVOKE_FAILED
            }
        }
    }
}

/// A fresh run on `topic`, with a note when earlier outputs go.
async fn fresh(
    cfg: &MapReduceConfig,
    kafka: &KafkaSettings,
    topic: &str,
    durable: bool,
) -> Result<RunState, String> {
    if sluice_mapreduce::has_parts(&cfg.output) {
        crate::log_note!(
            "{} holds part files of an earlier run; this run replaces them",
            cfg.output.display()
        );
    }
    // The run reads the topic from its current end: records of earlier runs
    // on the same topic never count.
    let (k, t, partitions) = (kafka.clone(), topic.to_owned(), cfg.reduce_partitions);
    let start = tokio::task::spawn_blocking(move || {
        sluice_mapreduce::end_offsets(&k, &t, partitions, Duration::from_secs(10))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    RunState::fresh(cfg, &kafka.servers, topic, start, durable).map_err(|e| e.to_string())
}

/// The number of partitions of `topic`.
async fn partitions_of(kafka: &KafkaSettings, topic: &str) -> Result<Option<i32>, String> {
    let (k, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        sluice_mapreduce::topic_partitions(&k, &topic, Duration::from_secs(10))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// The run on an external cluster: the unfinished run of this job when its
/// state and shuffle topic are still there, else a fresh one on a new topic
/// (or on `named`, which must exist).
async fn prepare_external(
    cfg: &MapReduceConfig,
    kafka: KafkaSettings,
    job: &str,
    named: Option<String>,
) -> Result<(KafkaSettings, RunState), String> {
    if let Some(state) = RunState::resumable(cfg, &kafka.servers)
        && named.as_ref().is_none_or(|n| *n == state.topic)
    {
        if partitions_of(&kafka, &state.topic).await? == Some(cfg.reduce_partitions) {
            let state = state.resume(cfg).map_err(|e| e.to_string())?;
            return Ok((kafka, state));
        }
        crate::log_note!(
            "the shuffle topic {} of the unfinished run is gone; starting again",
            state.topic
        );
    }
    let topic = match named {
        Some(topic) => {
            let found = partitions_of(&kafka, &topic).await?;
            if found != Some(cfg.reduce_partitions) {
                return Err(format!(
                    "--shuffle-topic {topic}: needs {} partitions (reduce_partitions) on {}, found {}",
                    cfg.reduce_partitions,
                    kafka.servers,
                    found.map_or("no such topic".to_owned(), |n| n.to_string())
                ));
            }
            topic
        }
        None => {
            let topic = sluice_mapreduce::shuffle_topic(job, sluice_mapreduce::run_id());
            ensure_topic(&kafka, &topic, cfg.reduce_partitions)
                .await
                .map_err(|e| e.to_string())?;
            topic
        }
    };
    let state = fresh(cfg, &kafka, &topic, true).await?;
    Ok((kafka, state))
}
