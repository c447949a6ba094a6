//! Common-subexpression elimination: rebuilds the graph hash-consed, so equal nodes (same
//! operation on the same children) become one. Every later pass keeps the graph hash-consed.

use crate::ir::Program;

/// Runs the pass.
pub fn run(p: &mut Program) {
    p.rebuild(true, |rb, node| rb.add(node));
}
