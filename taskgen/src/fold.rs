//! Stateful backfills: the items folded in input order through the state
//! carrier (see [`crate::StateOptions`]).
//!
//! The whole input is read first (unlike a stateless `order_key` run, which streams), each readable item
//! numbered by its position in the input (file order, then row order): that
//! number is the item's offset in the checkpoint. Items are grouped by key
//! (one group for the partition scope; the `order_key` value for the key
//! scope), and each key runs on its own task, up to `max_concurrency` keys
//! at once. Within a key, calls are cut by `max_items_per_call`,
//! `max_bytes_per_call` and the window, and run one after another, each
//! with the state the previous one returned; after each call the key's
//! state and position are checkpointed. A call that fails `max_attempts`
//! times has its items dead-lettered and the position moves past them, the
//! state unchanged. At the end of the input every open window is closed
//! with a final invoke.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value, json};
use sluice_pipeline::StateScope;
use sluice_state_carrier::{Checkpoint, Item, KeyState, Step, Store, Window};
use tokio::sync::{Mutex, Semaphore};

use crate::schedule::{Loaded, load, scalar};
use crate::{BackfillError, Call, Run};

/// What the key tasks share.
struct Shared {
    run: Arc<Run>,
    store: Arc<dyn Store>,
    cp: Mutex<Checkpoint>,
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
    let cp = tokio::task::spawn_blocking(move || loading.load(&source))
        .await
        .map_err(|e| BackfillError::Config(format!("loading the state panicked: {e}")))??
        .unwrap_or_else(|| Checkpoint::new(opts.source.clone()));
    let loaded = tokio::select! {
        biased;
        () = &mut shutdown => return Ok(true),
        l = load(run.cfg.sources.clone(), run.cfg.input.clone()) => l?,
    };
    let (items, bad) = loaded;
    let total_bad = bad.iter().map(|c| c.bad.len() as u64).sum::<u64>();
    run.set_expected_items(items.len() as u64 + total_bad);
    run.update(|s| s.items_total += items.len() as u64 + total_bad);
    for call in &bad {
        run.bad_items(call);
    }
    // Keys in order of first appearance, each with (offset, item).
    let mut keys: Vec<(String, Vec<(i64, Loaded)>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (offset, item) in items.into_iter().enumerate() {
        let key = match opts.config.scope {
            StateScope::Partition => String::new(),
            StateScope::Key => run
                .cfg
                .order
                .order_key
                .as_ref()
                .and_then(|k| scalar(item.value.get(k)))
                .unwrap_or_default(),
        };
        let slot = *index.entry(key.clone()).or_insert_with(|| {
            keys.push((key, Vec::new()));
            keys.len() - 1
        });
        keys[slot].1.push((offset as i64, item));
    }
    let shared = Arc::new(Shared {
        run: run.clone(),
        store,
        cp: Mutex::new(cp),
    });
    let permits = Arc::new(Semaphore::new(run.cfg.max_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut interrupted = false;
    for (key, items) in keys {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        if run.stop.load(Ordering::SeqCst) {
            break;
        }
        let shared = shared.clone();
        tasks.spawn(async move {
            let result = fold_key(&shared, &key, items).await;
            drop(permit);
            result
        });
    }
    let mut first_error = None;
    loop {
        let done = tokio::select! {
            biased;
            () = &mut shutdown, if !interrupted => {
                interrupted = true;
                run.stop.store(true, Ordering::SeqCst);
                continue;
            }
            d = tasks.join_next() => d,
        };
        match done {
            None => break,
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                run.stop.store(true, Ordering::SeqCst);
                first_error.get_or_insert(e);
            }
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Some(Err(_)) => {}
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(interrupted),
    }
}

/// Fold one key's items, in order.
async fn fold_key(
    shared: &Shared,
    key: &str,
    items: Vec<(i64, Loaded)>,
) -> Result<(), BackfillError> {
    let run = &shared.run;
    let opts = run.cfg.state.as_ref().expect("stateful");
    let spec = &opts.config;
    let mut ks = shared
        .cp
        .lock()
        .await
        .keys
        .get(key)
        .cloned()
        .unwrap_or_default();
    let (done, todo): (Vec<_>, Vec<_>) = items.into_iter().partition(|(o, _)| ks.folded(*o));
    if !done.is_empty() {
        run.update(|s| s.items_skipped += done.len() as u64);
    }
    // A data set has no event time: windows show when they were folded.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let positions: Vec<Item> = todo
        .iter()
        .map(|(o, _)| Item {
            offset: *o,
            timestamp_ms: now,
        })
        .collect();
    let key_field = (spec.scope == StateScope::Key).then_some(key);
    let mut i = 0;
    while i < todo.len() {
        if run.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let limit = cut(
            &todo[i..],
            run.cfg.max_items_per_call,
            run.cfg.max_bytes_per_call,
        );
        match ks.step(spec, &positions[i..i + limit]) {
            Step::Close { window, early } => {
                final_invoke(shared, key, &mut ks, window, early).await?;
            }
            Step::Invoke { n, window } => {
                let seg = &todo[i..i + n];
                let (first_source, first_index) = (seg[0].1.source.clone(), seg[0].1.index);
                let id = format!("{first_source}#{first_index}");
                let mut call = Call::new(first_source, first_index);
                call.items = seg.iter().map(|(_, l)| l.value.clone()).collect();
                let payload = ks.add_to_event(
                    call.payload(&id, extra(key_field)),
                    key_field,
                    &window,
                    false,
                    false,
                );
                run.update(|s| s.calls_total += 1);
                match invoke(run, &payload, |resp| {
                    let mut next = ks.clone();
                    next.fold(spec, window, &positions[i..i + n], resp)
                        .map(|()| next)
                })
                .await
                {
                    (Ok(next), attempts) => {
                        ks = next;
                        save(shared, key, &ks).await?;
                        run.update(|s| {
                            s.calls_succeeded += 1;
                            s.items_succeeded += n as u64;
                            s.calls_retried += u64::from(attempts.saturating_sub(1));
                        });
                    }
                    (Err((error_type, error)), attempts) => {
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
                        ks.last_offset = ks.last_offset.max(positions[i + n - 1].offset);
                        save(shared, key, &ks).await?;
                    }
                }
                i += n;
            }
        }
    }
    if run.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    // The end of the input closes the open window.
    let pending = ks.due().or_else(|| {
        ks.window.map(|window| Step::Close {
            window,
            early: false,
        })
    });
    if let Some(Step::Close { window, early }) = pending {
        final_invoke(shared, key, &mut ks, window, early).await?;
    }
    Ok(())
}

/// Items (at least one) from the start of `rest` that fit in one call.
fn cut(rest: &[(i64, Loaded)], max_items: usize, max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for (_, l) in rest.iter().take(max_items.max(1)) {
        let size = serde_json::to_vec(&l.value).map_or(0, |v| v.len());
        if n > 0 && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        n += 1;
    }
    n.max(1)
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
        json!({ "items": [], "batch": { "final": true, "key": key_field } }).to_string(),
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
