//! The CUDA driver side of the GPU backend: a device (its primary context), device memory,
//! kernels loaded from CUBIN, and launches with the ABI of `optc_compiler::backend::cuda`.
//!
//! cudarc (built with `dynamic-loading`) panics when libcuda or one of its symbols is missing, so
//! [`Device::open`] first checks, without cudarc, that libcuda loads and has every function this
//! module calls ([`DRIVER_SYMBOLS`]); every driver failure after that is a [`CudaError::Driver`].
//! All work goes to the legacy default stream, so a launch, the copies after it and the next
//! launch are ordered, and a synchronous copy from the device waits for the kernels before it.
//!
//! Unsafe code is allowed only on the items that call the driver, each with its SAFETY argument.

use super::emulator;
use super::nvrtc::{driver_symbols_present, CudaError};
use cudarc::driver::result::DriverError;
use cudarc::driver::{result, sys, CudaContext};
use optc_compiler::backend::clif::Precision;
use optc_compiler::backend::cuda::{self as gen, CudaKernel, CudaModule};
use optc_compiler::ir::Program;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, OnceLock};

/// Functions of libcuda this module (and the cudarc calls it makes) use.
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetName",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyDtoD_v2",
    "cuMemsetD32_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuGetErrorName",
    "cuGetErrorString",
];

pub(super) fn drv(what: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

/// What runs a [`Device`]'s work.
pub(super) enum Backing {
    /// A GPU through the CUDA driver: its primary context (retained while the handle lives).
    Driver(Arc<CudaContext>),
    /// The CPU through the CUDA emulator ([`crate::emulator`]).
    Emulator(emulator::Memory),
}

/// One GPU (its primary context), or the CUDA emulator: name and architecture.
pub struct Device {
    pub(super) kind: Backing,
    ordinal: usize,
    name: String,
    /// `sm_XY`, what NVRTC compiles the kernels for.
    arch: String,
    sms: u32,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({}: {}, {})", self.ordinal, self.name, self.arch)
    }
}

impl Device {
    /// Opens GPU `ordinal`. Without libcuda, without a GPU or with a broken driver this is an
    /// error ([`CudaError::DriverMissing`], [`CudaError::Driver`]), never a panic.
    pub fn open(ordinal: usize) -> Result<Arc<Device>, CudaError> {
        driver_symbols_present(DRIVER_SYMBOLS)?;
        let ctx = CudaContext::new(ordinal).map_err(drv("cannot open the GPU"))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(drv("cannot read a device attribute"))
        };
        use sys::CUdevice_attribute_enum as A;
        let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let name = ctx.name().map_err(drv("cannot read the device name"))?;
        Ok(Arc::new(Device {
            kind: Backing::Driver(ctx),
            ordinal,
            name,
            arch: format!("sm_{major}{minor}"),
            sms: u32::try_from(sms).unwrap_or(1),
        }))
    }

    /// The CUDA emulator ([`crate::emulator`]): the same kernels and host logic as on a GPU,
    /// run on the CPU, for testing the GPU path without one. Needs a host C++ compiler (an
    /// [`CudaError::Emulator`] without one); no CUDA library at all.
    pub fn emulator() -> Result<Arc<Device>, CudaError> {
        let cxx = emulator::Compiler::find()?;
        Ok(Arc::new(Device {
            kind: Backing::Emulator(emulator::Memory::default()),
            ordinal: 0,
            name: format!("optc CUDA emulator ({})", cxx.version()),
            arch: "emulator".to_string(),
            sms: 1,
        }))
    }

    /// Whether this is the CUDA emulator rather than a GPU.
    pub fn is_emulator(&self) -> bool {
        matches!(self.kind, Backing::Emulator(_))
    }

    /// The device's name (`NVIDIA H200`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The architecture kernels are compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }

    /// Makes the device's context current on the calling thread (every call below does).
    pub fn bind(&self) -> Result<(), CudaError> {
        match &self.kind {
            Backing::Driver(ctx) => ctx
                .bind_to_thread()
                .map_err(drv("cannot make the GPU's context current")),
            Backing::Emulator(_) => Ok(()),
        }
    }

    /// Waits for all work queued on the device.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        match &self.kind {
            Backing::Driver(_) => {
                result::ctx::synchronize().map_err(drv("kernel execution failed"))
            }
            // Emulated launches complete before they return.
            Backing::Emulator(_) => Ok(()),
        }
    }

    /// Allocates `bytes` of device memory (at least 256, so even an empty buffer has an address).
    #[allow(unsafe_code)]
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        self.bind()?;
        let size = bytes.max(256);
        let ptr = match &self.kind {
            // SAFETY: the context is current; the pointer is owned by the returned buffer and
            // freed once, in its Drop.
            Backing::Driver(_) => unsafe { result::malloc_sync(size) }.map_err(|e| {
                CudaError::Driver(format!("cannot allocate {size} bytes on the GPU: {e:?}"))
            })?,
            Backing::Emulator(mem) => mem.alloc(size)?,
        };
        Ok(DeviceBuffer {
            dev: Arc::clone(self),
            ptr,
            bytes: size,
        })
    }
}

/// Device memory owned by optc, freed on drop.
pub struct DeviceBuffer {
    dev: Arc<Device>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl Drop for DeviceBuffer {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        match &self.dev.kind {
            Backing::Driver(_) => {
                if self.dev.bind().is_ok() {
                    // SAFETY: `ptr` was allocated by `Device::alloc` and is freed only here;
                    // cuMemFree waits for the work queued on the legacy stream that may use it.
                    let _ = unsafe { result::free_sync(self.ptr) };
                }
            }
            Backing::Emulator(mem) => mem.free(self.ptr),
        }
    }
}

impl DeviceBuffer {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The device it lives on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), CudaError> {
        if offset.checked_add(len).is_none_or(|end| end > self.bytes) {
            return Err(CudaError::Driver(format!(
                "copy of {len} bytes at offset {offset} is outside a buffer of {} bytes",
                self.bytes
            )));
        }
        Ok(())
    }

    /// Copies `src` to the buffer at byte `offset` (synchronous).
    #[allow(unsafe_code)]
    pub fn upload<T: Copy>(&self, offset: usize, src: &[T]) -> Result<(), CudaError> {
        self.check(offset, std::mem::size_of_val(src))?;
        if src.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        match &self.dev.kind {
            // SAFETY: the range lies inside this live allocation (checked above); `src` is a
            // live host slice of exactly the bytes copied; the copy completes before returning.
            Backing::Driver(_) => {
                unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, src) }
                    .map_err(drv("copy to the GPU failed"))
            }
            Backing::Emulator(_) => {
                // SAFETY: as above; emulated device memory is host memory of this allocation.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr() as *const u8,
                        (self.ptr + offset as u64) as *mut u8,
                        std::mem::size_of_val(src),
                    )
                };
                Ok(())
            }
        }
    }

    /// Copies from the buffer at byte `offset` into `dst` (synchronous: waits for queued kernels).
    #[allow(unsafe_code)]
    pub fn download<T: Copy>(&self, offset: usize, dst: &mut [T]) -> Result<(), CudaError> {
        self.check(offset, std::mem::size_of_val(dst))?;
        if dst.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        match &self.dev.kind {
            // SAFETY: the range lies inside this live allocation; `dst` is a live, exclusively
            // borrowed host slice of exactly the bytes copied (`T: Copy` has no invalid bit
            // patterns among the f32/f64/u32 values optc copies); the copy completes before
            // returning.
            Backing::Driver(_) => {
                unsafe { result::memcpy_dtoh_sync(dst, self.ptr + offset as u64) }
                    .map_err(drv("copy from the GPU failed"))
            }
            Backing::Emulator(_) => {
                // SAFETY: as above; emulated device memory is host memory of this allocation.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (self.ptr + offset as u64) as *const u8,
                        dst.as_mut_ptr() as *mut u8,
                        std::mem::size_of_val(dst),
                    )
                };
                Ok(())
            }
        }
    }

    /// Sets the first `count` 32-bit words to `value` (asynchronous on the legacy stream).
    #[allow(unsafe_code)]
    pub fn fill_u32(&self, value: u32, count: usize) -> Result<(), CudaError> {
        self.check(0, count.saturating_mul(4))?;
        self.dev.bind()?;
        match &self.dev.kind {
            // SAFETY: the range lies inside this live allocation (checked above).
            Backing::Driver(_) => unsafe { sys::cuMemsetD32_v2(self.ptr, value, count) }
                .result()
                .map_err(drv("memset on the GPU failed")),
            Backing::Emulator(_) => {
                // SAFETY: as above; allocations are 256-byte aligned, so u32-aligned.
                let words = unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u32, count) };
                words.fill(value);
                Ok(())
            }
        }
    }

    /// Copies `bytes` from `src` (device to device, ordered on the legacy stream).
    #[allow(unsafe_code)]
    pub fn copy_from(&self, src: &DeviceBuffer, bytes: usize) -> Result<(), CudaError> {
        self.check(0, bytes)?;
        src.check(0, bytes)?;
        if self.dev.is_emulator() != src.dev.is_emulator() {
            return Err(CudaError::Driver(
                "device-to-device copy between a GPU and the emulator".into(),
            ));
        }
        self.dev.bind()?;
        match &self.dev.kind {
            // SAFETY: both ranges lie inside live allocations of the same context (checked
            // above).
            Backing::Driver(_) => unsafe { result::memcpy_dtod_sync(self.ptr, src.ptr, bytes) }
                .map_err(drv("device-to-device copy failed")),
            Backing::Emulator(_) => {
                // SAFETY: as above; `copy` allows the two ranges to overlap.
                unsafe { std::ptr::copy(src.ptr as *const u8, self.ptr as *mut u8, bytes) };
                Ok(())
            }
        }
    }
}

/// NVRTC's CUBIN for a source and architecture, compiled once per process.
fn cubin(source: &str, arch: &str) -> Result<Arc<Vec<u8>>, CudaError> {
    type Memo = std::sync::Mutex<HashMap<(String, String), Arc<Vec<u8>>>>;
    static MEMO: OnceLock<Memo> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let key = (source.to_string(), arch.to_string());
    if let Some(c) = memo.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(c);
    }
    let c = Arc::new(super::nvrtc::compile_cubin(source, arch)?);
    if let Ok(mut m) = memo.lock() {
        m.insert(key, Arc::clone(&c));
    }
    Ok(c)
}

/// A program's kernels loaded on a device: a CUBIN in a GPU's context, or a library built for
/// the emulator.
enum Loaded {
    Driver {
        dev: Arc<Device>,
        module: sys::CUmodule,
        funcs: Vec<sys::CUfunction>,
    },
    Emulator(Arc<emulator::Library>),
}

/// One kernel, ready to launch.
#[derive(Clone, Copy)]
pub(super) enum Func {
    Driver(sys::CUfunction),
    Emulator(emulator::Launcher),
}

// SAFETY: module and function handles are plain driver handles, valid on any thread once the
// owning context is current (every use binds it first); they are never mutated after loading.
// Emulated launchers serialize their launches themselves.
#[allow(unsafe_code)]
unsafe impl Send for Loaded {}
// SAFETY: as above; launching a function from several threads is allowed by the driver.
#[allow(unsafe_code)]
unsafe impl Sync for Loaded {}

impl Drop for Loaded {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Loaded::Driver { dev, module, .. } = self {
            if dev.bind().is_ok() {
                // SAFETY: the module was loaded by `Loaded::new`, is unloaded only here, and
                // no launch can start after its owner is dropped.
                let _ = unsafe { result::module::unload(*module) };
            }
        }
    }
}

impl Loaded {
    #[allow(unsafe_code)]
    fn new(dev: &Arc<Device>, m: &CudaModule) -> Result<Loaded, CudaError> {
        if dev.is_emulator() {
            let names: Vec<&str> = m.kernels.iter().map(|k| k.name.as_str()).collect();
            return Ok(Loaded::Emulator(emulator::build(&m.source, &names)?));
        }
        let image = cubin(&m.source, dev.arch())?;
        dev.bind()?;
        // SAFETY: `image` is a complete CUBIN produced by NVRTC for this device's architecture,
        // alive for the call (the driver copies it).
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(drv("cannot load the compiled kernels"))?;
        let mut funcs = Vec::with_capacity(m.kernels.len());
        let mut loaded = Loaded::Driver {
            dev: Arc::clone(dev),
            module,
            funcs: Vec::new(),
        };
        for k in &m.kernels {
            let name = CString::new(k.name.as_str())
                .map_err(|_| CudaError::Driver(format!("bad kernel name {}", k.name)))?;
            // SAFETY: the module is loaded (and unloaded only when `loaded` drops).
            let f = unsafe { result::module::get_function(module, name) }
                .map_err(drv("a kernel is missing from the compiled module"))?;
            funcs.push(f);
        }
        if let Loaded::Driver { funcs: f, .. } = &mut loaded {
            *f = funcs;
        }
        Ok(loaded)
    }

    fn func(&self, i: usize) -> Option<Func> {
        match self {
            Loaded::Driver { funcs, .. } => funcs.get(i).copied().map(Func::Driver),
            Loaded::Emulator(lib) => lib.launcher(i).map(Func::Emulator),
        }
    }
}

/// A program's kernels compiled for one device: with per-launch scalar arguments (used while all
/// parameter groups agree on them) and, compiled the first time groups disagree, with every
/// uniform in the per-tensor table.
pub struct GpuProgram {
    pub(super) program: Arc<Program>,
    precision: Precision,
    storage: gen::StorageMap,
    pub(super) dev: Arc<Device>,
    split: (CudaModule, Loaded),
    per_tensor: OnceLock<Result<(CudaModule, Loaded), CudaError>>,
    index: HashMap<[usize; 4], usize>,
}

impl std::fmt::Debug for GpuProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuProgram({} kernels on {:?})",
            self.split.0.kernels.len(),
            self.dev
        )
    }
}

impl GpuProgram {
    /// Compiles (NVRTC, to CUBIN for the device's architecture) and loads a program's kernels,
    /// with buffers stored as `storage` says.
    pub fn compile(
        program: &Arc<Program>,
        precision: Precision,
        dev: &Arc<Device>,
        storage: &gen::StorageMap,
    ) -> Result<GpuProgram, CudaError> {
        let m = gen::module_stored(program, precision, false, storage)
            .map_err(|e| CudaError::Driver(e.to_string()))?;
        let loaded = Loaded::new(dev, &m)?;
        let index = m
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| ([k.variant, k.stage, k.phase, k.kernel], i))
            .collect();
        Ok(GpuProgram {
            program: Arc::clone(program),
            precision,
            storage: storage.clone(),
            dev: Arc::clone(dev),
            split: (m, loaded),
            per_tensor: OnceLock::new(),
            index,
        })
    }

    /// The kernel descriptions (per-launch arguments variant), in program order.
    pub fn kernels(&self) -> &[CudaKernel] {
        &self.split.0.kernels
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// How its buffers are stored.
    pub fn storage(&self) -> &gen::StorageMap {
        &self.storage
    }

    /// The kernel at `[variant, stage, phase, kernel]`, in the split or the all-per-tensor form.
    pub(super) fn kernel(
        &self,
        at: [usize; 4],
        per_tensor: bool,
    ) -> Result<(&CudaKernel, Func), CudaError> {
        let i = *self
            .index
            .get(&at)
            .ok_or_else(|| CudaError::Driver(format!("no kernel at {at:?}")))?;
        let (m, l) = if per_tensor {
            match self.per_tensor.get_or_init(|| {
                let m = gen::module_stored(&self.program, self.precision, true, &self.storage)
                    .map_err(|e| CudaError::Driver(e.to_string()))?;
                let l = Loaded::new(&self.dev, &m)?;
                Ok((m, l))
            }) {
                Ok((m, l)) => (m, l),
                Err(e) => return Err(e.clone()),
            }
        } else {
            (&self.split.0, &self.split.1)
        };
        let f = l
            .func(i)
            .ok_or_else(|| CudaError::Driver(format!("no function for kernel {i}")))?;
        Ok((&m.kernels[i], f))
    }
}
