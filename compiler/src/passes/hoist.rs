//! Hoisting: every scalar or per-tensor value a kernel reads becomes a *uniform*, computed once per
//! step (or once per tensor) on the host before the kernel runs, instead of once per element.

use crate::ir::{Kind, Program};
use std::collections::BTreeSet;

/// Runs the pass.
pub fn run(p: &mut Program) {
    let graph = &p.graph;
    for v in &mut p.variants {
        for s in &mut v.stages {
            for ph in &mut s.phases {
                for k in &mut ph.kernels {
                    let mut uniforms = BTreeSet::new();
                    let roots = k
                        .stores
                        .iter()
                        .map(|&(_, n)| n)
                        .chain(k.reductions.iter().map(|&(_, a)| a));
                    for n in roots.chain(k.body.iter().flat_map(|&n| graph.node(n).children())) {
                        if !matches!(graph.kind(n), Kind::Element(_)) {
                            uniforms.insert(n);
                        }
                    }
                    k.uniforms = uniforms.into_iter().collect();
                }
            }
        }
    }
}
