//! The CUDA engine ([`crate::Backend::Cuda`], [`crate::Backend::CudaEmulator`]): the generated
//! CUDA C compiled by NVRTC for the device's architecture (or built for the emulator), launched
//! once per kernel over every tensor, over device-resident buffers.
//!
//! - **Where values live.** Each per-element buffer gets one device allocation (an *arena*) the
//!   first time a kernel uses it, uploaded from the host copy; from then on the device copy is the
//!   current one. Host copies are downloaded on access: [`crate::Optimizer::params`] and
//!   [`crate::Optimizer::buffer`] download the buffer the first time they are called after a step
//!   (cached until the next step), checkpoints download the state, [`crate::Optimizer::sync_host`]
//!   downloads everything and reports errors. Switching back to a CPU backend downloads too.
//! - **Inputs** (`step`, `run_stage`) are host slices uploaded into staging arenas each step;
//!   params lent with `step_with` are uploaded before the stage and downloaded after it.
//!   [`crate::Optimizer::step_device`] takes device pointers the host program owns instead (no copies).
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
//! - **Errors.** A driver failure during a step is an [`crate::Error::Cuda`]; unlike validation errors it
//!   may come after some kernels ran (the device state is then unspecified).

#![allow(unsafe_code)] // launches kernels over device memory (see each SAFETY comment)

pub mod device;
pub mod emulator;
pub mod launch;
pub mod nvrtc;
mod residency;

use super::{Compiled, Engine, Given, KernelAt, Lent, Reductions, StageIo};
use crate::{Backend, Error};
use device::{Device, GpuProgram};
use launch::LaunchCache;
use optc_compiler::backend::clif::Precision;
use optc_compiler::backend::interp::Buffers;
use optc_compiler::ir::{BufRole, Kernel, Program};
use optc_compiler::ops::Float;
use optc_compiler::storage::StorageMap;
use residency::{Arena, GpuSlot, GpuState};
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// The CUDA engine on one device (a GPU or the emulator).
#[derive(Debug)]
pub struct Cuda<T> {
    backend: Backend,
    dev: Arc<Device>,
    slot: GpuSlot<T>,
}

impl<T: Float + Default> Cuda<T> {
    /// Opens the device of `backend`; the engine in use is reused when it runs on that device
    /// (its device buffers stay where they are).
    pub(crate) fn open(
        backend: Backend,
        current: Option<&dyn Engine<T>>,
    ) -> Result<Box<dyn Engine<T>>, Error> {
        if let Some(cur) = current.and_then(|c| c.as_any().downcast_ref::<Cuda<T>>()) {
            let same = match backend {
                Backend::Cuda { device } => !cur.dev.is_emulator() && cur.dev.ordinal() == device,
                _ => cur.dev.is_emulator(),
            };
            if same {
                return Ok(Box::new(Cuda {
                    backend,
                    dev: Arc::clone(&cur.dev),
                    slot: GpuSlot::default(),
                }));
            }
        }
        let dev = match backend {
            Backend::Cuda { device } => Device::open(device)?,
            _ => Device::emulator()?,
        };
        Ok(Box::new(Cuda {
            backend,
            dev,
            slot: GpuSlot::default(),
        }))
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    fn state(&mut self, nbufs: usize) -> &mut GpuState {
        if self.slot.state.is_none() {
            self.slot.state = Some(GpuState {
                arenas: (0..nbufs).map(|_| None).collect(),
                staging: (0..nbufs).map(|_| None).collect(),
                cache: LaunchCache::default(),
            });
            self.slot.host_current = vec![true; nbufs];
            self.slot.mirror = (0..nbufs).map(|_| OnceLock::new()).collect();
        }
        let st = self.slot.state.as_mut().expect("just created");
        // A rule with a sample axis gains an input buffer per sample as its samples grow.
        if st.arenas.len() < nbufs {
            st.arenas.resize_with(nbufs, || None);
            st.staging.resize_with(nbufs, || None);
            self.slot.host_current.resize(nbufs, true);
            self.slot.mirror.resize_with(nbufs, OnceLock::new);
        }
        st
    }
}

impl<T: Float + Default> Engine<T> for Cuda<T> {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn boxed_clone(&self) -> Box<dyn Engine<T>> {
        Box::new(Cuda {
            backend: self.backend,
            dev: Arc::clone(&self.dev),
            slot: self.slot.clone(),
        })
    }

    fn compile(&self, program: &Arc<Program>, storage: &StorageMap) -> Result<Compiled, Error> {
        super::fusable(program, storage, "the GPU kernels")?;
        let precision = if T::BYTES == 4 {
            Precision::F32
        } else {
            Precision::F64
        };
        Ok(Arc::new(GpuProgram::compile(
            program, precision, &self.dev, storage,
        )?))
    }

    fn begin_stage(&mut self, io: &mut StageIo<'_, '_, '_, '_, T>) -> Result<(), Error> {
        let info = &io.program.info;
        let dev = Arc::clone(&self.dev);
        self.slot.settle(io.bufs);
        let st = self.state(info.buffers.len());
        // Upload host inputs and lent params into staging arenas.
        if let Given::Host(inputs) = io.inputs {
            for &b in &io.needs.tensors {
                let bi = &info.buffers[b as usize];
                let lens = &io.lens[bi.space as usize];
                let slot = &mut st.staging[b as usize];
                if slot.is_none() {
                    *slot = Some(Arena::new::<T>(&dev, lens, io.storage.of(b))?);
                }
                if let Some(a) = slot {
                    a.upload::<T>(&inputs.tensors[&bi.name])?;
                }
            }
        }
        if matches!(io.params, Lent::Host(_) | Lent::Bits(_)) {
            for space in 0..info.spaces.len() {
                let slot = &mut st.staging[space];
                if slot.is_none() {
                    *slot = Some(Arena::new::<T>(
                        &dev,
                        &io.lens[space],
                        io.storage.of(space as u16),
                    )?);
                }
                if let Some(a) = slot {
                    match &io.params {
                        Lent::Host(ps) => {
                            let views: Vec<&[T]> = ps[space].iter().map(|t| &t[..]).collect();
                            a.upload::<T>(&views)?;
                        }
                        Lent::Bits(ps) => a.upload_bits(&ps[space])?,
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn run_kernel(
        &mut self,
        compiled: &Compiled,
        at: KernelAt,
        kernel: &Kernel,
        uniforms: &[Vec<T>],
        io: &mut StageIo<'_, '_, '_, '_, T>,
    ) -> Result<Reductions, Error> {
        if io.raw_partials || io.bases.is_some() {
            return Err(Error::Params(
                "a sharded optimizer runs on the cranelift or native engine".into(),
            ));
        }
        let gp = compiled
            .downcast_ref::<GpuProgram>()
            .ok_or_else(|| Error::Params("the rule is not compiled for the GPU".into()))?;
        let info = &io.program.info;
        let dev = Arc::clone(&self.dev);
        let lent = io.params.is_lent();
        let st = self.state(info.buffers.len());
        let lens = &io.lens[kernel.space as usize];
        let (ck, _) = gp.kernel([at.variant, at.stage, at.phase, at.kernel], false)?;
        // Device copies of the buffers the kernel uses, uploaded at first use.
        for &b in &ck.slots {
            let bi = &info.buffers[b as usize];
            let device_owned = !(info.is_input(b) || (bi.role == BufRole::Param && lent));
            if device_owned && st.arenas[b as usize].is_none() {
                let a = Arena::new::<T>(&dev, lens, io.storage.of(b))?;
                a.upload::<T>(&io.bufs[b as usize])?;
                st.arenas[b as usize] = Some(a);
            }
        }
        let mut ptrs: Vec<Vec<u64>> = Vec::with_capacity(lens.len());
        for j in 0..lens.len() {
            let mut row = Vec::with_capacity(ck.slots.len());
            for &b in &ck.slots {
                let bi = &info.buffers[b as usize];
                let external = info.is_input(b) || (bi.role == BufRole::Param && lent);
                let p = match (bi.role, external, io.inputs, &*io.params) {
                    (BufRole::Input, _, Given::Device(inputs), _) => inputs.tensors[&bi.name][j],
                    (BufRole::Param, true, _, Lent::Device(ps)) => ps[b as usize][j],
                    (_, true, _, _) => st.staging[b as usize].as_ref().map_or(0, |a| a.ptr(j)),
                    (_, false, _, _) => st.arenas[b as usize].as_ref().map_or(0, |a| a.ptr(j)),
                };
                row.push(p);
            }
            ptrs.push(row);
        }
        // SAFETY: every pointer addresses `lens[j]` elements of `T` in this device's context:
        // arenas and staging arenas were allocated for these lengths; device inputs and params
        // are the caller's contract (`step_device`). Stored slots are params, state or outputs,
        // each its own allocation (or, for device params, required not to overlap). Partials are
        // downloaded before the next launch reads anything they feed.
        let results = unsafe {
            st.cache.run_kernel(
                gp,
                [at.variant, at.stage, at.phase, at.kernel],
                lens,
                &kernel.uniforms,
                &ptrs,
                uniforms,
                (io.seed, io.t as u32),
            )
        }?;
        Ok(results)
    }

    fn end_stage(
        &mut self,
        io: &mut StageIo<'_, '_, '_, '_, T>,
        completed: bool,
    ) -> Result<(), Error> {
        if !completed {
            return Ok(());
        }
        let stage = &io.program.variants[io.variant].stages[io.stage];
        let stored: Vec<usize> = stage
            .phases
            .iter()
            .flat_map(|ph| &ph.kernels)
            .flat_map(|k| k.stores.iter().map(|&(b, _)| b as usize))
            .collect();
        let st = self.state(io.program.info.buffers.len());
        match &mut io.params {
            Lent::Host(ps) => {
                for (space, tensors) in ps.iter_mut().enumerate() {
                    if let Some(a) = &st.staging[space] {
                        for (j, t) in tensors.iter_mut().enumerate() {
                            a.download_into(j, t)?;
                        }
                    }
                }
            }
            Lent::Bits(ps) => {
                for (space, tensors) in ps.iter_mut().enumerate() {
                    if let Some(a) = &st.staging[space] {
                        for (j, t) in tensors.iter_mut().enumerate() {
                            a.buf.download(a.offsets[j], &mut t[..])?;
                        }
                    }
                }
            }
            _ => {}
        }
        // Stored buffers: the device copy is newer now.
        for b in stored {
            if self
                .slot
                .state
                .as_ref()
                .is_some_and(|st| st.arenas[b].is_some())
            {
                self.slot.host_current[b] = false;
            }
            if let Some(m) = self.slot.mirror.get_mut(b) {
                *m = OnceLock::new();
            }
        }
        Ok(())
    }

    fn host<'a>(&'a self, bufs: &'a Buffers<T>, b: usize) -> Result<&'a Vec<Vec<T>>, Error> {
        Ok(self.slot.host(bufs, b)?)
    }

    fn sync(&mut self, bufs: &mut Buffers<T>) -> Result<(), Error> {
        self.slot.sync(bufs)?;
        for m in &mut self.slot.mirror {
            *m = OnceLock::new();
        }
        Ok(())
    }

    fn forget(&mut self, b: usize) {
        self.slot.forget(b);
    }

    fn launches(&self) -> u64 {
        self.slot.state.as_ref().map_or(0, |s| s.cache.launches)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
