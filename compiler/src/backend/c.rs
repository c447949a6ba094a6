//! C code generation for the native CPU engine: one C function per kernel, compiled by the
//! system C compiler into a shared library that the runtime loads. Pure text: no I/O, no unsafe.
//!
//! # ABI
//! Every kernel has the signature and the task records of the Cranelift kernels
//! (`super::clif`'s module docs): `void optc_kernel_N(const optc_task *tasks, uint64_t ntasks)`,
//! `N` counting the kernels of both variants in program order (variant, stage, phase, kernel),
//! with the same [`KernelAbi`] (slots, uniforms, reductions), so one host runs both. The library
//! also exports
//!
//! - `void optc_init(const void *const *fns)`: the functions kernels call but do not define,
//!   in [`CModule::imports`] order (the runtime's Rust functions, the same the Cranelift kernels
//!   call); called once after loading, before any kernel;
//! - `const char optc_module_key[]`: the cache key the host built the library under (appended by
//!   the host, which checks it after loading), and `const uint64_t optc_kernel_count`.
//!
//! # Numbers
//! The same bits as the Cranelift kernels (and, where those are exact, the interpreter): one C
//! operation per IR operation, compiled with [`C_FLAGS`] (`-ffp-contract=off`: no fused
//! multiply-add; no fast math), `min`/`max` NaN-propagating as [`crate::ops`] defines them
//! (written as selects, which vectorize; where Cranelift's `fmin`/`fmax` order -0 below +0,
//! these return the first of two equal zeros, as the interpreter does, so the two CPU engines
//! can differ in the sign of a zero result, never in a value), `round` half to even; f32 `exp`, `log`, `sigmoid` and
//! `tanh` are the Cranelift kernels' inline approximations, operation for operation (so they
//! vectorize too). `log1p`, `expm1`, `pow`, `%`, the f64 transcendental functions and stochastic
//! rounding to f16 call the runtime's Rust functions through [`CModule::imports`]; a loop that
//! calls one is not vectorized.
//!
//! # Loops
//! Each task runs in a `noinline` function whose buffer pointers are restrict-qualified
//! parameters (which compilers trust, unlike restrict locals), so loops vectorize without alias
//! checks. A kernel without reductions is one plain loop over `[start, end)`, which the
//! compiler vectorizes at the machine's width. With reductions, the loop has
//! the Cranelift kernels' shape so sums add up in their order: blocks of `8` (f32) or `4` (f64)
//! elements where element `k` of a block goes to accumulator `k` (sums in f64, maxima in the
//! element type, a guard's `sum(x * 0)` in f32), at most one block of `4` or `2` into the first
//! accumulators, a scalar tail into one more; the task's partial is the accumulators added from
//! the first to the last, then the tail's.
//!
//! # Storage
//! With a [`StorageMap`], 16-bit slots are `uint16_t` arrays, widened and rounded in integer
//! arithmetic exactly as `super::clif` does (bit for bit `crate::storage`'s conversions).
//! Stochastic stores take element `E = base + i`'s bits from Philox-4x32-10 keyed as
//! [`crate::storage::rounding_bits`], computed for [`CHUNK`] elements at a time into a
//! stack array before the chunk's loop.

use super::clif::{abi, draws, reads_key, KernelAbi, MathFn, Precision};
use crate::ir::{BinOp, BufId, Kernel, Kind, Node, NodeId, Program, ReduceOp, Ty, UnOp};
use crate::random::Dist;
use crate::storage::{key_buffer, Storage, StorageError, StorageMap};
use std::fmt::Write;

/// Options the generated source is meant to be compiled with (besides `-shared -fPIC` and the
/// output): IEEE arithmetic without contraction, vector code for the machine it runs on.
pub const C_FLAGS: &[&str] = &[
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-std=gnu11",
];

/// Elements whose random bits a stochastically rounding kernel computes at a time.
pub const CHUNK: usize = 512;

/// Elements a kernel with reductions computes at a time before adding their terms up.
pub const SUPER: usize = 128;

/// A function a kernel calls, imported from the runtime at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Import {
    /// An element function, in the module's precision.
    Math(MathFn),
    /// `fn(x: f32, r: u32) -> u32`: stochastic rounding to f16 (`crate::storage::stochastic`).
    F16Stochastic,
}

/// One kernel of a [`CModule`].
#[derive(Debug, Clone, PartialEq)]
pub struct CKernel {
    /// Its exported symbol (`optc_kernel_N`).
    pub symbol: String,
    /// 0: first step, 1: later steps.
    pub variant: usize,
    /// Stage index.
    pub stage: usize,
    /// Phase index within the stage.
    pub phase: usize,
    /// Kernel index within the phase.
    pub kernel: usize,
    /// Its buffers, uniforms and reductions (as the Cranelift kernel's).
    pub abi: KernelAbi,
    /// The space it iterates over.
    pub space: u16,
    /// Whether it rounds stores stochastically or draws random numbers (reads `base`, `seed`
    /// and `step`).
    pub rounding_key: bool,
}

/// The C source of every kernel of a program.
#[derive(Debug, Clone, PartialEq)]
pub struct CModule {
    /// Element precision.
    pub precision: Precision,
    /// The translation unit (without the `optc_module_key` the host appends).
    pub source: String,
    /// Kernels in program order.
    pub kernels: Vec<CKernel>,
    /// The functions `optc_init` expects, in order.
    pub imports: Vec<Import>,
}

/// The imports of a module of precision `prec`: every math function, then f16 rounding.
pub fn imports() -> Vec<Import> {
    let mut v: Vec<Import> = MathFn::all().into_iter().map(Import::Math).collect();
    v.push(Import::F16Stochastic);
    v
}

/// The C source of every kernel of `p` with buffers stored as `storage` says (16-bit storage
/// needs f32).
pub fn module(p: &Program, prec: Precision, storage: &StorageMap) -> Result<CModule, StorageError> {
    storage.check(p, prec)?;
    let mut src = String::new();
    prelude(&mut src, prec);
    let mut kernels = Vec::new();
    let mut index = 0usize;
    for (vi, v) in p.variants.iter().enumerate() {
        for (si, s) in v.stages.iter().enumerate() {
            for (pi, ph) in s.phases.iter().enumerate() {
                for (ki, k) in ph.kernels.iter().enumerate() {
                    let ck = CKernel {
                        symbol: format!("optc_kernel_{index}"),
                        variant: vi,
                        stage: si,
                        phase: pi,
                        kernel: ki,
                        abi: abi(p, k),
                        space: k.space,
                        rounding_key: reads_key(p, k, storage),
                    };
                    let _ = writeln!(
                        src,
                        "\n/* {} step, stage {}, phase {pi}, kernel {ki} over {} */",
                        if vi == 0 { "first" } else { "later" },
                        p.info.stages[si],
                        p.info.spaces[k.space as usize],
                    );
                    Gen {
                        p,
                        k,
                        ck: &ck,
                        prec,
                        storage,
                    }
                    .kernel(&mut src);
                    kernels.push(ck);
                    index += 1;
                }
            }
        }
    }
    let _ = writeln!(
        src,
        "\nconst uint64_t optc_kernel_count = {};",
        kernels.len()
    );
    Ok(CModule {
        precision: prec,
        source: src,
        kernels,
        imports: imports(),
    })
}

/// An f32 constant as an exact C expression.
fn lit32(v: f64) -> String {
    let x = v as f32;
    if x.is_finite() {
        let s = format!("{x:?}f");
        if x.is_sign_negative() {
            format!("({s})")
        } else {
            s
        }
    } else {
        format!("optc_u2f(0x{:08x}u)", x.to_bits())
    }
}

/// A constant of the compute type.
fn lit(prec: Precision, v: f64) -> String {
    match prec {
        Precision::F32 => lit32(v),
        Precision::F64 => {
            if v.is_finite() {
                let s = format!("{v:?}");
                if v.is_sign_negative() {
                    format!("({s})")
                } else {
                    s
                }
            } else {
                format!("optc_u2d(0x{:016x}ull)", v.to_bits())
            }
        }
    }
}

/// `p(x)` by Horner's rule, coefficients from the highest degree down, one rounding per
/// operation (as `clif`'s `poly`).
fn horner(x: &str, coeffs: &[f64]) -> String {
    let mut s = format!("    float acc = {};\n", lit32(coeffs[0]));
    for &k in &coeffs[1..] {
        let _ = writeln!(s, "    acc = acc * {x} + {};", lit32(k));
    }
    s
}

fn prelude(out: &mut String, prec: Precision) {
    let (t, b) = match prec {
        Precision::F32 => ("float", "int32_t"),
        Precision::F64 => ("double", "int64_t"),
    };
    let _ = write!(
        out,
        "/* optc kernels ({sfx}), generated by optc_compiler::backend::c */
#include <stdint.h>
#include <string.h>
#include <math.h>

typedef struct optc_task {{
    void *const *bufs;
    uint64_t start, end;
    const void *uniforms;
    double *partials;
    uint64_t base, seed, step;
}} optc_task;
_Static_assert(sizeof(optc_task) == 64, \"the Task ABI\");

typedef {t} optc_t;
typedef {b} optc_b;
#define OPTC_INLINE static inline __attribute__((always_inline))

OPTC_INLINE uint32_t optc_f2u(float x) {{ uint32_t u; memcpy(&u, &x, 4); return u; }}
OPTC_INLINE float optc_u2f(uint32_t u) {{ float x; memcpy(&x, &u, 4); return x; }}
OPTC_INLINE double optc_u2d(uint64_t u) {{ double x; memcpy(&x, &u, 8); return x; }}
OPTC_INLINE optc_t optc_min(optc_t a, optc_t b) {{ return (a != a || b != b) ? ({t})NAN : (b < a ? b : a); }}
OPTC_INLINE optc_t optc_max(optc_t a, optc_t b) {{ return (a != a || b != b) ? ({t})NAN : (b > a ? b : a); }}
",
        sfx = prec.suffix(),
    );
    // Imported functions.
    let _ = writeln!(out, "\n/* Imported from the runtime by optc_init. */");
    for (i, f) in imports().into_iter().enumerate() {
        let _ = match f {
            Import::Math(m) => {
                let args = if m.arity() == 1 {
                    "optc_t"
                } else {
                    "optc_t, optc_t"
                };
                writeln!(
                    out,
                    "static optc_t (*{})({args}); /* {i} */",
                    m.symbol(prec)
                )
            }
            Import::F16Stochastic => writeln!(
                out,
                "static uint32_t (*optc_f16_stochastic)(float, uint32_t); /* {i} */"
            ),
        };
    }
    out.push_str("void optc_init(const void *const *fns) {\n");
    for (i, f) in imports().into_iter().enumerate() {
        let name = match f {
            Import::Math(m) => m.symbol(prec),
            Import::F16Stochastic => "optc_f16_stochastic".to_string(),
        };
        let _ = writeln!(out, "    memcpy(&{name}, &fns[{i}], sizeof(void *));");
    }
    out.push_str("}\n");
    if prec == Precision::F32 {
        f32_math(out);
        storage_helpers(out);
    }
    random_helpers(out);
}

/// The Cranelift kernels' inline f32 `exp`, `log`, `sigmoid` and `tanh`, operation for
/// operation (`clif`'s `exp32`, `log32`, `tanh32` and its sigmoid).
fn f32_math(out: &mut String) {
    let c = lit32;
    let _ = write!(
        out,
        "
/* The Cranelift kernels' inline f32 functions, operation for operation. */
OPTC_INLINE float optc_pow2i(int32_t n) {{ return optc_u2f(((uint32_t)n + 127u) << 23); }}
OPTC_INLINE float optc_exp32(float x) {{
    const float lo = {lo}, hi = {hi};
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    const float t = xc * {log2e};
    const float k = t + {magic};
    const float n = k - {magic};
    const int32_t ni = (int32_t)(optc_f2u(k) - 0x4b400000u);
    float r = xc - n * {c1};
    r = r - n * {c2};
    const float z = r * r;
{poly}    float e = acc * z;
    e = e + r;
    e = e + {one};
    const int32_t n1 = ni >> 1;
    const int32_t n2 = (int32_t)((uint32_t)ni - (uint32_t)n1);
    e = e * optc_pow2i(n1);
    return e * optc_pow2i(n2);
}}
",
        lo = c(-104.0),
        hi = c(89.0),
        log2e = c(std::f64::consts::LOG2_E),
        magic = c(12582912.0),
        c1 = c(0.693359375),
        c2 = c(-2.12194440e-4),
        one = c(1.0),
        poly = horner(
            "r",
            &[
                1.9875691500e-4,
                1.3981999507e-3,
                8.3334519073e-3,
                4.1665795894e-2,
                1.6666665459e-1,
                5.0000001201e-1,
            ]
        ),
    );
    let _ = write!(
        out,
        "OPTC_INLINE float optc_log32(float x) {{
    const int32_t is_sub = x < {tiny};
    const float xs = is_sub ? x * {scale} : x;
    const int32_t adj = is_sub ? 23 : 0;
    const uint32_t bits = optc_f2u(xs);
    const int32_t ex = (int32_t)(bits >> 23) - 126 - adj;
    float m = optc_u2f((bits & 0x007fffffu) | 0x3f000000u);
    float e = (float)ex;
    const int32_t small = m < {sqrthf};
    e = e - (small ? {one} : {zero});
    m = small ? m + m : m;
    m = m - {one};
    const float z = m * m;
{poly}    float y = acc * m;
    y = y * z;
    y = y + e * {q1};
    y = y - z * {half};
    float r = m + y;
    r = r + e * {q2};
    r = x == {zero} ? {ninf} : r;
    r = x < {zero} ? {nan} : r;
    r = x == {pinf} ? {pinf} : r;
    return x != x ? x : r;
}}
OPTC_INLINE float optc_tanh32(float x) {{
    const float ax = fabsf(x);
    const float z = x * x;
{tpoly}    const float pz = acc * z;
    const float pzx = pz * x;
    const float small = pzx + x;
    const float e = optc_exp32(ax * {two});
    const float d = e + {one};
    const float q = {two} / d;
    float big = {one} - q;
    big = x < {zero} ? -big : big;
    const float r = ax < {lim} ? small : big;
    return x != x ? x : r;
}}
OPTC_INLINE float optc_sigmoid32(float x) {{
    const float e = optc_exp32(-fabsf(x));
    const float d = {one} + e;
    const float num = x < {zero} ? e : {one};
    return num / d;
}}
",
        tiny = c(f64::from(f32::MIN_POSITIVE)),
        scale = c(8388608.0),
        sqrthf = c(std::f64::consts::FRAC_1_SQRT_2),
        one = c(1.0),
        zero = c(0.0),
        two = c(2.0),
        half = c(0.5),
        q1 = c(-2.12194440e-4),
        q2 = c(0.693359375),
        ninf = c(f64::NEG_INFINITY),
        pinf = c(f64::INFINITY),
        nan = c(f64::NAN),
        lim = c(0.625),
        poly = horner(
            "m",
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
            ]
        ),
        tpoly = horner(
            "z",
            &[
                -5.70498872745e-3,
                2.06390887954e-2,
                -5.37397155531e-2,
                1.33314422036e-1,
                -3.33332819422e-1,
            ]
        ),
    );
}

/// 16-bit conversions, as `clif`'s `widen_bf16`, `widen_f16`, `nearest_bf16`, `nearest_f16`
/// and `stochastic_bf16`; Philox-4x32-10 as `crate::storage::philox4x32`.
fn storage_helpers(out: &mut String) {
    out.push_str(
        "
/* 16-bit storage, in integer arithmetic (as the Cranelift kernels). */
OPTC_INLINE float optc_bf16_widen(uint16_t h) { return optc_u2f((uint32_t)h << 16); }
OPTC_INLINE float optc_f16_widen(uint16_t h16) {
    const uint32_t h = h16;
    const uint32_t a = h & 0x7fffu;
    const uint32_t t = a << 13;
    const uint32_t normal = t + 0x38000000u;
    const uint32_t sub = optc_f2u((float)(int32_t)a * 5.9604644775390625e-8f);
    uint32_t r = (int32_t)a < 0x400 ? sub : normal;
    r = (int32_t)a >= 0x7c00 ? (t | 0x7f800000u) : r;
    return optc_u2f(r | ((h & 0x8000u) << 16));
}
OPTC_INLINE uint16_t optc_bf16_nearest(float f) {
    const uint32_t x = optc_f2u(f);
    const uint32_t hi = x >> 16;
    const uint32_t r = (x + 0x7fffu + (hi & 1u)) >> 16;
    return (uint16_t)(f != f ? (hi | 0x40u) : r);
}
OPTC_INLINE uint16_t optc_f16_nearest(float f) {
    const uint32_t x = optc_f2u(f);
    const uint32_t a = x & 0x7fffffffu;
    const uint32_t m13 = a >> 13;
    uint32_t n = (a + (uint32_t)(0xfff - 0x38000000) + (m13 & 1u)) >> 13;
    n = (int32_t)n < 0x7c00 ? n : 0x7c00u;
    const uint32_t sub = optc_f2u(optc_u2f(a) + 0.5f) - 0x3f000000u;
    uint32_t r = (int32_t)a < 0x38800000 ? sub : n;
    uint32_t infnan = (m13 & 0x3ffu) | 0x7c00u;
    infnan = (int32_t)a > 0x7f800000 ? (infnan | 0x200u) : infnan;
    r = (int32_t)a >= 0x7f800000 ? infnan : r;
    return (uint16_t)(r | ((x >> 16) & 0x8000u));
}
OPTC_INLINE uint16_t optc_bf16_stochastic(float f, uint32_t rb) {
    const uint32_t x = optc_f2u(f);
    const uint32_t s = (x + (rb & 0xffffu)) >> 16;
    return (int32_t)(x & 0x7fffffffu) < 0x7f800000 ? (uint16_t)s : optc_bf16_nearest(f);
}
OPTC_INLINE uint16_t optc_f16_sr(float f, uint32_t rb) { return (uint16_t)optc_f16_stochastic(f, rb); }
",
    );
}

/// Philox-4x32-10 bits for a run of elements (`crate::storage::rounding_bits`), for stochastic
/// rounding and random draws; the draws' transforms (`crate::random::c_source`); the seed key
/// of a draw's seed argument (`crate::random::seed_key`).
fn random_helpers(out: &mut String) {
    out.push_str(
        "
/* The random bits of elements e0 - e0 % 4 .. e0 + n of buffer `buf`, four per Philox-4x32-10
 * evaluation at counter (e / 4, step, buf) under key seed: w[k] is element e0 - e0 % 4 + k. */
static void optc_fill_bits(uint32_t *restrict w, uint64_t seed, uint64_t step, uint32_t buf, uint64_t e0, int64_t n) {
    const uint64_t b0 = e0 >> 2;
    const int64_t nb = ((int64_t)(e0 & 3u) + n + 3) >> 2;
    const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    for (int64_t j = 0; j < nb; j++) {
        const uint64_t blk = b0 + (uint64_t)j;
        uint32_t c0 = (uint32_t)blk, c1 = (uint32_t)(blk >> 32), c2 = (uint32_t)step, c3 = buf;
        uint32_t k0 = key0, k1 = key1;
        for (int round = 0; round < 10; round++) {
            if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
            const uint64_t p0 = 0xD2511F53ull * c0;
            const uint64_t p1 = 0xCD9E8D57ull * c2;
            const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
            const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
            c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;
        }
        w[4 * j] = c0; w[4 * j + 1] = c1; w[4 * j + 2] = c2; w[4 * j + 3] = c3;
    }
}

OPTC_INLINE uint64_t optc_seed_key(float v) {
    return v != v || v <= 0.0f ? 0 : v >= 18446744073709551616.0f ? UINT64_MAX : (uint64_t)v;
}
",
    );
    out.push_str(&crate::random::c_source("OPTC_INLINE"));
}

struct Gen<'a> {
    p: &'a Program,
    k: &'a Kernel,
    ck: &'a CKernel,
    prec: Precision,
    storage: &'a StorageMap,
}

/// How a reduction accumulates.
#[derive(Clone, Copy, PartialEq)]
enum AccKind {
    /// A sum in f64.
    Sum,
    /// A sum of `x * 0` in f32 (every term is ±0 or NaN: exact).
    Zeros,
    /// A maximum in the element type.
    Max,
}

impl Gen<'_> {
    fn t(&self) -> &'static str {
        match self.prec {
            Precision::F32 => "float",
            Precision::F64 => "double",
        }
    }

    fn slot(&self, buf: BufId) -> usize {
        self.ck
            .abi
            .slots
            .iter()
            .position(|&b| b == buf)
            .expect("every loaded or stored buffer has a slot")
    }

    fn is_body(&self, n: NodeId) -> bool {
        matches!(self.p.graph.kind(n), Kind::Element(_))
    }

    fn ty(&self, n: NodeId) -> &'static str {
        match self.p.graph.ty(n) {
            Ty::Bool => "optc_b",
            Ty::Num => "optc_t",
        }
    }

    /// A node as an operand: a body value or a uniform (booleans 0/1 of `optc_b`).
    fn operand(&self, n: NodeId) -> String {
        if self.is_body(n) {
            format!("v{}", n.0)
        } else {
            format!("u{}", n.0)
        }
    }

    /// A node as a number (booleans as 1 and 0).
    fn num(&self, n: NodeId) -> String {
        let o = self.operand(n);
        if self.p.graph.ty(n) == Ty::Bool {
            format!("({o} ? {} : {})", lit(self.prec, 1.0), lit(self.prec, 0.0))
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
            format!("({o} != {})", lit(self.prec, 0.0))
        }
    }

    fn unary(&self, op: UnOp, a: NodeId) -> String {
        if op == UnOp::Not {
            return format!("!{}", self.cond(a));
        }
        let x = self.num(a);
        let f32 = self.prec == Precision::F32;
        let m = |f: &str| {
            if f32 {
                format!("{f}f({x})")
            } else {
                format!("{f}({x})")
            }
        };
        let call = |op: UnOp| format!("{}({x})", MathFn::Unary(op).symbol(self.prec));
        let (one, zero) = (lit(self.prec, 1.0), lit(self.prec, 0.0));
        match op {
            UnOp::Neg => format!("-{x}"),
            UnOp::Not => unreachable!("handled above"),
            UnOp::Sqrt => m("sqrt"),
            UnOp::Rsqrt => format!("{one} / {}", m("sqrt")),
            UnOp::Abs => m("fabs"),
            UnOp::Sign => format!("{x} > {zero} ? {one} : ({x} < {zero} ? -{one} : {x} * {zero})"),
            UnOp::Floor => m("floor"),
            UnOp::Ceil => m("ceil"),
            UnOp::Round => {
                if f32 {
                    format!("__builtin_roundevenf({x})")
                } else {
                    format!("__builtin_roundeven({x})")
                }
            }
            UnOp::Exp if f32 => format!("optc_exp32({x})"),
            UnOp::Log if f32 => format!("optc_log32({x})"),
            UnOp::Sigmoid if f32 => format!("optc_sigmoid32({x})"),
            UnOp::Tanh if f32 => format!("optc_tanh32({x})"),
            UnOp::Exp | UnOp::Log | UnOp::Log1p | UnOp::Expm1 | UnOp::Sigmoid | UnOp::Tanh => {
                call(op)
            }
        }
    }

    fn binary(&self, op: BinOp, a: NodeId, b: NodeId) -> String {
        if matches!(op, BinOp::And | BinOp::Or) {
            let o = if op == BinOp::And { "&" } else { "|" };
            return format!("({}) {o} ({})", self.cond(a), self.cond(b));
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
            BinOp::Rem | BinOp::Pow => {
                format!("{}({x}, {y})", MathFn::Binary(op).symbol(self.prec))
            }
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

    fn acc_kind(&self, r: NodeId) -> AccKind {
        let Node::Reduce { op, arg, .. } = self.p.graph.node(r) else {
            unreachable!("reductions lists reduce nodes");
        };
        let g = &self.p.graph;
        match op {
            ReduceOp::Max => AccKind::Max,
            ReduceOp::Sum
                if self.prec == Precision::F32
                    && matches!(g.node(arg), Node::Binary(BinOp::Mul, a, b)
                        if g.is_num(a, 0.0) || g.is_num(b, 0.0)) =>
            {
                AccKind::Zeros
            }
            ReduceOp::Sum => AccKind::Sum,
        }
    }

    /// The statement adding term `x` of reduction `r` into accumulator `target`.
    fn accumulate(&self, r: NodeId, target: &str, x: &str) -> String {
        match self.acc_kind(r) {
            AccKind::Sum => format!("{target} += (double){x};"),
            AccKind::Zeros => format!("{target} += {x};"),
            AccKind::Max => format!("{target} = optc_max({target}, {x});"),
        }
    }

    fn stochastic(&self, buf: BufId) -> bool {
        self.ck.rounding_key && self.storage.stochastic_at(buf)
    }

    /// A draw's value at element index `ix` of the current chunk (starting at `c0`).
    fn draw(&self, n: NodeId, ix: &str) -> String {
        if self.prec == Precision::F32 {
            format!("d{}[{ix} - c0]", n.0)
        } else {
            format!("(double)d{}[{ix} - c0]", n.0)
        }
    }

    /// The statements of one element at index expression `ix`; each reduction's value goes
    /// into accumulator `acc(ri)`, or, with `terms`, is written to `acc(ri)` (to be added later).
    fn element(
        &self,
        out: &mut String,
        ix: &str,
        acc: &dyn Fn(usize) -> String,
        terms: bool,
        ind: &str,
    ) {
        for &n in &self.k.body {
            let rhs = match self.p.graph.node(n) {
                Node::Load { buf, .. } => {
                    let s = self.slot(buf);
                    match self.storage.of(buf) {
                        Storage::Native => format!("s{s}[{ix}]"),
                        Storage::Bf16 => format!("optc_bf16_widen(s{s}[{ix}])"),
                        Storage::F16 => format!("optc_f16_widen(s{s}[{ix}])"),
                    }
                }
                Node::Splat(_, a) => self.operand(a),
                Node::Random { .. } => self.draw(n, ix),
                Node::Unary(op, a) => self.unary(op, a),
                Node::Binary(op, a, b) => self.binary(op, a, b),
                Node::Select(c, a, b) => {
                    let (x, y) = if self.p.graph.ty(n) == Ty::Bool {
                        (self.cond(a), self.cond(b))
                    } else {
                        (self.num(a), self.num(b))
                    };
                    format!("{} ? {x} : {y}", self.cond(c))
                }
                other => unreachable!("{other:?} is not a per-element node"),
            };
            let _ = writeln!(out, "{ind}const {} v{} = {rhs};", self.ty(n), n.0);
        }
        for (ri, &(r, a)) in self.k.reductions.iter().enumerate() {
            let x = self.num(a);
            let target = acc(ri);
            if terms {
                let _ = writeln!(out, "{ind}{target} = {x};");
                continue;
            }
            let _ = writeln!(out, "{ind}{}", self.accumulate(r, &target, &x));
        }
        for &(buf, v) in &self.k.stores {
            let s = self.slot(buf);
            let x = self.num(v);
            let rhs = match (self.storage.of(buf), self.stochastic(buf)) {
                (Storage::Native, _) => x,
                (Storage::Bf16, false) => format!("optc_bf16_nearest({x})"),
                (Storage::F16, false) => format!("optc_f16_nearest({x})"),
                (Storage::Bf16, true) => format!("optc_bf16_stochastic({x}, rb{s}[{ix} - c0])"),
                (Storage::F16, true) => format!("optc_f16_sr({x}, rb{s}[{ix} - c0])"),
            };
            let _ = writeln!(out, "{ind}s{s}[{ix}] = {rhs};");
        }
    }

    /// The loops over `[from, to)`.
    fn loops(&self, out: &mut String, from: &str, to: &str, ind: &str) {
        let nred = self.k.reductions.len();
        if nred == 0 {
            let _ = writeln!(out, "{ind}for (int64_t i = {from}; i < {to}; i++) {{");
            self.element(out, "i", &|_| String::new(), false, &format!("{ind}    "));
            let _ = writeln!(out, "{ind}}}");
            return;
        }
        let lanes = self.prec.lanes();
        let block = lanes * super::clif::UNROLL;
        let _ = writeln!(out, "{ind}int64_t i = {from};");
        // Runs of SUPER elements: a plain loop (which vectorizes at the machine's width) writes
        // each element's reduction terms to an array, then the terms are added block by block,
        // element `k` of a block into accumulator `k`: the order of the loops below.
        let _ = writeln!(out, "{ind}for (; i + {SUPER} <= {to}; i += {SUPER}) {{");
        for ri in 0..nred {
            let _ = writeln!(out, "{ind}    {} r{ri}[{SUPER}];", self.t());
        }
        let _ = writeln!(out, "{ind}    for (int k = 0; k < {SUPER}; k++) {{");
        self.element(
            out,
            "i + k",
            &|ri| format!("r{ri}[k]"),
            true,
            &format!("{ind}        "),
        );
        let _ = writeln!(out, "{ind}    }}");
        for (ri, &(r, _)) in self.k.reductions.iter().enumerate() {
            let add = self.accumulate(r, &format!("a{ri}[k]"), &format!("r{ri}[j + k]"));
            let _ = writeln!(
                out,
                "{ind}    for (int j = 0; j < {SUPER}; j += {block}) for (int k = 0; k < {block}; k++) {add}"
            );
        }
        let _ = writeln!(out, "{ind}}}");
        for width in [block, lanes] {
            let _ = writeln!(
                out,
                "{ind}for (; i + {width} <= {to}; i += {width}) {{\n{ind}    for (int k = 0; k < {width}; k++) {{"
            );
            self.element(
                out,
                "i + k",
                &|ri| format!("a{ri}[k]"),
                false,
                &format!("{ind}        "),
            );
            let _ = writeln!(out, "{ind}    }}\n{ind}}}");
        }
        let _ = writeln!(out, "{ind}for (; i < {to}; i++) {{");
        self.element(
            out,
            "i",
            &|ri| format!("a{ri}_s"),
            false,
            &format!("{ind}    "),
        );
        let _ = writeln!(out, "{ind}}}");
    }

    fn kernel(&self, out: &mut String) {
        let ck = self.ck;
        let t = self.t();
        let stored: Vec<BufId> = self.k.stores.iter().map(|s| s.0).collect();
        // One task: its pointers as restrict-qualified parameters (which the compiler trusts,
        // so the loops vectorize without alias checks).
        let mut params = Vec::new();
        let mut args = Vec::new();
        for (i, &b) in ck.abi.slots.iter().enumerate() {
            let ety = match self.storage.of(b) {
                Storage::Native => t,
                _ => "uint16_t",
            };
            let cst = if stored.contains(&b) { "" } else { "const " };
            params.push(format!(
                "{cst}{ety} *restrict s{i} /* {} */",
                self.p.info.buffers[b as usize].name
            ));
            args.push(format!("({cst}{ety} *)t->bufs[{i}]"));
        }
        let _ = writeln!(
            out,
            "static __attribute__((noinline)) void {}_task(const optc_task *restrict t{}{}) {{",
            ck.symbol,
            if params.is_empty() { "" } else { ",\n    " },
            params.join(",\n    ")
        );
        let ind = "    ";
        if !ck.abi.uniforms.is_empty() {
            let _ = writeln!(out, "{ind}const {t} *U = (const {t} *)t->uniforms;");
        }
        for (i, &u) in ck.abi.uniforms.iter().enumerate() {
            if self.p.graph.ty(u) == Ty::Bool {
                let _ = writeln!(
                    out,
                    "{ind}const optc_b u{} = U[{i}] != {};",
                    u.0,
                    lit(self.prec, 0.0)
                );
            } else {
                let _ = writeln!(out, "{ind}const optc_t u{} = U[{i}];", u.0);
            }
        }
        let _ = writeln!(
            out,
            "{ind}const int64_t start = (int64_t)t->start, end = (int64_t)t->end;"
        );
        let block = self.prec.lanes() * super::clif::UNROLL;
        let kinds: Vec<AccKind> = self
            .k
            .reductions
            .iter()
            .map(|&(r, _)| self.acc_kind(r))
            .collect();
        for (ri, &kind) in kinds.iter().enumerate() {
            let at = if kind == AccKind::Sum { "double" } else { t };
            let _ = writeln!(
                out,
                "{ind}{at} a{ri}[{block}] = {{0}};\n{ind}{at} a{ri}_s = 0;"
            );
        }
        if ck.rounding_key {
            let rounded: std::collections::BTreeSet<BufId> = self
                .k
                .stores
                .iter()
                .map(|s| s.0)
                .filter(|&b| self.stochastic(b))
                .collect();
            for &b in &rounded {
                let _ = writeln!(out, "{ind}uint32_t w{}[{}];", self.slot(b), CHUNK + 8);
            }
            let drawn = draws(self.p, self.k);
            for &n in &drawn {
                let _ = writeln!(
                    out,
                    "{ind}uint32_t dw{0}[{1}];\n{ind}float d{0}[{CHUNK}];",
                    n.0,
                    CHUNK + 8
                );
            }
            let _ = writeln!(
                out,
                "{ind}for (int64_t c0 = start; c0 < end;) {{\n{ind}    const int64_t c1 = end - c0 > {CHUNK} ? c0 + {CHUNK} : end;\n{ind}    const uint64_t e0 = t->base + (uint64_t)c0;"
            );
            for &b in &rounded {
                let s = self.slot(b);
                let _ = writeln!(
                    out,
                    "{ind}    optc_fill_bits(w{s}, t->seed, t->step, {}u, e0, c1 - c0);\n{ind}    const uint32_t *restrict rb{s} = w{s} + (e0 & 3u);",
                    key_buffer(self.p, b)
                );
            }
            for &n in &drawn {
                let Node::Random {
                    dist, stream, seed, ..
                } = self.p.graph.node(n)
                else {
                    continue;
                };
                let key = match seed {
                    Some(s) => format!("optc_seed_key((float){})", self.operand(s)),
                    None => "t->seed".to_string(),
                };
                let f = match dist {
                    Dist::Uniform => "optc_uniform",
                    Dist::Normal => "optc_normal",
                };
                let _ = writeln!(
                    out,
                    "{ind}    optc_fill_bits(dw{0}, {key}, t->step, {stream}u, e0, c1 - c0);\n{ind}    for (int64_t j = 0; j < c1 - c0; j++) d{0}[j] = {f}(dw{0}[(e0 & 3u) + j]);",
                    n.0
                );
            }
            let _ = writeln!(out, "{ind}    {{");
            self.loops(out, "c0", "c1", &format!("{ind}        "));
            let _ = writeln!(out, "{ind}    }}\n{ind}    c0 = c1;\n{ind}}}");
        } else {
            self.loops(out, "start", "end", ind);
        }
        for (ri, &kind) in kinds.iter().enumerate() {
            let (at, f) = match kind {
                AccKind::Sum => ("double", None),
                AccKind::Zeros => (t, None),
                AccKind::Max => (t, Some("optc_max")),
            };
            let _ = writeln!(out, "{ind}{{\n{ind}    {at} tot = a{ri}[0];");
            let parts: Vec<String> = (1..block)
                .map(|k| format!("a{ri}[{k}]"))
                .chain([format!("a{ri}_s")])
                .collect();
            for p in parts {
                let _ = match f {
                    None => writeln!(out, "{ind}    tot = tot + {p};"),
                    Some(f) => writeln!(out, "{ind}    tot = {f}(tot, {p});"),
                };
            }
            let _ = writeln!(out, "{ind}    t->partials[{ri}] = (double)tot;\n{ind}}}");
        }
        out.push_str("}\n");
        let _ = writeln!(
            out,
            "void {0}(const optc_task *restrict tasks, uint64_t ntasks) {{\n    for (uint64_t ti = 0; ti < ntasks; ti++) {{\n        const optc_task *t = tasks + ti;\n        {0}_task(t{1}{2});\n    }}\n}}",
            ck.symbol,
            if args.is_empty() { "" } else { ", " },
            args.join(", ")
        );
    }
}

/// The symbol of [`stream_kernel`]'s function.
pub const STREAM_KERNEL: &str = "optc_stream_kernel";

/// A trivial kernel over streams of elements of 4 (f32) or 2 (bf16) bytes, the bandwidth
/// ceiling of an access pattern: per element, `s` is the sum of the `read` streams (`1e-3`
/// without any), each `inplace` stream becomes `0.5 * itself + s` and each `write` stream `s`.
/// One plain loop in the fused kernels' shape (every stream per element), compiled with
/// [`C_FLAGS`]; 16-bit values are widened and truncated in integer arithmetic. A pass that only
/// reads returns the XOR of the bits of its `s` values (an integer reduction, which vectorizes
/// at any width), so that its loads are not dead code; others return 0.
///
/// `uint32_t optc_stream_kernel(void *const *bufs, uint64_t start, uint64_t end)` runs elements
/// `start..end`; `bufs` holds the read, then the in-place, then the written streams.
pub fn stream_kernel(read: &[usize], inplace: &[usize], write: &[usize]) -> String {
    let mut s = String::from(
        "/* optc stream kernel, generated by optc_compiler::backend::c::stream_kernel */
#include <stdint.h>
#include <string.h>
static inline __attribute__((always_inline)) float optc_w16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline __attribute__((always_inline)) uint32_t optc_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
",
    );
    let all: Vec<(char, usize, usize)> = read
        .iter()
        .enumerate()
        .map(|(i, &b)| ('r', i, b))
        .chain(inplace.iter().enumerate().map(|(i, &b)| ('i', i, b)))
        .chain(write.iter().enumerate().map(|(i, &b)| ('w', i, b)))
        .collect();
    let ty = |b: usize| if b == 2 { "uint16_t" } else { "float" };
    let load = |k: char, i: usize, b: usize| {
        if b == 2 {
            format!("optc_w16({k}{i}[e])")
        } else {
            format!("{k}{i}[e]")
        }
    };
    let params: Vec<String> = all
        .iter()
        .map(|&(k, i, b)| format!("{} *restrict {k}{i}", ty(b)))
        .chain(["uint64_t start".into(), "uint64_t end".into()])
        .collect();
    let _ = writeln!(
        s,
        "__attribute__((noinline)) static uint32_t optc_body({}) {{",
        params.join(", ")
    );
    s.push_str("    uint32_t acc = 0;\n    for (uint64_t e = start; e < end; e++) {\n");
    let sum: Vec<String> = all
        .iter()
        .filter(|a| a.0 == 'r')
        .map(|&(k, i, b)| load(k, i, b))
        .collect();
    let _ = writeln!(
        s,
        "        const float s = {};",
        if sum.is_empty() {
            "1e-3f".to_string()
        } else {
            sum.join(" + ")
        }
    );
    for &(k, i, b) in &all {
        let v = match k {
            'i' => format!("0.5f * {} + s", load(k, i, b)),
            'w' => "s".to_string(),
            _ => continue,
        };
        let _ = if b == 2 {
            writeln!(s, "        {k}{i}[e] = (uint16_t)(optc_f2u({v}) >> 16);")
        } else {
            writeln!(s, "        {k}{i}[e] = {v};")
        };
    }
    if inplace.is_empty() && write.is_empty() {
        s.push_str("        acc ^= optc_f2u(s);\n");
    }
    s.push_str("    }\n    return acc;\n}\n");
    let args: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(j, &(_, _, b))| format!("({} *)bufs[{j}]", ty(b)))
        .chain(["start".into(), "end".into()])
        .collect();
    let _ = writeln!(
        s,
        "uint32_t {STREAM_KERNEL}(void *const *bufs, uint64_t start, uint64_t end) {{ return optc_body({}); }}",
        args.join(", ")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_and_imports() {
        assert_eq!(imports().len(), MathFn::all().len() + 1);
        assert_eq!(lit32(-0.5), "(-0.5f)");
        assert_eq!(lit32(f64::INFINITY), "optc_u2f(0x7f800000u)");
    }
}
