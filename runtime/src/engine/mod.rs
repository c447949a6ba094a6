//! The engine seam: what runs a specialization's kernels.
//!
//! An [`Engine`] compiles a specialization's kernels, runs one kernel over every tensor of its
//! space and returns the kernel's reduction results (combined from its partials in a fixed
//! order), and moves buffers between the host and its own memory. It knows nothing of
//! optimizers: the one step driver (`crate::step`) validates a call, picks the specialization,
//! asks the engine to run each phase's kernels, combines partials, applies the non-finite policy
//! and advances the step. Engines:
//!
//! - [`interp::Interp`] — the reference interpreter (the definition of every result);
//! - [`cranelift::Cranelift`] — Cranelift machine code on a thread pool, over host memory;
//! - [`native`] — the same host running kernels generated as C and built by the system C
//!   compiler for this machine (wide vectors), cached on disk;
//! - `cuda::Cuda` (cargo feature `cuda`) — NVRTC-compiled kernels on a GPU, or the same kernels
//!   on the CUDA emulator, over device-resident buffers.
//!
//! [`open`] is the one place that maps a [`Backend`] to its engine.

use crate::io::{DeviceInputs, Inputs};
use crate::specialize::StageNeeds;
use crate::{Backend, Error};
use optc_compiler::backend::interp::Buffers;
use optc_compiler::ir::{Kernel, NodeId, Program};
use optc_compiler::ops::Float;
use optc_compiler::storage::StorageMap;
use std::any::Any;
use std::sync::Arc;

pub mod cranelift;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod interp;
pub mod native;

/// FNV-1a over 128 bits of `parts` (each followed by a 0xff byte): the cache keys.
pub(crate) fn fnv128(parts: &[&[u8]]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// Where a kernel sits in a program: variant (0 first step, 1 later steps), stage, phase and its
/// index within the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelAt {
    /// 0: first step, 1: later steps.
    pub variant: usize,
    /// Stage index.
    pub stage: usize,
    /// Phase index within the stage.
    pub phase: usize,
    /// Kernel index within the phase.
    pub kernel: usize,
}

/// A specialization's kernels as one engine compiled them (each engine knows its own type).
pub type Compiled = Arc<dyn Any + Send + Sync>;

/// The reduction results of one kernel: for each reduce node, one value per tensor (per-tensor
/// reductions) or one value (global), combined from partials in a fixed order.
pub type Reductions = Vec<(NodeId, Vec<f64>)>;

/// Where a stage's params come from.
#[derive(Debug)]
pub enum Lent<'s, 'p, T> {
    /// The optimizer owns them (they are buffers `0..spaces` of the host buffers).
    Owned,
    /// Host slices lent for the call, updated in place.
    Host(&'s mut [Vec<&'p mut [T]>]),
    /// Host slices in their 16-bit storage type, lent for the call (device engines).
    Bits(&'s mut [Vec<&'p mut [u16]>]),
    /// Device addresses the host owns (device engines).
    Device(&'s [Vec<u64>]),
}

impl<T> Lent<'_, '_, T> {
    /// Whether the host lends the params (they are not in the host buffers).
    pub fn is_lent(&self) -> bool {
        !matches!(self, Lent::Owned)
    }
}

/// Where a stage's inputs come from.
#[derive(Debug, Clone, Copy)]
pub enum Given<'s, 'i, T> {
    /// Host slices.
    Host(&'s Inputs<'i, T>),
    /// Device addresses (device engines).
    Device(&'s DeviceInputs),
}

/// Everything one stage's kernels read and write, as the host holds it.
#[derive(Debug)]
pub struct StageIo<'a, 's, 'p, 'i, T> {
    /// The specialization running.
    pub program: &'a Program,
    /// Its variant (0: first step, 1: later steps).
    pub variant: usize,
    /// The stage.
    pub stage: usize,
    /// The host buffers: owned params, state, outputs (inputs and lent params are not in them,
    /// except where an engine copies them in for the stage).
    pub bufs: &'a mut Buffers<T>,
    /// Tensor lengths, `[space][tensor]`.
    pub lens: &'a [Vec<usize>],
    /// The params.
    pub params: &'a mut Lent<'s, 'p, T>,
    /// The inputs.
    pub inputs: Given<'a, 'i, T>,
    /// What the stage reads from the host.
    pub needs: &'a StageNeeds,
    /// How each buffer is stored.
    pub storage: &'a StorageMap,
    /// The key of stochastic rounding.
    pub seed: u64,
    /// The step being taken (`t`, 1 on the first step).
    pub t: u64,
    /// A shard of a sharded optimizer ([`crate::shard`]): `run_kernel` returns every task's
    /// reduction partials, uncombined, in task order (tensors in order, each cut into
    /// [`cranelift::TASK_ELEMS`]-element tasks from its start). Only the CPU engines do.
    pub raw_partials: bool,
    /// A shard's tensors are pieces of larger ones: per space, the index of each piece's
    /// element 0 among all elements of the whole tensors (the key of random draws and
    /// stochastic rounding). `None`: the running sum of `lens`.
    pub bases: Option<&'a [Vec<u64>]>,
}

/// A kernel runner over its own memory. See the module documentation.
pub trait Engine<T: Float>: std::fmt::Debug + Send + Sync {
    /// The backend this engine implements.
    fn backend(&self) -> Backend;

    /// A copy for a cloned optimizer (sharing compiled code and devices, not buffers).
    fn boxed_clone(&self) -> Box<dyn Engine<T>>;

    /// Compiles a specialization's kernels, with buffers stored as `storage` says.
    fn compile(&self, program: &Arc<Program>, storage: &StorageMap) -> Result<Compiled, Error>;

    /// Makes the stage's inputs and lent params available to the kernels (before any runs).
    fn begin_stage(&mut self, io: &mut StageIo<'_, '_, '_, '_, T>) -> Result<(), Error> {
        let _ = io;
        Ok(())
    }

    /// Runs one kernel over every tensor of its space. `uniforms[tensor]` holds the kernel's
    /// uniform values (in `kernel.uniforms` order) for each tensor.
    fn run_kernel(
        &mut self,
        compiled: &Compiled,
        at: KernelAt,
        kernel: &Kernel,
        uniforms: &[Vec<T>],
        io: &mut StageIo<'_, '_, '_, '_, T>,
    ) -> Result<Reductions, Error>;

    /// After the stage's kernels: `completed` is false when the step stopped after its first
    /// phase (non-finite inputs; nothing was stored). Lent params get their new values back.
    fn end_stage(
        &mut self,
        io: &mut StageIo<'_, '_, '_, '_, T>,
        completed: bool,
    ) -> Result<(), Error> {
        let _ = (io, completed);
        Ok(())
    }

    /// The current values of host buffer `b` (an engine that keeps newer values in its own
    /// memory downloads them).
    fn host<'a>(&'a self, bufs: &'a Buffers<T>, b: usize) -> Result<&'a Vec<Vec<T>>, Error> {
        Ok(&bufs[b])
    }

    /// Brings every host buffer up to date with the engine's memory.
    fn sync(&mut self, bufs: &mut Buffers<T>) -> Result<(), Error> {
        let _ = bufs;
        Ok(())
    }

    /// Host buffer `b` was replaced (a checkpoint was loaded): the engine's copy is stale.
    fn forget(&mut self, b: usize) {
        let _ = b;
    }

    /// Kernel launches made so far (device engines).
    fn launches(&self) -> u64 {
        0
    }

    /// The engine as `Any` (for the backend-specific accessors of the optimizer).
    fn as_any(&self) -> &dyn Any;
}

/// The engine of a backend; `current` is the engine in use, which a new one may reuse (the same
/// GPU keeps its device buffers).
pub fn open<T: Float + Default>(
    backend: Backend,
    current: Option<&dyn Engine<T>>,
) -> Result<Box<dyn Engine<T>>, Error> {
    let _ = &current; // only the CUDA engine reuses the current one
    match backend.resolved() {
        Backend::Interpreter => Ok(Box::new(interp::Interp)),
        Backend::Cranelift { threads } => Ok(Box::new(cranelift::Cranelift::<T>::new(threads)?)),
        Backend::Native { threads } => Ok(Box::new(cranelift::Cranelift::<T>::native(threads)?)),
        // `resolved` never returns `Auto`.
        Backend::Auto { threads } => Ok(Box::new(cranelift::Cranelift::<T>::new(threads)?)),
        #[cfg(feature = "cuda")]
        Backend::Cuda { .. } | Backend::CudaEmulator => cuda::Cuda::open(backend, current),
    }
}

/// Refuses a storage map whose 16-bit storage cannot be fused into `what` for `program`: a
/// buffer stored in 16 bits that a step reads again after storing it (it would read the rounded
/// value, where a step computed wholly in f32 and rounded at its end reads the unrounded one).
pub(crate) fn fusable(program: &Program, storage: &StorageMap, what: &str) -> Result<(), Error> {
    if storage.is_native() {
        return Ok(());
    }
    match optc_compiler::storage::rounded_then_reloaded(program, storage) {
        None => Ok(()),
        Some(b) => Err(Error::Policy(format!(
            "rule `{}` reads `{}` again after storing it within a step, so its 16-bit storage \
             cannot be fused into {what}; the mixed-precision optimizer rounds it after the step \
             on the CPU",
            program.info.name, program.info.buffers[b as usize].name
        ))),
    }
}

/// The tensors of a per-element input given on the host.
pub(crate) fn host_input<'s, 'i, T>(
    inputs: Given<'s, 'i, T>,
    name: &str,
) -> Result<&'s [&'i [T]], Error> {
    match inputs {
        Given::Host(i) => i
            .tensors
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Params(format!("input `{name}` was not given"))),
        Given::Device(_) => Err(Error::Params(
            "device inputs need Backend::Cuda or Backend::CudaEmulator".into(),
        )),
    }
}
