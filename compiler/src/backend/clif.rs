//! Cranelift code generation: one function per kernel.
//!
//! A kernel function has the C signature `fn(tasks: *const Task, ntasks: u64)`; each [`Task`]
//! covers the element range `[start, end)` of one tensor:
//!
//! ```text
//! struct Task {            // TASK_SIZE = 64 bytes
//!     bufs: *const *mut u8, //  0: base pointer of each buffer slot (KernelAbi::slots) for this
//!                           //     tensor, to elements of the slot's storage type
//!     start: u64,           //  8: first element of the range
//!     end: u64,             // 16: one past its last element
//!     uniforms: *const T,   // 24: this tensor's uniform values (KernelAbi::uniforms), booleans as 0/1
//!     partials: *mut f64,   // 32: out: one partial per reduction (KernelAbi::reductions)
//!     base: u64,            // 40: index E of the tensor's element 0 over all tensors of its space
//!     seed: u64,            // 48: the key of stochastic rounding
//!     step: u64,            // 56: the step t (low 32 bits used)
//! }
//! ```
//! `base`, `seed` and `step` are read only by kernels that round stochastically
//! ([`StorageMap::stochastic`] with a 16-bit buffer stored); others ignore them.
//!
//! The body runs as a vectorized main loop (`UNROLL` vectors of `16 / size_of::<T>()` lanes per
//! iteration), a one-vector loop, and a scalar tail. Sums accumulate in f64 lanes; maxima in the
//! element type (exact). The partials of a task are combined in a fixed order, so a task's result
//! does not depend on which thread runs it.
//!
//! Operations with no Cranelift instruction (`exp`, `log`, `pow`, `%`, ...) call the functions of
//! [`MathFn`], which the JIT resolves to the same Rust functions the interpreter uses, so results
//! are bit-identical to the interpreter.
//!
//! # 16-bit storage
//! With a [`StorageMap`] ([`build_stored`], f32 programs only), a bf16 or f16 slot holds 16-bit
//! elements. The main loop loads the eight elements of its two vectors with one 128-bit load
//! (bf16: zero words interleaved below them; f16: zero-extended) and stores them with one
//! (two vectors narrowed together); the one-vector loop uses 64-bit accesses (`uload16x4`,
//! four lanes narrowed), the tail 16-bit ones. Widening is exact, in integer arithmetic (bf16
//! shifted into the high half; f16 rebiased, its subnormals converted from their integer
//! mantissa, infinities and NaNs given the f32 exponent). Stores round to nearest, ties to even,
//! as `half`'s `from_f32` (the conversions of [`crate::storage`], also the CUDA generator's):
//! in integer arithmetic, except f16 results below 2^-14, which come from `|x| + 0.5` in f32
//! (its rounding at 2^-24 is the f16 subnormal grid). Loads keep a signaling NaN's quiet bit as
//! it is (as the CUDA kernels do); stores set it.
//!
//! Stochastic stores draw element `E = base + i`'s bits from [`crate::storage::rounding_bits`]
//! through a per-slot cache on the stack ([`crate::storage::BitsCache`]) that
//! [`StorageFn::Bits`] fills with the bits of the next `BITS_BLOCK` (64) elements whenever a
//! store needs bits past its end: one Philox evaluation per four elements, batched, whatever the
//! alignment of `base`. bf16 then rounds inline (the low 16 random bits added below the kept
//! ones), f16 calls [`StorageFn::F16Stochastic`] per element. The cache is [`BITS_CACHE_SIZE`]
//! bytes, 16-byte aligned:
//!
//! ```text
//! struct BitsCache {          // BITS_CACHE_SIZE = 280 bytes
//!     out: [u32; BITS_BLOCK],  //   0: the bits of elements E0 .. E0 + 64 (E0: the last fill's)
//!     words: [u32; 4],         // 256: Philox's outputs for block `block`
//!     block: u64,              // 272: E / 4 of `words`; u64::MAX when empty (set at each task)
//! }
//! ```

use crate::ir::{BinOp, BufId, Kernel, Kind, Node, NodeId, Program, ReduceOp, Ty, UnOp};
use crate::storage::{key_buffer, Storage, StorageError, StorageMap, BITS_BLOCK};
use cranelift_codegen::cursor::{Cursor, FuncCursor};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    self, types, AbiParam, ConstantData, Endianness, ExtFuncData, ExternalName, FuncRef,
    InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Type, UserExternalName,
    UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use std::collections::{BTreeSet, HashMap};
use target_lexicon::PointerWidth;

/// Size of a task record in bytes.
pub const TASK_SIZE: i32 = 64;
/// Size of the random-bits cache of a stochastically rounded slot ([`StorageFn::Bits`]).
pub const BITS_CACHE_SIZE: u32 = (4 * BITS_BLOCK + 24) as u32;
/// Vectors processed per main-loop iteration.
pub const UNROLL: usize = 2;

/// Element precision of a kernel's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 buffers, F32X4 vectors.
    F32,
    /// f64 buffers, F64X2 vectors.
    F64,
}

impl Precision {
    /// The scalar type.
    pub fn ty(self) -> Type {
        match self {
            Precision::F32 => types::F32,
            Precision::F64 => types::F64,
        }
    }
    /// The 128-bit vector type.
    pub fn vty(self) -> Type {
        match self {
            Precision::F32 => types::F32X4,
            Precision::F64 => types::F64X2,
        }
    }
    /// Lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F64 => 2,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F64 => 8,
        }
    }
    /// Name used in symbols.
    pub fn suffix(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        }
    }
}

/// Element functions computed by a call (one argument, or two for `Pow`/`Rem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MathFn {
    /// A unary operation.
    Unary(UnOp),
    /// A binary operation.
    Binary(BinOp),
}

impl MathFn {
    /// Whether an operation needs a call.
    pub fn of_unary(op: UnOp) -> Option<MathFn> {
        matches!(
            op,
            UnOp::Exp | UnOp::Log | UnOp::Log1p | UnOp::Expm1 | UnOp::Sigmoid | UnOp::Tanh
        )
        .then_some(MathFn::Unary(op))
    }
    /// Whether an operation needs a call.
    pub fn of_binary(op: BinOp) -> Option<MathFn> {
        matches!(op, BinOp::Pow | BinOp::Rem).then_some(MathFn::Binary(op))
    }
    /// Arguments.
    pub fn arity(self) -> usize {
        match self {
            MathFn::Unary(_) => 1,
            MathFn::Binary(_) => 2,
        }
    }
    /// Every function, for registering symbols.
    pub fn all() -> Vec<MathFn> {
        let mut v: Vec<MathFn> = [
            UnOp::Exp,
            UnOp::Log,
            UnOp::Log1p,
            UnOp::Expm1,
            UnOp::Sigmoid,
            UnOp::Tanh,
        ]
        .into_iter()
        .map(MathFn::Unary)
        .collect();
        v.push(MathFn::Binary(BinOp::Pow));
        v.push(MathFn::Binary(BinOp::Rem));
        v
    }
    /// Symbol name for a precision.
    pub fn symbol(self, p: Precision) -> String {
        let op = match self {
            MathFn::Unary(op) => format!("{op:?}"),
            MathFn::Binary(op) => format!("{op:?}"),
        };
        format!("optc_{}_{}", op.to_lowercase(), p.suffix())
    }
    /// Its signature.
    pub fn signature(self, p: Precision, call_conv: CallConv) -> Signature {
        let mut sig = Signature::new(call_conv);
        for _ in 0..self.arity() {
            sig.params.push(AbiParam::new(p.ty()));
        }
        sig.returns.push(AbiParam::new(p.ty()));
        sig
    }
}

/// Functions 16-bit stores call (the JIT resolves them to the runtime's Rust functions over
/// [`crate::storage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StorageFn {
    /// `fn(cache: *mut BitsCache, seed: u64, step: u64, buffer: u32, e: u64)`: the random bits
    /// of elements `e .. e + BITS_BLOCK` into `cache.out` ([`crate::storage::BitsCache::fill`]).
    Bits,
    /// `fn(x: f32, r: u32) -> u32`: `x` rounded stochastically to f16 with the bits `r`
    /// ([`crate::storage::stochastic`]), zero-extended.
    F16Stochastic,
    /// `fn(cache: *mut BitsCache, seed: u64, step: u64, stream: u32, e: u64, dist: u32)`: the
    /// f32 values of the draws of elements `e .. e + BITS_BLOCK` of a stream into `cache.out`
    /// ([`crate::random::fill`]).
    Draws,
}

impl StorageFn {
    /// Every function, for registering symbols.
    pub fn all() -> [StorageFn; 3] {
        [StorageFn::Bits, StorageFn::F16Stochastic, StorageFn::Draws]
    }
    /// Symbol name.
    pub fn symbol(self) -> &'static str {
        match self {
            StorageFn::Bits => "optc_rounding_bits",
            StorageFn::F16Stochastic => "optc_f16_stochastic",
            StorageFn::Draws => "optc_draws",
        }
    }
    /// Its signature (`ptr`: the pointer type).
    pub fn signature(self, ptr: Type, call_conv: CallConv) -> Signature {
        let mut sig = Signature::new(call_conv);
        match self {
            StorageFn::Bits => {
                sig.params.push(AbiParam::new(ptr));
                sig.params.push(AbiParam::new(types::I64));
                sig.params.push(AbiParam::new(types::I64));
                sig.params.push(AbiParam::new(types::I32));
                sig.params.push(AbiParam::new(types::I64));
            }
            StorageFn::F16Stochastic => {
                sig.params.push(AbiParam::new(types::F32));
                sig.params.push(AbiParam::new(types::I32));
                sig.returns.push(AbiParam::new(types::I32));
            }
            StorageFn::Draws => {
                sig.params.push(AbiParam::new(ptr));
                sig.params.push(AbiParam::new(types::I64));
                sig.params.push(AbiParam::new(types::I64));
                sig.params.push(AbiParam::new(types::I32));
                sig.params.push(AbiParam::new(types::I64));
                sig.params.push(AbiParam::new(types::I32));
            }
        }
        sig
    }
}

/// A function a kernel calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Callee {
    /// An element function.
    Math(MathFn),
    /// A storage conversion.
    Storage(StorageFn),
}

/// How a kernel function's task records are laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelAbi {
    /// Buffers in slot order (the `bufs` array of each task).
    pub slots: Vec<BufId>,
    /// Uniform nodes in order (the `uniforms` array of each task).
    pub uniforms: Vec<NodeId>,
    /// Reduce nodes in order (the `partials` array of each task).
    pub reductions: Vec<NodeId>,
    /// Math functions the kernel calls.
    pub calls: Vec<MathFn>,
}

/// The ABI of a kernel: which buffers, uniforms and reductions, in which order.
pub fn abi(p: &Program, k: &Kernel) -> KernelAbi {
    let mut slots = BTreeSet::new();
    for &n in &k.loads {
        if let Node::Load { buf, .. } = p.graph.node(n) {
            slots.insert(buf);
        }
    }
    slots.extend(k.stores.iter().map(|s| s.0));
    let mut calls = BTreeSet::new();
    for &n in &k.body {
        let f = match p.graph.node(n) {
            Node::Unary(op, _) => MathFn::of_unary(op),
            Node::Binary(op, _, _) => MathFn::of_binary(op),
            _ => None,
        };
        if let Some(f) = f {
            calls.insert(format!("{f:?}"));
        }
    }
    let calls = MathFn::all()
        .into_iter()
        .filter(|f| calls.contains(&format!("{f:?}")))
        .collect();
    KernelAbi {
        slots: slots.into_iter().collect(),
        uniforms: k.uniforms.clone(),
        reductions: k.reductions.iter().map(|r| r.0).collect(),
        calls,
    }
}

/// The kernel function's signature.
pub fn signature(ptr: Type, call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.push(AbiParam::new(ptr));
    sig.params.push(AbiParam::new(types::I64));
    sig
}

/// Imports a math function into a function under construction (the JIT maps these to its symbols).
pub type Importer<'a> = &'a mut dyn FnMut(&mut ir::Function, MathFn) -> FuncRef;

/// An importer for printing: names each function `u1:<index>`.
pub fn print_importer(
    p: Precision,
    call_conv: CallConv,
) -> impl FnMut(&mut ir::Function, MathFn) -> FuncRef {
    move |func, f| {
        let idx = MathFn::all().iter().position(|g| *g == f).unwrap_or(0) as u32;
        let name = func.declare_imported_user_function(UserExternalName::new(1, idx));
        let signature = func.import_signature(f.signature(p, call_conv));
        func.import_function(ExtFuncData {
            name: ExternalName::user(name),
            signature,
            colocated: false,
            patchable: false,
        })
    }
}

/// Imports any function a kernel calls: math functions and storage conversions.
pub type CalleeImporter<'a> = &'a mut dyn FnMut(&mut ir::Function, Callee) -> FuncRef;

/// An importer for printing every callee: math functions named `u1:<index>` (as
/// [`print_importer`]), storage functions `u2:<index>` (in [`StorageFn::all`] order).
pub fn print_callee_importer(
    p: Precision,
    ptr: Type,
    call_conv: CallConv,
) -> impl FnMut(&mut ir::Function, Callee) -> FuncRef {
    let mut math = print_importer(p, call_conv);
    move |func, c| match c {
        Callee::Math(f) => math(func, f),
        Callee::Storage(f) => {
            let idx = StorageFn::all().iter().position(|g| *g == f).unwrap_or(0) as u32;
            let name = func.declare_imported_user_function(UserExternalName::new(2, idx));
            let signature = func.import_signature(f.signature(ptr, call_conv));
            func.import_function(ExtFuncData {
                name: ExternalName::user(name),
                signature,
                colocated: false,
                patchable: false,
            })
        }
    }
}

/// The storage functions a kernel calls under `storage` (and for its random draws).
pub fn storage_calls(p: &Program, k: &Kernel, storage: &StorageMap) -> Vec<StorageFn> {
    let rounded: Vec<Storage> = k
        .stores
        .iter()
        .filter(|s| storage.stochastic_at(s.0))
        .map(|s| storage.of(s.0))
        .collect();
    let mut v = Vec::new();
    if !rounded.is_empty() {
        v.push(StorageFn::Bits);
    }
    if rounded.contains(&Storage::F16) {
        v.push(StorageFn::F16Stochastic);
    }
    if !draws(p, k).is_empty() {
        v.push(StorageFn::Draws);
    }
    v
}

/// The per-element random draws of a kernel, in body order.
pub fn draws(p: &Program, k: &Kernel) -> Vec<NodeId> {
    k.body
        .iter()
        .copied()
        .filter(|&n| matches!(p.graph.node(n), Node::Random { .. }))
        .collect()
}

/// Whether a kernel reads `base`, `seed` and `step` from its tasks: it rounds stochastically
/// or draws random numbers.
pub fn reads_key(p: &Program, k: &Kernel, storage: &StorageMap) -> bool {
    rounds_stochastically(k, storage) || !draws(p, k).is_empty()
}

/// Whether a kernel rounds stores stochastically under `storage` (and reads `base`, `seed` and
/// `step` from its tasks).
pub fn rounds_stochastically(k: &Kernel, storage: &StorageMap) -> bool {
    k.stores.iter().any(|s| storage.stochastic_at(s.0))
}

struct Gen<'a, 'b> {
    p: &'a Program,
    k: &'a Kernel,
    prec: Precision,
    storage: &'a StorageMap,
    b: FunctionBuilder<'b>,
    /// Uniform values by node, scalar and splat.
    uni: HashMap<NodeId, (Value, Value)>,
    calls: HashMap<MathFn, FuncRef>,
    storage_fns: HashMap<StorageFn, FuncRef>,
    ptr: Type,
    /// The jump that ends a task's prologue: constants are inserted before it, outside the loops.
    prologue_end: Option<ir::Inst>,
    /// Constants already materialized there: (bits, vector) -> value.
    consts: HashMap<(u64, bool), Value>,
    /// Stochastic rounding: this task's `base`, `seed` and `step`.
    key: Option<(Value, Value, Value)>,
    /// Stochastic rounding: the random-bits cache of each stored 16-bit slot.
    caches: HashMap<BufId, BitsSlot>,
    /// Random draws: the values cache of each per-element draw.
    draw_caches: HashMap<NodeId, BitsSlot>,
}

/// The random-bits cache of a slot: its address, and the element range `[start, end)` (indices
/// in the tensor) whose bits it holds.
#[derive(Clone, Copy)]
struct BitsSlot {
    addr: Value,
    start: Variable,
    end: Variable,
}

/// Where the elements of one iteration part are: element index and byte offsets.
struct At {
    idx: Value,
    /// `idx * size_of::<T>()`.
    byte: Value,
    /// `idx * 2`, when the kernel has 16-bit slots.
    half: Option<Value>,
}

/// Builds the Cranelift function of a kernel (every buffer in the program's precision).
pub fn build(
    p: &Program,
    k: &Kernel,
    prec: Precision,
    ptr: Type,
    call_conv: CallConv,
    import: Importer<'_>,
    index: u32,
) -> ir::Function {
    let mut callee = |func: &mut ir::Function, c: Callee| match c {
        Callee::Math(f) => import(func, f),
        Callee::Storage(f) => unreachable!("native storage calls no {f:?}"),
    };
    build_with(
        p,
        k,
        prec,
        &StorageMap::default(),
        ptr,
        call_conv,
        &mut callee,
        index,
    )
}

/// Builds the Cranelift function of a kernel whose buffers are stored as `storage` says:
/// 16-bit slots widened on load and rounded on store (see the module docs). 16-bit storage
/// needs an f32 program.
#[allow(clippy::too_many_arguments)]
pub fn build_stored(
    p: &Program,
    k: &Kernel,
    prec: Precision,
    storage: &StorageMap,
    ptr: Type,
    call_conv: CallConv,
    import: CalleeImporter<'_>,
    index: u32,
) -> Result<ir::Function, StorageError> {
    storage.check(p, prec)?;
    Ok(build_with(
        p, k, prec, storage, ptr, call_conv, import, index,
    ))
}

#[allow(clippy::too_many_arguments)]
fn build_with(
    p: &Program,
    k: &Kernel,
    prec: Precision,
    storage: &StorageMap,
    ptr: Type,
    call_conv: CallConv,
    import: CalleeImporter<'_>,
    index: u32,
) -> ir::Function {
    let abi = abi(p, k);
    let mut func =
        ir::Function::with_name_signature(UserFuncName::user(0, index), signature(ptr, call_conv));
    let calls: HashMap<MathFn, FuncRef> = abi
        .calls
        .iter()
        .map(|&f| (f, import(&mut func, Callee::Math(f))))
        .collect();
    let storage_fns: HashMap<StorageFn, FuncRef> = storage_calls(p, k, storage)
        .into_iter()
        .map(|f| (f, import(&mut func, Callee::Storage(f))))
        .collect();
    let mut fctx = FunctionBuilderContext::new();
    let b = FunctionBuilder::new(&mut func, &mut fctx);
    let mut g = Gen {
        p,
        k,
        prec,
        storage,
        b,
        uni: HashMap::new(),
        calls,
        storage_fns,
        ptr,
        prologue_end: None,
        consts: HashMap::new(),
        key: None,
        caches: HashMap::new(),
        draw_caches: HashMap::new(),
    };
    g.body(&abi);
    g.b.seal_all_blocks();
    g.b.finalize(TargetFrontendConfig {
        default_call_conv: call_conv,
        pointer_width: if ptr == types::I32 {
            PointerWidth::U32
        } else {
            PointerWidth::U64
        },
        page_size_align_log2: 12,
    });
    func
}

/// Per-iteration values of element nodes.
type Memo = HashMap<NodeId, Value>;

/// Reduction accumulators: sums as f64 (vectors of F64X2, or scalars), maxima in the element type.
struct Acc {
    op: ReduceOp,
    vars: Vec<Variable>,
    /// A sum of `x * 0` (the non-finite guard): every term is +-0 or NaN, so the sum is exact in
    /// f32 lanes too; it skips the promotion to f64.
    zeros: bool,
}

impl Gen<'_, '_> {
    fn flags() -> MemFlagsData {
        MemFlagsData::trusted()
    }

    /// Accesses to 16-bit slots: two-byte aligned only.
    fn flags16() -> MemFlagsData {
        MemFlagsData::new().with_notrap()
    }

    fn body(&mut self, abi: &KernelAbi) {
        let prec = self.prec;
        let (ty, vty, lanes, size) = (
            prec.ty(),
            prec.vty(),
            prec.lanes() as i64,
            prec.size() as i64,
        );
        let ptr = self.ptr;
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let (tasks, ntasks) = {
            let ps = self.b.block_params(entry);
            (ps[0], ps[1])
        };
        let ti = self.b.declare_var(types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(ti, zero);
        let task_head = self.b.create_block();
        let task_body = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(task_head, &[]);

        // for ti in 0..ntasks
        self.b.switch_to_block(task_head);
        let t = self.b.use_var(ti);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, t, ntasks);
        self.b.ins().brif(more, task_body, &[], exit, &[]);

        self.b.switch_to_block(task_body);
        let t = self.b.use_var(ti);
        let off = self.b.ins().imul_imm_s(t, TASK_SIZE as i64);
        let task = self.b.ins().iadd(tasks, off);
        let f = Self::flags();
        let bufs = self.b.ins().load(ptr, f, task, 0);
        let start = self.b.ins().load(types::I64, f, task, 8);
        let end = self.b.ins().load(types::I64, f, task, 16);
        let unis = self.b.ins().load(ptr, f, task, 24);
        let partials = self.b.ins().load(ptr, f, task, 32);
        let bases: HashMap<BufId, Value> = abi
            .slots
            .iter()
            .enumerate()
            .map(|(i, &buf)| (buf, self.b.ins().load(ptr, f, bufs, (i * 8) as i32)))
            .collect();
        if reads_key(self.p, self.k, self.storage) {
            let base = self.b.ins().load(types::I64, f, task, 40);
            let seed = self.b.ins().load(types::I64, f, task, 48);
            let step = self.b.ins().load(types::I64, f, task, 56);
            self.key = Some((base, seed, step));
            // An empty values cache per draw.
            for n in draws(self.p, self.k) {
                let slot = self.empty_cache(start);
                self.draw_caches.insert(n, slot);
            }
        }
        if rounds_stochastically(self.k, self.storage) {
            // An empty random-bits cache per stochastically stored slot.
            let rounded: BTreeSet<BufId> = self
                .k
                .stores
                .iter()
                .map(|s| s.0)
                .filter(|&b| self.storage.stochastic_at(b))
                .collect();
            for buf in rounded {
                let slot = self.empty_cache(start);
                self.caches.insert(buf, slot);
            }
        }
        let has16 = abi
            .slots
            .iter()
            .any(|&b| self.storage.of(b) != Storage::Native);
        for (i, &u) in abi.uniforms.iter().enumerate() {
            let s = self.b.ins().load(ty, f, unis, (i as i64 * size) as i32);
            let v = self.b.ins().splat(vty, s);
            self.uni.insert(u, (s, v));
        }
        // Accumulators.
        let mut accs = Vec::new();
        for &r in &abi.reductions {
            let Node::Reduce { op, arg, .. } = self.p.graph.node(r) else {
                continue;
            };
            let zeros = op == ReduceOp::Sum
                && prec == Precision::F32
                && matches!(self.p.graph.node(arg), Node::Binary(BinOp::Mul, a, b)
                    if self.p.graph.is_num(a, 0.0) || self.p.graph.is_num(b, 0.0));
            let vars = match op {
                ReduceOp::Sum if !zeros => {
                    let z = self.b.ins().f64const(0.0);
                    let zv = self.b.ins().splat(types::F64X2, z);
                    let vecs = if prec == Precision::F32 { 2 } else { 1 };
                    let mut vars: Vec<Variable> = (0..vecs * UNROLL)
                        .map(|_| {
                            let v = self.b.declare_var(types::F64X2);
                            self.b.def_var(v, zv);
                            v
                        })
                        .collect();
                    let sv = self.b.declare_var(types::F64);
                    self.b.def_var(sv, z);
                    vars.push(sv);
                    vars
                }
                ReduceOp::Sum | ReduceOp::Max => {
                    let z = self.fconst(0.0);
                    let zv = self.b.ins().splat(vty, z);
                    let mut vars: Vec<Variable> = (0..UNROLL)
                        .map(|_| {
                            let v = self.b.declare_var(vty);
                            self.b.def_var(v, zv);
                            v
                        })
                        .collect();
                    let sv = self.b.declare_var(ty);
                    self.b.def_var(sv, z);
                    vars.push(sv);
                    vars
                }
            };
            accs.push(Acc { op, vars, zeros });
        }
        let i = self.b.declare_var(types::I64);
        self.b.def_var(i, start);

        // Three loops: UNROLL vectors, one vector, one element.
        for (width, vectors) in [(lanes * UNROLL as i64, UNROLL), (lanes, 1), (1, 0)] {
            let head = self.b.create_block();
            let body = self.b.create_block();
            let after = self.b.create_block();
            let jump = self.b.ins().jump(head, &[]);
            self.prologue_end.get_or_insert(jump);
            self.b.switch_to_block(head);
            let iv = self.b.use_var(i);
            let next = self.b.ins().iadd_imm_s(iv, width);
            let fits = self.b.ins().icmp(IntCC::SignedLessThanOrEqual, next, end);
            self.b.ins().brif(fits, body, &[], after, &[]);
            self.b.switch_to_block(body);
            let iv = self.b.use_var(i);
            let vector = vectors > 0;
            // 16-bit slots in the main loop: two vectors' elements per 128-bit load and store.
            let paired = has16 && vectors >= 2 && vectors % 2 == 0;
            let mut loaded16: Vec<Memo> = (0..vectors.max(1)).map(|_| Memo::new()).collect();
            if paired {
                for part in (0..vectors).step_by(2) {
                    let idx = self.b.ins().iadd_imm_s(iv, part as i64 * lanes);
                    let half = self.b.ins().imul_imm_s(idx, 2);
                    for &n in &self.k.body {
                        let Node::Load { buf, .. } = self.p.graph.node(n) else {
                            continue;
                        };
                        let st = self.storage.of(buf);
                        if st == Storage::Native {
                            continue;
                        }
                        let addr = self.b.ins().iadd(bases[&buf], half);
                        let q = self.b.ins().load(types::I16X8, Self::flags16(), addr, 0);
                        let (lo, hi) = self.widen_pair(st, q);
                        loaded16[part].insert(n, lo);
                        loaded16[part + 1].insert(n, hi);
                    }
                }
            }
            // The rounded lanes of an even part's 16-bit stores, and their address, until the
            // odd part stores both.
            let mut pending: HashMap<BufId, (Value, Value)> = HashMap::new();
            for (part, loaded16) in loaded16.iter().enumerate() {
                let idx = self.b.ins().iadd_imm_s(iv, part as i64 * lanes);
                let byte = self.b.ins().imul_imm_s(idx, size);
                let half = has16.then(|| self.b.ins().imul_imm_s(idx, 2));
                let at = At { idx, byte, half };
                let mut memo = Memo::new();
                for &n in &self.k.body {
                    let v = match loaded16.get(&n) {
                        Some(&v) => v,
                        None => self.node(n, vector, &bases, &at, &mut memo),
                    };
                    memo.insert(n, v);
                }
                for &(r, a) in &self.k.reductions {
                    let ri = abi
                        .reductions
                        .iter()
                        .position(|&x| x == r)
                        .expect("reduction in abi");
                    let x = self.operand(a, vector, &memo);
                    self.accumulate(&accs[ri], x, vector, part);
                }
                for &(buf, v) in &self.k.stores {
                    let x = self.operand(v, vector, &memo);
                    if !paired || self.storage.of(buf) == Storage::Native {
                        self.store(buf, x, vector, &bases, &at);
                        continue;
                    }
                    let h = self.rounded(buf, x, vector, &at);
                    if part % 2 == 0 {
                        let addr = self.b.ins().iadd(bases[&buf], at.half.expect("16-bit"));
                        pending.insert(buf, (h, addr));
                    } else {
                        let (h0, addr) = pending.remove(&buf).expect("the even part's lanes");
                        let n = self.b.ins().unarrow(h0, h);
                        self.b.ins().store(Self::flags16(), n, addr, 0);
                    }
                }
            }
            let iv = self.b.use_var(i);
            let next = self.b.ins().iadd_imm_s(iv, width);
            self.b.def_var(i, next);
            self.b.ins().jump(head, &[]);
            self.b.switch_to_block(after);
        }
        // Partials, combined in a fixed order.
        for (ri, acc) in accs.iter().enumerate() {
            let total = self.horizontal(acc);
            self.b
                .ins()
                .store(Self::flags(), total, partials, (ri * 8) as i32);
        }
        let t = self.b.use_var(ti);
        let t1 = self.b.ins().iadd_imm_s(t, 1);
        self.b.def_var(ti, t1);
        self.b.ins().jump(task_head, &[]);
        self.b.switch_to_block(exit);
        self.b.ins().return_(&[]);
    }

    /// Stores `x` (a vector of element values, or one) into slot `buf` at `at`, converted to
    /// the slot's storage.
    fn store(
        &mut self,
        buf: BufId,
        x: Value,
        vector: bool,
        bases: &HashMap<BufId, Value>,
        at: &At,
    ) {
        let st = self.storage.of(buf);
        if st == Storage::Native {
            let addr = self.b.ins().iadd(bases[&buf], at.byte);
            self.b.ins().store(Self::flags(), x, addr, 0);
            return;
        }
        let h = self.rounded(buf, x, vector, at);
        let half = at.half.expect("a 16-bit slot has 16-bit offsets");
        let addr = self.b.ins().iadd(bases[&buf], half);
        if vector {
            // Lanes hold 0..=0xffff: narrowing without saturation, four lanes into 64 bits.
            let n = self.b.ins().unarrow(h, h);
            let q = self.bitcast(types::I64X2, n);
            let lo = self.b.ins().extractlane(q, 0);
            self.b.ins().store(Self::flags16(), lo, addr, 0);
        } else {
            self.b.ins().istore16(Self::flags16(), h, addr, 0);
        }
    }

    /// `x` (a vector of element values, or one) rounded to the 16-bit storage of slot `buf`:
    /// the bits zero-extended in i32 lanes.
    fn rounded(&mut self, buf: BufId, x: Value, vector: bool, at: &At) -> Value {
        let st = self.storage.of(buf);
        let ity = if vector { types::I32X4 } else { types::I32 };
        let xi = self.bitcast(ity, x);
        match (st, self.caches.contains_key(&buf)) {
            (Storage::Bf16, false) => self.nearest_bf16(xi, vector),
            (_, false) => self.nearest_f16(xi, vector),
            (Storage::Bf16, true) => {
                let r = self.random_bits(buf, at.idx, vector);
                self.stochastic_bf16(xi, r, vector)
            }
            (_, true) => {
                let r = self.random_bits(buf, at.idx, vector);
                let fref = self.storage_fns[&StorageFn::F16Stochastic];
                if vector {
                    let mut out = xi;
                    for lane in 0..4u8 {
                        let xl = self.b.ins().extractlane(x, lane);
                        let rl = self.b.ins().extractlane(r, lane);
                        let call = self.b.ins().call(fref, &[xl, rl]);
                        let y = self.b.inst_results(call)[0];
                        out = self.b.ins().insertlane(out, y, lane);
                    }
                    out
                } else {
                    let call = self.b.ins().call(fref, &[x, r]);
                    self.b.inst_results(call)[0]
                }
            }
        }
    }

    /// Eight 16-bit values (one 128-bit load) widened to two f32 vectors, low lanes first.
    fn widen_pair(&mut self, st: Storage, q: Value) -> (Value, Value) {
        if st == Storage::Bf16 {
            // Interleaving zero words below the values (punpcklwd / punpckhwd) shifts them into
            // the high half of each f32.
            let zero = self.ci(0, true);
            let z = self.bitcast(types::I8X16, zero);
            let qb = self.bitcast(types::I8X16, q);
            let mut halves = [z; 2];
            for (j, first) in [0u8, 8].into_iter().enumerate() {
                let mask: Vec<u8> = (0..4u8)
                    .flat_map(|w| {
                        let a = first + 2 * w;
                        [a, a + 1, 16 + a, 17 + a]
                    })
                    .collect();
                let imm = self.b.func.dfg.immediates.push(ConstantData::from(mask));
                let v = self.b.ins().shuffle(z, qb, imm);
                halves[j] = self.bitcast(types::F32X4, v);
            }
            (halves[0], halves[1])
        } else {
            let lo = self.b.ins().uwiden_low(q);
            let hi = self.b.ins().uwiden_high(q);
            (self.widen_f16(lo, true), self.widen_f16(hi, true))
        }
    }

    /// A random-bits cache on the stack, empty, holding no element from `start` on.
    fn empty_cache(&mut self, start: Value) -> BitsSlot {
        let ss = self.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            BITS_CACHE_SIZE,
            4,
        ));
        let addr = self.b.ins().stack_addr(self.ptr, ss, 0);
        let empty = self.b.ins().iconst(types::I64, -1);
        self.b
            .ins()
            .store(Self::flags(), empty, addr, BITS_CACHE_SIZE as i32 - 8);
        let (s0, e0) = (
            self.b.declare_var(types::I64),
            self.b.declare_var(types::I64),
        );
        self.b.def_var(s0, start);
        self.b.def_var(e0, start);
        BitsSlot {
            addr,
            start: s0,
            end: e0,
        }
    }

    /// The values of draw `n` at the elements at `idx` (a vector's lanes, or one): from its
    /// cache, filled with the next `BITS_BLOCK` elements' first when it ends too early; f32
    /// values, widened in f64 programs.
    fn draw_values(&mut self, n: NodeId, idx: Value, vector: bool) -> Value {
        let Node::Random {
            dist, stream, seed, ..
        } = self.p.graph.node(n)
        else {
            unreachable!("draw_values takes a draw");
        };
        let (base, task_seed, step) = self.key.expect("kernels with draws load the key");
        let key = match seed {
            Some(s) => {
                let v = self.uni[&s].0;
                let v = if self.prec == Precision::F64 {
                    self.b.ins().fdemote(types::F32, v)
                } else {
                    v
                };
                self.b.ins().fcvt_to_uint_sat(types::I64, v)
            }
            None => task_seed,
        };
        let c = self.draw_caches[&n];
        let width = if vector { self.prec.lanes() as i64 } else { 1 };
        let have = self.b.use_var(c.end);
        let need = self.b.ins().iadd_imm_s(idx, width);
        let miss = self.b.ins().icmp(IntCC::SignedGreaterThan, need, have);
        let fill = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(fill);
        self.b.ins().brif(miss, fill, &[], cont, &[]);
        self.b.switch_to_block(fill);
        let e = self.b.ins().iadd(base, idx);
        let st = self.b.ins().iconst(types::I32, i64::from(stream as i32));
        let d = self.b.ins().iconst(types::I32, i64::from(dist.code()));
        let fref = self.storage_fns[&StorageFn::Draws];
        self.b.ins().call(fref, &[c.addr, key, step, st, e, d]);
        self.b.def_var(c.start, idx);
        let end = self.b.ins().iadd_imm_s(idx, BITS_BLOCK as i64);
        self.b.def_var(c.end, end);
        self.b.ins().jump(cont, &[]);
        self.b.switch_to_block(cont);
        let s0 = self.b.use_var(c.start);
        let off = self.b.ins().isub(idx, s0);
        let off = self.b.ins().ishl_imm_s(off, 2);
        let addr = self.b.ins().iadd(c.addr, off);
        match (self.prec, vector) {
            (Precision::F32, true) => self.b.ins().load(types::F32X4, Self::flags16(), addr, 0),
            (Precision::F32, false) => self.b.ins().load(types::F32, Self::flags16(), addr, 0),
            (Precision::F64, true) => {
                // Two lanes; the cache has room past its values for the 16-byte load.
                let v = self.b.ins().load(types::F32X4, Self::flags16(), addr, 0);
                self.b.ins().fvpromote_low(v)
            }
            (Precision::F64, false) => {
                let v = self.b.ins().load(types::F32, Self::flags16(), addr, 0);
                self.b.ins().fpromote(types::F64, v)
            }
        }
    }

    /// The random bits of the elements at `idx` (four, or one) for stores into `buf`: from the
    /// slot's cache, filled with the next `BITS_BLOCK` elements' first when it ends too early.
    fn random_bits(&mut self, buf: BufId, idx: Value, vector: bool) -> Value {
        let (base, seed, step) = self.key.expect("stochastic kernels load the rounding key");
        let c = self.caches[&buf];
        let width = if vector { 4 } else { 1 };
        let have = self.b.use_var(c.end);
        let need = self.b.ins().iadd_imm_s(idx, width);
        let miss = self.b.ins().icmp(IntCC::SignedGreaterThan, need, have);
        let fill = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(fill);
        self.b.ins().brif(miss, fill, &[], cont, &[]);
        self.b.switch_to_block(fill);
        let e = self.b.ins().iadd(base, idx);
        let kb = key_buffer(self.p, buf);
        let kb = self.b.ins().iconst(types::I32, i64::from(kb));
        let fref = self.storage_fns[&StorageFn::Bits];
        self.b.ins().call(fref, &[c.addr, seed, step, kb, e]);
        self.b.def_var(c.start, idx);
        let end = self.b.ins().iadd_imm_s(idx, BITS_BLOCK as i64);
        self.b.def_var(c.end, end);
        self.b.ins().jump(cont, &[]);
        self.b.switch_to_block(cont);
        let s0 = self.b.use_var(c.start);
        let off = self.b.ins().isub(idx, s0);
        let off = self.b.ins().ishl_imm_s(off, 2);
        let addr = self.b.ins().iadd(c.addr, off);
        let ty = if vector { types::I32X4 } else { types::I32 };
        self.b.ins().load(ty, Self::flags16(), addr, 0)
    }

    /// Integer select: `m ? a : b` (vector masks from `icmp`).
    fn isel(&mut self, m: Value, a: Value, b: Value, vector: bool) -> Value {
        if vector {
            self.b.ins().bitselect(m, a, b)
        } else {
            self.b.ins().select(m, a, b)
        }
    }

    /// bf16 bits (zero-extended) as f32: the high half of the f32 bits.
    fn widen_bf16(&mut self, h: Value, vector: bool) -> Value {
        let fty = if vector { types::F32X4 } else { types::F32 };
        let x = self.b.ins().ishl_imm_s(h, 16);
        self.bitcast(fty, x)
    }

    /// f16 bits (zero-extended) as f32, exactly: normals rebiased in integer arithmetic,
    /// subnormals converted from their integer mantissa and scaled by 2^-24 (no subnormal f32
    /// operand, which would be slow), infinities and NaNs given the f32 exponent.
    fn widen_f16(&mut self, h: Value, vector: bool) -> Value {
        let (ity, fty) = if vector {
            (types::I32X4, types::F32X4)
        } else {
            (types::I32, types::F32)
        };
        let mag = self.ci(0x7fff, vector);
        let a = self.b.ins().band(h, mag);
        let t = self.b.ins().ishl_imm_s(a, 13);
        let rebias = self.ci(0x3800_0000, vector);
        let normal = self.b.ins().iadd(t, rebias);
        let m = self.b.ins().fcvt_from_sint(fty, a);
        let scale = self.c(5.960_464_477_539_063e-8, vector); // 2^-24
        let m = self.b.ins().fmul(m, scale);
        let sub = self.bitcast(ity, m);
        let min_normal = self.ci(0x400, vector);
        let small = self.b.ins().icmp(IntCC::SignedLessThan, a, min_normal);
        let r = self.isel(small, sub, normal, vector);
        let inf = self.ci(0x7c00, vector);
        let special = self.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, a, inf);
        let exp = self.ci(0x7f80_0000, vector);
        let infnan = self.b.ins().bor(t, exp);
        let r = self.isel(special, infnan, r, vector);
        let sbit = self.ci(0x8000, vector);
        let sign = self.b.ins().band(h, sbit);
        let sign = self.b.ins().ishl_imm_s(sign, 16);
        let r = self.b.ins().bor(r, sign);
        self.bitcast(fty, r)
    }

    /// f32 bits to the nearest bf16 (ties to even; NaN keeps its high bits, made quiet), as
    /// `half::bf16::from_f32`: adding `0x7fff` plus the kept bits' lowest bit carries exactly when
    /// the dropped half is above one half, or one half with an odd result.
    fn nearest_bf16(&mut self, x: Value, vector: bool) -> Value {
        let fty = if vector { types::F32X4 } else { types::F32 };
        let xf = self.bitcast(fty, x);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, xf, xf);
        let hi = self.b.ins().ushr_imm_s(x, 16);
        let one = self.ci(1, vector);
        let lsb = self.b.ins().band(hi, one);
        let bias = self.ci(0x7fff, vector);
        let r = self.b.ins().iadd(x, bias);
        let r = self.b.ins().iadd(r, lsb);
        let r = self.b.ins().ushr_imm_s(r, 16);
        let quiet = self.ci(0x40, vector);
        let q = self.b.ins().bor(hi, quiet);
        self.isel(nan, q, r, vector)
    }

    /// f32 bits to the nearest f16 (ties to even; overflow to infinity; NaN keeps its high
    /// mantissa bits, made quiet), as `half::f16::from_f32`. Normals round like bf16 (rebiased);
    /// results below 2^-14 come from adding 0.5 in f32, whose rounding at 2^-24 is the f16
    /// subnormal grid.
    fn nearest_f16(&mut self, x: Value, vector: bool) -> Value {
        let (ity, fty) = if vector {
            (types::I32X4, types::F32X4)
        } else {
            (types::I32, types::F32)
        };
        let mag = self.ci(0x7fff_ffff, vector);
        let a = self.b.ins().band(x, mag);
        // Normal: rebias the exponent by -112 and round at bit 13.
        let m13 = self.b.ins().ushr_imm_s(a, 13);
        let one = self.ci(1, vector);
        let lsb = self.b.ins().band(m13, one);
        let bias = self.ci(0xfff - 0x3800_0000, vector);
        let n = self.b.ins().iadd(a, bias);
        let n = self.b.ins().iadd(n, lsb);
        let n = self.b.ins().ushr_imm_s(n, 13);
        let inf = self.ci(0x7c00, vector);
        let n = self.b.ins().smin(n, inf);
        // Subnormal (and zero): |x| + 0.5 rounds |x| to a multiple of 2^-24.
        let af = self.bitcast(fty, a);
        let halfc = self.c(0.5, vector);
        let s = self.b.ins().fadd(af, halfc);
        let si = self.bitcast(ity, s);
        let half_bits = self.ci(0x3f00_0000, vector);
        let sub = self.b.ins().isub(si, half_bits);
        let min_normal = self.ci(0x3880_0000, vector);
        let small = self.b.ins().icmp(IntCC::SignedLessThan, a, min_normal);
        let r = self.isel(small, sub, n, vector);
        // Infinity and NaN.
        let mant = self.ci(0x3ff, vector);
        let payload = self.b.ins().band(m13, mant);
        let infnan = self.b.ins().bor(payload, inf);
        let f32inf = self.ci(0x7f80_0000, vector);
        let is_nan = self.b.ins().icmp(IntCC::SignedGreaterThan, a, f32inf);
        let quiet = self.ci(0x200, vector);
        let with_quiet = self.b.ins().bor(infnan, quiet);
        let infnan = self.isel(is_nan, with_quiet, infnan, vector);
        let special = self
            .b
            .ins()
            .icmp(IntCC::SignedGreaterThanOrEqual, a, f32inf);
        let r = self.isel(special, infnan, r, vector);
        let hi = self.b.ins().ushr_imm_s(x, 16);
        let sbit = self.ci(0x8000, vector);
        let sign = self.b.ins().band(hi, sbit);
        self.b.ins().bor(r, sign)
    }

    /// f32 bits rounded stochastically to bf16 with the random bits `r`: the low 16 bits of `r`
    /// added below the kept bits, then truncated (for finite `x` the sum neither overflows nor
    /// changes sign); non-finite values round to nearest.
    fn stochastic_bf16(&mut self, x: Value, r: Value, vector: bool) -> Value {
        let low = self.ci(0xffff, vector);
        let rl = self.b.ins().band(r, low);
        let s = self.b.ins().iadd(x, rl);
        let s = self.b.ins().ushr_imm_s(s, 16);
        let mag = self.ci(0x7fff_ffff, vector);
        let a = self.b.ins().band(x, mag);
        let inf = self.ci(0x7f80_0000, vector);
        let finite = self.b.ins().icmp(IntCC::SignedLessThan, a, inf);
        let near = self.nearest_bf16(x, vector);
        self.isel(finite, s, near, vector)
    }

    fn fconst(&mut self, v: f64) -> Value {
        match self.prec {
            Precision::F32 => self.b.ins().f32const(v as f32),
            Precision::F64 => self.b.ins().f64const(v),
        }
    }

    fn vconst(&mut self, v: f64) -> Value {
        let s = self.fconst(v);
        self.b.ins().splat(self.prec.vty(), s)
    }

    fn bitcast(&mut self, to: Type, v: Value) -> Value {
        self.b.ins().bitcast(
            to,
            MemFlagsData::new().with_endianness(Endianness::Little),
            v,
        )
    }

    /// The value of a node as an operand: a body value, or a uniform (as a boolean where its type is).
    fn operand(&mut self, n: NodeId, vector: bool, memo: &Memo) -> Value {
        if let Some(&v) = memo.get(&n) {
            return v;
        }
        let (s, v) = self.uni[&n];
        if self.p.graph.ty(n) == Ty::Bool {
            // Uniform booleans are 0/1 numbers: turn them into masks (vector) or i8 (scalar).
            return if vector {
                let z = self.vconst(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, v, z)
            } else {
                let z = self.fconst(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, s, z)
            };
        }
        if vector {
            v
        } else {
            s
        }
    }

    fn node(
        &mut self,
        n: NodeId,
        vector: bool,
        bases: &HashMap<BufId, Value>,
        at: &At,
        memo: &mut Memo,
    ) -> Value {
        let ty = if vector {
            self.prec.vty()
        } else {
            self.prec.ty()
        };
        match self.p.graph.node(n) {
            Node::Load { buf, .. } => match self.storage.of(buf) {
                Storage::Native => {
                    let addr = self.b.ins().iadd(bases[&buf], at.byte);
                    self.b.ins().load(ty, Self::flags(), addr, 0)
                }
                st => {
                    let half = at.half.expect("a 16-bit slot has 16-bit offsets");
                    let addr = self.b.ins().iadd(bases[&buf], half);
                    let h = if vector {
                        self.b.ins().uload16x4(Self::flags16(), addr, 0)
                    } else {
                        self.b.ins().uload16(types::I32, Self::flags16(), addr, 0)
                    };
                    if st == Storage::Bf16 {
                        self.widen_bf16(h, vector)
                    } else {
                        self.widen_f16(h, vector)
                    }
                }
            },
            Node::Splat(_, a) => self.operand(a, vector, memo),
            Node::Random { .. } => self.draw_values(n, at.idx, vector),
            Node::Unary(op, a) => {
                let x = self.operand(a, vector, memo);
                self.unary(op, x, vector)
            }
            Node::Binary(op, a, c) => {
                let x = self.operand(a, vector, memo);
                let y = self.operand(c, vector, memo);
                self.binary(op, x, y, vector)
            }
            Node::Select(c, a, d) => {
                let m = self.operand(c, vector, memo);
                let x = self.operand(a, vector, memo);
                let y = self.operand(d, vector, memo);
                if vector {
                    let is_bool = self.p.graph.ty(a) == Ty::Bool;
                    let m = if is_bool {
                        m
                    } else {
                        self.bitcast(self.prec.vty(), m)
                    };
                    self.b.ins().bitselect(m, x, y)
                } else {
                    self.b.ins().select(m, x, y)
                }
            }
            other => unreachable!(
                "{other:?} is not a per-element node (kind {:?})",
                self.p.graph.kind(n) == Kind::Scalar
            ),
        }
    }

    fn call(&mut self, f: MathFn, args: &[Value], vector: bool) -> Value {
        let fref = self.calls[&f];
        if !vector {
            let call = self.b.ins().call(fref, args);
            return self.b.inst_results(call)[0];
        }
        // One call per lane.
        let mut out = self.vconst(0.0);
        for lane in 0..self.prec.lanes() as u8 {
            let scalars: Vec<Value> = args
                .iter()
                .map(|&a| self.b.ins().extractlane(a, lane))
                .collect();
            let call = self.b.ins().call(fref, &scalars);
            let r = self.b.inst_results(call)[0];
            out = self.b.ins().insertlane(out, r, lane);
        }
        out
    }

    fn unary(&mut self, op: UnOp, x: Value, vector: bool) -> Value {
        if self.prec == Precision::F32 {
            match op {
                UnOp::Exp => return self.exp32(x, vector),
                UnOp::Log => return self.log32(x, vector),
                UnOp::Sigmoid => {
                    // e = exp(-|x|) <= 1; sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below:
                    // neither side divides by a huge, inexact exponential.
                    let one = self.c(1.0, vector);
                    let ax = self.b.ins().fabs(x);
                    let nx = self.b.ins().fneg(ax);
                    let e = self.exp32(nx, vector);
                    let d = self.b.ins().fadd(one, e);
                    let zero = self.c(0.0, vector);
                    let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                    let num = self.select(neg, e, one, vector);
                    return self.b.ins().fdiv(num, d);
                }
                UnOp::Tanh => return self.tanh32(x, vector),
                _ => {}
            }
        }
        if let Some(f) = MathFn::of_unary(op) {
            return self.call(f, &[x], vector);
        }
        let one = if vector {
            self.vconst(1.0)
        } else {
            self.fconst(1.0)
        };
        match op {
            UnOp::Neg => self.b.ins().fneg(x),
            UnOp::Not => {
                if vector {
                    self.b.ins().bnot(x)
                } else {
                    self.b.ins().bxor_imm_s(x, 1)
                }
            }
            UnOp::Sqrt => self.b.ins().sqrt(x),
            UnOp::Rsqrt => {
                let s = self.b.ins().sqrt(x);
                self.b.ins().fdiv(one, s)
            }
            UnOp::Abs => self.b.ins().fabs(x),
            UnOp::Floor => self.b.ins().floor(x),
            UnOp::Ceil => self.b.ins().ceil(x),
            UnOp::Round => self.b.ins().nearest(x),
            UnOp::Sign => {
                // 1 for x > 0, -1 for x < 0, x * 0 otherwise (keeps ±0 and NaN).
                let zero = if vector {
                    self.vconst(0.0)
                } else {
                    self.fconst(0.0)
                };
                let neg_one = self.b.ins().fneg(one);
                let xz = self.b.ins().fmul(x, zero);
                let lt = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
                let gt = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                let inner = self.select(lt, neg_one, xz, vector);
                self.select(gt, one, inner, vector)
            }
            _ => unreachable!("calls handled above"),
        }
    }

    /// A float constant, splat when `vector`; materialized once per task, before the loops.
    fn c(&mut self, v: f64, vector: bool) -> Value {
        let key = (v.to_bits(), vector);
        if let Some(&c) = self.consts.get(&key) {
            return c;
        }
        let Some(at) = self.prologue_end else {
            return if vector {
                self.vconst(v)
            } else {
                self.fconst(v)
            };
        };
        let vty = self.prec.vty();
        let mut pos = FuncCursor::new(self.b.func).at_inst(at);
        let s = match self.prec {
            Precision::F32 => pos.ins().f32const(v as f32),
            Precision::F64 => pos.ins().f64const(v),
        };
        let c = if vector { pos.ins().splat(vty, s) } else { s };
        self.consts.insert(key, c);
        c
    }

    /// An i32 constant, splat when `vector`; materialized once per task, before the loops.
    fn ci(&mut self, v: i32, vector: bool) -> Value {
        let key = (u64::from(v as u32) | 1 << 40, vector);
        if let Some(&c) = self.consts.get(&key) {
            return c;
        }
        let c = match self.prologue_end {
            Some(at) => {
                let mut pos = FuncCursor::new(self.b.func).at_inst(at);
                let s = pos.ins().iconst(types::I32, i64::from(v));
                if vector {
                    pos.ins().splat(types::I32X4, s)
                } else {
                    s
                }
            }
            None => {
                let s = self.b.ins().iconst(types::I32, i64::from(v));
                if vector {
                    self.b.ins().splat(types::I32X4, s)
                } else {
                    s
                }
            }
        };
        self.consts.insert(key, c);
        c
    }

    /// Evaluates a polynomial with coefficients from the highest degree down (Horner).
    fn poly(&mut self, x: Value, coeffs: &[f64], vector: bool) -> Value {
        let mut acc = self.c(coeffs[0], vector);
        for &k in &coeffs[1..] {
            let m = self.b.ins().fmul(acc, x);
            let kc = self.c(k, vector);
            acc = self.b.ins().fadd(m, kc);
        }
        acc
    }

    /// `2^n` for integers `n` in the normal range, as f32 bits.
    fn pow2i(&mut self, n: Value, vector: bool) -> Value {
        let bias = self.ci(127, vector);
        let e = self.b.ins().iadd(n, bias);
        let bits = self.b.ins().ishl_imm_s(e, 23);
        let fty = if vector { types::F32X4 } else { types::F32 };
        self.bitcast(fty, bits)
    }

    /// f32 `exp`, inline (Cody-Waite reduction by ln 2, degree-5 polynomial, scaling by 2^n in
    /// two factors so results down to the subnormals round once). Within 2 ulp of libm's `expf`.
    fn exp32(&mut self, x: Value, vector: bool) -> Value {
        let ity = if vector { types::I32X4 } else { types::I32 };
        // Clamp with compare-and-select (cheaper than IEEE min/max); a NaN compares false and
        // flows through to the result.
        let lo = self.c(-104.0, vector);
        let hi = self.c(89.0, vector);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let xc = self.select(below, lo, x, vector);
        let above = self.b.ins().fcmp(FloatCC::GreaterThan, xc, hi);
        let xc = self.select(above, hi, xc, vector);
        let log2e = self.c(std::f64::consts::LOG2_E, vector);
        let t = self.b.ins().fmul(xc, log2e);
        // Round to the nearest integer by adding 1.5 * 2^23: the integer lands in the low
        // mantissa bits, so one subtraction gives it as a float and one as an i32.
        let magic = self.c(12582912.0, vector);
        let k = self.b.ins().fadd(t, magic);
        let n = self.b.ins().fsub(k, magic);
        let kb = self.bitcast(ity, k);
        let mb = self.ci(0x4b40_0000, vector);
        let ni = self.b.ins().isub(kb, mb);
        let c1 = self.c(0.693359375, vector);
        let c2 = self.c(-2.12194440e-4, vector);
        let a = self.b.ins().fmul(n, c1);
        let r = self.b.ins().fsub(xc, a);
        let a = self.b.ins().fmul(n, c2);
        let r = self.b.ins().fsub(r, a);
        let z = self.b.ins().fmul(r, r);
        let p = self.poly(
            r,
            &[
                1.9875691500e-4,
                1.3981999507e-3,
                8.3334519073e-3,
                4.1665795894e-2,
                1.6666665459e-1,
                5.0000001201e-1,
            ],
            vector,
        );
        let pz = self.b.ins().fmul(p, z);
        let e = self.b.ins().fadd(pz, r);
        let one = self.c(1.0, vector);
        let e = self.b.ins().fadd(e, one);
        let n1 = self.b.ins().sshr_imm_s(ni, 1);
        let n2 = self.b.ins().isub(ni, n1);
        let s1 = self.pow2i(n1, vector);
        let s2 = self.pow2i(n2, vector);
        let e = self.b.ins().fmul(e, s1);
        self.b.ins().fmul(e, s2)
    }

    /// f32 `ln`, inline (mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial; subnormals
    /// scaled first; 0, negatives, infinity and NaN as libm). Within 2 ulp of libm's `logf`.
    fn log32(&mut self, x: Value, vector: bool) -> Value {
        let (ity, fty) = if vector {
            (types::I32X4, types::F32X4)
        } else {
            (types::I32, types::F32)
        };
        // Scale subnormals into the normal range.
        let tiny = self.c(f64::from(f32::MIN_POSITIVE), vector);
        let is_sub = self.b.ins().fcmp(FloatCC::LessThan, x, tiny);
        let scale = self.c(8388608.0, vector); // 2^23
        let xs = self.b.ins().fmul(x, scale);
        let xs = self.select(is_sub, xs, x, vector);
        let zero_i = self.ci(0, vector);
        let adj23 = self.ci(23, vector);
        let adj = if vector {
            self.b.ins().bitselect(is_sub, adj23, zero_i)
        } else {
            self.b.ins().select(is_sub, adj23, zero_i)
        };
        let bits = self.bitcast(ity, xs);
        let ex = self.b.ins().ushr_imm_s(bits, 23);
        let c126 = self.ci(126, vector);
        let ex = self.b.ins().isub(ex, c126);
        let ex = self.b.ins().isub(ex, adj);
        let mmask = self.ci(0x007f_ffff, vector);
        let half = self.ci(0x3f00_0000, vector);
        let mb = self.b.ins().band(bits, mmask);
        let mb = self.b.ins().bor(mb, half);
        let m = self.bitcast(fty, mb);
        let e = self.b.ins().fcvt_from_sint(fty, ex);
        let sqrthf = self.c(std::f64::consts::FRAC_1_SQRT_2, vector);
        let small = self.b.ins().fcmp(FloatCC::LessThan, m, sqrthf);
        let one = self.c(1.0, vector);
        let zero = self.c(0.0, vector);
        let dec = self.select(small, one, zero, vector);
        let e = self.b.ins().fsub(e, dec);
        let m2 = self.b.ins().fadd(m, m);
        let m = self.select(small, m2, m, vector);
        let m = self.b.ins().fsub(m, one);
        let z = self.b.ins().fmul(m, m);
        let p = self.poly(
            m,
            &[
                7.0376836292e-2,
                -1.1514610310e-1,
                1.1676998740e-1,
                -1.2420140846e-1,
                1.4249322787e-1,
                -1.6668057665e-1,
                2.0000714765e-1,
                -2.4999993993e-1,
                3.3333331174e-1,
            ],
            vector,
        );
        let y = self.b.ins().fmul(p, m);
        let y = self.b.ins().fmul(y, z);
        let q1 = self.c(-2.12194440e-4, vector);
        let t = self.b.ins().fmul(e, q1);
        let y = self.b.ins().fadd(y, t);
        let halfc = self.c(0.5, vector);
        let t = self.b.ins().fmul(z, halfc);
        let y = self.b.ins().fsub(y, t);
        let r = self.b.ins().fadd(m, y);
        let q2 = self.c(0.693359375, vector);
        let t = self.b.ins().fmul(e, q2);
        let r = self.b.ins().fadd(r, t);
        // Special values: log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, log(NaN) = NaN.
        let ninf = self.c(f64::NEG_INFINITY, vector);
        let pinf = self.c(f64::INFINITY, vector);
        let nan = self.c(f64::NAN, vector);
        let is0 = self.b.ins().fcmp(FloatCC::Equal, x, zero);
        let r = self.select(is0, ninf, r, vector);
        let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let r = self.select(neg, nan, r, vector);
        let isinf = self.b.ins().fcmp(FloatCC::Equal, x, pinf);
        let r = self.select(isinf, pinf, r, vector);
        let isnan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.select(isnan, x, r, vector)
    }

    /// f32 `tanh`, inline: an odd polynomial below 0.625, `1 - 2 / (exp(2|x|) + 1)` above.
    fn tanh32(&mut self, x: Value, vector: bool) -> Value {
        let ax = self.b.ins().fabs(x);
        let z = self.b.ins().fmul(x, x);
        let p = self.poly(
            z,
            &[
                -5.70498872745e-3,
                2.06390887954e-2,
                -5.37397155531e-2,
                1.33314422036e-1,
                -3.33332819422e-1,
            ],
            vector,
        );
        let pz = self.b.ins().fmul(p, z);
        let pzx = self.b.ins().fmul(pz, x);
        let small = self.b.ins().fadd(pzx, x);
        let two = self.c(2.0, vector);
        let one = self.c(1.0, vector);
        let ax2 = self.b.ins().fmul(ax, two);
        let e = self.exp32(ax2, vector);
        let d = self.b.ins().fadd(e, one);
        let q = self.b.ins().fdiv(two, d);
        let big = self.b.ins().fsub(one, q);
        // Restore the sign (keeps -0 and NaN through `small`).
        let neg = self.b.ins().fneg(big);
        let zero = self.c(0.0, vector);
        let is_neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let big = self.select(is_neg, neg, big, vector);
        let lim = self.c(0.625, vector);
        let is_small = self.b.ins().fcmp(FloatCC::LessThan, ax, lim);
        let r = self.select(is_small, small, big, vector);
        let isnan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        self.select(isnan, x, r, vector)
    }

    fn select(&mut self, m: Value, a: Value, b: Value, vector: bool) -> Value {
        if vector {
            let m = self.bitcast(self.prec.vty(), m);
            self.b.ins().bitselect(m, a, b)
        } else {
            self.b.ins().select(m, a, b)
        }
    }

    fn binary(&mut self, op: BinOp, x: Value, y: Value, vector: bool) -> Value {
        if let Some(f) = MathFn::of_binary(op) {
            return self.call(f, &[x, y], vector);
        }
        let cmp = |g: &mut Self, cc| g.b.ins().fcmp(cc, x, y);
        match op {
            BinOp::Add => self.b.ins().fadd(x, y),
            BinOp::Sub => self.b.ins().fsub(x, y),
            BinOp::Mul => self.b.ins().fmul(x, y),
            BinOp::Div => self.b.ins().fdiv(x, y),
            BinOp::Min => self.b.ins().fmin(x, y),
            BinOp::Max => self.b.ins().fmax(x, y),
            BinOp::Eq => cmp(self, FloatCC::Equal),
            BinOp::Ne => cmp(self, FloatCC::NotEqual),
            BinOp::Lt => cmp(self, FloatCC::LessThan),
            BinOp::Le => cmp(self, FloatCC::LessThanOrEqual),
            BinOp::Gt => cmp(self, FloatCC::GreaterThan),
            BinOp::Ge => cmp(self, FloatCC::GreaterThanOrEqual),
            BinOp::And => self.b.ins().band(x, y),
            BinOp::Or => self.b.ins().bor(x, y),
            BinOp::Pow | BinOp::Rem => unreachable!("calls handled above"),
        }
    }

    fn accumulate(&mut self, acc: &Acc, x: Value, vector: bool, part: usize) {
        let scalar_var = *acc.vars.last().expect("scalar accumulator");
        if acc.zeros {
            let v = if vector { acc.vars[part] } else { scalar_var };
            let a = self.b.use_var(v);
            let s = self.b.ins().fadd(a, x);
            self.b.def_var(v, s);
            return;
        }
        match acc.op {
            ReduceOp::Sum => {
                if !vector {
                    let x = if self.prec == Precision::F32 {
                        self.b.ins().fpromote(types::F64, x)
                    } else {
                        x
                    };
                    let a = self.b.use_var(scalar_var);
                    let s = self.b.ins().fadd(a, x);
                    self.b.def_var(scalar_var, s);
                    return;
                }
                match self.prec {
                    Precision::F64 => {
                        let v = acc.vars[part];
                        let a = self.b.use_var(v);
                        let s = self.b.ins().fadd(a, x);
                        self.b.def_var(v, s);
                    }
                    Precision::F32 => {
                        let lo = self.b.ins().fvpromote_low(x);
                        // Move lanes 2, 3 down, then promote them too.
                        let bytes = self.bitcast(types::I8X16, x);
                        let mask: Vec<u8> = (8..16).chain(8..16).collect();
                        let imm = self.b.func.dfg.immediates.push(ConstantData::from(mask));
                        let hi_bytes = self.b.ins().shuffle(bytes, bytes, imm);
                        let hi = self.bitcast(types::F32X4, hi_bytes);
                        let hi = self.b.ins().fvpromote_low(hi);
                        for (j, h) in [lo, hi].into_iter().enumerate() {
                            let v = acc.vars[part * 2 + j];
                            let a = self.b.use_var(v);
                            let s = self.b.ins().fadd(a, h);
                            self.b.def_var(v, s);
                        }
                    }
                }
            }
            ReduceOp::Max => {
                let v = if vector { acc.vars[part] } else { scalar_var };
                let a = self.b.use_var(v);
                let m = self.b.ins().fmax(a, x);
                self.b.def_var(v, m);
            }
        }
    }

    /// Combines an accumulator's lanes into one f64, in a fixed order.
    fn horizontal(&mut self, acc: &Acc) -> Value {
        let (vecs, scalar) = acc.vars.split_at(acc.vars.len() - 1);
        let lanes = match acc.op {
            ReduceOp::Sum if !acc.zeros => 2,
            _ => self.prec.lanes(),
        };
        let mut total: Option<Value> = None;
        for &v in vecs {
            let x = self.b.use_var(v);
            for lane in 0..lanes as u8 {
                let e = self.b.ins().extractlane(x, lane);
                total = Some(match total {
                    None => e,
                    Some(t) => match acc.op {
                        ReduceOp::Sum => self.b.ins().fadd(t, e),
                        ReduceOp::Max => self.b.ins().fmax(t, e),
                    },
                });
            }
        }
        let s = self.b.use_var(scalar[0]);
        let total = match (total, acc.op) {
            (None, _) => s,
            (Some(t), ReduceOp::Sum) => self.b.ins().fadd(t, s),
            (Some(t), ReduceOp::Max) => self.b.ins().fmax(t, s),
        };
        if (acc.op == ReduceOp::Max || acc.zeros) && self.prec == Precision::F32 {
            self.b.ins().fpromote(types::F64, total)
        } else {
            total
        }
    }
}

/// The CLIF text of every kernel of a program (for `optc compile --emit clif`).
pub fn clif_text(p: &Program, prec: Precision) -> String {
    clif_text_with(p, prec, &StorageMap::default())
}

/// The CLIF text of every kernel of a program with buffers stored as `storage` says (see
/// [`build_stored`]).
pub fn clif_text_stored(
    p: &Program,
    prec: Precision,
    storage: &StorageMap,
) -> Result<String, StorageError> {
    storage.check(p, prec)?;
    Ok(clif_text_with(p, prec, storage))
}

fn clif_text_with(p: &Program, prec: Precision, storage: &StorageMap) -> String {
    let call_conv = CallConv::SystemV;
    let mut out = String::new();
    let mut index = 0;
    for (vi, v) in p.variants.iter().enumerate() {
        for (si, s) in v.stages.iter().enumerate() {
            for (pi, ph) in s.phases.iter().enumerate() {
                for k in &ph.kernels {
                    let mut imp = print_callee_importer(prec, types::I64, call_conv);
                    let f = build_with(p, k, prec, storage, types::I64, call_conv, &mut imp, index);
                    index += 1;
                    out.push_str(&format!(
                        "; {} step, stage {}, phase {pi}, kernel over {}\n{}\n",
                        if vi == 0 { "first" } else { "later" },
                        p.info.stages[si],
                        p.info.spaces[k.space as usize],
                        f.display()
                    ));
                }
            }
        }
    }
    out
}
