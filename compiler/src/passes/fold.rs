//! Constant folding: operations on constants become constants; selects on a constant condition
//! become the chosen branch. On the first step `t = 1`, so every bias correction folds away.

use crate::ir::{Node, NodeId, Program, Rebuilder, UnOp};
use crate::ops::{binary_f64, unary_f64};

fn constant(rb: &Rebuilder<'_>, id: NodeId) -> Option<f64> {
    match rb.node(id) {
        Node::Const(b) => Some(f64::from_bits(b)),
        Node::Bool(b) => Some(f64::from(u8::from(b))),
        _ => None,
    }
}

/// Folds one node (children already folded).
pub fn fold(rb: &mut Rebuilder<'_>, node: Node) -> NodeId {
    match node {
        Node::Unary(op, a) => {
            if let Some(a) = constant(rb, a) {
                let v = unary_f64(op, a);
                return rb.add(if op == UnOp::Not {
                    Node::Bool(v != 0.0)
                } else {
                    Node::num(v)
                });
            }
        }
        Node::Binary(op, a, b) => {
            if let (Some(x), Some(y)) = (constant(rb, a), constant(rb, b)) {
                let v = binary_f64(op, x, y);
                let boolean = op.is_comparison()
                    || matches!(op, crate::ir::BinOp::And | crate::ir::BinOp::Or);
                return rb.add(if boolean {
                    Node::Bool(v != 0.0)
                } else {
                    Node::num(v)
                });
            }
        }
        Node::Select(c, a, b) => {
            if let Some(c) = constant(rb, c) {
                return if c != 0.0 { a } else { b };
            }
        }
        _ => {}
    }
    rb.add(node)
}

/// Runs the pass.
pub fn run(p: &mut Program) {
    let hc = p.graph.is_hash_consed();
    p.rebuild(hc, fold);
}
