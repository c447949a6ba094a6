//! The optc runtime: binds a compiled rule to the host's tensors — buffers, optimizer state,
//! scalar state, step counter, hyperparameter values — and runs its stages.
//!
//! Every call checks its inputs first and returns an [`Error`] without touching any parameter or
//! state; a stage that starts always completes.
//!
//! The layout:
//! - [`Optimizer`] (`optimizer.rs`) composes the owners of a rule's state; the one step driver
//!   (`step.rs`) is the only stage loop; [`specialize`] compiles and caches specializations;
//!   `io.rs` holds what the host hands a step.
//! - [`engine`]: the seam every backend plugs into — the interpreter, Cranelift machine code on a
//!   thread pool, and (cargo feature `cuda`) NVRTC-compiled kernels on a GPU or the CUDA emulator.
//! - [`storage`]: how buffers are stored (f32, bf16, f16; rounding to nearest or stochastic) and
//!   the mixed-precision optimizer.
//! - [`checkpoint`], [`schedule`].
//!
//! Unsafe code lives in the engines only (machine code, device memory) and in the optimizer's
//! `step_device` (device addresses from the host).

use optc_compiler::ir::{Kind, NodeId, Program};

pub mod checkpoint;
pub mod engine;
mod error;
mod hypers;
mod io;
mod optimizer;
pub mod schedule;
pub mod shard;
pub mod specialize;
mod step;
pub mod storage;

pub use engine::cranelift::{JitError, JitProgram};
pub use error::Error;
pub use io::{DeviceInputs, Inputs, TensorSpec};
pub use optimizer::{Backend, NonFinite, Optimizer, DEFAULT_SEED};
pub use schedule::Schedule;
pub use shard::{Collective, LocalGroup, ShardLayout, ShardedOptimizer};
pub use specialize::StageNeeds;
pub use storage::mixed;
/// MPI (cargo feature `mpi`): the `mpi` crate, for initializing it, and its [`Collective`].
#[cfg(feature = "mpi")]
pub use {mpi, shard::mpi_collective::MpiCollective};

/// The CUDA engine's driver side (devices, device memory, loaded programs).
#[cfg(feature = "cuda")]
pub use engine::cuda::device;
/// The CUDA emulator.
#[cfg(feature = "cuda")]
pub use engine::cuda::emulator;
/// The CUDA engine's NVRTC side (compiling generated CUDA C to PTX and CUBIN, the PTX cache, the
/// driver probe), under its historical path.
#[cfg(feature = "cuda")]
pub use engine::cuda::nvrtc as cuda;

/// Whether a node is computed per element (re-exported for hosts inspecting programs).
pub fn is_per_element(p: &Program, id: NodeId) -> bool {
    matches!(p.graph.kind(id), Kind::Element(_))
}
