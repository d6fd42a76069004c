//! Helpers for sluice's integration tests.
//!
//! - [`workspace_binary`] (and [`agent_binary`], [`sluice_binary`]): the path
//!   of a binary of this workspace, built on demand with the same profile as
//!   the running test;
//! - [`function_fixture`]: a function folder (`bootstrap` + files) for one of
//!   the example or test functions, in a fresh temporary directory;
//! - [`script_fixture`]: a function folder whose `bootstrap` is a shell script;
//! - [`kafka::TestKafka`]: the Kafka-protocol broker of a test (a mock
//!   cluster, or the external cluster of `SLUICE_TEST_KAFKA`);
//! - [`stores::Remote`]: the S3, Azure or GCS bucket of a test, when
//!   `scripts/test-object-stores.sh` (or the user) names one.
//!
//! Function folders and their temporary parent are mode 0755: sandboxes map
//! their root user to an unprivileged host uid, which must be able to
//! traverse and read them.

mod process;
pub mod stores;
#[cfg(feature = "tpch")]
pub mod tpch;

pub use nix::sys::signal::Signal;
pub use process::{DEADLINE, Lines, Process};

/// `GET /metrics` from a sluice process at `addr` (blocking; HTTP/1.0, so
/// the server closes the connection after the answer).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("asking for /metrics");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reading /metrics");
    out
}

/// The sum of the samples of `metric` in a scrape whose labels include
/// every one of `labels` (`name="value"` pairs).
pub fn metric_sum(scrape: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use tempfile::TempDir;

pub mod kafka;

/// Root of the workspace: the parent of this crate's folder.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives inside the workspace")
}

/// Where the running test binary was built: `(target dir, profile dir name)`.
///
/// Test binaries live in `<target>/<profile>/deps/`; other binaries (an
/// example, a bench harness) directly in `<target>/<profile>/`.
fn build_location() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("cannot find the running test binary");
    let mut dir = exe
        .parent()
        .expect("the test binary has a parent directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("deps/ has a parent directory");
    }
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_else(|| panic!("cannot tell the build profile from {}", exe.display()))
        .to_owned();
    let target_dir = dir
        .parent()
        .unwrap_or_else(|| panic!("cannot tell the target directory from {}", exe.display()))
        .to_path_buf();
    (target_dir, profile)
}

/// Binaries already built by this process, by name.
static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Path of a binary of this workspace, built on demand (once per test
/// process).
///
/// Runs `$CARGO build --workspace --bin <bin> --examples` (`CARGO` defaults
/// to `cargo`) into the target directory of the running test and with its
/// profile: `debug` builds without a flag, `release` with `--release`, any
/// other profile with `--profile <name>`.
///
/// Why `--workspace` and `--examples` (there are no examples): cargo resolves
/// the features of dependencies over the packages it was asked to build, and
/// turns on dev-dependencies' features only when something it builds needs
/// them. `cargo test --workspace` does both, so a plain `-p <package>` build
/// would compile most dependencies a second time with other features (and
/// replace the binary cargo test had built): a few GB of disk and minutes of
/// CPU per run of the test suite. Resolved like this, the build finds the
/// binary `cargo test --workspace` already made and does nothing.
///
/// # Panics
/// If the build fails (the message includes cargo's stderr; no binary of the
/// workspace has that name, for one) or does not produce the binary.
pub fn workspace_binary(bin: &str) -> PathBuf {
    // Held during the build: concurrent tests wait for the first one's build
    // instead of starting their own. A test that panicked while building
    // leaves nothing half-recorded, so a poisoned lock is still usable.
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(bin) {
        return path.clone();
    }

    let (target_dir, profile) = build_location();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = workspace_root().join("Cargo.toml");
    let mut cmd = Command::new(&cargo);
    // Without what cargo set for running this test: build scripts that
    // watch those variables (ring's watches `CARGO_PKG_NAME` and `OUT_DIR`)
    // would run again and rebuild everything above them, twice (here, and
    // in the next plain cargo command).
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_a_crate) {
            cmd.env_remove(&name);
        }
    }
    cmd.args(["build", "--workspace", "--bin", bin, "--examples"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build {bin}: {e}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        panic!(
            "building {bin} failed ({}): {cmd:?}\n--- cargo stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let path = target_dir
        .join(&profile)
        .join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "cargo built {bin} but {} does not exist",
        path.display()
    );
    built.insert(bin.to_owned(), path.clone());
    path
}

/// Whether cargo sets `name` for the crate it runs (a test, a build script)
/// rather than the user for cargo.
fn set_by_cargo_for_a_crate(name: &str) -> bool {
    ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
        .iter()
        .any(|p| name.starts_with(p))
        || matches!(
            name,
            "OUT_DIR"
                | "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// The sandbox agent binary (`sluice-agent`), built on demand.
pub fn agent_binary() -> PathBuf {
    workspace_binary("sluice-agent")
}

/// The `sluice` command-line binary, built on demand.
pub fn sluice_binary() -> PathBuf {
    workspace_binary("sluice")
}

/// A function folder in a temporary directory, removed when this is dropped.
#[derive(Debug)]
pub struct FunctionFixture {
    /// The function folder: holds an executable `bootstrap`.
    pub dir: PathBuf,
    _tmp: TempDir,
}

/// Creates `<fresh temp dir>/<name>/`, both mode 0755.
fn fixture_dir(name: &str) -> FunctionFixture {
    let tmp = tempfile::Builder::new()
        .prefix("sluice-fn-")
        .tempdir()
        .expect("cannot create a temporary directory");
    set_mode(tmp.path(), 0o755);
    let dir = tmp.path().join(name);
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    set_mode(&dir, 0o755);
    FunctionFixture { dir, _tmp: tmp }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {:o} {}: {e}", mode, path.display()));
}

/// Copies `from` to `<dir>/bootstrap`, mode 0755.
fn install_bootstrap(from: &Path, dir: &Path) {
    let to = dir.join("bootstrap");
    fs::copy(from, &to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
    set_mode(&to, 0o755);
}

/// Copies the contents of folder `from` into `to` (recursively); directories
/// are made 0755, files keep their mode plus read access for everyone.
fn copy_tree(from: &Path, to: &Path) {
    let entries =
        fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display()));
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            fs::create_dir(&dst).unwrap_or_else(|e| panic!("cannot create {}: {e}", dst.display()));
            set_mode(&dst, 0o755);
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap_or_else(|e| {
                panic!("cannot copy {} to {}: {e}", src.display(), dst.display())
            });
            let mode = fs::metadata(&dst)
                .unwrap_or_else(|e| panic!("cannot stat {}: {e}", dst.display()))
                .permissions()
                .mode();
            set_mode(&dst, (mode & 0o777) | 0o444);
        }
    }
}

/// A function folder for one of the workspace's functions, in a fresh
/// temporary directory:
/// - `"echo"`, `"fail"`, `"arrow-sum"`, `"wordcount"`, `"tpch-q1"`,
///   `"running-sum"`, `"line-count"`, `"misbehave"`: the built binary (`echo-fn`, `fail-fn`, ...,
///   `tpch-q1-fn`, `misbehave-fn`) copied as `bootstrap`;
/// - `"shell"`, `"python"`, `"node"`: the files of `examples/functions/shell/`,
///   `examples/functions/python/` or `examples/functions/node/` (scripts,
///   nothing to build).
///
/// # Panics
/// On an unknown name, a failed build or a file system error.
pub fn function_fixture(name: &str) -> FunctionFixture {
    let fixture = fixture_dir(name);
    match name {
        "echo" => install_bootstrap(&workspace_binary("echo-fn"), &fixture.dir),
        "fail" => install_bootstrap(&workspace_binary("fail-fn"), &fixture.dir),
        "tpch-q1" => install_bootstrap(&workspace_binary("tpch-q1-fn"), &fixture.dir),
        "wordcount" => install_bootstrap(&workspace_binary("wordcount-fn"), &fixture.dir),
        "arrow-sum" => install_bootstrap(&workspace_binary("arrow-sum-fn"), &fixture.dir),
        "misbehave" => install_bootstrap(&workspace_binary("misbehave-fn"), &fixture.dir),
        "running-sum" => install_bootstrap(&workspace_binary("running-sum-fn"), &fixture.dir),
        "line-count" => install_bootstrap(&workspace_binary("line-count-fn"), &fixture.dir),
        "shell" | "python" | "node" => {
            copy_tree(
                &workspace_root().join("examples/functions").join(name),
                &fixture.dir,
            );
            // The executable bit may be lost by a checkout; the bootstrap must have it.
            set_mode(&fixture.dir.join("bootstrap"), 0o755);
        }
        other => panic!(
            "unknown function fixture {other:?} (known: echo, fail, arrow-sum, wordcount, tpch-q1, running-sum, line-count, misbehave, shell, python, node)"
        ),
    }
    fixture
}

/// A function folder whose `bootstrap` is `script` (mode 0755), with
/// `#!/bin/sh` prepended when the script has no shebang line.
///
/// # Panics
/// On a file system error.
pub fn script_fixture(script: &str) -> FunctionFixture {
    let fixture = fixture_dir("script");
    let contents = if script.starts_with("#!") {
        script.to_owned()
    } else {
        format!("#!/bin/sh\n{script}")
    };
    let path = fixture.dir.join("bootstrap");
    fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    set_mode(&path, 0o755);
    fixture
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn echo_fixture_has_an_executable_bootstrap() {
        let f = function_fixture("echo");
        let bootstrap = f.dir.join("bootstrap");
        assert!(bootstrap.is_file(), "{} is missing", bootstrap.display());
        assert_eq!(mode(&bootstrap), 0o755);
        assert_eq!(mode(&f.dir), 0o755);
        assert_eq!(mode(f.dir.parent().unwrap()), 0o755);
        // Built once per process: a second fixture reuses the same binary.
        let again = function_fixture("echo");
        assert_ne!(again.dir, f.dir);
        assert_eq!(
            fs::read(&bootstrap).unwrap(),
            fs::read(again.dir.join("bootstrap")).unwrap()
        );
    }

    #[test]
    fn shell_fixture_copies_the_example() {
        let f = function_fixture("shell");
        assert_eq!(mode(&f.dir.join("bootstrap")), 0o755);
        let text = fs::read_to_string(f.dir.join("bootstrap")).unwrap();
        assert!(text.starts_with("#!"), "bootstrap has no shebang");
    }

    #[test]
    fn script_fixture_adds_a_shebang_only_when_missing() {
        let f = script_fixture("echo hi\n");
        let bootstrap = f.dir.join("bootstrap");
        assert_eq!(
            fs::read_to_string(&bootstrap).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode(&bootstrap), 0o755);
        assert_eq!(mode(&f.dir), 0o755);

        let f = script_fixture("#!/bin/bash\necho hi\n");
        assert_eq!(
            fs::read_to_string(f.dir.join("bootstrap")).unwrap(),
            "#!/bin/bash\necho hi\n"
        );
    }

    #[test]
    fn only_what_cargo_sets_for_a_crate_is_left_out_of_a_build() {
        for name in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "CARGO_BIN_EXE_sluice",
            "OUT_DIR",
            "CARGO_TARGET_TMPDIR",
        ] {
            assert!(set_by_cargo_for_a_crate(name), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_INCREMENTAL",
            "CARGO_PROFILE_DEV_DEBUG",
            "CC",
            "PATH",
        ] {
            assert!(!set_by_cargo_for_a_crate(name), "{name}");
        }
    }

    #[test]
    #[should_panic(expected = "building no-such-bin failed")]
    fn a_failed_build_panics_with_cargo_stderr() {
        workspace_binary("no-such-bin");
    }

    #[test]
    fn fixture_is_removed_on_drop() {
        let f = script_fixture("true");
        let parent = f.dir.parent().unwrap().to_path_buf();
        drop(f);
        assert!(!parent.exists());
    }
}
