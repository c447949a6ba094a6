//! [`Backend::Cuda`]: an [`Optimizer`] whose params (when it owns them), state and outputs live in
//! device memory, with the same API as on the CPU.
//!
//! - **Where values live.** Each per-element buffer gets one device allocation (an *arena*) the
//!   first time a kernel uses it, uploaded from the host copy; from then on the device copy is the
//!   current one. Host copies are downloaded on access: [`Optimizer::params`] and
//!   [`Optimizer::buffer`] download the buffer the first time they are called after a step
//!   (cached until the next step), checkpoints download the state, [`Optimizer::sync_host`]
//!   downloads everything and reports errors. Switching back to a CPU backend downloads too.
//! - **Inputs** (`step`, `run_stage`) are host slices uploaded into staging arenas each step;
//!   params lent with `step_with` are uploaded before the stage and downloaded after it.
//!   [`Optimizer::step_device`] takes device pointers the host program owns instead (no copies).
//! - **Launches.** Each phase is one launch per kernel over every tensor of its space (the chunk
//!   table is uploaded once per tensor layout; pointer and uniform tables are re-uploaded only when
//!   they change). Reduction partials are downloaded and combined in chunk order, so results are
//!   deterministic, and feed the next phases exactly as on the Cranelift backend; the
//!   non-finite guard is checked after the first phase.
//! - **Parameter groups.** Kernels read hyperparameters only as uniforms. A uniform the generated
//!   kernel takes as a per-launch argument is passed that way only when every tensor has the same
//!   value; otherwise the launch uses the same kernels compiled with every uniform in the
//!   per-tensor table (`optc_compiler::backend::cuda::module_per_tensor`, compiled on first need).
//! - **16-bit storage.** With a storage map (set by the mixed-precision optimizer), params and
//!   state arenas hold bf16/f16 values that the kernels widen and round themselves; host copies
//!   stay f32 (exact widenings), converted on upload and download; 16-bit params lent by the
//!   host are uploaded and downloaded as they are.
//! - **Errors.** A driver failure during a step is an [`Error::Cuda`]; unlike validation errors it
//!   may come after some kernels ran (the device state is then unspecified).

use crate::cuda::CudaError;
use crate::device::{Device, DeviceBuffer, LaunchCache};
use crate::{Backend, Buffers, Error, Inputs, Optimizer, StageNeeds};
use optc_compiler::backend::cuda::{Storage, StorageMap};
use optc_compiler::backend::interp::{StepEnv, StepRun};
use optc_compiler::ir::BufRole;
use optc_compiler::ops::Float;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// One buffer's tensors in one device allocation, each starting 16-byte aligned, stored as the
/// program's precision or in 16 bits (converted on upload and download: widening is exact,
/// narrowing rounds to nearest, so values that came from 16 bits go back unchanged).
#[derive(Debug)]
struct Arena {
    buf: DeviceBuffer,
    /// Byte offset of each tensor.
    offsets: Vec<usize>,
    lens: Vec<usize>,
    storage: Storage,
}

impl Arena {
    fn new<T: Float>(
        dev: &Arc<Device>,
        lens: &[usize],
        storage: Storage,
    ) -> Result<Arena, CudaError> {
        let esize = match storage {
            Storage::Native => T::BYTES,
            Storage::Bf16 | Storage::F16 => 2,
        };
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &n in lens {
            offsets.push(at);
            at += (n * esize).div_ceil(16) * 16;
        }
        Ok(Arena {
            buf: dev.alloc(at)?,
            offsets,
            lens: lens.to_vec(),
            storage,
        })
    }
    fn ptr(&self, j: usize) -> u64 {
        self.buf.ptr() + self.offsets[j] as u64
    }
    fn upload<T: Float>(&self, data: &[impl AsRef<[T]>]) -> Result<(), CudaError> {
        for (j, d) in data.iter().enumerate() {
            let d = d.as_ref();
            match self.storage {
                Storage::Native => self.buf.upload(self.offsets[j], d)?,
                st => {
                    let bits: Vec<u16> = d.iter().map(|x| narrow(st, x.to_f64())).collect();
                    self.buf.upload(self.offsets[j], &bits)?;
                }
            }
        }
        Ok(())
    }
    /// Uploads 16-bit data as it is (the arena must hold 16-bit storage).
    fn upload_bits(&self, data: &[&mut [u16]]) -> Result<(), CudaError> {
        if self.storage == Storage::Native {
            return Err(CudaError::Driver(
                "16-bit data for a buffer stored in 32 bits".into(),
            ));
        }
        for (j, d) in data.iter().enumerate() {
            self.buf.upload(self.offsets[j], &d[..])?;
        }
        Ok(())
    }
    fn download_into<T: Float>(&self, j: usize, dst: &mut [T]) -> Result<(), CudaError> {
        match self.storage {
            Storage::Native => self.buf.download(self.offsets[j], dst),
            st => {
                let mut bits = vec![0u16; dst.len()];
                self.buf.download(self.offsets[j], &mut bits)?;
                for (d, b) in dst.iter_mut().zip(bits) {
                    *d = T::from_f64(widen(st, b));
                }
                Ok(())
            }
        }
    }
    fn download<T: Float>(&self) -> Result<Vec<Vec<T>>, CudaError> {
        let mut out = Vec::with_capacity(self.lens.len());
        for (j, &n) in self.lens.iter().enumerate() {
            let mut v = vec![T::from_f64(0.0); n];
            self.download_into(j, &mut v)?;
            out.push(v);
        }
        Ok(out)
    }
}

/// A value rounded to nearest into 16-bit storage, as bits.
fn narrow(st: Storage, x: f64) -> u16 {
    match st {
        Storage::F16 => half::f16::from_f32(x as f32).to_bits(),
        _ => half::bf16::from_f32(x as f32).to_bits(),
    }
}

/// 16-bit storage bits, widened exactly.
fn widen(st: Storage, b: u16) -> f64 {
    match st {
        Storage::F16 => f64::from(half::f16::from_bits(b).to_f32()),
        _ => f64::from(half::bf16::from_bits(b).to_f32()),
    }
}

/// The device side of an optimizer on [`Backend::Cuda`].
#[derive(Debug)]
struct GpuState {
    /// By buffer: the current values of params (owned), state and outputs.
    arenas: Vec<Option<Arena>>,
    /// By buffer: staging copies of inputs and lent params.
    staging: Vec<Option<Arena>>,
    cache: LaunchCache,
}

/// The optimizer's GPU: device, device buffers and lazily downloaded host copies.
#[derive(Debug, Default)]
pub(crate) struct GpuSlot<T> {
    pub(crate) dev: Option<Arc<Device>>,
    state: Option<GpuState>,
    /// By buffer: whether the host copy equals the device copy.
    host_current: Vec<bool>,
    /// By buffer: a download made by `params()` / `buffer()` since the last step.
    mirror: Vec<OnceLock<Result<Vec<Vec<T>>, CudaError>>>,
    /// Values a clone carries from the device of the optimizer it was cloned from.
    carried: Vec<(usize, Vec<Vec<T>>)>,
    /// How buffers are stored on the device (16-bit storage: see [`Optimizer::set_device_storage`]).
    pub(crate) storage: Arc<StorageMap>,
    /// The key of stochastic rounding.
    pub(crate) seed: u64,
}

impl<T: Float> Clone for GpuSlot<T> {
    /// A clone shares the device but not its buffers: it carries host copies of the device's
    /// current values (downloaded now) and uploads them to buffers of its own at its next step.
    fn clone(&self) -> Self {
        let mut carried = self.carried.clone();
        if let Some(st) = &self.state {
            for (b, a) in st.arenas.iter().enumerate() {
                if let Some(a) = a {
                    if !self.host_current.get(b).copied().unwrap_or(false) {
                        if let Ok(v) = a.download::<T>() {
                            carried.retain(|(c, _)| *c != b);
                            carried.push((b, v));
                        }
                    }
                }
            }
        }
        GpuSlot {
            dev: self.dev.clone(),
            state: None,
            host_current: Vec::new(),
            mirror: Vec::new(),
            carried,
            storage: Arc::clone(&self.storage),
            seed: self.seed,
        }
    }
}

impl<T: Float> GpuSlot<T> {
    /// The current host values of buffer `b`, downloading them if the device holds newer ones.
    pub(crate) fn host<'a>(
        &'a self,
        bufs: &'a Buffers<T>,
        b: usize,
    ) -> Result<&'a Vec<Vec<T>>, CudaError> {
        if let Some((_, v)) = self.carried.iter().find(|(c, _)| *c == b) {
            return Ok(v);
        }
        let arena = self
            .state
            .as_ref()
            .and_then(|s| s.arenas.get(b))
            .and_then(Option::as_ref);
        match arena {
            Some(a) if !self.host_current.get(b).copied().unwrap_or(true) => {
                match self.mirror.get(b) {
                    Some(m) => m
                        .get_or_init(|| a.download())
                        .as_ref()
                        .map_err(Clone::clone),
                    None => Err(CudaError::Driver("no host copy slot".into())),
                }
            }
            _ => Ok(&bufs[b]),
        }
    }

    /// Moves carried values into the host buffers (they become the current values).
    fn settle(&mut self, bufs: &mut Buffers<T>) {
        for (b, v) in std::mem::take(&mut self.carried) {
            bufs[b] = v;
        }
    }

    /// Downloads every buffer the device holds newer values of into `bufs`.
    pub(crate) fn sync(&mut self, bufs: &mut Buffers<T>) -> Result<(), CudaError> {
        self.settle(bufs);
        let Some(st) = &self.state else {
            return Ok(());
        };
        for (b, a) in st.arenas.iter().enumerate() {
            if let Some(a) = a {
                if !self.host_current[b] {
                    bufs[b] = a.download()?;
                    self.host_current[b] = true;
                }
            }
        }
        Ok(())
    }

    /// After the host copy of buffer `b` was replaced (a checkpoint): the device copy is stale.
    pub(crate) fn forget(&mut self, b: usize) {
        if let Some(st) = &mut self.state {
            st.arenas[b] = None;
        }
        self.carried.retain(|(c, _)| *c != b);
        if let Some(m) = self.mirror.get_mut(b) {
            *m = OnceLock::new();
        }
    }

    /// Drops the device buffers after `sync` (switching backends).
    pub(crate) fn release(&mut self) {
        self.state = None;
        self.mirror.clear();
        self.host_current.clear();
    }
}

/// Device addresses of per-element inputs (one per tensor) and scalar inputs, for
/// [`Optimizer::step_device`].
#[derive(Debug, Clone, Default)]
pub struct DeviceInputs {
    /// Per-element inputs by name: the device address of each tensor's data.
    pub tensors: HashMap<String, Vec<u64>>,
    /// Scalar inputs by name.
    pub scalars: HashMap<String, f64>,
}

impl DeviceInputs {
    /// Adds a per-element input.
    pub fn tensor(mut self, name: &str, ptrs: Vec<u64>) -> Self {
        self.tensors.insert(name.to_string(), ptrs);
        self
    }
    /// Adds a scalar input.
    pub fn scalar(mut self, name: &str, v: f64) -> Self {
        self.scalars.insert(name.to_string(), v);
        self
    }
}

/// Where a stage's inputs and lent params come from.
pub(crate) enum Source<'s, 'p, 'i, T> {
    Host {
        params: Option<&'s mut [Vec<&'p mut [T]>]>,
        inputs: &'s Inputs<'i, T>,
    },
    /// Host params already in their 16-bit storage type, uploaded and downloaded as they are.
    Bits {
        params: &'s mut [Vec<&'p mut [u16]>],
        inputs: &'s Inputs<'i, T>,
    },
    Device {
        params: Option<&'s [Vec<u64>]>,
        inputs: &'s DeviceInputs,
    },
}

impl<T: Float + Default> Optimizer<T> {
    /// Opens the device of [`Backend::Cuda`] or [`Backend::CudaEmulator`].
    pub(crate) fn open_gpu(&mut self, backend: Backend) -> Result<(), Error> {
        let same = match (backend, &self.gpu.dev) {
            (Backend::Cuda { device }, Some(d)) => !d.is_emulator() && d.ordinal() == device,
            (Backend::CudaEmulator, Some(d)) => d.is_emulator(),
            _ => false,
        };
        if !same {
            let dev = match backend {
                Backend::Cuda { device } => Device::open(device)?,
                _ => Device::emulator()?,
            };
            self.gpu.sync(&mut self.bufs)?;
            self.gpu.release();
            self.gpu.dev = Some(dev);
        }
        Ok(())
    }

    /// Stores buffers on the device as `storage` says (16-bit params and state, widened on load
    /// and rounded on store inside the kernels; see
    /// [`optc_compiler::backend::cuda::StorageMap`]), rounding stochastically under `seed` when
    /// it asks for that. The host copies stay in `T`, as exact widenings. Values on the device
    /// are downloaded first, and the kernels are compiled again. CPU backends ignore it.
    pub(crate) fn set_device_storage(
        &mut self,
        storage: StorageMap,
        seed: u64,
    ) -> Result<(), Error> {
        if T::BYTES != 4 && !storage.is_native() {
            return Err(Error::Policy(
                "16-bit storage needs an f32 optimizer".into(),
            ));
        }
        self.gpu.sync(&mut self.bufs)?;
        self.gpu.release();
        let old = (
            std::mem::replace(&mut self.gpu.storage, Arc::new(storage)),
            self.gpu.seed,
        );
        self.gpu.seed = seed;
        if let Err(e) = self.reset_active() {
            (self.gpu.storage, self.gpu.seed) = old;
            return Err(e);
        }
        Ok(())
    }

    /// [`Optimizer::step_with`] on the GPU backends with params already in their 16-bit device
    /// storage type (see [`Self::set_device_storage`]): uploaded, updated and downloaded as
    /// they are. Checked like `step_with`; on an error before the kernels run nothing changes.
    pub(crate) fn step_with_bits(
        &mut self,
        params: &mut [Vec<&mut [u16]>],
        inputs: &Inputs<'_, T>,
    ) -> Result<(), Error> {
        if !self.engine.is_cuda() {
            return Err(Error::Params(
                "16-bit params need Backend::Cuda or Backend::CudaEmulator".into(),
            ));
        }
        let params_16 = (0..params.len()).all(|s| self.gpu.storage.of(s as u16) != Storage::Native);
        if !params_16 {
            return Err(Error::Params(
                "the params are not stored in 16 bits on the device".into(),
            ));
        }
        self.check_lent(Some(params), "lend them", "call step")?;
        if self.next_stage == 0 {
            self.activate()?;
        }
        let mut checked = Vec::new();
        let mut scalars = self.pending_scalars.clone();
        for k in self.next_stage..self.program.info.stages.len() {
            scalars = self.check_stage(k, inputs, &scalars)?;
            checked.push((k, scalars.clone()));
        }
        for (k, scalars) in checked {
            let src = Source::Bits {
                params: &mut *params,
                inputs,
            };
            if !self.exec_stage_cuda(k, src, scalars)? {
                return self.non_finite();
            }
        }
        Ok(())
    }

    /// Downloads every buffer whose current values are on the GPU into the host copies, so
    /// [`Optimizer::params`] and [`Optimizer::buffer`] need no download (and report no error
    /// silently). A no-op on the CPU backends.
    pub fn sync_host(&mut self) -> Result<(), Error> {
        self.gpu.sync(&mut self.bufs)?;
        for m in &mut self.gpu.mirror {
            *m = OnceLock::new();
        }
        Ok(())
    }

    /// The GPU this optimizer runs on ([`Backend::Cuda`]).
    pub fn device(&self) -> Option<&Arc<Device>> {
        self.gpu.dev.as_ref()
    }

    /// Kernel launches made on the GPU so far.
    pub fn launches(&self) -> u64 {
        self.gpu.state.as_ref().map_or(0, |s| s.cache.launches)
    }

    /// [`Optimizer::step`] / [`Optimizer::step_with`] on [`Backend::Cuda`] with tensors already
    /// in device memory: `params[space][tensor]` (only for an optimizer built with
    /// [`Optimizer::lending`]; `None` otherwise) and each input's tensors are device addresses,
    /// used in place. Names, counts of tensors and scalar inputs are checked as in `step`.
    ///
    /// # Safety
    /// Every address must point at the data of its tensor in this optimizer's device context
    /// (see [`Optimizer::device`]): at least as many elements of `T` as the tensor registered
    /// at that place, readable, and for params writable; alive and not accessed by anything
    /// else until this call returns. Params must not overlap each other or any input. Addresses
    /// need no particular alignment (16-byte-aligned tensors get 128-bit accesses).
    #[allow(unsafe_code)]
    pub unsafe fn step_device(
        &mut self,
        params: Option<&[Vec<u64>]>,
        inputs: &DeviceInputs,
    ) -> Result<(), Error> {
        if !self.engine.is_cuda() {
            return Err(Error::Params(
                "step_device needs Backend::Cuda or Backend::CudaEmulator (with_backend)".into(),
            ));
        }
        self.check_lent(params, "pass their device addresses", "pass None")?;
        if self.next_stage == 0 {
            self.activate()?;
        }
        let mut checked = Vec::new();
        let mut scalars = self.pending_scalars.clone();
        for k in self.next_stage..self.program.info.stages.len() {
            scalars = self.check_device_stage(k, inputs, &scalars)?;
            checked.push((k, scalars.clone()));
        }
        for (k, scalars) in checked {
            let src = Source::Device { params, inputs };
            if !self.exec_stage_cuda(k, src, scalars)? {
                return self.non_finite();
            }
        }
        Ok(())
    }

    fn check_device_stage(
        &self,
        k: usize,
        inputs: &DeviceInputs,
        pending: &HashMap<u16, f64>,
    ) -> Result<HashMap<u16, f64>, Error> {
        self.check_given(k, &inputs.tensors, &inputs.scalars, pending)
    }

    /// Runs stage `k` on the GPU (inputs already checked). `Ok(false)`: the guard found
    /// non-finite inputs after the first phase, which stores nothing.
    #[allow(unsafe_code)] // launches kernels over device buffers (see the SAFETY comment)
    pub(crate) fn exec_stage_cuda(
        &mut self,
        k: usize,
        mut src: Source<'_, '_, '_, T>,
        scalars: HashMap<u16, f64>,
    ) -> Result<bool, Error> {
        let active = Arc::clone(&self.active);
        let prog = Arc::clone(&active.program);
        let gp = active
            .gpu
            .clone()
            .ok_or_else(|| Error::Params("the rule is not compiled for the GPU".into()))?;
        let dev = Arc::clone(gp.device());
        let info = &prog.info;
        let nbufs = info.buffers.len();
        self.gpu.settle(&mut self.bufs);
        if self.gpu.state.is_none() {
            self.gpu.state = Some(GpuState {
                arenas: (0..nbufs).map(|_| None).collect(),
                staging: (0..nbufs).map(|_| None).collect(),
                cache: LaunchCache::default(),
            });
            self.gpu.host_current = vec![true; nbufs];
            self.gpu.mirror = (0..nbufs).map(|_| OnceLock::new()).collect();
        }
        let needs: StageNeeds = self.stage_needs(k).clone();
        let Some(st) = self.gpu.state.as_mut() else {
            return Err(Error::Params("no GPU state".into()));
        };
        // Upload host inputs and lent params into staging arenas.
        let storage = Arc::clone(&self.gpu.storage);
        let host_inputs = match &src {
            Source::Host { inputs, .. } | Source::Bits { inputs, .. } => Some(*inputs),
            Source::Device { .. } => None,
        };
        if let Some(inputs) = host_inputs {
            for &b in &needs.tensors {
                let bi = &info.buffers[b as usize];
                let lens = &self.lens[bi.space as usize];
                let slot = &mut st.staging[b as usize];
                if slot.is_none() {
                    *slot = Some(Arena::new::<T>(&dev, lens, storage.of(b))?);
                }
                if let Some(a) = slot {
                    a.upload::<T>(&inputs.tensors[&bi.name])?;
                }
            }
        }
        let nspaces = info.spaces.len();
        for space in 0..nspaces {
            let lent_here = match &src {
                Source::Host { params, .. } => params.is_some(),
                Source::Bits { .. } => true,
                Source::Device { .. } => false,
            };
            if !lent_here {
                break;
            }
            let slot = &mut st.staging[space];
            if slot.is_none() {
                *slot = Some(Arena::new::<T>(
                    &dev,
                    &self.lens[space],
                    storage.of(space as u16),
                )?);
            }
            if let Some(a) = slot {
                match &src {
                    Source::Host {
                        params: Some(ps), ..
                    } => {
                        let views: Vec<&[T]> = ps[space].iter().map(|t| &t[..]).collect();
                        a.upload::<T>(&views)?;
                    }
                    Source::Bits { params, .. } => a.upload_bits(&params[space])?,
                    _ => {}
                }
            }
        }
        let scalar_inputs: Vec<f64> = (0..info.scalar_inputs.len())
            .map(|i| scalars.get(&(i as u16)).copied().unwrap_or(0.0))
            .collect();
        let env = StepEnv {
            hypers: &self.effective,
            groups: &self.effective_groups,
            tensor_groups: &self.tensor_groups,
            t: (self.steps + 1) as f64,
            scalar_states: &self.scalar_states,
            scalar_inputs: &scalar_inputs,
        };
        let mut run = StepRun::new(&prog, self.steps == 0, self.lens.clone())
            .with_reductions(std::mem::take(&mut self.pending));
        let variant = run.variant();
        let stage = &prog.variants[variant].stages[k];
        let lent = self.lent;
        for (pi, ph) in stage.phases.iter().enumerate() {
            for (ki, kern) in ph.kernels.iter().enumerate() {
                let space = kern.space as usize;
                let lens = &self.lens[space];
                let ck = gp
                    .kernels()
                    .iter()
                    .find(|c| {
                        c.variant == variant && c.stage == k && c.phase == pi && c.kernel == ki
                    })
                    .ok_or_else(|| Error::Params("kernel missing from the GPU module".into()))?;
                // Device copies of the buffers the kernel uses, uploaded at first use.
                for &b in &ck.slots {
                    let bi = &info.buffers[b as usize];
                    let device_owned =
                        bi.role != BufRole::Input && !(bi.role == BufRole::Param && lent);
                    if device_owned && st.arenas[b as usize].is_none() {
                        let a = Arena::new::<T>(&dev, lens, storage.of(b))?;
                        a.upload::<T>(&self.bufs[b as usize])?;
                        st.arenas[b as usize] = Some(a);
                    }
                }
                let mut ptrs: Vec<Vec<u64>> = Vec::with_capacity(lens.len());
                for j in 0..lens.len() {
                    let mut row = Vec::with_capacity(ck.slots.len());
                    for &b in &ck.slots {
                        let bi = &info.buffers[b as usize];
                        let external =
                            bi.role == BufRole::Input || (bi.role == BufRole::Param && lent);
                        let p = match (&src, external) {
                            (Source::Device { inputs, .. }, true) if bi.role == BufRole::Input => {
                                inputs.tensors[&bi.name][j]
                            }
                            (
                                Source::Device {
                                    params: Some(ps), ..
                                },
                                true,
                            ) => ps[b as usize][j],
                            (_, true) => st.staging[b as usize].as_ref().map_or(0, |a| a.ptr(j)),
                            (_, false) => st.arenas[b as usize].as_ref().map_or(0, |a| a.ptr(j)),
                        };
                        row.push(p);
                    }
                    ptrs.push(row);
                }
                let uniforms: Vec<Vec<T>> = (0..lens.len())
                    .map(|j| {
                        kern.uniforms
                            .iter()
                            .map(|&u| T::from_f64(run.uniform(&env, u, space, j)))
                            .collect()
                    })
                    .collect();
                // SAFETY: every pointer addresses `lens[j]` elements of `T` in this device's
                // context: arenas and staging arenas were allocated for these lengths above;
                // device inputs and params are the caller's contract (`step_device`). Stored slots
                // are params, state or outputs, each its own allocation (or, for device params,
                // required not to overlap). Partials are downloaded before the next launch reads
                // anything they feed.
                let results = unsafe {
                    st.cache.run_kernel(
                        &gp,
                        [variant, k, pi, ki],
                        lens,
                        &kern.uniforms,
                        &ptrs,
                        &uniforms,
                        (self.gpu.seed, (self.steps + 1) as u32),
                    )
                }?;
                for (r, v) in results {
                    run.set_reduction(r, v);
                }
            }
            if k == 0 && pi == 0 {
                let guards = &active.guards[variant];
                if guards.iter().any(|&r| !run.scalar(&env, r, 0).is_finite()) {
                    return Ok(false);
                }
            }
        }
        // Stored buffers: the device copy is newer now.
        for ph in &stage.phases {
            for kern in &ph.kernels {
                for &(b, _) in &kern.stores {
                    if st.arenas[b as usize].is_some() {
                        self.gpu.host_current[b as usize] = false;
                    }
                    if let Some(m) = self.gpu.mirror.get_mut(b as usize) {
                        *m = OnceLock::new();
                    }
                }
            }
        }
        match &mut src {
            Source::Host {
                params: Some(ps), ..
            } => {
                for (space, tensors) in ps.iter_mut().enumerate() {
                    if let Some(a) = &st.staging[space] {
                        for (j, t) in tensors.iter_mut().enumerate() {
                            a.download_into(j, t)?;
                        }
                    }
                }
            }
            Source::Bits { params, .. } => {
                for (space, tensors) in params.iter_mut().enumerate() {
                    if let Some(a) = &st.staging[space] {
                        for (j, t) in tensors.iter_mut().enumerate() {
                            a.buf.download(a.offsets[j], &mut t[..])?;
                        }
                    }
                }
            }
            _ => {}
        }
        if k + 1 == info.stages.len() {
            self.scalar_states = run.scalar_updates(&env);
            self.steps += 1;
            self.next_stage = 0;
            self.pending_scalars.clear();
        } else {
            self.pending = run.take_reductions();
            self.pending_scalars = scalars;
            self.next_stage = k + 1;
        }
        Ok(true)
    }
}

impl<S: crate::mixed::Storage> crate::mixed::MixedOptimizer<S> {
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
