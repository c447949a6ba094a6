//! Mixed precision: parameters (and optionally state) stored in 16-bit floats, arithmetic in f32.
//!
//! [`MixedOptimizer`] wraps an f32 [`Optimizer`] in lending mode. On Cranelift and the CUDA
//! backends its storage policy is fused into the rule's kernels: a [`StorageMap`] keeps params
//! (and, with `bf16_state`, state) in 16 bits; the kernels widen them exactly as they load them
//! and round as they store them, to nearest or stochastically, so a step moves the bytes the
//! 16-bit buffers hold and nothing more. Master weights are one more buffer under the same
//! policy: an f32 state `NAME.master` per param that the rule updates
//! ([`optc_compiler::storage::with_master_weights`]), with the 16-bit params its rounding to
//! nearest, written by the same kernels.
//!
//! Stochastic rounding draws its randomness from Philox-4x32-10 ([`philox4x32`]), a counter-based
//! generator, keyed by the seed and counted by (element, step, buffer): the same seed gives the
//! same bits whatever the engine, the thread count or the order.
//!
//! On the interpreter, for rules that read a 16-bit buffer again after storing it within a step
//! (on the CPU backends), and on request ([`MixedOptimizer::with_separate_passes`]), the
//! conversions are separate passes instead: the 16-bit params are widened, the step runs in f32,
//! and the results are rounded back, with the same bits as the fused kernels where both apply.
//! The f32 working copies of parameters and inputs are kept between steps; those of bf16 state
//! are not. Inputs in 16 bits are widened into f32 copies before the step on every path.

use crate::{DeviceInputs, Error, Inputs, NonFinite, Optimizer, TensorSpec};
pub use half::{bf16, f16};
use optc_compiler::ir::{BufRole, Program};
use optc_compiler::storage::StorageMap;
use optc_compiler::storage::{self as conv, rounding_block as philox_block};
pub use optc_compiler::storage::{philox4x32, rounding_bits};
use rayon::prelude::*;
use safetensors::tensor::{SafeTensors, TensorView};
use std::collections::HashMap;
use std::sync::Arc;

/// A storage type for parameters and state.
pub trait Storage: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    /// Its name.
    const NAME: &'static str;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
    /// The nearest value (ties to even; NaN stays NaN).
    fn nearest(x: f32) -> Self;
    /// One of the two values around `x`, the upper with probability proportional to the distance
    /// from the lower (`r`: 32 uniform random bits). Exact values and non-finite ones are kept.
    fn stochastic(x: f32, r: u32) -> Self;
    /// The data as f32, when it is f32 already (no copy needed).
    fn as_f32(data: &[Self]) -> Option<&[f32]> {
        let _ = data;
        None
    }
    /// How the CUDA kernels store it; `None` for f32.
    fn device() -> Option<optc_compiler::backend::cuda::Storage> {
        None
    }
    /// The data as its bits, when it is a 16-bit type.
    fn bits_mut(data: &mut [Self]) -> Option<&mut [u16]> {
        let _ = data;
        None
    }
}

impl Storage for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn nearest(x: f32) -> Self {
        x
    }
    fn stochastic(x: f32, _: u32) -> Self {
        x
    }
    fn as_f32(data: &[Self]) -> Option<&[f32]> {
        Some(data)
    }
}

impl Storage for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        conv::widen(conv::Storage::Bf16, self.to_bits())
    }
    fn device() -> Option<optc_compiler::backend::cuda::Storage> {
        Some(optc_compiler::backend::cuda::Storage::Bf16)
    }
    fn bits_mut(data: &mut [Self]) -> Option<&mut [u16]> {
        Some(half::slice::HalfFloatSliceExt::reinterpret_cast_mut(data))
    }
    fn nearest(x: f32) -> Self {
        bf16::from_bits(conv::nearest(conv::Storage::Bf16, x))
    }
    fn stochastic(x: f32, r: u32) -> Self {
        bf16::from_bits(conv::stochastic(conv::Storage::Bf16, x, r))
    }
}

impl Storage for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        conv::widen(conv::Storage::F16, self.to_bits())
    }
    fn device() -> Option<optc_compiler::backend::cuda::Storage> {
        Some(optc_compiler::backend::cuda::Storage::F16)
    }
    fn bits_mut(data: &mut [Self]) -> Option<&mut [u16]> {
        Some(half::slice::HalfFloatSliceExt::reinterpret_cast_mut(data))
    }
    fn nearest(x: f32) -> Self {
        f16::from_bits(conv::nearest(conv::Storage::F16, x))
    }
    fn stochastic(x: f32, r: u32) -> Self {
        f16::from_bits(conv::stochastic(conv::Storage::F16, x, r))
    }
}

/// How results are rounded to the storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// To nearest, ties to even.
    #[default]
    Nearest,
    /// Stochastically, reproducibly from this seed (see [`rounding_bits`]).
    Stochastic {
        /// The generator's key.
        seed: u64,
    },
}

/// How a [`MixedOptimizer`] keeps its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MixedOptions {
    /// Keep an f32 copy of every parameter (the rule updates it; the 16-bit parameters are rounded
    /// from it after each step). The copy is made from the parameters at the first step; changes
    /// the host makes to its 16-bit parameters after that are overwritten by the next step.
    pub master_weights: bool,
    /// Keep the rule's state buffers in bf16 between steps.
    pub bf16_state: bool,
    /// How parameters (without master weights) and bf16 state are rounded.
    pub rounding: Rounding,
}

/// A rule over parameters stored as `S` (bf16 or f16), computed in f32.
#[derive(Debug)]
pub struct MixedOptimizer<S: Storage> {
    inner: Optimizer<f32>,
    options: MixedOptions,
    /// The rule's storage is fused into the kernels of the optimizer underneath (its storage
    /// map is set); otherwise conversions are separate passes around an f32 step.
    fused: bool,
    /// Conversions as separate passes even where they could be fused (for comparison).
    separate: bool,
    /// Separate passes: bf16 state buffers between steps, by buffer id.
    state: Vec<(usize, Vec<Vec<bf16>>)>,
    /// f32 working copies of parameters and inputs, kept between steps (no allocation per step).
    pool: Vec<Vec<f32>>,
    _storage: std::marker::PhantomData<S>,
}

/// Elements per parallel conversion task.
const GRAIN: usize = 1 << 15;

/// A vector from the pool with room for `len` elements (the smallest such), or a new one.
fn take(pool: &mut Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let best = (0..pool.len())
        .filter(|&i| pool[i].capacity() >= len)
        .min_by_key(|&i| pool[i].capacity());
    match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::with_capacity(len),
    }
}

fn widen<S: Storage>(src: &[S], dst: &mut Vec<f32>) {
    dst.clear();
    dst.par_extend(src.par_iter().with_min_len(GRAIN).map(|s| s.to_f32()));
}

/// bf16 tensors widened into new f32 ones.
fn widened(kept: &[Vec<bf16>]) -> Vec<Vec<f32>> {
    kept.iter()
        .map(|t| {
            let mut w = Vec::new();
            widen(t, &mut w);
            w
        })
        .collect()
}

/// Rounds `src` into `dst`; `first` is the global element index of `src[0]` in its buffer.
fn round_into<S: Storage>(
    src: &[f32],
    dst: &mut [S],
    rounding: Rounding,
    step: u64,
    buffer: u32,
    first: u64,
) {
    dst.par_chunks_mut(GRAIN)
        .zip(src.par_chunks(GRAIN))
        .enumerate()
        .for_each(|(c, (d, s))| {
            let base = first + (c * GRAIN) as u64;
            match rounding {
                Rounding::Nearest => d.iter_mut().zip(s).for_each(|(d, &s)| *d = S::nearest(s)),
                Rounding::Stochastic { seed } => {
                    // One Philox call per four elements.
                    let mut block = u64::MAX;
                    let mut bits = [0u32; 4];
                    for (i, (d, &s)) in d.iter_mut().zip(s).enumerate() {
                        let e = base + i as u64;
                        if e / 4 != block {
                            block = e / 4;
                            bits = philox_block(seed, step, buffer, block);
                        }
                        *d = S::stochastic(s, bits[(e % 4) as usize]);
                    }
                }
            }
        });
}

impl<S: Storage> MixedOptimizer<S> {
    /// Binds a rule to named tensors stored as `S`, lent by the host at each step. With master
    /// weights the rule runs as [`conv::with_master_weights`] makes it: one more state buffer
    /// `NAME.master` per param, in f32, which the rule updates; the host's params are its
    /// rounding to nearest.
    ///
    /// ```
    /// use half::bf16;
    /// use optc_runtime::mixed::{MixedOptimizer, MixedOptions};
    /// use optc_runtime::{Inputs, TensorSpec};
    /// # let src = "rule sgd(lr = 0.5) { param theta\n input g\n theta = theta - lr * g }";
    /// # let program = std::sync::Arc::new(optc_compiler::compile(src).programs.remove(0));
    /// let opts = MixedOptions { master_weights: true, ..Default::default() };
    /// let mut opt = MixedOptimizer::<bf16>::new(program, vec![vec![TensorSpec::new("w", &[2])]], opts)?;
    /// let mut w = vec![bf16::from_f32(1.0); 2];
    /// let g = vec![bf16::from_f32(0.25); 2];
    /// opt.step_with(&mut [vec![&mut w[..]]], &Inputs::default().tensor("g", vec![&g]))?;
    /// assert_eq!(w[0].to_f32(), 0.875);
    /// # Ok::<(), optc_runtime::Error>(())
    /// ```
    pub fn new(
        program: Arc<Program>,
        tensors: Vec<Vec<TensorSpec>>,
        options: MixedOptions,
    ) -> Result<Self, Error> {
        if program
            .axis_form
            .as_ref()
            .is_some_and(|(a, _)| a.info.axis == Some(optc_compiler::ir::Axis::Samples))
        {
            return Err(Error::Samples(format!(
                "rule `{}` has a sample axis, which 16-bit storage does not support: run it with Optimizer",
                program.info.name
            )));
        }
        let program = if options.master_weights {
            Arc::new(conv::with_master_weights(&program))
        } else {
            program
        };
        let inner = Optimizer::lending(program, tensors)?;
        let backend = inner.backend();
        let mut opt = MixedOptimizer {
            inner,
            options,
            fused: false,
            separate: false,
            state: Vec::new(),
            pool: Vec::new(),
            _storage: std::marker::PhantomData,
        };
        opt.switch(backend)?;
        Ok(opt)
    }

    /// The f32 optimizer underneath: hyperparameters, schedules, groups, backend, steps.
    pub fn inner(&self) -> &Optimizer<f32> {
        &self.inner
    }

    /// The f32 optimizer underneath, to set hyperparameters, schedules and groups.
    pub fn inner_mut(&mut self) -> &mut Optimizer<f32> {
        &mut self.inner
    }

    /// Switches the backend of the optimizer underneath.
    ///
    /// On Cranelift and on [`crate::Backend::Cuda`] (and the emulator) the conversions are fused
    /// into the rule's kernels: parameters (and bf16 state) are stored in 16 bits, widened as
    /// the kernels load them and rounded as they store them, with the same results as the
    /// separate passes of the interpreter (the same rounding, and for stochastic rounding the
    /// same Philox bits). On Cranelift the host's 16-bit params are updated in place; on the GPU
    /// each step uploads them and downloads them after the update. Inputs are read in f32.
    /// Master weights are one more f32 state buffer per param on every backend.
    ///
    /// A rule whose kernels, as specialized for the current hyperparameters, read a parameter
    /// or state buffer again after storing it within one step would read the rounded value
    /// (LAMB, N-HARPG and N-PG-IGT with bf16 state, Adan with bf16 state): on the CPU such a
    /// rule runs its step in f32 with separate conversion passes; on the GPU it is an
    /// [`Error::Policy`] from this call or the step.
    pub fn with_backend(mut self, backend: crate::Backend) -> Result<Self, Error> {
        self.switch(backend)?;
        Ok(self)
    }

    /// Runs the conversions as separate passes around an f32 step even where they could be
    /// fused into the kernels (the CPU mixed precision of earlier versions; for comparisons).
    /// Not on the GPU backends.
    pub fn with_separate_passes(mut self, on: bool) -> Result<Self, Error> {
        let was = self.separate;
        self.separate = on;
        let backend = self.inner.backend();
        if let Err(e) = self.switch(backend) {
            self.separate = was;
            return Err(e);
        }
        Ok(self)
    }

    /// Whether the conversions are fused into the kernels.
    pub fn is_fused(&self) -> bool {
        self.fused
    }

    /// Moves to `backend`, fused or with separate passes (see [`MixedOptimizer::with_backend`]).
    /// On an error nothing changes.
    fn switch(&mut self, backend: crate::Backend) -> Result<(), Error> {
        let seed = match self.options.rounding {
            Rounding::Stochastic { seed } => seed,
            // The rule's draws keep their seed.
            Rounding::Nearest => self.inner.seed(),
        };
        let map = if backend.is_cuda() {
            if self.separate {
                return Err(Error::Policy(
                    "separate conversion passes run on the CPU backends only".into(),
                ));
            }
            Some(self.storage_map()?)
        } else if self.separate || backend == crate::Backend::Interpreter {
            None
        } else {
            self.storage_map()
                .ok()
                .filter(|m| conv::rounded_then_reloaded(self.inner.program(), m).is_none())
        };
        let fused = map.is_some();
        self.inner
            .reconfigure(backend, map.unwrap_or_default(), seed)?;
        if fused && !self.state.is_empty() {
            // bf16 state moves into the optimizer underneath (its engine keeps it in bf16).
            for (b, kept) in std::mem::take(&mut self.state) {
                let wide = widened(&kept);
                self.inner.set_state_buffer(b, wide);
            }
        }
        if !fused && self.options.bf16_state && self.state.is_empty() {
            // Separate passes: bf16 state is kept here (exact: the values are bf16).
            let ids: Vec<usize> = self.inner.state_buffers_mut().map(|(b, _)| b).collect();
            for b in ids {
                if self.is_master(b) {
                    continue;
                }
                let wide = self.inner.take_state_buffer(b);
                let kept = wide
                    .iter()
                    .map(|w| {
                        let mut k = vec![bf16::ZERO; w.len()];
                        round_into(w, &mut k, Rounding::Nearest, 0, 0, 0);
                        k
                    })
                    .collect();
                self.state.push((b, kept));
            }
        }
        self.fused = fused;
        Ok(())
    }

    /// Whether buffer `b` holds master weights.
    fn is_master(&self, b: usize) -> bool {
        let info = &self.inner.program().info;
        self.options.master_weights && b >= info.buffers.len() - info.spaces.len()
    }

    /// The master weights' buffer of param space `space`.
    fn master_buffer(&self, space: usize) -> usize {
        let info = &self.inner.program().info;
        info.buffers.len() - info.spaces.len() + space
    }

    /// How the kernels store the rule's buffers when the conversions are fused (whether they
    /// are or not: [`MixedOptimizer::is_fused`]); an error for f32 params.
    pub fn storage_map(&self) -> Result<StorageMap, Error> {
        let Some(param) = S::device() else {
            return Err(Error::Policy(
                "fused mixed precision needs bf16 or f16 parameters (for f32 use Optimizer)".into(),
            ));
        };
        let (p, bf16_state) = (self.inner.program(), self.options.bf16_state);
        let stochastic = matches!(self.options.rounding, Rounding::Stochastic { .. });
        Ok(if self.options.master_weights {
            StorageMap::mixed_with_masters(p, param, bf16_state, stochastic)
        } else {
            StorageMap::mixed(p, param, bf16_state, stochastic)
        })
    }

    /// The options.
    pub fn options(&self) -> MixedOptions {
        self.options
    }

    /// The master weights, `[space][tensor]`, once the first step created them.
    pub fn master_weights(&self) -> Option<Vec<Vec<Vec<f32>>>> {
        if !self.options.master_weights || self.inner.steps() == 0 {
            return None;
        }
        let info = &self.inner.program().info;
        (0..info.spaces.len())
            .map(|s| {
                let name = &info.buffers[self.master_buffer(s)].name;
                self.inner.buffer(name).map(<[Vec<f32>]>::to_vec)
            })
            .collect()
    }

    /// A state buffer's values (widened to f32 when kept in bf16).
    pub fn state(&self, name: &str) -> Option<Vec<Vec<f32>>> {
        let b = self.inner.program().info.buffer(name)? as usize;
        if let Some((_, kept)) = self.state.iter().find(|(id, _)| *id == b) {
            return Some(
                kept.iter()
                    .map(|t| t.iter().map(|x| x.to_f32()).collect())
                    .collect(),
            );
        }
        self.inner.buffer(name).map(<[Vec<f32>]>::to_vec)
    }

    /// Before the first step with master weights: the masters are the params, widened.
    fn fill_masters(&mut self, params: &[Vec<&mut [S]>]) {
        if !self.options.master_weights || self.inner.steps() > 0 || self.inner.st.next_stage > 0 {
            return;
        }
        for (space, ts) in params.iter().enumerate() {
            let wide = ts
                .iter()
                .map(|t| {
                    let mut w = Vec::new();
                    widen(t, &mut w);
                    w
                })
                .collect();
            let b = self.master_buffer(space);
            self.inner.set_state_buffer(b, wide);
        }
    }

    /// One whole step (every stage) over the host's parameters, updated in place. Inputs may be
    /// f32 or any storage type. On an error nothing changes.
    pub fn step_with<G: Storage>(
        &mut self,
        params: &mut [Vec<&mut [S]>],
        inputs: &Inputs<'_, G>,
    ) -> Result<(), Error> {
        // Widen the inputs (f32 inputs are used in place).
        let mut widened: Vec<(String, Vec<Vec<f32>>)> = Vec::new();
        for (name, ts) in &inputs.tensors {
            if ts.iter().all(|t| G::as_f32(t).is_some()) {
                continue;
            }
            let mut out = Vec::with_capacity(ts.len());
            for t in ts {
                let mut w = take(&mut self.pool, t.len());
                widen(t, &mut w);
                out.push(w);
            }
            widened.push((name.clone(), out));
        }
        let mut f32_inputs = Inputs::<f32> {
            tensors: Default::default(),
            scalars: inputs.scalars.clone(),
            samples: inputs.samples,
        };
        for (name, ts) in &inputs.tensors {
            if let Some(w) = widened.iter().find(|(n, _)| n == name) {
                f32_inputs
                    .tensors
                    .insert(name.clone(), w.1.iter().map(Vec::as_slice).collect());
            } else {
                let direct: Vec<&[f32]> = ts.iter().filter_map(|t| G::as_f32(t)).collect();
                f32_inputs.tensors.insert(name.clone(), direct);
            }
        }
        if self.options.master_weights && self.inner.steps() == 0 {
            // The lengths first: the masters are filled from the params.
            self.inner
                .check_lent(Some(&params[..]), "lend them", "call step")?;
        }
        self.fill_masters(params);
        if self.fused {
            // The kernels read and write the 16-bit params themselves.
            let mut bits: Vec<Vec<&mut [u16]>> = Vec::with_capacity(params.len());
            for ts in params.iter_mut() {
                let mut space = Vec::with_capacity(ts.len());
                for t in ts.iter_mut() {
                    match S::bits_mut(t) {
                        Some(b) => space.push(b),
                        None => {
                            return Err(Error::Policy(
                                "fused mixed precision needs 16-bit parameters".into(),
                            ))
                        }
                    }
                }
                bits.push(space);
            }
            let result = self.inner.step_with_bits(&mut bits, &f32_inputs);
            drop(f32_inputs);
            self.pool.extend(widened.into_iter().flat_map(|(_, ts)| ts));
            return result;
        }
        // Separate passes: the f32 parameters the rule updates are widened copies (with master
        // weights the rule reads its masters and stores the same values to these).
        let mut work: Vec<Vec<Vec<f32>>> = Vec::with_capacity(params.len());
        for ts in params.iter() {
            let mut space = Vec::with_capacity(ts.len());
            for t in ts {
                let mut w = take(&mut self.pool, t.len());
                widen(t, &mut w);
                space.push(w);
            }
            work.push(space);
        }
        // State kept in bf16: widen it into the optimizer for the step.
        for (b, kept) in &self.state {
            let mut wide = Vec::with_capacity(kept.len());
            for t in kept {
                let mut w = Vec::new();
                widen(t, &mut w);
                wide.push(w);
            }
            self.inner.set_state_buffer(*b, wide);
        }
        let steps = self.inner.steps();
        let result = {
            let mut lend: Vec<Vec<&mut [f32]>> = work
                .iter_mut()
                .map(|ts| ts.iter_mut().map(Vec::as_mut_slice).collect())
                .collect();
            self.inner.step_with(&mut lend, &f32_inputs)
        };
        let taken = self.inner.steps() > steps;
        drop(f32_inputs);
        self.pool.extend(widened.into_iter().flat_map(|(_, ts)| ts));
        if let Err(e) = result {
            self.pool.extend(work.into_iter().flatten());
            self.release_state();
            return Err(e);
        }
        let t = self.inner.steps();
        if taken {
            // Params: buffer ids 0.. are the param spaces.
            for (space, (ws, ps)) in work.iter().zip(params.iter_mut()).enumerate() {
                let mut first = 0u64;
                for (w, p) in ws.iter().zip(ps.iter_mut()) {
                    let rounding = if self.options.master_weights {
                        Rounding::Nearest
                    } else {
                        self.options.rounding
                    };
                    round_into(w, p, rounding, t, space as u32, first);
                    first += w.len() as u64;
                }
            }
            // bf16 state: round the new values.
            let rounding = self.options.rounding;
            for (b, kept) in &mut self.state {
                let wide = self.inner.take_state_buffer(*b);
                let mut first = 0u64;
                for (w, k) in wide.iter().zip(kept.iter_mut()) {
                    round_into(w, k, rounding, t, *b as u32, first);
                    first += w.len() as u64;
                }
            }
        }
        self.release_state();
        self.pool.extend(work.into_iter().flatten());
        Ok(())
    }

    /// Frees the widened copies of bf16 state.
    fn release_state(&mut self) {
        for (b, _) in &self.state {
            self.inner.take_state_buffer(*b);
        }
    }

    /// The mixed-precision settings as recorded in checkpoints.
    fn record(&self) -> String {
        let (rounding, seed) = match self.options.rounding {
            Rounding::Nearest => ("nearest", 0),
            Rounding::Stochastic { seed } => ("stochastic", seed),
        };
        serde_json::json!({
            "storage": S::NAME,
            "master_weights": self.options.master_weights,
            "bf16_state": self.options.bf16_state,
            "rounding": rounding,
            "seed": seed.to_string(),
        })
        .to_string()
    }

    /// The checkpoint as bytes: the f32 optimizer's checkpoint (state widened exactly from
    /// bf16; master weights are its `NAME.master` state), and the settings in an `optc.mixed`
    /// record.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>, Error> {
        let ckpt_err = |e: &dyn std::fmt::Display| Error::Checkpoint(e.to_string());
        let base = if self.state.is_empty() {
            self.inner.checkpoint_bytes()?
        } else {
            let mut inner = self.inner.clone();
            for (b, kept) in &self.state {
                inner.set_state_buffer(*b, widened(kept));
            }
            inner.checkpoint_bytes()?
        };
        let st = SafeTensors::deserialize(&base).map_err(|e| ckpt_err(&e))?;
        let (_, header) = SafeTensors::read_metadata(&base).map_err(|e| ckpt_err(&e))?;
        let mut meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        meta.insert("optc.mixed".into(), self.record());
        let mut views: Vec<(String, TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).map(|v| (n, v)))
            .collect::<Result<_, _>>()
            .map_err(|e| ckpt_err(&e))?;
        views.sort_by(|a, b| a.0.cmp(&b.0));
        safetensors::serialize(views, Some(meta)).map_err(|e| ckpt_err(&e))
    }

    /// Writes a checkpoint atomically (see [`Optimizer::save_checkpoint`]).
    pub fn save_checkpoint(&self, path: &std::path::Path) -> Result<(), Error> {
        crate::checkpoint::write_atomic(path, &self.checkpoint_bytes()?, None)
    }

    /// Loads a checkpoint of a mixed-precision optimizer with the same rule, tensors and
    /// settings. Everything is checked first; on any error nothing changes.
    pub fn load_checkpoint(&mut self, path: &std::path::Path) -> Result<(), Error> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Checkpoint(format!("cannot read `{}`: {e}", path.display())))?;
        self.load_checkpoint_bytes(&bytes)
    }

    /// Loads a checkpoint from bytes (see [`MixedOptimizer::load_checkpoint`]).
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let ckpt_err = |e: &dyn std::fmt::Display| Error::Checkpoint(e.to_string());
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| ckpt_err(&format!("not a valid checkpoint: {e}")))?;
        let record = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("optc.mixed"))
            .ok_or_else(|| ckpt_err(&"not a mixed-precision checkpoint: no `optc.mixed` record"))?;
        if *record != self.record() {
            return Err(ckpt_err(&format!(
                "the checkpoint's mixed-precision settings {record} differ from this optimizer's {}",
                self.record()
            )));
        }
        let mut trial = self.inner.clone();
        trial.load_checkpoint_bytes(bytes)?;
        // Everything checked: apply.
        self.inner = trial;
        for (b, kept) in &mut self.state {
            let wide = self.inner.take_state_buffer(*b);
            for (w, k) in wide.iter().zip(kept.iter_mut()) {
                // Exact: the values were bf16.
                round_into(w, k, Rounding::Nearest, 0, 0, 0);
            }
        }
        Ok(())
    }

    /// What a step does with non-finite inputs (as [`Optimizer::with_non_finite`]).
    pub fn with_non_finite(mut self, policy: NonFinite) -> Result<Self, Error> {
        self.inner = self.inner.with_non_finite(policy)?;
        Ok(self)
    }
}

impl Optimizer<f32> {
    /// The state buffers (id and tensors), for the mixed-precision layer.
    pub(crate) fn state_buffers_mut(
        &mut self,
    ) -> impl Iterator<Item = (usize, &mut Vec<Vec<f32>>)> {
        let roles: Vec<BufRole> = self.program.info.buffers.iter().map(|b| b.role).collect();
        self.bufs
            .iter_mut()
            .enumerate()
            .filter(move |(b, _)| roles[*b] == BufRole::State)
    }

    pub(crate) fn set_state_buffer(&mut self, b: usize, data: Vec<Vec<f32>>) {
        self.bufs[b] = data;
        self.engine.forget(b);
    }

    pub(crate) fn take_state_buffer(&mut self, b: usize) -> Vec<Vec<f32>> {
        std::mem::take(&mut self.bufs[b])
    }
}

impl<S: Storage> MixedOptimizer<S> {
    /// [`crate::mixed::MixedOptimizer::step_with`] on the GPU backends with tensors already in
    /// device memory: `params[space][tensor]` addresses 16-bit values of type `S`, each input's
    /// tensors f32 values, used in place (the kernels widen and round the params themselves).
    ///
    /// # Safety
    /// As [`Optimizer::step_device`], with params of `S` (2 bytes per element) and inputs of f32.
    #[allow(unsafe_code)]
    pub unsafe fn step_device(
        &mut self,
        params: &[Vec<u64>],
        inputs: &DeviceInputs,
    ) -> Result<(), Error> {
        if !self.inner().backend().is_cuda() {
            return Err(Error::Params(
                "step_device needs Backend::Cuda or Backend::CudaEmulator (with_backend)".into(),
            ));
        }
        // SAFETY: the caller's contract, passed on; the storage map the GPU backend set up for
        // this optimizer makes the kernels read and write params as `S`.
        unsafe { self.inner_mut().step_device(Some(params), inputs) }
    }
}
