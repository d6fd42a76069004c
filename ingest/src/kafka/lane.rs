//! One partition's work: a dispatcher that hashes records by key onto
//! `parallelization_factor` sub-lanes, and sub-lanes that batch, invoke,
//! retry, bisect and dead-letter, one batch at a time, in offset order.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_executor::InvokeError;
use sluice_protocol::MAX_PAYLOAD;
use tokio::sync::{mpsc, watch};

use super::offsets::OffsetTracker;
use super::sink::OutRecord;
use super::stateful::{self, Carried};
use super::{Control, TriggerShared};
use crate::event::{self, EventSource, FailureInfo};
use crate::metrics::BatchOutcome;
use crate::record::Record;
use sluice_pipeline::OnFailure;

/// What the poll thread keeps per partition.
pub(super) struct LaneHandle {
    /// Records in offset order, in chunks (what one poll burst got).
    pub tx: mpsc::UnboundedSender<Vec<Record>>,
    pub stop: watch::Sender<bool>,
    pub done: std::sync::mpsc::Receiver<()>,
    pub backlog: Arc<AtomicUsize>,
    pub paused: Arc<AtomicBool>,
}

/// Start the tasks of one partition.
pub(super) fn spawn(
    shared: Arc<TriggerShared>,
    topic: String,
    partition: i32,
    skip_before: Option<i64>,
) -> LaneHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    let (done_tx, done) = std::sync::mpsc::channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    let paused = Arc::new(AtomicBool::new(false));
    let lane = Partition {
        carried: None,
        shared: shared.clone(),
        topic,
        partition,
        tracker: Arc::new(Mutex::new(OffsetTracker::default())),
        backlog: backlog.clone(),
        paused: paused.clone(),
        stop: stop_rx,
    };
    shared.runtime.spawn(async move {
        lane.dispatch(rx, skip_before).await;
        let _ = done_tx.send(());
    });
    LaneHandle {
        tx,
        stop,
        done,
        backlog,
        paused,
    }
}

#[derive(Clone)]
pub(super) struct Partition {
    pub(super) shared: Arc<TriggerShared>,
    pub(super) topic: String,
    pub(super) partition: i32,
    tracker: Arc<Mutex<OffsetTracker>>,
    backlog: Arc<AtomicUsize>,
    paused: Arc<AtomicBool>,
    pub(super) stop: watch::Receiver<bool>,
    /// Stateful triggers: the partition's checkpoint (loaded before any
    /// record is processed).
    pub(super) carried: Option<Arc<Carried>>,
}

/// At most this much of a function's error message goes into one log line
/// (a function can put a whole batch in its message); the on-failure topic
/// gets all of it.
const LOGGED_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`LOGGED_MESSAGE_BYTES`] (at a character boundary),
/// saying how long it was.
pub(crate) fn for_log(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= LOGGED_MESSAGE_BYTES {
        return message.into();
    }
    let mut end = LOGGED_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &message[..end], message.len()).into()
}

/// How one attempt of a batch failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) error_type: String,
    pub(crate) message: String,
    pub(crate) retryable: bool,
}

impl From<&InvokeError> for Failure {
    fn from(e: &InvokeError) -> Self {
        let (error_type, message) = match e {
            InvokeError::Function {
                error_type,
                error_message,
                ..
            } => (error_type.clone(), error_message.clone()),
            other => (other.error_type().to_owned(), other.to_string()),
        };
        Failure {
            error_type,
            message,
            retryable: e.retryable() || matches!(e, InvokeError::InitFailed { .. }),
        }
    }
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Partition {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn dispatch(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Vec<Record>>,
        mut skip_before: Option<i64>,
    ) {
        if let Some(store) = self.shared.state_store.clone() {
            match self.load_checkpoint(store).await {
                Some(carried) => self.carried = Some(Arc::new(carried)),
                None => return,
            }
        }
        let scope = self.shared.trigger.state.as_ref().map(|s| s.scope);
        let n = self.shared.trigger.parallelization_factor.max(1) as usize;
        let mut subs = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for slot in 0..n {
            let (tx, sub_rx) = mpsc::unbounded_channel();
            let lane = self.clone();
            handles.push(tokio::spawn(
                async move { lane.sub_lane(sub_rx, slot).await },
            ));
            subs.push(tx);
        }
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = rx.recv() => match r {
                    Some(mut chunk) => {
                        {
                            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
                            for rec in &chunk {
                                t.dispatched(rec.offset);
                            }
                        }
                        if let Some(cut) = skip_before {
                            // Before the starting timestamp: done, not delivered.
                            let early = chunk.iter().take_while(|r| r.timestamp_ms < cut).count();
                            if early > 0 {
                                self.finish(&chunk[..early]);
                                chunk.drain(..early);
                            }
                            if chunk.is_empty() {
                                continue;
                            }
                            skip_before = None;
                        }
                        if n == 1 {
                            let _ = subs[0].send(chunk);
                        } else {
                            let mut parts: Vec<Vec<Record>> = vec![Vec::new(); n];
                            for rec in chunk {
                                let slot = match scope {
                                    // Stateful: by state key, as the idle
                                    // window check finds its keys.
                                    Some(scope) => key_slot(
                                        Some(stateful::state_key(scope, &rec).as_bytes()),
                                        n,
                                    ),
                                    None => key_slot(rec.key.as_deref(), n),
                                };
                                parts[slot].push(rec);
                            }
                            for (sub, part) in subs.iter().zip(parts) {
                                if !part.is_empty() {
                                    let _ = sub.send(part);
                                }
                            }
                        }
                    }
                    None => break,
                },
            }
        }
        drop(subs);
        for h in handles {
            let _ = h.await;
        }
        self.commit().await;
    }

    async fn commit(&self) {
        if let Some(txn) = &self.shared.txn {
            // Offsets of records finished without output (filtered, on the
            // on-failure topic) go in an offsets-only transaction.
            let next = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .committable_after(&[]);
            if let Some(next) = next {
                match txn
                    .commit(None, &[], &self.topic, self.partition, Some(next))
                    .await
                {
                    Ok(()) => self
                        .tracker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .mark_committed(next),
                    Err(e) => {
                        tracing::warn!(trigger = %self.shared.trigger.name, "offsets transaction failed (retried with the next batch): {e}")
                    }
                }
            }
            return;
        }
        let next = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_committable();
        if let Some(offset) = next {
            let _ = self.shared.control.send(Control::Commit {
                topic: self.topic.clone(),
                partition: self.partition,
                offset,
            });
        }
    }

    pub(super) fn finish(&self, records: &[Record]) {
        {
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            for r in records {
                t.finished(r.offset);
            }
        }
        let left = self.backlog.fetch_sub(records.len(), Ordering::SeqCst) - records.len();
        self.shared.activity.finished(records.len());
        if left <= self.shared.low_water && self.paused.swap(false, Ordering::SeqCst) {
            let _ = self.shared.control.send(Control::Resume {
                topic: self.topic.clone(),
                partition: self.partition,
            });
        }
    }

    async fn sub_lane(self, mut rx: mpsc::UnboundedReceiver<Vec<Record>>, slot: usize) {
        let idle_check = self.idle_check();
        let slots = self.shared.trigger.parallelization_factor.max(1) as usize;
        let t = &self.shared.trigger;
        // Received, not yet in a batch (in offset order).
        let mut queued: VecDeque<Record> = VecDeque::new();
        let mut closed = false;
        let mut stop = self.stop.clone();
        loop {
            if self.stopped() {
                return;
            }
            let first = match queued.pop_front() {
                Some(r) => r,
                None if closed => return,
                None => tokio::select! {
                    biased;
                    _ = stop.changed() => return,
                    _ = sleep_or_never(idle_check) => {
                        if !self.close_idle_windows(slot, slots).await {
                            return;
                        }
                        continue;
                    }
                    r = rx.recv() => match r {
                        Some(chunk) => {
                            queued.extend(chunk);
                            match queued.pop_front() {
                                Some(r) => r,
                                None => continue,
                            }
                        }
                        None => return,
                    },
                },
            };
            let mut batch = Vec::with_capacity((t.batch_size as usize).min(1024));
            let mut bytes = 0usize;
            let deadline = Instant::now() + t.batch_window;
            let mut next = Some(first);
            loop {
                if let Some(rec) = next.take() {
                    match self.admit(rec).await {
                        Admit::Keep(rec) => {
                            if !batch.is_empty() && bytes + rec.size() > t.max_batch_bytes {
                                queued.push_front(rec);
                                break;
                            }
                            bytes += rec.size();
                            batch.push(rec);
                        }
                        Admit::Done => {}
                    }
                }
                // The stop flag sits behind a lock: look every 64 records.
                if batch.len() >= t.batch_size as usize || (batch.len() % 64 == 0 && self.stopped())
                {
                    break;
                }
                // What is already here joins without arming a timer.
                if let Some(r) = queued.pop_front() {
                    next = Some(r);
                    continue;
                }
                match rx.try_recv() {
                    Ok(chunk) => {
                        queued.extend(chunk);
                        next = queued.pop_front();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() && !batch.is_empty() {
                    break;
                }
                tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    r = tokio::time::timeout(left.max(Duration::from_millis(if batch.is_empty() { 3_600_000 } else { 0 })), rx.recv()) => match r {
                        Ok(Some(chunk)) => {
                            queued.extend(chunk);
                            next = queued.pop_front();
                        }
                        Ok(None) => {
                            closed = true;
                            break;
                        }
                        Err(_) => if !batch.is_empty() { break },
                    },
                }
            }
            if !batch.is_empty() {
                self.process(batch).await;
                self.commit().await;
            }
        }
    }

    /// Filter and size checks before a record joins a batch.
    async fn admit(&self, rec: Record) -> Admit {
        let t = &self.shared.trigger;
        if rec.size() > t.max_batch_bytes.min(MAX_PAYLOAD) {
            let f = Failure {
                error_type: "Sluice.RecordTooLarge".into(),
                message: format!(
                    "record of {} bytes exceeds max_batch_bytes ({})",
                    rec.size(),
                    t.max_batch_bytes
                ),
                retryable: false,
            };
            self.dead_letter_or_drop(vec![rec], &f, 0).await;
            return Admit::Done;
        }
        if let Some(pattern) = &t.filter {
            let event::FilterView { view, value } = event::filter_view(&rec);
            // A value that is not JSON is matched as text (Lambda's
            // plain-string messages). If no pattern matched it and the
            // filter expects JSON fields inside values, not text (or reads a
            // value that is not even text), the record is malformed for it.
            let (matched, malformed) = match value {
                event::ValueForm::Json => (pattern.matches(&view), None),
                event::ValueForm::Text(e) => {
                    let matched = pattern.matches_plain_text(&view);
                    let expects_json =
                        pattern.looks_inside_value() && !pattern.reads_value_as_text();
                    (matched, (!matched && expects_json).then_some(e))
                }
                event::ValueForm::Binary(e) => {
                    let matched = pattern.matches_plain_text(&view);
                    (matched, (!matched && pattern.reads_value()).then_some(e))
                }
            };
            if let Some(e) = malformed {
                let f = Failure {
                    error_type: "Sluice.MalformedRecord".into(),
                    message: format!("the filter expects a JSON value: {e}"),
                    retryable: false,
                };
                self.dead_letter_or_drop(vec![rec], &f, 0).await;
                return Admit::Done;
            }
            if !matched {
                self.shared.metrics.records_filtered(&t.name, 1);
                self.finish(std::slice::from_ref(&rec));
                return Admit::Done;
            }
        }
        Admit::Keep(rec)
    }

    /// Run one batch to completion: success, or retries, bisection and the
    /// on-failure topic. Records left unfinished (the lane was stopped) are
    /// not committed and will be redelivered.
    async fn process(&self, batch: Vec<Record>) {
        if self.carried.is_some() {
            self.process_stateful(batch).await;
            return;
        }
        let source = EventSource {
            event_source: "SelfManagedKafka",
            event_source_arn: None,
            bootstrap_servers: &self.shared.servers,
        };
        let mut work: VecDeque<(Vec<Record>, u32)> = VecDeque::from([(batch, 0)]);
        while let Some((recs, attempts)) = work.pop_front() {
            if attempts > 0 && self.stopped() {
                return;
            }
            let recs = match self.expire(recs, attempts).await {
                Some(fresh) if fresh.is_empty() => continue,
                Some(fresh) => fresh,
                None => return,
            };
            if !self.attempt(&source, recs, attempts, &mut work).await {
                return;
            }
        }
    }

    /// Send records older than `max_record_age` to the on-failure topic;
    /// `None` if the lane was stopped meanwhile.
    async fn expire(&self, recs: Vec<Record>, attempts: u32) -> Option<Vec<Record>> {
        let Some(age) = self.shared.trigger.max_record_age else {
            return Some(recs);
        };
        let cutoff = now_ms() - age.as_millis() as i64;
        let (expired, fresh): (Vec<_>, Vec<_>) = recs
            .into_iter()
            .partition(|r| r.timestamp_ms > 0 && r.timestamp_ms < cutoff);
        if !expired.is_empty() {
            let f = Failure {
                error_type: "Sluice.RecordExpired".into(),
                message: format!("record older than max_record_age ({age:?})"),
                retryable: false,
            };
            if !self.dead_letter_or_drop(expired, &f, attempts).await {
                return None;
            }
        }
        Some(fresh)
    }

    /// One invocation of `recs`. Returns false when the lane must stop.
    async fn attempt(
        &self,
        source: &EventSource<'_>,
        recs: Vec<Record>,
        attempts: u32,
        work: &mut VecDeque<(Vec<Record>, u32)>,
    ) -> bool {
        let t = &self.shared.trigger;
        let payload = event::kafka_event(source, &recs);
        if payload.len() > MAX_PAYLOAD && recs.len() > 1 {
            // The event would exceed the invoke payload limit: split it.
            let mut a = recs;
            let b = a.split_off(a.len() / 2);
            work.push_front((b, attempts));
            work.push_front((a, attempts));
            return true;
        }
        let started = Instant::now();
        let result = self.shared.executor.invoke(&t.function, payload).await;
        self.shared
            .metrics
            .observe_invoke(&t.name, started.elapsed().as_secs_f64());
        let failure = match result {
            Ok(resp) => {
                let failed = if t.report_batch_item_failures {
                    event::parse_batch_item_failures(&resp.payload, &recs)
                } else {
                    Ok(None)
                };
                match failed {
                    Ok(None) => {
                        return self.succeeded(&recs, &resp.payload, started).await;
                    }
                    Ok(Some(ids)) if ids.is_empty() => {
                        return self.succeeded(&recs, &resp.payload, started).await;
                    }
                    Ok(Some(ids)) => {
                        let (bad, good): (Vec<_>, Vec<_>) = recs.into_iter().partition(|r| {
                            ids.iter().any(|(tp, p, o)| {
                                tp.as_str() == &*r.topic && *p == r.partition && *o == r.offset
                            })
                        });
                        let produced = if self.shared.txn.is_some() {
                            self.transact(&good, &resp.payload).await
                        } else {
                            self.output(&resp.payload).await
                        };
                        if !produced {
                            return false;
                        }
                        self.shared
                            .metrics
                            .batch(&t.name, BatchOutcome::PartialFailure);
                        self.finish(&good);
                        let f = Failure {
                            error_type: "Sluice.BatchItemFailure".into(),
                            message: format!("the function reported {} failed item(s)", bad.len()),
                            retryable: true,
                        };
                        return self.failed(bad, attempts, f, work).await;
                    }
                    Err(e) => Failure {
                        error_type: "Sluice.InvalidBatchResponse".into(),
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
        self.failed(recs, attempts, failure, work).await
    }

    async fn succeeded(&self, recs: &[Record], response: &[u8], started: Instant) -> bool {
        let t = &self.shared.trigger;
        if self.shared.txn.is_some() {
            if !self.transact(recs, response).await {
                return false;
            }
        } else if !self.output(response).await {
            return false;
        }
        self.shared.metrics.batch(&t.name, BatchOutcome::Success);
        tracing::debug!(
            trigger = %t.name, topic = %self.topic, partition = self.partition,
            offsets = %format!("{}..={}", recs.first().map_or(0, |r| r.offset), recs.last().map_or(0, |r| r.offset)),
            records = recs.len(), ms = started.elapsed().as_millis() as u64, "batch succeeded"
        );
        self.finish(recs);
        true
    }

    async fn failed(
        &self,
        recs: Vec<Record>,
        attempts: u32,
        f: Failure,
        work: &mut VecDeque<(Vec<Record>, u32)>,
    ) -> bool {
        let t = &self.shared.trigger;
        if let Some(held_back) = self.shared.failure_log.admit() {
            tracing::warn!(
                trigger = %t.name, topic = %self.topic, partition = self.partition,
                first_offset = recs.first().map(|r| r.offset), records = recs.len(),
                attempts = attempts + 1, error_type = %f.error_type, held_back,
                "batch failed: {}", for_log(&f.message)
            );
        }
        if t.bisect_batch_on_error && recs.len() > 1 {
            // Bisecting does not count as a retry (as in Lambda).
            let mut a = recs;
            let b = a.split_off(a.len() / 2);
            work.push_front((b, attempts));
            work.push_front((a, attempts));
            return true;
        }
        let attempts = attempts + 1;
        let may_retry = f.retryable && t.max_retry_attempts.is_none_or(|max| attempts <= max);
        if may_retry {
            self.shared.metrics.retry(&t.name);
            if !self.backoff(attempts).await {
                return false;
            }
            work.push_front((recs, attempts));
            return true;
        }
        self.dead_letter_or_drop(recs, &f, attempts).await
    }

    /// Wait before retry `attempts` (exponential from `retry_backoff` up
    /// to `retry_backoff_max`); false if the lane was stopped first.
    pub(super) async fn backoff(&self, attempts: u32) -> bool {
        let t = &self.shared.trigger;
        let exp = attempts.saturating_sub(1).min(20);
        let delay = t
            .retry_backoff
            .saturating_mul(1u32 << exp)
            .min(t.retry_backoff_max);
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop.changed() => false,
        }
    }

    /// Write failed records to the on-failure destination (waiting for the
    /// broker's acknowledgement or the store's, retrying until it comes)
    /// and mark them finished. Without an on-failure destination (only
    /// possible for records the function never saw: malformed or too
    /// large), they are logged and skipped. Returns false when the lane was
    /// stopped first.
    pub(super) async fn dead_letter_or_drop(
        &self,
        recs: Vec<Record>,
        f: &Failure,
        attempts: u32,
    ) -> bool {
        let t = &self.shared.trigger;
        let Some(destination) = &t.on_failure else {
            for r in &recs {
                if let Some(held_back) = self.shared.failure_log.admit() {
                    tracing::error!(
                        trigger = %t.name, topic = %r.topic, partition = r.partition, offset = r.offset,
                        error_type = %f.error_type, held_back,
                        "record skipped (no on_failure destination configured): {}", for_log(&f.message)
                    );
                }
            }
            self.finish(&recs);
            return true;
        };
        let info = FailureInfo {
            function: &t.function,
            error_type: &f.error_type,
            error_message: &f.message,
            attempts,
        };
        let source = EventSource {
            event_source: "SelfManagedKafka",
            event_source_arn: None,
            bootstrap_servers: &self.shared.servers,
        };
        let out: Vec<OutRecord> = match destination {
            OnFailure::Topic(_) => recs
                .iter()
                .map(|r| OutRecord {
                    key: r.key.as_deref().map(<[u8]>::to_vec),
                    value: r.value.as_deref().map(<[u8]>::to_vec),
                    headers: event::failure_headers(r, &info),
                    partition: None,
                })
                .collect(),
            OnFailure::Objects(_) => Vec::new(),
        };
        let mut delay = Duration::from_millis(100);
        loop {
            let written = match (destination, &self.shared.sink, &self.shared.failure_objects) {
                (OnFailure::Topic(topic), Some(sink), _) => {
                    sink.send_all(topic, &out).await.map_err(|e| e.to_string())
                }
                (OnFailure::Objects(_), _, Some(objects)) => objects
                    .write(&recs, &info, &source)
                    .await
                    .map(|names| {
                        tracing::debug!(trigger = %t.name, objects = ?names, "failed records written");
                    })
                    .map_err(|e| e.to_string()),
                _ => Err("the on-failure destination was not opened".to_owned()),
            };
            match written {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(trigger = %t.name, on_failure = %destination, "writing to the on-failure destination failed, retrying: {e}");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.shared.metrics.dlq_write(&t.name, recs.len() as u64);
        if let Some(held_back) = self.shared.failure_log.admit() {
            tracing::info!(
                trigger = %t.name, on_failure = %destination, records = recs.len(),
                offsets = ?recs.iter().map(|r| r.offset).collect::<Vec<_>>(),
                error_type = %f.error_type, attempts, held_back,
                "records written to the on-failure destination"
            );
        }
        self.finish(&recs);
        true
    }

    /// `exactly_once`: produce the response and commit the offsets that
    /// finishing `recs` makes committable, in one transaction; retried (each
    /// failed attempt aborted) until it commits or the lane stops.
    async fn transact(&self, recs: &[Record], response: &[u8]) -> bool {
        let Some(txn) = &self.shared.txn else {
            return true;
        };
        let t = &self.shared.trigger;
        let out = output_records(response);
        let offsets: Vec<i64> = recs.iter().map(|r| r.offset).collect();
        let mut delay = t.retry_backoff;
        loop {
            let next = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .committable_after(&offsets);
            // Records above an unfinished one: their offsets wait for a later
            // transaction; the output is still produced now, atomically.
            let result = txn
                .commit(
                    t.output_topic.as_deref(),
                    &out,
                    &self.topic,
                    self.partition,
                    next,
                )
                .await;
            match result {
                Ok(()) => {
                    if let Some(next) = next {
                        self.tracker
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .mark_committed(next);
                    }
                    return true;
                }
                Err(e) => {
                    tracing::warn!(trigger = %t.name, "transaction aborted, retrying: {e}");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => return false,
                    }
                    delay = (delay * 2).min(t.retry_backoff_max);
                }
            }
        }
    }

    /// Produce the function's response to the output topic, if any.
    pub(super) async fn output(&self, response: &[u8]) -> bool {
        let t = &self.shared.trigger;
        let (Some(topic), Some(sink)) = (&t.output_topic, &self.shared.sink) else {
            return true;
        };
        let out = output_records(response);
        let mut delay = Duration::from_millis(100);
        loop {
            match sink.send_all(topic, &out).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(trigger = %t.name, output_topic = %topic, "producing the response failed, retrying: {e}");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Sleep for `d`, or forever without one.
async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

enum Admit {
    Keep(Record),
    Done,
}

pub(super) fn key_slot(key: Option<&[u8]>, n: usize) -> usize {
    let Some(k) = key else { return 0 };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut h);
    (h.finish() % n as u64) as usize
}

/// A response `{"records": [{"key", "value", "headers"}]}` becomes those
/// records (string values as-is, others as JSON text); any other response is
/// one record holding it.
pub(crate) fn output_records(response: &[u8]) -> Vec<OutRecord> {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(response).ok();
    if let Some(list) = parsed
        .as_ref()
        .and_then(|v| v.get("records"))
        .and_then(|r| r.as_array())
    {
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        return list
            .iter()
            .map(|r| OutRecord {
                key: r.get("key").filter(|k| !k.is_null()).map(text),
                value: r.get("value").filter(|k| !k.is_null()).map(text),
                headers: r
                    .get("headers")
                    .and_then(|h| h.as_object())
                    .map(|h| h.iter().map(|(k, v)| (k.clone(), text(v))).collect())
                    .unwrap_or_default(),
                partition: None,
            })
            .collect();
    }
    vec![OutRecord {
        key: None,
        value: Some(response.to_vec()),
        headers: vec![],
        partition: None,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_messages_are_cut_for_the_log_at_a_character_boundary() {
        assert_eq!(for_log("short"), "short");
        let long = "é".repeat(LOGGED_MESSAGE_BYTES); // 2 bytes each
        let cut = for_log(&long);
        let (kept, note) = cut.split_once('…').expect("a cut message");
        assert_eq!(kept.len(), LOGGED_MESSAGE_BYTES);
        assert_eq!(
            note,
            format!(" ({} bytes in all)", 2 * LOGGED_MESSAGE_BYTES)
        );
        let odd = format!("a{long}");
        let (kept, _) = for_log(&odd)
            .split_once('…')
            .map(|(k, n)| (k.len(), n.to_owned()))
            .expect("cut");
        assert_eq!(kept, LOGGED_MESSAGE_BYTES - 1, "not inside a character");
    }
}
