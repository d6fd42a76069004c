//! # sluice-state-carrier: state through successive calls (not built yet)
//!
//! This crate will own the intermediary that passes the state a call returns
//! into the next call of the same partition or key (Lambda's tumbling-window
//! contract, Flink-style keyed state), checkpointing state and input position
//! together and atomically before offsets are committed, with a compacted
//! Kafka changelog for scale-out.
//!
//! Nothing is implemented yet (see issue "State carried through successive calls").
