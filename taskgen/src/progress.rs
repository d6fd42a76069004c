//! The durable progress store (redb: succeeded call ids) and the dead-letter
//! file (JSON lines).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use crate::BackfillError;

/// Call id → attempts it took.
const SUCCEEDED: TableDefinition<&str, u64> = TableDefinition::new("succeeded");
/// `"layout"` → how calls were cut when the store was created.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Which calls already succeeded; each success is committed on its own.
pub(crate) struct Progress {
    db: Database,
    path: PathBuf,
}

impl Progress {
    /// Opens (or creates) the store of a run whose calls are cut as
    /// `layout` says. Call ids name a call's first item only, so a store
    /// written with another layout would skip the wrong items: that is
    /// refused with [`BackfillError::ProgressLayout`].
    pub(crate) fn open(path: &Path, layout: &str) -> Result<Self, BackfillError> {
        let err = |e: redb::Error| BackfillError::Progress {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
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
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> BackfillError {
        BackfillError::Progress {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    pub(crate) fn succeeded(&self, call_id: &str) -> Result<bool, BackfillError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(SUCCEEDED).map_err(|e| self.err(e))?;
        Ok(table.get(call_id).map_err(|e| self.err(e))?.is_some())
    }

    /// Records a success durably (the transaction is committed on return).
    pub(crate) fn record(&self, call_id: &str, attempts: u64) -> Result<(), BackfillError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(SUCCEEDED).map_err(|e| self.err(e))?;
            table.insert(call_id, attempts).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

/// One JSON object per failed call (or unreadable item) of the current run.
///
/// A re-run calls every call that has not succeeded yet, failed ones
/// included, so the file is started afresh by every run: it always lists the
/// failures of the latest run and agrees with that run's summary (never the
/// same failure twice across resumes).
pub(crate) struct DeadLetter {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl DeadLetter {
    /// The dead-letter file of a new run; the previous run's file is removed.
    pub(crate) fn new(path: &Path) -> Result<Self, BackfillError> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BackfillError::DeadLetter {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(None),
        })
    }

    /// Appends `record` as one line, opening the file on first use.
    pub(crate) fn write(&self, record: &Value) -> Result<(), BackfillError> {
        let err = |source| BackfillError::DeadLetter {
            path: self.path.clone(),
            source,
        };
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
