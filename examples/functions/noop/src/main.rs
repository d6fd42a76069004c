//! A function that does nothing: the no-op the benchmarks measure sluice
//! with (`sluice bench kafka`).
//!
//! Plain AWS Lambda code with the official Rust runtime (`lambda_runtime`):
//! the runtime fetches each event and deserializes it like any function's;
//! this one asks for `IgnoredAny`, so the event is checked to be JSON and
//! nothing of it is kept. It answers `null`.
//!
//! A Lambda function handles one event at a time, so it runs tokio's
//! single-threaded runtime: no worker threads to wake on a 2-core machine
//! shared with sluice and the broker (worth about a quarter more records/s in
//! `sluice bench kafka` here than the default multi-threaded runtime).

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde::de::IgnoredAny;

async fn handler(_event: LambdaEvent<IgnoredAny>) -> Result<(), Error> {
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
