//! Loading valid pipeline files, and the errors that have no golden file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_pipeline::{Backend, Pipeline, PipelineError};

/// Makes `dir/rel` a function folder with an executable `bootstrap`.
fn make_function(dir: &Path, rel: &str) -> PathBuf {
    let folder = dir.join(rel);
    fs::create_dir_all(&folder).expect("create function folder");
    let bootstrap = folder.join("bootstrap");
    fs::write(&bootstrap, "#!/bin/sh\nexit 0\n").expect("write bootstrap");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&bootstrap, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    folder.canonicalize().expect("canonicalize")
}

fn write_pipeline(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("pipeline.toml");
    fs::write(&file, text).expect("write pipeline.toml");
    file
}

#[test]
fn defaults_are_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = make_function(dir.path(), "functions/echo");
    let file = write_pipeline(dir.path(), "[functions.echo]\npath = \"functions/echo\"\n");

    let pipeline = Pipeline::load(&file).expect("load");
    assert_eq!(pipeline.file, file);
    assert_eq!(pipeline.functions.len(), 1);
    let echo = pipeline.function("echo").expect("echo");
    assert_eq!(echo.name, "echo");
    assert_eq!(echo.path, folder);
    assert_eq!(echo.memory_mb, 128);
    assert_eq!(echo.timeout, Duration::from_secs(3));
    assert_eq!(echo.init_timeout, Duration::from_secs(10));
    assert_eq!(echo.concurrency, 4);
    assert_eq!(echo.max_queue, 64);
    assert_eq!(echo.idle_timeout, Duration::from_secs(300));
    assert!(echo.env.is_empty());
    assert_eq!(echo.tenant, "default");
    assert_eq!(echo.backend, Backend::Auto);
    assert_eq!(echo.handler, "bootstrap");
    assert_eq!(echo.max_processes, 1024);
    assert_eq!(echo.tmp_mb, 512);
}

#[test]
fn every_field_is_parsed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = make_function(dir.path(), "fns/echo");
    let file = write_pipeline(
        dir.path(),
        r#"
[functions.echo]
path = "fns/echo"
memory_mb = 10240
timeout = "500ms"
init_timeout = "15m"
concurrency = 1000
max_queue = 0
idle_timeout = "1h 30m"
env = { GREETING = "hi", _private = "", LANG = "C.UTF-8" }
tenant = "team-a_1"
backend = "process"
handler = "main.handler"
max_processes = 65536
tmp_mb = 1

[functions.other-fn_2]
path = "fns/echo"
"#,
    );

    let pipeline = Pipeline::load(&file).expect("load");
    let echo = pipeline.function("echo").expect("echo");
    assert_eq!(echo.path, folder);
    assert_eq!(echo.memory_mb, 10240);
    assert_eq!(echo.timeout, Duration::from_millis(500));
    assert_eq!(echo.init_timeout, Duration::from_secs(900));
    assert_eq!(echo.concurrency, 1000);
    assert_eq!(echo.max_queue, 0);
    assert_eq!(echo.idle_timeout, Duration::from_secs(5400));
    let env: Vec<(&str, &str)> = echo
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        [("GREETING", "hi"), ("LANG", "C.UTF-8"), ("_private", "")]
    );
    assert_eq!(echo.tenant, "team-a_1");
    assert_eq!(echo.backend, Backend::Process);
    assert_eq!(echo.handler, "main.handler");
    assert_eq!(echo.max_processes, 65536);
    assert_eq!(echo.tmp_mb, 1);
    assert_eq!(
        pipeline.functions.keys().collect::<Vec<_>>(),
        ["echo", "other-fn_2"]
    );
}

#[test]
fn relative_paths_resolve_against_the_pipeline_folder() {
    // A relative pipeline path: function paths resolve against its folder,
    // not against the current folder.
    let pipeline = Pipeline::parse(
        "[functions.echo]\npath = \"fixtures/echo\"\n",
        Path::new("tests/golden/inline.toml"),
    )
    .expect("parse");
    let expected = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/fixtures/echo")
        .canonicalize()
        .expect("canonicalize");
    let echo = pipeline.function("echo").expect("echo");
    assert!(echo.path.is_absolute());
    assert_eq!(echo.path, expected);
}

#[test]
fn absolute_paths_are_kept_and_canonicalized() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = make_function(dir.path(), "a/echo");
    let written = dir.path().join("a/../a/echo");
    let text = format!(
        "[functions.echo]\npath = {:?}\n",
        written.display().to_string()
    );
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let pipeline = Pipeline::parse(&text, &elsewhere.path().join("p.toml")).expect("parse");
    assert_eq!(pipeline.function("echo").expect("echo").path, folder);
}

#[test]
fn inline_and_dotted_forms_are_equivalent() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_function(dir.path(), "echo");
    let file = dir.path().join("p.toml");
    let header = Pipeline::parse(
        "[functions.echo]\npath = \"echo\"\ntimeout = \"1s\"\n",
        &file,
    )
    .expect("header form");
    let inline = Pipeline::parse(
        "functions = { echo = { path = \"echo\", timeout = \"1s\" } }\n",
        &file,
    )
    .expect("inline form");
    assert_eq!(header, inline);
}

#[test]
fn unknown_function_lists_declared_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_function(dir.path(), "f");
    let file = dir.path().join("p.toml");
    let pipeline = Pipeline::parse(
        "[functions.b]\npath = \"f\"\n[functions.a]\npath = \"f\"\n",
        &file,
    )
    .expect("parse");
    let err = pipeline.function("c").expect_err("no c");
    assert!(matches!(err, PipelineError::UnknownFunction { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no function named \"c\"; declared functions: a, b",
            file.display()
        )
    );
}

#[test]
fn missing_file_names_file_and_os_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("absent.toml");
    let err = Pipeline::load(&file).expect_err("missing file");
    assert!(matches!(err, PipelineError::Read { .. }));
    assert!(err.location().is_none());
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read pipeline file: ", file.display())),
        "{message}"
    );
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn first_error_in_file_order_is_reported() {
    // `b` sorts before `z` but comes second in the file.
    let err = Pipeline::parse(
        "[functions.z]\nmemory_mb = 1\npath = \"x\"\n[functions.b]\nmemory_mb = 2\npath = \"x\"\n",
        Path::new("p.toml"),
    )
    .expect_err("bad memory");
    assert_eq!(
        err.to_string(),
        "p.toml:2:13: `functions.z.memory_mb` = 1 is out of range: expected 128..=10240 (megabytes)"
    );
}

#[test]
fn errors_carry_typed_locations() {
    let err = Pipeline::parse(
        "\n\n[functions.echo]\npath = \"x\"\ntimeout = 5\n",
        Path::new("dir/p.toml"),
    )
    .expect_err("wrong type");
    let at = err.location().expect("located");
    assert_eq!(
        (at.file.as_path(), at.line, at.column),
        (Path::new("dir/p.toml"), 5, 11)
    );
    match err {
        PipelineError::WrongType {
            field,
            expected,
            found,
            ..
        } => {
            assert_eq!(field, "functions.echo.timeout");
            assert_eq!(expected, "a duration string such as \"3s\"");
            assert_eq!(found, "integer 5");
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn columns_count_characters() {
    let err = Pipeline::parse(
        "[functions.echo]\npath = \"x\"\nenv = { A = \"é\", \"b c\" = \"y\" }\n",
        Path::new("p.toml"),
    )
    .expect_err("bad env key");
    assert_eq!(
        err.to_string(),
        "p.toml:3:18: `functions.echo.env` key \"b c\" is not a valid variable name: \
         expected letters, digits and `_`, not starting with a digit"
    );
}
