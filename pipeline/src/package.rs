//! Function and layer packages: a folder, or a `.zip` archive as Lambda
//! deploys functions and layers.
//!
//! An archive is checked when the pipeline is loaded, from its listing
//! alone: every name stays inside it, it unpacks to at most
//! [`MAX_UNPACKED_BYTES`], and what its `bootstrap` is. A command that runs
//! the function unpacks it once ([`unpack`]) into a cache folder named by
//! the archive's content, so a changed archive is a new folder (and so a
//! new version of the function), and an unchanged one is not unpacked again.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Most bytes a package may unpack to: Lambda's limit for a function and
/// its layers, unzipped.
pub const MAX_UNPACKED_BYTES: u64 = 250 << 20;

const S_IFMT: u32 = 0o170_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFDIR: u32 = 0o040_000;

/// Whether `path` names an archive (`.zip`) rather than a folder.
pub fn is_archive(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

/// What a package holds at its root under the name `bootstrap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bootstrap {
    /// Nothing.
    Missing,
    /// A regular file, with or without an execute bit.
    File { executable: bool },
    /// Something else (a folder, a link).
    Other,
}

/// Checks an archive from its listing and says what its `bootstrap` is;
/// the error says what is wrong with it.
pub(crate) fn check_archive(path: &Path) -> Result<Bootstrap, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file))
        .map_err(|e| format!("not a zip archive: {e}"))?;
    let mut total = 0u64;
    let mut bootstrap = Bootstrap::Missing;
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| e.to_string())?;
        let Some(name) = entry.enclosed_name() else {
            return Err(format!(
                "entry {:?} would be unpacked outside the package",
                entry.name()
            ));
        };
        total = total.saturating_add(entry.size());
        if total > MAX_UNPACKED_BYTES {
            return Err(format!(
                "it unpacks to more than {} MiB (Lambda's limit)",
                MAX_UNPACKED_BYTES >> 20
            ));
        }
        if name == Path::new("bootstrap") {
            let mode = entry.unix_mode().unwrap_or(0o644);
            bootstrap = if entry.is_dir() || mode & S_IFMT == S_IFLNK {
                Bootstrap::Other
            } else {
                Bootstrap::File {
                    executable: mode & 0o111 != 0,
                }
            };
        }
    }
    Ok(bootstrap)
}

/// What went wrong unpacking a package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The archive is not one this module unpacks (the user's to mend;
    /// unpacking again does not help).
    #[error("{}: {message}", archive.display())]
    Invalid {
        /// The archive.
        archive: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Reading the archive or writing the cache failed (the machine's:
    /// space, permissions; the next run may succeed).
    #[error("{}: {what}: {source}", archive.display())]
    Io {
        /// The archive.
        archive: PathBuf,
        /// What was being done.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// The folder holding what `archive` unpacks to, under `cache`: unpacked
/// now unless an earlier run did. Names that would leave the folder are
/// refused, files keep their permission bits (as Lambda's do: a function's
/// files must be readable by everyone), links are made last so that no
/// entry is written through one, and the folder appears whole or not at
/// all (unpacked beside it, then renamed).
pub fn unpack(archive: &Path, cache: &Path) -> Result<PathBuf, PackageError> {
    let io_err = |what: String| io_error(archive, what);
    let bytes = fs::read(archive).map_err(io_err("reading it".into()))?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    let stem = archive
        .file_stem()
        .map_or_else(|| "package".into(), |s| s.to_string_lossy());
    let dir = cache.join(format!("{stem}-{:016x}", h.finish()));
    if dir.is_dir() {
        return Ok(dir);
    }
    fs::create_dir_all(cache).map_err(io_err(format!("creating {}", cache.display())))?;
    let partial = cache.join(format!(
        ".{stem}.partial-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let unpacked = unpack_into(archive, &bytes, &partial);
    if let Err(e) = unpacked {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    if let Err(e) = fs::rename(&partial, &dir) {
        let _ = fs::remove_dir_all(&partial);
        // Another process unpacked the same archive first.
        if !dir.is_dir() {
            return Err(io_err(format!("renaming it to {}", dir.display()))(e));
        }
    }
    Ok(dir)
}

fn unpack_into(archive: &Path, bytes: &[u8], to: &Path) -> Result<(), PackageError> {
    let invalid = |message: String| PackageError::Invalid {
        archive: archive.to_path_buf(),
        message,
    };
    let io_err = |what: String| io_error(archive, what);
    let mut zip = zip::ZipArchive::new(io::Cursor::new(bytes))
        .map_err(|e| invalid(format!("not a zip archive: {e}")))?;
    make_dir(to).map_err(io_err(format!("creating {}", to.display())))?;
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut left = MAX_UNPACKED_BYTES;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| invalid(e.to_string()))?;
        let Some(name) = entry.enclosed_name() else {
            return Err(invalid(format!(
                "entry {:?} would be unpacked outside the package",
                entry.name()
            )));
        };
        let path = to.join(&name);
        let mode = entry.unix_mode().unwrap_or(0);
        if entry.is_dir() || mode & S_IFMT == S_IFDIR {
            make_dirs(to, &path).map_err(io_err(format!("creating {}", name.display())))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            make_dirs(to, parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        let mut content = Vec::new();
        (&mut entry)
            .take(left + 1)
            .read_to_end(&mut content)
            .map_err(|e| invalid(format!("entry {}: {e}", name.display())))?;
        if content.len() as u64 > left {
            return Err(invalid(format!(
                "it unpacks to more than {} MiB (Lambda's limit)",
                MAX_UNPACKED_BYTES >> 20
            )));
        }
        left -= content.len() as u64;
        if mode & S_IFMT == S_IFLNK {
            let target = String::from_utf8(content)
                .map_err(|_| invalid(format!("link {} is not UTF-8", name.display())))?;
            links.push((path, PathBuf::from(target)));
            continue;
        }
        fs::write(&path, &content).map_err(io_err(format!("writing {}", name.display())))?;
        // Permission bits only (no set-id), as the archive has them; an
        // archive made without Unix modes gets Lambda's usual 0644.
        let bits = if mode == 0 { 0o644 } else { mode & 0o777 };
        fs::set_permissions(&path, fs::Permissions::from_mode(bits))
            .map_err(io_err(format!("setting the mode of {}", name.display())))?;
    }
    for (path, target) in links {
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(&target, &path)
            .map_err(io_err(format!("linking {}", path.display())))?;
    }
    Ok(())
}

/// An I/O failure of `what`, done to `archive`'s package.
fn io_error(archive: &Path, what: String) -> impl FnOnce(io::Error) -> PackageError {
    let archive = archive.to_path_buf();
    move |source| PackageError::Io {
        archive,
        what,
        source,
    }
}

/// `dir` and its missing parents below `root`, each 0755 (the sandbox's
/// user must traverse them).
fn make_dirs(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != root
        && parent.starts_with(root)
    {
        make_dirs(root, parent)?;
    }
    make_dir(dir)
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    /// A zip of `(name, mode, content)` files and `(name, target)` links.
    fn zip(path: &Path, files: &[(&str, u32, &str)], links: &[(&str, &str)]) {
        let mut w = zip::ZipWriter::new(fs::File::create(path).unwrap());
        for (name, mode, content) in files {
            let options = SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(*mode);
            w.start_file(*name, options).unwrap();
            w.write_all(content.as_bytes()).unwrap();
        }
        for (name, target) in links {
            w.add_symlink(*name, *target, SimpleFileOptions::default())
                .unwrap();
        }
        w.finish().unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn an_archive_unpacks_once_by_content_with_its_modes_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("fn.zip");
        zip(
            &archive,
            &[
                ("bootstrap", 0o755, "#!/bin/sh\n"),
                ("lib/helper.py", 0o644, "x = 1\n"),
                ("secret", 0o600, "s"),
            ],
            &[("current", "lib/helper.py")],
        );
        assert_eq!(
            check_archive(&archive),
            Ok(Bootstrap::File { executable: true })
        );
        let cache = tmp.path().join("cache");
        let dir = unpack(&archive, &cache).unwrap();
        assert!(dir.starts_with(&cache));
        assert_eq!(
            fs::read_to_string(dir.join("bootstrap")).unwrap(),
            "#!/bin/sh\n"
        );
        assert_eq!(mode(&dir.join("bootstrap")), 0o755);
        assert_eq!(mode(&dir.join("lib/helper.py")), 0o644);
        assert_eq!(mode(&dir.join("secret")), 0o600);
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&dir.join("lib")), 0o755);
        assert_eq!(
            fs::read_link(dir.join("current")).unwrap(),
            Path::new("lib/helper.py")
        );
        // Unpacked once: a second run finds the folder (and does not
        // write it again).
        fs::write(dir.join("marker"), "kept").unwrap();
        assert_eq!(unpack(&archive, &cache).unwrap(), dir);
        assert!(dir.join("marker").exists());
        // Other content is another folder; nothing half-written is left.
        zip(
            &archive,
            &[("bootstrap", 0o755, "#!/bin/sh\nexit 1\n")],
            &[],
        );
        let other = unpack(&archive, &cache).unwrap();
        assert_ne!(other, dir);
        let names: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("fn-")), "{names:?}");
    }

    #[test]
    fn what_an_archives_bootstrap_is() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("a.zip");
        zip(&archive, &[("bootstrap", 0o644, "")], &[]);
        assert_eq!(
            check_archive(&archive),
            Ok(Bootstrap::File { executable: false })
        );
        zip(&archive, &[("bin/bootstrap", 0o755, "")], &[]);
        assert_eq!(check_archive(&archive), Ok(Bootstrap::Missing));
        zip(&archive, &[], &[("bootstrap", "bin/run")]);
        assert_eq!(check_archive(&archive), Ok(Bootstrap::Other));
    }

    #[test]
    fn names_leaving_the_package_and_other_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let archive = tmp.path().join("evil.zip");
        zip(&archive, &[("../../escaped", 0o644, "x")], &[]);
        let refused = check_archive(&archive).unwrap_err();
        assert!(refused.contains("outside the package"), "{refused}");
        let e = unpack(&archive, &cache).unwrap_err();
        assert!(
            matches!(&e, PackageError::Invalid { message, .. } if message.contains("outside")),
            "{e}"
        );
        assert!(!tmp.path().join("escaped").exists());
        assert!(
            !cache
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("escaped")
                .exists()
        );
        // Nothing partial is left behind.
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);

        let text = tmp.path().join("text.zip");
        fs::write(&text, "not a zip").unwrap();
        assert!(
            check_archive(&text)
                .unwrap_err()
                .starts_with("not a zip archive")
        );
        assert!(matches!(
            unpack(&text, &cache),
            Err(PackageError::Invalid { .. })
        ));
    }
}
