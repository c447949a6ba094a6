//! Passes over a [`Program`], run in the order of [`PIPELINE`]. Each is a small named rewrite in
//! its own file; `optc compile --emit ir` dumps the program after each.

use crate::ir::Program;

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

/// The pipeline, in order.
pub const PIPELINE: &[Pass] = &[
    ("fold", fold::run),
    ("simplify", simplify::run),
    ("cse", cse::run),
    ("fold", fold::run),
    ("dse", dse::run),
    ("phases", phases::run),
    ("hoist", hoist::run),
];
