//! Guards against non-finite inputs.
//!
//! [`guard_inputs`] adds to every stage a check that all of its per-element inputs are finite:
//! `sum(g * 0)` over each input is 0, or NaN when any element is infinite or NaN. The inputs of a
//! stage are those its stores read and, in the last stage, those the scalar-state updates read
//! (an input that reaches only a scalar state is checked too). Every store is multiplied by
//! `1 + 0 * check` (exactly 1 when the inputs are finite), so all stores depend on the check and
//! the phase planner puts them after it: the first phase stores nothing, and the host can decide
//! after it to skip the step or report an error with nothing written. (Scalar inputs are checked
//! by the host before the step.) When the rule already
//! reads its inputs in a pass before the update (a clipping norm), the check joins that pass for
//! free; otherwise it costs one read of the inputs.

use crate::ir::{BinOp, BufId, Node, NodeId, Program, ReduceOp};
use std::collections::{BTreeSet, HashSet};

/// Whether a reduction is a guard added by [`guard_inputs`].
pub fn is_guard(p: &Program, r: NodeId) -> bool {
    let Node::Reduce {
        op: ReduceOp::Sum,
        per_tensor: false,
        arg,
    } = p.graph.node(r)
    else {
        return false;
    };
    let Node::Binary(BinOp::Mul, l, z) = p.graph.node(arg) else {
        return false;
    };
    matches!(p.graph.node(l), Node::Load { buf, .. } if p.info.is_input(buf))
        && p.graph.is_num(z, 0.0)
}

/// The program with every stage guarded (see the module documentation), through the passes of
/// [`GUARDED`](crate::passes::GUARDED).
pub fn guard_inputs(p: &Program) -> Program {
    let mut q = p.clone();
    guard(&mut q);
    crate::passes::run_pipeline(&mut q, crate::passes::GUARDED, &mut |_, _| {});
    q
}

/// Adds the guards to every stage's stores, leaving no kernels (the first step of
/// [`guard_inputs`]).
pub fn guard(q: &mut Program) {
    for v in &mut q.variants {
        for s in &mut v.stages {
            s.phases.clear();
        }
    }
    q.rebuild(true, |rb, n| rb.add(n));
    for vi in 0..q.variants.len() {
        for k in 0..q.variants[vi].stages.len() {
            let stores = q.variants[vi].stages[k].stores.clone();
            let last = k + 1 == q.variants[vi].stages.len();
            let scalar_updates = if last {
                q.variants[vi].scalar_updates.clone()
            } else {
                Vec::new()
            };
            let mut inputs: BTreeSet<BufId> = BTreeSet::new();
            let mut seen = HashSet::new();
            let mut stack: Vec<NodeId> = stores
                .iter()
                .map(|s| s.1)
                .chain(scalar_updates.iter().map(|u| u.1))
                .collect();
            while let Some(n) = stack.pop() {
                if !seen.insert(n) {
                    continue;
                }
                let node = q.graph.node(n);
                match node {
                    Node::Load { buf, .. } if q.info.is_input(buf) => {
                        inputs.insert(buf);
                    }
                    _ => {}
                }
                stack.extend(node.children());
            }
            if inputs.is_empty() {
                continue;
            }
            let zero = q.add(Node::num(0.0));
            let one = q.add(Node::num(1.0));
            let mut total: Option<NodeId> = None;
            for b in inputs {
                let load = q.add(Node::Load { buf: b, gen: 0 });
                let m = q.add(Node::Binary(BinOp::Mul, load, zero));
                let r = q.add(Node::Reduce {
                    op: ReduceOp::Sum,
                    per_tensor: false,
                    arg: m,
                });
                total = Some(match total {
                    None => r,
                    Some(t) => q.add(Node::Binary(BinOp::Add, t, r)),
                });
            }
            let check = total.expect("at least one input");
            let scaled = q.add(Node::Binary(BinOp::Mul, zero, check));
            let factor = q.add(Node::Binary(BinOp::Add, one, scaled));
            let guarded: Vec<(BufId, NodeId)> = stores
                .iter()
                .map(|&(b, v)| (b, q.add(Node::Binary(BinOp::Mul, v, factor))))
                .collect();
            q.variants[vi].stages[k].stores = guarded;
            if stores.is_empty() {
                // Nothing else keeps the check alive: the scalar updates depend on it.
                let updates: Vec<(u16, NodeId)> = scalar_updates
                    .iter()
                    .map(|&(s, v)| (s, q.add(Node::Binary(BinOp::Mul, v, factor))))
                    .collect();
                q.variants[vi].scalar_updates = updates;
            }
        }
    }
}
