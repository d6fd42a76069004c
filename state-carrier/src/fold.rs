//! The fold: which items go into the next call, in which window, what the
//! call carries, and what its response does to the state.
//!
//! This is the tumbling-window contract of Lambda (Kinesis and DynamoDB
//! streams there), as pure functions over a [`KeyState`], so that the Kafka
//! lanes and the backfill runner drive the same logic:
//!
//! 1. [`KeyState::step`] looks at the next ordered items of a key and says
//!    either "close the open window first" (a final invoke) or "invoke with
//!    the first `n` items, in this window".
//! 2. The caller builds the call: its usual event plus
//!    [`KeyState::add_to_event`] (`state`, `window`, `isFinalInvokeForWindow`,
//!    `isWindowTerminatedEarly`).
//! 3. On success, [`KeyState::fold`] takes the `state` from the response (a
//!    response without one is a failed call), advances the input position
//!    and notes whether the window must now close (its count is reached, or
//!    the state outgrew `max_bytes`: `isWindowTerminatedEarly`).
//! 4. The caller checkpoints, and only then commits the input.
//! 5. A final invoke (`records` empty, `isFinalInvokeForWindow: true`)
//!    closes the window; on success [`KeyState::closed`] resets the state to
//!    `{}`. A failed final invoke is retried until it succeeds: the key
//!    waits.
//!
//! Windows: `Time(d)` windows are aligned intervals `[k·d, (k+1)·d)` of the
//! items' timestamps (event time). An item of a later interval closes the
//! open window; an item of an earlier one (late) joins the open window. A
//! time window whose end has passed on the wall clock also closes once its
//! source is idle ([`KeyState::due_when_idle`]). `Count(n)` windows close
//! after `n` items. Without a window, state is carried forever (a running
//! fold) and only a backfill's end closes it.

use serde_json::Value;
use sluice_pipeline::{StateConfig, StateWindow};

use crate::StateError;
use crate::checkpoint::{CloseReason, KeyState, Window};

/// Where and when one item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Kafka offset, or item index in a backfill.
    pub offset: i64,
    /// Event time, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// What to do next with a key's pending items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Final invoke of the open window first.
    Close {
        /// The window being closed.
        window: Window,
        /// `isWindowTerminatedEarly`.
        early: bool,
    },
    /// Invoke with the first `n` items in `window`.
    Invoke {
        /// Items in this call.
        n: usize,
        /// The window they fold into.
        window: Window,
    },
}

fn time_window(ts: i64, d_ms: i64) -> Window {
    let start = ts.div_euclid(d_ms) * d_ms;
    Window {
        start_ms: start,
        end_ms: start.saturating_add(d_ms),
        items: 0,
    }
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl KeyState {
    /// Whether the item at `offset` is already in the state (delivered again
    /// after a crash or rebalance): it must not be folded twice.
    pub fn folded(&self, offset: i64) -> bool {
        offset <= self.last_offset
    }

    /// The next step for `items` (non-empty, in order, none folded yet).
    pub fn step(&self, spec: &StateConfig, items: &[Item]) -> Step {
        if let (Some(reason), Some(window)) = (self.close_pending, self.window) {
            return Step::Close {
                window,
                early: reason == CloseReason::TooLarge,
            };
        }
        let first = items[0];
        match spec.window {
            None => {
                let window = self.window.unwrap_or(Window {
                    start_ms: first.timestamp_ms,
                    end_ms: first.timestamp_ms,
                    items: 0,
                });
                Step::Invoke {
                    n: items.len(),
                    window,
                }
            }
            Some(StateWindow::Time(d)) => {
                let d = millis(d);
                let next = time_window(first.timestamp_ms, d);
                let window = match self.window {
                    Some(open) if next.start_ms > open.start_ms => {
                        return Step::Close {
                            window: open,
                            early: false,
                        };
                    }
                    Some(open) => open,
                    None => next,
                };
                let n = items
                    .iter()
                    .take_while(|i| time_window(i.timestamp_ms, d).start_ms <= window.start_ms)
                    .count();
                Step::Invoke { n, window }
            }
            Some(StateWindow::Count(c)) => {
                let window = self.window.unwrap_or(Window {
                    start_ms: first.timestamp_ms,
                    end_ms: first.timestamp_ms,
                    items: 0,
                });
                let left = c.saturating_sub(window.items).max(1);
                let n = (left.min(items.len() as u64)) as usize;
                Step::Invoke { n, window }
            }
        }
    }

    /// `event` (a JSON object, as the caller builds it for its source) with
    /// the fields a stateful call adds: `"state":…,"window":{"start":…,"end":…},"isFinalInvokeForWindow":…,"isWindowTerminatedEarly":…`.
    ///
    /// `key` (the key scope's key) is added as `stateKey`, a sluice extension:
    /// a final invoke has no records to tell the function whose window
    /// closes.
    pub fn add_to_event(
        &self,
        event: impl Into<Vec<u8>>,
        key: Option<&str>,
        window: &Window,
        final_invoke: bool,
        early: bool,
    ) -> Vec<u8> {
        let state = serde_json::to_vec(&self.state).unwrap_or_else(|_| b"{}".to_vec());
        let mut out = event.into();
        // Reopen the object: drop its closing brace.
        if out.last() == Some(&b'}') {
            out.pop();
        }
        out.reserve(state.len() + 161);
        if let Some(key) = key {
            out.extend_from_slice(b",\"stateKey\":");
            out.extend(serde_json::to_vec(key).unwrap_or_else(|_| b"\"\"".to_vec()));
        }
        out.extend_from_slice(b",\"state\":");
        out.extend_from_slice(&state);
        out.extend_from_slice(b",\"window\":{\"start\":\"");
        out.extend_from_slice(rfc3339(window.start_ms).as_bytes());
        out.extend_from_slice(b"\",\"end\":\"");
        out.extend_from_slice(rfc3339(window.end_ms).as_bytes());
        out.extend_from_slice(b"\"},\"isFinalInvokeForWindow\":");
        out.extend_from_slice(if final_invoke { b"true" } else { b"false" });
        out.extend_from_slice(b",\"isWindowTerminatedEarly\":");
        out.extend_from_slice(if early { b"true" } else { b"false" });
        out.push(b'}');
        out
    }

    /// Fold a successful call of `items` in `window` into the state:
    /// `response` must be a JSON object with a `state` field.
    pub fn fold(
        &mut self,
        spec: &StateConfig,
        window: Window,
        items: &[Item],
        response: &[u8],
    ) -> Result<(), StateError> {
        let state = take_state(response)?;
        let size = serde_json::to_vec(&state).map_or(0, |v| v.len());
        let mut window = window;
        window.items += items.len() as u64;
        if !matches!(spec.window, Some(StateWindow::Time(_)))
            && let Some(last) = items.last()
        {
            window.end_ms = window.end_ms.max(last.timestamp_ms);
        }
        self.state = state;
        self.window = Some(window);
        if let Some(last) = items.last() {
            self.last_offset = self.last_offset.max(last.offset);
        }
        if size > spec.max_bytes {
            self.close_pending = Some(CloseReason::TooLarge);
        } else if let Some(StateWindow::Count(c)) = spec.window
            && window.items >= c
        {
            self.close_pending = Some(CloseReason::Complete);
        }
        Ok(())
    }

    /// Whether the open window must close now, with nothing else pending
    /// (its count was reached, or its state grew too large).
    pub fn due(&self) -> Option<Step> {
        match (self.close_pending, self.window) {
            (Some(reason), Some(window)) => Some(Step::Close {
                window,
                early: reason == CloseReason::TooLarge,
            }),
            _ => None,
        }
    }

    /// Whether an idle source should close this key's time window now:
    /// its end has passed on the wall clock `now_ms`.
    pub fn due_when_idle(&self, spec: &StateConfig, now_ms: i64) -> Option<Step> {
        if let Some(step) = self.due() {
            return Some(step);
        }
        match (spec.window, self.window) {
            (Some(StateWindow::Time(_)), Some(w)) if w.end_ms <= now_ms => Some(Step::Close {
                window: w,
                early: false,
            }),
            _ => None,
        }
    }

    /// The final invoke succeeded with `result` (its answer, kept as
    /// [`KeyState::last_result`]): the next window starts empty.
    pub fn closed(&mut self, result: Option<Value>) {
        self.last_result = result;
        self.state = Value::Object(Default::default());
        self.window = None;
        self.close_pending = None;
        self.windows_closed += 1;
    }
}

/// The `state` of a response.
pub fn take_state(response: &[u8]) -> Result<Value, StateError> {
    let v: Value = serde_json::from_slice(response).map_err(|e| StateError::MissingState {
        reason: format!("not JSON ({e})"),
    })?;
    match v {
        Value::Object(mut m) => m.remove("state").ok_or_else(|| StateError::MissingState {
            reason: format!(
                "an object with keys {:?}",
                m.keys().map(String::as_str).collect::<Vec<_>>()
            ),
        }),
        other => Err(StateError::MissingState {
            reason: format!("a JSON {}", kind(&other)),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `2020-07-30T17:00:00Z`-style time of `ms` since the epoch (Lambda's
/// window bounds), with milliseconds when they are not zero.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(ms.max(0)).unwrap_or(0));
    if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        humantime::format_rfc3339_millis(t).to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use sluice_pipeline::{StateScope, StateStore};

    use super::*;

    fn spec(window: Option<StateWindow>, max_bytes: usize) -> StateConfig {
        StateConfig {
            scope: StateScope::Partition,
            window,
            max_bytes,
            store: StateStore::Local(PathBuf::from("unused")),
        }
    }

    fn items(ts: &[i64]) -> Vec<Item> {
        ts.iter()
            .enumerate()
            .map(|(i, &t)| Item {
                offset: i as i64,
                timestamp_ms: t,
            })
            .collect()
    }

    /// Drive a key through `items` with a summing function; return the sums
    /// each final invoke saw and the state left open.
    fn run(
        spec: &StateConfig,
        items: &[Item],
        values: &[i64],
    ) -> (Vec<(i64, Window, bool)>, KeyState) {
        run_batches(spec, items, values, usize::MAX)
    }

    /// As [`run`], with at most `batch` items offered per step (as a source
    /// delivering small batches would).
    fn run_batches(
        spec: &StateConfig,
        items: &[Item],
        values: &[i64],
        batch: usize,
    ) -> (Vec<(i64, Window, bool)>, KeyState) {
        let mut ks = KeyState::default();
        let mut finals = Vec::new();
        let mut rest = 0;
        while rest < items.len() {
            match ks.step(
                spec,
                &items[rest..rest.saturating_add(batch).min(items.len())],
            ) {
                Step::Close { window, early } => {
                    finals.push((ks.state["sum"].as_i64().unwrap_or(0), window, early));
                    ks.closed(None);
                }
                Step::Invoke { n, window } => {
                    let sum = ks.state["sum"].as_i64().unwrap_or(0)
                        + values[rest..rest + n].iter().sum::<i64>();
                    let resp = serde_json::json!({"state": {"sum": sum}}).to_string();
                    ks.fold(spec, window, &items[rest..rest + n], resp.as_bytes())
                        .unwrap();
                    rest += n;
                }
            }
        }
        if let Some(Step::Close { window, early }) = ks.due() {
            finals.push((ks.state["sum"].as_i64().unwrap_or(0), window, early));
            ks.closed(None);
        }
        (finals, ks)
    }

    #[test]
    fn time_windows_close_on_a_later_item_and_take_late_ones() {
        let s = spec(Some(StateWindow::Time(Duration::from_secs(10))), 1 << 20);
        // 3 and 7 in [0,10); 12 in [10,20) closes it; 4 is late and joins
        // [10,20); 25 closes that.
        let it = items(&[3_000, 7_000, 12_000, 4_000, 25_000]);
        let (finals, open) = run(&s, &it, &[1, 2, 4, 8, 16]);
        assert_eq!(finals.len(), 2);
        assert_eq!(
            (finals[0].0, finals[0].1.start_ms, finals[0].1.end_ms),
            (3, 0, 10_000)
        );
        assert_eq!((finals[1].0, finals[1].1.start_ms), (12, 10_000));
        assert_eq!(open.state["sum"], 16);
        assert_eq!(open.window.unwrap().start_ms, 20_000);
        assert_eq!(open.last_offset, 4);
    }

    #[test]
    fn count_windows_close_after_n_items() {
        let s = spec(Some(StateWindow::Count(3)), 1 << 20);
        let it = items(&[1, 2, 3, 4, 5, 6, 7]);
        let (finals, open) = run(&s, &it, &[1, 1, 1, 10, 10, 10, 100]);
        let sums: Vec<i64> = finals.iter().map(|f| f.0).collect();
        assert_eq!(sums, vec![3, 30]);
        assert_eq!(open.state["sum"], 100);
        assert_eq!(open.windows_closed, 2);
    }

    #[test]
    fn a_state_over_max_bytes_ends_the_window_early() {
        let s = spec(Some(StateWindow::Time(Duration::from_secs(60))), 12);
        // {"sum":N} is 9 bytes up to N = 999, 10+ beyond 9999 ... 12 bytes
        // limit is passed at 1000000.
        let it = items(&[1, 2, 3]);
        let (finals, open) = run_batches(&s, &it, &[5, 1_000_000, 1], 1);
        assert_eq!(finals.len(), 1);
        assert!(finals[0].2, "terminated early");
        assert_eq!(finals[0].0, 1_000_005);
        assert_eq!(open.state["sum"], 1, "a new window starts empty");
    }

    #[test]
    fn without_a_window_state_is_carried_forever() {
        let s = spec(None, 1 << 20);
        let it = items(&[5, 1, 9]);
        let (finals, open) = run(&s, &it, &[1, 2, 3]);
        assert!(finals.is_empty());
        assert_eq!(open.state["sum"], 6);
    }

    #[test]
    fn a_response_without_state_is_a_failed_call() {
        let s = spec(None, 1 << 20);
        let mut ks = KeyState::default();
        let it = items(&[1]);
        let w = match ks.step(&s, &it) {
            Step::Invoke { window, .. } => window,
            other => panic!("{other:?}"),
        };
        for bad in [&b"{\"sum\": 1}"[..], b"[1]", b"nope"] {
            let err = ks.fold(&s, w, &it, bad).unwrap_err();
            assert_eq!(err.error_type(), "Sluice.MissingState", "{err}");
        }
        assert_eq!(ks.last_offset, -1, "a failed call folds nothing");
        ks.fold(&s, w, &it, b"{\"state\": null}").unwrap();
        assert_eq!(ks.last_offset, 0);
    }

    #[test]
    fn idle_time_windows_close_once_their_end_passed() {
        let s = spec(Some(StateWindow::Time(Duration::from_secs(10))), 1 << 20);
        let mut ks = KeyState::default();
        let it = items(&[12_000]);
        if let Step::Invoke { window, n } = ks.step(&s, &it) {
            ks.fold(&s, window, &it[..n], b"{\"state\":{}}").unwrap();
        }
        assert_eq!(ks.due_when_idle(&s, 19_999), None);
        assert!(matches!(
            ks.due_when_idle(&s, 20_000),
            Some(Step::Close { early: false, .. })
        ));
    }

    #[test]
    fn event_fields_follow_lambdas_names() {
        let ks = KeyState::default();
        let w = Window {
            start_ms: 1_596_128_400_000,
            end_ms: 1_596_128_700_000,
            items: 0,
        };
        let ev = ks.add_to_event(&b"{\"records\":{}}"[..], Some("k"), &w, true, false);
        let v: Value = serde_json::from_slice(&ev).unwrap();
        assert_eq!(v["window"]["start"], "2020-07-30T17:00:00Z");
        assert_eq!(v["window"]["end"], "2020-07-30T17:05:00Z");
        assert_eq!(v["state"], serde_json::json!({}));
        assert_eq!(v["isFinalInvokeForWindow"], true);
        assert_eq!(v["isWindowTerminatedEarly"], false);
        assert_eq!(v["stateKey"], "k");
    }
}
