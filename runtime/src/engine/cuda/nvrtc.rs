//! NVRTC through cudarc: CUDA C (from `optc_compiler::backend::cuda`) to PTX or CUBIN, with an
//! on-disk PTX cache; and whether a CUDA driver is present.
//!
//! cudarc is built with `dynamic-loading`: nothing links against CUDA, so this module builds and
//! its callers run on machines without CUDA. cudarc panics when a library (or one of its symbols)
//! cannot be loaded, so [`Nvrtc::load`] first repeats cudarc's own search with `libloading`,
//! checks every symbol this module calls, and returns [`CudaError::NvrtcMissing`] instead.
//!
//! Where the library comes from: `$OPTC_NVRTC_LIB` (a path to `libnvrtc.so.13`) if set, else
//! cudarc's search by name (`libnvrtc.so`, `libnvrtc.so.13`, ...), which the dynamic loader
//! resolves through `LD_LIBRARY_PATH` and the system's library paths. A library opened by path
//! stays loaded for the life of the process, so cudarc's search by name finds it (same soname);
//! the first NVRTC a process loads is the one it keeps.

#![allow(unsafe_code)] // foreign calls into NVRTC and the CUDA driver

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

/// Environment variable naming the NVRTC library file to load.
pub const NVRTC_LIB_ENV: &str = "OPTC_NVRTC_LIB";
/// Environment variable naming the PTX cache directory.
pub const CACHE_DIR_ENV: &str = "OPTC_CACHE_DIR";

/// What can go wrong compiling CUDA C or finding CUDA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// The NVRTC library could not be loaded (or lacks a function optc calls).
    #[error("NVRTC is not available: {0}")]
    NvrtcMissing(String),
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error("the CUDA driver is not available: {0}")]
    DriverMissing(String),
    /// An architecture name NVRTC would not understand.
    #[error("bad GPU architecture `{0}`: expected sm_XY (for example sm_80, sm_90)")]
    Arch(String),
    /// NVRTC rejected the source; `log` is NVRTC's program log.
    #[error("NVRTC could not compile the kernels for {arch} ({status}):\n{log}")]
    Compile {
        /// The architecture.
        arch: String,
        /// NVRTC's status code.
        status: String,
        /// NVRTC's log.
        log: String,
    },
    /// Any other NVRTC failure.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// The CUDA driver reported an error (no GPU, out of memory, a failed launch, ...).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// The CUDA emulator failed (no C++ compiler, a kernel that did not build, a kernel that
    /// wrote out of bounds, ...).
    #[error("CUDA emulator: {0}")]
    Emulator(String),
}

/// Symbols of libnvrtc this module calls (through cudarc).
const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
];

/// An error with its sources (libloading puts dlerror's message in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// The file names cudarc tries, in its order.
fn candidates(lib: &str) -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates(lib);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Opens the first library cudarc would open, and checks it has `symbols`.
fn probe(lib: &str, symbols: &[&str]) -> Result<(), String> {
    let names = candidates(lib);
    for name in &names {
        // SAFETY: loading a shared library runs its initializers; NVIDIA's libraries are the
        // ones cudarc loads by the same names anyway.
        let Ok(l) = (unsafe { libloading::Library::new(name) }) else {
            continue;
        };
        for s in symbols {
            // SAFETY: only looks the symbol up; the pointer is never called here.
            if unsafe { l.get::<*const ()>(s.as_bytes()) }.is_err() {
                return Err(format!("`{name}` has no function `{s}`"));
            }
        }
        return Ok(());
    }
    Err(format!(
        "none of {} could be loaded{}",
        names.join(", "),
        if lib == "nvrtc" {
            format!("; put the folder holding libnvrtc.so.13 on LD_LIBRARY_PATH or set {NVRTC_LIB_ENV} to the file")
        } else {
            " (is an NVIDIA driver installed?)".to_string()
        }
    ))
}

/// A loaded NVRTC library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nvrtc {
    version: (i32, i32),
}

impl Nvrtc {
    /// Loads NVRTC from `$OPTC_NVRTC_LIB` if set, else by cudarc's search by name.
    pub fn load() -> Result<Nvrtc, CudaError> {
        let path = std::env::var_os(NVRTC_LIB_ENV).filter(|p| !p.is_empty());
        Nvrtc::load_from(path.as_deref().map(Path::new))
    }

    /// Loads NVRTC from a file (`Some`) or by cudarc's search by name (`None`).
    pub fn load_from(path: Option<&Path>) -> Result<Nvrtc, CudaError> {
        if let Some(path) = path {
            // SAFETY: as in `probe`.
            let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
                CudaError::NvrtcMissing(format!("{}: {}", path.display(), chain(&e)))
            })?;
            for s in NVRTC_SYMBOLS {
                // SAFETY: only looks the symbol up.
                if unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err() {
                    return Err(CudaError::NvrtcMissing(format!(
                        "{} has no function `{s}`: is it libnvrtc?",
                        path.display()
                    )));
                }
            }
            // NVRTC loads its builtins library by name at compile time: open the one beside it
            // first (if there is one), so the folder need not be on LD_LIBRARY_PATH.
            if let Some(dir) = path.parent() {
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with("libnvrtc-builtins.so") {
                            // SAFETY: as above; kept loaded like the library itself.
                            if let Ok(b) = unsafe { libloading::Library::new(e.path()) } {
                                std::mem::forget(b);
                            }
                        }
                    }
                }
            }
            // Keep it loaded for the process: cudarc's search by name resolves to it.
            std::mem::forget(lib);
        }
        probe("nvrtc", NVRTC_SYMBOLS).map_err(CudaError::NvrtcMissing)?;
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: the library is present and has the symbol (checked above); both pointers are valid.
        unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
        Ok(Nvrtc {
            version: (major, minor),
        })
    }

    /// NVRTC's version (major, minor).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// Compiles CUDA C to PTX for `arch` (`sm_90` compiles for the virtual `compute_90`).
    pub fn compile_ptx(&self, source: &str, arch: &str) -> Result<Ptx, CudaError> {
        let n = arch_number(arch)?;
        let bytes = compile(source, arch, &format!("compute_{n}"), Output::Ptx)?;
        Ok(Ptx {
            text: ptx_text(bytes)?,
            arch: arch.to_string(),
            cached: false,
        })
    }

    /// Like [`Nvrtc::compile_ptx`], through an on-disk cache keyed by the source, the
    /// architecture, the NVRTC options and NVRTC's version.
    pub fn compile_ptx_cached(
        &self,
        source: &str,
        arch: &str,
        cache: &PtxCache,
    ) -> Result<Ptx, CudaError> {
        arch_number(arch)?;
        let key = cache_key(source, arch, self.version);
        if let Some(text) = cache.get(&key) {
            return Ok(Ptx {
                text,
                arch: arch.to_string(),
                cached: true,
            });
        }
        let ptx = self.compile_ptx(source, arch)?;
        cache.put(&key, &ptx.text);
        Ok(ptx)
    }

    /// Compiles CUDA C to machine code (CUBIN) for a real architecture such as `sm_90`.
    pub fn compile_cubin(&self, source: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
        let n = arch_number(arch)?;
        compile(source, arch, &format!("sm_{n}"), Output::Cubin)
    }
}

/// PTX text compiled by NVRTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ptx {
    /// The PTX.
    pub text: String,
    /// The architecture it was compiled for.
    pub arch: String,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// Compiles CUDA C to PTX, loading NVRTC as [`Nvrtc::load`] does.
pub fn compile_ptx(source: &str, arch: &str) -> Result<Ptx, CudaError> {
    Nvrtc::load()?.compile_ptx(source, arch)
}

/// Compiles CUDA C to CUBIN for `arch` (`sm_80`, `sm_90`), loading NVRTC as [`Nvrtc::load`] does.
pub fn compile_cubin(source: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
    Nvrtc::load()?.compile_cubin(source, arch)
}

/// The number of `sm_XY` / `compute_XY` (with an optional `a`/`f` suffix kept out).
fn arch_number(arch: &str) -> Result<String, CudaError> {
    let bad = || CudaError::Arch(arch.to_string());
    let rest = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .ok_or_else(bad)?;
    let digits = rest.trim_end_matches(['a', 'f']);
    if digits.len() < 2
        || digits.len() > 3
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || rest.len() > digits.len() + 1
    {
        return Err(bad());
    }
    Ok(rest.to_string())
}

enum Output {
    Ptx,
    Cubin,
}

/// Destroys an NVRTC program when dropped.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program` and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn compile(source: &str, arch: &str, target: &str, out: Output) -> Result<Vec<u8>, CudaError> {
    let src = CString::new(source)
        .map_err(|_| CudaError::Nvrtc("the source holds a NUL byte".to_string()))?;
    let name = c"optc_kernels.cu";
    let prog = Program(
        nvrtc::create_program(&src, Some(name))
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcCreateProgram: {e:?}")))?,
    );
    let mut options: Vec<String> = optc_compiler::backend::cuda::NVRTC_OPTIONS
        .iter()
        .map(|s| s.to_string())
        .collect();
    options.push(format!("--gpu-architecture={target}"));
    // SAFETY: `prog` is a live program; the options hold no NUL byte.
    let compiled = unsafe { nvrtc::compile_program(prog.0, &options) };
    if let Err(e) = compiled {
        // SAFETY: `prog` is live.
        let log = unsafe { nvrtc::get_program_log(prog.0) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_else(|e| format!("(no log: {e:?})"));
        return Err(CudaError::Compile {
            arch: arch.to_string(),
            status: format!("{:?}", e.0),
            log,
        });
    }
    match out {
        Output::Ptx => {
            // SAFETY: `prog` is live and compiled.
            let ptx = unsafe { nvrtc::get_ptx(prog.0) }
                .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetPTX: {e:?}")))?;
            Ok(ptx.into_iter().map(|c| c as u8).collect())
        }
        Output::Cubin => {
            let mut size = 0usize;
            // SAFETY: `prog` is live and compiled; `size` is a valid out pointer.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
                .result()
                .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut buf = vec![0u8; size];
            // SAFETY: `buf` holds the `size` bytes NVRTC writes.
            unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char) }
                .result()
                .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetCUBIN: {e:?}")))?;
            Ok(buf)
        }
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn ptx_text(mut bytes: Vec<u8>) -> Result<String, CudaError> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| CudaError::Nvrtc("PTX is not UTF-8".to_string()))
}

pub(crate) use crate::engine::fnv128;

/// The cache key of a PTX: source, architecture, NVRTC options and NVRTC's version.
pub fn cache_key(source: &str, arch: &str, version: (i32, i32)) -> String {
    let options = optc_compiler::backend::cuda::NVRTC_OPTIONS.join(" ");
    let version = format!("{}.{}", version.0, version.1);
    let h = fnv128(&[
        source.as_bytes(),
        arch.as_bytes(),
        options.as_bytes(),
        version.as_bytes(),
    ]);
    format!("{h:032x}")
}

/// An on-disk PTX cache: one file per key, written atomically (a temporary file, then a rename).
/// A cache that cannot be read or written is skipped silently: it only saves time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxCache {
    dir: Option<PathBuf>,
}

impl PtxCache {
    /// A cache in `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> PtxCache {
        PtxCache {
            dir: Some(dir.into()),
        }
    }

    /// No cache.
    pub fn disabled() -> PtxCache {
        PtxCache { dir: None }
    }

    /// `$OPTC_CACHE_DIR`, else `$XDG_CACHE_HOME/optc/ptx`, else `$HOME/.cache/optc/ptx`, else none.
    pub fn default_location() -> PtxCache {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = var(CACHE_DIR_ENV)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("optc").join("ptx")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("optc").join("ptx")));
        PtxCache { dir }
    }

    /// The directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{key}.ptx")))
    }

    /// The cached PTX of a key.
    pub fn get(&self, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.path(key)?).ok()?;
        // A file holding less than a PTX module header is not one of ours.
        text.contains(".version").then_some(text)
    }

    /// Stores a PTX (best effort).
    pub fn put(&self, key: &str, text: &str) {
        let (Some(dir), Some(path)) = (&self.dir, self.path(key)) else {
            return;
        };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded, checked without cudarc's panicking
/// loader; `Err` says why not.
pub fn driver_present() -> Result<(), CudaError> {
    driver_symbols_present(&["cuInit", "cuDeviceGetCount"])
}

/// Whether libcuda can be loaded and has every one of `symbols` (so cudarc's loader, which
/// panics on a missing symbol, will find them).
pub fn driver_symbols_present(symbols: &[&str]) -> Result<(), CudaError> {
    probe("cuda", symbols).map_err(CudaError::DriverMissing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures() {
        assert_eq!(arch_number("sm_90").unwrap(), "90");
        assert_eq!(arch_number("sm_90a").unwrap(), "90a");
        assert_eq!(arch_number("compute_80").unwrap(), "80");
        assert_eq!(arch_number("sm_100").unwrap(), "100");
        for bad in [
            "", "sm_", "sm_9", "90", "sm_90ab", "sm_9x", "gfx90a", "sm_1000",
        ] {
            assert_eq!(
                arch_number(bad),
                Err(CudaError::Arch(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn cache_keys_depend_on_everything() {
        let k = cache_key("src", "sm_90", (13, 0));
        assert_eq!(k.len(), 32);
        assert_eq!(k, cache_key("src", "sm_90", (13, 0)));
        assert_ne!(k, cache_key("src2", "sm_90", (13, 0)));
        assert_ne!(k, cache_key("src", "sm_80", (13, 0)));
        assert_ne!(k, cache_key("src", "sm_90", (13, 1)));
        // Parts are separated: moving a byte between them changes the key.
        assert_ne!(cache_key("ab", "c", (1, 0)), cache_key("a", "bc", (1, 0)));
    }

    #[test]
    fn cache_round_trip_is_atomic_and_validated() {
        let dir = std::env::temp_dir().join(format!("optc-ptx-cache-test-{}", std::process::id()));
        let cache = PtxCache::in_dir(&dir);
        assert_eq!(cache.get("k"), None);
        cache.put("k", "// ptx\n.version 8.0\n");
        assert_eq!(cache.get("k").as_deref(), Some("// ptx\n.version 8.0\n"));
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["k.ptx".to_string()]);
        // A file that is not PTX is a miss.
        std::fs::write(dir.join("bad.ptx"), "garbage").unwrap();
        assert_eq!(cache.get("bad"), None);
        assert_eq!(PtxCache::disabled().get("k"), None);
        PtxCache::disabled().put("k", "x");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
