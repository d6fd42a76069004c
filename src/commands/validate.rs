//! `sluice validate PIPELINE`.

use std::path::Path;

use crate::exit;

/// The Lambda extensions the folder layers bring (`extensions/*`), as
/// `", extensions: a, b"`; empty if none.
fn extensions(layers: &[std::path::PathBuf]) -> String {
    let mut names: Vec<String> = layers
        .iter()
        .filter_map(|l| std::fs::read_dir(l.join("extensions")).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        String::new()
    } else {
        format!(", extensions: {}", names.join(", "))
    }
}

/// Check the file and list its functions, triggers and jobs.
pub fn run(path: &Path) -> u8 {
    let p = match super::load_pipeline_as_written(path) {
        Ok(p) => p,
        Err(code) => return code,
    };
    println!("{}: ok, {} function(s)", path.display(), p.functions.len());
    for f in p.functions.values() {
        println!(
            "  {}: {} ({} MiB, timeout {:?}, concurrency {}, tenant {}, backend {:?}{}){}",
            f.name,
            f.path.display(),
            f.memory_mb,
            f.timeout,
            f.concurrency,
            f.tenant,
            f.backend,
            if f.pin_cpu {
                ", each sandbox pinned to a CPU"
            } else {
                ""
            },
            if f.layers.is_empty() {
                String::new()
            } else {
                let layers: Vec<_> = f.layers.iter().map(|l| l.display().to_string()).collect();
                format!(
                    ", layers at /opt: {}{}",
                    layers.join(", "),
                    extensions(&f.layers)
                )
            }
        );
    }
    for t in &p.kafka_triggers {
        println!(
            "  trigger {}: Kafka topics {} ({}, group {}) -> {}{}{}",
            t.name,
            t.topics.join(", "),
            t.bootstrap_servers,
            t.group_id,
            t.function,
            match &t.on_failure {
                Some(sluice_pipeline::OnFailure::Topic(topic)) =>
                    format!(", failures to topic {topic}"),
                Some(sluice_pipeline::OnFailure::Objects(url)) =>
                    format!(", failures as objects under {url}"),
                None => String::new(),
            },
            disabled(t.enabled)
        );
    }
    for t in &p.object_triggers {
        println!(
            "  trigger {}: {} under {}{} every {:?} -> {}{}",
            t.name,
            t.events.what(),
            t.url,
            t.suffix
                .as_deref()
                .map(|s| format!(" ending {s:?}"))
                .unwrap_or_default(),
            t.poll_interval,
            t.function,
            disabled(t.enabled)
        );
    }
    for j in p.jobs.values() {
        println!(
            "  job {}: backfill of {}{} -> {}, {} items per call{}{}",
            j.name,
            j.sources.join(", "),
            j.format
                .map(|f| format!(" ({})", f.name()))
                .unwrap_or_default(),
            j.function,
            j.max_items_per_call,
            if j.state.is_some() {
                ", stateful (a fold in input order)"
            } else {
                ""
            },
            j.results
                .as_deref()
                .map(|r| format!(", responses kept in {}", r.display()))
                .unwrap_or_default()
        );
        if j.format == Some(sluice_pipeline::DataFormat::Objects) {
            println!(
                "    each object whole, staged at /run/sluice/payload; larger than {} bytes: dead-lettered (max_object_bytes)",
                j.max_object_bytes
            );
        }
        if let Some(pointer) = &j.items_pointer {
            println!("    items: the array at {pointer} of each JSON document (items_pointer)");
        }
        if let Some(n) = j.max_items {
            println!("    only the first {n} items (max_items)");
        }
        if let Some(input) = &j.batch_input {
            println!(
                "    every call carries batch_input {}",
                serde_json::Value::Object(input.clone())
            );
        }
    }
    for j in p.mapreduce_jobs.values() {
        println!(
            "  job {}: MapReduce of {} -> map {}{}, reduce {} ({} partitions) -> {}",
            j.name,
            j.sources.join(", "),
            j.map,
            j.combine
                .as_deref()
                .map(|c| format!(", combine {c}"))
                .unwrap_or_default(),
            j.reduce,
            j.reduce_partitions,
            match &j.output_url {
                Some(url) => format!("{url}/ (staged in {})", j.output.display()),
                None => j.output.display().to_string(),
            }
        );
        if let Some(n) = j.max_items {
            println!("    only the first {n} items are mapped (max_items)");
        }
    }
    exit::OK
}

/// What `validate` adds to a trigger with `enabled = false`.
fn disabled(enabled: bool) -> &'static str {
    if enabled {
        ""
    } else {
        " (disabled: sluice run runs it only when named with --trigger)"
    }
}
