//! Algebraic simplification: rewrites that keep every result bit-identical or within the
//! rounding of the operation they replace (`x^2 → x*x`, `x^0.5 → sqrt(x)`, `x*1 → x`, ...).

use crate::ir::{BinOp, Node, NodeId, Program, Rebuilder, UnOp};

fn is(rb: &Rebuilder<'_>, id: NodeId, v: f64) -> bool {
    rb.node(id).as_num() == Some(v)
}

/// Simplifies one node (children already simplified).
pub fn simplify(rb: &mut Rebuilder<'_>, node: Node) -> NodeId {
    match node {
        Node::Binary(BinOp::Pow, x, e) => {
            if is(rb, e, 1.0) {
                return x;
            }
            if is(rb, e, 2.0) {
                return rb.add(Node::Binary(BinOp::Mul, x, x));
            }
            if is(rb, e, 3.0) {
                let sq = rb.add(Node::Binary(BinOp::Mul, x, x));
                return rb.add(Node::Binary(BinOp::Mul, sq, x));
            }
            if is(rb, e, 0.5) {
                return rb.add(Node::Unary(UnOp::Sqrt, x));
            }
            if is(rb, e, -0.5) {
                return rb.add(Node::Unary(UnOp::Rsqrt, x));
            }
            if is(rb, e, -1.0) {
                let one = rb.add(Node::num(1.0));
                return rb.add(Node::Binary(BinOp::Div, one, x));
            }
        }
        Node::Binary(BinOp::Mul, a, b) => {
            if is(rb, b, 1.0) {
                return a;
            }
            if is(rb, a, 1.0) {
                return b;
            }
            if is(rb, b, -1.0) {
                return rb.add(Node::Unary(UnOp::Neg, a));
            }
            if is(rb, a, -1.0) {
                return rb.add(Node::Unary(UnOp::Neg, b));
            }
        }
        Node::Binary(BinOp::Add, a, b) => {
            if is(rb, b, 0.0) {
                return a;
            }
            if is(rb, a, 0.0) {
                return b;
            }
        }
        Node::Binary(BinOp::Sub, a, b) if is(rb, b, 0.0) => return a,
        Node::Binary(BinOp::Div, a, b) if is(rb, b, 1.0) => return a,
        Node::Unary(op @ (UnOp::Neg | UnOp::Not), a) => {
            if let Node::Unary(inner, x) = rb.node(a) {
                if inner == op {
                    return x;
                }
            }
        }
        Node::Select(_, a, b) if a == b => return a,
        _ => {}
    }
    rb.add(node)
}

/// Runs the pass.
pub fn run(p: &mut Program) {
    let hc = p.graph.is_hash_consed();
    p.rebuild(hc, simplify);
}
