//! Backends that execute a compiled [`crate::ir::Program`]. The reference interpreter is the
//! oracle every other backend is tested against.

pub mod c;
pub mod clif;
pub mod cuda;
pub mod interp;
