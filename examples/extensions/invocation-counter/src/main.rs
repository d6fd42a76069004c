//! An external Lambda extension written with the official `lambda-extension`
//! crate, unchanged from what runs in AWS: it registers for `INVOKE` and
//! `SHUTDOWN` events, writes a line for each call of the function it runs
//! beside, and a summary when the sandbox stops.
//!
//! Packaged as a layer: the binary at `extensions/invocation-counter` in the
//! layer's folder (`/opt/extensions/invocation-counter` in the sandbox),
//! which sluice starts before the function's `bootstrap`, as Lambda does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lambda_extension::{Error, LambdaEvent, NextEvent, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let calls = Arc::new(AtomicU64::new(0));
    let events = service_fn(move |event: LambdaEvent| {
        let calls = calls.clone();
        async move {
            match event.next {
                NextEvent::Invoke(e) => {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    println!("invocation-counter: call {n} ({})", e.request_id);
                }
                NextEvent::Shutdown(e) => {
                    println!(
                        "invocation-counter: {} calls; shutting down ({})",
                        calls.load(Ordering::SeqCst),
                        e.shutdown_reason
                    );
                }
            }
            Ok::<(), Error>(())
        }
    });
    lambda_extension::run(events).await
}
