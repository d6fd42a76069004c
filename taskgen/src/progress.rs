//! The durable progress store (redb: succeeded call ids) and the dead-letter
//! file (JSON lines).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use sluice_ingest::group_commit::GroupCommit;
use sluice_ingest::results::ResultsFile;

use crate::BackfillError;

/// Call id → attempts it took.
const SUCCEEDED: TableDefinition<&str, u64> = TableDefinition::new("succeeded");
/// `"layout"` → how calls were cut when the store was created.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Which calls already succeeded.
///
/// Every success is committed before [`Progress::record`] returns, but not
/// in a transaction of its own: a committer thread (`sluice-progress`) takes
/// every success waiting when it starts a transaction and commits them
/// together (group commit, [`GroupCommit`]), so that many calls finishing
/// at once share one `fsync` instead of queueing behind one each. A call is
/// counted, and what depends on it released, only once its success is
/// durable.
pub(crate) struct Progress {
    db: Arc<Database>,
    path: PathBuf,
    commits: GroupCommit<Success>,
    /// Whether responses are kept in a results file.
    keeps_results: bool,
}

/// A successful call to record.
pub(crate) struct Success {
    pub(crate) call_id: String,
    /// Attempts it took.
    pub(crate) attempts: u64,
    /// Its line of the results file (newline-terminated), if responses are
    /// kept.
    pub(crate) result: Option<Vec<u8>>,
}

impl Progress {
    /// Opens (or creates) the store of a run whose calls are cut as
    /// `layout` says. Call ids name a call's first item only, so a store
    /// written with another layout would skip the wrong items: that is
    /// refused with [`BackfillError::ProgressLayout`].
    ///
    /// With `results`, each success's line is appended to that file and
    /// synced before the success is committed, so a call counted as done
    /// always has its line; lines written after the last commit (a crash
    /// between the two; those calls run again) are cut off when the file is
    /// opened ([`ResultsFile`]), so each call has exactly one line.
    pub(crate) fn open(
        path: &Path,
        layout: &str,
        results: Option<&Path>,
    ) -> Result<Self, BackfillError> {
        let err = |e: redb::Error| BackfillError::Progress {
            path: path.to_path_buf(),
            source: Arc::new(e),
        };
        // A --progress in a folder not made yet: make it, as for any output.
        make_parent(path).map_err(|io| BackfillError::ProgressNotWritable {
            path: path.to_path_buf(),
            source: Arc::new(io),
        })?;
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                BackfillError::ProgressNotWritable {
                    path: path.to_path_buf(),
                    source: Arc::new(io),
                }
            }
            redb::DatabaseError::DatabaseAlreadyOpen => BackfillError::ProgressInUse {
                path: path.to_path_buf(),
            },
            e => err(e.into()),
        })?;
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(SUCCEEDED).map_err(|e| err(e.into()))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            let stored = meta
                .get("layout")
                .map_err(|e| err(e.into()))?
                .map(|v| v.value().to_owned());
            match stored {
                Some(stored) if stored != layout => {
                    return Err(BackfillError::ProgressLayout {
                        path: path.to_path_buf(),
                        stored,
                        wanted: layout.to_owned(),
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("layout", layout).map_err(|e| err(e.into()))?;
                }
            }
        }
        tx.commit().map_err(|e| err(e.into()))?;
        let db = Arc::new(db);
        let results_file =
            match results {
                Some(results) => Some(ResultsFile::open(&db, results).map_err(|source| {
                    BackfillError::Results {
                        path: results.to_path_buf(),
                        source,
                    }
                })?),
                None => None,
            };
        let commits = GroupCommit::spawn(
            Arc::clone(&db),
            "sluice-progress",
            move |tx, group: &[Success]| {
                if let Some(results) = &results_file {
                    // The lines first, durably: then the successes.
                    let lines: Vec<u8> = group
                        .iter()
                        .filter_map(|s| s.result.as_deref())
                        .flatten()
                        .copied()
                        .collect();
                    results.append(tx, &lines)?;
                }
                let mut table = tx.open_table(SUCCEEDED)?;
                for s in group {
                    table.insert(s.call_id.as_str(), s.attempts)?;
                }
                Ok(())
            },
        )
        .map_err(|e| err(redb::StorageError::Io(e).into()))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
            commits,
            keeps_results: results.is_some(),
        })
    }

    /// Whether each success gets a line in a results file.
    pub(crate) fn keeps_results(&self) -> bool {
        self.keeps_results
    }

    fn err(&self, e: impl Into<redb::Error>) -> BackfillError {
        BackfillError::Progress {
            path: self.path.clone(),
            source: Arc::new(e.into()),
        }
    }

    pub(crate) fn succeeded(&self, call_id: &str) -> Result<bool, BackfillError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(SUCCEEDED).map_err(|e| self.err(e))?;
        Ok(table.get(call_id).map_err(|e| self.err(e))?.is_some())
    }

    /// Records a success durably (with its results line first, if any):
    /// returns once the transaction holding it is committed.
    pub(crate) async fn record(&self, success: Success) -> Result<(), BackfillError> {
        self.commits
            .commit(success)
            .await
            .map_err(|source| BackfillError::Progress {
                path: self.path.clone(),
                source,
            })
    }
}

/// The line of a successful call in the results file: the call's id and
/// items, and the function's response (JSON, or its text as a string).
pub(crate) fn result_line(
    call_id: &str,
    source: &str,
    first_item: u64,
    count: u64,
    response: &[u8],
) -> Vec<u8> {
    let mut fields = serde_json::Map::new();
    fields.insert("call_id".into(), call_id.into());
    fields.insert("source".into(), source.into());
    fields.insert("first_item".into(), first_item.into());
    fields.insert("count".into(), count.into());
    sluice_ingest::results::line(fields, response)
}

/// One JSON object per failed call (or unreadable item).
///
/// A stateless re-run calls every call that has not succeeded yet, failed
/// ones included, so [`DeadLetter::new`] starts the file afresh: it lists
/// the failures of the latest run and agrees with that run's summary. A
/// stateful fold moves past a failed call for good (re-calling it later
/// would fold out of order), so a resumed fold keeps the file
/// ([`DeadLetter::keeping`]): the failures of earlier runs stay, and an
/// unreadable line read again is not written twice.
pub(crate) struct DeadLetter {
    path: PathBuf,
    file: Mutex<Option<File>>,
    /// Identities of the records kept from earlier runs.
    earlier: Mutex<HashSet<String>>,
}

/// How many calls the progress store at `path` records as done, read
/// without taking the store (a dry run's report); `None` when there is no
/// store there yet.
///
/// # Errors
/// [`BackfillError::ProgressInUse`] while a run holds it; an unreadable
/// store as [`BackfillError::Progress`].
pub fn calls_done(path: &Path) -> Result<Option<u64>, BackfillError> {
    use redb::ReadableTableMetadata as _;
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: redb::Error| BackfillError::Progress {
        path: path.to_path_buf(),
        source: Arc::new(e),
    };
    let db = redb::ReadOnlyDatabase::open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => BackfillError::ProgressInUse {
            path: path.to_path_buf(),
        },
        e => err(e.into()),
    })?;
    let tx = db.begin_read().map_err(|e| err(e.into()))?;
    let table = match tx.open_table(SUCCEEDED) {
        Ok(t) => t,
        // A store a stateful fold keeps has no table of calls.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Some(0)),
        Err(e) => return Err(err(e.into())),
    };
    table.len().map(Some).map_err(|e| err(e.into()))
}

/// Makes the folder of the file at `path` (progress store, dead letters)
/// if it is not there yet.
fn make_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => std::fs::create_dir_all(parent),
        None => Ok(()),
    }
}

/// [`make_parent`] for the dead-letter file, made before the first call so
/// that the first failure does not find its folder missing.
fn make_dead_letter_parent(path: &Path) -> Result<(), BackfillError> {
    make_parent(path).map_err(|source| BackfillError::DeadLetter {
        path: path.to_path_buf(),
        source,
    })
}

/// What makes two dead-letter records the same failure: the line of an
/// unreadable item, else the call.
fn identity(record: &Value) -> String {
    match record.get("line") {
        Some(line) => format!("{}:{line}", record["source"]),
        None => record["call_id"].to_string(),
    }
}

impl DeadLetter {
    /// The dead-letter file of a new run; the previous run's file is removed.
    pub(crate) fn new(path: &Path) -> Result<Self, BackfillError> {
        make_dead_letter_parent(path)?;
        let dead = Self {
            path: path.to_path_buf(),
            file: Mutex::new(None),
            earlier: Mutex::new(HashSet::new()),
        };
        dead.restart()?;
        Ok(dead)
    }

    /// The dead-letter file of a run that may resume a fold: the records
    /// already there are kept.
    pub(crate) fn keeping(path: &Path) -> Result<Self, BackfillError> {
        make_dead_letter_parent(path)?;
        let earlier = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .map(|v| identity(&v))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(source) => {
                return Err(BackfillError::DeadLetter {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(None),
            earlier: Mutex::new(earlier),
        })
    }

    /// Failures recorded by earlier runs and kept.
    pub(crate) fn earlier(&self) -> usize {
        self.earlier.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Forgets earlier runs' records (a fold starting from scratch).
    pub(crate) fn restart(&self) -> Result<(), BackfillError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BackfillError::DeadLetter {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.earlier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    /// Appends `record` as one line, opening the file on first use.
    pub(crate) fn write(&self, record: &Value) -> Result<(), BackfillError> {
        let err = |source| BackfillError::DeadLetter {
            path: self.path.clone(),
            source,
        };
        {
            let earlier = self.earlier.lock().unwrap_or_else(|p| p.into_inner());
            if !earlier.is_empty() && earlier.contains(&identity(record)) {
                return Ok(());
            }
        }
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(err)?;
            *guard = Some(f);
        }
        let mut line = record.to_string();
        line.push('\n');
        let file = guard.as_mut().expect("opened above");
        file.write_all(line.as_bytes()).map_err(err)?;
        file.flush().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dry run's count: none without a store, the calls recorded, and
    /// "in use" while a run holds the store.
    #[tokio::test]
    async fn calls_done_are_counted_without_taking_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.redb");
        assert_eq!(calls_done(&path).unwrap(), None);
        let progress = Progress::open(&path, "layout", None).unwrap();
        for id in ["a", "b"] {
            let success = Success {
                call_id: id.into(),
                attempts: 1,
                result: None,
            };
            progress.record(success).await.unwrap();
        }
        let e = calls_done(&path).unwrap_err();
        assert!(matches!(e, BackfillError::ProgressInUse { .. }), "{e}");
        drop(progress);
        assert_eq!(calls_done(&path).unwrap(), Some(2));
    }

    /// Lines of calls the store does not hold (written just before a
    /// crash) and a torn last line are dropped when the file is opened;
    /// later successes append after the lines kept.
    #[tokio::test]
    async fn results_lines_of_unrecorded_calls_are_dropped_on_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("progress.redb");
        let results = dir.path().join("results.jsonl");
        {
            let p = Progress::open(&store, "test", Some(&results)).expect("open");
            for id in ["a#0", "a#10"] {
                p.record(Success {
                    call_id: id.to_owned(),
                    attempts: 1,
                    result: Some(result_line(id, "a", 0, 10, b"{\"n\": 1}")),
                })
                .await
                .expect("record");
            }
        }
        let kept = std::fs::read_to_string(&results).expect("read");
        assert_eq!(kept.lines().count(), 2, "{kept}");
        // A crash after a line was synced but before its success was
        // committed, then another in the middle of a line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(&results)
            .expect("append");
        f.write_all(&result_line("a#20", "a", 20, 10, b"not json"))
            .expect("write");
        f.write_all(b"{\"call_id\": \"a#30\", \"sou")
            .expect("write");
        drop(f);

        let p = Progress::open(&store, "test", Some(&results)).expect("reopen");
        assert_eq!(std::fs::read_to_string(&results).expect("read"), kept);
        p.record(Success {
            call_id: "a#20".to_owned(),
            attempts: 2,
            result: Some(result_line("a#20", "a", 20, 10, b"not json")),
        })
        .await
        .expect("record");
        drop(p);
        let text = std::fs::read_to_string(&results).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let ids: Vec<&str> = lines.iter().filter_map(|l| l["call_id"].as_str()).collect();
        assert_eq!(ids, ["a#0", "a#10", "a#20"]);
        assert_eq!(lines[0]["response"], serde_json::json!({ "n": 1 }));
        // A response that is not JSON is kept as its text.
        assert_eq!(lines[2]["response"], "not json");
        assert_eq!(lines[2]["first_item"], 20);
    }
}
