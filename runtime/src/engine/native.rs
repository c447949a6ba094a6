//! The native CPU engine: every kernel of a program as C (`optc_compiler::backend::c`), compiled
//! by the system C compiler (`$OPTC_CC`, else `cc`, `gcc`, `clang`) into a shared library for
//! the machine it runs on (`-march=native`: AVX2 or AVX-512 vector code), loaded at run time.
//!
//! The kernels have the Cranelift kernels' ABI, so the Cranelift engine's host runs them: tasks,
//! batches on the thread pool, partials combined in task order, 16-bit buffers held by the engine
//! and lent 16-bit params updated in place ([`super::cranelift::Cranelift::native`]). Only the
//! code generator differs.
//!
//! **The cache.** A library is stored as `<key>.so` in `$OPTC_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/optc/native`, else `$HOME/.cache/optc/native`; the key hashes the source,
//! the compiler flags, the compiler's version and the CPU (its model and feature flags). Builds
//! happen in a folder of their own beside the cache entries and are renamed into place, so
//! concurrent builds are safe and an entry is whole or absent. An entry is used only after it
//! loaded and its `optc_module_key` symbol holds its key and its kernel count matches; anything
//! else (a corrupt file, another library) is refused and rebuilt. It keeps at most
//! `$OPTC_NATIVE_CACHE_ENTRIES` (default 1024) libraries, evicting the least recently used.

#![allow(unsafe_code)] // loading and calling machine code the C compiler built

use super::cranelift::{math_address, storage_address, Code, JitKernel, JitProgram, KernelFn};
use optc_compiler::backend::c::{self, Import};
use optc_compiler::backend::clif::{Precision, StorageFn};
use optc_compiler::ir::Program;
use optc_compiler::storage::StorageMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The environment variable naming the C compiler.
pub const CC_ENV: &str = "OPTC_CC";
/// The environment variable naming the cache folder (shared with the PTX cache).
pub const CACHE_DIR_ENV: &str = "OPTC_CACHE_DIR";

/// Why the native engine cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NativeError {
    /// No C compiler that can build a shared library was found.
    #[error("native backend: no working C compiler ({0})")]
    NoCompiler(String),
    /// The compiler failed on the kernels, or the library could not be loaded.
    #[error("native backend: {0}")]
    Build(String),
}

/// A working C compiler, its version and the machine it builds for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolchain {
    path: PathBuf,
    version: String,
    machine: String,
}

static BUILDS: AtomicU64 = AtomicU64::new(0);

/// A folder of its own for one build, under `parent`.
fn build_dir(parent: &Path, tag: &str) -> std::io::Result<PathBuf> {
    loop {
        let d = parent.join(format!(
            ".build-{}-{}-{tag}",
            std::process::id(),
            BUILDS.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::create_dir_all(parent).and_then(|_| std::fs::create_dir(&d)) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The CPU the libraries are built for: its model and feature flags (`/proc/cpuinfo`), or the
/// architecture where those are unknown.
fn machine() -> String {
    let mut m = std::env::consts::ARCH.to_string();
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        for key in ["model name", "flags", "Features"] {
            if let Some(l) = info.lines().find(|l| l.starts_with(key)) {
                m.push('\n');
                m.push_str(l);
            }
        }
    }
    m
}

impl Toolchain {
    /// The first compiler of `$OPTC_CC`, else `cc`, `gcc`, `clang`, that builds a shared library
    /// (checked once per process).
    pub fn find() -> Result<Arc<Toolchain>, NativeError> {
        static FOUND: OnceLock<Result<Arc<Toolchain>, NativeError>> = OnceLock::new();
        FOUND
            .get_or_init(|| {
                let named = std::env::var_os(CC_ENV).filter(|v| !v.is_empty());
                let candidates: Vec<PathBuf> = match named {
                    Some(p) => vec![PathBuf::from(p)],
                    None => ["cc", "gcc", "clang"].iter().map(PathBuf::from).collect(),
                };
                let mut why = Vec::new();
                for c in &candidates {
                    match Toolchain::probe(c) {
                        Ok(t) => return Ok(Arc::new(t)),
                        Err(e) => why.push(format!("{}: {e}", c.display())),
                    }
                }
                Err(NativeError::NoCompiler(format!(
                    "{}; set {CC_ENV}",
                    why.join("; ")
                )))
            })
            .clone()
    }

    /// `cc` if it reports a version and builds a small shared library.
    fn probe(cc: &Path) -> Result<Toolchain, String> {
        let out = Command::new(cc)
            .arg("--version")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err("`--version` failed".into());
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let t = Toolchain {
            path: cc.to_path_buf(),
            version,
            machine: machine(),
        };
        let dir = build_dir(&std::env::temp_dir(), "probe").map_err(|e| e.to_string())?;
        let r = t.build(
            &dir,
            "#include <stdint.h>\n#include <math.h>\nint optc_probe(void) { return 1; }\n",
        );
        let _ = std::fs::remove_dir_all(&dir);
        r.map(|_| t)
    }

    /// The compiler's first line of `--version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The command it runs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compiles `source` into `dir/kernels.so`; the library's path.
    fn build(&self, dir: &Path, source: &str) -> Result<PathBuf, String> {
        let src = dir.join("kernels.c");
        let lib = dir.join("kernels.so");
        std::fs::write(&src, source).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
        let out = Command::new(&self.path)
            .args(c::C_FLAGS)
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} could not compile the kernels:\n{}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(lib)
    }
}

/// Where built libraries are kept. A cache that cannot be read or written is skipped: it only
/// saves time.
///
/// **Eviction.** The cache holds at most [`NativeCache::max_entries`] libraries: after a build
/// adds one, the least recently used entries beyond that are removed (a load from the cache
/// marks an entry used by setting its modification time). Removing the file of a library some
/// process has loaded is safe: the loaded copy stays mapped until that process unloads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeCache {
    dir: Option<PathBuf>,
    max_entries: usize,
}

/// The environment variable bounding the number of cached libraries.
pub const CACHE_ENTRIES_ENV: &str = "OPTC_NATIVE_CACHE_ENTRIES";

/// Cached libraries kept by default (each a few tens of kilobytes).
pub const DEFAULT_CACHE_ENTRIES: usize = 1024;

impl NativeCache {
    /// A cache in `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> NativeCache {
        NativeCache {
            dir: Some(dir.into()),
            max_entries: DEFAULT_CACHE_ENTRIES,
        }
    }

    /// No cache: every compile builds.
    pub fn disabled() -> NativeCache {
        NativeCache {
            dir: None,
            max_entries: DEFAULT_CACHE_ENTRIES,
        }
    }

    /// The same cache holding at most `n` libraries (at least 1).
    pub fn with_max_entries(mut self, n: usize) -> NativeCache {
        self.max_entries = n.max(1);
        self
    }

    /// How many libraries it keeps.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Marks an entry used now (for eviction); best effort.
    fn touch(path: &Path) {
        if let Ok(f) = std::fs::File::options().append(true).open(path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Removes the least recently used entries beyond [`NativeCache::max_entries`], never
    /// `keep` (the entry just added); best effort (another process may evict at the same time).
    fn evict(&self, keep: &Path) {
        let Some(dir) = &self.dir else { return };
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = read
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.len() == 35 && name.ends_with(".so") && !name.starts_with('.')
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= self.max_entries {
            return;
        }
        entries.sort();
        let excess = entries.len() - self.max_entries;
        for (_, path) in entries.into_iter().filter(|(_, p)| p != keep).take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// `$OPTC_CACHE_DIR`, else `$XDG_CACHE_HOME/optc/native`, else `$HOME/.cache/optc/native`.
    pub fn default_location() -> NativeCache {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let dir = var(CACHE_DIR_ENV)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("optc").join("native")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("optc").join("native")));
        let max_entries = std::env::var(CACHE_ENTRIES_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_CACHE_ENTRIES)
            .max(1);
        NativeCache { dir, max_entries }
    }

    /// The folder, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The entry of a key.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{key}.so")))
    }
}

/// The cache key of a module's source built by `tc`.
pub fn cache_key(source: &str, tc: &Toolchain) -> String {
    let flags = c::C_FLAGS.join(" ");
    let h = super::fnv128(&[
        source.as_bytes(),
        flags.as_bytes(),
        tc.version.as_bytes(),
        tc.machine.as_bytes(),
    ]);
    format!("{h:032x}")
}

/// A loaded library of kernels (kept alive while its kernels may run).
pub(crate) struct Library {
    _lib: libloading::Library,
}

/// Loads `path` and checks that it is the library of `key` with `kernels` kernels; their
/// functions, after `optc_init` got the imports.
fn load(path: &Path, key: &str, module: &c::CModule) -> Result<(Library, Vec<KernelFn>), String> {
    // SAFETY: a library optc built (from generated C that has no initializers) or a cache entry
    // named by its key; what it is is checked below before any of its functions is called.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
    // SAFETY: `optc_module_key` is a NUL-terminated char array in optc's libraries; a foreign
    // library without it fails the lookup.
    let found = unsafe {
        let p = lib
            .get::<*const std::ffi::c_char>(b"optc_module_key\0")
            .map_err(|e| e.to_string())?;
        std::ffi::CStr::from_ptr(*p as *const std::ffi::c_char)
            .to_string_lossy()
            .into_owned()
    };
    if found != key {
        return Err(format!("it holds module {found}, not {key}"));
    }
    // SAFETY: an optc library of this key defines `optc_kernel_count` as a const uint64_t.
    let count = unsafe {
        let p = lib
            .get::<*const u64>(b"optc_kernel_count\0")
            .map_err(|e| e.to_string())?;
        **p
    };
    if count != module.kernels.len() as u64 {
        return Err(format!(
            "it has {count} kernels, not {}",
            module.kernels.len()
        ));
    }
    let fns: Vec<*const u8> = module
        .imports
        .iter()
        .map(|&i| match i {
            Import::Math(f) => math_address(f, module.precision),
            Import::F16Stochastic => storage_address(StorageFn::F16Stochastic),
        })
        .collect();
    // SAFETY: `optc_init` has this signature in every optc library and reads `imports.len()`
    // pointers, the Rust functions of the kernels' imports.
    unsafe {
        let init = lib
            .get::<unsafe extern "C" fn(*const *const u8)>(b"optc_init\0")
            .map_err(|e| e.to_string())?;
        init(fns.as_ptr());
    }
    let mut kernels = Vec::with_capacity(module.kernels.len());
    for k in &module.kernels {
        let name = format!("{}\0", k.symbol);
        // SAFETY: the generator defines every kernel with the Task ABI `fn(*const Task, u64)`.
        let f = unsafe { lib.get::<KernelFn>(name.as_bytes()) }.map_err(|e| e.to_string())?;
        kernels.push(*f);
    }
    Ok((Library { _lib: lib }, kernels))
}

/// The translation unit of a module built under `key`.
fn unit(module: &c::CModule, key: &str) -> String {
    format!(
        "{}\nconst char optc_module_key[] = \"{key}\";\n",
        module.source
    )
}

/// Builds (or finds in `cache`) and loads the library of `module`.
fn library(
    module: &c::CModule,
    tc: &Toolchain,
    cache: &NativeCache,
) -> Result<(Library, Vec<KernelFn>), NativeError> {
    let key = cache_key(&module.source, tc);
    if let Some(path) = cache.path(&key).filter(|p| p.exists()) {
        if let Ok(found) = load(&path, &key, module) {
            NativeCache::touch(&path);
            return Ok(found);
        }
        // A corrupt or foreign entry: refused, and replaced below.
    }
    let parent = cache
        .dir()
        .map(Path::to_path_buf)
        .filter(|d| std::fs::create_dir_all(d).is_ok())
        .unwrap_or_else(std::env::temp_dir);
    let dir = build_dir(&parent, &key)
        .map_err(|e| NativeError::Build(format!("cannot create a build folder: {e}")))?;
    let result = (|| {
        let built = tc
            .build(&dir, &unit(module, &key))
            .map_err(NativeError::Build)?;
        // Loaded under its build name: the loader never confuses it with an older entry.
        let found = load(&built, &key, module)
            .map_err(|e| NativeError::Build(format!("cannot load the built kernels: {e}")))?;
        if let Some(path) = cache.path(&key) {
            if std::fs::rename(&built, &path).is_ok() {
                cache.evict(&path);
            }
        }
        Ok(found)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Compiles every kernel of `p` with the native toolchain, buffers stored as `storage` says;
/// run them with `super::cranelift::run_kernel_stored`.
pub fn compile(
    p: &Program,
    precision: Precision,
    storage: &StorageMap,
    tc: &Toolchain,
    cache: &NativeCache,
) -> Result<JitProgram, NativeError> {
    let start = Instant::now();
    let module = c::module(p, precision, storage).map_err(|e| NativeError::Build(e.to_string()))?;
    let (lib, fns) = library(&module, tc, cache)?;
    let mut kernels: [Vec<Vec<Vec<JitKernel>>>; 2] = [Vec::new(), Vec::new()];
    for (ck, func) in module.kernels.iter().zip(fns) {
        let v = &mut kernels[ck.variant];
        if v.len() <= ck.stage {
            v.resize_with(ck.stage + 1, Vec::new);
        }
        let s = &mut v[ck.stage];
        if s.len() <= ck.phase {
            s.resize_with(ck.phase + 1, Vec::new);
        }
        s[ck.phase].push(JitKernel {
            func,
            storage: ck.abi.slots.iter().map(|&b| storage.of(b)).collect(),
            abi: ck.abi.clone(),
            space: ck.space,
            rounding_key: ck.rounding_key,
        });
    }
    // Every stage and phase of the program, also those without kernels.
    for (vi, v) in p.variants.iter().enumerate() {
        kernels[vi].resize_with(v.stages.len(), Vec::new);
        for (si, s) in v.stages.iter().enumerate() {
            kernels[vi][si].resize_with(s.phases.len(), Vec::new);
        }
    }
    Ok(JitProgram {
        _code: Code::Native(Arc::new(lib)),
        kernels,
        precision,
        storage: storage.clone(),
        compile_time: start.elapsed(),
    })
}

/// One stream of a [`StreamKernel`]: its elements, 4 or 2 bytes each.
#[derive(Debug)]
enum StreamBuf {
    F32(Vec<f32>),
    Bits(Vec<u16>),
}

impl StreamBuf {
    fn new(bytes: usize, n: usize, v: f32) -> StreamBuf {
        if bytes == 2 {
            StreamBuf::Bits(vec![(v.to_bits() >> 16) as u16; n])
        } else {
            StreamBuf::F32(vec![v; n])
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            StreamBuf::F32(v) => v.as_mut_ptr().cast(),
            StreamBuf::Bits(v) => v.as_mut_ptr().cast(),
        }
    }
}

/// The function of a stream kernel: `fn(bufs, start, end) -> bits` (what a pass that only
/// reads computed).
type StreamFn = unsafe extern "C" fn(*const *mut u8, u64, u64) -> u32;

/// A trivial kernel over some streams of `n` elements each, built by the native toolchain with
/// the kernels' flags ([`c::stream_kernel`]): the memory-bandwidth ceiling of an access pattern
/// (`optc bench`). It owns its streams; [`StreamKernel::run`] runs one pass over them.
pub struct StreamKernel {
    _lib: libloading::Library,
    func: StreamFn,
    bufs: Vec<StreamBuf>,
    n: usize,
    bytes: usize,
}

impl std::fmt::Debug for StreamKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamKernel({} streams of {})", self.bufs.len(), self.n)
    }
}

/// Elements per task of a stream kernel.
const STREAM_TASK: usize = 1 << 16;

impl StreamKernel {
    /// The kernel of streams of these element sizes (4 or 2 bytes) over `n` elements.
    pub fn new(
        tc: &Toolchain,
        read: &[usize],
        inplace: &[usize],
        write: &[usize],
        n: usize,
    ) -> Result<StreamKernel, NativeError> {
        let source = c::stream_kernel(read, inplace, write);
        let dir = build_dir(&std::env::temp_dir(), "streams")
            .map_err(|e| NativeError::Build(format!("cannot create a build folder: {e}")))?;
        let lib = (|| {
            let path = tc.build(&dir, &source).map_err(NativeError::Build)?;
            // SAFETY: the library was just built from `source`, which has no initializers.
            unsafe { libloading::Library::new(&path) }
                .map_err(|e| NativeError::Build(format!("cannot load the stream kernel: {e}")))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        let lib = lib?;
        let name = format!("{}\0", c::STREAM_KERNEL);
        // SAFETY: the generated source defines the symbol with this signature.
        let func = *unsafe { lib.get::<StreamFn>(name.as_bytes()) }
            .map_err(|e| NativeError::Build(e.to_string()))?;
        let mut bufs = Vec::new();
        for (v, x) in [(read, 1e-3), (inplace, 0.5), (write, 0.0)] {
            bufs.extend(v.iter().map(|&b| StreamBuf::new(b, n, x)));
        }
        let per: usize =
            read.iter().chain(write).sum::<usize>() + 2 * inplace.iter().sum::<usize>();
        Ok(StreamKernel {
            _lib: lib,
            func,
            bufs,
            n,
            bytes: per * n,
        })
    }

    /// Stream `j` (read, then in-place, then written streams), widened to f32.
    pub fn values(&self, j: usize) -> Option<Vec<f32>> {
        Some(match self.bufs.get(j)? {
            StreamBuf::F32(v) => v.clone(),
            StreamBuf::Bits(v) => v
                .iter()
                .map(|&h| f32::from_bits(u32::from(h) << 16))
                .collect(),
        })
    }

    /// Bytes one pass moves (in-place streams twice).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// One pass over the streams on `pool`'s threads, in tasks of a fixed size.
    pub fn run(&mut self, pool: &rayon::ThreadPool) {
        struct Ptrs(Vec<*mut u8>);
        // SAFETY: the tasks write disjoint element ranges of the buffers, which outlive the
        // pass (`self` is borrowed mutably throughout).
        unsafe impl Sync for Ptrs {}
        let ptrs = Ptrs(self.bufs.iter_mut().map(StreamBuf::ptr).collect());
        let (n, func) = (self.n, self.func);
        let ptrs = &ptrs;
        pool.install(|| {
            use rayon::prelude::*;
            (0..n.div_ceil(STREAM_TASK)).into_par_iter().for_each(|t| {
                let start = t * STREAM_TASK;
                let end = (start + STREAM_TASK).min(n);
                // SAFETY: every buffer holds `n` elements of the type the kernel was generated
                // for; this task alone touches `start..end`.
                std::hint::black_box(unsafe { func(ptrs.0.as_ptr(), start as u64, end as u64) });
            })
        });
    }
}
