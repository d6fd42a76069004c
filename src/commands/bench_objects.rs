//! `sluice bench objects`: objects/s through an object-store trigger.
//!
//! Over the same objects (a generated local folder, or a prefix of a real
//! store with `--url`), in the same run:
//! - **list + read**: listing the prefix and reading every object with
//!   `object_store` alone: what finding and fetching costs;
//! - **direct calls** (the ceiling): the function called once per object
//!   through the executor alone, with the same S3 event and the object's
//!   bytes (already in memory) staged in the sandbox, at the function's
//!   concurrency: the calls a trigger cannot avoid;
//! - **the trigger**: `run_object_trigger` from the first object called to
//!   the last one recorded: listing, fetching, calling and recording every
//!   outcome durably.
//!
//! Rounds alternate direct calls and the trigger (a fresh progress store
//! each time); printed are each one's best rate, the median of the
//! per-round ratios, and what the trigger adds per object. Then the
//! latency: objects written one at a time, each timed from its write to
//! the end of its call (bounded below by the listing interval).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, PutPayload};
use sluice_executor::{Executor, InvokeOptions, LogLine};
use sluice_ingest::kafka::Activity;
use sluice_ingest::metrics::Metrics;
use sluice_ingest::objects::{self, ObjectEnv};
use sluice_pipeline::{ObjectTrigger, StartingPosition};

use crate::exit;

/// Where the bench's objects live.
struct Prefix {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The trigger's `url`: the folder, or the URL of the prefix.
    url: String,
    /// Removed afterwards (a local folder is removed with its tempdir).
    remote: bool,
}

impl Prefix {
    fn local(dir: &Path) -> Result<Self, String> {
        let prefix = ObjectPath::from_absolute_path(dir).map_err(|e| e.to_string())?;
        Ok(Self {
            store: Arc::new(object_store::local::LocalFileSystem::new()),
            prefix,
            url: dir.display().to_string(),
            remote: false,
        })
    }

    fn remote(url: &str) -> Result<Self, String> {
        let base = url.trim_end_matches('/');
        let url = format!("{base}/sluice-bench-objects-{}/", std::process::id());
        let parts = objects::split(&url).ok_or_else(|| {
            format!("--url {base:?}: not an object store URL (s3://, gs://, az://)")
        })?;
        let store = objects::store_for(&parts).map_err(|e| format!("--url {base:?}: {e}"))?;
        let prefix = ObjectPath::from(parts.key.trim_matches('/'));
        Ok(Self {
            store,
            prefix,
            url,
            remote: true,
        })
    }

    /// A `latency` folder below the prefix (made, for a local one): its
    /// URL and path.
    fn latency(&self) -> Result<(String, ObjectPath), String> {
        let path = self.prefix.child("latency");
        if self.remote {
            return Ok((format!("{}latency/", self.url), path));
        }
        let dir = Path::new(&self.url).join("latency");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok((dir.display().to_string(), path))
    }

    async fn list(&self) -> object_store::Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&self.prefix));
        while let Some(meta) = listing.next().await {
            out.push(meta?);
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }
}

/// Runs the benchmark: `n` objects of `size` bytes, `rounds` rounds.
pub async fn run(
    pipeline: &Path,
    function: &str,
    n: usize,
    size: usize,
    url: Option<&str>,
    rounds: usize,
) -> u8 {
    let (p, concurrency) = match super::load_function(pipeline, function) {
        Ok((p, f)) => (p, f.concurrency as usize),
        Err(code) => return code,
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            crate::log_error!("temporary folder: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    let objects_dir = dir.path().join("objects");
    let prefix = match url {
        Some(url) => Prefix::remote(url),
        None => std::fs::create_dir(&objects_dir)
            .map_err(|e| format!("{}: {e}", objects_dir.display()))
            .and_then(|()| Prefix::local(&objects_dir)),
    };
    let prefix = match prefix {
        Ok(p) => p,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::USAGE;
        }
    };
    let ex = match super::executor_for(&p, Arc::new(|_l: LogLine| {})) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let bench = Bench {
        ex: &ex,
        prefix: &prefix,
        scratch: dir.path(),
        function,
        concurrency,
    };
    let result = bench.measure(n, size, rounds).await;
    ex.shutdown().await;
    if prefix.remote {
        // Best effort: the objects this run wrote.
        if let Ok(listed) = prefix.list().await {
            for m in listed {
                let _ = prefix.store.delete(&m.location).await;
            }
        }
    }
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            crate::log_error!("{e}");
            exit::INVOKE_FAILED
        }
    }
}

/// What every part of the bench runs with.
struct Bench<'a> {
    ex: &'a Executor,
    prefix: &'a Prefix,
    /// Progress stores and dead-letter files.
    scratch: &'a Path,
    function: &'a str,
    concurrency: usize,
}

impl Bench<'_> {
    async fn measure(&self, n: usize, size: usize, rounds: usize) -> Result<(), String> {
        let Bench {
            ex,
            prefix,
            function,
            concurrency,
            ..
        } = *self;
        let n = n.max(1);
        let rounds = rounds.max(1);
        // Text lines, so that a line-counting function reads them too.
        let line = b"sluice bench objects: a line of text\n";
        let body: Vec<u8> = line.iter().copied().cycle().take(size).collect();
        for i in 0..n {
            let location = prefix.prefix.child(format!("obj-{i:06}.txt"));
            prefix
                .store
                .put(&location, PutPayload::from(body.clone()))
                .await
                .map_err(|e| format!("writing {location}: {e}"))?;
        }
        println!(
            "sluice bench objects: {n} objects of {size} bytes under {}; function {function}, concurrency {concurrency}, {rounds} rounds",
            prefix.url
        );

        // List + read alone; its objects (bytes in memory) feed the direct calls.
        let t0 = Instant::now();
        let listed = prefix.list().await.map_err(|e| e.to_string())?;
        let mut fetched = Vec::with_capacity(listed.len());
        for m in &listed {
            let bytes = prefix
                .store
                .get(&m.location)
                .await
                .map_err(|e| e.to_string())?
                .bytes()
                .await
                .map_err(|e| e.to_string())?;
            fetched.push((m.clone(), bytes));
        }
        let read = t0.elapsed();
        if fetched.len() != n {
            return Err(format!("listed {} objects, wrote {n}", fetched.len()));
        }
        let read_rate = rate(n, read);
        println!(
            "{:<46} {:>10.0} objects/s",
            "list + read with object_store alone", read_rate
        );

        // Sandboxes warm before anything is timed.
        let mut warm = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let ex = ex.clone();
            let f = function.to_owned();
            warm.spawn(async move { ex.invoke(&f, b"{}".to_vec()).await.map(drop) });
        }
        while warm.join_next().await.is_some() {}

        let fetched = Arc::new(fetched);
        let mut direct_best = Duration::MAX;
        let mut trigger_best = Duration::MAX;
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let direct = self.direct_calls(&fetched).await?;
            let trigger = self.trigger_pass(n, round).await?;
            direct_best = direct_best.min(direct);
            trigger_best = trigger_best.min(trigger);
            ratios.push(direct.as_secs_f64() / trigger.as_secs_f64().max(1e-9));
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let (direct_rate, trigger_rate) = (rate(n, direct_best), rate(n, trigger_best));
        println!(
            "{:<46} {:>10.0} objects/s  (the ceiling)",
            "direct calls, bytes staged, no trigger", direct_rate
        );
        println!(
            "{:<46} {:>10.0} objects/s  ({:.1} % of direct calls, median of rounds; range {:.1}-{:.1} %)",
            "object-store trigger",
            trigger_rate,
            100.0 * median,
            100.0 * ratios[0],
            100.0 * ratios[ratios.len() - 1]
        );
        println!(
            "what the trigger adds per object (best rounds): {:.0} µs over a direct call (listing and reading alone, one object after another: {:.0} µs)",
            1e6 * (trigger_best.as_secs_f64() - direct_best.as_secs_f64()) / n as f64,
            1e6 * read.as_secs_f64() / n as f64
        );

        let probes = n.min(LATENCY_PROBES);
        let mut samples = self.latency(probes).await?;
        samples.sort();
        let ms = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        if !samples.is_empty() {
            println!(
                "latency, one object at a time (n={probes}, poll_interval {POLL_INTERVAL:?}): written to done p50 {:.1} ms, max {:.1} ms{}",
                ms(0.5),
                ms(1.0),
                if prefix.remote {
                    ""
                } else {
                    " (a local file is called once two listings saw it unchanged)"
                }
            );
        }
        Ok(())
    }

    /// Every object's event and bytes through the executor, `concurrency` at
    /// a time; the time taken.
    async fn direct_calls(
        &self,
        objects: &Arc<Vec<(ObjectMeta, Bytes)>>,
    ) -> Result<Duration, String> {
        let Bench {
            ex,
            function,
            concurrency,
            ..
        } = *self;
        let t0 = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let (ex, f, objects, next) = (
                ex.clone(),
                function.to_owned(),
                Arc::clone(objects),
                Arc::clone(&next),
            );
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((meta, bytes)) = objects.get(i) else {
                        return Ok::<(), String>(());
                    };
                    let key = meta.location.filename().unwrap_or_default();
                    let name = meta.location.to_string();
                    let event = objects::s3_event("bench", "us-east-1", "bench", key, meta, &name)
                        .to_string();
                    let opts = InvokeOptions {
                        attachment: Some(bytes.clone()),
                        ..Default::default()
                    };
                    ex.invoke_with(&f, event.into_bytes(), opts)
                        .await
                        .map_err(|e| format!("direct call of {name}: {e}"))?;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| e.to_string())??;
        }
        Ok(t0.elapsed())
    }

    /// One trigger over the prefix with a fresh progress store, from its first
    /// object called to its `n`th recorded.
    async fn trigger_pass(&self, n: usize, round: usize) -> Result<Duration, String> {
        let prefix = self.prefix;
        let running = self.start(&format!("bench-{round}"), &prefix.url);
        let drained = tokio::time::timeout(
            Duration::from_secs(300),
            running.activity.wait_drained(n as u64),
        )
        .await;
        let took = running.activity.first_record().map(|first| first.elapsed());
        let seen = running.activity.records.load(Ordering::SeqCst);
        running.stop().await?;
        match (drained, took) {
            (Ok(()), Some(took)) => Ok(took),
            _ => Err(format!("only {seen} of {n} objects called after 300 s")),
        }
    }

    /// Write to done, one object at a time (`probes` of them, after one
    /// not counted), through a trigger over a folder of their own.
    async fn latency(&self, probes: usize) -> Result<Vec<Duration>, String> {
        let (url, folder) = self.prefix.latency()?;
        let running = self.start("latency", &url);
        let mut samples = Vec::with_capacity(probes);
        let mut result = Ok(());
        for i in 0..=probes {
            let t0 = Instant::now();
            let location = folder.child(format!("probe-{i:04}.txt"));
            let put = self
                .prefix
                .store
                .put(&location, PutPayload::from_static(b"one line\n"))
                .await;
            if let Err(e) = put {
                result = Err(format!("writing {location}: {e}"));
                break;
            }
            let done = tokio::time::timeout(
                Duration::from_secs(30),
                running.activity.wait_drained(i as u64 + 1),
            )
            .await;
            if done.is_err() {
                result = Err(format!("{location} not called 30 s after it was written"));
                break;
            }
            // The first includes the trigger's start.
            if i > 0 {
                samples.push(t0.elapsed());
            }
        }
        running.stop().await?;
        result.map(|()| samples)
    }

    /// Starts a trigger over `url` (every object, listed every
    /// [`POLL_INTERVAL`]), its store files in the scratch folder named
    /// after `name`.
    fn start(&self, name: &str, url: &str) -> Running {
        let t = ObjectTrigger {
            name: name.to_owned(),
            function: self.function.to_owned(),
            url: url.to_owned(),
            suffix: None,
            events: Default::default(),
            starting_position: StartingPosition::Earliest,
            poll_interval: POLL_INTERVAL,
            max_object_bytes: sluice_pipeline::DEFAULT_MAX_OBJECT_BYTES,
            max_retry_attempts: 0,
            retry_backoff: sluice_pipeline::DEFAULT_RETRY_BACKOFF,
            retry_backoff_max: sluice_pipeline::DEFAULT_RETRY_BACKOFF_MAX,
            progress: self.scratch.join(format!("{name}.objects.redb")),
            dead_letter: self.scratch.join(format!("{name}.dead-letter.jsonl")),
            results: None,
            enabled: true,
        };
        let activity = Arc::new(Activity::default());
        let metrics = Metrics::new();
        let env = ObjectEnv {
            executor: self.ex.clone(),
            metrics: metrics.clone(),
            activity: Arc::clone(&activity),
            max_concurrency: self.concurrency,
            retry_failed: false,
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(objects::run_object_trigger(t, env, stop_rx));
        Running {
            activity,
            metrics,
            stop,
            task,
        }
    }
}

/// Objects written one at a time for the latency figure.
const LATENCY_PROBES: usize = 20;

/// How often the bench's triggers list their prefix.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A trigger the bench started.
struct Running {
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), sluice_ingest::IngestError>>,
}

impl Running {
    /// Stops the trigger; an error if it failed, or if any call did (the
    /// figures of failing calls would mean nothing).
    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let errors: Vec<String> = self
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("sluice_function_errors_total{"))
            .map(str::to_owned)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the trigger's calls failed (see `sluice run` with this function): {}",
                errors.join("; ")
            ))
        }
    }
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}
