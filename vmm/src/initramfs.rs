//! A cpio "newc" archive writer (the format Linux unpacks as initramfs)
//! and the sluice guest initramfs: the static agent as `/init` plus the
//! few directories and device nodes it needs before it mounts anything.
//!
//! Output is deterministic (inode numbers in order, mtime 0, uid/gid 0), so
//! an image can be cached by the hash of its inputs.

use std::io::{self, Write};
use std::path::Path;

/// newc magic.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the last entry.
pub const TRAILER: &str = "TRAILER!!!";
/// File type bits of `mode`.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;

/// Errors writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The output failed.
    #[error("cannot write the cpio archive: {0}")]
    Io(#[from] io::Error),
    /// A path is empty, absolute, contains NUL or `..`.
    #[error("invalid archive path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// A file is larger than newc's 32-bit size field.
    #[error("{path} is {size} bytes; newc entries are limited to 4 GiB")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Reading an input file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// One entry's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

/// Writes a newc archive entry by entry; call [`CpioWriter::finish`].
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = |reason| {
        Err(CpioError::InvalidPath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.starts_with('/') {
        return bad("must be relative to the archive root");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path
        .split('/')
        .any(|c| c == ".." || c == "." || c.is_empty())
    {
        return bad("contains '.', '..' or an empty component");
    }
    Ok(())
}

impl<W: Write> CpioWriter<W> {
    /// A writer on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, h: Header, data: &[u8]) -> Result<(), CpioError> {
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino,
            h.mode,
            0,
            0,
            h.nlink,
            0,
            h.filesize,
            0,
            0,
            h.rdev_major,
            h.rdev_minor,
            namesize,
            0,
        ];
        let mut header = Vec::with_capacity(110);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.put(&header)?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        let pad = pad4(self.written);
        self.put(&[0u8; 3][..pad])?;
        self.put(data)?;
        let pad = pad4(self.written);
        self.put(&[0u8; 3][..pad])?;
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        check_path(path)?;
        let h = Header {
            mode: S_IFDIR | (perm & 0o7777),
            nlink: 2,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(path, h, &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        check_path(path)?;
        let filesize = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            path: path.to_owned(),
            size: data.len() as u64,
        })?;
        let h = Header {
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            filesize,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(path, h, data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        check_path(path)?;
        let h = Header {
            mode: S_IFLNK | 0o777,
            nlink: 1,
            filesize: target.len() as u32,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(path, h, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_path(path)?;
        let h = Header {
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            filesize: 0,
            rdev_major: major,
            rdev_minor: minor,
        };
        self.entry(path, h, &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let h = Header {
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(TRAILER, h, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The guest's `/etc/hosts`: the loopback names, and `sandbox.localdomain`,
/// where Lambda extensions listen for telemetry.
pub const GUEST_HOSTS: &[u8] = b"127.0.0.1 localhost sandbox.localdomain sandbox\n::1 localhost\n";

/// The sluice guest initramfs: `/init` is `init` (the static agent),
/// with `/dev/console`, `/dev/null`, `/dev/hvc0`, `/etc/hosts`
/// ([`GUEST_HOSTS`]) and the mount points the agent uses; `extra` files are
/// added as `(path, mode, bytes)`.
pub fn guest_initramfs(init: &[u8], extra: &[(&str, u32, &[u8])]) -> Result<Vec<u8>, CpioError> {
    let mut w = CpioWriter::new(Vec::with_capacity(init.len() + 4096));
    for d in ["dev", "proc", "sys", "tmp", "run", "mnt", "etc"] {
        w.dir(d, 0o755)?;
    }
    w.file("etc/hosts", 0o644, GUEST_HOSTS)?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.char_device("dev/hvc0", 0o600, 229, 0)?;
    w.file("init", 0o755, init)?;
    for (path, mode, data) in extra {
        w.file(path, *mode, data)?;
    }
    w.finish()
}

/// [`guest_initramfs`] with `/init` read from `agent`.
pub fn guest_initramfs_from(agent: &Path) -> Result<Vec<u8>, CpioError> {
    let init = std::fs::read(agent).map_err(|source| CpioError::Read {
        path: agent.display().to_string(),
        source,
    })?;
    guest_initramfs(&init, &[])
}

/// Where a function's folder goes inside the guest (`LAMBDA_TASK_ROOT`).
pub const GUEST_TASK_ROOT: &str = "var/task";
/// Where a function's layers are unpacked in the guest (`/opt`), relative to
/// the initramfs root.
pub const GUEST_LAYERS_ROOT: &str = "opt";

/// A newc archive of the folder `dir` under `prefix` (directories, regular
/// files with their permission bits, symbolic links; other file types are
/// refused), in sorted order so equal folders give equal bytes. Appended
/// to the guest initramfs (Linux unpacks concatenated archives), it puts a
/// function's code at `/var/task` for the agent.
pub fn folder_archive(dir: &Path, prefix: &str) -> Result<Vec<u8>, CpioError> {
    use std::os::unix::fs::PermissionsExt;
    fn walk<W: Write>(w: &mut CpioWriter<W>, dir: &Path, at: &str) -> Result<(), CpioError> {
        let read = |path: &Path| {
            let path = path.display().to_string();
            move |source| CpioError::Read { path, source }
        };
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(read(dir))?
            .collect::<Result<_, _>>()
            .map_err(read(dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let inner = format!("{at}/{name}");
            let meta = std::fs::symlink_metadata(&path).map_err(read(&path))?;
            let perm = meta.permissions().mode();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(read(&path))?;
                w.symlink(&inner, &target.to_string_lossy())?;
            } else if meta.is_dir() {
                w.dir(&inner, perm)?;
                walk(w, &path, &inner)?;
            } else if meta.is_file() {
                let data = std::fs::read(&path).map_err(read(&path))?;
                w.file(&inner, perm, &data)?;
            } else {
                return Err(CpioError::InvalidPath {
                    path: path.display().to_string(),
                    reason: "not a file, folder or symbolic link",
                });
            }
        }
        Ok(())
    }
    let mut w = CpioWriter::new(Vec::new());
    let mut at = String::new();
    for part in prefix.split('/') {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        w.dir(&at, 0o755)?;
    }
    walk(&mut w, dir, prefix)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A parsed entry: name, mode, rdev, data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// A strict newc reader: checks magic, alignment, NUL-terminated names
    /// and that the archive ends right after the trailer.
    fn parse(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            let off = total - b.len();
            assert_eq!(off % 4, 0, "entry at unaligned offset {off}");
            assert_eq!(&b[..6], NEWC_MAGIC);
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, filesize, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + namesize as usize;
            assert_eq!(b[name_end - 1], 0, "name not NUL-terminated");
            let name = String::from_utf8(b[110..name_end - 1].to_vec()).unwrap();
            let data_start = name_end + pad4((off + name_end) as u64);
            let data_end = data_start + filesize as usize;
            let data = b[data_start..data_end].to_vec();
            let next = data_end + pad4((off + data_end) as u64);
            b = &b[next..];
            if name == TRAILER {
                assert!(b.is_empty(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn guest_image_has_init_and_device_nodes() {
        let img =
            guest_initramfs(b"\x7fELF-agent", &[("etc/sluice.toml", 0o644, b"x = 1\n")]).unwrap();
        let entries = parse(&img);
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.1, S_IFREG | 0o755);
        assert_eq!(init.3, b"\x7fELF-agent");
        let console = entries.iter().find(|e| e.0 == "dev/console").unwrap();
        assert_eq!((console.1, console.2), (S_IFCHR | 0o600, (5, 1)));
        assert!(
            entries
                .iter()
                .any(|e| e.0 == "proc" && e.1 == S_IFDIR | 0o755)
        );
        assert_eq!(entries.last().unwrap().3, b"x = 1\n");
        let hosts = entries.iter().find(|e| e.0 == "etc/hosts").unwrap();
        assert_eq!(hosts.1, S_IFREG | 0o644);
        assert!(
            String::from_utf8_lossy(&hosts.3).contains("127.0.0.1 localhost sandbox.localdomain")
        );
        // Deterministic.
        assert_eq!(
            img,
            guest_initramfs(b"\x7fELF-agent", &[("etc/sluice.toml", 0o644, b"x = 1\n")]).unwrap()
        );
    }

    #[test]
    fn known_bytes_of_a_single_file_entry() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let img = w.finish().unwrap();
        let expected_header = "070701\
            00000001000081a4000000000000000000000001000000000000000300000000\
            00000000000000000000000000000002\
            00000000";
        assert_eq!(&img[..110], expected_header.as_bytes());
        // name "a\0" ends at 112: aligned; data "xyz" + 1 pad byte.
        assert_eq!(&img[110..116], b"a\0xyz\0");
        assert_eq!(img.len() % 4, 0);
    }

    #[test]
    fn symlinks_store_their_target() {
        let mut w = CpioWriter::new(Vec::new());
        w.symlink("bin/sh", "busybox").unwrap();
        let e = parse(&w.finish().unwrap());
        assert_eq!(e[0].1, S_IFLNK | 0o777);
        assert_eq!(e[0].3, b"busybox");
    }

    #[test]
    fn rejects_bad_paths() {
        let mut w = CpioWriter::new(Vec::new());
        for p in ["", "/init", "a/../b", "a/./b", "a//b", "nul\0"] {
            assert!(
                matches!(w.file(p, 0o644, b""), Err(CpioError::InvalidPath { .. })),
                "{p:?}"
            );
        }
    }

    #[test]
    fn missing_agent_is_a_clear_error() {
        let err = guest_initramfs_from(Path::new("/nonexistent/sluice-agent")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/sluice-agent"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_files_round_trip(files in proptest::collection::vec(
            ("[a-z]{1,12}(/[a-z0-9][a-z0-9._-]{0,11}){0,3}", 0u32..0o7777, proptest::collection::vec(any::<u8>(), 0..300)),
            0..12,
        )) {
            let mut w = CpioWriter::new(Vec::new());
            for (p, mode, data) in &files {
                w.file(p, *mode, data).unwrap();
            }
            let img = w.finish().unwrap();
            prop_assert_eq!(img.len() % 4, 0);
            let parsed = parse(&img);
            prop_assert_eq!(parsed.len(), files.len());
            for ((name, mode, _, data), (p, m, d)) in parsed.iter().zip(&files) {
                prop_assert_eq!(name, p);
                prop_assert_eq!(*mode, S_IFREG | m);
                prop_assert_eq!(data, d);
            }
        }
    }

    #[test]
    fn a_function_folder_lands_under_var_task() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path();
        std::fs::write(f.join("bootstrap"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(f.join("bootstrap"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::create_dir(f.join("lib")).unwrap();
        std::fs::write(f.join("lib/data.txt"), b"data").unwrap();
        std::os::unix::fs::symlink("lib/data.txt", f.join("link")).unwrap();
        let img = folder_archive(f, GUEST_TASK_ROOT).unwrap();
        let entries = parse(&img);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "var",
                "var/task",
                "var/task/bootstrap",
                "var/task/lib",
                "var/task/lib/data.txt",
                "var/task/link"
            ]
        );
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[2].3, b"#!/bin/sh\n");
        assert_eq!(entries[3].1 & S_IFDIR, S_IFDIR);
        assert_eq!(entries[5].1, S_IFLNK | 0o777);
        assert_eq!(entries[5].3, b"lib/data.txt");
        assert_eq!(img, folder_archive(f, GUEST_TASK_ROOT).unwrap());
        assert!(matches!(
            folder_archive(&f.join("missing"), GUEST_TASK_ROOT),
            Err(CpioError::Read { .. })
        ));
    }
}
