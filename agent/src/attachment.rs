//! Invocation attachments: a columnar payload the host sends beside an
//! event ([`Message::Attachment`](sluice_protocol::Message::Attachment)),
//! staged as a read-only file at [`ATTACHMENT_PATH`] for the function to
//! read, and removed once the invocation has answered (so an idle sandbox
//! holds no payload) or when the next invocation comes without one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_protocol::ATTACHMENT_PATH;

/// The staged file of the current invocation, shared by the channel reader
/// (which writes it) and the result sink (which removes it).
#[derive(Debug, Clone)]
pub struct Stage {
    path: PathBuf,
    present: Arc<AtomicBool>,
}

impl Default for Stage {
    fn default() -> Self {
        Self::at(Path::new(ATTACHMENT_PATH))
    }
}

impl Stage {
    /// A stage whose file is `path`.
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            present: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Write `data` as the file (a new inode, mode 0444: a function still
    /// holding the previous one keeps its old contents).
    pub fn put(&self, data: &[u8]) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("partial");
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&tmp)?;
        f.write_all(data)?;
        drop(f);
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
        fs::rename(&tmp, &self.path)?;
        self.present.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Remove the file, if one is staged.
    pub fn clear(&self) {
        if self.present.swap(false, Ordering::SeqCst) {
            let _ = fs::remove_file(&self.path);
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_replaces_and_clear_removes() {
        let dir = tempfile::tempdir().unwrap();
        let stage = Stage::at(&dir.path().join("run/sluice/payload"));
        stage.put(b"first").unwrap();
        let held = fs::File::open(stage.path()).unwrap();
        stage.put(b"second").unwrap();
        assert_eq!(fs::read(stage.path()).unwrap(), b"second");
        // The old inode keeps what the function was reading.
        assert_eq!(io::read_to_string(held).unwrap(), "first");
        let mode = fs::metadata(stage.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        stage.clear();
        assert!(!stage.path().exists());
        stage.clear();
    }
}
