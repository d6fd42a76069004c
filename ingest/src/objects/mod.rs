//! Object-store triggers (`[[trigger.object_store]]`): Lambda's S3 trigger,
//! by polling a prefix.
//!
//! A trigger lists its prefix (`s3://`, `gs://`,
//! `az://`, `memory://` through [`object_store`], or a local folder), in
//! name order. Every object that is new, or whose version (ETag and
//! modification time, else size and modification time) changed since it
//! was handled, invokes the
//! function once with an S3 event notification (`ObjectCreated:Put`) as
//! its event; the object's bytes are fetched by sluice and staged in the
//! sandbox at [`sluice_protocol::ATTACHMENT_PATH`], because a sandbox has
//! no network and no view of the host's files.
//!
//! What was handled is kept in a redb store (`progress`), written after
//! each invocation ends, so a restart (even after `kill -9`) calls every
//! object not yet recorded: at least once. With `events` including
//! `"removed"`, an object recorded that a listing no longer shows is called
//! with an `ObjectRemoved:Delete` event (at least once too), then its
//! record is dropped. A failed invocation is retried
//! with exponential backoff up to `max_retry_attempts` times; then the
//! object is written to the dead-letter file (JSON lines, with the error
//! and attempts) before it is recorded as failed. An object larger than
//! `max_object_bytes` goes to the dead-letter file without a call.
//!
//! Names starting with `.` (in any folder of the path) are left out, so a
//! writer can upload under a hidden name and rename when done. A local file
//! is called only once two listings in a row saw it unchanged, or once it
//! has not changed for 2 s, so a file still being written is not called
//! half-written (object stores show an object only once its upload is
//! complete). Objects are
//! invoked concurrently up to the function's `concurrency`, and as many
//! more are fetched ahead; an object overwritten while its call runs is
//! called again after it. Outcomes finishing together are committed in one
//! transaction ([`crate::group_commit`]). The next listing starts once the
//! last one's objects are all started, at most every `poll_interval`.
//!
//! The progress store is local: one `sluice run` process per trigger.
//! (Kafka triggers are what scales out across processes.)

mod store;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::json;
use sluice_executor::{Executor, InvokeError, InvokeOptions};
use sluice_pipeline::{ObjectTrigger, StartingPosition};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

pub use store::{Url, register_object_store, split, store_for, upload_file, with_credentials_hint};

use crate::IngestError;
use crate::group_commit::GroupCommit;
use crate::kafka::Activity;
use crate::kafka::lane::{Failure, for_log};
use crate::metrics::{BatchOutcome, Metrics};
use crate::results::ResultsFile;

/// A local file unchanged for this long is complete (see the loop).
const LOCAL_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Objects handled: location → `version outcome`.
const OBJECTS: TableDefinition<&str, &str> = TableDefinition::new("objects");
/// `started`: the first listing was taken (and `starting_position` applied).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// What a trigger needs from `sluice run`.
#[derive(Clone)]
pub struct ObjectEnv {
    /// Runs the function.
    pub executor: Executor,
    /// Where counters go.
    pub metrics: Arc<Metrics>,
    /// Objects received and finished (each counts as one record).
    pub activity: Arc<Activity>,
    /// Objects called at once: the function's `concurrency`.
    pub max_concurrency: usize,
    /// Forget the objects recorded as failed before the first listing, so
    /// that they are called again (`sluice run --retry-failed`, once the
    /// function or the objects are fixed).
    pub retry_failed: bool,
}

/// The watched prefix.
struct Watched {
    store: Arc<dyn ObjectStore>,
    /// Listed prefix; `None` for a whole bucket.
    prefix: Option<ObjectPath>,
    /// The event's bucket name: the bucket, or the local folder.
    bucket: String,
    /// Prepended to a location to name the object to people
    /// (`s3://bucket/`, or `/` for local files).
    url_base: String,
    /// Local folder: the event's keys are relative to it.
    local: Option<PathBuf>,
}

impl Watched {
    fn open(t: &ObjectTrigger) -> Result<Self, IngestError> {
        let config = |message: String| IngestError::Config {
            trigger: t.name.clone(),
            message: format!("url {:?}: {message}", t.url),
        };
        if let Some(url) = split(&t.url) {
            let store = store_for(&url).map_err(config)?;
            let key = url.key.trim_matches('/');
            return Ok(Watched {
                store,
                prefix: (!key.is_empty()).then(|| ObjectPath::from(key)),
                bucket: url.authority.to_owned(),
                url_base: format!("{}/", url.base()),
                local: None,
            });
        }
        let folder = PathBuf::from(&t.url);
        match std::fs::metadata(&folder) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(config("is not a folder".into())),
            Err(e) => return Err(config(format!("cannot watch this folder: {e}"))),
        }
        let (folder, prefix) = local_prefix(folder).map_err(config)?;
        Ok(Watched {
            store: Arc::new(object_store::local::LocalFileSystem::new()),
            prefix: Some(prefix),
            bucket: folder.display().to_string(),
            url_base: "/".into(),
            local: Some(folder),
        })
    }

    /// How people see the object: its URL or local path.
    fn name(&self, location: &ObjectPath) -> String {
        format!("{}{location}", self.url_base)
    }

    /// The event's key: the object's key, or its path below the folder.
    fn key(&self, location: &ObjectPath) -> String {
        match (&self.local, &self.prefix) {
            (Some(_), Some(prefix)) => location
                .prefix_match(prefix)
                .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect::<Vec<_>>())
                .map_or_else(|| location.to_string(), |parts| parts.join("/")),
            _ => location.to_string(),
        }
    }

    /// Every object below the prefix that the trigger may call, by name.
    async fn list(&self, suffix: Option<&str>) -> object_store::Result<Vec<ObjectMeta>> {
        if let Some(folder) = &self.local
            && !folder.is_dir()
        {
            // Gone (or not mounted): a failed listing, not an empty one, so
            // that nothing recorded looks deleted.
            return Err(object_store::Error::NotFound {
                path: folder.display().to_string(),
                source: "the watched folder is missing".into(),
            });
        }
        let mut out = Vec::new();
        let mut listing = self.store.list(self.prefix.as_ref());
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let below = self.key(&meta.location);
            if below.split('/').any(|part| part.starts_with('.')) {
                continue;
            }
            if suffix.is_some_and(|s| !meta.location.as_ref().ends_with(s)) {
                continue;
            }
            out.push(meta);
        }
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }
}

/// Identifies one write of an object: its ETag and modification time (S3
/// sends an event for every write, even of the same bytes), else its size
/// and modification time.
fn version(meta: &ObjectMeta) -> String {
    let nanos = meta.last_modified.timestamp_nanos_opt().unwrap_or_default();
    match &meta.e_tag {
        Some(tag) => format!("{tag}@{nanos}"),
        None => format!("{}-{nanos}", meta.size),
    }
}

/// How an object's handling ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    /// Written to the dead-letter file.
    Failed,
    /// There before the trigger first ran (`starting_position`).
    Skipped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The progress store. Outcomes are written by a committer thread that
/// commits every outcome waiting in one transaction ([`GroupCommit`]), so
/// objects finishing together share one `fsync`.
struct Progress {
    db: Arc<Database>,
    trigger: String,
    commits: GroupCommit<Recorded>,
}

/// A change to the progress store.
enum Recorded {
    /// Objects (location, version) handled with an outcome; with `start`,
    /// also that the first listing was taken.
    Handled {
        objects: Vec<(String, String)>,
        outcome: Outcome,
        start: bool,
        /// Lines for the results file (a successful call's response).
        lines: Vec<u8>,
    },
    /// Objects deleted whose deletion was handled: their records are
    /// dropped, so an object written again under the same name is new.
    Gone {
        locations: Vec<String>,
        /// Lines for the results file (a successful call's response).
        lines: Vec<u8>,
    },
}

impl Progress {
    fn open(t: &ObjectTrigger) -> Result<Self, IngestError> {
        let err = |message: String| IngestError::Config {
            trigger: t.name.clone(),
            message: format!("progress store {}: {message}", t.progress.display()),
        };
        if let Some(dir) = t.progress.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let db = Database::create(&t.progress).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => err(
                "in use by another sluice run of this pipeline (an object-store trigger runs in \
                 one process; stop the other, or give this one its own `progress`)"
                    .into(),
            ),
            other => err(other.to_string()),
        })?;
        // What the store's records are of: a store kept for another prefix
        // (or suffix) would make every object there look new, and every
        // object recorded look deleted.
        let watching = format!("{}\n{}", t.url, t.suffix.as_deref().unwrap_or(""));
        let w = db.begin_write().map_err(|e| err(e.to_string()))?;
        w.open_table(OBJECTS).map_err(|e| err(e.to_string()))?;
        {
            let mut meta = w.open_table(META).map_err(|e| err(e.to_string()))?;
            let stored = meta
                .get("watching")
                .map_err(|e| err(e.to_string()))?
                .map(|v| v.value().to_owned());
            match stored {
                Some(stored) if stored != watching => {
                    let (url, suffix) = stored.split_once('\n').unwrap_or((&stored, ""));
                    return Err(err(format!(
                        "holds the objects of url {url:?}{}, not of this trigger's url {:?}{}; \
                         give the trigger its own `progress` (or delete the file to start over)",
                        if suffix.is_empty() {
                            String::new()
                        } else {
                            format!(" with suffix {suffix:?}")
                        },
                        t.url,
                        t.suffix
                            .as_deref()
                            .map(|s| format!(" with suffix {s:?}"))
                            .unwrap_or_default(),
                    )));
                }
                Some(_) => {}
                None => {
                    meta.insert("watching", watching.as_str())
                        .map_err(|e| err(e.to_string()))?;
                }
            }
        }
        w.commit().map_err(|e| err(e.to_string()))?;
        let db = Arc::new(db);
        let results = match &t.results {
            Some(path) => Some(
                ResultsFile::open(&db, path)
                    .map_err(|e| err(format!("results file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let commits = GroupCommit::spawn(Arc::clone(&db), "sluice-progress", move |w, group| {
            record(w, group, results.as_ref())
        })
        .map_err(|e| err(e.to_string()))?;
        Ok(Progress {
            db,
            trigger: t.name.clone(),
            commits,
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> IngestError {
        IngestError::Progress {
            trigger: self.trigger.clone(),
            message: e.into().to_string(),
        }
    }

    /// The recorded version of every object handled.
    fn versions(&self) -> Result<BTreeMap<String, String>, IngestError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = r.open_table(OBJECTS).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let version = v.value().rsplit_once(' ').map_or("", |(v, _)| v);
            out.insert(k.value().to_owned(), version.to_owned());
        }
        Ok(out)
    }

    /// Removes the records of failed objects; how many there were.
    fn forget_failed(&self) -> Result<usize, IngestError> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let n = {
            let mut table = w.open_table(OBJECTS).map_err(|e| self.err(e))?;
            let suffix = format!(" {}", Outcome::Failed.as_str());
            let failed: Vec<String> = table
                .iter()
                .map_err(|e| self.err(e))?
                .filter_map(Result::ok)
                .filter(|(_, v)| v.value().ends_with(&suffix))
                .map(|(k, _)| k.value().to_owned())
                .collect();
            for k in &failed {
                table.remove(k.as_str()).map_err(|e| self.err(e))?;
            }
            failed.len()
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    fn started(&self) -> Result<bool, IngestError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = r.open_table(META).map_err(|e| self.err(e))?;
        Ok(table.get("started").map_err(|e| self.err(e))?.is_some())
    }

    /// `work` on the store, off the async threads (reading every record
    /// takes as long as there are records).
    async fn off_thread<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Progress) -> Result<T, IngestError> + Send + 'static,
    ) -> Result<T, IngestError> {
        let p = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&p))
            .await
            .map_err(|e| IngestError::Progress {
                trigger: self.trigger.clone(),
                message: e.to_string(),
            })?
    }

    /// Records `objects` (location, version) with `outcome`, and, with
    /// `start`, that the first listing was taken; returns once that is
    /// durable.
    async fn record(
        &self,
        objects: Vec<(String, String)>,
        outcome: Outcome,
        start: bool,
    ) -> Result<(), IngestError> {
        self.change(Recorded::Handled {
            objects,
            outcome,
            start,
            lines: Vec::new(),
        })
        .await
    }

    /// Makes `change` durably.
    async fn change(&self, change: Recorded) -> Result<(), IngestError> {
        self.commits
            .commit(change)
            .await
            .map_err(|e| IngestError::Progress {
                trigger: self.trigger.clone(),
                message: e.to_string(),
            })
    }
}

/// Writes a group of changes into the committer's transaction, in order;
/// their results lines first, synced ([`ResultsFile`]).
fn record(
    w: &redb::WriteTransaction,
    group: &[Recorded],
    results: Option<&ResultsFile>,
) -> Result<(), redb::Error> {
    if let Some(results) = results {
        let lines: Vec<u8> = group
            .iter()
            .flat_map(|r| match r {
                Recorded::Handled { lines, .. } | Recorded::Gone { lines, .. } => lines,
            })
            .copied()
            .collect();
        results.append(w, &lines)?;
    }
    let mut table = w.open_table(OBJECTS)?;
    for r in group {
        match r {
            Recorded::Handled {
                objects,
                outcome,
                start,
                ..
            } => {
                for (location, version) in objects {
                    let value = format!("{version} {}", outcome.as_str());
                    table.insert(location.as_str(), value.as_str())?;
                }
                if *start {
                    w.open_table(META)?.insert("started", "1")?;
                }
            }
            Recorded::Gone { locations, .. } => {
                for location in locations {
                    table.remove(location.as_str())?;
                }
            }
        }
    }
    Ok(())
}

/// The dead-letter file, appended to and synced line by line.
struct DeadLetter {
    path: PathBuf,
    lock: Mutex<()>,
}

impl DeadLetter {
    fn append(&self, line: &serde_json::Value) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut text = line.to_string();
        text.push('\n');
        f.write_all(text.as_bytes())?;
        f.sync_data()
    }
}

/// What the object calls of one trigger share.
struct Shared {
    t: ObjectTrigger,
    env: ObjectEnv,
    watched: Watched,
    progress: Arc<Progress>,
    dead_letter: DeadLetter,
    region: String,
    /// Objects whose read failed and was logged.
    unreadable: Mutex<HashSet<String>>,
    /// Lines about objects that failed (see
    /// [`crate::FAILURE_LOG_LINES_PER_SEC`]).
    failure_log: sluice_executor::LogRateLimiter,
    /// Calls at once: the function's `concurrency`.
    calls: Arc<Semaphore>,
    /// KiB of objects fetched and not yet called at once (see
    /// [`fetch_budget_kib`]).
    fetched_kib: Arc<Semaphore>,
}

/// Bytes of objects held in memory at once (fetched, and staged for their
/// calls): at least one object of the largest size allowed.
const FETCH_BUDGET: u64 = 256 << 20;

/// [`FETCH_BUDGET`], or one object of `max_object_bytes` if that is more,
/// in KiB.
fn fetch_budget_kib(max_object_bytes: u64) -> u32 {
    u32::try_from(FETCH_BUDGET.max(max_object_bytes).div_ceil(1024)).unwrap_or(u32::MAX)
}

/// S3's encoding of keys in event notifications: form encoding (a space is
/// `+`), `/` kept.
fn event_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The S3 event notification of one object (Lambda's format, one record),
/// plus a `sluice` member naming the object and where its bytes are.
pub fn s3_event(
    trigger: &str,
    region: &str,
    bucket: &str,
    key: &str,
    meta: &ObjectMeta,
    name: &str,
) -> serde_json::Value {
    let mut object = json!({
        "key": event_key(key),
        "size": meta.size,
        "sequencer": sequencer(meta.last_modified),
    });
    if let Some(tag) = &meta.e_tag {
        object["eTag"] = json!(tag.trim_matches('"'));
    }
    if let Some(v) = &meta.version {
        object["versionId"] = json!(v);
    }
    s3_record(
        trigger,
        region,
        bucket,
        "ObjectCreated:Put",
        meta.last_modified,
        object,
        json!({"object": name, "payloadPath": sluice_protocol::ATTACHMENT_PATH}),
    )
}

/// The S3 event notification of an object deleted (`ObjectRemoved:Delete`,
/// one record), found missing at `at`; its `sluice` member names the
/// object (there are no bytes to stage).
pub fn s3_removed_event(
    trigger: &str,
    region: &str,
    bucket: &str,
    key: &str,
    name: &str,
    at: DateTime<Utc>,
) -> serde_json::Value {
    let object = json!({"key": event_key(key), "sequencer": sequencer(at)});
    s3_record(
        trigger,
        region,
        bucket,
        "ObjectRemoved:Delete",
        at,
        object,
        json!({"object": name}),
    )
}

/// S3's ordering hint for events of one key: later events, larger.
fn sequencer(at: DateTime<Utc>) -> String {
    format!("{:016X}", at.timestamp_nanos_opt().unwrap_or_default())
}

/// One S3 event notification record, in Lambda's envelope.
fn s3_record(
    trigger: &str,
    region: &str,
    bucket: &str,
    event_name: &str,
    at: DateTime<Utc>,
    object: serde_json::Value,
    sluice: serde_json::Value,
) -> serde_json::Value {
    json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        "eventName": event_name,
        "userIdentity": {"principalId": "sluice"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "sluice", "x-amz-id-2": "sluice"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": trigger,
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "sluice"},
                "arn": format!("arn:aws:s3:::{bucket}"),
            },
            "object": object,
        },
        "sluice": sluice,
    }]})
}

/// Runs `t` until `stop` turns true; calls in flight then finish (a call
/// waiting to be retried is left for the next run) and the function
/// returns.
///
/// # Errors
/// [`IngestError::Config`] when the prefix cannot be watched or the
/// progress store cannot be opened; [`IngestError::Progress`] when it can
/// no longer be written (nothing is called without it).
pub async fn run_object_trigger(
    t: ObjectTrigger,
    env: ObjectEnv,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let watched = Watched::open(&t)?;
    let progress = Arc::new(Progress::open(&t)?);
    let limit = env.max_concurrency.max(1);
    if env.retry_failed {
        let n = progress.forget_failed()?;
        tracing::info!(trigger = %t.name, "{n} objects recorded as failed will be called again (--retry-failed)");
    }
    let shared = Arc::new(Shared {
        failure_log: crate::failure_log(),
        calls: Arc::new(Semaphore::new(limit)),
        fetched_kib: Arc::new(Semaphore::new(fetch_budget_kib(t.max_object_bytes) as usize)),
        dead_letter: DeadLetter {
            path: t.dead_letter.clone(),
            lock: Mutex::new(()),
        },
        region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        unreadable: Mutex::new(HashSet::new()),
        watched,
        progress,
        env,
        t,
    });
    let t = &shared.t;
    tracing::info!(trigger = %t.name, url = %t.url, function = %t.function, "watching for objects");

    let mut pending: VecDeque<Due> = VecDeque::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut calls: JoinSet<(String, Result<(), IngestError>)> = JoinSet::new();
    // Objects fetched or called at once: twice the calls, so that the next
    // objects are fetched while calls run (a store's latency is not added
    // to each call). A permit is given back when the call ends, before the
    // outcome is recorded, so the next call does not wait for a commit.
    let ahead = Arc::new(Semaphore::new(2 * limit));
    // The listing under way: it runs beside the calls, so they go on while
    // a long prefix is listed.
    let mut listing: Option<JoinHandle<object_store::Result<Vec<ObjectMeta>>>> = None;
    let mut next_list = Instant::now();
    let mut listing_failed = false;
    // Versions seen by the previous listing.
    let mut previous: HashMap<String, String> = HashMap::new();
    let mut first = true;
    let result = loop {
        tokio::select! {
            () = stopped(&mut stop) => break Ok(()),
            Ok(permit) = Arc::clone(&ahead).acquire_owned(), if !pending.is_empty() => {
                if let Some(due) = pending.pop_front() {
                    let location = due.location();
                    in_flight.insert(location.clone());
                    let s = Arc::clone(&shared);
                    let stop = stop.clone();
                    calls.spawn(async move { (location, handle(&s, due, permit, stop).await) });
                }
            }
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                match done {
                    Ok((location, Ok(()))) => { in_flight.remove(&location); }
                    Ok((_, Err(e))) => break Err(e),
                    Err(e) => break Err(IngestError::Progress {
                        trigger: t.name.clone(),
                        message: format!("an object call panicked: {e}"),
                    }),
                }
            }
            // The next listing once the last one's objects are all started
            // (listing again sooner would only find them again).
            _ = tokio::time::sleep_until(next_list), if listing.is_none() && pending.is_empty() => {
                next_list = Instant::now() + t.poll_interval;
                let s = Arc::clone(&shared);
                listing = Some(tokio::spawn(async move {
                    s.watched.list(s.t.suffix.as_deref()).await
                }));
            }
            joined = async { listing.as_mut().expect("guarded by is_some").await }, if listing.is_some() => {
                listing = None;
                let listed = match joined.map_err(|e| e.to_string()).and_then(|l| l.map_err(|e| e.to_string())) {
                    Ok(l) => {
                        if listing_failed {
                            tracing::info!(trigger = %t.name, url = %t.url, "listing works again");
                            listing_failed = false;
                        }
                        l
                    }
                    Err(e) => {
                        // Once per outage; the next poll tries again.
                        if !listing_failed {
                            tracing::warn!(trigger = %t.name, url = %t.url,
                                "cannot list the objects: {}; retrying every {:?}",
                                with_credentials_hint(&t.url, e), t.poll_interval);
                            listing_failed = true;
                        }
                        shared.env.metrics.function_error(&t.name, "Sluice.ListingFailed");
                        continue;
                    }
                };
                if first {
                    first = false;
                    if let Err(e) = start(&shared, &listed).await {
                        break Err(e);
                    }
                    shared.env.activity.triggers_assigned.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let done = match shared.progress.off_thread(Progress::versions).await {
                    Ok(d) => d,
                    Err(e) => break Err(e),
                };
                // A local file may still be being written: it is called once
                // two listings in a row saw the same version of it, or once
                // it has not changed for `LOCAL_SETTLE`.
                let settle = shared.watched.local.is_some();
                let settled_before = now_ms() - LOCAL_SETTLE.as_millis() as i64;
                let listed_now: HashMap<String, String> = listed
                    .iter()
                    .map(|m| (m.location.to_string(), version(m)))
                    .collect();
                // Objects no longer listed (not one being called: its
                // record is written after this): with `events` "removed",
                // each is called with a deletion event, then forgotten.
                // Without it their records are kept: a prefix that lists
                // empty for a while (a folder whose disk is not mounted)
                // must not make every object new again once it is back.
                let gone: Vec<(String, String)> = done
                    .iter()
                    .filter(|(l, _)| !listed_now.contains_key(*l) && !in_flight.contains(*l))
                    .map(|(l, v)| (l.clone(), v.clone()))
                    .collect();
                pending = VecDeque::new();
                if t.events.removed {
                    if gone.len() > 1 && gone.len() == done.len() {
                        tracing::warn!(trigger = %t.name, url = %t.url,
                            "every one of the {} objects recorded is gone: calling the function with a deletion event for each", gone.len());
                    }
                    pending.extend(gone.into_iter().map(|(location, version)| Due::Removed { location, version }));
                }
                // The youngest modification time of a local file held back
                // because it may still be being written.
                let mut unsettled: Option<i64> = None;
                let written: Vec<ObjectMeta> = listed
                    .into_iter()
                    .filter(|m| {
                        let location = m.location.to_string();
                        let v = version(m);
                        let new = !in_flight.contains(&location)
                            && done.get(&location).is_none_or(|d| *d != v);
                        let modified = m.last_modified.timestamp_millis();
                        let settled = !settle
                            || previous.get(&location) == Some(&v)
                            || modified <= settled_before;
                        if new && !settled {
                            unsettled = Some(unsettled.map_or(modified, |u| u.max(modified)));
                        }
                        new && settled
                    })
                    .collect();
                // Held-back files are looked at again once they are
                // `LOCAL_SETTLE` old, if that comes before the next poll
                // (with a poll interval of minutes, a new file would wait
                // for the next one).
                if let Some(modified) = unsettled {
                    let wait = (modified + LOCAL_SETTLE.as_millis() as i64 - now_ms()).max(0);
                    let at = Instant::now() + std::time::Duration::from_millis(wait as u64);
                    next_list = next_list.min(at);
                }
                if t.events.created {
                    pending.extend(written.into_iter().map(Due::Created));
                } else if !written.is_empty() {
                    // Only deletions are wanted: objects written are
                    // recorded uncalled, so that their deletion is seen.
                    let seen: Vec<_> = written.iter().map(|m| (m.location.to_string(), version(m))).collect();
                    let n = seen.len() as u64;
                    if let Err(e) = shared.progress.record(seen, Outcome::Skipped, false).await {
                        break Err(e);
                    }
                    shared.env.metrics.records_filtered(&t.name, n);
                }
                previous = listed_now;
            }
        }
    };
    if let Some(l) = listing.take() {
        // A listing can take long (the store's own retries in an outage):
        // a stop does not wait for it.
        l.abort();
    }
    // Calls in flight finish (or give up their backoff) and are recorded.
    while let Some(done) = calls.join_next().await {
        if let Ok((_, Err(e))) = done {
            tracing::error!(trigger = %t.name, "{e}");
        }
    }
    let held_back = shared.failure_log.take_dropped();
    if held_back > 0 {
        tracing::info!(trigger = %t.name, held_back, "{held_back} log lines about failed objects were held back (at most {} a second are written; /metrics and the dead-letter file count every one)", crate::FAILURE_LOG_LINES_PER_SEC);
    }
    tracing::info!(trigger = %t.name, "trigger stopped");
    result
}

/// The first listing of a trigger that never ran: objects already there
/// are skipped as `starting_position` says.
async fn start(shared: &Arc<Shared>, listed: &[ObjectMeta]) -> Result<(), IngestError> {
    let t = &shared.t;
    if shared.progress.started()? {
        return Ok(());
    }
    let skipped: Vec<(String, String)> = listed
        .iter()
        .filter(|m| match t.starting_position {
            StartingPosition::Earliest => false,
            StartingPosition::Latest => true,
            StartingPosition::Timestamp(ms) => m.last_modified.timestamp_millis() < ms,
        })
        .map(|m| (m.location.to_string(), version(m)))
        .collect();
    if !skipped.is_empty() {
        tracing::warn!(
            trigger = %t.name,
            "{} already under {} {} skipped (`starting_position` is {}); set `starting_position = \"earliest\"` on the trigger to process them",
            match skipped.len() {
                1 => "1 object".to_owned(),
                n => format!("{n} objects"),
            },
            t.url,
            if skipped.len() == 1 { "is" } else { "are" },
            match t.starting_position {
                StartingPosition::Timestamp(_) => "a time after they were written",
                _ => "\"latest\", the default",
            }
        );
    }
    shared
        .progress
        .record(skipped, Outcome::Skipped, true)
        .await
}

/// Work the loop starts.
enum Due {
    /// An object written (new, or a new version).
    Created(ObjectMeta),
    /// An object handled before and no longer listed (with `events`
    /// "removed"): location and recorded version.
    Removed { location: String, version: String },
}

impl Due {
    fn location(&self) -> String {
        match self {
            Due::Created(meta) => meta.location.to_string(),
            Due::Removed { location, .. } => location.clone(),
        }
    }
}

/// One piece of work: call with retries, record. `Ok` also when the call
/// was abandoned to a stop (nothing recorded: the next run makes it).
async fn handle(
    shared: &Arc<Shared>,
    due: Due,
    permit: OwnedSemaphorePermit,
    stop: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let activity = &shared.env.activity;
    activity.received(1);
    let _finished = Finished(activity);
    match due {
        Due::Created(meta) => created(shared, meta, permit, stop).await,
        Due::Removed { location, version } => {
            removed(shared, location, version, permit, stop).await
        }
    }
}

/// An object written: fetch, call, record.
async fn created(
    shared: &Arc<Shared>,
    meta: ObjectMeta,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let t = &shared.t;
    let name = shared.watched.name(&meta.location);
    let key = shared.watched.key(&meta.location);
    let handled = |outcome, lines| Recorded::Handled {
        objects: vec![(meta.location.to_string(), version(&meta))],
        outcome,
        start: false,
        lines,
    };
    let details = json!({
        "eventName": "ObjectCreated:Put",
        "size": meta.size,
        "eTag": meta.e_tag,
        "lastModified": meta.last_modified.to_rfc3339(),
    });
    if meta.size > t.max_object_bytes {
        let failure = Failure {
            error_type: "Sluice.ObjectTooLarge".into(),
            message: format!(
                "{name} is {} bytes, more than the trigger's max_object_bytes ({})",
                meta.size, t.max_object_bytes
            ),
            retryable: false,
        };
        drop(permit);
        let failed = Failed {
            name: &name,
            key: &key,
            details,
            failure,
            attempts: 0,
        };
        return fail(shared, failed, handled(Outcome::Failed, Vec::new())).await;
    }
    // Memory: the object's bytes count against the budget until its call
    // ends, so large objects are fetched fewer at once.
    let kib = u32::try_from(meta.size.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, fetch_budget_kib(t.max_object_bytes));
    let held = tokio::select! {
        p = Arc::clone(&shared.fetched_kib).acquire_many_owned(kib) => p,
        () = stopped(&mut stop) => return Ok(()),
    };
    let fetched = tokio::select! {
        r = fetch(&shared.watched, &meta.location) => r,
        () = stopped(&mut stop) => return Ok(()),
    };
    let bytes: Bytes = match fetched {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => {
            tracing::debug!(trigger = %t.name, object = %name, "deleted before it was read");
            return Ok(());
        }
        Err(e) => {
            // Left unrecorded: the next listing offers it again. Said once
            // per object (not at every poll); counted every time.
            let first = shared
                .unreadable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone());
            if first && let Some(held_back) = shared.failure_log.admit() {
                tracing::warn!(trigger = %t.name, object = %name, held_back,
                    "cannot read the object: {}; trying again at each listing",
                    with_credentials_hint(&t.url, e.to_string()));
            }
            shared
                .env
                .metrics
                .function_error(&t.name, "Sluice.ReadFailed");
            return Ok(());
        }
    };
    let event = s3_event(
        &t.name,
        &shared.region,
        &shared.watched.bucket,
        &key,
        &meta,
        &name,
    )
    .to_string();
    let called = call(shared, &name, &event, Some(bytes), &mut stop).await;
    drop((permit, held));
    match called {
        Called::Succeeded(response) => {
            let lines = result_line(
                shared,
                &meta.location,
                &version(&meta),
                "ObjectCreated:Put",
                &response,
            );
            shared
                .progress
                .change(handled(Outcome::Succeeded, lines))
                .await
        }
        Called::Failed { failure, attempts } => {
            let failed = Failed {
                name: &name,
                key: &key,
                details,
                failure,
                attempts,
            };
            fail(shared, failed, handled(Outcome::Failed, Vec::new())).await
        }
        Called::Stopped => Ok(()),
    }
}

/// An object deleted: call, then drop its record (also when the call
/// failed for good, after the dead-letter line).
async fn removed(
    shared: &Arc<Shared>,
    location: String,
    version: String,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let t = &shared.t;
    let path = ObjectPath::parse(&location).unwrap_or_else(|_| ObjectPath::from(location.as_str()));
    let name = shared.watched.name(&path);
    let key = shared.watched.key(&path);
    let event = s3_removed_event(
        &t.name,
        &shared.region,
        &shared.watched.bucket,
        &key,
        &name,
        Utc::now(),
    )
    .to_string();
    let called = call(shared, &name, &event, None, &mut stop).await;
    drop(permit);
    let gone = |lines| Recorded::Gone {
        locations: vec![location.clone()],
        lines,
    };
    match called {
        Called::Succeeded(response) => {
            let lines = result_line(shared, &path, &version, "ObjectRemoved:Delete", &response);
            shared.progress.change(gone(lines)).await
        }
        Called::Failed { failure, attempts } => {
            let failed = Failed {
                name: &name,
                key: &key,
                details: json!({"eventName": "ObjectRemoved:Delete", "version": version}),
                failure,
                attempts,
            };
            fail(shared, failed, gone(Vec::new())).await
        }
        Called::Stopped => Ok(()),
    }
}

/// The results line of a successful call (none without `results`): the
/// object's key, its version and the event type, and the response.
fn result_line(
    shared: &Shared,
    location: &ObjectPath,
    version: &str,
    event: &str,
    response: &[u8],
) -> Vec<u8> {
    if shared.t.results.is_none() {
        return Vec::new();
    }
    let mut fields = serde_json::Map::new();
    fields.insert("object".into(), shared.watched.name(location).into());
    fields.insert("key".into(), shared.watched.key(location).into());
    fields.insert("version".into(), version.into());
    fields.insert("eventName".into(), event.into());
    crate::results::line(fields, response)
}

/// How a call with its retries ended.
enum Called {
    /// With the function's response.
    Succeeded(Vec<u8>),
    /// Failed for good: the last failure and the attempts made.
    Failed { failure: Failure, attempts: u32 },
    /// Abandoned to a stop (or the executor shutting down).
    Stopped,
}

/// Invokes the function with `event` (and `attachment`, staged in the
/// sandbox) in one of its call slots, retrying a failure with exponential
/// backoff up to `max_retry_attempts` times.
async fn call(
    shared: &Arc<Shared>,
    name: &str,
    event: &str,
    attachment: Option<Bytes>,
    stop: &mut watch::Receiver<bool>,
) -> Called {
    let t = &shared.t;
    let metrics = &shared.env.metrics;
    // Fetched ahead: the call waits for one of the function's slots.
    let slot = tokio::select! {
        p = Arc::clone(&shared.calls).acquire_owned() => p,
        () = stopped(stop) => return Called::Stopped,
    };
    let Ok(_slot) = slot else {
        // Never: the semaphore is not closed.
        return Called::Stopped;
    };
    let mut attempts = 0u32;
    let mut delay = t.retry_backoff;
    loop {
        attempts += 1;
        let opts = InvokeOptions {
            attachment: attachment.clone(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let result = shared
            .env
            .executor
            .invoke_with(&t.function, event.as_bytes(), opts)
            .await;
        metrics.observe_invoke(&t.name, started.elapsed().as_secs_f64());
        let e = match result {
            Ok(response) => {
                metrics.batch(&t.name, BatchOutcome::Success);
                tracing::debug!(trigger = %t.name, object = %name, attempts, "object done");
                return Called::Succeeded(response.payload);
            }
            Err(InvokeError::ShuttingDown) => return Called::Stopped,
            Err(e) => e,
        };
        let failure = Failure::from(&e);
        metrics.function_error(&t.name, &failure.error_type);
        if attempts > t.max_retry_attempts {
            return Called::Failed { failure, attempts };
        }
        if let Some(held_back) = shared.failure_log.admit() {
            tracing::warn!(trigger = %t.name, object = %name, attempts, error_type = %failure.error_type,
                held_back, "call failed: {}; retrying in {delay:?}", for_log(&failure.message));
        }
        metrics.retry(&t.name);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            () = stopped(stop) => return Called::Stopped,
        }
        delay = (delay * 2).min(t.retry_backoff_max);
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Decrements the backlog however a call ends.
struct Finished<'a>(&'a Activity);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.finished(1);
    }
}

async fn fetch(watched: &Watched, location: &ObjectPath) -> object_store::Result<Bytes> {
    watched.store.get(location).await?.bytes().await
}

/// An object whose call failed for good (or was never made).
struct Failed<'a> {
    name: &'a str,
    key: &'a str,
    /// The event's name and the object's details, for the dead-letter line.
    details: serde_json::Value,
    failure: Failure,
    attempts: u32,
}

/// Writes the object to the dead-letter file, then records `then`.
async fn fail(shared: &Arc<Shared>, failed: Failed<'_>, then: Recorded) -> Result<(), IngestError> {
    let t = &shared.t;
    let Failed {
        name,
        key,
        details,
        failure,
        attempts,
    } = failed;
    let mut line = json!({
        "trigger": t.name,
        "function": t.function,
        "object": name,
        "bucket": shared.watched.bucket,
        "key": key,
        "attempts": attempts,
        "errorType": failure.error_type,
        "errorMessage": failure.message,
    });
    if let (Some(line), serde_json::Value::Object(details)) = (line.as_object_mut(), details) {
        line.extend(details);
    }
    let s = Arc::clone(shared);
    tokio::task::spawn_blocking(move || s.dead_letter.append(&line))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| IngestError::DeadLetter {
            trigger: t.name.clone(),
            file: t.dead_letter.clone(),
            source: e,
        })?;
    shared.env.metrics.batch(&t.name, BatchOutcome::Failed);
    shared.env.metrics.dlq_write(&t.name, 1);
    let again = match then {
        Recorded::Gone { .. } => "a deletion is not called again",
        Recorded::Handled { .. } => "`sluice run --retry-failed` calls it again",
    };
    if let Some(held_back) = shared.failure_log.admit() {
        tracing::error!(trigger = %t.name, object = %name, attempts, error_type = %failure.error_type,
            dead_letter = %t.dead_letter.display(), held_back,
            "object failed for good: {}; written to the dead-letter file ({again})", for_log(&failure.message));
    }
    shared.progress.change(then).await
}

/// Where a trigger's objects are recorded, for `sluice` to print.
pub fn describe(t: &ObjectTrigger) -> String {
    format!(
        "trigger {}: watching {} for {} every {:?} (progress {}, dead letters {})",
        t.name,
        t.url,
        t.events.what(),
        t.poll_interval,
        t.progress.display(),
        t.dead_letter.display()
    )
}

/// A local folder as `object_store` names it: the canonical folder and its
/// path as an object prefix (for `LocalFileSystem`).
pub(crate) fn local_prefix(folder: PathBuf) -> Result<(PathBuf, ObjectPath), String> {
    let folder = folder.canonicalize().unwrap_or(folder);
    let prefix = ObjectPath::from_absolute_path(&folder)
        .map_err(|e| format!("not a usable folder path: {e}"))?;
    Ok((folder, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(e_tag: Option<&str>, size: u64, secs: i64) -> ObjectMeta {
        ObjectMeta {
            location: ObjectPath::from("in/a.txt"),
            last_modified: chrono::DateTime::from_timestamp(secs, 0).unwrap(),
            size,
            e_tag: e_tag.map(str::to_owned),
            version: None,
        }
    }

    /// S3 sends an event for every write, even of the same bytes (same
    /// ETag): a later write is another version.
    #[test]
    fn a_write_of_the_same_bytes_later_is_another_version() {
        let first = version(&meta(Some("\"abc\""), 3, 1_700_000_000));
        assert_eq!(first, version(&meta(Some("\"abc\""), 3, 1_700_000_000)));
        assert_ne!(first, version(&meta(Some("\"abc\""), 3, 1_700_000_001)));
        assert_ne!(first, version(&meta(Some("\"abd\""), 3, 1_700_000_000)));
        // Without an ETag: size and time.
        let plain = version(&meta(None, 3, 1_700_000_000));
        assert_ne!(plain, version(&meta(None, 4, 1_700_000_000)));
        assert_ne!(plain, version(&meta(None, 3, 1_700_000_001)));
    }
}
