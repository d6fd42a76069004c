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
//! Object-store prefix pollers are not built yet.

mod error;
pub mod event;
pub mod kafka;
pub mod metrics;
pub mod record;

pub use error::IngestError;
