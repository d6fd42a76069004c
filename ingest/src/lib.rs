//! # sluice-ingest: pollers that trigger functions
//!
//! Kafka consumer groups with AWS Lambda's Kafka event-source-mapping
//! semantics ([`kafka`]): batches in Lambda's Kafka event format,
//! per-partition order (per-key with `parallelization_factor`), retries with
//! exponential backoff, bisection, partial batch responses, on-failure topics,
//! and offsets committed only after success or after the failed records are
//! durably in the on-failure topic. Scale-out is the consumer group's: start
//! more `sluice run` processes with the same pipeline.
//!
//! Lambda's Invoke API over HTTP ([`invoke_api`], `sluice serve`): AWS SDKs
//! and the AWS CLI pointed at sluice invoke its functions, synchronously or
//! as asynchronous events.
//!
//! Object-store prefixes ([`objects`]): Lambda's S3 trigger by polling.
//! Every new or overwritten object under a prefix invokes the function once
//! with an S3 event notification, its bytes staged in the sandbox; what was
//! handled is kept in a local redb store, so a restart calls every object
//! not yet recorded, and objects whose calls fail for good go to a
//! dead-letter file.

mod error;
pub mod event;
pub mod group_commit;
pub mod invoke_api;
pub mod kafka;
pub mod metrics;
pub mod objects;
pub mod record;
pub mod results;

pub use error::IngestError;

/// Log lines a trigger writes about failed calls and records (a batch that
/// failed, a record sent to the on-failure topic or skipped, an object
/// retried or failed for good) at most, per second and trigger, with bursts
/// of ten times as many. A function that fails every call, or a topic full
/// of malformed records, would otherwise write a line per record; each line
/// shown says how many were held back before it (`held_back`), and
/// `/metrics`, the on-failure topic and the dead-letter file still count
/// and keep every one.
pub const FAILURE_LOG_LINES_PER_SEC: u32 = 10;

/// A limiter of [`FAILURE_LOG_LINES_PER_SEC`].
pub(crate) fn failure_log() -> sluice_executor::LogRateLimiter {
    sluice_executor::LogRateLimiter::new(FAILURE_LOG_LINES_PER_SEC)
}

/// Accepts connections on `listener` until `shutdown` resolves, each
/// served by `serve` as a task in `connections` (finished tasks are reaped
/// as it goes); then closes the listener. A failed accept (typically out
/// of file descriptors) is logged and retried a little later rather than
/// spun on. The caller decides what becomes of the connections left.
pub(crate) async fn accept_until<F>(
    what: &str,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    connections: &mut tokio::task::JoinSet<()>,
    serve: impl Fn(tokio::net::TcpStream, std::net::SocketAddr) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve(stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
}

/// Executor settings of a function declared in a pipeline file.
pub fn function_spec(f: &sluice_pipeline::FunctionConfig) -> sluice_executor::FunctionSpec {
    let mut s = sluice_executor::FunctionSpec::new(f.name.clone(), f.path.clone());
    s.memory_mb = f.memory_mb;
    s.timeout = f.timeout;
    s.init_timeout = f.init_timeout;
    s.concurrency = f.concurrency;
    s.max_queue = f.max_queue;
    s.idle_timeout = f.idle_timeout;
    s.env = f.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    s.tenant = f.tenant.clone();
    s.handler = f.handler.clone();
    s.max_processes = f.max_processes;
    s.tmp_mb = f.tmp_mb;
    s.vcpus = u8::try_from(f.vcpus).unwrap_or(u8::MAX);
    s.min_warm = f.min_warm;
    s.max_warm = f.max_warm;
    s.prewarm = f.prewarm;
    s.snapshot = f.snapshot;
    s.pin_cpu = f.pin_cpu;
    s.layers = f.layers.clone();
    s
}
