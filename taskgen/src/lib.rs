//! # sluice-taskgen: data sets to task calls (not built yet)
//!
//! This crate will own the item readers behind `sluice backfill`: Parquet,
//! CSV, JSON lines and text files read through `object_store`, items batched
//! into calls, ordering by key and explicit dependencies, and a durable
//! progress store so that every item is called at least once across crashes
//! and restarts.
//!
//! Nothing is implemented yet (see issue "`sluice backfill`").
