//! `sluice state show PIPELINE [--key K] [--trigger NAME]`: the checkpointed
//! state of stateful triggers and jobs, for debugging.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;
use sluice_pipeline::{BootstrapServers, StateConfig, StateStore};

use crate::exit;

/// A stateful trigger or job: name, state settings, cluster, client
/// properties.
type Stateful<'a> = (
    &'a str,
    &'a StateConfig,
    &'a BootstrapServers,
    Vec<(String, String)>,
);

/// Print one JSON line per key of every stateful trigger and job.
pub async fn show(
    pipeline: &Path,
    key: Option<&str>,
    only: Option<&str>,
    servers: Option<&str>,
) -> u8 {
    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut stateful: Vec<Stateful<'_>> = Vec::new();
    for t in &p.kafka_triggers {
        if let Some(s) = &t.state {
            let props = t
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            stateful.push((&t.name, s, &t.bootstrap_servers, props));
        }
    }
    for j in p.jobs.values() {
        if let Some(s) = &j.state {
            stateful.push((&j.name, s, &j.bootstrap_servers, Vec::new()));
        }
    }
    if let Some(name) = only {
        stateful.retain(|(n, ..)| *n == name);
        if stateful.is_empty() {
            crate::log_error!(
                "{}: no stateful trigger or job named {name:?}",
                pipeline.display()
            );
            return exit::USAGE;
        }
    }
    if stateful.is_empty() {
        crate::log_plain!(
            "{}: no trigger or job has `state = {{...}}`",
            pipeline.display()
        );
        return exit::OK;
    }
    for (name, cfg, cluster, props) in stateful {
        if let Err(e) = print_one(name, cfg, cluster, &props, key, servers).await {
            crate::log_error!("{name}: {e:#}");
            return exit::INVOKE_FAILED;
        }
    }
    exit::OK
}

async fn print_one(
    name: &str,
    cfg: &StateConfig,
    cluster: &BootstrapServers,
    props: &[(String, String)],
    key: Option<&str>,
    servers: Option<&str>,
) -> Result<()> {
    let servers = match (&cfg.store, servers, cluster) {
        (StateStore::Local(_), ..) => String::new(),
        (_, Some(s), _) => s.to_owned(),
        (_, None, BootstrapServers::Servers(s)) => s.clone(),
        (StateStore::Changelog(topic), None, BootstrapServers::Embedded) => bail!(
            "its state is in the changelog topic {topic} of the embedded broker, which lives \
             only as long as the `sluice run` that started it; pass --bootstrap-servers"
        ),
    };
    let store = sluice_state_carrier::open_store(cfg, &servers, props)
        .await
        .context("opening the state store")?;
    let checkpoints = tokio::task::spawn_blocking(move || store.list())
        .await
        .context("reading the state store")??;
    for cp in checkpoints {
        for (k, ks) in &cp.keys {
            if key.is_some_and(|want| want != k) {
                continue;
            }
            let window = ks.window.map(|w| {
                json!({
                    "start": sluice_state_carrier::fold::rfc3339(w.start_ms),
                    "end": sluice_state_carrier::fold::rfc3339(w.end_ms),
                    "items": w.items,
                })
            });
            println!(
                "{}",
                json!({
                    "name": name,
                    "source": cp.source,
                    "key": k,
                    "state": ks.state,
                    "window": window,
                    "last_offset": ks.last_offset,
                    "windows_closed": ks.windows_closed,
                    "last_result": ks.last_result,
                })
            );
        }
    }
    Ok(())
}
