//! Stateful backfills: the items folded in input order through the state
//! carrier (see [`crate::StateOptions`]), streaming, with memory bounded by
//! the `max_buffered_items` budget rather than by the input's size.
//!
//! The input is read once, item by item (the crate's reader thread, as in
//! [`crate::schedule`]), each readable item numbered by its position among
//! the readable items of the input (file order, then row order): that
//! number is the item's offset in the checkpoint. Unreadable lines are
//! dead-lettered as they are read. Items are routed to per-key queues (one
//! key for the partition scope; the `order_key` value for the key scope);
//! items at or below the key's `last_offset` in the checkpoint were folded
//! by an earlier run and are skipped.
//!
//! Within a key, calls are cut by `max_items_per_call`,
//! `max_bytes_per_call` and the window, and run one after another, each
//! with the state the previous one returned; after each call the key's
//! state and position are checkpointed. A call is cut only once the key's
//! queue decides it exactly as if every item were there: the queue holds
//! `max_items_per_call` items, or more bytes than `max_bytes_per_call` (in
//! two items or more), or the input has ended. So the calls — and the
//! fold's result — do not depend on how fast the input is read. Calls of
//! different keys run in parallel, up to `max_concurrency` at once; a key
//! holds no slot while it waits for items.
//!
//! **Budget.** Items read and not yet folded (queued, or in a call in
//! flight) never exceed `max_buffered_items` (the peak is
//! [`Summary::peak_buffered_items`](crate::Summary)): at the budget, no item
//! is read until a call finishes (backpressure). If no call is in flight
//! and no queue can cut a call (every key waits for more of its items), the
//! keys with the oldest queued items (up to `max_concurrency`) are flushed:
//! their calls are cut from what they hold. Only then can calls be smaller
//! than without the budget (the state's result is the same for a fold that
//! does not depend on call boundaries); a flush always folds at least one
//! item, so the run always progresses.
//!
//! A call that fails `max_attempts` times has its items dead-lettered and
//! the position moves past them, the state unchanged. At the end of the
//! input every open window is closed with a final invoke.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value, json};
use sluice_pipeline::StateScope;
use sluice_state_carrier::{Checkpoint, Item, KeyState, Step, Store, Window};
use tokio::sync::Mutex;

use crate::read::Item as Read;
use crate::schedule::{Loaded, spawn_items};
use crate::{BackfillError, Call, Run};

/// What the key tasks share.
struct Shared {
    run: Arc<Run>,
    store: Arc<dyn Store>,
    cp: Mutex<Checkpoint>,
}

/// An item waiting to be folded.
struct Queued {
    /// Its offset in the checkpoint.
    offset: i64,
    /// Bytes of its JSON (what [`cut`] counts).
    size: usize,
    item: Loaded,
}

/// One key's items waiting to be folded.
struct KeyQueue {
    items: VecDeque<Queued>,
    /// Bytes of `items`.
    bytes: usize,
    /// The key's state; `None` while a call of the key runs.
    ks: Option<KeyState>,
    /// Items at or below this offset were folded by an earlier run.
    folded_before: i64,
    /// Whether the key is in the ready list.
    listed: bool,
    /// Whether its end of the input was handled (open window closed).
    ended: bool,
}

impl KeyQueue {
    /// Whether a call (or the end) can be cut now, as it would be with the
    /// whole input at hand.
    fn ready(&self, eof: bool, max_items: usize, max_bytes: usize) -> bool {
        if self.ks.is_none() {
            return false;
        }
        let n = self.items.len();
        if n == 0 {
            return eof && !self.ended;
        }
        // The bytes rule: with two items or more over `max_bytes`, the cut
        // stops before the last queued item, whatever follows.
        eof || n >= max_items || (n >= 2 && self.bytes > max_bytes)
    }
}

/// What a key task hands back.
struct Done {
    key: String,
    ks: KeyState,
    /// Items of the cut not folded (the window ended before them, or the
    /// run stops), in order.
    left: Vec<Queued>,
    /// Items taken (folded or dead-lettered).
    taken: usize,
    /// Whether this was the key's end (no items).
    end: bool,
    result: Result<(), BackfillError>,
}

/// Run a stateful backfill; returns whether `shutdown` interrupted it.
pub(crate) async fn run_folded<S: Future<Output = ()>>(
    run: &Arc<Run>,
    mut shutdown: Pin<&mut S>,
) -> Result<bool, BackfillError> {
    let opts = run
        .cfg
        .state
        .clone()
        .expect("run_folded runs stateful jobs");
    let store = sluice_state_carrier::open_store(&opts.config, &opts.servers, &[]).await?;
    let source = opts.source.clone();
    let loading = store.clone();
    let loaded = tokio::select! {
        biased;
        () = &mut shutdown => return Ok(true),
        cp = tokio::task::spawn_blocking(move || loading.load(&source)) => cp
            .map_err(|e| BackfillError::Config(format!("loading the state panicked: {e}")))??,
    };
    // A fold from scratch starts its dead-letter file afresh; a resumed one
    // keeps what earlier runs failed for good.
    let cp = match loaded {
        Some(cp) => {
            let earlier = run.dead.earlier() as u64;
            run.update(|s| s.earlier_failures = earlier);
            cp
        }
        None => {
            run.dead.restart()?;
            Checkpoint::new(opts.source.clone())
        }
    };
    let shared = Arc::new(Shared {
        run: run.clone(),
        store,
        cp: Mutex::new(cp),
    });
    let cfg = &run.cfg;
    let names: Vec<String> = cfg
        .sources
        .iter()
        .map(|s| s.display().to_string())
        .collect();
    let budget = cfg.max_buffered_items.max(1);
    let concurrency = cfg.max_concurrency.max(1);
    let (max_items, max_bytes) = (cfg.max_items_per_call.max(1), cfg.max_bytes_per_call);
    // A data set has no event time: windows show when they were folded.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);

    let mut keys: HashMap<String, KeyQueue> = HashMap::new();
    // Keys in order of first appearance.
    let mut order: Vec<String> = Vec::new();
    // Idle keys with queued items, by the offset of their first one.
    let mut heads: BTreeMap<i64, String> = BTreeMap::new();
    let mut ready: VecDeque<String> = VecDeque::new();
    // Items read and not folded yet: queued or in a call in flight.
    let (mut buffered, mut peak) = (0usize, 0usize);
    let mut next_offset: i64 = 0;
    let (mut rx, reader) = spawn_items(cfg.sources.clone(), cfg.input.clone());
    let mut tasks: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let (mut eof, mut interrupted) = (false, false);
    let mut first_error: Option<BackfillError> = None;

    // Starts a call (or the end) of `key` with the cut of its queue.
    let spawn = |key: &str,
                 keys: &mut HashMap<String, KeyQueue>,
                 heads: &mut BTreeMap<i64, String>,
                 tasks: &mut tokio::task::JoinSet<Done>| {
        let q = keys.get_mut(key).expect("a known key");
        let ks = q.ks.take().expect("an idle key");
        if let Some(head) = q.items.front() {
            heads.remove(&head.offset);
        }
        let n = cut(&q.items, max_items, max_bytes);
        let items: Vec<Queued> = q.items.drain(..n).collect();
        q.bytes -= items.iter().map(|i| i.size).sum::<usize>();
        let (shared, key) = (shared.clone(), key.to_owned());
        tasks.spawn(fold_call(shared, key, ks, items, now));
    };

    loop {
        if run.stop.load(Ordering::SeqCst) {
            break;
        }
        while tasks.len() < concurrency
            && let Some(key) = ready.pop_front()
        {
            let q = keys.get_mut(&key).expect("a known key");
            q.listed = false;
            if q.ready(eof, max_items, max_bytes) {
                spawn(&key, &mut keys, &mut heads, &mut tasks);
            }
        }
        // Nothing in flight, the budget full, and every key waiting for
        // more of its items: flush the keys holding the oldest items (all
        // keys are idle, and `buffered` items are queued).
        if !eof && buffered >= budget && tasks.is_empty() {
            let oldest: Vec<String> = heads.values().take(concurrency).cloned().collect();
            for key in oldest {
                spawn(&key, &mut keys, &mut heads, &mut tasks);
            }
        }
        let can_read = !eof && buffered < budget;
        if tasks.is_empty() && !can_read {
            // The end: every key ended (or the flush above found nothing,
            // which cannot happen with items buffered).
            break;
        }
        tokio::select! {
            biased;
            () = &mut shutdown => {
                interrupted = true;
                run.stop.store(true, Ordering::SeqCst);
                break;
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let done = match done {
                    Ok(done) => done,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => continue,
                };
                if let Err(e) = done.result {
                    run.stop.store(true, Ordering::SeqCst);
                    first_error.get_or_insert(e);
                }
                buffered -= done.taken;
                let q = keys.get_mut(&done.key).expect("a known key");
                q.ks = Some(done.ks);
                q.ended |= done.end;
                if let Some(head) = q.items.front() {
                    heads.remove(&head.offset);
                }
                for item in done.left.into_iter().rev() {
                    q.bytes += item.size;
                    q.items.push_front(item);
                }
                if let Some(head) = q.items.front() {
                    heads.insert(head.offset, done.key.clone());
                }
                if !q.listed && q.ready(eof, max_items, max_bytes) {
                    q.listed = true;
                    ready.push_back(done.key);
                }
            }
            next = rx.recv(), if can_read => match next {
                None => {
                    eof = true;
                    for key in &order {
                        let q = keys.get_mut(key).expect("a known key");
                        if !q.listed && q.ready(eof, max_items, max_bytes) {
                            q.listed = true;
                            ready.push_back(key.clone());
                        }
                    }
                }
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                    run.stop.store(true, Ordering::SeqCst);
                    break;
                }
                Some(Ok((file, index, Read::Bad(bad)))) => {
                    run.update(|s| s.items_total += 1);
                    run.bad_items(&Call {
                        bad: vec![bad],
                        ..Call::new(names[file].clone(), index)
                    });
                }
                Some(Ok((_, _, Read::Json(_)))) => {
                    unreachable!("read_file gives values, never JSON text")
                }
                Some(Ok((file, index, Read::Value(value)))) => {
                    let offset = next_offset;
                    next_offset += 1;
                    run.update(|s| s.items_total += 1);
                    let key = match opts.config.scope {
                        StateScope::Partition => String::new(),
                        StateScope::Key => run
                            .order_key_of(&value, &names[file], index)
                            .unwrap_or_default(),
                    };
                    if !keys.contains_key(&key) {
                        let ks = shared
                            .cp
                            .lock()
                            .await
                            .keys
                            .get(&key)
                            .cloned()
                            .unwrap_or_default();
                        keys.insert(
                            key.clone(),
                            KeyQueue {
                                items: VecDeque::new(),
                                bytes: 0,
                                folded_before: ks.last_offset,
                                ks: Some(ks),
                                listed: false,
                                ended: false,
                            },
                        );
                        order.push(key.clone());
                    }
                    let q = keys.get_mut(&key).expect("just added");
                    if offset <= q.folded_before {
                        run.update(|s| s.items_skipped += 1);
                    } else {
                        // What `serde_json::to_vec` makes (`json_size`
                        // counts a separating comma too).
                        let size = crate::json_size(&value) - 1;
                        if q.items.is_empty() && q.ks.is_some() {
                            heads.insert(offset, key.clone());
                        }
                        q.items.push_back(Queued {
                            offset,
                            size,
                            item: Loaded {
                                source: names[file].clone(),
                                index,
                                value,
                            },
                        });
                        q.bytes += size;
                        buffered += 1;
                        peak = peak.max(buffered);
                        if !q.listed && q.ready(eof, max_items, max_bytes) {
                            q.listed = true;
                            ready.push_back(key);
                        }
                    }
                }
            },
        }
    }
    drop(rx);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(done) => {
                if let Err(e) = done.result {
                    first_error.get_or_insert(e);
                }
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    let _ = reader.await;
    run.update(|s| s.peak_buffered_items = s.peak_buffered_items.max(peak as u64));
    match first_error {
        Some(e) => Err(e),
        None => Ok(interrupted),
    }
}

/// One step of `key`: with `items` (a cut of its queue), the window closes
/// it needs and one call, the items after that call handed back; without
/// items (the end of the input), the close of its open window.
async fn fold_call(
    shared: Arc<Shared>,
    key: String,
    mut ks: KeyState,
    mut items: Vec<Queued>,
    now: i64,
) -> Done {
    let end = items.is_empty();
    let (taken, result) = if end {
        (0, close_at_end(&shared, &key, &mut ks).await)
    } else {
        match fold_one(&shared, &key, &mut ks, &items, now).await {
            Ok(n) => (n, Ok(())),
            Err(e) => (0, Err(e)),
        }
    };
    let left = items.split_off(taken);
    Done {
        end: end && result.is_ok() && !shared.run.stop.load(Ordering::SeqCst),
        key,
        ks,
        left,
        taken,
        result,
    }
}

/// The window closes `ks` needs before `items`, then one call of the
/// first of them (cut further by the window); how many it took (0 when
/// the run stops first).
async fn fold_one(
    shared: &Shared,
    key: &str,
    ks: &mut KeyState,
    items: &[Queued],
    now: i64,
) -> Result<usize, BackfillError> {
    let run = &shared.run;
    let spec = &run.cfg.state.as_ref().expect("stateful").config;
    let positions: Vec<Item> = items
        .iter()
        .map(|q| Item {
            offset: q.offset,
            timestamp_ms: now,
        })
        .collect();
    let key_field = (spec.scope == StateScope::Key).then_some(key);
    loop {
        if run.stop.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let (n, window) = match ks.step(spec, &positions) {
            Step::Close { window, early } => {
                final_invoke(shared, key, ks, window, early).await?;
                continue;
            }
            Step::Invoke { n, window } => (n, window),
        };
        let seg = &items[..n];
        let (first_source, first_index) = (seg[0].item.source.clone(), seg[0].item.index);
        let id = format!("{first_source}#{first_index}");
        let mut call = Call::new(first_source, first_index);
        call.items = seg.iter().map(|q| q.item.value.clone()).collect();
        let payload = ks.add_to_event(
            run.with_batch_input(call.payload(&id, extra(key_field))),
            key_field,
            &window,
            false,
            false,
        );
        run.update(|s| s.calls_total += 1);
        let current = ks.clone();
        match invoke(run, &payload, |resp| {
            let mut next = current.clone();
            next.fold(spec, window, &positions[..n], resp)
                .map(|()| next)
        })
        .await
        {
            (Ok(next), attempts) => {
                *ks = next;
                save(shared, key, ks).await?;
                run.update(|s| {
                    s.calls_succeeded += 1;
                    s.items_succeeded += n as u64;
                    s.calls_retried += u64::from(attempts.saturating_sub(1));
                });
            }
            (Err((error_type, error)), attempts) => {
                run.update(|s| s.calls_retried += u64::from(attempts.saturating_sub(1)));
                run.dead_letter(
                    &call.source,
                    &id,
                    call.items_json(),
                    &error_type,
                    &error,
                    attempts,
                    n as u64,
                );
                // Past the failed items; the state stays as it was.
                ks.last_offset = ks.last_offset.max(positions[n - 1].offset);
                save(shared, key, ks).await?;
            }
        }
        return Ok(n);
    }
}

/// The end of the input closes the key's open window.
async fn close_at_end(shared: &Shared, key: &str, ks: &mut KeyState) -> Result<(), BackfillError> {
    if shared.run.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let pending = ks.due().or_else(|| {
        ks.window.map(|window| Step::Close {
            window,
            early: false,
        })
    });
    if let Some(Step::Close { window, early }) = pending {
        final_invoke(shared, key, ks, window, early).await?;
    }
    Ok(())
}

/// Items (at least one) from the front of `queue` that fit in one call.
fn cut(queue: &VecDeque<Queued>, max_items: usize, max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for q in queue.iter().take(max_items.max(1)) {
        if n > 0 && bytes + q.size > max_bytes {
            break;
        }
        bytes += q.size;
        n += 1;
    }
    n.max(1).min(queue.len())
}

fn extra(key: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(k) = key {
        m.insert("key".into(), json!(k));
    }
    m
}

/// Call the job's function with `payload` up to `max_attempts` times until
/// it answers and `accept` takes the answer. The result and the attempts
/// made; the error as (errorType, message).
async fn invoke<T, E: std::fmt::Display + ErrorType>(
    run: &Run,
    payload: &[u8],
    accept: impl Fn(&[u8]) -> Result<T, E>,
) -> (Result<T, (String, String)>, u32) {
    let executor = run.executor.as_ref().expect("stateful runs call functions");
    let max = run.cfg.max_attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (error, retryable) = match executor.invoke(&run.cfg.function, payload).await {
            Ok(resp) => match accept(&resp.payload) {
                Ok(v) => return (Ok(v), attempt),
                Err(e) => ((e.error_type().to_owned(), e.to_string()), true),
            },
            Err(e) => ((e.error_type().to_owned(), e.to_string()), e.retryable()),
        };
        if !retryable || attempt >= max {
            return (Err(error), attempt);
        }
        tracing::debug!(attempt, error = %error.1, "stateful call failed; retrying");
        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
    }
}

/// Errors that name an `errorType`.
trait ErrorType {
    fn error_type(&self) -> &str;
}

impl ErrorType for sluice_state_carrier::StateError {
    fn error_type(&self) -> &str {
        sluice_state_carrier::StateError::error_type(self)
    }
}

/// Close `window`: a final invoke (`items` empty, `isFinalInvokeForWindow`),
/// its answer kept as the key's `last_result`, the state reset and
/// checkpointed. Fails the job after `max_attempts` failed attempts.
async fn final_invoke(
    shared: &Shared,
    key: &str,
    ks: &mut KeyState,
    window: Window,
    early: bool,
) -> Result<(), BackfillError> {
    let run = &shared.run;
    let key_field =
        (run.cfg.state.as_ref().map(|s| s.config.scope) == Some(StateScope::Key)).then_some(key);
    let payload = ks.add_to_event(
        run.with_batch_input(
            json!({ "items": [], "batch": { "final": true, "key": key_field } }).to_string(),
        ),
        key_field,
        &window,
        true,
        early,
    );
    let (result, attempts) = invoke(run, &payload, |resp| {
        sluice_state_carrier::fold::take_state(resp)
            .map(|_| serde_json::from_slice::<Value>(resp).ok())
    })
    .await;
    match result {
        Ok(answer) => {
            ks.closed(answer);
            save(shared, key, ks).await
        }
        Err((_, error)) => Err(BackfillError::FinalInvokeFailed {
            key: key.to_owned(),
            attempts,
            error,
        }),
    }
}

/// Checkpoint `ks` as `key`'s state.
async fn save(shared: &Shared, key: &str, ks: &KeyState) -> Result<(), BackfillError> {
    let mut cp = shared.cp.lock().await;
    cp.keys.insert(key.to_owned(), ks.clone());
    cp.seq += 1;
    let snapshot = cp.clone();
    let store = shared.store.clone();
    tokio::task::spawn_blocking(move || store.save(&snapshot))
        .await
        .map_err(|e| BackfillError::Config(format!("checkpointing panicked: {e}")))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(sizes: &[usize]) -> KeyQueue {
        let items: VecDeque<Queued> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Queued {
                offset: i as i64,
                size,
                item: Loaded {
                    source: "f".into(),
                    index: i as u64,
                    value: Value::Null,
                },
            })
            .collect();
        KeyQueue {
            bytes: sizes.iter().sum(),
            items,
            ks: Some(KeyState::default()),
            folded_before: -1,
            listed: false,
            ended: false,
        }
    }

    /// Whenever a queue holding the first items of a key says it is ready
    /// (before the end of the input), its cut is the cut of all the key's
    /// items: how far the reader got does not change the calls.
    #[test]
    fn a_ready_queue_cuts_as_the_whole_input_would() {
        let mut x: u64 = 7;
        for _ in 0..200 {
            let sizes: Vec<usize> = (0..40)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    1 + ((x >> 33) % 50) as usize
                })
                .collect();
            for (max_items, max_bytes) in [(5, usize::MAX), (100, 60), (4, 80), (1, 10)] {
                let whole = cut(&queue(&sizes).items, max_items, max_bytes);
                let mut readies = 0;
                for len in 1..=sizes.len() {
                    let q = queue(&sizes[..len]);
                    if q.ready(false, max_items, max_bytes) {
                        readies += 1;
                        assert_eq!(cut(&q.items, max_items, max_bytes), whole, "{sizes:?}");
                    }
                }
                assert!(readies > 0, "{sizes:?} {max_items} {max_bytes}");
                // At the end of the input any queue is ready.
                assert!(queue(&sizes[..1]).ready(true, max_items, max_bytes));
            }
        }
        let mut ended = queue(&[]);
        assert!(ended.ready(true, 5, 100));
        ended.ended = true;
        assert!(!ended.ready(true, 5, 100));
        // Too few items and bytes to decide: wait.
        assert!(!queue(&[1, 2, 3]).ready(false, 5, 100));
        // A key with a call in flight is not ready.
        let mut busy = queue(&[1; 10]);
        busy.ks = None;
        assert!(!busy.ready(true, 5, 100));
    }
}
