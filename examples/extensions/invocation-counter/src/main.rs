//! An external Lambda extension written with the official `lambda-extension`
//! crate, unchanged from what runs in AWS: it registers for `INVOKE` and
//! `SHUTDOWN` events and subscribes to the Telemetry API for the function's
//! log lines; it writes a line for each call of the function it runs
//! beside, and a summary (calls, lines the function wrote) when the
//! sandbox stops.
//!
//! Packaged as a layer: the binary at `extensions/invocation-counter` in the
//! layer's folder (`/opt/extensions/invocation-counter` in the sandbox),
//! which sluice starts before the function's `bootstrap`, as Lambda does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lambda_extension::{
    Error, Extension, LambdaEvent, LambdaTelemetry, LambdaTelemetryRecord, NextEvent,
    SharedService, service_fn,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let calls = Arc::new(AtomicU64::new(0));
    let lines = Arc::new(AtomicU64::new(0));
    let counted = lines.clone();
    let telemetry = service_fn(move |batch: Vec<LambdaTelemetry>| {
        let lines = counted.clone();
        async move {
            let n = batch
                .iter()
                .filter(|t| matches!(t.record, LambdaTelemetryRecord::Function(_)))
                .count();
            lines.fetch_add(n as u64, Ordering::SeqCst);
            Ok::<(), Error>(())
        }
    });
    let events = service_fn(move |event: LambdaEvent| {
        let (calls, lines) = (calls.clone(), lines.clone());
        async move {
            match event.next {
                NextEvent::Invoke(e) => {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    println!("invocation-counter: call {n} ({})", e.request_id);
                }
                NextEvent::Shutdown(e) => {
                    println!(
                        "invocation-counter: {} calls, {} function log lines; shutting down ({})",
                        calls.load(Ordering::SeqCst),
                        lines.load(Ordering::SeqCst),
                        e.shutdown_reason
                    );
                }
            }
            Ok::<(), Error>(())
        }
    });
    Extension::new()
        .with_events_processor(events)
        .with_telemetry_types(&["function"])
        .with_telemetry_processor(SharedService::new(telemetry))
        .run()
        .await
}
