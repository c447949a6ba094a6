//! Dead-store elimination: drops stores that write back the value a buffer already holds.
//!
//! Stores to states stay even when nothing reads the state: a state is observable (the host reads
//! it through `Optimizer::buffer` and checkpoints), and a specialization's decisions may leave a
//! state unread that other values read again. The checker warns about such states (W0003).

use crate::ir::{Node, Program};

/// Drops stores that write back the value the buffer already holds.
pub fn remove_noop_stores(p: &mut Program) {
    for v in &mut p.variants {
        for (k, stage) in v.stages.iter_mut().enumerate() {
            stage.stores.retain(|&(b, n)| {
                p.graph.node(n)
                    != Node::Load {
                        buf: b,
                        gen: k as u16,
                    }
            });
        }
    }
}

/// Runs the pass.
pub fn run(p: &mut Program) {
    remove_noop_stores(p);
    p.rebuild(true, |rb, node| rb.add(node));
}
