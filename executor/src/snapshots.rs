//! The function snapshot cache of the microVM backend.
//!
//! A function's first cold start boots its VM, waits until the agent
//! reports `Ready` (the function's `bootstrap` waits at
//! `/invocation/next`), and saves the VM ([`sluice_vmm::Vm::snapshot`])
//! here; later cold starts restore clones of it instead of booting.
//!
//! ```text
//!  <sluice home>/snapshots/
//!     <function>-<hash>/          one entry: vm.state + vm.mem
//!     .tmp-<function>-<hash>-<pid>-<n>/   an entry being written
//! ```
//!
//! `<hash>` ([`SnapshotKey`]) covers everything a clone depends on: the
//! function's version ([`crate::FunctionSpec::version`]: settings and
//! folder), the guest image's identity (kernel and initramfs), guest
//! memory size, vCPUs and the VMM's snapshot format version. An entry is
//! written into a temporary directory and renamed into place, so a crash
//! never leaves a half-written entry under a valid name; storing an entry
//! removes the function's entries of other keys (invalidation). An entry
//! that does not load ([`sluice_vmm::Snapshot::load`] checks magic,
//! version, checksum and sizes) is logged, removed and reported as absent:
//! the caller boots afresh and never restores it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sluice_vmm::image::{GuestImage, cache_key};
use sluice_vmm::snapshot::SNAPSHOT_VERSION;
use sluice_vmm::{Snapshot, SnapshotError};

/// Errors storing a snapshot in the cache.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotCacheError {
    /// A file operation on the cache failed (host disk or permissions, not
    /// the function; retrying helps only once the host is fixed).
    #[error("snapshot cache: cannot {op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM could not be snapshotted (see the cause; a sluice or host
    /// problem, not the function's).
    #[error("snapshot cache: cannot snapshot the VM into {path}: {source}")]
    Snapshot {
        /// The temporary entry.
        path: PathBuf,
        /// Cause.
        #[source]
        source: SnapshotError,
    },
}

impl SnapshotCacheError {
    /// Who is at fault: the host or sluice, never the function.
    pub fn fault(&self) -> crate::Fault {
        match self {
            SnapshotCacheError::Io { .. } => crate::Fault::External,
            SnapshotCacheError::Snapshot { .. } => crate::Fault::Internal,
        }
    }

    /// Whether trying again can help (a later cold start tries again).
    pub fn retryable(&self) -> bool {
        true
    }
}

/// Which snapshot a function's sandbox may be restored from: the
/// function's name and a hash of everything the snapshot depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotKey {
    function: String,
    hash: String,
}

impl SnapshotKey {
    /// The key of `function` at `function_version` on the guest `guest`
    /// (see [`image_identity`]) with `mem_size` bytes of RAM and `vcpus`
    /// vCPUs, for this build's snapshot format ([`SNAPSHOT_VERSION`]).
    pub fn new(
        function: &str,
        function_version: &str,
        guest: &str,
        mem_size: u64,
        vcpus: u8,
    ) -> Self {
        let hash = cache_key(&[
            function.as_bytes(),
            function_version.as_bytes(),
            guest.as_bytes(),
            &mem_size.to_le_bytes(),
            &[vcpus],
            &SNAPSHOT_VERSION.to_le_bytes(),
        ]);
        Self {
            function: function.to_owned(),
            hash,
        }
    }

    /// The function.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The entry's directory name: `<function>-<hash>` (characters other
    /// than ASCII letters, digits, `_` and `.` in the name become `_`).
    pub fn dir_name(&self) -> String {
        format!("{}-{}", entry_prefix(&self.function), self.hash)
    }
}

fn entry_prefix(function: &str) -> String {
    function
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether the directory `name` is an entry (or a temporary entry) of the
/// function whose prefix is `prefix`.
fn belongs_to(name: &str, prefix: &str) -> bool {
    let name = name.strip_prefix(".tmp-").unwrap_or(name);
    // `<prefix>-<16 hex>`, then for temporary entries `-<pid>-<n>`.
    let Some(rest) = name.strip_prefix(prefix) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('-') else {
        return false;
    };
    let hash = rest.split('-').next().unwrap_or("");
    hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The identity of a guest image for [`SnapshotKey`]: the kernel's and
/// initramfs's paths (image directories are named by a hash of their
/// contents), sizes and modification times.
pub fn image_identity(image: &GuestImage) -> String {
    let file = |p: &Path| {
        let meta = std::fs::metadata(p).ok();
        let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{}:{len}:{mtime}", p.display())
    };
    format!("{}|{}", file(&image.kernel), file(&image.initramfs))
}

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Function snapshots on disk (see the module docs).
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    root: PathBuf,
}

impl SnapshotCache {
    /// A cache in `root` (normally `<sluice home>/snapshots`); created on
    /// the first store.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the entry of `key` lives (whether or not it exists).
    pub fn entry_dir(&self, key: &SnapshotKey) -> PathBuf {
        self.root.join(key.dir_name())
    }

    /// The snapshot of `key`, loaded and checked, or `None` if there is
    /// none. An entry that does not load is logged, removed and reported
    /// as absent.
    pub fn lookup(&self, key: &SnapshotKey) -> Option<Arc<Snapshot>> {
        let dir = self.entry_dir(key);
        if !dir.is_dir() {
            return None;
        }
        match Snapshot::load(&dir) {
            Ok(s) => Some(Arc::new(s)),
            Err(error) => {
                tracing::warn!(function = %key.function, dir = %dir.display(), %error,
                    "function snapshot does not load; removing it and booting afresh");
                self.remove(key);
                None
            }
        }
    }

    /// Removes the entry of `key` (e.g. one whose clones do not come up);
    /// failures are logged.
    pub fn remove(&self, key: &SnapshotKey) {
        remove_dir(&self.entry_dir(key));
    }

    /// Stores a snapshot for `key`: `write` writes it into a temporary
    /// directory, which is then renamed to the entry's name, and the
    /// function's entries of other keys are removed. If another entry of
    /// `key` appeared meanwhile (a concurrent cold start), it is kept and
    /// ours dropped. Returns the entry's directory.
    pub fn store<F>(&self, key: &SnapshotKey, write: F) -> Result<PathBuf, SnapshotCacheError>
    where
        F: FnOnce(&Path) -> Result<(), SnapshotError>,
    {
        std::fs::create_dir_all(&self.root).map_err(|source| SnapshotCacheError::Io {
            op: "create",
            path: self.root.clone(),
            source,
        })?;
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(format!(
            ".tmp-{}-{}-{n}",
            key.dir_name(),
            std::process::id()
        ));
        remove_dir(&tmp);
        if let Err(source) = write(&tmp) {
            remove_dir(&tmp);
            return Err(SnapshotCacheError::Snapshot { path: tmp, source });
        }
        let dir = self.entry_dir(key);
        if let Err(source) = std::fs::rename(&tmp, &dir) {
            remove_dir(&tmp);
            if !dir.is_dir() {
                return Err(SnapshotCacheError::Io {
                    op: "rename into place",
                    path: dir,
                    source,
                });
            }
        }
        self.invalidate_others(key);
        tracing::info!(function = %key.function, dir = %dir.display(), "function snapshot stored");
        Ok(dir)
    }

    /// Removes every entry of `key`'s function except `key`'s own (and
    /// temporary entries this process may still be writing).
    fn invalidate_others(&self, key: &SnapshotKey) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        let prefix = entry_prefix(&key.function);
        let keep = key.dir_name();
        let ours = format!("-{}-", std::process::id());
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == keep || !belongs_to(&name, &prefix) {
                continue;
            }
            if name.starts_with(".tmp-") && name.contains(&ours) {
                continue;
            }
            tracing::info!(function = %key.function, entry = %name, "removing an outdated function snapshot");
            remove_dir(&e.path());
        }
    }
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot remove a function snapshot")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(function: &str, version: &str) -> SnapshotKey {
        SnapshotKey::new(function, version, "guest", 16 << 20, 1)
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = SnapshotKey::new("f", "v1", "g", 16 << 20, 1);
        for other in [
            SnapshotKey::new("f", "v2", "g", 16 << 20, 1),
            SnapshotKey::new("f", "v1", "h", 16 << 20, 1),
            SnapshotKey::new("f", "v1", "g", 32 << 20, 1),
            SnapshotKey::new("f", "v1", "g", 16 << 20, 2),
        ] {
            assert_ne!(base.dir_name(), other.dir_name());
        }
        assert_eq!(base, SnapshotKey::new("f", "v1", "g", 16 << 20, 1));
        assert!(base.dir_name().starts_with("f-"));
    }

    #[test]
    fn entries_belong_to_their_function_only() {
        let a = key("a", "v").dir_name();
        let ab = key("a-b", "v").dir_name();
        assert!(belongs_to(&a, "a"));
        assert!(!belongs_to(&ab, "a"), "{ab} is not a's");
        assert!(belongs_to(&ab, &entry_prefix("a-b")));
        let a_b = key("a_b", "v").dir_name();
        assert!(!belongs_to(&a_b, "a"), "{a_b} is not a's");
        assert!(belongs_to(&format!(".tmp-{a}-12-0"), "a"));
        assert!(!belongs_to("a-notahash", "a"));
        assert_eq!(entry_prefix("we/ird name"), "we_ird_name");
    }

    fn fake_write(dir: &Path) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("vm.state"), b"x").unwrap();
        Ok(())
    }

    #[test]
    fn a_store_replaces_the_functions_older_entries_and_leaves_others() {
        let root = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(root.path().join("snapshots"));
        let (old, new, other) = (key("f", "1"), key("f", "2"), key("f-g", "1"));
        cache.store(&old, fake_write).unwrap();
        cache.store(&other, fake_write).unwrap();
        assert!(cache.entry_dir(&old).join("vm.state").is_file());
        // A crashed writer's leftovers of another process.
        let stale = cache.root().join(format!(".tmp-{}-1-0", old.dir_name()));
        std::fs::create_dir_all(&stale).unwrap();
        let dir = cache.store(&new, fake_write).unwrap();
        assert_eq!(dir, cache.entry_dir(&new));
        assert!(!cache.entry_dir(&old).exists(), "invalidated");
        assert!(!stale.exists(), "stale temporary entry removed");
        assert!(cache.entry_dir(&other).exists(), "another function's entry");
        let names: Vec<_> = std::fs::read_dir(cache.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_failed_write_leaves_nothing_that_looks_like_an_entry() {
        let root = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(root.path());
        let k = key("f", "1");
        let err = cache
            .store(&k, |dir| {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(dir.join("vm.mem"), b"half").unwrap();
                Err(SnapshotError::NotRunning { why: "test".into() })
            })
            .unwrap_err();
        assert!(matches!(err, SnapshotCacheError::Snapshot { .. }), "{err}");
        assert!(err.retryable());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        assert!(cache.lookup(&k).is_none());
    }

    #[test]
    fn an_entry_that_does_not_load_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(root.path());
        let k = key("f", "1");
        cache.store(&k, fake_write).unwrap();
        assert!(cache.lookup(&k).is_none(), "garbage is not a snapshot");
        assert!(!cache.entry_dir(&k).exists(), "and is removed");
    }
}
