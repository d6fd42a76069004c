//! The smallest useful function: it returns every event it receives, unchanged.
//!
//! This is plain AWS Lambda code written with the official Rust runtime
//! (`lambda_runtime`); nothing in it is specific to sluice. The same binary,
//! named `bootstrap`, runs on AWS Lambda's `provided.al2023` runtime as is.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;

/// Called once per event. `LambdaEvent` carries the payload (any JSON here)
/// and the invocation context (request id, deadline, function ARN, ...).
async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    Ok(event.payload)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Poll the Runtime API (`$AWS_LAMBDA_RUNTIME_API`) for events, call the
    // handler on each one and post back its result, until the process is stopped.
    lambda_runtime::run(service_fn(handler)).await
}
