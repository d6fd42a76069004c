//! The `sluice` binary as a user runs it: exit codes, payload sources,
//! located pipeline errors, doctor, image build.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sluice_test_support::{FunctionFixture, agent_binary, function_fixture};

fn sluice() -> Command {
    // The agent must sit next to the sluice binary (same target folder).
    let agent = agent_binary();
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env("SLUICE_AGENT", agent);
    c
}

fn pipeline(dir: &Path, functions: &[(&str, &FunctionFixture, &str)]) -> PathBuf {
    let mut text = String::new();
    for (name, f, extra) in functions {
        text.push_str(&format!(
            "[functions.{name}]\npath = {:?}\n{extra}\n",
            f.dir
        ));
    }
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn invoke_prints_the_response_and_exits_0() {
    let echo = function_fixture("echo");
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(tmp.path(), &[("echo", &echo, "")]);

    let out = run(
        sluice()
            .args(["invoke", "-p"])
            .arg(&p)
            .args(["echo", "--payload", r#"{"a":1}"#]),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#"{"a":1}"#);
    // Lambda's REPORT line ends the function's log: a cold start, so with
    // its init duration.
    let err = text(&out.stderr);
    let report = err
        .lines()
        .find(|l| l.starts_with("[echo] REPORT RequestId: "))
        .unwrap_or_else(|| panic!("{err}"));
    for field in [
        "\tDuration: ",
        "\tBilled Duration: ",
        "\tMemory Size: 128 MB",
        "\tInit Duration: ",
    ] {
        assert!(report.contains(field), "{field:?} in {report}");
    }
    let quiet = run(
        sluice()
            .args(["invoke", "-q", "-p"])
            .arg(&p)
            .args(["echo", "--payload", r#"{"a":1}"#]),
        None,
    );
    assert_eq!(quiet.status.code(), Some(0));
    assert!(
        !text(&quiet.stderr).contains("REPORT"),
        "{}",
        text(&quiet.stderr)
    );

    let file = tmp.path().join("event.json");
    std::fs::write(&file, r#"{"from":"file"}"#).unwrap();
    let out = run(
        sluice()
            .args(["invoke", "-p"])
            .arg(&p)
            .arg("echo")
            .arg(format!("--payload=@{}", file.display())),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#"{"from":"file"}"#);

    let out = run(
        sluice()
            .args(["invoke", "-p"])
            .arg(&p)
            .args(["echo", "--payload", "-"]),
        Some(r#"{"from":"stdin"}"#),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#"{"from":"stdin"}"#);

    // A payload that is not JSON is refused before any call, naming where
    // it came from (Lambda's Invoke API refuses it too).
    for (arg, stdin, from) in [
        ("{bad".to_owned(), None, "--payload"),
        ("-".to_owned(), Some(""), "the payload from stdin"),
        (format!("@{}", p.display()), None, "the payload file"),
    ] {
        let out = run(
            sluice()
                .args(["invoke", "-p"])
                .arg(&p)
                .arg("echo")
                .arg(format!("--payload={arg}")),
            stdin,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.starts_with(&format!("error: {from}")) && err.contains("is not JSON"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn function_errors_exit_1_and_sandbox_failures_exit_3() {
    let fail = function_fixture("fail");
    let mis = function_fixture("misbehave");
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(
        tmp.path(),
        &[("fail", &fail, ""), ("slow", &mis, "timeout = \"1s\"")],
    );
    let out = run(
        sluice()
            .args(["invoke", "-p"])
            .arg(&p)
            .args(["fail", "--payload", "{}"]),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    let last = err.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|_| panic!("{err}"));
    assert!(
        v["errorType"].is_string() && v["errorMessage"].is_string(),
        "{v}"
    );

    let out = run(
        sluice()
            .args(["invoke", "-p"])
            .arg(&p)
            .args(["slow", "--payload", r#"{"action":"loop"}"#]),
        None,
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
}

/// `sluice invoke -p PIPELINE FUNCTION --payload PAYLOAD`.
fn invoke_in(pipeline: &std::path::Path, function: &str, payload: &str) -> std::process::Output {
    run(
        sluice()
            .args(["invoke", "-p"])
            .arg(pipeline)
            .args([function, "--payload", payload]),
        None,
    )
}

/// The word-count example handler `function` (Python's or Node's) through
/// `invoke`: its answer to a text, and what its runtime logs and posts for
/// an event it refuses (exit 1): the error object, last on stderr, and
/// stderr.
fn counts_words_and_fails_as_lambda_does(
    invoke: &dyn Fn(&str, &str) -> std::process::Output,
    function: &str,
) -> (serde_json::Value, String) {
    let out = invoke(function, r#"{"text": "To be, or not to be"}"#);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["words"], 6, "{v}");
    assert_eq!(
        v["top"],
        serde_json::json!([["to", 2], ["be", 2], ["or", 1]])
    );
    assert_eq!(v["has_time_left"], true);
    assert_eq!(v["request_id"].as_str().map(str::len), Some(36), "{v}");
    // What the handler prints is the function's log.
    assert!(
        text(&out.stderr).contains("6 words in 1 lines"),
        "{}",
        text(&out.stderr)
    );
    let out = invoke(function, r#"{"nope": 1}"#);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let last = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    (last, err)
}

/// A plain Lambda handler in Python (`examples/functions/python`: a
/// Runtime API loop in the standard library, and `handler.py`) runs in the
/// process sandbox with the host's python3: its answer, its exception as
/// Lambda's error object (exit 1), and a handler that cannot be imported
/// reported as an init error (exit 3).
#[test]
fn a_python_handler_runs_unchanged() {
    let python = function_fixture("python");
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(
        tmp.path(),
        &[
            ("py", &python, "handler = \"handler.handler\""),
            ("missing", &python, "handler = \"nothere.handler\""),
        ],
    );
    let invoke = |function: &str, payload: &str| invoke_in(&p, function, payload);
    let (last, err) = counts_words_and_fails_as_lambda_does(&invoke, "py");
    assert_eq!(last["errorType"], "ValueError", "{err}");
    // Lambda's error object as the function posted it, stack trace included.
    let trace = last["stackTrace"].as_array().expect("stackTrace");
    assert!(
        trace
            .iter()
            .any(|f| f.as_str().is_some_and(|f| f.contains("handler.py"))),
        "{err}"
    );
    assert!(
        err.contains("handler.py\", line"),
        "the traceback is logged: {err}"
    );

    let out = invoke("missing", "{}");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("Runtime.ImportModuleError"), "{err}");
    // Lambda's INIT_REPORT, as there was no invocation to REPORT on.
    let init = err
        .lines()
        .find(|l| l.starts_with("[missing] INIT_REPORT Init Duration: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        init.ends_with(" ms\tPhase: init\tStatus: error\tError Type: Runtime.ImportModuleError"),
        "{init}"
    );
    assert!(!err.contains("REPORT RequestId"), "{err}");
}

/// A function's layers (Lambda layers) reach it at /opt: `sluice validate`
/// names them, a Python handler imports a module from a layer's `python`
/// folder, and Node.js handlers require and import one from a layer's
/// `nodejs/node_modules`, as in Lambda.
#[test]
fn python_and_node_handlers_import_from_their_layer() {
    use std::os::unix::fs::PermissionsExt;
    let python = function_fixture("python");
    std::fs::write(
        python.dir.join("uses_layer.py"),
        "import greeting\n\ndef handler(event, context):\n    return {\"greeting\": greeting.text(event[\"name\"])}\n",
    )
    .unwrap();
    let node = function_fixture("node");
    std::fs::write(
        node.dir.join("uses_layer.cjs"),
        "const greeting = require('greeting');\n\
         exports.handler = async (event) => ({ greeting: greeting.text(event.name) });\n",
    )
    .unwrap();
    std::fs::write(
        node.dir.join("imports_layer.mjs"),
        "import { text } from 'greeting';\n\
         export const handler = async (event) => ({ greeting: text(event.name), esm: true });\n",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layers/greeting");
    let files = [
        (
            "python/greeting.py",
            "def text(name):\n    return f\"hello {name}, from a layer\"\n",
        ),
        (
            "nodejs/node_modules/greeting/index.js",
            "exports.text = (name) => `hello ${name}, from a layer`;\n",
        ),
    ];
    for (path, content) in files {
        let file = layer.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, content).unwrap();
        // The sandbox's user must be able to reach the layer's files.
        for dir in file.ancestors().skip(1) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            if dir == tmp.path() {
                break;
            }
        }
    }
    let p = pipeline(
        tmp.path(),
        &[
            (
                "greet",
                &python,
                "handler = \"uses_layer.handler\"\nlayers = [\"layers/greeting\"]",
            ),
            (
                "greet-js",
                &node,
                "handler = \"uses_layer.handler\"\nlayers = [\"layers/greeting\"]",
            ),
            (
                "greet-esm",
                &node,
                "handler = \"imports_layer.handler\"\nlayers = [\"layers/greeting\"]",
            ),
        ],
    );
    let out = run(sluice().arg("validate").arg(&p), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert!(
        listed.contains(&format!(
            ", layers at /opt: {}",
            layer.canonicalize().unwrap().display()
        )),
        "{listed}"
    );
    let out = invoke_in(&p, "greet", r#"{"name": "Ada"}"#);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"greeting": "hello Ada, from a layer"}"#
    );
    let out = invoke_in(&p, "greet-js", r#"{"name": "Grace"}"#);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"greeting":"hello Grace, from a layer"}"#
    );
    let out = invoke_in(&p, "greet-esm", r#"{"name": "Edsger"}"#);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"greeting":"hello Edsger, from a layer","esm":true}"#
    );
}

/// A function and its layer as .zip archives, as Lambda deploys them: run
/// from folders unpacked once under $SLUICE_HOME/packages; `sluice
/// validate` names the archives.
#[test]
fn a_function_and_its_layer_run_from_zip_archives() {
    use std::io::Write as _;
    use zip::write::SimpleFileOptions;
    let python = function_fixture("python");
    let tmp = tempfile::tempdir().unwrap();
    let zip_of = |name: &str, files: &[(&str, u32, Vec<u8>)]| {
        let path = tmp.path().join(name);
        let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for (entry, mode, bytes) in files {
            let options = SimpleFileOptions::default().unix_permissions(*mode);
            w.start_file(*entry, options).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap();
        path
    };
    let function = zip_of(
        "function.zip",
        &[
            (
                "bootstrap",
                0o755,
                std::fs::read(python.dir.join("bootstrap")).unwrap(),
            ),
            (
                "app.py",
                0o644,
                b"import greeting\n\ndef handler(event, context):\n    return {\"greeting\": greeting.text(event[\"name\"])}\n".to_vec(),
            ),
        ],
    );
    let layer = zip_of(
        "layer.zip",
        &[(
            "python/greeting.py",
            0o644,
            b"def text(name):\n    return f\"hello {name}, from a zipped layer\"\n".to_vec(),
        )],
    );
    let p = tmp.path().join("pipeline.toml");
    std::fs::write(
        &p,
        "[functions.zipped]\npath = \"function.zip\"\nhandler = \"app.handler\"\nlayers = [\"layer.zip\"]\n",
    )
    .unwrap();
    let home = tmp.path().join("home");

    let out = run(
        sluice().env("SLUICE_HOME", &home).arg("validate").arg(&p),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    let shown = |path: &Path| path.canonicalize().unwrap().display().to_string();
    assert!(
        listed.contains(&format!("zipped: {} (", shown(&function)))
            && listed.contains(&format!("layers at /opt: {}", shown(&layer))),
        "{listed}"
    );
    assert!(!home.exists(), "validate unpacks nothing");

    let out = run(
        sluice()
            .env("SLUICE_HOME", &home)
            .args(["invoke", "-p"])
            .arg(&p)
            .args(["zipped", "--payload", r#"{"name": "Barbara"}"#]),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        r#"{"greeting": "hello Barbara, from a zipped layer"}"#
    );
    let mut unpacked: Vec<String> = std::fs::read_dir(home.join("packages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    unpacked.sort();
    assert_eq!(unpacked.len(), 2, "{unpacked:?}");
    assert!(unpacked[0].starts_with("function-") && unpacked[1].starts_with("layer-"));
}

/// A plain Lambda handler in Node.js (`examples/functions/node`: a Runtime
/// API loop on Node's standard library, and `index.mjs`) runs in the
/// process sandbox with the host's node: an async ES module handler's
/// answer, its exception as Lambda's error object (exit 1), CommonJS
/// handlers answering through the callback or by returning, and handlers
/// that cannot be loaded reported as init errors (exit 3).
#[test]
fn a_node_handler_runs_unchanged() {
    let node = function_fixture("node");
    std::fs::write(
        node.dir.join("legacy.cjs"),
        "exports.callback = (event, context, callback) => {\n\
           setTimeout(() => callback(null, { doubled: event.n * 2, fn: context.functionName }), 1);\n\
         };\n\
         exports.plain = (event) => ({ plain: event.n });\n\
         exports.refuse = (event, context, callback) => callback(new RangeError('no ' + event.n));\n",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(
        tmp.path(),
        &[
            ("js", &node, "handler = \"index.handler\""),
            ("cb", &node, "handler = \"legacy.callback\""),
            ("plain", &node, "handler = \"legacy.plain\""),
            ("refuse", &node, "handler = \"legacy.refuse\""),
            ("missing", &node, "handler = \"nothere.handler\""),
            ("unexported", &node, "handler = \"index.nope\""),
        ],
    );
    let invoke = |function: &str, payload: &str| invoke_in(&p, function, payload);
    let (last, err) = counts_words_and_fails_as_lambda_does(&invoke, "js");
    assert_eq!(last["errorType"], "TypeError", "{err}");
    // Lambda's error object as Node's runtime posts it, with its trace.
    let trace = last["trace"].as_array().expect("trace");
    assert!(
        trace
            .iter()
            .any(|f| f.as_str().is_some_and(|f| f.contains("index.mjs"))),
        "{err}"
    );

    // A Kafka batch (Lambda's event, values in base64): the value that is
    // not UTF-8 goes back as a batch item failure.
    let kafka = serde_json::json!({"eventSource": "SelfManagedKafka", "records": {"t-0": [
        {"topic": "t", "partition": 0, "offset": 4, "value": "b25lIHR3bw=="},
        {"topic": "t", "partition": 0, "offset": 5, "value": "/w=="}
    ]}});
    let out = invoke("js", &kafka.to_string());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["words"], 2, "{v}");
    assert_eq!(
        v["batchItemFailures"],
        serde_json::json!([{"itemIdentifier": "t-0@5"}])
    );
    // A backfill's calls.
    std::fs::write(tmp.path().join("lines.txt"), "a b\nc\nd e f\n").unwrap();
    let out = run(
        sluice()
            .args(["backfill", "-p"])
            .arg(&p)
            .args(["-f", "js", "--source"])
            .arg(tmp.path().join("lines.txt"))
            .args(["--max-items-per-call", "2", "-q", "--progress"])
            .arg(tmp.path().join("lines.redb")),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("items: 3 total, 3 succeeded"),
        "{}",
        text(&out.stdout)
    );

    for (function, payload, answer) in [
        (
            "cb",
            r#"{"n": 21}"#,
            serde_json::json!({"doubled": 42, "fn": "cb"}),
        ),
        ("plain", r#"{"n": 5}"#, serde_json::json!({"plain": 5})),
    ] {
        let out = invoke(function, payload);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, answer, "{function}");
    }
    let out = invoke("refuse", r#"{"n": 3}"#);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let last: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["errorType"], &last["errorMessage"]),
        (&serde_json::json!("RangeError"), &serde_json::json!("no 3")),
        "{err}"
    );

    for (function, kind) in [
        ("missing", "Runtime.ImportModuleError"),
        ("unexported", "Runtime.HandlerNotFound"),
    ] {
        let out = invoke(function, "{}");
        assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("Status: error\tError Type: {kind}")),
            "{function}: {err}"
        );
    }
}

/// `--log-format json` (or `SLUICE_LOG_FORMAT=json`): every stderr line is
/// one JSON object, the function's output and Lambda's REPORT (typed
/// figures) included, and so are sluice's own errors.
#[test]
fn json_logs_are_one_object_per_line() {
    let python = function_fixture("python");
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(
        tmp.path(),
        &[
            ("py", &python, "handler = \"handler.handler\""),
            ("missing", &python, "handler = \"nothere.handler\""),
        ],
    );
    // The handler raises on an event it does not know: a traceback on
    // stderr, then the error object.
    let out = run(
        sluice()
            .args(["--log-format", "json", "invoke", "-p"])
            .arg(&p)
            .args(["py", "--payload", r#"{"x":1}"#]),
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let objects: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{err}")))
        .collect();
    let (error, logs) = objects.split_last().unwrap();
    assert_eq!(error["errorType"], "ValueError", "{err}");
    let traceback: Vec<_> = logs
        .iter()
        .filter(|o| o["target"] == "sluice::function")
        .collect();
    assert!(
        traceback.iter().all(|o| o["function"] == "py"
            && o["stream"] == "stderr"
            && o["level"] == "INFO"
            && o["timestamp"].is_string()),
        "{err}"
    );
    assert!(
        traceback
            .iter()
            .any(|o| o["message"].as_str().unwrap().starts_with("ValueError: ")),
        "{err}"
    );
    let report = logs
        .iter()
        .find(|o| o["target"] == "sluice::report")
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(report["status"], "error", "{report}");
    assert_eq!(report["error_type"], "ValueError", "{report}");
    assert_eq!(report["memory_size_mb"], 128, "{report}");
    assert!(
        report["duration_ms"].is_f64() && report["billed_duration_ms"].is_u64(),
        "{report}"
    );
    assert!(
        report["init_duration_ms"].is_f64(),
        "a cold start: {report}"
    );

    // A failed initialisation's INIT_REPORT.
    let out = run(
        sluice()
            .args(["--log-format", "json", "invoke", "-p"])
            .arg(&p)
            .args(["missing", "--payload", "{}"]),
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let init: serde_json::Value = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|o| o["target"] == "sluice::report")
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(init["phase"], "init", "{init}");
    assert_eq!(init["status"], "error", "{init}");
    assert_eq!(init["error_type"], "Runtime.ImportModuleError", "{init}");
    assert!(init["init_duration_ms"].is_f64(), "{init}");

    let out = run(
        sluice()
            .env("SLUICE_LOG_FORMAT", "json")
            .args(["run", "--trigger", "nope"])
            .arg(&p),
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line: serde_json::Value =
        serde_json::from_str(err.trim()).unwrap_or_else(|_| panic!("{err}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["target"], "sluice", "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .starts_with("--trigger nope: "),
        "{line}"
    );
}

/// `sluice new` as a new user runs it in an empty folder: a Python
/// function that answers `sluice invoke` and a backfill at once, a shell
/// one added to the same pipeline, and mistakes refused without touching
/// anything.
#[test]
fn new_makes_functions_that_run_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let in_tmp = |args: &[&str]| run(sluice().current_dir(tmp.path()).args(args), None);
    let out = in_tmp(&["new", "greet"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sluice invoke --pipeline pipeline.toml greet"));
    let out = in_tmp(&[
        "invoke",
        "-p",
        "pipeline.toml",
        "greet",
        "--payload",
        r#"{"hello":"world"}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"count": 1, "first": {"hello": "world"}})
    );
    assert!(
        text(&out.stderr).contains("[greet] greet: 1 item(s)"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(tmp.path().join("lines.txt"), "a\nb\nc\n").unwrap();
    let out = in_tmp(&[
        "backfill",
        "-p",
        "pipeline.toml",
        "-f",
        "greet",
        "--source",
        "lines.txt",
        "--max-items-per-call",
        "2",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("items: 3 total, 3 succeeded"),
        "{}",
        text(&out.stdout)
    );

    let out = in_tmp(&["new", "hello-js", "--template", "node"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = in_tmp(&[
        "invoke",
        "-p",
        "pipeline.toml",
        "hello-js",
        "--payload",
        r#"{"items":[7,8]}"#,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer, serde_json::json!({"count": 2, "first": 7}));
    assert!(
        text(&out.stderr).contains("[hello-js] hello-js: 2 item(s)"),
        "{}",
        text(&out.stderr)
    );

    let out = in_tmp(&["new", "raw", "--template", "shell"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = in_tmp(&["invoke", "-p", "pipeline.toml", "raw", "--payload", "[1]"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(r#""event": [1]"#),
        "{}",
        text(&out.stdout)
    );

    let before = std::fs::read_to_string(tmp.path().join("pipeline.toml")).unwrap();
    std::fs::create_dir(tmp.path().join("busy")).unwrap();
    std::fs::write(tmp.path().join("busy/keep"), "").unwrap();
    for (args, expected) in [
        (&["new", "greet"][..], "already declares [functions.greet]"),
        (&["new", "no way"][..], "is not a valid name"),
        (
            &["new", "third", "--dir", "busy"][..],
            "busy exists and is not empty",
        ),
    ] {
        let out = in_tmp(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("pipeline.toml")).unwrap(),
        before
    );
    assert!(!tmp.path().join("functions/third").exists());
}

/// `sluice new NAME --template rust`: a cargo project on the official
/// `lambda_runtime`, built at once, that answers `sluice invoke`; an edit
/// and its `build.sh` give the new answer. Offline, from the crates the
/// workspace already fetched, and into a target folder kept between runs
/// (the first build compiles the runtime: about a minute).
#[test]
fn new_rust_builds_a_lambda_runtime_function() {
    let tmp = tempfile::tempdir().unwrap();
    let target = concat!(env!("CARGO_TARGET_TMPDIR"), "/new-rust-template");
    let in_tmp = |args: &[&str]| {
        run(
            sluice()
                .current_dir(tmp.path())
                .env("CARGO_NET_OFFLINE", "true")
                .env("CARGO_TARGET_DIR", target)
                .args(args),
            None,
        )
    };
    let out = in_tmp(&["new", "9lives", "--template", "rust"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot name a cargo package"));
    assert!(!tmp.path().join("functions").exists());

    let out = in_tmp(&["new", "hello", "--template", "rust"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("functions/hello/build.sh"));
    let pipeline = std::fs::read_to_string(tmp.path().join("pipeline.toml")).unwrap();
    assert!(
        pipeline.contains("path = \"functions/hello/target/lambda/hello\""),
        "{pipeline}"
    );
    let invoke = || {
        let out = in_tmp(&[
            "invoke",
            "-p",
            "pipeline.toml",
            "hello",
            "--payload",
            r#"{"hello":"world"}"#,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (answer, text(&out.stderr))
    };
    let (answer, log) = invoke();
    assert_eq!(
        answer,
        serde_json::json!({"count": 1, "first": {"hello": "world"}})
    );
    assert!(log.contains("[hello] hello: 1 item(s)"), "{log}");

    // Edit, rebuild, and the next call runs the new code.
    let main = tmp.path().join("functions/hello/src/main.rs");
    let code = std::fs::read_to_string(&main).unwrap();
    let edited = code.replace(
        r#"json!({"count": items.len(), "first": items.first()})"#,
        r#"json!({"edited": true, "count": items.len()})"#,
    );
    assert_ne!(code, edited, "the template's answer moved");
    std::fs::write(&main, edited).unwrap();
    let out = run(
        Command::new("bash")
            .arg(tmp.path().join("functions/hello/build.sh"))
            .env("CARGO_NET_OFFLINE", "true")
            .env("CARGO_TARGET_DIR", target),
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (answer, _) = invoke();
    assert_eq!(answer, serde_json::json!({"edited": true, "count": 1}));
}

#[test]
fn pipeline_errors_exit_2_with_their_location() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.toml");
    std::fs::write(
        &p,
        "[functions.echo]\npath = \"nowhere\"\ntimeout = \"3 parsecs\"\n",
    )
    .unwrap();
    let out = run(sluice().arg("validate").arg(&p), None);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!("error: {}:", p.display())),
        "{err}"
    );
    assert!(err.contains(":3:11:") || err.contains(":2:8:"), "{err}");

    let echo = function_fixture("echo");
    let p = pipeline(tmp.path(), &[("echo", &echo, "")]);
    let out = run(sluice().args(["invoke", "-p"]).arg(&p).arg("nope"), None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("echo"),
        "lists the declared functions"
    );

    let out = run(sluice().arg("validate").arg(&p), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 function"));

    // Jobs are described: what they read, call and keep.
    let mut text_of = std::fs::read_to_string(&p).unwrap();
    text_of.push_str(
        "[job.replay]\nfunction = \"echo\"\nsource = \"data/*.csv\"\n\
         csv_headers = [\"id\", \"n\"]\nresults = \"out/replay.jsonl\"\n\
         max_items = 50\nbatch_input = { run = 7 }\n\n\
         [[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"in\"]\non_failure = \"file:///var/dlq/\"\n",
    );
    std::fs::write(&p, text_of).unwrap();
    let out = run(sluice().arg("validate").arg(&p), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert!(
        listed.contains("job replay: backfill of ")
            && listed.contains("data/*.csv -> echo, 100 items per call, responses kept in ")
            && listed.contains("out/replay.jsonl")
            && listed.contains("only the first 50 items (max_items)")
            && listed.contains(r#"every call carries batch_input {"run":7}"#)
            && listed.contains("-> echo, failures as objects under /var/dlq/"),
        "{listed}"
    );
}

#[test]
fn doctor_reports_what_this_machine_can_run() {
    let out = run(sluice().arg("doctor"), None);
    let stdout = text(&out.stdout);
    for what in [
        "KVM",
        "user namespaces",
        "cgroups",
        "seccomp",
        "agent",
        "landlock",
        "process sandbox",
        "CPU wake-ups",
        "guest image",
        "Kafka",
    ] {
        assert!(
            stdout.contains(&format!("] {what}:")),
            "{what} missing:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("[ ok ] agent: ") && stdout.contains("speaks this build's protocol"),
        "{stdout}"
    );
    let auto = stdout
        .lines()
        .find_map(|l| l.strip_prefix("backend for `backend = \"auto\"`: "))
        .unwrap_or_else(|| panic!("no auto backend line:\n{stdout}"));
    if !sluice_vmm::host::probe().can_boot_linux() {
        assert!(
            auto.starts_with("process (") && auto.contains("Linux guests cannot boot"),
            "{auto}"
        );
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
}

#[test]
fn the_microvm_backend_is_refused_at_start_up_where_linux_cannot_boot() {
    let host = sluice_vmm::host::probe();
    if host.can_boot_linux() {
        eprintln!(
            "*** SKIPPED: this host can boot Linux guests; the refusal is not tested here ***"
        );
        return;
    }
    let static_exe = Path::new("/sbin/ldconfig");
    if !static_exe.exists() {
        eprintln!("*** SKIPPED: no static /sbin/ldconfig to stand in for the agent ***");
        return;
    }
    // An image exists, so only the host stands in the way.
    let home = tempfile::tempdir().unwrap();
    let kernel = home.path().join("bzImage");
    std::fs::write(&kernel, b"a prebuilt kernel").unwrap();
    let mut c = sluice();
    c.env("SLUICE_HOME", home.path())
        .args(["image", "build", "--kernel"])
        .arg(&kernel)
        .arg("--agent")
        .arg(static_exe);
    assert_eq!(run(&mut c, None).status.code(), Some(0));

    let echo = function_fixture("echo");
    let tmp = tempfile::tempdir().unwrap();
    let invoke = |backend: &str| {
        let p = pipeline(
            tmp.path(),
            &[("echo", &echo, &format!("backend = {backend:?}"))],
        );
        let mut c = sluice();
        c.env("SLUICE_HOME", home.path())
            .args(["invoke", "-p"])
            .arg(&p)
            .args(["echo", "--payload", r#"{"vm":1}"#]);
        run(&mut c, None)
    };
    let out = invoke("microvm");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("function echo: backend = \"microvm\"")
            && stderr.contains("Linux guests cannot boot here"),
        "{stderr}"
    );
    for why in host.linux_blockers() {
        assert!(stderr.contains(&why), "{stderr} lacks {why}");
    }
    // `auto` falls back to the process sandbox here, image or not.
    let out = invoke("auto");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#"{"vm":1}"#);
}

#[test]
fn image_build_with_a_given_kernel_caches_the_image_and_refuses_a_dynamic_agent() {
    // Debian's ldconfig is a static-pie executable: it stands in for the
    // static agent (the debug agent of this build is dynamically linked).
    let static_exe = Path::new("/sbin/ldconfig");
    if !static_exe.exists() {
        eprintln!("*** SKIPPED: no static /sbin/ldconfig to stand in for the agent ***");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let kernel = home.path().join("bzImage");
    std::fs::write(&kernel, b"a prebuilt kernel").unwrap();
    let build = || {
        let mut c = sluice();
        c.env("SLUICE_HOME", home.path())
            .args(["image", "build", "--kernel"])
            .arg(&kernel)
            .arg("--agent")
            .arg(static_exe);
        run(&mut c, None)
    };
    let out = build();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("(given)") && stdout.contains("initramfs.cpio"),
        "{stdout}"
    );
    assert!(!stdout.contains("(cached)"), "{stdout}");
    let images: Vec<_> = std::fs::read_dir(home.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(images.len(), 1);
    assert_eq!(
        std::fs::read(images[0].join("kernel")).unwrap(),
        b"a prebuilt kernel"
    );
    let again = build();
    assert!(
        text(&again.stdout).contains("image (cached)"),
        "{}",
        text(&again.stdout)
    );

    let mut c = sluice();
    c.env("SLUICE_HOME", home.path())
        .args(["image", "build", "--kernel"])
        .arg(&kernel)
        .arg("--agent")
        .arg(agent_binary());
    let out = run(&mut c, None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("dynamically linked"),
        "{}",
        text(&out.stderr)
    );
}

/// An agent from another build is named as such by `doctor` and by the
/// sandbox it fails to start, not by whichever field of the start frame
/// differs.
#[test]
fn an_agent_from_another_build_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("sluice-agent");
    let ours = format!("{:016x}", sluice_protocol::PROTOCOL_FINGERPRINT);
    let theirs = format!("{:016x}", !sluice_protocol::PROTOCOL_FINGERPRINT);
    std::fs::write(
        &other,
        format!("#!/bin/sh\necho 'sluice-agent 0.0.1 (protocol {theirs})'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run(sluice().arg("doctor").env("SLUICE_AGENT", &other), None);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "speaks protocol {theirs}, this sluice {ours}: they come from different builds"
        )),
        "{stdout}"
    );
}

/// A layer with a Lambda extension made with the `lambda-extension` crate:
/// `validate` names it, and `invoke` runs it beside the function (its line
/// for the call, then its summary when the sandbox stops).
#[test]
fn a_layer_brings_a_lambda_extension() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let echo = function_fixture("echo");
    let layer = tmp.path().join("counter");
    std::fs::create_dir_all(layer.join("extensions")).unwrap();
    let ext = layer.join("extensions/invocation-counter");
    std::fs::copy(
        sluice_test_support::workspace_binary("invocation-counter-ext"),
        &ext,
    )
    .unwrap();
    for (path, mode) in [
        (tmp.path().to_path_buf(), 0o755),
        (layer.clone(), 0o755),
        (layer.join("extensions"), 0o755),
        (ext.clone(), 0o755),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let p = pipeline(tmp.path(), &[("counted", &echo, "layers = [\"counter\"]")]);
    let out = run(sluice().arg("validate").arg(&p), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(", extensions: invocation-counter"),
        "{}",
        text(&out.stdout)
    );
    let out = invoke_in(&p, "counted", r#"{"n": 1}"#);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#"{"n":1}"#);
    let err = text(&out.stderr);
    assert!(
        err.contains("[counted] invocation-counter: call 1 ("),
        "{err}"
    );
    assert!(
        err.contains(
            "[counted] invocation-counter: 1 calls, 0 function log lines; shutting down (spindown)"
        ),
        "{err}"
    );
}
