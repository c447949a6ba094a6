//! Dead-store elimination: drops stores that write back the value a buffer already holds, and
//! stores to states that nothing live ever reads (a state read only by its own update is dead).

use crate::ir::{BufRole, Node, NodeId, Program};
use std::collections::HashSet;

/// Buffers loaded by anything reachable from `roots`.
fn loaded_buffers(p: &Program, roots: &[NodeId]) -> HashSet<u16> {
    let mut seen = HashSet::new();
    let mut bufs = HashSet::new();
    let mut stack: Vec<NodeId> = roots.to_vec();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let node = p.graph.node(id);
        if let Node::Load { buf, .. } = node {
            bufs.insert(buf);
        }
        stack.extend(node.children());
    }
    bufs
}

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

/// Drops no-op stores only, keeping every state live (for specializations: a state their
/// decisions leave unread may be read again when a decision flips back).
pub fn run_keeping_states(p: &mut Program) {
    remove_noop_stores(p);
    p.rebuild(true, |rb, node| rb.add(node));
}

/// Runs the pass.
pub fn run(p: &mut Program) {
    remove_noop_stores(p);
    // Live buffers: params and outputs, and whatever live values read, to a fixpoint.
    let mut live: HashSet<u16> = p
        .info
        .buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| matches!(b.role, BufRole::Param | BufRole::Output))
        .map(|(i, _)| i as u16)
        .collect();
    loop {
        let mut roots = Vec::new();
        for v in &p.variants {
            roots.extend(v.scalar_updates.iter().map(|&(_, n)| n));
            for s in &v.stages {
                roots.extend(
                    s.stores
                        .iter()
                        .filter(|(b, _)| live.contains(b))
                        .map(|&(_, n)| n),
                );
            }
        }
        let read = loaded_buffers(p, &roots);
        let before = live.len();
        live.extend(read);
        if live.len() == before {
            break;
        }
    }
    for v in &mut p.variants {
        for s in &mut v.stages {
            s.stores.retain(|(b, _)| live.contains(b));
        }
    }
    p.rebuild(true, |rb, node| rb.add(node));
}
