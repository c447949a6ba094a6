//! CUDA C code generation: one `extern "C" __global__` function per kernel of a program, in one
//! translation unit per element precision, for NVRTC. Pure text: no I/O, no unsafe.
//!
//! # Launch ABI
//!
//! Every kernel has the same fixed parameters, then one argument per per-step scalar it reads:
//!
//! ```text
//! extern "C" __global__ void optc_<first|later>_s<stage>_p<phase>_k<kernel>_<f32|f64>(
//!     const optc_chunk* chunks,  // the launch table: chunks[c] for c in 0..nchunks
//!     unsigned int nchunks,
//!     void* const* ptrs,         // ptrs[tensor * nslots + slot]: base pointer of each buffer slot
//!     const T* tuni,             // tuni[tensor * ntuni + i]: per-tensor uniforms (CudaKernel::tensor_uniforms)
//!     double* partials,          // partials[reduction * nchunks + c]: one partial per reduction and chunk
//!     T a<id>, ...)              // per-step scalar uniforms (CudaKernel::args), booleans as 0/1
//!
//! struct optc_chunk {            // 16 bytes
//!     unsigned long long offset; // first element of the chunk in its tensor
//!     unsigned int tensor;       // tensor index (row of `ptrs` and `tuni`)
//!     unsigned int count;        // elements in the chunk (< 2^32)
//! };
//! ```
//! `T` is the compute type (`float` or `double`). Slots hold each buffer's storage type: the
//! compute type, or with a [`StorageMap`] (f32 programs) `optc_bf16` / `optc_f16`, widened
//! exactly on load and rounded on store. Kernels that round stochastically take
//! `const unsigned long long* tbase, unsigned long long seed, unsigned int step` after
//! `partials` ([`CudaKernel::rounding_key`]).
//! Blocks have [`BLOCK`] threads (the reductions' shape depends on it: launch with exactly that).
//! Block `b` takes chunks `b, b + gridDim.x, ...`; within a chunk, element `e` belongs to thread
//! `(e / LANES) % BLOCK` (`LANES` = 4 for f32, 2 for f64), which visits its elements in
//! increasing order. A chunk whose slot pointers are all aligned to a vector of `LANES` elements
//! (16 bytes; 8 for 16-bit slots) runs vector loads and stores (`float4`, `double2`, four 16-bit
//! values as one 64-bit access), any other chunk scalar ones; the elements a thread visits and
//! the order it visits them in are the same either way, so results do not depend on alignment.
//!
//! Constants are written into the source; per-step scalars (hyperparameters, `t`, scalar state,
//! results of earlier reductions) are kernel arguments and per-tensor values come through `tuni`,
//! so a new step or a new hyperparameter value never recompiles anything.
//!
//! # Reductions
//! Each thread accumulates its elements: sums in `double` (like the Cranelift backend), maxima
//! in the compute type (exact), starting from 0. The block then combines its threads' values in a
//! shared-memory tree of a fixed shape and thread 0 writes one `double` per reduction to
//! `partials[r * nchunks + c]`. The host combines the partials of a reduction in chunk order (one
//! sum per tensor for per-tensor reductions), so results are deterministic: they depend on the
//! chunking the host chose, not on the grid size or on scheduling.
//!
//! # Numerics
//! One C operation per IR operation, with [`crate::ops`]'s meanings (NaN-propagating `min`/`max`,
//! `sign(0) = 0`, floored `%`, `round` half to even through `rint`, `rsqrt` as `1 / sqrt`,
//! `sigmoid` evaluated in double and rounded once). Compile without fast math and with
//! [`NVRTC_OPTIONS`] (`--fmad=false`: no contraction of `a * b + c`, as on the CPU).

use super::clif::{abi, Precision};
use crate::ir::{BinOp, BufId, Kernel, Kind, Node, NodeId, Program, ReduceOp, SpaceId, Ty, UnOp};
use crate::print::node_text;
use crate::random::Dist;
pub use crate::storage::{rounded_then_reloaded, Storage, StorageError, StorageMap};
use std::collections::BTreeSet;
use std::fmt::Write;

/// Threads per block. The reduction tree has this shape, so launches must use exactly this.
pub const BLOCK: u32 = 256;

/// Size in bytes of one launch-table entry (`optc_chunk`).
pub const CHUNK_ENTRY_BYTES: usize = 16;

/// NVRTC options the generated source is meant to be compiled with (IEEE division and square
/// root, no flush to zero, no fused multiply-add), besides the architecture.
pub const NVRTC_OPTIONS: &[&str] = &[
    "--std=c++17",
    "--fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
];

/// The C type of an element stored as `s` in a program of precision `prec`.
fn c_type(s: Storage, prec: Precision) -> &'static str {
    match (s, prec) {
        (Storage::Native, Precision::F32) => "float",
        (Storage::Native, Precision::F64) => "double",
        (Storage::Bf16, _) => "optc_bf16",
        (Storage::F16, _) => "optc_f16",
    }
}

/// How a kernel is launched: everything a host needs besides the source.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaKernel {
    /// The `extern "C"` function name.
    pub name: String,
    /// 0: first step, 1: later steps.
    pub variant: usize,
    /// Stage index.
    pub stage: usize,
    /// Phase index within the stage.
    pub phase: usize,
    /// Kernel index within the phase.
    pub kernel: usize,
    /// The space it iterates over.
    pub space: SpaceId,
    /// Buffers in slot order: row `tensor` of `ptrs` holds their base pointers for that tensor.
    pub slots: Vec<BufId>,
    /// The slots the kernel writes (the others are only read).
    pub stored: Vec<BufId>,
    /// Per-step scalar uniforms, passed as kernel arguments after the fixed ones, in this order.
    pub args: Vec<NodeId>,
    /// Per-tensor uniforms: row `tensor` of `tuni`, in this order.
    pub tensor_uniforms: Vec<NodeId>,
    /// Reduce nodes: row `r` of `partials` (one partial per chunk).
    pub reductions: Vec<NodeId>,
    /// The kernel rounds stores stochastically ([`StorageMap::stochastic`]): after `partials` it
    /// takes `const unsigned long long* tbase` (per tensor, the index in its buffers of the
    /// tensor's first element: the sum of the lengths of the tensors before it),
    /// `unsigned long long seed` and `unsigned int step` (the step `t`), then its arguments.
    pub rounding_key: bool,
}

/// The CUDA source of a program for one precision, and how to launch each of its kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaModule {
    /// Element precision of the buffers.
    pub precision: Precision,
    /// The CUDA C++ translation unit (every kernel of both variants).
    pub source: String,
    /// Kernels in program order: variant, stage, phase, kernel.
    pub kernels: Vec<CudaKernel>,
}

impl CudaModule {
    /// The kernel of `variant`, `stage`, `phase` and index `kernel`.
    pub fn kernel(
        &self,
        variant: usize,
        stage: usize,
        phase: usize,
        kernel: usize,
    ) -> Option<&CudaKernel> {
        self.kernels.iter().find(|k| {
            k.variant == variant && k.stage == stage && k.phase == phase && k.kernel == kernel
        })
    }
}

/// Element storage and compute types. Loads and stores go through the `optc_ld`/`optc_st`
/// (scalar) and `optc_ldv`/`optc_stv` (vector) helpers, overloaded on the slot's pointer type:
/// [`Dtype::storage_helpers`] for the compute type, `half_helpers` for 16-bit storage.
#[derive(Debug, Clone, Copy)]
struct Dtype {
    prec: Precision,
}

impl Dtype {
    /// The C type elements are stored as.
    fn storage(self) -> &'static str {
        self.compute()
    }
    /// The C type arithmetic happens in (and uniforms are passed as).
    fn compute(self) -> &'static str {
        match self.prec {
            Precision::F32 => "float",
            Precision::F64 => "double",
        }
    }
    /// Elements per 128-bit access.
    fn lanes(self) -> usize {
        self.prec.lanes()
    }
    /// Suffix of the C math functions (`expf` / `exp`).
    fn math(self, f: &str) -> String {
        match self.prec {
            Precision::F32 => format!("{f}f"),
            Precision::F64 => f.to_string(),
        }
    }
    /// A constant of the compute type, exactly (rounded once from f64 like a uniform).
    fn lit(self, v: f64) -> String {
        match self.prec {
            Precision::F32 => {
                let x = v as f32;
                if x.is_finite() {
                    let s = format!("{x:?}f");
                    if x.is_sign_negative() {
                        format!("({s})")
                    } else {
                        s
                    }
                } else {
                    format!("__int_as_float(0x{:08x})", x.to_bits())
                }
            }
            Precision::F64 => {
                if v.is_finite() {
                    let s = format!("{v:?}");
                    if v.is_sign_negative() {
                        format!("({s})")
                    } else {
                        s
                    }
                } else {
                    format!("__longlong_as_double(0x{:016x}LL)", v.to_bits())
                }
            }
        }
    }
    /// The 128-bit vector type.
    fn vector(self) -> &'static str {
        match self.prec {
            Precision::F32 => "float4",
            Precision::F64 => "double2",
        }
    }
    fn storage_helpers(self, out: &mut String) {
        let (s, v) = (self.storage(), self.vector());
        let fields = ["x", "y", "z", "w"];
        let lanes = self.lanes();
        let unpack: Vec<String> = (0..lanes)
            .map(|l| format!("v[{l}] = q.{};", fields[l]))
            .collect();
        let pack: Vec<String> = (0..lanes).map(|l| format!("v[{l}]")).collect();
        let _ = write!(
            out,
            "// Element storage: every load and store of a buffer goes through these four helpers.
static __device__ __forceinline__ {c} optc_ld(const {s}* p, unsigned int i) {{ return p[i]; }}
static __device__ __forceinline__ void optc_st({s}* p, unsigned int i, {c} x) {{ p[i] = x; }}
static __device__ __forceinline__ void optc_ldv(const {s}* p, unsigned int g, {c}* v) {{
    const {v} q = reinterpret_cast<const {v}*>(p)[g];
    {unpack}
}}
static __device__ __forceinline__ void optc_stv({s}* p, unsigned int g, const {c}* v) {{
    reinterpret_cast<{v}*>(p)[g] = make_{v}({pack});
}}
",
            c = self.compute(),
            unpack = unpack.join(" "),
            pack = pack.join(", "),
        );
    }
}

/// The CUDA source of every kernel of a program (for `optc compile --emit cuda`).
pub fn cuda_text(p: &Program, prec: Precision) -> String {
    module(p, prec).source
}

/// Generates the CUDA source of every kernel of a program, with each kernel's launch ABI.
/// Uniforms that do not depend on the tensor are kernel arguments: valid only while every
/// parameter group agrees on them (see [`module_per_tensor`]).
pub fn module(p: &Program, prec: Precision) -> CudaModule {
    module_with(p, prec, false)
}

/// [`module`] with every uniform, including those that do not depend on the tensor, read from
/// the per-tensor table `tuni` (no kernel arguments after the fixed ones): for parameter groups
/// whose hyperparameter values differ, where one launch covers tensors of several groups.
pub fn module_per_tensor(p: &Program, prec: Precision) -> CudaModule {
    module_with(p, prec, true)
}

/// [`module`] (or, with `all_per_tensor`, [`module_per_tensor`]) with buffers stored as
/// `storage` says: 16-bit buffers are widened on load and rounded on store.
pub fn module_stored(
    p: &Program,
    prec: Precision,
    all_per_tensor: bool,
    storage: &StorageMap,
) -> Result<CudaModule, StorageError> {
    storage.check(p, prec)?;
    Ok(module_with_storage(p, prec, all_per_tensor, storage))
}

fn module_with(p: &Program, prec: Precision, all_per_tensor: bool) -> CudaModule {
    module_with_storage(p, prec, all_per_tensor, &StorageMap::default())
}

fn module_with_storage(
    p: &Program,
    prec: Precision,
    all_per_tensor: bool,
    storage: &StorageMap,
) -> CudaModule {
    let d = Dtype { prec };
    let mut src = String::new();
    prelude(&mut src, p, d);
    let used: BTreeSet<Storage> = (0..p.info.buffers.len())
        .map(|b| storage.of(b as BufId))
        .filter(|&s| s != Storage::Native)
        .collect();
    let drawn = p.variants.iter().any(|v| {
        v.stages.iter().any(|s| {
            s.phases.iter().any(|ph| {
                ph.kernels
                    .iter()
                    .any(|k| !super::clif::draws(p, k).is_empty())
            })
        })
    });
    if (!used.is_empty() && storage.stochastic) || drawn {
        random_helpers(&mut src);
    }
    if !used.is_empty() {
        half_helpers(&mut src, &used, storage.stochastic);
    }
    let mut kernels = Vec::new();
    for (vi, v) in p.variants.iter().enumerate() {
        for (si, s) in v.stages.iter().enumerate() {
            for (pi, ph) in s.phases.iter().enumerate() {
                for (ki, k) in ph.kernels.iter().enumerate() {
                    let mut ck = describe(p, k, prec, [vi, si, pi, ki], all_per_tensor);
                    ck.rounding_key = ck.stored.iter().any(|&b| storage.stochastic_at(b))
                        || !super::clif::draws(p, k).is_empty();
                    Gen {
                        p,
                        k,
                        ck: &ck,
                        d,
                        storage,
                    }
                    .kernel(&mut src);
                    kernels.push(ck);
                }
            }
        }
    }
    CudaModule {
        precision: prec,
        source: src,
        kernels,
    }
}

/// Philox-4x32-10 bits of an element (`crate::storage::rounding_bits`), for stochastic rounding
/// and random draws; the draws' transforms (`crate::random::c_source`) and seed keys
/// (`crate::random::seed_key`).
fn random_helpers(out: &mut String) {
    out.push_str(
        "// Philox-4x32-10 (Salmon et al., 2011): the 32 random bits of element e of a buffer.
static __device__ __forceinline__ unsigned int optc_rbits(unsigned long long seed, unsigned int step, unsigned int buf, unsigned long long e) {
    const unsigned long long blk = e >> 2;
    unsigned int c0 = (unsigned int)blk, c1 = (unsigned int)(blk >> 32), c2 = step, c3 = buf;
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const unsigned long long p0 = 0xD2511F53ull * c0;
        const unsigned long long p1 = 0xCD9E8D57ull * c2;
        const unsigned int n0 = (unsigned int)(p1 >> 32) ^ c1 ^ k0;
        const unsigned int n2 = (unsigned int)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0; c1 = (unsigned int)p1; c2 = n2; c3 = (unsigned int)p0;
    }
    const unsigned int l = (unsigned int)(e & 3ull);
    return l == 0 ? c0 : (l == 1 ? c1 : (l == 2 ? c2 : c3));
}
static __device__ __forceinline__ unsigned long long optc_seed_key(float v) {
    return v != v || v <= 0.0f ? 0ull : v >= 18446744073709551616.0f ? 0xffffffffffffffffull : (unsigned long long)v;
}
",
    );
    out.push_str(&crate::random::c_source(
        "static __device__ __forceinline__",
    ));
}

/// Conversions between f32 and the 16-bit storage types `used`, bit for bit as the `half`
/// crate's (`to_f32`, `from_f32`) and the runtime's stochastic rounding, in integer arithmetic
/// (no CUDA headers needed).
fn half_helpers(out: &mut String, used: &BTreeSet<Storage>, stochastic: bool) {
    out.push_str(
        "
// 16-bit storage: widened exactly on load, rounded on store (ties to even, or stochastically).
static __device__ __forceinline__ bool optc_aligned8(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 7ull) == 0; }
static __device__ __forceinline__ bool optc_finite_bits(unsigned int x) { return (x & 0x7f800000u) != 0x7f800000u; }
",
    );
    for st in used {
        let (t, widen, nearest, sr) = match st {
            Storage::Bf16 => (
                "optc_bf16",
                "__int_as_float((int)((unsigned int)h << 16))",
                "optc_f2bf",
                "optc_bf_sr",
            ),
            Storage::F16 => ("optc_f16", "optc_h2f(h)", "optc_f2h", "optc_h_sr"),
            Storage::Native => continue,
        };
        match st {
            Storage::Bf16 => out.push_str(
                "struct optc_bf16 { unsigned short b; };
static __device__ __forceinline__ unsigned short optc_f2bf(float f) {
    const unsigned int x = (unsigned int)__float_as_int(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    return (unsigned short)(((x & 0x8000u) != 0 && (x & 0x17fffu) != 0) ? (x >> 16) + 1u : (x >> 16));
}
static __device__ __forceinline__ unsigned short optc_bf_sr(float f, unsigned int r) {
    const unsigned int x = (unsigned int)__float_as_int(f);
    if (!optc_finite_bits(x)) return optc_f2bf(f);
    const unsigned int s = x + (r & 0xffffu);
    if (s < x || ((s ^ x) & 0x80000000u) != 0) return optc_f2bf(f);
    return (unsigned short)(s >> 16);
}
",
            ),
            Storage::F16 => {
                out.push_str(
                    "struct optc_f16 { unsigned short b; };
static __device__ __forceinline__ float optc_h2f(unsigned short h) {
    const unsigned int s = ((unsigned int)h & 0x8000u) << 16, e = ((unsigned int)h >> 10) & 0x1fu, m = (unsigned int)h & 0x3ffu;
    if (e == 0x1fu) return __int_as_float((int)(s | 0x7f800000u | (m << 13)));
    if (e == 0u) { const float f = (float)m * 5.9604644775390625e-8f; return s != 0u ? -f : f; }
    return __int_as_float((int)(s | ((e + 112u) << 23) | (m << 13)));
}
static __device__ __forceinline__ unsigned short optc_f2h(float f) {
    const unsigned int x = (unsigned int)__float_as_int(f);
    const unsigned int sign = (x >> 16) & 0x8000u, exp = x & 0x7f800000u, man = x & 0x7fffffu;
    if (exp == 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (man != 0u ? 0x200u : 0u) | (man >> 13));
    const int he = (int)(exp >> 23) - 127 + 15;
    if (he >= 0x1f) return (unsigned short)(sign | 0x7c00u);
    if (he <= 0) {
        if (14 - he > 24) return (unsigned short)sign;
        const unsigned int m = man | 0x800000u;
        unsigned int hm = m >> (14 - he);
        const unsigned int rb = 1u << (13 - he);
        if ((m & rb) != 0u && (m & (3u * rb - 1u)) != 0u) hm += 1u;
        return (unsigned short)(sign | hm);
    }
    const unsigned int h = sign | ((unsigned int)he << 10) | (man >> 13);
    return (unsigned short)(((man & 0x1000u) != 0u && (man & 0x2fffu) != 0u) ? h + 1u : h);
}
",
                );
                if stochastic {
                    out.push_str(
                        "static __device__ __forceinline__ unsigned short optc_h_sr(float x, unsigned int r) {
    const unsigned short a = optc_f2h(x);
    const float af = optc_h2f(a);
    if (!optc_finite_bits((unsigned int)__float_as_int(x)) || af == x || !optc_finite_bits((unsigned int)__float_as_int(af))) return a;
    unsigned short b;
    if ((af < x) == (af >= 0.0f) && af != 0.0f) b = (unsigned short)(a + 1u);
    else if (af == 0.0f) b = (unsigned short)(x > 0.0f ? 1u : 0x8001u);
    else b = (unsigned short)((a & 0x7fffu) == 0u ? ((a ^ 0x8000u) + 1u) : (a - 1u));
    const bool a_lo = optc_h2f(a) < optc_h2f(b);
    const unsigned short lo = a_lo ? a : b, hi = a_lo ? b : a;
    const double lof = (double)optc_h2f(lo), hif = (double)optc_h2f(hi);
    const double p = ((double)x - lof) / (hif - lof);
    const double u = (double)r / 4294967296.0;
    return u < p ? hi : lo;
}
",
                    );
                }
            }
            Storage::Native => {}
        }
        let _ = write!(
            out,
            "static __device__ __forceinline__ float optc_ld(const {t}* p, unsigned int i) {{ const unsigned short h = p[i].b; return {widen}; }}
static __device__ __forceinline__ void optc_st({t}* p, unsigned int i, float x) {{ p[i].b = {nearest}(x); }}
static __device__ __forceinline__ void optc_ldv(const {t}* p, unsigned int g, float* v) {{
    const unsigned long long q = reinterpret_cast<const unsigned long long*>(p)[g];
    for (int l = 0; l < 4; ++l) {{ const unsigned short h = (unsigned short)(q >> (16 * l)); v[l] = {widen}; }}
}}
static __device__ __forceinline__ void optc_stv({t}* p, unsigned int g, const float* v) {{
    unsigned long long q = 0;
    for (int l = 0; l < 4; ++l) q |= (unsigned long long){nearest}(v[l]) << (16 * l);
    reinterpret_cast<unsigned long long*>(p)[g] = q;
}}
"
        );
        if stochastic {
            let _ = write!(
                out,
                "static __device__ __forceinline__ void optc_st_sr({t}* p, unsigned int i, float x, unsigned int r) {{ p[i].b = {sr}(x, r); }}
static __device__ __forceinline__ void optc_stv_sr({t}* p, unsigned int g, const float* v, unsigned long long seed, unsigned int step, unsigned int buf, unsigned long long e) {{
    unsigned long long q = 0;
    for (int l = 0; l < 4; ++l) q |= (unsigned long long){sr}(v[l], optc_rbits(seed, step, buf, e + l)) << (16 * l);
    reinterpret_cast<unsigned long long*>(p)[g] = q;
}}
"
            );
        }
    }
}

/// The stable name of a kernel.
pub fn kernel_name(
    variant: usize,
    stage: usize,
    phase: usize,
    kernel: usize,
    p: Precision,
) -> String {
    format!(
        "optc_{}_s{stage}_p{phase}_k{kernel}_{}",
        if variant == 0 { "first" } else { "later" },
        p.suffix()
    )
}

fn describe(
    p: &Program,
    k: &Kernel,
    prec: Precision,
    at: [usize; 4],
    all_per_tensor: bool,
) -> CudaKernel {
    let a = abi(p, k);
    let mut args = Vec::new();
    let mut tensor_uniforms = Vec::new();
    for &u in &k.uniforms {
        match (p.graph.node(u), p.graph.kind(u)) {
            (Node::Const(_) | Node::Bool(_), _) => {}
            (_, Kind::Tensor(_)) => tensor_uniforms.push(u),
            _ if all_per_tensor => tensor_uniforms.push(u),
            _ => args.push(u),
        }
    }
    let stored: BTreeSet<BufId> = k.stores.iter().map(|s| s.0).collect();
    CudaKernel {
        name: kernel_name(at[0], at[1], at[2], at[3], prec),
        variant: at[0],
        stage: at[1],
        phase: at[2],
        kernel: at[3],
        space: k.space,
        slots: a.slots,
        stored: stored.into_iter().collect(),
        args,
        tensor_uniforms,
        reductions: a.reductions,
        rounding_key: false,
    }
}

fn prelude(out: &mut String, p: &Program, d: Dtype) {
    let c = d.compute();
    let _ = write!(
        out,
        "// optc: CUDA kernels of rule `{name}`, {prec} buffers.
// Launch ABI (see optc_compiler::backend::cuda): blocks of OPTC_BLOCK threads take launch-table
// chunks; partials[r * nchunks + c] holds reduction r of chunk c, combined by the host in chunk order.
// Compile with NVRTC: {opts} (no fast math).

#define OPTC_BLOCK {block}
#define OPTC_LANES {lanes}

struct optc_chunk {{
    unsigned long long offset;
    unsigned int tensor;
    unsigned int count;
}};

",
        name = p.info.name,
        prec = d.prec.suffix(),
        opts = NVRTC_OPTIONS.join(" "),
        block = BLOCK,
        lanes = d.lanes(),
    );
    d.storage_helpers(out);
    let nan = match d.prec {
        Precision::F32 => "__int_as_float(0x7fc00000)",
        Precision::F64 => "__longlong_as_double(0x7ff8000000000000LL)",
    };
    let z = d.lit(0.0);
    let one = d.lit(1.0);
    let _ = write!(
        out,
        "
// torch's conventions (optc_compiler::ops): NaN-propagating min and max, sign(0) = 0, floored %.
static __device__ __forceinline__ {c} optc_min({c} a, {c} b) {{ return (a != a || b != b) ? {nan} : (b < a ? b : a); }}
static __device__ __forceinline__ {c} optc_max({c} a, {c} b) {{ return (a != a || b != b) ? {nan} : (b > a ? b : a); }}
static __device__ __forceinline__ {c} optc_sign({c} x) {{ return x > {z} ? {one} : (x < {z} ? -{one} : x * {z}); }}
static __device__ __forceinline__ {c} optc_rem({c} a, {c} b) {{
    const {c} r = {fmod}(a, b);
    return (r != {z} && ((r < {z}) != (b < {z}))) ? r + b : r;
}}
static __device__ __forceinline__ {c} optc_sigmoid({c} x) {{ return ({c})(1.0 / (1.0 + exp(-(double)x))); }}
static __device__ __forceinline__ double optc_maxd(double a, double b) {{ return (a != a || b != b) ? __longlong_as_double(0x7ff8000000000000LL) : (b > a ? b : a); }}
static __device__ __forceinline__ bool optc_aligned(const void* p) {{ return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }}
",
        fmod = d.math("fmod"),
    );
}

struct Gen<'a> {
    p: &'a Program,
    k: &'a Kernel,
    ck: &'a CudaKernel,
    d: Dtype,
    storage: &'a StorageMap,
}

impl Gen<'_> {
    fn slot(&self, buf: BufId) -> usize {
        self.ck
            .slots
            .iter()
            .position(|&b| b == buf)
            .expect("every loaded or stored buffer has a slot")
    }

    /// The storage of slot `i`.
    fn slot_storage(&self, i: usize) -> Storage {
        self.storage.of(self.ck.slots[i])
    }

    /// Whether stores into slot `i` round stochastically.
    fn stochastic(&self, i: usize) -> bool {
        self.ck.rounding_key && self.storage.stochastic_at(self.ck.slots[i])
    }

    /// The buffer number of slot `i` in the rounding key: the space for params, else the id.
    fn key_buffer(&self, i: usize) -> u32 {
        crate::storage::key_buffer(self.p, self.ck.slots[i])
    }

    /// The store of lane value `y{i}` at element `e` (scalar path).
    fn store(&self, i: usize) -> String {
        if self.stochastic(i) {
            format!(
                "optc_st_sr(s{i}, e, y{i}, optc_rbits(seed, step, {}u, eb + e));",
                self.key_buffer(i)
            )
        } else {
            format!("optc_st(s{i}, e, y{i});")
        }
    }

    /// Slots the kernel reads.
    fn loaded(&self) -> Vec<usize> {
        let mut s = BTreeSet::new();
        for &n in &self.k.body {
            if let Node::Load { buf, .. } = self.p.graph.node(n) {
                s.insert(self.slot(buf));
            }
        }
        s.into_iter().collect()
    }

    fn stored(&self) -> Vec<usize> {
        let s: BTreeSet<usize> = self.k.stores.iter().map(|&(b, _)| self.slot(b)).collect();
        s.into_iter().collect()
    }

    fn is_body(&self, n: NodeId) -> bool {
        matches!(self.p.graph.kind(n), Kind::Element(_))
    }

    /// The C type of a value.
    fn ty(&self, n: NodeId) -> &'static str {
        match self.p.graph.ty(n) {
            Ty::Bool => "bool",
            Ty::Num => self.d.compute(),
        }
    }

    /// A node as an operand: a body value, an inline constant, or a uniform.
    fn operand(&self, n: NodeId) -> String {
        if self.is_body(n) {
            return format!("v{}", n.0);
        }
        match self.p.graph.node(n) {
            Node::Const(b) => self.d.lit(f64::from_bits(b)),
            Node::Bool(b) => b.to_string(),
            _ => format!("u{}", n.0),
        }
    }

    /// A node as a number (booleans as 1 and 0).
    fn num(&self, n: NodeId) -> String {
        let o = self.operand(n);
        if self.p.graph.ty(n) == Ty::Bool {
            format!("({o} ? {} : {})", self.d.lit(1.0), self.d.lit(0.0))
        } else {
            o
        }
    }

    /// A node as a condition (numbers are true when nonzero).
    fn cond(&self, n: NodeId) -> String {
        let o = self.operand(n);
        if self.p.graph.ty(n) == Ty::Bool {
            o
        } else {
            format!("({o} != {})", self.d.lit(0.0))
        }
    }

    fn unary(&self, op: UnOp, a: NodeId) -> String {
        if op == UnOp::Not {
            return format!("!{}", self.cond(a));
        }
        let x = self.num(a);
        let m = |f: &str| format!("{}({x})", self.d.math(f));
        match op {
            UnOp::Neg => format!("-{x}"),
            UnOp::Not => unreachable!("handled above"),
            UnOp::Sqrt => m("sqrt"),
            UnOp::Rsqrt => format!("{} / {}", self.d.lit(1.0), m("sqrt")),
            UnOp::Abs => m("fabs"),
            UnOp::Sign => format!("optc_sign({x})"),
            UnOp::Exp => m("exp"),
            UnOp::Log => m("log"),
            UnOp::Log1p => m("log1p"),
            UnOp::Expm1 => m("expm1"),
            UnOp::Sigmoid => format!("optc_sigmoid({x})"),
            UnOp::Tanh => m("tanh"),
            UnOp::Floor => m("floor"),
            UnOp::Ceil => m("ceil"),
            UnOp::Round => m("rint"),
        }
    }

    fn binary(&self, op: BinOp, a: NodeId, b: NodeId) -> String {
        if matches!(op, BinOp::And | BinOp::Or) {
            let o = if op == BinOp::And { "&&" } else { "||" };
            return format!("{} {o} {}", self.cond(a), self.cond(b));
        }
        let both_bool = self.p.graph.ty(a) == Ty::Bool && self.p.graph.ty(b) == Ty::Bool;
        if both_bool && matches!(op, BinOp::Eq | BinOp::Ne) {
            let o = if op == BinOp::Eq { "==" } else { "!=" };
            return format!("{} {o} {}", self.operand(a), self.operand(b));
        }
        let (x, y) = (self.num(a), self.num(b));
        let infix = |o: &str| format!("{x} {o} {y}");
        match op {
            BinOp::Add => infix("+"),
            BinOp::Sub => infix("-"),
            BinOp::Mul => infix("*"),
            BinOp::Div => infix("/"),
            BinOp::Rem => format!("optc_rem({x}, {y})"),
            BinOp::Pow => format!("{}({x}, {y})", self.d.math("pow")),
            BinOp::Min => format!("optc_min({x}, {y})"),
            BinOp::Max => format!("optc_max({x}, {y})"),
            BinOp::Eq => infix("=="),
            BinOp::Ne => infix("!="),
            BinOp::Lt => infix("<"),
            BinOp::Le => infix("<="),
            BinOp::Gt => infix(">"),
            BinOp::Ge => infix(">="),
            BinOp::And | BinOp::Or => unreachable!("handled above"),
        }
    }

    fn reduce_op(&self, r: NodeId) -> ReduceOp {
        match self.p.graph.node(r) {
            Node::Reduce { op, .. } => op,
            _ => ReduceOp::Sum,
        }
    }

    /// Uniforms the element function takes (kernel arguments, then per-tensor values).
    fn uniforms(&self) -> Vec<NodeId> {
        self.ck
            .args
            .iter()
            .chain(&self.ck.tensor_uniforms)
            .copied()
            .collect()
    }

    /// The element function: loaded values in, stored values and accumulators out.
    fn elem_fn(&self, out: &mut String) {
        let c = self.d.compute();
        let mut params: Vec<String> = self
            .uniforms()
            .iter()
            .map(|&u| format!("const {} u{}", self.ty(u), u.0))
            .collect();
        params.extend(self.loaded().iter().map(|s| format!("const {c} x{s}")));
        if self.has_draws() {
            params.push("const unsigned long long de".to_string());
            params.push("const unsigned long long seed".to_string());
            params.push("const unsigned int step".to_string());
        }
        params.extend(self.stored().iter().map(|s| format!("{c}* y{s}")));
        for (i, &r) in self.ck.reductions.iter().enumerate() {
            params.push(match self.reduce_op(r) {
                ReduceOp::Sum => format!("double* r{i}"),
                ReduceOp::Max => format!("{c}* r{i}"),
            });
        }
        let _ = writeln!(
            out,
            "static __device__ __forceinline__ void {}_elem(\n    {})\n{{",
            self.ck.name,
            params.join(",\n    ")
        );
        for &n in &self.k.body {
            let rhs = match self.p.graph.node(n) {
                Node::Load { buf, .. } => format!(
                    "x{};  // {}",
                    self.slot(buf),
                    self.p.info.buffers[buf as usize].name
                ),
                Node::Splat(_, a) => format!("{};", self.operand(a)),
                Node::Random {
                    dist, stream, seed, ..
                } => {
                    let key = match seed {
                        Some(s) => format!("optc_seed_key((float){})", self.operand(s)),
                        None => "seed".to_string(),
                    };
                    let f = match dist {
                        Dist::Uniform => "optc_uniform",
                        Dist::Normal => "optc_normal",
                    };
                    format!(
                        "({c}){f}(optc_rbits({key}, step, {stream}u, de));  // {}",
                        dist.name()
                    )
                }
                Node::Unary(op, a) => format!("{};", self.unary(op, a)),
                Node::Binary(op, a, b) => format!("{};", self.binary(op, a, b)),
                Node::Select(cn, a, b) => {
                    let (x, y) = if self.p.graph.ty(n) == Ty::Bool {
                        (self.cond(a), self.cond(b))
                    } else {
                        (self.num(a), self.num(b))
                    };
                    format!("{} ? {x} : {y};", self.cond(cn))
                }
                other => unreachable!("{other:?} is not a per-element node"),
            };
            let _ = writeln!(out, "    const {} v{} = {rhs}", self.ty(n), n.0);
        }
        for &(buf, v) in &self.k.stores {
            let _ = writeln!(out, "    *y{} = {};", self.slot(buf), self.num(v));
        }
        for &(r, a) in &self.k.reductions {
            let i = self
                .ck
                .reductions
                .iter()
                .position(|&x| x == r)
                .expect("reduction in the kernel's list");
            let x = self.num(a);
            let _ = match self.reduce_op(r) {
                ReduceOp::Sum => writeln!(out, "    *r{i} += (double)({x});"),
                ReduceOp::Max => writeln!(out, "    *r{i} = optc_max(*r{i}, {x});"),
            };
        }
        out.push_str("}\n");
    }

    /// Whether the kernel draws random numbers (its element function then takes the element's
    /// index `de` over the space, the seed and the step).
    fn has_draws(&self) -> bool {
        !super::clif::draws(self.p, self.k).is_empty()
    }

    /// The call of the element function for lane expression `lane` (`[l]` or empty) at the
    /// element whose index over the space is `e`.
    fn call(&self, loaded: &[String], lane: &str, e: &str) -> String {
        let mut args: Vec<String> = self
            .uniforms()
            .iter()
            .map(|u| format!("u{}", u.0))
            .collect();
        args.extend(loaded.iter().cloned());
        if self.has_draws() {
            args.extend([e.to_string(), "seed".to_string(), "step".to_string()]);
        }
        args.extend(self.stored().iter().map(|s| format!("&y{s}{lane}")));
        args.extend((0..self.ck.reductions.len()).map(|i| format!("&r{i}")));
        format!("{}_elem({});", self.ck.name, args.join(", "))
    }

    /// The statements for one element `e` through scalar loads and stores.
    fn scalar_elem(&self, out: &mut String, indent: &str) {
        let c = self.d.compute();
        let stored = self.stored();
        if !stored.is_empty() {
            let ys: Vec<String> = stored.iter().map(|s| format!("y{s}")).collect();
            let _ = writeln!(out, "{indent}{c} {};", ys.join(", "));
        }
        let loaded: Vec<String> = self
            .loaded()
            .iter()
            .map(|s| format!("optc_ld(s{s}, e)"))
            .collect();
        let _ = writeln!(out, "{indent}{}", self.call(&loaded, "", "eb + e"));
        for s in stored {
            let _ = writeln!(out, "{indent}{}", self.store(s));
        }
    }

    fn kernel(&self, out: &mut String) {
        let (p, ck, d) = (self.p, self.ck, self.d);
        let c = d.compute();
        let lanes = d.lanes();
        let _ = writeln!(
            out,
            "\n// {} step, stage {}, phase {}, kernel {} over {}",
            if ck.variant == 0 { "first" } else { "later" },
            p.info.stages[ck.stage],
            ck.phase,
            ck.kernel,
            p.info.spaces[ck.space as usize]
        );
        for (i, &b) in ck.slots.iter().enumerate() {
            let bi = &p.info.buffers[b as usize];
            let _ = writeln!(
                out,
                "//   slot {i}: {} ({})",
                bi.name,
                if ck.stored.contains(&b) {
                    "read-write"
                } else {
                    "read"
                }
            );
        }
        for &u in &ck.args {
            let _ = writeln!(out, "//   argument a{0}: %{0} = {1}", u.0, node_text(p, u));
        }
        for (i, &u) in ck.tensor_uniforms.iter().enumerate() {
            let _ = writeln!(out, "//   tuni[{i}]: %{} = {}", u.0, node_text(p, u));
        }
        for (i, &r) in ck.reductions.iter().enumerate() {
            let _ = writeln!(out, "//   partials row {i}: %{} = {}", r.0, node_text(p, r));
        }
        self.elem_fn(out);

        // Signature.
        let mut params = vec![
            "const optc_chunk* __restrict__ chunks".to_string(),
            "unsigned int nchunks".to_string(),
            "void* const* __restrict__ ptrs".to_string(),
            format!("const {c}* __restrict__ tuni"),
            "double* __restrict__ partials".to_string(),
        ];
        if ck.rounding_key {
            params.push("const unsigned long long* __restrict__ tbase".to_string());
            params.push("unsigned long long seed".to_string());
            params.push("unsigned int step".to_string());
        }
        params.extend(ck.args.iter().map(|u| format!("{c} a{}", u.0)));
        let _ = writeln!(
            out,
            "extern \"C\" __global__ void __launch_bounds__(OPTC_BLOCK) {}(\n    {})\n{{",
            ck.name,
            params.join(",\n    ")
        );
        let nred = ck.reductions.len();
        if nred > 0 {
            // One shared buffer for at most RED_GROUP reductions at a time (48 KiB of static
            // shared memory at most: a rule over many samples or particles has one reduction
            // per copy).
            let rows = nred.min(RED_GROUP);
            let _ = writeln!(out, "    __shared__ double red[{rows} * OPTC_BLOCK];");
        }
        let truth = |u: NodeId, raw: String| {
            if p.graph.ty(u) == Ty::Bool {
                format!("const bool u{} = {raw} != {};", u.0, d.lit(0.0))
            } else {
                format!("const {c} u{} = {raw};", u.0)
            }
        };
        for &u in &ck.args {
            let _ = writeln!(out, "    {}", truth(u, format!("a{}", u.0)));
        }
        let _ = writeln!(
            out,
            "    for (unsigned int c = blockIdx.x; c < nchunks; c += gridDim.x) {{"
        );
        let _ = writeln!(out, "        const optc_chunk ch = chunks[c];");
        let nslots = ck.slots.len();
        let _ = writeln!(
            out,
            "        void* const* bp = ptrs + (unsigned long long)ch.tensor * {nslots};"
        );
        let stored = self.stored();
        for i in 0..nslots {
            let cq = if stored.contains(&i) { "" } else { "const " };
            let st = c_type(self.slot_storage(i), d.prec);
            let _ = writeln!(
                out,
                "        {cq}{st}* __restrict__ s{i} = static_cast<{cq}{st}*>(bp[{i}]) + ch.offset;"
            );
        }
        let ntu = ck.tensor_uniforms.len();
        for (i, &u) in ck.tensor_uniforms.iter().enumerate() {
            let raw = format!("tuni[(unsigned long long)ch.tensor * {ntu} + {i}]");
            let _ = writeln!(out, "        {}", truth(u, raw));
        }
        for (i, &r) in ck.reductions.iter().enumerate() {
            let _ = match self.reduce_op(r) {
                ReduceOp::Sum => writeln!(out, "        double r{i} = 0.0;"),
                ReduceOp::Max => writeln!(out, "        {c} r{i} = {};", d.lit(0.0)),
            };
        }
        if ck.rounding_key {
            let _ = writeln!(
                out,
                "        const unsigned long long eb = tbase[ch.tensor] + ch.offset;"
            );
        }
        let aligned: Vec<String> = (0..nslots)
            .map(|i| match self.slot_storage(i) {
                Storage::Native => format!("optc_aligned(s{i})"),
                _ => format!("optc_aligned8(s{i})"),
            })
            .collect();
        let _ = writeln!(out, "        const unsigned int n = ch.count;");
        let _ = writeln!(out, "        const unsigned int groups = n / OPTC_LANES;");
        let _ = writeln!(
            out,
            "        if ({}) {{",
            if aligned.is_empty() {
                "true".to_string()
            } else {
                aligned.join(" && ")
            }
        );
        // 128-bit path.
        let _ = writeln!(
            out,
            "            for (unsigned int g = threadIdx.x; g < groups; g += OPTC_BLOCK) {{"
        );
        let loaded = self.loaded();
        let mut arrays: Vec<String> = loaded.iter().map(|s| format!("x{s}[{lanes}]")).collect();
        arrays.extend(stored.iter().map(|s| format!("y{s}[{lanes}]")));
        if !arrays.is_empty() {
            let _ = writeln!(out, "                {c} {};", arrays.join(", "));
        }
        for s in &loaded {
            let _ = writeln!(out, "                optc_ldv(s{s}, g, x{s});");
        }
        let _ = writeln!(out, "#pragma unroll");
        let _ = writeln!(
            out,
            "                for (int l = 0; l < OPTC_LANES; ++l) {{"
        );
        let lane_args: Vec<String> = loaded.iter().map(|s| format!("x{s}[l]")).collect();
        let _ = writeln!(
            out,
            "                    {}",
            self.call(
                &lane_args,
                "[l]",
                "eb + (unsigned long long)g * OPTC_LANES + l"
            )
        );
        let _ = writeln!(out, "                }}");
        for &s in &stored {
            if self.stochastic(s) {
                let _ = writeln!(
                    out,
                    "                optc_stv_sr(s{s}, g, y{s}, seed, step, {}u, eb + (unsigned long long)g * OPTC_LANES);",
                    self.key_buffer(s)
                );
            } else {
                let _ = writeln!(out, "                optc_stv(s{s}, g, y{s});");
            }
        }
        let _ = writeln!(out, "            }}");
        let _ = writeln!(out, "        }} else {{");
        // Scalar path, same elements in the same order per thread.
        let _ = writeln!(
            out,
            "            for (unsigned int g = threadIdx.x; g < groups; g += OPTC_BLOCK) {{"
        );
        let _ = writeln!(
            out,
            "                for (unsigned int e = g * OPTC_LANES; e < g * OPTC_LANES + OPTC_LANES; ++e) {{"
        );
        self.scalar_elem(out, "                    ");
        let _ = writeln!(out, "                }}");
        let _ = writeln!(out, "            }}");
        let _ = writeln!(out, "        }}");
        // Tail: the last partial group belongs to thread groups % OPTC_BLOCK.
        let _ = writeln!(out, "        if (threadIdx.x == groups % OPTC_BLOCK) {{");
        let _ = writeln!(
            out,
            "            for (unsigned int e = groups * OPTC_LANES; e < n; ++e) {{"
        );
        self.scalar_elem(out, "                ");
        let _ = writeln!(out, "            }}");
        let _ = writeln!(out, "        }}");
        if nred > 0 {
            let _ = writeln!(out, "        // Block reduction: a tree of a fixed shape.");
            let all: Vec<(usize, NodeId)> = ck.reductions.iter().copied().enumerate().collect();
            for group in all.chunks(RED_GROUP) {
                let base = group[0].0;
                for &(i, _) in group {
                    let _ = writeln!(
                        out,
                        "        red[{} * OPTC_BLOCK + threadIdx.x] = (double)r{i};",
                        i - base
                    );
                }
                let _ = writeln!(out, "        __syncthreads();");
                let _ = writeln!(
                    out,
                    "        for (unsigned int w = OPTC_BLOCK / 2; w > 0; w >>= 1) {{"
                );
                let _ = writeln!(out, "            if (threadIdx.x < w) {{");
                for &(i, r) in group {
                    let (a, b) = (
                        format!("red[{} * OPTC_BLOCK + threadIdx.x]", i - base),
                        format!("red[{} * OPTC_BLOCK + threadIdx.x + w]", i - base),
                    );
                    let _ = match self.reduce_op(r) {
                        ReduceOp::Sum => writeln!(out, "                {a} = {a} + {b};"),
                        ReduceOp::Max => {
                            writeln!(out, "                {a} = optc_maxd({a}, {b});")
                        }
                    };
                }
                let _ = writeln!(out, "            }}");
                let _ = writeln!(out, "            __syncthreads();");
                let _ = writeln!(out, "        }}");
                let _ = writeln!(out, "        if (threadIdx.x == 0) {{");
                for &(i, _) in group {
                    let _ = writeln!(
                        out,
                        "            partials[{i}ull * nchunks + c] = red[{} * OPTC_BLOCK];",
                        i - base
                    );
                }
                let _ = writeln!(out, "        }}");
                let _ = writeln!(out, "        __syncthreads();");
            }
        }
        let _ = writeln!(out, "    }}");
        let _ = writeln!(out, "}}");
    }
}

/// The most reductions a kernel combines in shared memory at once (16 x 256 doubles, 32 KiB).
const RED_GROUP: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn program(src: &str) -> Program {
        let c = crate::compile(src);
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        c.programs.into_iter().next().expect("one rule")
    }

    #[test]
    fn constants_are_exact_c_literals() {
        let f = Dtype {
            prec: Precision::F32,
        };
        assert_eq!(f.lit(1.0), "1.0f");
        assert_eq!(f.lit(0.1), "0.1f");
        assert_eq!(f.lit(-2.5), "(-2.5f)");
        assert_eq!(f.lit(1e-8), "1e-8f");
        assert_eq!(f.lit(f64::INFINITY), "__int_as_float(0x7f800000)");
        let d = Dtype {
            prec: Precision::F64,
        };
        assert_eq!(d.lit(0.1), "0.1");
        assert_eq!(d.lit(-1.0), "(-1.0)");
        assert_eq!(
            d.lit(f64::NEG_INFINITY),
            "__longlong_as_double(0xfff0000000000000LL)"
        );
        // A literal that f32 cannot hold exactly is the f32 the interpreter rounds to.
        assert_eq!(f.lit(1.0 / 3.0), format!("{:?}f", (1.0f64 / 3.0) as f32));
    }

    #[test]
    fn every_operation_has_its_c_form() {
        let p = program(
            "rule every_op(k = 2.0, flag = false) {
                param x
                input g
                state s = 0
                let a = sqrt(abs(g)) + rsqrt(abs(g) + 1) + sign(g) + exp(g) + log(abs(g) + 1)
                let b = log1p(abs(g)) + expm1(g) + sigmoid(g) + tanh(g) + floor(g) + ceil(g) + round(g)
                let c = g % k + abs(g)^k + min(g, x) + max(g, x) - g / k * g
                let d = if (g < x && g <= k) || (g > x && g >= k) || g == 0 || g != x || !flag { a } else { b }
                s = max(s, d)
                x = x - c * d + sum(g) * 0
            }",
        );
        let src = cuda_text(&p, Precision::F32);
        for f in [
            "sqrtf(",
            "1.0f / sqrtf(",
            "fabsf(",
            "optc_sign(",
            "expf(",
            "logf(",
            "log1pf(",
            "expm1f(",
            "optc_sigmoid(",
            "tanhf(",
            "floorf(",
            "ceilf(",
            "rintf(",
            "optc_rem(",
            "powf(",
            "optc_min(",
            "optc_max(",
            " < ",
            " <= ",
            " > ",
            " >= ",
            " == ",
            " != ",
            " && ",
            " || ",
            " ? ",
        ] {
            assert!(src.contains(f), "no `{f}` in\n{src}");
        }
        let src64 = cuda_text(&p, Precision::F64);
        assert!(src64.contains("pow(") && !src64.contains("powf("));
        assert!(src64.contains("double2"));
    }

    #[test]
    fn abi_splits_uniforms_and_names_kernels_stably() {
        let p = program(
            "rule lars_like(lr = 0.1) {
                param w
                input g
                w = w - lr * g / (tensor_norm(g) + 1)
            }",
        );
        let m = module(&p, Precision::F32);
        let names: BTreeSet<&str> = m.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names.len(), m.kernels.len(), "kernel names are unique");
        let later = m
            .kernels
            .iter()
            .filter(|k| k.variant == 1)
            .collect::<Vec<_>>();
        assert_eq!(later.len(), 2, "a per-tensor reduction makes two phases");
        assert_eq!(later[0].name, "optc_later_s0_p0_k0_f32");
        assert_eq!(later[0].reductions.len(), 1);
        assert!(later[0].stored.is_empty());
        // Phase 1 reads the per-tensor norm through tuni and lr as an argument.
        assert_eq!(later[1].tensor_uniforms.len(), 1);
        assert!(later[1]
            .args
            .iter()
            .any(|&u| matches!(p.graph.node(u), Node::Hyper(_))));
        assert!(m.kernel(1, 0, 1, 0).is_some());
        // For parameter groups, every uniform moves into the per-tensor table.
        let all = module_per_tensor(&p, Precision::F32);
        assert_eq!(all.kernels.len(), m.kernels.len());
        for (a, k) in all.kernels.iter().zip(&m.kernels) {
            assert!(a.args.is_empty());
            assert_eq!(
                a.tensor_uniforms.len(),
                k.args.len() + k.tensor_uniforms.len()
            );
        }
        for k in &m.kernels {
            assert!(m
                .source
                .contains(&format!("void __launch_bounds__(OPTC_BLOCK) {}(", k.name)));
        }
    }
}
