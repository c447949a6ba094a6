//! The bandwidth ceiling of a rule's access pattern: per pass of a step over memory, a trivial
//! kernel over as many streams as that pass reads, updates in place and writes, each of its
//! element size, on the same threads; the passes one after another. `optc bench` and
//! `examples/native_bench.rs` report a step against it, measured in the same process.
//!
//! The trivial kernels are built by the system C compiler with the native engine's flags
//! (`-O3 -march=native`: the machine's widest vectors; [`StreamKernel`]), one loop touching
//! every stream per element as the fused kernels do, so the ceiling is the memory's and not
//! the instructions'. Without a C compiler they are Rust loops compiled for the widest
//! instruction set the CPU has ([`Isa`]), which reach less.

use optc_compiler::ir::{BufId, Node, Program};
use optc_runtime::engine::native::{StreamKernel, Toolchain};
use std::collections::BTreeSet;

/// A step's streams: the element size in bytes (4 or 2) of each buffer it only reads, reads and
/// writes, and only writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Streams {
    /// Buffers read, not written.
    pub read: Vec<usize>,
    /// Buffers read and written (in place).
    pub inplace: Vec<usize>,
    /// Buffers written, not read.
    pub write: Vec<usize>,
}

impl Streams {
    /// The streams of a later step of `p` (over every pass), `bytes(b)` the element size of
    /// buffer `b`.
    pub fn of(p: &Program, bytes: impl Fn(BufId) -> usize) -> Streams {
        let (mut read, mut written) = (BTreeSet::new(), BTreeSet::new());
        for s in &p.variants[1].stages {
            for ph in &s.phases {
                for k in &ph.kernels {
                    for &n in &k.loads {
                        if let Node::Load { buf, .. } = p.graph.node(n) {
                            read.insert(buf);
                        }
                    }
                    written.extend(k.stores.iter().map(|s| s.0));
                }
            }
        }
        Streams {
            read: read.difference(&written).map(|&b| bytes(b)).collect(),
            inplace: read.intersection(&written).map(|&b| bytes(b)).collect(),
            write: written.difference(&read).map(|&b| bytes(b)).collect(),
        }
    }

    /// The streams of each pass over memory of a later step of `p`, in order (a buffer that
    /// one pass stores and a later one loads is read by the later one).
    pub fn passes(p: &Program, bytes: impl Fn(BufId) -> usize) -> Vec<Streams> {
        let mut out = Vec::new();
        for s in &p.variants[1].stages {
            for ph in &s.phases {
                let (mut read, mut written) = (BTreeSet::new(), BTreeSet::new());
                for k in &ph.kernels {
                    for &n in &k.loads {
                        if let Node::Load { buf, .. } = p.graph.node(n) {
                            read.insert(buf);
                        }
                    }
                    written.extend(k.stores.iter().map(|s| s.0));
                }
                if read.is_empty() && written.is_empty() {
                    continue;
                }
                out.push(Streams {
                    read: read.difference(&written).map(|&b| bytes(b)).collect(),
                    inplace: read.intersection(&written).map(|&b| bytes(b)).collect(),
                    write: written.difference(&read).map(|&b| bytes(b)).collect(),
                });
            }
        }
        out
    }

    /// Bytes moved per element: each stream once, in-place ones twice.
    pub fn bytes_per_element(&self) -> usize {
        self.read.iter().sum::<usize>()
            + 2 * self.inplace.iter().sum::<usize>()
            + self.write.iter().sum::<usize>()
    }
}

enum Stream {
    F32(Vec<f32>),
    Bits(Vec<u16>),
}

impl Stream {
    fn new(bytes: usize, n: usize, v: f32) -> Stream {
        if bytes == 2 {
            Stream::Bits(vec![(v.to_bits() >> 16) as u16; n])
        } else {
            Stream::F32(vec![v; n])
        }
    }
}

enum Part<'a> {
    F32(&'a mut [f32]),
    Bits(&'a mut [u16]),
}

/// Elements per task of the trivial kernel.
const TASK: usize = 1 << 14;
/// Elements per block of its running sum: small, so that every stream is read and written
/// about at once (a few cache lines of each in turn), as a fused kernel does, and the hardware
/// prefetchers follow all of them.
const BLOCK: usize = 64;

/// A pass of the trivial kernel in Rust (where no C compiler works).
struct RustPass {
    n: usize,
    read: Vec<Stream>,
    inplace: Vec<Stream>,
    write: Vec<Stream>,
}

impl RustPass {
    fn new(streams: &Streams, n: usize) -> RustPass {
        let make = |v: &[usize], x: f32| v.iter().map(|&b| Stream::new(b, n, x)).collect();
        RustPass {
            n,
            read: make(&streams.read, 1e-3),
            inplace: make(&streams.inplace, 0.5),
            write: make(&streams.write, 0.0),
        }
    }

    fn run(&mut self, pool: &rayon::ThreadPool) {
        use rayon::prelude::*;
        let (n, ninplace) = (self.n, self.inplace.len());
        let tasks = n.div_ceil(TASK);
        let mut parts: Vec<Vec<Part<'_>>> = (0..tasks).map(|_| Vec::new()).collect();
        for s in self.inplace.iter_mut().chain(self.write.iter_mut()) {
            match s {
                Stream::F32(v) => {
                    for (p, c) in parts.iter_mut().zip(v.chunks_mut(TASK)) {
                        p.push(Part::F32(c));
                    }
                }
                Stream::Bits(v) => {
                    for (p, c) in parts.iter_mut().zip(v.chunks_mut(TASK)) {
                        p.push(Part::Bits(c));
                    }
                }
            }
        }
        let read = &self.read;
        let isa = Isa::detect();
        pool.install(|| {
            parts.into_par_iter().enumerate().for_each(|(t, mut mine)| {
                let start = t * TASK;
                let len = mine.first().map_or(TASK.min(n - start), |p| match p {
                    Part::F32(c) => c.len(),
                    Part::Bits(c) => c.len(),
                });
                isa.task(read, &mut mine, ninplace, start, len);
            })
        });
        std::hint::black_box(&self.inplace);
        std::hint::black_box(&self.write);
    }
}

enum Pass {
    Native(StreamKernel),
    Rust(RustPass),
}

/// The trivial kernels of an access pattern (one per pass) over `n` elements, on a pool of
/// threads.
pub struct Ceiling {
    pool: rayon::ThreadPool,
    n: usize,
    passes: Vec<(Streams, Pass)>,
    how: String,
}

impl std::fmt::Debug for Ceiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let streams: Vec<&Streams> = self.passes.iter().map(|p| &p.0).collect();
        write!(f, "Ceiling({streams:?} over {}, {})", self.n, self.how)
    }
}

/// The instruction set the trivial kernel is compiled for: the widest vectors this CPU has, so
/// the ceiling is the memory's and not the instructions' (a plain build targets 128-bit SSE2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 (F, BW, VL).
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// What the build targets.
    Baseline,
}

impl Isa {
    /// The widest this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "AVX-512",
            Isa::Avx2 => "AVX2",
            Isa::Baseline => "baseline",
        }
    }

    /// One task of the trivial kernel, compiled for this instruction set.
    #[allow(unsafe_code)]
    fn task(
        self,
        read: &[Stream],
        mine: &mut [Part<'_>],
        ninplace: usize,
        start: usize,
        len: usize,
    ) {
        match self {
            // SAFETY: `detect` found these features on this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { task_avx512(read, mine, ninplace, start, len) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { task_avx2(read, mine, ninplace, start, len) },
            _ => task(read, mine, ninplace, start, len),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn task_avx512(read: &[Stream], mine: &mut [Part<'_>], ninplace: usize, start: usize, len: usize) {
    task(read, mine, ninplace, start, len)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn task_avx2(read: &[Stream], mine: &mut [Part<'_>], ninplace: usize, start: usize, len: usize) {
    task(read, mine, ninplace, start, len)
}

/// Elements `start..start + len` of the trivial kernel: `mine` are the task's parts of the
/// in-place streams, then of the written ones.
#[inline(always)]
fn task(read: &[Stream], mine: &mut [Part<'_>], ninplace: usize, start: usize, len: usize) {
    let mut sum = [0f32; BLOCK];
    let mut b = 0;
    while b < len {
        let m = BLOCK.min(len - b);
        let sum = &mut sum[..m];
        sum.fill(0.0);
        for r in read {
            match r {
                Stream::F32(v) => {
                    for (s, x) in sum.iter_mut().zip(&v[start + b..start + b + m]) {
                        *s += x;
                    }
                }
                Stream::Bits(v) => {
                    for (s, &h) in sum.iter_mut().zip(&v[start + b..start + b + m]) {
                        *s += f32::from_bits(u32::from(h) << 16);
                    }
                }
            }
        }
        for (i, p) in mine.iter_mut().enumerate() {
            let inplace = i < ninplace;
            match p {
                Part::F32(c) if inplace => {
                    for (w, s) in c[b..b + m].iter_mut().zip(sum.iter()) {
                        *w = 0.5 * *w + s;
                    }
                }
                Part::F32(c) => c[b..b + m].copy_from_slice(sum),
                Part::Bits(c) if inplace => {
                    for (w, s) in c[b..b + m].iter_mut().zip(sum.iter()) {
                        *w ^= (s.to_bits() >> 16) as u16;
                    }
                }
                Part::Bits(c) => {
                    for (w, s) in c[b..b + m].iter_mut().zip(sum.iter()) {
                        *w = (s.to_bits() >> 16) as u16;
                    }
                }
            }
        }
        b += m;
    }
}

impl Ceiling {
    /// The kernel of one pass over `streams`, `n` elements, on `threads` threads.
    pub fn new(
        streams: &Streams,
        n: usize,
        threads: usize,
    ) -> Result<Ceiling, rayon::ThreadPoolBuildError> {
        Ceiling::of_passes(std::slice::from_ref(streams), n, threads)
    }

    /// The kernels of passes over `passes`, one after another, `n` elements each, on `threads`
    /// threads: built by the system C compiler where one works, else in Rust.
    pub fn of_passes(
        passes: &[Streams],
        n: usize,
        threads: usize,
    ) -> Result<Ceiling, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()?;
        let native = |s: &Streams| {
            let tc = Toolchain::find().ok()?;
            StreamKernel::new(&tc, &s.read, &s.inplace, &s.write, n).ok()
        };
        let mut built = Vec::new();
        let mut all_native = true;
        for s in passes {
            let pass = match native(s) {
                Some(k) => Pass::Native(k),
                None => {
                    all_native = false;
                    Pass::Rust(RustPass::new(s, n))
                }
            };
            built.push((s.clone(), pass));
        }
        let how = if all_native {
            "built by the C compiler, -march=native".to_string()
        } else {
            format!("Rust loops for {}: no C compiler", Isa::detect().name())
        };
        Ok(Ceiling {
            pool,
            n,
            passes: built,
            how,
        })
    }

    /// How the kernels were built.
    pub fn how(&self) -> &str {
        &self.how
    }

    /// The passes' streams.
    pub fn streams(&self) -> Vec<&Streams> {
        self.passes.iter().map(|p| &p.0).collect()
    }

    /// Bytes one run (every pass) moves.
    pub fn bytes(&self) -> usize {
        self.passes
            .iter()
            .map(|p| p.0.bytes_per_element())
            .sum::<usize>()
            * self.n
    }

    /// One run: every pass, in order.
    pub fn run(&mut self) {
        for (_, p) in &mut self.passes {
            match p {
                Pass::Native(k) => k.run(&self.pool),
                Pass::Rust(r) => r.run(&self.pool),
            }
        }
    }

    /// The median bandwidth of `runs` runs after one warm-up, in GB/s.
    pub fn measure(&mut self, runs: usize) -> f64 {
        self.run();
        let mut times: Vec<f64> = (0..runs.max(1))
            .map(|_| {
                let start = std::time::Instant::now();
                self.run();
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        self.bytes() as f64 / times[times.len() / 2] / 1e9
    }
}
