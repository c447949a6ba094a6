//! How buffers are stored, shared by every code generator and the runtime: the [`StorageMap`]
//! (per buffer: the program's precision, bf16 or f16; stores rounded to nearest or
//! stochastically), and the scalar conversions that define the bits every engine must produce.
//!
//! # Conversions
//! - [`widen`]: a 16-bit value as f32, exactly (`half`'s `to_f32`: a signaling NaN comes back
//!   quiet). The kernels' loads compute the same values in integer arithmetic but keep a
//!   signaling NaN's quiet bit as it is; since every store to 16 bits ([`nearest`],
//!   [`stochastic`]) sets it, results stored in 16 bits agree bit for bit either way.
//! - [`nearest`]: to nearest, ties to even; NaN stays NaN with its quiet bit set (`half`'s
//!   `from_f32`).
//! - [`stochastic`]: one of the two 16-bit values around `x`, the upper with probability
//!   proportional to the distance from the lower, from 32 random bits `r`; exact and
//!   non-finite values round as [`nearest`].
//!
//! # Random bits
//! Stochastic rounding of element `E` of buffer `B` at step `t` under key `seed` uses
//! [`rounding_bits`]: output `E % 4` of Philox-4x32-10 ([`philox4x32`]) at counter
//! `(E / 4 low word, E / 4 high word, t, B)` with key `(seed low word, seed high word)`. `E`
//! counts the buffer's elements over all tensors of its space in order, and `B` is the space
//! index for params and the buffer id otherwise ([`key_buffer`]). The same seed gives the same
//! bits whatever the engine, the thread count or the order of work.

use crate::backend::clif::Precision;
use crate::ir::{BufId, BufInfo, BufRole, Node, Program};
use std::collections::BTreeSet;

/// How a buffer's elements are stored. Arithmetic is always in the program's precision; 16-bit
/// storage (f32 programs only) is widened exactly on load and rounded on store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Storage {
    /// The program's precision (`f32` or `f64`).
    #[default]
    Native,
    /// bfloat16 (8 exponent bits, 7 mantissa bits).
    Bf16,
    /// IEEE binary16.
    F16,
}

impl Storage {
    /// Bytes per element for a program of precision `prec`.
    pub fn bytes(self, prec: Precision) -> usize {
        match self {
            Storage::Native => prec.size(),
            Storage::Bf16 | Storage::F16 => 2,
        }
    }
}

/// Where each buffer's elements live and how stores round them.
///
/// Stores into 16-bit buffers round to nearest (ties to even, as `half::bf16::from_f32`), or,
/// with `stochastic`, up or down with probability proportional to the distance, from the 32 bits
/// [`rounding_bits`] gives each element (see the module docs for the key). Kernels that round
/// stochastically need the tensor's first element index `E`, the seed and the step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct StorageMap {
    /// By buffer id; buffers past the end are [`Storage::Native`].
    pub buffers: Vec<Storage>,
    /// Round stores into 16-bit buffers stochastically instead of to nearest.
    pub stochastic: bool,
    /// 16-bit buffers whose stores round to nearest even when `stochastic` (the params that
    /// mirror master weights).
    pub nearest: BTreeSet<BufId>,
}

impl StorageMap {
    /// Mixed precision: params stored as `param`, states as bf16 (`bf16_state`) or in the
    /// program's precision, inputs and outputs in the program's precision.
    pub fn mixed(p: &Program, param: Storage, bf16_state: bool, stochastic: bool) -> StorageMap {
        StorageMap {
            buffers: p
                .info
                .buffers
                .iter()
                .map(|b| match b.role {
                    BufRole::Param => param,
                    BufRole::State if bf16_state => Storage::Bf16,
                    _ => Storage::Native,
                })
                .collect(),
            stochastic,
            nearest: BTreeSet::new(),
        }
    }

    /// [`StorageMap::mixed`] for a program from [`with_master_weights`]: the params (rounded to
    /// nearest) mirror the f32 master weights, which are native like every other buffer but the
    /// bf16 states.
    pub fn mixed_with_masters(
        p: &Program,
        param: Storage,
        bf16_state: bool,
        stochastic: bool,
    ) -> StorageMap {
        let mut map = StorageMap::mixed(p, param, bf16_state, stochastic);
        for (b, bi) in p.info.buffers.iter().enumerate() {
            if bi.name.ends_with(MASTER_SUFFIX) && b >= p.info.spaces.len() {
                map.buffers[b] = Storage::Native;
            }
        }
        map.nearest = (0..p.info.spaces.len() as BufId).collect();
        map
    }

    /// Whether stores into buffer `b` round stochastically.
    pub fn stochastic_at(&self, b: BufId) -> bool {
        self.stochastic && self.of(b) != Storage::Native && !self.nearest.contains(&b)
    }

    /// The storage of buffer `b`.
    pub fn of(&self, b: BufId) -> Storage {
        self.buffers.get(b as usize).copied().unwrap_or_default()
    }
    /// Whether every buffer is stored in the program's precision.
    pub fn is_native(&self) -> bool {
        self.buffers.iter().all(|&s| s == Storage::Native)
    }

    /// Checks that `p`, computed in `prec`, can use this map: 16-bit storage needs f32.
    pub fn check(&self, p: &Program, prec: Precision) -> Result<(), StorageError> {
        if prec == Precision::F32 {
            return Ok(());
        }
        match self
            .buffers
            .iter()
            .enumerate()
            .find(|(_, &s)| s != Storage::Native)
        {
            None => Ok(()),
            Some((b, &st)) => Err(StorageError {
                buffer: p
                    .info
                    .buffers
                    .get(b)
                    .map_or_else(|| format!("#{b}"), |bi| bi.name.clone()),
                storage: st,
            }),
        }
    }
}

/// What [`with_master_weights`] appends to a param's name to name its master weights.
pub const MASTER_SUFFIX: &str = ".master";

/// `p` with master weights: one state buffer `NAME.master` per param space (appended after
/// every other buffer, stored in the program's precision), which the rule reads and updates in
/// place of the param; every store to a param stores the same value to its master too, so the
/// param becomes a mirror the kernels only write (rounded to its storage type). The host fills
/// the masters from the params before the first step (the rule never reads a param itself).
/// Kernels are planned again ([`PLAN`](crate::passes::PLAN)).
pub fn with_master_weights(p: &Program) -> Program {
    let mut q = p.clone();
    let spaces = q.info.spaces.len();
    let first = q.info.buffers.len() as BufId;
    for s in 0..spaces {
        let param = &q.info.buffers[s];
        q.info.buffers.push(BufInfo {
            name: format!("{}{MASTER_SUFFIX}", param.name),
            role: BufRole::State,
            space: param.space,
            axis: false,
        });
    }
    for v in &mut q.variants {
        for st in &mut v.stages {
            st.phases.clear();
        }
    }
    q.rebuild(true, |rb, n| match n {
        Node::Load { buf, gen } if (buf as usize) < spaces => rb.add(Node::Load {
            buf: first + buf,
            gen,
        }),
        n => rb.add(n),
    });
    for v in &mut q.variants {
        for st in &mut v.stages {
            let mut stores = Vec::with_capacity(st.stores.len() + spaces);
            for &(b, n) in &st.stores {
                if (b as usize) < spaces {
                    stores.push((first + b, n));
                }
                stores.push((b, n));
            }
            st.stores = stores;
        }
    }
    crate::passes::run_pipeline(&mut q, &[crate::passes::PLAN], &mut |_, _| {});
    q
}

/// The buffer number `B` of buffer `b` in the rounding key: the space index for params, the
/// buffer id otherwise.
pub fn key_buffer(p: &Program, b: BufId) -> u32 {
    let bi = &p.info.buffers[b as usize];
    if bi.role == BufRole::Param {
        u32::from(bi.space)
    } else {
        u32::from(b)
    }
}

/// The first buffer with 16-bit storage in `storage` that a step of `p` stores and then reads
/// again (in a later phase or stage of the same step), if any. Such a buffer would be read back
/// rounded, where a step computed wholly in f32 and rounded at its end reads the unrounded value;
/// hosts that promise the latter refuse these programs.
pub fn rounded_then_reloaded(p: &Program, storage: &StorageMap) -> Option<BufId> {
    for v in &p.variants {
        let mut stored: BTreeSet<BufId> = BTreeSet::new();
        for st in &v.stages {
            for ph in &st.phases {
                for k in &ph.kernels {
                    for &n in &k.loads {
                        if let Node::Load { buf, .. } = p.graph.node(n) {
                            if stored.contains(&buf) && storage.of(buf) != Storage::Native {
                                return Some(buf);
                            }
                        }
                    }
                }
                for k in &ph.kernels {
                    stored.extend(k.stores.iter().map(|s| s.0));
                }
            }
        }
    }
    None
}

/// A 16-bit storage type asked of a program that computes in f64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("16-bit storage needs f32 arithmetic; buffer `{buffer}` of an f64 program cannot be {storage:?}")]
pub struct StorageError {
    /// The buffer's name.
    pub buffer: String,
    /// What it was asked to be.
    pub storage: Storage,
}

/// Philox-4x32 with 10 rounds (Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2,
/// 3"), as in Random123 and cuRAND: four 32-bit outputs for a 128-bit counter and a 64-bit key.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 * u64::from(c[0]);
        let p1 = M1 * u64::from(c[2]);
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The 32 random bits stochastic rounding uses for one element: output `element % 4` of Philox
/// at counter (element / 4 as two words, step, buffer) under key `seed`. The step counter
/// holds the low 32 bits of `step`.
pub fn rounding_bits(seed: u64, step: u64, buffer: u32, element: u64) -> u32 {
    rounding_block(seed, step, buffer, element / 4)[(element % 4) as usize]
}

/// The random bits of elements `4 * block .. 4 * block + 4` (one Philox evaluation).
pub fn rounding_block(seed: u64, step: u64, buffer: u32, block: u64) -> [u32; 4] {
    philox4x32(
        [block as u32, (block >> 32) as u32, step as u32, buffer],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// Elements whose random bits [`BitsCache::fill`] computes at a time.
pub const BITS_BLOCK: usize = 64;

/// The random bits of a stochastically rounding Cranelift kernel, one per stored slot on its
/// stack (`optc_compiler::backend::clif`'s module docs give the layout): the bits of
/// [`BITS_BLOCK`] consecutive elements, and the last Philox block evaluated, so consecutive
/// fills cost one evaluation per four elements whatever the alignment of their first element.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitsCache {
    /// The bits of the elements asked for by [`BitsCache::fill`].
    pub out: [u32; BITS_BLOCK],
    /// The outputs of Philox block `block`.
    pub words: [u32; 4],
    /// `E / 4` of `words`; `u64::MAX` when empty.
    pub block: u64,
}

impl Default for BitsCache {
    fn default() -> Self {
        BitsCache {
            out: [0; BITS_BLOCK],
            words: [0; 4],
            block: u64::MAX,
        }
    }
}

impl BitsCache {
    /// Sets `out` to the [`rounding_bits`] of elements `e .. e + BITS_BLOCK` of `buffer`: one
    /// Philox evaluation per four elements (one more on a first fill that starts inside a block).
    pub fn fill(&mut self, seed: u64, step: u64, buffer: u32, e: u64) {
        const N: usize = BITS_BLOCK / 4 + 1;
        let first = e / 4;
        let off = (e % 4) as usize;
        let need = if off == 0 { N - 1 } else { N };
        let mut w = [[0u32; 4]; N];
        let from = if off != 0 && self.block == first {
            w[0] = self.words;
            1
        } else {
            0
        };
        for (j, b) in w.iter_mut().enumerate().take(need).skip(from) {
            *b = rounding_block(seed, step, buffer, first.wrapping_add(j as u64));
        }
        for (l, o) in self.out.iter_mut().enumerate() {
            let k = off + l;
            *o = w[k / 4][k % 4];
        }
        self.words = w[need - 1];
        self.block = first + need as u64 - 1;
    }
}

/// The f32 value of a 16-bit value stored as `s` (exact; a signaling NaN comes back quiet).
///
/// # Panics
/// For [`Storage::Native`], which has no 16-bit form.
#[inline]
pub fn widen(s: Storage, h: u16) -> f32 {
    match s {
        Storage::Bf16 => half::bf16::from_bits(h).to_f32(),
        Storage::F16 => half::f16::from_bits(h).to_f32(),
        Storage::Native => panic!("Storage::Native has no 16-bit form"),
    }
}

/// The 16-bit value of type `s` nearest to `x` (ties to even; NaN stays NaN, quiet).
///
/// # Panics
/// For [`Storage::Native`], which has no 16-bit form.
#[inline]
pub fn nearest(s: Storage, x: f32) -> u16 {
    match s {
        Storage::Bf16 => half::bf16::from_f32(x).to_bits(),
        Storage::F16 => half::f16::from_f32(x).to_bits(),
        Storage::Native => panic!("Storage::Native has no 16-bit form"),
    }
}

/// One of the two 16-bit values of type `s` around `x`: the upper with probability proportional
/// to the distance from the lower, drawn from the 32 uniform random bits `r`. Exact values and
/// non-finite ones round as [`nearest`].
///
/// bf16 adds the low 16 bits of `r` below the kept bits of `x` and truncates (the carry happens
/// with probability equal to the dropped fraction of the magnitude); f16 compares `r / 2^32`
/// with the position of `x` between its neighbours, computed in f64.
///
/// # Panics
/// For [`Storage::Native`], which has no 16-bit form.
#[inline]
pub fn stochastic(s: Storage, x: f32, r: u32) -> u16 {
    match s {
        Storage::Bf16 => bf16_stochastic(x, r),
        Storage::F16 => f16_stochastic(x, r),
        Storage::Native => panic!("Storage::Native has no 16-bit form"),
    }
}

fn bf16_stochastic(x: f32, r: u32) -> u16 {
    if !x.is_finite() {
        return nearest(Storage::Bf16, x);
    }
    // Adding 16 random bits below the kept ones carries into them with probability equal to
    // the dropped fraction of the magnitude (sign-magnitude: the same for negative values).
    let bits = x.to_bits();
    let (sum, overflow) = bits.overflowing_add(r & 0xFFFF);
    if overflow || (sum ^ bits) & 0x8000_0000 != 0 {
        return nearest(Storage::Bf16, x);
    }
    (sum >> 16) as u16
}

fn f16_stochastic(x: f32, r: u32) -> u16 {
    use half::f16;
    let a = f16::from_f32(x);
    let af = a.to_f32();
    if !x.is_finite() || af == x || !af.is_finite() {
        return a.to_bits();
    }
    // The neighbour on the other side of x (one unit in the last place, by magnitude).
    let step_away = |h: f16| f16::from_bits(h.to_bits() + 1);
    let step_toward = |h: f16| {
        if h.to_bits() & 0x7FFF == 0 {
            f16::from_bits((h.to_bits() ^ 0x8000) + 1)
        } else {
            f16::from_bits(h.to_bits() - 1)
        }
    };
    let b = if (af < x) == (af >= 0.0) && af != 0.0 {
        step_away(a)
    } else if af == 0.0 {
        f16::from_bits(if x > 0.0 { 1 } else { 0x8001 })
    } else {
        step_toward(a)
    };
    let (lo, hi) = if a.to_f32() < b.to_f32() {
        (a, b)
    } else {
        (b, a)
    };
    let (lof, hif) = (f64::from(lo.to_f32()), f64::from(hi.to_f32()));
    let p = (f64::from(x) - lof) / (hif - lof);
    let u = f64::from(r) / 4_294_967_296.0;
    if u < p {
        hi.to_bits()
    } else {
        lo.to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Philox known answers: tests/mixed.rs (through the runtime's re-export).

    #[test]
    fn rounding_bits_key_the_counter_by_element_step_and_buffer() {
        let (seed, step, buf) = (0x0123_4567_89ab_cdef_u64, 7, 3);
        for e in [0u64, 1, 2, 3, 4, 5, (1 << 32) + 6, u64::MAX] {
            let blk = e / 4;
            let want = philox4x32(
                [blk as u32, (blk >> 32) as u32, step as u32, buf],
                [seed as u32, (seed >> 32) as u32],
            )[(e % 4) as usize];
            assert_eq!(rounding_bits(seed, step, buf, e), want, "element {e}");
        }
    }

    #[test]
    fn the_bits_cache_gives_rounding_bits() {
        let (seed, step, buf) = (99u64, 4u64, 1u32);
        for start in [0u64, 1, 2, 3, 4, 5, 63, 64, 65, (1 << 34) + 3] {
            let mut c = BitsCache::default();
            for g in 0..3 {
                let e = start + (BITS_BLOCK * g) as u64;
                c.fill(seed, step, buf, e);
                for (l, &o) in c.out.iter().enumerate() {
                    let want = rounding_bits(seed, step, buf, e + l as u64);
                    assert_eq!(o, want, "start {start} fill {g} element {l}");
                }
                let last = (e + BITS_BLOCK as u64 - 1) / 4;
                assert_eq!(c.block, last);
                assert_eq!(c.words, rounding_block(seed, step, buf, last));
            }
        }
        assert_eq!(std::mem::size_of::<BitsCache>(), 4 * BITS_BLOCK + 24);
    }

    #[test]
    fn widen_and_nearest_are_half_s() {
        for h in 0..=u16::MAX {
            let b = half::bf16::from_bits(h).to_f32();
            let f = half::f16::from_bits(h).to_f32();
            assert_eq!(widen(Storage::Bf16, h).to_bits(), b.to_bits());
            assert_eq!(widen(Storage::F16, h).to_bits(), f.to_bits());
            // A non-NaN value survives widening and rounding.
            if !b.is_nan() {
                assert_eq!(nearest(Storage::Bf16, b), h);
            }
            if !f.is_nan() {
                assert_eq!(nearest(Storage::F16, f), h);
            }
        }
        for x in [0.0f32, -0.0, 1.0, 65520.0, f32::NAN, -f32::INFINITY, 1e-8] {
            assert_eq!(nearest(Storage::Bf16, x), half::bf16::from_f32(x).to_bits());
            assert_eq!(nearest(Storage::F16, x), half::f16::from_f32(x).to_bits());
        }
    }

    #[test]
    fn stochastic_rounds_to_a_neighbour() {
        for (s, x) in [
            (Storage::Bf16, 1.0f32 + 3.0 / 1024.0),
            (Storage::F16, -0.3337),
        ] {
            let lo = nearest(s, x);
            let mut seen = BTreeSet::new();
            for e in 0..256 {
                let y = stochastic(s, x, rounding_bits(1, 2, 3, e));
                let d = (widen(s, y) - x).abs();
                assert!(
                    d <= (widen(s, lo) - x).abs() * 4.0 + 1e-3,
                    "{s:?} {x}: {y:#x}"
                );
                seen.insert(y);
            }
            assert_eq!(seen.len(), 2, "{s:?} {x}: {seen:?}");
        }
        for s in [Storage::Bf16, Storage::F16] {
            for x in [
                0.0f32,
                -0.0,
                1.0,
                -2.5,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
            ] {
                assert_eq!(stochastic(s, x, u32::MAX), nearest(s, x), "{s:?} {x}");
            }
        }
    }
}
