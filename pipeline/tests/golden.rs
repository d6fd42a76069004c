//! Golden error tests: every `tests/golden/NAME.toml` must fail to parse with
//! exactly the one-line message in `tests/golden/NAME.err`.
//!
//! Files are parsed with their path relative to the crate folder (where
//! `cargo test` runs) so the messages are stable. `UPDATE_GOLDEN=1 cargo test`
//! rewrites the `.err` files from the current output.

use std::fs;
use std::path::{Path, PathBuf};

use sluice_pipeline::Pipeline;

const GOLDEN_DIR: &str = "tests/golden";

/// Git does not reliably keep execute bits, so set the fixtures' bits here.
#[cfg(unix)]
fn fix_fixture_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &str, mode: u32| {
        let path = Path::new(GOLDEN_DIR).join(path);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    };
    set("fixtures/echo/bootstrap", 0o755);
    set("fixtures/not_executable/bootstrap", 0o644);
    set("fixtures/extension_layer/extensions/watcher", 0o644);
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(GOLDEN_DIR)
        .expect("read tests/golden")
        .map(|entry| entry.expect("read tests/golden entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        // Keep the path relative to the crate folder, as the .err files expect.
        .map(|path| Path::new(GOLDEN_DIR).join(path.file_name().expect("file name")))
        .collect();
    cases.sort();
    cases
}

#[test]
fn golden_errors() {
    #[cfg(unix)]
    fix_fixture_permissions();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v != "0" && !v.is_empty());
    let cases = cases();
    assert!(cases.len() >= 12, "golden cases missing: {cases:?}");

    let mut failures = Vec::new();
    for toml_path in &cases {
        let err_path = toml_path.with_extension("err");
        let actual = match Pipeline::load(toml_path) {
            Ok(pipeline) => {
                failures.push(format!(
                    "{}: parsed without error: {pipeline:?}",
                    toml_path.display()
                ));
                continue;
            }
            Err(e) => e.to_string(),
        };
        assert!(!actual.contains('\n'), "multi-line error: {actual}");
        if update {
            fs::write(&err_path, format!("{actual}\n")).expect("write .err");
            continue;
        }
        match fs::read_to_string(&err_path) {
            Ok(expected) if expected.trim_end_matches('\n') == actual => {}
            Ok(expected) => failures.push(format!(
                "{}:\n  expected: {}\n  actual:   {actual}",
                toml_path.display(),
                expected.trim_end_matches('\n')
            )),
            Err(e) => failures.push(format!(
                "{}: {e}; run with UPDATE_GOLDEN=1 to create it\n  actual: {actual}",
                err_path.display()
            )),
        }
    }

    // Every .err file must belong to a case.
    for entry in fs::read_dir(GOLDEN_DIR).expect("read tests/golden") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "err") && !path.with_extension("toml").exists()
        {
            failures.push(format!("{}: no matching .toml", path.display()));
        }
    }

    assert!(
        failures.is_empty(),
        "{} golden case(s) failed (UPDATE_GOLDEN=1 rewrites the .err files):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
