//! Ordering and dependencies between items (`--order-key`, `--id-column`,
//! `--depends-on-column`).
//!
//! Without them a backfill streams calls in file, then row order (see the
//! crate docs). With them, the whole input is read first (a full pass is
//! needed to know every id), and the items become a graph of calls:
//!
//! 1. **Item graph.** With `id_column` + `depends_on_column`, each item may
//!    name the ids it depends on (null, `""`, one id, or a JSON list of ids).
//!    Duplicate ids, dependencies on ids that no item has, and cycles are
//!    reported (with ids and `file:row`) before anything is called. An
//!    item's *level* is 0 without dependencies, else one more than the
//!    highest level of its dependencies.
//! 2. **Calls.** Items are grouped by (level, order key) — keyless items
//!    form one group per level — and each group, in file/row order, is cut
//!    into calls of up to `max_items_per_call`. So a call never mixes keys
//!    nor levels, and no item depends on another item of its own call.
//! 3. **Call graph.** A call *requires* every call holding one of its items'
//!    dependencies: it runs only once they succeeded, and if one failed it is
//!    dead-lettered as `Sluice.DependencyFailed` without being called. The
//!    calls of one key are chained in (level, file/row) order: each runs
//!    after the previous one *finished* (succeeded or failed), so the calls
//!    of one key never overlap while keys run in parallel, up to
//!    `max_concurrency` calls in flight.
//!
//! Call ids stay deterministic (`"<file>#<row>@L<level>n<count>[k=<field>]"`
//! of the call's first item), so progress and resume work as in the
//! streaming mode; a call already recorded counts as succeeded for its
//! dependents.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::{BackfillError, Call, Input, Limits, Run};

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
}

/// A readable item with where it comes from.
pub(crate) struct Loaded {
    pub(crate) source: String,
    pub(crate) index: u64,
    pub(crate) value: Value,
}

impl Loaded {
    /// `file:row`, the row 1-based.
    fn place(&self) -> String {
        format!("{}:{}", self.source, self.index + 1)
    }
}

/// Reads every source (through the crate's reader, one item per "call"):
/// readable items in file/row order, and the unreadable ones.
pub(crate) async fn load(
    sources: Vec<PathBuf>,
    input: Input,
) -> Result<(Vec<Loaded>, Vec<Call>), BackfillError> {
    let (tx, mut rx) = mpsc::channel(1024);
    let one = Limits {
        items: 1,
        bytes: usize::MAX,
    };
    let reader = tokio::task::spawn_blocking(move || crate::reader(sources, input, one, tx));
    let (mut items, mut bad) = (Vec::new(), Vec::new());
    let mut error = None;
    while let Some(next) = rx.recv().await {
        match next {
            Err(e) => {
                error = Some(e);
                break;
            }
            Ok(mut call) => {
                if !call.bad.is_empty() {
                    bad.push(Call {
                        bad: std::mem::take(&mut call.bad),
                        ..Call::new(call.source.clone(), call.first)
                    });
                }
                for (k, value) in call.items.into_iter().enumerate() {
                    items.push(Loaded {
                        source: call.source.clone(),
                        index: call.first + k as u64,
                        value,
                    });
                }
            }
        }
    }
    drop(rx);
    let _ = reader.await;
    match error {
        Some(e) => Err(e),
        None => Ok((items, bad)),
    }
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

/// One call of the graph.
struct Node {
    call: Call,
    id: String,
    level: u64,
    key: Option<String>,
    /// Unfinished calls this one waits for.
    waits: usize,
    /// (successor, whether it requires this call's success).
    succ: Vec<(usize, bool)>,
    /// A required call that failed.
    dep_failed: Option<String>,
}

/// The planned graph: calls sorted by (level, first item's position).
struct Graph {
    nodes: Vec<Node>,
    levels: Vec<LevelPlan>,
}

fn build(items: Vec<Loaded>, order: &OrderConfig, limits: Limits) -> Result<Graph, BackfillError> {
    order.check()?;
    let n = items.len();
    // Item dependencies, by position.
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
    if let (Some(id_col), Some(dep_col)) = (&order.id_column, &order.depends_on_column) {
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(id) = scalar(item.value.get(id_col)) {
                if let Some(&j) = by_id.get(&id) {
                    return Err(BackfillError::Dependencies(format!(
                        "duplicate id {id:?} in {id_col:?}: {} and {}",
                        items[j].place(),
                        item.place()
                    )));
                }
                by_id.insert(id, i);
            }
        }
        let mut missing = Vec::new();
        for (i, item) in items.iter().enumerate() {
            for dep in depends_on(item.value.get(dep_col)) {
                match by_id.get(&dep) {
                    Some(&j) => {
                        if !deps[i].contains(&j) {
                            deps[i].push(j);
                        }
                    }
                    None => missing.push(format!("{} depends on missing id {dep:?}", item.place())),
                }
            }
        }
        if !missing.is_empty() {
            let more = missing.len().saturating_sub(10);
            missing.truncate(10);
            let mut msg = format!("dependency on a missing item: {}", missing.join("; "));
            if more > 0 {
                msg.push_str(&format!(" (and {more} more)"));
            }
            return Err(BackfillError::Dependencies(msg));
        }
    }

    // Levels by Kahn's algorithm; what is left over lies on or behind a cycle.
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (i, d) in deps.iter().enumerate() {
        indegree[i] = d.len();
        for &j in d {
            dependents[j].push(i);
        }
    }
    let mut level = vec![0u64; n];
    let mut queue: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut seen = 0;
    while let Some(j) = queue.pop() {
        seen += 1;
        for &i in &dependents[j] {
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
            let next = deps[cur]
                .iter()
                .copied()
                .find(|&j| indegree[j] > 0)
                .expect("a left-over item has a left-over dependency");
            if let Some(&at) = on_path.get(&next) {
                break path[at..].to_vec();
            }
            on_path.insert(next, path.len());
            path.push(next);
        };
        let id_col = order.id_column.as_deref().unwrap_or_default();
        let names: Vec<String> = cycle
            .iter()
            .chain(cycle.first())
            .map(|&i| {
                format!(
                    "{} ({})",
                    scalar(items[i].value.get(id_col)).unwrap_or_default(),
                    items[i].place()
                )
            })
            .collect();
        return Err(BackfillError::Dependencies(format!(
            "dependency cycle: {} (each depends on the next)",
            names.join(" -> ")
        )));
    }

    // Calls: per (level, key) group, in file/row order.
    let keys: Vec<Option<String>> = items
        .iter()
        .map(|it| {
            order
                .order_key
                .as_ref()
                .and_then(|k| scalar(it.value.get(k)))
        })
        .collect();
    let mut groups: BTreeMap<(u64, Option<&String>), Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        groups
            .entry((level[i], keys[i].as_ref()))
            .or_default()
            .push(i);
    }
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    for members in groups.values() {
        let mut current: Vec<usize> = Vec::new();
        let mut bytes = 0;
        for &i in members {
            let size = crate::json_size(&items[i].value);
            if !current.is_empty() && limits.full(current.len(), bytes, size) {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(i);
            bytes += size;
        }
        if !current.is_empty() {
            chunks.push(current);
        }
    }
    chunks.sort_by_key(|c| (level[c[0]], c[0]));
    let mut call_of = vec![0usize; n];
    for (c, members) in chunks.iter().enumerate() {
        for &i in members {
            call_of[i] = c;
        }
    }
    let key_tag = order
        .order_key
        .as_ref()
        .map_or(String::new(), |k| format!("k={k}"));
    let mut items: Vec<Option<Loaded>> = items.into_iter().map(Some).collect();
    let mut nodes: Vec<Node> = Vec::with_capacity(chunks.len());
    let mut levels: BTreeMap<u64, (LevelPlan, BTreeSet<String>)> = BTreeMap::new();
    for members in &chunks {
        let first = members[0];
        let values: Vec<Loaded> = members
            .iter()
            .map(|&i| items[i].take().expect("each item is in one call"))
            .collect();
        let (source, index) = (values[0].source.clone(), values[0].index);
        let lvl = level[first];
        let key = keys[first].clone();
        let id = format!("{source}#{index}@L{lvl}n{}{key_tag}", values.len());
        let entry = levels.entry(lvl).or_insert_with(|| {
            (
                LevelPlan {
                    level: lvl,
                    items: 0,
                    calls: 0,
                    keys: 0,
                },
                BTreeSet::new(),
            )
        });
        entry.0.items += values.len() as u64;
        entry.0.calls += 1;
        if let Some(k) = &key {
            entry.1.insert(k.clone());
        }
        nodes.push(Node {
            call: Call {
                items: values.into_iter().map(|l| l.value).collect(),
                ..Call::new(source, index)
            },
            id,
            level: lvl,
            key,
            waits: 0,
            succ: Vec::new(),
            dep_failed: None,
        });
    }
    // Edges: required dependencies, then the chains of each key.
    let mut edges: BTreeSet<(usize, usize, bool)> = BTreeSet::new();
    for (c, members) in chunks.iter().enumerate() {
        for &i in members {
            for &j in &deps[i] {
                edges.insert((call_of[j], c, true));
            }
        }
    }
    let mut last_of_key: HashMap<&str, usize> = HashMap::new();
    for (c, node) in nodes.iter().enumerate() {
        if let Some(k) = &node.key
            && let Some(prev) = last_of_key.insert(k.as_str(), c)
            && !edges.contains(&(prev, c, true))
        {
            edges.insert((prev, c, false));
        }
    }
    for (from, to, requires) in edges {
        nodes[from].succ.push((to, requires));
        nodes[to].waits += 1;
    }
    let levels = levels
        .into_values()
        .map(|(mut p, keys)| {
            p.keys = keys.len() as u64;
            p
        })
        .collect();
    Ok(Graph { nodes, levels })
}

/// Reads every source and plans the dependency levels without calling
/// anything (`--dry-run` with ordering options).
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
    order.check()?;
    let (items, _bad) = load(sources.to_vec(), input.clone()).await?;
    Ok(build(items, order, limits)?.levels)
}

/// Runs the calls of the graph; returns whether `shutdown` interrupted it.
pub(crate) async fn run_graph<S: Future<Output = ()>>(
    run: &Arc<Run>,
    mut shutdown: Pin<&mut S>,
) -> Result<bool, BackfillError> {
    let order = run.cfg.order.clone();
    order.check()?;
    let loaded = tokio::select! {
        biased;
        () = &mut shutdown => return Ok(true),
        l = load(run.cfg.sources.clone(), run.cfg.input.clone()) => l?,
    };
    let (items, bad) = loaded;
    let total_bad = bad.iter().map(|c| c.bad.len() as u64).sum::<u64>();
    let total_items = items.len() as u64;
    let graph = build(items, &order, run.cfg.limits())?;
    run.set_expected_items(total_items + total_bad);
    run.update(|s| s.items_total += total_items + total_bad);
    for call in &bad {
        run.bad_items(call);
    }
    let mut nodes = graph.nodes;
    let mut ready: BTreeSet<usize> = (0..nodes.len()).filter(|&c| nodes[c].waits == 0).collect();
    let mut tasks: tokio::task::JoinSet<(usize, bool)> = tokio::task::JoinSet::new();
    let concurrency = run.cfg.max_concurrency.max(1);
    let mut interrupted = false;

    // Marks call `c` finished and releases what waited for it.
    let finish = |nodes: &mut Vec<Node>, ready: &mut BTreeSet<usize>, c: usize, ok: bool| {
        let id = nodes[c].id.clone();
        for (s, requires) in std::mem::take(&mut nodes[c].succ) {
            let next = &mut nodes[s];
            if requires && !ok && next.dep_failed.is_none() {
                next.dep_failed = Some(id.clone());
            }
            next.waits -= 1;
            if next.waits == 0 {
                ready.insert(s);
            }
        }
    };

    'outer: loop {
        while tasks.len() < concurrency
            && !run.stop.load(Ordering::SeqCst)
            && let Some(c) = ready.pop_first()
        {
            let count = nodes[c].call.items.len() as u64;
            run.update(|s| s.calls_total += 1);
            if let Some(dep) = nodes[c].dep_failed.clone() {
                let node = &nodes[c];
                run.dependency_failed(
                    &node.call,
                    &node.id,
                    &format!("the call {dep} it depends on"),
                );
                finish(&mut nodes, &mut ready, c, false);
                continue;
            }
            match run.progress.succeeded(&nodes[c].id) {
                Ok(true) => {
                    run.update(|s| {
                        s.calls_skipped += 1;
                        s.items_skipped += count;
                    });
                    finish(&mut nodes, &mut ready, c, true);
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    run.fail(e);
                    break 'outer;
                }
            }
            let node = &mut nodes[c];
            let emptied = Call::new(node.call.source.clone(), node.call.first);
            let call = std::mem::replace(&mut node.call, emptied);
            let mut extra = Map::new();
            extra.insert("level".into(), json!(node.level));
            if let Some(k) = &node.key {
                extra.insert("key".into(), json!(k));
            }
            let id = node.id.clone();
            let run = Arc::clone(run);
            tasks.spawn(async move { (c, run.invoke_call(&id, call, extra).await) });
        }
        if tasks.is_empty() || run.stop.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            done = tasks.join_next() => match done {
                Some(Ok((c, ok))) => finish(&mut nodes, &mut ready, c, ok),
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(_)) | None => {}
            },
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(interrupted)
}
