//! `sluice invoke --pipeline P FUNCTION [--payload JSON | @FILE | -]`.

use std::io::{Read, Write};
use std::path::Path;

use sluice_executor::{InvokeError, InvokeOptions};

use crate::exit;

/// The payload of `--payload JSON | @FILE | -` (default `{}`), checked to
/// be JSON as Lambda's Invoke API checks it: a typo is a usage error naming
/// where the payload came from, not a deserialization error from inside the
/// function.
pub(crate) fn read_payload(arg: Option<&str>) -> Result<Vec<u8>, String> {
    let (from, bytes) = match arg {
        None => return Ok(b"{}".to_vec()),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| format!("reading the payload from stdin: {e}"))?;
            ("the payload from stdin".to_owned(), buf)
        }
        Some(s) if s.starts_with('@') => {
            let file = &s[1..];
            let bytes =
                std::fs::read(file).map_err(|e| format!("reading the payload file {file}: {e}"))?;
            (format!("the payload file {file}"), bytes)
        }
        Some(s) => ("--payload".to_owned(), s.as_bytes().to_vec()),
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| format!("{from} is not JSON (a Lambda event must be): {e}"))?;
    Ok(bytes)
}

/// Invoke once and print the outcome.
pub async fn run(
    pipeline: &Path,
    function: &str,
    payload: Option<&str>,
    tenant: Option<String>,
    quiet: bool,
) -> u8 {
    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Err(e) = p.function(function) {
        crate::log_error!("{e}");
        return exit::USAGE;
    }
    let payload = match read_payload(payload) {
        Ok(p) => p,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::USAGE;
        }
    };
    let ex = match super::executor_for(&p, crate::logs::function_log_sink(quiet)) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let (result, report) = ex
        .invoke_reported(
            function,
            payload,
            InvokeOptions {
                tenant,
                ..Default::default()
            },
        )
        .await;
    ex.shutdown().await;
    // Lambda's log of an invocation ends with its REPORT line: duration,
    // memory size and the most memory used, init duration on a cold start.
    if let Some(r) = report.filter(|_| !quiet) {
        crate::logs::print_report(&r);
    }
    match result {
        Ok(r) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&r.payload);
            let _ = out.write_all(b"\n");
            exit::OK
        }
        Err(InvokeError::Function {
            error_type,
            error_message,
            body,
            ..
        }) => {
            // The function's error object as it posted it (Lambda's Invoke
            // answers with it: `stackTrace` and any other fields kept), on
            // one line, with the type and message sluice read from it.
            let mut error = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            error.insert("errorType".into(), error_type.into());
            error.insert("errorMessage".into(), error_message.into());
            eprintln!("{}", serde_json::Value::Object(error));
            exit::FUNCTION_ERROR
        }
        Err(e) => {
            crate::log_error!("{e} [{}]", e.error_type());
            exit::INVOKE_FAILED
        }
    }
}
