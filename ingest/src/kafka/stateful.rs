//! Stateful triggers (`state = { ... }`): the lane's batches go through the
//! state carrier ([`sluice_state_carrier`]) instead of being invoked as they
//! are.
//!
//! Per batch, records are grouped by state key (the partition, or the record
//! key), keeping offset order within a key. For each key, in order:
//! 1. records at or below the key's checkpointed `last_offset` were folded
//!    before a crash or rebalance: they are finished without a call;
//! 2. the fold says which records go into the next call and in which window
//!    (or that the open window must close first, with a final invoke);
//! 3. the call carries Lambda's tumbling-window fields; its response must
//!    carry `state`; failed calls are retried like any batch (backoff,
//!    `max_retry_attempts`, then the on-failure topic, the state unchanged);
//! 4. after the batch, the partition's checkpoint (every key's new state
//!    and position) is saved durably, once, and only then are the folded
//!    records finished, which lets their offsets be committed.
//!
//! A final invoke (`records` empty, `isFinalInvokeForWindow: true`) has its
//! response produced to `output_topic` (if any); a failed final invoke is
//! retried until it succeeds, holding the key (its sub-lane) back.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use sluice_pipeline::{StateConfig, StateScope, StateWindow};
use sluice_state_carrier::{Checkpoint, Item, KeyState, Step, Store, Window};

use super::lane::{Failure, Partition};
use crate::event::{self, EventSource};
use crate::metrics::BatchOutcome;
use crate::record::Record;

/// The checkpoint of one partition and where it is saved.
pub(super) struct Carried {
    pub cp: tokio::sync::Mutex<Checkpoint>,
    pub store: Arc<dyn Store>,
}

/// The state key of a record: `""` for the partition scope; the record key
/// for the key scope (UTF-8 as it is, other bytes as `base64:…`; no key is
/// `""`).
pub(super) fn state_key(scope: StateScope, rec: &Record) -> String {
    match (scope, &rec.key) {
        (StateScope::Partition, _) | (StateScope::Key, None) => String::new(),
        (StateScope::Key, Some(k)) => match std::str::from_utf8(k) {
            Ok(s) => s.to_owned(),
            Err(_) => format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(k)
            ),
        },
    }
}

/// The checkpoint source of a partition.
pub(super) fn source(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}/{topic}/{partition}")
}

/// How one stateful call ended.
enum Called {
    /// Folded: the key's next state.
    Folded(KeyState),
    /// Given up: the records went to the on-failure topic; state unchanged.
    DeadLettered,
    /// The lane was stopped first.
    Stopped,
}

impl Partition {
    fn spec(&self) -> &StateConfig {
        self.shared
            .trigger
            .state
            .as_ref()
            .expect("stateful lanes belong to stateful triggers")
    }

    fn carried(&self) -> &Carried {
        self.carried
            .as_deref()
            .expect("stateful lanes load their checkpoint first")
    }

    /// Load the partition's checkpoint, retrying (the partition waits) until
    /// it loads or the lane stops. A corrupt checkpoint is never used: the
    /// partition stays blocked and the error is logged until someone repairs
    /// or removes it.
    pub(super) async fn load_checkpoint(&self, store: Arc<dyn Store>) -> Option<Carried> {
        let src = source(&self.shared.trigger.group_id, &self.topic, self.partition);
        let mut delay = Duration::from_millis(200);
        loop {
            let s = store.clone();
            let key = src.clone();
            let loaded = tokio::task::spawn_blocking(move || s.load(&key)).await;
            match loaded {
                Ok(Ok(cp)) => {
                    let cluster = self
                        .shared
                        .cluster_id
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let cp = match cp {
                        Some(cp)
                            if cp.cluster.is_empty()
                                || cluster.is_empty()
                                || cp.cluster == cluster =>
                        {
                            cp
                        }
                        Some(cp) if cp.cluster.starts_with("embedded-") => {
                            tracing::warn!(
                                trigger = %self.shared.trigger.name, topic = %self.topic, partition = self.partition,
                                keys = cp.keys.len(),
                                "the checkpoint is from an earlier run's embedded broker, whose records are gone: starting with empty state"
                            );
                            Checkpoint::new(src.clone())
                        }
                        Some(cp) => {
                            tracing::error!(
                                trigger = %self.shared.trigger.name, topic = %self.topic, partition = self.partition,
                                "the checkpoint belongs to another Kafka cluster ({}; this one is {cluster}): its offsets mean nothing here; the partition waits (remove the checkpoint to start over)",
                                cp.cluster
                            );
                            let mut stop = self.stop.clone();
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = stop.changed() => return None,
                            }
                            delay = (delay * 2).min(Duration::from_secs(30));
                            continue;
                        }
                        None => Checkpoint::new(src.clone()),
                    };
                    let mut cp = cp;
                    cp.cluster = cluster;
                    tracing::info!(
                        trigger = %self.shared.trigger.name, topic = %self.topic,
                        partition = self.partition, keys = cp.keys.len(), seq = cp.seq,
                        "state restored"
                    );
                    return Some(Carried {
                        cp: tokio::sync::Mutex::new(cp),
                        store,
                    });
                }
                Ok(Err(e)) => {
                    tracing::error!(trigger = %self.shared.trigger.name, topic = %self.topic, partition = self.partition, "loading the state failed; the partition waits: {e}")
                }
                Err(e) => {
                    tracing::error!(trigger = %self.shared.trigger.name, "loading the state panicked: {e}")
                }
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Put `ks` as the state of `key` into the partition's checkpoint, in
    /// memory; [`Self::persist`] makes it durable.
    async fn stage(&self, key: &str, ks: &KeyState) {
        let mut cp = self.carried().cp.lock().await;
        cp.keys.insert(key.to_owned(), ks.clone());
    }

    /// Save the partition's checkpoint durably, retrying until it is saved
    /// or the lane stops (false). One save per batch: its records are
    /// finished (and their offsets committable) only after it.
    async fn persist(&self) -> bool {
        let carried = self.carried();
        let mut cp = carried.cp.lock().await;
        cp.seq += 1;
        let mut delay = Duration::from_millis(100);
        loop {
            let snapshot = cp.clone();
            let store = carried.store.clone();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || store.save(&snapshot)).await {
                Ok(Ok(())) => {
                    self.shared
                        .metrics
                        .state_checkpoint(&self.shared.trigger.name, started.elapsed());
                    return true;
                }
                Ok(Err(e)) => {
                    tracing::error!(trigger = %self.shared.trigger.name, "checkpointing the state failed, retrying: {e}")
                }
                Err(e) => {
                    tracing::error!(trigger = %self.shared.trigger.name, "checkpointing panicked: {e}")
                }
            }
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return false,
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Fold a batch. Returns false when the lane must stop.
    pub(super) async fn process_stateful(&self, batch: Vec<Record>) -> bool {
        let scope = self.spec().scope;
        // Keys in first-seen order, each with its records in offset order.
        let mut groups: Vec<(String, Vec<Record>)> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        for rec in batch {
            let key = state_key(scope, &rec);
            match index.get(&key) {
                Some(&i) => groups[i].1.push(rec),
                None => {
                    index.insert(key.clone(), groups.len());
                    groups.push((key, vec![rec]));
                }
            }
        }
        // Folded records: finished once the checkpoint holding them is saved.
        let mut folded = Vec::new();
        let mut changed = false;
        for (key, recs) in groups {
            if !self.fold_key(&key, recs, &mut folded, &mut changed).await {
                return false;
            }
        }
        if changed && !self.persist().await {
            return false;
        }
        self.finish(&folded);
        true
    }

    /// Fold one key's records of a batch; the records folded go to
    /// `folded`, and `changed` tells whether the checkpoint must be saved.
    async fn fold_key(
        &self,
        key: &str,
        recs: Vec<Record>,
        folded: &mut Vec<Record>,
        changed: &mut bool,
    ) -> bool {
        let spec = self.spec().clone();
        let mut ks = self
            .carried()
            .cp
            .lock()
            .await
            .keys
            .get(key)
            .cloned()
            .unwrap_or_default();
        let (seen, recs): (Vec<Record>, Vec<Record>) =
            recs.into_iter().partition(|r| ks.folded(r.offset));
        if !seen.is_empty() {
            tracing::debug!(trigger = %self.shared.trigger.name, key, records = seen.len(), "records already folded into the state: skipped");
            self.finish(&seen);
        }
        let items: Vec<Item> = recs
            .iter()
            .map(|r| Item {
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
            })
            .collect();
        let mut i = 0;
        while i < recs.len() {
            match ks.step(&spec, &items[i..]) {
                Step::Close { window, early } => {
                    if !self.final_invoke(key, &mut ks, window, early).await {
                        return false;
                    }
                    *changed = true;
                }
                Step::Invoke { n, window } => {
                    let seg = &recs[i..i + n];
                    match self
                        .call(key, &spec, &ks, seg, &items[i..i + n], window)
                        .await
                    {
                        Called::Folded(next) => {
                            ks = next;
                            self.stage(key, &ks).await;
                            *changed = true;
                            folded.extend_from_slice(seg);
                        }
                        Called::DeadLettered => {}
                        Called::Stopped => return false,
                    }
                    i += n;
                }
            }
        }
        if let Some(Step::Close { window, early }) = ks.due() {
            *changed = true;
            return self.final_invoke(key, &mut ks, window, early).await;
        }
        true
    }

    /// The key to name in events: the key scope's only.
    fn key_field<'k>(&self, key: &'k str) -> Option<&'k str> {
        (self.spec().scope == StateScope::Key).then_some(key)
    }

    fn source_event(&self) -> EventSource<'_> {
        EventSource {
            event_source: "SelfManagedKafka",
            event_source_arn: None,
            bootstrap_servers: &self.shared.servers,
        }
    }

    /// One call of `seg` with the key's state, retried as a batch is.
    async fn call(
        &self,
        key: &str,
        spec: &StateConfig,
        ks: &KeyState,
        seg: &[Record],
        items: &[Item],
        window: Window,
    ) -> Called {
        let t = &self.shared.trigger;
        let payload = ks.add_to_event(
            event::kafka_event(&self.source_event(), seg),
            self.key_field(key),
            &window,
            false,
            false,
        );
        let mut attempts = 0u32;
        loop {
            let started = std::time::Instant::now();
            let result = self
                .shared
                .executor
                .invoke(&t.function, payload.clone())
                .await;
            self.shared
                .metrics
                .observe_invoke(&t.name, started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(resp) => {
                    let mut next = ks.clone();
                    match next.fold(spec, window, items, &resp.payload) {
                        Ok(()) => {
                            self.shared.metrics.batch(&t.name, BatchOutcome::Success);
                            return Called::Folded(next);
                        }
                        Err(e) => Failure {
                            error_type: e.error_type().to_owned(),
                            message: e.to_string(),
                            retryable: true,
                        },
                    }
                }
                Err(e) => Failure::from(&e),
            };
            self.shared.metrics.batch(&t.name, BatchOutcome::Failed);
            self.shared
                .metrics
                .function_error(&t.name, &failure.error_type);
            attempts += 1;
            tracing::warn!(
                trigger = %t.name, topic = %self.topic, partition = self.partition,
                first_offset = seg.first().map(|r| r.offset), records = seg.len(),
                attempts, error_type = %failure.error_type, "stateful call failed: {}", failure.message
            );
            if failure.retryable && t.max_retry_attempts.is_none_or(|max| attempts <= max) {
                self.shared.metrics.retry(&t.name);
                if !self.backoff(attempts).await {
                    return Called::Stopped;
                }
                continue;
            }
            return if self
                .dead_letter_or_drop(seg.to_vec(), &failure, attempts)
                .await
            {
                Called::DeadLettered
            } else {
                Called::Stopped
            };
        }
    }

    /// Close `window` of `key`: a final invoke, retried until it succeeds
    /// (the key waits), its response produced to `output_topic`, then an
    /// empty state staged (the caller persists it). False if the lane
    /// stopped first.
    async fn final_invoke(
        &self,
        key: &str,
        ks: &mut KeyState,
        window: Window,
        early: bool,
    ) -> bool {
        let t = &self.shared.trigger;
        let payload = ks.add_to_event(
            event::kafka_event(&self.source_event(), &[]),
            self.key_field(key),
            &window,
            true,
            early,
        );
        let mut attempts = 0u32;
        loop {
            let result = self
                .shared
                .executor
                .invoke(&t.function, payload.clone())
                .await;
            let failure = match result {
                Ok(resp) => match sluice_state_carrier::fold::take_state(&resp.payload) {
                    Ok(_) => {
                        if !self.output(&resp.payload).await {
                            return false;
                        }
                        ks.closed(serde_json::from_slice(&resp.payload).ok());
                        self.shared.metrics.window_closed(&t.name, early);
                        tracing::info!(
                            trigger = %t.name, topic = %self.topic, partition = self.partition,
                            key, start = %sluice_state_carrier::fold::rfc3339(window.start_ms),
                            items = window.items, early, "window closed"
                        );
                        self.stage(key, ks).await;
                        return true;
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            attempts += 1;
            self.shared
                .metrics
                .function_error(&t.name, "Sluice.FinalInvokeFailed");
            tracing::warn!(
                trigger = %t.name, topic = %self.topic, partition = self.partition, key, attempts,
                "final invoke of the window failed; the key waits until it succeeds: {failure}"
            );
            if !self.backoff(attempts).await {
                return false;
            }
        }
    }

    /// Close the time windows of this sub-lane's keys whose end passed on
    /// the wall clock (called when the sub-lane is idle).
    pub(super) async fn close_idle_windows(&self, slot: usize, slots: usize) -> bool {
        let spec = self.spec().clone();
        let now = super::lane::now_ms();
        let due: Vec<(String, KeyState)> = {
            let cp = self.carried().cp.lock().await;
            cp.keys
                .iter()
                .filter(|(k, _)| {
                    slots <= 1 || super::lane::key_slot(Some(k.as_bytes()), slots) == slot
                })
                .filter(|(_, ks)| ks.due_when_idle(&spec, now).is_some())
                .map(|(k, ks)| (k.clone(), ks.clone()))
                .collect()
        };
        let closing = !due.is_empty();
        for (key, mut ks) in due {
            if let Some(Step::Close { window, early }) = ks.due_when_idle(&spec, now)
                && !self.final_invoke(&key, &mut ks, window, early).await
            {
                return false;
            }
        }
        !closing || self.persist().await
    }

    /// How long an idle sub-lane waits before checking its time windows.
    pub(super) fn idle_check(&self) -> Option<Duration> {
        match self.shared.trigger.state.as_ref()?.window {
            Some(StateWindow::Time(d)) => {
                Some(d.clamp(Duration::from_millis(100), Duration::from_secs(60)))
            }
            _ => None,
        }
    }
}
