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
    /// (call id, attempts it took).
    commits: GroupCommit<(String, u64)>,
}

impl Progress {
    /// Opens (or creates) the store of a run whose calls are cut as
    /// `layout` says. Call ids name a call's first item only, so a store
    /// written with another layout would skip the wrong items: that is
    /// refused with [`BackfillError::ProgressLayout`].
    pub(crate) fn open(path: &Path, layout: &str) -> Result<Self, BackfillError> {
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
        let commits = GroupCommit::spawn(
            Arc::clone(&db),
            "sluice-progress",
            |tx, group: &[(String, u64)]| {
                let mut table = tx.open_table(SUCCEEDED)?;
                for (call_id, attempts) in group {
                    table.insert(call_id.as_str(), *attempts)?;
                }
                Ok(())
            },
        )
        .map_err(|e| err(redb::StorageError::Io(e).into()))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
            commits,
        })
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

    /// Records a success durably: returns once the transaction holding it
    /// is committed.
    pub(crate) async fn record(&self, call_id: &str, attempts: u64) -> Result<(), BackfillError> {
        self.commits
            .commit((call_id.to_owned(), attempts))
            .await
            .map_err(|source| BackfillError::Progress {
                path: self.path.clone(),
                source,
            })
    }
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
