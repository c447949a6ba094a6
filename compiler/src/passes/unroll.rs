//! `unroll`: a rule's axis of copies — the samples of per-sample inputs, or the particles of an
//! ensemble — written out for a number of copies.
//!
//! A rule with an input declared `: samples` (or a state declared `: particles`) is lowered in its
//! *axis form*: loads of those buffers vary per copy, so does every value computed from them, and
//! [`Node::AxisReduce`] and [`Node::Count`] reduce and count over the copies. No other pass and no
//! backend sees that form: [`copies_of`] writes it out for `n` copies as an ordinary program in
//! which copy `j` of a buffer on the axis is a buffer of its own (copy 0 keeps the buffer's id and
//! name, copies `1..n` are appended as `NAME[j]`, see [`copy_name`]), likewise copy `j` of a scalar
//! input on the axis (`input f: particles scalar`), every value on the axis is `n` values,
//! a sum over the axis is a sum over the copies in copy order (`((x0 + x1) + x2) + ...`), a max a
//! max in the same order, the count the constant `n`, and a per-particle draw `n` draws of the
//! streams [`crate::random::particle_stream`]. The runtime gives copy `j` of a sample-axis input
//! the `j`-th `[...shape]` block of the host's `[samples, ...shape]` tensor, so the kernels read
//! each sample where the host keeps it: the per-sample reductions of one phase (a clip factor's
//! norms) are one pass over the `n` blocks, and the sum over samples is fused into the pass that
//! uses it. Per-particle states are ordinary states, one per particle.

use crate::ir::{BinOp, BufId, BufInfo, Graph, Node, NodeId, Program, ReduceOp, Stage, Variant};
use crate::random;
use std::sync::Arc;

/// The most samples one step takes: a step's kernels read every sample's block, so the
/// program holds one load per sample and input.
pub const MAX_SAMPLES: usize = 256;

/// The most particles of an ensemble (one buffer per particle and per-particle state).
pub const MAX_PARTICLES: usize = 256;

/// The name of copy `j` of buffer or scalar input `name` on the axis, in an unrolled program.
pub fn copy_name(name: &str, j: usize) -> String {
    if j == 0 {
        name.to_string()
    } else {
        format!("{name}[{j}]")
    }
}

/// The buffers on the axis of an axis-form program and, for `n` copies, the buffer of each copy
/// (`copies[i][j]`: copy `j` of the `i`-th buffer on the axis, in buffer order).
pub fn copies(axis: &Program, n: usize) -> Vec<(BufId, Vec<BufId>)> {
    let mut next = axis.info.buffers.len() as BufId;
    axis.info
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.axis)
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

/// The axis form `axis` written out for `n` copies (`1 <= n <=` [`MAX_SAMPLES`] or
/// [`MAX_PARTICLES`]): an ordinary lowered program (no phases yet; run [`super::PIPELINE`] on it)
/// whose `axis_form` is `(axis, n)`.
pub fn copies_of(axis: &Arc<Program>, n: usize) -> Program {
    assert!(
        (1..=MAX_SAMPLES.max(MAX_PARTICLES)).contains(&n),
        "unroll: {n} copies"
    );
    let mut info = axis.info.clone();
    info.axis = None;
    let copies = copies(axis, n);
    for (b, ids) in &copies {
        let orig = info.buffers[*b as usize].clone();
        info.buffers[*b as usize].axis = false;
        for j in 1..ids.len() {
            info.buffers.push(BufInfo {
                name: copy_name(&orig.name, j),
                role: orig.role,
                space: orig.space,
                axis: false,
            });
        }
    }
    // Scalar inputs on the axis: copy 0 keeps the index, copies 1.. are appended.
    let mut scalar_copies: std::collections::HashMap<u16, Vec<u16>> =
        std::collections::HashMap::new();
    for &i in &axis.info.axis_scalars {
        let mut ids = vec![i];
        for j in 1..n {
            ids.push(info.scalar_inputs.len() as u16);
            let name = copy_name(&axis.info.scalar_inputs[i as usize], j);
            info.scalar_inputs.push(name);
        }
        scalar_copies.insert(i, ids);
    }
    info.axis_scalars.clear();
    let copy_of: std::collections::HashMap<BufId, &Vec<BufId>> =
        copies.iter().map(|(b, ids)| (*b, ids)).collect();
    let old = &axis.graph;
    let mut graph = Graph::new(old.is_hash_consed());
    let mut map: Vec<Copies> = Vec::with_capacity(old.len());
    for i in 0..old.len() {
        let node = old.node(NodeId(i as u32));
        let c = match node {
            Node::Count(_) => Copies::One(graph.add(Node::num(n as f64), &info)),
            Node::ScalarInput(i) if scalar_copies.contains_key(&i) => Copies::Many(
                scalar_copies[&i]
                    .iter()
                    .map(|&c| graph.add(Node::ScalarInput(c), &info))
                    .collect(),
            ),
            Node::ParticleDraw { dist, stream, kind } => Copies::Many(
                (0..n)
                    .map(|j| {
                        let draw = Node::Random {
                            dist,
                            stream: random::particle_stream(stream, j as u32),
                            kind,
                            seed: None,
                        };
                        graph.add(draw, &info)
                    })
                    .collect(),
            ),
            Node::Load { buf, gen } if copy_of.contains_key(&buf) => Copies::Many(
                copy_of[&buf]
                    .iter()
                    .map(|&b| graph.add(Node::Load { buf: b, gen }, &info))
                    .collect(),
            ),
            Node::AxisReduce { op, arg, .. } => {
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
    // The checker keeps values on the axis out of scalar state and out of buffers off the axis,
    // so every other root is one value; copy 0 stands for a root that is not (never reached).
    let root = |v: NodeId| map[v.0 as usize].get(0);
    let stores = |stores: &[(BufId, NodeId)]| {
        let mut out = Vec::new();
        for &(b, x) in stores {
            match copy_of.get(&b) {
                Some(ids) => {
                    for (j, &c) in ids.iter().enumerate() {
                        out.push((c, map[x.0 as usize].get(j)));
                    }
                }
                None => out.push((b, root(x))),
            }
        }
        out
    };
    let variant = |v: &Variant| Variant {
        stages: v
            .stages
            .iter()
            .map(|s| Stage {
                stores: stores(&s.stores),
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
