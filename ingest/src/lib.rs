//! # sluice-ingest: pollers that trigger functions
//!
//! Kafka consumer groups with AWS Lambda event-source-mapping semantics
//! (work in progress).

pub mod event;
pub mod metrics;
pub mod record;
