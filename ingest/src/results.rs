//! A JSON-lines file of function responses kept beside a redb progress
//! store (a backfill's or an object-store trigger's `results`).
//!
//! The store's committer appends a group's lines and syncs them *before*
//! it commits the outcomes they belong to, so an outcome counted as done
//! always has its line. The file's length after those lines is committed
//! in the same transaction; opening the file cuts it back to the length
//! last committed, dropping the lines of outcomes that never committed (a
//! crash between the two). So the file holds exactly one line per
//! committed outcome, however often the process is killed, and reopening
//! costs nothing however large the file is.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, TableDefinition, WriteTransaction};

/// `"committed_len"` → the results file's length as last committed.
const RESULTS: TableDefinition<&str, u64> = TableDefinition::new("results");
const COMMITTED_LEN: &str = "committed_len";

/// The results file of one progress store.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
    file: File,
    /// The length once the lines appended so far are committed.
    len: Mutex<u64>,
}

impl ResultsFile {
    /// Opens (or creates) the results file at `path` for the store `db`,
    /// first cutting it back to the length the store last committed. A
    /// store that never committed a length (new, or kept without results
    /// until now) has committed none of the file: it starts empty.
    ///
    /// # Errors
    /// The store or the file cannot be read or written.
    pub fn open(db: &Database, path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let committed = {
            let r = db.begin_read().map_err(std::io::Error::other)?;
            match r.open_table(RESULTS) {
                Ok(t) => t
                    .get(COMMITTED_LEN)
                    .map_err(std::io::Error::other)?
                    .map_or(0, |v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(std::io::Error::other(e)),
            }
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        if len > committed {
            tracing::info!(
                results = %path.display(),
                bytes = len - committed,
                "cutting the results file back to what the progress store committed: \
                 the lines after it belong to outcomes that were not recorded, whose calls run again"
            );
            file.set_len(committed)?;
            file.sync_all()?;
        } else if len < committed {
            tracing::warn!(
                results = %path.display(),
                "the results file is shorter than the progress store recorded ({len} < {committed} \
                 bytes): it was cut or replaced; new lines are appended to it"
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: Mutex::new(len.min(committed)),
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `lines` (whole, newline-terminated JSON lines), syncs them,
    /// and records the new length in `tx`, the transaction that commits
    /// their outcomes. On a write error the file is cut back to its last
    /// length and the error (naming the file) fails the transaction.
    ///
    /// # Errors
    /// Writing or syncing the file, or the store's table.
    pub fn append(&self, tx: &WriteTransaction, lines: &[u8]) -> Result<(), redb::Error> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut len = self.len.lock().unwrap_or_else(|p| p.into_inner());
        let written = (&self.file)
            .write_all(lines)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(*len);
            let e = std::io::Error::new(
                e.kind(),
                format!("results file {}: {e}", self.path.display()),
            );
            return Err(redb::StorageError::Io(e).into());
        }
        *len += lines.len() as u64;
        tx.open_table(RESULTS)?.insert(COMMITTED_LEN, *len)?;
        Ok(())
    }
}

/// One line of a results file: `fields` (an object) with the function's
/// `response` added, as JSON, or as a string if it is not JSON;
/// newline-terminated.
pub fn line(mut fields: serde_json::Map<String, serde_json::Value>, response: &[u8]) -> Vec<u8> {
    let response = serde_json::from_slice::<serde_json::Value>(response).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(response).into_owned())
    });
    fields.insert("response".into(), response);
    let mut line = serde_json::to_vec(&serde_json::Value::Object(fields)).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(db: &Database, results: &ResultsFile, lines: &[u8]) {
        let tx = db.begin_write().unwrap();
        results.append(&tx, lines).unwrap();
        tx.commit().unwrap();
    }

    /// Lines appended but never committed (a crash before the commit), and
    /// a torn line, are cut off when the file is opened again; a store that
    /// never committed a length starts the file afresh.
    #[test]
    fn reopening_cuts_the_file_back_to_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out").join("results.jsonl");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"from\":\"an earlier store\"}\n").unwrap();
        let db = Database::create(dir.path().join("p.redb")).unwrap();
        let results = ResultsFile::open(&db, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        commit(&db, &results, b"{\"a\":1}\n{\"b\":2}\n");
        commit(&db, &results, b"");
        // Written, synced, never committed; then half a line.
        let tx = db.begin_write().unwrap();
        results.append(&tx, b"{\"c\":3}\n").unwrap();
        drop(tx);
        (&results.file).write_all(b"{\"d\":").unwrap();
        drop(results);

        let results = ResultsFile::open(&db, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        commit(&db, &results, b"{\"e\":5}\n");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"a\":1}\n{\"b\":2}\n{\"e\":5}\n"
        );
    }

    #[test]
    fn lines_keep_json_responses_and_quote_others() {
        let mut fields = serde_json::Map::new();
        fields.insert("object".into(), "a.csv".into());
        assert_eq!(
            line(fields.clone(), b"{\"n\": 1}"),
            b"{\"object\":\"a.csv\",\"response\":{\"n\":1}}\n"
        );
        assert_eq!(
            line(fields, b"plain\ntext"),
            b"{\"object\":\"a.csv\",\"response\":\"plain\\ntext\"}\n"
        );
    }
}
