//! Specialization on hyperparameter decisions.
//!
//! Boolean hyperparameters (`amsgrad`, `nesterov`) and comparisons of hyperparameters with
//! constants (`max_grad_norm > 0`) decide, for a given set of values, which branches of a rule are
//! live. [`Decisions`] finds those decisions in a compiled program; [`specialize`] rebuilds the
//! program with them fixed and reruns the pipeline, so a disabled option costs nothing: no buffer
//! traffic for its state, no pass for its reduction. The runtime keeps one specialized program per
//! set of decisions and switches when a hyperparameter change flips one.

use crate::ir::{Kind, Node, NodeId, Program, Ty};
use crate::ops::{binary_f64, unary_f64};
use crate::random;
use std::collections::HashMap;

/// The decisions a program's hyperparameter values can make, and those that what is known at
/// the start of a step decides ([`StepFacts`]: `t % I == 0`, a comparison of scalar state, a
/// scalar draw): work under a condition that is false this step costs nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Decisions {
    /// Boolean nodes computed from hyperparameters and constants (and, where `per_step` says
    /// so, from step facts), reachable from the roots.
    nodes: Vec<NodeId>,
    /// Whether each node needs step facts.
    per_step: Vec<bool>,
}

/// What is known of a step before it runs.
#[derive(Debug, Clone, Copy)]
pub struct StepFacts<'a> {
    /// The step counter `t` (1 on the first step).
    pub t: f64,
    /// Scalar state values at the start of the step.
    pub scalar_states: &'a [f64],
    /// The seed of random draws.
    pub seed: u64,
}

/// The value of a node computed from constants, hyperparameters and (with `facts`) the step's
/// facts only, or `None`.
fn static_value(
    p: &Program,
    id: NodeId,
    hypers: &[f64],
    facts: Option<&StepFacts<'_>>,
    memo: &mut HashMap<NodeId, Option<f64>>,
) -> Option<f64> {
    if let Some(&v) = memo.get(&id) {
        return v;
    }
    let v = match p.graph.node(id) {
        Node::Const(b) => Some(f64::from_bits(b)),
        Node::Bool(b) => Some(f64::from(u8::from(b))),
        Node::Hyper(h) => Some(hypers[h as usize]),
        Node::Step => facts.map(|f| f.t),
        Node::ScalarState(i) => facts.and_then(|f| f.scalar_states.get(i as usize).copied()),
        Node::Random {
            dist,
            stream,
            kind: Kind::Scalar,
            seed,
        } => match facts {
            None => None,
            Some(f) => {
                let key = match seed {
                    Some(s) => static_value(p, s, hypers, facts, memo).map(random::seed_key),
                    None => Some(f.seed),
                };
                key.map(|k| f64::from(random::draw(dist, k, f.t as u64, stream, 0)))
            }
        },
        Node::Unary(op, a) => static_value(p, a, hypers, facts, memo).map(|a| unary_f64(op, a)),
        Node::Binary(op, a, b) => match (
            static_value(p, a, hypers, facts, memo),
            static_value(p, b, hypers, facts, memo),
        ) {
            (Some(a), Some(b)) => Some(binary_f64(op, a, b)),
            _ => None,
        },
        Node::Select(c, a, b) => match static_value(p, c, hypers, facts, memo) {
            Some(c) => static_value(p, if c != 0.0 { a } else { b }, hypers, facts, memo),
            None => None,
        },
        _ => None,
    };
    memo.insert(id, v);
    v
}

impl Decisions {
    /// Finds the decisions of a program: maximal boolean subexpressions of hyperparameters,
    /// constants and step facts (a whole `amsgrad && weight_decay > 0` is one decision).
    pub fn of(p: &Program) -> Decisions {
        let defaults: Vec<f64> = p.info.hypers.iter().map(|h| h.default).collect();
        let zeros = vec![0.0; p.info.scalar_states.len()];
        let facts = StepFacts {
            t: 2.0,
            scalar_states: &zeros,
            seed: 0,
        };
        let (mut memo, mut memo_h) = (HashMap::new(), HashMap::new());
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut stack = p.roots();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            // Constant-only booleans were folded away, so a static boolean reads a
            // hyperparameter or a step fact.
            let is_static = static_value(p, id, &defaults, Some(&facts), &mut memo).is_some();
            if is_static && p.graph.ty(id) == Ty::Bool && !matches!(p.graph.node(id), Node::Bool(_))
            {
                let per_step = static_value(p, id, &defaults, None, &mut memo_h).is_none();
                found.push((id, per_step));
                continue;
            }
            stack.extend(p.graph.node(id).children());
        }
        found.sort();
        Decisions {
            nodes: found.iter().map(|f| f.0).collect(),
            per_step: found.iter().map(|f| f.1).collect(),
        }
    }

    /// No decisions: the program is never specialized.
    pub fn none() -> Decisions {
        Decisions {
            nodes: Vec::new(),
            per_step: Vec::new(),
        }
    }

    /// How many decisions there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether any decision depends on the step's facts (the specialization may change from
    /// one step to the next).
    pub fn has_per_step(&self) -> bool {
        self.per_step.iter().any(|&s| s)
    }

    /// The decisions on which every one of these sets of values (one per parameter group) agrees:
    /// a program specialized on them is right for every group. Decisions that need step facts
    /// are kept only with `facts`.
    pub fn agreeing_at(
        &self,
        p: &Program,
        sets: &[&[f64]],
        facts: Option<&StepFacts<'_>>,
    ) -> Decisions {
        let keys: Vec<Vec<Option<bool>>> = sets.iter().map(|h| self.key_at(p, h, facts)).collect();
        let keep: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| keys[0][i].is_some() && keys.iter().all(|k| k[i] == keys[0][i]))
            .collect();
        Decisions {
            nodes: keep.iter().map(|&i| self.nodes[i]).collect(),
            per_step: keep.iter().map(|&i| self.per_step[i]).collect(),
        }
    }

    /// [`Decisions::agreeing_at`] without step facts: the hyperparameter decisions.
    pub fn agreeing(&self, p: &Program, sets: &[&[f64]]) -> Decisions {
        self.agreeing_at(p, sets, None)
    }

    /// The decisions' outcomes for these hyperparameter values and step facts (the key of a
    /// specialization); `None` for a decision that needs step facts when there are none.
    pub fn key_at(
        &self,
        p: &Program,
        hypers: &[f64],
        facts: Option<&StepFacts<'_>>,
    ) -> Vec<Option<bool>> {
        let mut memo = HashMap::new();
        self.nodes
            .iter()
            .map(|&n| static_value(p, n, hypers, facts, &mut memo).map(|v| v != 0.0))
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
/// (the first step of [`specialize`]); decisions that need step facts stay.
pub fn fixed(p: &Program, decisions: &Decisions, hypers: &[f64]) -> Program {
    fixed_at(p, decisions, hypers, None)
}

/// [`fixed`] with the step's facts: the decisions that need them are fixed too.
pub fn fixed_at(
    p: &Program,
    decisions: &Decisions,
    hypers: &[f64],
    facts: Option<&StepFacts<'_>>,
) -> Program {
    let key = decisions.key_at(p, hypers, facts);
    let outcomes: HashMap<NodeId, bool> = decisions
        .nodes
        .iter()
        .copied()
        .zip(key)
        .filter_map(|(n, k)| k.map(|k| (n, k)))
        .collect();
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
