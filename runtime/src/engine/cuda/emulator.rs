//! The CUDA emulator behind [`crate::device::Device::emulator`]: the GPU backend's own generated
//! CUDA C, built by the host's C++ compiler against a small CUDA shim (`emulator/shim.h`) into a
//! shared library, and its kernels launched on the CPU with the same launch tables, argument
//! lists and host logic as on a GPU. It exists to test the GPU path on machines without one
//! (CI): everything but the driver calls and NVIDIA's code generation runs for real.
//!
//! - **Execution.** A launch runs the grid's blocks one after another; a block's 256 threads are
//!   fibers on the calling thread that switch at `__syncthreads()`, so a block's threads run in
//!   thread order between barriers. A barrier that some threads of a block never reach is an
//!   error. Arithmetic is the host's IEEE arithmetic without contraction (`-ffp-contract=off`),
//!   like the GPU's with optc's NVRTC options; math functions are the host's libm, which may
//!   differ from CUDA's by a few ulp.
//! - **Memory.** "Device" memory is host memory, 256-byte aligned like `cuMemAlloc`'s. A new
//!   allocation is filled with `0xff` bytes (NaN), so a kernel that reads memory nothing wrote
//!   shows up as NaN rather than as a lucky zero; each is followed by a guard zone checked
//!   after every launch, so a kernel writing past the end of a buffer is an error naming it.
//!   Device addresses are host addresses: [`crate::Optimizer::step_device`] takes pointers into
//!   host memory here.
//! - **Compiler.** `$OPTC_CXX`, else the first of `c++`, `g++`, `clang++` that runs. None is a
//!   [`CudaError::Emulator`], never a panic.

use super::nvrtc::CudaError;
use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

/// The environment variable naming the C++ compiler the emulator uses.
pub const CXX_ENV: &str = "OPTC_CXX";

/// The shim the generated source is compiled against.
pub const SHIM: &str = include_str!("emulator/shim.h");

/// Options the C++ compiler is run with (besides output and input paths): optimized, no
/// contraction or fast math, as the GPU kernels are compiled.
pub const CXX_OPTIONS: &[&str] = &[
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-strict-aliasing",
    "-w",
];

/// Bytes of the guard zone after every allocation.
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xa5;
/// Alignment of allocations (as `cuMemAlloc`'s).
const ALIGN: usize = 256;

/// A launcher exported by an emulated module: `(grid, threads, params) -> status`.
pub(crate) type Launcher = unsafe extern "C" fn(u32, u32, *mut *mut c_void) -> i32;

/// The host C++ compiler, as found.
#[derive(Debug, Clone)]
pub struct Compiler {
    path: PathBuf,
    version: String,
}

impl Compiler {
    /// Finds the C++ compiler (`$OPTC_CXX`, else `c++`, `g++`, `clang++`).
    pub fn find() -> Result<Compiler, CudaError> {
        static FOUND: OnceLock<Result<Compiler, CudaError>> = OnceLock::new();
        FOUND
            .get_or_init(|| {
                let named = std::env::var_os(CXX_ENV).filter(|v| !v.is_empty());
                let candidates: Vec<PathBuf> = match named {
                    Some(p) => vec![PathBuf::from(p)],
                    None => ["c++", "g++", "clang++"]
                        .iter()
                        .map(PathBuf::from)
                        .collect(),
                };
                for c in &candidates {
                    if let Ok(out) = Command::new(c).arg("--version").output() {
                        if out.status.success() {
                            let text = String::from_utf8_lossy(&out.stdout);
                            return Ok(Compiler {
                                path: c.clone(),
                                version: text.lines().next().unwrap_or("").trim().to_string(),
                            });
                        }
                    }
                }
                let names: Vec<String> =
                    candidates.iter().map(|c| c.display().to_string()).collect();
                Err(CudaError::Emulator(format!(
                    "no C++ compiler found (tried {}; set {CXX_ENV})",
                    names.join(", ")
                )))
            })
            .clone()
    }

    /// The compiler's first line of `--version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The command it runs.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The full translation unit for the host compiler: the shim, the generated source and one
/// exported launcher per kernel.
pub fn translation_unit(source: &str, kernels: &[&str]) -> String {
    let mut tu = String::with_capacity(SHIM.len() + source.len() + 64 * kernels.len());
    tu.push_str(SHIM);
    tu.push_str("\n// ---- generated CUDA C ----\n");
    tu.push_str(source);
    tu.push_str("\n// ---- launchers ----\n");
    for k in kernels {
        tu.push_str(&format!("OPTC_EMU_EXPORT({k})\n"));
    }
    tu
}

/// A module built by the host compiler and loaded: one launcher per kernel, in kernel order.
pub(crate) struct Library {
    launchers: Vec<Launcher>,
    _lib: libloading::Library,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "emulated module ({} kernels)", self.launchers.len())
    }
}

impl Library {
    pub(crate) fn launcher(&self, i: usize) -> Option<Launcher> {
        self.launchers.get(i).copied()
    }
}

/// Builds and loads `source`'s kernels (memoized per process by source). Concurrent calls for
/// the same source wait for one build; calls for different sources build in parallel, each in a
/// folder of its own.
pub(crate) fn build(source: &str, kernels: &[&str]) -> Result<Arc<Library>, CudaError> {
    type Cell = Arc<OnceLock<Result<Arc<Library>, CudaError>>>;
    static MEMO: OnceLock<Mutex<HashMap<String, Cell>>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let cell: Cell = {
        let mut m = memo
            .lock()
            .map_err(|_| CudaError::Emulator("the emulator's module table is poisoned".into()))?;
        Arc::clone(m.entry(source.to_string()).or_default())
    };
    let result = cell.get_or_init(|| build_uncached(source, kernels)).clone();
    if result.is_err() {
        // A failed build is not remembered: the next call tries again.
        if let Ok(mut m) = memo.lock() {
            if m.get(source).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(source);
            }
        }
    }
    result
}

#[allow(unsafe_code)] // loads the library just built and looks its launchers up
fn build_uncached(source: &str, kernels: &[&str]) -> Result<Arc<Library>, CudaError> {
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let cxx = Compiler::find()?;
    let tu = translation_unit(source, kernels);
    let key = super::nvrtc::fnv128(&[tu.as_bytes(), cxx.version.as_bytes()]);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "optc-emulator-{}-{n}-{key:032x}",
        std::process::id()
    ));
    let fail = |what: &str, e: std::io::Error| {
        CudaError::Emulator(format!("{what} {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail("cannot create", e))?;
    let src_path = dir.join("kernels.cpp");
    let lib_path = dir.join("kernels.so");
    let result = (|| {
        std::fs::write(&src_path, &tu).map_err(|e| fail("cannot write into", e))?;
        let out = Command::new(&cxx.path)
            .args(CXX_OPTIONS)
            .arg("-o")
            .arg(&lib_path)
            .arg(&src_path)
            .output()
            .map_err(|e| CudaError::Emulator(format!("cannot run {}: {e}", cxx.path.display())))?;
        if !out.status.success() {
            return Err(CudaError::Emulator(format!(
                "{} could not compile the kernels:\n{}",
                cxx.path.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // SAFETY: the library was just built from the shim and generated kernels; its only
        // initializers are those of the C++ standard library it links.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| CudaError::Emulator(format!("cannot load the built kernels: {e}")))?;
        let mut launchers = Vec::with_capacity(kernels.len());
        for k in kernels {
            let name = format!("optc_emu_launch_{k}");
            // SAFETY: OPTC_EMU_EXPORT defines every launcher with exactly this signature.
            let f = unsafe { lib.get::<Launcher>(name.as_bytes()) }
                .map_err(|e| CudaError::Emulator(format!("no launcher for {k}: {e}")))?;
            launchers.push(*f);
        }
        Ok(Library {
            launchers,
            _lib: lib,
        })
    })();
    // The loaded library stays mapped after its file is removed.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Arc::new(result?))
}

/// The emulated device's memory: live allocations, each followed by a guard zone.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    /// Address -> requested size in bytes.
    live: Mutex<BTreeMap<u64, usize>>,
}

impl Memory {
    fn layout(bytes: usize) -> Result<Layout, CudaError> {
        bytes
            .checked_add(GUARD)
            .and_then(|n| Layout::from_size_align(n, ALIGN).ok())
            .ok_or_else(|| CudaError::Emulator(format!("cannot allocate {bytes} bytes")))
    }

    /// Allocates `bytes` (> 0) filled with 0xff, followed by a guard zone.
    #[allow(unsafe_code)]
    pub(crate) fn alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        let layout = Self::layout(bytes)?;
        // SAFETY: the layout has a nonzero size (GUARD > 0).
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(CudaError::Emulator(format!(
                "out of memory allocating {bytes} bytes"
            )));
        }
        // SAFETY: `p` points at `bytes + GUARD` writable bytes just allocated.
        unsafe {
            std::ptr::write_bytes(p, 0xff, bytes);
            std::ptr::write_bytes(p.add(bytes), GUARD_BYTE, GUARD);
        }
        let addr = p as u64;
        if let Ok(mut live) = self.live.lock() {
            live.insert(addr, bytes);
        }
        Ok(addr)
    }

    /// Frees an allocation made by [`Memory::alloc`] (unknown addresses are ignored).
    #[allow(unsafe_code)]
    pub(crate) fn free(&self, addr: u64) {
        let Some(bytes) = self.live.lock().ok().and_then(|mut l| l.remove(&addr)) else {
            return;
        };
        if let Ok(layout) = Self::layout(bytes) {
            // SAFETY: `addr` was returned by `alloc` with this layout and was live (removed
            // from the registry just now, so it is freed once).
            unsafe { std::alloc::dealloc(addr as *mut u8, layout) };
        }
    }

    /// Checks every live allocation's guard zone: the first one overwritten, as an error.
    #[allow(unsafe_code)]
    pub(crate) fn check_guards(&self) -> Result<(), String> {
        let Ok(live) = self.live.lock() else {
            return Ok(());
        };
        for (&addr, &bytes) in live.iter() {
            // SAFETY: the allocation is live and has `GUARD` bytes after its `bytes`.
            let guard =
                unsafe { std::slice::from_raw_parts((addr as *const u8).add(bytes), GUARD) };
            if let Some(i) = guard.iter().position(|&b| b != GUARD_BYTE) {
                return Err(format!(
                    "a kernel wrote past the end of a buffer of {bytes} bytes at {addr:#x} (byte {} after it)",
                    i
                ));
            }
        }
        Ok(())
    }
}

/// The meaning of a launcher's status.
pub(crate) fn status(code: i32) -> Result<(), CudaError> {
    match code {
        0 => Ok(()),
        1 => Err(CudaError::Emulator("no memory for the fiber stacks".into())),
        2 => Err(CudaError::Emulator(
            "__syncthreads() reached by some threads of a block and not by others".into(),
        )),
        3 => Err(CudaError::Emulator("bad block size".into())),
        c => Err(CudaError::Emulator(format!("launch status {c}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_catch_a_write_past_the_end() {
        let m = Memory::default();
        let a = m.alloc(10).unwrap();
        assert_eq!(a % ALIGN as u64, 0);
        assert!(m.check_guards().is_ok());
        #[allow(unsafe_code)]
        // SAFETY: byte 10 lies in the guard zone of this live allocation.
        unsafe {
            *((a + 10) as *mut u8) = 0
        };
        let e = m.check_guards().unwrap_err();
        assert!(e.contains("10 bytes"), "{e}");
        m.free(a);
        assert!(m.check_guards().is_ok());
    }

    #[test]
    fn new_memory_reads_as_nan() {
        let m = Memory::default();
        let a = m.alloc(8).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: the allocation holds 8 bytes.
        let v = unsafe { *(a as *const f64) };
        assert!(v.is_nan());
        m.free(a);
    }
}
