//! Loading valid pipeline files, and the errors that have no golden file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_pipeline::{
    Backend, BootstrapServers, KafkaTrigger, ObjectEvents, Pipeline, PipelineError,
    StartingPosition,
};

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
    assert_eq!((echo.min_warm, echo.max_warm, echo.prewarm), (0, 4, true));
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
min_warm = 2
max_warm = 10
prewarm = false

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
    assert_eq!((echo.min_warm, echo.max_warm, echo.prewarm), (2, 10, false));
    assert_eq!(
        pipeline.functions.keys().collect::<Vec<_>>(),
        ["echo", "other-fn_2"]
    );
}

#[test]
fn every_backend_name_is_accepted() {
    for (name, backend) in [
        ("auto", Backend::Auto),
        ("process", Backend::Process),
        ("microvm", Backend::Microvm),
    ] {
        let pipeline = Pipeline::parse(
            &format!("[functions.echo]\npath = \"fixtures/echo\"\nbackend = \"{name}\"\n"),
            Path::new("tests/golden/inline.toml"),
        )
        .expect("parse");
        let echo = pipeline.function("echo").expect("echo");
        assert_eq!(echo.backend, backend);
        assert_eq!(echo.backend.as_str(), name);
    }
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

/// The text of a pipeline declaring the golden fixtures' `echo` function,
/// followed by `text`.
fn with_echo(text: &str) -> String {
    format!("[functions.echo]\npath = \"fixtures/echo\"\n\n{text}")
}

const INLINE: &str = "tests/golden/inline.toml";

/// Parses [`with_echo`]`(text)`, which must be valid.
fn parse_with_echo(text: &str) -> Pipeline {
    Pipeline::parse(&with_echo(text), Path::new(INLINE)).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Parses [`with_echo`]`(text)`, which must be invalid.
fn error_with_echo(text: &str) -> PipelineError {
    match Pipeline::parse(&with_echo(text), Path::new(INLINE)) {
        Ok(pipeline) => panic!("{text}: parsed: {pipeline:?}"),
        Err(e) => e,
    }
}

#[test]
fn layers_are_folders_resolved_against_the_file_in_the_order_written() {
    let text = "[functions.echo]\npath = \"fixtures/echo\"\nlayers = [\"fixtures/no_bootstrap\", \"fixtures/echo/\"]\n";
    let p = Pipeline::parse(text, Path::new(INLINE)).expect("parse");
    let golden = Path::new("tests/golden").canonicalize().unwrap();
    assert_eq!(
        p.functions["echo"].layers,
        [
            golden.join("fixtures/no_bootstrap"),
            golden.join("fixtures/echo")
        ]
    );
    // None by default.
    assert!(parse_with_echo("").functions["echo"].layers.is_empty());
}

#[test]
fn a_function_folder_without_bootstrap_takes_its_layers_runtime() {
    let text = "[functions.echo]\npath = \"fixtures/no_bootstrap\"\nlayers = [\"fixtures/echo\", \"fixtures/no_bootstrap\"]\n";
    let p = Pipeline::parse(text, Path::new(INLINE)).expect("parse");
    let golden = Path::new("tests/golden").canonicalize().unwrap();
    assert_eq!(
        p.functions["echo"].bootstrap(),
        golden.join("fixtures/echo/bootstrap")
    );
    // A folder's own bootstrap comes first.
    let p = parse_with_echo("");
    assert_eq!(
        p.functions["echo"].bootstrap(),
        golden.join("fixtures/echo/bootstrap")
    );
    // The topmost layer with a bootstrap decides: one that is not
    // executable is no runtime.
    let text = "[functions.echo]\npath = \"fixtures/no_bootstrap\"\nlayers = [\"fixtures/echo\", \"fixtures/not_executable\"]\n";
    let e = Pipeline::parse(text, Path::new(INLINE)).expect_err("no runtime");
    assert!(e.to_string().contains("has no `bootstrap`"), "{e}");
}

#[test]
fn lambdas_starting_positions_are_taken_as_written_there() {
    for (written, expected) in [
        ("TRIM_HORIZON", StartingPosition::Earliest),
        ("LATEST", StartingPosition::Latest),
    ] {
        let kafka = parse_with_echo(&format!(
            "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"orders\"]\nstarting_position = \"{written}\"\n"
        ));
        assert_eq!(
            kafka.kafka_triggers[0].starting_position, expected,
            "{written}"
        );
        let objects = parse_with_echo(&format!(
            "[[trigger.object_store]]\nfunction = \"echo\"\nurl = \"s3://landing/in/\"\nstarting_position = \"{written}\"\n"
        ));
        assert_eq!(
            objects.object_triggers[0].starting_position, expected,
            "{written}"
        );
    }
    // Lambda's AT_TIMESTAMP takes its time from another field; here the
    // time is the value, and the error says so.
    let e = error_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"orders\"]\nstarting_position = \"AT_TIMESTAMP\"\n",
    );
    assert_eq!(
        e.to_string(),
        "tests/golden/inline.toml:7:21: `trigger.kafka[0].starting_position` = \"AT_TIMESTAMP\" \
         is invalid: expected the timestamp itself for Lambda's AT_TIMESTAMP (its \
         StartingPositionTimestamp), in RFC 3339 form, e.g. \"2024-05-01T00:00:00Z\""
    );
}

#[test]
fn a_pipeline_without_triggers_has_none() {
    let pipeline = parse_with_echo("");
    assert!(pipeline.kafka_triggers.is_empty());
}

#[test]
fn kafka_trigger_defaults() {
    let pipeline = parse_with_echo(
        r#"
[[trigger.kafka]]
function = "echo"
topics = ["orders"]

[[trigger.kafka]]
function = "echo"
topics = ["refunds", "returns"]
"#,
    );
    let expected = KafkaTrigger {
        name: "echo-1".to_owned(),
        function: "echo".to_owned(),
        topics: vec!["orders".to_owned()],
        bootstrap_servers: BootstrapServers::Embedded,
        group_id: "sluice-echo".to_owned(),
        starting_position: StartingPosition::Latest,
        batch_size: 100,
        batch_window: Duration::from_millis(500),
        max_batch_bytes: 6_291_456,
        filter: None,
        max_retry_attempts: None,
        max_record_age: None,
        bisect_batch_on_error: false,
        report_batch_item_failures: false,
        on_failure: None,
        output_topic: None,
        parallelization_factor: 1,
        exactly_once: false,
        retry_backoff: Duration::from_millis(100),
        retry_backoff_max: Duration::from_secs(30),
        partitions: 3,
        properties: Default::default(),
        state: None,
        enabled: true,
    };
    assert_eq!(pipeline.kafka_triggers.len(), 2);
    assert_eq!(pipeline.kafka_triggers[0], expected);
    // The default name counts Kafka triggers from 1.
    assert_eq!(pipeline.kafka_triggers[1].name, "echo-2");
    assert_eq!(pipeline.kafka_triggers[1].topics, ["refunds", "returns"]);
    assert_eq!(pipeline.kafka_triggers[1].group_id, "sluice-echo");
}

#[test]
fn every_kafka_trigger_field_is_parsed() {
    let pipeline = parse_with_echo(
        r#"
[functions.audit]
path = "fixtures/echo"

[[trigger.kafka]]
name = "orders"
function = "audit"
topics = ["orders", "orders.v2", "Orders_EU-1"]
bootstrap_servers = " kafka-1:9092, SSL://kafka-2:9093 ,[::1]:9094"
group_id = "audit group"
starting_position = "2024-05-01T00:00:00.250Z"
batch_size = 10000
batch_window = "0s"
max_batch_bytes = 1
filter = { value = { type = ["order"], amount = [{ numeric = [">", 0, "<=", 100] }] }, key = [{ prefix = "eu-" }] }
max_retry_attempts = 0
max_record_age = "7d"
bisect_batch_on_error = true
report_batch_item_failures = true
on_failure = "orders-dlq"
output_topic = "results"
parallelization_factor = 10
exactly_once = true
retry_backoff = "300s"
retry_backoff_max = "15m"
partitions = 7 # accepted, and ignored by an external cluster

[trigger.kafka.properties]
"security.protocol" = "SASL_SSL"
"fetch.max.bytes" = 1048576
"enable.partition.eof" = false

[[trigger.kafka]]
function = "echo"
topics = ["orders"]
starting_position = "earliest"
partitions = 1000
max_retry_attempts = -1
retry_backoff = "1ms"
retry_backoff_max = "1ms"
"#,
    );
    let [orders, echo] = pipeline.kafka_triggers.as_slice() else {
        panic!("two triggers: {:?}", pipeline.kafka_triggers);
    };
    assert_eq!(orders.name, "orders");
    assert_eq!(orders.function, "audit");
    assert_eq!(orders.topics, ["orders", "orders.v2", "Orders_EU-1"]);
    assert_eq!(
        orders.bootstrap_servers,
        BootstrapServers::Servers("kafka-1:9092,SSL://kafka-2:9093,[::1]:9094".to_owned())
    );
    assert_eq!(orders.group_id, "audit group");
    assert_eq!(
        orders.starting_position,
        StartingPosition::Timestamp(1_714_521_600_250)
    );
    assert_eq!(orders.batch_size, 10000);
    assert_eq!(orders.batch_window, Duration::ZERO);
    assert_eq!(orders.max_batch_bytes, 1);
    assert_eq!(orders.max_retry_attempts, Some(0));
    assert_eq!(
        orders.max_record_age,
        Some(Duration::from_secs(7 * 24 * 3600))
    );
    assert!(orders.bisect_batch_on_error);
    assert!(orders.report_batch_item_failures);
    assert_eq!(
        orders.on_failure,
        Some(sluice_pipeline::OnFailure::Topic("orders-dlq".into()))
    );
    assert_eq!(orders.output_topic.as_deref(), Some("results"));
    assert_eq!(orders.parallelization_factor, 10);
    assert!(orders.exactly_once);
    assert_eq!(orders.retry_backoff, Duration::from_secs(300));
    assert_eq!(orders.retry_backoff_max, Duration::from_secs(900));
    assert_eq!(orders.partitions, 7);
    let properties: Vec<(&str, &str)> = orders
        .properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        properties,
        [
            ("enable.partition.eof", "false"),
            ("fetch.max.bytes", "1048576"),
            ("security.protocol", "SASL_SSL"),
        ]
    );

    let filter = orders.filter.as_ref().expect("filter");
    assert!(filter.looks_inside_value());
    let record = |key: &str, value: serde_json::Value| {
        serde_json::json!({
            "topic": "orders", "partition": 0, "offset": 7, "timestamp": 0,
            "key": key, "value": value,
        })
    };
    let order = serde_json::json!({ "type": "order", "amount": 100 });
    assert!(filter.matches(&record("eu-1", order.clone())));
    assert!(!filter.matches(&record("us-1", order)));
    assert!(!filter.matches(&record(
        "eu-1",
        serde_json::json!({ "type": "order", "amount": 101 })
    )));

    assert_eq!(echo.name, "echo-2");
    assert_eq!(echo.starting_position, StartingPosition::Earliest);
    assert_eq!(echo.partitions, 1000);
    assert_eq!(echo.max_retry_attempts, None);
    assert_eq!(echo.retry_backoff, Duration::from_millis(1));
    assert_eq!(echo.retry_backoff_max, Duration::from_millis(1));
}

#[test]
fn inline_and_header_trigger_forms_are_equivalent() {
    let header = parse_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"a\"]\n\
         [trigger.kafka.filter.value]\nx = [1]\n",
    );
    // Top-level keys must come before the first table header.
    let inline = Pipeline::parse(
        "trigger = { kafka = [{ function = \"echo\", topics = [\"a\"], \
         filter = { value = { x = [1] } } }] }\n\
         functions = { echo = { path = \"fixtures/echo\" } }\n",
        Path::new(INLINE),
    )
    .expect("inline form");
    assert_eq!(header, inline);
    assert!(header.kafka_triggers[0].filter.is_some());
}

/// Lambda's `FilterCriteria.Filters` (a record gets through when any filter
/// matches), written as TOML tables of an array, inline, or as `$or`.
#[test]
fn lists_of_filters_and_or_are_equivalent() {
    let tables = parse_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"a\"]\n\
         [[trigger.kafka.filter]]\nkey = [\"vip\"]\n\
         [[trigger.kafka.filter]]\nvalue = { type = [\"order\"] }\n",
    );
    let inline = parse_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"a\"]\n\
         filter = [{ key = [\"vip\"] }, { value = { type = [\"order\"] } }]\n",
    );
    let or = parse_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"a\"]\n\
         filter = { \"$or\" = [{ key = [\"vip\"] }, { value = { type = [\"order\"] } }] }\n",
    );
    assert_eq!(tables, inline);
    assert_eq!(tables, or);
    let filter = tables.kafka_triggers[0].filter.as_ref().expect("filter");
    let record = |key: &str, value: serde_json::Value| {
        serde_json::json!({
            "topic": "a", "partition": 0, "offset": 7, "timestamp": 0,
            "key": key, "value": value,
        })
    };
    assert!(filter.matches(&record("vip", serde_json::json!({ "type": "refund" }))));
    assert!(filter.matches(&record("x", serde_json::json!({ "type": "order" }))));
    assert!(!filter.matches(&record("x", serde_json::json!({ "type": "refund" }))));
}

#[test]
fn trigger_errors_are_typed_and_located() {
    let err = error_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\nfilter = { value = { a = 1 } }\n",
    );
    let at = err.location().expect("located");
    assert_eq!((at.line, at.column), (7, 10));
    match err {
        PipelineError::BadFilter { field, source, .. } => {
            assert_eq!(field, "trigger.kafka[0].filter");
            assert_eq!(source.path, "value.a");
        }
        other => panic!("unexpected error: {other}"),
    }

    let err = error_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\n\
         properties = { \"auto.offset.reset\" = \"earliest\" }\n",
    );
    assert_eq!(
        err.to_string(),
        "tests/golden/inline.toml:7:16: `trigger.kafka[0].properties` sets \"auto.offset.reset\", \
         which sluice manages; use the trigger's `starting_position` instead"
    );

    // librdkafka itself judges the pass-through properties when the file is
    // loaded: an unknown name points at the key, a bad value at the value.
    let err = error_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\n\
         properties = { \"sesion.timeout.ms\" = \"100\" }\n",
    );
    assert_eq!(
        err.to_string(),
        "tests/golden/inline.toml:7:16: `trigger.kafka[0].properties` sets \"sesion.timeout.ms\" \
         = \"100\", which librdkafka refuses: no such property (a misspelling? librdkafka's \
         CONFIGURATION.md lists them)"
    );
    let err = error_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\n\
         properties = { \"session.timeout.ms\" = \"ten\" }\n",
    );
    assert_eq!(
        err.to_string(),
        "tests/golden/inline.toml:7:39: `trigger.kafka[0].properties` sets \"session.timeout.ms\" \
         = \"ten\", which librdkafka refuses: Invalid value for configuration property \
         \"session.timeout.ms\""
    );
    // TLS and SASL are built in (librdkafka with OpenSSL).
    parse_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\n\
         properties = { \"security.protocol\" = \"SASL_SSL\", \"sasl.mechanism\" = \"SCRAM-SHA-512\" }\n",
    );

    let err = error_with_echo(
        "[[trigger.kafka]]\nname = \"a.b\"\nfunction = \"echo\"\ntopics = [\"t\"]\n",
    );
    assert_eq!(
        err.to_string(),
        "tests/golden/inline.toml:5:8: `trigger.kafka[0].name` = \"a.b\" is invalid: expected \
         1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`"
    );

    let err = error_with_echo(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\noutput_topic = \"t\"\n",
    );
    assert!(
        matches!(err, PipelineError::SourceTopicReused { .. }),
        "{err}"
    );
}

#[test]
fn triggers_still_need_a_function() {
    let err = Pipeline::parse(
        "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\n",
        Path::new("p.toml"),
    )
    .expect_err("no functions");
    assert!(matches!(err, PipelineError::NoFunctions { .. }), "{err}");
}

#[test]
fn backfill_jobs_get_defaults_and_resolve_paths() {
    let p = parse_with_echo(
        r#"
[job.minimal]
function = "echo"
source = "data/in.jsonl"

[job.full]
function = "echo"
source = ["s3://bucket/orders/*.parquet", "/abs/x.parquet"]
format = "parquet"
columns = ["id", "amount"]
csv_delimiter = ";"
max_items_per_call = 500
max_bytes_per_call = 100000
max_concurrency = 8
max_attempts = 5
tolerated_failure_count = 2
tolerated_failure_percentage = 1.5
order_key = "customer"
max_buffered_items = 5000
progress = "state/orders.redb"
bootstrap_servers = "localhost:9092"
properties = { "security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-256" }
payload = "arrow"
arrow_compression = "lz4"
depends_on_files = { "b.csv" = ["a.csv"], "out/*.csv" = ["in/*.csv", "a.csv"] }
"#,
    );
    let base = Path::new(INLINE).parent().unwrap();
    let minimal = p.job("minimal").unwrap();
    assert_eq!(minimal.function, "echo");
    assert_eq!(
        minimal.sources,
        vec![base.join("data/in.jsonl").display().to_string()]
    );
    assert_eq!(minimal.format, None);
    assert_eq!(minimal.columns, None);
    assert_eq!(minimal.csv_delimiter, b',');
    assert_eq!(
        minimal.max_items_per_call,
        sluice_pipeline::DEFAULT_MAX_ITEMS_PER_CALL
    );
    assert_eq!(
        minimal.max_bytes_per_call,
        sluice_pipeline::DEFAULT_MAX_BYTES_PER_CALL
    );
    assert_eq!(minimal.max_concurrency, None);
    assert_eq!(minimal.max_attempts, sluice_pipeline::DEFAULT_MAX_ATTEMPTS);
    assert_eq!(minimal.tolerated_failure_percentage, None);
    assert_eq!(
        minimal.bootstrap_servers,
        sluice_pipeline::BootstrapServers::Embedded
    );

    assert!(minimal.properties.is_empty());
    let full = p.job("full").unwrap();
    assert_eq!(
        full.properties.get("sasl.mechanism").map(String::as_str),
        Some("SCRAM-SHA-256")
    );
    // Checked as a trigger's are, by librdkafka, located.
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.csv\"\nproperties = { \"sasl.mechanisms\" = 1, \"sasl.usrname\" = \"u\" }\n",
    );
    assert_eq!(
        err.to_string(),
        "tests/golden/inline.toml:7:39: `job.j.properties` sets \"sasl.usrname\" = \"u\", which \
         librdkafka refuses: no such property (a misspelling? librdkafka's CONFIGURATION.md lists \
         them)"
    );
    assert_eq!(
        full.sources,
        vec!["s3://bucket/orders/*.parquet", "/abs/x.parquet"]
    );
    assert_eq!(full.format, Some(sluice_pipeline::DataFormat::Parquet));
    assert_eq!(
        full.columns.as_deref(),
        Some(&["id".to_owned(), "amount".to_owned()][..])
    );
    assert_eq!(full.csv_delimiter, b';');
    assert_eq!(full.max_items_per_call, 500);
    assert_eq!(full.max_bytes_per_call, 100_000);
    assert_eq!(full.max_concurrency, Some(8));
    assert_eq!(full.max_attempts, 5);
    assert_eq!(full.tolerated_failure_count, Some(2));
    assert_eq!(full.tolerated_failure_percentage, Some(1.5));
    assert_eq!(full.order_key.as_deref(), Some("customer"));
    assert_eq!(full.max_buffered_items, 5000);
    assert_eq!(
        minimal.max_buffered_items,
        sluice_pipeline::DEFAULT_MAX_BUFFERED_ITEMS
    );
    assert_eq!(full.progress, Some(base.join("state/orders.redb")));
    assert_eq!(
        full.bootstrap_servers,
        sluice_pipeline::BootstrapServers::Servers("localhost:9092".into())
    );

    assert_eq!(full.payload, sluice_pipeline::PayloadFormat::Arrow);
    assert_eq!(minimal.payload, sluice_pipeline::PayloadFormat::Json);
    assert_eq!(
        full.arrow_compression,
        sluice_pipeline::ArrowCompression::Lz4
    );
    assert_eq!(
        minimal.arrow_compression,
        sluice_pipeline::ArrowCompression::None
    );
    // Globs with a `/` are paths relative to the pipeline file; others match names.
    let rel = |p: &str| base.join(p).display().to_string();
    assert_eq!(
        full.file_dependencies,
        vec![
            ("b.csv".to_owned(), vec!["a.csv".to_owned()]),
            (rel("out/*.csv"), vec![rel("in/*.csv"), "a.csv".to_owned()]),
        ]
    );

    let err = p.job("nope").unwrap_err().to_string();
    assert!(
        err.contains("no job named \"nope\"; declared jobs: full, minimal"),
        "{err}"
    );
}

/// `batch_input`: Distributed Map's `BatchInput`, a table sent with every
/// call; anything else is refused where it is written.
#[test]
fn batch_input_is_a_table_of_bounded_size() {
    let p = parse_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.csv\"\n\
         batch_input = { run_date = 2026-12-01, table = \"orders\", limits = { max = 3, ratio = 0.5 } }\n",
    );
    let input = p.job("j").unwrap().batch_input.clone().unwrap();
    assert_eq!(
        serde_json::Value::Object(input),
        serde_json::json!({
            "run_date": "2026-12-01",
            "table": "orders",
            "limits": {"max": 3, "ratio": 0.5}
        })
    );
    let none = parse_with_echo("[job.j]\nfunction = \"echo\"\nsource = \"x.csv\"\n");
    assert_eq!(none.job("j").unwrap().batch_input, None);

    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.csv\"\nbatch_input = \"2026-12-01\"\n",
    )
    .to_string();
    assert!(
        err.contains(
            "7:15: `job.j.batch_input` has the wrong type: expected a table, e.g. \
             { run_date = \"2026-12-01\" }, found string \"2026-12-01\""
        ),
        "{err}"
    );
    let big = "x".repeat(sluice_pipeline::MAX_BATCH_INPUT_BYTES);
    let err = error_with_echo(&format!(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.csv\"\nbatch_input = {{ text = \"{big}\" }}\n"
    ))
    .to_string();
    assert!(
        err.contains("7:15: `job.j.batch_input`: 65547 bytes as JSON: at most 65536"),
        "{err}"
    );
    // A MapReduce job has no such field.
    let err = error_with_echo(
        "[job.j]\nkind = \"mapreduce\"\nmap = \"echo\"\nreduce = \"echo\"\noutput = \"out\"\n\
         source = \"x.csv\"\nbatch_input = { a = 1 }\n",
    )
    .to_string();
    assert!(err.contains("batch_input"), "{err}");
}

/// `on_failure`: a topic, or (as Lambda's S3 destination) a folder or object
/// store prefix written as a URL; `file://` URLs become absolute folders.
#[test]
fn on_failure_is_a_topic_or_an_object_store_prefix() {
    use sluice_pipeline::OnFailure;
    let trigger = |on_failure: &str| {
        format!(
            "[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"in\"]\non_failure = {on_failure:?}\n"
        )
    };
    for (written, expected) in [
        ("in-dlq", OnFailure::Topic("in-dlq".into())),
        (
            "s3://bucket/dlq/",
            OnFailure::Objects("s3://bucket/dlq/".into()),
        ),
        (
            "az://container",
            OnFailure::Objects("az://container".into()),
        ),
        ("file:///var/dlq", OnFailure::Objects("/var/dlq".into())),
    ] {
        let p = parse_with_echo(&trigger(written));
        assert_eq!(p.kafka_triggers[0].on_failure, Some(expected), "{written}");
    }
    for (written, expected) in [
        (
            "ftp://host/dlq",
            "`trigger.kafka[0].on_failure` = \"ftp://host/dlq\" is invalid: expected a topic, or a folder or object store prefix as a URL",
        ),
        (
            "file://relative/dlq",
            "is invalid: expected a topic, or a folder",
        ),
        ("s3://b/dlq/*.json", "without glob characters"),
        ("in", "is also one of the trigger's `topics`"),
    ] {
        let err = error_with_echo(&trigger(written)).to_string();
        assert!(err.contains(expected), "{written}: {err}");
    }
}

/// `max_items`: Distributed Map's `MaxItems`, within its range, and not
/// where the first items in file order are not what runs first.
#[test]
fn max_items_is_checked() {
    let job =
        |extra: &str| format!("[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\n{extra}\n");
    let p = parse_with_echo(&job("max_items = 1000"));
    assert_eq!(p.job("j").unwrap().max_items, Some(1000));
    assert_eq!(parse_with_echo(&job("")).job("j").unwrap().max_items, None);
    for (extra, expected) in [
        ("max_items = 0", "`job.j.max_items` = 0 is out of range"),
        (
            "max_items = 10\nid_column = \"id\"\ndepends_on_column = \"after\"",
            "7:13: `job.j.max_items`: takes the first items in file order, which `id_column` reorders",
        ),
        (
            "max_items = 10\ndepends_on_files = { \"b.csv\" = [\"a.csv\"] }",
            "which `depends_on_files` reorders",
        ),
        (
            "max_items = 10\npayload = \"parquet\"",
            "payload = \"parquet\" sends whole row groups",
        ),
    ] {
        let err = error_with_echo(&job(extra)).to_string();
        assert!(err.contains(expected), "{extra}: {err}");
    }
    // A MapReduce job takes a sample too, with the same checks.
    let mapreduce = |extra: &str| {
        format!(
            "[job.j]\nkind = \"mapreduce\"\nsource = \"x.parquet\"\nmap = \"echo\"\n\
             reduce = \"echo\"\noutput = \"out\"\n{extra}\n"
        )
    };
    let p = parse_with_echo(&mapreduce("max_items = 50"));
    assert_eq!(p.mapreduce_jobs["j"].max_items, Some(50));
    let err = error_with_echo(&mapreduce("max_items = 50\npayload = \"parquet\"")).to_string();
    assert!(
        err.contains("payload = \"parquet\" sends whole row groups"),
        "{err}"
    );
}

/// `results` as an object-store URL: kept as it is (a local path is joined
/// to the pipeline's folder); a prefix or an unknown scheme is refused.
#[test]
fn results_may_be_an_object_url() {
    let job = |results: &str| {
        format!("[job.j]\nfunction = \"echo\"\nsource = \"x.jsonl\"\nresults = {results:?}\n")
    };
    let p = parse_with_echo(&job("s3://bucket/out/results.jsonl"));
    assert_eq!(
        p.job("j").unwrap().results.as_deref(),
        Some(std::path::Path::new("s3://bucket/out/results.jsonl"))
    );
    let p = parse_with_echo(&job("file:///var/out/r.jsonl"));
    assert_eq!(
        p.job("j").unwrap().results.as_deref(),
        Some(std::path::Path::new("/var/out/r.jsonl"))
    );
    for written in ["s3://bucket/out/", "ftp://host/r.jsonl"] {
        let err = error_with_echo(&job(written)).to_string();
        assert!(
            err.contains(&format!(
                "`job.j.results` = {written:?} is invalid: expected a path, or the URL of an object"
            )),
            "{written}: {err}"
        );
    }
}

/// A MapReduce job's `output` may be an object-store prefix: staged in
/// `.sluice-state/mapreduce-NAME` next to the pipeline file.
#[test]
fn mapreduce_output_may_be_an_object_prefix() {
    let job = |output: &str| {
        format!(
            "[job.j]\nkind = \"mapreduce\"\nsource = \"x.jsonl\"\nmap = \"echo\"\n\
             reduce = \"echo\"\noutput = {output:?}\n"
        )
    };
    let base = Path::new(INLINE).parent().unwrap();
    let p = parse_with_echo(&job("s3://bucket/out/counts/"));
    let j = &p.mapreduce_jobs["j"];
    assert_eq!(j.output_url.as_deref(), Some("s3://bucket/out/counts"));
    assert_eq!(j.output, base.join(".sluice-state/mapreduce-j"));
    let p = parse_with_echo(&job("file:///var/out/counts"));
    let j = &p.mapreduce_jobs["j"];
    assert_eq!(
        (j.output.as_path(), j.output_url.as_deref()),
        (Path::new("/var/out/counts"), None)
    );
    let p = parse_with_echo(&job("out/counts"));
    assert_eq!(p.mapreduce_jobs["j"].output, base.join("out/counts"));
    let err = error_with_echo(&job("s3://bucket/out/*/")).to_string();
    assert!(err.contains("without glob characters"), "{err}");
    for written in ["ftp://host/out/", "s3:///out/"] {
        let err = error_with_echo(&job(written)).to_string();
        assert!(
            err.contains(&format!(
                "`job.j.output` = {written:?} is invalid: expected a folder, or an object-store prefix"
            )),
            "{written}: {err}"
        );
    }
}

/// `items_pointer`: a JSON pointer, only for JSON documents; the `.json`
/// extension is such a document.
#[test]
fn items_pointer_is_checked() {
    use sluice_pipeline::DataFormat;
    assert_eq!(
        DataFormat::from_extension("a/b.json"),
        Some(DataFormat::Json)
    );
    assert_eq!(
        DataFormat::from_extension("b.ndjson.gz"),
        Some(DataFormat::Jsonl)
    );
    let job = |extra: &str| format!("[job.j]\nfunction = \"echo\"\nsource = \"x.json\"\n{extra}\n");
    let p = parse_with_echo(&job("items_pointer = \"/data/orders\""));
    assert_eq!(
        p.job("j").unwrap().items_pointer.as_deref(),
        Some("/data/orders")
    );
    for (extra, expected) in [
        (
            "items_pointer = \"data\"",
            "`job.j.items_pointer` = \"data\" is invalid: expected a JSON pointer starting with `/`",
        ),
        (
            "format = \"jsonl\"\nitems_pointer = \"/data\"",
            "`job.j.items_pointer`: points into a JSON document: it needs format = \"json\"",
        ),
    ] {
        let err = error_with_echo(&job(extra)).to_string();
        assert!(err.contains(expected), "{extra}: {err}");
    }
}

/// `format = "objects"`: a call per object, so one item per call by
/// default, `max_object_bytes` within the attachment limit, and settings
/// about rows refused where they are written.
#[test]
fn objects_format_is_checked() {
    let job = |extra: &str| {
        format!(
            "[job.j]\nfunction = \"echo\"\nsource = \"photos/\"\nformat = \"objects\"\n{extra}\n"
        )
    };
    let p = parse_with_echo(&job(""));
    let j = p.job("j").unwrap();
    assert_eq!(j.format, Some(sluice_pipeline::DataFormat::Objects));
    assert_eq!(j.max_items_per_call, 1);
    assert_eq!(
        j.max_object_bytes,
        sluice_pipeline::DEFAULT_MAX_OBJECT_BYTES
    );
    let p = parse_with_echo(&job("max_object_bytes = 1000\nmax_items_per_call = 1"));
    assert_eq!(p.job("j").unwrap().max_object_bytes, 1000);
    for (extra, expected) in [
        (
            "max_items_per_call = 10",
            "8:22: `job.j.max_items_per_call`: does not apply to format = \"objects\" (a call stages one object",
        ),
        ("columns = [\"a\"]", "`job.j.columns`: does not apply"),
        ("order_key = \"Key\"", "`job.j.order_key`: does not apply"),
        ("payload = \"arrow\"", "`job.j.payload`: does not apply"),
        (
            "max_object_bytes = 0",
            "`job.j.max_object_bytes` = 0 is out of range",
        ),
        (
            "max_object_bytes = 200000000",
            "`job.j.max_object_bytes` = 200000000 is out of range",
        ),
    ] {
        let err = error_with_echo(&job(extra)).to_string();
        assert!(err.contains(expected), "{extra}: {err}");
    }
    // The limit needs the format.
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.jsonl\"\nmax_object_bytes = 10\n",
    )
    .to_string();
    assert!(
        err.contains("`job.j.max_object_bytes`: limits the objects of format = \"objects\""),
        "{err}"
    );
    // MapReduce splits rows.
    let err = error_with_echo(
        "[job.j]\nkind = \"mapreduce\"\nsource = \"x/\"\nformat = \"objects\"\nmap = \"echo\"\nreduce = \"echo\"\noutput = \"out\"\n",
    )
    .to_string();
    assert!(err.contains("`job.j.format`: does not apply"), "{err}");
}

#[test]
fn arrow_compression_is_checked() {
    let cases = [
        (
            "payload = \"arrow\"\narrow_compression = \"gzip\"",
            "7:21: `job.j.arrow_compression` = \"gzip\" is invalid: expected \"none\", \"lz4\" or \"zstd\"",
        ),
        (
            "arrow_compression = \"lz4\"",
            "6:21: `job.j.arrow_compression`",
        ),
    ];
    for (settings, expected) in cases {
        let text = format!("[job.j]\nfunction = \"echo\"\n{settings}\nsource = \"x.parquet\"\n");
        let err = error_with_echo(&text).to_string();
        assert!(err.contains(expected), "{settings}: {err}");
        assert!(err.contains(INLINE), "{settings}: names the file: {err}");
    }
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\narrow_compression = \"zstd\"\n",
    )
    .to_string();
    assert!(err.contains("set payload = \"arrow\" too"), "{err}");
}

#[test]
fn payload_is_checked_and_parquet_is_known() {
    let pipeline = parse_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\npayload = \"parquet\"\n",
    );
    let job = pipeline.job("j").unwrap();
    assert_eq!(job.payload, sluice_pipeline::PayloadFormat::Parquet);
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\npayload = \"orc\"\n",
    )
    .to_string();
    assert!(
        err.contains(
            "7:11: `job.j.payload` = \"orc\" is invalid: expected \"json\", \"arrow\" or \"parquet\""
        ),
        "{err}"
    );
    assert!(err.contains(INLINE), "names the file: {err}");
}

#[test]
fn payload_file_needs_a_columnar_payload() {
    let pipeline = parse_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\npayload = \"parquet\"\npayload_file = true\n",
    );
    let job = pipeline.job("j").unwrap();
    assert!(job.payload_file);
    assert!(
        !parse_with_echo("[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\n")
            .job("j")
            .unwrap()
            .payload_file
    );
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\npayload_file = true\n",
    )
    .to_string();
    assert!(err.contains("7:16: `job.j.payload_file` = true"), "{err}");
    assert!(err.contains("`job.j.payload`"), "{err}");
    assert!(err.contains(INLINE), "names the file: {err}");
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.parquet\"\npayload_file = \"yes\"\n",
    )
    .to_string();
    assert!(err.contains("payload_file"), "{err}");
    assert!(err.contains("a boolean"), "{err}");
}

#[test]
fn state_settings_are_parsed_with_defaults() {
    let pipeline = parse_with_echo(
        r#"
[[trigger.kafka]]
name = "sums"
function = "echo"
topics = ["payments"]
state = { scope = "key", window = "30s" }

[[trigger.kafka]]
function = "echo"
topics = ["clicks"]
state = { window = 100, max_bytes = 4096, store = "kafka" }

[[trigger.kafka]]
function = "echo"
topics = ["views"]
state = {}
"#,
    );
    let t = &pipeline.kafka_triggers;
    let s0 = t[0].state.as_ref().unwrap();
    assert_eq!(s0.scope, sluice_pipeline::StateScope::Key);
    assert_eq!(
        s0.window,
        Some(sluice_pipeline::StateWindow::Time(Duration::from_secs(30)))
    );
    assert_eq!(s0.max_bytes, sluice_pipeline::DEFAULT_STATE_MAX_BYTES);
    assert_eq!(
        s0.store,
        sluice_pipeline::StateStore::Local(
            Path::new(INLINE)
                .parent()
                .unwrap()
                .join(".sluice-state/sums")
        )
    );
    let s1 = t[1].state.as_ref().unwrap();
    assert_eq!(s1.scope, sluice_pipeline::StateScope::Partition);
    assert_eq!(s1.window, Some(sluice_pipeline::StateWindow::Count(100)));
    assert_eq!(s1.max_bytes, 4096);
    assert_eq!(
        s1.store,
        sluice_pipeline::StateStore::Changelog("sluice-state-echo-2".into())
    );
    assert_eq!(t[2].state.as_ref().unwrap().window, None);
}

#[test]
fn bad_state_settings_name_the_field() {
    let cases = [
        (
            r#"state = { scope = "shard" }"#,
            "trigger.kafka[0].state.scope` = \"shard\" is invalid",
        ),
        (
            r#"state = { window = "soon" }"#,
            "trigger.kafka[0].state.window",
        ),
        (r#"state = { window = 0 }"#, "trigger.kafka[0].state.window"),
        (
            r#"state = { max_bytes = 1 }"#,
            "trigger.kafka[0].state.max_bytes",
        ),
        (r#"state = { windows = "1s" }"#, "windows"),
        (
            r#"state = { store = "local", changelog_topic = "x" }"#,
            "requires `trigger.kafka[0].state.store = \"kafka\"`",
        ),
        (
            "state = {}\nparallelization_factor = 2",
            "needs parallelization_factor = 1",
        ),
        (
            "state = {}\nbisect_batch_on_error = true",
            "bisect_batch_on_error",
        ),
    ];
    for (settings, expected) in cases {
        let text =
            format!("[[trigger.kafka]]\nfunction = \"echo\"\ntopics = [\"t\"]\n{settings}\n");
        let err = error_with_echo(&text).to_string();
        assert!(err.contains(expected), "{settings}: {err}");
        assert!(err.contains(INLINE), "{settings}: names the file: {err}");
    }
}

#[test]
fn backfill_state_needs_an_order_key_for_the_key_scope() {
    let err = error_with_echo(
        "[job.fold]\nfunction = \"echo\"\nsource = \"x.jsonl\"\nstate = { scope = \"key\" }\n",
    )
    .to_string();
    assert!(err.contains("order_key"), "{err}");
    let err = error_with_echo(
        "[job.fold]\nfunction = \"echo\"\nsource = \"x.jsonl\"\nstate = { window = \"1s\" }\n",
    )
    .to_string();
    assert!(err.contains("count window"), "{err}");
    let p = parse_with_echo(
        "[job.fold]\nfunction = \"echo\"\nsource = \"x.jsonl\"\norder_key = \"k\"\nstate = { scope = \"key\", window = 10 }\n",
    );
    assert_eq!(
        p.jobs["fold"].state.as_ref().unwrap().window,
        Some(sluice_pipeline::StateWindow::Count(10))
    );
}

#[test]
fn vcpus_default_to_one_and_are_bounded() {
    let p = parse_with_echo("");
    assert_eq!(p.functions["echo"].vcpus, sluice_pipeline::DEFAULT_VCPUS);
    let text = with_echo("").replace("[functions.echo]\n", "[functions.echo]\nvcpus = 2\n");
    let p = Pipeline::parse(&text, Path::new(INLINE)).expect("vcpus = 2");
    assert_eq!(p.functions["echo"].vcpus, 2);
    let text = with_echo("").replace("[functions.echo]\n", "[functions.echo]\nvcpus = 33\n");
    let err = Pipeline::parse(&text, Path::new(INLINE))
        .expect_err("33 vCPUs")
        .to_string();
    assert!(
        err.contains("functions.echo.vcpus") && err.contains("33"),
        "{err}"
    );
}

#[test]
fn snapshots_default_on_and_can_be_turned_off() {
    let p = parse_with_echo("");
    assert!(p.functions["echo"].snapshot);
    let text = with_echo("").replace("[functions.echo]\n", "[functions.echo]\nsnapshot = false\n");
    let p = Pipeline::parse(&text, Path::new(INLINE)).expect("snapshot = false");
    assert!(!p.functions["echo"].snapshot);
    // Off with the process backend is fine; on is a mistake.
    let text = with_echo("").replace(
        "[functions.echo]\n",
        "[functions.echo]\nbackend = \"process\"\nsnapshot = false\n",
    );
    Pipeline::parse(&text, Path::new(INLINE)).expect("process without snapshots");
    let text = with_echo("").replace(
        "[functions.echo]\n",
        "[functions.echo]\nbackend = \"process\"\nsnapshot = true\n",
    );
    let err = Pipeline::parse(&text, Path::new(INLINE))
        .expect_err("snapshots with the process backend")
        .to_string();
    assert!(err.contains("functions.echo.snapshot"), "{err}");
}

#[test]
fn pin_cpu_is_off_by_default_and_for_process_sandboxes_only() {
    assert!(!parse_with_echo("").functions["echo"].pin_cpu);
    for backend in ["auto", "process"] {
        let text = with_echo("").replace(
            "[functions.echo]\n",
            &format!("[functions.echo]\nbackend = \"{backend}\"\npin_cpu = true\n"),
        );
        let p = Pipeline::parse(&text, Path::new(INLINE)).expect("pin_cpu = true");
        assert!(p.functions["echo"].pin_cpu, "{backend}");
    }
    let text = with_echo("").replace(
        "[functions.echo]\n",
        "[functions.echo]\nbackend = \"microvm\"\npin_cpu = true\n",
    );
    let err = Pipeline::parse(&text, Path::new(INLINE))
        .expect_err("pin_cpu with the microVM backend")
        .to_string();
    assert!(err.contains("functions.echo.pin_cpu"), "{err}");
}

#[test]
fn backfill_max_buffered_items_must_be_at_least_one() {
    let err = error_with_echo(
        "[job.j]\nfunction = \"echo\"\nsource = \"x.jsonl\"\norder_key = \"k\"\nmax_buffered_items = 0\n",
    )
    .to_string();
    assert!(err.contains("max_buffered_items"), "{err}");
}

#[test]
fn a_files_format_comes_from_its_extension_before_any_compression() {
    use sluice_pipeline::DataFormat;
    for (name, want) in [
        ("x.parquet", Some(DataFormat::Parquet)),
        ("data/*.csv", Some(DataFormat::Csv)),
        ("s3://b/orders.jsonl.gz", Some(DataFormat::Jsonl)),
        ("logs/app.LOG.ZST", Some(DataFormat::Text)),
        ("x.tsv.gzip", Some(DataFormat::Csv)),
        ("x.gz", None),
        ("noext", None),
    ] {
        assert_eq!(DataFormat::from_extension(name), want, "{name}");
    }
}

#[test]
fn object_store_triggers_get_defaults_and_resolve_folders() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_function(dir.path(), "functions/echo");
    let file = write_pipeline(
        dir.path(),
        r#"
[functions.echo]
path = "functions/echo"

[[trigger.object_store]]
function = "echo"
url = "landing/in"

[[trigger.object_store]]
name = "s3-in"
function = "echo"
url = "s3://landing/in/"
suffix = ".csv"
events = ["removed"]
starting_position = "2024-05-01T00:00:00Z"
poll_interval = "1m"
max_object_bytes = 1024
max_retry_attempts = 0
retry_backoff = "2s"
retry_backoff_max = "10s"
progress = "state/s3.redb"
dead_letter = "/var/tmp/s3-dead.jsonl"

[[trigger.object_store]]
function = "echo"
url = "file:///srv/drop/"
starting_position = "earliest"
events = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
"#,
    );
    let p = Pipeline::load(&file).expect("load");
    let [local, s3, file_url] = &p.object_triggers[..] else {
        panic!("three triggers: {:?}", p.object_triggers);
    };
    assert_eq!(local.name, "echo-objects-1");
    assert_eq!(
        local.url,
        dir.path().join("landing/in").display().to_string()
    );
    assert_eq!(local.suffix, None);
    assert_eq!(
        local.events,
        ObjectEvents {
            created: true,
            removed: false
        }
    );
    assert_eq!(local.starting_position, StartingPosition::Latest);
    assert_eq!(local.poll_interval, Duration::from_secs(5));
    assert_eq!(local.max_object_bytes, 64 << 20);
    assert_eq!(local.max_retry_attempts, 2);
    assert_eq!(
        (local.retry_backoff, local.retry_backoff_max),
        (Duration::from_millis(100), Duration::from_secs(30))
    );
    assert_eq!(
        local.progress,
        dir.path().join(".sluice-state/echo-objects-1.objects.redb")
    );
    assert_eq!(
        local.dead_letter,
        dir.path()
            .join(".sluice-state/echo-objects-1.dead-letter.jsonl")
    );

    assert_eq!(s3.name, "s3-in");
    assert_eq!(s3.url, "s3://landing/in/");
    assert_eq!(s3.suffix.as_deref(), Some(".csv"));
    assert_eq!(
        s3.events,
        ObjectEvents {
            created: false,
            removed: true
        }
    );
    assert_eq!(
        s3.starting_position,
        StartingPosition::Timestamp(1_714_521_600_000)
    );
    assert_eq!(s3.poll_interval, Duration::from_secs(60));
    assert_eq!(s3.max_object_bytes, 1024);
    assert_eq!(s3.max_retry_attempts, 0);
    assert_eq!(s3.progress, dir.path().join("state/s3.redb"));
    assert_eq!(s3.dead_letter, PathBuf::from("/var/tmp/s3-dead.jsonl"));

    assert_eq!(file_url.name, "echo-objects-3");
    assert_eq!(file_url.url, "/srv/drop/");
    assert_eq!(file_url.starting_position, StartingPosition::Earliest);
    assert_eq!(
        file_url.events,
        ObjectEvents {
            created: true,
            removed: true
        }
    );
}
