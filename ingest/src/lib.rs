//! # sluice-ingest: pollers (not built yet)
//!
//! This crate will own the event sources that trigger functions: Kafka
//! consumer groups with Lambda event-source-mapping semantics (batches,
//! per-partition order, retries with backoff, bisecting, partial batch
//! responses, on-failure topics, offsets committed only after success) and
//! object-store prefix pollers. `sluice run` will drive it.
//!
//! Nothing is implemented yet (see issue "Kafka-triggered functions").
