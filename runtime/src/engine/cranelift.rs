//! The Cranelift CPU backend at run time: compiles every kernel of a program to machine code in a
//! JIT module, and runs kernels over tensors on a thread pool.
//!
//! Work is cut into tasks of at most [`TASK_ELEMS`] elements of one tensor; consecutive small tasks are
//! batched into one call (a multi-tensor table), and batches run in parallel. Each task writes its
//! own reduction partials, which the host combines in task order, so results are bit-identical for
//! any number of threads.
//!
//! [`JitProgram::compile_stored`] compiles kernels whose buffers are stored as a [`StorageMap`]
//! says (bf16 or f16 slots widened on load and rounded on store, to nearest or stochastically);
//! [`run_kernel_stored`] runs them over pointers to elements of each slot's storage type.

#![allow(unsafe_code)] // machine code: the one place the project needs it

use super::native::{NativeCache, Toolchain};
use super::{Compiled, Engine, KernelAt, Lent, Reductions, StageIo};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use optc_compiler::backend::clif::{self, Callee, KernelAbi, MathFn, Precision, StorageFn};
use optc_compiler::backend::interp::Buffers;
use optc_compiler::ir::{BinOp, BufRole, Kernel, Node, Program, UnOp};
use optc_compiler::ops::Float;
use optc_compiler::random::Dist;
use optc_compiler::storage::{self, BitsCache, Storage, StorageMap};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Elements per task: small enough to spread over threads, large enough to amortize a call.
pub const TASK_ELEMS: usize = 1 << 14;

/// Why the JIT could not compile a program.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("cranelift: {0}")]
pub struct JitError(pub String);

/// A task record, laid out as the kernel functions read it (see `optc_compiler::backend::clif`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Task {
    bufs: *const *mut u8,
    start: u64,
    end: u64,
    uniforms: *const u8,
    partials: *mut f64,
    base: u64,
    seed: u64,
    step: u64,
}

const _: () = assert!(std::mem::size_of::<Task>() == clif::TASK_SIZE as usize);
const _: () = assert!(std::mem::size_of::<BitsCache>() == clif::BITS_CACHE_SIZE as usize);

pub(crate) type KernelFn = unsafe extern "C" fn(*const Task, u64);
/// A kernel defined in the module, before finalization: its id, ABI, space and whether it
/// rounds stochastically.
type Declared = (FuncId, KernelAbi, u16, bool);

/// One compiled kernel.
#[derive(Debug)]
pub struct JitKernel {
    pub(crate) func: KernelFn,
    /// Its buffers, uniforms and reductions.
    pub abi: KernelAbi,
    /// The space it iterates over.
    pub space: u16,
    /// The storage of each slot (`abi.slots` order): what its pointers point to.
    pub storage: Vec<Storage>,
    /// Whether it rounds stores stochastically or draws random numbers (and reads
    /// [`RoundingKey`]).
    pub rounding_key: bool,
}

/// What owns a program's machine code (held, never read).
#[allow(dead_code)]
pub(crate) enum Code {
    /// Cranelift's JIT module (never mutated after finalization; its memory freed on drop).
    Jit(std::mem::ManuallyDrop<Box<JITModule>>),
    /// A shared library the C compiler built (see [`super::native`]).
    Native(Arc<super::native::Library>),
}

impl Drop for Code {
    fn drop(&mut self) {
        if let Code::Jit(module) = self {
            // SAFETY: the module belongs to the `JitProgram` being dropped. Its kernel pointers are
            // reachable only through that program (every call borrows it), so none is running
            // and none is called afterwards.
            unsafe { std::mem::ManuallyDrop::take(module).free_memory() }
        }
    }
}

/// Every kernel of a program, compiled (by Cranelift, or by the C compiler for the native
/// engine: the kernels have the same ABI).
pub struct JitProgram {
    // Owns the machine code the kernel pointers point into.
    pub(crate) _code: Code,
    /// `kernels[variant][stage][phase][kernel]`, in the program's order.
    pub kernels: [Vec<Vec<Vec<JitKernel>>>; 2],
    /// Element precision the kernels were compiled for.
    pub precision: Precision,
    /// How the kernels' buffers are stored.
    pub storage: StorageMap,
    /// Time spent compiling (Cranelift, all kernels).
    pub compile_time: Duration,
}

impl std::fmt::Debug for JitProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitProgram")
            .field("kernels", &self.kernels)
            .field("compile_time", &self.compile_time)
            .finish()
    }
}

// SAFETY: after `finalize_definitions` the module is only kept alive, never touched (and a
// native library only kept loaded); the kernel functions are pure machine code reading and
// writing only through the pointers they are given.
unsafe impl Send for JitProgram {}
// SAFETY: as above; shared references give no access to the module.
unsafe impl Sync for JitProgram {}

macro_rules! unary_symbol {
    ($name:ident, $t:ty, $op:expr) => {
        extern "C" fn $name(a: $t) -> $t {
            <$t>::unary($op, a)
        }
    };
}
unary_symbol!(exp_f32, f32, UnOp::Exp);
unary_symbol!(log_f32, f32, UnOp::Log);
unary_symbol!(log1p_f32, f32, UnOp::Log1p);
unary_symbol!(expm1_f32, f32, UnOp::Expm1);
unary_symbol!(sigmoid_f32, f32, UnOp::Sigmoid);
unary_symbol!(tanh_f32, f32, UnOp::Tanh);
unary_symbol!(exp_f64, f64, UnOp::Exp);
unary_symbol!(log_f64, f64, UnOp::Log);
unary_symbol!(log1p_f64, f64, UnOp::Log1p);
unary_symbol!(expm1_f64, f64, UnOp::Expm1);
unary_symbol!(sigmoid_f64, f64, UnOp::Sigmoid);
unary_symbol!(tanh_f64, f64, UnOp::Tanh);
extern "C" fn pow_f32(a: f32, b: f32) -> f32 {
    f32::binary(BinOp::Pow, a, b)
}
extern "C" fn rem_f32(a: f32, b: f32) -> f32 {
    f32::binary(BinOp::Rem, a, b)
}
extern "C" fn pow_f64(a: f64, b: f64) -> f64 {
    f64::binary(BinOp::Pow, a, b)
}
extern "C" fn rem_f64(a: f64, b: f64) -> f64 {
    f64::binary(BinOp::Rem, a, b)
}

// The storage functions (clif::StorageFn), over optc_compiler::storage.
extern "C" fn rounding_bits(cache: *mut BitsCache, seed: u64, step: u64, buffer: u32, e: u64) {
    // SAFETY: kernels pass the cache on their own stack (BITS_CACHE_SIZE bytes, 16-byte aligned).
    unsafe { (*cache).fill(seed, step, buffer, e) }
}
extern "C" fn f16_stochastic(x: f32, r: u32) -> u32 {
    u32::from(storage::stochastic(Storage::F16, x, r))
}
extern "C" fn draws(cache: *mut BitsCache, seed: u64, step: u64, stream: u32, e: u64, dist: u32) {
    // SAFETY: kernels pass the cache on their own stack (BITS_CACHE_SIZE bytes, 16-byte aligned).
    let cache = unsafe { &mut *cache };
    optc_compiler::random::fill(cache, Dist::from_code(dist), seed, step, stream, e);
}

/// The address of the Rust function behind a storage symbol.
pub(crate) fn storage_address(f: StorageFn) -> *const u8 {
    match f {
        StorageFn::Bits => rounding_bits as *const u8,
        StorageFn::F16Stochastic => f16_stochastic as *const u8,
        StorageFn::Draws => draws as *const u8,
    }
}

/// The address of the Rust function behind a math symbol.
pub(crate) fn math_address(f: MathFn, p: Precision) -> *const u8 {
    let f32s: [(MathFn, *const u8); 8] = [
        (MathFn::Unary(UnOp::Exp), exp_f32 as *const u8),
        (MathFn::Unary(UnOp::Log), log_f32 as *const u8),
        (MathFn::Unary(UnOp::Log1p), log1p_f32 as *const u8),
        (MathFn::Unary(UnOp::Expm1), expm1_f32 as *const u8),
        (MathFn::Unary(UnOp::Sigmoid), sigmoid_f32 as *const u8),
        (MathFn::Unary(UnOp::Tanh), tanh_f32 as *const u8),
        (MathFn::Binary(BinOp::Pow), pow_f32 as *const u8),
        (MathFn::Binary(BinOp::Rem), rem_f32 as *const u8),
    ];
    let f64s: [(MathFn, *const u8); 8] = [
        (MathFn::Unary(UnOp::Exp), exp_f64 as *const u8),
        (MathFn::Unary(UnOp::Log), log_f64 as *const u8),
        (MathFn::Unary(UnOp::Log1p), log1p_f64 as *const u8),
        (MathFn::Unary(UnOp::Expm1), expm1_f64 as *const u8),
        (MathFn::Unary(UnOp::Sigmoid), sigmoid_f64 as *const u8),
        (MathFn::Unary(UnOp::Tanh), tanh_f64 as *const u8),
        (MathFn::Binary(BinOp::Pow), pow_f64 as *const u8),
        (MathFn::Binary(BinOp::Rem), rem_f64 as *const u8),
    ];
    let table = if p == Precision::F32 { f32s } else { f64s };
    table
        .iter()
        .find(|(g, _)| *g == f)
        .map(|(_, a)| *a)
        .unwrap_or(std::ptr::null())
}

impl JitProgram {
    /// Compiles every kernel of `p` for this machine.
    pub fn compile(p: &Program, precision: Precision) -> Result<Self, JitError> {
        Self::compile_stored(p, precision, &StorageMap::default())
    }

    /// Compiles every kernel of `p` for this machine with buffers stored as `storage` says
    /// (16-bit storage needs f32: otherwise the [`storage::StorageError`] as a [`JitError`]).
    /// Run the kernels with [`run_kernel_stored`].
    pub fn compile_stored(
        p: &Program,
        precision: Precision,
        storage: &StorageMap,
    ) -> Result<Self, JitError> {
        let start = Instant::now();
        let err = |e: &dyn std::fmt::Display| JitError(e.to_string());
        storage.check(p, precision).map_err(|e| err(&e))?;
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(|e| err(&e))?;
        flags
            .set("use_colocated_libcalls", "false")
            .map_err(|e| err(&e))?;
        flags.set("is_pic", "false").map_err(|e| err(&e))?;
        let isa = cranelift_native::builder()
            .map_err(|e| err(&e))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| err(&e))?;
        let call_conv = isa.default_call_conv();
        let ptr = isa.pointer_type();
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        for f in MathFn::all() {
            builder.symbol(f.symbol(precision), math_address(f, precision));
        }
        for f in StorageFn::all() {
            builder.symbol(f.symbol(), storage_address(f));
        }
        let mut module = JITModule::new(builder);
        let mut math_ids: HashMap<MathFn, FuncId> = HashMap::new();
        for f in MathFn::all() {
            let id = module
                .declare_function(
                    &f.symbol(precision),
                    Linkage::Import,
                    &f.signature(precision, call_conv),
                )
                .map_err(|e| err(&e))?;
            math_ids.insert(f, id);
        }
        let mut storage_ids: HashMap<StorageFn, FuncId> = HashMap::new();
        for f in StorageFn::all() {
            let id = module
                .declare_function(f.symbol(), Linkage::Import, &f.signature(ptr, call_conv))
                .map_err(|e| err(&e))?;
            storage_ids.insert(f, id);
        }
        let mut ctx = module.make_context();
        let mut ids: Vec<Vec<Vec<Vec<Declared>>>> = Vec::new();
        let mut index = 0u32;
        for v in &p.variants {
            let mut vs = Vec::new();
            for s in &v.stages {
                let mut ss = Vec::new();
                for ph in &s.phases {
                    let mut ks = Vec::new();
                    for k in &ph.kernels {
                        let func = {
                            let module_ref = &mut module;
                            let mut import =
                                |func: &mut cranelift_codegen::ir::Function, c: Callee| {
                                    let id = match c {
                                        Callee::Math(f) => math_ids[&f],
                                        Callee::Storage(f) => storage_ids[&f],
                                    };
                                    module_ref.declare_func_in_func(id, func)
                                };
                            clif::build_stored(
                                p,
                                k,
                                precision,
                                storage,
                                ptr,
                                call_conv,
                                &mut import,
                                index,
                            )
                            .map_err(|e| err(&e))?
                        };
                        ctx.func = func;
                        let id = module
                            .declare_function(
                                &format!("optc_kernel_{index}"),
                                Linkage::Local,
                                &ctx.func.signature,
                            )
                            .map_err(|e| err(&e))?;
                        module
                            .define_function(id, &mut ctx)
                            .map_err(|e| JitError(format!("{e:?}")))?;
                        module.clear_context(&mut ctx);
                        ks.push((id, clif::abi(p, k), k.space, clif::reads_key(p, k, storage)));
                        index += 1;
                    }
                    ss.push(ks);
                }
                vs.push(ss);
            }
            ids.push(vs);
        }
        module.finalize_definitions().map_err(|e| err(&e))?;
        let mut kernels: [Vec<Vec<Vec<JitKernel>>>; 2] = [Vec::new(), Vec::new()];
        for (vi, vs) in ids.into_iter().enumerate() {
            kernels[vi] = vs
                .into_iter()
                .map(|ss| {
                    ss.into_iter()
                        .map(|ks| {
                            ks.into_iter()
                                .map(|(id, abi, space, rounding_key)| {
                                    let code = module.get_finalized_function(id);
                                    // SAFETY: `code` is a finalized function built by `clif::build` with
                                    // the signature `fn(*const Task, u64)` in the platform calling convention.
                                    let func =
                                        unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
                                    let storage =
                                        abi.slots.iter().map(|&b| storage.of(b)).collect();
                                    JitKernel {
                                        func,
                                        abi,
                                        space,
                                        storage,
                                        rounding_key,
                                    }
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect();
        }
        Ok(JitProgram {
            _code: Code::Jit(std::mem::ManuallyDrop::new(Box::new(module))),
            kernels,
            precision,
            storage: storage.clone(),
            compile_time: start.elapsed(),
        })
    }
}

/// Pointers handed to a kernel call; the caller guarantees disjoint writes.
#[derive(Clone, Copy)]
struct SendTasks(*const Task, usize);
// SAFETY: tasks of different batches cover disjoint element ranges of the buffers they write.
unsafe impl Send for SendTasks {}
// SAFETY: as above.
unsafe impl Sync for SendTasks {}

/// Runs one kernel over every tensor of its space.
///
/// `ptrs[j][slot]` is the base pointer of each of the kernel's buffer slots for tensor `j`;
/// `uniforms[j]` the tensor's uniform values. Returns the reduction results: for each reduction,
/// one value per tensor (per-tensor) or one value (global), combined in task order. Random draws
/// are keyed by seed 0 and step 0 ([`run_kernel_stored`] takes a key).
///
/// # Safety
/// Every pointer in `ptrs` must be valid for `lens[j]` elements of the kernel's precision; slots
/// the kernel stores to must not alias any other slot of another tensor; nothing else may access
/// the buffers during the call.
pub unsafe fn run_kernel<T: Float>(
    k: &JitKernel,
    program: &Program,
    lens: &[usize],
    ptrs: &[Vec<*mut u8>],
    uniforms: &[Vec<T>],
    pool: Option<&rayon::ThreadPool>,
) -> Vec<(optc_compiler::ir::NodeId, Vec<f64>)> {
    let bases = tensor_bases(lens);
    let key = RoundingKey {
        bases: &bases,
        seed: 0,
        step: 0,
    };
    // SAFETY: the caller's guarantees.
    unsafe { run_kernel_stored(k, program, lens, ptrs, uniforms, key, pool) }
}

/// What stochastic rounding needs of a kernel launch (see `optc_compiler::storage`): per tensor
/// the index `E` of its element 0 over all tensors of the kernel's space in order
/// ([`tensor_bases`]), the seed and the step `t` (1 on the first step).
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundingKey<'a> {
    /// Per tensor (as `lens`), the index of its element 0 in its buffers.
    pub bases: &'a [u64],
    /// The key of the random bits.
    pub seed: u64,
    /// The step being taken.
    pub step: u64,
}

/// The index of each tensor's element 0 over all of them in order: the running sum of `lens`.
pub fn tensor_bases(lens: &[usize]) -> Vec<u64> {
    lens.iter()
        .scan(0u64, |acc, &n| {
            let b = *acc;
            *acc += n as u64;
            Some(b)
        })
        .collect()
}

/// [`run_kernel`] for kernels of [`JitProgram::compile_stored`]: `ptrs[j][slot]` points to
/// elements of the slot's storage type (`k.storage[slot]`: 16-bit slots to `u16` bits, any
/// two-byte alignment); `key` is read by kernels that round stochastically
/// (`k.rounding_key`; its `bases` must then have one entry per tensor) and ignored otherwise.
///
/// # Safety
/// Every pointer in `ptrs` must be valid for `lens[j]` elements of its slot's storage type
/// (`k.storage[slot].bytes(precision)` bytes each); slots the kernel stores to must not alias
/// any other slot of another tensor; nothing else may access the buffers during the call.
pub unsafe fn run_kernel_stored<T: Float>(
    k: &JitKernel,
    program: &Program,
    lens: &[usize],
    ptrs: &[Vec<*mut u8>],
    uniforms: &[Vec<T>],
    key: RoundingKey<'_>,
    pool: Option<&rayon::ThreadPool>,
) -> Vec<(optc_compiler::ir::NodeId, Vec<f64>)> {
    // SAFETY: the caller's guarantees.
    unsafe { run_tasks(k, program, lens, ptrs, uniforms, key, pool, false) }
}

/// [`run_kernel_stored`]; with `raw`, each reduction's partials of every task, uncombined.
///
/// # Safety
/// As [`run_kernel_stored`].
#[allow(clippy::too_many_arguments)]
unsafe fn run_tasks<T: Float>(
    k: &JitKernel,
    program: &Program,
    lens: &[usize],
    ptrs: &[Vec<*mut u8>],
    uniforms: &[Vec<T>],
    key: RoundingKey<'_>,
    pool: Option<&rayon::ThreadPool>,
    raw: bool,
) -> Vec<(optc_compiler::ir::NodeId, Vec<f64>)> {
    assert!(
        !k.rounding_key || key.bases.len() == lens.len(),
        "stochastic rounding needs one base index per tensor"
    );
    let nred = k.abi.reductions.len();
    let mut tasks: Vec<Task> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (j, &len) in lens.iter().enumerate() {
        let mut s = 0;
        while s < len {
            let e = (s + TASK_ELEMS).min(len);
            tasks.push(Task {
                bufs: ptrs[j].as_ptr(),
                start: s as u64,
                end: e as u64,
                uniforms: uniforms[j].as_ptr() as *const u8,
                partials: std::ptr::null_mut(),
                base: key.bases.get(j).copied().unwrap_or(0),
                seed: key.seed,
                step: key.step,
            });
            owner.push(j);
            s = e;
        }
    }
    let mut partials = vec![0f64; tasks.len() * nred.max(1)];
    for (i, t) in tasks.iter_mut().enumerate() {
        t.partials = partials.as_mut_ptr().wrapping_add(i * nred.max(1));
    }
    // Batches of consecutive tasks, about TASK_ELEMS elements each.
    let mut batches: Vec<SendTasks> = Vec::new();
    let mut i = 0;
    while i < tasks.len() {
        let mut n = 0;
        let mut elems = 0;
        while i + n < tasks.len() && (n == 0 || elems < TASK_ELEMS) {
            elems += (tasks[i + n].end - tasks[i + n].start) as usize;
            n += 1;
        }
        batches.push(SendTasks(tasks.as_ptr().wrapping_add(i), n));
        i += n;
    }
    let func = k.func;
    let run = |b: &SendTasks| {
        // SAFETY: the caller guarantees the pointers; each batch writes disjoint ranges and its own partials.
        unsafe { func(b.0, b.1 as u64) }
    };
    match pool {
        Some(pool) if batches.len() > 1 => {
            use rayon::prelude::*;
            pool.install(|| batches.par_iter().for_each(run));
        }
        _ => batches.iter().for_each(run),
    }
    if raw {
        // Every task's partials, uncombined, in task order.
        return k
            .abi
            .reductions
            .iter()
            .enumerate()
            .map(|(ri, &r)| {
                (
                    r,
                    (0..owner.len())
                        .map(|ti| partials[ti * nred + ri])
                        .collect(),
                )
            })
            .collect();
    }
    // Combine partials in task order.
    combine_partials(program, &k.abi.reductions, lens.len(), &owner, |ri, ti| {
        partials[ti * nred + ri]
    })
}

/// Combines reduction partials in part order: part `p` belongs to tensor `owner[p]` and holds
/// `value(reduction index, p)`. For each reduction: one value per tensor (per-tensor) or one.
/// The JIT host (tasks) and the GPU host (chunks) both combine with this.
pub(crate) fn combine_partials(
    program: &Program,
    reductions: &[optc_compiler::ir::NodeId],
    ntensors: usize,
    owner: &[usize],
    value: impl Fn(usize, usize) -> f64,
) -> Vec<(optc_compiler::ir::NodeId, Vec<f64>)> {
    reductions
        .iter()
        .enumerate()
        .map(|(ri, &r)| {
            let (op, per_tensor) = match program.graph.node(r) {
                Node::Reduce { op, per_tensor, .. } => (op, per_tensor),
                _ => unreachable!("reductions lists reduce nodes"),
            };
            let mut out = vec![0f64; if per_tensor { ntensors } else { 1 }];
            for (p, &j) in owner.iter().enumerate() {
                let slot = &mut out[if per_tensor { j } else { 0 }];
                *slot = op.combine(*slot, value(ri, p));
            }
            (r, out)
        })
        .collect()
}

/// The Cranelift engine: kernels compiled to machine code, run over host memory on `threads`
/// threads (a rayon pool; one thread runs on the caller).
///
/// **16-bit storage.** With a storage map that keeps buffers in bf16 or f16 (set by the
/// mixed-precision optimizer), the kernels widen and round those buffers themselves, in place:
/// 16-bit params lent by the host ([`Lent::Bits`]) are used where they are, and 16-bit state,
/// outputs and owned params are held by the engine in 16 bits (the host copy is released when
/// the engine takes a buffer over, and rebuilt, widened exactly, on access).
#[derive(Debug, Clone)]
pub struct Cranelift<T> {
    threads: usize,
    /// Where the kernels come from: Cranelift, or the C compiler (the native engine).
    codegen: Codegen,
    pool: Option<Arc<rayon::ThreadPool>>,
    /// By buffer: the storage type and bits of a buffer the engine holds in 16 bits.
    held: Vec<Option<(Storage, Vec<Vec<u16>>)>>,
    /// By buffer: the host copy of a held buffer, widened on access since the last step.
    mirror: Vec<OnceLock<Vec<Vec<T>>>>,
}

impl<T> Cranelift<T> {
    /// An engine on `threads` threads.
    pub fn new(threads: usize) -> Result<Cranelift<T>, crate::Error> {
        let pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| crate::Error::Threads {
                    threads,
                    why: e.to_string(),
                })?;
            Some(Arc::new(pool))
        } else {
            None
        };
        Ok(Cranelift {
            threads,
            codegen: Codegen::Cranelift,
            pool,
            held: Vec::new(),
            mirror: Vec::new(),
        })
    }
}

/// The code generator of a CPU engine.
#[derive(Debug, Clone)]
enum Codegen {
    /// Cranelift, in process.
    Cranelift,
    /// C compiled by the system C compiler ([`super::native`]).
    Native(Arc<Toolchain>, NativeCache),
}

impl<T> Cranelift<T> {
    /// The native engine on `threads` threads: this engine's host running kernels the system
    /// C compiler built ([`super::native`]); [`super::native::NativeError::NoCompiler`] without a
    /// working one.
    pub fn native(threads: usize) -> Result<Cranelift<T>, crate::Error> {
        let tc = Toolchain::find()?;
        let mut e = Cranelift::new(threads)?;
        e.codegen = Codegen::Native(tc, NativeCache::default_location());
        Ok(e)
    }
}

/// Whether buffer `b` is one the engine holds in 16 bits under `storage`: stored in 16 bits,
/// neither an input nor a lent param.
fn engine_held(
    info: &optc_compiler::ir::RuleInfo,
    storage: &StorageMap,
    b: usize,
    lent: bool,
) -> bool {
    let bi = &info.buffers[b];
    storage.of(b as u16) != Storage::Native
        && bi.role != BufRole::Input
        && !(bi.role == BufRole::Param && lent)
}

/// `tensors` widened exactly from `storage`.
fn widened<T: Float>(storage: Storage, tensors: &[Vec<u16>]) -> Vec<Vec<T>> {
    tensors
        .iter()
        .map(|t| {
            t.iter()
                .map(|&h| T::from_f64(f64::from(storage::widen(storage, h))))
                .collect()
        })
        .collect()
}

impl<T: Float + Default> Engine<T> for Cranelift<T> {
    fn backend(&self) -> crate::Backend {
        match self.codegen {
            Codegen::Cranelift => crate::Backend::Cranelift {
                threads: self.threads,
            },
            Codegen::Native(..) => crate::Backend::Native {
                threads: self.threads,
            },
        }
    }

    fn boxed_clone(&self) -> Box<dyn Engine<T>> {
        Box::new(self.clone())
    }

    fn compile(
        &self,
        program: &Arc<Program>,
        storage: &StorageMap,
    ) -> Result<Compiled, crate::Error> {
        let precision = if T::BYTES == 4 {
            Precision::F32
        } else {
            Precision::F64
        };
        match &self.codegen {
            Codegen::Cranelift => {
                super::fusable(program, storage, "the Cranelift kernels")?;
                Ok(Arc::new(JitProgram::compile_stored(
                    program, precision, storage,
                )?))
            }
            Codegen::Native(tc, cache) => {
                super::fusable(program, storage, "the native kernels")?;
                Ok(Arc::new(super::native::compile(
                    program, precision, storage, tc, cache,
                )?))
            }
        }
    }

    fn begin_stage(&mut self, io: &mut StageIo<'_, '_, '_, '_, T>) -> Result<(), crate::Error> {
        let info = &io.program.info;
        let n = info.buffers.len();
        // Buffers are only ever added (master weights, a sample axis's inputs), and inputs are
        // never held.
        if self.held.len() < n {
            self.held.resize(n, None);
            self.mirror.resize_with(n, OnceLock::new);
        }
        let lent = io.params.is_lent();
        for b in 0..n {
            let st = io.storage.of(b as u16);
            if !engine_held(info, io.storage, b, lent) {
                continue;
            }
            if self.held[b].is_none() {
                let lens = &io.lens[info.buffers[b].space as usize];
                let host = &io.bufs[b];
                let bits = lens
                    .iter()
                    .enumerate()
                    .map(|(j, &len)| match host.get(j) {
                        Some(t) => t
                            .iter()
                            .map(|x| storage::nearest(st, x.to_f64() as f32))
                            .collect(),
                        None => vec![0u16; len],
                    })
                    .collect();
                self.held[b] = Some((st, bits));
            }
            // The engine's bits are the current values: the host copy is rebuilt on access.
            io.bufs[b] = Vec::new();
        }
        Ok(())
    }

    fn run_kernel(
        &mut self,
        compiled: &Compiled,
        at: KernelAt,
        _kernel: &Kernel,
        uniforms: &[Vec<T>],
        io: &mut StageIo<'_, '_, '_, '_, T>,
    ) -> Result<Reductions, crate::Error> {
        let jit = compiled
            .downcast_ref::<JitProgram>()
            .ok_or_else(|| crate::Error::Params("the rule is not compiled for Cranelift".into()))?;
        let jk = &jit.kernels[at.variant][at.stage][at.phase][at.kernel];
        let info = &io.program.info;
        let lens = &io.lens[jk.space as usize];
        let lent = io.params.is_lent();
        let mismatch = |b: u16| {
            crate::Error::Params(format!(
                "`{}` is stored as {:?} but was given in another precision",
                info.buffers[b as usize].name,
                io.storage.of(b)
            ))
        };
        let mut ptrs: Vec<Vec<*mut u8>> = Vec::with_capacity(lens.len());
        for j in 0..lens.len() {
            let mut row = Vec::with_capacity(jk.abi.slots.len());
            for (&b, &st) in jk.abi.slots.iter().zip(&jk.storage) {
                let bi = &info.buffers[b as usize];
                let native = st == Storage::Native;
                let p = match (bi.role, &mut *io.params) {
                    (BufRole::Input, _) if native => {
                        super::host_input(io.inputs, &bi.name)?[j].as_ptr() as *mut u8
                    }
                    (BufRole::Input, _) => return Err(mismatch(b)),
                    (BufRole::Param, Lent::Host(ps)) if native => {
                        ps[b as usize][j].as_mut_ptr() as *mut u8
                    }
                    (BufRole::Param, Lent::Bits(ps)) if !native => {
                        ps[b as usize][j].as_mut_ptr() as *mut u8
                    }
                    (BufRole::Param, Lent::Host(_) | Lent::Bits(_)) => return Err(mismatch(b)),
                    (BufRole::Param, Lent::Device(_)) => {
                        return Err(crate::Error::Params(
                            "device params need Backend::Cuda or Backend::CudaEmulator".into(),
                        ))
                    }
                    _ if engine_held(info, io.storage, b as usize, lent) => {
                        match self.held.get_mut(b as usize).and_then(Option::as_mut) {
                            Some((_, t)) => t[j].as_mut_ptr() as *mut u8,
                            None => return Err(mismatch(b)),
                        }
                    }
                    _ => io.bufs[b as usize][j].as_mut_ptr() as *mut u8,
                };
                row.push(p);
            }
            ptrs.push(row);
        }
        let bases = match (jk.rounding_key, io.bases) {
            (false, _) => Vec::new(),
            (true, Some(b)) => b[jk.space as usize].clone(),
            (true, None) => tensor_bases(lens),
        };
        let key = RoundingKey {
            bases: &bases,
            seed: io.seed,
            step: io.t,
        };
        // SAFETY: every pointer addresses a live buffer of `lens[j]` elements of its slot's
        // storage type (the step driver checked the lengths of inputs and lent params; the host
        // buffers and the engine's 16-bit buffers are allocated for them, and each slot's
        // pointer was chosen by its storage above); inputs are only read; the kernel writes only
        // its store slots, which are distinct buffers (lent params are distinct `&mut` slices),
        // and nothing else touches them during the call.
        let r = unsafe {
            run_tasks(
                jk,
                io.program,
                lens,
                &ptrs,
                uniforms,
                key,
                self.pool.as_deref(),
                io.raw_partials,
            )
        };
        Ok(r)
    }

    fn end_stage(
        &mut self,
        _io: &mut StageIo<'_, '_, '_, '_, T>,
        completed: bool,
    ) -> Result<(), crate::Error> {
        if completed {
            for m in &mut self.mirror {
                *m = OnceLock::new();
            }
        }
        Ok(())
    }

    fn host<'a>(&'a self, bufs: &'a Buffers<T>, b: usize) -> Result<&'a Vec<Vec<T>>, crate::Error> {
        match (
            self.held.get(b).and_then(Option::as_ref),
            self.mirror.get(b),
        ) {
            (Some((st, bits)), Some(m)) => Ok(m.get_or_init(|| widened(*st, bits))),
            _ => Ok(&bufs[b]),
        }
    }

    fn sync(&mut self, bufs: &mut Buffers<T>) -> Result<(), crate::Error> {
        for (b, held) in self.held.iter().enumerate() {
            if let (Some((st, bits)), Some(buf)) = (held, bufs.get_mut(b)) {
                *buf = widened(*st, bits);
            }
        }
        Ok(())
    }

    fn forget(&mut self, b: usize) {
        if let Some(h) = self.held.get_mut(b) {
            *h = None;
        }
        if let Some(m) = self.mirror.get_mut(b) {
            *m = OnceLock::new();
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
