//! Passes over a [`Program`]: small named rewrites, run from named lists. [`PIPELINE`] is what
//! [`crate::compile`] runs after lowering; [`SPECIALIZED`] and [`GUARDED`] are what
//! [`specialize`](specialize::specialize) and [`guard_inputs`](finite::guard_inputs) run after their
//! own rewrite, made of the same named parts.
//! `optc compile --emit ir` dumps the program after each pass.

use crate::ir::Program;
use crate::PassObserver;

pub mod cse;
pub mod dse;
pub mod finite;
pub mod fold;
pub mod hoist;
pub mod phases;
pub mod simplify;
pub mod specialize;

/// A named pass.
pub type Pass = (&'static str, fn(&mut Program));

/// Rewrites of the graph: constants, algebra, shared subexpressions, and constants again (after
/// `simplify` and `cse` expose more).
pub const REWRITE: &[Pass] = &[
    ("fold", fold::run),
    ("simplify", simplify::run),
    ("cse", cse::run),
    ("fold", fold::run),
];

/// Dead stores: no-op stores, and stores to states nothing live reads.
pub const PRUNE: &[Pass] = &[("dse", dse::run)];

/// No-op stores only: every state stays live. A specialization keeps states its decisions leave
/// unread, since other values may read them later.
pub const PRUNE_NOOP_STORES: &[Pass] = &[("dse", dse::run_keeping_states)];

/// Planning: passes over memory and their kernels, then the kernels' uniforms.
pub const PLAN: &[Pass] = &[("phases", phases::run), ("hoist", hoist::run)];

/// The pipeline, in order: what [`crate::compile`] runs after lowering.
pub const PIPELINE: &[&[Pass]] = &[REWRITE, PRUNE, PLAN];

/// What [`specialize::specialize`] runs after fixing the decisions.
pub const SPECIALIZED: &[&[Pass]] = &[REWRITE, PRUNE_NOOP_STORES, PLAN];

/// What [`finite::guard_inputs`] runs after adding the guards.
pub const GUARDED: &[&[Pass]] = &[PLAN];

/// Runs the passes of `pipeline` in order, calling `observe` with each pass's name and the
/// program after it.
pub fn run(p: &mut Program, pipeline: &[&[Pass]], observe: PassObserver<'_>) {
    for (name, pass) in pipeline.iter().flat_map(|part| part.iter()) {
        pass(p);
        observe(name, p);
    }
}
