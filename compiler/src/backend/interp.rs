//! The reference interpreter: runs a program's kernels over host buffers, in f32 or f64.
//!
//! Semantics every backend must follow:
//! - scalars and per-tensor scalars are computed in f64 on the host, then rounded once to the
//!   buffer precision where a kernel reads them;
//! - per-element arithmetic happens in the buffer precision, one operation at a time, with the
//!   meanings of [`crate::ops`];
//! - a reduction accumulates in f64, tensor after tensor, element after element; `max` of an empty
//!   group is 0 and any NaN makes it NaN;
//! - within a kernel, every element's loads happen before its stores, so updates are in place.

use crate::ir::{Kernel, Kind, Node, NodeId, Program, Ty};
use crate::ops::{binary_f64, unary_f64, Float};
use crate::random;
use std::collections::HashMap;

/// Elements evaluated at a time: the length of every value's column.
const COLUMN_LEN: usize = 1024;

/// Buffers of one rule: `bufs[buffer][tensor]` is the flat data of that tensor. Params come first
/// (buffer `i` is the param of space `i`), so the tensor lengths of each space are those of its param.
pub type Buffers<T> = Vec<Vec<Vec<T>>>;

/// The host-side values of one step.
#[derive(Debug, Clone)]
pub struct StepEnv<'a> {
    /// Hyperparameter values, in declaration order (booleans as 0/1): those of parameter group 0,
    /// which scalar-state updates also read.
    pub hypers: &'a [f64],
    /// The values of parameter groups 1, 2, ... (`groups[g - 1]`); empty when there is one group.
    pub groups: &'a [Vec<f64>],
    /// The group of each tensor, `[space][tensor]`; an empty list puts every tensor of the space in
    /// group 0.
    pub tensor_groups: &'a [Vec<usize>],
    /// The step counter (1 on the first step).
    pub t: f64,
    /// Scalar state values at the start of the step.
    pub scalar_states: &'a [f64],
    /// Scalar input values.
    pub scalar_inputs: &'a [f64],
    /// Whether the host gave each scalar input (those it did not give take their defaults; an
    /// empty list: every one was given).
    pub scalar_given: &'a [bool],
    /// The seed of random draws.
    pub seed: u64,
}

/// What random draws in a kernel are keyed by, besides their stream and element
/// ([`crate::random`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrawKey {
    /// The optimizer's seed.
    pub seed: u64,
    /// The step `t`.
    pub step: u64,
}

/// One step in progress: reduction results and memoized scalars.
#[derive(Debug)]
pub struct StepRun<'p> {
    prog: &'p Program,
    variant: usize,
    reductions: HashMap<NodeId, Vec<f64>>,
    memo: HashMap<(NodeId, usize, usize), f64>,
    lens: Vec<Vec<usize>>,
}

impl<'p> StepRun<'p> {
    /// Starts a step. `first` selects the first-step variant. `lens[space][tensor]` are the tensor lengths.
    pub fn new(prog: &'p Program, first: bool, lens: Vec<Vec<usize>>) -> Self {
        StepRun {
            prog,
            variant: if first { 0 } else { 1 },
            reductions: HashMap::new(),
            memo: HashMap::new(),
            lens,
        }
    }

    /// Records a reduction's result (one value, or one per tensor), computed by another backend.
    pub fn set_reduction(&mut self, r: NodeId, values: Vec<f64>) {
        self.reductions.insert(r, values);
    }

    /// The step variant this run executes (0: first step, 1: later steps).
    pub fn variant(&self) -> usize {
        self.variant
    }

    /// Reduction results computed so far, to carry into the next stage of the same step.
    pub fn take_reductions(&mut self) -> HashMap<NodeId, Vec<f64>> {
        std::mem::take(&mut self.reductions)
    }

    /// Restores reduction results of earlier stages of the same step.
    pub fn with_reductions(mut self, reductions: HashMap<NodeId, Vec<f64>>) -> Self {
        self.reductions = reductions;
        self
    }

    /// Evaluates a scalar (tensor index ignored) or per-tensor node on the host, in f64, with the
    /// hyperparameter values of group 0.
    pub fn scalar(&mut self, env: &StepEnv<'_>, id: NodeId, tensor: usize) -> f64 {
        self.eval(env, id, tensor, 0)
    }

    /// Evaluates a value a kernel over `space` reads for its tensor `tensor`, with the
    /// hyperparameter values of that tensor's parameter group.
    pub fn uniform(&mut self, env: &StepEnv<'_>, id: NodeId, space: usize, tensor: usize) -> f64 {
        let group = env
            .tensor_groups
            .get(space)
            .and_then(|g| g.get(tensor))
            .copied()
            .unwrap_or(0);
        self.eval(env, id, tensor, group)
    }

    fn eval(&mut self, env: &StepEnv<'_>, id: NodeId, tensor: usize, group: usize) -> f64 {
        let tensor = if self.prog.graph.kind(id) == Kind::Scalar {
            0
        } else {
            tensor
        };
        if let Some(&v) = self.memo.get(&(id, tensor, group)) {
            return v;
        }
        let v = match self.prog.graph.node(id) {
            Node::Const(b) => f64::from_bits(b),
            Node::Bool(b) => f64::from(u8::from(b)),
            Node::Hyper(h) => match group {
                0 => env.hypers[h as usize],
                g => env.groups[g - 1][h as usize],
            },
            Node::Step => env.t,
            Node::ScalarState(i) => env.scalar_states[i as usize],
            Node::ScalarInput(i) => env.scalar_inputs[i as usize],
            Node::InputOr(i, d) => {
                if env.scalar_given.get(i as usize).copied().unwrap_or(true) {
                    env.scalar_inputs[i as usize]
                } else {
                    self.eval(env, d, tensor, group)
                }
            }
            Node::Numel { space, per_tensor } => {
                let lens = &self.lens[space as usize];
                if per_tensor {
                    lens[tensor] as f64
                } else {
                    lens.iter().sum::<usize>() as f64
                }
            }
            Node::TensorCount(space) => self.lens[space as usize].len() as f64,
            Node::TensorReduce { op, arg } => {
                let space = self.prog.graph.kind(arg).space().unwrap_or(0) as usize;
                let mut acc = 0.0; // as the per-element reductions (max is of |x|)
                for j in 0..self.lens[space].len() {
                    let g = env
                        .tensor_groups
                        .get(space)
                        .and_then(|t| t.get(j))
                        .copied()
                        .unwrap_or(0);
                    acc = op.combine(acc, self.eval(env, arg, j, g));
                }
                acc
            }
            Node::Splat(_, a) => self.eval(env, a, tensor, group),
            Node::Unary(op, a) => unary_f64(op, self.eval(env, a, tensor, group)),
            Node::Binary(op, a, b) => {
                let (a, b) = (
                    self.eval(env, a, tensor, group),
                    self.eval(env, b, tensor, group),
                );
                binary_f64(op, a, b)
            }
            Node::Select(c, a, b) => {
                if self.eval(env, c, tensor, group) != 0.0 {
                    self.eval(env, a, tensor, group)
                } else {
                    self.eval(env, b, tensor, group)
                }
            }
            Node::Reduce { per_tensor, .. } => {
                let r = self
                    .reductions
                    .get(&id)
                    .expect("a reduction is computed in an earlier phase than its uses");
                if per_tensor {
                    r[tensor]
                } else {
                    r[0]
                }
            }
            Node::Random {
                dist,
                stream,
                kind,
                seed,
            } => {
                let key = match seed {
                    Some(s) => random::seed_key(self.eval(env, s, tensor, group)),
                    None => env.seed,
                };
                let e = match kind {
                    Kind::Tensor(_) => tensor as u64,
                    _ => 0,
                };
                f64::from(random::draw(dist, key, env.t as u64, stream, e))
            }
            Node::Load { .. } => unreachable!("per-element node evaluated as a scalar"),
            Node::Count(_) | Node::AxisReduce { .. } | Node::ParticleDraw { .. } => {
                unreachable!("an axis is written out before planning (passes::unroll)")
            }
        };
        self.memo.insert((id, tensor, group), v);
        v
    }

    /// Runs every phase of stage `k` over the buffers.
    pub fn run_stage<T: Float>(&mut self, env: &StepEnv<'_>, k: usize, bufs: &mut Buffers<T>) {
        for pi in 0..self.prog.variants[self.variant].stages[k].phases.len() {
            self.run_phase(env, k, pi, bufs);
        }
    }

    /// Runs phase `pi` of stage `k` over the buffers.
    pub fn run_phase<T: Float>(
        &mut self,
        env: &StepEnv<'_>,
        k: usize,
        pi: usize,
        bufs: &mut Buffers<T>,
    ) {
        let prog = self.prog;
        for kernel in &prog.variants[self.variant].stages[k].phases[pi].kernels {
            self.run_kernel(env, kernel, bufs);
        }
    }

    /// The new scalar-state values at the end of the step (`states` holds the old ones).
    pub fn scalar_updates(&mut self, env: &StepEnv<'_>) -> Vec<f64> {
        let mut out = env.scalar_states.to_vec();
        for &(i, n) in &self.prog.variants[self.variant].scalar_updates {
            out[i as usize] = self.scalar(env, n, 0);
        }
        out
    }

    fn run_kernel<T: Float>(&mut self, env: &StepEnv<'_>, kernel: &Kernel, bufs: &mut Buffers<T>) {
        let space = kernel.space as usize;
        let uniforms: Vec<Vec<T>> = (0..self.lens[space].len())
            .map(|j| {
                kernel
                    .uniforms
                    .iter()
                    .map(|&u| T::from_f64(self.uniform(env, u, space, j)))
                    .collect()
            })
            .collect();
        let lens = self.lens[space].clone();
        let key = DrawKey {
            seed: env.seed,
            step: env.t as u64,
        };
        for (r, v) in run_kernel(self.prog, kernel, &lens, &uniforms, key, bufs) {
            self.reductions.insert(r, v);
        }
    }
}

/// Runs one kernel over every tensor of its space: `lens[tensor]` elements each, `uniforms[tensor]`
/// the kernel's uniform values (in `kernel.uniforms` order) rounded to the buffer precision,
/// `key` the seed and step of its random draws.
/// Returns each reduction's result: one value per tensor (per-tensor reductions) or one value,
/// accumulated in f64 tensor after tensor, element after element.
pub fn run_kernel<T: Float>(
    prog: &Program,
    kernel: &Kernel,
    lens: &[usize],
    uniforms: &[Vec<T>],
    key: DrawKey,
    bufs: &mut Buffers<T>,
) -> Vec<(NodeId, Vec<f64>)> {
    let g = &prog.graph;
    let ntensors = lens.len();
    let slot: HashMap<NodeId, usize> = kernel
        .body
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, i))
        .collect();
    let mut partial: Vec<Vec<f64>> = kernel
        .reductions
        .iter()
        .map(|&(r, _)| match g.node(r) {
            Node::Reduce {
                per_tensor: true, ..
            } => vec![0.0; ntensors],
            _ => vec![0.0],
        })
        .collect();
    let mut base = 0u64;
    for j in 0..ntensors {
        let tensor_base = base;
        base += lens[j] as u64;
        let uniforms: HashMap<NodeId, T> = kernel
            .uniforms
            .iter()
            .copied()
            .zip(uniforms[j].iter().copied())
            .collect();
        let operand = |n: NodeId, cols: &[Vec<T>], i: usize| -> T {
            match slot.get(&n) {
                Some(&s) => cols[s][i],
                None => uniforms[&n],
            }
        };
        let len = lens[j];
        let mut cols: Vec<Vec<T>> = vec![Vec::with_capacity(COLUMN_LEN); kernel.body.len()];
        let mut start = 0;
        while start < len {
            let end = (start + COLUMN_LEN).min(len);
            for (s, &n) in kernel.body.iter().enumerate() {
                let mut col = std::mem::take(&mut cols[s]);
                col.clear();
                match g.node(n) {
                    Node::Load { buf, .. } => {
                        col.extend_from_slice(&bufs[buf as usize][j][start..end])
                    }
                    Node::Random {
                        dist, stream, seed, ..
                    } => {
                        let k = match seed {
                            Some(s) => random::seed_key(operand(s, &cols, 0).to_f64()),
                            None => key.seed,
                        };
                        col.extend((start..end).map(|i| {
                            let e = tensor_base + i as u64;
                            T::from_f64(f64::from(random::draw(dist, k, key.step, stream, e)))
                        }))
                    }
                    Node::Splat(_, a) => col.extend((0..end - start).map(|i| operand(a, &cols, i))),
                    Node::Unary(op, a) => {
                        col.extend((0..end - start).map(|i| T::unary(op, operand(a, &cols, i))))
                    }
                    Node::Binary(op, a, b) => col.extend(
                        (0..end - start)
                            .map(|i| T::binary(op, operand(a, &cols, i), operand(b, &cols, i))),
                    ),
                    Node::Select(c, a, b) => col.extend((0..end - start).map(|i| {
                        if operand(c, &cols, i).to_f64() != 0.0 {
                            operand(a, &cols, i)
                        } else {
                            operand(b, &cols, i)
                        }
                    })),
                    other => unreachable!("{other:?} is not per element"),
                }
                cols[s] = col;
            }
            for (ri, &(r, a)) in kernel.reductions.iter().enumerate() {
                let Node::Reduce { op, per_tensor, .. } = g.node(r) else {
                    continue;
                };
                let acc = &mut partial[ri][if per_tensor { j } else { 0 }];
                for i in 0..end - start {
                    let v = operand(a, &cols, i).to_f64();
                    *acc = op.combine(*acc, v);
                }
            }
            for &(b, v) in &kernel.stores {
                debug_assert!(!prog.info.is_input(b));
                let vals: Vec<T> = (0..end - start).map(|i| operand(v, &cols, i)).collect();
                bufs[b as usize][j][start..end].copy_from_slice(&vals);
            }
            start = end;
        }
    }
    kernel
        .reductions
        .iter()
        .zip(partial)
        .map(|(&(r, _), v)| (r, v))
        .collect()
}

/// Whether a node is a boolean (for callers printing values).
pub fn is_bool(p: &Program, id: NodeId) -> bool {
    p.graph.ty(id) == Ty::Bool
}
