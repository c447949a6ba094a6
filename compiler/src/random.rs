//! Random numbers in rules: `uniform()` and `normal()`, the same bits on every engine.
//!
//! # Keying
//! A draw is a pure function of its key: the element `E` of draw stream `S` at step `t` under
//! seed `K` is computed from the 32 bits [`crate::storage::rounding_bits`]`(K, t, S, E)` gives:
//! output `E % 4` of Philox-4x32-10 at counter `(E / 4 low word, E / 4 high word, t low word, S)`
//! with key `(K low word, K high word)`. Nothing depends on the engine, the thread count, the
//! chunking of the work or on which tensors a launch covers.
//! - `E` is the element's index over all tensors of its space in order (per-element draws), the
//!   tensor's index (per-tensor draws), or 0 (one draw per step).
//! - `S` ([`inline_stream`], [`named_stream`]) has its top bit set for a call written in a stage
//!   (its stage and its place among that stage's draws, in source order) and the bit below it for
//!   a declared `random` value (its name), so draws never share bits with stochastic rounding,
//!   whose counters hold a buffer id there. A declared value is the same draw in every stage that
//!   reads it, and in any process that knows the seed and the step.
//! - `K` is the optimizer's seed, or the value of a draw's seed argument ([`seed_key`]).
//!
//! # Values
//! Both distributions are computed in f32 by the exact operations below, so every engine gives
//! the same bits (f64 programs widen the f32 value):
//! - [`uniform`]: `(bits >> 9) * 2^-23 + 2^-24`, one of the 2^23 odd multiples of 2^-24 in
//!   (0, 1), each with probability 2^-23 (mean 1/2; `1 - u` has the same distribution).
//! - [`normal`]: the inverse error function of `x = 2u - 1` by Giles' single-precision
//!   approximation ("Approximating the erfinv function", GPU Computing Gems, 2011), times √2:
//!   `w = -log((1 - x)(1 + x))`, a polynomial in `w - 2.5` for `w < 5` and in `√w - 3` otherwise,
//!   times `x`; `log` is [`log`], a Cephes-style polynomial of mantissa and exponent. Every
//!   operation is one IEEE f32 operation (no fused multiply-add); |normal| ≤ 5.42.

use crate::storage::{rounding_block, BitsCache, BITS_BLOCK};

/// A distribution of draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dist {
    /// `uniform()`: uniform on (0, 1).
    Uniform,
    /// `normal()`: standard normal.
    Normal,
}

impl Dist {
    /// The function's name in rules.
    pub fn name(self) -> &'static str {
        match self {
            Dist::Uniform => "uniform",
            Dist::Normal => "normal",
        }
    }
    /// The code the kernels' helpers take.
    pub fn code(self) -> u32 {
        match self {
            Dist::Uniform => 0,
            Dist::Normal => 1,
        }
    }
    /// The distribution with code `c` ([`Dist::code`]); other codes are normal.
    pub fn from_code(c: u32) -> Dist {
        if c == 0 {
            Dist::Uniform
        } else {
            Dist::Normal
        }
    }
    /// The distribution a function name draws from.
    pub fn from_name(name: &str) -> Option<Dist> {
        match name {
            "uniform" => Some(Dist::Uniform),
            "normal" => Some(Dist::Normal),
            _ => None,
        }
    }
    /// The value of the draw with random bits `bits`.
    pub fn value(self, bits: u32) -> f32 {
        match self {
            Dist::Uniform => uniform(bits),
            Dist::Normal => normal(bits),
        }
    }
}

/// The most draws one stage may write (calls of `uniform`/`normal` in its statements).
pub const MAX_SITES: usize = 1 << 16;
/// The most stages a rule with draws written in stages may have.
pub const MAX_DRAW_STAGES: usize = 1 << 15;

/// The stream of the `site`-th draw written in stage `stage` (both counted from 0).
pub fn inline_stream(stage: u16, site: u16) -> u32 {
    debug_assert!((stage as usize) < MAX_DRAW_STAGES);
    0x8000_0000 | (u32::from(stage) << 16) | u32::from(site)
}

/// The stream of particle `particle`'s copy of a per-particle draw of stream `stream`: FNV-1a of
/// both, 30 bits, bits 30 and 31 set (apart from inline and named streams).
pub fn particle_stream(stream: u32, particle: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in stream
        .to_le_bytes()
        .into_iter()
        .chain(particle.to_le_bytes())
    {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    0xc000_0000 | (h & 0x3fff_ffff)
}

/// The stream of the declared `random NAME`: FNV-1a of the name, 30 bits, bit 30 set.
pub fn named_stream(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    0x4000_0000 | (h & 0x3fff_ffff)
}

/// The seed key of a draw whose seed argument has the value `v`: `v` rounded to f32, then to an
/// integer toward zero, saturating (NaN and negative values give 0), so f32 and f64 programs,
/// and the host, agree. Integers up to 2^24 are distinct keys.
pub fn seed_key(v: f64) -> u64 {
    (v as f32) as u64
}

/// The value drawn for element `element` of stream `stream` at step `step` under seed `seed`.
pub fn draw(dist: Dist, seed: u64, step: u64, stream: u32, element: u64) -> f32 {
    let bits = rounding_block(seed, step, stream, element / 4)[(element % 4) as usize];
    dist.value(bits)
}

/// The uniform value of 32 random bits: `(bits >> 9) * 2^-23 + 2^-24`, in (0, 1).
#[inline]
pub fn uniform(bits: u32) -> f32 {
    ((bits >> 9) as f32) * f32::from_bits(0x3400_0000) + f32::from_bits(0x3380_0000)
}

/// The coefficients of [`log`]'s polynomial `P`, highest degree first (Cephes' `logf`).
#[allow(clippy::excessive_precision)]
const LOG_P: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461_031_0e-1,
    1.167_699_874_0e-1,
    -1.242_014_084_6e-1,
    1.424_932_278_7e-1,
    -1.666_805_766_5e-1,
    2.000_071_476_5e-1,
    -2.499_999_399_3e-1,
    3.333_333_117_4e-1,
];
/// ln 2 in two parts: `LN2_LO + LN2_HI`, `LN2_HI` with few mantissa bits.
#[allow(clippy::excessive_precision)]
const LN2_HI: f32 = 0.693_359_375;
#[allow(clippy::excessive_precision)]
const LN2_LO: f32 = -2.121_944_40e-4;
/// Giles' erfinv polynomials, highest degree first: in `w - 2.5` for `w < 5`, in `sqrt(w) - 3`
/// otherwise.
#[allow(clippy::excessive_precision)]
const ERFINV_LOW: [f32; 9] = [
    2.810_226_36e-8,
    3.432_739_39e-7,
    -3.523_387_7e-6,
    -4.391_506_54e-6,
    2.185_808_7e-4,
    -1.253_725_03e-3,
    -4.177_681_64e-3,
    2.466_407_27e-1,
    1.501_409_41,
];
#[allow(clippy::excessive_precision)]
const ERFINV_HIGH: [f32; 9] = [
    -2.002_142_57e-4,
    1.009_505_58e-4,
    1.349_343_22e-3,
    -3.673_428_44e-3,
    5.739_507_73e-3,
    -7.622_461_3e-3,
    9.438_870_47e-3,
    1.001_674_06,
    2.832_976_82,
];
/// `sqrt(1/2)`, where [`log`] moves the mantissa range.
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `ln(x)` for positive normal f32 `x`, from its exponent and mantissa: `x = m * 2^e` with `m`
/// in [√½, √2), `f = m - 1`, `ln x = f - f²/2 + f³·P(f) + e·ln 2` (ln 2 in two parts), each
/// operation rounded once.
#[inline]
pub fn log(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let f = if m < SQRT_HALF {
        e -= 1;
        m + m - 1.0
    } else {
        m - 1.0
    };
    let z = f * f;
    let mut y = LOG_P[0];
    for c in &LOG_P[1..] {
        y = y * f + c;
    }
    y = y * f * z;
    let ef = e as f32;
    y += LN2_LO * ef;
    y += -0.5 * z;
    let r = f + y;
    r + LN2_HI * ef
}

/// Horner's rule as the kernels write it: `p = c + p * w` for each coefficient after the first.
#[inline]
fn horner(cs: &[f32; 9], w: f32) -> f32 {
    let mut p = cs[0];
    for c in &cs[1..] {
        p = c + p * w;
    }
    p
}

/// The standard normal value of 32 random bits: `√2 · erfinv(2u - 1)` with `u` = [`uniform`].
#[inline]
pub fn normal(bits: u32) -> f32 {
    let x = uniform(bits) * 2.0 - 1.0;
    let w = -log((1.0 - x) * (1.0 + x));
    let p = if w < 5.0 {
        horner(&ERFINV_LOW, w - 2.5)
    } else {
        horner(&ERFINV_HIGH, w.sqrt() - 3.0)
    };
    (p * x) * std::f32::consts::SQRT_2
}

/// Fills `cache.out` with the f32 bits of the draws of elements `e .. e + BITS_BLOCK` of
/// `stream` (the Cranelift kernels' helper; the cache's layout is
/// [`crate::storage::BitsCache`]'s).
pub fn fill(cache: &mut BitsCache, dist: Dist, seed: u64, step: u64, stream: u32, e: u64) {
    cache.fill(seed, step, stream, e);
    for o in cache.out.iter_mut().take(BITS_BLOCK) {
        *o = dist.value(*o).to_bits();
    }
}

/// The C text of [`uniform`], [`log`] and [`normal`] (functions `optc_uniform`, `optc_rlog`,
/// `optc_normal`), for the C and CUDA generators; `qual` goes before each function (`static
/// inline`, `static __device__ __forceinline__`). The operations are those above, in the same
/// order, with every constant printed exactly, so a compiler that does not contract
/// (`-ffp-contract=off`, `--fmad=false`) computes the same bits.
pub fn c_source(qual: &str) -> String {
    // Shortest round-trip decimal: the C compiler reads back the same f32.
    let f = |v: f32| format!("{v:e}f");
    let horner = |var: &str, cs: &[f32; 9], x: &str, ind: &str| {
        let mut s = format!("{ind}float {var} = {};\n", f(cs[0]));
        for c in &cs[1..] {
            s.push_str(&format!("{ind}{var} = {} + {var} * {x};\n", f(*c)));
        }
        s
    };
    let mut lg = format!("    float y = {};\n", f(LOG_P[0]));
    for c in &LOG_P[1..] {
        lg.push_str(&format!("    y = y * f + {};\n", f(*c)));
    }
    format!(
        "{qual} float optc_uniform(unsigned int b) {{\n    return (float)(b >> 9) * {two23} + {two24};\n}}\n\
{qual} float optc_rlog(float x) {{\n    union {{ float f; unsigned int u; }} c;\n    c.f = x;\n    int e = (int)((c.u >> 23) & 0xffu) - 126;\n    c.u = (c.u & 0x007fffffu) | 0x3f000000u;\n    float m = c.f, f;\n    if (m < {sqh}) {{ e -= 1; f = m + m - 1.0f; }} else {{ f = m - 1.0f; }}\n    float z = f * f;\n{lg}    y = y * f * z;\n    float ef = (float)e;\n    y += {l1} * ef;\n    y += -0.5f * z;\n    float r = f + y;\n    return r + {l2} * ef;\n}}\n\
{qual} float optc_normal(unsigned int b) {{\n    float x = optc_uniform(b) * 2.0f - 1.0f;\n    float w = -optc_rlog((1.0f - x) * (1.0f + x));\n    float q;\n    if (w < 5.0f) {{\n        w = w - 2.5f;\n{lo}        q = p;\n    }} else {{\n        w = sqrtf(w) - 3.0f;\n{hi}        q = p;\n    }}\n    return (q * x) * {sqrt2};\n}}\n",
        two23 = f(f32::from_bits(0x3400_0000)),
        two24 = f(f32::from_bits(0x3380_0000)),
        sqh = f(SQRT_HALF),
        l1 = f(LN2_LO),
        l2 = f(LN2_HI),
        sqrt2 = f(std::f32::consts::SQRT_2),
        lo = horner("p", &ERFINV_LOW, "w", "        "),
        hi = horner("p", &ERFINV_HIGH, "w", "        "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_open_and_symmetric() {
        assert_eq!(uniform(0), f32::from_bits(0x3380_0000));
        assert!(uniform(u32::MAX) < 1.0);
        assert_eq!(1.0 - uniform(u32::MAX), uniform(0));
        for b in [0u32, 512, 12345 << 9, u32::MAX] {
            assert_eq!(1.0 - uniform(b), uniform(!b & !0x1ff), "{b}");
        }
    }

    #[test]
    fn log_is_close_to_ln() {
        let mut worst = 0f64;
        for i in 1..200_000u32 {
            let x = i as f32 / 200_000.0;
            let want = (x as f64).ln();
            let got = log(x) as f64;
            let ulp = (x.ln().abs() as f64).max(1e-30) * f32::EPSILON as f64;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst < 4.0, "log is {worst} ulp off");
    }

    #[test]
    fn normal_is_an_odd_function_of_the_uniform() {
        for b in [0u32, 1 << 9, 77 << 20, 1 << 31, u32::MAX] {
            let mirrored = !b & !0x1ff;
            assert_eq!(normal(b), -normal(mirrored), "{b}");
        }
        assert!(normal(u32::MAX).abs() < 5.42);
        assert!(normal(u32::MAX) > 5.0);
    }

    #[test]
    fn streams_are_apart() {
        assert_ne!(inline_stream(0, 0), inline_stream(0, 1));
        assert_ne!(inline_stream(1, 0), inline_stream(0, 0));
        assert!(inline_stream(3, 4) >= 0x8000_0000);
        let n = named_stream("z");
        assert!((0x4000_0000..0x8000_0000).contains(&n));
        assert_ne!(named_stream("z"), named_stream("y"));
        assert_eq!(seed_key(-3.0), 0);
        assert_eq!(seed_key(f64::NAN), 0);
        assert_eq!(seed_key(7.9), 7);
    }
}
