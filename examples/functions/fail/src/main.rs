//! A function that fails on purpose, to show how errors travel.
//!
//! Every event is rejected with an `OrderRejected` error, which the runtime
//! reports to `/invocation/{id}/error` as
//! `{"errorType": "OrderRejected", "errorMessage": "..."}`. The one exception
//! is the event `{"succeed": true}`, answered with `{"ok": true}`, so that a
//! batch can mix successes and failures.

use std::fmt;

use lambda_runtime::{Diagnostic, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

/// The error this function returns: an ordinary Rust error type.
#[derive(Debug)]
struct OrderRejected {
    event: Value,
}

impl fmt::Display for OrderRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "order rejected: {}", self.event)
    }
}

impl std::error::Error for OrderRejected {}

/// How the error is reported to the Runtime API. Without this conversion the
/// runtime would use the Rust type name as `errorType`; here we pick a short,
/// stable name callers can match on.
impl From<OrderRejected> for Diagnostic {
    fn from(error: OrderRejected) -> Diagnostic {
        Diagnostic {
            error_type: "OrderRejected".into(),
            error_message: error.to_string(),
        }
    }
}

async fn handler(event: LambdaEvent<Value>) -> Result<Value, OrderRejected> {
    let (payload, _context) = event.into_parts();
    if payload == json!({ "succeed": true }) {
        return Ok(json!({ "ok": true }));
    }
    Err(OrderRejected { event: payload })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
