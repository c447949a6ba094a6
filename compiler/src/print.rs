//! Text dumps of the IR (`optc compile --emit ir|kernels`), stable for snapshot tests.

use crate::ir::{BufRole, Kind, Node, NodeId, Program, ReduceOp, Ty};
use std::collections::BTreeSet;
use std::fmt::Write;

fn space(p: &Program, s: u16) -> &str {
    &p.info.spaces[s as usize]
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v:e}")
    }
}

/// One node as text: `mul %1, %2`.
pub fn node_text(p: &Program, id: NodeId) -> String {
    match p.graph.node(id) {
        Node::Const(b) => format!("const {}", fmt_num(f64::from_bits(b))),
        Node::Bool(b) => format!("const {b}"),
        Node::Hyper(h) => format!("hyper {}", p.info.hypers[h as usize].name),
        Node::Step => "t".to_string(),
        Node::Count(axis) => axis.name().to_string(),
        Node::ParticleDraw { dist, stream, .. } => {
            format!("{} stream {stream:#010x} per particle", dist.name())
        }
        Node::TensorCount(s) => format!("tensor_count {}", space(p, s)),
        Node::TensorReduce { op, arg } => format!(
            "tensors_{} {arg}",
            match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Max => "max",
            }
        ),
        Node::AxisReduce { axis, op, arg } => format!(
            "{}_{} {arg}",
            axis.prefix(),
            match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Max => "max",
            }
        ),
        Node::ScalarState(i) => format!("state {}", p.info.scalar_states[i as usize]),
        Node::ScalarInput(i) => format!("input {}", p.info.scalar_inputs[i as usize]),
        Node::InputOr(i, d) => format!("input {} or {d}", p.info.scalar_inputs[i as usize]),
        Node::Random {
            dist,
            stream,
            kind,
            seed,
        } => {
            let per = match kind {
                Kind::Scalar => String::new(),
                Kind::Tensor(s) => format!(" per tensor of {}", space(p, s)),
                Kind::Element(s) => format!(" per element of {}", space(p, s)),
            };
            let seed = seed.map(|s| format!(" seed {s}")).unwrap_or_default();
            format!("{} stream {stream:#010x}{per}{seed}", dist.name())
        }
        Node::Numel {
            space: s,
            per_tensor,
        } => format!(
            "{}numel {}",
            if per_tensor { "tensor_" } else { "" },
            space(p, s)
        ),
        Node::Load { buf, gen } => format!("load {}@{gen}", p.info.buffers[buf as usize].name),
        Node::Splat(s, a) => format!("splat {} {a}", space(p, s)),
        Node::Unary(op, a) => format!("{} {a}", format!("{op:?}").to_lowercase()),
        Node::Binary(op, a, b) => format!("{} {a}, {b}", format!("{op:?}").to_lowercase()),
        Node::Select(c, a, b) => format!("select {c}, {a}, {b}"),
        Node::Reduce {
            op,
            per_tensor,
            arg,
        } => format!(
            "{}{} {arg}",
            if per_tensor { "tensor_" } else { "" },
            match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Max => "max",
            }
        ),
    }
}

fn kind_text(p: &Program, id: NodeId) -> String {
    let k = match p.graph.kind(id) {
        Kind::Scalar => "scalar".to_string(),
        Kind::Tensor(s) => format!("tensor {}", space(p, s)),
        Kind::Element(s) => format!("elem {}", space(p, s)),
    };
    if p.graph.ty(id) == Ty::Bool {
        format!("{k}, bool")
    } else {
        k
    }
}

fn reachable(p: &Program, roots: impl IntoIterator<Item = NodeId>) -> BTreeSet<NodeId> {
    walk(p, roots, true)
}

/// Nodes under `roots`; `into_reductions: false` stops at reductions (their arguments belong to
/// the kernel that accumulates them, not to the reader of the result).
fn walk(
    p: &Program,
    roots: impl IntoIterator<Item = NodeId>,
    into_reductions: bool,
) -> BTreeSet<NodeId> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<NodeId> = roots.into_iter().collect();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            let node = p.graph.node(n);
            if into_reductions || !matches!(node, Node::Reduce { .. }) {
                stack.extend(node.children());
            }
        }
    }
    seen
}

fn lines(out: &mut String, p: &Program, nodes: &BTreeSet<NodeId>, indent: &str) {
    for &n in nodes {
        let _ = writeln!(
            out,
            "{indent}{n} = {}  : {}",
            node_text(p, n),
            kind_text(p, n)
        );
    }
}

/// The scalar-state updates at the end of a step variant.
fn end_of_step(out: &mut String, p: &Program, v: &crate::ir::Variant) {
    if v.scalar_updates.is_empty() {
        return;
    }
    let _ = writeln!(out, "  end of step:");
    lines(
        out,
        p,
        &walk(p, v.scalar_updates.iter().map(|s| s.1), false),
        "    ",
    );
    for &(i, n) in &v.scalar_updates {
        let _ = writeln!(out, "    state {} = {n}", p.info.scalar_states[i as usize]);
    }
}

/// The rule's interface.
pub fn interface(p: &Program) -> String {
    let mut out = String::new();
    let i = &p.info;
    let _ = writeln!(out, "rule {}", i.name);
    for h in &i.hypers {
        let default = if h.ty == Ty::Bool {
            (h.default != 0.0).to_string()
        } else {
            fmt_num(h.default)
        };
        let _ = writeln!(out, "  hyper {} = {default}", h.name);
    }
    for b in &i.buffers {
        let role = match b.role {
            BufRole::Param => "param",
            BufRole::Input => "input",
            BufRole::State => "state",
            BufRole::Output => "output",
        };
        let on_axis = p.axis_form.as_ref().and_then(|(axis, _)| {
            axis.info
                .buffers
                .iter()
                .any(|a| a.axis && a.name == b.name)
                .then_some(axis.info.axis)
                .flatten()
        });
        if let Some(axis) = on_axis {
            let _ = writeln!(
                out,
                "  {role} {}: {}({})",
                b.name,
                axis.name(),
                space(p, b.space)
            );
        } else {
            let _ = writeln!(out, "  {role} {}: {}", b.name, space(p, b.space));
        }
    }
    for (k, s) in i.scalar_states.iter().enumerate() {
        let role = if i.scalar_outs.contains(&(k as u16)) {
            "output"
        } else {
            "state"
        };
        let _ = writeln!(out, "  {role} {s}: scalar");
    }
    for s in &i.scalar_inputs {
        let _ = writeln!(out, "  input {s}: scalar");
    }
    out
}

/// Headings of the two step variants.
const VARIANT_NAMES: [&str; 2] = ["first step", "later steps"];

/// The dataflow graph of both variants, with their stores (before phase splitting).
pub fn graph(p: &Program) -> String {
    let mut out = String::new();
    for (vi, v) in p.variants.iter().enumerate() {
        let _ = writeln!(out, "{}:", VARIANT_NAMES[vi]);
        for (k, s) in v.stages.iter().enumerate() {
            let _ = writeln!(out, "  stage {}:", p.info.stages[k]);
            lines(
                &mut out,
                p,
                &reachable(p, s.stores.iter().map(|s| s.1)),
                "    ",
            );
            for &(b, n) in &s.stores {
                let _ = writeln!(out, "    store {} = {n}", p.info.buffers[b as usize].name);
            }
        }
        end_of_step(&mut out, p, v);
    }
    out
}

/// The kernels: per variant, stage and phase, each kernel's uniforms, body, stores and reductions.
pub fn kernels(p: &Program) -> String {
    let mut out = String::new();
    for (vi, v) in p.variants.iter().enumerate() {
        let _ = writeln!(out, "{}:", VARIANT_NAMES[vi]);
        for (k, s) in v.stages.iter().enumerate() {
            let _ = writeln!(
                out,
                "  stage {} ({} phase{}):",
                p.info.stages[k],
                s.phases.len(),
                if s.phases.len() == 1 { "" } else { "s" }
            );
            for (pi, ph) in s.phases.iter().enumerate() {
                for kern in &ph.kernels {
                    let _ = writeln!(out, "    phase {pi}, kernel over {}:", space(p, kern.space));
                    let uni = walk(p, kern.uniforms.iter().copied(), false);
                    if !uni.is_empty() {
                        let _ = writeln!(out, "      uniforms:");
                        lines(&mut out, p, &uni, "        ");
                    }
                    let _ = writeln!(out, "      per element:");
                    lines(
                        &mut out,
                        p,
                        &kern.body.iter().copied().collect(),
                        "        ",
                    );
                    for &(b, n) in &kern.stores {
                        let _ = writeln!(
                            out,
                            "        store {} = {n}",
                            p.info.buffers[b as usize].name
                        );
                    }
                    for &(r, a) in &kern.reductions {
                        if let Node::Reduce { op, per_tensor, .. } = p.graph.node(r) {
                            let op = match op {
                                ReduceOp::Sum => "sum",
                                ReduceOp::Max => "max",
                            };
                            let _ = writeln!(
                                out,
                                "        reduce {r} = {}{op} {a}",
                                if per_tensor { "tensor_" } else { "" }
                            );
                        }
                    }
                }
            }
        }
        end_of_step(&mut out, p, v);
    }
    out
}
