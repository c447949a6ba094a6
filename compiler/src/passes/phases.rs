//! Phase splitting: turns each stage's stores into as few passes over memory as its reductions
//! allow, each pass one fused kernel per space.
//!
//! A value that depends on a reduction of this stage cannot be computed in the pass that
//! accumulates the reduction. So each node gets the earliest phase where it is *ready*: leaves
//! are ready in phase 0, a reduction's result one phase after its argument, anything else when its
//! last input is. Each store first goes to the phase where its value is ready. Then:
//! - a later phase that needs a stored value reloads it from the buffer (one load instead of
//!   recomputing it and everything it was computed from);
//! - a later phase that needs a buffer's *old* value delays that buffer's store to that phase
//!   (so old values are never lost), repeated until nothing conflicts.
//!
//! Each phase's work is then grouped by space into kernels; values needed in several phases are
//! recomputed from loads in each (memory traffic, not arithmetic, is the cost of an optimizer step).

use crate::ir::{BufId, Kernel, Kind, Node, NodeId, Phase, Program};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Reduce nodes reachable from `roots`.
fn reductions_from(p: &Program, roots: &[NodeId]) -> Vec<NodeId> {
    let mut seen = HashSet::new();
    let mut out = BTreeSet::new();
    let mut stack = roots.to_vec();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let node = p.graph.node(id);
        if let Node::Reduce { .. } = node {
            out.insert(id);
        }
        stack.extend(node.children());
    }
    out.into_iter().collect()
}

/// Reduce nodes under `id` that no other reduction under `id` contains.
fn reductions_under(p: &Program, id: NodeId) -> Vec<NodeId> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut stack = vec![id];
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        match p.graph.node(n) {
            Node::Reduce { .. } => out.push(n),
            node => stack.extend(node.children()),
        }
    }
    out
}

/// The highest generation of a param/state load under `id` (inputs do not count), if any.
fn load_gen(p: &Program, id: NodeId) -> Option<u16> {
    let mut best = None;
    let mut seen = HashSet::new();
    let mut stack = vec![id];
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        match p.graph.node(n) {
            Node::Load { gen, buf } if !p.info.is_input(buf) => {
                best = Some(best.map_or(gen, |b: u16| b.max(gen)));
            }
            Node::Reduce { .. } if n != id => {}
            node => stack.extend(node.children()),
        }
    }
    best
}

struct StagePlanner<'p> {
    p: &'p mut Program,
    /// Reductions computed in this stage.
    mine: HashSet<NodeId>,
    ready: HashMap<NodeId, usize>,
}

impl StagePlanner<'_> {
    fn ready(&mut self, id: NodeId) -> usize {
        if let Some(&r) = self.ready.get(&id) {
            return r;
        }
        let node = self.p.graph.node(id);
        let r = match node {
            Node::Reduce { arg, .. } => {
                if self.mine.contains(&id) {
                    self.ready(arg) + 1
                } else {
                    0
                }
            }
            n => n
                .children()
                .into_iter()
                .map(|c| self.ready(c))
                .max()
                .unwrap_or(0),
        };
        self.ready.insert(id, r);
        r
    }
}

/// Plans one stage of one variant.
fn plan_stage(p: &mut Program, vi: usize, k: usize, mine: HashSet<NodeId>) {
    let stores = p.variants[vi].stages[k].stores.clone();
    let mut sp = StagePlanner {
        p,
        mine,
        ready: HashMap::new(),
    };
    let mut store_phase: BTreeMap<BufId, usize> =
        stores.iter().map(|&(b, v)| (b, sp.ready(v))).collect();
    let mut reds: Vec<(NodeId, NodeId, usize)> = Vec::new();
    let mut mine: Vec<NodeId> = sp.mine.iter().copied().collect();
    mine.sort();
    for r in mine {
        if let Node::Reduce { arg, .. } = sp.p.graph.node(r) {
            let ph = sp.ready(arg);
            reds.push((r, arg, ph));
        }
    }
    // Stored values that later phases reload. A plain load of another buffer is not one of them:
    // that buffer still holds the value (or the conflict loop below delays its store).
    let final_of: HashMap<NodeId, BufId> = stores
        .iter()
        .filter(|&&(_, v)| !matches!(sp.p.graph.node(v), Node::Load { .. }))
        .map(|&(b, v)| (v, b))
        .collect();
    let stored: HashSet<BufId> = stores.iter().map(|&(b, _)| b).collect();
    let p = sp.p;
    // Delay stores until no later phase needs the old value.
    loop {
        let mut changed = false;
        let nphases = store_phase
            .values()
            .copied()
            .chain(reds.iter().map(|r| r.2))
            .max()
            .map_or(0, |m| m + 1);
        for ph in 0..nphases {
            let roots: Vec<NodeId> = stores
                .iter()
                .filter(|(b, _)| store_phase[b] == ph)
                .map(|&(_, v)| v)
                .chain(reds.iter().filter(|r| r.2 == ph).map(|r| r.1))
                .collect();
            let mut seen = HashSet::new();
            let mut stack = roots;
            while let Some(n) = stack.pop() {
                if !seen.insert(n) || !matches!(p.graph.kind(n), Kind::Element(_)) {
                    continue;
                }
                if let Some(b) = final_of.get(&n) {
                    if store_phase[b] < ph {
                        continue;
                    }
                }
                let node = p.graph.node(n);
                if let Node::Load { buf, gen } = node {
                    if gen as usize == k && stored.contains(&buf) && store_phase[&buf] < ph {
                        store_phase.insert(buf, ph);
                        changed = true;
                    }
                }
                stack.extend(node.children());
            }
        }
        if !changed {
            break;
        }
    }
    // Materialize each phase: stored values needed later become loads of the new contents.
    let nphases = store_phase
        .values()
        .copied()
        .chain(reds.iter().map(|r| r.2))
        .max()
        .map_or(0, |m| m + 1);
    let mut phases = Vec::new();
    for ph in 0..nphases {
        let mut memo: HashMap<NodeId, NodeId> = HashMap::new();
        let mut kernels: BTreeMap<u16, Kernel> = BTreeMap::new();
        let mut mat = |p: &mut Program, root: NodeId| -> NodeId {
            materialize(p, root, ph, k, &final_of, &store_phase, &mut memo)
        };
        let mut phase_stores = Vec::new();
        for &(b, v) in &stores {
            if store_phase[&b] == ph {
                phase_stores.push((b, mat(p, v)));
            }
        }
        let mut phase_reds = Vec::new();
        for &(r, arg, rph) in &reds {
            if rph == ph {
                phase_reds.push((r, mat(p, arg)));
            }
        }
        fn kernel(kernels: &mut BTreeMap<u16, Kernel>, space: u16) -> &mut Kernel {
            kernels.entry(space).or_insert_with(|| Kernel {
                space,
                ..Default::default()
            })
        }
        for (b, v) in phase_stores {
            kernel(&mut kernels, p.info.buffers[b as usize].space)
                .stores
                .push((b, v));
        }
        for (r, a) in phase_reds {
            kernel(&mut kernels, p.graph.kind(a).space().unwrap_or(0))
                .reductions
                .push((r, a));
        }
        let mut ks: Vec<Kernel> = kernels.into_values().collect();
        for kern in &mut ks {
            let roots: Vec<NodeId> = kern
                .stores
                .iter()
                .map(|s| s.1)
                .chain(kern.reductions.iter().map(|r| r.1))
                .collect();
            let mut body = BTreeSet::new();
            let mut stack = roots;
            while let Some(n) = stack.pop() {
                if !matches!(p.graph.kind(n), Kind::Element(_)) || !body.insert(n) {
                    continue;
                }
                stack.extend(p.graph.node(n).children());
            }
            kern.body = body.into_iter().collect();
            kern.loads = kern
                .body
                .iter()
                .copied()
                .filter(|&n| matches!(p.graph.node(n), Node::Load { .. }))
                .collect();
        }
        if !ks.is_empty() {
            phases.push(Phase { kernels: ks });
        }
    }
    p.variants[vi].stages[k].phases = phases;
}

fn materialize(
    p: &mut Program,
    id: NodeId,
    ph: usize,
    k: usize,
    final_of: &HashMap<NodeId, BufId>,
    store_phase: &BTreeMap<BufId, usize>,
    memo: &mut HashMap<NodeId, NodeId>,
) -> NodeId {
    if let Some(&m) = memo.get(&id) {
        return m;
    }
    if !matches!(p.graph.kind(id), Kind::Element(_)) {
        return id;
    }
    let out = match final_of.get(&id) {
        Some(&b) if store_phase[&b] < ph => p.add(Node::Load {
            buf: b,
            gen: (k + 1) as u16,
        }),
        _ => {
            let node = p.graph.node(id);
            let children = node.children();
            let mapped: Vec<NodeId> = children
                .iter()
                .map(|&c| materialize(p, c, ph, k, final_of, store_phase, memo))
                .collect();
            if mapped == children {
                id
            } else {
                let mut it = mapped.into_iter();
                let new = node.map_children(|_| it.next().expect("same arity"));
                p.add(new)
            }
        }
    };
    memo.insert(id, out);
    out
}

/// Runs the pass.
pub fn run(p: &mut Program) {
    for vi in 0..p.variants.len() {
        // Every reduction the step needs, assigned to the stage whose values it reads: the stage of
        // its latest param/state load, or (reductions of inputs only) the first stage that uses it.
        let nstages = p.variants[vi].stages.len();
        let mut all_roots: Vec<NodeId> = p.variants[vi]
            .scalar_updates
            .iter()
            .map(|&(_, n)| n)
            .collect();
        for s in &p.variants[vi].stages {
            all_roots.extend(s.stores.iter().map(|&(_, n)| n));
        }
        let mut assigned: HashMap<NodeId, usize> = HashMap::new();
        for r in reductions_from(p, &all_roots) {
            if let Some(g) = load_gen(p, r) {
                assigned.insert(r, g as usize);
            }
        }
        for k in 0..nstages {
            let roots: Vec<NodeId> = p.variants[vi].stages[k]
                .stores
                .iter()
                .map(|&(_, n)| n)
                .collect();
            for r in reductions_from(p, &roots) {
                assigned.entry(r).or_insert(k);
            }
        }
        // A reduction of inputs only that another reduction reads must be ready when that one
        // runs: no later than the stage of the reduction that reads it. Outer reductions come
        // later in node order, so walking down the ids settles each one before what it reads;
        // one that no store and no reduction reads (scalar state only) runs in the last stage.
        let all = reductions_from(p, &all_roots);
        let by_gen: HashSet<NodeId> = assigned.keys().copied().collect();
        for &r in all.iter().rev() {
            let s = *assigned.entry(r).or_insert(nstages.saturating_sub(1));
            let Node::Reduce { arg, .. } = p.graph.node(r) else {
                continue;
            };
            for inner in reductions_under(p, arg) {
                if !by_gen.contains(&inner) {
                    let e = assigned.entry(inner).or_insert(s);
                    *e = (*e).min(s);
                }
            }
        }
        for k in 0..nstages {
            let mine: HashSet<NodeId> = assigned
                .iter()
                .filter(|(_, &s)| s == k)
                .map(|(&r, _)| r)
                .collect();
            plan_stage(p, vi, k, mine);
        }
    }
}
