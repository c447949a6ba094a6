//! Specialization on hyperparameter decisions.
//!
//! Boolean hyperparameters (`amsgrad`, `nesterov`) and comparisons of hyperparameters with
//! constants (`max_grad_norm > 0`) decide, for a given set of values, which branches of a rule are
//! live. [`Decisions`] finds those decisions in a compiled program; [`specialize`] rebuilds the
//! program with them fixed and reruns the pipeline, so a disabled option costs nothing: no buffer
//! traffic for its state, no pass for its reduction. The runtime keeps one specialized program per
//! set of decisions and switches when a hyperparameter change flips one.

use crate::ir::{Node, NodeId, Program, Ty};
use crate::ops::{binary_f64, unary_f64};
use std::collections::HashMap;

/// The decisions a program's hyperparameter values can make.
#[derive(Debug, Clone, PartialEq)]
pub struct Decisions {
    /// Boolean nodes computed from hyperparameters and constants only, reachable from the roots.
    nodes: Vec<NodeId>,
}

/// The value of a node computed from constants and hyperparameters only, or `None`.
fn static_value(
    p: &Program,
    id: NodeId,
    hypers: &[f64],
    memo: &mut HashMap<NodeId, Option<f64>>,
) -> Option<f64> {
    if let Some(&v) = memo.get(&id) {
        return v;
    }
    let v = match p.graph.node(id) {
        Node::Const(b) => Some(f64::from_bits(b)),
        Node::Bool(b) => Some(f64::from(u8::from(b))),
        Node::Hyper(h) => Some(hypers[h as usize]),
        Node::Unary(op, a) => static_value(p, a, hypers, memo).map(|a| unary_f64(op, a)),
        Node::Binary(op, a, b) => match (
            static_value(p, a, hypers, memo),
            static_value(p, b, hypers, memo),
        ) {
            (Some(a), Some(b)) => Some(binary_f64(op, a, b)),
            _ => None,
        },
        Node::Select(c, a, b) => match static_value(p, c, hypers, memo) {
            Some(c) => static_value(p, if c != 0.0 { a } else { b }, hypers, memo),
            None => None,
        },
        _ => None,
    };
    memo.insert(id, v);
    v
}

impl Decisions {
    /// Finds the decisions of a program: maximal boolean subexpressions of hyperparameters and
    /// constants (a whole `amsgrad && weight_decay > 0` is one decision).
    pub fn of(p: &Program) -> Decisions {
        let defaults: Vec<f64> = p.info.hypers.iter().map(|h| h.default).collect();
        let mut memo = HashMap::new();
        let mut nodes = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut stack = p.roots();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            // Constant-only booleans were folded away, so a static boolean reads a hyperparameter.
            let is_static = static_value(p, id, &defaults, &mut memo).is_some();
            if is_static && p.graph.ty(id) == Ty::Bool && !matches!(p.graph.node(id), Node::Bool(_))
            {
                nodes.push(id);
                continue;
            }
            stack.extend(p.graph.node(id).children());
        }
        nodes.sort();
        Decisions { nodes }
    }

    /// No decisions: the program is never specialized.
    pub fn none() -> Decisions {
        Decisions { nodes: Vec::new() }
    }

    /// How many decisions there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The decisions on which every one of these sets of values (one per parameter group) agrees:
    /// a program specialized on them is right for every group.
    pub fn agreeing(&self, p: &Program, sets: &[&[f64]]) -> Decisions {
        let keys: Vec<Vec<bool>> = sets.iter().map(|h| self.key(p, h)).collect();
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|&(i, _)| keys.iter().all(|k| k[i] == keys[0][i]))
            .map(|(_, &n)| n)
            .collect();
        Decisions { nodes }
    }

    /// The decisions' outcomes for these hyperparameter values (the key of a specialization).
    pub fn key(&self, p: &Program, hypers: &[f64]) -> Vec<bool> {
        let mut memo = HashMap::new();
        self.nodes
            .iter()
            .map(|&n| static_value(p, n, hypers, &mut memo).is_some_and(|v| v != 0.0))
            .collect()
    }
}

/// The program with the decisions fixed to the outcomes of `hypers`, through the passes of
/// [`SPECIALIZED`](crate::passes::SPECIALIZED) (the pipeline, except that states stay live: a state
/// that these decisions make unread must still evolve, since other values may read it later).
pub fn specialize(p: &Program, decisions: &Decisions, hypers: &[f64]) -> Program {
    let mut q = fixed(p, decisions, hypers);
    crate::passes::run_pipeline(&mut q, crate::passes::SPECIALIZED, &mut |_, _| {});
    q
}

/// The program with the decisions replaced by their outcomes for `hypers`, and no kernels yet
/// (the first step of [`specialize`]).
pub fn fixed(p: &Program, decisions: &Decisions, hypers: &[f64]) -> Program {
    let key = decisions.key(p, hypers);
    let outcomes: HashMap<NodeId, bool> = decisions.nodes.iter().copied().zip(key).collect();
    let mut q = p.clone();
    for v in &mut q.variants {
        for s in &mut v.stages {
            s.phases.clear();
        }
    }
    q.rebuild_with_ids(true, |rb, old_id, node| match outcomes.get(&old_id) {
        Some(&b) => rb.add(Node::Bool(b)),
        None => rb.add(node),
    });
    q
}
