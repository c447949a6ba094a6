//! `unroll`: a rule's sample axis written out for a number of samples.
//!
//! A rule with an input declared `: samples` is lowered in its *axis form*: the input's loads vary
//! per sample, so does every value computed from them, and [`Node::SampleReduce`] and
//! [`Node::Samples`] reduce and count over the samples. No other pass and no backend sees that
//! form: [`samples`] writes it out for `n` samples as an ordinary program in which copy `j` of a
//! sample-axis input is a buffer of its own (copy 0 keeps the input's id and name, copies
//! `1..n` are appended as `NAME[j]`, see [`copy_name`]), every per-sample value is `n` values,
//! `sample_sum` is a sum over the copies in sample order (`((x0 + x1) + x2) + ...`),
//! `sample_max` a max in the same order, and `samples` the constant `n`. The runtime gives copy
//! `j` the `j`-th `[...shape]` block of the host's `[samples, ...shape]` tensor, so the kernels
//! read each sample where the host keeps it: the per-sample reductions of one phase (a clip
//! factor's norms) are one pass over the `n` blocks, and the sum over samples is fused into
//! the pass that uses it.

use crate::ir::{BinOp, BufId, BufInfo, Graph, Node, NodeId, Program, ReduceOp, Stage, Variant};
use std::sync::Arc;

/// The most samples one step takes: a step's kernels read every sample's block, so the
/// program holds one load per sample and input.
pub const MAX_SAMPLES: usize = 256;

/// The name of copy `j` of sample-axis input `name` in an unrolled program.
pub fn copy_name(name: &str, j: usize) -> String {
    if j == 0 {
        name.to_string()
    } else {
        format!("{name}[{j}]")
    }
}

/// Whether a program (as lowered) has a sample axis.
pub fn has_samples(p: &Program) -> bool {
    p.info.buffers.iter().any(|b| b.samples)
}

/// The sample-axis inputs of an axis-form program and, for `n` samples, the buffer of each copy
/// (`copies[i][j]`: copy `j` of the `i`-th sample-axis input, in buffer order).
pub fn copies(axis: &Program, n: usize) -> Vec<(BufId, Vec<BufId>)> {
    let mut next = axis.info.buffers.len() as BufId;
    axis.info
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.samples)
        .map(|(i, _)| {
            let mut ids = vec![i as BufId];
            for _ in 1..n {
                ids.push(next);
                next += 1;
            }
            (i as BufId, ids)
        })
        .collect()
}

/// One value, or one per sample.
#[derive(Clone)]
enum Copies {
    One(NodeId),
    Many(Vec<NodeId>),
}

impl Copies {
    fn get(&self, j: usize) -> NodeId {
        match self {
            Copies::One(v) => *v,
            Copies::Many(v) => v[j],
        }
    }
}

/// The axis form `axis` written out for `n` samples (`1 <= n <= MAX_SAMPLES`): an ordinary
/// lowered program (no phases yet; run [`super::PIPELINE`] on it) whose `axis_form` is
/// `(axis, n)`.
pub fn samples(axis: &Arc<Program>, n: usize) -> Program {
    assert!(
        (1..=MAX_SAMPLES).contains(&n),
        "unroll: {n} samples is outside 1..={MAX_SAMPLES}"
    );
    let mut info = axis.info.clone();
    let copies = copies(axis, n);
    for (b, ids) in &copies {
        let orig = info.buffers[*b as usize].clone();
        info.buffers[*b as usize].samples = false;
        for j in 1..ids.len() {
            info.buffers.push(BufInfo {
                name: copy_name(&orig.name, j),
                role: orig.role,
                space: orig.space,
                samples: false,
            });
        }
    }
    let copy_of: std::collections::HashMap<BufId, &Vec<BufId>> =
        copies.iter().map(|(b, ids)| (*b, ids)).collect();
    let old = &axis.graph;
    let mut graph = Graph::new(old.is_hash_consed());
    let mut map: Vec<Copies> = Vec::with_capacity(old.len());
    for i in 0..old.len() {
        let node = old.node(NodeId(i as u32));
        let c = match node {
            Node::Samples => Copies::One(graph.add(Node::num(n as f64), &info)),
            Node::Load { buf, gen } if copy_of.contains_key(&buf) => Copies::Many(
                copy_of[&buf]
                    .iter()
                    .map(|&b| graph.add(Node::Load { buf: b, gen }, &info))
                    .collect(),
            ),
            Node::SampleReduce { op, arg } => {
                let arg = &map[arg.0 as usize];
                let bin = match op {
                    ReduceOp::Sum => BinOp::Add,
                    ReduceOp::Max => BinOp::Max,
                };
                let mut acc = arg.get(0);
                for j in 1..n {
                    let x = match arg {
                        Copies::One(v) => *v,
                        Copies::Many(v) => v[j],
                    };
                    acc = graph.add(Node::Binary(bin, acc, x), &info);
                }
                Copies::One(acc)
            }
            node => {
                let many = node
                    .children()
                    .iter()
                    .any(|c| matches!(map[c.0 as usize], Copies::Many(_)));
                if many {
                    Copies::Many(
                        (0..n)
                            .map(|j| {
                                let m = node.map_children(|c| map[c.0 as usize].get(j));
                                graph.add(m, &info)
                            })
                            .collect(),
                    )
                } else {
                    let m = node.map_children(|c| map[c.0 as usize].get(0));
                    Copies::One(graph.add(m, &info))
                }
            }
        };
        map.push(c);
    }
    // The checker keeps per-sample values out of stores and scalar state, so every root is one
    // value; copy 0 stands for a root that is not (never reached).
    let root = |v: NodeId| map[v.0 as usize].get(0);
    let variant = |v: &Variant| Variant {
        stages: v
            .stages
            .iter()
            .map(|s| Stage {
                stores: s.stores.iter().map(|&(b, x)| (b, root(x))).collect(),
                phases: Vec::new(),
            })
            .collect(),
        scalar_updates: v
            .scalar_updates
            .iter()
            .map(|&(i, x)| (i, root(x)))
            .collect(),
    };
    Program {
        variants: [variant(&axis.variants[0]), variant(&axis.variants[1])],
        info,
        graph,
        axis_form: Some((Arc::clone(axis), n)),
    }
}
