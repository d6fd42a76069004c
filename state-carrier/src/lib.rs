//! # sluice-state-carrier: state through successive calls
//!
//! The intermediary between an ordered source of calls and a function that
//! folds them: each call carries the state the previous call of the same
//! partition or key returned, and the returned state goes into the next.
//! Opt in with `state = { scope, window, max_bytes, store }` on a Kafka
//! trigger or a backfill job (see `sluice_pipeline::StateConfig`).
//!
//! * [`fold`]: Lambda's tumbling-window contract as pure logic over a
//!   [`KeyState`]: which items go into the next call and in which window,
//!   the `state`/`window`/`isFinalInvokeForWindow`/`isWindowTerminatedEarly`
//!   fields of the event, the `state` of the response (required), final
//!   invokes when a window closes by time, count or size.
//! * [`checkpoint`]: the durable unit, every key of one source (a Kafka
//!   partition of a consumer group, or a backfill job) with the input
//!   position folded into each key's state (`last_offset`); versioned and
//!   checksummed.
//! * [`store`]: local checkpoint files, replaced atomically (the default),
//!   or a compacted Kafka changelog topic that lets the node receiving a
//!   partition after a rebalance restore its state.
//!
//! The callers (the Kafka lanes of `sluice-ingest`, the backfill runner of
//! `sluice-taskgen`) keep the order: a key's calls run one at a time, and a
//! checkpoint is saved after each successful call and before the input is
//! committed. After a crash, the input is redelivered from the last commit
//! and every item at or below a key's `last_offset` is skipped: state
//! effects happen exactly once even though delivery is at least once.

pub mod checkpoint;
mod error;
pub mod fold;
pub mod store;

use std::sync::Arc;

pub use checkpoint::{Checkpoint, CloseReason, KeyState, Window};
pub use error::{Fault, StateError};
pub use fold::{Item, Step};
pub use store::{ChangelogStore, FileStore, Store};

/// Open the store a state configuration names; `servers` and `properties`
/// are the Kafka cluster's (used by the changelog store).
pub async fn open_store(
    config: &sluice_pipeline::StateConfig,
    servers: &str,
    properties: &[(String, String)],
) -> Result<Arc<dyn Store>, StateError> {
    Ok(match &config.store {
        sluice_pipeline::StateStore::Local(dir) => Arc::new(FileStore::open(dir)?),
        sluice_pipeline::StateStore::Changelog(topic) => {
            Arc::new(ChangelogStore::open(servers, topic, properties).await?)
        }
    })
}
