//! Where values live on the CUDA engine: device buffers of the optimizer's params (when it owns
//! them), state and outputs, and host copies downloaded on access.
//!

use super::device::{Device, DeviceBuffer};
use super::launch::LaunchCache;
use super::nvrtc::CudaError;
use optc_compiler::backend::cuda::Storage;
use optc_compiler::backend::interp::Buffers;
use optc_compiler::ops::Float;
use std::sync::{Arc, OnceLock};

/// One buffer's tensors in one device allocation, each starting 16-byte aligned, stored as the
/// program's precision or in 16 bits (converted on upload and download: widening is exact,
/// narrowing rounds to nearest, so values that came from 16 bits go back unchanged).
#[derive(Debug)]
pub(super) struct Arena {
    pub(super) buf: DeviceBuffer,
    /// Byte offset of each tensor.
    pub(super) offsets: Vec<usize>,
    lens: Vec<usize>,
    storage: Storage,
}

impl Arena {
    pub(super) fn new<T: Float>(
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
    pub(super) fn ptr(&self, j: usize) -> u64 {
        self.buf.ptr() + self.offsets[j] as u64
    }
    pub(super) fn upload<T: Float>(&self, data: &[impl AsRef<[T]>]) -> Result<(), CudaError> {
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
    pub(super) fn upload_bits(&self, data: &[&mut [u16]]) -> Result<(), CudaError> {
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
    pub(super) fn download_into<T: Float>(&self, j: usize, dst: &mut [T]) -> Result<(), CudaError> {
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
    pub(super) fn download<T: Float>(&self) -> Result<Vec<Vec<T>>, CudaError> {
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
pub(super) struct GpuState {
    /// By buffer: the current values of params (owned), state and outputs.
    pub(super) arenas: Vec<Option<Arena>>,
    /// By buffer: staging copies of inputs and lent params.
    pub(super) staging: Vec<Option<Arena>>,
    pub(super) cache: LaunchCache,
}

/// The optimizer's GPU: device, device buffers and lazily downloaded host copies.
#[derive(Debug, Default)]
pub(super) struct GpuSlot<T> {
    pub(super) dev: Option<Arc<Device>>,
    pub(super) state: Option<GpuState>,
    /// By buffer: whether the host copy equals the device copy.
    pub(super) host_current: Vec<bool>,
    /// By buffer: a download made by `params()` / `buffer()` since the last step.
    pub(super) mirror: Vec<OnceLock<Result<Vec<Vec<T>>, CudaError>>>,
    /// Values a clone carries from the device of the optimizer it was cloned from.
    carried: Vec<(usize, Vec<Vec<T>>)>,
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
        }
    }
}

impl<T: Float> GpuSlot<T> {
    /// The current host values of buffer `b`, downloading them if the device holds newer ones.
    pub(super) fn host<'a>(
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
    pub(super) fn settle(&mut self, bufs: &mut Buffers<T>) {
        for (b, v) in std::mem::take(&mut self.carried) {
            bufs[b] = v;
        }
    }

    /// Downloads every buffer the device holds newer values of into `bufs`.
    pub(super) fn sync(&mut self, bufs: &mut Buffers<T>) -> Result<(), CudaError> {
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
    pub(super) fn forget(&mut self, b: usize) {
        if let Some(st) = &mut self.state {
            st.arenas[b] = None;
        }
        self.carried.retain(|(c, _)| *c != b);
        if let Some(m) = self.mirror.get_mut(b) {
            *m = OnceLock::new();
        }
    }
}
