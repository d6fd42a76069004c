//! Ordering and dependencies between items (`--order-key`, `--id-column`,
//! `--depends-on-column`), with memory bounded by the
//! `max_buffered_items` budget rather than by the input's size.
//!
//! Without them a backfill streams calls in file, then row order (see the
//! crate docs). With them:
//!
//! 1. **Order key only: one streaming pass.** Items are read in file/row
//!    order. Each key has a *partial call* that fills up to
//!    `max_items_per_call` / `max_bytes_per_call` and then becomes a call
//!    (keyless items share one partial call whose calls are not chained).
//!    The calls of one key run one after another, each after the previous
//!    one *finished* (succeeded or failed); keys run in parallel, up to
//!    `max_concurrency` calls in flight.
//! 2. **Budget.** Items held by the scheduler — in partial calls, and in
//!    cut calls waiting for their key's previous call or for a free slot —
//!    never exceed `max_buffered_items` (the peak is
//!    [`Summary::peak_buffered_items`](crate::Summary)). Two rules keep it:
//!    *cutting*: when the partial calls alone reach the budget, the oldest
//!    ones (by first item) become (smaller) calls at once — this depends on
//!    the input only, so the same input and budget always give the same
//!    calls; *backpressure*: while partial plus waiting items are at the
//!    budget, no item is read until a call finishes. Beyond the budget,
//!    memory holds the calls in flight (at most `max_concurrency` calls)
//!    and a fixed read-ahead of [`READ_AHEAD`] items.
//! 3. **Dependencies: an id pass, then one pass per level.** With
//!    `id_column` + `depends_on_column`, a first pass reads only the id,
//!    depends-on (and order key) fields — Parquet reads just those columns —
//!    and keeps ids, not items. Each item may name the ids it depends on
//!    (null, `""`, one id, or a JSON list of ids). Duplicate ids,
//!    dependencies on ids that no item has, and cycles are reported (with
//!    ids and `file:row`) before anything is called. An item's *level* is 0
//!    without dependencies, else one more than the highest level of its
//!    dependencies; after the pass only a level and the dependency edges (as
//!    item numbers) are kept per item. Then the input is read **once per
//!    level**, each pass streaming that level's items through the scheduler
//!    above (calls cut per (level, key), so a call never mixes keys nor
//!    levels), and a level starts when every call of the levels before it
//!    finished. A call whose items depend on an item of a failed call is
//!    dead-lettered as `Sluice.DependencyFailed` without being called.
//!    *Trade-off*: an input with L levels is read L + 1 times (deep chains
//!    cost I/O, not memory), and a level waits for the whole previous level
//!    rather than only for its own dependencies.
//!
//! Call ids stay deterministic (`"<file>#<row>@L<level>n<count>[k=<field>]"`
//! of the call's first item), so progress and resume work as in the
//! streaming mode; the budget is part of the layout recorded in the
//! progress store (another budget could cut other calls), and a call
//! already recorded counts as succeeded for its dependents.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::read::Item;
use crate::{BackfillError, Call, Format, Input, Limits, Run};

/// Ordering and dependency settings; all `None` keeps the streaming mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderConfig {
    /// Items with the same value of this field run one after another.
    pub order_key: Option<String>,
    /// Field holding an item's id (needed by `depends_on_column`).
    pub id_column: Option<String>,
    /// Field naming the id(s) an item depends on.
    pub depends_on_column: Option<String>,
}

impl OrderConfig {
    /// Whether any ordering or dependency is asked for.
    pub fn is_active(&self) -> bool {
        self.order_key.is_some() || self.id_column.is_some() || self.depends_on_column.is_some()
    }

    fn check(&self) -> Result<(), BackfillError> {
        if self.depends_on_column.is_some() != self.id_column.is_some() {
            return Err(BackfillError::Config(
                "--id-column and --depends-on-column go together".into(),
            ));
        }
        Ok(())
    }

    /// The options naming a column, as (option, column).
    fn columns(&self) -> impl Iterator<Item = (&'static str, &String)> {
        [
            ("order_key", &self.order_key),
            ("id_column", &self.id_column),
            ("depends_on_column", &self.depends_on_column),
        ]
        .into_iter()
        .filter_map(|(option, c)| c.as_ref().map(|c| (option, c)))
    }

    /// Each column an option names must be among the chosen `columns` and
    /// in every file whose items all have the same fields (a CSV header, a
    /// Parquet schema). An item without the field has no key and no
    /// dependency, so a misspelt name would otherwise order nothing,
    /// silently. JSON lines are not checked: their items may differ.
    /// Reads each file's header or footer (blocking).
    pub(crate) fn check_columns(
        &self,
        sources: &[PathBuf],
        input: &Input,
    ) -> Result<(), BackfillError> {
        if let Some(chosen) = &input.columns
            && let Some((option, column)) = self.columns().find(|(_, c)| !chosen.contains(c))
        {
            return Err(BackfillError::Config(format!(
                "{option} {column:?} is not among the chosen columns ({}): the items would not carry it",
                chosen.join(", ")
            )));
        }
        if self.columns().next().is_none() {
            return Ok(());
        }
        for file in sources {
            let Some(fields) = crate::read::field_names(file, input)? else {
                return Ok(());
            };
            if let Some((option, column)) = self.columns().find(|(_, c)| !fields.contains(c)) {
                return Err(BackfillError::OrderColumnMissing {
                    option,
                    file: file.clone(),
                    column: column.clone(),
                    available: fields,
                });
            }
        }
        Ok(())
    }
}

/// One dependency level as `--dry-run` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelPlan {
    /// 0: items without dependencies.
    pub level: u64,
    /// Items on this level.
    pub items: u64,
    /// Calls they make.
    pub calls: u64,
    /// Distinct order keys among them (0 without `order_key`).
    pub keys: u64,
    /// With `order_key`: items without a value for it (see
    /// [`crate::Summary::items_without_order_key`]).
    pub unkeyed: u64,
}

/// A readable item with where it comes from.
pub(crate) struct Loaded {
    pub(crate) source: String,
    pub(crate) index: u64,
    pub(crate) value: Value,
}

/// A scalar field as an id or key: strings as they are (empty: none),
/// numbers and booleans as JSON text, null or missing: none.
pub(crate) fn scalar(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn depends_on(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(list)) => list.iter().filter_map(|x| scalar(Some(x))).collect(),
        other => scalar(other).into_iter().collect(),
    }
}

/// Items the reader thread may read ahead of the scheduler, on top of the
/// `max_buffered_items` budget.
pub(crate) const READ_AHEAD: usize = 256;

/// One item read: (file number, item number in the file, item).
pub(crate) type Read = Result<(usize, u64, Item), BackfillError>;

/// Reads `sources` on a blocking thread, item by item, until the receiver
/// goes away (at most [`READ_AHEAD`] items ahead of it).
pub(crate) fn spawn_items(
    sources: Vec<PathBuf>,
    input: Input,
) -> (mpsc::Receiver<Read>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let handle = tokio::task::spawn_blocking(move || {
        crate::read::send_each(&sources, &tx, |f, file, send| {
            crate::read::read_file(file, &input, &mut |index, item| send((f, index, item)))
        });
    });
    (rx, handle)
}

/// A call being filled with the items of one key.
struct Partial<T> {
    file: usize,
    first: u64,
    /// Sequence number of its first item (the oldest partial call is cut
    /// first when the budget is reached).
    seq: u64,
    items: Vec<T>,
    bytes: usize,
}

/// A call cut from the items of one key (or from keyless items).
struct Cut<T> {
    key: Option<String>,
    file: usize,
    first: u64,
    items: Vec<T>,
}

/// Cuts a stream of items into calls per key. A key's partial call becomes
/// a call when the next item would not fit the limits, or — the oldest
/// partial calls first — when all partial calls together hold `budget`
/// items. Both depend on the items only (never on timing), so the same
/// input always gives the same calls.
struct Cutter<T> {
    limits: Limits,
    budget: usize,
    open: HashMap<Option<String>, Partial<T>>,
    /// Keys of the open partial calls by their `seq`.
    age: BTreeMap<u64, Option<String>>,
    /// Items in open partial calls.
    held: usize,
    seq: u64,
}

impl<T> Cutter<T> {
    fn new(limits: Limits, budget: usize) -> Self {
        Cutter {
            limits,
            budget: budget.max(1),
            open: HashMap::new(),
            age: BTreeMap::new(),
            held: 0,
            seq: 0,
        }
    }

    /// Adds item `index` of `file` (`size` bytes of JSON) to `key`'s
    /// partial call; the calls this completes go to `out`.
    fn push(
        &mut self,
        key: Option<String>,
        file: usize,
        index: u64,
        size: usize,
        item: T,
        out: &mut Vec<Cut<T>>,
    ) {
        if let Some(p) = self.open.get(&key)
            && self.limits.full(p.items.len(), p.bytes, size)
        {
            self.close(&key, out);
        }
        let seq = self.seq;
        self.seq += 1;
        let age = &mut self.age;
        let p = self.open.entry(key).or_insert_with_key(|key| {
            age.insert(seq, key.clone());
            Partial {
                file,
                first: index,
                seq,
                items: Vec::new(),
                bytes: 0,
            }
        });
        p.items.push(item);
        p.bytes += size;
        self.held += 1;
        while self.held >= self.budget {
            let Some(oldest) = self.age.values().next().cloned() else {
                break;
            };
            self.close(&oldest, out);
        }
    }

    /// Cuts `key`'s partial call.
    fn close(&mut self, key: &Option<String>, out: &mut Vec<Cut<T>>) {
        if let Some(p) = self.open.remove(key) {
            self.age.remove(&p.seq);
            self.held -= p.items.len();
            out.push(Cut {
                key: key.clone(),
                file: p.file,
                first: p.first,
                items: p.items,
            });
        }
    }

    /// Cuts every partial call, oldest first (the end of the input).
    fn finish(&mut self, out: &mut Vec<Cut<T>>) {
        while let Some(oldest) = self.age.values().next().cloned() {
            self.close(&oldest, out);
        }
    }
}

/// Cut calls not yet in flight: those ready to run and, per key, those
/// waiting for the key's previous call to finish.
struct Queue<T> {
    /// Keys with a call ready or in flight, each with the calls behind it.
    busy: HashMap<String, VecDeque<Cut<T>>>,
    ready: VecDeque<Cut<T>>,
    /// Items in `ready` and `busy`.
    items: usize,
}

impl<T> Queue<T> {
    fn new() -> Self {
        Queue {
            busy: HashMap::new(),
            ready: VecDeque::new(),
            items: 0,
        }
    }

    fn push(&mut self, cut: Cut<T>) {
        self.items += cut.items.len();
        let Some(key) = &cut.key else {
            self.ready.push_back(cut);
            return;
        };
        if let Some(waiting) = self.busy.get_mut(key) {
            waiting.push_back(cut);
        } else {
            self.busy.insert(key.clone(), VecDeque::new());
            self.ready.push_back(cut);
        }
    }

    /// The next call to run.
    fn pop(&mut self) -> Option<Cut<T>> {
        let cut = self.ready.pop_front()?;
        self.items -= cut.items.len();
        Some(cut)
    }

    /// A call of `key` finished: the key's next call becomes ready.
    fn release(&mut self, key: Option<&String>) {
        let Some(key) = key else { return };
        match self.busy.get_mut(key).and_then(VecDeque::pop_front) {
            Some(next) => self.ready.push_back(next),
            None => {
                self.busy.remove(key);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.busy.is_empty()
    }
}

/// What the id pass keeps of the items (numbered across the files in
/// order, unreadable ones included): a level and the dependencies of each.
struct Deps {
    /// Number of each file's first item.
    starts: Vec<u64>,
    /// Level of each item.
    level: Vec<u32>,
    /// Item `i` depends on `targets[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<usize>,
    targets: Vec<u64>,
    /// Items (readable or not).
    total: u64,
}

impl Deps {
    fn of(&self, i: u64) -> &[u64] {
        let i = i as usize;
        &self.targets[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Levels: 1 + the highest level (0 without items).
    fn levels(&self) -> u32 {
        self.level.iter().max().map_or(0, |m| m + 1)
    }
}

/// `file:row` of item number `i` (the row 1-based).
fn place(names: &[String], starts: &[u64], i: u64) -> String {
    let f = starts.partition_point(|&s| s <= i).saturating_sub(1);
    format!("{}:{}", names[f], i - starts[f] + 1)
}

/// The first pass of the dependency mode: reads only the id, depends-on
/// and order-key fields (Parquet: only those columns), checks the ids and
/// computes levels. Keeps ids while it runs, never items.
/// Stops early (with an empty result) once `cancel` is set.
fn id_pass(
    sources: &[PathBuf],
    input: &Input,
    order: &OrderConfig,
    cancel: &AtomicBool,
) -> Result<Deps, BackfillError> {
    let (Some(id_col), Some(dep_col)) = (&order.id_column, &order.depends_on_column) else {
        return Err(BackfillError::Config(
            "--id-column and --depends-on-column go together".into(),
        ));
    };
    let mut input = input.clone();
    if input.format == Format::Parquet {
        let mut wanted: Vec<String> = Vec::new();
        for c in [Some(id_col), Some(dep_col), order.order_key.as_ref()]
            .into_iter()
            .flatten()
        {
            let chosen = input.columns.as_ref().is_none_or(|cols| cols.contains(c));
            if chosen && !wanted.contains(c) {
                wanted.push(c.clone());
            }
        }
        if !wanted.is_empty() {
            input.columns = Some(wanted);
        }
    }
    let names: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
    let mut starts: Vec<u64> = Vec::with_capacity(sources.len());
    let mut total = 0u64;
    let mut by_id: HashMap<String, u64> = HashMap::new();
    // (item, id it depends on), in item order.
    let mut named: Vec<(u64, String)> = Vec::new();
    for file in sources {
        starts.push(total);
        let base = total;
        let mut count = 0u64;
        let mut duplicate = None;
        crate::read::read_file(file, &input, &mut |index, item| {
            if cancel.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            count = count.max(index + 1);
            let Item::Value(v) = item else {
                return ControlFlow::Continue(());
            };
            let i = base + index;
            if let Some(id) = scalar(v.get(id_col)) {
                if let Some(&j) = by_id.get(&id) {
                    duplicate = Some(format!(
                        "duplicate id {id:?} in {id_col:?}: {} and {}",
                        place(&names, &starts, j),
                        place(&names, &starts, i)
                    ));
                    return ControlFlow::Break(());
                }
                by_id.insert(id, i);
            }
            for dep in depends_on(v.get(dep_col)) {
                named.push((i, dep));
            }
            ControlFlow::Continue(())
        })?;
        if let Some(msg) = duplicate {
            return Err(BackfillError::Dependencies(msg));
        }
        total += count;
    }
    if named.is_empty() && total > 0 {
        tracing::warn!(
            depends_on_column = %dep_col,
            items = total,
            "no item names a dependency in depends_on_column (a misspelt name?): all items are on level 0"
        );
    }
    let n = usize::try_from(total).map_err(|_| {
        BackfillError::Config(format!("{total} items are too many for this machine"))
    })?;

    // Dependencies as item numbers.
    let mut offsets: Vec<usize> = Vec::with_capacity(n + 1);
    let mut targets: Vec<u64> = Vec::new();
    let mut missing = Vec::new();
    let mut next = named.into_iter().peekable();
    for i in 0..total {
        offsets.push(targets.len());
        let from = targets.len();
        while let Some((_, dep)) = next.next_if(|(at, _)| *at == i) {
            match by_id.get(&dep) {
                Some(&j) => {
                    if !targets[from..].contains(&j) {
                        targets.push(j);
                    }
                }
                None => missing.push(format!(
                    "{} depends on missing id {dep:?}",
                    place(&names, &starts, i)
                )),
            }
        }
    }
    offsets.push(targets.len());
    if !missing.is_empty() {
        let more = missing.len().saturating_sub(10);
        missing.truncate(10);
        let mut msg = format!("dependency on a missing item: {}", missing.join("; "));
        if more > 0 {
            msg.push_str(&format!(" (and {more} more)"));
        }
        if by_id.is_empty() {
            msg.push_str(&format!(
                "; no item has a value for id_column {id_col:?} (a misspelt name?)"
            ));
        }
        return Err(BackfillError::Dependencies(msg));
    }

    // Levels by Kahn's algorithm; what is left over lies on or behind a cycle.
    let mut indegree: Vec<usize> = (0..n).map(|i| offsets[i + 1] - offsets[i]).collect();
    let mut dep_offsets = vec![0usize; n + 1];
    for &j in &targets {
        dep_offsets[j as usize + 1] += 1;
    }
    for i in 0..n {
        dep_offsets[i + 1] += dep_offsets[i];
    }
    let mut fill = dep_offsets.clone();
    let mut dependents = vec![0u64; targets.len()];
    for i in 0..n {
        for &j in &targets[offsets[i]..offsets[i + 1]] {
            dependents[fill[j as usize]] = i as u64;
            fill[j as usize] += 1;
        }
    }
    drop(fill);
    let mut level = vec![0u32; n];
    let mut queue: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(j) = queue.pop() {
        seen += 1;
        for &i in &dependents[dep_offsets[j]..dep_offsets[j + 1]] {
            let i = i as usize;
            level[i] = level[i].max(level[j] + 1);
            indegree[i] -= 1;
            if indegree[i] == 0 {
                queue.push(i);
            }
        }
    }
    if seen < n {
        // Every left-over item has a left-over dependency: walk them to a cycle.
        let start = (0..n)
            .find(|&i| indegree[i] > 0)
            .expect("some item is left");
        let mut path = vec![start];
        let mut on_path: HashMap<usize, usize> = HashMap::from([(start, 0)]);
        let cycle = loop {
            let cur = *path.last().expect("not empty");
            let next = targets[offsets[cur]..offsets[cur + 1]]
                .iter()
                .map(|&j| j as usize)
                .find(|&j| indegree[j] > 0)
                .expect("a left-over item has a left-over dependency");
            if let Some(&at) = on_path.get(&next) {
                break path[at..].to_vec();
            }
            on_path.insert(next, path.len());
            path.push(next);
        };
        let ids: HashMap<u64, &String> = by_id
            .iter()
            .filter(|(_, i)| on_path.contains_key(&(**i as usize)))
            .map(|(id, &i)| (i, id))
            .collect();
        let shown: Vec<String> = cycle
            .iter()
            .chain(cycle.first())
            .map(|&i| {
                let id = ids.get(&(i as u64)).map_or("", |s| s.as_str());
                format!("{id} ({})", place(&names, &starts, i as u64))
            })
            .collect();
        return Err(BackfillError::Dependencies(format!(
            "dependency cycle: {} (each depends on the next)",
            shown.join(" -> ")
        )));
    }
    Ok(Deps {
        starts,
        level,
        offsets,
        targets,
        total,
    })
}

/// Runs `f` on a blocking thread, passing its panic on.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Reads every source and plans the dependency levels without calling
/// anything (`--dry-run` with ordering options), with the default
/// [`crate::DEFAULT_MAX_BUFFERED_ITEMS`].
///
/// # Errors
/// Reading errors; [`BackfillError::Dependencies`] for duplicate or missing
/// ids and cycles.
pub async fn plan_levels(
    sources: &[PathBuf],
    input: &Input,
    limits: Limits,
    order: &OrderConfig,
) -> Result<Vec<LevelPlan>, BackfillError> {
    plan_order(
        sources,
        input,
        limits,
        order,
        crate::DEFAULT_MAX_BUFFERED_ITEMS,
    )
    .await
}

/// Like [`plan_levels`] with a `max_buffered_items` budget: the id pass (with
/// dependencies), then one pass counting the calls each level's items make,
/// cut exactly as a run cuts them. Keeps no item, only counters (and the
/// distinct keys per level).
///
/// # Errors
/// As [`plan_levels`].
pub async fn plan_order(
    sources: &[PathBuf],
    input: &Input,
    limits: Limits,
    order: &OrderConfig,
    max_buffered_items: usize,
) -> Result<Vec<LevelPlan>, BackfillError> {
    order.check()?;
    let (sources, input, order) = (sources.to_vec(), input.clone(), order.clone());
    blocking(move || {
        order.check_columns(&sources, &input)?;
        let deps = match order.id_column {
            Some(_) => Some(id_pass(&sources, &input, &order, &AtomicBool::new(false))?),
            None => None,
        };
        let mut plans: BTreeMap<u32, (LevelPlan, HashSet<String>, Cutter<()>)> = BTreeMap::new();
        let mut cuts = Vec::new();
        for (f, file) in sources.iter().enumerate() {
            crate::read::read_file(file, &input, &mut |index, item| {
                let Item::Value(v) = item else {
                    return ControlFlow::Continue(());
                };
                let level = deps
                    .as_ref()
                    .map_or(0, |d| d.level[(d.starts[f] + index) as usize]);
                let key = order.order_key.as_ref().and_then(|k| scalar(v.get(k)));
                let (plan, keys, cutter) = plans.entry(level).or_insert_with(|| {
                    let plan = LevelPlan {
                        level: u64::from(level),
                        items: 0,
                        calls: 0,
                        keys: 0,
                        unkeyed: 0,
                    };
                    (
                        plan,
                        HashSet::new(),
                        Cutter::new(limits, max_buffered_items),
                    )
                });
                plan.items += 1;
                match &key {
                    Some(k) if !keys.contains(k) => {
                        keys.insert(k.clone());
                    }
                    Some(_) => {}
                    None if order.order_key.is_some() => plan.unkeyed += 1,
                    None => {}
                }
                cutter.push(key, f, index, crate::json_size(&v), (), &mut cuts);
                plan.calls += cuts.len() as u64;
                cuts.clear();
                ControlFlow::Continue(())
            })?;
        }
        Ok(plans
            .into_values()
            .map(|(mut plan, keys, mut cutter)| {
                cutter.finish(&mut cuts);
                plan.calls += cuts.len() as u64;
                cuts.clear();
                plan.keys = keys.len() as u64;
                plan
            })
            .collect())
    })
    .await
}

/// Runs an ordered backfill (order key, dependencies); returns whether
/// `shutdown` interrupted it.
pub(crate) async fn run_ordered<S: Future<Output = ()>>(
    run: &Arc<Run>,
    mut shutdown: Pin<&mut S>,
) -> Result<bool, BackfillError> {
    let order = run.cfg.order.clone();
    order.check()?;
    let mut failed = HashMap::new();
    if order.id_column.is_none() {
        return run_pass(run, None, 0, shutdown, &mut failed).await;
    }
    let (sources, input) = (run.cfg.sources.clone(), run.cfg.input.clone());
    // Set on shutdown: the id pass's thread stops reading.
    let cancel = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::clone(&cancel);
    let deps = tokio::select! {
        biased;
        () = &mut shutdown => {
            stop_reading.store(true, Ordering::Relaxed);
            return Ok(true);
        }
        d = blocking(move || id_pass(&sources, &input, &order, &cancel)) => d?,
    };
    run.set_expected_items(deps.total);
    run.update(|s| s.items_total += deps.total);
    for level in 0..deps.levels() {
        if run_pass(run, Some(&deps), level, shutdown.as_mut(), &mut failed).await? {
            return Ok(true);
        }
        if run.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    Ok(false)
}

/// What a finished call task reports: its key, item numbers, id and
/// whether it succeeded.
type Finished = (Option<String>, Vec<u64>, Arc<str>, bool);

/// One streaming pass over the input: calls the items of `level` (every
/// item without `deps`), cut per key, each key's calls one after another.
/// `failed` maps the items of failed calls to their call id (dependency
/// mode only). Returns whether `shutdown` interrupted it.
async fn run_pass<S: Future<Output = ()>>(
    run: &Arc<Run>,
    deps: Option<&Deps>,
    level: u32,
    mut shutdown: Pin<&mut S>,
    failed: &mut HashMap<u64, Arc<str>>,
) -> Result<bool, BackfillError> {
    let cfg = &run.cfg;
    let names: Vec<String> = cfg
        .sources
        .iter()
        .map(|s| s.display().to_string())
        .collect();
    let key_tag = cfg
        .order
        .order_key
        .as_ref()
        .map_or(String::new(), |k| format!("k={k}"));
    let budget = cfg.max_buffered_items.max(1);
    let concurrency = cfg.max_concurrency.max(1);
    let mut cutter: Cutter<(u64, Value)> = Cutter::new(cfg.limits(), budget);
    let mut queue: Queue<(u64, Value)> = Queue::new();
    let mut cuts = Vec::new();
    let (mut rx, reader) = spawn_items(cfg.sources.clone(), cfg.input.clone());
    let mut tasks: tokio::task::JoinSet<Finished> = tokio::task::JoinSet::new();
    let (mut eof, mut interrupted, mut error) = (false, false, None);
    let mut peak = 0usize;
    let mut number = 0u64;

    // Marks the items of a call that did not succeed (dependency mode).
    let mark = |failed: &mut HashMap<u64, Arc<str>>, members: Vec<u64>, id: &Arc<str>| {
        if deps.is_some() {
            for m in members {
                failed.insert(m, Arc::clone(id));
            }
        }
    };

    loop {
        while tasks.len() < concurrency
            && !run.stop.load(Ordering::SeqCst)
            && let Some(cut) = queue.pop()
        {
            let source = names[cut.file].clone();
            let count = cut.items.len();
            let id: Arc<str> = format!("{source}#{}@L{level}n{count}{key_tag}", cut.first).into();
            let (members, values): (Vec<u64>, Vec<Value>) = cut.items.into_iter().unzip();
            let call = Call {
                items: values,
                ..Call::new(source, cut.first)
            };
            run.update(|s| s.calls_total += 1);
            if let Some(d) = deps
                && let Some(dep) = members
                    .iter()
                    .flat_map(|&m| d.of(m))
                    .find_map(|t| failed.get(t))
            {
                let what = format!("the call {dep} it depends on");
                run.dependency_failed(&call, &id, &what);
                mark(failed, members, &id);
                queue.release(cut.key.as_ref());
                continue;
            }
            match run.progress.succeeded(&id) {
                Ok(true) => {
                    run.update(|s| {
                        s.calls_skipped += 1;
                        s.items_skipped += count as u64;
                    });
                    queue.release(cut.key.as_ref());
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    run.fail(e);
                    break;
                }
            }
            let mut extra = Map::new();
            extra.insert("level".into(), json!(level));
            if let Some(k) = &cut.key {
                extra.insert("key".into(), json!(k));
            }
            let run = Arc::clone(run);
            let key = cut.key;
            tasks.spawn(async move {
                let ok = run.invoke_call(&id, call, extra, None).await;
                (key, members, id, ok)
            });
        }
        if run.stop.load(Ordering::SeqCst)
            || (eof && cutter.held == 0 && queue.is_empty() && tasks.is_empty())
        {
            break;
        }
        // Backpressure: read only below the budget (or when nothing could
        // free room, which cannot happen with items waiting).
        let held = cutter.held + queue.items;
        let can_read = !eof && (held < budget || tasks.is_empty());
        tokio::select! {
            biased;
            () = &mut shutdown => {
                interrupted = true;
                break;
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                Ok((key, members, id, ok)) => {
                    if !ok {
                        mark(failed, members, &id);
                    }
                    queue.release(key.as_ref());
                }
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            },
            next = rx.recv(), if can_read => match next {
                None => {
                    eof = true;
                    cutter.finish(&mut cuts);
                }
                Some(Err(e)) => {
                    error = Some(e);
                    break;
                }
                Some(Ok((file, index, item))) => {
                    let n = deps.map_or(number, |d| d.starts[file] + index);
                    number += 1;
                    match item {
                        Item::Bad(bad) => {
                            if level == 0 {
                                if deps.is_none() {
                                    run.update(|s| s.items_total += 1);
                                }
                                run.bad_items(&Call {
                                    bad: vec![bad],
                                    ..Call::new(names[file].clone(), index)
                                });
                            }
                        }
                        Item::Json(_) => {
                            unreachable!("read_file gives values, never JSON text")
                        }
                        Item::Value(v) => {
                            if deps.is_none_or(|d| d.level[n as usize] == level) {
                                if deps.is_none() {
                                    run.update(|s| s.items_total += 1);
                                }
                                let key = run.order_key_of(&v, &names[file], index);
                                let size = crate::json_size(&v);
                                cutter.push(key, file, index, size, (n, v), &mut cuts);
                            }
                        }
                    }
                }
            },
        }
        for cut in cuts.drain(..) {
            queue.push(cut);
        }
        peak = peak.max(cutter.held + queue.items);
    }
    drop(rx);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((_, members, id, ok)) => {
                if !ok {
                    mark(failed, members, &id);
                }
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    let _ = reader.await;
    run.update(|s| s.peak_buffered_items = s.peak_buffered_items.max(peak as u64));
    match error {
        Some(e) => Err(e),
        None => Ok(interrupted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_all(
        keys: &[&str],
        per_call: usize,
        budget: usize,
    ) -> (Vec<(String, u64, usize)>, usize) {
        let limits = Limits {
            items: per_call,
            bytes: usize::MAX,
        };
        let mut cutter: Cutter<u64> = Cutter::new(limits, budget);
        let mut cuts = Vec::new();
        let mut peak = 0;
        for (i, k) in keys.iter().enumerate() {
            cutter.push(Some((*k).to_owned()), 0, i as u64, 1, i as u64, &mut cuts);
            peak = peak.max(cutter.held);
        }
        cutter.finish(&mut cuts);
        let calls = cuts
            .into_iter()
            .map(|c| {
                assert!(
                    c.items
                        .iter()
                        .all(|&i| keys[i as usize] == c.key.as_deref().unwrap())
                );
                (c.key.unwrap(), c.first, c.items.len())
            })
            .collect();
        (calls, peak)
    }

    #[test]
    fn full_partial_calls_are_cut_per_key() {
        let (calls, _) = cut_all(&["a", "b", "a", "a", "b", "a"], 2, 100);
        assert_eq!(
            calls,
            vec![("a".into(), 0, 2), ("b".into(), 1, 2), ("a".into(), 3, 2)]
        );
    }

    #[test]
    fn the_budget_cuts_the_oldest_partial_calls_first() {
        // Budget 3: partial calls hold at most 2 items after each push.
        let keys = ["a", "b", "c", "a", "d", "b"];
        let (calls, peak) = cut_all(&keys, 10, 3);
        assert!(peak < 3, "{peak}");
        // After "c" (a, b, c: 3 held) the oldest, "a", is cut.
        assert_eq!(calls[0], ("a".into(), 0, 1));
        assert_eq!(calls.iter().map(|c| c.2).sum::<usize>(), keys.len());
        // The same input gives the same calls.
        assert_eq!(cut_all(&keys, 10, 3).0, calls);
    }
}
