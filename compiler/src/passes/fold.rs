//! Constant folding: operations on constants become constants; selects on a constant condition
//! become the chosen branch. On the first step `t = 1`, so every bias correction folds away. The
//! node `t` only occurs in the later-steps variant, where `t >= 2`: comparisons that this decides
//! (`t == 1`, `t > 1`, ...) fold too, so first-step branches cost nothing later.

use crate::ir::{BinOp, Node, NodeId, Program, Rebuilder, UnOp};
use crate::ops::{binary_f64, unary_f64};

fn constant(rb: &Rebuilder<'_>, id: NodeId) -> Option<f64> {
    match rb.node(id) {
        Node::Const(b) => Some(f64::from_bits(b)),
        Node::Bool(b) => Some(f64::from(u8::from(b))),
        _ => None,
    }
}

/// Decides `t op c` (or `c op t` when `flipped`) knowing `t` is an integer `>= 2`.
fn step_comparison(op: BinOp, c: f64, flipped: bool) -> Option<bool> {
    use BinOp::*;
    let op = if flipped {
        match op {
            Lt => Gt,
            Le => Ge,
            Gt => Lt,
            Ge => Le,
            o => o,
        }
    } else {
        op
    };
    match op {
        Eq if c < 2.0 => Some(false),
        Ne if c < 2.0 => Some(true),
        Gt if c < 2.0 => Some(true),
        Ge if c <= 2.0 => Some(true),
        Lt if c <= 2.0 => Some(false),
        Le if c < 2.0 => Some(false),
        _ => None,
    }
}

/// Folds one node (children already folded).
pub fn fold(rb: &mut Rebuilder<'_>, node: Node) -> NodeId {
    if let Node::Binary(op, a, b) = node {
        if op.is_comparison() {
            let decided = match (rb.node(a), rb.node(b)) {
                (Node::Step, Node::Const(c)) => step_comparison(op, f64::from_bits(c), false),
                (Node::Const(c), Node::Step) => step_comparison(op, f64::from_bits(c), true),
                _ => None,
            };
            if let Some(v) = decided {
                return rb.add(Node::Bool(v));
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::step_comparison;
    use crate::ir::BinOp::*;

    #[test]
    fn later_steps_know_t_is_at_least_two() {
        assert_eq!(step_comparison(Eq, 1.0, false), Some(false));
        assert_eq!(step_comparison(Gt, 1.0, false), Some(true));
        assert_eq!(step_comparison(Ge, 2.0, false), Some(true));
        assert_eq!(step_comparison(Lt, 2.0, false), Some(false));
        assert_eq!(step_comparison(Eq, 2.0, false), None);
        assert_eq!(step_comparison(Gt, 2.0, false), None);
        // 1 < t, 2 <= t: true; 2 > t: false.
        assert_eq!(step_comparison(Lt, 1.0, true), Some(true));
        assert_eq!(step_comparison(Le, 2.0, true), Some(true));
        assert_eq!(step_comparison(Gt, 2.0, true), Some(false));
    }
}
